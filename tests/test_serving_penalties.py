"""OpenAI's presence and frequency penalties in the serving engine: per-slot traced knobs
and generated-token counts, against ``Generator.generate`` on each request alone.

The tolerance argument of test_serving_engine.py holds: same decode step in fp32, so
greedy and seeded sampled tokens agree exactly (a wrong or stale count moves a logit by
a whole penalty, which changes tokens within a step or two).
"""

import numpy as np
import pytest
from helpers.serving import serving_model
from test_serving_engine import _cache_sizes

from neox_jax.inference import Generator, SamplingParams
from neox_jax.serving import Engine

TEXTS = ["the model reads tokens and predicts what comes next", "héllo wörld, ça va? 🙂"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return serving_model(tmp_path_factory.mktemp("penalty_model"), TEXTS)


@pytest.fixture(scope="module")
def reference(model):
    config, params, tok = model
    return Generator(config, params, tok, max_cache_len=64)


def _prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(2, vocab, n)] for n in lengths]


def _penalised(m, presence, frequency, **kw):
    return SamplingParams(
        max_new_tokens=m, presence_penalty=presence, frequency_penalty=frequency,
        ignore_eos=True, **kw,
    )  # fmt: skip


def test_penalties_in_a_batch_equal_generator_alone(model, reference):
    """Two slots, six requests of mixed penalties (negative too, with a repetition
    penalty, sampled): slots run side by side and are reused, each request equals the
    ``Generator`` alone, nothing compiles after the warm-up (the knobs are traced), and
    the penalties change what greedy decoding gives."""
    config, params, tok = model
    eng = Engine(config, params, tok, num_slots=2, max_len=64, prefill_buckets=(16,))
    eng.warmup(progress=lambda _: None)
    before = _cache_sizes()
    prompts = _prompts(config.vocab_size, (5, 12, 3, 9, 7, 14), seed=1)
    samplings = [
        _penalised(20, 1.5, 0.5),
        _penalised(14, 0.0, 0.0),
        _penalised(18, -2.0, 0.0),
        _penalised(16, 0.0, 1.2, repetition_penalty=1.3),
        _penalised(12, 0.8, 0.8, temperature=0.9, seed=5),
        _penalised(20, 2.0, 2.0),
    ]
    results = eng.generate(prompts, samplings)
    assert _cache_sizes() == before
    for p, s, (ids, text, _) in zip(prompts, samplings, results, strict=True):
        ref = reference.generate([p], s)[0]
        assert ids == ref.token_ids, s
        assert text == ref.text
    plain = SamplingParams(max_new_tokens=20, ignore_eos=True)
    assert eng.generate(prompts[:1], plain)[0][0] != results[0][0]
    assert eng.free_slots == eng.num_slots


@pytest.mark.parametrize("kv_cache", ["slots", "paged"])
def test_a_reused_slot_starts_with_no_counts(model, reference, kv_cache):
    """One slot, so every request reuses the row of the one before: a frequency-penalised
    request after another that generated many tokens must count only its own, whether
    its prompt was bucketed (``insert``) or prefilled in chunks from prefix-cache blocks
    (``activate``). A stale row would penalise the earlier request's tokens."""
    config, params, tok = model
    eng = Engine(
        config, params, tok, num_slots=1, max_len=64, prefill_chunk=16, prefix_cache_blocks=4,
        kv_cache=kv_cache, page_size=16, num_pages=4,
    )  # fmt: skip
    long = _prompts(config.vocab_size, (40,), seed=3)[0]
    short = long[-10:]  # chunked prompts start past 16 tokens; this one is bucketed
    heavy = _penalised(24, 0.0, 2.0)
    for prompt in (long, short, long, short):  # the second long one hits the prefix cache
        want = reference.generate([prompt], heavy)[0].token_ids
        assert eng.generate([prompt], heavy)[0][0] == want
    assert eng.prefix_cache.hit_tokens == 32
