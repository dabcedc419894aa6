"""Pythia's pre-shuffled data: step s is items [s*B, (s+1)*B), from .bin or shards.

The data is made here: item i is the 8 tokens (L = 7) written by the test, so each
expected batch is known independently of the reader (and cross-checked with the
generic IndexedDataset reader for the batch viewer's saved file).
"""

import os

import numpy as np
import pytest

from neox_jax import batch_viewer
from neox_jax.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from neox_jax.data.preshuffled import PreshuffledData
from neox_jax.errors import UserError

L, ITEMS = 7, 30


def _items():
    rng = np.random.default_rng(0)
    return rng.integers(0, 50000, (ITEMS, L + 1)).astype(np.uint16)


def _write(prefix, items):
    with IndexedDatasetBuilder(str(prefix)) as b:
        for row in items:
            b.add_document(row)
    return str(prefix)


def _shard(prefix, cuts):
    """Split <prefix>.bin at byte offsets ``cuts`` into Pythia-named shards."""
    with open(f"{prefix}.bin", "rb") as f:
        raw = f.read()
    bounds = [0, *cuts, len(raw)]
    k = len(bounds) - 1
    for i in range(k):
        with open(f"{prefix}-{i:05d}-of-{k - 1:05d}.bin", "wb") as f:
            f.write(raw[bounds[i] : bounds[i + 1]])
    os.remove(f"{prefix}.bin")


@pytest.mark.parametrize("sharded", [False, True])
def test_batch_of_step_is_its_items(tmp_path, sharded):
    items = _items()
    prefix = _write(tmp_path / "document", items)
    if sharded:  # 16 bytes per item: cuts at 101 and 250 split items 6 and 15 across shards
        _shard(prefix, [101, 250])
    data = PreshuffledData(prefix, batch_size=4)
    assert data.seq_len == L and data.num_steps == ITEMS // 4 and len(data.files) == 3**sharded
    for step in range(data.num_steps):
        np.testing.assert_array_equal(data.batch(step), items[step * 4 : (step + 1) * 4])
    with pytest.raises(UserError, match="step 7 is outside the 7 steps"):
        data.batch(7)


def test_batch_viewer_saves_what_pythia_s_viewer_saves(tmp_path, capsys):
    items = _items()
    prefix = _write(tmp_path / "document", items)
    out = tmp_path / "out" / "steps.npy"
    flags = [f"--config.data={prefix}", "--config.batch_size=4", "--config.start=2",
             "--config.end=4", f"--config.save={out}"]  # fmt: skip
    assert batch_viewer.COMMAND(["batch_viewer", *flags]) == 0
    # Pythia's batch_viewer: dataset[start*1024 : (end+1)*1024] of the indexed dataset.
    ds = IndexedDataset(prefix)
    pythia = np.stack(ds[2 * 4 : 5 * 4])
    saved = np.load(out)
    assert saved.dtype == pythia.dtype == np.uint16
    np.testing.assert_array_equal(saved, pythia)
    assert batch_viewer.COMMAND(["batch_viewer", *flags[:3], "--config.rows=2"]) == 0
    printed = capsys.readouterr().out
    assert "step 2: sequences [8, 12)" in printed
    assert "  1: " + " ".join(map(str, items[9][:32])) in printed
    assert batch_viewer.COMMAND(["batch_viewer", *flags[:2], "--config.start=8"]) != 0
    assert "past the data's last step 6" in capsys.readouterr().err


def test_bad_preshuffled_data_is_named(tmp_path):
    uneven = _write(tmp_path / "uneven", [np.arange(8), np.arange(8), np.arange(5)])
    with pytest.raises(UserError, match="item 2 has 5 tokens but item 0 has 8"):
        PreshuffledData(uneven)
    prefix = _write(tmp_path / "document", _items())
    _shard(prefix, [100, 200, 300])
    os.remove(f"{prefix}-00001-of-00003.bin")
    with pytest.raises(UserError, match="missing .*document-00001-of-00003.bin"):
        PreshuffledData(prefix)


def test_training_source_reads_steps_in_order(tmp_path):
    from configs import pretrain
    from neox_jax.training.data import make_sources, resolve_tokenizer_and_paths

    items = _items()
    prefix = _write(tmp_path / "document", items)
    config = pretrain.get_config("tiny")
    config.data.update(source="preshuffled", paths=prefix, seq_len=L, global_batch_size=5)
    _, paths = resolve_tokenizer_and_paths(config.data, tmp_path)
    train, evals = make_sources(config.data, paths, None, 5, config.train)
    assert evals is None
    np.testing.assert_array_equal(train.global_batch(3)["tokens"], items[15:20])
    np.testing.assert_array_equal(train.host_batch(3, 1, 5)["tokens"], items[16:17])
    config.data.seq_len = 8
    with pytest.raises(UserError, match="--config.data.seq_len=7"):
        make_sources(config.data, paths, None, 5, config.train)
