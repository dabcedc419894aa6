"""Prefill: prompts through the model into a ``Prefix`` that ``slots.insert`` puts in
a slot; one prompt (``prefill``), or several waiting ones in one call (``prefill_many``,
contiguous slots on one device).

A prefill costs about the same for one short prompt as for a few (on CPU the weights'
reads and the call itself dominate at these sizes), so when several requests are
admitted together the engine runs them as one batch at the largest of their buckets,
padded to ``min(max_prefills_per_step, num_slots)`` rows, and writes each row into its
slot, all in one ``insert_many`` call. A request's prefix is the same as from
``prefill`` alone (same positions, segment ids and seen tokens; batched matmuls
may differ in the last bits, as the decode step's do).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from neox_jax.inference import step
from neox_jax.inference.generate import seen_tokens
from neox_jax.model import ModelConfig
from neox_jax.serving import slots
from neox_jax.serving.slots import Prefix, SlotState

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("config", "pipeline"))
def prefill(
    config: ModelConfig, params, tokens: Array, length: Array, *, pipeline: bool = False
) -> Prefix:
    """Run one prompt, right-padded to its bucket.

    Args:
      config: the model config (static).
      params: model parameters (``step.split_params`` for fast CPU decoding).
      tokens: ``[P]`` int32, the prompt in ``tokens[:length]``, padding after it.
      length: scalar int32, the prompt's length ``n`` (1 <= n <= P).
      pipeline: run the layers as a pipeline over the mesh's ``stage`` axis (stacked
        params); the prefix's k/v are then stacked ``[L, 1, KV, P, D]``.
    """
    rows = prefix_rows(config, params, tokens[None], length[None], pipeline=pipeline)
    return rows.replace(seen=rows.seen[0], last=rows.last[0], position=rows.position[0])


def prefix_rows(
    config: ModelConfig, params, tokens: Array, lengths: Array, *, pipeline: bool = False
) -> Prefix:
    """``tokens [B, P]``, right-padded prompts of ``lengths [B]`` tokens, through the
    model: a ``Prefix`` whose fields have a leading ``[B]`` axis (per-layer k/v
    ``[B, KV, P, D]``, or stacked ``[L, B, KV, P, D]`` with ``pipeline``). Segment ids
    are 1 on each prompt minus its last token (fed by the first decode step)."""
    batch, plen = tokens.shape
    cols = jnp.broadcast_to(jnp.arange(plen, dtype=jnp.int32), (batch, plen))
    segment_ids = (cols < lengths[:, None] - 1).astype(jnp.int32)  # [B, P]
    _, cache = step.forward(
        config,
        params,
        tokens,
        cols,
        segment_ids,
        step.layer_cache(config, batch, plen, stacked=pipeline),
        compute_logits=False,
        pipeline=int(pipeline),
    )
    return Prefix(
        k=cache["k"],
        v=cache["v"],
        segment_ids=cache["segment_ids"],
        seen=seen_tokens(tokens, cols < lengths[:, None], config.vocab_size),  # [B, V]
        last=tokens[jnp.arange(batch), lengths - 1],
        position=lengths - 1,
    )


@functools.partial(jax.jit, static_argnames=("config",))
def prefill_many(config: ModelConfig, params, tokens: Array, lengths: Array) -> Prefix:
    """``tokens [B, P]`` right-padded prompts of ``lengths [B]`` tokens: one ``Prefix``
    whose fields have a leading ``[B]`` axis (per-layer k/v ``[B, KV, P, D]``)."""
    return prefix_rows(config, params, tokens, lengths)


@functools.partial(jax.jit, donate_argnames=("state",))
def insert_many(
    prefix: Prefix,
    state: SlotState,
    slot_ids: Array,
    knobs: dict,
    max_new: Array,
    eos_ids: Array,
    stop_ids: Array,
    keys: Array,
) -> SlotState:
    """Row ``b`` of ``prefix`` into slot ``slot_ids[b]`` with the ``[B]``-stacked
    arguments of ``slots.insert``; rows in order (a padding row repeating an earlier one
    writes the same again)."""
    for b in range(slot_ids.shape[0]):
        row = Prefix(
            k=tuple(x[b : b + 1] for x in prefix.k),
            v=tuple(x[b : b + 1] for x in prefix.v),
            segment_ids=prefix.segment_ids[b : b + 1],
            seen=prefix.seen[b],
            last=prefix.last[b],
            position=prefix.position[b],
        )
        state = slots.insert(
            row, state, slot_ids[b], {n: v[b] for n, v in knobs.items()}, max_new[b],
            eos_ids[b], stop_ids[b], keys[b],
        )  # fmt: skip
    return state
