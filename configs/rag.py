"""Embedding a corpus into a vector index, and retrieval-augmented generation over it.

Build an index (chunks, their embeddings, a faiss index and the chunk texts):

  python -m neox_jax.embed --config=configs/rag.py --config.checkpoint=PATH \
      --config.corpus=docs.jsonl --config.index_dir=/tmp/docs_index

Answer questions with it (the same model settings; the index records them):

  python -m neox_jax.rag --config=configs/rag.py --config.checkpoint=PATH \
      --config.index_dir=/tmp/docs_index --config.question="Who maintains the parser?"

Presets after the colon: ``configs/rag.py:ivf`` and ``configs/rag.py:hnsw`` pick an
approximate index for large corpora (the default is exact search). A 2,048-position
model reads longer prompts with ``--config.rope_scaling_type=linear
--config.rope_scaling_factor=2`` (or ``ntk``).
"""

import runpy
from pathlib import Path

import ml_collections

# configs/ is not a package: the shared blocks come from the file beside this one.
COMMON = runpy.run_path(str(Path(__file__).with_name("common.py")))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The RAG config; ``arg`` picks the index kind: "" (flat, exact), "ivf" or "hnsw"."""
    c = ml_collections.ConfigDict()
    COMMON["add_model_source"](c)  # checkpoint, tokenizer, dtype, attention_impl, RoPE

    # ----------------------------------------------------------------- corpus
    # A .jsonl/.json file (one document per record), a .parquet file (one per row), a text
    # file (one document), any of them compressed, or a folder of such files.
    c.corpus = ""
    # Fields (columns) holding each document's text and id (the id defaults to file:line).
    c.text_field = "text"
    c.id_field = "id"
    # Chunks of this many tokens, consecutive chunks sharing chunk_overlap tokens.
    c.chunk_tokens = 256
    c.chunk_overlap = 32

    # ------------------------------------------------------------- embeddings
    c.embed = ml_collections.ConfigDict()
    # Hidden state to pool: 0 = token embeddings .. L; negative counts from the top
    # (-1 = the final LayerNorm output).
    c.embed.layer = -1
    # "mean" over real tokens, "last" real token, or element-wise "max".
    c.embed.pooling = "mean"
    # L2-normalise, so the inner-product index ranks by cosine similarity.
    c.embed.normalize = True
    # Chunks per device batch.
    c.embed.batch_size = 16

    # ------------------------------------------------------------------ index
    c.index = ml_collections.ConfigDict()
    # "flat" (exact), "ivf" (inverted lists) or "hnsw" (graph); the last two approximate.
    c.index.kind = arg or "flat"
    # "ip" (inner product; cosine when normalised) or "l2" (squared distance).
    c.index.metric = "ip"
    # IVF: number of cells (0 = about 4 sqrt(N)) and cells searched per query.
    c.index.nlist = 0
    c.index.nprobe = 8
    # HNSW: graph degree and search breadth.
    c.index.hnsw_m = 32
    c.index.ef_search = 64
    # Where the index is written (neox_jax.embed) or read (neox_jax.rag).
    c.index_dir = ""
    # Replace a non-empty index_dir.
    c.overwrite = False

    # ----------------------------------------------------------------- answer
    # One question, or a file of questions (one per line, or .jsonl with "question").
    c.question = ""
    c.question_file = ""
    # Passages retrieved per question (fewer go in when the context is full).
    c.top_k = 4
    # Answer length; the prompt budget is the context minus this.
    c.max_new_tokens = 128
    # 0 = greedy.
    c.temperature = 0.0
    c.seed = 0
    # Strings that end the answer, e.g. "('\n\n',)".
    c.stop_strings = ("\n\n",)
    # Write JSON lines (answer, chunk ids, scores) here instead of stdout.
    c.output_file = ""

    if arg not in (None, "", "flat", "ivf", "hnsw"):
        raise ValueError(f"Unknown preset {arg!r}; choose '', 'ivf' or 'hnsw'.")
    return c
