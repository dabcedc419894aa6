"""Logit parity with transformers' PyTorch GPTNeoXForCausalLM (the reference)."""

import jax
import numpy as np
import pytest
import torch
from helpers.hf_reference import assert_logits_close, hf_logits, make_hf_model

from neox_jax.convert import load_hf
from neox_jax.inference.generate import greedy_generate
from neox_jax.model import GPTNeoX

CASES = [
    dict(),
    dict(use_parallel_residual=False),
    dict(rotary_pct=1.0),
    dict(rotary_pct=0.5, use_parallel_residual=False),
    dict(tie_word_embeddings=True),
    dict(attention_bias=False),
    dict(num_attention_heads=2, rotary_emb_base=500.0),
] + [
    dict(hidden_act=act)
    for act in (
        "gelu_new",
        "gelu_fast",
        "gelu_pytorch_tanh",
        "gelu_python",
        "quick_gelu",
        "relu",
        "silu",
    )
]


def _ids(shape, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize(
    "overrides", CASES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "default"
)
def test_logits_match_transformers(tmp_path, overrides):
    ref = make_hf_model(tmp_path, **overrides)
    config, params = load_hf(tmp_path)
    ids = _ids((2, 17), config.vocab_size)
    ours = GPTNeoX(config).apply({"params": params}, ids)
    assert_logits_close(ours, hf_logits(ref, ids))


def test_gelu_variants_are_distinguishable(tmp_path):
    """The parity tolerance must be tight enough to tell the GELU variants apart."""
    ref = make_hf_model(tmp_path, hidden_act="gelu")
    config, params = load_hf(tmp_path, hidden_act="gelu_fast")
    ids = _ids((2, 17), config.vocab_size)
    ours = GPTNeoX(config).apply({"params": params}, ids)
    with pytest.raises(AssertionError):
        assert_logits_close(ours, hf_logits(ref, ids))


def test_padded_batch_matches_transformers(tmp_path):
    """Right padding: real tokens are unaffected by the padding after them."""
    ref = make_hf_model(tmp_path)
    config, params = load_hf(tmp_path)
    ids = _ids((3, 12), config.vocab_size, seed=1)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ours = np.asarray(GPTNeoX(config).apply({"params": params}, ids, attention_mask=mask))
    theirs = hf_logits(ref, ids, mask)
    real = mask.astype(bool)
    assert_logits_close(ours[real], theirs[real])
    # And each padded row equals that row run alone without padding.
    alone = GPTNeoX(config).apply({"params": params}, ids[2:3, :3])
    assert_logits_close(ours[2, :3], np.asarray(alone)[0])


def test_hidden_states_match_transformers(tmp_path):
    ref = make_hf_model(tmp_path, num_hidden_layers=3)
    config, params = load_hf(tmp_path)
    ids = _ids((2, 9), config.vocab_size, seed=2)
    out = GPTNeoX(config).apply({"params": params}, ids, return_hidden_states=True)
    with torch.no_grad():
        theirs = ref(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
    assert out.hidden_states.shape == (4, 2, 9, config.hidden_size)
    for layer, h in enumerate(theirs.hidden_states):
        assert_logits_close(out.hidden_states[layer], h.numpy())


@pytest.mark.parametrize("overrides", [dict(), dict(use_parallel_residual=False, rotary_pct=1.0)])
def test_greedy_matches_transformers_generate(tmp_path, overrides):
    ref = make_hf_model(tmp_path, **overrides)
    config, params = load_hf(tmp_path)
    prompt = _ids((1, 6), config.vocab_size, seed=3)
    with torch.no_grad():
        theirs = ref.generate(
            torch.tensor(prompt, dtype=torch.long),
            max_new_tokens=20,
            do_sample=False,
            min_new_tokens=20,
            pad_token_id=0,
        )
    ours = greedy_generate(config, params, prompt, max_new_tokens=20)
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy()[:, 6:])


def test_bf16_compute_close_to_fp32(tmp_path):
    """bf16 compute (fp32 params) tracks fp32: bf16 has an 8-bit mantissa, so after a few
    layers logits agree to a few percent of their scale, not to round-off."""
    make_hf_model(tmp_path)
    config, params = load_hf(tmp_path)
    ids = _ids((2, 10), config.vocab_size, seed=4)
    full = GPTNeoX(config).apply({"params": params}, ids)
    half = GPTNeoX(config.replace(dtype="bfloat16")).apply({"params": params}, ids)
    assert half.dtype == jax.numpy.float32  # logits are always fp32
    assert_logits_close(half, full, rel=5e-2)
