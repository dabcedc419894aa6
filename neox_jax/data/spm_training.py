"""Training a sentencepiece tokenizer on which any text round-trips exactly (byte fallback).

  python -m neox_jax.data.spm_training --config=configs/spm_training.py \
      --config.input=a.txt,b.txt --config.vocab_size=4096 --config.output=/path/spm.model

(the old flags, ``--input= --output= --vocab_size= ...``, still work).

The result loads as a ``neox_jax.data.tokenizer.SentencePieceTokenizer``.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from neox_jax import cli, config_checks
from neox_jax.data.tokenizer import SPM_FILE, SentencePieceTokenizer
from neox_jax.data.tokenizer_files import atomic_write


def _file_lines(path: os.PathLike) -> Iterator[str]:
    try:  # newline="\n": split only at "\n" and keep "\r" as data
        with open(path, encoding="utf-8", newline="\n") as f:
            yield from (line.removesuffix("\n") for line in f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"training file not found: {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read training file {path}: {e}") from e


def _training_lines(sources: Iterable[str | os.PathLike], chunk_chars: int) -> Iterator[str]:
    # sentencepiece trains on lines, so we split at "\n" (it comes back as the "\n" symbol) and
    # chunk over-long lines, which sentencepiece would silently skip. Files are streamed.
    for source in sources:
        lines = _file_lines(source) if isinstance(source, os.PathLike) else source.split("\n")
        for line in lines:
            for i in range(0, len(line), chunk_chars):
                yield line[i : i + chunk_chars]


def _sample(lines: Iterable[str], k: int, seed: int) -> list[str]:
    # Reservoir sampling with our own seeded RNG: uniform, reproducible, one pass, O(k) memory.
    rng, sample = random.Random(seed), []
    for n, line in enumerate(lines):
        if n < k:
            sample.append(line)
        elif (j := rng.randrange(n + 1)) < k:
            sample[j] = line
    return sample


def train_sentencepiece(
    files_or_texts: str | os.PathLike | Iterable[str | os.PathLike],
    vocab_size: int,
    output_path: str | os.PathLike,
    *,
    model_type: str = "bpe",
    input_sentence_size: int = 1_000_000,
    max_sentence_length: int = 16384,
    character_coverage: float = 0.9995,
    split_digits: bool = False,
    user_defined_symbols: Sequence[str] = (),
    eos_token: str = "<|endoftext|>",
    pad_token: str = "<|padding|>",
    unk_token: str = "<unk>",
    bos_token: str | None = None,
    seed: int = 0,
    num_threads: int = 8,
    **trainer_options,
) -> SentencePieceTokenizer:
    """Trains a byte-fallback sentencepiece model on which any text round-trips exactly.

    Ids: 0 eos, 1 pad, 2 unk, 3 bos if `bos_token` is given (else bos resolves to eos when that
    is <|endoftext|>, as in GPT-NeoX), then "\\n" and `user_defined_symbols`, the 256 byte
    pieces, and learned pieces. Characters outside `character_coverage` are spelled in bytes.

    Args:
      files_or_texts: a file path, or an iterable of file paths (`os.PathLike`, e.g.
        `pathlib.Path`) and texts (`str`).
      vocab_size: exact vocabulary size.
      output_path: the `.model` to write (an existing directory gets `tokenizer.model`).
      model_type: "bpe" or "unigram".
      input_sentence_size: lines sampled (reproducibly, by `seed`) to train on; 0 keeps all.
      max_sentence_length: longest line in bytes; longer lines are cut into chunks.
      character_coverage: share of characters that get their own piece.
      split_digits: split numbers into single digits.
      user_defined_symbols: extra strings always kept as one piece.
      eos_token, pad_token, unk_token, bos_token: the special pieces.
      seed: seeds the line sampling and sentencepiece's generator.
      num_threads: trainer threads; fixed by default because unigram results depend on it.
      **trainer_options: other `SentencePieceTrainer` options; they override ours.

    Returns:
      The trained tokenizer, loaded from `output_path`.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    symbols = ["\n", *user_defined_symbols]
    if vocab_size <= 256 + 4 + len(symbols):
        raise ValueError(f"vocab_size={vocab_size} leaves no room beyond 256 bytes and specials")
    if isinstance(files_or_texts, str | os.PathLike):
        files_or_texts = [Path(files_or_texts)]
    lines = _training_lines(files_or_texts, max(1, max_sentence_length // 4))  # <= 4 B/char
    lines = (line for line in lines if line)
    sample = _sample(lines, input_sentence_size, seed) if input_sentence_size else list(lines)
    if not sample:
        raise ValueError("no training text: every input was empty")
    # fmt: off
    options = dict(
        model_type=model_type, vocab_size=vocab_size, character_coverage=character_coverage,
        byte_fallback=True, split_digits=split_digits, user_defined_symbols=symbols,
        # Exact round trips: no normalization, no dummy "▁" prefix, whitespace kept as is, and
        # runs of whitespace (indentation) allowed to become pieces.
        normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        max_sentence_length=max_sentence_length, input_sentence_size=0,  # sampled above
        eos_id=0, eos_piece=eos_token, pad_id=1, pad_piece=pad_token, unk_id=2,
        unk_piece=unk_token, bos_id=3 if bos_token else -1, bos_piece=bos_token or "<s>",
        num_threads=num_threads, minloglevel=1,
    )
    # fmt: on
    options.update(trainer_options)
    output_path = Path(output_path)
    if output_path.is_dir():
        output_path = output_path / SPM_FILE
    output_path.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # process-global in sentencepiece; set on every call
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample), model_writer=model, **options
        )
    except RuntimeError as e:
        raise ValueError(f"sentencepiece training failed: {e}") from e
    atomic_write(output_path, model.getvalue())
    return SentencePieceTokenizer(output_path)


LEGACY_FLAGS = {
    n: n for n in ("input", "output", "vocab_size", "model_type", "input_sentence_size", "seed")
}


def main(config) -> SentencePieceTokenizer:
    """Trains the tokenizer ``configs/spm_training.py`` describes; prints what it wrote."""
    config_checks.spm_training(config)
    files = [Path(p) for p in config.input.split(",") if p]
    tok = train_sentencepiece(
        files, config.vocab_size, config.output, model_type=config.model_type,
        input_sentence_size=config.input_sentence_size, seed=config.seed,
    )  # fmt: skip
    print(f"wrote {tok.path}: vocab {tok.vocab_size}, eos {tok.eos_id}, pad {tok.pad_id}")
    return tok


COMMAND = cli.Command(
    main, "neox_jax.data.spm_training", default_config="spm_training.py", legacy=LEGACY_FLAGS
)

if __name__ == "__main__":
    COMMAND.run()
