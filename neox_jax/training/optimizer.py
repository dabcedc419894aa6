"""AdamW with GPT-NeoX's defaults, warmup + cosine schedule, global-norm clipping.

Defaults follow the Pythia/GPT-NeoX training configs (EleutherAI/pythia
``models/*.yml``; gpt-neox ``configs/20B.yml``): Adam betas (0.9, 0.95), eps 1e-8,
weight decay 0.01 (not on biases or LayerNorm parameters), gradient clipping at 1.0,
linear warmup over 1% of the steps, cosine decay to 10% of the peak rate.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import optax

NEOX_DECAY_STYLES = ("cosine", "linear", "exponential", "constant")


def learning_rate_schedule(
    lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.1
) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then cosine to ``min_lr_ratio * lr`` at ``total_steps``."""
    warmup_steps = max(0, min(warmup_steps, total_steps))
    # optax counts decay_steps from step 0, warmup included; at least one cosine step.
    decay_steps = max(warmup_steps + 1, total_steps)
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps, decay_steps, end_value=min_lr_ratio * lr
    )


def neox_annealing_schedule(
    lr: float, min_lr: float, warmup_iters: float, total_iters: int, decay_style: str
) -> optax.Schedule:
    """GPT-NeoX's ``AnnealingLR`` (megatron/learning_rates.py), for runs from its configs.

    Update ``s`` uses ``lr * max(1, s) / warmup_iters`` while ``s <= warmup_iters`` (a
    float: ``warmup * total_iters``), then decays over ``total_iters - warmup_iters`` by
    ``decay_style``, never below ``min_lr`` (warmup may start below it). Unlike
    ``learning_rate_schedule`` the first update is not at 0.
    """
    if decay_style not in NEOX_DECAY_STYLES:
        raise ValueError(
            f"optimizer.decay_style {decay_style!r}; choose one of {', '.join(NEOX_DECAY_STYLES)}."
        )
    total_iters = max(1, total_iters)
    span = total_iters - warmup_iters

    def schedule(count):
        s = jnp.asarray(count, jnp.float32)
        warm = lr * jnp.maximum(1.0, s) / max(warmup_iters, 1e-12)
        t = s - warmup_iters
        if decay_style == "cosine":
            decayed = min_lr + (lr - min_lr) / 2.0 * (jnp.cos(jnp.pi * t / span) + 1.0)
        elif decay_style == "linear":
            decayed = lr * (span - t) / span
        elif decay_style == "exponential":
            decayed = lr * jnp.exp(-0.693 * t / span)
        else:
            decayed = jnp.full_like(s, lr)
        in_warmup = (warmup_iters > 0) & (s <= warmup_iters)
        # GPT-NeoX returns the warmup value as is; only the decay is floored at min_lr.
        return jnp.where(in_warmup, warm, jnp.maximum(decayed, min_lr))

    return schedule


def decay_mask(params):
    """Weight decay on matrices only: kernels and embeddings, not biases or norms."""

    def keep(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        return name in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Build the optimizer from ``config.optimizer`` and the total step count.

    Args:
      cfg: a ConfigDict/namespace with ``lr, min_lr_ratio, warmup_steps, total_steps,
        b1, b2, eps, weight_decay, grad_clip``.
    Returns:
      ``(optimizer, schedule)``.
    """
    if getattr(cfg, "schedule", "cosine") == "neox":
        schedule = neox_annealing_schedule(
            cfg.lr, cfg.min_lr_ratio * cfg.lr, cfg.warmup_iters, cfg.decay_steps, cfg.decay_style
        )
    else:
        schedule = learning_rate_schedule(
            cfg.lr, cfg.total_steps, cfg.warmup_steps, cfg.min_lr_ratio
        )
    parts = []
    if cfg.grad_clip and cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts), schedule


def optimizer_from_config(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``make_optimizer`` for a training config (``optimizer`` section and ``train.steps``);
    a negative ``optimizer.warmup_steps`` means ``warmup_ratio`` of the steps.

    ``optimizer.schedule == "neox"`` (set by GPT-NeoX configs) is GPT-NeoX's schedule over
    ``optimizer.decay_steps`` (-1: ``train.steps``), warming up over ``warmup_ratio`` of
    those steps, unrounded, as GPT-NeoX does."""
    opt, steps = config.optimizer, config.train.steps
    warmup = opt.warmup_steps if opt.warmup_steps >= 0 else int(round(opt.warmup_ratio * steps))
    fields = ("lr", "min_lr_ratio", "b1", "b2", "eps", "weight_decay", "grad_clip")
    decay_steps = opt.get("decay_steps", -1)
    decay_steps = steps if decay_steps is None or decay_steps < 0 else decay_steps
    neox = dict(
        schedule=opt.get("schedule", "cosine"),
        decay_style=opt.get("decay_style", "cosine"),
        decay_steps=decay_steps,
        warmup_iters=float(opt.warmup_steps)
        if opt.warmup_steps >= 0
        else opt.warmup_ratio * decay_steps,
    )
    return make_optimizer(
        types.SimpleNamespace(
            **{f: opt[f] for f in fields}, warmup_steps=warmup, total_steps=steps, **neox
        )
    )
