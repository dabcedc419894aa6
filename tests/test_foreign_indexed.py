"""Indexed datasets written the way GPT-NeoX's and Megatron-LM's own writers write them.

The two writers below follow, step by step, GPT-NeoX ``megatron/data/indexed_dataset.py``
(``MMapIndexedDatasetBuilder`` + ``MMapIndexedDataset.Index.writer``, including its
``merge_file_``, which appends sequences but not documents) and Megatron-LM
``megatron/core/datasets/indexed_dataset.py`` (``IndexedDatasetBuilder`` + ``_IndexWriter``:
documents of several sequences, optional int8 sequence modes after the document index).
They share no code with neox_jax's builder, so the reader is checked against files it
did not write. The two projects disagree on the float codes 6 and 7, which is why those
must be refused rather than guessed.
"""

import struct

import numpy as np
import pytest

from neox_jax.data.indexed_dataset import IndexedDataset
from neox_jax.data.pretrain_data import PretrainSource

NEOX_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
              6: np.float32, 7: np.float64, 8: np.uint16}  # fmt: skip
MEGATRON_CODES = {**NEOX_CODES, 6: np.float64, 7: np.float32}


def _index_bytes(code, itemsize, sizes, doc_idx, modes=None):
    # Both writers: magic, <Q version 1, <B code, <Q sequences, <Q documents, then
    # int32 sizes, int64 byte pointers (running sum of size * itemsize), int64 doc index.
    pointers = np.zeros(len(sizes), np.int64)
    np.cumsum(np.asarray(sizes[:-1], np.int64) * itemsize, out=pointers[1:])
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    out += struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx))
    out += np.asarray(sizes, np.int32).tobytes() + pointers.tobytes()
    out += np.asarray(doc_idx, np.int64).tobytes()
    if modes is not None:  # Megatron-LM's multimodal datasets only
        out += np.asarray(modes, np.int8).tobytes()
    return out


class NeoxWriter:
    """GPT-NeoX's MMapIndexedDatasetBuilder: one add_item per sequence, end_document."""

    def __init__(self, prefix, dtype):
        self.prefix, self.dtype, self.sizes, self.doc_idx = prefix, dtype, [], [0]
        self.data = open(f"{prefix}.bin", "wb")  # noqa: SIM115 - closed by finalize

    def add_item(self, array):
        array = np.asarray(array, dtype=self.dtype)
        self.data.write(array.tobytes(order="C"))
        self.sizes.append(array.size)

    def end_document(self):
        self.doc_idx.append(len(self.sizes))

    def merge_file_(self, other_prefix):
        # GPT-NeoX appends the other file's sizes and bytes but leaves doc_idx as it was.
        with open(f"{other_prefix}.idx", "rb") as f:
            f.seek(9 + 8 + 1)
            n, _ = struct.unpack("<QQ", f.read(16))
            self.sizes += np.frombuffer(f.read(4 * n), np.int32).tolist()
        with open(f"{other_prefix}.bin", "rb") as f:
            self.data.write(f.read())

    def finalize(self):
        self.data.close()
        code = {v: k for k, v in NEOX_CODES.items()}[self.dtype]
        index = _index_bytes(code, np.dtype(self.dtype).itemsize, self.sizes, self.doc_idx)
        with open(f"{self.prefix}.idx", "wb") as f:
            f.write(index)


class MegatronWriter:
    """Megatron-core's IndexedDatasetBuilder: add_document(tokens, lengths[, modes])."""

    def __init__(self, prefix, dtype, multimodal=False):
        self.prefix, self.dtype, self.sizes, self.doc_idx = prefix, dtype, [], [0]
        self.modes = [] if multimodal else None
        self.data = open(f"{prefix}.bin", "wb")  # noqa: SIM115 - closed by finalize

    def add_document(self, tokens, lengths, modes=None):
        self.data.write(np.array(tokens, dtype=self.dtype).tobytes(order="C"))
        self.sizes.extend(lengths)
        self.doc_idx.append(len(self.sizes))
        if self.modes is not None:
            self.modes.extend(modes if modes is not None else [0] * len(lengths))

    def finalize(self):
        self.data.close()
        code = {v: k for k, v in MEGATRON_CODES.items()}[self.dtype]
        index = _index_bytes(
            code, np.dtype(self.dtype).itemsize, self.sizes, self.doc_idx, self.modes
        )
        with open(f"{self.prefix}.idx", "wb") as f:
            f.write(index)


def _docs(high, rng):
    docs = [rng.integers(0, high, size=int(rng.integers(1, 30))) for _ in range(9)]
    docs[4] = docs[4][:0]  # an empty document
    return docs


@pytest.mark.parametrize("code", [1, 2, 3, 4, 5, 8])
def test_every_integer_code_from_both_writers(tmp_path, code):
    dtype = NEOX_CODES[code]
    high = min(np.iinfo(dtype).max, 200_000)  # int32/int64: ids past uint16's range
    docs = _docs(high, np.random.default_rng(code))
    neox = NeoxWriter(str(tmp_path / "neox"), dtype)
    for d in docs:
        neox.add_item(d)
        neox.end_document()
    neox.finalize()
    # Megatron-LM with --split-sentences: a document is several sequences.
    mega = MegatronWriter(str(tmp_path / "mega"), dtype)
    for d in docs:
        cut = len(d) // 2
        mega.add_document(d, [cut, len(d) - cut])
    mega.finalize()
    ds = IndexedDataset(str(tmp_path / "neox"))
    assert ds.dtype == np.dtype(dtype) and len(ds) == len(docs)
    assert [ds[i].tolist() for i in range(len(ds))] == [d.tolist() for d in docs]
    np.testing.assert_array_equal(ds.doc_idx, np.arange(len(docs) + 1))
    ds = IndexedDataset(str(tmp_path / "mega"))
    assert [np.concatenate(ds[2 * i : 2 * i + 2]).tolist() for i in range(len(docs))] == [
        d.tolist() for d in docs
    ]
    np.testing.assert_array_equal(ds.doc_idx, np.arange(0, 2 * len(docs) + 1, 2))


def test_int32_dataset_trains_in_file_order(tmp_path):
    # vocab > 65535: GPT-NeoX picks int32. Unshuffled windows must be the packed stream.
    docs = _docs(100_000, np.random.default_rng(7))
    w = NeoxWriter(str(tmp_path / "big"), np.int32)
    for d in docs:
        w.add_item(d)
        w.end_document()
    w.finalize()
    seq_len = 8
    source = PretrainSource(str(tmp_path / "big"), seq_len, 2, shuffle=False)
    stream = np.concatenate(docs)
    rows = source.samples(np.arange(5))["tokens"]
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(row, stream[i * seq_len : i * seq_len + seq_len + 1])
    assert stream.max() > 65535


def test_gpt_neox_merged_file_without_document_index(tmp_path):
    # tools/datasets/merge_datasets.py output: N sequences, doc_idx == [0].
    parts = []
    for k in range(2):
        w = NeoxWriter(str(tmp_path / f"part{k}"), np.uint16)
        for j in range(3):
            w.add_item(np.arange(5) + 10 * j + 100 * k)
            w.end_document()
        w.finalize()
        parts.append(str(tmp_path / f"part{k}"))
    merged = NeoxWriter(str(tmp_path / "merged"), np.uint16)
    for p in parts:
        merged.merge_file_(p)
    merged.finalize()
    ds = IndexedDataset(str(tmp_path / "merged"))
    assert len(ds) == 6 and ds.doc_idx.tolist() == [0]
    assert ds[4].tolist() == [110, 111, 112, 113, 114]
    train = PretrainSource(ds, 4, 1, split="train", eval_fraction=0.34)
    held = PretrainSource(ds, 4, 1, split="eval", eval_fraction=0.34)
    assert len(train.docs) == 4 and len(held.docs) == 2  # each sequence counts as a document
    assert not set(train.docs) & set(held.docs)


@pytest.mark.parametrize("writer", ["neox", "megatron"])
@pytest.mark.parametrize("code", [6, 7])
def test_float_codes_are_refused_by_name(tmp_path, writer, code):
    # Code 7 is float64 to GPT-NeoX but float32 to Megatron-LM: neither width can be trusted.
    table = NEOX_CODES if writer == "neox" else MEGATRON_CODES
    prefix = str(tmp_path / "f")
    if writer == "neox":
        w = NeoxWriter(prefix, table[code])
        w.add_item([1.0, 2.0, 3.0])
        w.end_document()
    else:
        w = MegatronWriter(prefix, table[code])
        w.add_document([1.0, 2.0, 3.0], [3])
    w.finalize()
    with pytest.raises(ValueError, match=rf"dtype code {code} is a float type.*integer"):
        IndexedDataset(prefix)


def test_megatron_multimodal_index_is_refused_by_name(tmp_path):
    w = MegatronWriter(str(tmp_path / "mm"), np.int32, multimodal=True)
    w.add_document([1, 2, 3, 4], [2, 2], modes=[0, 1])
    w.finalize()
    with pytest.raises(ValueError, match="Megatron-LM multimodal dataset"):
        IndexedDataset(str(tmp_path / "mm"))


def test_token_ids_past_the_model_vocabulary_stop_training(tmp_path):
    # A GPT-NeoX int32 file tokenized for a 100k vocabulary, trained with a 64-token model:
    # the embedding lookup would clamp the ids silently; the trainer must refuse instead.
    from helpers.train import tiny_config

    from neox_jax.errors import UserError
    from neox_jax.training.trainer import train_and_evaluate

    w = NeoxWriter(str(tmp_path / "wide"), np.int32)
    rng = np.random.default_rng(0)
    for _ in range(40):
        w.add_item(rng.integers(0, 64, size=30))
        w.end_document()
    w.add_item(np.array([5, 99_999, 7]))  # one document from the wider vocabulary
    w.end_document()
    w.finalize()
    config = tiny_config(str(tmp_path / "wide"), **{"data.eval_fraction": 0.0, "train.steps": 40})
    with pytest.raises(UserError, match=r"token id 99999, outside the model's vocabulary \[0, 64"):
        train_and_evaluate(config, tmp_path / "run")


def test_prefix_without_gpt_neox_suffix_points_at_the_files(tmp_path):
    # GPT-NeoX's and Megatron-LM's preprocess_data.py write <output-prefix>_text_document.*
    from configs import pretrain
    from neox_jax.training.data import resolve_tokenizer_and_paths

    w = NeoxWriter(str(tmp_path / "enwik8_text_document"), np.uint16)
    w.add_item([1, 2, 3])
    w.end_document()
    w.finalize()
    cfg = pretrain.get_config("tiny").data
    cfg.unlock()
    cfg.update(source="indexed", paths=str(tmp_path / "enwik8"))
    with pytest.raises(FileNotFoundError, match="did you mean .*enwik8_text_document"):
        resolve_tokenizer_and_paths(cfg, tmp_path)
