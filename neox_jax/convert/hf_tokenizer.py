"""Tokenizer files for a Hugging Face export that ``AutoTokenizer`` reads into our ids.

transformers picks a tokenizer class from ``tokenizer_config.json`` (else from the model
type: ``GPTNeoXTokenizer``, a byte-level BPE). A bare sentencepiece ``tokenizer.model``
beside a GPT-NeoX ``config.json`` therefore loads as the wrong tokenizer, silently. So an
export carries:

* ``tokenizer.json``: the Hugging Face file as is, or, for a sentencepiece model, an
  equivalent ``tokenizers`` pipeline built from the model's protobuf (BPE with merges ranked
  by piece score, or Unigram; byte fallback; the normalizer flags the model declares);
* ``tokenizer_config.json``: ``tokenizer_class`` (``PreTrainedTokenizerFast``, which loads
  ``tokenizer.json`` verbatim), the special tokens, ``add_bos_token`` / ``add_eos_token``
  as our tokenizer adds them to a model input (a sentencepiece model's are written into the
  converted ``tokenizer.json`` as its post_processor, which transformers follows), no
  "clean-up" of spaces, and the chat template when the run was chat fine-tuned;
* ``generation_config.json`` when the tokenizer folder has one (its eos ids, defaults).

A converted sentencepiece model is checked against sentencepiece itself on a fixed set of
texts before anything is written; a model we cannot reproduce exactly is refused.

Known difference, shared by every ``tokenizers`` port of sentencepiece: a literal "▁"
(U+2581) in the text becomes the space piece (our ``SentencePieceTokenizer`` spells it in
bytes), and a special-token string such as ``<|endoftext|>`` in the text becomes its id,
as transformers does for every tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from neox_jax.data.tokenizer import (
    CONFIG_FILE,
    GENERATION_FILE,
    HF_FILE,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
)
from neox_jax.data.tokenizer import Tokenizer as TokenizerOfOurs  # tokenizers' is Tokenizer
from neox_jax.errors import UserError

_META = "\u2581"
# sentencepiece_model.proto enums.
_UNIGRAM, _BPE = 1, 2
_NORMAL, _UNKNOWN, _CONTROL, _USER, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
# Texts on which a converted model must give sentencepiece's ids (no literal "▁", no
# special-token strings: see the module docstring).
PROBE_TEXTS = (
    "def foo(x):\n    return x",
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces   \n\n\tTabs\tand\r\nCRLF\r\n",
    "def f(x):\n\tif x:\n\t\treturn x  \n\n\n    pass   \n",  # unigram ties between space runs
    "unicode: naïve café, 机器学习很有趣, Съешь ещё, مرحبا, नमस्ते, 🦀🐍 👩‍💻 🇺🇸 ∑∫≠",
    "digits 1234567890 3.14159 and 0x1F, code: for i in range(10): print(i ** 2)",
    "unknown characters: \x00\x07 \U0001f9ff \u0378 ꙮ",
    "",
    " ",
    "\n",
)


def _model_proto(tok: SentencePieceTokenizer):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok._sp.serialized_model_proto())
    return proto


def _bpe_merges(vocab: dict[str, int], mergeable: set[str], scores: dict[str, float]):
    # sentencepiece BPE merges the adjacent pair whose joined piece scores highest; a
    # `tokenizers` BPE applies the lowest-ranked merge. Rank every split of every piece into
    # two pieces by the joined piece's score (then ids, for a stable order).
    merges = []
    for piece in mergeable:
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in mergeable and right in mergeable:
                key = (-scores[piece], vocab[piece], vocab[left], vocab[right])
                merges.append((key, (left, right)))
    return [pair for _, pair in sorted(merges)]


def _model(proto, vocab: dict[str, int], unk: str | None):
    byte_fallback = bool(proto.trainer_spec.byte_fallback)
    if proto.trainer_spec.model_type == _UNIGRAM:
        pieces = [(p.piece, p.score) for p in proto.pieces]
        unk_id = vocab[unk] if unk is not None else None
        return models.Unigram(pieces, unk_id=unk_id, byte_fallback=byte_fallback)
    if proto.trainer_spec.model_type != _BPE:
        raise UserError(
            "only sentencepiece BPE and unigram models can be exported for transformers; this "
            f"one has model_type={proto.trainer_spec.model_type}"
        )
    normal = {p.piece for p in proto.pieces if p.type == _NORMAL}
    scores = {p.piece: p.score for p in proto.pieces}
    merges = _bpe_merges(vocab, normal, scores)
    return models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=byte_fallback)


def sentencepiece_to_tokenizers(tok: SentencePieceTokenizer) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` that encodes and decodes like the sentencepiece model.

    Args:
      tok: the sentencepiece tokenizer.

    Returns:
      The equivalent ``tokenizers`` pipeline (not yet checked; see ``check_same_ids``).
    """
    proto = _model_proto(tok)
    spec = proto.normalizer_spec
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = next((p.piece for p in proto.pieces if p.type == _UNKNOWN), None)
    raw = Tokenizer(_model(proto, vocab, unk))
    steps = []
    if spec.precompiled_charsmap:  # nmt_nfkc and friends: the same compiled rules
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if steps:
        raw.normalizer = normalizers.Sequence(steps)
    # Metaspace writes " " as "▁" and, with a dummy prefix, prepends one to the text's start
    # only (not after each special token), as sentencepiece does.
    prepend = "first" if spec.add_dummy_prefix else "never"
    splits = [pre_tokenizers.Metaspace(replacement=_META, prepend_scheme=prepend, split=False)]
    if proto.trainer_spec.split_digits:
        splits.append(pre_tokenizers.Digits(individual_digits=True))
    raw.pre_tokenizer = pre_tokenizers.Sequence(splits)
    steps = [decoders.Replace(_META, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    raw.decoder = decoders.Sequence(steps)
    # Control and unknown pieces are special tokens (skipped by skip_special_tokens);
    # user-defined pieces ("\n" in ours) are matched whole before the model, as in sentencepiece.
    raw.add_special_tokens(
        [AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces
         if p.type in (_CONTROL, _UNKNOWN)]
    )  # fmt: skip
    raw.add_tokens(
        [AddedToken(p.piece, special=False, normalized=False) for p in proto.pieces
         if p.type == _USER]
    )  # fmt: skip
    return raw


def check_same_ids(tok: SentencePieceTokenizer, raw: Tokenizer, texts=PROBE_TEXTS) -> None:
    """Raises ``UserError`` naming the first text on which ``raw`` and ``tok`` disagree."""
    for text in texts:
        ours = tok.encode(text)
        theirs = raw.encode(text, add_special_tokens=False).ids
        back = raw.decode(ours, skip_special_tokens=False)
        if ours != theirs or back != tok.decode(ours):
            raise UserError(
                f"{tok.path}: cannot write a tokenizer.json that transformers reads into the "
                f"same ids as this sentencepiece model (they differ on {text!r}); export without "
                "a tokenizer or use a model from neox_jax.data.spm_training."
            )


def _special(tok, kind: str) -> str | None:
    idx = getattr(tok, f"{kind}_id")
    return None if idx is None else tok.id_to_token(idx)


def hf_tokenizer_config(tok, chat_template: str | None = None) -> dict:
    """The ``tokenizer_config.json`` for an export of ``tok`` (see the module docstring)."""
    config = {k: v for k, v in tok._config.items() if k != "chat_template"}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    if isinstance(tok, SentencePieceTokenizer):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"  # never the slow sentencepiece one
        unk = tok._sp.unk_id()
        config["unk_token"] = tok.id_to_token(unk) if unk >= 0 else None
    for kind in ("bos", "eos", "pad"):
        config[f"{kind}_token"] = _special(tok, kind)
    # What our encode adds to a model input (transformers <5 rewrites a Llama tokenizer's
    # post_processor from these flags), and decode leaves spaces alone.
    config.update(
        add_bos_token=tok.add_bos_token,
        add_eos_token=bool(tok.special_suffix),
        clean_up_tokenization_spaces=False,
    )
    if chat_template:
        config["chat_template"] = chat_template
    return config


def write_hf_tokenizer(
    tokenizer_path: str | os.PathLike, out_dir: str | os.PathLike, chat_template: str | None = None
) -> TokenizerOfOurs:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` for transformers into ``out_dir``.

    Args:
      tokenizer_path: our tokenizer (a file or a folder; see ``load_tokenizer``).
      out_dir: the export folder (exists).
      chat_template: Jinja text of the run's chat template, or None.

    Returns:
      The tokenizer written (as ``load_tokenizer`` read it).
    """
    tok = load_tokenizer(tokenizer_path)
    out_dir = Path(out_dir)
    if isinstance(tok, HFTokenizer):
        (out_dir / HF_FILE).write_bytes(tok.file_bytes())
    else:
        raw = sentencepiece_to_tokenizers(tok)
        check_same_ids(tok, raw)
        if tok.special_prefix or tok.special_suffix:  # add_bos_token / add_eos_token
            ends = [*tok.special_prefix, *tok.special_suffix]
            single = " ".join(
                [*(f"{tok.id_to_token(i)}:0" for i in tok.special_prefix), "$A:0"]
                + [f"{tok.id_to_token(i)}:0" for i in tok.special_suffix]
            )
            raw.post_processor = processors.TemplateProcessing(
                single=single, special_tokens=[(tok.id_to_token(i), i) for i in dict.fromkeys(ends)]
            )
        raw.save(str(out_dir / HF_FILE))
    config = hf_tokenizer_config(tok, chat_template)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if tok.generation is not None:  # the eos ids transformers' generate stops at
        (out_dir / GENERATION_FILE).write_bytes(tok.generation.file_bytes())
    return tok


def special_token_ids(tok: TokenizerOfOurs) -> dict[str, Any]:
    """The ``config.json`` fields naming ``tok``'s special ids (transformers' ``generate``
    falls back to them without a generation_config.json).

    When the tokenizer's generation config holds a source model's own ``config.json`` ids
    (``GenerationDefaults.mirrors_model_config``: a folder converted from Hugging Face
    carries them so), those, unset ones included: a round trip gives back the config it
    came from. Otherwise each field the generation config names, else the tokenizer's:
    bos (null when there is none), eos (a list when generation stops at several), pad
    when there is one.
    """
    gen = tok.generation
    if gen is not None and gen.mirrors_model_config:
        return {
            "bos_token_id": gen.bos_token_id,
            "eos_token_id": _one_or_list(gen.eos_token_ids),
            "pad_token_id": gen.pad_token_id,
        }
    bos, pad = (gen.bos_token_id, gen.pad_token_id) if gen is not None else (None, None)
    out: dict[str, Any] = {"bos_token_id": tok.bos_id if bos is None else bos}
    if tok.eos_ids:
        out["eos_token_id"] = _one_or_list(tok.eos_ids)
    if (pad := tok.pad_id if pad is None else pad) is not None:
        out["pad_token_id"] = pad
    return out


def _one_or_list(ids: tuple[int, ...]) -> int | list[int] | None:
    """An id field as transformers writes it: one id, a list of several, null for none."""
    return None if not ids else ids[0] if len(ids) == 1 else list(ids)
