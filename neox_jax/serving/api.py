"""The OpenAI-compatible HTTP API over an ``Engine`` (FastAPI on uvicorn).

Why FastAPI/Starlette on uvicorn: it is the ASGI stack vLLM's and TGI's OpenAI
front-ends use, it streams server-sent events without extra libraries, and request
bodies are validated by pydantic. The engine runs in its own thread; each HTTP call
submits its sequences (one per prompt and choice) and receives their events through
an asyncio queue fed with ``call_soon_threadsafe``. A call whose client goes away
cancels its sequences, which frees their slots at the engine's next step.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``
(and ``/v1/models/{id}``), ``GET /health``, ``GET /metrics`` (Prometheus text), and vLLM's
tokenizer endpoints (``tokenize_api``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from neox_jax.serving import legacy_logprobs as legacy
from neox_jax.serving import protocol, tokenize_api
from neox_jax.serving.calls import Call
from neox_jax.serving.engine import CANCELLED, Engine
from neox_jax.serving.legacy_logprobs import LegacyLogprobs
from neox_jax.serving.protocol import APIError, ChatRequest, CompletionRequest, bad

ROUTES = (
    "POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, "
    "GET /metrics and vLLM's POST /tokenize, POST /detokenize, GET /tokenizer_info"
)


def create_app(
    engine: Engine,
    *,
    model_name: str,
    chat_template: str | None = None,
    tool_call_format: str = "auto",
    max_n: int = 8,
    metrics=None,
    shutdown_timeout: float = 30.0,
    sampling_defaults: dict | None = None,
) -> FastAPI:
    """The app serving ``engine`` as model ``model_name``; starts the engine's thread on
    start-up and stops it (``shutdown_timeout`` to finish) on shutdown.
    ``tool_call_format``: how chat replies are parsed for tool calls ("auto": from the
    chat template; see ``neox_jax.serving.tools``). ``sampling_defaults``: the values of
    ``temperature`` / ``top_p`` / ``top_k`` / ``repetition_penalty`` a request leaves unset
    (the model folder's generation_config.json, as vLLM's ``--generation-config auto``)."""
    from neox_jax.serving import tools as tool_calling

    tool_calling.tc.resolve_format(tool_call_format, chat_template)  # fail now on a bad name

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not engine.running:
            engine.start()
        yield
        await asyncio.to_thread(engine.stop, shutdown_timeout)

    app = FastAPI(title="neox_jax", lifespan=lifespan)
    tok = engine.tokenizer
    created = int(time.time())

    # ---------------------------------------------------------------- errors
    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(http: Request, e: RequestValidationError):
        content_type = http.headers.get("content-type", "")
        message, param = protocol.validation_message(list(e.errors()), content_type)
        return JSONResponse(APIError(400, message, param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(http: Request, e: HTTPException):
        message, where = str(e.detail), f"{http.method} {http.url.path}"
        if e.status_code == 404 and message == "Not Found":  # no such route
            message = f"Invalid URL ({where}): this server serves {ROUTES}."
        elif e.status_code == 405:
            allowed = (e.headers or {}).get("Allow", "")
            message = f"{where} is not allowed; {http.url.path} takes {allowed}."
        return JSONResponse(APIError(e.status_code, message).body(), e.status_code, e.headers)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        body = APIError(500, f"internal error: {type(e).__name__}: {e}").body()
        return JSONResponse(body, status_code=500)

    # ----------------------------------------------------------------- helpers
    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves '{model_name}'.",
                "model",
                "model_not_found",
            )

    tokenize_api.add_routes(
        app, tok, check_model=check_model, max_len=engine.max_len, chat_template=chat_template
    )

    def encode(prompt) -> list[list[int]]:
        """The prompt field as token-id lists (400 on empty or text without tokenizer)."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise bad("prompt is empty: give text or token ids.", "prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                if tok is None:
                    raise bad("this server has no tokenizer: send token ids.", "prompt")
                p = tok.encode(p, add_special_tokens=True)  # as vLLM: bos where it adds one
            if not p:
                raise bad("prompt is empty: give text or token ids.", "prompt")
            out.append(list(p))
        return out

    def token_str(i: int) -> str:
        return tok.decode([i]) if tok is not None else f"token_id:{i}"

    def decode(ids: Sequence[int]) -> str:
        return tok.decode(list(ids)) if tok is not None else ""

    def max_tokens_for(req, ids: list[int], default: int | None) -> int:
        if len(ids) >= engine.max_len:
            raise bad(
                f"the prompt has {len(ids)} tokens; this server's limit is {engine.max_len} "
                "tokens per request (prompt + max_tokens): shorten the prompt.",
                "prompt",
            )
        value = default if default is not None else engine.max_len - len(ids)
        if value > engine.max_len - 1:
            raise bad(
                f"max_tokens={value} is beyond this server's limit of {engine.max_len} tokens "
                "per request (prompt + max_tokens).",
                "max_tokens",
            )
        return value

    def usage(prompts: list[list[int]], completion_tokens: int) -> dict:
        """OpenAI's and vLLM's count: each prompt once, however many choices it has."""
        prompt_tokens = sum(len(p) for p in prompts)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def finish(reason: str | None) -> str | None:
        if reason == CANCELLED:
            raise APIError(503, "the request was cancelled: the server is shutting down.")
        return reason

    def head(prefix: str) -> dict:
        """A response's id and creation time, the same in each of its stream chunks."""
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time())}

    def envelope(rid: dict, kind: str, choices: list[dict], **extra) -> dict:
        """The frame of every completion response and stream chunk (``kind`` = "object";
        ``rid``: the response's ``head``)."""
        return {
            "id": rid["id"],
            "object": kind,
            "created": rid["created"],
            "model": model_name,
            "choices": choices,
            **extra,
        }

    def event_stream(
        chunks: AsyncIterator[dict], final: Callable[[], dict] | None
    ) -> StreamingResponse:
        """Server-sent events: the ``chunks``, an error event if the call fails, then
        ``final()`` (the usage chunk; None = no such chunk) and ``[DONE]``."""

        async def stream():
            try:
                async with contextlib.aclosing(chunks):  # its engine requests end with it
                    async for c in chunks:
                        yield sse(c)
            except APIError as e:
                yield sse(e.body())
            if final is not None:
                yield sse(final())
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def collect(call: Call, http: Request) -> tuple[list, list, list, list]:
        """A non-streamed call's outcome per sequence: text pieces, token ids, logprobs and
        finish reason."""
        n = len(call.sequences)
        texts, ids_out, lps = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
        reasons = [None] * n
        async for index, ev in call.events(http):
            texts[index].append(ev.text)
            ids_out[index] += ev.token_ids
            lps[index] += ev.logprobs
            if ev.done:
                reasons[index] = finish(ev.finish_reason)
        return texts, ids_out, lps, reasons

    # --------------------------------------------------------------- endpoints
    @app.get("/health")
    async def health():
        if not engine.accepting:
            raise APIError(503, "shutting down", code="shutting_down")
        return {"status": "ok", "free_slots": engine.free_slots, "queue": engine.queue_length}

    @app.get("/metrics")
    async def prometheus():
        if metrics is None:
            raise APIError(404, "metrics are off")
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    card = {
        "id": model_name,
        "object": "model",
        "created": created,
        "owned_by": "neox_jax",
        "max_model_len": engine.max_len,
    }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")  # a Hub id has a slash
    async def model(name: str):
        check_model(name)
        return card

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        check_model(body.model)
        if body.suffix:
            raise bad(
                "suffix (text after the insertion point) is not supported: this server only "
                "continues the prompt; remove suffix.",
                "suffix",
            )
        if body.best_of not in (None, body.n):
            raise bad(
                f"best_of={body.best_of} is not supported: this server does not rank extra "
                "candidates; ask for n choices (best_of may only equal n).",
                "best_of",
            )
        k = body.logprobs or 0
        if not 0 <= k <= engine.max_logprobs:
            raise bad(
                f"logprobs must be between 0 and {engine.max_logprobs} (this server's "
                "max_logprobs).",
                "logprobs",
            )
        want_lp = body.logprobs is not None
        # echo with max_tokens 0: the prompt alone, scored if logprobs are asked for
        # (OpenAI's legacy API and vLLM; how a prompt's loglikelihood is often asked).
        generate = not (body.echo and body.max_tokens == 0)
        prompts, n = encode(body.prompt), body.n
        count = len(prompts) * n  # choices: prompt-major, as OpenAI and vLLM number them
        call = Call(engine)
        for ids in prompts:
            limit = max_tokens_for(body, ids, body.max_tokens if generate else 1)
            sampling = body.sampling(limit, max_n, sampling_defaults)
            if not generate:
                call.check(ids, sampling)
            for j in range(n if generate else 0):
                # logprobs=0 still wants the chosen tokens' logprobs: ask the engine for 1.
                call.add(ids, sampling, max(k, 1) if want_lp else 0, j)
        call.submit()
        rid, fmt = head("cmpl"), LegacyLogprobs(token_str, k)
        echo_lp = {}
        if body.echo and want_lp:
            for ids in {tuple(p) for p in prompts}:
                echo_lp[ids] = await asyncio.to_thread(engine.prompt_logprobs, list(ids), k)

        def echo_part(index: int) -> tuple[str, dict | None]:
            ids = prompts[index // n]
            text = decode(ids)
            if not want_lp:
                return text, None
            return text, fmt.obj(ids, [None] + echo_lp[tuple(ids)])

        def chunk(index, text, lp, reason=None) -> dict:
            choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}
            return envelope(rid, "text_completion", [choice])

        if body.stream:
            generated = 0
            offsets = [0] * count  # text_offset counts from the choice's start

            async def chunks():
                nonlocal generated
                if body.echo:
                    for index in range(count):
                        text, lp = echo_part(index)
                        offsets[index] = legacy.end(lp)
                        yield chunk(index, text, lp, None if generate else "length")
                async for index, ev in call.events(http):
                    generated += len(ev.token_ids)
                    lp = None
                    if want_lp:
                        lp = fmt.obj(ev.token_ids, ev.logprobs, offsets[index])
                        offsets[index] = legacy.end(lp) or offsets[index]
                    if ev.text or ev.done or want_lp:
                        yield chunk(index, ev.text, lp, finish(ev.finish_reason))

            def final() -> dict:
                return envelope(rid, "text_completion", [], usage=usage(prompts, generated))

            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return event_stream(chunks(), final if include_usage else None)

        if generate:
            texts, ids_out, lps, reasons = await collect(call, http)
        else:
            nothing = [[]] * count
            texts, ids_out, lps, reasons = nothing, nothing, nothing, ["length"] * count
        choices = []
        for index in range(count):
            text, lp = "".join(texts[index]), None
            prefix, prefix_lp = echo_part(index) if body.echo else ("", None)
            if want_lp:
                lp = legacy.merge(
                    prefix_lp, fmt.obj(ids_out[index], lps[index], legacy.end(prefix_lp))
                )
            choices.append(
                {
                    "index": index,
                    "text": prefix + text,
                    "logprobs": lp,
                    "finish_reason": reasons[index],
                }
            )
        return envelope(
            rid, "text_completion", choices, usage=usage(prompts, sum(map(len, ids_out)))
        )

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request):
        from neox_jax.finetune.chat import ChatFormatError, encode_chat

        check_model(body.model)
        if tok is None:
            raise bad("chat needs the model's tokenizer; this server has none.")
        if not body.messages:
            raise bad("messages is empty: give at least one message.", "messages")
        k = body.top_logprobs or 0
        if not 0 <= k <= engine.max_logprobs or (k and not body.logprobs):
            raise bad(
                f"top_logprobs must be between 0 and {engine.max_logprobs}, with logprobs=true.",
                "top_logprobs",
            )
        tools = tool_calling.setup(body, chat_template, tool_call_format)
        messages = tool_calling.messages(body)
        try:
            ids = encode_chat(messages, tok, chat_template, tools=tools.tools)
        except ChatFormatError as e:
            raise bad(str(e), "messages") from None
        ids = tools.prompt(ids, tok)  # + the forced start of a tool call, if any
        limit = body.max_completion_tokens  # newer clients' name for max_tokens
        limit = body.max_tokens if limit is None else limit
        sampling = body.sampling(max_tokens_for(body, ids, limit), max_n, sampling_defaults)
        call = Call(engine)
        for j in range(body.n):
            call.add(ids, sampling, max(k, 1) if body.logprobs else 0, j)
        call.submit()
        rid = head("chatcmpl")

        def content_lp(token_ids, lps) -> list[dict]:
            out = []
            for i, (lp, top) in zip(token_ids, lps, strict=True):
                s = token_str(i)
                alts = [
                    {"token": token_str(t), "logprob": v, "bytes": list(token_str(t).encode())}
                    for t, v in top[:k]
                ]
                out.append(
                    {"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": alts}
                )
            return out

        def chunk(index, delta, lp=None, reason=None) -> dict:
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
            return envelope(rid, "chat.completion.chunk", [choice])

        if body.stream:
            count = 0

            async def chunks():
                nonlocal count
                splitters = [tools.splitter() for _ in range(body.n)]  # None: no tools
                for index in range(body.n):
                    yield chunk(index, {"role": "assistant", "content": ""})
                async for index, ev in call.events(http):
                    count += len(ev.token_ids)
                    lp = None
                    if body.logprobs:
                        lp = {"content": content_lp(ev.token_ids, ev.logprobs)}
                    split = splitters[index]
                    text = ev.text if split is None else split.feed(ev.text)
                    if text or (body.logprobs and ev.token_ids):
                        yield chunk(index, {"content": text}, lp)
                    if ev.done:
                        reason = finish(ev.finish_reason)
                        if split is not None:
                            try:
                                tail, calls = split.finish()
                            except tool_calling.tc.ToolCallError as e:
                                raise tool_calling.invalid(e) from None
                            if tail:
                                yield chunk(index, {"content": tail})
                            if calls:
                                yield chunk(index, tool_calling.call_deltas(calls))
                                reason = "tool_calls"
                        yield chunk(index, {}, None, reason)

            def final() -> dict:
                return envelope(rid, "chat.completion.chunk", [], usage=usage([ids], count))

            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return event_stream(chunks(), final if include_usage else None)

        texts, ids_out, lps, reasons = await collect(call, http)
        replies = [tools.reply("".join(texts[i]), reasons[i]) for i in range(body.n)]
        choices = [
            {
                "index": i,
                "message": replies[i][0],
                "logprobs": {"content": content_lp(ids_out[i], lps[i])} if body.logprobs else None,
                "finish_reason": replies[i][1],
            }
            for i in range(body.n)
        ]
        return envelope(rid, "chat.completion", choices, usage=usage([ids], sum(map(len, ids_out))))

    return app
