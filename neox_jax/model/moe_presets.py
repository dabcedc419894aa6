"""Published shapes of mixture-of-experts decoders (Qwen3-MoE, Mixtral).

Each entry is the ``config.json`` of the named Hugging Face checkpoint written as
``ModelConfig`` fields (the mapping of ``neox_jax.convert.hf_families.config_from_hf``);
the comment beside it gives the source and the published total and active parameter
counts, which ``tests/test_moe_presets.py`` checks against ``count_params`` (from
``jax.eval_shape``; active = the parameters one token uses: embeddings, attention,
router, and ``num_experts_per_tok`` of the experts).
"""

from __future__ import annotations

from typing import Any

from neox_jax.model.family_presets import _family

MOE_PRESETS: dict[str, dict[str, Any]] = {
    # https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json: 48 layers, every
    # one sparse (decoder_sparse_step 1, mlp_only_layers []), 128 experts of width 768,
    # top-8 renormalised. Model card: 30.5B parameters, 3.3B activated.
    "qwen3-30b-a3b": _family(
        "qwen3_moe", vocab=151936, hidden=2048, layers=48, heads=32, kv_heads=4,
        ffn=6144, positions=40960, theta=1e6, eps=1e-6, tied=False, head_dim=128,
        qk_norm=True, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
        norm_topk_prob=True,
    ),
    # https://huggingface.co/Qwen/Qwen3-235B-A22B/blob/main/config.json: 94 layers,
    # 128 experts of width 1536, top-8 renormalised. Model card: 235B total, 22B
    # activated.
    "qwen3-235b-a22b": _family(
        "qwen3_moe", vocab=151936, hidden=4096, layers=94, heads=64, kv_heads=4,
        ffn=12288, positions=40960, theta=1e6, eps=1e-6, tied=False, head_dim=128,
        qk_norm=True, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=1536,
        norm_topk_prob=True,
    ),
    # https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json: 8 experts
    # of width 14336 (intermediate_size), top-2, always renormalised, no sliding window.
    # Mixtral paper (arXiv:2401.04088) section 2: 47B total (46.7B on the model card),
    # 13B active (12.9B).
    "mixtral-8x7b": _family(
        "mixtral", vocab=32000, hidden=4096, layers=32, heads=32, kv_heads=8,
        ffn=14336, positions=32768, theta=1e6, eps=1e-5, tied=False,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
    ),
}  # fmt: skip
