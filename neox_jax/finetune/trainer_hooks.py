"""Fine-tuning through the one training loop: the hooks its entry point hands the trainer.

``python -m neox_jax.train`` calls ``train_and_evaluate(config, workdir,
hooks=trainer_hooks)``; the trainer calls ``trainer_hooks(config, workdir)`` once the run
has started, and gets the SFT data (``data.source="sft"``) and, for
``config.finetune.method == "lora"``, LoRA's forward and train state (``lora_hooks``).
``training`` never imports this package. With LoRA the train state holds:

* ``params``: the adapters (trained, with AdamW moments, checkpointed as the ``params``
  item of every step directory);
* ``frozen``: the base model (no gradient, no optimizer state, never checkpointed: it is
  reloaded from its source on resume and export).

Where the base comes from, in order: ``train.init_from`` (a Hugging Face folder, one of
our checkpoints or a run directory); else the ``init_from`` recorded in the run's
``lora.json``; else a random model from ``train.seed`` (for tests). ``lora.json`` is written
in the workdir at the first start and records the base path, the LoRA settings, the base
quantization and the model config; a resume or an export reads it, and refuses a
different base or different LoRA settings.

QLoRA (Dettmers et al. 2023): ``finetune.quantize_bits`` = 8 or 4 quantizes the loaded base
with ``neox_jax.quant`` (round to nearest); ``Linear`` then dequantizes the frozen kernels
on the fly and adds the float adapters.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax

from neox_jax.finetune.lora import (
    LoraConfig,
    LoraError,
    abstract_adapters,
    adapter_logical_axes,
    init_adapters,
    lora_apply_fn,
    trainable_fraction,
)
from neox_jax.finetune.sft_data import make_sft_sources, resolve_sft
from neox_jax.loading import (
    LORA_RECORD,
    artifact_kind,
    find_tokenizer,
    load_lora_base,
    lora_quant_config,
    peek_config,
    read_lora_record,
)
from neox_jax.model import ModelConfig, abstract_params
from neox_jax.parallel.placement import param_logical_specs
from neox_jax.quant import QuantizationError, abstract_quantized_params
from neox_jax.training.data import check_source_fields
from neox_jax.training.metrics import say
from neox_jax.training.state import abstract_train_state, init_train_state
from neox_jax.training.trainer import TrainerHooks


def trainer_hooks(config, workdir: str | Path) -> TrainerHooks:
    """What the trainer needs for ``config`` beyond pretraining: the SFT data when
    ``data.source="sft"``, LoRA's hooks for a ``finetune`` section with method "lora"."""
    data_fn = sft_data if config.data.source == "sft" else None
    if "finetune" not in config:
        return TrainerHooks(data_fn=data_fn)
    apply_fn, eval_apply_fn, state_factory = finetune_hooks(config, workdir)
    return TrainerHooks(apply_fn, eval_apply_fn, state_factory, data_fn)


def sft_data(data_cfg, workdir: Path, init_from: str, global_batch: int):
    """``(tokenizer path, train source, eval source or None)`` for ``data.source="sft"``.

    The tokenizer: ``data.tokenizer``, else the one beside ``init_from`` (the model
    fine-tuning starts from), else the copy a previous start left in the workdir.
    """
    check_source_fields(data_cfg)
    found = (
        find_tokenizer(init_from) if init_from else None,  # a local path or a Hub id
        find_tokenizer(Path(workdir) / "tokenizer"),
    )
    tokenizer = resolve_sft(data_cfg, found)
    return (tokenizer, *make_sft_sources(data_cfg, tokenizer, global_batch))


def resolve_base(config, workdir: str | Path) -> tuple[str, ModelConfig]:
    """``(init_from, model config)`` of a LoRA run, checked against its ``lora.json``."""
    record = read_lora_record(workdir)
    init_from = config.train.init_from
    if init_from:
        init_from = str(Path(init_from).absolute())
    elif record and record.get("init_from"):
        init_from = record["init_from"]
        logging.info("LoRA base from %s: %s", LORA_RECORD, init_from)
    model_config = ModelConfig.from_dict(config.model.to_dict())
    if init_from:
        if artifact_kind(init_from) == "quantized":
            raise LoraError(
                f"train.init_from={init_from} is a quantized checkpoint; QLoRA quantizes a "
                "float base when it loads it: pass the float model and set "
                "finetune.quantize_bits."
            )
        model_config = model_config.with_architecture_of(peek_config(init_from))
    if record is not None:
        lora = LoraConfig.from_config(config.lora, model_config).to_dict()
        mismatch = []
        if (record.get("init_from") or "") != (init_from or ""):
            mismatch.append(f"base {record.get('init_from')!r} vs {init_from!r}")
        if record["lora"] != lora:
            mismatch.append(f"lora {record['lora']} vs {lora}")
        if record.get("quantize_bits", 0) != config.finetune.quantize_bits:
            mismatch.append(
                f"quantize_bits {record.get('quantize_bits')} vs {config.finetune.quantize_bits}"
            )
        if not init_from and record.get("seed") != config.train.seed:
            mismatch.append(f"random-base seed {record.get('seed')} vs {config.train.seed}")
        if mismatch:
            raise LoraError(
                f"{Path(workdir) / LORA_RECORD} records a different LoRA run ("
                + "; ".join(mismatch)
                + "). Resume with the recorded settings or use a new --workdir."
            )
    return init_from, model_config


def base_abstract_and_specs(model_config: ModelConfig, quant=None):
    """Shapes and logical specs of the (possibly quantized) frozen base."""
    if quant is None:
        abstract = abstract_params(model_config)
    else:
        abstract = abstract_quantized_params(model_config, quant)
    return abstract, param_logical_specs(model_config, abstract)


METHODS = ("full", "lora")


def finetune_hooks(config, workdir: str | Path):
    """``(apply_fn, eval_apply_fn, state_factory)`` for ``config.finetune``: LoRA's, or
    Nones for full fine-tuning (the trainer's own path). Validates the section first."""
    method, bits = config.finetune.method, config.finetune.quantize_bits
    if method not in METHODS:
        raise LoraError(f"Unknown finetune.method {method!r}; choose from {METHODS}.")
    if bits not in (0, 4, 8):
        raise LoraError(f"finetune.quantize_bits must be 0, 4 or 8, got {bits}.")
    if method == "full":
        if bits:
            raise LoraError(
                "finetune.quantize_bits quantizes a frozen base, which full fine-tuning does "
                "not have; use finetune.method='lora' (QLoRA) or quantize_bits=0."
            )
        return None, None, None
    return lora_hooks(config, workdir)


def lora_hooks(config, workdir: str | Path):
    """``(apply_fn, eval_apply_fn, state_factory)`` for ``train_and_evaluate``."""
    workdir = Path(workdir)
    init_from, model_config = resolve_base(config, workdir)
    lora = LoraConfig.from_config(config.lora, model_config)
    bits = config.finetune.quantize_bits
    quant = lora_quant_config(bits, config.finetune.quant_group_size)
    if quant is not None:  # before training starts, in the trainer's own flag names
        try:
            abstract_quantized_params(model_config, quant)
        except QuantizationError as e:
            raise LoraError(
                f"QLoRA cannot quantize this base with finetune.quantize_bits={bits}, "
                f"finetune.quant_group_size={config.finetune.quant_group_size} (0: the "
                f"default): {e} Set --config.finetune.quant_group_size to such a size."
            ) from e
    n_lora, n_base, frac = trainable_fraction(model_config, lora)
    say(
        f"LoRA r={lora.rank} alpha={lora.alpha:g} on {','.join(lora.targets)}: {n_lora:,} "
        f"trainable of {n_base:,} base parameters ({100 * frac:.4f}%)"
    )

    def state_factory(tx, mesh, ckpt):
        base_abstract, base_specs = base_abstract_and_specs(model_config, quant)
        abstract, shardings = abstract_train_state(
            tx,
            abstract_adapters(model_config, lora),
            adapter_logical_axes(model_config, lora),
            mesh,
            abstract_frozen=base_abstract,
            frozen_specs=base_specs,
        )
        frozen = load_lora_base(init_from, model_config, shardings.frozen, config.train.seed, quant)
        if jax.process_index() == 0 and read_lora_record(workdir) is None:
            record = {
                "init_from": init_from,
                "lora": lora.to_dict(),
                "quantize_bits": bits,
                "quant_group_size": config.finetune.quant_group_size,
                "seed": config.train.seed,
                "model_config": model_config.to_dict(),
                "trainable_params": n_lora,
                "base_params": n_base,
            }
            (workdir / LORA_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        allow = config.train.get("allow_model_change", False)
        resumed = ckpt.restore_latest(abstract, model_config, allow_model_change=allow)
        if resumed is not None:
            state, latest = resumed
            logging.info("Resumed LoRA adapters from step %d in %s", latest, ckpt.directory)
            return state.replace(frozen=frozen), model_config, latest, f"resume:{latest}", shardings
        state = init_train_state(
            lambda rng: init_adapters(model_config, lora, rng),
            tx,
            shardings,
            config.train.seed,
            frozen=frozen,
        )
        origin = f"lora:{init_from or 'random base'}"
        return state, model_config, 0, origin, shardings

    apply_fn = lora_apply_fn(model_config, lora)
    eval_apply_fn = lora_apply_fn(model_config, lora, deterministic=True)
    return apply_fn, eval_apply_fn, state_factory
