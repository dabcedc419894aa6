"""Pure train and eval steps: ``train_step(state, batch) -> (state, metrics)``.

A batch is a dict of ``[B, T + 1]`` int32 arrays: ``tokens`` and optionally
``loss_mask`` (1 where the token is a target worth learning), ``segment_ids`` (0 =
padding; packed documents never attend each other) and ``positions``. Inputs are
``tokens[:, :-1]`` and targets ``tokens[:, 1:]``.

The loss is the mean next-token cross entropy over the masked target tokens of the
whole batch, plus, for a mixture of experts, the router losses weighted by the
config's ``router_aux_loss_coef`` / ``router_z_loss_coef`` (``neox_jax.model.moe_terms``;
their values and the expert load are reported as ``moe/...`` metrics).

Gradient accumulation splits the batch into microbatches inside one ``lax.scan`` and
sums per-token losses and gradients before dividing by the total token count, so k
microbatches give the full-batch gradient (up to summation order).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from neox_jax.errors import UserError
from neox_jax.model import (
    GPTNeoX,
    ModelConfig,
    axes,
    block_fn,
    embed_tokens,
    output_logits,
    prepare_inputs,
    updated_cache,
)
from neox_jax.model.moe_terms import router_terms
from neox_jax.parallel.pipeline import pipeline_layers
from neox_jax.training.loss import OutputHead, head_loss, output_head

# apply_fn(params, frozen, inputs, positions, segment_ids, rng) -> logits [B, T, V] fp32,
# or an ``OutputHead`` (final states + output kernel) that the loss projects itself; for a
# mixture of experts, a tuple of that and its router terms (``neox_jax.model.moe_terms``).
ApplyFn = Callable[..., Any]


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. ``frozen`` holds parameters that are used but never
    trained (the base model under LoRA); it gets no gradient and no optimizer state."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    frozen: Any = None


def model_apply_fn(config: ModelConfig) -> ApplyFn:
    """The apply function of plain (pre)training: all parameters trainable.

    It returns an ``OutputHead`` (final states and output kernel), not logits: the
    loss then projects and differentiates the output layer in one fused pass
    (``neox_jax.training.loss``), the largest part of a small model's step.
    """
    model = GPTNeoX(config)

    def apply(params, frozen, inputs, positions, segment_ids, rng):
        del frozen, rng  # GPT-NeoX/Pythia train without dropout
        if not config.is_moe:
            states = model.apply(
                {"params": params}, inputs, positions, segment_ids, compute_logits=False
            )
            return output_head(config, params, states)
        states, state = model.apply(
            {"params": params}, inputs, positions, segment_ids, compute_logits=False,
            mutable=["intermediates"],
        )  # fmt: skip
        return output_head(config, params, states), router_terms(config, state["intermediates"])

    return apply


def pipeline_apply(
    config: ModelConfig,
    params,
    input_ids,
    positions=None,
    segment_ids=None,
    *,
    microbatches: int,
    cache=None,
    mesh=None,
):
    """``GPTNeoX(config).apply({"params": params}, ...)`` with the layers pipelined over
    the mesh's ``stage`` axis (``neox_jax.parallel.pipeline``) in ``microbatches``.

    Returns logits ``[B, T, V]`` (fp32), or ``(logits, new_cache)`` when a stacked cache
    (``init_cache``) is given.
    """
    positions, segment_ids, info = prepare_inputs(input_ids, positions, segment_ids, cache)
    x, k, v = pipeline_layers(
        block_fn(config),
        params["layers"],
        embed_tokens(config, params, input_ids),
        positions,
        segment_ids,
        microbatches=microbatches,
        cache=cache,
        cache_info=info,
        mesh=mesh,
    )
    logits = output_logits(config, params, x)
    if cache is None:
        return logits
    return logits, updated_cache({"k": k, "v": v}, info, input_ids.shape[1])


def pipeline_apply_fn(config: ModelConfig, microbatches: int) -> ApplyFn:
    """The apply function of pipelined (pre)training (a config switch)."""
    if config.is_moe and (config.router_aux_loss_coef or config.router_z_loss_coef):
        raise UserError(
            "The pipeline does not collect a mixture of experts' router statistics, so its "
            "router losses would be silently missing: set model.router_aux_loss_coef=0 and "
            "model.router_z_loss_coef=0, or train.pipeline_microbatches=0."
        )

    def apply(params, frozen, inputs, positions, segment_ids, rng):
        del frozen, rng
        return pipeline_apply(
            config, params, inputs, positions, segment_ids, microbatches=microbatches
        )

    return apply


def default_apply_fn(config, model_config: ModelConfig) -> ApplyFn:
    """The plain model's forward, pipelined over ``mesh.stage`` (GPipe, see
    ``neox_jax.parallel.pipeline``) when ``config.train.pipeline_microbatches > 0``."""
    if config.train.pipeline_microbatches > 0:
        return pipeline_apply_fn(model_config, config.train.pipeline_microbatches)
    return model_apply_fn(model_config)


def split_batch(batch: dict[str, jax.Array]):
    """Inputs, targets and per-target weights from a ``[B, T + 1]`` batch."""
    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    weights = jnp.ones(targets.shape, jnp.float32)
    if "loss_mask" in batch:
        weights *= batch["loss_mask"][:, 1:].astype(jnp.float32)
    segment_ids = positions = None
    if "segment_ids" in batch:
        seg = batch["segment_ids"]
        segment_ids = seg[:, :-1]
        # A target in another segment (the next packed document) is not predictable.
        weights *= ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)).astype(jnp.float32)
    if "positions" in batch:
        positions = batch["positions"][:, :-1]
    return inputs, targets, weights, positions, segment_ids


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross entropy per token ``[B, T]`` in fp32."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - picked


def _sum_loss(params, frozen, batch, rng, apply_fn: ApplyFn, router_loss: bool = True):
    """``(summed loss, (token count, router metrics))``; router metrics are {} for dense
    models. A mixture of experts adds its router loss once per token (so the mean loss
    is the cross entropy plus the router loss) unless ``router_loss`` is False. The
    load-balancing loss is a product of batch means, so with gradient accumulation it is
    computed per microbatch (as transformers computes it per forward pass) and weighted
    by tokens: close to, not equal to, the full batch's."""
    inputs, targets, weights, positions, segment_ids = split_batch(batch)
    out = apply_fn(params, frozen, inputs, positions, segment_ids, rng)
    out, terms = out if isinstance(out, tuple) else (out, {})
    count = jnp.sum(weights)
    if isinstance(out, OutputHead):
        total = head_loss(out, targets, weights)
    else:
        total = jnp.sum(token_losses(out, targets) * weights)
    if terms and router_loss:
        total = total + terms["loss"] * count
    return total, (count, {f"moe/{k}": v for k, v in terms.items() if k != "loss"})


def _microbatches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """``[B, ...] -> [k, B/k, ...]`` taking rows j, j+k, j+2k... for microbatch j, so each
    data-parallel shard contributes equally to every microbatch (no resharding)."""

    def split(x):
        b = x.shape[0]
        x = x.reshape(b // k, k, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, axes.BATCH) + (None,) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def loss_and_grads(
    params, frozen, batch, rng, apply_fn: ApplyFn, microbatches: int = 1, *, with_metrics=False
):
    """``(mean loss, token count, mean gradients)`` over the batch, and with
    ``with_metrics`` the router metrics of a mixture of experts (mean over microbatches)."""
    grad_fn = jax.value_and_grad(_sum_loss, has_aux=True)
    if microbatches == 1:
        (total, (count, metrics)), grads = grad_fn(params, frozen, batch, rng, apply_fn)
    else:

        def body(carry, xs):
            mb, i = xs
            total, count, acc = carry
            (t, (c, m)), g = grad_fn(params, frozen, mb, jax.random.fold_in(rng, i), apply_fn)
            acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g)
            return (total + t, count + c, acc), m

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
        xs = (_microbatches(batch, microbatches), jnp.arange(microbatches))
        (total, count, grads), metrics = jax.lax.scan(body, init, xs)
        metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    if with_metrics:
        return total / denom, count, grads, metrics
    return total / denom, count, grads


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    tx: optax.GradientTransformation,
    apply_fn: ApplyFn,
    schedule: optax.Schedule | None = None,
    microbatches: int = 1,
    skip_nonfinite: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step. Pure; jit it with donated ``state``.

    With ``skip_nonfinite`` a step whose loss or gradient norm is not finite leaves the
    state unchanged except for the step counter (and reports ``skipped = 1``).
    """
    rng = jax.random.fold_in(state.rng, state.step)
    loss, count, grads, router_metrics = loss_and_grads(
        state.params, state.frozen, batch, rng, apply_fn, microbatches, with_metrics=True
    )
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda n, o: jnp.where(finite, n, o), new, old
        )
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "tokens": count,
        "finite": finite.astype(jnp.int32),
        "skipped": (~finite).astype(jnp.int32) if skip_nonfinite else jnp.zeros((), jnp.int32),
    }
    if schedule is not None:
        metrics["lr"] = schedule(state.step)
    metrics.update(router_metrics)  # moe/aux_loss, moe/max_load, ... (none when dense)
    return new_state, metrics


def eval_step(params, frozen, batch, *, apply_fn: ApplyFn) -> dict[str, jax.Array]:
    """Summed loss and token count (sum over batches, divide once for the mean); the
    cross entropy alone, without a mixture of experts' router loss."""
    total, (count, _) = _sum_loss(
        params, frozen, batch, jax.random.key(0), apply_fn, router_loss=False
    )
    return {"loss_sum": total, "tokens": count}


def make_train_step(tx, apply_fn, schedule=None, microbatches=1, skip_nonfinite=False):
    """``train_step`` with everything but ``(state, batch)`` bound (unjitted)."""
    return functools.partial(
        train_step,
        tx=tx,
        apply_fn=apply_fn,
        schedule=schedule,
        microbatches=microbatches,
        skip_nonfinite=skip_nonfinite,
    )


def build_train_step(
    config,
    model_config: ModelConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule | None,
    state_shardings,
    batch_shardings: dict[str, Any],
    apply_fn: ApplyFn | None = None,
):
    """The jitted train step of a training config: what the trainer runs and what
    ``neox_jax.aot`` compiles, so an ahead-of-time compile is the step that trains.

    Args:
      config: a training config (``configs/pretrain.py``): ``train.microbatches``,
        ``train.nonfinite`` ("skip" keeps the state on NaN/inf) and
        ``train.pipeline_microbatches`` (> 0 pipelines the layers over ``mesh.stage``).
      model_config: the model being trained.
      tx, schedule: from ``optimizer_from_config``.
      state_shardings: a ``TrainState`` of shardings (donated in, same out).
      batch_shardings: ``{key: sharding}`` of the batch arrays.
      apply_fn: a forward of its own (LoRA fine-tuning); default the plain model,
        pipelined when the config asks.
    Returns:
      ``step(state, batch) -> (state, metrics)``, jitted with donated state.
    """
    apply_fn = apply_fn or default_apply_fn(config, model_config)
    step = make_train_step(
        tx, apply_fn, schedule, config.train.microbatches, config.train.nonfinite == "skip"
    )
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
