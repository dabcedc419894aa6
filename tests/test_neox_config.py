"""GPT-NeoX YAML configs -> pretrain config (neox_jax/neox_compat/config.py).

The fixtures under tests/data/neox_configs/ are GPT-NeoX's own configs/pythia/*.yml and
configs/local_setup.yml (EleutherAI/gpt-neox), unchanged.
"""

import json
import math
import shlex
from pathlib import Path

import pytest
import yaml

from neox_jax.errors import UserError
from neox_jax.model.config import ModelConfig
from neox_jax.neox_compat.config import read_configs, translate
from neox_jax.training.optimizer import optimizer_from_config

DATA = Path(__file__).parent / "data" / "neox_configs"
SIZES = {  # GPT-NeoX file -> our preset
    "14M": "pythia-14m", "31M": "pythia-31m", "70M": "pythia-70m", "160M": "pythia-160m",
    "410M": "pythia-410m", "1B": "pythia-1b", "1-4B": "pythia-1.4b", "2-8B": "pythia-2.8b",
    "6-9B": "pythia-6.9b", "12B": "pythia-12b",
}  # fmt: skip
PYTHIA_BATCH = 1024  # every Pythia model: 1024 sequences of 2048 tokens (Pythia paper, Table 1)


def pretrain_config(overrides):
    import runpy

    config = runpy.run_path(str(Path(__file__).parents[1] / "configs" / "pretrain.py"))[
        "get_config"
    ]("pythia-70m")
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def neox_annealing_lr(step, lr, min_lr, warmup_frac, decay_iters, style):
    """GPT-NeoX's AnnealingLR.get_lr as its megatron/learning_rates.py describes it."""
    warmup_iter = warmup_frac * decay_iters
    if warmup_iter > 0 and step <= warmup_iter:
        return lr * max(1, step) / warmup_iter
    n, end = step - warmup_iter, decay_iters - warmup_iter
    if style == "cosine":
        value = min_lr + (lr - min_lr) / 2.0 * (math.cos(math.pi * n / end) + 1)
    elif style == "linear":
        value = lr * (end - n) / end
    else:
        value = lr
    return max(value, min_lr)


def _num_gpus(neox):
    """The GPU count that gives Pythia's batch of 1024 with this file's per-GPU numbers."""
    per_replica = neox["train_micro_batch_size_per_gpu"] * neox.get(
        "gradient_accumulation_steps", 1
    )
    mp, pp = neox["model_parallel_size"], max(1, neox["pipe_parallel_size"])
    return PYTHIA_BATCH // per_replica * mp * pp


@pytest.mark.parametrize("size", sorted(SIZES))
def test_pythia_config_gives_our_preset_and_neox_schedule(size):
    neox = read_configs([str(DATA / "pythia" / f"{size}.yml")])
    t = translate(neox, num_gpus=_num_gpus(neox))
    model = {k.split(".", 1)[1]: v for k, v in t.overrides.items() if k.startswith("model.")}
    ours = ModelConfig(**{k: v for k, v in model.items() if k != "dtype"})
    preset = ModelConfig.from_preset(SIZES[size])
    for field in ModelConfig.architecture_fields():
        assert getattr(ours, field) == getattr(preset, field), field
    assert t.overrides["data.global_batch_size"] == PYTHIA_BATCH
    assert t.overrides["train.microbatches"] == neox.get("gradient_accumulation_steps", 1)
    assert t.overrides["data.seq_len"] == 2048
    assert t.overrides["train.save_every"] == 1000
    assert "zero_optimization" in t.ignored
    saves = sorted(set(neox["extra_save_iters"]))  # Pythia: 0 and powers of two to 512
    assert t.overrides["train.extra_save_steps"] == ",".join(map(str, saves))

    _, schedule = optimizer_from_config(pretrain_config(t.overrides))
    opt = neox["optimizer"]["params"]
    steps = neox["train_iters"]
    warmup_end = int(neox["warmup"] * neox["lr_decay_iters"])
    for step in (0, 1, warmup_end, warmup_end + 1, steps // 2, steps - 1, steps):
        want = neox_annealing_lr(
            step, opt["lr"], neox["min_lr"], neox["warmup"], neox["lr_decay_iters"], "cosine"
        )
        # float32 schedule arithmetic vs the float64 reference: a few ulps of the lr.
        assert float(schedule(step)) == pytest.approx(want, rel=1e-5), step


def test_precision_from_fp16_block_and_bf16_type():
    fp16 = translate(read_configs([str(DATA / "pythia" / "160M.yml")]))
    bf16 = translate(read_configs([str(DATA / "pythia" / "1B.yml")]))  # fp16 {"type": "bfloat16"}
    assert fp16.overrides["model.dtype"] == bf16.overrides["model.dtype"] == "bfloat16"
    assert any("fp16" in n for n in fp16.notes)


def test_files_merge_and_train_flag_overrides_apply_on_top(capsys):
    from neox_jax.train import COMMAND

    parsed = COMMAND.parse([
        "neox_jax.train", f"--neox_config={DATA / 'pythia' / '160M.yml'}",
        f"--neox_config={DATA / 'local_setup.yml'}", "--neox_num_gpus=32",
        "--workdir=/tmp/unused", "--config.optimizer.lr=1e-4",
    ])  # fmt: skip
    config = parsed.config
    assert config.model.hidden_size == 768 and config.model.num_hidden_layers == 12
    assert config.data.paths == "data/enwik8/enwik8_text_document"  # from local_setup.yml
    assert config.data.source == "indexed"
    assert config.data.order == "neox"  # GPT-NeoX's own sample order, as the run had
    assert config.optimizer.lr == 1e-4  # the user's override wins
    assert config.optimizer.schedule == "neox"
    assert config.data.global_batch_size == 1024
    err = capsys.readouterr().err
    assert "ignored zero_optimization" in err
    assert config.train.extra_save_steps.startswith("0,1,2,4,8,")


# Two files merged, and what GPT-NeoX's NeoXArgs.from_ymls makes of them
# (megatron/neox_arguments/arguments.py): it stores each key with "-" read as "_", after
# checking the key *as written* against those stored, so a key written with "_" (or with
# neither) that is already set raises, and a dashed one replaces the earlier value.
MERGES = {
    "dashed_overrides": ("num-layers: 2\n", "num-layers: 4\n", {"num_layers": 4}),
    "dashed_overrides_underscored": ("num_layers: 2\n", "num-layers: 4\n", {"num_layers": 4}),
    "underscored_is_refused": ("num-layers: 2\n", "num_layers: 4\n", "'num_layers' is set in both"),
    "plain_is_refused": ("precision: fp16\n", "precision: bf16\n", "'precision' is set in both"),
    "same_file_dashed_last": ("train_iters: 1\ntrain-iters: 2\n", "lr: 1\n",
                              {"train_iters": 2, "lr": 1}),
    "same_file_underscored_last": ("train-iters: 1\ntrain_iters: 2\n", "lr: 1\n", "twice in"),
}  # fmt: skip


@pytest.mark.parametrize("case", MERGES)
def test_files_merge_as_gpt_neox_merges_them(tmp_path, case, caplog):
    first, second, want = MERGES[case]
    (tmp_path / "a.yml").write_text(first)
    (tmp_path / "b.yml").write_text(second)
    files = [str(tmp_path / "a.yml"), str(tmp_path / "b.yml")]
    if isinstance(want, str):
        with pytest.raises(UserError, match=want):
            read_configs(files)
        return
    assert read_configs(files) == want
    assert "replaces" in caplog.text  # a replaced value is never silent


def test_an_override_file_changes_a_pythia_config(tmp_path):
    """GPT-NeoX's way to change a published config: a later file with the dashed key;
    deepy.py's names without ".yml" work too."""
    (tmp_path / "deeper.yml").write_text("num-layers: 4\n")
    neox = read_configs([str(DATA / "pythia" / "160M"), str(tmp_path / "deeper.yml")])
    assert neox["num_layers"] == 4 and neox["hidden_size"] == 768  # the rest is 160M's
    assert translate(neox).overrides["model.num_hidden_layers"] == 4


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"data_path": "a", "train_data_paths": ["b"]}, "data_path and train_data_paths"),
        ({"lr": 0.1}, "lr=0.1 conflicts"),
        ({"bf16": {"enabled": True}}, "precision fields conflict"),
        ({"train_batch_size": 100}, "train_batch_size=100 conflicts"),
        ({"pos_emb": "learned"}, "pos_emb"),
        ({"norm": "scalenorm"}, "norm='scalenorm' changes the model"),
        ({"norm": "rmsnorm"}, "rmsnorm with activation='gelu'"),  # Llama-style needs gating
        ({"activation": "swiglu"}, "norm=layernorm with a gated activation"),
        ({"num_kv_heads": 4}, "norm=layernorm with num_kv_heads"),
        ({"intermediate_size": 3071}, "intermediate_size=3071.*cannot run"),  # odd: 3072 vs 3071
        ({"num_layers": "twelve"}, "num_layers='twelve' must be a whole number"),
        ({"optimizer": {"type": "SM3", "params": {}}}, "SM3"),
        ({"seq_length": 4096}, "exceeds max_position_embeddings"),
        ({"attention_config": [[["global"], 6], [["local"], 6]]}, r"uses \['local'\]"),
        ({"soft_prompt_tuning": {"enabled": True}}, "soft_prompt_tuning"),
        ({"pack_impl": "unpacked"}, "pack_impl='unpacked' is not supported"),
        ({"eod_mask_loss": True}, "eod_mask_loss=True changes the training loss"),
        ({"train_label_data_paths": ["x_label"]}, "train_label_data_paths.*loss"),
        ({"train_impl": "dpo"}, "train_impl='dpo' changes the training loss"),
        ({"curriculum_learning": {"enabled": True}}, "curriculum_learning"),
        ({"save_interval": 500}, "checkpoint_factor=1000 and save_interval=500 conflict"),
    ],
)
def test_conflicting_or_model_changing_fields_are_refused(extra, match):
    neox = {**read_configs([str(DATA / "pythia" / "160M.yml")]), **extra}
    with pytest.raises(UserError, match=match):
        translate(neox, num_gpus=32)


def test_unknown_key_is_listed_not_fatal():
    neox = {**read_configs([str(DATA / "pythia" / "160M.yml")]), "my_custom_knob": 3}
    t = translate(neox, num_gpus=32)
    assert t.unknown == ["my_custom_knob"]
    assert "unknown key my_custom_knob" in t.report()


def test_weighted_data_paths_and_linear_decay():
    neox = {
        **read_configs([str(DATA / "pythia" / "70M.yml")]),
        "train_data_paths": ["a", "b"], "train_data_weights": [1.0, 2.0],
        "valid_data_paths": ["v"], "lr_decay_style": "linear", "lr_decay_iters": 1000,
        "train_iters": 1200, "train_batch_size": 8,
    }  # fmt: skip
    t = translate(neox)
    assert t.overrides["data.paths"] == "a,b" and t.overrides["data.weights"] == "1.0,2.0"
    assert t.overrides["data.eval_paths"] == "v"
    _, schedule = optimizer_from_config(pretrain_config(t.overrides))
    for step in (0, 10, 500, 1000, 1100):
        want = neox_annealing_lr(step, 1e-3, 1e-4, 0.01, 1000, "linear")
        assert float(schedule(step)) == pytest.approx(want, rel=1e-5), step


def test_converter_prints_an_equivalent_command(capsys):
    from neox_jax.neox_config import COMMAND
    from neox_jax.train import COMMAND as TRAIN

    neox = [f"--neox_config={DATA / 'pythia' / '410M.yml'}", "--neox_num_gpus=32"]
    assert COMMAND(["neox_jax.neox_config", *neox]) == 0
    out = capsys.readouterr().out
    assert "--config.model.num_hidden_layers=24" in out
    command = shlex.split(out.replace("\\\n", " "))
    assert command[:3] == ["python", "-m", "neox_jax.train"]
    # The printed command gives the same training config as --neox_config itself.
    printed = TRAIN.parse(["neox_jax.train", *command[3:]]).config
    direct = TRAIN.parse(["neox_jax.train", "--workdir=RUN", *neox]).config
    assert printed.to_dict() == direct.to_dict()
    assert COMMAND(["neox_jax.neox_config", f"--neox_config={DATA / 'missing.yml'}"]) == 2
    assert "missing.yml does not exist" in capsys.readouterr().err


def test_neox_schedule_runs_inside_a_jitted_update():
    """The trainer jits the optimizer update, so the schedule sees a traced step count."""
    import jax
    import jax.numpy as jnp

    t = translate(read_configs([str(DATA / "pythia" / "70M.yml")]), num_gpus=32)
    tx, schedule = optimizer_from_config(pretrain_config(t.overrides))
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    # Adam's first update is -lr * sign(g) (bias-corrected m/sqrt(v) = 1 for constant g),
    # plus decoupled weight decay on the kernel; the bias has no decay.
    lr0 = float(schedule(0))
    assert lr0 == pytest.approx(1e-3 / 1430, rel=1e-5)  # GPT-NeoX: lr * max(1, 0) / warmup
    assert float(updates["bias"][0]) == pytest.approx(-lr0, rel=1e-4)
    assert float(jax.jit(schedule)(jnp.int32(71_500))) == pytest.approx(float(schedule(71_500)))


# GPT-NeoX's configs/llama2/7B.yml and 70B.yml (model part, verbatim but for the comments).
LLAMA2_7B = """
"pipe_parallel_size": 1
"model_parallel_size": 1
"make_vocab_size_divisible_by": 1
"num_layers": 32
"hidden_size": 4096
"intermediate_size": 32768
"num_attention_heads": 32
"seq_length": 4096
"max_position_embeddings": 4096
"pos_emb": "rotary"
"rotary_pct": 1
"no_weight_tying": true
"gpt_j_residual": false
"output_layer_parallelism": "column"
"norm": "rmsnorm"
"rms_norm_epsilon": 1.0e-5
"scaled_upper_triang_masked_softmax_fusion": true
"bias_gelu_fusion": false
"use_bias_in_norms": false
"use_bias_in_attn_linear": false
"activation": "swiglu"
"mlp_multiple_of": 256
"""
LLAMA2_70B = {
    "num_layers": 80,
    "hidden_size": 8192,
    "intermediate_size": 86016,
    "num_attention_heads": 64,
    "num_kv_heads": 8,
    "rotary_emb_base": 1000000,
}
# Meta's published widths (Hugging Face meta-llama/Llama-2-{7b,70b}-hf config.json): GPT-NeoX
# writes 3 x them (32768 ~ 3 x 11008) and its ParallelMLP keeps 2/3, rounded up to mlp_multiple_of.
LLAMA2_HF = {"7B": (11008, None), "70B": (28672, 8)}


@pytest.mark.parametrize("size", sorted(LLAMA2_HF))
def test_llama_configs_map_onto_our_llama_family(tmp_path, size):
    (tmp_path / "llama.yml").write_text(LLAMA2_7B)
    files = [str(tmp_path / "llama.yml")]
    if size == "70B":
        (tmp_path / "shape.yml").write_text(yaml.safe_dump(LLAMA2_70B))
        base = yaml.safe_load(LLAMA2_7B)  # the 70B file: 7B's keys with these values
        (tmp_path / "llama.yml").write_text(
            yaml.safe_dump({k: v for k, v in base.items() if k not in LLAMA2_70B})
        )
        files.append(str(tmp_path / "shape.yml"))
    t = translate(read_configs(files), num_gpus=8)
    assert t.unknown == [] and "use_bias_in_norms" in t.ignored
    model = {k.split(".", 1)[1]: v for k, v in t.overrides.items() if k.startswith("model.")}
    config = ModelConfig(**model)  # a valid model of our Llama family
    width, kv_heads = LLAMA2_HF[size]
    assert (config.model_type, config.norm_type, config.hidden_act) == ("llama", "rmsnorm", "silu")
    assert config.gated_mlp and not config.fused_qkv and not config.attention_bias
    assert config.intermediate_size == width
    assert config.num_key_value_heads == kv_heads
    assert config.layer_norm_eps == 1e-5 and config.rotary_pct == 1.0
    assert config.mlp_bias  # GPT-NeoX's use_bias_in_mlp defaults to true; this file keeps it
    assert not config.tie_word_embeddings and not config.use_parallel_residual
    assert config.vocab_size == 50257  # GPT-2 BPE (the default tokenizer), padded to 1


def test_mistral_sliding_window_and_inconsistent_width(tmp_path):
    base = {**yaml.safe_load(LLAMA2_7B), "num_kv_heads": 8, "sliding_window_width": 4096,
            "seq_length": 8192, "max_position_embeddings": 131072,
            "attention_config": [[["flash"], 32]]}  # fmt: skip
    base.pop("mlp_multiple_of")
    # GPT-NeoX's configs/mistral/7B.yml says 14336 (Mistral's width) with mlp_multiple_of 1:
    # ParallelMLP makes linear1 2 * 4779 wide and linear2 4778, so GPT-NeoX cannot build it.
    with pytest.raises(UserError, match="intermediate_size=14336.*43008"):
        translate({**base, "intermediate_size": 14336})
    t = translate({**base, "intermediate_size": 43008})
    model = {k.split(".", 1)[1]: v for k, v in t.overrides.items() if k.startswith("model.")}
    config = ModelConfig(**model)
    assert (config.model_type, config.intermediate_size, config.kv_heads) == ("mistral", 14336, 8)
    # flash_attn's window_size=(4096, -1): each query sees itself and 4096 keys before it;
    # GPT-NeoX's get_attn_mask (triu(diagonal=-4096)) gives its global layers the same.
    assert config.sliding_window == 4097
    for fusion in (False, True):
        unfused = {"attention_config": None, "scaled_upper_triang_masked_softmax_fusion": fusion}
        global_attn = translate({**base, "intermediate_size": 43008, **unfused})
        assert global_attn.overrides["model.sliding_window"] == 4097
        # The fused causal softmax kernel takes no mask: said, not hidden.
        assert any("ignores the attention mask" in n for n in global_attn.notes) == fusion


def test_defaults_and_known_keys_follow_gpt_neox(tmp_path):
    neox = read_configs([str(DATA / "pythia" / "70M.yml")])
    for key in ("weight_decay", "eval_interval", "eval_iters", "log_interval"):
        neox.pop(key)
    extra = {"layernorm_fusion": False, "te_fp8_mha": False, "finetune": True, "comment": "x",
             "loss_scale": 0, "init_method_std": 0.02, "use_shared_fs": True, "top_k": 0,
             "curriculum_learning": {"enabled": False}}  # fmt: skip
    t = translate({**neox, **extra}, num_gpus=32)
    assert t.overrides["optimizer.weight_decay"] == 0.1  # neox_args.py's defaults
    # They size GPT-NeoX's valid order too: (train_iters // 1000 + 1) * 100 batches.
    assert (t.overrides["train.eval_every"], t.overrides["train.eval_batches"]) == (1000, 100)
    assert t.overrides["train.log_every"] == 100
    assert t.unknown == [] and set(extra) - {"curriculum_learning"} <= set(t.ignored)
    numbers = translate({**neox, "train_iters": "1000", "min_lr": "1e-5"}, num_gpus=32)
    assert numbers.overrides["train.steps"] == 1000
    assert numbers.overrides["optimizer.min_lr_ratio"] == pytest.approx(1e-5 / 1e-3)


@pytest.mark.parametrize(
    "given, gpus, want",
    [  # GPT-NeoX's calculate_batch_parameters: (train_batch, micro, grad_acc) derived
        ({"train_batch_size": 1024, "train_micro_batch_size_per_gpu": 8}, 32, (1024, 4)),
        ({"train_batch_size": 1024, "gradient_accumulation_steps": 4}, 32, (1024, 4)),
        ({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2}, 32, (512, 2)),
        ({"train_batch_size": 256}, 32, (256, 1)),
    ],
)
def test_batch_parameters_derived_as_gpt_neox(given, gpus, want):
    neox = read_configs([str(DATA / "pythia" / "70M.yml")])
    neox.pop("train_micro_batch_size_per_gpu")
    neox.pop("gradient_accumulation_steps", None)
    t = translate({**neox, **given}, num_gpus=gpus)  # 70M: pipe 1 x model-parallel 1
    assert (t.overrides["data.global_batch_size"], t.overrides["train.microbatches"]) == want


@pytest.mark.parametrize(
    "extra, match",
    [  # values of the wrong type: a UserError naming the key, never a traceback
        ({"optimizer": "Adam"}, "optimizer='Adam' must be a mapping"),
        ({"fp16": True}, "fp16=True must be a mapping"),
        ({"train_iters": "lots"}, "train_iters='lots' must be a whole number"),
        ({"min_lr": [1]}, r"min_lr=\[1\] must be a number"),
        ({"make_vocab_size_divisible_by": 0}, "make_vocab_size_divisible_by=0 must be >= 1"),
        ({"extra_save_iters": 5}, "extra_save_iters=5 must be a list"),
        ({"split": "most,some"}, "split 'most,some' must be numbers"),
        ({"optimizer": {"type": "Adam", "params": {"betas": [0.9]}}}, "betas.*two numbers"),
        ({"optimizer": {"type": "Adam", "params": {"eps": "1.0e_8"}}}, "eps='1.0e_8'"),
        ({"precision": ["bf16"]}, "precision=.* must be a string"),
    ],
)
def test_values_of_the_wrong_type_are_named(extra, match):
    neox = {**read_configs([str(DATA / "pythia" / "160M.yml")]), "data_path": "d", **extra}
    with pytest.raises(UserError, match=match):
        translate(neox, num_gpus=32)


def test_yaml_strings_for_numbers_and_disabled_blocks_are_read():
    neox = read_configs([str(DATA / "pythia" / "160M.yml")])
    params = {"lr": "6e-4", "betas": ["0.9", 0.95], "eps": "1e-8"}  # YAML 1.1 reads 6e-4 as text
    extra = {"optimizer": {"type": "Adam", "params": params},
             "soft_prompt_tuning": {"enabled": False}, "checkpoint_factor": 1000.0,
             "train_data_weights": None}  # fmt: skip
    t = translate({**neox, **extra}, num_gpus=32)
    assert (t.overrides["optimizer.lr"], t.overrides["optimizer.eps"]) == (6e-4, 1e-8)
    assert t.overrides["optimizer.b1"] == 0.9 and t.overrides["train.save_every"] == 1000


@pytest.mark.parametrize(
    "tokenizer, make_file, padded",
    [  # GPT-NeoX's build_tokenizer sizes, padded to 128 x model_parallel_size (1 here)
        ({"tokenizer_type": "GPT2BPETokenizer"}, False, 50304),  # 50257
        ({"tokenizer_type": "HFGPT2Tokenizer"}, False, 50304),  # 50258: gpt2 + <|padding|>
        ({"tokenizer_type": "CharLevelTokenizer"}, False, 512),
        ({"tokenizer_type": "gpt2bpetokenizer"}, True, 256),  # any case; len(encoder.json)
        ({"tokenizer_type": "hftokenizer"}, True, 256),  # a tokenizer.json of 200 entries
    ],
)
def test_vocabulary_size_as_gpt_neox_builds_the_tokenizer(tmp_path, tokenizer, make_file, padded):
    neox = {k: v for k, v in read_configs([str(DATA / "pythia" / "70M.yml")]).items()
            if k not in ("tokenizer_type", "vocab_file")}  # fmt: skip
    if make_file:
        vocab = {f"t{i}": i for i in range(200)}
        if tokenizer["tokenizer_type"] == "hftokenizer":
            from tokenizers import Tokenizer, models

            Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(tmp_path / "v.json"))
        else:
            (tmp_path / "v.json").write_text(json.dumps(vocab))
        tokenizer = {**tokenizer, "vocab_file": str(tmp_path / "v.json")}
    t = translate({**neox, **tokenizer}, num_gpus=32)
    assert t.overrides["model.vocab_size"] == padded
    assert not any("tokenizer size unknown" in n for n in t.notes)


def test_older_mlp_type_llama_config():
    """GPT-NeoX before #1212 wrote Llama as mlp_type: llama, activation: silu, and sized
    its MLP 8/3 x hidden rounded up to 256 when intermediate_size is absent."""
    neox = {**yaml.safe_load(LLAMA2_7B), "mlp_type": "llama", "activation": "silu"}
    for key in ("intermediate_size", "mlp_multiple_of"):
        neox.pop(key)
    model = {k: v for k, v in translate(neox).overrides.items() if k.startswith("model.")}
    assert model["model.intermediate_size"] == 11008  # Llama-7B's published width
    assert model["model.gated_mlp"] and not model["model.mlp_bias"]
    with pytest.raises(UserError, match="mlp_type=llama gates its MLP itself"):
        translate({**neox, "activation": "swiglu"})


def _gpt2_pair(folder: Path, size: int = 300) -> None:
    """GPT-NeoX's gpt2-vocab.json + gpt2-merges.txt (GPT-2's format), of ``size`` tokens."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    text = [f"the fox {i} jumps over dog {i * 7}" for i in range(300)]
    bpe.train_from_iterator(text, vocab_size=size, show_progress=False,
                            special_tokens=["<|endoftext|>"])  # fmt: skip
    bpe.save_model(str(folder), prefix="gpt2")  # gpt2-vocab.json, gpt2-merges.txt


def test_gpt2_bpe_vocab_and_merge_files_are_the_runs_tokenizer(tmp_path):
    from neox_jax.data.tokenizer import load_tokenizer

    _gpt2_pair(tmp_path)
    neox = {k: v for k, v in read_configs([str(DATA / "pythia" / "70M.yml")]).items()
            if k not in ("tokenizer_type", "vocab_file")}  # fmt: skip
    files = {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": str(tmp_path / "gpt2-vocab.json"),
             "merge_file": str(tmp_path / "gpt2-merges.txt")}  # fmt: skip
    t = translate({**neox, **files}, num_gpus=32)
    assert t.overrides["data.tokenizer"] == files["vocab_file"]
    tok = load_tokenizer(t.overrides["data.tokenizer"])
    assert tok.vocab_size == 300 and t.overrides["model.vocab_size"] == 384  # padded to 128
    assert tok.eos_id == tok.token_to_id("<|endoftext|>")  # GPT-NeoX's eod

    # Merges somewhere load_tokenizer would not look: said, and no tokenizer set.
    elsewhere = tmp_path / "other" / "m.txt"
    t = translate({**neox, **files, "merge_file": str(elsewhere)}, num_gpus=32)
    assert "data.tokenizer" not in t.overrides
    assert any(f"merge_file {elsewhere}" in n and "copy it there" in n for n in t.notes)


def test_the_users_tokenizer_sizes_the_vocabulary(tmp_path, capsys):
    # local_setup.yml's vocab_file is not here; --config.data.tokenizer replaces it, and
    # its size (not the 20B tokenizer's assumed 50277) is padded into the model's rows.
    from neox_jax.train import COMMAND

    _gpt2_pair(tmp_path, size=270)
    parsed = COMMAND.parse([
        "neox_jax.train", f"--neox_config={DATA / 'pythia' / '160M.yml'}",
        f"--neox_config={DATA / 'local_setup.yml'}", "--neox_num_gpus=32",
        "--workdir=/tmp/unused", f"--config.data.tokenizer={tmp_path}/gpt2-vocab.json",
    ])  # fmt: skip
    assert parsed.config.model.vocab_size == 384  # 270 padded to 128
    assert parsed.config.data.tokenizer == f"{tmp_path}/gpt2-vocab.json"
    assert "tokenizer size unknown" not in capsys.readouterr().err
