"""What ``python -m neox_jax.sample`` does, as importable functions.

``run(config)`` validates the config, loads the model and tokenizer, and runs one of
three modes: a single prompt (streamed), a file of prompts (batched, JSON lines out),
or an interactive loop on stdin. Every error a user can cause is raised as
``neox_jax.errors.UserError``; the entry point (``neox_jax.cli``) prints it and exits 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from neox_jax import config_checks
from neox_jax.errors import UserError, read_utf8
from neox_jax.inference.generator import Generator
from neox_jax.inference.sampling import SamplingParams
from neox_jax.loading import load_from_config

_EARLY_STOPPING = {"false": False, "true": True, "never": "never"}


def sampling_params(config) -> SamplingParams:
    """The ``SamplingParams`` named by a ``configs/sample.py`` config (validated)."""
    early = str(config.early_stopping).lower()
    if early not in _EARLY_STOPPING:
        raise UserError(f"--config.early_stopping={early!r}: choose false, true or never.")
    return SamplingParams(
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        repetition_penalty=config.repetition_penalty,
        seed=config.seed,
        stop_token_ids=tuple(config.stop_token_ids),
        stop_strings=tuple(config.stop_strings),
        ignore_eos=config.ignore_eos,
        truncate_prompt=config.truncate_prompt,
        num_beams=config.num_beams,
        length_penalty=config.length_penalty,
        early_stopping=_EARLY_STOPPING[early],
    )


def load_generator(config) -> Generator:
    """Load the model and tokenizer named by the config (its ``configs/common.py`` model
    block) into a ``Generator``."""
    if config.batch_size < 1:
        raise UserError(f"--config.batch_size must be >= 1, got {config.batch_size}.")
    mesh = inference_mesh(config.tensor_parallel, config.pipeline_stages)
    model_config, params, tokenizer = load_from_config(config, mesh=mesh)
    return Generator(
        model_config,
        params,
        tokenizer,
        max_cache_len=config.max_cache_len or None,
        max_batch_size=config.batch_size,
        mesh=mesh,
        pipeline_microbatches=config.pipeline_microbatches or None,
    )


def inference_mesh(tensor: int, stages: int):
    """A ``tensor`` x ``stage`` mesh on the first ``tensor * stages`` devices (None for 1x1)."""
    import jax

    from neox_jax.parallel import create_mesh

    if tensor < 1 or stages < 1:
        raise UserError(f"tensor_parallel and pipeline_stages must be >= 1: {tensor}, {stages}.")
    if tensor * stages == 1:
        return None
    devices = jax.devices()
    if tensor * stages > len(devices):
        raise UserError(
            f"tensor_parallel={tensor} x pipeline_stages={stages} needs {tensor * stages} "
            f"devices; {len(devices)} are available."
        )
    return create_mesh({"tensor": tensor, "stage": stages}, devices=devices[: tensor * stages])


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per non-empty line) or JSON lines with "prompt"."""
    path = Path(path)
    lines = [line for line in read_utf8(path, "prompt_file").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            prompts.append(record["prompt"] if isinstance(record, dict) else record)
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{path}:{n}: expected a JSON object with a 'prompt' ({e}).") from e
        if not isinstance(prompts[-1], str):
            raise UserError(f"{path}:{n}: 'prompt' must be a string.")
    return prompts


def run(config, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    """Run the sampling CLI described by ``config`` (see ``configs/sample.py``).

    Args:
      config: a ``configs/sample.py`` ConfigDict.
      stdin: where interactive prompts come from (default ``sys.stdin``).
      stdout: where output goes (default ``sys.stdout``).

    Raises:
      UserError: bad input (the message names the problem and the fix).
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    config_checks.sample(config)
    sampling = sampling_params(config)  # fail on bad values before loading the model
    prompts = read_prompts(config.prompt_file) if config.prompt_file else None
    generator = load_generator(config)
    if config.chat:  # fail on a bad template before the first prompt
        _model_text(generator, config, [], "")
    if config.prompt:
        _reply(generator, config, [], config.prompt, sampling, stdout)
    elif prompts is not None:
        _batch(generator, prompts, sampling, config, stdout)
    else:
        history: list[dict] = []  # chat mode: the conversation so far
        while True:
            stdout.write("> ")
            stdout.flush()
            line = stdin.readline()
            if not line.strip():
                break
            prompt = line.rstrip("\n")
            reply = _reply(generator, config, history, prompt, sampling, stdout)
            history.append({"role": "user", "content": prompt})
            history.append({"role": "assistant", "content": reply})


def _model_text(generator: Generator, config, history: list[dict], prompt: str) -> str:
    """What the model sees: the prompt, or (chat mode) the conversation in the chat
    template with the prompt as the next user turn and the assistant header after it."""
    if not config.chat:
        return prompt
    from neox_jax.finetune.chat import format_chat

    messages = [*history, {"role": "user", "content": prompt}]
    return format_chat(messages, generator.tokenizer, config.chat_template or None)


def _reply(generator: Generator, config, history, prompt: str, sampling, out: TextIO) -> str:
    if config.echo_prompt:
        out.write(prompt)
    text = _model_text(generator, config, history, prompt)
    if config.stream:
        pieces = []
        for piece in generator.stream(text, sampling):
            out.write(piece)
            out.flush()
            pieces.append(piece)
        reply = "".join(pieces)
    else:
        reply = generator.generate([text], sampling)[0].text
        out.write(reply)
    out.write("\n")
    out.flush()
    return reply


def _batch(generator: Generator, prompts, sampling, config, out: TextIO) -> None:
    texts = [_model_text(generator, config, [], p) for p in prompts]
    results = generator.generate(texts, sampling)
    lines = [
        json.dumps(
            {
                "prompt": p,
                "text": r.text,
                "finish_reason": r.finish_reason,
                "num_tokens": len(r.token_ids),
            },
            ensure_ascii=False,
        )
        for p, r in zip(prompts, results, strict=True)
    ]
    if config.output_file:
        Path(config.output_file).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {len(lines)} results to {config.output_file}", file=sys.stderr)
    else:
        out.write("\n".join(lines) + "\n")
        out.flush()
