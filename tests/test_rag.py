"""RAG: chunking, prompt budgets (a property test), end-to-end answers, the CLIs."""

import io
import json

import numpy as np
import pytest
from helpers.evaluation import WORDS, corpus_lines, load_config, tiny_model

from neox_jax.inference import Generator
from neox_jax.retrieval import (
    RAG,
    Embedder,
    RagTemplate,
    assemble_prompt,
    build_index,
    chunk_documents,
    token_windows,
)
from neox_jax.retrieval.cli import answer_from_config, build_from_config


@pytest.mark.parametrize(
    "n,size,overlap", [(0, 4, 1), (1, 4, 0), (10, 4, 1), (37, 8, 3), (16, 8, 0), (100, 100, 99)]
)
def test_token_windows_cover_with_overlap(n, size, overlap):
    windows = token_windows(n, size, overlap)
    covered = np.zeros(n, int)
    for a, b in windows:
        assert 0 <= a < b <= n and b - a <= size
        covered[a:b] += 1
    assert (covered >= 1).all()
    if windows:
        assert windows[0][0] == 0 and windows[-1][1] == n
    for (_, b0), (a1, b1) in zip(windows, windows[1:], strict=False):
        assert a1 == b0 - overlap and b1 > b0  # exact overlap, always progress


def test_token_windows_reject_bad_settings():
    for size, overlap in ((0, 0), (4, 4), (4, -1)):
        with pytest.raises(ValueError, match="overlap < size"):
            token_windows(10, size, overlap)


def test_chunk_documents_ids_and_text():
    tok = tiny_model()[4]
    text = " ".join(corpus_lines(6, seed=2))
    chunks = chunk_documents(
        tok, [{"id": "doc", "text": text, "source": "s.txt"}], size=12, overlap=4
    )
    ids = tok.encode(text)
    assert [c.id for c in chunks] == [f"doc#{i}" for i in range(len(chunks))]
    for c in chunks:
        assert list(c.token_ids) == ids[c.start : c.start + len(c.token_ids)]
        assert c.text == tok.decode(c.token_ids) and c.source == "s.txt"


def test_prompt_never_exceeds_budget_property():
    """Random passage counts and sizes, question lengths and budgets: the prompt fits
    or, when the question alone cannot, assembly raises; passages keep their order."""
    tok = tiny_model()[4]
    rng = np.random.default_rng(0)
    template = RagTemplate()
    fitted = raised = 0
    for _ in range(300):
        passages = [
            {"id": f"p{i}", "text": " ".join(rng.choice(WORDS, int(rng.integers(0, 60))))}
            for i in range(int(rng.integers(0, 8)))
        ]
        question = " ".join(rng.choice(WORDS, int(rng.integers(1, 40))))
        budget = int(rng.integers(0, 400))
        try:
            prompt = assemble_prompt(tok, question, passages, budget, template)
        except ValueError as e:
            assert "more than the budget" in str(e)
            head = tok.encode(template.header) + tok.encode(
                template.question.format(question=question)
            )
            assert len(head) > budget  # raised only when the question truly cannot fit
            raised += 1
            continue
        fitted += 1
        assert len(prompt.token_ids) <= budget
        order = [p["id"] for p in passages]
        assert sorted(prompt.chunk_ids + prompt.skipped, key=order.index) == order
        assert list(prompt.chunk_ids) == sorted(prompt.chunk_ids, key=order.index)
        assert prompt.text.endswith(template.question.format(question=question))
    assert fitted > 100 and raised > 10  # both branches were exercised


@pytest.fixture(scope="module")
def rag_setup():
    _, _, config, params, tok = tiny_model()
    texts = corpus_lines(30, seed=11)
    docs = [{"id": f"d{i}", "text": t, "source": f"src{i}"} for i, t in enumerate(texts)]
    embedder = Embedder(config, params, tok, batch_size=16)
    index = build_index(embedder, docs, chunk_tokens=16, overlap=4)
    return RAG(embedder, index, Generator(config, params, tok)), texts


def test_rag_answers_with_provenance(rag_setup):
    rag, texts = rag_setup
    max_new = 8
    answers = rag.answer([texts[4], "ocean kernel"], top_k=30, max_new_tokens=max_new)
    budget = rag.budget(max_new)  # 128 positions - 8 = 120
    assert budget == 120
    for a in answers:
        assert isinstance(a.text, str) and a.finish_reason in ("eos", "stop", "length")
        assert a.chunk_ids and len(a.scores) == len(a.chunk_ids)
        assert a.prompt_tokens <= budget
    # 30 retrieved chunks of ~16 tokens cannot all fit 120 tokens: some were left out.
    assert len(answers[0].chunk_ids) < 30
    # The planted document's own chunk is retrieved first and goes in first.
    assert answers[0].chunk_ids[0].startswith("d4#")
    single = rag.answer(texts[4], top_k=30, max_new_tokens=max_new)
    assert single.text == answers[0].text and single.chunk_ids == answers[0].chunk_ids


def test_rag_question_over_budget(rag_setup):
    rag, _ = rag_setup
    long_question = " ".join(["question"] * 200)
    with pytest.raises(ValueError, match="more than the budget"):
        rag.answer(long_question, max_new_tokens=8)


def test_cli_build_and_answer(tmp_path):
    path = tiny_model()[0]
    corpus = tmp_path / "docs.jsonl"
    texts = corpus_lines(12, seed=5)
    corpus.write_text(
        "".join(json.dumps({"id": f"k{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    config = load_config("rag", "hnsw")
    config.update(
        checkpoint=str(path),
        corpus=str(corpus),
        index_dir=str(tmp_path / "index"),
        chunk_tokens=64,
        chunk_overlap=4,
    )
    config.embed.pooling = "last"
    out = io.StringIO()
    build_from_config(config, out)
    assert "indexed 12 documents" in out.getvalue()
    saved = np.load(tmp_path / "index" / "embeddings.npy")
    ids = json.loads((tmp_path / "index" / "ids.json").read_text())
    assert saved.shape == (12, 64) and ids[0] == "k0#0"
    with pytest.raises(FileExistsError, match="overwrite"):
        build_from_config(config, out)
    config.question, config.max_new_tokens, config.top_k = texts[3], 4, 2
    rows = answer_from_config(config, io.StringIO())
    assert rows[0]["chunk_ids"][0] == "k3#0"  # the "last" pooling stored in the index was used
    config.rope_scaling_type, config.rope_scaling_factor = "linear", 2.0
    with pytest.raises(ValueError, match="index was built with rope_scaling=None"):
        answer_from_config(config, io.StringIO())
    config.question = ""
    with pytest.raises(ValueError, match="exactly one of"):
        answer_from_config(config, io.StringIO())
