"""Serving: a continuous-batching engine (``Engine``, device programs in ``slots``) and
an OpenAI-compatible HTTP server on top of it (``neox_jax.serving.api``, run by
``python -m neox_jax.serve``)."""

from neox_jax.serving.engine import Collector, Engine, EngineStopped, Event, QueueFull, Request

__all__ = ["Collector", "Engine", "EngineStopped", "Event", "QueueFull", "Request"]
