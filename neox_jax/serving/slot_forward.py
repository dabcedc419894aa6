"""The model step of the decode slots: one token per slot, each slot at its own cache
position (``slots.generate`` runs it every step, ``settle`` after each call).

Two forms, the same tokens:

* batched (the default): ``inference.step.forward`` on all ``N`` slots as one batch,
  exactly as ``Generator``'s decode loop runs it. The model's cache index is one scalar
  for the batch, so at step ``i`` of a call every slot writes its new key/value at the
  shared scratch column ``first + i`` (the state's last ``scratch`` columns, which no
  request's tokens occupy), with segment id 1 where the slot runs. A decode query may
  see every column up to its own whose segment id is set: its prompt and earlier
  outputs in its own columns, this call's earlier outputs in the scratch columns
  before it, and itself (the order of keys does not matter to attention; rotary
  positions were applied before caching). After the call ``settle`` moves each slot's
  new keys/values from the scratch columns into its own (one scatter per layer per
  call) and clears the scratch columns' segment ids.
* vmapped: ``step.forward`` on each slot as a batch of one under ``jax.vmap``, each
  writing at its own index. XLA:CPU compiles it worse: at 16 slots it transposes and
  copies every layer's K cache each step (12 x 6.3 MB at pythia-70m with 192 columns;
  ~17% more CPU per step than ``Generator``'s loop, measured on a quiet machine), and a
  per-step move out of a single scratch column made it copy every cache buffer each
  step instead. It runs only where the batched form would be wrong: a sliding-window
  model (the window is relative to the query's column), and the pipeline's stacked
  cache (not written for it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from neox_jax.inference import step
from neox_jax.inference.generate import RUNNING
from neox_jax.model import ModelConfig

Array = jax.Array


def decode_config(config: ModelConfig) -> ModelConfig:
    """The config the vmapped decode step runs: mixture-of-experts layers computed by
    ``moe_impl="capacity"`` instead of ``ragged`` (``jax.lax.ragged_dot`` has no batching
    rule for a per-slot batch). With one token per slot every expert takes at most one
    pair, so nothing is dropped (capacity >= 1): the same experts and weights, the same
    tokens. It computes every expert on a zero row where ``ragged`` skips it."""
    if config.is_moe and config.moe_impl == "ragged":
        return config.replace(moe_impl="capacity")
    return config


def slot_forward(config: ModelConfig, params, state, column):
    """``step.forward`` of one token per slot (``state``: a ``slots.SlotState``); RUNNING
    slots' new keys/values go to scratch ``column`` (batched form, see above; ``settle``
    moves them after the call) or straight to their own ``index`` (vmapped form). Other
    slots write nothing a request reads (segment id 0), so a slot whose prompt is being
    prefilled in chunks keeps its columns intact.

    Returns ``(logits [N, V] fp32, new cache)``; the cache's ``index`` is unchanged."""
    if not batched(config, state.cache):
        return _vmapped(config, params, state)
    c = state.cache
    running = state.finish == RUNNING
    cache = {"k": c["k"], "v": c["v"], "segment_ids": c["segment_ids"], "index": column}
    logits, new = step.forward(
        config, params, state.last[:, None], state.positions[:, None],
        running.astype(jnp.int32)[:, None], cache,
    )  # fmt: skip
    return logits, {**new, "index": c["index"]}


def batched(config: ModelConfig, cache: dict) -> bool:
    """Whether ``slot_forward`` runs the batched form (else the vmapped one)."""
    return not _stacked(cache) and config.sliding_window is None


def settle(config: ModelConfig, cache: dict, index: Array, ran: Array, first: int, steps: int):
    """After a batched call of up to ``steps`` steps: slot ``r``'s keys/values of the
    ``ran[r]`` steps it ran, in scratch columns ``first .. first + ran[r] - 1``, go to
    its columns ``index[r] ..`` (``index``: its write index at the call's start), marked
    segment 1; the scratch columns' segment ids go back to 0. The vmapped form wrote in
    place: the cache is returned as it is."""
    if not batched(config, cache):
        return cache
    slots = index.shape[0]
    j = jnp.arange(steps)[None, :]  # [1, K]
    done = j < ran[:, None]  # [N, K]
    # Columns not run map onto themselves (scratch), so the scatter leaves them be.
    target = jnp.where(done, index[:, None] + j, first + j)  # [N, K]
    rows = jnp.arange(slots)[:, None]

    def move(buf):  # [N, KV, S, D]; buf[rows, :, target] is [N, K, KV, D]
        return buf.at[rows, :, target].set(buf[:, :, first : first + steps].swapaxes(1, 2))

    seg = cache["segment_ids"].at[:, first:].set(0)
    seg = seg.at[rows, target].set(done.astype(seg.dtype))
    return {
        **cache,
        "k": tuple(map(move, cache["k"])),
        "v": tuple(map(move, cache["v"])),
        "segment_ids": seg,
    }


def _stacked(cache: dict) -> bool:
    """Whether the cache is the pipeline's stacked ``[L, N, KV, S, D]`` layout."""
    return not isinstance(cache["k"], tuple | list)


def _vmapped(config: ModelConfig, params, state):
    """``slot_forward`` with each slot a batch of one under ``jax.vmap`` (each writes at
    its own index; non-running slots at the scratch column). With the pipeline's
    stacked cache each slot goes through the stages as a pipeline of one microbatch,
    all slots at once."""
    max_len = state.cache["segment_ids"].shape[1]
    running = state.finish == RUNNING
    stacked = _stacked(state.cache)
    config = decode_config(config)
    batch = (lambda a: a[:, None]) if stacked else (lambda t: tuple(x[None] for x in t))
    unbatch = (lambda a: a[:, 0]) if stacked else (lambda t: tuple(x[0] for x in t))

    def one(last, position, k, v, segment_ids, index, live):
        cache = {
            "k": batch(k),  # [L, 1, KV, S, D] or per layer [1, KV, S, D]
            "v": batch(v),
            "segment_ids": segment_ids[None],
            "index": jnp.where(live, index, max_len - 1),
        }
        segment = live.astype(jnp.int32).reshape(1, 1)
        logits, cache = step.forward(
            config, params, last.reshape(1, 1), position.reshape(1, 1), segment, cache,
            pipeline=int(stacked),
        )  # fmt: skip
        return logits[0], unbatch(cache["k"]), unbatch(cache["v"]), cache["segment_ids"][0]

    c = state.cache
    kv = 1 if stacked else 0  # the slot axis of the k/v buffers
    logits, k, v, seg = jax.vmap(one, in_axes=(0, 0, kv, kv, 0, 0, 0), out_axes=(0, kv, kv, 0))(
        state.last, state.positions, c["k"], c["v"], c["segment_ids"], c["index"], running
    )
    return logits, {"k": k, "v": v, "segment_ids": seg, "index": c["index"]}
