"""Supervised fine-tuning data: jsonl -> tokens with loss masks -> packed rows.

Each line of the jsonl file is one example (ShareGPT, Alpaca and TRL's conversational
records are converted to these by ``neox_jax.finetune.sft_formats``), either

* ``{"prompt": str, "completion": str}``: loss on the completion (and the eos appended
  after it), none on the prompt. ``prompt_format="raw"`` concatenates the two as they
  are; ``"chat"`` treats them as one user turn and one assistant turn of the chat template;
* ``{"messages": [{"role", "content"}, ...]}``: rendered with the chat template
  (``neox_jax.finetune.chat``), loss on every assistant turn (including what the template
  writes after it, e.g. the eos), none on system/user turns. Tool calling: the record may
  hold ``"tools"`` (JSON schemas, rendered by the template), assistant messages may hold
  ``tool_calls`` (trained on, as the assistant wrote them) and ``"tool"`` messages carry
  the results (not trained on: they are the tool's words, not the model's).

Examples are packed into rows of ``seq_len + 1`` tokens (the trainer's batch rows), as
many as fit, each with its own ``segment_ids`` (1, 2, ... in the row; 0 = padding), so
they never attend to one another, and ``positions`` restarting at 0, so each sees the
rotary positions it would see alone. ``loss_mask`` is 1 on the trained tokens; the
trainer also drops targets that cross a segment boundary (``training/step.split_batch``).

Order: epoch ``e`` packs every example in a permutation of ``(seed, e)``, first-fit over
the last ``window`` open rows; global sample ``g`` is row ``g`` of the concatenated epochs.
A row is therefore a pure function of ``(data, seed, g)``, so resuming is exact.

An example longer than ``seq_len + 1`` tokens follows ``truncation``: "left" cuts tokens
from its start (the beginning of the prompt; the answer survives), "right" from its end
(the prompt survives, the tail of the answer is cut), "drop" skips it. Truncations,
drops, examples left without trained tokens and skipped bad lines are counted in
``SFTStats`` and logged; nothing is discarded silently.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from neox_jax.data.hf_source import load_hf_dataset
from neox_jax.data.pretrain_data import SampleSource, permute
from neox_jax.data.text_files import file_kind, json_records
from neox_jax.data.tokenizer import load_tokenizer
from neox_jax.errors import UserError
from neox_jax.finetune.chat import (
    ChatFormatError,
    ChatTemplate,
    encode_segments,
    validate_messages,
    validate_tools,
)
from neox_jax.finetune.sft_formats import normalize_record
from neox_jax.training.metrics import say

TRUNCATIONS = ("left", "right", "drop")
BAD_LINES = ("error", "skip")
PROMPT_FORMATS = ("raw", "chat")
_TAG_EPOCH, _TAG_SPLIT = 10, 11  # random streams (see pretrain_data.permute)


class SFTDataError(UserError):
    """Unusable SFT data; the message names the file, the lines and the fix."""


@dataclasses.dataclass
class SFTStats:
    """What happened to the examples of one file (logged, and kept on the source)."""

    path: str = ""
    examples: int = 0  # usable examples after everything below
    bad_lines: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    truncated: int = 0
    tokens_removed: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0

    def summary(self) -> str:
        parts = [
            f"{self.path}: {self.examples} examples, {self.tokens} tokens "
            f"({self.target_tokens} trained)"
        ]
        if self.bad_lines:
            where = ", ".join(str(n) for n, _ in self.bad_lines[:10])
            parts.append(f"{len(self.bad_lines)} bad lines skipped (lines {where})")
        if self.truncated:
            parts.append(f"{self.truncated} truncated ({self.tokens_removed} tokens removed)")
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long} dropped as too long")
        if self.dropped_no_target:
            parts.append(f"{self.dropped_no_target} dropped with no trained token")
        return "; ".join(parts)

    @property
    def lossy(self) -> bool:
        return bool(
            self.bad_lines or self.truncated or self.dropped_too_long or self.dropped_no_target
        )


# ------------------------------------------------------------------------ reading
def _check_record(rec) -> None:
    if not isinstance(rec, dict):
        raise ChatFormatError(f"expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        validate_messages(rec["messages"])
        validate_tools(rec.get("tools"))
    elif "prompt" in rec and "completion" in rec:
        if not isinstance(rec["prompt"], str) or not isinstance(rec["completion"], str):
            raise ChatFormatError("'prompt' and 'completion' must be strings")
    else:
        raise ChatFormatError("needs 'prompt' and 'completion', or 'messages'")


def tokenize_record(
    rec: dict, tokenizer, chat: ChatTemplate, *, prompt_format="raw", add_eos=True
) -> tuple[list[int], list[int]]:
    """``(ids, mask)`` of one example; mask is 1 on the tokens the loss is taken on.

    A raw prompt starts with the bos a Llama-style tokenizer adds (``add_bos_token``), as
    TRL encodes ``tokenizer(prompt)``; chat-templated examples carry the template's own bos
    text, so they are encoded without added special tokens, as ``apply_chat_template``.
    """
    if "messages" in rec:
        return encode_segments(tokenizer, chat.segments(rec["messages"], rec.get("tools")))
    if prompt_format == "chat":
        turns = [
            {"role": "user", "content": rec["prompt"]},
            {"role": "assistant", "content": rec["completion"]},
        ]
        return encode_segments(tokenizer, chat.segments(turns))
    ids, mask = encode_segments(tokenizer, [(rec["prompt"], False), (rec["completion"], True)])
    if getattr(tokenizer, "add_bos_token", False) and ids[:1] != [tokenizer.bos_id]:
        ids, mask = [tokenizer.bos_id, *ids], [0, *mask]
    if add_eos:
        if tokenizer.eos_id is None:
            raise SFTDataError(
                f"{tokenizer.path} has no eos token to end completions; set eos_token in its "
                "tokenizer_config.json or data.sft_add_eos=False."
            )
        ids, mask = ids + [tokenizer.eos_id], mask + [1]
    return ids, mask


def _fit(ids, mask, capacity: int, truncation: str, stats: SFTStats):
    """Apply the truncation policy; None when the example is dropped (counted in ``stats``)."""
    if len(ids) > capacity:
        if truncation == "drop":
            stats.dropped_too_long += 1
            return None
        stats.truncated += 1
        stats.tokens_removed += len(ids) - capacity
        cut = slice(len(ids) - capacity, None) if truncation == "left" else slice(0, capacity)
        ids, mask = ids[cut], mask[cut]
    # The first token of a segment is never a target (nothing before it to predict from).
    if not any(mask[1:]):
        stats.dropped_no_target += 1
        return None
    return np.asarray(ids, np.int32), np.asarray(mask, np.int8)


HF_PREFIX = "hf:"


def _records(path: str):
    """``(line or record number, record or JSONDecodeError)`` of a JSON-lines or JSON-array
    file (compressed too: ``data.text_files``), or of a Hugging Face dataset named
    ``hf:NAME[:SPLIT]`` (a Hub id, a local folder or file; split "train")."""
    if str(path).startswith(HF_PREFIX):
        name, _, split = str(path)[len(HF_PREFIX) :].partition(":")
        ds = load_hf_dataset(name, split or "train", streaming=True)
        # Arrow gives every record every column: a field a record lacks comes back as None.
        yield from ((i, {k: v for k, v in r.items() if v is not None}) for i, r in enumerate(ds, 1))
        return
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"SFT data file {path} does not exist.")
    if file_kind(file) == "parquet":
        yield from _records(f"{HF_PREFIX}{file}")
        return
    try:
        yield from json_records(file)
    except UnicodeDecodeError as e:
        raise SFTDataError(
            f"SFT data file {path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it "
            "to UTF-8 first."
        ) from None


def load_examples(
    path: str,
    tokenizer,
    *,
    max_len: int,
    truncation: str = "left",
    bad_lines: str = "error",
    chat_template: str | None = None,
    prompt_format: str = "raw",
    add_eos: bool = True,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], SFTStats]:
    """Read and tokenize a jsonl file.

    Args:
      path: the jsonl file (blank lines are ignored), or ``hf:NAME[:SPLIT]``: a Hugging
        Face dataset (Hub id or local folder) with the same fields, streamed.
      tokenizer: a ``neox_jax.data.tokenizer.Tokenizer``.
      max_len: longest example kept whole (``seq_len + 1``).
      truncation: "left", "right" or "drop" (module docstring).
      bad_lines: "error" raises listing every bad line; "skip" skips and reports them.
      chat_template: see ``neox_jax.finetune.chat.read_chat_template``.
      prompt_format: "raw" or "chat" for prompt/completion records.
      add_eos: append the eos after raw completions.

    Returns:
      ``([(ids int32 [n], mask int8 [n]), ...], stats)``.
    """
    for name, value, choices in (
        ("truncation", truncation, TRUNCATIONS),
        ("bad_lines", bad_lines, BAD_LINES),
        ("prompt_format", prompt_format, PROMPT_FORMATS),
    ):
        if value not in choices:
            raise SFTDataError(f"Unknown data.sft_{name} {value!r}; choose from {choices}.")
    chat = ChatTemplate.for_tokenizer(tokenizer, chat_template)
    stats = SFTStats(path=str(path))
    examples = []
    for lineno, rec in _records(path):
        try:
            if isinstance(rec, json.JSONDecodeError):
                raise rec
            rec = normalize_record(rec)
            _check_record(rec)
            ids, mask = tokenize_record(
                rec, tokenizer, chat, prompt_format=prompt_format, add_eos=add_eos
            )
        except (json.JSONDecodeError, ChatFormatError) as e:
            stats.bad_lines.append((lineno, str(e).splitlines()[0]))
            continue
        fitted = _fit(ids, mask, max_len, truncation, stats)
        if fitted is not None:
            examples.append(fitted)
    if stats.bad_lines and bad_lines == "error":
        shown = "\n".join(f"  {path}:{n}: {why}" for n, why in stats.bad_lines[:10])
        more = len(stats.bad_lines) - 10
        raise SFTDataError(
            f"{len(stats.bad_lines)} malformed lines in {path}:\n{shown}"
            + (f"\n  ... and {more} more" if more > 0 else "")
            + "\nFix them, or set data.sft_bad_lines='skip' to skip (and count) them."
        )
    stats.examples = len(examples)
    stats.tokens = sum(len(i) for i, _ in examples)
    stats.target_tokens = sum(int(m[1:].sum()) for _, m in examples)
    if not examples:
        raise SFTDataError(f"{path} holds no usable example ({stats.summary()}).")
    return examples, stats


# ------------------------------------------------------------------------ packing
def pack_rows(lengths: np.ndarray, order: np.ndarray, capacity: int, window: int = 64):
    """First-fit packing over the ``window`` most recently opened rows.

    Args:
      lengths: tokens of each example (each <= capacity).
      order: the order examples are placed in.
      capacity: tokens per row.
      window: open rows searched; older ones are closed (bounds the cost per example).

    Returns:
      A list of rows, each a list of example indices in placement order.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    open_rows: list[int] = []
    for i in order:
        n = int(lengths[i])
        for r in open_rows:
            if free[r] >= n:
                break
        else:
            r = len(rows)
            rows.append([])
            free.append(capacity)
            open_rows.append(r)
            if len(open_rows) > window:
                open_rows.pop(0)
        rows[r].append(int(i))
        free[r] -= n
        if free[r] == 0:
            open_rows.remove(r)
    return rows


class SFTSource(SampleSource):
    """Packed SFT rows for the trainer: ``samples(indices)`` -> ``[n, seq_len + 1]`` arrays.

    Args:
      examples: ``(ids, mask)`` pairs, each at most ``seq_len + 1`` long.
      seq_len: the model sequence length.
      global_batch_size: rows per step.
      seed: epoch shuffles.
      shuffle: permute examples per epoch (False: file order, for evaluation).
      repeat: cycle through epochs; False serves one epoch, then empty rows (all
        ``segment_ids`` 0, so no loss), so an evaluation covers each example once.
      pad_id: token id written in the padding.
      stats: the ``SFTStats`` of the examples, kept for reporting.
    """

    def __init__(
        self,
        examples,
        seq_len,
        global_batch_size,
        *,
        seed=0,
        shuffle=True,
        repeat=True,
        pad_id=0,
        stats=None,
        window=64,
    ):
        super().__init__(seq_len, global_batch_size)
        if not examples:
            raise SFTDataError("an SFT source needs at least one example.")
        too_long = [len(i) for i, _ in examples if len(i) > seq_len + 1]
        if too_long:
            raise SFTDataError(f"examples of {max(too_long)} tokens exceed seq_len + 1.")
        self.examples = examples
        self.lengths = np.asarray([len(i) for i, _ in examples], np.int64)
        self.seed, self.shuffle, self.repeat = seed, shuffle, repeat
        self.pad_id, self.stats, self.window = pad_id, stats, window
        self._starts = [0]  # first global row of each epoch packed so far
        self._cache: dict[int, list[list[int]]] = {}

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """Rows of epoch ``epoch`` (example indices), cached for the two latest epochs."""
        if epoch not in self._cache:
            order = np.arange(len(self.examples))
            if self.shuffle:
                order = permute(order, self.seed, _TAG_EPOCH, epoch)
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = pack_rows(self.lengths, order, self.seq_len + 1, self.window)
        return self._cache[epoch]

    @property
    def rows_per_epoch(self) -> int:
        return len(self.epoch_rows(0))

    def _locate(self, g: int) -> tuple[int, int] | None:
        if not self.repeat:
            return (0, g) if g < self.rows_per_epoch else None
        while self._starts[-1] <= g:  # extend the epoch table up to g
            self._starts.append(self._starts[-1] + len(self.epoch_rows(len(self._starts) - 1)))
        e = bisect.bisect_right(self._starts, g) - 1
        return e, g - self._starts[e]

    def row(self, g: int) -> dict[str, np.ndarray]:
        """Global row ``g``: tokens, segment_ids, positions, loss_mask, each int32 [L + 1]."""
        width = self.seq_len + 1
        out = {
            "tokens": np.full(width, self.pad_id, np.int32),
            "segment_ids": np.zeros(width, np.int32),
            "positions": np.zeros(width, np.int32),
            "loss_mask": np.zeros(width, np.int32),
        }
        where = self._locate(int(g))
        if where is None:
            return out
        offset = 0
        for k, i in enumerate(self.epoch_rows(where[0])[where[1]]):
            ids, mask = self.examples[i]
            span = slice(offset, offset + len(ids))
            out["tokens"][span] = ids
            out["segment_ids"][span] = k + 1
            out["positions"][span] = np.arange(len(ids))
            out["loss_mask"][span] = mask
            offset += len(ids)
        return out

    def samples(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        if np.any(indices < 0):
            raise ValueError("sample indices must be >= 0")
        rows = [self.row(g) for g in indices]
        if not rows:
            z = np.zeros((0, self.seq_len + 1), np.int32)
            return {k: z for k in ("tokens", "segment_ids", "positions", "loss_mask")}
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# ------------------------------------------------------------------ from config
def split_examples(n: int, eval_fraction: float, split_seed: int = 0) -> tuple[np.ndarray, ...]:
    """``(train indices, eval indices)``: ``round(fraction * n)`` examples held out (>= 1)."""
    if eval_fraction <= 0:
        return np.arange(n), np.arange(0)
    if n < 2:
        raise SFTDataError(f"cannot hold out eval examples from {n} example(s).")
    n_eval = min(max(1, round(eval_fraction * n)), n - 1)
    chosen = permute(np.arange(n), split_seed, _TAG_SPLIT, 0)
    return np.sort(chosen[n_eval:]), np.sort(chosen[:n_eval])


def resolve_sft(data_cfg, found_tokenizers=()) -> str:
    """The tokenizer path for ``source="sft"``: ``data.tokenizer``, else the first of
    ``found_tokenizers`` (the caller looks beside ``train.init_from``, then in the copy a
    previous start of the run left in the workdir) that is not None."""
    if "sft_path" not in data_cfg:
        raise SFTDataError("data.source='sft' needs the data fields of configs/finetune.py.")
    if not data_cfg.sft_path:
        raise SFTDataError("data.source='sft' needs data.sft_path (a jsonl file).")
    if data_cfg.tokenizer:
        return data_cfg.tokenizer
    for found in found_tokenizers:
        if found is not None:
            return str(found)
    raise SFTDataError(
        "data.source='sft' needs a tokenizer: set data.tokenizer, or train.init_from to a "
        "model folder that holds one."
    )


def make_sft_sources(data_cfg, tokenizer_path: str, global_batch: int):
    """``(train SFTSource, eval SFTSource or None)`` from ``config.data`` (``source="sft"``)."""
    tok = load_tokenizer(tokenizer_path)
    kw = dict(
        max_len=data_cfg.seq_len + 1,
        truncation=data_cfg.sft_truncation,
        bad_lines=data_cfg.sft_bad_lines,
        chat_template=data_cfg.sft_chat_template or None,
        prompt_format=data_cfg.sft_prompt_format,
        add_eos=data_cfg.sft_add_eos,
    )
    examples, stats = load_examples(data_cfg.sft_path, tok, **kw)
    _report(stats)
    pad = tok.pad_id if tok.pad_id is not None else 0
    eval_examples, eval_stats = None, None
    if data_cfg.sft_eval_path:
        eval_examples, eval_stats = load_examples(data_cfg.sft_eval_path, tok, **kw)
        _report(eval_stats)
    elif data_cfg.eval_fraction > 0:
        train_idx, eval_idx = split_examples(len(examples), data_cfg.eval_fraction)
        eval_examples = [examples[i] for i in eval_idx]
        examples = [examples[i] for i in train_idx]
        logging.info("SFT: %d examples held out for eval", len(eval_examples))
    train = SFTSource(
        examples, data_cfg.seq_len, global_batch, seed=data_cfg.seed, pad_id=pad, stats=stats
    )
    report_repetition(len(examples), train.rows_per_epoch, global_batch, data_cfg.seq_len + 1)
    evals = None
    if eval_examples:
        evals = SFTSource(
            eval_examples,
            data_cfg.seq_len,
            data_cfg.eval_batch_size,
            shuffle=False,
            repeat=False,
            pad_id=pad,
            stats=eval_stats,
        )
    return train, evals


def report_repetition(examples: int, rows: int, global_batch: int, row_tokens: int) -> float:
    """Says how the data fills a step; warns when one step holds the data more than once.

    Args:
      examples: training examples; rows: packed rows they fill per epoch;
      global_batch: rows per step; row_tokens: tokens per row.

    Returns:
      Epochs per step (``global_batch / rows``).
    """
    epochs = global_batch / max(rows, 1)
    say(
        f"SFT: {examples} train examples pack into {rows} rows of {row_tokens} tokens per "
        f"epoch; a step of {global_batch} rows is {epochs:.3g} epochs"
    )
    if epochs > 1:
        message = (
            f"SFT: every step repeats the data {epochs:.3g} times (batch {global_batch} rows, "
            f"{rows} rows of data): the model sees each example ~{epochs:.0f}x per step. Lower "
            f"data.global_batch_size to at most {rows} or add data."
        )
        logging.warning(message)
        say(f"warning: {message}")
    return epochs


def _report(stats: SFTStats) -> None:
    if stats.lossy:  # truncations, drops and skipped lines also go to the log as warnings
        logging.warning("SFT data %s", stats.summary())
    say(f"SFT data {stats.summary()}")
