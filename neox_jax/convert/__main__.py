"""Convert between Hugging Face GPT-NeoX folders and neox_jax checkpoints.

  # Hugging Face -> neox_jax (orbax)
  python -m neox_jax.convert --config=configs/convert.py --config.src=/models/pythia-70m \
      --config.dst=/ckpt/pythia-70m --config.to=neox
  # neox_jax (a checkpoint, a step directory or a run directory) -> Hugging Face
  python -m neox_jax.convert --config=configs/convert.py --config.src=/runs/tiny \
      --config.dst=/export/tiny-hf --config.to=hf --config.dtype=bfloat16
  # ... and upload the export to the Hugging Face Hub (needs `huggingface-cli login`)
  python -m neox_jax.convert --config=configs/convert.py --config.src=/runs/tiny \
      --config.dst=/export/tiny-hf --config.to=hf --config.push_to_hub=me/tiny
  # --config.src also takes a Hub model id: EleutherAI/pythia-70m(@step3000)

Every field of ``configs/convert.py`` can be overridden; the old flags (``--src= --dst=
--to= --dtype= --max_shard_size= --overwrite --push_to_hub= --private``) still work. The
destination is checked before the source is read.
"""

from neox_jax import cli, config_checks

LEGACY_FLAGS = {
    n: n
    for n in ("src", "dst", "to", "dtype", "max_shard_size", "overwrite", "push_to_hub", "private")
}


def convert(
    src: str,
    dst: str,
    to: str,
    *,
    dtype: str = "float32",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
) -> None:
    """Read ``src`` (any format ``load_model`` takes) and write ``dst`` in format ``to``;
    with ``push_to_hub`` (``to="hf"`` only) upload ``dst`` to that Hub repository."""
    import jax
    import numpy as np

    from neox_jax.convert import save_checkpoint, save_hf
    from neox_jax.convert.hf import DTYPES
    from neox_jax.errors import UserError
    from neox_jax.finetune.chat import run_chat_template
    from neox_jax.hub import resolve
    from neox_jax.loading import find_tokenizer, load_model
    from neox_jax.quant import is_quantized_checkpoint

    if push_to_hub and to != "hf":
        raise UserError("--push_to_hub uploads a Hugging Face export: add --to=hf")
    src = resolve(src)  # a Hub model id -> its cached snapshot
    if is_quantized_checkpoint(src):  # its int codes and scales are no float model's weights
        raise UserError(
            f"{src} is a quantized checkpoint: neox_jax.convert writes float models, and "
            "neither transformers nor a float checkpoint holds our int8/int4 codes. Convert "
            "the float model it was quantized from (then quantize the copy with "
            "neox_jax.quantize if needed); sample, serve and evaluate read this one as it is."
        )
    config, params = load_model(src)
    tokenizer = find_tokenizer(src)
    if to == "hf":
        save_hf(
            config,
            params,
            dst,
            dtype=dtype,
            max_shard_size=max_shard_size,
            tokenizer_dir=tokenizer,
            chat_template=run_chat_template(src),
            overwrite=overwrite,
        )
    else:
        params = jax.tree.map(lambda x: np.asarray(x).astype(DTYPES[dtype]), params)
        config = config.replace(param_dtype=dtype)
        save_checkpoint(config, params, dst, tokenizer_dir=tokenizer, overwrite=overwrite)
    print(f"wrote {dst}")
    if push_to_hub:
        from neox_jax.hub import push_to_hub as push

        url = push(dst, push_to_hub, private=private)
        print(f"pushed {dst} to the Hub repository {push_to_hub}: {url}")


def main(config) -> None:
    """Convert as ``configs/convert.py`` describes."""
    config_checks.convert(config)
    config_checks.destination(config, "dst")  # before loading the source
    convert(
        config.src,
        config.dst,
        config.to,
        dtype=config.dtype,
        max_shard_size=config.max_shard_size,
        overwrite=config.overwrite,
        push_to_hub=config.push_to_hub or None,
        private=config.private,
    )


COMMAND = cli.Command(main, "neox_jax.convert", default_config="convert.py", legacy=LEGACY_FLAGS)

if __name__ == "__main__":
    COMMAND.run()
