"""vLLM's tokenizer endpoints: ``POST /tokenize``, ``POST /detokenize``,
``GET /tokenizer_info``.

lm-eval's ``local-completions`` (``tokenizer_backend="auto"``, its default) probes
``/tokenizer_info`` and ``/tokenize`` and, when both answer, tokenizes through the server
instead of loading the model's tokenizer by name, which fails for a served folder that
is not a Hub id. The ids are the ones ``/v1/completions`` would give the same text: no
special tokens are added (this project's tokenizers add none; ``add_special_tokens`` is
accepted for vLLM's request shape and changes nothing).
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

from neox_jax.serving.protocol import bad


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    tokens: list[int]


def add_routes(
    app: FastAPI,
    tokenizer,
    *,
    check_model: Callable[[str | None], None],
    max_len: int,
    chat_template: str | None,
) -> None:
    """The three endpoints on ``app`` for ``tokenizer`` (each a 400 where it is None)."""

    def need():
        if tokenizer is None:
            raise bad("this server has no tokenizer: it takes and gives token ids only.")
        return tokenizer

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        # vLLM's /tokenize adds the special tokens the tokenizer adds (a Llama bos) by default
        ids = need().encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": max_len, "tokens": ids, "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        tok = need()
        bad_ids = [i for i in body.tokens if not 0 <= i < tok.vocab_size]
        if bad_ids:
            raise bad(
                f"token ids {bad_ids[:5]} are outside the tokenizer's vocabulary "
                f"[0, {tok.vocab_size}).",
                "tokens",
            )
        return {"prompt": tok.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        from neox_jax.finetune.chat import read_chat_template

        tok = need()

        def special(kind: str) -> str | None:
            idx = getattr(tok, f"{kind}_id")
            return None if idx is None else tok.id_to_token(idx)

        return {
            "tokenizer_class": type(tok).__name__,
            "bos_token": special("bos"),
            "eos_token": special("eos"),
            "pad_token": special("pad"),
            "chat_template": read_chat_template(chat_template),  # what chat renders with
            "model_max_length": max_len,
            "add_bos_token": tok.add_bos_token,
            "add_eos_token": bool(tok.special_suffix),
        }
