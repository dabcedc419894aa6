"""Delivery: handing each request its tokens after a decode call, and retiring slots.

``Delivery`` is the part of ``Engine`` that runs on the host after every
``slots.generate``: per running slot, the new tokens, their text (stop strings found by
``TextTracker``) and logprobs go to the request's sink; a finished, stopped or cancelled
request leaves its slot free for the next admission. It uses the engine's fields
(``state``, ``slots``, ``waiting``, ``metrics``, ``_lock``, ``_prefilling``), set in
``Engine.__init__``.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from neox_jax.inference.generate import EOS, LENGTH, RUNNING, STOP
from neox_jax.serving import slots as dev
from neox_jax.serving.requests import CANCELLED, Event, Request


class Delivery:
    """Engine methods that deliver tokens and free slots (mixed into ``Engine``)."""

    def _deliver(self, slot: int, r: Request, out: dev.StepOutput, now: float) -> None:
        """Hand ``r`` the tokens of the steps this call ran, up to the one that ended it,
        in one event (one wake-up of the HTTP side and one SSE chunk per call, not per
        token)."""
        if r.first_token_at is None:
            r.first_token_at = now
            if self.metrics is not None:
                self.metrics.observe_first_token(now - r.arrival)
        ids, texts, lps = [], [], []
        for j in range(out.tokens.shape[0]):
            if out.finish[j, slot] == dev.SKIPPED:  # the call ended before step j
                break
            reason = self._take_one(slot, r, out, j, ids, texts, lps)
            if reason is not None:
                self._end(slot, r, now)
                r.sink(Event(ids, "".join(texts), lps, done=True, finish_reason=reason))
                return
        r.sink(Event(ids, "".join(texts), lps))

    def _take_one(self, slot: int, r: Request, out, j: int, ids, texts, lps) -> str | None:
        """Step ``j``'s token, text and logprobs for ``r`` onto ``ids``, ``texts`` and
        ``lps``; returns the finish reason if ``r`` ended with it."""
        tok, finish = int(out.tokens[j, slot]), int(out.finish[j, slot])
        r.output_ids.append(tok)
        ids.append(tok)
        if r.num_logprobs:
            k = r.num_logprobs
            top = zip(out.top_ids[j, slot, :k], out.top_logprobs[j, slot, :k], strict=True)
            lps.append((float(out.logprob[j, slot]), [(int(i), float(v)) for i, v in top]))
        if r.tracker is not None:
            if finish not in (EOS, STOP):  # an eos / stop id is not part of the text
                r.tracker.feed([tok])
            if r.tracker.stopped:
                finish = STOP
            elif finish != RUNNING:
                r.tracker.finish()
            texts.append(r.tracker.release())
        if finish == RUNNING:
            return None
        if r.tracker is not None and r.tracker.stopped:
            self.state = dev.release(self.state, np.int32(slot))  # may still run on device
        return "length" if finish == LENGTH else "stop"

    def _end(self, slot: int, r: Request, now: float) -> None:
        """``r`` ended in this call: its slot is free, its times observed."""
        self._free_slot(slot)
        if self.metrics is not None:
            self.metrics.observe_finished(r, now)

    def _free_slot(self, slot: int) -> None:
        """``slot`` takes the next request; its pages (paged cache) go back to the pool.
        A finished slot is never RUNNING again, so its stale page row is never written."""
        self.slots[slot] = None
        if self.pages is not None:
            self.pages.release(slot)

    def _retire(self, slot: int, reason: str) -> None:
        r = self.slots[slot]
        self._prefilling.pop(slot, None)
        self.state = dev.release(self.state, np.int32(slot))
        self._free_slot(slot)
        r.sink(Event([], "", [], done=True, finish_reason=reason))

    def _fail_all(self) -> None:
        with self._context():
            for slot, r in enumerate(self.slots):
                if r is not None:
                    self._retire(slot, CANCELLED)
        with self._lock:
            waiting, self.waiting = list(self.waiting), deque()
        for r in waiting:
            r.sink(Event([], "", [], done=True, finish_reason=CANCELLED))
