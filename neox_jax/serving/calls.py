"""One HTTP call's sequences in the engine: submitted together, their events received
on an asyncio queue (fed from the engine thread with ``call_soon_threadsafe``), and
cancelled when the call ends for any reason (finished, client gone or an error)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request

from neox_jax.errors import UserError
from neox_jax.serving.engine import Engine, EngineStopped, Event, QueueFull
from neox_jax.serving.engine import Request as Sequence_
from neox_jax.serving.protocol import APIError, bad


class Call:
    """The sequences of one HTTP call and the queue their events arrive on."""

    def __init__(self, engine: Engine, poll_s: float = 0.5):
        self.engine, self.poll_s = engine, poll_s
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.sequences: list[Sequence_] = []

    def add(self, ids, sampling, num_logprobs: int, row: int) -> None:
        index = len(self.sequences)

        def sink(event: Event, index=index) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        self.sequences.append(Sequence_(ids, sampling, sink, num_logprobs, row))

    def check(self, ids, sampling) -> None:
        """What submitting ``ids`` would check (the vocabulary, the limits), for a prompt
        that is only scored."""
        try:
            self.engine.check(ids, sampling)
        except UserError as e:
            raise bad(str(e)) from None

    def submit(self) -> None:
        try:
            self.engine.submit_many(self.sequences)
        except UserError as e:
            raise bad(str(e)) from None
        except QueueFull as e:
            raise APIError(429, f"too many requests: {e}", code="queue_full") from None
        except EngineStopped as e:
            raise APIError(503, str(e), code="shutting_down") from None

    async def events(self, http: Request) -> AsyncIterator[tuple[int, Event]]:
        """Every sequence's events until all are done; cancels them on the way out
        (finished, client gone or an error)."""
        remaining = len(self.sequences)
        try:
            while remaining:
                try:
                    index, event = await asyncio.wait_for(self.queue.get(), self.poll_s)
                except TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                remaining -= event.done
                yield index, event
        finally:
            for s in self.sequences:
                s.cancel()
