"""Converting between Hugging Face GPT-NeoX folders and neox_jax checkpoints.

  # Hugging Face -> neox_jax (orbax)
  python -m neox_jax.convert --config=configs/convert.py --config.src=/models/pythia-70m \
      --config.dst=ckpt/pythia-70m --config.to=neox
  # neox_jax (a checkpoint, a step directory or a run directory) -> Hugging Face
  python -m neox_jax.convert --config=configs/convert.py --config.src=runs/tiny \
      --config.dst=export/tiny-hf --config.to=hf --config.dtype=bfloat16

The old spellings (``--src= --dst= --to= --dtype= --push_to_hub=``) still work.
``src`` may also be a Hub model id (``EleutherAI/pythia-70m@step3000``).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The conversion config; ``arg`` may name the target format ("neox" or "hf")."""
    c = ml_collections.ConfigDict()
    # Source: a Hugging Face folder, a neox_jax checkpoint or a run directory. Required.
    c.src = ""
    # Destination folder; must be absent or empty unless overwrite. Required.
    c.dst = ""
    # Target format: "neox" (our orbax checkpoint) or "hf" (safetensors). Required.
    c.to = arg or ""
    # Dtype of the written weights: "float32", "bfloat16" or "float16".
    c.dtype = "float32"
    # Hugging Face output: shard size limit ("5GB" = 5 * 10**9 bytes, as transformers).
    c.max_shard_size = "5GB"
    # Replace a non-empty destination.
    c.overwrite = False
    # to="hf" only: also upload the export to this Hub repository ("" = no upload), and
    # create that repository private.
    c.push_to_hub = ""
    c.private = False
    if arg not in (None, "", "neox", "hf"):
        raise ValueError(f"Unknown preset {arg!r}; choose 'neox' or 'hf'.")
    return c
