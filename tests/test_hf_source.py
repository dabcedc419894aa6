"""Hugging Face ``datasets`` as a pretraining source (data.source=hf), on a local dataset.

The reference packing is written here independently: documents in stream order, each
tokenized character by character with an eos after it, concatenated, and row k is
tokens ``[k*L, k*L + L + 1)`` (GPT-NeoX's packing).
"""

import json
import random

import numpy as np
import pytest
from helpers.finetune import char_ids, write_char_tokenizer
from helpers.train import logged, tiny_config

from configs import pretrain
from neox_jax.data.hf_source import make_hf_source
from neox_jax.data.tokenizer import load_tokenizer
from neox_jax.training.trainer import train_and_evaluate

L, B = 8, 4


def _docs(n, seed):
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(0, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory):
    """A folder of two jsonl shards (train) and one eval file, as load_dataset reads it."""
    root = tmp_path_factory.mktemp("hf_data")
    shards = [_docs(40, 0), _docs(40, 1)]
    for i, docs in enumerate(shards):
        lines = "\n".join(json.dumps({"text": d, "id": j}) for j, d in enumerate(docs))
        (root / f"train-{i:05d}.jsonl").write_text(lines + "\n")
    (root / "validation.jsonl").write_text(
        "\n".join(json.dumps({"text": d}) for d in _docs(10, 2)) + "\n"
    )
    return root, shards


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_char_tokenizer(tmp_path_factory.mktemp("tok")))


def _reference_rows(tok, docs, rows):
    stream = [i for d in docs if d for i in [*char_ids(tok, d), tok.eos_id]]
    return np.array([stream[k * L : k * L + L + 1] for k in range(rows)])


def _data_cfg(root, **kw):
    cfg = pretrain.get_config("tiny").data
    cfg.unlock()
    cfg.update(source="hf", hf_name=str(root), seq_len=L, hf_split="train", **kw)
    return cfg


def test_streaming_rows_are_the_packed_stream_and_resume_exactly(local_dataset, tok):
    root, shards = local_dataset
    src = make_hf_source(_data_cfg(root), tok, B, "train", (0, 1))
    steps = [src.samples(np.arange(s * B, (s + 1) * B))["tokens"] for s in range(3)]
    expected = _reference_rows(tok, shards[0] + shards[1], 3 * B)
    np.testing.assert_array_equal(np.concatenate(steps), expected)
    # A resumed run asks for step 2 first and gets the same rows.
    again = make_hf_source(_data_cfg(root), tok, B, "train", (0, 1))
    np.testing.assert_array_equal(again.samples(np.arange(2 * B, 3 * B))["tokens"], steps[2])


def test_streaming_hosts_read_disjoint_shards(local_dataset, tok):
    root, shards = local_dataset
    for host in range(2):  # host h holds global rows [h*B/2, (h+1)*B/2) of every step
        src = make_hf_source(_data_cfg(root), tok, B, "train", (host, 2))
        half = B // 2
        got = [src.samples(s * B + host * half + np.arange(half))["tokens"] for s in range(3)]
        expected = _reference_rows(tok, shards[host], 3 * half)
        np.testing.assert_array_equal(np.concatenate(got), expected)


def test_map_style_rows_cover_the_documents_in_a_seeded_order(local_dataset, tok):
    root, shards = local_dataset
    cfg = _data_cfg(root, hf_streaming=False)
    a = make_hf_source(cfg, tok, B, "train", (0, 1)).samples(np.arange(6))["tokens"]
    b = make_hf_source(cfg, tok, B, "train", (0, 1)).samples(np.arange(6))["tokens"]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, 1:][:-1, -1], a[1:, 0])  # rows overlap by one token
    text = "".join(tok.decode(r[:-1]) for r in a).split("<|endoftext|>")[0]
    assert text in {d for s in shards for d in s}  # the first document is whole


def test_training_on_an_hf_dataset(local_dataset, tmp_path, tok):
    root, _ = local_dataset
    tok_dir = tok.path.parent
    config = tiny_config(
        "",
        **{
            "model.vocab_size": 96,
            "data.source": "hf",
            "data.paths": "",
            "data.hf_name": str(root),
            "data.hf_eval_split": "validation",
            "data.tokenizer": str(tok_dir),
            "train.steps": 4,
            "train.eval_every": 4,
            "data.eval_batch_size": 2,
        },
    )
    # load_dataset names a folder's validation*.jsonl file the "validation" split.
    result = train_and_evaluate(config, tmp_path)
    assert sorted(logged(tmp_path)) == [1, 2, 3, 4]
    assert np.isfinite(result["eval_loss"])
