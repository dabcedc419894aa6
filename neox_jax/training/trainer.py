"""The training loop, read top to bottom. Pretraining and fine-tuning share it.

Where the weights come from, in order: resume (the latest complete checkpoint in
``workdir``), else ``config.train.init_from`` (a Hugging Face folder or one of our
checkpoints), else random initialisation.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from neox_jax import hub
from neox_jax.data.tokenizer import copy_tokenizer, load_tokenizer
from neox_jax.errors import UserError
from neox_jax.loading import artifact_kind, load_model, peek_config
from neox_jax.model import (
    ModelConfig,
    abstract_params,
    count_params,
    init_params,
    param_logical_axes,
)
from neox_jax.parallel.mesh import AXES, create_mesh, initialize_distributed
from neox_jax.parallel.rules import RULES, batch_sharding, data_parallel_size
from neox_jax.training import data as data_lib
from neox_jax.training.checkpoints import Checkpointer, parse_steps
from neox_jax.training.config_checks import (
    check_seq_len,
    check_train_config,
    warn_if_not_exportable,
)
from neox_jax.training.metrics import (
    MetricWriter,
    device_peak_flops,
    flops_per_token,
    measure_matmul_peak,
    say,
)
from neox_jax.training.optimizer import optimizer_from_config
from neox_jax.training.state import abstract_train_state, init_train_state, state_from_params
from neox_jax.training.step import build_train_step, default_apply_fn, eval_step

# Steps dispatched but not finished; bounds how late SIGTERM / preemption takes effect.
MAX_STEPS_IN_FLIGHT = 2


@dataclasses.dataclass(frozen=True)
class TrainerHooks:
    """What a fine-tuning entry point hands the loop (``neox_jax.finetune.trainer_hooks``).

    Attributes:
      apply_fn: the training forward, ``apply_fn(params, frozen, batch, rng)``; default
        the plain model's.
      eval_apply_fn: the forward for evaluation (no dropout); default ``apply_fn``.
      state_factory: ``(tx, mesh, ckpt) -> (state, model_config, start, origin,
        shardings)``, replacing the resume / init_from / scratch precedence.
      data_fn: ``(data_cfg, workdir, init_from, global_batch) -> (tokenizer path,
        train source, eval source or None)``, replacing ``training.data``'s sources.
    """

    apply_fn: Callable | None = None
    eval_apply_fn: Callable | None = None
    state_factory: Callable | None = None
    data_fn: Callable | None = None


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/inf and ``train.nonfinite='stop'``."""


class Preempted(Exception):  # noqa: N818 - a control-flow signal, not an error
    pass


def build_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """The mesh of ``config.mesh`` over ``devices`` (default: every device)."""
    # .get: configs written before an axis existed (e.g. ``expert``) leave it at 1.
    ici = {a: mesh_cfg.get(a, 1) for a in AXES}
    dcn = {a: mesh_cfg.get(f"dcn_{a}", 1) for a in AXES}
    return create_mesh(ici, dcn, devices)


def check_batch(config, mesh) -> None:
    """The global batch must split evenly over data-parallel shards and microbatches."""
    batch, k = config.data.global_batch_size, config.train.microbatches
    dp = data_parallel_size(mesh)
    if k < 1 or batch % k:
        raise ValueError(
            f"data.global_batch_size={batch} is not divisible by train.microbatches={k}."
        )
    if (batch // k) % dp:
        raise ValueError(
            f"Each microbatch has {batch // k} rows, not divisible by the data-parallel size "
            f"{dp} (mesh data x fsdp x expert). Make global_batch_size / microbatches a "
            f"multiple of {dp}."
        )
    experts, shards = config.model.get("num_experts", 0), mesh.shape.get("expert", 1)
    if shards > 1 and experts % shards:
        raise UserError(
            f"mesh.expert={shards} does not divide model.num_experts={experts}: each device "
            f"holds an equal share of the experts; choose mesh.expert among the divisors of "
            f"{experts}."
        )


class _SigtermFlag:
    """Turns SIGTERM (preemption) and a first Ctrl-C into flags the loop checks between
    steps, so that neither lands inside a checkpoint write.

    SIGTERM saves and returns; Ctrl-C saves, then raises ``KeyboardInterrupt`` (exit
    130). A second Ctrl-C interrupts at once, without saving.

    Single process only. Under ``jax.distributed`` JAX's preemption service already
    catches SIGTERM and brings every process to the same step
    (``Checkpointer.reached_preemption``); a Python handler here would replace its
    handler, so a host signalled alone would stop alone and leave the others blocked
    in the next step's collectives.
    """

    def __init__(self):
        self.raised = False
        self.interrupted = False
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if jax.process_count() > 1 and jax.distributed.is_initialized():
            return self
        try:
            self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
            self._old[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        except ValueError:  # not the main thread: no handler, no preemption saves
            pass
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and exiting.")
        self.raised = True

    def _interrupt(self, signum, frame):
        # logging, not print: a print here could re-enter one the loop is in the middle of.
        logging.warning(
            "Ctrl-C: saving a checkpoint after this step, then exiting (Ctrl-C again: exit now)."
        )
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        for signum, old in self._old.items():
            signal.signal(signum, old)


def _initial_state(config, model_config, tx, mesh, ckpt: Checkpointer):
    """(state, model_config, start_step, source) by the documented precedence."""
    latest = ckpt.latest_step()
    init_from = config.train.init_from
    if init_from:
        if artifact_kind(init_from) == "quantized":  # not float weights to train
            raise UserError(
                f"train.init_from={init_from} is a quantized checkpoint: training updates "
                "float weights, which int8/int4 codes are not. Start from the float model it "
                "was quantized from (for QLoRA, finetune.method=lora with "
                "finetune.quantize_bits quantizes the float base as it loads it)."
            )
        # The architecture comes from init_from, fresh or resumed (check_compatible then
        # compares it with the run's checkpoint); dtype/attention_impl/remat from config.
        model_config = model_config.with_architecture_of(peek_config(init_from))
        check_seq_len(config.data.seq_len, model_config)
    abstract, shardings = abstract_train_state(
        tx, abstract_params(model_config), param_logical_axes(model_config), mesh
    )
    resumed = None
    if latest is not None:
        allow = config.train.get("allow_model_change", False)
        resumed = ckpt.restore_latest(abstract, model_config, allow_model_change=allow)
    if resumed is not None:
        state, step = resumed
        say(f"Resumed from step {step} in {ckpt.directory}")
        return state, model_config, step, f"resume:{step}"
    if init_from:  # any kind of model folder, placed straight onto the mesh
        _, params = load_model(
            init_from, shardings=shardings.params, param_dtype=model_config.param_dtype
        )
        state = state_from_params(params, tx, shardings, config.train.seed)
        say(f"Initialised from {init_from}")
        return state, model_config, 0, f"init_from:{init_from}"
    state = init_train_state(
        lambda rng: init_params(model_config, rng), tx, shardings, config.train.seed
    )
    return state, model_config, 0, "scratch"


def _save_run_files(config, workdir: Path, tokenizer_path: str | None) -> None:
    if jax.process_index() != 0:
        return
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    if tokenizer_path:
        copy_tokenizer(tokenizer_path, workdir / "tokenizer")


def _evaluate(eval_fn, state, source, mesh, batches: int, first: int, vocab: int) -> dict:
    totals = [
        eval_fn(state.params, state.frozen, data_lib.global_batch(source, i, mesh, vocab))
        for i in range(first, first + batches)
    ]
    totals = jax.device_get(totals)
    loss = sum(float(t["loss_sum"]) for t in totals) / max(
        1.0, sum(float(t["tokens"]) for t in totals)
    )
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0)))}


def train_and_evaluate(
    config,
    workdir: str | Path,
    *,
    hooks: Callable[[Any, Path], TrainerHooks] | None = None,
) -> dict[str, Any]:
    """Train as ``config`` says, checkpointing under ``workdir``; returns final metrics.

    Args:
      config: a ``configs/pretrain.py`` or ``configs/finetune.py`` config.
      workdir: the run directory.
      hooks: ``hooks(config, workdir) -> TrainerHooks``, called once the run has started:
        how fine-tuning (SFT data, LoRA) swaps what is read and trained while keeping
        this loop. ``python -m neox_jax.train`` passes
        ``neox_jax.finetune.trainer_hooks.trainer_hooks``; pretraining needs none.
    """
    dist = config.distributed
    initialize_distributed(
        dist.coordinator_address or None,
        dist.num_processes or None,
        dist.process_id if dist.coordinator_address else None,
    )
    workdir = Path(workdir).absolute()
    check_train_config(config, workdir)  # before anything is created, loaded or compiled
    workdir.mkdir(parents=True, exist_ok=True)
    # Hub model ids ("EleutherAI/pythia-160m[@rev]") -> their snapshots in the HF cache.
    if config.train.init_from:
        config.train.init_from = str(hub.resolve(config.train.init_from))
    if config.data.get("tokenizer"):
        config.data.tokenizer = str(hub.resolve(config.data.tokenizer, weights=False))
    if hooks is None and "finetune" in config:
        raise UserError(
            "a configs/finetune.py config needs fine-tuning's hooks: run it with "
            "`python -m neox_jax.train`, or call train_and_evaluate(config, workdir, "
            "hooks=neox_jax.finetune.trainer_hooks.trainer_hooks)."
        )
    extra = hooks(config, workdir) if hooks is not None else TrainerHooks()
    apply_fn, eval_apply_fn, state_factory = (
        extra.apply_fn,
        extra.eval_apply_fn,
        extra.state_factory,
    )
    if config.train.pipeline_microbatches > 0 and apply_fn is not None:
        raise ValueError(
            "train.pipeline_microbatches pipelines the plain model, but this run has its own "
            "forward (LoRA fine-tuning): set train.pipeline_microbatches=0 and split the "
            "model with mesh.fsdp / mesh.tensor instead."
        )
    model_config = ModelConfig.from_dict(config.model.to_dict())
    mesh = build_mesh(config.mesh)
    check_batch(config, mesh)
    if extra.data_fn is not None:
        tokenizer_path, train_src, eval_src = extra.data_fn(
            config.data, workdir, config.train.init_from, config.data.global_batch_size
        )
    else:
        tokenizer_path, paths = data_lib.resolve_tokenizer_and_paths(config.data, workdir)
        train_src, eval_src = data_lib.make_sources(
            config.data, paths, tokenizer_path, config.data.global_batch_size, config.train
        )
    total_steps = config.train.steps
    tx, schedule = optimizer_from_config(config)
    ckpt = Checkpointer(
        workdir,
        save_every=config.train.save_every,
        keep=config.train.keep,
        keep_period=config.train.keep_period,
        async_save=config.train.async_checkpoint,
        extra_steps=parse_steps(config.train.get("extra_save_steps", "")),
    )
    _save_run_files(config, workdir, tokenizer_path)

    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES), _SigtermFlag() as sigterm:
        if state_factory is None:
            state, model_config, start, origin = _initial_state(
                config, model_config, tx, mesh, ckpt
            )
            shardings = jax.tree.map(lambda x: x.sharding, state)
        else:
            state, model_config, start, origin, shardings = state_factory(tx, mesh, ckpt)
            check_seq_len(config.data.seq_len, model_config)
        _check_vocab(tokenizer_path, model_config)
        warn_if_not_exportable(model_config)  # before the first step, not when it is over
        writer = MetricWriter(
            workdir, total_steps, start, train_config=config.train, run_config=config.to_dict()
        )
        apply_fn = apply_fn or default_apply_fn(config, model_config)
        seq_len = config.data.seq_len
        batch_spec = {k: batch_sharding(mesh) for k in train_src.samples(np.zeros(1, np.int64))}
        step_fn = build_train_step(
            config, model_config, tx, schedule, shardings, batch_spec, apply_fn
        )
        eval_apply_fn = eval_apply_fn or apply_fn
        eval_fn = jax.jit(lambda p, f, b: eval_step(p, f, b, apply_fn=eval_apply_fn))
        peak = _peak_flops(config) * jax.device_count()
        step_flops = (
            flops_per_token(model_config, seq_len) * config.data.global_batch_size * seq_len
        )
        meta = {
            "origin": origin,
            "data_seed": config.data.seed,
            "seq_len": seq_len,
            "global_batch_size": config.data.global_batch_size,
        }
        say(
            f"Training ({origin}) from step {start} to {total_steps}: "
            f"{count_params_str(model_config)} parameters, {model_config.dtype} compute, "
            f"mesh {dict(mesh.shape)}"
        )

        final: dict[str, Any] = {"step": start}
        vocab = model_config.vocab_size  # every batch's token ids are checked against it
        pending: list[dict] = []
        in_flight: collections.deque = collections.deque()
        t_log, step_log = time.time(), start
        with concurrent.futures.ThreadPoolExecutor(1) as pool, _saves_survive(ckpt, writer):
            if start == 0 and 0 in ckpt.extra_steps:  # GPT-NeoX saves step 0 when asked
                ckpt.save(state, model_config, meta, force=True)
            nxt = pool.submit(data_lib.global_batch, train_src, start, mesh, vocab)
            for step in range(start, total_steps):
                if sigterm.interrupted or sigterm.raised or ckpt.reached_preemption(step):
                    _check_finite(pending, step, ckpt, config.train.nonfinite)
                    ckpt.save(state, model_config, meta, force=True)
                    if sigterm.interrupted:  # the guard waits for the save, exit 130
                        raise KeyboardInterrupt
                    ckpt.close()
                    writer.close()
                    final.update(step=step, preempted=True)
                    return final
                batch = nxt.result()
                if step + 1 < total_steps:
                    nxt = pool.submit(data_lib.global_batch, train_src, step + 1, mesh, vocab)
                writer.before_step(step, state)  # profiler trace of train.profile_steps
                state, metrics = step_fn(state, batch)
                pending.append(metrics)
                # Python would otherwise run ahead of the device by every step it can
                # dispatch, and a SIGTERM seen at the loop's top would save a state many
                # steps after the signal (and past a preemption's grace period). Waiting
                # for the previous step keeps one step queued (the device stays busy)
                # and the flag at most two steps from the device.
                in_flight.append(metrics["loss"])
                if len(in_flight) > MAX_STEPS_IN_FLIGHT:
                    in_flight.popleft().block_until_ready()
                done = step + 1
                log_now = done % config.train.log_every == 0 or done == total_steps
                save_now = (
                    done % config.train.save_every == 0
                    or done == total_steps
                    or done in ckpt.extra_steps
                )
                if log_now or save_now:
                    scalars = _check_finite(pending, done, ckpt, config.train.nonfinite)
                    pending = []
                    if log_now:
                        dt = time.time() - t_log
                        rate = (done - step_log) * config.data.global_batch_size * seq_len / dt
                        scalars.update(tokens_per_sec=rate, step_time=dt / (done - step_log))
                        if peak:
                            scalars["mfu"] = step_flops * (done - step_log) / dt / peak
                        t_log, step_log = time.time(), done
                        final.update(scalars)
                    if eval_src is not None and (
                        done % config.train.eval_every == 0 or done == total_steps
                    ):
                        first = data_lib.first_eval_batch(eval_src, done, config.train)
                        ev = _evaluate(
                            eval_fn, state, eval_src, mesh, config.train.eval_batches, first, vocab
                        )
                        writer.write(done, ev, "eval")
                        scalars.update(ev)
                        final.update(ev)
                    if log_now:
                        writer.write(done, scalars)
                        writer.progress(done, scalars)
                    if save_now:
                        ckpt.save(state, model_config, meta, force=done == total_steps)
                final["step"] = done
        ckpt.close()
        writer.close()
        final["state"] = state
        final["model_config"] = model_config
        final["tokenizer"] = tokenizer_path
    return final


@contextlib.contextmanager
def _saves_survive(ckpt: Checkpointer, writer: MetricWriter):
    """Every way out of the loop leaves the checkpoints complete and says so truly.

    Normal end: the last save's errors (a full disk) surface here, inside the guard.
    Any error, SIGINT or non-finite stop: the save in flight completes (or fails, and
    its temporary folder is never restored), then the user is told which checkpoint
    a rerun resumes from, as found on disk, and the error goes on.
    """
    try:
        yield
        ckpt.wait()
    except BaseException as e:
        save_error = ckpt.finish()
        where = ckpt.describe_latest()
        ckpt.close_quietly()
        writer.close()
        if isinstance(e, NonFiniteLossError):  # its message already says where to resume
            raise
        storage = next((x for x in (e, save_error) if _is_storage_error(x)), None)
        if storage is not None:
            raise UserError(
                f"Training stopped: {storage}. Free space or fix the permissions of "
                f"{ckpt.directory.parent} (or use another --workdir); {where}."
            ) from e
        failed = f" (the save in progress failed: {save_error})" if save_error else ""
        say(f"Training stopped by {type(e).__name__}{failed}: {where}.")
        raise


def _is_storage_error(e: BaseException | None) -> bool:
    """A write refused by the file system: the user can fix it, it is no bug."""
    codes = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG)
    return isinstance(e, OSError) and e.errno in codes


def count_params_str(model_config: ModelConfig) -> str:
    return f"{count_params(model_config):,}"


def _check_finite(
    pending: list[dict], step: int, ckpt: Checkpointer, policy: str
) -> dict[str, float]:
    """Fetch buffered step metrics (one host sync per log), stop on NaN/inf if asked."""
    if not pending:
        return {}
    host = jax.device_get(pending)
    bad = [m for m in host if not int(m["finite"])]
    if bad and policy == "stop":
        ckpt.finish()  # the save in flight holds an earlier, finite state: let it complete
        raise NonFiniteLossError(
            f"The loss became non-finite (loss={float(bad[0]['loss'])}, grad_norm="
            f"{float(bad[0]['grad_norm'])}) before step {step}. Stopped without saving; "
            f"{ckpt.describe_latest()}. Lower optimizer.lr, raise warmup, use "
            "float32, or set train.nonfinite='skip' to skip such steps."
        )
    good = [m for m in host if int(m["finite"])] or host
    keys = ["loss", "grad_norm"] + [k for k in host[-1] if k.startswith("moe/")]
    out = {k: float(np.mean([float(m[k]) for m in good])) for k in keys}
    if "lr" in host[-1]:
        out["lr"] = float(host[-1]["lr"])
    out["skipped_steps"] = float(sum(int(m["skipped"]) for m in host))
    return out


def _peak_flops(config) -> float:
    if config.train.peak_flops > 0:
        return config.train.peak_flops
    peak = device_peak_flops()
    if peak is None and jax.default_backend() == "cpu":
        peak = measure_matmul_peak()
    return peak or 0.0


def _check_vocab(tokenizer_path: str | None, model_config: ModelConfig) -> None:
    if not tokenizer_path:
        return
    vocab = load_tokenizer(tokenizer_path).vocab_size
    if vocab > model_config.vocab_size:
        raise ValueError(
            f"The tokenizer has {vocab} tokens but model.vocab_size is "
            f"{model_config.vocab_size}; set --config.model.vocab_size={vocab} or larger."
        )
