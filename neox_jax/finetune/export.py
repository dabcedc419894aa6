"""Export a fine-tuning run: the merged model as a Hugging Face folder, the adapter for PEFT.

    python -m neox_jax.finetune.export --run=/runs/sft --hf_out=/out/merged --peft_out=/out/adapter
    python -m neox_jax.finetune.export --base=/models/pythia-70m --peft_in=/adapters/a \\
        --hf_out=/out/merged

A LoRA run directory holds only adapters in its checkpoints; the base is found through
the run's ``lora.json`` (see ``neox_jax.finetune.trainer_hooks``). A full fine-tuning run
(no ``lora.json``) is a plain checkpoint and exports with ``--hf_out`` alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import jax
import numpy as np

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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m neox_jax.finetune.export")
    parser.add_argument("--run", help="training workdir (LoRA or full fine-tuning)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--base", help="with --peft_in: the base model folder")
    parser.add_argument("--peft_in", help="a PEFT adapter folder to merge into --base")
    parser.add_argument("--hf_out", help="write the merged model here (Hugging Face format)")
    parser.add_argument("--peft_out", help="write the adapter here (PEFT format)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.peft_in:
        if not (args.base and args.hf_out):
            parser.error("--peft_in needs --base and --hf_out")
        print(
            merge_peft(
                args.base, args.peft_in, args.hf_out, dtype=args.dtype, overwrite=args.overwrite
            )
        )
        return
    if not args.run or not (args.hf_out or args.peft_out):
        parser.error("pass --run and at least one of --hf_out / --peft_out")
    try:
        written = export_run(
            args.run,
            hf_out=args.hf_out,
            peft_out=args.peft_out,
            step=args.step,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        parser.exit(2, f"error: {e}\n")
    for kind, path in written.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
