"""LoRA (Hu et al. 2021, arXiv:2106.09685): low-rank adapters on the block's linear layers.

A target ``Linear`` with kernel ``W [in, out]`` computes ``x @ W + b + s * drop(x) @ A @ B``
with ``A [in, r]``, ``B [r, out]`` and ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA,
Kalajdzievski 2023). ``B`` starts at zero, so the adapted model starts as the base model.

Adapters are their own parameter tree, shaped like the slice of the model they adapt::

    layers/attention/query_key_value/{lora_a [L, E, r], lora_b [L, r, 3E]}
    layers/attention/dense/{lora_a [L, E, r], lora_b [L, r, E]}
    layers/mlp/dense_h_to_4h/{lora_a [L, E, r], lora_b [L, r, F]}
    layers/mlp/dense_4h_to_h/{lora_a [L, F, r], lora_b [L, r, E]}

Training differentiates only this tree; the base parameters ride along as
``TrainState.frozen`` (no gradient, no optimizer state). ``attach`` puts a
``LoraAdapter`` beside each target kernel (key ``lora``) for one forward pass, and
``neox_jax.model.layers.Linear`` adds its output. ``A`` takes the kernel's input axis
name and ``B`` its output axis name (the rank axis is ``lora_rank``, never sharded), so
adapters shard like the weights they adapt.

Target names follow PEFT's module names for ``GPTNeoXForCausalLM``, where ``dense`` is
``attention.dense`` (PEFT matches a name as a suffix after a dot, and the MLP layers are
``dense_h_to_4h`` / ``dense_4h_to_h``), and for the Llama/Mistral/Qwen classes
(``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``,
``down_proj``; see ``model_targets``). A mixture of experts adapts its experts with
``experts.gate_proj``, ``experts.up_proj`` and ``experts.down_proj``: one adapter per
expert, ``lora_a [L, X, in, r]`` and ``lora_b [L, X, r, out]`` under
``layers/moe/experts/<name>`` (``neox_jax.model.moe.ExpertKernel`` applies them inside
the grouped matmuls; adapter dropout is not implemented there).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from neox_jax.errors import UserError
from neox_jax.model import GPTNeoX, ModelConfig, abstract_params, axes, param_logical_axes

Array = jax.Array

# Target name (PEFT's module name) -> path of the Linear under params["layers"]. GPT-NeoX
# names first; then the Llama/Mistral/Qwen names, whose o_proj is our attention.dense.
TARGETS = {
    "query_key_value": ("attention", "query_key_value"),
    "dense": ("attention", "dense"),
    "dense_h_to_4h": ("mlp", "dense_h_to_4h"),
    "dense_4h_to_h": ("mlp", "dense_4h_to_h"),
    "q_proj": ("attention", "q_proj"),
    "k_proj": ("attention", "k_proj"),
    "v_proj": ("attention", "v_proj"),
    "o_proj": ("attention", "dense"),
    "gate_proj": ("mlp", "gate_proj"),
    "up_proj": ("mlp", "up_proj"),
    "down_proj": ("mlp", "down_proj"),
    # Every expert of a mixture of experts (transformers' mlp.experts.{j}.gate_proj ...).
    "experts.gate_proj": ("moe", "experts", "gate_proj"),
    "experts.up_proj": ("moe", "experts", "up_proj"),
    "experts.down_proj": ("moe", "experts", "down_proj"),
}
EXPERT_TARGETS = ("experts.gate_proj", "experts.up_proj", "experts.down_proj")
INITS = ("kaiming", "gaussian")


class LoraError(UserError):
    """A LoRA setting or adapter that cannot be used; the message says why and how to fix it."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how.

    Attributes:
      targets: module names from ``TARGETS`` (``attention.dense`` / ``mlp.dense_h_to_4h``
        spellings are accepted too).
      rank: r, at most the smaller side of every adapted kernel.
      alpha: the scale numerator; the update is ``alpha / r * A @ B``.
      dropout: dropout on the adapter's input during training (PEFT's ``lora_dropout``).
      init: "kaiming" (PEFT's default: A ~ U(-1/sqrt(in), 1/sqrt(in)), i.e. torch's
        ``kaiming_uniform_(a=sqrt(5))``) or "gaussian" (A ~ N(0, 1/r)); B is zero either way.
      rslora: scale by ``alpha / sqrt(r)`` (PEFT's ``use_rslora``).
    """

    targets: tuple[str, ...] = ("query_key_value", "dense")
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    init: str = "kaiming"
    rslora: bool = False

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(_split(self.targets)))
        names = tuple(dict.fromkeys(canonical_target(t) for t in self.targets))
        object.__setattr__(self, "targets", names)
        if not names:
            raise LoraError(f"lora.targets is empty; choose from {', '.join(TARGETS)}.")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise LoraError(f"lora.rank must be a positive integer, got {self.rank!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"lora.dropout must lie in [0, 1), got {self.dropout}.")
        if self.init not in INITS:
            raise LoraError(f"Unknown lora.init {self.init!r}; choose from {', '.join(INITS)}.")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @classmethod
    def from_config(cls, c, model: ModelConfig | None = None) -> LoraConfig:
        """From the ``lora`` section of ``configs/finetune.py``; with ``model``, the
        group names of ``TARGET_GROUPS`` in ``targets`` become that model's layers."""
        fields = {f.name: c[f.name] for f in dataclasses.fields(cls)}
        fields["targets"] = expand_target_groups(fields["targets"], model)
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# Names that stand for a model's own layers, whatever its family calls them, so one
# command (configs/finetune.py's default, "attention") fine-tunes any family.
TARGET_GROUPS = ("attention", "mlp", "all")


def expand_target_groups(targets, model: ModelConfig | None) -> tuple[str, ...] | str:
    """``targets`` with each of ``TARGET_GROUPS`` replaced by ``model``'s layers:
    ``attention`` its q/k/v (fused or not) and output projections, ``mlp`` its MLP (or
    expert) projections, ``all`` both; other names are kept as given."""
    names = _split(targets) if isinstance(targets, str) else list(targets)
    if not set(names) & set(TARGET_GROUPS):
        return targets
    if model is None:
        raise LoraError(f"lora.targets {names} names layer groups; they need the model.")
    attention, mlp = _attention_and_mlp_targets(model)
    groups = {"attention": attention, "mlp": mlp, "all": (*attention, *mlp)}
    return tuple(t for name in names for t in groups.get(name, (name,)))


def canonical_target(name: str) -> str:
    """``"attention.dense"`` -> ``"dense"``, ``"self_attn.q_proj"`` -> ``"q_proj"``;
    unknown names raise naming the valid ones."""
    for key, path in TARGETS.items():
        if name in (key, ".".join(path), f"self_attn.{key}", f"mlp.{key}"):
            return key
    raise LoraError(
        f"LoRA target {name!r} matches no linear layer; valid targets: "
        f"{', '.join(list(TARGETS)[:4])} (GPT-NeoX; dense is attention.dense); "
        f"{', '.join(list(TARGETS)[4:11])} (Llama/Mistral/Qwen); "
        f"{', '.join(EXPERT_TARGETS)} (mixture-of-experts models)."
    )


def model_targets(config: ModelConfig) -> tuple[str, ...]:
    """The target names of ``config``'s linear layers, as PEFT spells them for its
    Hugging Face class (GPT-NeoX's, or the Llama-style families')."""
    attention, mlp = _attention_and_mlp_targets(config)
    return (*attention, *mlp)


def _attention_and_mlp_targets(config: ModelConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    neox = config.model_type == "gpt_neox"
    attn = ("query_key_value",) if config.fused_qkv else ("q_proj", "k_proj", "v_proj")
    mlp = ("gate_proj", "up_proj", "down_proj") if config.gated_mlp else TARGETS_NEOX_MLP
    if config.is_moe:  # the experts (a mixed stack's few dense MLPs are not offered)
        mlp = EXPERT_TARGETS
    return (*attn, "dense" if neox else "o_proj"), mlp


def _node(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _with_node(tree: dict, path, fn) -> dict:
    """A copy of ``tree`` (dicts copied along ``path`` only) with ``fn(node)`` at ``path``."""
    if not path:
        return fn(tree)
    return {**tree, path[0]: _with_node(tree[path[0]], path[1:], fn)}


def _set_node(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


TARGETS_NEOX_MLP = ("dense_h_to_4h", "dense_4h_to_h")


def target_shapes(config: ModelConfig, lora: LoraConfig) -> dict[str, tuple[int, int]]:
    """``{target: (in, out)}`` of each adapted kernel, checking that the model has it
    and that the rank fits."""
    kernels = abstract_params(config)["layers"]
    valid = model_targets(config)
    wrong = [t for t in lora.targets if t not in valid]
    if wrong:
        raise LoraError(
            f"LoRA targets {wrong} are not layers of this {config.model_type} model; its "
            f"targets are {', '.join(valid)}."
        )
    if lora.dropout > 0 and set(lora.targets) & set(EXPERT_TARGETS):
        raise LoraError(
            f"lora.dropout={lora.dropout} is not implemented for the expert targets "
            f"{', '.join(EXPERT_TARGETS)}; set lora.dropout=0 or adapt other layers."
        )
    out = {}
    for t in lora.targets:
        d_in, d_out = _node(kernels, TARGETS[t])["kernel"].shape[-2:]
        if lora.rank > min(d_in, d_out):
            raise LoraError(
                f"lora.rank={lora.rank} exceeds the smaller side of {'.'.join(TARGETS[t])} "
                f"([{d_in}, {d_out}]); a rank above min(in, out) adds parameters but no "
                f"expressiveness. Use lora.rank <= {min(d_in, d_out)}."
            )
        out[t] = (d_in, d_out)
    return out


# ------------------------------------------------------------------ parameters
def init_adapters(config: ModelConfig, lora: LoraConfig, rng: Array) -> dict[str, Any]:
    """Fresh adapters: A as PEFT initialises it, B = 0 (so the model starts as the base)."""
    tree: dict[str, Any] = {}
    for i, (t, (d_in, d_out)) in enumerate(target_shapes(config, lora).items()):
        key = jax.random.fold_in(rng, i)
        lead = _lead(config, t)  # [L] or, per expert, [L, X]
        if lora.init == "kaiming":
            # torch kaiming_uniform_(a=sqrt(5)) on lora_A.weight [r, in]: bound 1/sqrt(in).
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(key, (*lead, d_in, lora.rank), jnp.float32, -bound, bound)
        else:
            a = jax.random.normal(key, (*lead, d_in, lora.rank), jnp.float32) / lora.rank
        b = jnp.zeros((*lead, lora.rank, d_out), jnp.float32)
        _set_node(tree, TARGETS[t], {"lora_a": a, "lora_b": b})
    return {"layers": tree}


def _lead(config: ModelConfig, target: str) -> tuple[int, ...]:
    """The stacked axes in front of a target's ``[in, out]`` kernel: layers (and experts)."""
    if target in EXPERT_TARGETS:
        return (config.num_hidden_layers, config.num_experts)
    return (config.num_hidden_layers,)


def abstract_adapters(config: ModelConfig, lora: LoraConfig) -> dict[str, Any]:
    """Adapter shapes as ``jax.ShapeDtypeStruct`` (nothing allocated)."""
    return jax.eval_shape(lambda: init_adapters(config, lora, jax.random.key(0)))


def adapter_logical_axes(config: ModelConfig, lora: LoraConfig) -> dict[str, Any]:
    """Logical names: A takes the kernel's (layers, in), B its out axis; the rank is unsharded."""
    kernel_axes = param_logical_axes(config)["layers"]
    tree: dict[str, Any] = {}
    for t in lora.targets:
        *lead, in_ax, out_ax = tuple(_node(kernel_axes, TARGETS[t])["kernel"])
        specs = {
            "lora_a": PartitionSpec(*lead, in_ax, axes.RANK),
            "lora_b": PartitionSpec(*lead, axes.RANK, out_ax),
        }
        _set_node(tree, TARGETS[t], specs)
    return {"layers": tree}


def trainable_fraction(config: ModelConfig, lora: LoraConfig) -> tuple[int, int, float]:
    """``(adapter params, base params, adapter / base)`` from shapes alone (``eval_shape``)."""
    size = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))  # noqa: E731
    n_lora, n_base = size(abstract_adapters(config, lora)), size(abstract_params(config))
    return n_lora, n_base, n_lora / n_base


# --------------------------------------------------------------------- forward
@flax.struct.dataclass
class LoraAdapter:
    """One adapted ``Linear``'s adapter, placed under its ``lora`` key by ``attach``.

    ``nn.scan`` slices the array leaves per layer, so inside a block ``a`` is ``[in, r]``
    and ``b`` is ``[r, out]``.
    """

    a: Array
    b: Array
    scale: float = flax.struct.field(pytree_node=False)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)

    def __call__(self, x: Array, dtype, rng: Array | None = None) -> Array:
        """``scale * drop(x) @ a @ b`` for ``x [..., in]``; dropout only when ``rng`` is given."""
        if rng is not None and self.dropout > 0:
            keep = jax.random.bernoulli(rng, 1 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1 - self.dropout), 0).astype(x.dtype)
        h = jnp.dot(x.astype(dtype), self.a.astype(dtype))  # [..., r]
        return jnp.dot(h, self.b.astype(dtype)) * jnp.asarray(self.scale, dtype)  # [..., out]


def attach(base: dict[str, Any], adapters: dict[str, Any], lora: LoraConfig) -> dict[str, Any]:
    """The base tree with a ``LoraAdapter`` beside every adapted kernel (dicts copied, not arrays).

    Args:
      base: model parameters (float or ``neox_jax.quant`` quantized kernels).
      adapters: ``init_adapters``-shaped tree.
      lora: its config (scale, dropout).

    Returns:
      A parameter tree for ``GPTNeoX.apply``.
    """
    layers = base["layers"]
    for t in lora.targets:
        ad = _node(adapters["layers"], TARGETS[t])
        adapter = LoraAdapter(ad["lora_a"], ad["lora_b"], lora.scale, lora.dropout)
        layers = _with_node(layers, TARGETS[t], lambda node, a=adapter: {**node, "lora": a})
    return {**base, "layers": layers}


def lora_apply_fn(config: ModelConfig, lora: LoraConfig, *, deterministic: bool = False):
    """The trainer's ``apply_fn(adapters, frozen_base, inputs, positions, segment_ids, rng)``.

    ``deterministic=True`` (evaluation) switches adapter dropout off. The dropout key is
    the "dropout" stream, which the layer scan splits per layer.
    """
    model = GPTNeoX(config)
    use_dropout = lora.dropout > 0 and not deterministic

    def apply(adapters, frozen, inputs, positions, segment_ids, rng):
        params = attach(frozen, adapters, lora)
        rngs = {"dropout": rng} if use_dropout else None
        return model.apply({"params": params}, inputs, positions, segment_ids, rngs=rngs)

    return apply


# ----------------------------------------------------------------------- merge
def merge(base: dict[str, Any], adapters: dict[str, Any], lora: LoraConfig) -> dict[str, Any]:
    """Base parameters with ``W + scale * A @ B`` folded into every adapted kernel.

    A quantized base kernel is dequantized first (the sum is not representable on the
    quantization grid), so the result is a float tree (float32 for such kernels).

    Args:
      base: model parameters (float or quantized kernels).
      adapters: ``init_adapters``-shaped tree.
      lora: the adapters' config (targets, scale).

    Returns:
      A parameter tree of the plain model (no ``lora`` entries), for ``GPTNeoX.apply``,
      ``save_hf`` or the ``Generator``.
    """
    out = attach(base, adapters, lora)  # copies the dicts along the way

    def fold(node):
        node = dict(node)
        adapter = node.pop("lora")
        kernel = node["kernel"]
        if hasattr(kernel, "dequantize"):
            kernel = kernel.dequantize(jnp.float32)
        delta = jnp.einsum("...ir,...ro->...io", adapter.a, adapter.b, precision="highest")
        node["kernel"] = (kernel.astype(jnp.float32) + lora.scale * delta).astype(
            jnp.dtype(kernel.dtype)
        )
        return node

    layers = out["layers"]
    for t in lora.targets:
        layers = _with_node(layers, TARGETS[t], fold)
    return {**out, "layers": layers}
