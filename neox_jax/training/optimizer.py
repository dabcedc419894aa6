"""AdamW with GPT-NeoX's defaults, warmup + cosine schedule, global-norm clipping.

Defaults follow the Pythia/GPT-NeoX training configs (EleutherAI/pythia
``models/*.yml``; gpt-neox ``configs/20B.yml``): Adam betas (0.9, 0.95), eps 1e-8,
weight decay 0.01 (not on biases or LayerNorm parameters), gradient clipping at 1.0,
linear warmup over 1% of the steps, cosine decay to 10% of the peak rate.
"""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(
    lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.1
) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then cosine to ``min_lr_ratio * lr`` at ``total_steps``."""
    warmup_steps = max(0, min(warmup_steps, total_steps))
    decay_steps = max(1, total_steps - warmup_steps)
    cosine = optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr_ratio)
    if warmup_steps == 0:
        return cosine
    warmup = optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.join_schedules([warmup, cosine], [warmup_steps])


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
    schedule = learning_rate_schedule(cfg.lr, cfg.total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
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
