"""Logical axis names: the only vocabulary the model uses to describe sharding.

The model annotates every parameter (``nn.with_logical_partitioning``) and key
activations (``nn.with_logical_constraint``) with these names. One rules table
in ``neox_jax.parallel.rules`` maps them onto mesh axes, so changing the
parallel layout is a config change and never a model edit.
"""

# Parameters.
VOCAB = "vocab"  # vocabulary rows of the input/output embedding
EMBED = "embed"  # the model (residual stream) dimension
HEADS = "heads"  # heads * head_dim, fused (q|k|v per head for the QKV projection)
KV_HEADS = "kv_heads"  # kv_heads * head_dim of the separate k/v projections (GQA)
MLP = "mlp"  # the 4h dimension of the MLP
LAYERS = "layers"  # the stacked layer axis added by nn.scan
NORM = "norm"  # LayerNorm scale/bias (never worth sharding)
EXPERT = "expert"  # the stacked experts of an MoE layer [experts, in, out]
ROUTER = "router"  # the router's output (one logit per expert; small, kept whole)

# Activations.
BATCH = "activation_batch"
LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_HEADS = "activation_heads"  # the head axis of [batch, length, heads, head_dim]
ACT_KV_HEADS = "activation_kv_heads"  # the head axis of k/v when fewer than query heads
ACT_KV = "activation_head_dim"
ACT_MLP = "activation_mlp"
ACT_VOCAB = "activation_vocab"
ACT_EXPERT = "activation_expert"  # the expert axis of [experts, capacity, embed] buffers

# KV cache [layers, batch, length, heads, head_dim].
CACHE_LAYERS = "cache_layers"
CACHE_BATCH = "cache_batch"
CACHE_LENGTH = "cache_length"
CACHE_HEADS = "cache_heads"
CACHE_KV = "cache_head_dim"

# Quantization scales and LoRA ranks, listed here so the rules table is complete.
RANK = "lora_rank"
GROUPS = "quant_groups"
