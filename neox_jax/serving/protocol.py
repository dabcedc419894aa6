"""The OpenAI request bodies the server accepts, their validation, and error JSON.

Bodies are pydantic models in strict mode (a string where a number belongs is an error,
not coerced); unknown fields are ignored, as OpenAI's own server does for fields it
does not know, except those in ``UNSERVED``, which would change the output: they are
refused unless neutral. vLLM's extra sampling fields are accepted: ``top_k`` (0 or -1 =
off), ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``, ``min_tokens`` (where
nothing could end a request earlier).
"""

from __future__ import annotations

import secrets
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from neox_jax.inference.sampling import SamplingParams

# OpenAI allows 4 stop strings, vLLM any number; lm-eval's local-completions sends a
# task's whole ``until`` list plus the eos text (often more than 4). They are matched on
# the host, so the bound only keeps one request's per-token search small.
MAX_STOP_STRINGS = 32
# Seconds a 429 (queue full) or 503 (shutting down) tells the client to wait before it
# retries (the ``Retry-After`` header, which the openai client honours up to 60 s): the
# queue drains as slots free, within a few decode steps.
RETRY_AFTER_S = 1

# Fields of OpenAI's or vLLM's requests that change what is generated and that this
# server does not implement: accepted at their neutral values (what a client sends when
# it does not use them), else a 400 naming the field, never silently ignored.
# name -> (neutral values, what to do instead)
UNSERVED = {
    "logit_bias": ((None, {}), "remove it"),
    "response_format": ((None, {"type": "text"}), "describe the format in the prompt"),
    "min_p": ((None, 0), "use top_p or top_k"),
    "use_beam_search": ((None, False), "remove it"),
    "guided_json": ((None,), "describe the format in the prompt"),
    "guided_regex": ((None,), "describe the format in the prompt"),
    "guided_choice": ((None,), "describe the format in the prompt"),
    "guided_grammar": ((None,), "describe the format in the prompt"),
}
# and in chat requests (vLLM's): continuing the last message instead of a new turn
CHAT_UNSERVED = {
    "add_generation_prompt": ((None, True), "end the messages with a user turn"),
    "continue_final_message": ((None, False), "end the messages with a user turn"),
    "echo": ((None, False), "prepend the last message yourself"),
    # OpenAI's deprecated function calling: the functions would not reach the model
    "functions": ((None, []), "send them as tools (OpenAI's current form)"),
    "function_call": ((None, "none", "auto"), "use tools and tool_choice"),
    "audio": ((None,), "this server's models write text only"),
    "modalities": ((None, ["text"]), "this server's models write text only"),
    "web_search_options": ((None,), "this server cannot search the web"),
}


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` with an HTTP status."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def headers(self) -> dict[str, str] | None:
        """``Retry-After`` on back-pressure answers (429, 503), as OpenAI and vLLM send."""
        return {"Retry-After": str(RETRY_AFTER_S)} if self.status in (429, 503) else None

    @property
    def type(self) -> str:
        special = {
            422: "invalid_model_output",  # e.g. a tool call that cannot be parsed
            429: "rate_limit_error",
            503: "service_unavailable",
        }
        if self.status in special:
            return special[self.status]
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param, "invalid_value")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields common to completions and chat."""

    model_config = ConfigDict(extra="ignore", strict=True)
    unserved: ClassVar[dict] = UNSERVED

    model: str | None = None  # None: the served model (as vLLM; OpenAI requires it)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None  # OpenAI's, in [-2, 2]
    frequency_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0  # served only where nothing could end a request earlier
    user: str | None = None
    # UNSERVED: accepted at their neutral values only (checked in ``sampling``)
    logit_bias: Any = None
    response_format: Any = None
    min_p: Any = None
    use_beam_search: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None

    def sampling(self, max_tokens: int, max_n: int, defaults: dict | None = None) -> SamplingParams:
        """The request's ``SamplingParams`` (``APIError`` 400 on a bad value); a field the
        request leaves unset takes its value in ``defaults`` (the model's
        generation_config.json), else OpenAI's default."""
        if self.n < 1 or self.n > max_n:
            raise bad(f"n must be between 1 and {max_n}, got {self.n}.", "n")
        if max_tokens < 1:
            raise bad(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
        defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0} | (
            defaults or {}
        )
        temperature = defaults["temperature"] if self.temperature is None else self.temperature
        if not 0 <= temperature <= 2:
            raise bad(f"temperature must be between 0 and 2, got {temperature}.", "temperature")
        top_p = defaults["top_p"] if self.top_p is None else self.top_p
        if not 0 < top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {top_p}.", "top_p")
        top_k = defaults["top_k"] if self.top_k is None else self.top_k
        if top_k < -1:
            raise bad(f"top_k must be -1 or 0 (off) or a positive integer, got {top_k}.", "top_k")
        rp = self.repetition_penalty
        penalty = defaults["repetition_penalty"] if rp is None else rp
        if not 0 < penalty <= 10:
            raise bad(
                f"repetition_penalty must be in (0, 10], got {penalty}.", "repetition_penalty"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None and not -2 <= value <= 2:
                raise bad(f"{name} must be between -2.0 and 2.0, got {value}.", name)
        if self.stream_options is not None and not self.stream:
            raise bad(
                "stream_options is only allowed when stream is true: set stream=true or "
                "remove stream_options.",
                "stream_options",
            )
        for name, (neutral, instead) in self.unserved.items():
            value = getattr(self, name)
            if value not in neutral:
                shown = repr(value) if len(repr(value)) <= 60 else type(value).__name__
                raise bad(f"{name}={shown} is not supported by this server; {instead}.", name)
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise bad(f"stop must be up to {MAX_STOP_STRINGS} non-empty strings.", "stop")
        if any(t < 0 for t in self.stop_token_ids or ()):
            raise bad("stop_token_ids must be non-negative token ids.", "stop_token_ids")
        if self.min_tokens and (
            not 0 < self.min_tokens <= max_tokens
            or not self.ignore_eos
            or stops
            or self.stop_token_ids
        ):
            raise bad(
                f"min_tokens={self.min_tokens} is served only with ignore_eos=true, no stop "
                "strings or stop_token_ids, and max_tokens >= min_tokens (then nothing ends "
                "a request before max_tokens).",
                "min_tokens",
            )
        seed = secrets.randbits(31) if self.seed is None else self.seed
        try:
            return SamplingParams(
                max_new_tokens=max_tokens,
                temperature=float(temperature),
                top_k=max(0, top_k),
                top_p=float(top_p),
                repetition_penalty=float(penalty),
                presence_penalty=float(self.presence_penalty or 0),
                frequency_penalty=float(self.frequency_penalty or 0),
                seed=seed,
                stop_token_ids=tuple(self.stop_token_ids or ()),
                stop_strings=tuple(stops),
                ignore_eos=self.ignore_eos,
            )
        except ValueError as e:
            raise bad(str(e)) from None


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (the legacy completions API)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(BaseModel):
    """One part of a message's content as a list (``{"type": "text", "text": ...}``)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    # "developer": OpenAI's newer name for the system role (sent to its o-series models)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None only beside tool_calls (checked by the template step)
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def for_template(self, i: int) -> dict:
        """The message as the chat template takes it: content parts joined into one text
        (by newlines, as vLLM joins them), "developer" as "system" (``APIError`` 400 on a
        part that is not text: the served models read text only)."""
        out = self.model_dump(exclude_none=True)
        if self.role == "developer":
            out["role"] = "system"
        if isinstance(self.content, list):
            for j, part in enumerate(self.content):
                if part.type != "text" or part.text is None:
                    raise bad(
                        f"messages[{i}].content[{j}] is a {part.type!r} part; this server's "
                        'model reads text only: send {"type": "text", "text": "..."} parts.',
                        f"messages.{i}.content",
                    )
            out["content"] = "\n".join(part.text for part in self.content)
        return out


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["function"]
    function: FunctionDef


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    # Tool calling (neox_jax.serving.tools): "auto" (default with tools) or "none"
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    unserved: ClassVar[dict] = {**UNSERVED, **CHAT_UNSERVED}
    add_generation_prompt: Any = None
    continue_final_message: Any = None
    echo: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    web_search_options: Any = None


def validation_message(
    errors: list[dict[str, Any]], content_type: str = "application/json"
) -> tuple[str, str | None]:
    """One line from pydantic's errors: the field path and what was wrong
    (``content_type``: the request's header, named when the body was not read as JSON)."""
    if not errors:
        return "invalid request body", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"the body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}", None
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if param is None:
        kind = content_type.split(";")[0].strip().lower()
        if e.get("type") == "missing":
            return "the body is empty: send a JSON object with the request's fields", None
        if kind and kind != "application/json" and not kind.endswith("+json"):
            return (
                "the body must be JSON sent with the header 'Content-Type: application/json' "
                f"(got Content-Type {content_type!r})",
                None,
            )
        return "the body must be a JSON object with the request's fields", None
    if e.get("type") == "missing":
        return f"missing required field '{param}'", param
    got = e.get("input")
    shown = (
        repr(got) if not isinstance(got, dict | list) or len(str(got)) < 60 else type(got).__name__
    )
    return f"invalid value for '{param}': {e['msg']} (got {shown})", param
