"""Tool calling for ``/v1/chat/completions``: OpenAI's ``tools`` / ``tool_choice`` in,
``message.tool_calls`` with ``finish_reason: "tool_calls"`` out.

* ``tool_choice`` "auto" (the default when tools are given): the tools are rendered into
  the prompt by the chat template and the reply is parsed in the template's tool-call
  format (``neox_jax.inference.tool_calls``; the server's ``tool_call_format`` option
  names it when the template does not show it). "none": as if no tools were given (not
  rendered, not parsed), so the model cannot call one. "required" (some call) and a named
  function (``{"type": "function", "function": {"name": ...}}``: a call of it) force the
  start of a call in the family's format into the generation after the prompt
  (``tool_calls.forced_prefix``: ``<tool_call>\\n``, or with the name and ``"arguments": ``
  written for the model), so it can only continue the call; the reply is then parsed
  from that prefix on and must hold a call (of that function): else 422 as below. The
  forced tokens count as prompt tokens in ``usage``.
* Past turns in OpenAI's form (assistant ``tool_calls`` with JSON-text arguments,
  ``tool`` messages) are handed to the template in transformers' form (arguments as
  objects).
* A reply whose call cannot be parsed is answered HTTP 422 with ``code:
  "invalid_tool_call"`` naming what is wrong (streamed: an error event), rather than
  returned as prose the client would mistake for an answer.
* Streaming: prose is streamed as it comes; a call is held back from its marker on and
  sent, parsed, as one ``delta.tool_calls`` chunk before the finish chunk.
* ``parallel_tool_calls: false``: only the first call of a reply comes back (vLLM's
  rule; the model is not stopped after it).
"""

from __future__ import annotations

import dataclasses

from neox_jax.inference import tool_calls as tc
from neox_jax.serving.protocol import APIError, ChatRequest, bad


@dataclasses.dataclass
class ToolSetup:
    """What a chat request asks of tool calling: the schemas to render (None: none), the
    format to parse replies in (None: no parsing) and the offered function names."""

    tools: list[dict] | None = None
    fmt: str | None = None
    names: set[str] = dataclasses.field(default_factory=set)
    forced: bool = False  # tool_choice "required" or named: a call must come back
    name: str | None = None  # the named function
    prefix: str = ""  # the start of a call, forced into the generation
    single: bool = False  # parallel_tool_calls false: the first call only

    def prompt(self, ids: list[int], tokenizer) -> list[int]:
        """The prompt ids with the forced start of a call (if any) after them."""
        return list(ids) + (tokenizer.encode(self.prefix) if self.prefix else [])

    def reply(self, text: str, reason: str | None) -> tuple[dict, str | None]:
        """The ``message`` of a whole reply and its finish reason."""
        if self.fmt is None:
            return {"role": "assistant", "content": text}, reason
        text = self.prefix + text
        try:
            parsed = tc.parse_tool_calls(text, self.fmt, self.names)
            if self.forced:
                tc.check_forced(parsed.tool_calls, self.name, text)
        except tc.ToolCallError as e:
            raise invalid(e) from None
        if not parsed.tool_calls:
            return {"role": "assistant", "content": text}, reason
        calls = parsed.tool_calls[:1] if self.single else parsed.tool_calls
        return {"role": "assistant", "content": parsed.content, "tool_calls": calls}, "tool_calls"

    def splitter(self) -> tc.StreamSplitter | None:
        if self.fmt is None:
            return None
        split = _Splitter(self.fmt, self.names)
        split.setup = self
        if self.prefix:
            split.feed(self.prefix)  # held back: it starts with the call marker
        return split


class _Splitter(tc.StreamSplitter):
    """A splitter whose ``finish`` also checks a forced tool choice and keeps only the
    first call where ``parallel_tool_calls`` is false (``setup``: the request's)."""

    setup: ToolSetup

    def finish(self) -> tuple[str, list[dict]]:
        tail, calls = super().finish()
        if self.setup.forced:
            tc.check_forced(calls, self.setup.name, self.text)
        return tail, calls[:1] if self.setup.single else calls


def invalid(e: tc.ToolCallError) -> APIError:
    return APIError(
        422, f"the model's tool call could not be parsed: {e}", "tools", "invalid_tool_call"
    )


def setup(body: ChatRequest, template: str | None, format_setting: str) -> ToolSetup:
    """The request's ``ToolSetup`` (``APIError`` 400 on what cannot be served)."""
    choice = body.tool_choice
    name = _named(choice)
    if name is None and choice not in (None, "auto", "none", "required"):
        raise bad(
            f"tool_choice={choice!r} is not one of 'auto', 'none', 'required' or "
            '{"type": "function", "function": {"name": ...}}.',
            "tool_choice",
        )
    forced = choice == "required" or name is not None
    if forced and not body.tools:
        raise bad(
            f"tool_choice={choice!r} needs tools: give the functions in 'tools'.", "tool_choice"
        )
    if not body.tools or choice == "none":
        return ToolSetup()
    fmt = tc.resolve_format(format_setting, template)
    if fmt is None:
        raise bad(
            "tools were given but this server's chat template has no tool-call format; "
            "serve the model's own template (--config.chat_template) or name the format "
            f"(--config.tool_call_format, one of {', '.join(tc.FORMATS)}).",
            "tools",
        )
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    names = tc.tool_names(tools)
    if name is not None and name not in names:
        raise bad(
            f"tool_choice names {name!r}, which is not among the tools "
            f"({', '.join(sorted(names))}).",
            "tool_choice",
        )
    prefix = tc.forced_prefix(fmt, name, template) if forced else ""
    return ToolSetup(tools, fmt, names, forced, name, prefix, body.parallel_tool_calls is False)


def _named(choice) -> str | None:
    """The function name of a named tool_choice, None for a string choice (400 when a
    dict is not OpenAI's ``{"type": "function", "function": {"name": "..."}}``)."""
    if not isinstance(choice, dict):
        return None
    fn = choice.get("function")
    if choice.get("type") != "function" or not isinstance(fn, dict) or not fn.get("name"):
        raise bad(
            f"tool_choice={choice!r}: a named choice must read "
            '{"type": "function", "function": {"name": "<one of the tools>"}}.',
            "tool_choice",
        )
    return str(fn["name"])


def messages(body: ChatRequest) -> list[dict]:
    """The request's messages as the template takes them (400 on bad call arguments or a
    content part that is not text)."""
    out = [m.for_template(i) for i, m in enumerate(body.messages)]
    try:
        return tc.for_template(out)
    except tc.ToolCallError as e:
        raise bad(f"an assistant message's tool call arguments: {e}", "messages") from None


def call_deltas(calls: list[dict]) -> dict:
    """The ``delta`` that streams finished calls (each with its ``index``)."""
    return {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
