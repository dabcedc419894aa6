"""LoRA through the one training loop: the ``apply_fn`` / ``state_factory`` hooks.

``neox_jax.training.trainer.train_and_evaluate`` calls ``finetune_hooks(config, workdir)``
for a config with a ``finetune`` section, which returns ``lora_hooks`` when
``config.finetune.method == "lora"``. The train state then holds:

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
from typing import Any

import jax

from neox_jax.errors import load_json
from neox_jax.finetune.lora import (
    LoraConfig,
    LoraError,
    abstract_adapters,
    adapter_logical_axes,
    init_adapters,
    lora_apply_fn,
    trainable_fraction,
)
from neox_jax.model import ModelConfig, abstract_params, init_params, param_logical_axes
from neox_jax.training.metrics import say

RUN_RECORD = "lora.json"


def read_record(workdir: str | Path) -> dict[str, Any] | None:
    path = Path(workdir) / RUN_RECORD
    return load_json(path, "LoRA run record") if path.is_file() else None


def _quant_config(bits: int, group_size: int):
    from neox_jax.quant import QuantConfig

    return QuantConfig(bits=bits, group_size=group_size or None)


def resolve_base(config, workdir: str | Path) -> tuple[str, ModelConfig]:
    """``(init_from, model config)`` of a LoRA run, checked against its ``lora.json``."""
    from neox_jax.training.trainer import _peek_config

    record = read_record(workdir)
    init_from = config.train.init_from
    if init_from:
        init_from = str(Path(init_from).absolute())
    elif record and record.get("init_from"):
        init_from = record["init_from"]
        logging.info("LoRA base from %s: %s", RUN_RECORD, init_from)
    model_config = ModelConfig.from_dict(config.model.to_dict())
    if init_from:
        from neox_jax.quant import is_quantized_checkpoint

        if is_quantized_checkpoint(init_from):
            raise LoraError(
                f"train.init_from={init_from} is a quantized checkpoint; QLoRA quantizes a "
                "float base when it loads it: pass the float model and set "
                "finetune.quantize_bits."
            )
        model_config = model_config.with_architecture_of(_peek_config(init_from))
    if record is not None:
        lora = LoraConfig.from_config(config.lora).to_dict()
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
                f"{Path(workdir) / RUN_RECORD} records a different LoRA run ("
                + "; ".join(mismatch)
                + "). Resume with the recorded settings or use a new --workdir."
            )
    return init_from, model_config


def load_base(init_from: str, model_config: ModelConfig, shardings, seed: int, quant=None):
    """The frozen base on the mesh: loaded (float, then quantized if asked) or random."""
    from neox_jax.convert.checkpoint import load_model

    float_shardings = shardings if quant is None else _float_shardings(model_config, shardings)
    if not init_from:
        logging.warning("LoRA without train.init_from: the frozen base is a random model.")
        params = jax.jit(
            lambda: init_params(model_config, jax.random.PRNGKey(seed + 1)),
            out_shardings=float_shardings,
        )()
    elif (Path(init_from) / "config.json").is_file():  # Hugging Face: host numpy arrays
        _, host = load_model(init_from, param_dtype=model_config.param_dtype)
        params = jax.device_put(host, float_shardings)
    else:
        _, params = load_model(init_from, shardings=float_shardings)
    if quant is None:
        return params
    from neox_jax.quant import quantize_params

    return jax.jit(lambda p: quantize_params(model_config, p, quant), out_shardings=shardings)(
        params
    )


def _float_shardings(model_config: ModelConfig, quantized_shardings):
    # The float kernels shard as the model's rules say; take the mesh from any leaf.
    from neox_jax.parallel.rules import logical_to_sharding

    mesh = jax.tree.leaves(quantized_shardings)[0].mesh
    return logical_to_sharding(
        param_logical_axes(model_config), abstract_params(model_config), mesh
    )


def base_abstract_and_specs(model_config: ModelConfig, quant=None):
    """Shapes and logical specs of the (possibly quantized) frozen base."""
    specs = param_logical_axes(model_config)
    if quant is None:
        return abstract_params(model_config), specs
    from neox_jax.quant import abstract_quantized_params, quantized_logical_axes

    abstract = abstract_quantized_params(model_config, quant)
    return abstract, quantized_logical_axes(specs, abstract)


METHODS = ("full", "lora")


def finetune_hooks(config, workdir: str | Path, apply_fn=None):
    """The trainer's hooks for ``config.finetune``: LoRA's, or ``(apply_fn, None, None)``
    for full fine-tuning (the trainer's own path). Validates the section first."""
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
        return apply_fn, None, None
    return lora_hooks(config, workdir)


def lora_hooks(config, workdir: str | Path):
    """``(apply_fn, eval_apply_fn, state_factory)`` for ``train_and_evaluate``."""
    from neox_jax.training.state import abstract_train_state, init_train_state

    workdir = Path(workdir)
    lora = LoraConfig.from_config(config.lora)
    init_from, model_config = resolve_base(config, workdir)
    bits = config.finetune.quantize_bits
    quant = _quant_config(bits, config.finetune.quant_group_size) if bits else None
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
        frozen = load_base(init_from, model_config, shardings.frozen, config.train.seed, quant)
        if jax.process_index() == 0 and read_record(workdir) is None:
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
            (workdir / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
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
