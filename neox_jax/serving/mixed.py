"""Prefill mixed into decode calls: a waiting prompt's chunk rides in the decode step.

A decode step of ``N`` slots multiplies ``N`` rows by every weight of the model; ``C``
more rows in the same products cost less than a call of their own, which reads every
weight again and pays the call (the scheduling of Sarathi-Serve and vLLM's chunked
prefill). Measured at pythia-70m on CPU (experiments/serving/README.md, fifth session):
a 64-token chunk adds ~12 CPU-ms to a 16-slot decode step, ~42 ms as a
``slots.prefill_chunk`` call; about what a bucketed prefill of the same tokens costs,
so short prompts keep theirs. Here one device call runs one decode step of the running
slots and one ``C``-token chunk of a long prompt being prefilled in chunks into its
(not yet running) slot:

* every product of a layer (``inference.fused``'s two) runs on the ``N`` decode tokens
  and the ``C`` chunk tokens as one ``[1, N + C]`` row of tokens;
* attention is split (``_split_attention``): the decode tokens over their slots' cache
  rows exactly as ``slot_forward`` runs them (new keys at a scratch column, moved by
  ``settle``), the chunk over its slot's row as ``slots.prefill_chunk`` runs it (its
  keys/values written into the row, then attended to with the columns before them);
* the output head runs on the decode tokens only (the chunk's logits are never used:
  the prompt's last token goes through the first decode step, as everywhere).

So every request sees the keys, values and positions it would see with the chunk in a
call of its own, and greedy tokens equal ``Generator.generate``'s (the products' row
counts differ, so logits may differ in the last bits, as for any batch). Only for the
fused CPU layers (``mixable``); elsewhere the engine prefills chunks in calls of their
own. The scheduling is the engine's (``Engine._step``, ``admission.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from neox_jax.inference import fused, step
from neox_jax.inference.fused import FUSED_LAYERS
from neox_jax.inference.generate import RUNNING
from neox_jax.inference.sampling import SamplingMode
from neox_jax.inference.step import logits_of
from neox_jax.model import ModelConfig, embed_tokens, prepare_inputs
from neox_jax.model.layers import attend, cached_attention
from neox_jax.serving import slots as dev
from neox_jax.serving.slot_forward import batched, settle

Array = jax.Array


def mixable(config: ModelConfig, params) -> bool:
    """Whether ``generate`` can run this model: ``inference.fused`` layers (on one CPU
    device, ``step.split_params``), a full (not sliding-window) cache, and rotary
    frequencies that do not depend on the call's positions (dynamic NTK scaling reads
    their maximum, which mixing would change)."""
    scaling = (config.rope_scaling_dict or {}).get("type")
    return FUSED_LAYERS in params and config.sliding_window is None and scaling != "dynamic"


def _chunk_info(cache: dict, slot: Array, tokens: Array, start: Array, length: Array):
    """The chunk's inputs as ``slots.prefill_chunk`` builds them: ``(positions [1, C],
    segment_ids [1, C], cache info)``; the info holds its ``slot``, its first column
    ``index`` and the slot's ``[1, S]`` segment ids with the chunk's written (the row's
    old ones cleared at the prompt's first chunk)."""
    positions = start + jnp.arange(tokens.shape[0], dtype=jnp.int32)
    segment_ids = (positions < length - 1).astype(jnp.int32)[None]  # [1, C]
    seg_row = jax.lax.dynamic_slice_in_dim(cache["segment_ids"], slot, 1, axis=0)
    seg_row = jnp.where(start == 0, jnp.zeros_like(seg_row), seg_row)
    seg_row = jax.lax.dynamic_update_slice(seg_row, segment_ids, (0, start))
    return positions[None], segment_ids, {"slot": slot, "index": start, "segment_ids": seg_row}


def _split_attention(decode: int, config, q, k, v, layer_cache, segment_ids, cache_info):
    """``cached_attention`` of a ``[1, N + C]`` token row: the first ``decode`` tokens
    one per slot over the slots' cache (``cache_info[0]``), the rest as one chunk over
    its slot's row of the same buffers (``cache_info[1]``, ``_chunk_info``'s).

    The chunk's keys/values go into its row after the decode tokens' write, and its
    queries read the row after both: every write is in place (reading a row of the
    buffers before the decode write made XLA copy every layer's cache each call).
    Returns ``(out [1, N + C, H, D], new layer cache)``."""
    slots_info, chunk_info = cache_info
    one_per_row = lambda t: t[0, :decode][:, None]  # noqa: E731 ([N, 1, ...])
    chunk = lambda t: t[:, decode:]  # noqa: E731 ([1, C, ...])
    out_d, new = cached_attention(
        config, *map(one_per_row, (q, k, v)), layer_cache, one_per_row(segment_ids), slots_info
    )
    slot, start = chunk_info["slot"], chunk_info["index"]

    def write(buf, t):  # buf [N, KV, S, D], t [1, C, KV, D]
        return jax.lax.dynamic_update_slice(
            buf, t.swapaxes(1, 2).astype(buf.dtype), (slot, 0, start, 0)
        )

    new = {n: write(new[n], chunk(t)) for n, t in (("k", k), ("v", v))}
    row = {n: jax.lax.dynamic_slice_in_dim(new[n], slot, 1, axis=0) for n in ("k", "v")}
    out_c = attend(
        config, chunk(q), row["k"].astype(q.dtype), row["v"].astype(q.dtype), chunk(segment_ids),
        chunk_info["segment_ids"], q_offset=start, cached=True, length=start + q.shape[1] - decode,
    )  # fmt: skip
    return jnp.concatenate([out_d[:, 0][None], out_c], axis=1), new


def mixed_forward(config: ModelConfig, params, state, column, chunk_tokens, chunk_inputs):
    """``slot_forward`` (batched form: new keys at scratch ``column``) of one token per
    slot, with ``chunk_tokens [C]`` (inputs from ``_chunk_info``) in the same products,
    written into their slot's row.

    Returns ``(logits [N, V] fp32, new cache (index unchanged))``."""
    c = state.cache
    slots = state.last.shape[0]
    running = (state.finish == RUNNING).astype(jnp.int32)[:, None]  # [N, 1]
    positions, segment_ids, chunk_info = chunk_inputs
    slots_cache = {"k": c["k"], "v": c["v"], "segment_ids": c["segment_ids"], "index": column}
    _, _, slots_info = prepare_inputs(
        state.last[:, None], state.positions[:, None], running, slots_cache
    )
    tokens = jnp.concatenate([state.last, chunk_tokens])[None]  # [1, N + C]
    all_positions = jnp.concatenate([state.positions[None], positions], axis=1)
    all_segments = jnp.concatenate([running.T, segment_ids], axis=1)
    attention = functools.partial(_split_attention, slots)
    x = embed_tokens(config, params, tokens)  # [1, N + C, E]
    new_k, new_v = [], []
    for i, weights in enumerate(params[FUSED_LAYERS]):
        x, written = fused.fused_block(
            config, weights, x, {"k": c["k"][i], "v": c["v"][i]}, all_positions,
            all_segments, (slots_info, chunk_info), attention=attention,
        )  # fmt: skip
        new_k.append(written["k"])
        new_v.append(written["v"])
    logits = logits_of(config, params, x[0, :slots, None])[:, 0]  # [N, V]
    seg = jax.lax.dynamic_update_slice(
        slots_info["segment_ids"], chunk_info["segment_ids"], (chunk_info["slot"], 0)
    )
    return logits, {"k": tuple(new_k), "v": tuple(new_v), "segment_ids": seg, "index": c["index"]}


_GENERATE_JIT = dict(static_argnames=("config", "mode", "active"), donate_argnames=("state",))


def generate_program(params):
    """``generate``, compiled with XLA's own dots for input-major weights
    (``step.program_for``), as ``slots.generate_program``."""
    return step.program_for(params, generate, **_GENERATE_JIT)


@functools.partial(jax.jit, **_GENERATE_JIT)
def generate(
    config: ModelConfig,
    params,
    state: dev.SlotState,
    slot: Array,
    tokens: Array,
    start: Array,
    length: Array,
    *,
    mode: SamplingMode,
    active: int | None = None,
) -> tuple[dev.SlotState, dev.StepOutput]:
    """One decode step of every RUNNING slot (``slots.generate`` with ``steps=1``, no
    logprobs) and, in the same products, one prompt chunk into ``slot``
    (``slots.prefill_chunk``'s arguments: ``tokens [C]`` at prompt positions ``start
    ..``, the prompt ``length`` tokens long; the slot stays FREE until ``activate``).

    ``active``: compute only slots ``0 .. active - 1`` (``slots.generate``'s); the
    chunk's ``slot`` must be one of them (the caller picks ``active`` so). Returns the
    new state and a ``StepOutput`` with a leading ``[1]`` step axis, as
    ``slots.generate``'s."""
    if not batched(config, state.cache):
        raise ValueError("mixed prefill needs the per-layer cache of a full-attention model.")
    first = state.cache["segment_ids"].shape[1] - state.scratch  # a scratch column
    partial = active is not None and active < state.last.shape[0]
    head = jax.tree.map(lambda x: x[:active], state) if partial else state

    def forward(config, params, s):
        chunk_inputs = _chunk_info(s.cache, slot, tokens, start, length)
        return mixed_forward(config, params, s, first, tokens, chunk_inputs)

    def body(carry):
        s, i, _ = carry
        s, out = dev._one_step(config, params, s, mode, 0, forward=forward)
        return s, i + 1, out

    # The step runs as a while loop of one iteration, as ``slots.generate``'s steps do:
    # straight-line, XLA:CPU copied every cache buffer twice per call (the donated
    # inputs before their in-place writes); carried through a loop it writes in place.
    # The trip count is traced (1 for any start >= 0) so XLA keeps the loop.
    once = (start >= 0).astype(jnp.int32)
    shapes = jax.eval_shape(lambda s: dev._one_step(config, params, s, mode, 0, forward)[1], head)
    outs = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    index, ran = head.cache["index"], head.steps
    new, _, out = jax.lax.while_loop(lambda c: c[1] < once, body, (head, jnp.int32(0), outs))
    # The chunk's slot is not RUNNING: settle leaves its columns as the chunk wrote them.
    new = new.replace(cache=settle(config, new.cache, index, new.steps - ran, first, 1))
    if partial:
        new = jax.tree.map(lambda x, h: x.at[:active].set(h), state, new)
    return new, jax.tree.map(lambda x: x[None], out)
