"""From ``config.data`` to batch sources, and from host batches to global arrays.

Every source has ``host_batch(step, process_index, process_count)`` returning this
host's rows of global step ``step``; the batch is a pure function of the step, which
is what makes resumption exact and independent of the host count.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import jax
import numpy as np

from neox_jax.data.corpus import prepare_stdlib_corpus
from neox_jax.data.hf_source import make_hf_source
from neox_jax.data.indexed_dataset import IndexedDataset
from neox_jax.data.indexed_dataset import exists as dataset_exists
from neox_jax.data.neox_source import NeoxSource, make_neox_sources
from neox_jax.data.preshuffled import PreshuffledData
from neox_jax.data.pretrain_data import BlendedSource, PretrainSource
from neox_jax.data.tfds_source import TfdsSource
from neox_jax.data.tokenizer import load_tokenizer
from neox_jax.errors import UserError
from neox_jax.parallel.rules import batch_sharding

SOURCES = ("stdlib", "indexed", "tfds", "hf", "sft", "preshuffled")


def _split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# Fields that only some sources read: setting one for another source would be ignored.
_SOURCE_FIELDS = {
    "paths": ("indexed", "preshuffled"),
    "eval_paths": ("indexed", "preshuffled"),
    "tokenizer": ("indexed", "tfds", "hf", "sft"),
    "hf_name": ("hf",),
}


def check_source_fields(data_cfg) -> None:
    order = getattr(data_cfg, "order", "shuffled")
    if order not in ("shuffled", "neox"):
        raise UserError(f"--config.data.order={order!r}; choose 'shuffled' or 'neox'.")
    if order == "neox" and data_cfg.source not in ("indexed", "stdlib"):
        raise UserError(
            f"data.order='neox' orders indexed datasets as GPT-NeoX does; data.source="
            f"{data_cfg.source!r} has its own order (use --config.data.source=indexed)."
        )
    for field, sources in _SOURCE_FIELDS.items():
        if getattr(data_cfg, field, "") and data_cfg.source not in sources:
            raise UserError(
                f"data.{field} is set but data.source={data_cfg.source!r} ignores it (it is read "
                f"with data.source={' or '.join(map(repr, sources))}); add "
                f"--config.data.source={sources[0]} to train on your data."
            )


def resolve_tokenizer_and_paths(data_cfg, workdir: str | Path) -> tuple[str | None, list[str]]:
    """Prepare the default corpus if asked; return ``(tokenizer path, dataset prefixes)``.

    ``source="sft"`` is not read here: fine-tuning's entry point hands the trainer a
    ``data_fn`` for it (``neox_jax.finetune.trainer_hooks``).
    """
    if data_cfg.source not in SOURCES:
        raise ValueError(f"Unknown data.source {data_cfg.source!r}; choose from {SOURCES}.")
    check_source_fields(data_cfg)
    if data_cfg.source == "sft":  # read by neox_jax.finetune, handed in as TrainerHooks.data_fn
        raise UserError(
            "data.source='sft' is fine-tuning data: run it with `python -m neox_jax.train`, "
            "or call train_and_evaluate(config, workdir, "
            "hooks=neox_jax.finetune.trainer_hooks.trainer_hooks)."
        )
    if data_cfg.source == "stdlib":
        corpus_dir = data_cfg.corpus_dir or os.path.join(workdir, "data")
        tok, prefix = prepare_stdlib_corpus(
            corpus_dir,
            vocab_size=data_cfg.tokenizer_vocab_size,
            max_bytes=int(data_cfg.stdlib_max_mb * 2**20),
        )
        return str(tok), [prefix]
    tokenizer = data_cfg.tokenizer or None
    if data_cfg.source in ("tfds", "hf"):
        if not tokenizer:
            raise UserError(
                f"data.source={data_cfg.source!r} tokenizes on the fly: set data.tokenizer."
            )
        return tokenizer, []
    paths = _split_list(data_cfg.paths)
    if data_cfg.source == "preshuffled":
        if len(paths) != 1:
            raise UserError(
                "data.source='preshuffled' reads one pre-shuffled dataset: set data.paths to "
                f"its prefix (<prefix>.idx with <prefix>.bin or its shards), got {paths}."
            )
        return tokenizer, paths
    if not paths:
        raise ValueError(
            "data.source='indexed' needs data.paths (comma-separated prefixes of "
            ".bin/.idx files written by neox_jax.data.preprocess or GPT-NeoX)."
        )
    missing = [p for p in paths if not dataset_exists(p)]
    if missing:
        # GPT-NeoX's and Megatron-LM's preprocess_data.py append _<json key>_document.
        near = [glob.glob(f"{glob.escape(p)}_*_document.idx") for p in missing]
        near = [f[: -len(".idx")] for found in near for f in found]
        raise FileNotFoundError(
            f"Indexed datasets not found (need <prefix>.bin and .idx): {missing}"
            + (f"; did you mean {near}? (preprocess_data.py adds _<key>_document)" if near else "")
        )
    return tokenizer, paths


def make_sources(
    data_cfg, paths: list[str], tokenizer_path: str | None, global_batch: int, train_cfg=None
):
    """``(train_source, eval_source or None)`` for the configured data.

    ``train_cfg`` (steps, eval_every, eval_batches) sizes ``data.order="neox"``, whose
    order GPT-NeoX builds for a fixed number of samples.
    """
    seq_len = data_cfg.seq_len
    if data_cfg.source == "hf":
        tok = load_tokenizer(tokenizer_path)
        process = (jax.process_index(), jax.process_count())
        train = make_hf_source(data_cfg, tok, global_batch, data_cfg.hf_split, process)
        evals = None
        if data_cfg.hf_eval_split:
            evals = make_hf_source(
                data_cfg, tok, data_cfg.eval_batch_size, data_cfg.hf_eval_split, process
            )
        return train, evals
    if data_cfg.source == "tfds":
        tok = load_tokenizer(tokenizer_path)
        common = dict(
            data_dir=data_cfg.tfds_data_dir or None,
            seed=data_cfg.seed,
            text_key=data_cfg.text_key,
            reset_at_eod=data_cfg.reset_at_eod,
        )
        train = TfdsSource(
            data_cfg.tfds_name, tok, seq_len, global_batch, split=data_cfg.tfds_split, **common
        )
        evals = None
        if data_cfg.tfds_eval_split:
            evals = TfdsSource(
                data_cfg.tfds_name,
                tok,
                seq_len,
                data_cfg.eval_batch_size,
                split=data_cfg.tfds_eval_split,
                **common,
            )
        return train, evals

    eval_paths = _split_list(data_cfg.eval_paths)
    if data_cfg.source == "preshuffled":
        return _preshuffled_sources(data_cfg, paths, eval_paths, global_batch)
    order = getattr(data_cfg, "order", "shuffled")
    if order == "neox":
        return _neox_sources(data_cfg, paths, eval_paths, global_batch, train_cfg)
    if order != "shuffled":
        raise UserError(f"data.order={order!r}; choose 'shuffled' or 'neox'.")
    held_out = data_cfg.eval_fraction if not eval_paths else 0.0
    common = dict(seed=data_cfg.seed, reset_at_eod=data_cfg.reset_at_eod)

    def build(prefixes, batch, split, fraction, weights_field="weights"):
        sources = [
            PretrainSource(
                IndexedDataset(p), seq_len, batch, split=split, eval_fraction=fraction, **common
            )
            for p in prefixes
        ]
        if len(sources) == 1:
            return sources[0]
        weights = _weights(data_cfg, weights_field) or _weights(data_cfg, "weights")
        weights = weights or [1.0] * len(sources)
        if len(weights) != len(sources):
            field = weights_field if _weights(data_cfg, weights_field) else "weights"
            raise ValueError(
                f"data.{field} has {len(weights)} entries for {len(sources)} datasets in "
                f"data.{'eval_paths' if weights_field == 'eval_weights' else 'paths'}."
            )
        return BlendedSource(sources, weights, batch)

    train = build(paths, global_batch, "train" if held_out > 0 else "all", held_out)
    evals = None
    if eval_paths:
        evals = build(eval_paths, data_cfg.eval_batch_size, "all", 0.0, "eval_weights")
    elif held_out > 0:
        evals = build(paths, data_cfg.eval_batch_size, "eval", held_out)
    return train, evals


def _preshuffled_sources(data_cfg, paths, eval_paths, global_batch):
    """Pythia's pre-shuffled sequences: step s trains on items [s*B, (s+1)*B)."""
    train = PreshuffledData(paths[0], global_batch)
    evals = PreshuffledData(eval_paths[0], data_cfg.eval_batch_size) if eval_paths else None
    for source in filter(None, (train, evals)):
        if source.seq_len != data_cfg.seq_len:
            raise UserError(
                f"{source.prefix} holds sequences of {source.seq_len + 1} tokens: set "
                f"--config.data.seq_len={source.seq_len} (it is {data_cfg.seq_len})."
            )
    return train, evals


def _weights(data_cfg, field: str) -> list[float]:
    """``data.<field>`` as numbers ([] when empty or absent)."""
    text = getattr(data_cfg, field, "")
    try:
        return [float(w) for w in _split_list(text)]
    except ValueError:
        paths = "eval_paths" if field == "eval_weights" else "paths"
        raise UserError(
            f"data.{field}={text!r} must be comma-separated numbers, one per dataset in "
            f"data.{paths} (e.g. --config.data.{field}=0.7,0.3)."
        ) from None


def _neox_sources(data_cfg, paths, eval_paths, global_batch, train_cfg):
    """GPT-NeoX's order, sized as GPT-NeoX sizes it from train_iters and eval settings."""
    if train_cfg is None:
        raise ValueError("data.order='neox' needs the train config (steps) to size the order")
    evals = (train_cfg.steps // max(1, train_cfg.eval_every) + 1) * train_cfg.eval_batches
    return make_neox_sources(
        paths,
        eval_paths,
        split=data_cfg.neox_split,
        weights=_weights(data_cfg, "weights") or None,
        eval_weights=_weights(data_cfg, "eval_weights") or None,
        seq_len=data_cfg.seq_len,
        seed=data_cfg.seed,
        global_batch_size=global_batch,
        train_samples=train_cfg.steps * global_batch,
        eval_batch_size=data_cfg.eval_batch_size,
        eval_samples=evals * data_cfg.eval_batch_size,
        index_dir=data_cfg.neox_index_dir,
        index_mode=data_cfg.neox_index,
        # A run config saved before the field existed: GPT-NeoX's default.
        allow_chopped=data_cfg.get("neox_allow_chopped", True),
        reset_at_eod=data_cfg.reset_at_eod,
        microbatches=train_cfg.microbatches,
    )


def first_eval_batch(eval_source, step: int, train_cfg) -> int:
    """The first eval batch of the evaluation after ``step``: 0 (every evaluation reads the
    same batches), except in GPT-NeoX's order, where evaluation ``r`` (at step
    ``r * eval_every``, or the last step) reads the next ``eval_batches`` batches of the
    valid order, as GPT-NeoX's evaluation walks on through its valid loader."""
    if not isinstance(eval_source, NeoxSource):
        return 0
    rounds = -(-step // max(1, train_cfg.eval_every))  # this evaluation's 1-based number
    return (rounds - 1) * train_cfg.eval_batches


def process_rows(mesh: jax.sharding.Mesh, global_rows: int) -> tuple[int, int]:
    """The contiguous range of global batch rows that this process's devices hold."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_rows, 1))
    spans = sorted(
        {
            (sl[0].start or 0, global_rows if sl[0].stop is None else sl[0].stop)
            for sl in index_map.values()
        }
    )
    lo, hi = spans[0][0], max(stop for _, stop in spans)
    covered = sum(stop - start for start, stop in spans)
    if covered != hi - lo:
        raise ValueError(
            f"This process's devices hold non-contiguous batch rows {spans}; "
            "order the mesh so each host's devices are adjacent along data/fsdp."
        )
    return lo, hi


def global_batch(
    source, step: int, mesh: jax.sharding.Mesh, vocab_size: int | None = None
) -> dict[str, jax.Array]:
    """Step ``step``'s batch as global arrays sharded over the batch axes.

    Each process reads only the rows its own devices hold (``process_rows``), so hosts
    never load data they do not use, and the rows of a step do not depend on how many
    hosts there are. With ``vocab_size``, a token id outside ``[0, vocab_size)`` (data
    tokenized for a larger vocabulary) is an error: the embedding lookup would clamp it.
    """
    rows = source.global_batch_size
    lo, hi = process_rows(mesh, rows)
    local = source.samples(np.arange(step * rows + lo, step * rows + hi, dtype=np.int64))
    tokens = local["tokens"]
    if vocab_size and tokens.size and not 0 <= tokens.min() <= tokens.max() < vocab_size:
        bad = tokens.min() if tokens.min() < 0 else tokens.max()
        where = getattr(source, "dataset", None)
        raise UserError(
            f"step {step}: the data holds token id {int(bad)}, outside the model's vocabulary "
            f"[0, {vocab_size}){f' ({where.prefix})' if hasattr(where, 'prefix') else ''}: it "
            "was tokenized for another vocabulary; retokenize it with the model's tokenizer or "
            "set --config.model.vocab_size to cover it."
        )
    out = {}
    for key, value in local.items():
        value = np.asarray(value, np.int32)
        out[key] = jax.make_array_from_process_local_data(
            batch_sharding(mesh, value.ndim), value, (rows, *value.shape[1:])
        )
    return out
