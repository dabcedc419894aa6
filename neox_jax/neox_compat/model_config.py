"""The model part of a GPT-NeoX config as ``ModelConfig`` fields (used by config.py).

GPT-NeoX builds two kinds of model neox_jax can reproduce:

* its own (Pythia, NeoX-20B): LayerNorm, a plain MLP (``gelu``/``relu``), a fused
  ``query_key_value`` per head; neox_jax's ``gpt_neox`` family;
* Llama-style (``configs/llama*``, ``mistral``, ``llemma``): ``norm: rmsnorm``, a gated MLP
  (``activation: swiglu``; ``geglu``/``reglu``), optionally fewer key/value heads
  (``num_kv_heads``) and a sliding window; neox_jax's ``llama`` (``mistral`` with a
  window) family, whose separate q/k/v projections hold the same weights.

The MLP width is derived as GPT-NeoX's ``ParallelMLP`` derives it (megatron/model/
transformer.py): ``intermediate_size`` (or ``expansion_factor * hidden``, or ``4 *
hidden``); a gated MLP keeps ``int(2/3 * that)`` for both its halves together; the
``linear1`` output is rounded up to ``2 * mlp_multiple_of`` and the ``linear2`` input
to ``mlp_multiple_of``. That is why GPT-NeoX's Llama-2-7B config says 32768 for
Llama's 11008.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

from neox_jax.errors import UserError

# The 20B tokenizer's size (EleutherAI's 20B_tokenizer.json, Pythia's and NeoX-20B's),
# assumed when the config's vocab_file cannot be read (the note says so).
NEOX_20B_TOKENIZER_SIZE = 50277
KERNEL = "a CUDA kernel/fusion choice; XLA fuses on its own (model.attention_impl picks kernels)"
# GPT-NeoX keys that change the model, with the value (GPT-NeoX's default or what
# neox_jax builds) that is accepted; any other value is refused.
MODEL_ONLY = {
    "gpt_j_tied": False,
    "scalenorm_epsilon": None,
    "num_unique_layers": None,
    "use_qk_layernorm": False,
    "opt_pos_emb_offset": 0,
    "use_mup": False,
    "moe_num_experts": 1,
}
INIT_METHODS = {"init_method": "small_init", "output_layer_init_method": "wang_init"}
# GPT-NeoX activation -> (our hidden_act, gated); megatron/model/activations.py
# (its "swish" is x * sigmoid(x), i.e. silu).
ACTIVATIONS = {
    "gelu": ("gelu", False), "relu": ("relu", False), "silu": ("silu", False),
    "swish": ("silu", False), "swiglu": ("silu", True), "geglu": ("gelu", True),
    "reglu": ("relu", True),
}  # fmt: skip
NORMS = ("layernorm", "rmsnorm")

Getter = Callable[..., Any]


def padded_vocab(g: Getter, notes: list[str], tokenizer_vocab_size: int | None) -> int:
    """GPT-NeoX's ``_vocab_size_with_padding``: round up to divisible * model-parallel."""
    size = tokenizer_vocab_size
    vocab_file = g("vocab_file")
    kind = str(g("tokenizer_type", "GPT2BPETokenizer")).lower()  # GPT-NeoX ignores case
    if size is None:
        size = _tokenizer_size(kind, vocab_file)
    if size is None:
        size = NEOX_20B_TOKENIZER_SIZE
        notes.append(
            f"tokenizer size unknown (vocab_file {vocab_file or 'not set'} not readable here): "
            f"assuming {size}, the 20B tokenizer's (Pythia's); name the tokenizer with "
            "--config.data.tokenizer=PATH or its size with --neox_vocab_size=N"
        )
    multiple = _int(g, "make_vocab_size_divisible_by", 128) * max(
        1, _int(g, "model_parallel_size", 1) or 1
    )
    return int(math.ceil(size / multiple) * multiple)


def _tokenizer_size(kind: str, vocab_file: str | None) -> int | None:
    """``tokenizer.vocab_size`` of GPT-NeoX's ``build_tokenizer``, where it can be known
    here (megatron/tokenizer/tokenizer.py)."""
    readable = bool(vocab_file) and os.path.isfile(vocab_file)
    if kind == "gpt2bpetokenizer":  # len(encoder.json); GPT-2's own: 50257
        if readable:
            with open(vocab_file, encoding="utf-8") as f:
                return len(json.load(f))
        return 50257
    if kind == "hfgpt2tokenizer" and not vocab_file:
        return 50258  # Hugging Face's "gpt2" plus the <|padding|> GPT-NeoX adds
    if kind == "charleveltokenizer":
        return 512
    if kind == "hftokenizer" and readable:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(vocab_file).get_vocab_size()
    if kind == "spmtokenizer" and readable:
        try:
            import sentencepiece
        except ImportError:
            return None
        return sentencepiece.SentencePieceProcessor(model_file=vocab_file).get_piece_size()
    return None


def _int(g: Getter, key: str, default=None):
    """An integer setting (YAML may give "1024"); a clear error for anything else."""
    value = g(key, default)
    if value is None or isinstance(value, bool):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not number.is_integer():
        raise UserError(f"GPT-NeoX {key}={value!r} must be a whole number.")
    return int(number)


def mlp_width(g: Getter, hidden: int, gated: bool) -> int:
    """The width of the MLP's hidden layer (``linear2``'s input), as ``ParallelMLP``
    computes it; GPT-NeoX configs whose two projections would disagree are refused."""
    size, factor = _int(g, "intermediate_size"), g("expansion_factor")
    if size and factor:
        raise UserError(
            "GPT-NeoX intermediate_size and expansion_factor are both set; GPT-NeoX refuses "
            "that too, keep one."
        )
    multiple = _int(g, "mlp_multiple_of", 1)
    if factor:
        size = int(float(factor) * hidden)
    ffn = size or 4 * hidden
    ffn_in = ffn
    if gated:  # both halves of linear1 together hold 2/3 of it
        ffn = int(ffn * 2 / 3)
        ffn_in = ffn // 2
    out = 2 * multiple * -(-ffn // (2 * multiple))
    width = multiple * -(-ffn_in // multiple)
    if out != (2 * width if gated else width):
        raise UserError(
            f"GPT-NeoX intermediate_size={size} (mlp_multiple_of={multiple}) gives linear1 "
            f"{out} outputs but linear2 {width} inputs (GPT-NeoX's ParallelMLP rounding); "
            "GPT-NeoX cannot run this model either. "
            + (
                "A gated MLP keeps 2/3 of intermediate_size for its two halves: for a width "
                f"of W give intermediate_size 3 W (the nearest here: {3 * width}; for "
                f"{size or ffn}: {3 * (size or ffn)}) or set mlp_multiple_of."
                if gated
                else "Give an even intermediate_size, a multiple of 2 x mlp_multiple_of."
            )
        )
    return width


def check_attention_config(config, num_layers) -> set[str]:
    """GPT-NeoX's ``[[[types], repeat], ...]``: only full causal attention ("global", or its
    "flash" kernel) is the model neox_jax builds; local/sparse/linear types are refused.
    Returns the attention types used."""
    if config is None:
        return {"global"}
    try:
        kinds = {str(k) for types, _ in config for k in types}
    except (TypeError, ValueError):
        raise UserError(
            f"GPT-NeoX attention_config={config!r} is not a list of [[types], repeat] pairs."
        ) from None
    other = sorted(kinds - {"global", "flash"})
    if other:
        raise UserError(
            f"GPT-NeoX attention_config uses {other} attention over its {num_layers} layers; "
            "neox_jax builds full causal attention only ('global' or 'flash')."
        )
    return kinds


def _family(g: Getter, notes: list[str], heads: int, hidden: int) -> dict[str, Any]:
    """The family fields: GPT-NeoX's own model, or the Llama-style one."""
    norm = g("norm", "layernorm")
    if norm not in NORMS:
        raise UserError(
            f"GPT-NeoX norm={norm!r} changes the model into one neox_jax cannot build "
            f"(supported: {list(NORMS)})."
        )
    activation = g("activation", "gelu")
    if activation not in ACTIVATIONS:
        raise UserError(
            f"GPT-NeoX activation={activation!r} is not supported; use {list(ACTIVATIONS)}."
        )
    act, gated = ACTIVATIONS[activation]
    mlp_type = g("mlp_type", "regular")
    if mlp_type not in ("regular", "llama"):
        raise UserError(
            f"GPT-NeoX mlp_type={mlp_type!r} changes the model into one neox_jax cannot build "
            "(supported: 'regular', and the older 'llama')."
        )
    legacy = mlp_type == "llama"  # GPT-NeoX before #1212: LLaMAParallelMLP, w1/w3/w2
    if legacy and gated:
        raise UserError(
            f"GPT-NeoX mlp_type=llama gates its MLP itself: give a plain activation (silu), "
            f"not {activation!r}."
        )
    kv_heads = _int(g, "num_kv_heads")
    if kv_heads in (None, heads):
        kv_heads = None
    elif heads % kv_heads:
        raise UserError(
            f"GPT-NeoX num_kv_heads={kv_heads} does not divide num_attention_heads={heads}."
        )
    window = _int(g, "sliding_window_width")
    kinds = check_attention_config(g("attention_config"), g("num_layers"))
    if window is not None:
        # flash's window_size=(w, -1) and the global layers' mask (get_attn_mask's
        # triu(diagonal=-w)) both let a query see itself and the w keys before it.
        window += 1
        if "global" in kinds and g("scaled_upper_triang_masked_softmax_fusion", False):
            notes.append(
                "sliding_window_width with global attention and "
                "scaled_upper_triang_masked_softmax_fusion: GPT-NeoX's fused causal softmax "
                "ignores the attention mask where its kernel applies, so those layers may have "
                "run without the window; neox_jax applies it"
            )
    if legacy:  # its width: intermediate_size, else 8/3 h rounded up to 256; no biases
        width = _int(g, "intermediate_size") or 256 * -(-int(2 * hidden * 4 / 3) // 256)
    else:
        width = mlp_width(g, hidden, gated)
    fields = {
        "hidden_act": act,
        "intermediate_size": width,
        "attention_bias": bool(g("use_bias_in_attn_linear", True)),
    }
    gated = gated or legacy
    if norm == "layernorm":
        llama_only = {"a gated activation": gated, "num_kv_heads": kv_heads,
                      "use_bias_in_mlp: false": not g("use_bias_in_mlp", True),
                      "sliding_window_width": window}  # fmt: skip
        wanted = [k for k, v in llama_only.items() if v]
        if wanted:
            raise UserError(
                f"GPT-NeoX norm=layernorm with {', '.join(wanted)}: neox_jax builds these in "
                "its Llama-style family, which uses RMSNorm (norm: rmsnorm)."
            )
        fields["layer_norm_eps"] = float(g("layernorm_epsilon", 1e-5))
        return fields
    if not gated:
        raise UserError(
            f"GPT-NeoX norm=rmsnorm with activation={activation!r}: neox_jax's RMSNorm "
            "(Llama-style) family has a gated MLP; use activation swiglu, geglu or reglu."
        )
    # None (all heads, no window) is left out: the flags cannot spell it, and it is the
    # base config's value.
    optional = {"num_key_value_heads": kv_heads, "sliding_window": window}
    return {
        **fields,
        **{k: v for k, v in optional.items() if v is not None},
        "model_type": "mistral" if window else "llama",
        "norm_type": "rmsnorm",
        "gated_mlp": True,
        "fused_qkv": False,
        "mlp_bias": bool(g("use_bias_in_mlp", True)) and not legacy,
        "layer_norm_eps": float(g("rms_norm_epsilon", 1e-8)),
    }


def model_fields(neox: dict, g: Getter, t, tokenizer_vocab_size) -> dict[str, Any]:
    """``ModelConfig`` fields of merged GPT-NeoX args; ``t`` gets notes and ignored keys."""
    for key, accepted in MODEL_ONLY.items():
        if g(key, accepted) != accepted:
            raise UserError(
                f"GPT-NeoX {key}={neox[key]!r} changes the model into one neox_jax cannot "
                f"build (supported: {accepted!r})."
            )
    heads, hidden = _int(g, "num_attention_heads"), _int(g, "hidden_size")
    layers, seq = _int(g, "num_layers"), _int(g, "seq_length")
    required = {"num_layers": layers, "hidden_size": hidden,
                "num_attention_heads": heads, "seq_length": seq}  # fmt: skip
    missing = [k for k, v in required.items() if v is None]
    if missing:
        raise UserError(f"GPT-NeoX config lacks {', '.join(missing)}; GPT-NeoX requires them too.")
    pos_emb = g("pos_emb", "learned")
    if pos_emb != "rotary":
        raise UserError(
            f"GPT-NeoX pos_emb={pos_emb!r} (GPT-NeoX's default when absent is 'learned') is not "
            "supported: neox_jax models use rotary embeddings; set pos_emb: rotary."
        )
    max_pos = _int(g, "max_position_embeddings") or seq
    if max_pos < seq:
        raise UserError(
            f"GPT-NeoX seq_length={seq} exceeds max_position_embeddings={max_pos}; they conflict."
        )
    family = _family(g, t.notes, heads, hidden)
    if neox.get("attention_config") is not None:
        t.ignored["attention_config"] = "full causal attention, as neox_jax computes; " + KERNEL
    if (g("soft_prompt_tuning") or {}).get("enabled"):
        raise UserError("GPT-NeoX soft_prompt_tuning adds parameters neox_jax does not have.")
    for key, ours in INIT_METHODS.items():
        if g(key, "normal") != ours:
            t.ignored[key] = (
                f"{neox.get(key, 'normal (default)')!r} not available: neox_jax always "
                f"initialises with {ours}"
            )
    return {
        "vocab_size": padded_vocab(g, t.notes, tokenizer_vocab_size),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "rotary_pct": float(g("rotary_pct", 1.0)),
        "rotary_emb_base": float(g("rotary_emb_base", 10000)),
        "max_position_embeddings": max_pos,
        "use_parallel_residual": bool(g("gpt_j_residual", False)),
        "tie_word_embeddings": not g("no_weight_tying", False),
        **family,
    }
