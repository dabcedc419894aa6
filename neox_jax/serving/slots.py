"""The device side of continuous batching: a fixed set of decode slots and three jitted
programs over them (the JetStream shape).

    prefill(params, tokens, length) -> Prefix     one request's prompt, bucketed length P
                                                  (``prefill_batch.py``: one or several)
    insert(prefix, state, slot, ...) -> state     put it into free slot ``slot``
    generate(params, state) -> state, StepOutput  every running slot advances one token

A slot owns row ``slot`` of every cache buffer (``[N, KV, S, D]`` per layer), its own
write index, rotary position, step counter, PRNG key, seen-token and generated-count
rows and sampling knobs. Nothing about a request is static: prompt lengths share their bucket's
compiled prefill, and every ``SamplingParams`` knob is a traced ``[N]`` array, so a new
request never compiles. Two ``SamplingMode``s exist (all-greedy and full sampling); the
scheduler picks per step, and both are compiled at start-up.

The model forward is ``inference.step.forward`` (the same per-layer unrolled step the
``Generator`` decodes with) on all slots as one batch. Its cache index is one scalar
for the batch, so a decode call's steps write at shared scratch columns at the end of
every row, and the call then moves each slot's new keys/values into its own columns
(``slot_forward.py``). ``generate`` is one ``while_loop`` of up to ``steps`` steps that
the host may end early (``until``, ``stop_after``).

Prompt layout inside a slot (right-aligned is not needed: each slot has its own index):

    columns 0 .. n-2    the prompt minus its last token (written by prefill)
    column  n-1 + i     decode step i feeds token i (the last prompt token at i = 0)
    last ``scratch``    no request's tokens (``init_state``'s ``steps``)

as in ``inference.generate``, so a request's tokens and positions are those of
``Generator.generate`` for it alone. Prefill runs the whole bucket (the last prompt
token and the padding behind it are written too, marked segment 0 so nothing attends
to them); decode overwrites those columns before any query can see them (causality).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from neox_jax.inference import step
from neox_jax.inference.generate import (
    RUNNING,
    Controls,
    _finish_reason,
)
from neox_jax.inference.sampling import SamplingMode, SamplingParams, next_tokens, row_arrays
from neox_jax.model import ModelConfig

# The prefix cache's block copies; re-exported (the engine calls them as ``dev.*``).
from neox_jax.serving.slot_blocks import block_segments, get_block, per_layer, put_block  # noqa: F401
from neox_jax.serving.slot_forward import settle, slot_forward

Array = jax.Array

FREE = -1  # finish code of an empty slot (never RUNNING, so generate skips it)
SKIPPED = -2  # StepOutput.finish at a step that a call ended before (see generate)
# The two processor sets every request is served by. The penalties are always compiled
# in: at their neutral values they are exact no-ops (x / 1, x * 1 and x - 0 are exact),
# so greedy rows get the argmax of the raw logits, as ``Generator``'s greedy loop does.
_PENALTIES = dict(repetition_penalty=True, presence_frequency=True)
GREEDY = SamplingMode(greedy=True, top_k=False, top_p=False, **_PENALTIES)
SAMPLE = SamplingMode(greedy=False, top_k=True, top_p=True, **_PENALTIES)


@flax.struct.dataclass
class Prefix:
    """One prefilled prompt: its ``[1, P, H, D]`` per-layer k/v, ``[1, P]`` segment ids
    (1 on the prompt minus its last token), the ``[V]`` seen-token row, and the last
    prompt token with its position (fed by the first decode step)."""

    k: tuple
    v: tuple
    segment_ids: Array
    seen: Array
    last: Array
    position: Array


@flax.struct.dataclass
class SlotState:
    """Everything the slots carry; donated to every call (updated in place).

    cache: ``k``/``v`` tuples of per-layer ``[N, KV, S, D]``, ``segment_ids [N, S]``,
    ``index [N]`` (next column each slot writes). last / positions: ``[N]`` the token
    each slot feeds next and its rotary position. steps: ``[N]`` tokens generated.
    finish: ``[N]`` RUNNING, FREE, or the reason the request ended. keys: ``[N]`` PRNG
    keys (step ``i`` draws with ``fold_in(key, i)``, as ``inference.generate.decode``).
    seen: ``[N, V]`` tokens in prompt or output (repetition penalty). counts: ``[N, V]``
    int32 times each token was generated (presence / frequency penalties). controls: the
    per-slot knobs, limits and eos / stop id tables. scratch (static): the last this many
    cache columns hold no request's tokens; a decode call of up to this many steps
    writes its new keys/values there first (``slot_forward``).
    """

    cache: dict
    last: Array
    positions: Array
    steps: Array
    finish: Array
    keys: Array
    seen: Array
    counts: Array
    controls: Controls
    scratch: int = flax.struct.field(pytree_node=False, default=1)


@flax.struct.dataclass
class StepOutput:
    """What one decode step produced, per slot: ``tokens [N]`` (0 where a slot did
    not run), ``finish [N]`` after the step, ``logprob [N]`` of the chosen token under
    the model's distribution (0 when the step returns no logprobs), and the
    ``top_logprobs / top_ids [N, K]`` alternatives.
    ``generate`` stacks them over its steps (a leading ``[steps]`` axis)."""

    tokens: Array
    finish: Array
    logprob: Array
    top_logprobs: Array
    top_ids: Array


def init_state(
    config: ModelConfig,
    slots: int,
    max_len: int,
    stop_width: int,
    pipeline: bool = False,
    *,
    steps: int = 1,
) -> SlotState:
    """Empty slots, all FREE: ``slots`` rows of ``max_len + steps - 1`` cache columns,
    room for requests of up to ``max_len`` tokens (prompt + output) and ``steps``
    scratch columns (a request's last token is fed at column ``max_len - 2`` at most).

    ``stop_width``: entries of the per-slot eos and stop-id tables (a request may name
    up to this many stop ids). ``pipeline``: the stacked ``[L, N, KV, S, D]`` cache the
    pipeline splits over ``stage`` (else per-layer ``[N, KV, S, D]`` buffers).
    ``steps``: the most decode steps a ``generate`` call on this state may run."""
    cache = step.layer_cache(config, slots, max_len + steps - 1, stacked=pipeline)
    cache["index"] = jnp.zeros((slots,), jnp.int32)
    zeros = lambda: jnp.zeros((slots,), jnp.int32)  # noqa: E731 (donated: distinct buffers)
    neutral = SamplingParams(max_new_tokens=1)
    controls = Controls(
        knobs={k: jnp.asarray(v) for k, v in row_arrays([neutral] * slots).items()},
        max_new=jnp.ones((slots,), jnp.int32),
        eos_ids=jnp.full((slots, stop_width), -1, jnp.int32),
        stop_ids=jnp.full((slots, stop_width), -1, jnp.int32),
    )
    return SlotState(
        cache=cache,
        last=zeros(),
        positions=zeros(),
        steps=zeros(),
        finish=jnp.full((slots,), FREE, jnp.int32),
        keys=jax.random.split(jax.random.key(0), slots),
        seen=jnp.zeros((slots, config.vocab_size), jnp.bool_),
        counts=jnp.zeros((slots, config.vocab_size), jnp.int32),
        controls=controls,
        scratch=steps,
    )


@functools.partial(jax.jit, donate_argnames=("state",))
def insert(
    prefix: Prefix,
    state: SlotState,
    slot: Array,
    knobs: dict,
    max_new: Array,
    eos_ids: Array,
    stop_ids: Array,
    key: Array,
) -> SlotState:
    """Put ``prefix`` into ``slot`` with the request's knobs (scalars) and id rows
    (``[stop_width]``); the slot starts RUNNING at step 0."""
    plen = prefix.segment_ids.shape[1]
    max_len = state.cache["segment_ids"].shape[1]

    def put(buf, row):  # buf [N, S, ...], row [1, P, ...]
        start = (slot,) + (0,) * (buf.ndim - 1)
        return jax.lax.dynamic_update_slice(buf, row.astype(buf.dtype), start)

    # Columns past the prefix may hold an earlier request's keys: mark them empty.
    seg_row = jnp.zeros((1, max_len), jnp.int32).at[:, :plen].set(prefix.segment_ids)
    cache = {
        "k": per_layer(put, state.cache["k"], prefix.k),
        "v": per_layer(put, state.cache["v"], prefix.v),
        "segment_ids": put(state.cache["segment_ids"], seg_row),
        "index": state.cache["index"].at[slot].set(prefix.position),
    }
    state = state.replace(cache=cache)
    return _activate(
        state, slot, prefix.last, prefix.position, prefix.seen, knobs, max_new, eos_ids,
        stop_ids, key,
    )  # fmt: skip


def _activate(state, slot, last, position, seen, knobs, max_new, eos_ids, stop_ids, key):
    """``slot`` starts RUNNING at step 0, feeding ``last`` at ``position`` next, with no
    generated tokens counted (the row may hold a finished request's counts)."""
    c = state.controls
    controls = Controls(
        knobs={name: c.knobs[name].at[slot].set(knobs[name]) for name in c.knobs},
        max_new=c.max_new.at[slot].set(max_new),
        eos_ids=c.eos_ids.at[slot].set(eos_ids),
        stop_ids=c.stop_ids.at[slot].set(stop_ids),
    )
    cache = dict(state.cache, index=state.cache["index"].at[slot].set(position))
    return state.replace(
        cache=cache,
        last=state.last.at[slot].set(last),
        positions=state.positions.at[slot].set(position),
        steps=state.steps.at[slot].set(0),
        finish=state.finish.at[slot].set(RUNNING),
        keys=state.keys.at[slot].set(key),
        seen=state.seen.at[slot].set(seen),
        counts=state.counts.at[slot].set(0),
        controls=controls,
    )


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def prefill_chunk(
    config: ModelConfig, params, state: SlotState, slot: Array, tokens: Array, start: Array,
    length: Array,
) -> SlotState:  # fmt: skip
    """Chunked prefill: write ``tokens`` (``[C]``, prompt positions ``start ..
    start + C - 1``) straight into ``slot``'s cache row, attending to the chunks before.

    A long prompt runs as several calls between decode steps, so running requests wait
    one chunk, not the whole prompt. The slot stays FREE for ``generate`` until
    ``activate``. ``length`` is the prompt's length; positions from ``length - 1`` on
    (the last prompt token, fed by the first decode step, and the padding of the last
    chunk) are written with segment 0, so nothing attends to them before decode
    overwrites them. The first chunk (``start == 0``) clears the row's old segment ids.
    The caller keeps ``start + C <= max_len``.
    """
    chunk = tokens.shape[0]
    positions = start + jnp.arange(chunk, dtype=jnp.int32)
    segment_ids = (positions < length - 1).astype(jnp.int32)[None]  # [1, C]

    def row(buf):  # [N, S, ...] -> [1, S, ...]
        return jax.lax.dynamic_slice_in_dim(buf, slot, 1, axis=0)

    def put(buf, r):
        return jax.lax.dynamic_update_slice(
            buf, r.astype(buf.dtype), (slot,) + (0,) * (buf.ndim - 1)
        )

    seg_row = row(state.cache["segment_ids"])
    seg_row = jnp.where(start == 0, jnp.zeros_like(seg_row), seg_row)
    cache = {
        "k": per_layer(row, state.cache["k"]),
        "v": per_layer(row, state.cache["v"]),
        "segment_ids": seg_row,
        "index": start,
    }
    _, cache = step.forward(
        config, params, tokens[None], positions[None], segment_ids, cache,
        compute_logits=False, pipeline=int(_stacked(state)),
    )  # fmt: skip
    new = {
        "k": per_layer(put, state.cache["k"], cache["k"]),
        "v": per_layer(put, state.cache["v"], cache["v"]),
        "segment_ids": put(state.cache["segment_ids"], cache["segment_ids"]),
        "index": state.cache["index"],
    }
    return state.replace(cache=new)


@functools.partial(jax.jit, donate_argnames=("state",))
def activate(state, slot, last, position, seen, knobs, max_new, eos_ids, stop_ids, key):
    """After ``prefill_chunk`` wrote a prompt of ``n`` tokens: ``last`` is its last token,
    ``position = n - 1``, ``seen`` its ``[V]`` bool token set; the rest as ``insert``."""
    return _activate(state, slot, last, position, seen, knobs, max_new, eos_ids, stop_ids, key)


@functools.partial(jax.jit, donate_argnames=("state",))
def release(state: SlotState, slot: Array) -> SlotState:
    """Mark ``slot`` FREE (a cancelled request, or one a stop string ended on the host)."""
    return state.replace(finish=state.finish.at[slot].set(FREE))


def _stacked(state: SlotState) -> bool:
    """Whether the cache is the pipeline's stacked ``[L, N, KV, S, D]`` layout."""
    return not isinstance(state.cache["k"], tuple | list)


_GENERATE_JIT = dict(
    static_argnames=("config", "mode", "num_logprobs", "steps", "active"),
    donate_argnames=("state",),
)


def generate_program(params):
    """``generate``, or for input-major weights (the engine's from
    ``fused.INPUT_MAJOR_ROWS`` slots on CPU) the same compiled with XLA's own dots
    (``step.program_for``)."""
    return step.program_for(params, generate, **_GENERATE_JIT)


@functools.partial(jax.jit, **_GENERATE_JIT)
def generate(
    config: ModelConfig,
    params,
    state: SlotState,
    *,
    mode: SamplingMode,
    num_logprobs: int = 0,
    steps: int = 1,
    active: int | None = None,
    until: Array | None = None,
    stop_after: Array | None = None,
) -> tuple[SlotState, StepOutput]:
    """Advance every RUNNING slot by up to ``steps`` tokens (fewer where a slot
    finishes); other slots are left as they are.

    Args:
      config: the model config (static).
      params: model parameters.
      state: the slots (donated).
      mode: ``GREEDY`` when every running slot has temperature 0, else ``SAMPLE``.
      num_logprobs: alternatives per token to return in ``StepOutput.top_*`` (static;
        0 returns ``[N, 1]`` placeholders and no ``logprob``).
      steps: the most decode steps per call (static: the output's length). More steps
        mean fewer host round trips per token; the host admits and retires requests
        only between calls.
      active: compute only slots ``0 .. active - 1`` (static; None = all), where the
        caller keeps the running ones (``move``): a step costs what they need.
      until: run at most this many steps (traced scalar, default ``steps``): the host
        picks each call's length without compiling.
      stop_after: end the call after the step in which this many of the slots running
        at its start have ended (traced scalar; 0 or None = never), so that requests
        waiting for a slot are admitted as soon as one frees. The call also ends once
        no slot runs.

    Returns:
      The new state and a ``StepOutput`` whose arrays have a leading ``[steps]`` axis
      (and ``[active]`` slots when ``active`` is given); ``finish`` is ``SKIPPED`` at
      the steps the call did not run.
    """
    if steps > state.scratch:
        raise ValueError(
            f"{steps} decode steps per call need init_state(..., steps>={steps}); this "
            f"state has {state.scratch} scratch columns."
        )
    until = jnp.int32(steps) if until is None else jnp.minimum(until, steps)
    stop_after = jnp.int32(0) if stop_after is None else stop_after
    first = state.cache["segment_ids"].shape[1] - steps  # this call's scratch columns

    def one(s, i):
        return _one_step(config, params, s, mode, num_logprobs, column=first + i)

    def run(s):
        index, ran = s.cache["index"], s.steps
        s, out = decode_loop(one, s, steps, until, stop_after)
        cache = settle(config, s.cache, index, s.steps - ran, first, steps)
        return s.replace(cache=cache), out

    if active is None or active >= state.last.shape[0]:
        return run(state)
    if _stacked(state):
        raise ValueError("active slot counts need the per-layer cache, not the stacked one.")
    # Those rows of every per-slot array run the steps, then go back in place (two
    # copies of ``active`` rows per call, against ``N - active`` slots not computed).
    head, out = run(jax.tree.map(lambda x: x[:active], state))
    return jax.tree.map(lambda x, h: x.at[:active].set(h), state, head), out


def decode_loop(one_step, state: SlotState, steps: int, until: Array, stop_after: Array):
    """``one_step`` (``(state, step i) -> (state, StepOutput of [N] arrays)``) in a while
    loop of at most ``steps`` iterations, ending early as ``generate`` describes; the
    outputs stacked into ``[steps, ...]`` buffers (``finish`` ``SKIPPED`` where not run)."""
    started = state.finish == RUNNING
    shapes = jax.eval_shape(lambda s: one_step(s, jnp.int32(0))[1], state)
    outs = jax.tree.map(lambda x: jnp.zeros((steps, *x.shape), x.dtype), shapes)
    outs = outs.replace(finish=jnp.full(outs.finish.shape, SKIPPED, jnp.int32))

    def cond(carry):
        s, i, _ = carry
        running = s.finish == RUNNING
        ended = jnp.sum(started & ~running)
        return (i < until) & jnp.any(running) & ((stop_after <= 0) | (ended < stop_after))

    def body(carry):
        s, i, outs = carry
        s, out = one_step(s, i)
        put = lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, x, i, 0)  # noqa: E731
        return s, i + 1, jax.tree.map(put, outs, out)

    state, _, outs = jax.lax.while_loop(cond, body, (state, jnp.int32(0), outs))
    return state, outs


@functools.partial(jax.jit, donate_argnames=("state",))
def move(state: SlotState, src: Array, dst: Array) -> SlotState:
    """Slot ``src``'s request (cache row, position, knobs, ...) into FREE slot ``dst``;
    ``src`` becomes FREE (per-layer cache only: slots on axis 0 of every array)."""
    state = jax.tree.map(lambda x: x.at[dst].set(x[src]), state)
    return state.replace(finish=state.finish.at[src].set(FREE))


def _one_step(
    config, params, state: SlotState, mode: SamplingMode, num_logprobs: int, forward=None,
    column=None,
):  # fmt: skip
    """One token for every RUNNING slot: ``(new state, StepOutput of [N] arrays)``.

    ``forward``: the model step over the slots' cache (``slot_forward``, which writes
    the new keys/values at scratch ``column``; the paged cache passes its own)."""
    slots = state.last.shape[0]
    rows = jnp.arange(slots)
    if forward is None:
        logits, cache = slot_forward(config, params, state, column)
    else:
        logits, cache = forward(config, params, state)
    running = state.finish == RUNNING
    keys = None
    if not mode.greedy:
        keys = jax.vmap(jax.random.fold_in)(state.keys, state.steps)
    c = state.controls
    tok = next_tokens(logits, c.knobs, mode, keys, state.seen, state.counts)
    tok = jnp.where(running, tok, 0)
    if num_logprobs:
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        top_logprobs, top_ids = jax.lax.top_k(logprobs, num_logprobs)
        logprob = logprobs[rows, tok]
    else:  # no request wants them: skip the softmax over the vocabulary (as Generator)
        top_logprobs, top_ids = jnp.zeros((slots, 1)), jnp.zeros((slots, 1), jnp.int32)
        logprob = jnp.zeros((slots,))
    finish = jnp.where(running, _finish_reason(tok, state.steps, c), state.finish)
    cache["index"] = jnp.where(running, cache["index"] + 1, cache["index"])
    new = state.replace(
        cache=cache,
        last=jnp.where(running, tok, state.last),
        positions=jnp.where(running, state.positions + 1, state.positions),
        steps=jnp.where(running, state.steps + 1, state.steps),
        finish=finish,
        seen=state.seen.at[rows, tok].set(state.seen[rows, tok] | running),
        counts=state.counts.at[rows, tok].add(running.astype(jnp.int32)),
    )
    out = StepOutput(
        tokens=tok,
        finish=finish,
        logprob=logprob,
        top_logprobs=top_logprobs,
        top_ids=top_ids.astype(jnp.int32),
    )
    return new, out
