r"""Quantize a model (our checkpoint, a run directory or a Hugging Face folder) to int8/int4.

  # int8, one scale per output channel (round to nearest)
  python -m neox_jax.quantize --config=configs/quantize.py --config.src=/ckpt/pythia-410m \
      --config.dst=/ckpt/pythia-410m-int8
  # int4, groups of 128, GPTQ calibrated on 128 x 512 tokens of a text file (or of an
  # indexed dataset: the prefix of <prefix>.bin / <prefix>.idx)
  python -m neox_jax.quantize --config=configs/quantize.py:gptq4 --config.src=/models/pythia-1b \
      --config.dst=/ckpt/pythia-1b-gptq4 --config.calibration=/data/val.txt

Every field of ``configs/quantize.py`` can be overridden; the old flags (``--src= --dst=
--bits=4 --method=gptq ...``) still work. The destination is checked before the model is
loaded. Load the result with ``neox_jax.quant.load_quantized(dst)``.
"""

from __future__ import annotations

from neox_jax import cli, config_checks
from neox_jax.errors import UserError

# The flags of the old command line (README before configs/quantize.py): same field names.
LEGACY_FLAGS = {
    name: name
    for name in (
        "src", "dst", "bits", "group_size", "method", "symmetric", "calibration", "tokenizer",
        "num_calibration_samples", "calibration_seq_len", "calibration_batch_size",
        "gptq_damp", "gptq_block_size", "gptq_act_order", "embed_out", "embed_in",
        "scale_dtype", "matmul_impl", "seed", "overwrite",
    )
}  # fmt: skip


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
    from neox_jax.loading import find_tokenizer, load_model
    from neox_jax.quant import calibration_tokens, quantize_params, save_quantized, weight_bytes

    tokenizer_dir = find_tokenizer(src)
    tokens = None
    if qconfig.method == "gptq":
        if calibration is None:
            raise UserError(
                "method=gptq needs calibration data (a text file or an indexed dataset prefix)"
            )
        tok = None
        if tokenizer or tokenizer_dir:
            from neox_jax.data.tokenizer import load_tokenizer

            tok = load_tokenizer(tokenizer or tokenizer_dir)
        tokens = calibration_tokens(
            calibration, tok, num_samples=num_samples, seq_len=seq_len, seed=seed
        )
        log(f"calibration: {tokens.shape[0]} windows of {tokens.shape[1]} tokens")
    elif calibration is not None:
        log("note: calibration data is only used by method=gptq; ignoring it")
    config, params = load_model(src)
    if tokens is not None and tokens.shape[1] > config.max_position_embeddings:
        raise UserError(
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


def quantize(config) -> None:
    """Quantize ``config.src`` into ``config.dst`` as ``configs/quantize.py`` describes."""
    from neox_jax.quant import QuantConfig

    config_checks.quantize(config)
    config_checks.destination(config, "dst")  # before loading and calibrating
    qconfig = QuantConfig(
        bits=config.bits,
        group_size=config.group_size or None,
        symmetric=config.symmetric,
        method=config.method,
        matmul_impl=config.matmul_impl,
        embed_out=config.embed_out,
        embed_in=config.embed_in,
        scale_dtype=config.scale_dtype,
        gptq_damp=config.gptq_damp,
        gptq_block_size=config.gptq_block_size,
        gptq_act_order=config.gptq_act_order,
    )
    quantize_checkpoint(
        config.src,
        config.dst,
        qconfig,
        calibration=config.calibration or None,
        tokenizer=config.tokenizer or None,
        num_samples=config.num_calibration_samples,
        seq_len=config.calibration_seq_len,
        batch_size=config.calibration_batch_size,
        seed=config.seed,
        overwrite=config.overwrite,
    )
    print(f"wrote {config.dst}")


COMMAND = cli.Command(
    quantize, "neox_jax.quantize", default_config="quantize.py", legacy=LEGACY_FLAGS
)

if __name__ == "__main__":
    COMMAND.run()
