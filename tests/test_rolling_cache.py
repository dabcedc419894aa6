"""The rolling sliding-window KV cache (Mistral): ``window`` slots reused modulo the
window give the same logits as full attention with the window mask, and greedy
decoding equals transformers' ``generate`` with a window shorter than the sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.hf_reference import assert_logits_close
from test_families import _greedy_both, _ids, make_family_model

from neox_jax.convert import load_hf
from neox_jax.model import GPTNeoX, init_cache, rolling_cache

WINDOW = 5


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    path = tmp_path_factory.mktemp("mistral")
    ref = make_family_model("mistral", path, num_key_value_heads=2, sliding_window=WINDOW)
    config, params = load_hf(path)
    return ref, config, params


def test_cache_holds_only_the_window(mistral):
    _, config, _ = mistral
    cache = init_cache(config, batch=2, max_length=64, rolling=True)
    assert cache["k"].shape == (2, 2, 2, WINDOW, 16)  # [L, B, KV, W, D]: 5/64 of the slots
    assert rolling_cache(config, cache)
    assert init_cache(config, 2, 64)["k"].shape[3] == 64  # not asked: every slot
    assert not rolling_cache(config.replace(sliding_window=None), cache)


@pytest.mark.parametrize("chunk", [1, 7])  # single tokens, shorter and longer than W
def test_chunked_prefill_through_the_ring_equals_full_attention(mistral, chunk):
    """Tokens fed ``chunk`` at a time through a 5-slot ring: the logits of every position
    equal one uncached forward with the window mask (fp32; 1e-5 of the largest logit,
    the bound of assert_logits_close: only summation order differs)."""
    _, config, params = mistral
    ids = _ids(config.vocab_size, batch=2, length=21, seed=7)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding in row 1
    model = GPTNeoX(config)
    full = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=mask))
    cache = init_cache(config, 2, 64, rolling=True)
    pieces = []
    apply = jax.jit(model.apply)
    for start in range(0, ids.shape[1], chunk):
        out = apply(
            {"params": params},
            jnp.asarray(ids[:, start : start + chunk]),
            jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0)[:, start : start + chunk]),
            jnp.asarray(mask[:, start : start + chunk]),
            cache=cache,
        )
        cache = out.cache
        pieces.append(np.asarray(out.logits))
    cached = np.concatenate(pieces, axis=1)
    assert cache["k"].shape[3] == WINDOW and int(cache["index"]) == ids.shape[1]
    assert_logits_close(cached[0], full[0])
    assert_logits_close(cached[1, 4:], full[1, 4:])


def test_greedy_matches_generate_with_window_shorter_than_sequence(mistral):
    ref, config, params = mistral
    prompts = [[int(t) for t in row] for row in _ids(config.vocab_size, 3, 9, seed=4)]
    prompts[1], prompts[2] = prompts[1][:4], prompts[2][:1]  # mixed lengths, left padding
    theirs, ours = _greedy_both(ref, config, params, prompts, new=12)
    assert ours == theirs
