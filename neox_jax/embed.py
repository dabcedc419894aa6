"""Embed a corpus into a vector index: the command-line entry point.

  python -m neox_jax.embed --config=configs/rag.py --config.checkpoint=PATH \
      --config.corpus=docs.jsonl --config.index_dir=/tmp/docs_index

Writes ``index.faiss``, ``chunks.jsonl`` (id, text, source of each row), ``index.json``
(settings), ``embeddings.npy`` and ``ids.json`` into ``index_dir``. Every field of
``configs/rag.py`` can be overridden (``--config.embed.layer=-2``,
``--config.index.kind=hnsw``). Answer questions with the index through
``python -m neox_jax.retrieval.rag``. The work is done by
``neox_jax.retrieval.cli.build_from_config``, which a notebook can call too.
"""

from neox_jax.retrieval.cli import build_from_config, run_app

if __name__ == "__main__":
    run_app(build_from_config, "neox_jax.embed")
