"""Prometheus metrics of the engine, in a registry of their own (one per server, so
several engines in one process, e.g. in tests, do not collide).

Names follow Prometheus conventions (``_seconds``, ``_total``); the engine calls the
``observe_*`` hooks from its loop thread.
"""

from __future__ import annotations

import time
from collections import deque

import prometheus_client as prom

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Queue length, active slots, token throughput, time to first token and time per
    output token; ``render()`` is the ``/metrics`` text."""

    def __init__(self, num_slots: int, window_s: float = 10.0):
        self.registry = prom.CollectorRegistry()
        r = self.registry

        def latency(name: str, doc: str) -> prom.Histogram:
            return prom.Histogram(name, doc, buckets=_LATENCY_BUCKETS, registry=r)

        self.queue = prom.Gauge("neox_jax_queue_length", "Requests waiting for a slot", registry=r)
        self.active = prom.Gauge("neox_jax_active_slots", "Slots decoding a request", registry=r)
        prom.Gauge("neox_jax_slots", "Decode slots", registry=r).set(num_slots)
        self.tokens = prom.Counter(
            "neox_jax_generated_tokens", "Tokens generated (all requests)", registry=r
        )
        self.requests = prom.Counter(
            "neox_jax_finished_requests", "Requests that finished generating", registry=r
        )
        self.rate = prom.Gauge(
            "neox_jax_tokens_per_second",
            f"Generated tokens per second over the last {window_s:g} s",
            registry=r,
        )
        self.ttft = latency(
            "neox_jax_time_to_first_token_seconds", "From arrival to the first generated token"
        )
        self.tpot = latency(
            "neox_jax_time_per_output_token_seconds",
            "Mean time between a request's output tokens after the first",
        )
        self.step_time = latency(
            "neox_jax_decode_step_seconds",
            "Wall time of one generate call (steps_per_call decode steps over all slots)",
        )
        self.prefix_hits = prom.Counter(
            "neox_jax_prefix_cache_hit_tokens",
            "Prompt tokens whose KV came from the prefix cache",
            registry=r,
        )
        self.prefix_lookups = prom.Counter(
            "neox_jax_prefix_cache_lookup_tokens",
            "Prompt tokens (in full blocks) looked up in the prefix cache",
            registry=r,
        )
        self._window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()

    def observe_load(self, waiting: int, active: int) -> None:
        self.queue.set(waiting)
        self.active.set(active)

    def observe_step(self, tokens: int, seconds: float) -> None:
        self.tokens.inc(tokens)
        self.step_time.observe(seconds)
        now = time.monotonic()
        self._recent.append((now, tokens))
        while self._recent and self._recent[0][0] < now - self._window_s:
            self._recent.popleft()
        span = max(now - self._recent[0][0], 1e-3) if len(self._recent) > 1 else self._window_s
        self.rate.set(sum(n for _, n in self._recent) / span)

    def observe_prefix(self, hit_tokens: int, lookup_tokens: int) -> None:
        self.prefix_hits.inc(hit_tokens)
        self.prefix_lookups.inc(lookup_tokens)

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_finished(self, request, now: float) -> None:
        self.requests.inc()
        n = len(request.output_ids)
        if n > 1 and request.first_token_at is not None:
            self.tpot.observe((now - request.first_token_at) / (n - 1))

    def render(self) -> bytes:
        return prom.generate_latest(self.registry)
