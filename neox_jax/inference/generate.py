"""Generation with a preallocated KV cache: a prefill, then one jitted ``lax.while_loop``.

Layout of a batch. Prompts are LEFT-padded to a bucketed length ``P`` so that every
row's last prompt token sits in column ``P - 1``; padding has segment id 0 and is never
attended, and rotary positions are ``cumsum(mask) - 1`` so each row sees the same
positions as it would alone. The cache has ``S`` slots (bucketed too):

    slots  0 .. P-2       prefill writes the prompt minus its last token (no logits)
    slot   P-1 + i        decode step i feeds token i (the last prompt token at i = 0)
                          and samples generated token i

Feeding the last prompt token through the decode step means the prefill never
computes the ``[B, P, V]`` logits it would throw away, and the loop body is the only
place logits are made. Up to ``S - P + 1`` tokens fit.

Static shapes only: ``P``, ``S`` and the batch are bucketed (``bucket_length``), every
sampling knob is a traced ``[B]`` array, and which logits processors exist is a small
static ``SamplingMode``; so a new prompt length in the same bucket, a new seed or a new
temperature reuses the compiled loop.

The loop is resumable: ``decode`` runs until ``until`` tokens exist or every row has
finished, and returns the ``DecodeState`` (donated, so the cache is updated in place).
``generate_tokens`` runs it once to the end; the ``Generator`` runs it in chunks to
stream text and to check stop strings on the host between chunks.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.inference import step
from neox_jax.inference.sampling import SamplingMode, SamplingParams, next_tokens, row_arrays
from neox_jax.model import ModelConfig

Array = jax.Array

RUNNING, EOS, STOP, LENGTH = 0, 1, 2, 3  # finish codes in DecodeState.finish
FINISH_REASONS = {EOS: "eos", STOP: "stop", LENGTH: "length"}
MIN_PROMPT_BUCKET = 16
CACHE_MULTIPLE = 64
_ID_PAD = -1  # fills unused entries of the eos / stop id tables (never a token)


# ------------------------------------------------------------------- bucketing
def bucket_length(n: int, minimum: int = MIN_PROMPT_BUCKET, step: int = 256) -> int:
    """Padded length for ``n``: powers of two (>= ``minimum``) up to ``step``, then
    multiples of ``step``; at most ~2x padding for short prompts, ~``step`` for long."""
    if n <= step:
        return max(minimum, 1 << max(0, n - 1).bit_length())
    return -(-n // step) * step


def bucket_batch(n: int) -> int:
    """Batch sizes are padded to powers of two so a new request count rarely compiles."""
    return 1 << max(0, n - 1).bit_length()


def context_length(config: ModelConfig) -> int:
    """Positions the model can address: the trained context, times the RoPE scaling factor."""
    return config.context_length


def left_pad(
    prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to ``[B, length]``; returns ``(ids, mask)`` (mask 1 = token)."""
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, p in enumerate(prompts):
        if len(p):
            ids[row, length - len(p) :] = p
            mask[row, length - len(p) :] = 1
    return ids, mask


def id_table(rows: Sequence[Sequence[int]], multiple: int = 4) -> np.ndarray:
    """``[B, n]`` int32 table of per-row ids, -1 padded; ``n`` rounded up so that the
    number of stop ids rarely changes the compiled shape."""
    width = max([len(r) for r in rows] + [1])
    table = np.full((len(rows), -(-width // multiple) * multiple), _ID_PAD, np.int32)
    for row, ids in enumerate(rows):
        table[row, : len(ids)] = ids
    return table


# -------------------------------------------------------------------- the loop
@flax.struct.dataclass
class Controls:
    """Per-row knobs of a batch (traced ``[B]`` arrays, so changing them never compiles).

    knobs: ``sampling.row_arrays`` (temperature, top_k, top_p, the penalties, ...).
    max_new: ``[B]`` tokens to generate at most. eos_ids / stop_ids: ``[B, n]`` tables
    (-1 padded) of ids that end a row with reason EOS / STOP.
    """

    knobs: dict[str, Array]
    max_new: Array
    eos_ids: Array
    stop_ids: Array


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries; a pytree, donated to each ``decode`` call.

    cache: the KV cache (``step.layer_cache``: per-layer k/v). tokens: ``[B, N]`` generated ids (0
    after a row finished). last / positions: ``[B]`` the token to feed next and its
    rotary position. step: scalar, tokens generated so far (the same for every row).
    finish: ``[B]`` RUNNING or the reason the row ended. lengths: ``[B]`` generated
    tokens per row, counting the eos/stop token. keys: ``[B]`` PRNG keys, one stream per
    row (step ``i`` uses ``fold_in(key, i)``). seen: ``[B, V]`` bool tokens in prompt or
    output (only with a repetition penalty; else None). counts: ``[B, V]`` int32 times
    each token was generated (only with presence / frequency penalties; else None).
    """

    cache: dict[str, Array]
    tokens: Array
    last: Array
    positions: Array
    step: Array
    finish: Array
    lengths: Array
    keys: Array
    seen: Array | None = None
    counts: Array | None = None


def prompt_positions(mask: Array) -> Array:
    """Rotary positions of a left-padded batch: ``cumsum(mask) - 1``, 0 on padding."""
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


def seen_tokens(ids: Array, mask: Array, vocab_size: int) -> Array:
    """``[B, V]`` bool: which tokens occur (where ``mask``) in each row of ``ids``."""
    batch = ids.shape[0]
    # Padding scatters into an extra column V that is dropped: no bool scatter-max needed.
    cols = jnp.where(mask > 0, ids, vocab_size)
    seen = jnp.zeros((batch, vocab_size + 1), jnp.bool_)
    return seen.at[jnp.arange(batch)[:, None], cols].set(True)[:, :vocab_size]


@functools.partial(
    jax.jit, static_argnames=("config", "cache_len", "track_seen", "track_counts", "pipeline")
)
def prefill(
    config,
    params,
    prompt,
    mask,
    keys,
    *,
    cache_len: int,
    track_seen: bool = False,
    track_counts: bool = False,
    pipeline: int = 0,
):
    """Write all but the last prompt token into a fresh cache; returns a ``DecodeState``.

    Args:
      config: the model config (static).
      params: model parameters (stacked, or ``step.split_params``).
      prompt: ``[B, P]`` int32, left-padded (column ``P - 1`` real in every row).
      mask: ``[B, P]`` 1 = token, 0 = padding.
      keys: ``[B]`` PRNG keys.
      cache_len: cache slots ``S`` (static); up to ``S - P + 1`` tokens can be generated.
      track_seen: keep the ``[B, V]`` seen-token table (repetition penalty).
      track_counts: keep the ``[B, V]`` generated-token counts (presence / frequency
        penalties).
      pipeline: 0, or the microbatches of a pipeline over the mesh's ``stage`` axis
        (``step.forward``; stacked params and cache).

    Returns:
      The state before decode step 0.
    """
    batch, plen = prompt.shape
    mask = mask.astype(jnp.int32)
    positions = prompt_positions(mask)  # [B, P]
    _, cache = step.forward(
        config,
        params,
        prompt[:, :-1],
        positions[:, :-1],
        mask[:, :-1],
        # Pipelined decoding keeps every slot; else a sliding-window model rolls its cache.
        step.layer_cache(config, batch, cache_len, stacked=bool(pipeline), rolling=not pipeline),
        compute_logits=False,
        pipeline=pipeline,
    )
    seen = seen_tokens(prompt, mask, config.vocab_size) if track_seen else None
    zeros = jnp.zeros((batch,), jnp.int32)
    return DecodeState(
        cache=cache,
        tokens=jnp.zeros((batch, cache_len - plen + 1), jnp.int32),  # [B, N]
        last=prompt[:, -1].astype(jnp.int32),
        positions=positions[:, -1],
        step=jnp.zeros((), jnp.int32),
        finish=zeros,
        lengths=zeros,
        keys=keys,
        seen=seen,
        counts=jnp.zeros((batch, config.vocab_size), jnp.int32) if track_counts else None,
    )


def _finish_reason(tok: Array, step: Array, controls: Controls) -> Array:
    """``[B]`` the reason a row ends after emitting ``tok`` at ``step`` (RUNNING if none)."""
    hit_eos = jnp.any(tok[:, None] == controls.eos_ids, axis=-1)
    hit_stop = jnp.any(tok[:, None] == controls.stop_ids, axis=-1)
    at_limit = step + 1 >= controls.max_new
    return jnp.select([hit_eos, hit_stop, at_limit], [EOS, STOP, LENGTH], RUNNING)


_DECODE_JIT = dict(static_argnames=("config", "mode", "pipeline"), donate_argnames=("state",))


@functools.partial(jax.jit, **_DECODE_JIT)
def decode(
    config,
    params,
    state: DecodeState,
    controls: Controls,
    until,
    *,
    mode: SamplingMode,
    pipeline: int = 0,
):
    """Decode until ``until`` tokens exist or every row has finished; one ``while_loop``.

    Args:
      config: the model config (static).
      params: model parameters; ``step.split_params(params)`` decodes much faster on
        CPU (no per-step copies of weight slices).
      state: from ``prefill`` or a previous ``decode`` (donated: do not reuse it).
      controls: per-row knobs and limits.
      until: scalar int, stop once ``state.step`` reaches it (for chunked decoding;
        pass the largest ``max_new`` to run to the end).
      mode: the static processor set (``SamplingMode.of``).
      pipeline: as in ``prefill``.

    Returns:
      The new ``DecodeState``.
    """
    batch = state.last.shape[0]
    rows = jnp.arange(batch)
    ones = jnp.ones((batch, 1), jnp.int32)

    def cond(s: DecodeState):
        return (s.step < until) & jnp.any(s.finish == RUNNING)

    def body(s: DecodeState):
        logits, cache = step.forward(
            config, params, s.last[:, None], s.positions[:, None], ones, s.cache,
            pipeline=pipeline,
        )  # fmt: skip
        keys = None if mode.greedy else jax.vmap(jax.random.fold_in, (0, None))(s.keys, s.step)
        tok = next_tokens(logits, controls.knobs, mode, keys, s.seen, s.counts)  # [B]
        running = s.finish == RUNNING
        tok = jnp.where(running, tok, 0)
        seen, counts = s.seen, s.counts
        if seen is not None:
            seen = seen.at[rows, tok].set(seen[rows, tok] | running)
        if counts is not None:
            counts = counts.at[rows, tok].add(running.astype(jnp.int32))
        return s.replace(
            cache=cache,
            tokens=jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, s.step)),
            last=tok,
            positions=s.positions + 1,
            step=s.step + 1,
            finish=jnp.where(running, _finish_reason(tok, s.step, controls), s.finish),
            lengths=jnp.where(running, s.step + 1, s.lengths),
            seen=seen,
            counts=counts,
        )

    return jax.lax.while_loop(cond, body, state)


def decode_program(params):
    """``decode``, or for input-major weights (``step.uses_xla_dots``: a batch of
    ``fused.INPUT_MAJOR_ROWS`` or more on CPU) the same loop compiled with XLA's own
    dots (``fused.XLA_DOTS``), which read those weights faster than YNNPACK."""
    return step.program_for(params, decode, **_DECODE_JIT)


# -------------------------------------------------------------- functional API
@flax.struct.dataclass
class TokenOutput:
    """tokens: ``[B, N]`` generated ids (valid up to ``lengths``; N >= max_new_tokens).
    lengths: ``[B]`` generated tokens per row (including the eos/stop token).
    finish: ``[B]`` codes, see ``FINISH_REASONS``."""

    tokens: Array
    lengths: Array
    finish: Array


def row_keys(seeds: Sequence[int], rows: Sequence[int] | None = None) -> Array:
    """``[B]`` PRNG keys: ``fold_in(key(seed), row)``; a request's seed fixes its samples,
    and several rows of one request (same seed) still draw independently."""
    rows = range(len(seeds)) if rows is None else rows
    seeds = np.asarray([s % 2**32 for s in seeds], np.uint32)  # any int seeds a uint32 key
    rows = np.asarray(rows, np.int32)
    return jax.vmap(lambda s, r: jax.random.fold_in(jax.random.key(s), r))(seeds, rows)


def make_controls(
    params: Sequence[SamplingParams],
    eos_token_ids: Sequence[int] = (),
    vocab_limit: int | None = None,
) -> tuple[Controls, SamplingMode]:
    """The traced per-row ``Controls`` and the static ``SamplingMode`` of a batch.

    ``vocab_limit``: the tokenizer's vocabulary size when the model's is padded past it
    (ids at or above it are never drawn); None draws from the whole vocabulary.
    """
    eos = [() if p.ignore_eos else tuple(eos_token_ids) for p in params]
    controls = Controls(
        knobs={k: jnp.asarray(v) for k, v in row_arrays(params, vocab_limit).items()},
        max_new=jnp.asarray([p.max_new_tokens for p in params], jnp.int32),
        eos_ids=jnp.asarray(id_table(eos)),
        stop_ids=jnp.asarray(id_table([p.stop_token_ids for p in params])),
    )
    return controls, SamplingMode.of(params)


def plan_cache(
    config: ModelConfig,
    prompt_len: int,
    max_new_tokens: int,
    max_cache_len: int | None = None,
) -> tuple[int, int]:
    """``(P, S)``: the padded prompt length and cache slots for a batch.

    Args:
      config: the model (for its context length).
      prompt_len: the longest real prompt of the batch.
      max_new_tokens: the most tokens any row may generate.
      max_cache_len: a fixed cache size (one compile for every request), or None to
        bucket ``S`` to a multiple of 64 per request.

    Raises:
      ValueError: the prompt plus ``max_new_tokens`` exceeds the context or the cache.
    """
    context = context_length(config)
    if prompt_len < 1:
        raise ValueError("empty prompt: give at least one token.")
    if prompt_len + max_new_tokens > context:
        raise ValueError(
            f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} exceeds the "
            f"model's context of {context} positions; shorten the prompt, lower "
            "max_new_tokens, or set truncate_prompt=True to drop tokens from the left."
        )
    plen = max(2, bucket_length(prompt_len))  # >= 2: the prefill takes P - 1 tokens
    if max_cache_len is None:
        return plen, -(-(plen + max_new_tokens - 1) // CACHE_MULTIPLE) * CACHE_MULTIPLE
    # A fixed cache: shrink the prompt bucket if only that is too big.
    plen = min(plen, max_cache_len - max_new_tokens + 1)
    if plen < max(2, prompt_len):
        raise ValueError(
            f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} does not fit "
            f"max_cache_len={max_cache_len}; raise max_cache_len or lower max_new_tokens."
        )
    return plen, max_cache_len


def generate_tokens(
    config: ModelConfig,
    params,
    prompt_ids,
    prompt_mask=None,
    sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    rng: Array | None = None,
    *,
    eos_token_ids: Sequence[int] = (),
    max_cache_len: int | None = None,
    pipeline: int = 0,
    vocab_limit: int | None = None,
) -> TokenOutput:
    """Sample continuations of a left-padded batch of token ids (no tokenizer needed).

    Pure: the output depends only on the arguments. The prompt is left-padded further
    to its bucket, so lengths within a bucket share one compiled prefill and loop.

    Args:
      config: the model config.
      params: model parameters; pass ``step.split_params(params)`` (once) to decode
        without per-step weight copies on CPU.
      prompt_ids: ``[B, T]`` int ids, left-padded.
      prompt_mask: ``[B, T]`` 1 = token, 0 = padding (left); default all ones.
      sampling: one ``SamplingParams`` for every row, or one per row (``num_beams`` 1;
        use ``beam_search.beam_search`` for beams).
      rng: a PRNG key (split per row) or ``[B]`` keys; default from each row's seed.
      eos_token_ids: ids that end a row with reason "eos" (unless ``ignore_eos``).
      max_cache_len: a fixed cache size, or None to bucket it.
      pipeline: 0, or pipeline microbatches (see ``prefill``; call under ``jax.set_mesh``
        with a ``stage`` axis, stacked params).
      vocab_limit: never draw ids at or above it (a tokenizer smaller than the model's
        padded vocabulary); None: no limit.

    Returns:
      ``TokenOutput`` with ``[B, N]`` tokens, ``[B]`` lengths and finish codes.
    """
    ids = np.asarray(prompt_ids, np.int32)
    mask = np.ones_like(ids) if prompt_mask is None else np.asarray(prompt_mask, np.int32)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"prompt_ids and prompt_mask must be [B, T]: {ids.shape}, {mask.shape}")
    if ids.shape[1] == 0 or not mask[:, -1].all():
        raise ValueError(
            "every prompt must be non-empty and LEFT-padded (its last column a real token)."
        )
    rows = [sampling] * ids.shape[0] if isinstance(sampling, SamplingParams) else list(sampling)
    if len(rows) != ids.shape[0] or any(p.num_beams != 1 for p in rows):
        raise ValueError("give one SamplingParams per row, all with num_beams=1.")
    lengths = mask.sum(1)
    max_new = max(p.max_new_tokens for p in rows)
    for n, p in zip(lengths, rows, strict=True):
        plan_cache(config, int(n), p.max_new_tokens)  # the per-row context check
    plen, cache_len = plan_cache(config, int(lengths.max()), max_new, max_cache_len)
    if plen > ids.shape[1]:
        pad = plen - ids.shape[1]
        ids, mask = np.pad(ids, ((0, 0), (pad, 0))), np.pad(mask, ((0, 0), (pad, 0)))
    elif plen < ids.shape[1]:  # drop columns that are padding in every row
        ids, mask = ids[:, -plen:], mask[:, -plen:]
    if rng is None:
        keys = row_keys([p.seed for p in rows])
    elif jnp.ndim(rng) == 0:
        keys = jax.random.split(rng, ids.shape[0])
    else:
        keys = rng
    controls, mode = make_controls(rows, eos_token_ids, vocab_limit)
    state = prefill(
        config, params, ids, mask, keys,
        cache_len=cache_len, track_seen=mode.repetition_penalty,
        track_counts=mode.presence_frequency, pipeline=pipeline,
    )  # fmt: skip
    state = decode(
        config, params, state, controls, jnp.int32(max_new), mode=mode, pipeline=pipeline
    )
    return TokenOutput(tokens=state.tokens, lengths=state.lengths, finish=state.finish)


def greedy_generate(config: ModelConfig, params, prompt_ids, max_new_tokens: int):
    """Greedy continuation of equal-length prompts ``[B, T]``; returns ``[B, max_new_tokens]``.

    Runs exactly ``max_new_tokens`` steps (no eos), as transformers' ``generate`` with
    ``do_sample=False, min_new_tokens=max_new_tokens``.
    """
    sampling = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    out = generate_tokens(config, params, prompt_ids, sampling=sampling)
    return out.tokens[:, :max_new_tokens]
