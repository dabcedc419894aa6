"""Pretraining data (data.source=hf) from files written by ``datasets``, pandas and pyarrow.

Every file holds the same rows, with the text in a column named ``content`` (not ``text``),
a null row, an empty row and non-ASCII text. The reference is independent of neox_jax:
transformers' tokenizer over the rows, nulls and empties skipped, an eos after each
document, packed as GPT-NeoX packs (row k = tokens ``[k*L, k*L + L + 1)``).
"""

import gzip
import hashlib
import json
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.hf_reference import train_byte_level_bpe

from configs import pretrain
from neox_jax.data.hf_source import load_hf_dataset, make_hf_source
from neox_jax.errors import UserError

L, B = 6, 2
ROWS = [
    {"content": "héllo wörld, ça va?", "id": 1},
    {"content": None, "id": 2},
    {"content": "", "id": 3},
    {"content": "🌍 earth: 地球", "id": 4},
    {"content": "the quick brown fox", "id": 5},
]
TEXTS = [r["content"] for r in ROWS]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    corpus = [t for t in TEXTS if t] * 20
    # Few merges past the 256 bytes: the texts stay many tokens long.
    return train_byte_level_bpe(folder, corpus, 270, {"eos_token": "<|endoftext|>"})


def _reference_rows(tok):
    """Every whole row of the packed stream."""
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(tok.path))
    eos = ref.convert_tokens_to_ids("<|endoftext|>")
    stream = [i for t in TEXTS if t for i in [*ref(t, add_special_tokens=False).input_ids, eos]]
    return np.array([stream[k * L : k * L + L + 1] for k in range((len(stream) - 1) // L)])


def _write(kind, root):
    """The rows as ``kind`` writes them; returns the path to give data.hf_name."""
    ds = datasets.Dataset.from_list(ROWS)
    frame = pd.DataFrame(ROWS)
    folder = root / kind
    folder.mkdir()
    if kind == "save_to_disk":
        ds.save_to_disk(str(folder))
    elif kind == "dataset_dict":
        datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(str(folder))
    elif kind == "datasets_parquet":
        ds.to_parquet(str(folder / "train-00000-of-00001.parquet"))
    elif kind == "pandas_parquet":
        frame.to_parquet(folder / "data.parquet")
    elif kind == "pyarrow_parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), folder / "part-0.parquet")
    elif kind == "jsonl_gz":
        with gzip.open(folder / "shard.jsonl.gz", "wt", encoding="utf-8") as f:
            frame.to_json(f, orient="records", lines=True, force_ascii=False)
    elif kind == "json_array":
        frame.to_json(folder / "data.json", orient="records", force_ascii=False)
    elif kind == "single_parquet_file":
        ds.to_parquet(str(folder / "one.parquet"))
        return folder / "one.parquet"
    elif kind == "single_jsonl_gz_file":
        ds.to_json(str(folder / "one.jsonl.gz"), compression="gzip")
        return folder / "one.jsonl.gz"
    return folder


def _cfg(name, **kw):
    cfg = pretrain.get_config("tiny").data
    cfg.unlock()
    cfg.update(source="hf", hf_name=str(name), seq_len=L, text_key="content", **kw)
    return cfg


KINDS = ["save_to_disk", "dataset_dict", "datasets_parquet", "pandas_parquet",
         "pyarrow_parquet", "jsonl_gz", "json_array", "single_parquet_file",
         "single_jsonl_gz_file"]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_rows_are_the_packed_stream(tmp_path, tok, kind):
    src = make_hf_source(_cfg(_write(kind, tmp_path)), tok, B, "train", (0, 1))
    expected = _reference_rows(tok)
    steps = len(expected) // B
    assert steps >= 2
    got = np.concatenate(
        [src.samples(np.arange(s * B, (s + 1) * B))["tokens"] for s in range(steps)]
    )
    np.testing.assert_array_equal(got, expected[: steps * B])


@pytest.mark.parametrize("kind", ["dataset_dict", "pandas_parquet", "single_jsonl_gz_file"])
def test_map_style_reads_null_rows_as_empty_documents(tmp_path, tok, kind):
    src = make_hf_source(_cfg(_write(kind, tmp_path), hf_streaming=False), tok, B, "train", (0, 1))
    assert [src._text(i) for i in range(len(ROWS))] == [t or "" for t in TEXTS]


def test_dataset_dict_validation_split(tmp_path, tok):
    folder = _write("dataset_dict", tmp_path)
    assert [r["content"] for r in load_hf_dataset(str(folder), "validation")] == TEXTS[:1]
    with pytest.raises(UserError, match=r"no split 'test'.*\['train', 'validation'\]"):
        load_hf_dataset(str(folder), "test")


@pytest.mark.parametrize("streaming", [True, False])
def test_missing_text_column_names_the_columns(tmp_path, tok, streaming):
    cfg = _cfg(_write("pandas_parquet", tmp_path), hf_streaming=streaming)
    cfg.text_key = "text"
    with pytest.raises(
        UserError, match=r"no 'text' field \(they have \['content', 'id'\]\).*text_key"
    ):
        make_hf_source(cfg, tok, B, "train", (0, 1)).samples(np.arange(B))


def test_non_text_column_is_refused(tmp_path, tok):
    cfg = _cfg(_write("pandas_parquet", tmp_path))
    cfg.text_key = "id"
    with pytest.raises(UserError, match="'id' field holds int values, not text"):
        make_hf_source(cfg, tok, B, "train", (0, 1)).samples(np.arange(B))


def test_offline_hub_id_from_the_hub_cache(tmp_path):
    # A dataset repository as huggingface_hub caches it (datasets--owner--name/refs/main +
    # snapshots/<sha>/data/*.parquet), read with HF_HUB_OFFLINE=1: datasets alone refuses
    # it (it only reuses its own prepared cache offline). In a subprocess, because both
    # libraries read the environment when imported.
    sha = hashlib.sha1(b"snapshot").hexdigest()
    repo = tmp_path / "home" / "hub" / "datasets--someone--tiny-corpus"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha / "data").mkdir(parents=True)
    datasets.Dataset.from_list(ROWS).to_parquet(
        str(repo / "snapshots" / sha / "data" / "train-00000-of-00001.parquet")
    )
    code = textwrap.dedent(
        """
        import json
        from neox_jax.data.hf_source import load_hf_dataset
        from neox_jax.errors import UserError
        out = {}
        for streaming in (True, False):
            ds = load_hf_dataset("someone/tiny-corpus", "train", streaming=streaming)
            out[str(streaming)] = [r["content"] for r in ds]
        try:
            load_hf_dataset("someone/not-cached", "train")
        except UserError as e:
            out["missing"] = str(e)
        print(json.dumps(out))
        """
    )
    env = {
        "HF_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
        **{k: v for k, v in __import__("os").environ.items() if k in ("PYTHONPATH", "HOME")},
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["True"] == TEXTS and out["False"] == TEXTS
    assert "someone/not-cached" in out["missing"] and "cannot be reached" in out["missing"]


# ---------------------------------------------------------------- neox_jax.data.preprocess
def _preprocess_input(kind, folder):
    """The rows as another tool writes a corpus file; returns its path."""
    frame = pd.DataFrame(ROWS)
    if kind == "json_array":  # pandas' default orient="records": one JSON array
        frame.to_json(folder / "c.json", orient="records", force_ascii=False, indent=2)
        return folder / "c.json"
    if kind == "datasets_jsonl":  # nulls written as null
        datasets.Dataset.from_list(ROWS).to_json(str(folder / "c.jsonl"))
        return folder / "c.jsonl"
    if kind in ("gz", "bz2", "xz"):
        path = folder / f"c.jsonl.{kind}"
        frame.to_json(path, orient="records", lines=True, compression="infer", force_ascii=False)
        return path
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), folder / "c.parquet")
        return folder / "c.parquet"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["json_array", "datasets_jsonl", "gz", "bz2", "xz", "parquet"])
def test_preprocess_reads_corpora_other_tools_write(tmp_path, tok, kind):
    from transformers import PreTrainedTokenizerFast

    from neox_jax.data.indexed_dataset import IndexedDataset
    from neox_jax.data.preprocess import preprocess

    path = _preprocess_input(kind, tmp_path)
    stats = preprocess(
        [str(path)], tokenizer=tok, output_prefix=str(tmp_path / "out"), jsonl_key="content",
        progress=False,
    )  # fmt: skip
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tok.path))
    eos = ref.convert_tokens_to_ids("<|endoftext|>")
    want = [[*ref(t, add_special_tokens=False).input_ids, eos] for t in TEXTS if t]
    ds = IndexedDataset(str(tmp_path / "out"))
    assert [ds[i].tolist() for i in range(len(ds))] == want
    assert stats.skipped_empty == 2  # the null and the empty row


def test_preprocess_parquet_without_the_column_names_the_columns(tmp_path, tok):
    from neox_jax.data.preprocess import preprocess

    path = _preprocess_input("parquet", tmp_path)
    with pytest.raises(UserError, match=r"no column 'text' \(columns: \['content', 'id'\]\)"):
        preprocess([str(path)], tokenizer=tok, output_prefix=str(tmp_path / "o"), progress=False)
    assert not list(tmp_path.glob("o.*"))


def test_preprocess_zstandard_jsonl(tmp_path, tok):
    # The Pile ships .jsonl.zst. With zstandard installed it is read; without, the error
    # says what to install (this environment decides which branch runs).
    from neox_jax.data.preprocess import iter_documents

    path = tmp_path / "c.jsonl.zst"
    try:
        import zstandard
    except ModuleNotFoundError:
        path.write_bytes(b"\x28\xb5\x2f\xfd")  # zstd's magic number; never decoded here
        with pytest.raises(UserError, match="zstandard.*pip install zstandard"):
            list(iter_documents([str(path)], jsonl_key="content"))
        return
    lines = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    assert list(iter_documents([str(path)], jsonl_key="content")) == [t or "" for t in TEXTS]


# ------------------------------------------------- the retrieval corpus (neox_jax.embed)
@pytest.mark.parametrize("kind", ["json_array", "datasets_jsonl", "gz", "parquet"])
def test_retrieval_corpus_from_files_other_tools_write(tmp_path, kind):
    from neox_jax.retrieval.rag import read_corpus

    folder = tmp_path / "corpus"
    folder.mkdir()
    path = _preprocess_input(kind, folder)
    for where in (path, folder):  # the file itself, or the folder holding it
        docs = read_corpus(where, text_field="content")
        assert [d["text"] for d in docs] == [t or "" for t in TEXTS]
        assert [d["id"] for d in docs] == [str(r["id"]) for r in ROWS]


# --------------------------------------------- evaluation text (perplexity.text_file)
@pytest.mark.parametrize("kind", ["datasets_jsonl", "json_array", "parquet", "txt_gz"])
def test_perplexity_text_from_files_other_tools_write(tmp_path, kind):
    # wikitext as datasets exports it: the transformers recipe scores "\n\n".join(texts).
    from neox_jax.evaluation.perplexity import read_eval_text

    rows = [{"text": r["content"]} for r in ROWS]
    joined = "\n\n".join(r["text"] for r in rows if r["text"] is not None)
    if kind == "txt_gz":
        path = tmp_path / "held_out.txt.gz"
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(joined)
    elif kind == "parquet":
        path = tmp_path / "test.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        path = tmp_path / ("test.jsonl" if kind == "datasets_jsonl" else "test.json")
        datasets.Dataset.from_list(rows).to_json(str(path), lines=kind == "datasets_jsonl")
    assert read_eval_text(path) == joined


@pytest.mark.parametrize("where", ["folder", "file"])
def test_text_files_are_one_document_each(tmp_path, where):
    # datasets' text builder gives a record per line by default, which would put an eos at
    # every line end and drop the newlines; a text file is one document, as preprocess reads.
    texts = ["def f():\n    return 1\n\nprint(f())\n", "line one\nline two\n"]
    for i, text in enumerate(texts):
        (tmp_path / f"{'ab'[i]}.txt").write_text(text)
    name = tmp_path if where == "folder" else tmp_path / "a.txt"
    got = [r["text"] for r in load_hf_dataset(str(name), "train")]
    assert got == (texts if where == "folder" else texts[:1])


def test_byte_order_mark_is_not_text(tmp_path, tok):
    # Windows tools (Notepad, PowerShell's Out-File utf8) start UTF-8 files with a BOM,
    # which json.loads refuses and which is no part of the first document.
    from neox_jax.data.preprocess import iter_documents
    from neox_jax.retrieval.rag import read_corpus

    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:1]), encoding="utf-8-sig")
    txt = tmp_path / "bom.txt"
    txt.write_text(TEXTS[0], encoding="utf-8-sig")
    assert jsonl.read_bytes().startswith(b"\xef\xbb\xbf")
    assert list(iter_documents([str(jsonl)], jsonl_key="content")) == TEXTS[:1]
    assert list(iter_documents([str(txt)])) == TEXTS[:1]
    assert [d["text"] for d in read_corpus(txt)] == TEXTS[:1]
