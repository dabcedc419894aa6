"""Hugging Face <-> neox_jax conversion: round trips, formats, and bad input."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from helpers.hf_reference import assert_logits_close, hf_logits, make_hf_model
from safetensors.numpy import load_file, save_file

from neox_jax.convert import (
    ConversionError,
    load_checkpoint,
    load_hf,
    save_checkpoint,
    save_hf,
)
from neox_jax.errors import UserError
from neox_jax.loading import load_model
from neox_jax.model import GPTNeoX, ModelConfig, init_params

TINY = ModelConfig(
    vocab_size=80,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=64,
)


def _state(path):
    files = sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _ids(vocab, shape=(2, 11), seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def test_hf_to_ours_to_hf_is_identical(tmp_path):
    make_hf_model(tmp_path / "hf", num_hidden_layers=3)
    config, params = load_hf(tmp_path / "hf")
    save_hf(config, params, tmp_path / "back")
    original = _state(tmp_path / "hf")  # the file transformers wrote
    back = _state(tmp_path / "back")
    assert set(back) == set(original)
    for k, v in original.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_save_hf_loads_in_transformers_with_our_logits(tmp_path):
    params = init_params(TINY, jax.random.key(0))
    save_hf(TINY, params, tmp_path / "out")
    model = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _ids(TINY.vocab_size)
    assert_logits_close(GPTNeoX(TINY).apply({"params": params}, ids), hf_logits(model, ids))


@pytest.mark.parametrize("kind", ["linear", "ntk"])
def test_rope_scaling_exports_to_transformers(tmp_path, kind):
    # Linear scaling maps to transformers' rope_scaling; static NTK to a larger base.
    import dataclasses

    config = dataclasses.replace(TINY, rope_scaling={"type": kind, "factor": 4.0})
    params = init_params(config, jax.random.key(1))
    save_hf(config, params, tmp_path / "out")
    model = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _ids(config.vocab_size, (2, 40))
    assert_logits_close(GPTNeoX(config).apply({"params": params}, ids), hf_logits(model, ids))


def test_sharded_save_and_load(tmp_path):
    params = init_params(TINY, jax.random.key(1))
    save_hf(TINY, params, tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    config, loaded = load_hf(tmp_path / "sharded")
    assert config == TINY
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(params))
    model = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    ids = _ids(TINY.vocab_size, seed=1)
    assert_logits_close(GPTNeoX(TINY).apply({"params": params}, ids), hf_logits(model, ids))


def test_both_config_spellings(tmp_path):
    make_hf_model(tmp_path, rotary_pct=0.5, rotary_emb_base=777.0)
    cfg = json.loads((tmp_path / "config.json").read_text())
    new_config, _ = load_hf(tmp_path)
    # Rewrite with the pre-transformers-5 keys only.
    cfg.pop("rope_parameters", None)
    cfg.pop("rope_scaling", None)
    cfg.update(rotary_pct=0.5, rotary_emb_base=777.0)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    old_config, _ = load_hf(tmp_path)
    assert new_config == old_config
    assert old_config.rotary_pct == 0.5 and old_config.rotary_emb_base == 777.0


def test_legacy_buffers_are_ignored_and_bin_files_read(tmp_path):
    model = make_hf_model(num_hidden_layers=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(2):  # what checkpoints written by transformers < 4.3x carry
        state[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    config, params = load_hf(tmp_path / "bin")
    ids = _ids(config.vocab_size, seed=2)
    assert_logits_close(GPTNeoX(config).apply({"params": params}, ids), hf_logits(model, ids))


def test_bf16_weights_load(tmp_path):
    model = make_hf_model(tmp_path)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _, params = load_hf(tmp_path / "bf16", param_dtype="bfloat16")
    emb = model.gpt_neox.embed_in.weight.detach().float().numpy()
    assert params["embed_in"]["embedding"].dtype.name == "bfloat16"
    np.testing.assert_array_equal(params["embed_in"]["embedding"].astype(np.float32), emb)


def test_our_checkpoint_round_trip(tmp_path):
    params = init_params(TINY, jax.random.key(2))
    save_checkpoint(TINY, params, tmp_path / "ck")
    config, loaded = load_checkpoint(tmp_path / "ck")
    assert config == TINY
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    config2, _ = load_model(tmp_path / "ck")
    assert config2 == TINY
    with pytest.raises(FileExistsError):
        save_checkpoint(TINY, params, tmp_path / "ck")


# ----------------------------------------------------------------- bad input
def test_missing_and_foreign_directories(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope")
    with pytest.raises(ConversionError, match="no config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma"}))
    with pytest.raises(ConversionError, match="model_type='gemma'.*supported model types"):
        load_hf(tmp_path)
    with pytest.raises(UserError, match="neither"):
        load_model(tmp_path / ".." / tmp_path.name / "..")


def test_no_weights_and_missing_shard(tmp_path):
    model = make_hf_model()
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match="has no weights"):
        load_hf(tmp_path)
    index = {"weight_map": {"gpt_neox.embed_in.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="missing"):
        load_hf(tmp_path)


def test_wrong_shape_names_key_and_shapes(tmp_path):
    make_hf_model(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    key = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"
    state[key] = state[key][:, :10].copy()
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"dense_h_to_4h\.weight.*\(192, 10\).*\(192, 64\)"):
        load_hf(tmp_path)


def test_missing_and_unexpected_tensors(tmp_path):
    make_hf_model(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["gpt_neox.layers.0.attention.dense.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match="lacks 1 tensors.*layers.0.attention.dense.bias"):
        load_hf(tmp_path)
    state["gpt_neox.layers.0.attention.dense.bias"] = np.zeros(64, np.float32)
    state["model.layers.0.self_attn.q_proj.weight"] = np.zeros((4, 4), np.float32)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match="not part of a GPT-NeoX model"):
        load_hf(tmp_path)


def test_unknown_activation_in_config(tmp_path):
    make_hf_model(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_act"] = "swiglu_wrong"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Unknown hidden_act 'swiglu_wrong'"):
        load_hf(tmp_path)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "neox_jax.convert", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_round_trip_and_errors(tmp_path):
    make_hf_model(tmp_path / "hf")
    r = _cli(f"--src={tmp_path / 'hf'}", f"--dst={tmp_path / 'ours'}", "--to=neox")
    assert r.returncode == 0, r.stderr
    r = _cli(f"--src={tmp_path / 'ours'}", f"--dst={tmp_path / 'back'}", "--to=hf")
    assert r.returncode == 0, r.stderr
    back, original = _state(tmp_path / "back"), _state(tmp_path / "hf")
    assert set(back) == set(original)
    for k, v in original.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    # Bad source: one clear line, non-zero exit, nothing written.
    r = _cli(f"--src={tmp_path / 'missing'}", f"--dst={tmp_path / 'never'}", "--to=hf")
    assert r.returncode == 2
    assert "error:" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "never").exists()
    # Existing destination is never overwritten without --overwrite.
    r = _cli(f"--src={tmp_path / 'ours'}", f"--dst={tmp_path / 'back'}", "--to=hf")
    assert r.returncode == 2 and "not empty" in r.stderr
    # A failure half way (shape mismatch) leaves nothing at the destination.
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    state["embed_out.weight"] = state["embed_out.weight"][:5].copy()
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    r = _cli(f"--src={tmp_path / 'hf'}", f"--dst={tmp_path / 'partial'}", "--to=neox")
    assert r.returncode == 2 and "embed_out.weight" in r.stderr
    assert not (tmp_path / "partial").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".partial")]
