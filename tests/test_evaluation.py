"""Log-likelihood scoring and sliding-window perplexity against transformers.

References are log-probabilities from the torch model's logits (log_softmax in float64).
Our side takes log_softmax in fp32; per-token values agree to ~1e-6 and sums over
<= 100 tokens to ~1e-4, so sums are compared with atol 2e-4 (a shifted target or a
mis-masked pad changes a sum by O(1)).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers.evaluation import corpus_lines, hf_token_logprobs, tiny_model
from helpers.xla import xla_flags

from neox_jax.data.indexed_dataset import IndexedDatasetBuilder
from neox_jax.evaluation import (
    LogLikelihoodScorer,
    perplexity_of_ids,
    perplexity_of_indexed_dataset,
    perplexity_of_text_file,
    sliding_windows,
)
from neox_jax.evaluation.perplexity import window_requests

ATOL = 2e-4


@pytest.fixture(scope="module")
def scorer():
    _, _, config, params, _ = tiny_model()
    return LogLikelihoodScorer(config, params, batch_size=4)


def test_score_matches_reference(scorer):
    ref, vocab = tiny_model()[1], tiny_model()[4].vocab_size
    rng = np.random.default_rng(0)
    requests = [
        (rng.integers(2, vocab, a).tolist(), rng.integers(2, vocab, b).tolist())
        for a, b in [(1, 1), (5, 3), (20, 7), (3, 12), (9, 1), (30, 2)]
    ]
    results = scorer.score(requests)
    for (ctx, cont), (logprob, greedy) in zip(requests, results, strict=True):
        per_token = hf_token_logprobs(ref, ctx + cont)[-len(cont) :]
        assert logprob == pytest.approx(per_token.sum(), abs=ATOL)
        assert isinstance(greedy, bool)
    # A greedy continuation (the argmax after the context) is recognised as such.
    ctx = requests[2][0]
    best = int(np.argmax(_last_logits(ref, ctx)))
    assert scorer.score([(ctx, [best])])[0][1] is True


def test_one_compile_per_length_bucket(scorer):
    from neox_jax.evaluation import scoring

    rng = np.random.default_rng(5)
    batch = lambda n: [([1] * 3, rng.integers(2, 50, n).tolist()) for _ in range(4)]  # noqa: E731
    scorer.score(batch(10))
    before = scoring.token_logprobs._cache_size()
    for n in (2, 6, 12):  # other lengths in the same bucket (16): no new program
        scorer.score(batch(n))
    assert scoring.token_logprobs._cache_size() == before


TWO_DEVICES = """
import sys
import numpy as np
sys.path.insert(0, "tests")
from helpers.evaluation import tiny_model
from jax.sharding import Mesh
import jax
from neox_jax.evaluation import LogLikelihoodScorer
from neox_jax.retrieval import Embedder
assert jax.device_count() == 2
_, _, config, params, tok = tiny_model()
rng = np.random.default_rng(0)
reqs = [(rng.integers(2, 90, 5).tolist(), rng.integers(2, 90, 4).tolist()) for _ in range(5)]
one = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "stage", "fsdp", "tensor"))
split = LogLikelihoodScorer(config, params, batch_size=3)
single = LogLikelihoodScorer(config, params, batch_size=3, mesh=one)
assert split.batch_size == 4 and split.placement.num_shards == 2
a, b = split.score(reqs), single.score(reqs)
assert max(abs(x[0] - y[0]) for x, y in zip(a, b)) < 1e-5, (a, b)
seqs = [r[0] + r[1] for r in reqs]
e2 = Embedder(config, params, tok, batch_size=2).embed_ids(seqs)
e1 = Embedder(config, params, tok, batch_size=2, mesh=one).embed_ids(seqs)
assert np.abs(e2 - e1).max() < 1e-5
print("ok")
"""


def test_batches_split_over_two_devices():
    """Two fake CPU devices (own process): same scores and embeddings as one device,
    up to fp32 round-off of differently partitioned programs (1e-5)."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(2),
           "JAX_PLATFORMS": "cpu"}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", TWO_DEVICES], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def _last_logits(ref, ids):
    import torch

    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0, -1].numpy()


def test_long_requests_keep_the_end(scorer):
    ref, vocab = tiny_model()[1], tiny_model()[4].vocab_size
    short = LogLikelihoodScorer(tiny_model()[2], tiny_model()[3], max_length=32)
    rng = np.random.default_rng(1)
    ctx, cont = rng.integers(2, vocab, 60).tolist(), rng.integers(2, vocab, 5).tolist()
    window = (ctx + cont)[-33:]  # 32 inputs predict the last 32 tokens
    expected = hf_token_logprobs(ref, window)[-5:].sum()
    assert short.score([(ctx, cont)])[0][0] == pytest.approx(expected, abs=ATOL)
    with pytest.raises(ValueError, match="empty context"):
        scorer.score([([], [5])])
    with pytest.raises(ValueError, match="exceeds max_length=32"):
        short.score([([1], list(range(2, 40)))])
    with pytest.raises(ValueError, match="max_length=4096 must lie in"):
        LogLikelihoodScorer(tiny_model()[2], tiny_model()[3], max_length=4096)


@pytest.mark.parametrize("max_length", [1, 2, 7, 16])
def test_sliding_windows_score_each_token_once(max_length):
    for n in range(0, 50):
        for stride in range(1, max_length + 1):
            windows = sliding_windows(n, max_length, stride)
            seen = np.zeros(n, int)
            for w in windows:
                assert 0 <= w.begin < w.target_start < w.end <= n
                assert w.end - 1 - w.begin <= max_length  # inputs fit
                seen[w.target_start : w.end] += 1
                if w.target_start > 1:  # later windows: context of >= max_length - stride + 1
                    assert w.target_start - w.begin >= min(max_length - stride + 1, w.target_start)
            assert (seen[:1] == 0).all() and (seen[1:] == 1).all()


@pytest.mark.parametrize("stride", [16, 5])
def test_perplexity_matches_reference(scorer, stride):
    ref, vocab = tiny_model()[1], tiny_model()[4].vocab_size
    short = LogLikelihoodScorer(tiny_model()[2], tiny_model()[3], max_length=16)
    ids = np.random.default_rng(2).integers(2, vocab, 70).tolist()
    result = perplexity_of_ids(short, [ids], stride=stride, prefix_token_id=0)
    # Reference: each window's inputs through the torch model, its new targets summed.
    seq, total, count = [0] + ids, 0.0, 0
    for w in sliding_windows(len(seq), 16, stride):
        lp = hf_token_logprobs(ref, seq[w.begin : w.end])
        total += lp[w.target_start - w.begin - 1 :].sum()
        count += w.end - w.target_start
    assert result.num_tokens == count == 70
    assert result.nll == pytest.approx(-total, abs=ATOL)
    assert result.perplexity == pytest.approx(np.exp(-total / count), rel=1e-4)


def test_single_window_equals_one_forward_pass(scorer):
    ref, vocab = tiny_model()[1], tiny_model()[4].vocab_size
    ids = np.random.default_rng(3).integers(2, vocab, 50).tolist()
    result = perplexity_of_ids(scorer, [ids])  # max_length 128 > 50: one window
    assert result.num_tokens == 49  # no prefix: the first token is not scored
    assert result.nll == pytest.approx(-hf_token_logprobs(ref, ids).sum(), abs=ATOL)
    with pytest.raises(ValueError, match="no tokens to score"):
        perplexity_of_ids(scorer, [[5]])


def test_text_file_and_indexed_dataset(scorer, tmp_path):
    tok = tiny_model()[4]
    docs = corpus_lines(8, seed=4)
    text = "\n".join(docs)
    (tmp_path / "t.txt").write_text(text)
    res = perplexity_of_text_file(scorer, tok, tmp_path / "t.txt", stride=64, prefix_token_id=0)
    same = perplexity_of_ids(scorer, [tok.encode(text)], stride=64, prefix_token_id=0)
    assert res.nll == pytest.approx(same.nll, abs=1e-9) and res.num_bytes == len(text.encode())
    assert res.bits_per_byte == pytest.approx(res.nll / np.log(2) / len(text.encode()))
    with IndexedDatasetBuilder(str(tmp_path / "ds")) as builder:
        for d in docs:
            builder.add_document(tok.encode(d))
    from_ds = perplexity_of_indexed_dataset(
        scorer, str(tmp_path / "ds"), prefix_token_id=0, max_sequences=5
    )
    direct = perplexity_of_ids(scorer, [tok.encode(d) for d in docs[:5]], prefix_token_id=0)
    assert from_ds.nll == pytest.approx(direct.nll, abs=1e-9)
    assert from_ds.num_tokens == direct.num_tokens
    with pytest.raises(FileNotFoundError):
        perplexity_of_text_file(scorer, tok, tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="no indexed dataset"):
        perplexity_of_indexed_dataset(scorer, str(tmp_path / "nope"))
    assert window_requests([4, 5], 8, 8, prefix_token_id=0) == [([0], [4, 5])]


def test_evaluate_cli_rejects_empty_config():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "neox_jax.evaluate",
            "--config=configs/evaluate.py",
            "--config.checkpoint=/nonexistent",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("neox_jax.evaluate: error: nothing to evaluate")
    )
