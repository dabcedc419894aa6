"""Retrieval-augmented generation: chunk, embed, index, retrieve, assemble, generate.

    from neox_jax.retrieval import RAG, build_index, read_corpus
    index = build_index(embedder, read_corpus("docs.jsonl"), chunk_tokens=256, overlap=32)
    answer = RAG(embedder, index, generator).answer("Who wrote it?", top_k=4)
    answer.text, answer.chunk_ids

Command line (``configs/rag.py``): ``python -m neox_jax.embed`` builds an index from a
corpus, ``python -m neox_jax.rag`` answers questions with it.

The prompt is assembled from token ids (header, one block per passage in retrieval
order, then the question), each part encoded on its own, so its length is known
exactly and never exceeds the budget ``context - max_new_tokens`` (the context is
``max_position_embeddings`` times any RoPE scaling factor). A passage that does not fit
is left out (the next, shorter ones may still fit); a question that does not fit on its
own is an error. The answer carries the ids of the passages the model was given.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neox_jax.data.text_files import (
    file_kind,
    is_corpus_file,
    json_records,
    open_text,
    parquet_rows,
)
from neox_jax.errors import UserError
from neox_jax.inference import SamplingParams
from neox_jax.retrieval.embed import Embedder
from neox_jax.retrieval.index import Hit, VectorIndex

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")


# ------------------------------------------------------------------ corpus
def read_corpus(
    path: str | os.PathLike, *, text_field: str = "text", id_field: str = "id"
) -> list[dict[str, str]]:
    """Documents ``{"id", "text", "source"}`` from a file or a directory of files.

    ``.jsonl``/``.json`` (JSON lines or one JSON array) and ``.parquet``: one record per
    document with ``text_field`` (and optionally ``id_field`` and ``source``; a null text
    is an empty document). Other text files (``.txt``, ``.md``, ...): one document per file.
    Any of them may be compressed (``neox_jax.data.text_files``). A directory: every such
    file in it, sorted, recursively.

    Raises:
      FileNotFoundError: nothing at ``path``. ValueError: a bad line, or no documents.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus {path} does not exist.")
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.is_file() and is_corpus_file(p, TEXT_SUFFIXES))
    )
    docs = []
    for f in files:
        kind = file_kind(f)
        if kind == "text":
            docs.append(
                {
                    "id": str(f.relative_to(path) if path.is_dir() else f.name),
                    "text": _read_text(f),
                    "source": str(f),
                }
            )
            continue
        records = (
            json_records(f)
            if kind == "json"
            else enumerate(parquet_rows(f, [text_field, id_field, "source"], "text_field"), 1)
        )
        for n, record in records:
            if not isinstance(record, dict) or text_field not in record:
                problem = record if isinstance(record, json.JSONDecodeError) else "no such field"
                raise ValueError(
                    f"{f}:{n}: expected a JSON object with a {text_field!r} field ({problem})."
                )
            text = record[text_field]
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{f}:{n}: {text_field!r} must be a string.")
            doc_id = record.get(id_field)
            source = record.get("source")
            docs.append(
                {
                    "id": str(f"{f.stem}:{n}" if doc_id is None else doc_id),
                    "text": text or "",
                    "source": f"{f}:{n}" if source is None else source,
                }
            )
    if not any(d["text"].strip() for d in docs):
        raise ValueError(f"empty corpus: {path} holds no non-empty documents.")
    return docs


def _read_text(path: Path) -> str:
    try:
        with open_text(path) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(
            f"corpus file {path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it "
            "to UTF-8 first."
        ) from None


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A window of a document's tokens: ``token_ids = doc_tokens[start : start + n]``."""

    id: str
    doc_id: str
    source: str
    text: str
    start: int
    token_ids: tuple[int, ...]

    def record(self) -> dict[str, Any]:
        """What the index stores for this chunk (no token ids: they are re-derivable)."""
        return {
            "id": self.id,
            "doc_id": self.doc_id,
            "source": self.source,
            "start": self.start,
            "num_tokens": len(self.token_ids),
            "text": self.text,
        }


def token_windows(num_tokens: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """``(start, end)`` windows of ``size`` tokens, consecutive ones sharing ``overlap``;
    the last ends at ``num_tokens``. No window lies inside the previous one."""
    if size < 1 or not 0 <= overlap < size:
        raise ValueError(f"need chunk size >= 1 and 0 <= overlap < size, got {size}, {overlap}.")
    windows, start = [], 0
    while start < num_tokens:
        end = min(start + size, num_tokens)
        windows.append((start, end))
        if end == num_tokens:
            break
        start = end - overlap
    return windows


def chunk_documents(
    tokenizer, documents: Iterable[Mapping[str, str]], *, size: int = 256, overlap: int = 32
) -> list[Chunk]:
    """Split each document into token windows (see ``token_windows``).

    Chunk ids are ``"{doc_id}#{i}"``; a chunk's text is its tokens decoded (a window
    edge inside a multi-byte character shows as U+FFFD there, nowhere else).
    """
    chunks = []
    for doc in documents:
        ids = tokenizer.encode(doc["text"])
        for i, (a, b) in enumerate(token_windows(len(ids), size, overlap)):
            piece = tuple(ids[a:b])
            chunks.append(
                Chunk(
                    f"{doc['id']}#{i}",
                    str(doc["id"]),
                    str(doc.get("source", "")),
                    tokenizer.decode(piece),
                    a,
                    piece,
                )
            )
    return chunks


def embed_corpus(
    embedder: Embedder,
    documents: Iterable[Mapping[str, str]],
    *,
    chunk_tokens: int = 256,
    overlap: int = 32,
) -> tuple[list[Chunk], np.ndarray]:
    """Chunk documents and embed the chunks: ``(chunks, vectors [N, E])``.

    Each chunk is embedded with the special tokens the tokenizer adds around a text (a
    Llama bos), as ``Embedder.embed`` embeds a query, so both live in one space.

    Raises:
      ValueError: no chunks (an empty corpus), or chunks longer than the embedder reads.
    """
    tok = embedder.tokenizer
    pre, post = (tuple(getattr(tok, f"special_{s}", ())) for s in ("prefix", "suffix"))
    if chunk_tokens + len(pre) + len(post) > embedder.max_length:
        raise ValueError(
            f"chunk_tokens={chunk_tokens} (with {len(pre) + len(post)} special tokens) "
            f"exceeds the embedder's max_length {embedder.max_length}; use smaller chunks."
        )
    chunks = chunk_documents(tok, documents, size=chunk_tokens, overlap=overlap)
    if not chunks:
        raise ValueError("empty corpus: the documents hold no tokens to index.")
    return chunks, embedder.embed_ids([[*pre, *c.token_ids, *post] for c in chunks])


def build_index(
    embedder: Embedder,
    documents: Iterable[Mapping[str, str]],
    *,
    chunk_tokens: int = 256,
    overlap: int = 32,
    kind: str = "flat",
    metadata: Mapping[str, Any] | None = None,
    **index_kwargs,
) -> VectorIndex:
    """Chunk, embed and index documents.

    Args:
      embedder: the ``Embedder`` (its settings are recorded in the index metadata).
      documents: ``{"id", "text", "source"}`` dicts (``read_corpus``).
      chunk_tokens, overlap: chunk size and overlap in tokens.
      kind: "flat", "ivf" or "hnsw"; **index_kwargs: more ``VectorIndex.build`` options.
      metadata: extra facts to record (e.g. the checkpoint path).

    Returns:
      The ``VectorIndex`` (row i = chunk i).

    Raises:
      ValueError: an empty corpus.
    """
    chunks, vectors = embed_corpus(embedder, documents, chunk_tokens=chunk_tokens, overlap=overlap)
    return VectorIndex.build(
        vectors,
        [c.record() for c in chunks],
        kind=kind,
        metadata=index_metadata(embedder, chunk_tokens, overlap, metadata),
        **index_kwargs,
    )


def index_metadata(embedder: Embedder, chunk_tokens: int, overlap: int, extra=None) -> dict:
    """What an index records about how it was built (the query side must match it)."""
    return {
        "embedding": embedder.describe(),
        "chunk_tokens": chunk_tokens,
        "chunk_overlap": overlap,
        **(extra or {}),
    }


# ------------------------------------------------------------------ prompts
@dataclasses.dataclass(frozen=True)
class RagTemplate:
    """The prompt's parts (``str.format`` fields in braces)."""

    header: str = "Answer the question using the passages below.\n\n"
    passage: str = "[{id}] {text}\n\n"
    question: str = "Question: {question}\nAnswer:"


@dataclasses.dataclass(frozen=True)
class AssembledPrompt:
    """The prompt fed to the model: exact token ids, their text, the passages used
    (in prompt order) and those left out for lack of room."""

    token_ids: list[int]
    text: str
    chunk_ids: tuple[str, ...]
    skipped: tuple[str, ...]


def assemble_prompt(
    tokenizer,
    question: str,
    passages: Sequence[Mapping[str, Any]],
    budget: int,
    template: RagTemplate = RagTemplate(),
) -> AssembledPrompt:
    """Header, as many passages as fit (in order), then the question; ``<= budget`` tokens.

    Args:
      tokenizer: the model's tokenizer.
      question: the user's question (never truncated).
      passages: records with ``id`` and ``text``, best first.
      budget: the most prompt tokens allowed.

    Raises:
      ValueError: the header and question alone exceed the budget.
    """
    head = tokenizer.encode(template.header, add_special_tokens=True)  # the prompt's start
    tail = tokenizer.encode(template.question.format(question=question))
    room = budget - len(head) - len(tail)
    if room < 0:
        raise ValueError(
            f"the question needs {len(head) + len(tail)} prompt tokens (with the template), "
            f"more than the budget of {budget} (the context minus max_new_tokens); shorten "
            "the question or lower max_new_tokens."
        )
    body, used, skipped = [], [], []
    for p in passages:
        block = tokenizer.encode(template.passage.format(id=p["id"], text=p["text"]))
        if len(block) <= room:
            body += block
            room -= len(block)
            used.append(p["id"])
        else:
            skipped.append(p["id"])
    ids = head + body + tail
    return AssembledPrompt(ids, tokenizer.decode(ids), tuple(used), tuple(skipped))


# ---------------------------------------------------------------- pipeline
@dataclasses.dataclass(frozen=True)
class RagAnswer:
    """An answer with its provenance: the chunk ids the prompt held, their search
    scores, the prompt itself (text and token count), and why generation stopped."""

    question: str
    text: str
    chunk_ids: tuple[str, ...]
    scores: tuple[float, ...]
    prompt: str
    prompt_tokens: int
    finish_reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RAG:
    """Retrieve-then-generate over one index with one model.

    Args:
      embedder: embeds questions (the settings that built the index).
      index: the ``VectorIndex``.
      generator: a ``neox_jax.inference.Generator`` with a tokenizer.
      template: the prompt parts.
    """

    def __init__(self, embedder: Embedder, index: VectorIndex, generator, template=None):
        built = index.meta.get("metadata", {}).get("embedding")
        if built and built.get("dim") != embedder.dim:
            raise ValueError(
                f"the index holds {built.get('dim')}-dimensional vectors but the embedder makes "
                f"{embedder.dim}; load the model that built the index."
            )
        self.embedder, self.index, self.generator = embedder, index, generator
        self.template = template or RagTemplate()

    def budget(self, max_new_tokens: int) -> int:
        """Prompt tokens allowed with ``max_new_tokens`` of answer (as the generator fits)."""
        budget = self.generator.context_length - max_new_tokens
        if self.generator.max_cache_len is not None:
            budget = min(budget, self.generator.max_cache_len - max_new_tokens + 1)
        return budget

    def answer(
        self,
        questions: str | Sequence[str],
        *,
        top_k: int = 4,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        stop_strings: Sequence[str] = ("\n\n",),
        seed: int = 0,
    ):
        """Answer one question or several (batched through the generator).

        Args:
          questions: a question, or a list of them.
          top_k: passages retrieved per question; those that do not fit the budget
            (``context - max_new_tokens``) are left out, best-ranked first in.
          max_new_tokens, temperature, stop_strings, seed: generation settings.

        Returns:
          A ``RagAnswer`` for a single question, else a list of them.

        Raises:
          ValueError: a question that does not fit the budget on its own.
        """
        single = isinstance(questions, str)
        questions = [questions] if single else list(questions)
        if not questions:
            return []
        budget = self.budget(max_new_tokens)
        for q in questions:  # fail on an oversize question before any model work
            assemble_prompt(self.generator.tokenizer, q, [], budget, self.template)
        hits = self.index.search(self.embedder.embed(questions), top_k)
        prompts = [
            assemble_prompt(
                self.generator.tokenizer, q, [h.record for h in hs], budget, self.template
            )
            for q, hs in zip(questions, hits, strict=True)
        ]
        sampling = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            stop_strings=tuple(stop_strings),
            seed=seed,
        )
        results = self.generator.generate([p.token_ids for p in prompts], sampling)
        answers = [
            _answer(q, p, hs, r)
            for q, p, hs, r in zip(questions, prompts, hits, results, strict=True)
        ]
        return answers[0] if single else answers


def _answer(question: str, prompt: AssembledPrompt, hits: list[Hit], result) -> RagAnswer:
    score = {h.id: h.score for h in hits}
    return RagAnswer(
        question,
        result.text,
        prompt.chunk_ids,
        tuple(score[c] for c in prompt.chunk_ids),
        prompt.text,
        len(prompt.token_ids),
        result.finish_reason,
    )


if __name__ == "__main__":  # the command moved up to the entry-point layer
    import sys

    print(
        "neox_jax.retrieval.rag: error: this command is now `python -m neox_jax.rag` "
        "(same --config flags).",
        file=sys.stderr,
    )
    sys.exit(2)
