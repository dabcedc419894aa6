"""Mixture of experts (Qwen3-MoE, Qwen2-MoE, Mixtral) against transformers' own classes.

Every parity case loads a random hub-format checkpoint with ``load_hf`` and compares fp32
logits with ``assert_logits_close`` (max error <= 1e-5 of the largest logit; both sides
compute in fp32 and differ by summation order only). Weights are drawn with
``initializer_range=0.3`` and norm weights perturbed, so router logits are O(1): tokens
spread over the experts and a wrong routing rule (softmax before/after top-k, a missing
renormalisation, the w1/w3 order) moves logits far past that bound.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers.hf_reference import assert_logits_close, hf_logits, random_causal_lm

from neox_jax.convert import ConversionError, load_hf, save_hf
from neox_jax.errors import UserError
from neox_jax.inference import SamplingParams
from neox_jax.inference.generate import left_pad
from neox_jax.inference.generator import Generator
from neox_jax.model import GPTNeoX, ModelConfig, init_params

CONFIG_CLASSES = {
    "qwen3_moe": transformers.Qwen3MoeConfig,
    "qwen2_moe": transformers.Qwen2MoeConfig,
    "mixtral": transformers.MixtralConfig,
}


def make_moe_model(model_type, path=None, *, seed=0, **overrides):
    """A random ``<Family>ForCausalLM`` with O(1) activations, saved to ``path``."""
    kwargs = dict(
        vocab_size=96,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        intermediate_size=40,
        max_position_embeddings=128,
        initializer_range=0.3,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        num_experts_per_tok=2,
    )
    if model_type == "mixtral":
        kwargs.update(num_local_experts=8)
    else:
        kwargs.update(num_experts=8, moe_intermediate_size=24)
    kwargs.update(overrides)
    return random_causal_lm(CONFIG_CLASSES[model_type](**kwargs), path, seed=seed)


def _ids(vocab, batch=2, length=12, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def _ours(config, params, ids, mask=None):
    # Jitted: eager, each of the routing's many small ops would compile on its own.
    apply = jax.jit(lambda p, i, m: GPTNeoX(config).apply({"params": p}, i, attention_mask=m))
    return np.asarray(apply(params, jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))


# (model_type, transformers overrides): top-k 1 and 2 of 8 experts, normalised and not,
# dense layers mixed in, Qwen2-MoE's shared expert.
CASES = {
    "qwen3moe-top2-unnormalised": ("qwen3_moe", dict(norm_topk_prob=False)),
    "qwen3moe-top1-normalised-mixed": (
        "qwen3_moe",
        dict(num_experts_per_tok=1, norm_topk_prob=True, num_hidden_layers=3, mlp_only_layers=[1]),
    ),  # fmt: skip
    "qwen3moe-top2-sparse-step2": (
        "qwen3_moe",
        dict(norm_topk_prob=True, num_hidden_layers=4, decoder_sparse_step=2),
    ),
    "mixtral-top2": ("mixtral", dict()),
    "mixtral-top1": ("mixtral", dict(num_experts_per_tok=1)),
    "qwen2moe-shared-expert": (
        "qwen2_moe",
        dict(shared_expert_intermediate_size=32, norm_topk_prob=False),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    model_type, overrides = CASES[case]
    ref = make_moe_model(model_type, tmp_path, **overrides)
    config, params = load_hf(tmp_path)
    assert config.model_type == model_type and config.num_experts == 8
    ids = _ids(config.vocab_size)
    ours = _ours(config, params, ids)
    assert_logits_close(ours, hf_logits(ref, ids))
    # The routing matters: renormalising (or not) the top-k weights moves the logits.
    if config.num_experts_per_tok > 1:
        flipped = config.replace(norm_topk_prob=not config.norm_topk_prob)
        other = _ours(flipped, params, ids)
        assert np.max(np.abs(other - ours)) > 1e-2 * np.max(np.abs(ours))


def test_padding_does_not_change_real_tokens(tmp_path):
    """Right padding: real tokens' logits equal transformers' and their unpadded run,
    under every expert implementation (padding takes no capacity)."""
    ref = make_moe_model("qwen3_moe", tmp_path, norm_topk_prob=True)
    config, params = load_hf(tmp_path)
    ids = _ids(config.vocab_size, seed=3)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    theirs = hf_logits(ref, ids, mask)
    alone = _ours(config, params, ids[1:, :7])
    for impl in ("ragged", "capacity"):  # dense treats padding like ragged
        ours = _ours(config.replace(moe_impl=impl, capacity_factor=4.0), params, ids, mask)
        assert_logits_close(ours[0], theirs[0])
        assert_logits_close(ours[1, :7], theirs[1, :7])
        np.testing.assert_allclose(ours[1, :7], alone[0], rtol=0, atol=1e-5 * np.abs(alone).max())


def test_impls_agree_and_capacity_drops_overflow():
    """ragged == capacity (factor large enough that nothing overflows) == dense, and a
    small capacity factor drops tokens (so the capacity path is really bounded)."""
    config = ModelConfig(
        model_type="qwen3_moe", vocab_size=64, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, norm_type="rmsnorm",
        gated_mlp=True, mlp_bias=False, fused_qkv=False, use_parallel_residual=False,
        attention_bias=False, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
    )  # fmt: skip
    params = init_params(config, jax.random.key(0))
    params = jax.tree.map(lambda p: p * 5.0 if p.ndim > 2 else p, params)  # O(1) routing
    ids = _ids(64, batch=3, length=16, seed=5)
    ragged = _ours(config, params, ids)
    # Capacity >= tokens when factor >= num_experts / top_k: no expert can overflow.
    full = _ours(config.replace(moe_impl="capacity", capacity_factor=4.0), params, ids)
    dense = _ours(config.replace(moe_impl="dense"), params, ids)
    scale = np.abs(ragged).max()
    np.testing.assert_allclose(full, ragged, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(dense, ragged, rtol=0, atol=1e-5 * scale)
    tight = _ours(config.replace(moe_impl="capacity", capacity_factor=0.25), params, ids)
    assert np.max(np.abs(tight - ragged)) > 1e-2 * scale


def test_greedy_generation_matches_generate(tmp_path):
    ref = make_moe_model("qwen3_moe", tmp_path, num_hidden_layers=3, mlp_only_layers=[0])
    config, params = load_hf(tmp_path)
    prompts = [[int(t) for t in row] for row in _ids(config.vocab_size, 3, 9, seed=4)]
    prompts[1], prompts[2] = prompts[1][:4], prompts[2][:1]  # mixed lengths, left padding
    ids, mask = left_pad(prompts, 9)
    with torch.no_grad():
        theirs = ref.generate(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=8,
            min_new_tokens=8,
            pad_token_id=0,
            eos_token_id=None,
        ).numpy()[:, 9:]
    gen = Generator(config, params)
    ours = gen.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    for row, res in zip(theirs, ours, strict=True):
        assert res.token_ids == list(row)
    # The other decoders on the same sparse stack, against transformers' own: beam
    # search, then the repetition penalty (a logits processor), token for token.
    for ours_kw, theirs_kw in (
        (dict(num_beams=3, length_penalty=1.0, early_stopping=False), None),
        (dict(repetition_penalty=1.8), None),
    ):
        theirs_kw = theirs_kw or ours_kw
        with torch.no_grad():
            theirs = ref.generate(
                torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0,
                eos_token_id=None, **theirs_kw,
            ).numpy()[:, 9:]  # fmt: skip
        sampling = SamplingParams(max_new_tokens=8, ignore_eos=True, **ours_kw)
        assert [r.token_ids for r in gen.generate(prompts, sampling)] == theirs.tolist()
    # Sampling: top_k=1 at any temperature is greedy; a seed fixes a nucleus draw.
    top1 = SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=1.5, top_k=1, seed=3)
    assert [r.token_ids for r in gen.generate(prompts, top1)] == [r.token_ids for r in ours]
    nucleus = SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=0.9, top_p=0.9, seed=7)
    first, again = gen.generate(prompts, nucleus), gen.generate(prompts, nucleus)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]


def test_bf16_logits_follow_transformers_fp32(tmp_path):
    """bf16 compute (router logits and softmax stay fp32): after two layers the logits
    agree with transformers' fp32 ones to a few percent of their scale (bf16 keeps 8
    mantissa bits), and the routing does not flip on these O(1) activations."""
    ref = make_moe_model("qwen3_moe", tmp_path)
    config, params = load_hf(tmp_path)
    ids = _ids(config.vocab_size, seed=5)
    half = _ours(config.replace(dtype="bfloat16"), params, ids)
    assert half.dtype == np.float32  # logits are always fp32
    assert_logits_close(half, hf_logits(ref, ids), rel=5e-2)


@pytest.mark.parametrize(
    "case", ["qwen3moe-top1-normalised-mixed", "mixtral-top2", "qwen2moe-shared-expert"]
)
def test_round_trip_through_save_hf(tmp_path, case):
    """load_hf -> save_hf (sharded) -> transformers loads the same model, and back."""
    model_type, overrides = CASES[case]
    ref = make_moe_model(model_type, tmp_path / "src", **overrides)
    config, params = load_hf(tmp_path / "src")
    save_hf(config, params, tmp_path / "out", max_shard_size=60_000)
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager"
    ).eval()
    assert type(back) is type(ref)
    ids = _ids(config.vocab_size, seed=1)
    np.testing.assert_array_equal(hf_logits(back, ids), hf_logits(ref, ids))
    config2, params2 = load_hf(tmp_path / "out")
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_missing_expert_tensor_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    make_moe_model("mixtral", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"layers\.1\.block_sparse_moe\.experts\.5\.w3"):
        load_hf(tmp_path)


def test_expert_count_mismatch_is_refused(tmp_path):
    make_moe_model("qwen3_moe", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_local_experts"] = cfg["num_experts"] = 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConversionError, match=r"mlp\.gate\.weight has shape \(8, 48\) .* \(4, 48\)"
    ):
        load_hf(tmp_path)


_BASE = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=48, gated_mlp=True, mlp_bias=False, num_experts=4,
)  # fmt: skip


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(num_experts_per_tok=5), r"num_experts_per_tok \(5\) exceeds num_experts \(4\)"),
        (dict(capacity_factor=0.0), "capacity_factor must be > 0"),
        (dict(capacity_factor=-1.0), "capacity_factor must be > 0"),
        (dict(moe_impl="megablox"), "Unknown moe_impl 'megablox'"),
        (dict(mlp_only_layers=(2,)), r"mlp_only_layers \[2\] are not layers"),
        (dict(decoder_sparse_step=0), "decoder_sparse_step must be an integer >= 1"),
        (dict(gated_mlp=False), "Experts are gated MLPs"),
        (dict(num_experts=-1), "num_experts must be an integer >= 0"),
    ],
)
def test_bad_moe_configs_are_refused(change, match):
    with pytest.raises(UserError, match=match):
        ModelConfig(**{**_BASE, **change})


def test_dense_config_without_moe_keys_loads_as_before():
    stored = ModelConfig.from_preset("pythia-14m").to_dict()
    for key in (
        "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
        "shared_expert_intermediate_size", "decoder_sparse_step", "mlp_only_layers",
        "moe_impl", "capacity_factor", "router_aux_loss_coef", "router_z_loss_coef",
    ):  # fmt: skip
        stored.pop(key)
    config = ModelConfig.from_dict(stored)
    assert config == ModelConfig.from_preset("pythia-14m") and not config.is_moe
    moe = ModelConfig(**{**_BASE, "mlp_only_layers": [0]})  # a JSON list
    assert ModelConfig.from_json(moe.to_json()) == moe
    assert moe.sparse_layers == (1,) and moe.mixed_mlp


def test_convert_cli_round_trip(tmp_path):
    """python -m neox_jax.convert: hub folder -> our checkpoint -> hub folder, every
    tensor identical (a dense layer mixed in, so unused slots are never written)."""
    import subprocess
    import sys

    from safetensors.numpy import load_file

    make_moe_model("qwen3_moe", tmp_path / "hf", num_hidden_layers=3, mlp_only_layers=[2])
    for src, dst, to in (("hf", "ours", "neox"), ("ours", "back", "hf")):
        args = [f"--src={tmp_path / src}", f"--dst={tmp_path / dst}", f"--to={to}"]
        r = subprocess.run(
            [sys.executable, "-m", "neox_jax.convert", *args],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
    back = load_file(tmp_path / "back" / "model.safetensors")
    original = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(back) == set(original)
    for k, v in original.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
