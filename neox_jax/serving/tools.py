"""Tool calling for ``/v1/chat/completions``: OpenAI's ``tools`` / ``tool_choice`` in,
``message.tool_calls`` with ``finish_reason: "tool_calls"`` out.

* ``tool_choice`` "auto" (the default when tools are given): the tools are rendered into
  the prompt by the chat template and the reply is parsed in the template's tool-call
  format (``neox_jax.inference.tool_calls``; the server's ``tool_call_format`` option
  names it when the template does not show it). "none": as if no tools were given (not
  rendered, not parsed), so the model cannot call one. "required" and a named function
  would need constrained decoding, which the server does not do: 400.
* Past turns in OpenAI's form (assistant ``tool_calls`` with JSON-text arguments,
  ``tool`` messages) are handed to the template in transformers' form (arguments as
  objects).
* A reply whose call cannot be parsed is answered HTTP 422 with ``code:
  "invalid_tool_call"`` naming what is wrong (streamed: an error event), rather than
  returned as prose the client would mistake for an answer.
* Streaming: prose is streamed as it comes; a call is held back from its marker on and
  sent, parsed, as one ``delta.tool_calls`` chunk before the finish chunk.
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

    def reply(self, text: str, reason: str | None) -> tuple[dict, str | None]:
        """The ``message`` of a whole reply and its finish reason."""
        if self.fmt is None:
            return {"role": "assistant", "content": text}, reason
        try:
            parsed = tc.parse_tool_calls(text, self.fmt, self.names)
        except tc.ToolCallError as e:
            raise invalid(e) from None
        if not parsed.tool_calls:
            return {"role": "assistant", "content": text}, reason
        message = {"role": "assistant", "content": parsed.content, "tool_calls": parsed.tool_calls}
        return message, "tool_calls"

    def splitter(self) -> tc.StreamSplitter | None:
        return None if self.fmt is None else tc.StreamSplitter(self.fmt, self.names)


def invalid(e: tc.ToolCallError) -> APIError:
    return APIError(
        422, f"the model's tool call could not be parsed: {e}", "tools", "invalid_tool_call"
    )


def setup(body: ChatRequest, template: str | None, format_setting: str) -> ToolSetup:
    """The request's ``ToolSetup`` (``APIError`` 400 on what cannot be served)."""
    choice = body.tool_choice
    if isinstance(choice, dict) or choice not in (None, "auto", "none"):
        raise bad(
            f"tool_choice={choice!r} is not supported (it needs constrained decoding); "
            "use 'auto' or 'none'.",
            "tool_choice",
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
    return ToolSetup(tools, fmt, tc.tool_names(tools))


def messages(body: ChatRequest) -> list[dict]:
    """The request's messages as the template takes them (400 on bad call arguments)."""
    out = [m.model_dump(exclude_none=True) for m in body.messages]
    try:
        return tc.for_template(out)
    except tc.ToolCallError as e:
        raise bad(f"an assistant message's tool call arguments: {e}", "messages") from None


def call_deltas(calls: list[dict]) -> dict:
    """The ``delta`` that streams finished calls (each with its ``index``)."""
    return {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
