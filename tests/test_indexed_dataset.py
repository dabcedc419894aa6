"""Tests for the Megatron indexed dataset writer/reader and the preprocessing tool."""

import json
import os
import pickle
import struct
import subprocess
import sys
import types

import numpy as np
import pytest

from neox_jax.data import indexed_dataset as idx_lib
from neox_jax.data import preprocess as prep
from neox_jax.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, best_dtype


class FakeTokenizer:
    """Byte-level stand-in for neox_jax.data.tokenizer: ids 2..257, eos 0."""

    eos_id = 0
    vocab_size = 258

    def encode(self, text):
        return [b + 2 for b in text.encode("utf-8")]


def _fake_tokenizer_module():
    """A stand-in for the ``neox_jax.data.tokenizer`` module (path -> FakeTokenizer)."""
    mod = types.ModuleType("neox_jax.data.tokenizer")
    mod.load_tokenizer = lambda path: FakeTokenizer()
    return mod


def _random_docs(rng, n, high, max_len=40):
    docs = [rng.integers(0, high, size=rng.integers(1, max_len)) for _ in range(n)]
    docs[3] = np.zeros(0, np.int64)  # an empty sequence must round-trip too
    return docs


def _write(prefix, docs, dtype):
    with IndexedDatasetBuilder(str(prefix), dtype) as b:
        for d in docs:
            b.add_document(d)


def _leftovers(directory):
    return sorted(p for p in os.listdir(directory) if ".tmp" in p)


@pytest.mark.parametrize(("dtype", "high"), [(np.uint16, 65535), (np.int32, 2**31 - 1)])
def test_round_trip(tmp_path, dtype, high):
    docs = _random_docs(np.random.default_rng(0), 20, high)
    prefix = tmp_path / "ds"
    _write(prefix, docs, dtype)
    ds = IndexedDataset(str(prefix))
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == len(docs)
    np.testing.assert_array_equal(ds.sizes, [len(d) for d in docs])
    np.testing.assert_array_equal(ds.doc_idx, np.arange(len(docs) + 1))
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    np.testing.assert_array_equal(ds[-1], docs[-1])
    np.testing.assert_array_equal(ds.get(0, offset=1, length=2), docs[0][1:3])
    np.testing.assert_array_equal(ds.get(1, offset=2), docs[1][2:])
    assert [list(x) for x in ds[2:5]] == [list(d) for d in docs[2:5]]
    assert ds.num_tokens == sum(len(d) for d in docs)
    with pytest.raises(IndexError):
        ds[len(docs)]
    with pytest.raises(IndexError):
        ds.get(0, offset=1, length=len(docs[0]))
    assert _leftovers(tmp_path) == []


def test_header_and_files_match_megatron_layout(tmp_path):
    # Expected bytes built by hand from the MMIDIDX v1 definition (GPT-NeoX
    # MMapIndexedDataset.Index.writer), independently of the library.
    docs = [[5, 6, 7], [65000], [1, 2]]
    prefix = tmp_path / "ds"
    _write(prefix, docs, np.uint16)
    expected_idx = b"MMIDIDX\x00\x00"
    expected_idx += struct.pack("<Q", 1)  # version
    expected_idx += struct.pack("<B", 8)  # uint16
    expected_idx += struct.pack("<Q", 3)  # sequences
    expected_idx += struct.pack("<Q", 4)  # doc_idx entries
    expected_idx += struct.pack("<3i", 3, 1, 2)  # sizes
    expected_idx += struct.pack("<3q", 0, 6, 8)  # byte pointers
    expected_idx += struct.pack("<4q", 0, 1, 2, 3)  # doc_idx
    assert (tmp_path / "ds.idx").read_bytes() == expected_idx
    assert (tmp_path / "ds.bin").read_bytes() == struct.pack("<6H", 5, 6, 7, 65000, 1, 2)
    assert idx_lib.HEADER_SIZE == 34


def _minimal_reader(prefix):
    """An independent reader: struct for the header, np.memmap for the arrays."""
    with open(f"{prefix}.idx", "rb") as f:
        magic = f.read(9)
        (version,) = struct.unpack("<Q", f.read(8))
        (code,) = struct.unpack("<B", f.read(1))
        n, d = struct.unpack("<QQ", f.read(16))
    assert magic == b"MMIDIDX\x00\x00" and version == 1
    dtype = {4: np.int32, 8: np.uint16}[code]
    sizes = np.memmap(f"{prefix}.idx", np.int32, "r", offset=34, shape=(n,))
    pointers = np.memmap(f"{prefix}.idx", np.int64, "r", offset=34 + 4 * n, shape=(n,))
    doc_idx = np.memmap(f"{prefix}.idx", np.int64, "r", offset=34 + 12 * n, shape=(d,))
    data = np.memmap(f"{prefix}.bin", np.uint8, "r")
    seqs = [
        data[p : p + s * np.dtype(dtype).itemsize].view(dtype)
        for p, s in zip(pointers, sizes, strict=True)
    ]
    return seqs, np.array(doc_idx)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_independent_reader_agrees(tmp_path, dtype):
    docs = _random_docs(np.random.default_rng(1), 12, 60000)
    _write(tmp_path / "ds", docs, dtype)
    seqs, doc_idx = _minimal_reader(tmp_path / "ds")
    assert [list(s) for s in seqs] == [list(d) for d in docs]
    np.testing.assert_array_equal(doc_idx, np.arange(len(docs) + 1))


def test_reads_hand_written_megatron_files(tmp_path):
    # A dataset written byte by byte as GPT-NeoX would (int32, two documents, the
    # first made of two sequences), read by the library.
    seqs = [[1, 2, 3], [4], [70000, 8]]
    sizes = [len(s) for s in seqs]
    pointers = [0, 12, 16]
    doc_idx = [0, 2, 3]
    idx = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, 3, 3)
    idx += struct.pack("<3i", *sizes) + struct.pack("<3q", *pointers)
    idx += struct.pack("<3q", *doc_idx)
    (tmp_path / "m.idx").write_bytes(idx)
    (tmp_path / "m.bin").write_bytes(struct.pack("<6i", *sum(seqs, [])))
    ds = IndexedDataset(str(tmp_path / "m"))
    assert ds.dtype == np.int32
    assert [list(ds[i]) for i in range(3)] == seqs
    np.testing.assert_array_equal(ds.doc_idx, doc_idx)


def test_doc_idx_marks_document_ends(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "ds"), np.uint16) as b:
        b.add_item([1, 2])
        b.add_item([3])
        b.end_document()  # document of two sequences
        b.add_document([4, 5, 6])
        b.add_item([7])
        b.add_item([8])
        b.end_document()
    ds = IndexedDataset(str(tmp_path / "ds"))
    np.testing.assert_array_equal(ds.doc_idx, [0, 2, 3, 5])
    np.testing.assert_array_equal(ds.sizes, [2, 1, 3, 1, 1])


def test_empty_dataset_round_trip(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "ds"), np.uint16):
        pass
    ds = IndexedDataset(str(tmp_path / "ds"))
    assert len(ds) == 0 and ds.num_tokens == 0
    np.testing.assert_array_equal(ds.doc_idx, [0])


def test_best_dtype():
    assert best_dtype(50277) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(None) == np.int32


def test_builder_rejects_tokens_that_do_not_fit(tmp_path):
    with (
        pytest.raises(ValueError, match="do not fit uint16"),
        IndexedDatasetBuilder(str(tmp_path / "ds"), np.uint16) as b,
    ):
        b.add_document([1, 70000])
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="cannot write token dtype"):
        IndexedDatasetBuilder(str(tmp_path / "f"), np.float32)


def test_crash_leaves_nothing_and_keeps_old_dataset(tmp_path):
    prefix = tmp_path / "ds"
    _write(prefix, [[1, 2, 3]], np.uint16)
    old = (tmp_path / "ds.idx").read_bytes(), (tmp_path / "ds.bin").read_bytes()
    with (
        pytest.raises(RuntimeError, match="boom"),
        IndexedDatasetBuilder(str(prefix), np.uint16) as b,
    ):
        b.add_document([9, 9, 9, 9])
        raise RuntimeError("boom")
    assert ((tmp_path / "ds.idx").read_bytes(), (tmp_path / "ds.bin").read_bytes()) == old
    assert _leftovers(tmp_path) == []
    # Overwriting a dataset by a finished build replaces both files.
    _write(prefix, [[4, 5]], np.uint16)
    assert list(IndexedDataset(str(prefix))[0]) == [4, 5]
    b = IndexedDatasetBuilder(str(tmp_path / "x"), np.uint16)
    b.finalize()
    with pytest.raises(RuntimeError, match="already finalized"):
        b.add_document([1])


def test_pickles_by_prefix(tmp_path):
    _write(tmp_path / "ds", [[1, 2], [3]], np.uint16)
    ds = pickle.loads(pickle.dumps(IndexedDataset(str(tmp_path / "ds"))))
    assert list(ds[1]) == [3]


def _corrupt(tmp_path, edit):
    _write(tmp_path / "ds", [[1, 2, 3], [4, 5]], np.uint16)
    idx = bytearray((tmp_path / "ds.idx").read_bytes())
    data = bytearray((tmp_path / "ds.bin").read_bytes())
    idx, data = edit(idx, data)
    (tmp_path / "ds.idx").write_bytes(bytes(idx))
    (tmp_path / "ds.bin").write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("edit", "file", "message"),
    [
        (lambda i, d: (b"XXIDIDX\x00\x00" + i[9:], d), "ds.idx", "bad magic"),
        (lambda i, d: (i[:9] + struct.pack("<Q", 2) + i[17:], d), "ds.idx", "version 2"),
        (lambda i, d: (i[:17] + bytes([9]) + i[18:], d), "ds.idx", "unknown dtype code 9"),
        (lambda i, d: (i[:20], d), "ds.idx", "shorter than the 34-byte header"),
        (lambda i, d: (i[:-5], d), "ds.idx", "truncated or corrupt"),
        (lambda i, d: (i[:18] + struct.pack("<Q", 99) + i[26:], d), "ds.idx", "99 sequences"),
        (lambda i, d: (i, d[:-2]), "ds.bin", "is truncated"),
        (lambda i, d: (i[:34] + struct.pack("<i", -3) + i[38:], d), "ds.idx", "negative"),
        (lambda i, d: (i[:-8] + struct.pack("<q", 5), d), "ds.idx", "doc_idx"),
    ],
)
def test_corrupt_files_give_clear_errors(tmp_path, edit, file, message):
    _corrupt(tmp_path, edit)
    with pytest.raises(ValueError, match=message) as err:
        IndexedDataset(str(tmp_path / "ds"))
    assert str(tmp_path / file) in str(err.value)


def test_pointer_beyond_bin_is_reported(tmp_path):
    def edit(i, d):
        ptr_offset = 34 + 4 * 2 + 8  # second pointer
        return i[:ptr_offset] + struct.pack("<q", 1000) + i[ptr_offset + 8 :], d

    _corrupt(tmp_path, edit)
    with pytest.raises(ValueError, match="sequence 1 ends at byte 1004"):
        IndexedDataset(str(tmp_path / "ds"))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="ds.idx"):
        IndexedDataset(str(tmp_path / "ds"))


# ---------------------------------------------------------------- preprocessing


def _corpus(tmp_path):
    jl = tmp_path / "a.jsonl"
    jl.write_text(
        json.dumps({"text": "héllo world", "meta": 1})
        + "\n\n"  # a blank line is skipped, not an error
        + json.dumps({"text": ""})  # empty document: dropped
        + "\n"
        + json.dumps({"text": "second doc"})
        + "\n"
    )
    txt = tmp_path / "b.txt"
    txt.write_text("para one\nstill one\n\n\npara two\n")
    return [str(jl), str(txt)]


def _expected(texts, eod=True):
    tok = FakeTokenizer()
    return [tok.encode(t) + ([tok.eos_id] if eod else []) for t in texts]


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_end_to_end(tmp_path, workers):
    files = _corpus(tmp_path)
    out = str(tmp_path / "out" / "corpus")
    stats = prep.preprocess(
        files,
        output_prefix=out,
        tokenizer=FakeTokenizer(),
        workers=workers,
        chunksize=1,
        progress=False,
    )
    texts = ["héllo world", "second doc", "para one\nstill one\n\n\npara two\n"]
    want = _expected(texts)
    ds = IndexedDataset(out)
    assert ds.dtype == np.uint16
    assert [list(ds[i]) for i in range(len(ds))] == want
    assert (stats.documents, stats.tokens, stats.skipped_empty) == (3, sum(map(len, want)), 1)


def test_preprocess_blank_line_blocks_and_no_eod(tmp_path):
    files = _corpus(tmp_path)[1:]
    out = str(tmp_path / "c")
    prep.preprocess(
        files,
        output_prefix=out,
        tokenizer=FakeTokenizer(),
        text_split="blank_line",
        append_eod=False,
        progress=False,
    )
    ds = IndexedDataset(out)
    assert [list(ds[i]) for i in range(len(ds))] == _expected(
        ["para one\nstill one\n", "para two\n"], eod=False
    )


def test_preprocess_loads_tokenizer_by_path(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "neox_jax.data.tokenizer", _fake_tokenizer_module())
    out = str(tmp_path / "c")
    stats = prep.preprocess(_corpus(tmp_path), "some/tokenizer.json", out, progress=False)
    assert stats.documents == 3


def test_malformed_jsonl_lines(tmp_path):
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "ok"}\n{"text": 3}\n{not json\n{"body": "x"}\n[1]\n{"text": "fine"}\n')
    out = str(tmp_path / "o")
    with pytest.raises(prep.MalformedInputError, match=f"{jl}:2: 'text' is int"):
        prep.preprocess([str(jl)], output_prefix=out, tokenizer=FakeTokenizer(), progress=False)
    assert os.listdir(tmp_path) == ["bad.jsonl"]  # nothing partial left behind
    malformed = []
    docs = list(prep.iter_documents([str(jl)], on_malformed="skip", malformed=malformed))
    assert docs == ["ok", "fine"]
    assert [m.split(": ")[0] for m in malformed] == [f"{jl}:{n}" for n in (2, 3, 4, 5)]
    assert "invalid JSON" in malformed[1] and "no key 'text'" in malformed[2]
    stats = prep.preprocess(
        [str(jl)],
        output_prefix=out,
        tokenizer=FakeTokenizer(),
        on_malformed="skip",
        progress=False,
    )
    assert (stats.documents, stats.skipped_malformed) == (2, 4)


@pytest.mark.parametrize("workers", [1, 2])
def test_empty_corpus_is_an_error_and_leaves_nothing(tmp_path, workers):
    jl = tmp_path / "empty.jsonl"
    jl.write_text(json.dumps({"text": ""}) + "\n")
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "out" / "name"
    with pytest.raises(ValueError, match="empty corpus"):
        prep.preprocess(
            [str(jl), str(tmp_path / "empty.txt")],
            output_prefix=str(out),
            tokenizer=FakeTokenizer(),
            workers=workers,
            progress=False,
        )
    assert os.listdir(tmp_path / "out") == []


def test_cli(tmp_path):
    files = _corpus(tmp_path)
    out = str(tmp_path / "cli")
    # The CLI loads a tokenizer by path; swap in the fake module in the child process.
    code = (
        "import sys, runpy; sys.path.insert(0, sys.argv[1]); import test_indexed_dataset as t; "
        "sys.modules['neox_jax.data.tokenizer'] = t._fake_tokenizer_module(); "
        "sys.argv = ['preprocess'] + sys.argv[2:]; "
        "runpy.run_module('neox_jax.data.preprocess', run_name='__main__')"
    )
    args = [
        f"--input={','.join(files)}",
        "--tokenizer=x",
        f"--output_prefix={out}",
        "--workers=1",
        "--append_eod=True",
    ]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    res = subprocess.run(
        [sys.executable, "-c", code, os.path.dirname(__file__), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "3 documents" in res.stdout
    assert len(IndexedDataset(out)) == 3
