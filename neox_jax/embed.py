"""Embed a corpus into a vector index: the command-line entry point.

  python -m neox_jax.embed --config=configs/rag.py --config.checkpoint=PATH \
      --config.corpus=docs.jsonl --config.index_dir=/tmp/docs_index

Writes ``index.faiss``, ``chunks.jsonl`` (id, text, source of each row), ``index.json``
(settings), ``embeddings.npy`` and ``ids.json`` into ``index_dir``. Every field of
``configs/rag.py`` can be overridden (``--config.embed.layer=-2``,
``--config.index.kind=hnsw``). Answer questions with the index through
``python -m neox_jax.rag``. The work is done by
``neox_jax.retrieval.cli.build_from_config``, which a notebook can call too.
"""

from neox_jax import cli, config_checks
from neox_jax.retrieval.cli import build_from_config


def main(config) -> None:
    """Check the config, then build the index."""
    config_checks.rag(config, building=True)
    config_checks.destination(config, "index_dir")
    build_from_config(config)


COMMAND = cli.Command(main, "neox_jax.embed", default_config="rag.py")

if __name__ == "__main__":
    COMMAND.run()
