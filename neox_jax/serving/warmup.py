"""Compiling every program the serving engine runs, at start-up, with a progress line.

A mixin of :class:`neox_jax.serving.engine.Engine`: it runs each program once on the
engine's real (empty) state, so nothing compiles while serving."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np

from neox_jax.inference.sampling import SamplingParams
from neox_jax.serving import mixed, prefill_batch
from neox_jax.serving import slots as dev
from neox_jax.serving.requests import Request


class Warmup:
    def _warmup(self, progress: Callable[[str], None]) -> float:
        """Compile every program the engine runs (each prefill bucket and its insert, the
        greedy and sampling steps with and without logprobs); returns the seconds taken.

        Runs them on the real (empty) state, so nothing compiles while serving."""
        start = time.perf_counter()
        steps = 2 * len(self.slot_buckets) + 2 + (len(self.slot_buckets) > 1)
        prefills = len(self.buckets) * (1 + len(self.prefill_row_counts))
        mixed_steps = [(m, n) for m in (dev.GREEDY, dev.SAMPLE) for n in self.slot_buckets]
        mixed_steps = mixed_steps if self.mix_prefill else []
        total = prefills + steps + bool(self.prefill_chunk) + len(mixed_steps)
        if self.pages is not None:  # slot 0 keeps the scratch row: writes go nowhere
            row = np.zeros(self.pages.pages_per_slot, np.int32)
            self.state = self.dev.set_pages(self.state, np.int32(0), row)
        for i, b in enumerate(self.buckets, 1):
            progress(f"compiling prefill bucket {b} ({i}/{total})")
            prefix = prefill_batch.prefill(
                self.config, self.params, np.zeros(b, np.int32), np.int32(1),
                pipeline=self.pipeline,
            )  # fmt: skip
            self._insert(prefix, 0, SamplingParams(max_new_tokens=1), 0)
            self.state = dev.release(self.state, np.int32(0))
        done = len(self.buckets)
        for b, rows in ((b, n) for b in self.buckets for n in self.prefill_row_counts):
            done += 1
            progress(f"compiling prefill of {rows} prompts, bucket {b} ({done}/{total})")
            tokens, lengths = np.zeros((rows, b), np.int32), np.ones(rows, np.int32)
            prefix = prefill_batch.prefill_many(self.config, self.params, tokens, lengths)
            request = Request([0], SamplingParams(max_new_tokens=1), lambda e: None)
            self._insert_many(prefix, [0] * rows, [request] * rows)
            self.state = dev.release(self.state, np.int32(0))
        if self.prefill_chunk:
            done += 1
            progress(f"compiling prefill chunk of {self.prefill_chunk} ({done}/{total})")
            zeros = np.zeros(self.prefill_chunk, np.int32)
            self.state = self.dev.prefill_chunk(
                self.config, self.params, self.state, np.int32(0), zeros, np.int32(0), np.int32(1)
            )
            seen = np.zeros(self.config.vocab_size, np.bool_)
            controls = self._controls(SamplingParams(max_new_tokens=1), 0)
            self.state = dev.activate(
                self.state, np.int32(0), np.int32(0), np.int32(0), seen, *controls
            )
            if self.prefix_cache is not None:
                k, v = self.dev.get_block(
                    self.state, np.int32(0), np.int32(0), size=self.prefill_chunk
                )
                self.state = self.dev.put_block(self.state, np.int32(0), k, v, np.int32(0))
            self.state = dev.release(self.state, np.int32(0))
        # Logprobs run on all slots (fewer programs; the softmax over the vocabulary
        # costs more than the idle slots there).
        n_all = self.num_slots
        variants = [(m, 0, n) for m in (dev.GREEDY, dev.SAMPLE) for n in self.slot_buckets]
        variants += [(m, self.max_logprobs, n_all) for m in (dev.GREEDY, dev.SAMPLE)]
        for j, (mode, k, n) in enumerate(variants, 1):
            name = "greedy" if mode.greedy else "sampling"
            progress(f"compiling {name} step, {k} logprobs, {n} slots ({done + j}/{total})")
            self.state, out = self.generate_program()(
                self.config, self.params, self.state, mode=mode, num_logprobs=k,
                steps=self.steps_per_call, until=np.int32(1), stop_after=np.int32(0),
                **self._active_arg(n), **self._attention_arg(),
            )  # fmt: skip
            jax.block_until_ready(out)
        done += len(variants)
        for j, (mode, n) in enumerate(mixed_steps, 1):
            name = "greedy" if mode.greedy else "sampling"
            progress(f"compiling {name} step with a prefill chunk, {n} slots ({done + j}/{total})")
            zeros = np.zeros(self.prefill_chunk, np.int32)
            self.state, out = mixed.generate_program(self.params)(
                self.config, self.params, self.state, np.int32(0), zeros, np.int32(0),
                np.int32(1), mode=mode, **self._active_arg(n),
            )  # fmt: skip
            jax.block_until_ready(out)
        if len(self.slot_buckets) > 1:
            progress(f"compiling the slot move ({total}/{total})")
            self.state = dev.move(self.state, np.int32(0), np.int32(0))
        seconds = time.perf_counter() - start
        progress(f"compiled {total} programs in {seconds:.1f}s")
        return seconds
