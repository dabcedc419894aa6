"""Published shapes of the decoder families users compare GPT-NeoX with.

Each entry is the ``config.json`` of the named Hugging Face checkpoint written as
``ModelConfig`` fields (the mapping of ``neox_jax.convert.hf_families.config_from_hf``);
the comment beside it gives the source and the published parameter total, which
``tests/test_family_presets.py`` checks against ``count_params`` (``jax.eval_shape``).
"""

from __future__ import annotations

from typing import Any


def _family(
    model_type: str,
    *,
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    ffn: int,
    positions: int,
    theta: float,
    eps: float,
    tied: bool,
    head_dim: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    # What every Llama-style config shares: RMSNorm, SwiGLU (silu), sequential residual,
    # full rotary, separate q/k/v projections, no MLP bias.
    fields = dict(
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim_override=None if head_dim in (None, hidden // heads) else head_dim,
        intermediate_size=ffn,
        hidden_act="silu",
        rotary_pct=1.0,
        rotary_emb_base=theta,
        max_position_embeddings=positions,
        layer_norm_eps=eps,
        use_parallel_residual=False,
        tie_word_embeddings=tied,
        attention_bias=model_type == "qwen2",  # Qwen2: q/k/v biases, none on o_proj
        attention_out_bias=False,
        norm_type="rmsnorm",
        gated_mlp=True,
        mlp_bias=False,
        fused_qkv=False,
        qk_norm=model_type == "qwen3",
    )
    fields.update(extra)
    return fields


FAMILY_PRESETS: dict[str, dict[str, Any]] = {
    # https://huggingface.co/Qwen/Qwen2.5-3B/blob/main/config.json (use_sliding_window
    # false); model card: 3.09B parameters, 2.77B non-embedding. Exactly 3,085,938,688.
    "qwen2.5-3b": _family(
        "qwen2",
        vocab=151936,
        hidden=2048,
        layers=36,
        heads=16,
        kv_heads=2,
        ffn=11008,
        positions=32768,
        theta=1e6,
        eps=1e-6,
        tied=True,
    ),  # fmt: skip
    # https://huggingface.co/Qwen/Qwen3-1.7B/blob/main/config.json (head_dim 128); model
    # card: 1.7B parameters, 1.4B non-embedding. Exactly 1,720,574,976.
    "qwen3-1.7b": _family(
        "qwen3",
        vocab=151936,
        hidden=2048,
        layers=28,
        heads=16,
        kv_heads=8,
        ffn=6144,
        positions=40960,
        theta=1e6,
        eps=1e-6,
        tied=True,
        head_dim=128,
    ),  # fmt: skip
    # The text decoder (``text_config``) of
    # https://huggingface.co/mistralai/Mistral-Small-3.2-24B-Instruct-2506/blob/main/config.json,
    # the same shape as mistralai/Mistral-Small-24B-Base-2501, whose hub page lists
    # 23.6B parameters (the "24B" of the name counts the vision encoder too).
    "mistral-small-3.2": _family(
        "mistral",
        vocab=131072,
        hidden=5120,
        layers=40,
        heads=32,
        kv_heads=8,
        ffn=32768,
        positions=131072,
        theta=1e9,
        eps=1e-5,
        tied=False,
        head_dim=128,
    ),  # fmt: skip
    # https://huggingface.co/mistralai/Ministral-8B-Instruct-2410/blob/main/config.json;
    # model card: 8,019,808,256 parameters. Its sliding_window of 32768 equals its
    # context, so no query ever reaches past it.
    "ministral-8b": _family(
        "mistral",
        vocab=131072,
        hidden=4096,
        layers=36,
        heads=32,
        kv_heads=8,
        ffn=12288,
        positions=32768,
        theta=1e8,
        eps=1e-5,
        tied=False,
        head_dim=128,
        sliding_window=32768,
    ),  # fmt: skip
    # https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json, with its
    # llama3 RoPE scaling; model card: 8B, safetensors total 8,030,261,248.
    "llama-3.1-8b": _family(
        "llama",
        vocab=128256,
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=8,
        ffn=14336,
        positions=131072,
        theta=500000.0,
        eps=1e-5,
        tied=False,
        rope_scaling={
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),  # fmt: skip
}
