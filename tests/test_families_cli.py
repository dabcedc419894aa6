"""The command lines a user runs, on each non-GPT-NeoX family and a mixture of experts.

``python -m neox_jax.train --config=configs/finetune.py:sft-lora`` is run in-process
(``COMMAND([prog, *flags])``) on transformers-written folders: Llama with GQA, Qwen2 with
tied embeddings and q/k/v biases, Mistral with a sliding window shorter than the
sequences, and Qwen3-MoE. The merged export is read back by transformers and compared
with the run as every entry point loads it (``load_model``).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from helpers.finetune import write_char_tokenizer, write_jsonl
from helpers.train import REPO
from test_families import make_family_model
from test_moe import make_moe_model

from neox_jax import quantize, train
from neox_jax.convert import ConversionError, save_hf
from neox_jax.convert import __main__ as convert_cli
from neox_jax.finetune import export
from neox_jax.loading import load_model
from neox_jax.model import GPTNeoX, ModelConfig, init_params

# (builder, transformers overrides, the attention projections PEFT names for the class)
FAMILIES = {
    "llama-gqa": (make_family_model, ("llama", dict(num_key_value_heads=1))),
    "qwen2-tied-bias": (make_family_model, ("qwen2", dict(tie_word_embeddings=True))),
    "mistral-window": (make_family_model, ("mistral", dict(sliding_window=6))),
    "qwen3-moe": (make_moe_model, ("qwen3_moe", {})),
}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
RECORDS = [
    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for q, a in [("add 2 3", "5"), ("rev abc", "cba"), ("cap Peru", "Lima"), ("add 1 1", "2")]
]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    make, (model_type, overrides) = FAMILIES[request.param]
    make(model_type, root / "hf", initializer_range=0.1, **overrides)
    write_char_tokenizer(root / "hf")
    return root, write_jsonl(root / "train.jsonl", RECORDS)


def _sft(root, data, workdir, *flags):
    return train.COMMAND([
        "train", f"--config={REPO / 'configs' / 'finetune.py'}:sft-lora", f"--workdir={workdir}",
        f"--config.train.init_from={root / 'hf'}", f"--config.data.sft_path={data}",
        "--config.data.seq_len=32", "--config.data.global_batch_size=2",
        "--config.data.eval_batch_size=2", "--config.train.steps=2", "--config.train.save_every=2",
        "--config.train.eval_every=2", "--config.train.eval_batches=1",
        "--config.model.dtype=float32", "--config.model.remat=none",
        "--config.train.async_checkpoint=False", "--config.optimizer.lr=1e-2", *flags,
    ])  # fmt: skip


def test_sft_lora_with_the_defaults_on_each_family(family, tmp_path, capsys):
    """The README's fine-tuning command with its default targets adapts the family's own
    attention projections; a sample longer than the model's context (128) is shortened,
    not an error after a finished run; the merged export gives the run's logits in
    transformers (float32 both sides, only summation order differs: 1e-4 of the largest)."""
    root, data = family
    run = tmp_path / "run"
    rc = _sft(root, data, run, "--config.sample.prompt=add", "--config.sample.max_new_tokens=500")
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    assert "sampling 125 tokens" in out.out  # 128 positions minus the 3-token prompt
    assert tuple(json.loads((run / "lora.json").read_text())["lora"]["targets"]) == ATTENTION
    config, params = load_model(str(run))
    rc = export.COMMAND([
        "export", f"--config={REPO / 'configs' / 'export.py'}", f"--config.run={run}",
        f"--config.hf_out={tmp_path / 'merged'}",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err[-2000:]
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "hf")
    ids = np.random.default_rng(0).integers(3, 80, (1, 20))  # longer than the window (6)
    with torch.no_grad():
        want = merged(torch.tensor(ids)).logits.numpy()
        before = base(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(jax.jit(GPTNeoX(config).apply)({"params": params}, ids))
    scale = np.abs(want).max()
    assert np.abs(ours - want).max() <= 1e-4 * scale
    assert np.abs(want - before).max() > 1e-3 * scale  # the adapters trained: not the base


def test_qlora_group_size_error_names_the_training_flag(tmp_path, capsys):
    """Qwen3-MoE's expert down projection reads 24 inputs: int4 groups of 16 cannot
    cover it. The refusal comes before training and names the trainer's own field."""
    make_moe_model("qwen3_moe", tmp_path / "hf")
    write_char_tokenizer(tmp_path / "hf")
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    rc = _sft(
        tmp_path, data, tmp_path / "run", "--config.finetune.quantize_bits=4",
        "--config.finetune.quant_group_size=16",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert "--config.finetune.quant_group_size" in err and "divides 24" in err, err
    assert "--config.group_size" not in err  # neox_jax.quantize's flag, not the trainer's
    assert not list((tmp_path / "run").glob("checkpoints/*"))


def test_moe_expert_adapters_refuse_peft_before_writing_anything(tmp_path, capsys):
    """``lora.targets=all`` on Qwen3-MoE adapts attention and every expert; PEFT cannot
    hold expert adapters, so an export asking for both folders writes neither (the
    merged one is not left behind by a failed command) and says how to get the merged."""
    make_moe_model("qwen3_moe", tmp_path / "hf")
    write_char_tokenizer(tmp_path / "hf")
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    run = tmp_path / "run"
    rc = _sft(tmp_path, data, run, "--config.lora.targets=all", "--config.lora.dropout=0.0",
              "--config.train.steps=1", "--config.train.save_every=1")  # fmt: skip
    assert rc == 0, capsys.readouterr().err[-2000:]
    experts = ("experts.gate_proj", "experts.up_proj", "experts.down_proj")
    record = json.loads((run / "lora.json").read_text())
    assert tuple(record["lora"]["targets"]) == ATTENTION + experts
    rc = export.COMMAND([
        "export", f"--config={REPO / 'configs' / 'export.py'}", f"--config.run={run}",
        f"--config.hf_out={tmp_path / 'merged'}", f"--config.peft_out={tmp_path / 'peft'}",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "PEFT has no module" in err and "--config.hf_out" in err, err
    assert not (tmp_path / "merged").exists() and not (tmp_path / "peft").exists()


def quantize_int8(src, dst, capsys):
    """``neox_jax.quantize`` (int8, the config's defaults) of ``src`` into ``dst``."""
    rc = quantize.COMMAND([
        "quantize", f"--config={REPO / 'configs' / 'quantize.py'}",
        f"--config.src={src}", f"--config.dst={dst}",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err


@pytest.mark.parametrize("to", ["hf", "neox"])
def test_convert_refuses_a_quantized_checkpoint(tmp_path, capsys, to):
    """int8 codes and scales are no float model: converting them is refused by name
    (not a list of tensors the config does not expect), and nothing is written."""
    make_family_model("llama", tmp_path / "hf")
    quantize_int8(tmp_path / "hf", tmp_path / "int8", capsys)
    rc = convert_cli.COMMAND([
        "convert", f"--config={REPO / 'configs' / 'convert.py'}",
        f"--config.src={tmp_path / 'int8'}", f"--config.dst={tmp_path / 'out'}",
        f"--config.to={to}",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "is a quantized checkpoint" in err and "float model" in err, err
    assert not (tmp_path / "out").exists()


TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [
        dict(num_key_value_heads=2, fused_qkv=False),  # the docs' training-flag example
        dict(norm_type="rmsnorm"),
        dict(gated_mlp=True, mlp_bias=False),
        dict(sliding_window=4),  # transformers would load it and attend to everything
        dict(num_experts=4, num_experts_per_tok=2, gated_mlp=True, mlp_bias=False),
    ],
)
def test_gpt_neox_with_family_options_is_refused_as_a_gpt_neox_folder(tmp_path, options):
    """A gpt_neox model trained with another family's option (a documented training
    flag) has no GPTNeoXForCausalLM: the export names the option and the way out
    instead of failing on a missing tensor name or writing a folder transformers
    would run as a different model."""
    config = ModelConfig(**TINY, **options)
    params = jax.device_get(init_params(config, jax.random.PRNGKey(0)))
    first = next(iter(options))
    with pytest.raises(ConversionError, match=rf"{first}=.*model_type=llama"):
        save_hf(config, params, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_full_training_refuses_a_quantized_init_from(family, tmp_path, capsys):
    """sft-full from an int8 checkpoint: refused by name before training (it failed
    deep in the state's sharding with a pytree error); nothing is saved."""
    root, data = family
    if not (root / "int8").exists():
        quantize_int8(root / "hf", root / "int8", capsys)
    rc = train.COMMAND([
        "train", f"--config={REPO / 'configs' / 'finetune.py'}:sft-full",
        f"--workdir={tmp_path / 'run'}", f"--config.train.init_from={root / 'int8'}",
        f"--config.data.sft_path={data}", "--config.data.seq_len=32",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "is a quantized checkpoint" in err and "float model" in err, err
    assert not list((tmp_path / "run").glob("checkpoints/*"))
