"""The pure samplers: exact masks, transformers parity, and the distributions they draw from.

Statistical tests draw N = 40,000 tokens from fixed logits with fixed keys (so they are
deterministic) and apply Pearson's chi-square test against the truncated,
renormalised target distribution at significance 1e-4: a correct sampler fails with
probability 1e-4 over seeds, and with a fixed seed it either passes or fails forever.
A wrong distribution (an off-by-one cut, a missing renormalisation, temperature
applied twice) moves expected counts by hundreds, a chi-square of thousands.
Excluded tokens must have a count of exactly zero.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation import logits_process as lp

from neox_jax.inference import sampling as smp

N = 40_000
LOGITS = np.array([2.0, 1.5, 1.5, 0.7, 0.0, -0.5, -1.0, -3.0], np.float32)  # a tie at 1, 2


def _softmax(x):
    e = np.exp(x - x[np.isfinite(x)].max())
    e[~np.isfinite(x)] = 0.0
    return e / e.sum()


def _draw(mode, knobs, logits=LOGITS, n=N, seed=0):
    """n tokens sampled from one row of logits (n rows of the same logits, one key each)."""
    batch = jnp.broadcast_to(jnp.asarray(logits), (n, logits.shape[0]))
    keys = jax.random.split(jax.random.key(seed), n)
    knobs = {k: jnp.full((n,), v) for k, v in knobs.items()}
    fn = jax.jit(lambda b, k: smp.next_tokens(b, knobs, mode, k))
    return np.bincount(np.asarray(fn(batch, keys)), minlength=logits.shape[0])


def _knobs(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0):
    return dict(
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty
    )


def _mode(**kw):
    return smp.SamplingMode(
        greedy=False, top_k=kw.get("top_k", False), top_p=kw.get("top_p", False),
        repetition_penalty=False,
    )  # fmt: skip


def _check(counts, expected_probs):
    expected_probs = np.asarray(expected_probs, np.float64)
    excluded = expected_probs == 0
    assert counts[excluded].sum() == 0, f"excluded tokens drawn: {counts}"
    kept = ~excluded
    if kept.sum() > 1:
        _, p = stats.chisquare(counts[kept], N * expected_probs[kept] / expected_probs[kept].sum())
        assert p > 1e-4, f"chi-square p={p:.2e}: counts {counts} vs {N * expected_probs}"
    else:
        assert counts[kept].sum() == N


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_distribution(temperature):
    counts = _draw(_mode(), _knobs(temperature=temperature))
    _check(counts, _softmax(LOGITS / temperature))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_distribution(k):
    # k=2 cuts inside the tie at logits 1.5: both tied tokens are kept (as transformers).
    counts = _draw(_mode(top_k=True), _knobs(top_k=k, temperature=0.8))
    logits = LOGITS
    kept = logits >= np.sort(logits)[::-1][k - 1]
    _check(counts, np.where(kept, _softmax(logits / 0.8), 0.0))


@pytest.mark.parametrize("p", [0.3, 0.6, 0.9])
def test_top_p_distribution(p):
    counts = _draw(_mode(top_p=True), _knobs(top_p=p))
    probs = _softmax(LOGITS)
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    threshold = probs[order][before < p].min()
    _check(counts, np.where(probs >= threshold, probs, 0.0))


def test_combined_distribution():
    mode = smp.SamplingMode(greedy=False, top_k=True, top_p=True, repetition_penalty=False)
    counts = _draw(mode, _knobs(temperature=0.7, top_k=5, top_p=0.8))
    scaled = LOGITS / 0.7
    scaled = np.where(scaled >= np.sort(scaled)[::-1][4], scaled, -np.inf)
    probs = _softmax(scaled)
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    threshold = probs[order][before < 0.8].min()
    _check(counts, np.where(probs >= threshold, probs, 0.0))


def test_top_p_masks_exactly():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    keep = lambda p: np.isfinite(np.asarray(smp.top_p_mask(logits, p)))  # noqa: E731
    # Smallest set with mass >= p; always at least the top token.
    np.testing.assert_array_equal(keep(0.5)[0], [1, 0, 0, 0])
    np.testing.assert_array_equal(keep(0.51)[0], [1, 1, 0, 0])
    np.testing.assert_array_equal(keep(0.01)[0], [1, 0, 0, 0])
    np.testing.assert_array_equal(keep(0.96)[0], [1, 1, 1, 1])
    np.testing.assert_array_equal(keep(1.0)[0], [1, 1, 1, 1])
    # Ties: the cut is a logit threshold, so tied tokens are all kept or all dropped.
    np.testing.assert_array_equal(keep(0.3)[1], [1, 1, 1, 1])
    # Per-row p.
    both = np.isfinite(np.asarray(smp.top_p_mask(logits, jnp.array([0.5, 1.0]))))
    np.testing.assert_array_equal(both, [[1, 0, 0, 0], [1, 1, 1, 1]])


def test_top_k_masks_exactly():
    logits = jnp.array([[3.0, 1.0, 2.0, 2.0, -1.0]])
    keep = lambda k: np.isfinite(np.asarray(smp.top_k_mask(logits, k)))[0]  # noqa: E731
    np.testing.assert_array_equal(keep(1), [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(keep(2), [1, 0, 1, 1, 0])  # the tie at 2.0 is kept
    np.testing.assert_array_equal(keep(0), [1, 1, 1, 1, 1])
    np.testing.assert_array_equal(keep(99), [1, 1, 1, 1, 1])


def test_processors_match_transformers():
    """Repetition penalty, temperature, top-k, top-p in transformers' order, per value."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4, 50)).astype(np.float32)
    history = rng.integers(0, 50, (4, 12))
    seen = np.zeros((4, 50), bool)
    np.put_along_axis(seen, history, True, axis=1)
    mode = smp.SamplingMode(greedy=False, top_k=True, top_p=True, repetition_penalty=True)
    for temp, k, p, pen in [(0.7, 10, 0.9, 1.3), (1.5, 0, 0.5, 0.8), (1.0, 3, 1.0, 1.0)]:
        procs = [lp.RepetitionPenaltyLogitsProcessor(pen), lp.TemperatureLogitsWarper(temp)]
        procs += [lp.TopKLogitsWarper(k)] if k else []
        procs += [lp.TopPLogitsWarper(p)] if p < 1 else []
        theirs = torch.tensor(logits)
        for proc in procs:
            theirs = proc(torch.tensor(history), theirs)
        theirs = theirs.numpy()
        knobs = _knobs(temperature=temp, top_k=k, top_p=p, repetition_penalty=pen)
        ours = np.asarray(smp.process_logits(jnp.asarray(logits), knobs, mode, jnp.asarray(seen)))
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
        finite = np.isfinite(theirs)
        np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6)


def test_greedy_and_per_row_knobs():
    logits = jnp.asarray(np.stack([LOGITS, LOGITS[::-1]]))
    greedy = smp.SamplingMode(greedy=True, top_k=False, top_p=False, repetition_penalty=False)
    out = smp.next_tokens(logits, _knobs(temperature=0.0), greedy)
    np.testing.assert_array_equal(out, [0, 7])
    # Row 0 greedy (temperature 0), row 1 sampled with top_k=1: both deterministic.
    knobs = dict(_knobs(), temperature=jnp.array([0.0, 1.0]), top_k=jnp.array([0, 1]))
    keys = jax.random.split(jax.random.key(0), 2)
    out = smp.next_tokens(logits, knobs, _mode(top_k=True), keys)
    np.testing.assert_array_equal(out, [0, 7])


def test_repetition_penalty_semantics():
    logits = jnp.array([[2.0, -2.0, 1.0, -1.0]])
    seen = jnp.array([[True, True, False, False]])
    out = np.asarray(smp.apply_repetition_penalty(logits, seen, 2.0))
    np.testing.assert_allclose(out, [[1.0, -4.0, 1.0, -1.0]])


def test_greedy_tokens_equal_argmax():
    """``greedy_tokens`` (two plain reductions) picks what ``np.argmax`` picks: the
    first maximum on ties, the first NaN in a row holding one, index 0 in a row of
    -inf; exact equality (it compares values, no arithmetic)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1000)).astype(np.float32)
    x[1, [3, 500, 999]] = 10.0  # ties: the first wins
    x[2, [7, 40]] = np.nan  # NaN: the first NaN wins, as in argmax
    x[3] = -np.inf  # nothing allowed: index 0
    x[4, 999] = np.inf
    x[5, :] = 1.0  # all equal
    got = np.asarray(jax.jit(smp.greedy_tokens)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert got.dtype == np.int32


def test_presence_and_frequency_penalties_against_a_naive_reference():
    """OpenAI's definition (vLLM's order: after the repetition penalty, before the
    temperature), per row: ``logit[t] -= frequency * c[t] + presence * (c[t] > 0)``, where
    ``c[t]`` counts t in the GENERATED tokens only; the prompt feeds only the repetition
    penalty. Computed here token by token in Python floats."""
    rng = np.random.default_rng(1)
    vocab, rows = 30, 4
    logits = rng.normal(0, 3, (rows, vocab)).astype(np.float32)
    prompts = [rng.integers(0, vocab, 6) for _ in range(rows)]
    outputs = [rng.integers(0, vocab // 2, 15) for _ in range(rows)]  # repeats certain
    rep = [1.3, 1.0, 0.9, 1.0]
    presence, frequency, temperature = [0.5, -1.2, 0.0, 2.0], [0.3, 0.0, -0.7, 2.0], [0.7, 1, 1, 1]
    want = np.zeros((rows, vocab))
    for b in range(rows):
        for t in range(vocab):
            x = float(logits[b, t])
            if t in prompts[b] or t in outputs[b]:
                x = x / rep[b] if x > 0 else x * rep[b]
            c = int(np.sum(outputs[b] == t))
            want[b, t] = (x - frequency[b] * c - presence[b] * (c > 0)) / temperature[b]
    seen = np.zeros((rows, vocab), bool)
    counts = np.zeros((rows, vocab), np.int32)
    for b in range(rows):
        seen[b, prompts[b]] = seen[b, outputs[b]] = True
        np.add.at(counts[b], outputs[b], 1)
    knobs = dict(_knobs(), temperature=np.float32(temperature), repetition_penalty=np.float32(rep))
    knobs |= dict(presence_penalty=np.float32(presence), frequency_penalty=np.float32(frequency))
    mode = smp.SamplingMode(
        greedy=False, top_k=False, top_p=False, repetition_penalty=True, presence_frequency=True
    )
    got = smp.process_logits(jnp.asarray(logits), knobs, mode, jnp.asarray(seen), counts)
    # fp32 against float64: a few roundings of values below ~40: 1e-5 absolute.
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)
    # Neutral penalties (0, 0) leave the logits bit for bit (the server always runs them).
    neutral = smp.apply_presence_frequency(jnp.asarray(logits), counts, 0.0, 0.0)
    np.testing.assert_array_equal(np.asarray(neutral), logits)
