"""Serve a model over an OpenAI-compatible HTTP API: the command-line entry point.

  python -m neox_jax.serve --config=configs/serve.py --config.checkpoint=PATH

Loads the model, compiles the engine's programs (a progress line each, then the time
taken), and listens on ``config.host:config.port`` until SIGTERM or Ctrl-C: then it
stops admitting requests, gives in-flight ones ``config.shutdown_timeout`` seconds,
cancels the rest and exits 0. Bad input prints one line on stderr and exits 2, Ctrl-C
exits 130 (``neox_jax.cli``).
"""

from __future__ import annotations

import os
import signal

from neox_jax import cli, hub
from neox_jax.errors import UserError


def served_name(checkpoint: str) -> str:
    """The model name clients send by default: a Hub id as given, else the folder's name
    as the user wrote it (a symlink keeps its own name, not its target's hash)."""
    if hub.parse_hub_id(checkpoint) is not None:
        return str(checkpoint)
    return os.path.basename(os.path.abspath(os.path.expanduser(checkpoint)))


def check_config(config) -> None:
    """Raises ``UserError`` naming a bad field, before anything is loaded."""
    if not config.checkpoint:
        raise UserError("no model: pass --config.checkpoint=PATH (checkpoint, run or HF dir).")
    sampling_defaults(config.generation_config, None)  # a bad mode fails before loading
    positive = (
        "num_slots", "max_prefills_per_step", "max_n", "max_stop_ids", "tensor_parallel",
        "pipeline_stages", "steps_per_call", "page_size",
    )  # fmt: skip
    for name in positive:
        if not isinstance(config[name], int) or config[name] < 1:
            raise UserError(f"--config.{name} must be an integer >= 1, got {config[name]!r}.")
    for name in (
        "max_len", "max_queue", "max_logprobs", "prefill_chunk", "prefix_cache_blocks", "num_pages",
    ):  # fmt: skip
        if not isinstance(config[name], int) or config[name] < 0:
            raise UserError(f"--config.{name} must be an integer >= 0, got {config[name]!r}.")
    if not 0 <= config.port < 65536:
        raise UserError(f"--config.port must be in [0, 65535], got {config.port}.")
    if not isinstance(config.max_call_seconds, int | float) or config.max_call_seconds < 0:
        raise UserError(
            f"--config.max_call_seconds must be a number >= 0, got {config.max_call_seconds!r}."
        )
    if config.shutdown_timeout < 0:
        raise UserError(f"--config.shutdown_timeout must be >= 0, got {config.shutdown_timeout}.")
    choices = ("gather", "kernel", "interpret")  # serving.paged_slots.ATTENTION
    if config.paged_attention not in choices:
        raise UserError(
            f"--config.paged_attention must be one of {choices}, got {config.paged_attention!r}."
        )
    if any(not isinstance(b, int) or b < 2 for b in config.prefill_buckets):
        raise UserError(
            f"--config.prefill_buckets must be integers >= 2, got {config.prefill_buckets!r}."
        )


def _default_pages(config, model_config) -> int:
    """Pages holding as many tokens as ``num_slots`` contiguous slots would."""
    from neox_jax.inference.generate import context_length

    max_len = config.max_len or context_length(model_config)
    return config.num_slots * max_len // config.page_size


def sampling_defaults(mode: str, tokenizer) -> dict | None:
    """The sampling defaults of ``--config.generation_config``: "auto" takes those of the
    model folder's generation_config.json (as vLLM does by default), "none" OpenAI's."""
    if mode not in ("auto", "none"):
        raise UserError(f"--config.generation_config must be 'auto' or 'none', got {mode!r}.")
    generation = getattr(tokenizer, "generation", None)
    return generation.sampling_defaults() if mode == "auto" and generation else None


def build(config, progress=print):
    """``(engine, app)`` for a ``configs/serve.py`` config (loads and compiles)."""
    from neox_jax.inference.cli import inference_mesh
    from neox_jax.loading import load_from_config
    from neox_jax.serving.api import create_app
    from neox_jax.serving.engine import Engine
    from neox_jax.serving.metrics import Metrics

    check_config(config)
    mesh = inference_mesh(config.tensor_parallel, config.pipeline_stages)
    # Placed on the mesh as it is read (sharded by the rules table), any artifact kind.
    model_config, params, tokenizer = load_from_config(config, mesh=mesh)
    metrics = Metrics(config.num_slots)
    engine = Engine(
        model_config,
        params,
        tokenizer,
        num_slots=config.num_slots,
        max_len=config.max_len or None,
        prefill_buckets=tuple(config.prefill_buckets) or None,
        max_queue=config.max_queue,
        stop_width=config.max_stop_ids,
        max_logprobs=config.max_logprobs,
        max_prefills_per_step=config.max_prefills_per_step,
        metrics=metrics,
        split_layers=config.split_layers,
        prefill_chunk=config.prefill_chunk,
        prefix_cache_blocks=config.prefix_cache_blocks,
        steps_per_call=config.steps_per_call,
        max_call_seconds=config.max_call_seconds,
        mix_prefill=config.mix_prefill,
        slot_buckets=tuple(config.slot_buckets) or None,
        kv_cache=config.kv_cache,
        page_size=config.page_size,
        num_pages=config.num_pages or _default_pages(config, model_config),
        paged_attention=config.paged_attention,
        mesh=mesh,
    )
    del params  # the engine keeps its per-layer copy
    if config.warmup:
        engine.warmup(progress)
    name = config.model_name or served_name(config.checkpoint)
    template = config.chat_template or None
    if template is not None and tokenizer is not None:
        from neox_jax.finetune.chat import read_chat_template

        template = read_chat_template(template)  # fail now on a missing file
    application = create_app(
        engine,
        model_name=name,
        chat_template=template,
        tool_call_format=config.tool_call_format,
        max_n=config.max_n,
        metrics=metrics,
        shutdown_timeout=config.shutdown_timeout,
        sampling_defaults=sampling_defaults(config.generation_config, tokenizer),
    )
    return engine, application


def serve(config) -> None:
    """Build, then run uvicorn until a signal; SIGTERM/SIGINT close admission at once."""
    import uvicorn

    engine, application = build(config)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.close()  # new requests get 503 while in-flight ones finish
            super().handle_exit(sig, frame)
            # uvicorn re-raises captured signals after shutting down (death by SIGTERM);
            # a graceful SIGTERM shutdown is a success: exit 0. Ctrl-C still ends in 130.
            if sig == signal.SIGTERM:
                self._captured_signals.remove(sig)

    server = Server(
        uvicorn.Config(
            application,
            host=config.host,
            port=config.port,
            log_level="warning",
            timeout_graceful_shutdown=config.shutdown_timeout,
        )
    )
    print(
        f"serving {application.title} model on http://{config.host}:{config.port}/v1 "
        f"({engine.num_slots} slots x {engine.max_len} tokens)",
        flush=True,
    )
    server.run()


COMMAND = cli.Command(serve, "neox_jax.serve", default_config="serve.py")

if __name__ == "__main__":
    COMMAND.run()
