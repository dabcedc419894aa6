"""Calibration tokens for GPTQ: random fixed-length windows of a text file or indexed dataset.

GPTQ (§5, "Setup") calibrates on 128 random 2048-token segments of C4; any text close
to the model's training distribution works, and a few hundred thousand tokens suffice.
A text file is encoded as one stream, as transformers' ``tokenizer(text)`` encodes a
model input (GPTQ's ``datautils``: ``tokenizer("\n\n".join(texts))``), so a tokenizer
that adds a BOS starts the stream with it; windows are drawn from that stream.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path

import numpy as np

from neox_jax.data import indexed_dataset
from neox_jax.errors import UserError
from neox_jax.training.metrics import say

_MAX_TEXT_BYTES = 64 << 20  # tokenizing more than this buys nothing for calibration


def _report(total: int, num_samples: int, seq_len: int) -> float:
    # Windows are drawn independently, so more window tokens than source tokens means the
    # same text is calibrated on several times (GPTQ's Hessians then overweight it).
    coverage = num_samples * seq_len / total
    say(
        f"GPTQ calibration: {num_samples} windows of {seq_len} tokens from a source of "
        f"{total:,} tokens ({coverage:.3g}x the source)"
    )
    if coverage > 1:
        message = (
            f"GPTQ calibration repeats data: {num_samples} x {seq_len} tokens drawn from "
            f"{total:,}, so windows overlap ~{coverage:.1f}x; pass more text, or fewer or "
            "shorter windows (--config.num_calibration_samples / --config.calibration_seq_len)."
        )
        say(f"warning: {message}")
    return coverage


def _windows(read, total: int, num_samples: int, seq_len: int, seed: int) -> np.ndarray:
    if total < seq_len:
        raise ValueError(
            f"the calibration source holds {total} tokens, fewer than one window of "
            f"{seq_len}; pass more text or a smaller --config.calibration_seq_len."
        )
    _report(total, num_samples, seq_len)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, total - seq_len + 1, size=num_samples)
    return np.stack([read(int(s), seq_len) for s in starts]).astype(np.int32)


def _from_indexed(prefix: str, num_samples: int, seq_len: int, seed: int) -> np.ndarray:
    ds = indexed_dataset.IndexedDataset(prefix)
    ends = np.cumsum(ds.sizes.astype(np.int64))  # token stream of all sequences, in order

    def read(start: int, length: int) -> np.ndarray:
        parts, i = [], int(np.searchsorted(ends, start, side="right"))
        offset = start - (int(ends[i - 1]) if i else 0)
        while length > 0:
            take = min(length, int(ds.sizes[i]) - offset)
            parts.append(ds.get(i, offset, take))
            length, i, offset = length - take, i + 1, 0
        return np.concatenate(parts)

    return _windows(read, int(ends[-1]) if len(ends) else 0, num_samples, seq_len, seed)


def _from_text(path: Path, tokenizer, num_samples: int, seq_len: int, seed: int) -> np.ndarray:
    if tokenizer is None:
        raise ValueError(
            f"calibration text {path} needs a tokenizer: pass --tokenizer, or keep the "
            "tokenizer in the checkpoint's tokenizer/ folder."
        )
    with open(path, "rb") as f:
        head = f.read(_MAX_TEXT_BYTES)
    try:  # incremental: a character cut by the size cap is dropped, bad bytes are refused
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as e:
        raise UserError(
            f"calibration text {path} is not UTF-8 text (byte {e.start}: {e.reason}); "
            "convert it to UTF-8 first."
        ) from e
    # As the model sees text, and as GPTQ's own recipe encodes its calibration stream
    # (``tokenizer(text)``): with the special tokens the tokenizer adds (a Llama's BOS).
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=True), np.int64)
    return _windows(lambda s, n: ids[s : s + n], len(ids), num_samples, seq_len, seed)


def calibration_tokens(
    source: str | os.PathLike,
    tokenizer=None,
    *,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> np.ndarray:
    """``[num_samples, seq_len]`` int32 token windows drawn uniformly from ``source``.

    Args:
      source: a UTF-8 text file, or the prefix of a Megatron indexed dataset
        (``<prefix>.bin`` / ``<prefix>.idx``), whose sequences are read as one stream.
      tokenizer: a ``neox_jax.data.tokenizer.Tokenizer``; needed for text.
      num_samples, seq_len: windows and their length (windows may overlap when the
        source is small).
      seed: seeds the window positions.

    Returns:
      int32 array ``[num_samples, seq_len]``.
    """
    if num_samples <= 0 or seq_len <= 0:
        raise ValueError(f"num_samples and seq_len must be positive, got {num_samples}, {seq_len}")
    source = str(source)
    if indexed_dataset.exists(source):
        return _from_indexed(source, num_samples, seq_len, seed)
    path = Path(source)
    if path.is_file():
        return _from_text(path, tokenizer, num_samples, seq_len, seed)
    raise FileNotFoundError(
        f"calibration source {source} is neither a text file nor an indexed dataset prefix "
        "(<prefix>.bin + <prefix>.idx)."
    )
