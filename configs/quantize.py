"""Quantizing a model (our checkpoint, a run directory or a Hugging Face folder).

  # int8, one scale per output channel (round to nearest)
  python -m neox_jax.quantize --config=configs/quantize.py --config.src=/models/pythia-410m \
      --config.dst=ckpt/p410m-int8
  # int4, groups of 128, GPTQ calibrated on 128 x 512 tokens of a text file
  python -m neox_jax.quantize --config=configs/quantize.py:gptq4 --config.src=/models/pythia-1b \
      --config.dst=ckpt/p1b-gptq4 --config.calibration=/data/val.txt

Presets after the colon: "" (int8 RTN) and "gptq4" (int4, groups of 128, GPTQ). The old
spellings (``--src= --dst= --bits=4 ...``) still work. Load the result with
``neox_jax.quant.load_quantized(dst)`` or any entry point's ``checkpoint``.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The quantization config; ``arg`` picks a preset: "" (int8 RTN) or "gptq4"."""
    c = ml_collections.ConfigDict()
    # A neox_jax checkpoint, a run directory or a Hugging Face folder. Required.
    c.src = ""
    # Destination folder; must be absent or empty unless overwrite. Required.
    c.dst = ""
    # Replace a non-empty destination.
    c.overwrite = False
    # Bits per weight: 8 or 4.
    c.bits = 8
    # Input rows per scale; 0 = per output channel (8-bit) or 128 (4-bit).
    c.group_size = 0
    # "rtn" (round to nearest) or "gptq" (needs calibration data).
    c.method = "rtn"
    # Symmetric grid; False adds zero points.
    c.symmetric = True
    # Also quantize the output projection / the input embedding (storage only).
    c.embed_out = False
    c.embed_in = False
    # Dtype of the scales: "float32", "bfloat16" or "float16".
    c.scale_dtype = "float32"
    # Quantized matmul implementation: "xla" or "pallas".
    c.matmul_impl = "xla"
    # ------------------------------------------------------------ GPTQ only
    # Calibration data: a UTF-8 text file or an indexed dataset prefix (<prefix>.bin/.idx).
    c.calibration = ""
    # Tokenizer for text calibration; "" = the model's.
    c.tokenizer = ""
    # Calibration windows, tokens per window, windows per forward pass.
    c.num_calibration_samples = 128
    c.calibration_seq_len = 512
    c.calibration_batch_size = 8
    # Dampening (fraction of the mean Hessian diagonal), lazy-batch block size, and
    # whether to quantize inputs by decreasing activation.
    c.gptq_damp = 0.01
    c.gptq_block_size = 128
    c.gptq_act_order = False
    # Seeds the choice of calibration windows.
    c.seed = 0
    if arg == "gptq4":
        c.bits, c.group_size, c.method = 4, 128, "gptq"
    elif arg not in (None, ""):
        raise ValueError(f"Unknown preset {arg!r}; choose '' or 'gptq4'.")
    return c
