"""Exporting a fine-tuning run: the merged model as a Hugging Face folder, the adapter
for PEFT; or merging a PEFT adapter into its base.

  python -m neox_jax.finetune.export --config=configs/export.py --config.run=runs/sft \
      --config.hf_out=out/merged --config.peft_out=out/adapter
  python -m neox_jax.finetune.export --config=configs/export.py \
      --config.base=/models/pythia-70m --config.peft_in=/adapters/a --config.hf_out=out/merged

The old spellings (``--run= --hf_out= --peft_out= --base= --peft_in= --step= --dtype=
--overwrite``) still work.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The export config (no presets)."""
    c = ml_collections.ConfigDict()
    # A training workdir (LoRA or full fine-tuning).
    c.run = ""
    # Checkpoint step of the run; -1 = the latest complete one.
    c.step = -1
    # With peft_in: the base model folder, and the PEFT adapter folder merged into it.
    c.base = ""
    c.peft_in = ""
    # Write the merged model here (Hugging Face format).
    c.hf_out = ""
    # Write the adapter here (PEFT format; LoRA runs only).
    c.peft_out = ""
    # Dtype of the written weights: "float32", "bfloat16" or "float16".
    c.dtype = "float32"
    # Replace non-empty destinations.
    c.overwrite = False
    if arg not in (None, ""):
        raise ValueError(f"Unknown preset {arg!r}; configs/export.py has none.")
    return c
