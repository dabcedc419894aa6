"""PEFT interop: our adapters load in peft + transformers, peft's load in ours, same logits."""

import json
import shutil

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from helpers.hf_reference import assert_logits_close, hf_logits, make_hf_model

from neox_jax.convert import load_hf, save_hf
from neox_jax.finetune.lora import LoraConfig, LoraError, init_adapters, lora_apply_fn, merge
from neox_jax.finetune.peft_format import load_peft_adapter, save_peft_adapter

ALL = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "base"
    make_hf_model(path)
    config, params = load_hf(path)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 11))
    return path, config, params, ids


def _fresh_hf(path):
    return transformers.GPTNeoXForCausalLM.from_pretrained(path).eval()


def _ours(config, lora, adapters, params, ids):
    return jax.jit(lora_apply_fn(config, lora, deterministic=True))(
        adapters, params, ids, None, None, None
    )


@pytest.fixture(scope="module")
def exported(base, tmp_path_factory):
    path, config, params, ids = base
    lora = LoraConfig(targets=ALL, rank=4, alpha=8.0)
    adapters = init_adapters(config, lora, jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(1), 8))
    # Non-zero B (and a larger A), so a transposition or scale mistake changes the logits.
    adapters = jax.tree.map(
        lambda x: np.asarray(0.3 * jax.random.normal(next(keys), x.shape)), adapters
    )
    out = tmp_path_factory.mktemp("adapter") / "ours"
    save_peft_adapter(config, adapters, lora, out, base_model_name_or_path=str(path))
    return out, lora, adapters


def test_our_adapter_loads_in_peft_with_the_same_logits(base, exported, tmp_path):
    path, config, params, ids = base
    out, lora, adapters = exported
    ours = _ours(config, lora, adapters, params, ids)
    assert (
        np.abs(ours - _ours(config, lora, jax.tree.map(np.zeros_like, adapters), params, ids)).max()
        > 0.1
    )
    ref = hf_logits(peft.PeftModel.from_pretrained(_fresh_hf(path), out).eval(), ids)
    # Both fp32 with different kernels: hf_reference's 1e-5 of the largest logit.
    assert_logits_close(ours, ref)
    # The merged model, written as a Hugging Face folder, is the same function in torch.
    save_hf(config, jax.device_get(merge(params, adapters, lora)), tmp_path / "merged")
    assert_logits_close(hf_logits(_fresh_hf(tmp_path / "merged"), ids), ref)


def test_peft_made_adapter_imports_with_the_same_logits(base, tmp_path):
    path, config, params, ids = base
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        lora_dropout=0.1,
        use_rslora=True,
        init_lora_weights="gaussian",
        target_modules=["query_key_value", "dense", "dense_4h_to_h"],
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(_fresh_hf(path), cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; make the adapter do something
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.eval()
    ref = hf_logits(model, ids)
    model.save_pretrained(tmp_path / "theirs")
    lora, adapters = load_peft_adapter(tmp_path / "theirs", config, expected_base=str(path))
    assert lora.targets == ("query_key_value", "dense", "dense_4h_to_h")
    assert lora.rslora and lora.scale == 16 / 2 and lora.dropout == 0.1
    assert_logits_close(_ours(config, lora, adapters, params, ids), ref)


def _variant(src, dst, config_edit=None):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(config_edit or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_adapter_for_another_base_is_refused(base, exported, tmp_path):
    path, config, _, _ = base
    out = exported[0]
    narrower = config.replace(hidden_size=32, intermediate_size=96)
    with pytest.raises(LoraError, match=r"has shape \(4, 64\).*needs \(4, 32\).*different base"):
        load_peft_adapter(out, narrower)
    with pytest.raises(LoraError, match="adapts layer 1, but the model has 1 layers"):
        load_peft_adapter(out, config.replace(num_hidden_layers=1))
    with pytest.raises(LoraError, match="made for '.*/base', not 'EleutherAI/pythia-70m'"):
        load_peft_adapter(out, config, expected_base="EleutherAI/pythia-70m")
    with pytest.raises(LoraError, match="DoRA"):
        load_peft_adapter(_variant(out, tmp_path / "dora", {"use_dora": True}), config)
    with pytest.raises(LoraError, match="rank_pattern"):
        load_peft_adapter(_variant(out, tmp_path / "rp", {"rank_pattern": {"dense": 2}}), config)
    other = _variant(out, tmp_path / "llama")
    from safetensors.numpy import save_file

    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros(
                (4, 64), np.float32
            )
        },
        str(other / "adapter_model.safetensors"),
    )
    with pytest.raises(LoraError, match="not a LoRA weight of a GPT-NeoX block"):
        load_peft_adapter(other, config)
