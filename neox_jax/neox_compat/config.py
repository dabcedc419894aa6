"""GPT-NeoX YAML/JSON configs as neox_jax pretraining overrides.

    python -m neox_jax.neox_config --neox_config=pythia/160M.yml --neox_num_gpus=32
    python -m neox_jax.train --neox_config=pythia/160M.yml --neox_config=local_setup.yml \\
        --neox_num_gpus=32 --workdir=/tmp/run [--config.x=y ...]

Several files merge as GPT-NeoX's ``NeoXArgs.from_ymls`` merges them
(``neox_compat.files``): keys with ``-`` are read with ``_``; a key set again is an error
when written with ``_``, and overrides when written with ``-``. Every key is accounted for:
mapped onto a ``configs/pretrain.py`` field, ignored with the reason printed (DeepSpeed,
ZeRO, fusion and kernel knobs), or listed as unknown. A key that would change the model
into one neox_jax cannot build, and keys that contradict each other, raise ``UserError``.

Where GPT-NeoX derives a value, it is derived the same way here (megatron/neox_arguments):
the padded vocabulary (tokenizer size rounded up to ``make_vocab_size_divisible_by *
model_parallel_size``), the global batch (``train_micro_batch_size_per_gpu *
gradient_accumulation_steps * data-parallel size``), the precision (``precision`` or the
DeepSpeed ``fp16``/``bf16`` blocks) and GPT-NeoX's defaults for keys a file leaves out.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

from neox_jax.data.neox_order import split_ranges
from neox_jax.data.tokenizer import load_tokenizer
from neox_jax.data.tokenizer_files import gpt2_merges_beside
from neox_jax.errors import UserError
from neox_jax.neox_compat.files import read_configs
from neox_jax.neox_compat.model_config import KERNEL, model_fields
from neox_jax.neox_compat.values import coerce

# The config GPT-NeoX overrides apply to when no --config is given: every model field
# is overridden, the rest (mesh, remat, sampling) are a published size's defaults.
BASE_CONFIG = f"{Path(__file__).resolve().parents[2] / 'configs' / 'pretrain.py'}:pythia-70m"

_SYSTEM = "a DeepSpeed/launcher setting with no effect on what is computed"
_KERNEL = KERNEL
_PARALLEL = (
    "GPT-NeoX's GPU layout; choose ours with --config.mesh.* "
    "(used here only for vocab padding and the batch)"
)
_LOGGING = "logging/monitoring; neox_jax logs every train.log_every steps to tensorboard"
# Known keys with nothing to map, and why (printed every time they appear).
IGNORED = {
    **dict.fromkeys(("pipe_parallel_size", "model_parallel_size", "output_layer_parallelism",
                     "sequence_parallel", "num_gpus", "num_nodes", "global_num_gpus"), _PARALLEL),
    **dict.fromkeys(("zero_optimization", "zero_allow_untested_optimizer", "fp32_allreduce",
                     "distributed_backend", "data_impl", "num_workers", "launcher", "hostfile",
                     "deepspeed", "deepspeed_slurm", "deepspeed_mpi", "deepspeed_extra_args",
                     "data_types", "synchronize_each_layer", "partition_activations",
                     "checkpoint_validation_with_forward_pass", "amp", "comms_logger"), _SYSTEM),
    **dict.fromkeys(("scaled_upper_triang_masked_softmax_fusion", "scaled_masked_softmax_fusion",
                     "bias_dropout_fusion", "rope_fusion", "fp16_lm_cross_entropy",
                     "use_flash_attention", "layernorm_fusion", "rmsnorm_fusion",
                     "use_flashattn_swiglu", "rotary_save_freqs_buffer"), _KERNEL),
    "bias_gelu_fusion": _KERNEL + "; note GPT-NeoX's fused bias-GeLU is the tanh approximation, "
    "while the released Pythia/HF configs use exact gelu, which is what neox_jax uses",
    **dict.fromkeys(("log_interval_rank0", "steps_per_print", "wall_clock_breakdown",
                     "log_grad_norm", "log_param_norm", "log_gradient_noise_scale",
                     "log_optimizer_states", "tensorboard_dir", "log_dir", "use_wandb",
                     "wandb_project", "wandb_group", "wandb_team", "wandb_host",
                     "memory_profiling", "profile"), _LOGGING),
    "checkpoint_activations": "rematerialisation is model.remat (the base config's choice is kept)",
    "checkpoint_num_layers": "rematerialisation is model.remat (per block)",
    "save": "the run directory is --workdir",
    "load": "resume reads --workdir; start from other weights with --config.train.init_from",
    "test_data_paths": "neox_jax has no test split (train and eval only)",
    "test_data_weights": "neox_jax has no test split (train and eval only)",
    **dict.fromkeys(("autotuning", "autotuning_config", "comment", "no_ssh_check",
                     "force_multi", "master_port", "master_addr", "use_shared_fs",
                     "mmap_warmup", "local_rank", "rank", "world_size", "include", "exclude",
                     "account", "user_script", "fused_kernels_build_path", "lazy_mpu_init",
                     "use_cpu_initialization", "s3_path", "s3_chunk_size",
                     "pipe_partition_method", "checkpoint_in_cpu", "contiguous_checkpointing",
                     "deepspeed_activation_checkpointing", "activation_checkpointing",
                     "zero_stage", "zero_reduce_scatter", "zero_contiguous_gradients",
                     "zero_reduce_bucket_size", "zero_allgather_bucket_size",
                     "communication_data_type", "prescale_gradients",
                     "gradient_predivide_factor", "sparse_gradients", "elasticity",
                     "autotuning_run", "is_pipe_parallel", "config_files", "iteration",
                     "padded_vocab_size", "params", "batch_size", "optimizer_type",
                     "checkpoint", "exit_interval", "no_load_optim", "no_load_rng",
                     "no_save_optim", "no_save_rng", "use_checkpoint_lr_scheduler",
                     "override_lr_scheduler", "dump_state"), _SYSTEM),
    **dict.fromkeys(("loss_scale", "loss_scale_window", "hysteresis", "min_scale",
                     "dynamic_loss_scale"), "fp16 loss scaling; fp16 runs compute in bfloat16 "
                    "here, which needs none"),
    **dict.fromkeys(("apply_query_key_layer_scaling", "attention_softmax_in_fp32",
                     "onnx_safe"), "numerics only (same formula); neox_jax's softmax and "
                    "norms run in fp32"),
    "clip_grad": "Megatron's copy of gradient_clipping (mapped)",
    "init_method_std": "the std of GPT-NeoX's 'normal' init; neox_jax initialises with "
    "small_init/wang_init",
    "weighted_sampler_alpha": "only read with weight_by_num_documents (refused)",
    "z_loss": "only read by GPT-NeoX's reward-model training (train_impl, refused)",
    **dict.fromkeys(("text_gen_type", "temperature", "top_k", "top_p", "maximum_tokens",
                     "sample_input_file", "sample_output_file", "prompt_end", "eval_tasks",
                     "eval_results_prefix", "return_logits", "char_level_ppl", "recompute"),
                    "text generation/evaluation settings; see neox_jax.sample and lm_eval"),
    **dict.fromkeys(("tensorboard", "wandb", "wandb_run_name", "wandb_init_all_ranks",
                     "use_comet", "comet_workspace", "comet_project", "comet_experiment_name",
                     "comet_tags", "comet_others", "comet_experiment", "csv_monitor",
                     "flops_profiler", "git_hash", "memory_profiling_path",
                     "profile_step_start", "profile_step_stop", "profile_backward",
                     "log_grad_pct_zeros", "gradient_noise_scale_n_batches",
                     "gradient_noise_scale_cpu_offload", "peak_theoretical_tflops"), _LOGGING),
    "finetune": "GPT-NeoX's fine-tuning start (the `load` weights, step 0, a fresh optimizer); "
    "here: --config.train.init_from=<its global_stepN folder>",
    "use_bias_in_norms": "declared by GPT-NeoX but read nowhere: its LayerNorm always has a "
    "bias, its RMSNorm none, as neox_jax builds them",
    "use_bnb_optimizer": "bitsandbytes' 8-bit Adam states; neox_jax's AdamW keeps them in fp32",
    "split": "only read with data_path (train_data_paths name every split's files)",
    "hidden_dropout": "neox_jax has no dropout (every Pythia config sets 0)",
    "attention_dropout": "neox_jax has no dropout (every Pythia config sets 0)",
}  # fmt: skip
# GPT-NeoX keys that change which tokens each step sees, with the value data.order=neox
# reproduces; any other value is refused.
DATA_ORDER_KEYS = {"pack_impl": "packed", "weight_by_num_documents": False,
                   "dataset_impl": "gpt2", "train_epochs": None}  # fmt: skip
# GPT-NeoX keys that change the loss (its get_batch / train_impl), with the value neox_jax
# trains with; any other value is refused.
LOSS_KEYS = {
    "eod_mask_loss": False, "train_impl": "normal", "precompute_model_name": None,
    **dict.fromkeys((f"{pre}{split}_{kind}_data_paths" for pre in ("", "pos_", "neg_")
                     for split in ("train", "valid", "test") for kind in ("label", "reward")
                     if not (pre and kind == "reward")), None),
}  # fmt: skip
PRECISIONS = {"fp16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32"}


@dataclasses.dataclass
class Translation:
    """What a GPT-NeoX config becomes: ``overrides`` (dotted pretrain field -> value),
    and the keys ``ignored`` (key -> why), ``unknown`` and the ``notes`` on derived values."""

    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    ignored: dict[str, str] = dataclasses.field(default_factory=dict)
    unknown: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def flags(self) -> list[str]:
        """The overrides as ``--config.a.b=v`` command-line flags."""
        return [f"--config.{k}={_flag_value(v)}" for k, v in self.overrides.items()]

    def report(self) -> str:
        """Every ignored/unknown key with the reason, and the notes, one per line."""
        lines = [f"GPT-NeoX config: {len(self.overrides)} fields mapped."]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  ignored {k}: {why}" for k, why in sorted(self.ignored.items())]
        lines += [
            f"  unknown key {k} (not a GPT-NeoX key neox_jax knows; ignored)" for k in self.unknown
        ]
        return "\n".join(lines)


def _flag_value(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def _get(neox: dict, used: set, key: str, default=None):
    used.add(key)
    return neox.get(key, default)


def _precision(neox, used) -> str:
    """GPT-NeoX's ``calculate_derived`` precision: ``precision``, else the fp16/bf16 blocks."""
    precision = _get(neox, used, "precision")
    fp16, bf16 = _get(neox, used, "fp16") or {}, _get(neox, used, "bf16") or {}
    # Pythia 1B's fp16 block says {"enabled": true, "type": "bfloat16"}: bf16 in DeepSpeed.
    from_fp16 = (
        ("bfloat16" if fp16.get("type") == "bfloat16" else "fp16") if fp16.get("enabled") else None
    )
    from_bf16 = "bfloat16" if bf16.get("enabled") else None
    found = {p for p in (precision, from_fp16, from_bf16) if p}
    if len(found) > 1:
        raise UserError(
            f"GPT-NeoX precision fields conflict: precision={precision!r}, fp16={fp16}, "
            f"bf16={bf16}; keep one."
        )
    precision = found.pop() if found else "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"GPT-NeoX precision={precision!r}; supported: {list(PRECISIONS)}.")
    return precision


def _optimizer(neox, used, t: Translation) -> dict[str, Any]:
    opt = _get(neox, used, "optimizer") or {"type": "Adam", "params": {}}
    kind, params = str(opt.get("type", "Adam")), dict(opt.get("params") or {})
    if kind.lower() not in ("adam", "adamw"):
        raise UserError(
            f"GPT-NeoX optimizer type {kind!r} is not supported; neox_jax trains with AdamW."
        )
    lr, top_lr = params.pop("lr", None), _get(neox, used, "lr")
    if lr is not None and top_lr is not None and float(lr) != float(top_lr):
        raise UserError(f"GPT-NeoX lr={top_lr} conflicts with optimizer.params.lr={lr}; keep one.")
    lr = float(lr if lr is not None else top_lr if top_lr is not None else 6e-4)
    betas = params.pop("betas", [0.9, 0.999])
    out = {
        "optimizer.lr": lr,
        "optimizer.b1": float(betas[0]),
        "optimizer.b2": float(betas[1]),
        "optimizer.eps": float(params.pop("eps", 1e-8)),
        "optimizer.min_lr_ratio": float(_get(neox, used, "min_lr", 0.0)) / lr if lr else 0.0,
        # GPT-NeoX's default since its 2023-12 defaults update (#1107): 0.1
        "optimizer.weight_decay": float(_get(neox, used, "weight_decay", 0.1)),
        "optimizer.grad_clip": float(_get(neox, used, "gradient_clipping", 1.0)),
        "optimizer.schedule": "neox",
        "optimizer.decay_style": _get(neox, used, "lr_decay_style", "linear"),
        "optimizer.warmup_steps": -1,
        "optimizer.warmup_ratio": float(_get(neox, used, "warmup", 0.01)),
    }
    for key in params:
        t.ignored[f"optimizer.params.{key}"] = "not an AdamW setting neox_jax has"
    train_iters = _get(neox, used, "train_iters")
    decay_iters, fraction = (
        _get(neox, used, "lr_decay_iters"),
        _get(neox, used, "lr_decay_fraction"),
    )
    if decay_iters is None and fraction is not None and train_iters:
        decay_iters = math.floor(train_iters * fraction)
    out["optimizer.decay_steps"] = int(decay_iters) if decay_iters is not None else -1
    return out


def _batch(neox, used, t: Translation, num_gpus: int | None) -> dict[str, Any]:
    """GPT-NeoX's ``calculate_batch_parameters`` for the global batch and accumulation."""
    micro = _get(neox, used, "train_micro_batch_size_per_gpu")
    grad_acc = _get(neox, used, "gradient_accumulation_steps")
    train_batch = _get(neox, used, "train_batch_size")
    gpus = num_gpus or _get(neox, used, "global_num_gpus")
    dp = None
    if gpus:
        pp = max(1, _get(neox, used, "pipe_parallel_size", 0) or 0)
        mp = max(1, _get(neox, used, "model_parallel_size", 1) or 1)
        if gpus % (pp * mp):
            raise UserError(f"{gpus} GPUs do not divide into pipe {pp} x model-parallel {mp}.")
        dp = gpus // (pp * mp)
    if None not in (train_batch, micro, dp) and grad_acc is None:
        # GPT-NeoX derives the accumulation from the other two (integer division; the
        # check below refuses a batch that does not divide).
        grad_acc = max(1, int(train_batch) // int(micro) // dp)
    if train_batch is None and micro is not None and dp is not None:
        train_batch = micro * (grad_acc or 1) * dp
    elif None not in (train_batch, dp, micro) and train_batch != micro * (grad_acc or 1) * dp:
        raise UserError(
            f"GPT-NeoX train_batch_size={train_batch} conflicts with train_micro_batch_size_"
            f"per_gpu={micro} x gradient_accumulation_steps={grad_acc or 1} x data-parallel "
            f"{dp}; keep the three consistent or drop train_batch_size."
        )
    out = {}
    if train_batch is None:
        t.notes.append(
            "global batch unknown: GPT-NeoX derives it from the GPU count; pass "
            "--neox_num_gpus=N (train_micro_batch_size_per_gpu x gradient_accumulation_steps x "
            "data-parallel) or set train_batch_size; data.global_batch_size keeps the base config's"
        )
    else:
        out["data.global_batch_size"] = int(train_batch)
        out["data.eval_batch_size"] = int(train_batch)  # GPT-NeoX evaluates with train batches
    out["train.microbatches"] = int(grad_acc or 1)  # GPT-NeoX's default accumulation: 1
    return out


def _data(neox, used, t: Translation) -> dict[str, Any]:
    g = lambda key, default=None: _get(neox, used, key, default)  # noqa: E731
    out: dict[str, Any] = {}
    data_path, train_paths = g("data_path"), g("train_data_paths")
    if data_path and train_paths:
        raise UserError(
            "GPT-NeoX data_path and train_data_paths are both set; they conflict, keep one."
        )
    if data_path:
        split_text = str(g("split", "969, 30, 1"))
        split_ranges(split_text, 1)  # GPT-NeoX's get_train_valid_test_split_ rules, checked
        split = [float(x) for x in split_text.replace("/", ",").split(",")]
        out["data.paths"] = str(data_path)
        out["data.eval_fraction"] = split[1] / sum(split) if len(split) > 1 else 0.0
        out["data.neox_split"] = split_text.replace(" ", "")
        t.notes.append(f"split {split}: the test part is dropped (no test split in neox_jax)")
    elif train_paths:
        out["data.paths"] = ",".join(map(str, train_paths))
        out["data.neox_split"] = ""  # the paths form: every path whole, always blended
        weights = g("train_data_weights")
        if weights:
            if len(weights) != len(train_paths):
                raise UserError(
                    "GPT-NeoX train_data_weights must have one weight per train_data_paths entry."
                )
            out["data.weights"] = ",".join(map(str, weights))
        if g("valid_data_paths"):
            out["data.eval_paths"] = ",".join(map(str, g("valid_data_paths")))
            if g("valid_data_weights"):
                out["data.eval_weights"] = ",".join(map(str, g("valid_data_weights")))
    if "data.paths" in out:
        out["data.source"] = "indexed"
        out["data.order"] = "neox"  # GPT-NeoX's own sample order and index files
    # GPT-NeoX options that change which tokens each step sees, beyond what data.order=neox
    # reproduces: refused rather than trained in a different order without a word.
    for key, accepted in DATA_ORDER_KEYS.items():
        if g(key, accepted) != accepted:
            raise UserError(
                f"GPT-NeoX {key}={neox[key]!r} is not supported (neox_jax reproduces "
                f"{key}={accepted!r}); for weight_by_num_documents pass the weights as "
                "train_data_weights, for train_epochs set train_iters."
            )
    if (g("curriculum_learning") or {}).get("enabled"):
        raise UserError(
            "GPT-NeoX curriculum_learning (DeepSpeed's growing sequence length) changes what "
            "each step trains on; neox_jax trains every step at seq_length."
        )
    for key, accepted in LOSS_KEYS.items():
        if g(key, accepted) != accepted:
            raise UserError(
                f"GPT-NeoX {key}={neox[key]!r} changes the training loss (masked EOD "
                "positions, label or reward datasets, DPO/KTO/reward-model training); "
                f"neox_jax's pretraining loss is GPT-NeoX's with {key}={accepted!r}."
            )
    chopped = g("allow_chopped", True)
    if not isinstance(chopped, bool):
        raise UserError(f"GPT-NeoX allow_chopped must be true or false, got {chopped!r}.")
    # With pack_impl "packed" it names the index files only (data/neox_source.py).
    out["data.neox_allow_chopped"] = chopped
    vocab_file, kind = g("vocab_file"), g("tokenizer_type", "GPT2BPETokenizer")
    merge_file = g("merge_file")
    if vocab_file and str(kind).lower() in ("hftokenizer", "spmtokenizer"):
        out["data.tokenizer"] = str(vocab_file)
    elif vocab_file and str(kind).lower() == "gpt2bpetokenizer":
        # load_tokenizer finds GPT-2's merges beside the vocab file, by name.
        beside = gpt2_merges_beside(Path(vocab_file))
        if merge_file and not any(_same_path(merge_file, m) for m in beside):
            t.notes.append(
                f"merge_file {merge_file} is not where neox_jax looks for {vocab_file}'s "
                f"merges ({' or '.join(str(m) for m in beside)}): copy it there, or set "
                "data.tokenizer"
            )
        else:
            out["data.tokenizer"] = str(vocab_file)
    elif vocab_file:
        t.notes.append(f"{kind} files ({vocab_file}) are not read by neox_jax; set data.tokenizer")
    return out


def _same_path(a: str | Path, b: Path) -> bool:
    a = Path(a)
    if a.exists() and b.exists():
        return a.samefile(b)
    return a.absolute() == b.absolute()


def _train(neox, used, t: Translation) -> dict[str, Any]:
    g = lambda key, default=None: _get(neox, used, key, default)  # noqa: E731
    out: dict[str, Any] = {}
    if g("train_iters") is not None:
        out["train.steps"] = int(neox["train_iters"])
    factor, interval = g("checkpoint_factor"), g("save_interval")
    if factor is not None and interval is not None and factor != interval:
        raise UserError(
            f"GPT-NeoX checkpoint_factor={factor} and save_interval={interval} conflict."
        )
    if g("checkpoint_scale", "linear") != "linear":
        t.ignored["checkpoint_scale"] = "only linear checkpoint spacing (every train.save_every)"
    extra = g("extra_save_iters")
    if extra:
        out["train.extra_save_steps"] = ",".join(str(int(i)) for i in sorted(set(extra)))
    every = factor or interval
    if every:
        out["train.save_every"] = int(every)
    keep = g("keep_last_n_checkpoints")
    if keep:
        out["train.keep"] = int(keep)
    elif every:  # GPT-NeoX deletes no checkpoint unless told to
        out["train.keep_period"] = int(every)
        t.notes.append(
            "GPT-NeoX keeps every checkpoint: train.keep_period = save_every keeps them too"
        )
    # GPT-NeoX's defaults when absent (neox_args.py): they also size its valid order.
    for key, field, default in (("eval_interval", "eval_every", 1000),
                                ("eval_iters", "eval_batches", 100),
                                ("log_interval", "log_every", 100)):  # fmt: skip
        out[f"train.{field}"] = int(g(key, default))
    seed = g("seed", 1234)
    out["train.seed"], out["data.seed"] = int(seed), int(seed)
    return out


def translate(
    neox: dict[str, Any], *, num_gpus: int | None = None, tokenizer_vocab_size: int | None = None
) -> Translation:
    """Map merged GPT-NeoX args onto ``configs/pretrain.py`` fields (see the module doc)."""
    t, used = Translation(), set()
    neox = coerce(neox)
    model = model_fields(neox, lambda key, default=None: _get(neox, used, key, default), t,
                         tokenizer_vocab_size)  # fmt: skip
    t.overrides.update({f"model.{k}": v for k, v in model.items()})
    precision = _precision(neox, used)
    t.overrides["model.dtype"] = PRECISIONS[precision]
    if precision == "fp16":
        t.notes.append(
            "fp16 becomes bfloat16 compute: its fp32-range exponent needs no loss scaling"
        )
    t.overrides["data.seq_len"] = int(neox["seq_length"])
    for part in (_optimizer(neox, used, t), _batch(neox, used, t, num_gpus), _data(neox, used, t),
                 _train(neox, used, t)):  # fmt: skip
        t.overrides.update(part)
    for key in sorted(set(neox) - used):
        if key in IGNORED:
            t.ignored[key] = IGNORED[key]
        elif key.startswith("te_"):  # Transformer Engine's layers and fp8 recipe
            t.ignored[key] = (
                "a Transformer Engine (fp8) kernel choice; neox_jax computes in model.dtype"
            )
        else:
            t.unknown.append(key)
    return t


def expand_argv(argv: list[str]) -> list[str]:
    """Replace ``--neox_config=F`` (repeatable), ``--neox_num_gpus=N`` and
    ``--neox_vocab_size=N`` with the equivalent ``--config.*`` overrides, placed before the
    user's own flags so those apply on top; adds ``--config=<base>`` when absent. The
    report of ignored/unknown keys goes to stderr."""
    files, options, rest = [], {}, []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if name == "--neox_config" and eq:
            files.append(value)
        elif name in ("--neox_num_gpus", "--neox_vocab_size") and eq:
            try:
                options[name] = int(value)
            except ValueError as e:
                raise UserError(f"{name} takes an integer, got {value!r}.") from e
        else:
            rest.append(arg)
    if not files:
        if options:
            raise UserError(f"{', '.join(options)} needs --neox_config=FILE.yml")
        return list(argv)
    size = options.get("--neox_vocab_size")
    if size is None:  # the tokenizer the run will use, where the user named one
        size = _tokenizer_override_size(rest)
    t = translate(read_configs(files), num_gpus=options.get("--neox_num_gpus"),
                  tokenizer_vocab_size=size)  # fmt: skip
    print(t.report(), file=sys.stderr, flush=True)
    base = [a for a in rest if a.startswith("--config=")] or [f"--config={BASE_CONFIG}"]
    rest = [a for a in rest if not a.startswith("--config=")]
    # config_flags wants --config first; the user's --config.x=y come last, so they win.
    return [*base, *t.flags(), *rest]


def _tokenizer_override_size(argv: list[str]) -> int | None:
    """The size of the tokenizer a ``--config.data.tokenizer=X`` flag names, which replaces
    the GPT-NeoX config's vocab_file: the model's vocabulary pads it as GPT-NeoX pads its
    own. None when no such flag is given or it cannot be read here (the run then reports
    the tokenizer itself)."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith("--config.data.tokenizer=")]
    if not values or not values[-1]:
        return None
    try:
        return load_tokenizer(values[-1]).vocab_size
    except (OSError, ValueError, UserError):
        return None
