"""Tool calls in generated text -> OpenAI's ``tool_calls`` structure.

Each model family writes its calls in the format its chat template teaches it:

* ``"qwen"`` (Qwen2.5, Qwen3; the Hermes format): one block per call,
  ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>``, possibly several;
* ``"mistral"``: ``[TOOL_CALLS] [{"name": "f", "arguments": {...}, "id": "abcDEF123"}, ...]``
  (Mistral 7B v0.3 and Ministral templates); the newer ``[TOOL_CALLS]f[ARGS]{...}`` form
  (Mistral Small 3.x, one marker per call) is read too.

``detect_format`` picks the format from the chat template's text (the template renders
past calls in it), ``--config.tool_call_format`` / the server's option can name it instead.

A call is returned as OpenAI does: ``{"id", "type": "function", "function": {"name",
"arguments": <JSON text of an object>}}``. Text outside the calls is the message content
(None when only whitespace). A call that cannot be read (bad JSON, no name, arguments
that are not an object, an unclosed block, a function not among the offered tools)
raises ``ToolCallError``: the sampling CLI reports it (``neox_jax.inference.cli``), the
server answers HTTP 422
(``code: "invalid_tool_call"``) with the reason and the generated text, since silently
returning a broken call as prose would hide it from the agent that asked for tools.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import string

from neox_jax.errors import UserError

FORMATS = ("qwen", "mistral")
MARKERS = {"qwen": "<tool_call>", "mistral": "[TOOL_CALLS]"}
_QWEN_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_ALNUM = string.ascii_letters + string.digits


class ToolCallError(UserError):
    """Generated text holds a tool call that cannot be parsed; ``text`` is that text."""

    def __init__(self, message: str, text: str = ""):
        shown = text if len(text) <= 400 else text[:400] + "..."
        super().__init__(f"{message} (generated text: {shown!r})" if text else message)
        self.reason, self.text = message, text


@dataclasses.dataclass
class ParsedReply:
    """A generated assistant turn: its prose and its calls (OpenAI's structure)."""

    content: str | None
    tool_calls: list[dict]


def detect_format(template: str | None) -> str | None:
    """The tool-call format a chat template writes past calls in, or None."""
    for fmt, marker in MARKERS.items():
        if template and marker in template:
            return fmt
    return None


def resolve_format(setting: str, template: str | None) -> str | None:
    """The format named by ``setting`` ("auto" = ``detect_format(template)``, "qwen" or
    "mistral"); ``UserError`` on another name."""
    if setting in ("", "auto"):
        return detect_format(template)
    if setting not in FORMATS:
        raise UserError(
            f"tool_call_format={setting!r} is unknown; choose auto, {', '.join(FORMATS)}."
        )
    return setting


def new_call_id(fmt: str) -> str:
    """A fresh call id; Mistral's templates require exactly 9 letters and digits."""
    if fmt == "mistral":
        return "".join(secrets.choice(_ALNUM) for _ in range(9))
    return f"call_{secrets.token_hex(12)}"


def forced_prefix(fmt: str, name: str | None = None, template: str | None = None) -> str:
    """The text that starts a tool call in format ``fmt``: forced into a generation, the
    model can only go on writing a call (OpenAI's ``tool_choice`` "required"), or, with
    ``name``, that function's arguments (a named ``tool_choice``). Mistral templates that
    write ``[TOOL_CALLS]name[ARGS]{...}`` (Mistral Small 3.x) get that form, older ones
    the JSON list form."""
    marker = MARKERS[fmt]
    if fmt == "qwen":
        return (
            f"{marker}\n"
            if name is None
            else f'{marker}\n{{"name": {json.dumps(name)}, "arguments": '
        )
    if template and "[ARGS]" in template:
        return marker if name is None else f"{marker}{name}[ARGS]"
    return (
        f"{marker} [" if name is None else f'{marker} [{{"name": {json.dumps(name)}, "arguments": '
    )


def check_forced(calls: list[dict], name: str | None, text: str = "") -> None:
    """``ToolCallError`` unless ``calls`` obey a forced tool choice: at least one call,
    and (``name`` given) only calls of ``name``."""
    if not calls:
        raise ToolCallError("tool_choice requires a tool call and the reply holds none", text)
    wrong = sorted({c["function"]["name"] for c in calls} - {name}) if name else []
    if wrong:
        raise ToolCallError(f"tool_choice names {name!r} but the model called {wrong}", text)


def parse_tool_calls(text: str, fmt: str, tool_names=None) -> ParsedReply:
    """The content and calls of ``text`` in format ``fmt``.

    Args:
      text: the generated assistant text (special tokens kept, eos removed).
      fmt: one of ``FORMATS``.
      tool_names: the offered functions' names; a call to another is an error (None:
        not checked).

    Raises:
      ToolCallError: a call is malformed (the message says how).
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown tool-call format {fmt!r}; choose {', '.join(FORMATS)}.")
    prose, raw = (_split_qwen if fmt == "qwen" else _split_mistral)(text)
    calls = [_openai_call(obj, fmt, text, tool_names) for obj in raw]
    content = "".join(prose)
    return ParsedReply(content if content.strip() else None, calls)


def _split_qwen(text: str) -> tuple[list[str], list]:
    prose, raw, pos = [], [], 0
    for m in _QWEN_BLOCK.finditer(text):
        prose.append(text[pos : m.start()])
        raw.append(_json(m.group(1).strip(), text, "the <tool_call> block"))
        pos = m.end()
    rest = text[pos:]
    if MARKERS["qwen"] in rest:
        raise ToolCallError(
            "a <tool_call> block is not closed by </tool_call> (was the generation cut "
            "by max_tokens?)",
            text,
        )
    return [*prose, rest], raw


def _split_mistral(text: str) -> tuple[list[str], list]:
    marker = MARKERS["mistral"]
    at = text.find(marker)
    if at < 0:
        return [text], []
    body = text[at + len(marker) :]
    if body.lstrip().startswith("["):  # [TOOL_CALLS] [{...}, ...]
        obj, end = _json_prefix(body.lstrip(), text, "the [TOOL_CALLS] list")
        if not isinstance(obj, list) or not obj:
            raise ToolCallError("[TOOL_CALLS] must be followed by a non-empty JSON list", text)
        return [text[:at], body.lstrip()[end:]], obj
    raw, rest = [], ""
    for part in body.split(marker):  # [TOOL_CALLS]name[ARGS]{...} per call
        name, sep, args = part.partition("[ARGS]")
        if not sep or not name.strip():
            raise ToolCallError("a [TOOL_CALLS] call must read name[ARGS]{json}", text)
        obj, end = _json_prefix(args, text, f"the arguments of {name.strip()!r}")
        raw.append({"name": name.strip(), "arguments": obj})
        rest += args[end:]
    return [text[:at], rest], raw


def _json(source: str, text: str, what: str):
    try:
        return json.loads(source)
    except json.JSONDecodeError as e:
        raise ToolCallError(f"{what} is not valid JSON ({e})", text) from None


def _json_prefix(source: str, text: str, what: str):
    """The JSON value at the start of ``source`` and where it ends."""
    try:
        return json.JSONDecoder().raw_decode(source)
    except json.JSONDecodeError as e:
        raise ToolCallError(f"{what} is not valid JSON ({e})", text) from None


def _openai_call(obj, fmt: str, text: str, tool_names) -> dict:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise ToolCallError('a tool call must be an object with a "name" string', text)
    name, args = obj["name"], obj.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as JSON text
        args = _json(args, text, f"the arguments of {name!r}")
    if not isinstance(args, dict):
        raise ToolCallError(f"the arguments of {name!r} must be a JSON object", text)
    if tool_names is not None and name not in tool_names:
        offered = ", ".join(sorted(tool_names)) or "none"
        raise ToolCallError(f"the model called {name!r}, which is not an offered tool "
                            f"(offered: {offered})", text)  # fmt: skip
    call_id = obj.get("id") if isinstance(obj.get("id"), str) else new_call_id(fmt)
    arguments = json.dumps(args, ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_names(tools) -> set[str]:
    """The function names of OpenAI/transformers tool schemas."""
    names = set()
    for t in tools or ():
        fn = t.get("function", t) if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return names


def for_template(messages: list[dict]) -> list[dict]:
    """``messages`` with OpenAI's JSON-text tool-call arguments turned into objects, as
    the families' templates expect (they write ``arguments | tojson``)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = dict(call.get("function", {}))
                if isinstance(fn.get("arguments"), str):
                    fn["arguments"] = _json(fn["arguments"], "", "tool call arguments")
                calls.append({**call, "function": fn})
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


class StreamSplitter:
    """Streams the prose of a reply while holding back its tool calls.

    ``feed(piece)`` returns the text that is surely prose (everything before the first
    call marker, minus a tail that could be the marker's beginning); ``finish()`` parses
    what was held back and returns ``(remaining prose, calls)``.
    """

    def __init__(self, fmt: str, tool_names=None):
        self.fmt, self.names = fmt, tool_names
        self.marker = MARKERS[fmt]
        self.text, self.sent, self.held = "", 0, False

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.held:
            return ""
        at = self.text.find(self.marker, max(0, self.sent - len(self.marker)))
        if at >= 0:
            self.held = True
            end = at
        else:
            keep = next(
                (k for k in range(len(self.marker) - 1, 0, -1)
                 if self.text.endswith(self.marker[:k])),
                0,
            )  # fmt: skip
            end = max(self.sent, len(self.text) - keep)
        out, self.sent = self.text[self.sent : end], end
        return out

    def finish(self) -> tuple[str, list[dict]]:
        tail = self.text[self.sent :]
        if not self.held:
            return tail, []
        reply = parse_tool_calls(tail, self.fmt, self.names)
        return reply.content or "", reply.tool_calls
