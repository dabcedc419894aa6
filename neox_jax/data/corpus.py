"""The default corpus every machine has: the Python standard library's own source.

``prepare_stdlib_corpus`` trains a sentencepiece tokenizer on it and writes an
indexed dataset, once; later runs reuse both (the files are written atomically, so an
interrupted preparation is simply redone).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from neox_jax.data.indexed_dataset import exists as dataset_exists

SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "lib2to3",
    "turtledemo",
}


def stdlib_files(max_bytes: int = 12 * 2**20) -> list[Path]:
    """The standard library's ``.py`` files (tests excluded), sorted, up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        size = path.stat().st_size
        if size == 0:
            continue
        if total + size > max_bytes:
            break
        files.append(path)
        total += size
    if not files:
        raise FileNotFoundError(f"No Python source files found under {root}.")
    return files


def prepare_stdlib_corpus(
    directory: str | os.PathLike,
    *,
    vocab_size: int = 4096,
    max_bytes: int = 12 * 2**20,
    workers: int = 1,
) -> tuple[Path, str]:
    """Tokenizer and indexed dataset of the stdlib source under ``directory``.

    Returns:
      ``(tokenizer_path, dataset_prefix)``.
    """
    from neox_jax.data.preprocess import preprocess
    from neox_jax.data.spm_training import train_sentencepiece

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_path = directory / "tokenizer.model"
    prefix = str(directory / "stdlib")
    files = stdlib_files(max_bytes)
    if not tokenizer_path.is_file():
        print(
            f"Training a {vocab_size}-piece sentencepiece tokenizer on {len(files)} stdlib "
            f"files into {tokenizer_path}",
            flush=True,
        )
        train_sentencepiece(files, vocab_size, tokenizer_path)  # Paths, not texts
    if not dataset_exists(prefix):
        print(f"Tokenizing {len(files)} stdlib files into {prefix}.bin/.idx", flush=True)
        preprocess(
            [str(f) for f in files], str(tokenizer_path), prefix, workers=workers, progress=False
        )
    return tokenizer_path, prefix
