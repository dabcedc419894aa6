"""Hugging Face folders written by transformers and peft (not by us), through the one
artifact loader (``neox_jax.loading.load_model``).

Every folder here comes from ``save_pretrained`` of a tiny random transformers model (or
peft's adapter on one), in the layouts and with the config options that real hub
checkpoints use: sharded safetensors, sharded ``pytorch_model*.bin`` with their index,
fp16/bf16 weights, every RoPE type transformers' GPT-NeoX accepts, Qwen's per-layer
sliding-window rule. The reference is transformers itself reading the same folder in
fp32 (``from_pretrained(..., dtype=float32)``), so a mistake in how we read a file or a
config key shows up as a logit difference. Folders we cannot run are refused with a
message naming what is wrong, and nothing is written.
"""

import json
import shutil

import numpy as np
import peft
import pytest
import torch
import transformers
from helpers.hf_reference import (
    assert_logits_close,
    hf_logits,
    make_hf_model,
    random_peft_model,
)
from test_families import make_family_model

from neox_jax.convert import ConversionError, save_hf
from neox_jax.errors import UserError
from neox_jax.loading import artifact_kind, find_tokenizer, load_model, peek_config
from neox_jax.model import GPTNeoX


def _ids(vocab, length=11, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (2, length)).astype(np.int32)


def _reference(path, ids):
    """transformers' fp32 logits for the folder at ``path``, read by transformers."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return hf_logits(model, ids)


def _ours(path, ids):
    config, params = load_model(path)
    return np.asarray(GPTNeoX(config).apply({"params": params}, ids))


def _assert_same_model(path, length=11):
    config = peek_config(path)
    ids = _ids(config.vocab_size, length)
    # Both fp32 from the same stored weights: hf_reference's 1e-5 of the largest logit
    # (round-off of different kernels; any formula or layout mistake is far larger).
    assert_logits_close(_ours(path, ids), _reference(path, ids))


# ------------------------------------------------------------------ GPT-NeoX layouts
# (name, make_hf_model overrides, save_pretrained kwargs, length of the ids)
# max_position_embeddings=32 and 48 ids: the RoPE scalings act past the trained context.
NEOX = {
    "sharded-safetensors": (dict(), dict(max_shard_size="20KB"), 11),
    "tied-sequential-no-bias": (
        dict(tie_word_embeddings=True, use_parallel_residual=False, attention_bias=False),
        dict(),
        11,
    ),
    "half-rotary-odd-vocab": (dict(rotary_pct=0.5, vocab_size=91), dict(), 11),
    "rope-linear": (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), dict(), 48),
    "rope-dynamic": (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), dict(), 48),
    "rope-yarn": (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), dict(), 48),
    "rope-llama3-full-rotary": (
        dict(
            rotary_pct=1.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        dict(),
        48,
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(NEOX))
def test_gpt_neox_folder_gives_transformers_logits(case, tmp_path):
    overrides, save, length = NEOX[case]
    model = make_hf_model(max_position_embeddings=32, **overrides)
    model.save_pretrained(tmp_path, **save)
    if "max_shard_size" in save:
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
        assert (tmp_path / "model.safetensors.index.json").is_file()
    _assert_same_model(tmp_path, length)


@pytest.mark.parametrize("case", ["rope-dynamic", "rope-yarn"])
def test_gpt_neox_rope_types_export_back_to_transformers(case, tmp_path):
    """save_hf writes the RoPE type it read, so transformers runs the export as it ran
    the original (beyond the trained context, where the scalings act)."""
    overrides, _, length = NEOX[case]
    make_hf_model(tmp_path / "hf", max_position_embeddings=32, **overrides)
    save_hf(*load_model(tmp_path / "hf"), tmp_path / "back")
    ids = _ids(peek_config(tmp_path / "hf").vocab_size, length)
    # The same fp32 weights in both folders, run by transformers: round-off only.
    assert_logits_close(_reference(tmp_path / "back", ids), _reference(tmp_path / "hf", ids))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(dtype, tmp_path):
    """Weights saved in fp16/bf16 (config.json's dtype says so) read exactly as stored."""
    make_hf_model().to(dtype).save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored.get("dtype", stored.get("torch_dtype")) == str(dtype).split(".")[1]
    _assert_same_model(tmp_path)


def test_sharded_pytorch_bin_with_index(tmp_path):
    """``pytorch_model-0000k-of-0000n.bin`` + ``pytorch_model.bin.index.json``, the layout of
    older hub checkpoints (transformers 5 writes only safetensors, so the shards are made
    here the way transformers 4 wrote them: torch.save of parts of the state dict)."""
    model = make_hf_model()
    model.config.save_pretrained(tmp_path)
    state = model.state_dict()
    names = sorted(state)
    parts = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for k, part in enumerate(parts):
        file = f"pytorch_model-{k + 1:05d}-of-00002.bin"
        torch.save({n: state[n].clone() for n in part}, tmp_path / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    _assert_same_model(tmp_path)


# ------------------------------------------------------------------ other families
# Qwen's window covers the layers from max_window_layers on (transformers' Qwen2Config),
# so a window "used" with max_window_layers = all layers windows none of them.
FAMILY = {
    "qwen2-window-on-no-layer": ("qwen2", dict(sliding_window=4, use_sliding_window=True,
                                               max_window_layers=2)),
    "qwen2-window-every-layer": ("qwen2", dict(sliding_window=4, use_sliding_window=True,
                                               max_window_layers=0)),
    "qwen2-tied-head-dim": ("qwen2", dict(tie_word_embeddings=True, head_dim=8)),
    "llama-yarn-eps": ("llama", dict(rms_norm_eps=1e-2, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8})),
    "mistral-no-window-head-dim": ("mistral", dict(sliding_window=None, head_dim=32)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FAMILY))
def test_family_folder_gives_transformers_logits(case, tmp_path):
    model_type, overrides = FAMILY[case]
    make_family_model(model_type, tmp_path, max_position_embeddings=32, **overrides)
    _assert_same_model(tmp_path, length=20)  # longer than the window of 4


def test_qwen2_window_on_every_layer_exports_to_transformers(tmp_path):
    """save_hf of a windowed Qwen2 writes a config.json transformers reads as the same
    window on every layer (max_window_layers=0), not as no window at all."""
    make_family_model("qwen2", tmp_path / "hf", sliding_window=4, use_sliding_window=True,
                      max_window_layers=0)  # fmt: skip
    config, params = load_model(tmp_path / "hf")
    assert config.sliding_window == 4
    save_hf(config, params, tmp_path / "back")
    back = transformers.AutoConfig.from_pretrained(tmp_path / "back")
    assert back.layer_types == ["sliding_attention"] * 2 and back.sliding_window == 4
    _assert_same_model(tmp_path / "back", length=20)


def test_mixed_window_layers_are_refused_naming_the_layers(tmp_path):
    make_family_model("qwen2", tmp_path, sliding_window=4, use_sliding_window=True,
                      max_window_layers=1)  # fmt: skip
    with pytest.raises(ConversionError, match=r"mixes sliding and full.*max_window_layers=1"):
        load_model(tmp_path)


# ------------------------------------------------------------------ what config.json says
def _edited(base, dst, **edit):
    shutil.copytree(base, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in edit.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def neox_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("neox") / "hf"
    make_hf_model(path)
    return path


def test_unknown_keys_and_no_generation_config_still_load(neox_folder, tmp_path):
    path = _edited(neox_folder, tmp_path / "m", custom_key={"a": 1}, quantization_config=None,
                   _commit_hash="abc", auto_map={"AutoConfig": "x.Y"})  # fmt: skip
    (path / "generation_config.json").unlink(missing_ok=True)
    _assert_same_model(path)
    assert find_tokenizer(path) is None  # no tokenizer needed to load the weights


@pytest.mark.parametrize(
    "edit, message",
    [
        (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
         r"model_type='gpt2' \(architectures=\['GPT2LMHeadModel'\]\).*supported model types:"
         r".*'gpt_neox' \(GPTNeoXForCausalLM\).*'llama'"),
        (dict(model_type=None), r"no model_type \(architectures=\['GPTNeoXForCausalLM'\]\)"),
        (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}),
         r"rope_type='longrope'.*supported: 'default', 'linear', 'dynamic'"),
        (dict(quantization_config={"quant_method": "gptq", "bits": 4}),
         r"quantization_config \(quant_method='gptq'\).*float checkpoint"),
    ],
)  # fmt: skip
def test_configs_we_cannot_run_are_refused_by_name(neox_folder, tmp_path, edit, message):
    path = _edited(neox_folder, tmp_path / "m", **edit)
    with pytest.raises(ConversionError, match=message):
        load_model(path)


@pytest.mark.parametrize("cls", ["GPTNeoXForSequenceClassification", "GPTNeoXModel"])
def test_a_model_without_the_lm_head_is_refused_by_architecture(cls, tmp_path):
    """A classifier or a bare decoder saved by transformers: no LM head to generate with."""
    config = make_hf_model().config
    config.num_labels = 3
    getattr(transformers, cls)(config).save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match=rf"architecture '{cls}'.*not a causal.*"
                       r"GPTNeoXForCausalLM for model_type='gpt_neox'"):  # fmt: skip
        peek_config(tmp_path)


def test_truncated_safetensors_is_named_and_convert_writes_nothing(neox_folder, tmp_path):
    from neox_jax.convert.__main__ import COMMAND

    path = tmp_path / "cut"
    shutil.copytree(neox_folder, path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"model.safetensors is truncated"):
        load_model(path)
    flags = [f"--config.src={path}", f"--config.dst={tmp_path / 'out'}", "--config.to=neox"]
    assert COMMAND(["neox_jax.convert", *flags]) == 2
    assert not (tmp_path / "out").exists()


class _NotATensor:  # what a pickled checkpoint may carry besides tensors
    pass


@pytest.mark.parametrize("damage", ["truncated", "foreign object"])
def test_unreadable_pytorch_bin_is_named_and_convert_writes_nothing(damage, tmp_path):
    from neox_jax.convert.__main__ import COMMAND

    model = make_hf_model()
    model.config.save_pretrained(tmp_path / "bin")
    state = dict(model.state_dict())
    if damage == "foreign object":
        state["extra"] = _NotATensor()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    if damage == "truncated":
        data = (tmp_path / "bin" / "pytorch_model.bin").read_bytes()
        (tmp_path / "bin" / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    message = {
        "truncated": r"pytorch_model.bin is truncated or not a PyTorch checkpoint",
        "foreign object": r"pytorch_model.bin holds objects other than tensors \(e.g. "
        r".*_NotATensor\).*does not unpickle",
    }[damage]
    with pytest.raises(ConversionError, match=message):
        load_model(tmp_path / "bin")
    flags = [f"--config.src={tmp_path / 'bin'}", f"--config.dst={tmp_path / 'out'}"]
    assert COMMAND(["neox_jax.convert", *flags, "--config.to=neox"]) == 2  # a user error
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ PEFT adapters
def _peft_adapter(base, out, targets, base_name=None, safe=True):
    """A LoRA adapter written by peft itself, with non-zero B so it changes the logits
    (``safe=False``: as older peft wrote it, a torch pickle ``adapter_model.bin``)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM")
    model = random_peft_model(model, cfg)
    model.save_pretrained(out, safe_serialization=safe)
    if base_name is not None:
        adapter_config = json.loads((out / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = base_name
        (out / "adapter_config.json").write_text(json.dumps(adapter_config))
    return model


@pytest.mark.parametrize(
    "family, targets",
    [("gpt_neox", ["query_key_value", "dense_4h_to_h"]), ("llama", ["q_proj", "v_proj"])],
)
def test_peft_adapter_folder_loads_merged_onto_its_base(family, targets, tmp_path):
    base = tmp_path / "base"
    if family == "gpt_neox":
        make_hf_model(base)
    else:
        make_family_model(family, base)
    shutil.copy(_tokenizer_json(tmp_path), base / "tokenizer.json")  # serves the adapter
    model = _peft_adapter(base, tmp_path / "adapter", targets)
    shutil.copy(base / "config.json", tmp_path / "adapter")  # as some trainers leave it
    assert artifact_kind(tmp_path / "adapter") == "peft"
    assert peek_config(tmp_path / "adapter") == peek_config(base)
    assert find_tokenizer(tmp_path / "adapter") == base
    ids = _ids(peek_config(base).vocab_size)
    ref = hf_logits(model, ids)
    assert np.abs(ref - _reference(base, ids)).max() > 0.1  # the adapter does something
    assert_logits_close(_ours(tmp_path / "adapter", ids), ref)


def test_peft_adapter_with_a_relative_or_missing_base(neox_folder, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(neox_folder, base)
    model = _peft_adapter(base, tmp_path / "adapter", ["dense"], base_name="base")
    ids = _ids(peek_config(base).vocab_size)
    # "base" names the folder beside the adapter (peft records the path as it was given).
    assert_logits_close(_ours(tmp_path / "adapter", ids), hf_logits(model, ids))
    _peft_adapter(base, tmp_path / "lost", ["dense"], base_name=str(tmp_path / "gone"))
    with pytest.raises(UserError, match=r"base model of the adapter .*'.*gone'.*does not exist"):
        load_model(tmp_path / "lost")


def test_peft_adapter_saved_as_a_torch_pickle(neox_folder, tmp_path):
    """Older peft wrote ``adapter_model.bin``; it is read with ``weights_only=True``, and a
    pickle holding other objects is refused by name, the folder left as it was."""
    model = _peft_adapter(neox_folder, tmp_path / "adapter", ["dense"], safe=False)
    assert sorted(p.name for p in (tmp_path / "adapter").glob("adapter_model*")) == [
        "adapter_model.bin"
    ]
    ids = _ids(peek_config(neox_folder).vocab_size)
    assert_logits_close(_ours(tmp_path / "adapter", ids), hf_logits(model, ids))
    state = torch.load(tmp_path / "adapter" / "adapter_model.bin", weights_only=True)
    torch.save({**state, "extra": _NotATensor()}, tmp_path / "adapter" / "adapter_model.bin")
    before = (tmp_path / "adapter" / "adapter_model.bin").read_bytes()
    with pytest.raises(UserError, match=r"adapter_model\.bin holds objects other than tensors"):
        load_model(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.bin").read_bytes() == before


def _tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(32)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path / "tokenizer.json"


# ------------------------------------------------------------------ tokenizer files
CORPUS = ["the quick brown fox jumps over the lazy dog", "naïve café in Zürich, 東京 12345"] * 20
TEXTS = ["the lazy café", "東京 fox!", "  two  spaces ", "unseen ωmega <|im_start|>x"]


def _unigram_fast():
    """A Unigram tokenizer (T5/Llama-2-style metaspace) trained here, wrapped as
    transformers' PreTrainedTokenizerFast with its special tokens and one added token."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    raw = Tokenizer(models.Unigram())
    raw.normalizer = normalizers.NFKC()
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    specials = ["<pad>", "</s>", "<unk>", "<s>"]
    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=specials, unk_token="<unk>")
    raw.train_from_iterator(CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="</s>", bos_token="<s>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    return fast


def _assert_same_tokenizer(folder):
    from neox_jax.data.tokenizer import load_tokenizer

    ours, ref = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        ids = ref(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids)
    assert (ours.eos_id, ours.bos_id, ours.pad_id) == (
        ref.eos_token_id,
        ref.bos_token_id,
        ref.pad_token_id,
    )
    return ours


def test_tokenizer_saved_by_transformers(tmp_path):
    _unigram_fast().save_pretrained(tmp_path)
    assert _assert_same_tokenizer(tmp_path).eos_id is not None


def test_special_tokens_named_only_in_special_tokens_map(tmp_path):
    """Older exports name eos/bos/pad only in special_tokens_map.json (transformers reads
    it after tokenizer_config.json, so it also wins over a differing entry there)."""
    _unigram_fast().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    specials = {k: config.pop(k) for k in ("eos_token", "bos_token", "pad_token")}
    config["eos_token"] = "<unk>"  # overridden by the map
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    specials["pad_token"] = {"content": specials["pad_token"], "special": True}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(specials))
    ours = _assert_same_tokenizer(tmp_path)
    assert ours.id_to_token(ours.eos_id) == "</s>"
