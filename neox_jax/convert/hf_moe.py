"""Mixture-of-experts families (Qwen3-MoE, Qwen2-MoE, Mixtral) <-> ``ModelConfig`` and
our parameter names; ``neox_jax.convert.hf_families`` handles their attention, norms and
embeddings like the dense families' (Qwen3's, Qwen2's and Mistral's).

Hub tensors of a sparse layer ``i`` (``[out, in]``; ours ``[in, out]``, see
``neox_jax.model.moe``), per expert ``j``:

* qwen3_moe / qwen2_moe: ``model.layers.{i}.mlp.gate.weight`` (the router ``[X, E]``),
  ``mlp.experts.{j}.{gate,up,down}_proj.weight``; qwen2_moe adds
  ``mlp.shared_expert.{gate,up,down}_proj.weight`` and ``mlp.shared_expert_gate.weight``
  ``[1, E]``. Dense layers (``mlp_only_layers``, ``decoder_sparse_step``) keep
  ``mlp.{gate,up,down}_proj.weight``.
* mixtral: ``model.layers.{i}.block_sparse_moe.gate.weight`` and
  ``block_sparse_moe.experts.{j}.{w1,w3,w2}.weight`` (w1 = gate, w3 = up, w2 = down).

transformers 5 holds the experts fused in memory (``experts.gate_up_proj``) but reads
and writes these per-expert names on disk; so do we.
"""

from __future__ import annotations

from typing import Any

from neox_jax.errors import UserError
from neox_jax.model import ModelConfig

MOE_TYPES = ("qwen3_moe", "qwen2_moe", "mixtral")
# transformers' defaults where config.json is silent (Qwen3MoeConfig, Qwen2MoeConfig,
# MixtralConfig).
_DEFAULTS = {
    "qwen3_moe": dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                      norm_topk_prob=False),
    "qwen2_moe": dict(num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                      norm_topk_prob=False),
    "mixtral": dict(num_experts=8, num_experts_per_tok=2),
}  # fmt: skip
# Our projection -> the hub's expert projection name.
_EXPERT_NAMES = {
    "mixtral": {"gate": "w1", "up": "w3", "down": "w2"},
    "qwen3_moe": {p: f"{p}_proj" for p in ("gate", "up", "down")},
    "qwen2_moe": {p: f"{p}_proj" for p in ("gate", "up", "down")},
}


def config_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """The MoE ``ModelConfig`` fields of an MoE ``config.json`` (empty for dense types)."""
    t = hf.get("model_type")
    if t not in MOE_TYPES:
        return {}
    d = _DEFAULTS[t]
    experts = hf.get("num_experts", hf.get("num_local_experts", d["num_experts"]))
    fields = dict(
        num_experts=experts,
        num_experts_per_tok=hf.get("num_experts_per_tok", d["num_experts_per_tok"]),
        # Mixtral's experts are intermediate_size wide; the Qwen MoEs name their own.
        moe_intermediate_size=hf.get("moe_intermediate_size", d.get("moe_intermediate_size")),
        norm_topk_prob=bool(hf.get("norm_topk_prob", d.get("norm_topk_prob", True))),
        decoder_sparse_step=hf.get("decoder_sparse_step", 1) or 1,
        mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
    )
    if t == "qwen2_moe":
        fields["shared_expert_intermediate_size"] = hf.get("shared_expert_intermediate_size", 5632)
    if hf.get("output_router_logits"):  # transformers adds the aux loss only then
        fields["router_aux_loss_coef"] = float(hf.get("router_aux_loss_coef", 0.001))
    return fields


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The MoE keys of ``config.json`` for an MoE ``config.model_type``."""
    t = config.model_type
    check_exportable(config)
    if t not in MOE_TYPES:
        return {}
    out: dict[str, Any] = {
        "num_experts_per_tok": config.num_experts_per_tok,
        "router_aux_loss_coef": config.router_aux_loss_coef or 0.001,
        "output_router_logits": config.router_aux_loss_coef > 0,
    }
    if t == "mixtral":
        out["num_local_experts"] = config.num_experts
        return out
    out.update(
        # transformers 4.x reads num_experts, 5.x num_local_experts (aliased): write both.
        num_experts=config.num_experts,
        num_local_experts=config.num_experts,
        moe_intermediate_size=config.expert_size,
        norm_topk_prob=config.norm_topk_prob,
        decoder_sparse_step=config.decoder_sparse_step,
        mlp_only_layers=list(config.mlp_only_layers),
    )
    if t == "qwen2_moe":
        out["shared_expert_intermediate_size"] = config.shared_expert_intermediate_size
    return out


def check_exportable(config: ModelConfig) -> None:
    """Refuse MoE options that ``config.model_type``'s transformers class cannot express."""
    t = config.model_type
    if t not in MOE_TYPES:
        if config.num_experts:
            raise UserError(
                f"A {t} model has no experts in transformers; write a model with "
                f"num_experts={config.num_experts} as one of {', '.join(MOE_TYPES)}."
            )
        return
    wrong = []
    if t == "mixtral":
        if config.sparse_layers != tuple(range(config.num_hidden_layers)):
            wrong.append("every layer sparse (decoder_sparse_step=1, no mlp_only_layers)")
        if not config.norm_topk_prob:
            wrong.append("norm_topk_prob=True")
        if config.expert_size != config.intermediate_size:
            wrong.append(
                "moe_intermediate_size equal to intermediate_size (transformers' Mixtral "
                f"has one size; this has moe_intermediate_size={config.expert_size}, "
                f"intermediate_size={config.intermediate_size}; qwen3_moe has both)"
            )
    if t != "qwen2_moe" and config.shared_expert_intermediate_size:
        wrong.append("no shared expert (shared_expert_intermediate_size=0)")
    if t == "qwen2_moe" and not config.shared_expert_intermediate_size:
        wrong.append("a shared expert (shared_expert_intermediate_size > 0)")
    if wrong:
        raise UserError(
            f"This config cannot be written as a {t} model: it needs {'; '.join(wrong)}."
        )


def mlp_names(config: ModelConfig, i: int) -> dict[str, tuple[str, bool, Any]]:
    """Hub name -> (our path, transpose, index) for the MLP of layer ``i`` of an MoE model
    (index is the layer, or ``(layer, expert)`` for an expert's slice)."""
    t = config.model_type
    prefix = f"model.layers.{i}." + ("block_sparse_moe" if t == "mixtral" else "mlp")
    if i not in config.sparse_layers:
        return {
            f"{prefix}.{p}_proj.weight": (f"layers/mlp/{p}_proj/kernel", True, i)
            for p in ("gate", "up", "down")
        }
    table: dict[str, tuple[str, bool, Any]] = {
        f"{prefix}.gate.weight": ("layers/moe/router/kernel", True, i),
    }
    for ours, hub in _EXPERT_NAMES[t].items():
        for j in range(config.num_experts):
            table[f"{prefix}.experts.{j}.{hub}.weight"] = (
                f"layers/moe/experts/{ours}_proj/kernel", True, (i, j),
            )  # fmt: skip
    if config.shared_expert_intermediate_size:
        for p in ("gate", "up", "down"):
            table[f"{prefix}.shared_expert.{p}_proj.weight"] = (
                f"layers/moe/shared_expert/{p}_proj/kernel", True, i,
            )  # fmt: skip
        table[f"{prefix}.shared_expert_gate.weight"] = (
            "layers/moe/shared_expert_gate/kernel", True, i,
        )  # fmt: skip
    return table
