"""Decode slots over a paged KV cache: the ``slots`` programs with the keys and values
kept in a pool of pages that every slot shares (``Engine(kv_cache="paged")``).

A contiguous slot cache reserves ``max_len`` columns per slot whether a request uses
them or not; here each layer's keys (and values) are one pool of ``num_pages`` pages of
``page_size`` tokens, and ``cache["pages"] [N, max_len / page_size]`` names the pages of
each slot in order (column ``j`` of slot ``b`` lives in page ``pages[b, j // page_size]``
at row ``j % page_size``). The host (``serving.paged.PagePool``) hands a request the
pages for its prompt plus ``max_tokens`` when it is admitted and takes them back when it
ends, so the pool holds as many requests as their real lengths allow
(experiments/serving/paged_capacity.py).

Page 0 is scratch, never given to a request: table entries past a request's pages point
at it, so every write a request does not own (prefill padding past its pages, the decode
step of a slot that is not running) lands there, and nothing ever reads it unmasked.

The decode step has two forms (``generate``'s ``attention``):

* ``"gather"`` (XLA, any device): per layer, every slot's pages are gathered into a
  ``max_len`` view (one layer's view exists at a time), the model's own ``Block`` runs
  on it exactly as on a contiguous slot row (same shapes, same masks, so the same
  numbers and greedy tokens as ``slots`` and ``Generator.generate``), and the one new
  key/value per slot is written back into its page. Every slot costs a full
  ``max_len`` row whether it runs or not.
* ``"kernel"`` / ``"interpret"``: the model's ``Block`` runs on all slots as one batch
  with ``model.paged_cache``'s ``cache_info``: each slot's new key/value goes into its
  page and the Pallas paged kernel (``kernels.paged_attention``, compiled for the
  device, or in the Pallas interpreter) reads only the pages below each slot's length.
  Online softmax page by page: the same tokens as the gather path up to fp32
  round-off in the attention sums. Segment ids, positions and everything else are
the ``slots`` state unchanged. Not supported here: a mesh (tensor / pipeline), where
the contiguous slots serve.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from neox_jax.inference import step
from neox_jax.inference.generate import RUNNING
from neox_jax.model import (
    ModelConfig,
    axes,
    block_fn,
    cache_logical_axes,
    embed_tokens,
)
from neox_jax.model.paged_cache import paged_info
from neox_jax.serving import slots
from neox_jax.serving.slot_forward import decode_config
from neox_jax.serving.slots import (  # noqa: F401 (the engine reaches them through here)
    GREEDY,
    SAMPLE,
    Prefix,
    SlotState,
    StepOutput,
    activate,
    release,
)

Array = jax.Array
SCRATCH = 0  # the page nobody owns


def _len_axis() -> int:
    """Axis of the token column in one layer's ``[B, ...]`` cache buffer (the cache's
    layout is the model's: ``[B, S, KV, D]`` or ``[B, KV, S, D]``)."""
    return tuple(cache_logical_axes()["k"]).index(axes.CACHE_LENGTH) - 1


def init_state(
    config: ModelConfig, num_slots: int, max_len: int, stop_width: int, num_pages: int,
    page_size: int,
) -> SlotState:  # fmt: skip
    """Empty slots over a pool of ``num_pages`` pages (+ the scratch page 0) per layer.

    The per-slot fields are ``slots.init_state``'s (its 2-column cache is dropped)."""
    state = slots.init_state(config, num_slots, 2, stop_width)
    one = step.layer_cache(config, num_pages + 1, page_size)  # pages shaped like slot rows
    cache = {
        "k": one["k"],
        "v": one["v"],
        "segment_ids": jnp.zeros((num_slots, max_len), jnp.int32),
        "index": jnp.zeros((num_slots,), jnp.int32),
        "pages": jnp.full((num_slots, max_len // page_size), SCRATCH, jnp.int32),
    }
    return state.replace(cache=cache)


def _page_size(state: SlotState) -> int:
    return state.cache["k"][0].shape[_len_axis()]  # a pool is laid out like slot rows


def _view(pool: Array, pages: Array) -> Array:
    """The pages ``[N, n]`` of a pool gathered into slot rows: ``[N, n * page, ...]`` in
    the cache's layout."""
    rows = pool[pages]  # [N, n, (page, KV) in layout order, D]
    ax = _len_axis() + 1  # the page-row axis within ``rows``
    rows = jnp.moveaxis(rows, 1, ax - 1)  # the page index just before the page rows
    shape = rows.shape[: ax - 1] + (rows.shape[ax - 1] * rows.shape[ax],) + rows.shape[ax + 1 :]
    return rows.reshape(shape)


def _tokens_first(row: Array) -> Array:
    """One slot row ``[S, KV, D]`` or ``[KV, S, D]`` -> ``[S, KV, D]``."""
    return jnp.moveaxis(row, _len_axis() - 1, 0)


def _write(pool: Array, page: Array, offset: Array, values: Array) -> Array:
    """``pool`` with ``values [T, KV, D]`` written at pages ``page [T]``, rows
    ``offset [T]`` (duplicate targets only ever hit the scratch page)."""
    values = values.astype(pool.dtype)
    if _len_axis() == 1:
        return pool.at[page, offset].set(values)
    return pool.at[page, :, offset].set(values)


def _targets(pages_row: Array, columns: Array, page_size: int) -> tuple[Array, Array]:
    """(page, row) of each column of one slot."""
    return pages_row[columns // page_size], columns % page_size


def _put_columns(state: SlotState, slot: Array, start, k: tuple, v: tuple) -> dict:
    """Write per-layer ``[T, KV, D]`` keys/values at ``slot``'s columns ``start ..``."""
    cache = state.cache
    ps = _page_size(state)
    length = k[0].shape[0]
    page, offset = _targets(cache["pages"][slot], start + jnp.arange(length), ps)
    put = lambda pool, x: _write(pool, page, offset, x)  # noqa: E731
    return dict(cache, k=tuple(map(put, cache["k"], k)), v=tuple(map(put, cache["v"], v)))


@functools.partial(jax.jit, donate_argnames=("state",))
def set_pages(state: SlotState, slot: Array, row: Array) -> SlotState:
    """Give ``slot`` the page-table row ``row`` (``[max_len / page_size]``; entries
    past its pages are ``SCRATCH``)."""
    cache = dict(state.cache, pages=state.cache["pages"].at[slot].set(row))
    return state.replace(cache=cache)


@functools.partial(jax.jit, donate_argnames=("state",))
def insert(prefix: Prefix, state, slot, knobs, max_new, eos_ids, stop_ids, key) -> SlotState:
    """``slots.insert`` into pages: the prefix's columns go to ``slot``'s pages."""
    max_len = state.cache["segment_ids"].shape[1]
    plen = prefix.segment_ids.shape[1]
    rows = lambda t: tuple(_tokens_first(x[0]) for x in t)  # noqa: E731
    cache = _put_columns(state, slot, 0, rows(prefix.k), rows(prefix.v))
    seg_row = jnp.zeros((max_len,), jnp.int32).at[:plen].set(prefix.segment_ids[0])
    cache["segment_ids"] = cache["segment_ids"].at[slot].set(seg_row)
    state = state.replace(cache=cache)
    return slots._activate(
        state, slot, prefix.last, prefix.position, prefix.seen, knobs, max_new, eos_ids,
        stop_ids, key,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def prefill_chunk(config: ModelConfig, params, state, slot, tokens, start, length) -> SlotState:
    """``slots.prefill_chunk`` over pages: the slot's pages are gathered into a row, the
    chunk runs on it, and its ``C`` columns are written back."""
    c = state.cache
    chunk = tokens.shape[0]
    positions = start + jnp.arange(chunk, dtype=jnp.int32)
    segment_ids = (positions < length - 1).astype(jnp.int32)[None]  # [1, C]
    pages = c["pages"][slot][None]  # [1, n]
    seg_row = c["segment_ids"][slot][None]
    row = {
        "k": tuple(_view(p, pages) for p in c["k"]),
        "v": tuple(_view(p, pages) for p in c["v"]),
        "segment_ids": jnp.where(start == 0, jnp.zeros_like(seg_row), seg_row),
        "index": start,
    }
    _, row = step.forward(
        config, params, tokens[None], positions[None], segment_ids, row, compute_logits=False
    )
    ax = _len_axis()
    cols = lambda t: tuple(  # noqa: E731
        _tokens_first(jax.lax.dynamic_slice_in_dim(x[0], start, chunk, axis=ax - 1)) for x in t
    )
    cache = _put_columns(state, slot, start, cols(row["k"]), cols(row["v"]))
    cache["segment_ids"] = c["segment_ids"].at[slot].set(row["segment_ids"][0])
    return state.replace(cache=cache)


@functools.partial(jax.jit, donate_argnames=("state",))
def put_block(state: SlotState, slot: Array, k: tuple, v: tuple, offset: Array) -> SlotState:
    """A cached prompt block (per-layer ``[C, KV, D]``, from ``get_block``) into
    ``slot``'s columns ``offset .. offset + C - 1``, marked as prompt (segment 1)."""
    size = k[0].shape[0]
    cache = _put_columns(state, slot, offset, k, v)
    cache["segment_ids"] = slots.block_segments(cache["segment_ids"], slot, offset, size)
    return state.replace(cache=cache)


@functools.partial(jax.jit, static_argnames=("size",))
def get_block(state: SlotState, slot: Array, offset: Array, *, size: int) -> tuple[tuple, tuple]:
    """Copies of ``slot``'s keys and values at columns ``offset .. offset + size - 1``:
    per-layer ``[size, KV, D]``."""
    ps = _page_size(state)
    page, row = _targets(state.cache["pages"][slot], offset + jnp.arange(size), ps)

    def get(pool):
        return pool[page, row] if _len_axis() == 1 else pool[page, :, row]

    return tuple(map(get, state.cache["k"])), tuple(map(get, state.cache["v"]))


def _paged_forward(config: ModelConfig, params, state: SlotState):
    """``slot_forward``'s vmapped form over pages: one token per slot, each at its own index.

    Per layer, the slots' pages are gathered into ``[N, S, ...]`` rows and the model's
    block runs on each row as a batch of one (vmapped, like ``slots``), then each
    running slot's new key/value goes into its page; the others write to scratch.

    Returns ``(logits [N, V] fp32, new cache)``."""
    c = state.cache
    max_len = c["segment_ids"].shape[1]
    ps = _page_size(state)
    slots_n = state.last.shape[0]
    rows = jnp.arange(slots_n)
    running = state.finish == RUNNING
    index = jnp.where(running, c["index"], max_len - 1)  # [N]
    page = jnp.where(running, c["pages"][rows, index // ps], SCRATCH)
    offset = index % ps
    seg = running.astype(jnp.int32)[:, None]  # [N, 1]
    seg_rows = c["segment_ids"].at[rows, index].set(seg[:, 0])  # as prepare_inputs
    positions = state.positions[:, None]
    x = embed_tokens(config, params, state.last[:, None])  # [N, 1, E]
    block = block_fn(decode_config(config))
    ax = _len_axis()
    new_k, new_v = [], []
    for i in range(config.num_hidden_layers):
        layer = step._layer(params["layers"], i)

        def one(x, k, v, pos, s, seg_row, idx, layer=layer, i=i):
            info = {"index": idx, "segment_ids": seg_row[None]}
            x, upd = block(layer, x[None], {"k": k[None], "v": v[None]}, pos[None], s[None],
                           info, layer=i)  # fmt: skip
            at = lambda a: jax.lax.dynamic_index_in_dim(a[0], idx, ax - 1, keepdims=False)  # noqa: E731
            return x[0], at(upd["k"]), at(upd["v"])

        kv = (_view(c["k"][i], c["pages"]), _view(c["v"][i], c["pages"]))
        x, k1, v1 = jax.vmap(one)(x, *kv, positions, seg, seg_rows, index)  # k1 [N, KV, D]
        new_k.append(_write(c["k"][i], page, offset, k1))
        new_v.append(_write(c["v"][i], page, offset, v1))
    logits = step.logits_of(config, params, x)[:, 0]  # the [V, E] head copy on CPU
    cache = dict(c, k=tuple(new_k), v=tuple(new_v), segment_ids=seg_rows)
    return logits, cache


def _kernel_forward(config: ModelConfig, params, state: SlotState, *, interpret: bool):
    """``_paged_forward`` through the Pallas paged kernel: all slots as one batch, each
    running slot's new key/value written into its page, attention over its own pages
    (``model.paged_cache``). Slots that do not run write to the scratch page and attend
    to nothing (length 0).

    Returns ``(logits [N, V] fp32, new cache)``."""
    c = state.cache
    ps = _page_size(state)
    rows = jnp.arange(state.last.shape[0])
    running = state.finish == RUNNING
    index = jnp.where(running, c["index"], 0)  # [N]
    info = paged_info(
        c["pages"],
        jnp.where(running, c["pages"][rows, index // ps], SCRATCH),
        index % ps,
        jnp.where(running, index + 1, 0),
        layout="pshd" if _len_axis() == 1 else "phsd",
        interpret=interpret,
    )
    seg = running.astype(jnp.int32)[:, None]  # [N, 1]
    last = c["segment_ids"].shape[1] - 1  # as _paged_forward: idle slots mark its last
    seg_rows = c["segment_ids"].at[rows, jnp.where(running, index, last)].set(seg[:, 0])
    x = embed_tokens(config, params, state.last[:, None])  # [N, 1, E]
    block = block_fn(config)
    new_k, new_v = [], []
    for i in range(config.num_hidden_layers):
        pools = {"k": c["k"][i], "v": c["v"][i]}
        x, pools = block(
            step._layer(params["layers"], i), x, pools, state.positions[:, None], seg, info, layer=i
        )
        new_k.append(pools["k"])
        new_v.append(pools["v"])
    logits = step.logits_of(config, params, x)[:, 0]
    return logits, dict(c, k=tuple(new_k), v=tuple(new_v), segment_ids=seg_rows)


ATTENTION = ("gather", "kernel", "interpret")  # ``generate``'s forms (module docstring)


@functools.partial(
    jax.jit,
    static_argnames=("config", "mode", "num_logprobs", "steps", "attention"),
    donate_argnames=("state",),
)
def generate(
    config, params, state, *, mode, num_logprobs: int = 0, steps: int = 1, until=None,
    stop_after=None, attention: str = "gather",
):  # fmt: skip
    """``slots.generate`` over pages (same arguments and outputs; no ``active``).

    ``attention``: ``"gather"`` (XLA), ``"kernel"`` (the Pallas paged kernel compiled
    for the device) or ``"interpret"`` (the same kernel in the Pallas interpreter)."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}.")
    if attention == "gather":
        forward = _paged_forward
    else:
        forward = functools.partial(_kernel_forward, interpret=attention == "interpret")

    def one(s, i):
        return slots._one_step(config, params, s, mode, num_logprobs, forward=forward)

    until = jnp.int32(steps) if until is None else jnp.minimum(until, steps)
    stop_after = jnp.int32(0) if stop_after is None else stop_after
    return slots.decode_loop(one, state, steps, until, stop_after)
