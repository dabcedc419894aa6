"""The OpenAI request bodies the server accepts, their validation, and error JSON.

Bodies are pydantic models in strict mode (a string where a number belongs is an error,
not coerced); unknown fields are ignored, as OpenAI's own server does for fields it
does not know. vLLM's extra sampling fields are accepted: ``top_k`` (0 or -1 = off),
``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``.
"""

from __future__ import annotations

import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from neox_jax.inference.sampling import SamplingParams

MAX_STOP_STRINGS = 4  # as OpenAI


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` with an HTTP status."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {
            400: "invalid_request_error",
            404: "invalid_request_error",
            422: "invalid_model_output",  # e.g. a tool call that cannot be parsed
            429: "rate_limit_error",
            503: "service_unavailable",
        }.get(self.status, "server_error")

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

    model: str
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
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    # accepted for compatibility; only their neutral values are served
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    user: str | None = None

    def sampling(self, max_tokens: int, max_n: int) -> SamplingParams:
        """The request's ``SamplingParams`` (``APIError`` 400 on a bad value)."""
        if self.n < 1 or self.n > max_n:
            raise bad(f"n must be between 1 and {max_n}, got {self.n}.", "n")
        if max_tokens < 1:
            raise bad(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
        temperature = 1.0 if self.temperature is None else self.temperature
        if not 0 <= temperature <= 2:
            raise bad(f"temperature must be between 0 and 2, got {temperature}.", "temperature")
        top_p = 1.0 if self.top_p is None else self.top_p
        if not 0 < top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {top_p}.", "top_p")
        top_k = self.top_k or 0
        if top_k < -1:
            raise bad(f"top_k must be -1 or 0 (off) or a positive integer, got {top_k}.", "top_k")
        penalty = 1.0 if self.repetition_penalty is None else self.repetition_penalty
        if not 0 < penalty <= 10:
            raise bad(
                f"repetition_penalty must be in (0, 10], got {penalty}.", "repetition_penalty"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise bad(f"{name} is not supported; use repetition_penalty.", name)
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise bad(f"stop must be up to {MAX_STOP_STRINGS} non-empty strings.", "stop")
        if any(t < 0 for t in self.stop_token_ids or ()):
            raise bad("stop_token_ids must be non-negative token ids.", "stop_token_ids")
        seed = secrets.randbits(31) if self.seed is None else self.seed
        try:
            return SamplingParams(
                max_new_tokens=max_tokens,
                temperature=float(temperature),
                top_k=max(0, top_k),
                top_p=float(top_p),
                repetition_penalty=float(penalty),
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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None  # None only beside tool_calls (checked by the template step)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


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


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One line from pydantic's errors: the field path and what was wrong."""
    if not errors:
        return "invalid request body", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"the body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}", None
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if param is None:
        return "the body must be a JSON object with the request's fields", None
    if e.get("type") == "missing":
        return f"missing required field '{param}'", param
    got = e.get("input")
    shown = (
        repr(got) if not isinstance(got, dict | list) or len(str(got)) < 60 else type(got).__name__
    )
    return f"invalid value for '{param}': {e['msg']} (got {shown})", param
