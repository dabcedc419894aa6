"""Admission: checking and queueing requests, prefilling their prompts into free slots.

``Admission`` is the part of ``Engine`` that moves a request from the waiting queue into
a slot: a short prompt in one bucketed ``prefill_batch.prefill`` + ``insert``; a long one in
chunks of ``prefill_chunk`` tokens, one chunk between two decode steps, starting after
the blocks the prefix cache already holds. It uses the engine's fields (``config``,
``params``, ``state``, ``slots``, ``waiting``, ``_lock``, ``_prefilling``, ...), set in
``Engine.__init__``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.errors import UserError
from neox_jax.inference.generate import id_table
from neox_jax.inference.sampling import SamplingParams, row_arrays
from neox_jax.inference.text import TextTracker
from neox_jax.serving import prefill_batch
from neox_jax.serving import slots as dev
from neox_jax.serving.requests import CANCELLED, EngineStopped, Event, QueueFull, Request


class Admission:
    """Engine methods that admit requests (mixed into ``Engine``)."""

    def check(self, prompt_ids: Sequence[int], p: SamplingParams) -> None:
        """Raises ``UserError`` if the request can never run here (too long, bad ids)."""
        n = len(prompt_ids)
        if n == 0:
            raise UserError("the prompt is empty: give at least one token.")
        vocab = self.config.vocab_size
        bad = [i for i in prompt_ids if not 0 <= i < vocab]
        if bad:
            raise UserError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab}).")
        if n + p.max_new_tokens > self.max_len:
            raise UserError(
                f"the prompt has {n} tokens and max_tokens is {p.max_new_tokens}: together "
                f"{n + p.max_new_tokens} exceed this server's limit of {self.max_len} tokens "
                "per request; shorten the prompt or lower max_tokens."
            )
        pages = self.pages
        if pages is not None and pages.pages_for(n + p.max_new_tokens) > pages.num_pages:
            raise UserError(
                f"the prompt ({n} tokens) plus max_tokens ({p.max_new_tokens}) need "
                f"{pages.pages_for(n + p.max_new_tokens)} KV-cache pages of "
                f"{pages.page_size} tokens; this server has {pages.num_pages} in all. "
                "Shorten the prompt or lower max_tokens."
            )
        if p.num_beams != 1:
            raise UserError("beam search is not served; use num_beams=1.")
        if p.stop_strings and self.tokenizer is None:
            raise UserError("stop strings need a tokenizer; use stop token ids.")
        if len(p.stop_token_ids) > self.stop_width:
            raise UserError(
                f"at most {self.stop_width} stop token ids per request, got "
                f"{len(p.stop_token_ids)}."
            )

    def submit(self, request: Request) -> Request:
        """Queue ``request``; raises ``UserError`` (bad request), ``QueueFull`` or
        ``EngineStopped``. Thread-safe."""
        self.check(request.prompt_ids, request.sampling)
        if request.num_logprobs > self.max_logprobs:
            raise UserError(f"logprobs must be at most {self.max_logprobs}.")
        with self._lock:
            if not self._accepting:
                raise EngineStopped("the server is shutting down.")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(
                    f"{len(self.waiting)} requests are already waiting (the limit); retry later."
                )
            self.waiting.append(request)
            self._lock.notify_all()
        return request

    def submit_many(self, requests: Sequence[Request]) -> None:
        """Queue all or none of ``requests`` (the ``n`` choices of one API call)."""
        for r in requests:
            self.check(r.prompt_ids, r.sampling)
        if len(requests) > self.max_queue:  # could never fit: no use retrying (no 429)
            raise UserError(
                f"this request needs {len(requests)} sequences (prompts x n) and the server "
                f"queues at most {self.max_queue}: send fewer prompts or choices per request "
                f"(lm-eval: batch_size <= {self.max_queue}) or raise --config.max_queue."
            )
        with self._lock:
            if not self._accepting:
                raise EngineStopped("the server is shutting down.")
            if len(self.waiting) + len(requests) > self.max_queue:
                raise QueueFull(
                    f"{len(self.waiting)} requests are waiting and the limit is "
                    f"{self.max_queue}; retry later."
                )
            self.waiting.extend(requests)
            self._lock.notify_all()

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _controls(self, p: SamplingParams, row: int):
        knobs, max_new, eos, stop = request_controls(
            p, self.eos_token_ids, self.stop_width, self.vocab_limit
        )
        key = jax.random.fold_in(jax.random.key(p.seed % 2**32), row)
        return knobs, max_new, eos, stop, key

    def _insert(self, prefix, slot: int, p: SamplingParams, row: int) -> None:
        controls = self._controls(p, row)
        self.state = self.dev.insert(prefix, self.state, np.int32(slot), *controls)

    def _admit(self) -> None:
        batch = []  # (slot, request): short prompts, prefilled together below
        while len(batch) < self.max_prefills_per_step and None in self.slots:
            with self._lock:
                if not self.waiting:
                    break
                r = self.waiting.popleft()
            if r.cancelled:
                r.sink(Event([], "", [], done=True, finish_reason=CANCELLED))
                continue
            slot = self.slots.index(None)
            if not self._take_pages(slot, r):  # the pool is short: wait (in order)
                with self._lock:
                    self.waiting.appendleft(r)
                break
            self.slots[slot] = r
            if self.tokenizer is not None:
                r.tracker = TextTracker(self.tokenizer, r.sampling.stop_strings)
            n = len(r.prompt_ids)
            if self.prefill_chunk and n > self.prefill_chunk:
                start = self._reuse_prefix(slot, r)
                if start < n - 1:
                    self._prefilling[slot] = start  # one chunk per step, between decodes
                else:
                    self._activate(slot, r)
                continue
            batch.append((slot, r))
        if len(batch) > 1 and self.prefill_rows:
            self._prefill_many(batch)
            return
        for slot, r in batch:
            n = len(r.prompt_ids)
            tokens = np.zeros(self.bucket(n), np.int32)
            tokens[:n] = r.prompt_ids
            prefix = prefill_batch.prefill(
                self.config, self.params, tokens, np.int32(n), pipeline=self.pipeline
            )
            self._insert(prefix, slot, r.sampling, r.row)

    def _prefill_many(self, batch: list) -> None:
        """``batch``'s prompts in one prefill at the largest of their buckets, padded to
        the next of ``prefill_row_counts`` by repeating the first, and one insert."""
        count = next(n for n in self.prefill_row_counts if n >= len(batch))
        rows = batch + batch[:1] * (count - len(batch))
        tokens = np.zeros((len(rows), max(self.bucket(len(r.prompt_ids)) for _, r in rows)))
        tokens, lengths = tokens.astype(np.int32), np.zeros(len(rows), np.int32)
        for i, (_, r) in enumerate(rows):
            tokens[i, : len(r.prompt_ids)], lengths[i] = r.prompt_ids, len(r.prompt_ids)
        prefix = prefill_batch.prefill_many(self.config, self.params, tokens, lengths)
        self._insert_many(prefix, [slot for slot, _ in rows], [r for _, r in rows])

    def _insert_many(self, prefix, slots: list[int], requests: list[Request]) -> None:
        controls = [self._controls(r.sampling, r.row) for r in requests]
        knobs = {k: np.stack([c[0][k] for c in controls]) for k in controls[0][0]}
        max_new, eos, stop = (np.stack([c[i] for c in controls]) for i in (1, 2, 3))
        keys = jnp.stack([c[4] for c in controls])
        self.state = prefill_batch.insert_many(
            prefix, self.state, np.asarray(slots, np.int32), knobs, max_new, eos, stop, keys
        )

    def _take_pages(self, slot: int, r: Request) -> bool:
        """Paged cache: give ``slot`` the pages of ``r``'s prompt plus ``max_tokens``,
        or return False when too few are free. Always True for contiguous slots."""
        if self.pages is None:
            return True
        tokens = len(r.prompt_ids) + r.sampling.max_new_tokens
        if self.pages.pages_for(tokens) > self.pages.free_pages:
            return False
        owned = self.pages.allocate(slot, tokens)
        row = np.zeros(self.pages.pages_per_slot, np.int32)  # past its pages: scratch
        row[: len(owned)] = owned
        self.state = self.dev.set_pages(self.state, np.int32(slot), row)
        return True

    def _next_chunk(self) -> tuple[int, np.ndarray, int, int]:
        """``(slot, tokens [prefill_chunk], start, prompt length)``: the next chunk of
        the longest-waiting chunked prompt (zero-padded past the prompt's end)."""
        slot, start = next(iter(self._prefilling.items()))
        prompt = self.slots[slot].prompt_ids
        tokens = np.zeros(self.prefill_chunk, np.int32)
        piece = prompt[start : start + self.prefill_chunk]
        tokens[: len(piece)] = piece
        return slot, tokens, start, len(prompt)

    def _prefill_next_chunk(self) -> None:
        """One chunk of the longest-waiting chunked prompt in a call of its own."""
        slot, tokens, start, n = self._next_chunk()
        self.state = self.dev.prefill_chunk(
            self.config, self.params, self.state, np.int32(slot), tokens, np.int32(start),
            np.int32(n),
        )  # fmt: skip
        self._chunk_written(slot, start)

    def _chunk_written(self, slot: int, start: int) -> None:
        """The chunk at ``start`` of ``slot``'s prompt is in its cache: move on to the
        next chunk, or activate the slot after the last."""
        r = self.slots[slot]
        if start + self.prefill_chunk < len(r.prompt_ids) - 1:  # n-1 goes through decode
            self._prefilling[slot] = start + self.prefill_chunk
            return
        del self._prefilling[slot]
        self._activate(slot, r)

    def _reuse_prefix(self, slot: int, r: Request) -> int:
        """Copy ``r``'s cached leading prompt blocks into ``slot``; returns how many
        prompt tokens they cover (where chunked prefill starts)."""
        if self.prefix_cache is None:
            return 0
        c = self.prefill_chunk
        r.block_keys = self.prefix_cache.keys(r.prompt_ids, (len(r.prompt_ids) - 1) // c)
        hits = self.prefix_cache.lookup(r.block_keys)
        for i, (k, v) in enumerate(hits):
            self.state = self.dev.put_block(self.state, np.int32(slot), k, v, np.int32(i * c))
        r.cached_blocks = len(hits)
        if self.metrics is not None:
            self.metrics.observe_prefix(len(hits) * c, len(r.block_keys) * c)
        return len(hits) * c

    def _activate(self, slot: int, r: Request) -> None:
        """``r``'s prompt is in ``slot``'s cache: store its new blocks for reuse, start
        decoding."""
        c, n = self.prefill_chunk, len(r.prompt_ids)
        if self.prefix_cache is not None:
            for i in reversed(range(r.cached_blocks, len(r.block_keys))):
                kv = self.dev.get_block(self.state, np.int32(slot), np.int32(i * c), size=c)
                self.prefix_cache.store(r.block_keys[i], kv)
            self.prefix_cache.touch(r.block_keys)
        seen = np.zeros(self.config.vocab_size, np.bool_)
        seen[r.prompt_ids] = True
        self.state = dev.activate(
            self.state, np.int32(slot), np.int32(r.prompt_ids[-1]), np.int32(n - 1), seen,
            *self._controls(r.sampling, r.row),
        )  # fmt: skip


def request_controls(
    p: SamplingParams, eos_token_ids, stop_width: int, vocab_limit: int | None = None
) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """A request's ``insert`` arguments: knobs (numpy scalars), max_new, eos and stop rows.

    Raises ``ValueError`` when it names more stop ids than the slots have room for."""
    eos = () if p.ignore_eos else tuple(eos_token_ids)
    if len(p.stop_token_ids) > stop_width or len(eos) > stop_width:
        raise ValueError(
            f"at most {stop_width} stop token ids per request, got {len(p.stop_token_ids)}."
        )
    knobs = {k: v[0] for k, v in row_arrays([p], vocab_limit).items()}
    table = id_table([eos, p.stop_token_ids], multiple=stop_width)
    return knobs, np.int32(p.max_new_tokens), table[0], table[1]
