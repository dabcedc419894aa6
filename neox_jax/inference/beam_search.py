"""Beam search as one jitted ``lax.while_loop`` over a KV cache replicated per beam.

The rules are transformers' vectorised beam search (``GenerationMixin._beam_search``,
transformers 5), so results match ``generate(num_beams=..., do_sample=False)``:

* each step scores ``running_score + log_softmax(logits)`` over all ``K * V``
  continuations of a batch item and keeps the top ``C = max(2, 1 + n_stop) * K``
  candidates, so that ``K`` of them are unfinished even if every beam picks a stop id;
* a candidate ends ("hits a stopping criterion") on an eos/stop id or when it reaches
  ``max_new_tokens``; among the top ``K`` candidates those that end enter the finished
  set with score ``sum_logprob / generated_len ** length_penalty`` (generated_len
  counts the new token, the eos included), and the best ``K`` finished are kept;
* the ``K`` best candidates that did not end become the running beams; the cache rows
  are reordered by their parent beam with a gather;
* ``early_stopping``: True stops a batch item once ``K`` hypotheses are finished;
  False / "never" stop it when the best running beam, scored at the current length
  (or at ``max_new_tokens`` for "never" with a positive length penalty), cannot beat
  the worst finished one. The loop ends when no item can improve, or at the limit.

Beams live in rows ``b * K + j`` of the batch, so the model never knows about them.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from neox_jax.inference.generate import EOS, LENGTH, STOP, prefill
from neox_jax.inference.sampling import apply_repetition_penalty, mask_vocab
from neox_jax.inference.step import forward, map_cache_rows

Array = jax.Array
_NEG = -1.0e9  # transformers' "impossible" score; added, not assigned, as there


@flax.struct.dataclass
class BeamOutput:
    """Finished hypotheses per batch item, best first.

    tokens: ``[B, K, N]`` generated ids (valid up to ``lengths``). lengths: ``[B, K]``.
    scores: ``[B, K]`` length-penalised log-probabilities. finish: ``[B]`` the finish
    code (``generate.FINISH_REASONS``) of the best hypothesis.
    """

    tokens: Array
    lengths: Array
    scores: Array
    finish: Array


def _gather(x: Array, idx: Array) -> Array:
    """``x[b, idx[b, j], ...]`` for ``x`` ``[B, M, ...]`` and ``idx`` ``[B, J]``."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


@functools.partial(
    jax.jit,
    static_argnames=(
        "config",
        "num_beams",
        "num_candidates",
        "cache_len",
        "early_stopping",
        "pipeline",
    ),
)
def beam_search(
    config,
    params,
    prompt: Array,
    mask: Array,
    max_new: Array,
    stop_ids: Array,
    eos_ids: Array,
    length_penalty: Array,
    repetition_penalty: Array,
    vocab_limit: Array | None = None,
    *,
    num_beams: int,
    num_candidates: int,
    cache_len: int,
    early_stopping: bool | str,
    pipeline: int = 0,
) -> BeamOutput:
    """Beam search continuations of a left-padded batch.

    Args:
      config: the model config (static).
      params: model parameters (stacked, or ``step.split_params``: faster on CPU).
      prompt, mask: ``[B, P]`` left-padded ids and mask.
      max_new: scalar, tokens to generate at most (``<= cache_len - P + 1``).
      stop_ids, eos_ids: ``[B, n]`` ids (-1 padded) that end a hypothesis ("stop"/"eos").
      length_penalty: scalar exponent on the generated length.
      repetition_penalty: scalar; 1.0 = off (applied to log-probs, as transformers).
      vocab_limit: scalar; ids at or above it are never chosen (the model's vocabulary
        padded past its tokenizer's); None: no limit.
      num_beams: ``K`` (static).
      num_candidates: ``C`` kept per step, ``max(2, 1 + number of stop ids) * K``.
      cache_len: cache slots (static).
      early_stopping: True, False or "never" (static).
      pipeline: 0, or pipeline microbatches (``generate.prefill``).

    Returns:
      ``BeamOutput``.
    """
    batch, plen = prompt.shape
    k, vocab = num_beams, config.vocab_size
    keys = jax.random.split(jax.random.key(0), batch)  # unused: beam search is deterministic
    state = prefill(
        config, params, prompt, mask, keys, cache_len=cache_len, track_seen=True, pipeline=pipeline
    )
    n_out = state.tokens.shape[1]
    rep = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731  [B, ...] -> [B*K, ...]
    cache = map_cache_rows(state.cache, rep)  # rows [B, ...] -> [B*K, ...]
    ends = jnp.concatenate([eos_ids, stop_ids], axis=1)  # [B, n]
    ones = jnp.ones((batch * k, 1), jnp.int32)
    top_k_mask = jnp.arange(num_candidates) < k  # only the top K may finish (as HF)
    lp = jnp.asarray(length_penalty, jnp.float32)

    carry = dict(
        cache=cache,
        last=rep(state.last),  # [B*K]
        positions=rep(state.positions),
        seen=rep(state.seen),  # [B*K, V]
        run_tokens=jnp.zeros((batch, k, n_out), jnp.int32),
        run_scores=jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, _NEG), (batch, 1)),
        fin_tokens=jnp.zeros((batch, k, n_out), jnp.int32),
        fin_scores=jnp.full((batch, k), _NEG, jnp.float32),
        fin_lengths=jnp.zeros((batch, k), jnp.int32),
        is_finished=jnp.zeros((batch, k), jnp.bool_),
        unsatisfied=jnp.ones((batch,), jnp.bool_),
        go_on=jnp.array(True),
        step=jnp.zeros((), jnp.int32),
    )

    def cond(c):
        return c["go_on"] & (c["step"] < max_new)

    def body(c):
        step = c["step"]
        logits, cache = forward(
            config, params, c["last"][:, None], c["positions"][:, None], ones, c["cache"],
            pipeline=pipeline,
        )  # fmt: skip
        if vocab_limit is not None:  # excluded before the softmax, as in sampling
            logits = mask_vocab(logits, vocab_limit)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        logprobs = apply_repetition_penalty(logprobs, c["seen"], repetition_penalty)
        acc = logprobs.reshape(batch, k, vocab) + c["run_scores"][:, :, None]
        top_scores, top_idx = jax.lax.top_k(acc.reshape(batch, k * vocab), num_candidates)
        parent, tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)  # [B, C]
        cand_tokens = _gather(c["run_tokens"], parent)  # [B, C, N]
        cand_tokens = jax.lax.dynamic_update_slice(cand_tokens, tok[:, :, None], (0, 0, step))
        hits = jnp.any(tok[:, :, None] == ends[:, None, :], -1) | (step + 1 >= max_new)

        # Running beams for the next step: the best K candidates that did not end.
        run_cand = top_scores + hits.astype(jnp.float32) * _NEG
        sel = jax.lax.top_k(run_cand, k)[1]  # [B, K]
        sel_parent = _gather(parent, sel)
        rows = (jnp.arange(batch)[:, None] * k + sel_parent).reshape(-1)  # [B*K]
        reorder = lambda x: jnp.take(x, rows, axis=0)  # noqa: E731  rows by parent beam
        new_cache = map_cache_rows(cache, reorder)
        last = _gather(tok, sel).reshape(-1)
        seen = c["seen"][rows]
        seen = seen.at[jnp.arange(batch * k), last].set(True)

        # Finished hypotheses: merge the top-K candidates that ended into the best K.
        fin_cand = top_scores / jnp.power((step + 1).astype(jnp.float32), lp)
        full = jnp.all(c["is_finished"], -1, keepdims=True) & (early_stopping is True)
        fin_cand += full.astype(jnp.float32) * _NEG
        fin_cand += (~c["unsatisfied"][:, None]).astype(jnp.float32) * _NEG
        just_finished = hits & top_k_mask[None]
        fin_cand += (~just_finished).astype(jnp.float32) * _NEG
        merged_scores = jnp.concatenate([c["fin_scores"], fin_cand], 1)  # [B, K + C]
        keep = jax.lax.top_k(merged_scores, k)[1]
        merged_len = jnp.concatenate(
            [c["fin_lengths"], jnp.full((batch, num_candidates), step + 1, jnp.int32)], 1
        )
        fin_scores = _gather(merged_scores, keep)
        is_finished = _gather(jnp.concatenate([c["is_finished"], just_finished], 1), keep)
        run_scores = _gather(run_cand, sel)

        # Can a running beam still beat the worst finished one?
        if early_stopping == "never":
            best_len = jnp.where(lp > 0, max_new, step + 1)
        else:
            best_len = step + 1
        best_running = run_scores[:, :1] / jnp.power(best_len.astype(jnp.float32), lp)
        worst = jnp.where(is_finished, jnp.min(fin_scores, -1, keepdims=True), _NEG)
        unsatisfied = c["unsatisfied"] & jnp.any(best_running > worst, -1)
        open_beam = ~(jnp.all(is_finished) & (early_stopping is True))
        go_on = jnp.any(unsatisfied) & open_beam & ~jnp.all(hits)
        return dict(
            cache=new_cache,
            last=last,
            positions=c["positions"] + 1,
            seen=seen,
            run_tokens=_gather(cand_tokens, sel),
            run_scores=run_scores,
            fin_tokens=_gather(jnp.concatenate([c["fin_tokens"], cand_tokens], 1), keep),
            fin_scores=fin_scores,
            fin_lengths=_gather(merged_len, keep),
            is_finished=is_finished,
            unsatisfied=unsatisfied,
            go_on=go_on,
            step=step + 1,
        )

    c = jax.lax.while_loop(cond, body, carry)
    best_len = c["fin_lengths"][:, 0]
    last_tok = jnp.take_along_axis(c["fin_tokens"][:, 0], jnp.maximum(best_len - 1, 0)[:, None], 1)
    hit = lambda table: jnp.any(last_tok == table, -1)  # noqa: E731
    finish = jnp.select([hit(eos_ids), hit(stop_ids)], [EOS, STOP], LENGTH)
    return BeamOutput(c["fin_tokens"], c["fin_lengths"], c["fin_scores"], finish)
