"""Fine-tuning through the real trainer: SFT source, full and LoRA, resume, export."""

import json
import shutil
import sys

import jax
import numpy as np
import peft
import pytest
import transformers
from helpers.finetune import write_char_tokenizer, write_jsonl
from helpers.hf_reference import assert_logits_close, hf_logits, make_hf_model
from helpers.train import REPO, logged

from neox_jax.convert import load_hf
from neox_jax.data.tokenizer import load_tokenizer
from neox_jax.finetune.chat import DEFAULT_CHAT_TEMPLATE, encode_chat
from neox_jax.finetune.export import export_run
from neox_jax.finetune.lora import LoraConfig, lora_apply_fn, merge
from neox_jax.finetune.trainer_hooks import trainer_hooks
from neox_jax.inference import Generator, SamplingParams
from neox_jax.loading import load_model
from neox_jax.model import GPTNeoX
from neox_jax.training.trainer import train_and_evaluate

STEPS = 160
# A tiny instruction set with deterministic answers (the experiment has a larger one).
PAIRS = [
    ("add 2 3", "5"),
    ("add 4 1", "5"),
    ("add 3 3", "6"),
    ("add 1 7", "8"),
    ("rev abc", "cba"),
    ("rev dog", "god"),
    ("rev star", "rats"),
    ("rev ab", "ba"),
    ("cap France", "Paris"),
    ("cap Italy", "Rome"),
    ("cap Peru", "Lima"),
    ("cap Japan", "Tokyo"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    base = root / "base"
    # Transformers' usual init scale (0.02), so a few dozen steps can fit the set.
    make_hf_model(base, initializer_range=0.1)
    write_char_tokenizer(base)
    records = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in PAIRS
    ]
    data = write_jsonl(root / "train.jsonl", records)
    return base, data


def sft_config(method, base, data, **overrides):
    sys.path.insert(0, str(REPO))
    from configs.finetune import get_config

    c = get_config(f"sft-{method}")
    c.model.update(dtype="float32", remat="none")
    c.data.update(
        sft_path=data, sft_eval_path=data, seq_len=64, global_batch_size=4, eval_batch_size=8
    )
    c.optimizer.update(lr=1e-2, warmup_steps=5)
    c.train.update(
        steps=STEPS,
        log_every=10,
        eval_every=STEPS,
        eval_batches=1,
        save_every=STEPS // 2,
        async_checkpoint=False,
        init_from=str(base),
    )
    c.lora.update(targets="query_key_value,dense,dense_h_to_4h,dense_4h_to_h", rank=8, dropout=0.0)
    c.update_from_flattened_dict(overrides)
    return c


def greedy_answers(model_config, params, tok_dir):
    tok = load_tokenizer(tok_dir)
    prompts = [encode_chat([{"role": "user", "content": q}], tok) for q, _ in PAIRS]
    gen = Generator(model_config, params, tok)
    results = gen.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
    return [r.text for r in results]


def test_full_sft_learns_the_instruction_set(setup, tmp_path):
    base, data = setup
    result = train_and_evaluate(sft_config("full", base, data), tmp_path, hooks=trainer_hooks)
    losses = logged(tmp_path)
    assert losses[STEPS] < 0.1 * losses[10], losses
    answers = greedy_answers(result["model_config"], result["state"].params, base)
    assert answers == [a for _, a in PAIRS]


def test_lora_sft_learns_resumes_exactly_and_exports(setup, tmp_path):
    base, data = setup
    run = tmp_path / "run"
    config = sft_config("lora", base, data)
    result = train_and_evaluate(config, run, hooks=trainer_hooks)
    record = json.loads((run / "lora.json").read_text())
    assert (
        record["init_from"] == str(base) and 0 < record["trainable_params"] < record["base_params"]
    )
    state, model_config = result["state"], result["model_config"]
    _, base_params = load_hf(base)
    # Only adapters were trained and checkpointed: the base in the state is the HF one.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), base_params)
    lora = LoraConfig.from_config(config.lora)
    merged = jax.device_get(merge(state.frozen, state.params, lora))
    assert greedy_answers(model_config, merged, base) == [a for _, a in PAIRS]
    # The sample printed after training (neox_jax.train) comes from the merged model too.
    from neox_jax.train import print_sample

    config.sample.update(prompt=PAIRS[0][0], temperature=0.0, max_new_tokens=6)
    expected = Generator(model_config, merged, load_tokenizer(base)).generate(
        [PAIRS[0][0]], SamplingParams(max_new_tokens=6, temperature=0.0)
    )
    assert print_sample(result, config) == expected[0].text

    # Resume: drop the last checkpoint; the run continues from the middle on the same curve.
    first = logged(run)
    shutil.rmtree(run / "checkpoints" / str(STEPS))
    train_and_evaluate(config, run, hooks=trainer_hooks)
    again = logged(run)
    resumed = range(STEPS // 2 + 10, STEPS + 1, 10)
    assert [again[s] for s in resumed] == [first[s] for s in resumed]

    # Export: the merged HF folder is the trained function; the PEFT adapter loads on the base.
    out = export_run(run, hf_out=str(tmp_path / "hf"), peft_out=str(tmp_path / "peft"))
    ids = np.random.default_rng(0).integers(3, 80, (2, 9))
    ours = lora_apply_fn(model_config, lora, deterministic=True)(
        state.params, state.frozen, ids, None, None, None
    )
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(out["hf"]).eval()
    assert_logits_close(hf_logits(hf, ids), ours)  # fp32 both sides: hf_reference's bound
    assert (out["hf"] / "tokenizer.json").is_file()
    # The export's tokenizer is ours in transformers, with the chat template the run used.
    hf_tok = transformers.AutoTokenizer.from_pretrained(out["hf"])
    assert hf_tok("cap Peru?")["input_ids"] == load_tokenizer(base).encode("cap Peru?")
    assert hf_tok.chat_template == DEFAULT_CHAT_TEMPLATE
    base_hf = transformers.GPTNeoXForCausalLM.from_pretrained(base).eval()
    assert_logits_close(hf_logits(peft.PeftModel.from_pretrained(base_hf, out["peft"]), ids), ours)
    # load_model (what sampling, evaluation and conversion read) merges a LoRA run too.
    loaded_config, loaded = load_model(run)
    assert loaded_config == model_config
    logits = GPTNeoX(loaded_config).apply({"params": loaded}, ids)
    # Merged weights vs the adapter forward: fp32 rounding of W + s·AB only.
    np.testing.assert_allclose(logits, ours, atol=1e-5, rtol=0)


def test_lora_run_refuses_other_settings_on_resume(setup, tmp_path):
    base, data = setup
    (tmp_path / "lora.json").write_text(json.dumps({"init_from": str(base), "lora": {}, "seed": 0}))
    with pytest.raises(ValueError, match="records a different LoRA run .*lora"):
        train_and_evaluate(sft_config("lora", base, data), tmp_path, hooks=trainer_hooks)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lora.targets": "c_attn"}, "matches no linear layer"),
        ({"lora.targets": "q_proj"}, "not layers of this gpt_neox model"),  # Llama's name
        ({"lora.rank": 65}, "exceeds the smaller side"),
        ({"data.sft_path": "/nonexistent.jsonl"}, "does not exist"),
        ({"data.sft_truncation": "middle"}, "Unknown data.sft_truncation"),
        ({"finetune.method": "qlora"}, "Unknown finetune.method"),
        ({"finetune.quantize_bits": 3}, "must be 0, 4 or 8"),
        ({"train.pipeline_microbatches": 2}, "pipelines the plain model"),
    ],
)
def test_bad_finetune_configs_fail_clearly(setup, tmp_path, overrides, message):
    base, data = setup
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train_and_evaluate(
            sft_config("lora", base, data, **overrides), tmp_path, hooks=trainer_hooks
        )


def test_qlora_trains_through_the_trainer_and_exports(setup, tmp_path):
    from neox_jax.quant import is_quantized

    base, data = setup
    config = sft_config("lora", base, data, **{"finetune.quantize_bits": 8, "train.steps": 20})
    result = train_and_evaluate(config, tmp_path / "run", hooks=trainer_hooks)
    frozen = result["state"].frozen
    assert is_quantized(frozen["layers"]["attention"]["query_key_value"]["kernel"])
    losses = logged(tmp_path / "run")
    assert losses[20] < losses[10]
    out = export_run(tmp_path / "run", hf_out=str(tmp_path / "hf"))
    lora = LoraConfig.from_config(config.lora)
    ids = np.random.default_rng(1).integers(3, 80, (1, 7))
    ours = lora_apply_fn(result["model_config"], lora, deterministic=True)(
        result["state"].params, frozen, ids, None, None, None
    )
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(out["hf"]).eval()
    # The merged weights are the dequantized base plus the update, so the export computes
    # what training computed, up to fp32 round-off (hf_reference's bound).
    assert_logits_close(hf_logits(hf, ids), ours)
