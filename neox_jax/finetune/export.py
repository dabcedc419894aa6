"""Export a fine-tuning run: the merged model as a Hugging Face folder, the adapter for PEFT.

    python -m neox_jax.finetune.export --config=configs/export.py --config.run=/runs/sft \\
        --config.hf_out=/out/merged --config.peft_out=/out/adapter
    python -m neox_jax.finetune.export --config=configs/export.py \\
        --config.base=/models/pythia-70m --config.peft_in=/adapters/a --config.hf_out=/out/merged

Every field of ``configs/export.py`` can be overridden; the old flags (``--run=
--hf_out= --peft_out= --base= --peft_in= --step= --dtype= --overwrite``) still work.

A LoRA run directory holds only adapters in its checkpoints; the base is found through
the run's ``lora.json`` (see ``neox_jax.finetune.trainer_hooks``). A full fine-tuning run
(no ``lora.json``) is a plain checkpoint and exports with ``--hf_out`` alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from neox_jax import cli, config_checks
from neox_jax.finetune.chat import run_chat_template
from neox_jax.finetune.lora import LoraConfig, LoraError, abstract_adapters, adapter_logical_axes
from neox_jax.finetune.lora import merge as merge_adapters
from neox_jax.finetune.trainer_hooks import (
    _quant_config,
    base_abstract_and_specs,
    load_base,
    read_record,
)
from neox_jax.model import ModelConfig


def _one_device_mesh() -> jax.sharding.Mesh:
    from neox_jax.parallel.mesh import AXES

    return jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape((1,) * len(AXES)), AXES)


def _shardings(abstract, specs, mesh):
    from neox_jax.parallel.rules import logical_to_sharding

    return logical_to_sharding(specs, abstract, mesh)


def load_lora_run(run_dir: str | Path, step: int | None = None):
    """Everything a LoRA run directory describes.

    Args:
      run_dir: the training workdir.
      step: which checkpoint; default the latest complete one.

    Returns:
      ``(model_config, base params, adapters, lora config, record)``; the base is
      quantized again when the run trained on a quantized base (QLoRA).
    """
    import orbax.checkpoint as ocp

    from neox_jax.convert.checkpoint import PARAMS, latest_step_dir

    run_dir = Path(run_dir).absolute()
    record = read_record(run_dir)
    if record is None:
        raise LoraError(f"{run_dir} has no lora.json: it is not a LoRA run directory.")
    model_config = ModelConfig.from_dict(record["model_config"])
    lora = LoraConfig(**record["lora"])
    bits = record.get("quantize_bits", 0)
    quant = _quant_config(bits, record.get("quant_group_size", 0)) if bits else None
    step_dir = run_dir / "checkpoints" / str(step) if step is not None else latest_step_dir(run_dir)
    if step_dir is None or not step_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint (step {step}).")
    mesh = _one_device_mesh()
    ad_abstract = abstract_adapters(model_config, lora)
    ad_shard = _shardings(ad_abstract, adapter_logical_axes(model_config, lora), mesh)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), ad_abstract, ad_shard
    )
    restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
        step_dir, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)})
    )
    base_abstract, base_specs = base_abstract_and_specs(model_config, quant)
    base_shard = _shardings(base_abstract, base_specs, mesh)
    base = load_base(record["init_from"], model_config, base_shard, record.get("seed", 0), quant)
    return model_config, base, restored[PARAMS], lora, record


def merged_params(base: dict[str, Any], adapters: dict[str, Any], lora: LoraConfig):
    """``merge`` under jit, fetched to host numpy arrays."""
    return jax.device_get(jax.jit(lambda b, a: merge_adapters(b, a, lora))(base, adapters))


def export_run(
    run_dir: str | Path,
    *,
    hf_out: str | None = None,
    peft_out: str | None = None,
    step: int | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write the merged Hugging Face model and/or the PEFT adapter of a run.

    Returns:
      ``{"hf": path, "peft": path}`` for what was written.
    """
    from neox_jax.convert import load_model, save_hf

    run_dir = Path(run_dir).absolute()
    tokenizer = run_dir / "tokenizer"
    tokenizer = tokenizer if tokenizer.is_dir() else None
    chat_template = run_chat_template(run_dir)
    out: dict[str, Path] = {}
    if read_record(run_dir) is None:  # full fine-tuning: the checkpoint is the model
        if peft_out:
            raise LoraError(f"{run_dir} is not a LoRA run; there is no adapter to export.")
        if hf_out:
            config, params = load_model(run_dir)
            out["hf"] = save_hf(
                config,
                jax.device_get(params),
                hf_out,
                dtype=dtype,
                tokenizer_dir=tokenizer,
                chat_template=chat_template,
                overwrite=overwrite,
            )
        return out
    model_config, base, adapters, lora, record = load_lora_run(run_dir, step)
    if hf_out:
        merged = merged_params(base, adapters, lora)
        out["hf"] = save_hf(
            model_config,
            merged,
            hf_out,
            dtype=dtype,
            tokenizer_dir=tokenizer,
            chat_template=chat_template,
            overwrite=overwrite,
        )
    if peft_out:
        from neox_jax.finetune.peft_format import save_peft_adapter

        out["peft"] = save_peft_adapter(
            model_config,
            jax.device_get(adapters),
            lora,
            peft_out,
            base_model_name_or_path=record.get("init_from") or "",
            overwrite=overwrite,
        )
    return out


def merge_peft(base: str, adapter: str, hf_out: str, *, dtype="float32", overwrite=False) -> Path:
    """Fold a PEFT adapter into a base model and write the result as a Hugging Face folder."""
    from neox_jax.convert import find_tokenizer, load_model, save_hf
    from neox_jax.finetune.peft_format import load_peft_adapter

    config, params = load_model(base)
    lora, adapters = load_peft_adapter(adapter, config, expected_base=base)
    merged = merged_params(params, adapters, lora)
    return save_hf(
        config, merged, hf_out, dtype=dtype, tokenizer_dir=find_tokenizer(base), overwrite=overwrite
    )


LEGACY_FLAGS = {
    n: n for n in ("run", "step", "base", "peft_in", "hf_out", "peft_out", "dtype", "overwrite")
}


def main(config) -> None:
    """Export as ``configs/export.py`` describes; prints what was written."""
    config_checks.export(config)
    for field in ("hf_out", "peft_out"):  # before anything is loaded
        if config[field]:
            config_checks.destination(config, field)
    if config.peft_in:
        written = {"hf": merge_peft(config.base, config.peft_in, config.hf_out,
                                    dtype=config.dtype, overwrite=config.overwrite)}  # fmt: skip
    else:
        written = export_run(
            config.run,
            hf_out=config.hf_out or None,
            peft_out=config.peft_out or None,
            step=None if config.step < 0 else config.step,
            dtype=config.dtype,
            overwrite=config.overwrite,
        )
    for kind, path in written.items():
        print(f"{kind}: {path}")


COMMAND = cli.Command(
    main, "neox_jax.finetune.export", default_config="export.py", legacy=LEGACY_FLAGS
)

if __name__ == "__main__":
    COMMAND.run()
