"""Export a fine-tuning run: the merged model as a Hugging Face folder, the adapter for PEFT.

    python -m neox_jax.finetune.export --config=configs/export.py --config.run=/runs/sft \\
        --config.hf_out=/out/merged --config.peft_out=/out/adapter
    python -m neox_jax.finetune.export --config=configs/export.py \\
        --config.base=/models/pythia-70m --config.peft_in=/adapters/a --config.hf_out=/out/merged

Every field of ``configs/export.py`` can be overridden; the old flags (``--run=
--hf_out= --peft_out= --base= --peft_in= --step= --dtype= --overwrite``) still work.

A LoRA run directory holds only adapters in its checkpoints; the base is found through
the run's ``lora.json`` (``neox_jax.loading.load_lora_run`` reads it). A full fine-tuning run
(no ``lora.json``) is a plain checkpoint and exports with ``--hf_out`` alone.
"""

from __future__ import annotations

from pathlib import Path

import jax

from neox_jax import cli, config_checks
from neox_jax.convert import save_hf
from neox_jax.finetune.chat import run_chat_template
from neox_jax.finetune.lora import LoraError
from neox_jax.finetune.peft_format import (
    check_peft_exportable,
    load_peft_adapter,
    save_peft_adapter,
)
from neox_jax.loading import (
    find_tokenizer,
    load_lora_run,
    load_model,
    merged_params,
    read_lora_record,
)


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
    run_dir = Path(run_dir).absolute()
    tokenizer = run_dir / "tokenizer"
    tokenizer = tokenizer if tokenizer.is_dir() else None
    chat_template = run_chat_template(run_dir)
    out: dict[str, Path] = {}
    if read_lora_record(run_dir) is None:  # full fine-tuning: the checkpoint is the model
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
    if peft_out:  # refused before the merged model is written, not after
        check_peft_exportable(lora)
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
