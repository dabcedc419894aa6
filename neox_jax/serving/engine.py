"""``Engine``: the host side of continuous batching.

Requests wait in a bounded queue; a loop (``step``, or a background thread started by
``start``) admits waiting requests into free slots (``prefill_batch.prefill`` + ``insert``;
``admission.py``), advances every running slot by one token (``slots.generate``), hands
each request its new token and text, and retires finished or cancelled requests, freeing
their slots for the next step (``delivery.py``). A short request never waits for a long
one; a cancelled one frees its slot at the next step.

Stop strings, detokenization and streaming run on the host per step (``TextTracker``,
as the ``Generator``); eos, stop ids and max tokens end a slot on the device.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import jax
import numpy as np

from neox_jax.errors import UserError
from neox_jax.inference import fused
from neox_jax.inference.generate import FINISH_REASONS, context_length
from neox_jax.inference.sampling import SamplingParams
from neox_jax.inference.step import split_params
from neox_jax.model import ModelConfig
from neox_jax.parallel.rules import mesh_context
from neox_jax.serving import mixed, paged_slots, scoring
from neox_jax.serving import slots as dev
from neox_jax.serving.admission import Admission
from neox_jax.serving.delivery import Delivery
from neox_jax.serving.paged import PagePool
from neox_jax.serving.prefix_cache import PrefixCache
from neox_jax.serving.requests import (
    CANCELLED,
    Collector,
    EngineStopped,
    Event,
    QueueFull,
    Request,
)
from neox_jax.serving.schedule import Schedule
from neox_jax.serving.warmup import Warmup

log = logging.getLogger(__name__)


class Engine(Admission, Delivery, Schedule, Warmup):
    """Continuous batching over ``num_slots`` decode slots of ``max_len`` tokens each.

    Args:
      config, params: the model.
      tokenizer: a ``Tokenizer`` or None (then no text, no stop strings).
      num_slots: requests decoded at once.
      max_len: cache columns per slot: prompt + generated tokens of a request fit in it
        (default: the model's context).
      prefill_buckets: padded prompt lengths; a prompt runs in the smallest that fits
        (default: powers of two from 16 up to ``max_len``).
      max_queue: requests that may wait for a slot; beyond it ``submit`` raises
        ``QueueFull``.
      eos_token_ids: ids that end a request; default the tokenizer's ``eos_ids`` (every
        ``eos_token_id`` of the model folder's generation_config.json, else its eos).
      stop_width: most stop token ids a request may name.
      max_logprobs: most alternatives per token a request may ask for.
      max_prefills_per_step: prompts admitted between two decode steps, bounding how long
        running requests wait for new ones' prefill.
      metrics: an object with the hooks of ``serving.metrics.Metrics``, or None.
      prefill_chunk: prompts longer than this are prefilled in chunks of this many
        tokens, one chunk between two decode steps, so running requests are not stalled
        for a whole long prompt (0 = off). Must divide ``max_len``.
      prefix_cache_blocks: keep the KV of up to this many prompt blocks (of
        ``prefill_chunk`` tokens) for reuse by later prompts with the same beginning
        (``serving.prefix_cache``); 0 = off. Needs ``prefill_chunk``.
      steps_per_call: the most decode steps per device call: fewer host round trips
        per token. A call ends early when a request ends while others wait for a slot
        (it is refilled at once), and runs one step while requests wait beside free
        slots or a prompt is prefilled in chunks (``_call_length``); a request that
        arrives while nobody waits is admitted at the end of the running call.
      mix_prefill: the chunks of prompts longer than ``prefill_chunk`` run in the
        decode calls' products (``serving.mixed``, Sarathi's chunked prefill; in the
        same program alone when nothing decodes) instead of ``prefill_chunk`` calls of
        their own between decode steps.
        Fused CPU layers on one device, contiguous cache only (``mixed.mixable``);
        elsewhere chunks run in calls of their own.
      max_call_seconds: cap a call's steps so it lasts about this long at the measured
        seconds per step (0 = no cap): a request arriving while nobody waits is
        admitted, and a streaming client hears from its request, at least this often,
        whatever the model's step time.
      paged_attention: the paged cache's decode attention (``paged_slots.generate``'s
        ``attention``): ``"gather"`` (XLA, any device), ``"kernel"`` (the Pallas paged
        kernel compiled for the device: reads only each request's pages; for GPU) or
        ``"interpret"`` (that kernel in the Pallas interpreter, any device, slow).
      slot_buckets: how many leading slots a decode call may compute (each compiled at
        start-up): a call computes the smallest that holds every running request, and
        the scheduler moves requests down into free slots to keep them there, so a
        half-empty batch costs about half (default: powers of two from 4 below
        ``num_slots``, and ``num_slots``; only ``num_slots`` with a mesh or the paged
        cache).
      mesh: serve on this mesh (``parallel.create_mesh({"tensor": N, "stage": S})``):
        weights and KV cache are sharded by the rules table, heads / MLP / vocabulary
        over ``tensor``, layers over ``stage`` (then every prefill and decode step runs
        the layers as a pipeline, ``parallel.pipeline``; ``split_layers`` is ignored).
      split_layers: decode from per-layer copies of the layer weights
        (``inference.step.split_params``, given the config: on one CPU device a plain
        GPT-NeoX layer as two fused products, as the ``Generator``, laid out for
        ``num_slots`` rows; faster on CPU).
        Splitting holds the layer weights twice until the caller drops ``params``: turn
        it off when the weights take more than half the device memory.
    """

    def __init__(
        self,
        config: ModelConfig,
        params,
        tokenizer=None,
        *,
        num_slots: int = 8,
        max_len: int | None = None,
        prefill_buckets: Sequence[int] | None = None,
        max_queue: int = 64,
        eos_token_ids: Sequence[int] | None = None,
        stop_width: int = 8,
        max_logprobs: int = 5,
        max_prefills_per_step: int = 4,
        metrics=None,
        split_layers: bool = True,
        mesh=None,
        prefill_chunk: int = 0,
        prefix_cache_blocks: int = 0,
        steps_per_call: int = 16,
        max_call_seconds: float = 0.25,
        mix_prefill: bool = True,
        slot_buckets: Sequence[int] | None = None,
        kv_cache: str = "slots",
        page_size: int = 16,
        num_pages: int = 0,
        paged_attention: str = "gather",
    ):
        context = context_length(config)
        max_len = context if max_len is None else max_len
        if not 2 <= max_len <= context:
            raise UserError(
                f"max_len must be in [2, {context}] (the model's context), got {max_len}."
            )
        if num_slots < 1 or max_queue < 0 or max_prefills_per_step < 1:
            raise UserError("num_slots and max_prefills_per_step must be >= 1, max_queue >= 0.")
        if prefill_chunk and (prefill_chunk < 2 or max_len % prefill_chunk):
            raise UserError(
                f"prefill_chunk={prefill_chunk} must be >= 2 and divide max_len={max_len}."
            )
        self.prefill_chunk = prefill_chunk
        if not isinstance(steps_per_call, int) or steps_per_call < 1:
            raise UserError(f"steps_per_call must be an integer >= 1, got {steps_per_call!r}.")
        self.steps_per_call = steps_per_call
        if not max_call_seconds >= 0:
            raise UserError(f"max_call_seconds must be >= 0, got {max_call_seconds!r}.")
        self.max_call_seconds = float(max_call_seconds)
        self._timed_variants: set = set()  # decode programs whose first call has run
        if prefix_cache_blocks and not prefill_chunk:
            raise UserError("prefix caching works on prefill chunks: set prefill_chunk too.")
        self.prefix_cache = (
            PrefixCache(prefill_chunk, prefix_cache_blocks) if prefix_cache_blocks else None
        )
        if prefill_buckets is None:
            prefill_buckets = [b for b in (2**i for i in range(4, 30)) if b < max_len]
        top = prefill_chunk or max_len  # longer prompts are chunked, never bucketed
        buckets = sorted({int(b) for b in prefill_buckets if 2 <= b <= top} | {top})
        if eos_token_ids is None:  # every eos of a generation_config.json, else the eos
            eos_token_ids = () if tokenizer is None else tokenizer.eos_ids
        self.config, self.tokenizer = config, tokenizer
        # A model vocabulary padded past the tokenizer's: those ids are never drawn.
        self.vocab_limit = None if tokenizer is None else tokenizer.vocab_size
        # On a mesh with a ``stage`` axis the layers (and the stacked KV cache) are split
        # over the stages and every call runs them as a pipeline (parallel/pipeline.py).
        self.pipeline = mesh is not None and mesh.shape.get("stage", 1) > 1
        if self.pipeline and config.num_hidden_layers % mesh.shape["stage"]:
            raise UserError(
                f"{config.num_hidden_layers} layers cannot be split evenly over "
                f"{mesh.shape['stage']} pipeline stages; pick a stage count that divides it."
            )
        if mesh is not None:
            from neox_jax.inference.generator import shard_params

            params = shard_params(config, params, mesh)
        self.mesh = mesh
        # The pipeline needs the stacked layers (split over ``stage``).
        # Fused weights laid out for num_slots rows (fused.block_columns: one block per
        # weight for the one-slot server, blocks of input columns for a few slots; from
        # fused.INPUT_MAJOR_ROWS slots of a slot cache input-major, for decode programs
        # compiled with XLA's own dots: slots/mixed.generate_program).
        if split_layers and not self.pipeline:
            input_major = kv_cache == "slots" and fused.input_major_rows(num_slots)
            params = split_params(params, config, batch=num_slots, input_major=input_major)
        # On the device once: a loader's numpy arrays would otherwise be copied to the
        # device by every call (at pythia-70m ~65 ms of CPU per call, a third of a
        # 4-step decode call's time on CPU).
        self.params = params if mesh is not None else jax.device_put(params)
        self.num_slots, self.max_len, self.buckets = num_slots, max_len, buckets
        self.max_queue, self.stop_width, self.max_logprobs = max_queue, stop_width, max_logprobs
        self.max_prefills_per_step = max_prefills_per_step
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        if len(self.eos_token_ids) > stop_width:
            raise UserError(
                f"the model stops at {len(self.eos_token_ids)} eos ids {self.eos_token_ids} "
                f"(its generation_config.json), more than stop_width={stop_width}; raise "
                "--config.max_stop_ids."
            )
        self.metrics = metrics
        self.pages = self._page_pool(kv_cache, page_size, num_pages)
        self.paged_attention = self._paged_attention(paged_attention)
        self.dev = dev if self.pages is None else paged_slots
        self.slot_buckets = self._slot_buckets(slot_buckets)
        self.mix_prefill = bool(
            mix_prefill and prefill_chunk and self.pages is None and mesh is None
        ) and mixed.mixable(config, self.params)
        # Several admitted prompts prefill in one call (contiguous cache, one device), in
        # batches of this many rows (padded); 0 = one call per prompt.
        rows = min(max_prefills_per_step, num_slots)
        self.prefill_rows = rows if self.pages is None and mesh is None and rows > 1 else 0
        # Row counts a batched prefill is padded to (each compiled): powers of two, and
        # prefill_rows, so two prompts do not pay for four rows.
        counts = {2**i for i in range(1, rows.bit_length()) if 2**i < rows} | {rows}
        self.prefill_row_counts = tuple(sorted(counts)) if self.prefill_rows else ()
        with self._context():  # under jit, the cache takes the rules table's sharding
            if self.pages is None:
                init = jax.jit(
                    dev.init_state, static_argnums=(0, 1, 2, 3, 4), static_argnames=("steps",)
                )
                self.state = init(
                    config, num_slots, max_len, stop_width, self.pipeline, steps=steps_per_call
                )
            else:
                init = jax.jit(paged_slots.init_state, static_argnums=(0, 1, 2, 3, 4, 5))
                self.state = init(config, num_slots, max_len, stop_width, num_pages, page_size)
        self.slots: list[Request | None] = [None] * num_slots
        self.waiting: deque[Request] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = True
        self._prefilling: dict[int, int] = {}  # slot -> next prompt position to prefill

    def _page_pool(self, kv_cache: str, page_size: int, num_pages: int) -> PagePool | None:
        """The host's page allocator for ``kv_cache="paged"`` (None for slots)."""
        if kv_cache == "slots":
            return None
        if kv_cache != "paged":
            raise UserError(f'kv_cache must be "slots" or "paged", got {kv_cache!r}.')
        if self.mesh is not None:
            raise UserError('kv_cache="paged" does not run on a mesh yet; use "slots".')
        if page_size < 1 or self.max_len % page_size or num_pages < 1:
            raise UserError(
                f"the paged cache needs page_size >= 1 dividing max_len={self.max_len} "
                f"(got {page_size}) and num_pages >= 1 (got {num_pages})."
            )
        # Page 0 is the device's scratch page: the pool hands out 1 .. num_pages.
        return PagePool(num_pages, page_size, self.num_slots, self.max_len, first_page=1)

    def _paged_attention(self, name: str) -> str:
        """``paged_attention`` checked against the cache and the model."""
        if name not in paged_slots.ATTENTION:
            raise UserError(
                f"paged_attention must be one of {paged_slots.ATTENTION}, got {name!r}."
            )
        if name != "gather" and self.pages is None:
            raise UserError(f'paged_attention={name!r} needs kv_cache="paged".')
        if name != "gather" and self.config.sliding_window is not None:
            raise UserError(
                "the Pallas paged kernel has no sliding window; serve this model with "
                'paged_attention="gather".'
            )
        return name

    def _slot_buckets(self, buckets: Sequence[int] | None) -> tuple[int, ...]:
        """The slot counts a decode call may compute (see ``slot_buckets``)."""
        n = self.num_slots
        if buckets is None:
            if self.mesh is not None or self.pages is not None:
                return (n,)
            buckets = [b for b in (2**i for i in range(2, 30)) if b < n]
        elif self.mesh is not None or self.pages is not None:
            raise UserError("slot_buckets works with the contiguous cache on one device only.")
        if any(not 1 <= int(b) <= n for b in buckets):
            raise UserError(f"slot_buckets must lie in [1, num_slots={n}], got {tuple(buckets)}.")
        return tuple(sorted({int(b) for b in buckets} | {n}))

    def _context(self):
        """The mesh and rules table every device call runs under (nothing without a mesh)."""
        return mesh_context(self.mesh)

    # ------------------------------------------------------------- the queue
    def close(self) -> None:
        """Stop admitting new requests (``submit`` raises ``EngineStopped``); running and
        waiting ones go on. Thread- and signal-safe."""
        self._accepting = False

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def free_slots(self) -> int:
        return sum(s is None for s in self.slots)

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    def prompt_logprobs(self, prompt_ids: Sequence[int], k: int) -> list:
        """Per prompt token after the first: ``(logprob, [(id, logprob)] * k)``, the
        model's distribution given the tokens before it (``echo`` with ``logprobs``).
        Thread-safe; runs beside the decode loop, in the prompt's prefill bucket (a prompt
        longer than every bucket, chunked when prefilled, is scored at ``max_len``: one
        more program, compiled at its first use)."""
        n = len(prompt_ids)
        tokens = np.zeros(next((b for b in self.buckets if b >= n), self.max_len), np.int32)
        tokens[:n] = prompt_ids
        with self._context():
            scored = scoring.score(
                self.config, self.params, tokens, k=max(1, k), pipeline=self.pipeline
            )
        chosen, top_lp, top_ids = jax.device_get(scored)
        out = []
        for i in range(n - 1):
            top = zip(top_ids[i, :k].tolist(), top_lp[i, :k].tolist(), strict=True)
            out.append((float(chosen[i]), list(top)))
        return out

    # ------------------------------------------------------------ compilation
    def warmup(self, progress: Callable[[str], None] = print) -> float:
        with self._context():
            return self._warmup(progress)

    # ------------------------------------------------------------------ loop

    def step(self) -> bool:
        """One scheduler iteration: retire cancelled requests, admit waiting ones, run one
        chunk of a long prompt, advance every running slot by a token and deliver it.
        Returns whether anything ran."""
        with self._context():
            return self._step()

    def _step(self) -> bool:
        for slot, r in enumerate(self.slots):
            if r is not None and r.cancelled:
                self._retire(slot, CANCELLED)
        self._admit()
        chunked = bool(self._prefilling)
        chunk = self._next_chunk() if chunked else None  # (slot, tokens, start, length)
        if chunk is not None and not self._mixes():
            self._prefill_next_chunk()  # in a call of its own
            chunk = None
        self._compact()
        running = [
            (i, r) for i, r in enumerate(self.slots) if r is not None and i not in self._prefilling
        ]
        if self.metrics is not None:
            self.metrics.observe_load(len(self.waiting), self.num_slots - self.free_slots)
        if not running and chunk is None:
            return chunked
        greedy = all(r.sampling.temperature == 0 for _, r in running)
        mode = dev.GREEDY if greedy else dev.SAMPLE
        k = self.max_logprobs if any(r.num_logprobs for _, r in running) else 0
        # The slots this call computes (logprobs programs exist for all slots only).
        top = max((i for i, _ in running), default=0)
        active = self.num_slots if k else self._bucket_of(top + 1)
        start = time.perf_counter()
        if chunk is None:
            until, stop_after = self._call_length()
            self.state, out = self.generate_program()(
                self.config, self.params, self.state, mode=mode, num_logprobs=k,
                steps=self.steps_per_call, until=np.int32(until),
                stop_after=np.int32(stop_after), **self._active_arg(active),
                **self._attention_arg(),
            )  # fmt: skip
        else:  # one decode step with the chunk in its products (its slot computed too)
            slot, tokens, offset, length = chunk
            active = self._bucket_of(max(active, slot + 1))
            self.state, out = mixed.generate_program(self.params)(
                self.config, self.params, self.state, np.int32(slot), tokens,
                np.int32(offset), np.int32(length), mode=mode, **self._active_arg(active),
            )  # fmt: skip
        out = jax.device_get(out)
        now, seconds = time.monotonic(), time.perf_counter() - start
        if chunk is None:
            self._observe_call((mode, k, active), out, seconds)
        before = sum(len(r.output_ids) for _, r in running)
        for slot, r in running:
            self._deliver(slot, r, out, now)
        if chunk is not None:
            self._chunk_written(chunk[0], chunk[2])
        if self.metrics is not None and running:
            delivered = sum(len(r.output_ids) for _, r in running) - before
            self.metrics.observe_step(delivered, seconds)
            self.metrics.observe_load(len(self.waiting), self.num_slots - self.free_slots)
        return True

    def _mixes(self) -> bool:
        """Whether the next prompt chunk runs in the mixed call (with this step's decode
        tokens, or alone when none decodes: the mixed call writes the cache in place,
        where ``prefill_chunk``'s own call copies it): mixed prefill is on and no
        decoding request asks for logprobs (the mixed step has no logprobs programs)."""
        slots = enumerate(self.slots)
        decoding = [r for i, r in slots if r is not None and i not in self._prefilling]
        return self.mix_prefill and not any(r.num_logprobs for r in decoding)

    # ------------------------------------------------------------ the thread
    def start(self) -> None:
        """Run the loop in a background thread until ``stop``."""
        self._thread = threading.Thread(target=self._run, name="neox-jax-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.waiting and self.free_slots == self.num_slots:
                    self._lock.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception:  # keep serving: fail the running requests, not the server
                log.exception("engine step failed; cancelling the running requests")
                self._fail_all()
        self._fail_all()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop admitting, let running and waiting requests finish for up to ``timeout``
        seconds, cancel what is left, and end the thread."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + timeout
        while self._thread is not None and time.monotonic() < deadline:
            with self._lock:
                busy = self.waiting or self.free_slots < self.num_slots
            if not busy:
                break
            time.sleep(0.01)
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:
            self._fail_all()

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams],
    ) -> list[tuple[list[int], str, str]]:
        """Run ``prompts`` to the end on this thread (for tests and notebooks; not while
        ``start``'s thread runs). ``sampling``: one for all or one per prompt.

        Returns ``(token_ids, text, finish_reason)`` per prompt."""
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompts)
        collectors = [Collector() for _ in prompts]
        pending = [
            Request(list(ids), p, c)
            for ids, p, c in zip(prompts, sampling, collectors, strict=True)
        ]
        for r in pending:
            self.check(r.prompt_ids, r.sampling)
        while pending or self.waiting or self.free_slots < self.num_slots:
            while pending and len(self.waiting) < self.max_queue:
                self.submit(pending.pop(0))
            self.step()
        return [c.result(timeout=0) for c in collectors]


__all__ = [
    "CANCELLED",
    "FINISH_REASONS",
    "Collector",
    "Engine",
    "EngineStopped",
    "Event",
    "QueueFull",
    "Request",
]
