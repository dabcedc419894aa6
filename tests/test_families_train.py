"""Training a Llama/Qwen/Mistral-style model on a data x fsdp x tensor mesh, resumed
exactly: the losses after resuming from step 6 equal those of the run that never stopped
(bitwise on CPU, as tests/test_train.py's resume test for GPT-NeoX)."""

from __future__ import annotations

import shutil

import pytest
from helpers.train import logged, run_train, tiny_config, write_dataset

# Every family option at once: grouped KV heads (2 for 4 heads, sharded over tensor=2),
# separate q/k/v with q/k/v-only biases (Qwen2), QK-norm (Qwen3), RMSNorm, SwiGLU,
# sequential residual, full rotary, a sliding window shorter than the rows.
FAMILY = {
    "model.model_type": "qwen3",
    "model.num_key_value_heads": 2,
    "model.fused_qkv": False,
    "model.attention_bias": True,
    "model.attention_out_bias": False,
    "model.qk_norm": True,
    "model.norm_type": "rmsnorm",
    "model.gated_mlp": True,
    "model.mlp_bias": False,
    "model.hidden_act": "silu",
    "model.use_parallel_residual": False,
    "model.rotary_pct": 1.0,
    "model.sliding_window": 8,
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "corpus")


def test_family_model_trains_on_a_mesh_and_resumes_exactly(dataset, tmp_path):
    config = tiny_config(
        dataset,
        **FAMILY,
        **{"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2, "train.eval_every": 100},
    )
    straight = run_train(config, tmp_path / "straight", devices=4)
    assert straight.returncode == 0, straight.stderr[-3000:]
    ref = logged(tmp_path / "straight")
    assert ref[12] < ref[1]  # it learns
    # The same run cut at its step-6 checkpoint: later checkpoints and metrics removed.
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "12")
    (tmp_path / "resumed" / "metrics.jsonl").write_text("")
    resumed = run_train(config, tmp_path / "resumed", devices=4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = logged(tmp_path / "resumed")
    assert min(after) == 7, "the second run must start from the step-6 checkpoint"
    assert [after[s] for s in range(7, 13)] == [ref[s] for s in range(7, 13)]
