"""Long context: RoPE scaling chosen at load time, parity with transformers' linear
scaling, runs past the trained length, KV-cache decoding with scaling on, the unscaled
path unchanged, and the generator's context limit.

The tiny model has ``max_position_embeddings=128``; scaled by 4 it reads 512 positions.
Tolerances as in ``helpers.hf_reference.assert_logits_close``: 1e-5 of the largest logit for
two fp32 implementations; KV-cache decode versus full recomputation is the same
arithmetic in a different order (cached keys, one query at a time), also ~1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.evaluation import tiny_model
from helpers.hf_reference import assert_logits_close, hf_logits, make_hf_model

from neox_jax.convert import save_checkpoint
from neox_jax.inference import Generator, SamplingParams
from neox_jax.loading import load_model, load_model_and_tokenizer
from neox_jax.model import GPTNeoX, init_cache
from neox_jax.model.layers import rotary_inv_freq

LINEAR = {"type": "linear", "factor": 4.0}
NTK = {"type": "ntk", "factor": 4.0}


def test_load_time_override_for_hf_dirs_and_checkpoints(tmp_path):
    path, _, config, params, _ = tiny_model()
    assert config.rope_scaling is None
    scaled, _ = load_model(path, rope_scaling=LINEAR)
    assert scaled.rope_scaling_dict == LINEAR
    ckpt = save_checkpoint(config, params, tmp_path / "ckpt")
    from_ckpt, _ = load_model(ckpt, rope_scaling=NTK)
    assert from_ckpt.rope_scaling_dict == NTK
    # The CLI/config path: type + factor fields; "none" removes a stored scaling.
    cfg, _, tok = load_model_and_tokenizer(path, rope_scaling_type="ntk", rope_scaling_factor=2)
    assert cfg.rope_scaling_dict == {"type": "ntk", "factor": 2.0} and tok.eos_id == 0
    stored = save_checkpoint(scaled, params, tmp_path / "scaled")
    assert load_model_and_tokenizer(stored, path, rope_scaling_type="none")[0].rope_scaling is None
    with pytest.raises(ValueError, match="rope_scaling_factor >= 1"):
        load_model_and_tokenizer(path, rope_scaling_type="linear", rope_scaling_factor=0.5)
    with pytest.raises(ValueError, match="rope_scaling"):
        load_model(path, rope_scaling={"type": "yarn", "factor": 2.0})


def test_linear_scaling_matches_transformers():
    path, ref, _, _, _ = tiny_model()
    scaled_ref = make_hf_model(
        vocab_size=ref.config.vocab_size, rope_scaling={"rope_type": "linear", "factor": 4.0}
    )
    scaled_ref.load_state_dict(ref.state_dict())
    config, params = load_model(path, rope_scaling=LINEAR)
    ids = np.random.default_rng(0).integers(2, ref.config.vocab_size, (2, 300))  # > 128
    ours = GPTNeoX(config).apply({"params": params}, jnp.asarray(ids))
    assert_logits_close(ours, hf_logits(scaled_ref, ids))


def test_ntk_frequencies_and_factor_one_is_unscaled():
    _, _, config, _, _ = tiny_model()
    rd, base = config.rotary_ndims, config.rotary_emb_base
    ntk = rotary_inv_freq(config.replace(rope_scaling=NTK))
    expected = 1.0 / (base * 4.0 ** (rd / (rd - 2))) ** (np.arange(0, rd, 2) / rd)
    np.testing.assert_allclose(ntk, expected, rtol=1e-6)  # fp32 powers: ~1e-7 relative
    plain = rotary_inv_freq(config)
    for kind in ("linear", "ntk"):
        one = config.replace(rope_scaling={"type": kind, "factor": 1.0})
        np.testing.assert_array_equal(rotary_inv_freq(one), plain)


def test_unscaled_path_unchanged():
    _, ref, config, params, _ = tiny_model()
    ids = np.random.default_rng(1).integers(2, ref.config.vocab_size, (1, 100))
    assert_logits_close(
        GPTNeoX(config).apply({"params": params}, jnp.asarray(ids)), hf_logits(ref, ids)
    )


@pytest.mark.parametrize("scaling", [LINEAR, NTK], ids=["linear", "ntk"])
def test_runs_past_trained_length_and_cache_matches_recompute(scaling):
    _, ref, config, params, _ = tiny_model()
    config = config.replace(rope_scaling=scaling)
    total, prompt = 400, 392  # well past 128 positions; 8 cached decode steps
    ids = jnp.asarray(np.random.default_rng(2).integers(2, ref.config.vocab_size, (2, total)))
    model = GPTNeoX(config)
    full = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, ids)
    assert full.shape == (2, total, config.vocab_size) and bool(jnp.isfinite(full).all())

    @jax.jit
    def step(p, cache, x):
        out = model.apply({"params": p}, x, cache=cache)
        return out.logits, out.cache

    cache = init_cache(config, 2, 512)
    logits, cache = step(params, cache, ids[:, :prompt])
    pieces = [logits]
    for t in range(prompt, total):
        logits, cache = step(params, cache, ids[:, t : t + 1])
        pieces.append(logits)
    assert_logits_close(jnp.concatenate(pieces, axis=1), full)


def test_generator_context_uses_scaled_length():
    _, ref, config, params, tok = tiny_model()
    prompt = np.random.default_rng(3).integers(2, ref.config.vocab_size, 200).tolist()
    sampling = SamplingParams(max_new_tokens=4, ignore_eos=True)
    with pytest.raises(ValueError, match="context of 128 positions"):
        Generator(config, params, tok).generate([prompt], sampling)
    scaled = config.replace(rope_scaling={"type": "linear", "factor": 2.0})
    generator = Generator(scaled, params, tok)
    assert generator.context_length == 2 * config.max_position_embeddings
    (result,) = generator.generate([prompt], sampling)
    assert len(result.token_ids) == 4
    # The generator agrees with a plain forward pass of the scaled model (greedy).
    logits = GPTNeoX(scaled).apply({"params": params}, jnp.asarray([prompt]))
    assert result.token_ids[0] == int(jnp.argmax(logits[0, -1]))
