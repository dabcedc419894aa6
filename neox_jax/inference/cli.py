"""What ``python -m neox_jax.sample`` does, as importable functions.

``run(config)`` validates the config, loads the model and tokenizer, and runs one of
three modes: a single prompt (streamed), a file of prompts (batched, JSON lines out),
or an interactive loop on stdin. Every error a user can cause is raised as
``neox_jax.errors.UserError``; the entry point (``neox_jax.cli``) prints it and exits 2.

Tool calling (chat mode with ``tools_file``): the tools are rendered into every prompt by
the chat template, and each reply is parsed in the template's tool-call format
(``neox_jax.inference.tool_calls``); calls are printed as one JSON line
``{"tool_calls": [...]}`` in OpenAI's structure. Interactively, the result of each call
is then read from stdin (``tool NAME> ``) and the model answers again; a call that does
not parse is reported and the conversation goes on. With a single prompt a malformed
call is a ``ToolCallError`` (exit 2); in prompt-file mode it is the line's
``tool_call_error``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from neox_jax import config_checks
from neox_jax.errors import UserError, read_utf8
from neox_jax.inference import tool_calls as tc
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
        presence_penalty=config.presence_penalty,
        frequency_penalty=config.frequency_penalty,
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


def read_tools(path: str | Path) -> list[dict]:
    """Tool schemas from a JSON file: a list of them, or an object with a "tools" list."""
    try:
        data = json.loads(read_utf8(Path(path), "tools_file"))
    except json.JSONDecodeError as e:
        raise UserError(f"tools_file {path} is not JSON: {e}.") from None
    tools = data.get("tools") if isinstance(data, dict) else data
    if not isinstance(tools, list) or not tools or not tc.tool_names(tools):
        raise UserError(
            f'tools_file {path} must hold a list of tool schemas (or {{"tools": [...]}}), '
            'each {"type": "function", "function": {"name": ..., "parameters": {...}}}.'
        )
    return tools


class _Tools:
    """Chat mode's tools (None: no tools_file) and the format replies are parsed in."""

    def __init__(self, config):
        self.tools, self.fmt = None, None
        if not config.tools_file:
            return
        if not config.chat:
            raise UserError("--config.tools_file needs --config.chat=True (tools go into the "
                            "chat template).")  # fmt: skip
        from neox_jax.finetune.chat import read_chat_template

        self.tools = read_tools(config.tools_file)
        template = read_chat_template(config.chat_template or None)
        self.fmt = tc.resolve_format(config.tool_call_format, template)
        if self.fmt is None:
            raise UserError(
                "the chat template has no tool-call format, so calls cannot be read back; "
                "give the model's own template (--config.chat_template) or name the format "
                f"(--config.tool_call_format, one of {', '.join(tc.FORMATS)})."
            )

    def parse(self, reply: str) -> tc.ParsedReply | None:
        """The reply's calls (None without tools); ``ToolCallError`` when malformed."""
        if self.fmt is None:
            return None
        return tc.parse_tool_calls(reply, self.fmt, tc.tool_names(self.tools))

    def turn(self, reply: str, out: TextIO) -> dict:
        """The assistant message for the history; prints its calls (or why they failed)."""
        try:
            parsed = self.parse(reply)
        except tc.ToolCallError as e:
            out.write(f"tool call error: {e}\n")
            parsed = None
        if not parsed or not parsed.tool_calls:
            return {"role": "assistant", "content": reply}
        out.write(json.dumps({"tool_calls": parsed.tool_calls}, ensure_ascii=False) + "\n")
        message = {"role": "assistant", "content": parsed.content, "tool_calls": parsed.tool_calls}
        return tc.for_template([message])[0]


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
    tools = _Tools(config)
    generator = load_generator(config)
    if config.chat:  # fail on a bad template before the first prompt
        _model_text(generator, config, [], "", tools.tools)
    if config.prompt:
        reply = _reply(generator, config, [], config.prompt, sampling, stdout, tools.tools)
        if (parsed := tools.parse(reply)) and parsed.tool_calls:
            stdout.write(json.dumps({"tool_calls": parsed.tool_calls}, ensure_ascii=False) + "\n")
    elif prompts is not None:
        _batch(generator, prompts, sampling, config, stdout, tools)
    else:
        _interactive(generator, config, sampling, tools, stdin, stdout)


def _interactive(generator, config, sampling, tools: _Tools, stdin, stdout) -> None:
    history: list[dict] = []  # chat mode: the conversation so far
    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line.strip():
            break
        prompt = line.rstrip("\n")
        reply = _reply(generator, config, history, prompt, sampling, stdout, tools.tools)
        history.append({"role": "user", "content": prompt})
        history.append(tools.turn(reply, stdout))
        while history[-1].get("tool_calls"):  # the tools' results, then the model again
            for call in history[-1]["tool_calls"]:
                name = call["function"]["name"]
                stdout.write(f"tool {name}> ")
                stdout.flush()
                result = stdin.readline().rstrip("\n")
                history.append({"role": "tool", "tool_call_id": call["id"], "name": name,
                                "content": result})  # fmt: skip
            reply = _reply(generator, config, history, None, sampling, stdout, tools.tools)
            history.append(tools.turn(reply, stdout))


def _model_text(
    generator: Generator, config, history: list[dict], prompt: str | None, tools=None
) -> str:
    """What the model sees: the prompt, or (chat mode) the conversation in the chat
    template with the prompt as the next user turn (None: none, e.g. after tool results),
    the tools rendered, and the assistant header after it."""
    if not config.chat:
        return prompt
    from neox_jax.finetune.chat import format_chat

    messages = [*history] + ([] if prompt is None else [{"role": "user", "content": prompt}])
    return format_chat(messages, generator.tokenizer, config.chat_template or None, tools=tools)


def _reply(
    generator: Generator, config, history, prompt: str | None, sampling, out: TextIO, tools=None
) -> str:
    if config.echo_prompt and prompt is not None:
        out.write(prompt)
    text = _model_text(generator, config, history, prompt, tools)
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


def _batch(generator: Generator, prompts, sampling, config, out: TextIO, tools: _Tools) -> None:
    texts = [_model_text(generator, config, [], p, tools.tools) for p in prompts]
    results = generator.generate(texts, sampling)
    lines = []
    for p, r in zip(prompts, results, strict=True):
        record = {
            "prompt": p,
            "text": r.text,
            "finish_reason": r.finish_reason,
            "num_tokens": len(r.token_ids),
        }
        try:
            if (parsed := tools.parse(r.text)) and parsed.tool_calls:
                record["tool_calls"] = parsed.tool_calls
        except tc.ToolCallError as e:
            record["tool_call_error"] = str(e)
        lines.append(json.dumps(record, ensure_ascii=False))
    if config.output_file:
        Path(config.output_file).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {len(lines)} results to {config.output_file}", file=sys.stderr)
    else:
        out.write("\n".join(lines) + "\n")
        out.flush()
