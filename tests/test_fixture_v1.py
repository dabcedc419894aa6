"""Artifacts written by the first release still load, to the same logits.

``tests/fixtures/v1`` was written once by ``tests/fixtures/make_v1_fixtures.py`` with the
code of that release. Here the loader reads them, and the logits are compared with a
second path that shares nothing with the loader: the JSON config and the orbax arrays
read item by item with orbax's own handlers, then ``GPTNeoX.apply``.
"""

import json
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from neox_jax.loading import load_model
from neox_jax.model import GPTNeoX, ModelConfig

V1 = Path(__file__).parent / "fixtures" / "v1"
TOKENS = np.array([[1, 5, 9, 30, 2, 17, 4, 11]], np.int32)


def _independent(step_dir: Path):
    config = json.loads((step_dir / "model_config" / "metadata").read_text())
    params = ocp.PyTreeCheckpointer().restore(step_dir / "params")
    return ModelConfig.from_dict(config), params


@pytest.mark.parametrize(
    "path,step_dir", [("checkpoint", "checkpoint"), ("run", "run/checkpoints/2")]
)
def test_v1_artifacts_load_to_the_same_logits(path, step_dir):
    config, params = load_model(V1 / path)
    ref_config, ref_params = _independent(V1 / step_dir)
    assert config == ref_config
    assert config.num_hidden_layers == 2 and config.hidden_size == 8
    got = np.asarray(GPTNeoX(config).apply({"params": params}, TOKENS))
    want = np.asarray(GPTNeoX(ref_config).apply({"params": ref_params}, TOKENS))
    assert got.shape == (1, TOKENS.shape[1], 32)
    # Same arrays, same program: identical up to nothing; 0 tolerance would also hold on
    # one machine, 1e-6 allows a different XLA build to reorder the float32 sums.
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
