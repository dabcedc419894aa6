"""Chat templates: render conversations, find the assistant tokens exactly, tokenize.

A template is Jinja, rendered as transformers' ``apply_chat_template`` does: in an
``ImmutableSandboxedEnvironment`` (templates from the Hub are untrusted code) with
``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that
does not HTML-escape, and ``raise_exception`` / ``strftime_now``; the variables are
``messages``, ``add_generation_prompt``, ``tools`` (None unless given, as transformers
passes it), ``documents`` (None) and the tokenizer's ``bos_token``, ``eos_token``,
``pad_token``. A ``{% generation %}`` block (transformers' assistant-mask marker) renders
its body unchanged.

Tool calling follows transformers' conventions: ``tools`` is a list of JSON schemas
(``{"type": "function", "function": {"name", "description", "parameters"}}``), an
assistant message may hold ``tool_calls`` (``[{"id", "type": "function", "function":
{"name", "arguments": dict}}]``; its content may then be empty or None) and results come
back as ``{"role": "tool", "content": str, "tool_call_id": ...}`` messages. Tool results
are not assistant turns, so SFT never trains on them. A template that never mentions
``tools`` would drop them silently, so tools given to such a template are refused.

GPT-NeoX and Pythia ship no chat template, so the default (``DEFAULT_CHAT_TEMPLATE``) is a
plain one whose role headers are ordinary text::

    <|system|>\\n{system}\\n<|user|>\\n{question}\\n<|assistant|>\\n{answer}<|endoftext|>

Each system/user turn ends with a newline, each assistant turn with the eos token (so
the model learns to stop), and the generation prompt is ``<|assistant|>\\n``.

Which characters are the assistant's is found by rendering prefixes, never by searching
the text: assistant message ``i`` spans from the end of
``render(messages[:i], add_generation_prompt=True)`` to the end of
``render(messages[:i + 1])``, which includes whatever the template writes after the
content (the eos above); an assistant message with ``"weight": 0`` (OpenAI's fine-tuning
format) is cut the same way but not trained on. Every prefix must be a prefix of the next
render; a template for which that fails is rejected with the message index rather than
guessed at.

The rendered text is tokenized piece by piece at those boundaries (``encode_segments``),
so a token never straddles prompt and answer, and a prompt tokenizes exactly as the
same prompt does at generation time (``encode_chat``). Special-token strings in the text
(``<|endoftext|>``) become their ids with either tokenizer backend.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from neox_jax.errors import UserError, read_utf8

ROLES = ("system", "user", "assistant", "tool")

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


class ChatFormatError(UserError):
    """A conversation or template that cannot be rendered; the message says what to fix."""


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body (spans come from prefixes)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(
            lineno
        )

    def _render(self, caller):
        return caller()


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def read_chat_template(source: str | None) -> str:
    """The Jinja text named by ``source``.

    Args:
      source: "" or None for ``DEFAULT_CHAT_TEMPLATE``; a literal template (contains
        ``{%`` or ``{{``); a ``tokenizer_config.json`` (its ``chat_template``, a string or
        a list of ``{"name", "template"}`` from which "default" is taken); a folder holding
        ``chat_template.jinja`` or such a ``tokenizer_config.json``; or any other text file.

    Returns:
      The template text.
    """
    if not source:
        return DEFAULT_CHAT_TEMPLATE
    if "{%" in source or "{{" in source:
        return source
    path = Path(source)
    if path.is_dir():
        if (path / "chat_template.jinja").is_file():
            return read_utf8(path / "chat_template.jinja", "chat template")
        path = path / "tokenizer_config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"chat template {source!r} is neither a template, a file, nor a folder with "
            "chat_template.jinja / tokenizer_config.json."
        )
    if path.suffix != ".json":
        return read_utf8(path, "chat template")
    try:
        template = json.loads(read_utf8(path, "chat template")).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ChatFormatError(f"{path} is not a JSON object: {e}") from None
    if isinstance(template, list):  # transformers' named templates
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        raise ChatFormatError(
            f"{path} has no chat_template; leave the template empty for the default one."
        )
    return template


def run_chat_template(path: str | Path) -> str | None:
    """The chat template an SFT run trained with, or None when ``path`` is no SFT run.

    Args:
      path: a run directory, or a checkpoint inside one (``<run>/checkpoints/<step>``);
        the run's ``config.json`` is looked for there and up to two folders above.

    Returns:
      The Jinja text (``data.sft_chat_template``, or the default) for a run with
      ``data.source="sft"``; None otherwise.
    """
    path = Path(path)
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "config.json").is_file():
            try:
                data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                return None
            run_data = data.get("data") if isinstance(data, dict) else None
            if not isinstance(run_data, dict) or "source" not in run_data:
                continue  # a model's config.json, not a run's
            if run_data["source"] != "sft":
                return None
            return read_chat_template(run_data.get("sft_chat_template") or None)
    return None


class ChatTemplate:
    """A compiled template plus the special-token strings it may use.

    Args:
      template: Jinja text (see ``read_chat_template``).
      special_tokens: ``{"bos_token": ..., "eos_token": ..., "pad_token": ...}`` strings
        ("" when the tokenizer lacks one).
    """

    def __init__(self, template: str, special_tokens: dict[str, str]):
        self.source = template
        self.special_tokens = dict(special_tokens)
        try:
            self._template = _environment().from_string(template)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ChatFormatError(f"chat template does not compile: {e}") from None

    @classmethod
    def for_tokenizer(cls, tokenizer, template: str | None = None) -> ChatTemplate:
        """The template ``template`` (default: ``DEFAULT_CHAT_TEMPLATE``) for ``tokenizer``."""
        tokens = {}
        for kind in ("bos", "eos", "pad"):
            idx = getattr(tokenizer, f"{kind}_id", None)
            tokens[f"{kind}_token"] = (tokenizer.id_to_token(idx) or "") if idx is not None else ""
        return cls(read_chat_template(template), tokens)

    @property
    def renders_tools(self) -> bool:
        """Whether the template reads the ``tools`` variable at all."""
        return re.search(r"\btools\b", self.source) is not None

    def render(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = False,
        tools: Sequence[dict] | None = None,
    ) -> str:
        """The conversation as text (no tokenization); ``tools``: JSON schemas or None."""
        if tools and not self.renders_tools:
            raise ChatFormatError(
                "tools were given but the chat template never renders 'tools' (the default "
                "template has no tool format); use the model's own template, e.g. Qwen2.5's "
                "or Mistral's tokenizer_config.json."
            )
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                tools=None if tools is None else [dict(t) for t in tools],
                documents=None,
                **self.special_tokens,
            )
        except (jinja2.exceptions.TemplateError, TypeError) as e:  # TypeError: e.g. None + str
            raise ChatFormatError(f"chat template failed to render: {e}") from None

    def segments(
        self, messages: Sequence[dict], tools: Sequence[dict] | None = None
    ) -> list[tuple[str, bool]]:
        """The rendered conversation cut into ``(text, is_assistant)`` pieces.

        The pieces concatenate to ``render(messages, tools=tools)``; see the module
        docstring for how the assistant pieces are found.
        """
        validate_messages(messages)
        validate_tools(tools)
        full = self.render(messages, tools=tools)
        pieces: list[tuple[str, bool]] = []
        done = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True, tools=tools)
            upto = self.render(messages[: i + 1], tools=tools)
            start = len(prompt)
            if not (full.startswith(upto) and upto.startswith(prompt) and start >= done):
                raise ChatFormatError(
                    f"the chat template is not prefix-consistent at message {i} (rendering "
                    "the conversation up to it is not a prefix of the whole), so its assistant "
                    "tokens cannot be located exactly; use a template whose turns only append."
                )
            if start > done:
                pieces.append((full[done:start], False))
            # OpenAI's fine-tuning format: "weight": 0 keeps an answer out of the loss.
            pieces.append((full[start : len(upto)], message.get("weight", 1) != 0))
            done = len(upto)
        if done < len(full):
            pieces.append((full[done:], False))
        return [p for p in pieces if p[0]]


def validate_messages(messages) -> None:
    """A non-empty list of ``{"role": one of ROLES, "content": str}``, else ``ChatFormatError``.

    An assistant message with ``tool_calls`` may have no content (None or missing).
    """
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("'messages' must be a non-empty list of {role, content} objects.")
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not calls):
            raise ChatFormatError(f"message {i} must be an object with 'role' and 'content'.")
        if m["role"] not in ROLES:
            raise ChatFormatError(
                f"message {i} has unknown role {m['role']!r}; valid roles: {', '.join(ROLES)}."
            )
        if m.get("weight", 1) not in (0, 1) or isinstance(m.get("weight"), bool):
            raise ChatFormatError(f"message {i} weight must be 0 or 1, got {m['weight']!r}.")
        if calls is not None:
            _check_tool_calls(i, m)
        elif not isinstance(m["content"], str):
            raise ChatFormatError(f"message {i} content must be a string.")


def _check_tool_calls(i: int, m: dict) -> None:
    where = f"message {i}"
    if m["role"] != "assistant":
        raise ChatFormatError(f"{where}: only assistant messages may hold tool_calls.")
    if not isinstance(m.get("content", ""), str | None):
        raise ChatFormatError(f"{where} content must be a string or null.")
    if not isinstance(m["tool_calls"], list) or not m["tool_calls"]:
        raise ChatFormatError(f"{where}: tool_calls must be a non-empty list.")
    for j, call in enumerate(m["tool_calls"]):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatFormatError(
                f"{where} tool_calls[{j}] must be {{'function': {{'name': str, 'arguments': "
                "object}}}}."
            )
        if not isinstance(fn.get("arguments", {}), dict | str):
            raise ChatFormatError(f"{where} tool_calls[{j}] arguments must be an object.")


def validate_tools(tools) -> None:
    """None, or a list of tool JSON schemas (objects), else ``ChatFormatError``."""
    if tools is None:
        return
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ChatFormatError(
            "'tools' must be a list of JSON schemas like {'type': 'function', 'function': "
            "{'name': ..., 'description': ..., 'parameters': {...}}}."
        )


# ----------------------------------------------------------------- tokenization
def _special_strings(tokenizer) -> dict[str, int]:
    out = {}
    for kind in ("bos", "eos", "pad"):
        idx = getattr(tokenizer, f"{kind}_id", None)
        if idx is not None and (text := tokenizer.id_to_token(idx)):
            out[text] = idx
    return out


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's bos/eos/pad strings mapped to their ids.

    Hugging Face tokenizers already match added tokens inside text; sentencepiece does not,
    so the special strings are split out first to give the same ids with both backends.
    """
    specials = _special_strings(tokenizer)
    if not specials or not any(s in text for s in specials):
        return tokenizer.encode(text) if text else []
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    ids: list[int] = []
    for part in re.split(pattern, text):
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids.extend(tokenizer.encode(part))
    return ids


def encode_segments(tokenizer, segments: Sequence[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """``(ids, mask)``: each piece tokenized on its own, mask 1 on the trainable pieces."""
    ids: list[int] = []
    mask: list[int] = []
    for text, trainable in segments:
        piece = encode_text(tokenizer, text)
        ids.extend(piece)
        mask.extend([int(trainable)] * len(piece))
    return ids, mask


def format_chat(
    messages: Sequence[dict],
    tokenizer,
    template: str | None = None,
    add_generation_prompt: bool = True,
    tools: Sequence[dict] | None = None,
) -> str:
    """The prompt text for generating the next assistant turn.

    Args:
      messages: ``[{"role", "content"}, ...]`` with roles from ``ROLES``.
      tokenizer: a ``neox_jax.data.tokenizer.Tokenizer`` (for its special-token strings).
      template: see ``read_chat_template``; None/"" is ``DEFAULT_CHAT_TEMPLATE``.
      add_generation_prompt: end with the assistant header.
      tools: tool JSON schemas for the template (None: no tools).

    Returns:
      The rendered text. ``encode_chat`` gives the ids the model was trained on.
    """
    validate_messages(list(messages))
    validate_tools(tools)
    chat = ChatTemplate.for_tokenizer(tokenizer, template)
    return chat.render(list(messages), add_generation_prompt=add_generation_prompt, tools=tools)


def encode_chat(
    messages: Sequence[dict],
    tokenizer,
    template: str | None = None,
    add_generation_prompt: bool = True,
    tools: Sequence[dict] | None = None,
) -> list[int]:
    """Prompt token ids for ``messages``, cut at turn boundaries exactly as in training.

    Past assistant turns are tokenized as separate pieces, as ``segments`` cut them in
    the SFT data, so a multi-turn prompt gets the very ids the model saw.
    """
    messages = list(messages)
    validate_messages(messages)
    chat = ChatTemplate.for_tokenizer(tokenizer, template)
    pieces = chat.segments(messages, tools)
    full = chat.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    rendered = "".join(p for p, _ in pieces)
    if not full.startswith(rendered):
        raise ChatFormatError("the generation prompt does not extend the rendered conversation.")
    if len(full) > len(rendered):
        # The generation prompt joins the last prompt piece, as in training, where the
        # header before an answer is one piece with the turn before it.
        if pieces and not pieces[-1][1]:
            pieces[-1] = (pieces[-1][0] + full[len(rendered) :], False)
        else:
            pieces.append((full[len(rendered) :], False))
    return encode_segments(tokenizer, pieces)[0]
