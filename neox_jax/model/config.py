"""``ModelConfig``: the frozen description of a decoder model, and the size table.

One config describes GPT-NeoX/Pythia and, by its family options, the Llama-style
decoders (Llama, Mistral, Qwen2/2.5, Qwen3). Field names follow Hugging Face's
``GPTNeoXConfig`` (and ``LlamaConfig`` for the family options) so that interop is a
dict copy; ``dtype``, ``param_dtype``, ``attention_impl``, ``remat`` and
``rope_scaling`` are ours. Every family option defaults to GPT-NeoX's behaviour, so a
stored config without those keys loads as the same model.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Self

import jax.numpy as jnp

from neox_jax.errors import UserError
from neox_jax.model.family_presets import FAMILY_PRESETS
from neox_jax.model.moe_presets import MOE_PRESETS

ACTIVATIONS = (
    "gelu",  # exact, erf-based (torch.nn.functional.gelu); Pythia hub configs
    "gelu_python",  # the same formula written out in transformers
    "gelu_new",  # tanh approximation, sqrt(2/pi) computed (GPT-2's)
    "gelu_fast",  # tanh approximation with 0.7978845608 written out; GPT-NeoX-20B's hub config
    "gelu_pytorch_tanh",  # torch's approximate="tanh"
    "gelu_python_tanh",
    "gelu_accurate",
    "quick_gelu",
    "relu",
    "silu",
)
ATTENTION_IMPLS = ("xla", "pallas", "cudnn")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ROPE_SCALING_TYPES = ("linear", "ntk", "dynamic", "yarn", "llama3")
# The keys each scaling type needs besides "type" and "factor" (see model/rotary.py).
ROPE_SCALING_KEYS = {
    "llama3": ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("original_max_position_embeddings",),
}
NORM_TYPES = ("layernorm", "rmsnorm")
# The Hugging Face architecture a model is written as (neox_jax.convert picks the
# tensor names and config.json keys by it).
MODEL_TYPES = (
    "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral",
)  # fmt: skip
# How the routed experts are computed (neox_jax.model.moe): dropless grouped matmuls over
# tokens sorted by expert, a fixed capacity per expert, or every expert on every token.
MOE_IMPLS = ("ragged", "capacity", "dense")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _runtime(default):
    """A field the user picks per run (precision, kernel, remat, context extension)."""
    return dataclasses.field(default=default, metadata={"runtime": True})


class JsonConfig:
    """``replace``, dict and JSON round trips for a frozen config dataclass; unknown
    fields raise ``error_type`` naming the valid ones."""

    error_type: ClassVar[type[Exception]] = ValueError

    def replace(self, **changes) -> Self:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise cls.error_type(
                f"Unknown {cls.__name__} fields {unknown}; valid fields: {sorted(names)}."
            )
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Self:
        return cls.from_dict(json.loads(text))


@dataclasses.dataclass(frozen=True)
class ModelConfig(JsonConfig):
    """Architecture of one GPT-NeoX model (hashable, so it can be a static jit argument).

    Attributes (Hugging Face names):
      vocab_size: rows of the (padded) embedding matrices.
      hidden_size: model width; ``hidden_size // num_attention_heads`` is the head size.
      num_hidden_layers: transformer blocks.
      num_attention_heads: attention heads.
      intermediate_size: MLP width (4 * hidden_size for every released model).
      hidden_act: one of ``ACTIVATIONS``, defined exactly as transformers does.
      rotary_pct: fraction of each head that gets rotary embeddings (0.25 for Pythia/20B).
      rotary_emb_base: rotary base (theta).
      max_position_embeddings: the trained context length.
      layer_norm_eps: LayerNorm epsilon.
      use_parallel_residual: ``x + attn(ln1(x)) + mlp(ln2(x))`` if True, else sequential.
      tie_word_embeddings: share the input embedding with the output projection.
      attention_bias: biases on the q/k/v projection(s), and on ``dense`` unless
        ``attention_out_bias`` says otherwise.
    Family options (defaults are GPT-NeoX's):
      model_type: the Hugging Face family, one of ``MODEL_TYPES``.
      num_key_value_heads: key/value heads (grouped-query attention; 1 = multi-query);
        None means ``num_attention_heads``. Query head ``h`` reads KV head
        ``h // (num_attention_heads // num_key_value_heads)``, as transformers' repeat_kv.
      head_dim_override: the head size when it is not ``hidden_size // num_attention_heads``
        (transformers' ``head_dim``, e.g. Qwen3); None derives it. Read ``head_dim``.
      norm_type: "layernorm" (with bias) or "rmsnorm" (scale only, fp32 as transformers);
        ``layer_norm_eps`` is the epsilon of either (``rms_norm_eps`` on the hub).
      gated_mlp: ``down(act(gate(x)) * up(x))`` (SwiGLU with silu) instead of
        ``dense_4h_to_h(act(dense_h_to_4h(x)))``.
      mlp_bias: biases on the MLP projections.
      fused_qkv: one ``query_key_value`` projection (GPT-NeoX's per-head [q|k|v]) rather
        than separate ``q_proj``/``k_proj``/``v_proj``.
      attention_out_bias: bias on the attention output ``dense``; None follows
        ``attention_bias`` (Qwen2 has q/k/v biases only).
      qk_norm: RMSNorm over each head of q and k before rotary (Qwen3).
      sliding_window: a query at slot ``i`` sees only keys at slots ``> i - window``
        (Mistral, as transformers masks it); None = full causal attention. The KV cache
        holds every slot unless built with ``init_cache(..., rolling=True)``.
    Mixture of experts (transformers' Qwen3-MoE / Mixtral / Qwen2-MoE names; see
    ``neox_jax.model.moe``):
      num_experts: routed experts per sparse layer; 0 = a dense model.
      num_experts_per_tok: experts each token is routed to (top-k).
      moe_intermediate_size: width of each expert's gated MLP; None = ``intermediate_size``
        (Mixtral's convention).
      norm_topk_prob: renormalise the top-k router probabilities to sum to 1.
      shared_expert_intermediate_size: width of Qwen2-MoE's shared expert (an MLP every
        token goes through, scaled by ``sigmoid(shared_expert_gate(x))``); 0 = none.
      decoder_sparse_step: layer ``i`` is sparse when ``(i + 1) % step == 0`` ...
      mlp_only_layers: ... and ``i`` is not listed here (those keep the dense MLP of
        ``intermediate_size``).
    Ours:
      dtype: compute dtype ("float32" or "bfloat16"); LayerNorm and softmax stay fp32.
      param_dtype: storage dtype of parameters.
      attention_impl: "xla" (the reference), "pallas" (flash kernels) or "cudnn"
        (``jax.nn.dot_product_attention``: cuDNN's fused attention on NVIDIA GPUs in
        bf16/fp16, XLA elsewhere; cached decoding takes the XLA path).
      remat: rematerialisation policy of each block, one of ``REMAT_POLICIES``.
      scan_unroll: layers per iteration of the layer loop (``nn.scan``). 1 compiles one
        layer (deep models, short compiles); ``num_hidden_layers`` or more unrolls the
        whole stack, so autodiff keeps each layer's activations as they are instead of
        stacking them into zero-filled ``[L, ...]`` buffers (less memory traffic: the
        step for small models on CPU, ``experiments/train_bench``). Same values.
      moe_impl: one of ``MOE_IMPLS``; all give the same outputs while no expert
        overflows its capacity.
      capacity_factor: with ``moe_impl="capacity"``, each expert takes at most
        ``ceil(capacity_factor * tokens * top_k / num_experts)`` tokens; the rest skip it.
      router_aux_loss_coef: weight of the load-balancing loss in training (Switch
        Transformer eq. 4-6, as transformers' ``load_balancing_loss_func``).
      router_z_loss_coef: weight of the router z-loss (ST-MoE, arXiv:2202.08906 eq. 5).
      rope_scaling: None, or {"type": "linear"|"ntk"|"dynamic", "factor": f} to run past
        ``max_position_embeddings``, or {"type": "yarn", "factor",
        "original_max_position_embeddings", optional "beta_fast", "beta_slow",
        "attention_factor", "mscale", "mscale_all_dim", "truncate"} or {"type": "llama3",
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
        as a checkpoint's config.json states it (see ``neox_jax.model.rotary``).
    """

    vocab_size: int = 50432
    hidden_size: int = 6144
    num_hidden_layers: int = 44
    num_attention_heads: int = 64
    intermediate_size: int = 24576
    hidden_act: str = "gelu"
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    tie_word_embeddings: bool = False
    attention_bias: bool = True
    model_type: str = "gpt_neox"
    num_key_value_heads: int | None = None
    head_dim_override: int | None = None
    norm_type: str = "layernorm"
    gated_mlp: bool = False
    mlp_bias: bool = True
    fused_qkv: bool = True
    attention_out_bias: bool | None = None
    qk_norm: bool = False
    sliding_window: int | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # How the model runs rather than what it is: a checkpoint's architecture never
    # overrides these (see ``architecture_fields``).
    dtype: str = _runtime("float32")
    param_dtype: str = _runtime("float32")
    attention_impl: str = _runtime("xla")
    remat: str = _runtime("none")
    scan_unroll: int = _runtime(1)
    rope_scaling: tuple[tuple[str, Any], ...] | None = _runtime(None)
    moe_impl: str = _runtime("ragged")
    capacity_factor: float = _runtime(1.25)
    router_aux_loss_coef: float = _runtime(0.0)
    router_z_loss_coef: float = _runtime(0.0)

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):  # keep the dataclass hashable
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if isinstance(self.mlp_only_layers, list):  # JSON gives a list
            object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        if self.head_dim_override is not None:
            return self.head_dim_override
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``num_key_value_heads``, or every query head when unset."""
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def out_bias(self) -> bool:
        """Whether the attention output projection has a bias."""
        if self.attention_out_bias is None:
            return self.attention_bias
        return self.attention_out_bias

    @property
    def rotary_ndims(self) -> int:
        # Same truncation as transformers: int(head_dim * rotary_pct).
        return int(self.head_dim * self.rotary_pct)

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        """The layers whose MLP is a mixture of experts (transformers' rule)."""
        if not self.num_experts:
            return ()
        return tuple(
            i
            for i in range(self.num_hidden_layers)
            if i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
        )

    @property
    def is_moe(self) -> bool:
        return bool(self.sparse_layers)

    @property
    def mixed_mlp(self) -> bool:
        """Some layers sparse, some dense: each stacked layer then holds both MLPs (see
        ``neox_jax.model.moe``)."""
        return 0 < len(self.sparse_layers) < self.num_hidden_layers

    @property
    def expert_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def context_length(self) -> int:
        """Positions the model can address: the trained context, extended by RoPE scaling
        (yarn and llama3 scale their ``original_max_position_embeddings``)."""
        scaling = self.rope_scaling_dict or {}
        factor = scaling.get("factor", 1.0)
        if scaling.get("type") in ("yarn", "llama3"):
            extended = int(scaling["original_max_position_embeddings"] * factor)
            return max(self.max_position_embeddings, extended)
        return int(self.max_position_embeddings * factor)

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    # ----------------------------------------------------------- field groups
    @classmethod
    def architecture_fields(cls) -> tuple[str, ...]:
        """The fields that define the function (and the parameter shapes) of a model:
        the ones a checkpoint dictates when a run starts from it."""
        return tuple(f.name for f in dataclasses.fields(cls) if not f.metadata.get("runtime"))

    @classmethod
    def runtime_fields(cls) -> tuple[str, ...]:
        """The fields a run chooses whatever the checkpoint: dtypes, kernel, remat, RoPE scaling."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("runtime"))

    def with_architecture_of(self, other: ModelConfig) -> ModelConfig:
        """``other``'s architecture with this config's runtime fields."""
        return self.replace(**{f: getattr(other, f) for f in self.architecture_fields()})

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raises ``ValueError`` naming the field and the fix for invalid combinations."""
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}.")
        self._validate_family()
        self._validate_moe()
        if self.head_dim_override is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); choose sizes whose ratio is the head size."
            )
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct must lie in [0, 1], got {self.rotary_pct}.")
        if self.rotary_ndims % 2:
            raise ValueError(
                f"rotary dims int(head_dim * rotary_pct) = int({self.head_dim} * {self.rotary_pct})"
                f" = {self.rotary_ndims} is odd; rotate-half needs an even count. Adjust "
                "rotary_pct or the head size."
            )
        _check_choice("hidden_act", self.hidden_act, ACTIVATIONS)
        _check_choice("dtype", self.dtype, tuple(DTYPES))
        _check_choice("param_dtype", self.param_dtype, tuple(DTYPES))
        _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _check_choice("remat", self.remat, REMAT_POLICIES)
        if not isinstance(self.scan_unroll, int) or self.scan_unroll < 1:
            raise ValueError(f"scan_unroll must be an integer >= 1, got {self.scan_unroll!r}.")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps}.")
        if self.rope_scaling is not None:
            scaling = self.rope_scaling_dict
            kind = scaling.get("type")
            _check_choice("rope_scaling['type']", kind, ROPE_SCALING_TYPES)
            factor = scaling.get("factor")
            if not isinstance(factor, int | float) or factor < 1.0:
                raise ValueError(f"rope_scaling['factor'] must be a number >= 1, got {factor!r}.")
            missing = [k for k in ROPE_SCALING_KEYS.get(kind, ()) if k not in scaling]
            if missing:
                raise UserError(
                    f"rope_scaling of type {kind!r} needs {', '.join(missing)} (as in the "
                    "model's config.json rope_scaling / rope_parameters)."
                )

    def _validate_family(self) -> None:
        _check_choice("model_type", self.model_type, MODEL_TYPES)
        _check_choice("norm_type", self.norm_type, NORM_TYPES)
        for name in ("num_key_value_heads", "head_dim_override", "sliding_window"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value <= 0
            ):
                raise ValueError(
                    f"ModelConfig.{name} must be a positive integer or None, got {value!r}."
                )
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not divisible by "
                f"num_key_value_heads ({self.kv_heads}); each KV head serves a whole group "
                "of query heads, so choose a divisor."
            )
        if self.fused_qkv and self.kv_heads != self.num_attention_heads:
            raise ValueError(
                f"fused_qkv=True (GPT-NeoX's query_key_value) needs as many KV heads as query "
                f"heads, got num_key_value_heads={self.kv_heads} for "
                f"{self.num_attention_heads} heads; set fused_qkv=False for grouped-query "
                "attention."
            )

    def _validate_moe(self) -> None:
        if self.moe_impl not in MOE_IMPLS:
            raise UserError(
                f"Unknown moe_impl {self.moe_impl!r}; supported: {', '.join(MOE_IMPLS)}."
            )
        ints = dict(
            num_experts=(self.num_experts, 0),
            shared_expert_intermediate_size=(self.shared_expert_intermediate_size, 0),
            num_experts_per_tok=(self.num_experts_per_tok, 1),
            decoder_sparse_step=(self.decoder_sparse_step, 1),
            moe_intermediate_size=(self.moe_intermediate_size or 1, 1),
        )
        for name, (value, low) in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"ModelConfig.{name} must be an integer >= {low}, got {value!r}.")
        if self.num_experts and self.num_experts_per_tok > self.num_experts:
            raise UserError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts "
                f"({self.num_experts}): a token cannot pick more experts than exist; lower "
                "num_experts_per_tok or add experts."
            )
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise UserError(
                f"mlp_only_layers {bad} are not layers of a {self.num_hidden_layers}-layer "
                f"model; list indices in [0, {self.num_hidden_layers})."
            )
        if not self.capacity_factor > 0:
            raise UserError(
                f"capacity_factor must be > 0, got {self.capacity_factor}; 1.0 gives each "
                "expert an even share of the tokens, more leaves room for imbalance."
            )
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if not getattr(self, name) >= 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.is_moe and (not self.gated_mlp or self.mlp_bias):
            raise UserError(
                "Experts are gated MLPs without biases (as in Qwen-MoE and Mixtral); set "
                f"gated_mlp=True and mlp_bias=False (got gated_mlp={self.gated_mlp}, "
                f"mlp_bias={self.mlp_bias})."
            )

    # ------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        """The published architecture of ``name`` (see ``PRESETS``), with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        # mlp_only_layers stays a tuple: ml_collections overrides tuples from the command
        # line (--config.model.mlp_only_layers='(1, 3)'), not lists; JSON writes a list.
        return {**super().to_dict(), "rope_scaling": self.rope_scaling_dict}


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; supported: {', '.join(map(str, choices))}.")


def _pythia(layers: int, hidden: int, heads: int, vocab: int = 50304) -> dict[str, Any]:
    # Every Pythia hub config: gelu (exact), rotary_pct 0.25, base 10000, 2048 positions,
    # eps 1e-5, parallel residual, untied embeddings, intermediate = 4 * hidden.
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        hidden_act="gelu",
        rotary_pct=0.25,
        rotary_emb_base=10000.0,
        max_position_embeddings=2048,
        layer_norm_eps=1e-5,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    )


# The size table. Sources: the config.json of each model on the Hugging Face hub,
# https://huggingface.co/EleutherAI/<name>/blob/main/config.json, which agree with the
# Pythia README table (github.com/EleutherAI/pythia) and, for the 20B, with gpt-neox's
# configs/20B.yml and arXiv:2204.06745 (Table 1). Parameter counts are checked in
# tests/test_model.py against the published figures.
PRESETS: dict[str, dict[str, Any]] = {
    "pythia-14m": _pythia(6, 128, 4),  # EleutherAI/pythia-14m
    "pythia-31m": _pythia(6, 256, 8),  # EleutherAI/pythia-31m
    "pythia-70m": _pythia(6, 512, 8),  # EleutherAI/pythia-70m: 70,426,624 params
    "pythia-160m": _pythia(12, 768, 12),  # EleutherAI/pythia-160m: 162,322,944
    "pythia-410m": _pythia(24, 1024, 16),  # EleutherAI/pythia-410m: 405,334,016
    "pythia-1b": _pythia(16, 2048, 8),  # EleutherAI/pythia-1b: 1,011,781,632 (head 256)
    "pythia-1.4b": _pythia(24, 2048, 16),  # EleutherAI/pythia-1.4b: 1,414,647,808
    "pythia-2.8b": _pythia(32, 2560, 32),  # EleutherAI/pythia-2.8b: 2,775,208,960 (head 80)
    "pythia-6.9b": _pythia(32, 4096, 32, vocab=50432),  # EleutherAI/pythia-6.9b: 6,857,302,016
    "pythia-12b": _pythia(36, 5120, 40, vocab=50688),  # EleutherAI/pythia-12b: 11,846,072,320
    # EleutherAI/gpt-neox-20b: 44 layers, 6144 wide, 64 heads of 96, rotary on 24 dims,
    # hidden_act gelu_fast (a tanh approximation), vocab padded to 50432: 20,554,567,680.
    "neox-20b": {**_pythia(44, 6144, 64, vocab=50432), "hidden_act": "gelu_fast"},
    # A GPT-NeoX-architecture model of GPT-3 175B's shape, for pod-scale plans
    # (experiments/aot): 96 layers, d_model 12288, 96 heads of 128, d_ff = 4 * d_model,
    # 2048 context (Brown et al. 2020, arXiv:2005.14165, Table 2.1), with the 20B's
    # rotary, parallel residual, untied embeddings and padded 50432 vocabulary.
    # No such checkpoint exists: 175,200,952,320 parameters (tests/test_model.py).
    "neox-175b": {**_pythia(96, 12288, 96, vocab=50432), "hidden_act": "gelu_fast"},
    # Llama, Qwen2.5, Qwen3 and Mistral shapes, each citing its source there.
    **FAMILY_PRESETS,
    # Qwen3-MoE and Mixtral, each citing its source there.
    **MOE_PRESETS,
}
