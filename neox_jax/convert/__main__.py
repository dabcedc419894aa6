"""Convert between Hugging Face GPT-NeoX folders and neox_jax checkpoints.

# Hugging Face -> neox_jax (orbax)
python -m neox_jax.convert --src=/models/pythia-70m --dst=/ckpt/pythia-70m --to=neox
# neox_jax (a checkpoint, a step directory or a run directory) -> Hugging Face
python -m neox_jax.convert --src=/runs/tiny --dst=/export/tiny-hf --to=hf --dtype=bfloat16
# ... and upload the export to the Hugging Face Hub (needs `huggingface-cli login`)
python -m neox_jax.convert --src=/runs/tiny --dst=/export/tiny-hf --to=hf --push_to_hub=me/tiny
# --src also takes a Hub model id: EleutherAI/pythia-70m, or EleutherAI/pythia-70m@step3000
"""

import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "Source: a Hugging Face folder, a checkpoint or a run dir.")
flags.DEFINE_string("dst", None, "Destination folder (must not exist or be empty).")
flags.DEFINE_enum("to", None, ["neox", "hf"], "Target format.")
flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16", "float16"], "Dtype of the written weights."
)
flags.DEFINE_string("max_shard_size", "5GB", "Hugging Face output: shard size limit.")
flags.DEFINE_bool("overwrite", False, "Replace a non-empty destination.")
flags.DEFINE_string("push_to_hub", None, "--to=hf: also upload the export to this Hub repo.")
flags.DEFINE_bool("private", False, "--push_to_hub: create the repository private.")
flags.mark_flags_as_required(["src", "dst", "to"])


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

    from neox_jax.convert import find_tokenizer, load_model, save_checkpoint, save_hf
    from neox_jax.convert.hf import DTYPES
    from neox_jax.errors import UserError
    from neox_jax.finetune.chat import run_chat_template
    from neox_jax.hub import resolve

    if push_to_hub and to != "hf":
        raise UserError("--push_to_hub uploads a Hugging Face export: add --to=hf")
    src = resolve(src)  # a Hub model id -> its cached snapshot
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


def main(argv):
    del argv
    from neox_jax.convert import ConversionError

    try:
        convert(
            FLAGS.src,
            FLAGS.dst,
            FLAGS.to,
            dtype=FLAGS.dtype,
            max_shard_size=FLAGS.max_shard_size,
            overwrite=FLAGS.overwrite,
            push_to_hub=FLAGS.push_to_hub,
            private=FLAGS.private,
        )
    except (ConversionError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
