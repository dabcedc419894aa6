"""The Llama-style families (Llama, Mistral, Qwen2/2.5, Qwen3, and the mixtures of experts
Mixtral, Qwen2-MoE, Qwen3-MoE) <-> ``ModelConfig`` and
our parameter names. ``neox_jax.convert.hf`` reads and writes the files and picks this
module's tables by the ``model_type`` of ``config.json``.

These families differ from GPT-NeoX only by ``ModelConfig`` options (see
``neox_jax.model.config``): RMSNorm, a gated silu MLP, sequential residual, full rotary,
separate q/k/v projections with grouped KV heads, and per family:

* llama: ``attention_bias`` on q/k/v/o, ``mlp_bias`` on the MLP (both off by default).
* mistral: no biases.
* qwen2: biases on q/k/v only.
* qwen3: ``attention_bias`` on q/k/v/o (off by default), RMSNorm of each q/k head,
  ``head_dim`` 128 unless config.json says otherwise.
* mixtral, qwen2_moe, qwen3_moe: Mistral's, Qwen2's (``qkv_bias``) and Qwen3's
  attention with sparse MLPs (``neox_jax.convert.hf_moe``).

Linear weights are ``[out, in]`` on the hub and ``[in, out]`` here (transposed); the
rest is copied.
"""

from __future__ import annotations

from typing import Any

from neox_jax.convert import hf_moe
from neox_jax.errors import UserError
from neox_jax.model import ModelConfig


class ConversionError(UserError):
    """A checkpoint that cannot be converted; the message says what and how to fix it."""


ARCHITECTURES = {
    "gpt_neox": "GPTNeoXForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
NAMES = {"gpt_neox": "GPT-NeoX", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2",
         "qwen3": "Qwen3", "qwen3_moe": "Qwen3-MoE", "qwen2_moe": "Qwen2-MoE",
         "mixtral": "Mixtral"}  # fmt: skip
FAMILIES = tuple(t for t in ARCHITECTURES if t != "gpt_neox")
# The dense family whose attention (biases, QK-norm, window) each MoE family shares.
ATTENTION_OF = {"qwen3_moe": "qwen3", "qwen2_moe": "qwen2", "mixtral": "mistral"}
# Families whose sliding window is switched on by use_sliding_window, per layer.
QWEN_WINDOWED = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
# transformers' default head_dim when config.json has none (Qwen3Config's is 128).
_DEFAULT_HEAD_DIM = {"qwen3": 128}
_REQUIRED = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
)  # fmt: skip


def check_supported(hf: dict[str, Any]) -> None:
    """Refuse, naming the reason and what is supported, a ``config.json`` this module
    cannot turn into a causal LM: an unknown ``model_type``, an ``architectures`` entry
    that is not a causal LM (a classifier, a bare ``*Model`` without the LM head), or
    weights stored quantized by another library (``quantization_config``)."""
    model_type = hf.get("model_type")
    supported = ", ".join(f"{t!r} ({a})" for t, a in ARCHITECTURES.items())
    if model_type not in ARCHITECTURES:
        said = f"model_type={model_type!r}" if model_type else "no model_type"
        archs = f" (architectures={hf['architectures']})" if hf.get("architectures") else ""
        raise ConversionError(
            f"config.json has {said}{archs}, which neox_jax cannot convert; "
            f"supported model types: {supported}."
        )
    architectures = hf.get("architectures") or []
    if isinstance(architectures, str):
        architectures = [architectures]
    other = [a for a in architectures if not str(a).endswith("ForCausalLM")]
    if other:
        raise ConversionError(
            f"config.json names the architecture {other[0]!r}, which is not a causal language "
            f"model (no LM head to generate with); neox_jax loads "
            f"{ARCHITECTURES[model_type]} for model_type={model_type!r} (supported: "
            f"{supported}). Save the *ForCausalLM model instead (transformers' "
            "AutoModelForCausalLM.from_pretrained(...).save_pretrained(...))."
        )
    quant = hf.get("quantization_config")
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise ConversionError(
            f"config.json has a quantization_config (quant_method={method!r}): the weights "
            "are stored quantized by another library, which neox_jax does not read. Load the "
            "original float checkpoint (quantize it with python -m neox_jax.quantize)."
        )


# -------------------------------------------------------------------- config
# Optional keys of a rope_type that ModelConfig.rope_scaling carries over.
_ROPE_KEYS = {
    "linear": (),
    "dynamic": (),
    "llama3": ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"),
}  # fmt: skip
HF_ROPE_TYPES = tuple(_ROPE_KEYS)  # the rope_type values read from and written to config.json


def rope_from_hf(
    hf: dict[str, Any], default_partial: float = 1.0
) -> tuple[float, float, dict[str, Any] | None]:
    """``(rope_theta, partial_rotary_factor, rope_scaling)`` of any family's config.json,
    from either spelling: transformers 5's ``rope_parameters`` or 4.x's ``rope_theta`` +
    ``rope_scaling`` (GPT-NeoX's 4.x files: ``rotary_emb_base`` + ``rotary_pct``).

    Missing values are filled as transformers' ``standardize_rope_params`` and rope
    functions fill them: ``original_max_position_embeddings`` from the top-level key or
    ``max_position_embeddings``; a yarn ``factor`` from their ratio.

    Args:
      default_partial: the rotary fraction when config.json names none (GPT-NeoX: 0.25).
    """
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    partial = rope.get(
        "partial_rotary_factor",
        hf.get("partial_rotary_factor", hf.get("rotary_pct", default_partial)),
    )
    kind = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    if kind == "default":
        return float(theta), float(partial), None
    if kind not in _ROPE_KEYS:
        raise ConversionError(
            f"config.json's rope_scaling/rope_parameters has rope_type={kind!r}, which neox_jax "
            f"does not implement (supported: 'default', {', '.join(map(repr, _ROPE_KEYS))}); "
            "loading it would give wrong logits."
        )
    params = {**legacy, **rope}
    if kind in ("llama3", "yarn"):
        original = hf.get("original_max_position_embeddings")
        params["original_max_position_embeddings"] = original or params.get(
            "original_max_position_embeddings", hf.get("max_position_embeddings", 2048)
        )
    factor = params.get("factor")
    if factor is None and kind == "yarn":
        factor = (
            hf.get("max_position_embeddings", 2048) / params["original_max_position_embeddings"]
        )
    missing = [
        k for k in ("low_freq_factor", "high_freq_factor") if kind == "llama3" and k not in params
    ]
    if factor is None or missing:
        raise ConversionError(
            f"config.json's {kind} rope_scaling lacks {', '.join(missing or ['factor'])}."
        )
    scaling = {"type": kind, "factor": float(factor)}
    scaling.update({k: params[k] for k in _ROPE_KEYS[kind] if params.get(k) is not None})
    return float(theta), float(partial), scaling


def _layer_types(hf: dict[str, Any], model_type: str) -> list[str]:
    """Each layer's attention ("sliding_attention" or "full_attention") as transformers'
    config classes decide it: ``layer_types`` when config.json has it, else derived from
    ``use_sliding_window`` and ``max_window_layers`` by the family's own rule."""
    n = hf["num_hidden_layers"]
    if model_type not in QWEN_WINDOWED:  # Mistral, Mixtral: the window (if any) everywhere
        return ["sliding_attention" if hf.get("sliding_window") else "full_attention"] * n
    if not hf.get("use_sliding_window", False) or hf.get("sliding_window") is None:
        return ["full_attention"] * n  # transformers sets sliding_window to None then
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    first = hf.get("max_window_layers", 28)
    if model_type == "qwen2_moe":  # every other layer below max_window_layers
        sliding = [(i + 1) % 2 == 1 and i < first for i in range(n)]
    elif model_type == "qwen3_moe":  # Qwen3MoeConfig has no per-layer types
        sliding = [True] * n
    else:  # qwen2, qwen3: the layers from max_window_layers on
        sliding = [i >= first for i in range(n)]
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def _check_window(hf: dict[str, Any], model_type: str) -> int | None:
    """The sliding window of every layer, as transformers decides it, or None (no layer
    slides); a config mixing windowed and full layers is refused."""
    types = set(_layer_types(hf, model_type))
    if types == {"full_attention"}:
        return None
    if types != {"sliding_attention"}:
        raise ConversionError(
            f"config.json mixes sliding and full attention layers (layer_types="
            f"{sorted(types)}, use_sliding_window={hf.get('use_sliding_window')}, "
            f"max_window_layers={hf.get('max_window_layers')}); neox_jax supports one window "
            "on every layer or on none (use_sliding_window=false)."
        )
    return hf["sliding_window"]


def config_from_hf(hf: dict[str, Any], **overrides) -> ModelConfig:
    """``ModelConfig`` of a Llama/Mistral/Qwen2/Qwen3 ``config.json`` dict."""
    check_supported(hf)
    model_type = hf["model_type"]
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ConversionError(
            f"config.json lacks {', '.join(missing)}: every {model_type} config.json names "
            f"{', '.join(_REQUIRED)}; restore the file from the original checkpoint."
        )
    theta, partial, scaling = rope_from_hf(hf)
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    family = ATTENTION_OF.get(model_type, model_type)
    head_dim = hf.get("head_dim") or _DEFAULT_HEAD_DIM.get(family) or hidden // heads
    kv_heads = hf.get("num_key_value_heads") or heads
    attention_bias = bool(hf.get("attention_bias", hf.get("qkv_bias", family == "qwen2")))
    fields = dict(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=None if kv_heads == heads else kv_heads,
        head_dim_override=None if head_dim * heads == hidden else head_dim,
        intermediate_size=hf["intermediate_size"],
        hidden_act=hf.get("hidden_act", "silu"),
        rotary_pct=partial,
        rotary_emb_base=theta,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        layer_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        use_parallel_residual=False,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        attention_out_bias=False if family == "qwen2" else attention_bias,
        norm_type="rmsnorm",
        gated_mlp=True,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        fused_qkv=False,
        qk_norm=family == "qwen3",
        sliding_window=_check_window(hf, model_type),
        rope_scaling=scaling,
        **hf_moe.config_fields(hf),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def config_to_hf(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """A ``config.json`` dict of ``config.model_type`` that transformers 4.x and 5.x read."""
    t = config.model_type
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[t]],
        "model_type": t,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.layer_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_theta": config.rotary_emb_base,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
        "sliding_window": config.sliding_window,
    }
    if config.rotary_pct != 1.0:
        out["partial_rotary_factor"] = config.rotary_pct
    scaling = config.rope_scaling_dict or {}
    if scaling.get("type") in _ROPE_KEYS:
        kind = scaling.pop("type")
        out["rope_scaling"] = {"rope_type": kind, **scaling}
    elif scaling:
        raise ConversionError(f"rope_scaling {scaling} has no {t} equivalent in transformers.")
    family = ATTENTION_OF.get(t, t)
    if family in ("qwen2", "qwen3"):
        # Qwen windows the layers from max_window_layers on (Qwen2-MoE: every other one
        # below it), so one window everywhere is max_window_layers=0 and, for the
        # classes that read it, every layer_types entry "sliding_attention".
        windowed = config.sliding_window is not None
        out["use_sliding_window"] = windowed
        out["max_window_layers"] = 0 if windowed else config.num_hidden_layers
        if windowed:
            out["layer_types"] = ["sliding_attention"] * config.num_hidden_layers
    if t in ("llama", "qwen3", "qwen3_moe"):
        out["attention_bias"] = config.attention_bias
    if t == "qwen2_moe":
        out["qkv_bias"] = config.attention_bias
    if t == "llama":
        out["mlp_bias"] = config.mlp_bias
    _check_exportable(config)
    out.update(hf_moe.config_to_hf(config))
    return out


def _check_exportable(config: ModelConfig) -> None:
    """Refuse a config whose options the family's transformers class cannot express."""
    t = config.model_type
    family = ATTENTION_OF.get(t, t)
    bias = {"llama": None, "mistral": False, "qwen2": True, "qwen3": None}[family]
    if t == "qwen2_moe":
        bias = None  # qkv_bias says
    expected = dict(
        norm_type="rmsnorm",
        gated_mlp=True,
        fused_qkv=False,
        use_parallel_residual=False,
        qk_norm=family == "qwen3",
        mlp_bias=config.mlp_bias if t == "llama" else False,
        attention_bias=config.attention_bias if bias is None else bias,
        out_bias=False if family == "qwen2" else config.attention_bias,
    )
    wrong = {k: getattr(config, k) for k, v in expected.items() if getattr(config, k) != v}
    if wrong:
        needed = {k: expected[k] for k in wrong}
        raise ConversionError(
            f"ModelConfig options {wrong} cannot be written as a {ARCHITECTURES[t]}; the "
            f"family needs {needed}."
        )


# --------------------------------------------------------------------- names
def name_table(config: ModelConfig) -> dict[str, tuple[str, bool, int | None]]:
    """Every hub tensor name of ``config`` -> (our path, transpose, layer or None)."""
    table: dict[str, tuple[str, bool, int | None]] = {
        "model.embed_tokens.weight": ("embed_in/embedding", False, None),
        "model.norm.weight": ("final_layer_norm/scale", False, None),
    }
    if not config.tie_word_embeddings:
        table["lm_head.weight"] = ("embed_out/kernel", True, None)
    per_layer = {
        "input_layernorm.weight": ("input_layernorm/scale", False),
        "post_attention_layernorm.weight": ("post_attention_layernorm/scale", False),
        "self_attn.o_proj.weight": ("attention/dense/kernel", True),
    }
    for p in ("q", "k", "v"):
        per_layer[f"self_attn.{p}_proj.weight"] = (f"attention/{p}_proj/kernel", True)
        if config.attention_bias:
            per_layer[f"self_attn.{p}_proj.bias"] = (f"attention/{p}_proj/bias", False)
    if config.out_bias:
        per_layer["self_attn.o_proj.bias"] = ("attention/dense/bias", False)
    if config.qk_norm:
        for p in ("q", "k"):
            per_layer[f"self_attn.{p}_norm.weight"] = (f"attention/{p}_norm/scale", False)
    for p in ("gate", "up", "down") if not config.is_moe else ():
        per_layer[f"mlp.{p}_proj.weight"] = (f"mlp/{p}_proj/kernel", True)
        if config.mlp_bias:
            per_layer[f"mlp.{p}_proj.bias"] = (f"mlp/{p}_proj/bias", False)
    for i in range(config.num_hidden_layers):
        for name, (ours, transpose) in per_layer.items():
            table[f"model.layers.{i}.{name}"] = ("layers/" + ours, transpose, i)
        if config.is_moe:
            table.update(hf_moe.mlp_names(config, i))
    return table
