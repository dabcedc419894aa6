"""The one artifact loader: kinds, configs, tokenizers, and placement on a mesh.

The placement test runs in a subprocess with 4 fake CPU devices (the device count is
fixed when JAX starts) and loads every kind of artifact straight onto a
``fsdp=2 x tensor=2`` mesh, checking each array's placement against the rules table
(``parallel.param_shardings``) and its values against a plain single-device load.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers.xla import xla_flags

from neox_jax.convert import save_checkpoint, save_hf
from neox_jax.errors import UserError
from neox_jax.loading import (
    artifact_kind,
    find_tokenizer,
    load_model,
    peek_config,
    tokenizer_for,
)
from neox_jax.model import ModelConfig, init_params
from neox_jax.parallel import create_mesh, shard_params
from neox_jax.quant import QuantConfig, quantize_params, save_quantized

ROOT = Path(__file__).parents[1]
CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)


def _tokenizer(directory: Path) -> Path:
    """A minimal WordLevel tokenizer.json (the loader only has to find and open it)."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    tok = tokenizers.Tokenizer(models.WordLevel({f"t{i}": i for i in range(8)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))
    return directory


def write_artifacts(root: Path) -> dict[str, Path]:
    """A HF folder, checkpoint, run directory and int8 checkpoint of one random model."""
    params = jax.device_get(init_params(CONFIG, jax.random.PRNGKey(0)))
    tok = _tokenizer(root / "tok")
    paths = {k: root / k for k in ("hf", "checkpoint", "run", "quantized")}
    save_hf(CONFIG, params, paths["hf"], tokenizer_dir=tok)
    save_checkpoint(CONFIG, params, paths["checkpoint"], tokenizer_dir=tok)
    save_checkpoint(CONFIG, params, paths["run"] / "checkpoints" / "4")
    _tokenizer(paths["run"] / "tokenizer")
    (paths["run"] / "config.json").write_text(json.dumps({"model": CONFIG.to_dict()}))
    qconfig = QuantConfig(bits=8)
    save_quantized(
        CONFIG,
        qconfig,
        quantize_params(CONFIG, params, qconfig),
        paths["quantized"],
        tokenizer_dir=tok,
    )
    return paths


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return write_artifacts(tmp_path_factory.mktemp("loading"))


def test_kind_config_and_tokenizer_of_every_artifact(artifacts):
    for kind, path in artifacts.items():
        # A run directory's config.json is our run config, not a Hugging Face one.
        assert artifact_kind(path) == kind
        assert peek_config(path) == CONFIG.replace(param_dtype=peek_config(path).param_dtype)
        assert find_tokenizer(path) is not None, kind
        assert tokenizer_for(path).encode("t3 t5") == [3, 5]
    step = artifacts["run"] / "checkpoints" / "4"
    assert artifact_kind(step) == "checkpoint"
    assert find_tokenizer(step) == artifacts["run"] / "tokenizer"  # the run's, two levels up
    tok_file = artifacts["checkpoint"] / "tokenizer" / "tokenizer.json"
    assert find_tokenizer(tok_file) == tok_file  # a tokenizer path is its own tokenizer


def test_foreign_and_missing_folders_are_user_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="neither a Hugging Face"):
        peek_config(tmp_path)
    with pytest.raises(UserError, match="no tokenizer found"):
        tokenizer_for(tmp_path)


def test_overrides_apply_to_every_kind(artifacts):
    for kind, path in artifacts.items():
        config, _ = load_model(path, attention_impl="pallas", dtype="bfloat16")
        assert (config.attention_impl, config.dtype) == ("pallas", "bfloat16"), kind


def test_shard_params_places_float_and_quantized_params_on_one_device_mesh():
    # Issue #14.1: the float model's axis names applied to quantized params crashed with
    # "zip() argument 2 is longer than argument 1".
    params = init_params(CONFIG, jax.random.PRNGKey(1))
    qparams = quantize_params(CONFIG, params, QuantConfig(bits=4, group_size=16))
    mesh = create_mesh({"data": -1})
    for tree in (params, qparams):
        placed = shard_params(CONFIG, tree, mesh)
        for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(tree), strict=True):
            assert a.sharding.mesh == mesh
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(UserError, match="structure"):
        shard_params(CONFIG, {"embed_in": params["embed_in"]}, mesh)


def test_a_hand_built_mesh_without_every_axis_is_accepted():
    # A mesh written before the expert axis existed (data, stage, fsdp, tensor) names no
    # `expert`: the rules leave the missing axis out instead of failing in NamedSharding.
    from jax.sharding import Mesh

    from neox_jax.model import GPTNeoX
    from neox_jax.parallel.rules import batch_sharding, mesh_context

    names = ("data", "stage", "fsdp", "tensor")
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), names)
    params = init_params(CONFIG, jax.random.PRNGKey(1))
    placed = shard_params(CONFIG, params, mesh)
    ids = jax.device_put(np.arange(8, dtype=np.int32).reshape(2, 4), batch_sharding(mesh))
    with mesh_context(mesh):
        logits = jax.jit(lambda p, x: GPTNeoX(CONFIG).apply({"params": p}, x))(placed, ids)
    expected = GPTNeoX(CONFIG).apply({"params": params}, np.asarray(ids))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-5)


MESH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from neox_jax.loading import load_model
    from neox_jax.parallel import create_mesh, param_shardings

    assert jax.device_count() == 4
    mesh = create_mesh({"fsdp": 2, "tensor": 2})
    for kind, path in json.loads(sys.argv[1]).items():
        config, plain = load_model(path)
        _, placed = load_model(path, mesh=mesh)
        want = param_shardings(config, placed, mesh)
        split = 0
        leaves = zip(jax.tree.leaves(placed), jax.tree.leaves(want), jax.tree.leaves(plain))
        for got, sharding, ref in leaves:
            assert got.sharding.is_equivalent_to(sharding, got.ndim), (kind, got.sharding)
            split += len(got.sharding.device_set) == 4 and not got.sharding.is_fully_replicated
            np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
        assert split > 0, kind  # something was actually split over the mesh
        print(kind, "ok", split)
    """
)


def test_every_kind_loads_straight_onto_a_mesh(artifacts):
    env = dict(os.environ, XLA_FLAGS=xla_flags(4))
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT, json.dumps({k: str(p) for k, p in artifacts.items()})],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count(" ok ") == 4, out.stdout


def test_old_import_path_names_the_new_one():
    with pytest.raises(ImportError, match="moved to neox_jax.loading.load_model"):
        from neox_jax.convert import load_model  # noqa: F401
