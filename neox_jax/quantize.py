r"""Quantize a model (our checkpoint, a run directory or a Hugging Face folder) to int8/int4.

# int8, one scale per output channel (round to nearest)
python -m neox_jax.quantize --src=/ckpt/pythia-410m --dst=/ckpt/pythia-410m-int8 --bits=8
# int4, groups of 128, GPTQ calibrated on 128 x 512 tokens of a text file
python -m neox_jax.quantize --src=/models/pythia-1b --dst=/ckpt/pythia-1b-gptq4 --bits=4 \
    --group_size=128 --method=gptq --calibration=/data/val.txt
# ... or of an indexed dataset (the prefix of <prefix>.bin / <prefix>.idx)
python -m neox_jax.quantize --src=... --dst=... --bits=4 --method=gptq \
    --calibration=/data/pile_val_text_document

Load the result with ``neox_jax.quant.load_quantized(dst)``.
"""

from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "A neox_jax checkpoint, run directory or Hugging Face folder.")
flags.DEFINE_string("dst", None, "Destination folder (must be absent or empty).")
flags.DEFINE_enum("bits", "8", ["8", "4"], "Bits per weight.")
flags.DEFINE_integer(
    "group_size", None, "Input rows per scale; default per output channel (8) or 128 (4)."
)
flags.DEFINE_enum("method", "rtn", ["rtn", "gptq"], "Round to nearest, or GPTQ (needs data).")
flags.DEFINE_bool("symmetric", True, "Symmetric grid; --nosymmetric adds zero points.")
flags.DEFINE_string(
    "calibration", None, "GPTQ data: a UTF-8 text file or an indexed dataset prefix."
)
flags.DEFINE_string("tokenizer", None, "Tokenizer for text calibration; default the model's.")
flags.DEFINE_integer("num_calibration_samples", 128, "GPTQ calibration windows.")
flags.DEFINE_integer("calibration_seq_len", 512, "Tokens per calibration window.")
flags.DEFINE_integer("calibration_batch_size", 8, "Calibration windows per forward pass.")
flags.DEFINE_float("gptq_damp", 0.01, "GPTQ dampening (fraction of the mean Hessian diagonal).")
flags.DEFINE_integer("gptq_block_size", 128, "GPTQ lazy-batch block size.")
flags.DEFINE_bool("gptq_act_order", False, "GPTQ: quantize inputs by decreasing activation.")
flags.DEFINE_bool("embed_out", False, "Also quantize the output projection.")
flags.DEFINE_bool("embed_in", False, "Also quantize the input embedding (storage only).")
flags.DEFINE_enum("scale_dtype", "float32", ["float32", "bfloat16", "float16"], "Scale dtype.")
flags.DEFINE_enum("matmul_impl", "xla", ["xla", "pallas"], "Quantized matmul implementation.")
flags.DEFINE_integer("seed", 0, "Seeds the choice of calibration windows.")
flags.DEFINE_bool("overwrite", False, "Replace a non-empty destination.")
flags.mark_flags_as_required(["src", "dst"])


def quantize_checkpoint(
    src: str,
    dst: str,
    qconfig,
    *,
    calibration: str | None = None,
    tokenizer: str | None = None,
    num_samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    overwrite: bool = False,
    log=print,
):
    """Load ``src`` (anything ``load_model`` reads), quantize it, save it at ``dst``.

    Args:
      src, dst: source model and destination folder.
      qconfig: a ``neox_jax.quant.QuantConfig``.
      calibration: text file or indexed dataset prefix (GPTQ only).
      tokenizer: tokenizer path for text calibration; default the one beside ``src``.
      num_samples, seq_len, batch_size, seed: calibration windows and batching.
      overwrite: replace a non-empty ``dst``.
      log: progress printer.

    Returns:
      The path written.
    """
    from neox_jax.convert import find_tokenizer, load_model
    from neox_jax.quant import calibration_tokens, quantize_params, save_quantized, weight_bytes

    tokenizer_dir = find_tokenizer(src)
    tokens = None
    if qconfig.method == "gptq":
        if calibration is None:
            raise ValueError("--method=gptq needs --calibration (a text file or dataset prefix)")
        tok = None
        if tokenizer or tokenizer_dir:
            from neox_jax.data.tokenizer import load_tokenizer

            tok = load_tokenizer(tokenizer or tokenizer_dir)
        tokens = calibration_tokens(
            calibration, tok, num_samples=num_samples, seq_len=seq_len, seed=seed
        )
        log(f"calibration: {tokens.shape[0]} windows of {tokens.shape[1]} tokens")
    elif calibration is not None:
        log("note: --calibration is only used by --method=gptq; ignoring it")
    config, params = load_model(src)
    if tokens is not None and tokens.shape[1] > config.max_position_embeddings:
        raise ValueError(
            f"calibration_seq_len {tokens.shape[1]} exceeds the model's context "
            f"({config.max_position_embeddings})"
        )
    qparams = quantize_params(config, params, qconfig, tokens, batch_size=batch_size, log=log)
    out = save_quantized(
        config, qconfig, qparams, dst, tokenizer_dir=tokenizer_dir, overwrite=overwrite
    )
    log(
        f"weights: {weight_bytes(params) / 2**20:.1f} MiB -> {weight_bytes(qparams) / 2**20:.1f} "
        f"MiB ({qconfig.bits}-bit, {qconfig.method})"
    )
    return out


def main(argv):
    del argv
    from neox_jax.convert import ConversionError
    from neox_jax.quant import QuantConfig

    try:
        qconfig = QuantConfig(
            bits=int(FLAGS.bits),
            group_size=FLAGS.group_size,
            symmetric=FLAGS.symmetric,
            method=FLAGS.method,
            matmul_impl=FLAGS.matmul_impl,
            embed_out=FLAGS.embed_out,
            embed_in=FLAGS.embed_in,
            scale_dtype=FLAGS.scale_dtype,
            gptq_damp=FLAGS.gptq_damp,
            gptq_block_size=FLAGS.gptq_block_size,
            gptq_act_order=FLAGS.gptq_act_order,
        )
        quantize_checkpoint(
            FLAGS.src,
            FLAGS.dst,
            qconfig,
            calibration=FLAGS.calibration,
            tokenizer=FLAGS.tokenizer,
            num_samples=FLAGS.num_calibration_samples,
            seq_len=FLAGS.calibration_seq_len,
            batch_size=FLAGS.calibration_batch_size,
            seed=FLAGS.seed,
            overwrite=FLAGS.overwrite,
        )
    except (ConversionError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {FLAGS.dst}")


if __name__ == "__main__":
    app.run(main)
