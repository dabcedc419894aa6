"""The decode step's internals: attention over the cache before its write
(``grouped.step_attention``), the fused two-product layer (``inference.fused``), and
that the batch-1 decode loop updates its KV cache in place (no copies of it).

References: ``cache_attention`` over the written cache (the formula the step replaced)
and the model's own forward (``GPTNeoX``), in fp32: the same arithmetic in another
order, so round-off only (tolerances below).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.hf_reference import assert_logits_close, make_hf_model

from neox_jax.convert import load_hf
from neox_jax.inference import Generator, SamplingParams, generate, left_pad, step
from neox_jax.inference import fused as fused_module
from neox_jax.inference.fused import FUSED_LAYERS
from neox_jax.inference.generate import prompt_positions
from neox_jax.model import GPTNeoX
from neox_jax.model.grouped import cache_attention, step_attention, sum_slots


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_step_attention_equals_attention_over_the_written_cache(kv_heads):
    rng = np.random.default_rng(kv_heads)
    batch, slots, heads, dim, index = 3, 12, 4, 8, 7
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    q, k, v = f(batch, 1, heads, dim), f(batch, 1, kv_heads, dim), f(batch, 1, kv_heads, dim)
    k_cache, v_cache = f(batch, kv_heads, slots, dim), f(batch, kv_heads, slots, dim)  # stale
    # Row 0 sees every earlier slot, row 1 a later segment only, row 2 is padding (seg 0).
    seg = np.ones((batch, slots), np.int32)
    seg[1, :3] = 2
    seg[:, index + 1 :] = 0
    q_seg = np.array([[1], [1], [0]], np.int32)
    seg[:, index] = q_seg[:, 0]
    slot = np.arange(slots)
    cache_mask = (q_seg[:, :, None] == seg[:, None]) & (seg[:, None] != 0) & (slot < index)
    new_mask = (q_seg != 0)[:, None, :, None]
    ours = step_attention(q, k, v, k_cache, v_cache, cache_mask[:, None], new_mask)
    written = lambda c, t: c.at[:, :, index].set(t[:, 0])  # noqa: E731
    full_mask = (q_seg[:, :, None] == seg[:, None]) & (seg[:, None] != 0) & (slot <= index)
    ref = cache_attention(q, written(k_cache, k), written(v_cache, v), full_mask[:, None])
    # Rows with something to attend agree to fp32 round-off of an O(1) softmax average;
    # the padding row attends nothing on either side (its output is never used).
    np.testing.assert_allclose(ours[:2], ref[:2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("slots", [1, 2, 3, 7, 12, 192])  # odd counts fold a slot first
def test_sum_slots_equals_the_sum_over_slots(slots):
    x = np.random.default_rng(slots).standard_normal((2, 3, slots, 5)).astype(np.float32)
    # fp32 sums of O(1) terms in another order: round-off of ~sqrt(S) ulps of the sum.
    np.testing.assert_allclose(sum_slots(jnp.asarray(x)), x.sum(-2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "overrides,fused,block",
    [
        (dict(), True, None),
        (dict(use_parallel_residual=False), False, None),
        (dict(rotary_pct=1.0), True, None),
        # Weights in blocks of 48 input columns: w_in [E=64] in 48 + 16, w_out
        # [E + F = 256] in five of 48 and one of 16 (the tiny model's are one block).
        (dict(), True, 48),
    ],
)
def test_fused_layers_match_the_model(tmp_path, monkeypatch, overrides, fused, block):
    """``split_params(params, config)`` fuses plain parallel-residual layers (and only
    those), with weights in blocks of at most ``K_BLOCK`` input columns; prefill and
    one-token steps through them give the model's logits."""
    if block:
        monkeypatch.setattr(fused_module, "K_BLOCK", block)
    make_hf_model(tmp_path, **overrides)
    config, params = load_hf(tmp_path)
    split = step.split_params(params, config)
    assert (FUSED_LAYERS in split) == fused
    if block:
        layer = split[FUSED_LAYERS][0]
        assert [w.shape[1] for w in layer["w_in"]] == [48, 16]
        assert [w.shape[1] for w in layer["w_out"]] == [48] * 5 + [16]
    ids, mask = left_pad([[5, 9, 13, 2, 7, 3, 11, 4, 8, 6, 1, 12], [3, 7, 9, 2, 5, 8]], 12)
    positions = np.asarray(prompt_positions(jnp.asarray(mask)))
    full = np.asarray(GPTNeoX(config).apply({"params": params}, ids, positions, mask))
    fwd = jax.jit(step.forward, static_argnums=0, static_argnames=("compute_logits", "all_logits"))
    cache = step.layer_cache(config, 2, 16)
    logits, cache = fwd(config, split, ids[:, :8], positions[:, :8], mask[:, :8], cache,
                        all_logits=True)  # fmt: skip
    real = mask[:, :8] == 1
    assert_logits_close(np.asarray(logits)[real], full[:, :8][real])
    for t in range(8, 12):
        cols = slice(t, t + 1)
        logits, cache = fwd(config, split, ids[:, cols], positions[:, cols], mask[:, cols], cache)
        assert_logits_close(logits, full[:, t])


def test_batch_one_decode_loop_updates_the_cache_in_place(tmp_path):
    """The optimized decode loop at batch 1 holds no copy of a KV-cache buffer: each
    step's write goes into the carried buffer (a copy per layer per step used to cost a
    pass over the cache, experiments/decode_bench/README.md)."""
    make_hf_model(tmp_path)
    config, params = load_hf(tmp_path)
    params = step.split_params(params, config)
    sampling = SamplingParams(max_new_tokens=4, ignore_eos=True)
    controls, mode = generate.make_controls([sampling])
    ids, mask = left_pad([[5, 9, 13, 2]], 16)
    state = generate.prefill(config, params, ids, mask, generate.row_keys([0]), cache_len=64)
    hlo = generate.decode.lower(config, params, state, controls, 4, mode=mode).compile()
    cache = f"f32[1,{config.kv_heads},64,{config.head_dim}]"
    # Any copy or transpose whose result is a whole cache buffer, inside fusions too.
    moved = re.findall(rf"= {re.escape(cache)}\S* (?:copy|transpose)\(", hlo.as_text())
    assert not moved, moved


def test_batch_layouts_give_the_models_logits(tmp_path, monkeypatch):
    """``BatchLayouts`` keeps the fused weights as one block each for batch 1, in
    blocks of ``K_BLOCK`` input columns for a few rows and input-major (one block,
    no ``[V, E]`` head copy, for programs with XLA's own dots) from
    ``INPUT_MAJOR_ROWS`` rows, each built once and on first use, the biases shared;
    a batch-1 prefill and steps through the one-block layout, and a batch-2 step
    through each of the others, give the model's logits."""
    monkeypatch.setattr(fused_module, "K_BLOCK", 48)  # the tiny model's E = 64: 2 blocks
    make_hf_model(tmp_path)
    config, params = load_hf(tmp_path)
    layouts = step.BatchLayouts(params, config)
    one = layouts(1)
    assert [len(layer["w_in"]) for layer in one[FUSED_LAYERS]] == [1] * config.num_hidden_layers
    assert list(layouts._built) == [0]  # only what was asked for
    several = layouts(2)
    rows = fused_module.INPUT_MAJOR_ROWS
    assert layouts(rows - 1) is several and layouts(1) is one
    assert [w.shape[1] for w in several[FUSED_LAYERS][0]["w_in"]] == [48, 16]
    assert several[FUSED_LAYERS][0]["b_in"] is one[FUSED_LAYERS][0]["b_in"]  # shared
    # This jaxlib takes the option (a newer one without it would fall back to YNNPACK).
    assert fused_module.xla_dot_options() == fused_module.XLA_DOTS
    wide = layouts(rows)
    assert layouts(16) is wide and layouts(rows, xla_dots=False) is several
    e, f = config.hidden_size, config.intermediate_size
    assert wide[FUSED_LAYERS][0]["w_in_t"].shape == (e, 3 * e + f)
    assert wide[FUSED_LAYERS][0]["w_out_t"].shape == (e + f, e)
    assert wide[FUSED_LAYERS][0]["b_out"] is one[FUSED_LAYERS][0]["b_out"]
    assert step.VOCAB_MAJOR_HEAD not in wide and step.VOCAB_MAJOR_HEAD in one
    assert [step.uses_xla_dots(p) for p in (one, several, wide)] == [False, False, True]
    assert generate.decode_program(wide) is not generate.decode
    assert generate.decode_program(several) is generate.decode
    ids, mask = left_pad([[5, 9, 13, 2, 7, 3, 11, 4, 8, 6, 1, 12], [3, 7, 9, 2, 5, 8]], 12)
    positions = np.asarray(prompt_positions(jnp.asarray(mask)))
    full = np.asarray(GPTNeoX(config).apply({"params": params}, ids, positions, mask))
    fwd = jax.jit(step.forward, static_argnums=0)
    cache = step.layer_cache(config, 1, 16)
    logits, cache = fwd(config, one, ids[:1, :8], positions[:1, :8], mask[:1, :8], cache)
    assert_logits_close(logits, full[:1, 7])
    for t in range(8, 12):
        cols = slice(t, t + 1)
        logits, cache = fwd(config, one, ids[:1, cols], positions[:1, cols], mask[:1, cols], cache)
        assert_logits_close(logits, full[:1, t])
    for layout in (several, wide):
        cache = step.layer_cache(config, 2, 16)
        logits, _ = fwd(config, layout, ids, positions, mask, cache)
        assert_logits_close(logits, full[:, -1])


def test_generator_builds_the_layout_of_the_batch_it_decodes(tmp_path, monkeypatch):
    """A Generator decoding one prompt at a time holds only the one-block layout, and
    gives the same greedy tokens as when two prompts decode together (blocked) and
    when ``INPUT_MAJOR_ROWS`` do (input-major weights, XLA's own dots)."""
    monkeypatch.setattr(fused_module, "K_BLOCK", 48)
    make_hf_model(tmp_path)
    config, params = load_hf(tmp_path)
    gen = Generator(config, params)
    sampling = SamplingParams(max_new_tokens=6, ignore_eos=True)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 60, n).tolist() for n in (6, 4, 7, 3, 5, 8, 2, 6)]
    assert len(prompts) == fused_module.INPUT_MAJOR_ROWS
    alone = [gen.generate([p], sampling)[0].token_ids for p in prompts]
    assert list(gen._layouts._built) == [0]
    together = [r.token_ids for r in gen.generate(prompts[:2], sampling)]
    assert sorted(gen._layouts._built, key=str) == [0, 48]
    assert together == alone[:2]
    wide = [r.token_ids for r in gen.generate(prompts, sampling)]
    assert "input_major" in gen._layouts._built
    # fp32 round-off between layouts could in principle flip a near-tied argmax; this
    # tiny model's 8 x 6 greedy tokens have no such tie (checked equal here).
    assert wide == alone
