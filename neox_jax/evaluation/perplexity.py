"""Perplexity with a sliding window and a stride (the Hugging Face recipe).

A sequence of ``M`` tokens is scored in windows of at most ``max_length`` inputs. Every
token after the first is scored exactly once; the first window scores up to
``max_length`` tokens, each later window the next ``stride`` tokens, reading the
``max_length`` tokens just before its last target. So every scored token sees at least
``max_length - stride + 1`` tokens of context (or all of them near the start), as in
https://huggingface.co/docs/transformers/perplexity. One difference from that recipe:
a window's inputs also predict the token right after the window, so with
``stride == max_length`` no token goes unscored; that case equals lm-eval's
``loglikelihood_rolling`` windows (context length 1) exactly.

With ``prefix_token_id`` (e.g. the EOS/BOS token documents are separated by) the
sequence gets that token in front, so its first real token is scored too.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from neox_jax.data.indexed_dataset import IndexedDataset, exists
from neox_jax.data.text_files import file_kind, json_records, open_text, parquet_rows
from neox_jax.errors import UserError
from neox_jax.evaluation.scoring import LogLikelihoodScorer


@dataclasses.dataclass(frozen=True)
class Window:
    """Inputs ``seq[begin : end - 1]`` score the targets ``seq[target_start : end]``."""

    begin: int
    target_start: int
    end: int


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Totals over every scored token.

    Attributes:
      nll: summed negative log-likelihood (nats).
      num_tokens: scored tokens.
      num_bytes: UTF-8 bytes of the scored text when known (text input), else None.
    """

    nll: float
    num_tokens: int
    num_bytes: int | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.num_tokens)

    @property
    def bits_per_byte(self) -> float | None:
        return None if not self.num_bytes else self.nll / (math.log(2) * self.num_bytes)

    def to_dict(self) -> dict:
        return {
            "perplexity": self.perplexity,
            "nll_per_token": self.nll / self.num_tokens,
            "num_tokens": self.num_tokens,
            "bits_per_byte": self.bits_per_byte,
        }


def sliding_windows(num_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The windows that score tokens ``1 .. num_tokens - 1`` once each.

    Args:
      num_tokens: length ``M`` of the sequence (prefix token included).
      max_length: most inputs per window.
      stride: targets per window after the first (1 <= stride <= max_length).

    Returns:
      The windows, in order; empty when ``num_tokens < 2``.
    """
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must lie in [1, max_length={max_length}], got {stride}.")
    windows, start = [], 1
    while start < num_tokens:
        end = min(start + (max_length if start == 1 else stride), num_tokens)
        windows.append(Window(max(0, end - 1 - max_length), start, end))
        start = end
    return windows


def window_requests(
    ids: Sequence[int], max_length: int, stride: int, prefix_token_id: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """``(context, continuation)`` scoring requests covering ``ids`` (see the module doc)."""
    seq = ([prefix_token_id] if prefix_token_id is not None else []) + [int(t) for t in ids]
    return [
        (seq[w.begin : w.target_start], seq[w.target_start : w.end])
        for w in sliding_windows(len(seq), max_length, stride)
    ]


def score_sequences(
    scorer: LogLikelihoodScorer,
    sequences: Iterable[Sequence[int]],
    *,
    stride: int | None = None,
    prefix_token_id: int | None = None,
) -> list[tuple[float, int]]:
    """Summed log-probability and scored-token count of each sequence.

    All windows of all sequences go to the scorer together, so they batch across
    sequences. ``stride`` defaults to ``scorer.max_length`` (disjoint windows).
    """
    stride = stride or scorer.max_length
    requests, owner = [], []
    for s, ids in enumerate(sequences):
        reqs = window_requests(ids, scorer.max_length, stride, prefix_token_id)
        requests += reqs
        owner += [s] * len(reqs)
    totals: dict[int, list[float]] = {}
    num = max(owner, default=-1) + 1
    for s, (logprob, _), (_, cont) in zip(owner, scorer.score(requests), requests, strict=True):
        t = totals.setdefault(s, [0.0, 0])
        t[0] += logprob
        t[1] += len(cont)
    return [tuple(totals.get(s, (0.0, 0))) for s in range(num)]


def perplexity_of_ids(
    scorer: LogLikelihoodScorer,
    sequences: Iterable[Sequence[int]],
    *,
    stride: int | None = None,
    prefix_token_id: int | None = None,
    num_bytes: int | None = None,
) -> PerplexityResult:
    """Perplexity over token sequences (each scored on its own).

    Args:
      scorer: the model's ``LogLikelihoodScorer``.
      sequences: token-id sequences (documents).
      stride: targets per window after the first; default ``scorer.max_length``.
      prefix_token_id: token put in front of every sequence (scores its first token).
      num_bytes: UTF-8 bytes of the text, for bits per byte.

    Returns:
      A ``PerplexityResult``.

    Raises:
      ValueError: nothing to score (empty input, or only 1-token sequences without prefix).
    """
    scored = score_sequences(scorer, sequences, stride=stride, prefix_token_id=prefix_token_id)
    logprob = sum(lp for lp, _ in scored)
    count = sum(n for _, n in scored)
    if count == 0:
        raise ValueError(
            "no tokens to score: the input is empty (or every sequence has one token and "
            "no prefix_token_id was given)."
        )
    return PerplexityResult(-logprob, count, num_bytes)


def perplexity_of_text(
    scorer: LogLikelihoodScorer,
    tokenizer,
    text: str,
    *,
    stride: int | None = None,
    prefix_token_id: int | None = None,
) -> PerplexityResult:
    """Perplexity of one text (tokenized as a whole with the special tokens the tokenizer
    adds, e.g. a Llama bos, as the HF recipe's ``tokenizer(text)`` does)."""
    ids = tokenizer.encode(text, add_special_tokens=True)
    return perplexity_of_ids(
        scorer,
        [ids],
        stride=stride,
        prefix_token_id=prefix_token_id,
        num_bytes=len(text.encode("utf-8")),
    )


def perplexity_of_text_file(
    scorer: LogLikelihoodScorer,
    tokenizer,
    path: str | os.PathLike,
    *,
    stride: int | None = None,
    prefix_token_id: int | None = None,
) -> PerplexityResult:
    """Perplexity of the text of a file (``read_eval_text``), scored as one sequence."""
    text = read_eval_text(path)
    return perplexity_of_text(
        scorer, tokenizer, text, stride=stride, prefix_token_id=prefix_token_id
    )


def read_eval_text(path: str | os.PathLike, text_key: str = "text") -> str:
    """The text of a UTF-8 file read whole, or of a JSON-lines/JSON-array/parquet file (as
    ``datasets`` exports wikitext) the ``text_key`` field of every record joined by blank
    lines, as transformers' perplexity recipe joins ``"\n\n".join(test["text"])``; null
    texts are skipped. Compressed files are read through (``neox_jax.data.text_files``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"perplexity text file {path} does not exist.")
    kind = file_kind(path)
    try:
        if kind == "text":
            with open_text(path) as f:
                return f.read()
        if kind == "parquet":
            rows = enumerate(parquet_rows(path, [text_key], "the text field"), 1)
        else:
            rows = json_records(path)
        texts = []
        for n, row in rows:
            if not isinstance(row, dict) or not isinstance(row.get(text_key, ""), str | None):
                raise UserError(f"{path}:{n}: expected an object whose {text_key!r} is text.")
            if text_key not in row:
                raise UserError(f"{path}:{n}: no {text_key!r} field (fields: {sorted(row)}).")
            texts += [row[text_key]] if row[text_key] is not None else []
        return "\n\n".join(texts)
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e}).") from None


def perplexity_of_indexed_dataset(
    scorer: LogLikelihoodScorer,
    prefix: str,
    *,
    stride: int | None = None,
    prefix_token_id: int | None = None,
    max_sequences: int = 0,
) -> PerplexityResult:
    """Perplexity of a Megatron indexed dataset (``prefix.bin`` / ``prefix.idx``).

    Every stored sequence is scored on its own (documents are not concatenated).

    Args:
      scorer: the model's scorer.
      prefix: dataset path without the extension.
      stride, prefix_token_id: as in ``perplexity_of_ids``.
      max_sequences: score only the first N sequences (0 = all).
    """
    if not exists(prefix):
        raise FileNotFoundError(f"no indexed dataset at {prefix} (.bin/.idx).")
    dataset = IndexedDataset(prefix)
    count = len(dataset) if max_sequences <= 0 else min(max_sequences, len(dataset))
    sequences = (np.asarray(dataset[i]).tolist() for i in range(count))
    return perplexity_of_ids(scorer, sequences, stride=stride, prefix_token_id=prefix_token_id)
