"""Embeddings, a faiss vector index and retrieval-augmented generation.

* ``Embedder`` — pooled (mean / last / max), optionally normalised hidden states of any
  layer, batched and bucketed.
* ``VectorIndex`` — faiss flat / IVF / HNSW with one stored record per row; save, load.
* ``read_corpus``, ``chunk_documents``, ``build_index`` — documents to an index.
* ``assemble_prompt``, ``RAG`` — budgeted prompts and retrieve-then-generate answers.

CLIs: ``python -m neox_jax.embed`` (build) and ``python -m neox_jax.rag``
(answer), both with ``configs/rag.py``.
"""

from neox_jax.retrieval.embed import POOLINGS, Embedder, pool, resolve_layer
from neox_jax.retrieval.index import KINDS, METRICS, Hit, VectorIndex
from neox_jax.retrieval.rag import (
    RAG,
    AssembledPrompt,
    Chunk,
    RagAnswer,
    RagTemplate,
    assemble_prompt,
    build_index,
    chunk_documents,
    embed_corpus,
    read_corpus,
    token_windows,
)

__all__ = [
    "KINDS",
    "METRICS",
    "POOLINGS",
    "RAG",
    "AssembledPrompt",
    "Chunk",
    "Embedder",
    "Hit",
    "RagAnswer",
    "RagTemplate",
    "VectorIndex",
    "assemble_prompt",
    "build_index",
    "chunk_documents",
    "embed_corpus",
    "pool",
    "read_corpus",
    "resolve_layer",
    "token_windows",
]
