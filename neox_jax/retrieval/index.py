"""A faiss vector index whose rows map to stored chunks and their sources.

Kinds (``kind=``):

* ``flat``: exact search (``IndexFlatIP`` / ``IndexFlatL2``); right up to ~1e6 vectors.
* ``ivf``: inverted lists over k-means cells (``IndexIVFFlat``); searches ``nprobe`` of
  ``nlist`` cells, so it is approximate and sub-linear. Needs training (on the corpus).
* ``hnsw``: a navigable small-world graph (``IndexHNSWFlat``); approximate, no
  training, more memory. ``ef_search`` trades recall for speed.

Metric ``ip`` (inner product; cosine on L2-normalised embeddings, higher is better) or
``l2`` (squared Euclidean distance, lower is better).

On disk, a directory::

    index.faiss     the faiss index (row i = record i)
    chunks.jsonl    one record per row: {"id", "text", "source", ...}
    index.json      kind, metric, dim, count, search settings, and caller metadata
                    (e.g. the embedding model and its layer/pooling)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neox_jax.atomic import atomic_directory
from neox_jax.errors import load_json
from neox_jax.optional import require

KINDS = ("flat", "ivf", "hnsw")
METRICS = ("ip", "l2")
INDEX_FILE, RECORDS_FILE, META_FILE = "index.faiss", "chunks.jsonl", "index.json"


def _faiss():
    return require("faiss", "a vector index")  # the "retrieval" extra


@dataclasses.dataclass(frozen=True)
class Hit:
    """One search result: its row, score (inner product, or squared L2 distance) and record."""

    row: int
    score: float
    record: dict[str, Any]

    @property
    def id(self) -> str:
        return self.record["id"]


def default_nlist(n: int) -> int:
    """IVF cells for ``n`` vectors: ~4 sqrt(n) (faiss's guideline), with at least 39
    training points per cell, below which faiss warns that k-means is unreliable."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


class VectorIndex:
    """A faiss index plus one record per row. Build with ``build``, or ``load`` one."""

    def __init__(self, index, records: list[dict[str, Any]], meta: dict[str, Any]):
        self.index, self.records, self.meta = index, records, meta

    def __len__(self) -> int:
        return len(self.records)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        records: Sequence[Mapping[str, Any]],
        *,
        kind: str = "flat",
        metric: str = "ip",
        nlist: int | None = None,
        nprobe: int = 8,
        hnsw_m: int = 32,
        ef_search: int = 64,
        metadata: Mapping[str, Any] | None = None,
    ) -> VectorIndex:
        """Index ``vectors`` (row i belongs to ``records[i]``).

        Args:
          vectors: ``[N, D]`` embeddings.
          records: one dict per row with a unique string ``"id"`` (plus e.g. ``text``,
            ``source``); stored as given.
          kind: "flat", "ivf" or "hnsw"; metric: "ip" or "l2".
          nlist: IVF cells (default ``default_nlist(N)``); nprobe: cells searched.
          hnsw_m: HNSW graph degree; ef_search: HNSW search breadth.
          metadata: extra JSON-serialisable facts kept in ``index.json``.

        Raises:
          ValueError: an empty corpus, mismatched sizes, duplicate ids, bad settings.
        """
        if kind not in KINDS:
            raise ValueError(f"Unknown index kind {kind!r}; choose one of {', '.join(KINDS)}.")
        if metric not in METRICS:
            raise ValueError(f"Unknown metric {metric!r}; choose one of {', '.join(METRICS)}.")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(
                f"empty corpus: no vectors to index (got shape {vectors.shape}); give at "
                "least one non-empty document."
            )
        if len(records) != vectors.shape[0]:
            raise ValueError(f"{vectors.shape[0]} vectors but {len(records)} records.")
        records = [dict(r) for r in records]
        ids = [r.get("id") for r in records]
        if any(not isinstance(i, str) for i in ids) or len(set(ids)) != len(ids):
            raise ValueError("every record needs a unique string 'id'.")
        if not np.isfinite(vectors).all():
            raise ValueError("vectors hold NaN or inf; check the embedding model.")
        n, dim = vectors.shape
        faiss = _faiss()
        faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
        settings: dict[str, Any] = {}
        if kind == "flat":
            index = faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
        elif kind == "ivf":
            nlist = default_nlist(n) if nlist is None else int(nlist)
            if not 1 <= nlist <= n:
                raise ValueError(f"nlist must lie in [1, {n}] (the corpus size), got {nlist}.")
            quantizer = faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss_metric)
            index.train(vectors)
            settings = {"nlist": nlist, "nprobe": max(1, min(int(nprobe), nlist))}
        else:
            index = faiss.IndexHNSWFlat(dim, int(hnsw_m), faiss_metric)
            settings = {"hnsw_m": int(hnsw_m), "ef_search": int(ef_search)}
        index.add(vectors)
        meta = {"kind": kind, "metric": metric, "dim": dim, "count": n, **settings}
        meta["metadata"] = dict(metadata or {})
        out = cls(index, records, meta)
        out._apply_settings()
        return out

    def _apply_settings(self) -> None:
        if self.meta["kind"] == "ivf":
            self.index.nprobe = int(self.meta["nprobe"])
        elif self.meta["kind"] == "hnsw":
            self.index.hnsw.efSearch = int(self.meta["ef_search"])

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """The ``k`` nearest records of each query, best first.

        Args:
          queries: ``[Q, D]`` (or ``[D]`` for one query).
          k: results per query; fewer come back when the index is smaller (or an
            approximate index finds fewer).

        Returns:
          One list of ``Hit`` per query.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(
                f"queries have dimension {queries.shape[1]} but the index holds {self.dim}; "
                "embed them with the model and layer that built the index."
            )
        scores, rows = self.index.search(queries, min(k, len(self)))
        return [
            [
                Hit(int(r), float(s), self.records[r])
                for s, r in zip(srow, rrow, strict=True)
                if r >= 0
            ]  # faiss pads missing results with -1
            for srow, rrow in zip(scores, rows, strict=True)
        ]

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the index directory (atomically: a crash leaves no half-written index)."""
        directory = Path(directory).absolute()
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            _faiss().write_index(self.index, str(tmp / INDEX_FILE))
            with open(tmp / RECORDS_FILE, "w", encoding="utf-8") as f:
                for r in self.records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            (tmp / META_FILE).write_text(json.dumps(self.meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> VectorIndex:
        """Read an index directory written by ``save``.

        Raises:
          FileNotFoundError: a missing file. ValueError: files that disagree.
        """
        directory = Path(directory)
        for name in (INDEX_FILE, RECORDS_FILE, META_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"{directory / name} is missing; is {directory} an index written by "
                    "VectorIndex.save (or python -m neox_jax.embed)?"
                )
        meta = load_json(directory / META_FILE, "index settings")
        with open(directory / RECORDS_FILE, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        index = _faiss().read_index(str(directory / INDEX_FILE))
        if index.ntotal != len(records) or index.d != meta["dim"]:
            raise ValueError(
                f"{directory}: the index holds {index.ntotal} vectors of dimension {index.d} "
                f"but {RECORDS_FILE} has {len(records)} records and {META_FILE} says dimension "
                f"{meta['dim']}; the files do not belong together."
            )
        out = cls(index, records, meta)
        out._apply_settings()
        return out
