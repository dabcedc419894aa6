"""Tokenizing jsonl / text corpora into a Megatron indexed dataset (.bin/.idx).

  python -m neox_jax.data.preprocess --config=configs/preprocess.py \
      --config.input=train.jsonl,more.txt --config.tokenizer=tokenizer.json \
      --config.output_prefix=data/train

The old spellings (``--input= --tokenizer= --output_prefix= ...``) still work.
"""

import os

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The preprocessing config (no presets)."""
    c = ml_collections.ConfigDict()
    # Comma-separated input files: .jsonl/.json (one document per line, or a JSON array),
    # .parquet (a column) or text; .gz/.bz2/.xz/.zst compressed too. Required.
    c.input = ""
    # Tokenizer: a tokenizer.json, a sentencepiece .model or a folder holding one. Required.
    c.tokenizer = ""
    # Output path without .bin/.idx. Required.
    c.output_prefix = ""
    # Key of the text in each jsonl object (the column of a parquet file).
    c.jsonl_key = "text"
    # Append the end-of-document token to each document (GPT-NeoX's --append-eod).
    c.append_eod = True
    # Documents in text files: "file" (one per file) or "blank_line" (blank-line blocks).
    c.text_split = "file"
    # Bad jsonl lines: "fail" (name the line) or "skip" (count and go on).
    c.on_malformed = "fail"
    # Tokenizer processes, and documents per task sent to each.
    c.workers = max(1, (os.cpu_count() or 2) - 1)
    c.chunksize = 32
    if arg not in (None, ""):
        raise ValueError(f"Unknown preset {arg!r}; configs/preprocess.py has none.")
    return c
