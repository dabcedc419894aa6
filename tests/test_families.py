"""Llama, Mistral, Qwen2 and Qwen3 by configuration of the one model, against
transformers' own classes on tiny random checkpoints.

Every case loads a random hub-format checkpoint with ``load_hf`` and compares fp32
logits with ``assert_logits_close`` (max error <= 1e-5 of the largest logit; see its
docstring for why). Weights are drawn with ``initializer_range=0.3`` and the norm
weights and biases are perturbed so that every term is O(1) and a wrong formula (an
RMSNorm detail, the KV-head order, a missing bias) moves logits far past that bound.
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

from neox_jax.convert import ConversionError, config_from_hf, load_hf, save_hf
from neox_jax.inference import SamplingParams
from neox_jax.inference.generate import left_pad
from neox_jax.inference.generator import Generator
from neox_jax.model import GPTNeoX, ModelConfig, init_cache

CONFIG_CLASSES = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
}


def make_family_model(model_type, path=None, *, seed=0, **overrides):
    """A random ``<Family>ForCausalLM`` with O(1) activations, saved to ``path``."""
    kwargs = dict(
        vocab_size=96,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=112,
        max_position_embeddings=128,
        initializer_range=0.3,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return random_causal_lm(CONFIG_CLASSES[model_type](**kwargs), path, seed=seed)


def _ids(vocab, batch=2, length=12, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def _ours(config, params, ids, mask=None):
    return np.asarray(
        GPTNeoX(config).apply({"params": params}, jnp.asarray(ids), attention_mask=mask)
    )


# (model_type, transformers overrides, what the case exercises)
CASES = {
    "llama-mha-bias": ("llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "llama-gqa2-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-linear-rope": (
        "llama",
        dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    ),
    "llama-llama3-rope": (
        "llama",
        dict(
            max_position_embeddings=512,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 500000.0,
            },
        ),  # fmt: skip
    ),
    "llama-dynamic-rope": (  # 12 tokens past max_position_embeddings=8: the base grows
        "llama",
        dict(
            max_position_embeddings=8,
            rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
        ),
    ),  # fmt: skip
    "qwen2-yarn-rope": (  # Qwen2.5's long-context setting, scaled down
        "qwen2",
        dict(
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "rope_theta": 100.0,
                "original_max_position_embeddings": 32,
            }
        ),
    ),  # fmt: skip
    "qwen3-yarn-attention-factor": (
        "qwen3",
        dict(
            head_dim=16,
            max_position_embeddings=64,
            rope_scaling={
                "type": "yarn",
                "factor": 2.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 50.0,
                "beta_fast": 8,
                "beta_slow": 2,
                "attention_factor": 0.8,
                "truncate": False,
            },
        ),
    ),  # fmt: skip
    "mistral-mqa-window": ("mistral", dict(num_key_value_heads=1, sliding_window=5)),
    "mistral-no-window": ("mistral", dict(sliding_window=None)),
    "qwen2-qkv-bias-theta1e6": (
        "qwen2",
        dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True),
    ),
    "qwen3-qknorm-head24": ("qwen3", dict(head_dim=24)),
    "qwen3-mqa-bias": ("qwen3", dict(num_key_value_heads=1, attention_bias=True, head_dim=16)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    model_type, overrides = CASES[case]
    ref = make_family_model(model_type, tmp_path, **overrides)
    config, params = load_hf(tmp_path)
    assert config.model_type == model_type
    assert config.kv_heads == ref.config.num_key_value_heads
    ids = _ids(config.vocab_size)
    ours = _ours(config, params, ids)
    assert_logits_close(ours, hf_logits(ref, ids))
    if config.rope_scaling is not None:  # the scaling matters at these positions
        plain = _ours(config.replace(rope_scaling=None), params, ids)
        assert np.max(np.abs(plain - ours)) > 1e-3 * np.max(np.abs(ours))


def test_padding_and_family_options_are_used(tmp_path):
    """Right padding masks like transformers; and the options matter (each one changed
    moves the logits far past the tolerance, so the parity above is not vacuous)."""
    ref = make_family_model("qwen3", tmp_path, head_dim=24)
    config, params = load_hf(tmp_path)
    ids = _ids(config.vocab_size, seed=3)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    ours, theirs = _ours(config, params, ids, mask), hf_logits(ref, ids, mask)
    assert_logits_close(ours[0], theirs[0])
    assert_logits_close(ours[1, :8], theirs[1, :8])
    base = _ours(config, params, ids)
    for change in (dict(layer_norm_eps=1e-1), dict(rotary_emb_base=500.0)):
        other = _ours(config.replace(**change), params, ids)
        assert np.max(np.abs(other - base)) > 1e-2 * np.max(np.abs(base)), change


def test_kv_cache_holds_only_kv_heads_and_greedy_matches_generate(tmp_path):
    ref = make_family_model("llama", tmp_path, num_key_value_heads=1, num_attention_heads=4)
    config, params = load_hf(tmp_path)
    cache = init_cache(config, batch=2, max_length=32)
    assert cache["k"].shape == (2, 2, 1, 32, 16)  # [L, B, KV, S, D]: 4x fewer bytes than MHA
    prompts = [[int(t) for t in row] for row in _ids(config.vocab_size, 3, 9, seed=4)]
    prompts[1], prompts[2] = prompts[1][:4], prompts[2][:1]  # mixed lengths, left padding
    ids, mask = left_pad(prompts, 9)
    with torch.no_grad():
        theirs = ref.generate(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=10,
            min_new_tokens=10,
            pad_token_id=0,
            eos_token_id=None,
        ).numpy()[:, 9:]
    sampling = SamplingParams(max_new_tokens=10, ignore_eos=True)
    ours = Generator(config, params).generate(prompts, sampling)
    for row, res in zip(theirs, ours, strict=True):
        assert res.token_ids == list(row)


def _greedy_both(ref, config, params, prompts, new=10):
    """(transformers' greedy continuations, ours) of left-padded ``prompts``."""
    width = max(map(len, prompts))
    ids, mask = left_pad(prompts, width)
    with torch.no_grad():
        theirs = ref.generate(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=0,
            eos_token_id=None,
        ).numpy()[:, width:]
    sampling = SamplingParams(max_new_tokens=new, ignore_eos=True)
    ours = Generator(config, params).generate(prompts, sampling)
    return [list(row) for row in theirs], [r.token_ids for r in ours]


def test_dynamic_rope_greedy_matches_generate(tmp_path):
    """Dynamic NTK recomputes the base at every step past max_position_embeddings=8
    while the cached keys keep the rotation they were written with, as transformers."""
    ref = make_family_model("llama", tmp_path, **CASES["llama-dynamic-rope"][1])
    config, params = load_hf(tmp_path)
    prompt = [int(t) for t in _ids(config.vocab_size, 1, 6, seed=5)[0]]
    theirs, ours = _greedy_both(ref, config, params, [prompt], new=12)
    assert ours == theirs


@pytest.mark.parametrize(
    "case",
    [
        "qwen2-qkv-bias-theta1e6",
        "qwen3-qknorm-head24",
        "llama-mha-bias",
        "llama-llama3-rope",
        "qwen3-yarn-attention-factor",
        "llama-dynamic-rope",
    ],  # fmt: skip
)
def test_round_trip_through_save_hf(tmp_path, case):
    """load_hf -> save_hf (sharded) -> transformers loads the same model."""
    model_type, overrides = CASES[case]
    ref = make_family_model(model_type, tmp_path / "src", **overrides)
    config, params = load_hf(tmp_path / "src")
    save_hf(config, params, tmp_path / "out", max_shard_size=20_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager"
    ).eval()
    assert type(back) is type(ref)
    ids = _ids(config.vocab_size, seed=1)
    np.testing.assert_array_equal(hf_logits(back, ids), hf_logits(ref, ids))
    config2, params2 = load_hf(tmp_path / "out")
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_neox_config_without_family_keys_loads_as_before():
    """A model_config JSON stored before the family options existed."""
    stored = ModelConfig.from_preset("pythia-14m").to_dict()
    for key in (
        "model_type", "num_key_value_heads", "head_dim_override", "norm_type", "gated_mlp",
        "mlp_bias", "fused_qkv", "attention_out_bias", "qk_norm", "sliding_window",
    ):  # fmt: skip
        stored.pop(key)
    config = ModelConfig.from_dict(stored)
    assert config == ModelConfig.from_preset("pythia-14m")
    assert (config.kv_heads, config.head_dim, config.out_bias) == (4, 32, True)


@pytest.mark.parametrize(
    "hf,match",
    [
        ({"model_type": "gemma"}, "supported model types: 'gpt_neox'.*'qwen3'"),
        (
            {"rope_parameters": {"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e4}},
            "rope_type='longrope'.*supported: 'default', 'linear', 'dynamic'",
        ),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3 rope_scaling lacks"),
        ({"num_key_value_heads": 3}, "not divisible by num_key_value_heads"),
    ],
)
def test_bad_configs_are_refused(hf, match):
    base = dict(
        model_type="llama", vocab_size=96, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=112,
    )  # fmt: skip
    with pytest.raises(ValueError, match=match):
        config_from_hf({**base, **hf})


def test_load_refuses_tensors_that_do_not_match(tmp_path):
    make_family_model("qwen2", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_key_value_heads"] = 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConversionError, match=r"self_attn\.k_proj\.(weight|bias) has shape .* implies"
    ):
        load_hf(tmp_path)
