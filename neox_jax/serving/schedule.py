"""Scheduling decode calls: how many steps a call runs, which slots it computes.

``Schedule`` is the part of ``Engine`` that shapes each decode call: its length
(``_call_length``: the most steps that neither keep a waiting request out of a slot
that frees, nor hold a call past ``max_call_seconds``), the slot bucket it computes
(``_bucket_of``) and the moves that keep the running requests in the smallest bucket
(``_compact``). It uses the engine's fields (``state``, ``slots``, ``waiting``,
``pages``, ``slot_buckets``, ``steps_per_call``, ``max_call_seconds``, ``_lock``,
``_prefilling``), set in ``Engine.__init__``.
"""

from __future__ import annotations

import numpy as np

from neox_jax.serving import slots as dev


class Schedule:
    """Engine methods that shape decode calls (mixed into ``Engine``)."""

    # Seconds per decode step, a running mean over measured calls (None: none yet).
    _step_seconds: float | None = None

    def _call_length(self) -> tuple[int, int]:
        """``(until, stop_after)`` of the next decode call (``slots.generate``).

        Nobody waiting: up to ``steps_per_call`` steps (fewer round trips per token),
        fewer when that would take longer than ``max_call_seconds`` (``_timed_steps``).
        Requests waiting while every slot is taken (or the page pool is short): the
        call ends after the step in which a request ends, so its slot is refilled at
        once. Requests waiting beside free slots (more than ``max_prefills_per_step``
        were admissible) or a prompt being prefilled in chunks: one step, then the next
        admission or chunk."""
        with self._lock:
            waiting = bool(self.waiting)
        if self._prefilling or (waiting and self.pages is None and None in self.slots):
            return 1, 0
        return self._timed_steps(), int(waiting)

    def _timed_steps(self) -> int:
        """``steps_per_call``, capped so a call lasts about ``max_call_seconds`` at the
        measured seconds per step: a request arriving meanwhile is admitted, and a
        streaming client hears from its request, at least that often. Before any
        call was measured (or with no cap): ``steps_per_call``."""
        per_step = self._step_seconds
        if not self.max_call_seconds or per_step is None:
            return self.steps_per_call
        return max(1, min(self.steps_per_call, int(self.max_call_seconds / per_step)))

    def _observe_call(self, variant, out: dev.StepOutput, seconds: float) -> None:
        """Update the seconds-per-step estimate from a decode call that took ``seconds``
        (dispatch to results on the host). A variant's (mode, logprobs, slot count)
        first call is not counted: it may have compiled."""
        if variant not in self._timed_variants:
            self._timed_variants.add(variant)
            return
        ran = int(np.any(np.asarray(out.finish) != dev.SKIPPED, axis=1).sum())
        if ran:
            per_step = seconds / ran
            old = self._step_seconds
            self._step_seconds = per_step if old is None else 0.5 * (old + per_step)

    def _bucket_of(self, n: int) -> int:
        return next(b for b in self.slot_buckets if b >= n)

    def _active_arg(self, n: int) -> dict:
        """``generate``'s ``active`` argument for ``n`` slots (none with one bucket)."""
        return {} if len(self.slot_buckets) == 1 else {"active": n}

    def generate_program(self):
        """The decode call's program: ``paged_slots.generate`` over pages, else
        ``slots.generate`` (compiled with XLA's own dots over input-major weights)."""
        if self.pages is not None:
            return self.dev.generate
        return self.dev.generate_program(self.params)

    def _attention_arg(self) -> dict:
        """``generate``'s ``attention`` argument for the paged cache (none for slots)."""
        return {} if self.pages is None else {"attention": self.paged_attention}

    def _compact(self) -> None:
        """Move running requests from slots at or above the smallest slot bucket that
        could hold every occupied slot into free slots below it, so the next decode call
        computes that bucket. A prompt being prefilled in chunks stays where it is."""
        if len(self.slot_buckets) == 1:
            return
        target = self._bucket_of(self.num_slots - self.free_slots or 1)
        free = [i for i in range(target) if self.slots[i] is None]
        for src in range(self.num_slots - 1, target - 1, -1):
            r = self.slots[src]
            if not free or r is None or src in self._prefilling:
                continue
            dst = free.pop(0)
            self.state = dev.move(self.state, np.int32(src), np.int32(dst))
            self.slots[dst], self.slots[src] = r, None
