"""Training terms of a mixture of experts, from the router statistics its layers sow.

Each sparse layer sows ``router_stats`` (``neox_jax.model.moe.router_stats``) into the
``intermediates`` collection; ``GPTNeoX(config).apply(..., mutable=["intermediates"])``
returns them stacked over layers. From them:

* the load-balancing loss of Switch Transformer (arXiv:2101.03961, eqs. 4-6) exactly as
  transformers' ``load_balancing_loss_func``: over every sparse layer's real tokens,
  ``X * sum_x f_x * P_x`` with ``f_x`` the (token, expert) assignments to expert ``x``
  per token (summing to ``top_k``) and ``P_x`` its mean router probability;
* the router z-loss of ST-MoE (arXiv:2202.08906, eq. 5): the mean of
  ``logsumexp(router logits)^2`` over sparse layers and real tokens;
* expert-load metrics: each expert's share of the assignments, relative to an even
  share (1 = balanced; ``max_load`` 2 means the busiest expert gets twice its share).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from neox_jax.model.config import ModelConfig

Array = jax.Array


def layer_stats(config: ModelConfig, intermediates: dict[str, Any]) -> dict[str, Array]:
    """The sown ``router_stats`` of the sparse layers, each leaf ``[sparse layers, ...]``."""
    (stats,) = intermediates["layers"]["moe"]["router_stats"]  # one sow per layer, stacked
    if config.mixed_mlp:  # every stacked layer ran the router; keep the sparse ones
        rows = jnp.asarray(config.sparse_layers)
        stats = jax.tree.map(lambda a: a[rows], stats)
    return stats


def router_terms(config: ModelConfig, intermediates: dict[str, Any]) -> dict[str, Array]:
    """Losses and metrics of one forward pass.

    Returns:
      ``{"loss": coef-weighted sum to add to the training loss, "aux_loss", "z_loss",
      "max_load", "min_load"}`` (fp32 scalars); plus ``"dropped"`` (fraction of
      assignments over capacity) with ``moe_impl="capacity"``.
    """
    stats = layer_stats(config, intermediates)
    rows = jnp.maximum(jnp.sum(stats["tokens"]), 1.0)  # real tokens x sparse layers
    counts = jnp.sum(stats["counts"], axis=0)  # [X]
    tokens_per_expert = counts / rows
    prob_per_expert = jnp.sum(stats["probs"], axis=0) / rows
    aux = config.num_experts * jnp.sum(tokens_per_expert * prob_per_expert)
    z = jnp.sum(stats["z"]) / rows
    # Share of the assignments relative to an even share, per layer: [sparse layers, X].
    per_layer = stats["counts"] * config.num_experts
    per_layer = per_layer / jnp.maximum(stats["tokens"][:, None] * config.num_experts_per_tok, 1)
    out = {
        "loss": config.router_aux_loss_coef * aux + config.router_z_loss_coef * z,
        "aux_loss": aux,
        "z_loss": z,
        "max_load": jnp.mean(jnp.max(per_layer, axis=-1)),
        "min_load": jnp.mean(jnp.min(per_layer, axis=-1)),
    }
    if "dropped" in stats:
        out["dropped"] = jnp.sum(stats["dropped"]) / (rows * config.num_experts_per_tok)
    return out
