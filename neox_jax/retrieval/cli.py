"""What ``python -m neox_jax.embed`` and ``python -m neox_jax.rag`` do.

``build_from_config`` embeds a corpus into an index directory (the faiss index, the
chunk records, ``embeddings.npy`` with the vectors and ``ids.json`` with the chunk id of
each row); ``answer_from_config`` answers questions with such a directory. Both take a
``configs/rag.py`` config (checked by ``neox_jax.config_checks.rag``); the entry points
run them through ``neox_jax.cli``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

import numpy as np

from neox_jax.errors import UserError, read_utf8
from neox_jax.loading import load_from_config
from neox_jax.retrieval.embed import Embedder
from neox_jax.retrieval.index import VectorIndex
from neox_jax.retrieval.rag import RAG, embed_corpus, index_metadata, read_corpus


def _embedder(config, model_config, params, tokenizer, settings=None) -> Embedder:
    settings = settings or {}
    return Embedder(
        model_config,
        params,
        tokenizer,
        layer=settings.get("layer", config.embed.layer),
        pooling=settings.get("pooling", config.embed.pooling),
        normalize=settings.get("normalize", config.embed.normalize),
        batch_size=config.embed.batch_size,
    )


def build_from_config(config, out: TextIO | None = None) -> Path:
    """Embed ``config.corpus`` into ``config.index_dir``; returns the directory."""
    out = out or sys.stdout
    if not config.corpus or not config.index_dir:
        raise UserError("pass --config.corpus=FILE_OR_DIR and --config.index_dir=DIR.")
    index_dir = Path(config.index_dir)
    if index_dir.exists() and any(index_dir.iterdir()) and not config.overwrite:
        raise FileExistsError(f"{index_dir} is not empty; pass --config.overwrite=True.")
    docs = read_corpus(config.corpus, text_field=config.text_field, id_field=config.id_field)
    model_config, params, tokenizer = load_from_config(config)
    embedder = _embedder(config, model_config, params, tokenizer)
    chunks, vectors = embed_corpus(
        embedder, docs, chunk_tokens=config.chunk_tokens, overlap=config.chunk_overlap
    )
    extra = {
        "checkpoint": str(config.checkpoint),
        "corpus": str(config.corpus),
        "rope_scaling": model_config.rope_scaling_dict,
    }
    index = VectorIndex.build(
        vectors,
        [c.record() for c in chunks],
        kind=config.index.kind,
        metric=config.index.metric,
        nlist=config.index.nlist or None,
        nprobe=config.index.nprobe,
        hnsw_m=config.index.hnsw_m,
        ef_search=config.index.ef_search,
        metadata=index_metadata(embedder, config.chunk_tokens, config.chunk_overlap, extra),
    )
    index.save(index_dir, overwrite=config.overwrite)
    # The raw vectors and the chunk id of each row too, for other tools.
    np.save(index_dir / "embeddings.npy", vectors)
    (index_dir / "ids.json").write_text(json.dumps([c.id for c in chunks]) + "\n")
    out.write(
        f"indexed {len(docs)} documents as {len(index)} chunks "
        f"({index.meta['kind']}, dim {index.dim}) in {index_dir}\n"
    )
    return index_dir


def read_questions(config) -> list[str]:
    """The question(s) named by the config."""
    if bool(config.question) == bool(config.question_file):
        raise UserError("pass exactly one of --config.question= and --config.question_file=.")
    if config.question:
        return [config.question]
    path = Path(config.question_file)
    if not path.is_file():
        raise UserError(f"question_file {path} does not exist.")
    lines = [ln for ln in read_utf8(path, "question_file").splitlines() if ln.strip()]
    if path.suffix != ".jsonl":
        return lines
    try:
        return [str(json.loads(ln)["question"]) for ln in lines]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path}: every line must be a JSON object with 'question' ({e}).") from e


def answer_from_config(config, out: TextIO | None = None) -> list[dict]:
    """Answer the config's question(s); writes one JSON line per answer."""
    from neox_jax.inference import Generator

    out = out or sys.stdout
    if not config.index_dir:
        raise UserError("pass --config.index_dir=DIR (built by python -m neox_jax.embed).")
    questions = read_questions(config)
    index = VectorIndex.load(config.index_dir)
    model_config, params, tokenizer = load_from_config(config)
    built = index.meta.get("metadata", {})
    if "rope_scaling" in built and built["rope_scaling"] != model_config.rope_scaling_dict:
        raise UserError(
            f"the index was built with rope_scaling={built['rope_scaling']} but the model is "
            f"loaded with {model_config.rope_scaling_dict}; queries would be embedded "
            "differently. Pass the same --config.rope_scaling_type/_factor as for neox_jax.embed."
        )
    settings = built.get("embedding")  # embed queries exactly as the chunks were
    embedder = _embedder(config, model_config, params, tokenizer, settings)
    rag = RAG(embedder, index, Generator(model_config, embedder.placement.params, tokenizer))
    answers = rag.answer(
        questions,
        top_k=config.top_k,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        stop_strings=tuple(config.stop_strings),
        seed=config.seed,
    )
    rows = [a.to_dict() for a in answers]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if config.output_file:
        Path(config.output_file).write_text(lines, encoding="utf-8")
    else:
        out.write(lines)
    return rows
