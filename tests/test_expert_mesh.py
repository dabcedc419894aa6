"""A mixture-of-experts model trained on expert-parallel meshes gives one device's numbers.

The tiny model has 8 experts (top 2) in each of its 2 layers. In ONE subprocess with 8
fake CPU devices (``--xla_force_host_platform_device_count=8``, never set in pytest),
the real trainer (``train_and_evaluate`` with ``config.mesh.*`` overrides) trains it on
expert=2 and expert=2 x tensor=2, and expert=2's step-2 checkpoint is resumed on
expert=4 x tensor=2 (so expert=4 trains too, steps 3-4); each of the three layouts'
logits on a fixed batch are computed from the initial parameters; greedy decoding and
LoRA on the experts are compared with one device's on two expert meshes. The 1-device
reference trains in the pytest process meanwhile. On these meshes the sparse layers run
the all-to-all dispatch (``neox_jax.model.expert_parallel``), which the compiled program
is checked to contain.

Run this file as ``python tests/test_expert_mesh.py --worker ...`` for the subprocess side.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.train import REPO, logged, tiny_config, write_dataset
from helpers.xla import xla_flags

DEVICES = 8
STEPS = 4
RESUME_STEP = 2
MESHES = {  # trained from scratch
    "expert2": {"mesh.data": 4, "mesh.expert": 2},
    "expert2_tensor2": {"mesh.data": 2, "mesh.expert": 2, "mesh.tensor": 2},
}
GENERATE_MESHES = {
    "expert2": {"data": 4, "expert": 2},
    "expert4_tensor2": {"expert": 4, "tensor": 2},
}
RESUME_FROM, RESUME_ON = "expert2", {"mesh.data": 1, "mesh.expert": 4, "mesh.tensor": 2}
# Whose initial logits are compared: the trained layouts and the one resumed on. A
# separate expert=4 run from scratch would only repeat the resumed run's checks.
LOGIT_MESHES = {**MESHES, "expert4_tensor2": RESUME_ON}
MODEL = {
    "model.hidden_size": 32,
    "model.num_attention_heads": 4,
    "model.intermediate_size": 64,
    "model.vocab_size": 64,
    # Qwen3-MoE-like blocks: experts are gated MLPs without biases.
    "model.gated_mlp": True,
    "model.mlp_bias": False,
    "model.hidden_act": "silu",
    "model.num_experts": 8,
    "model.num_experts_per_tok": 2,
    "model.moe_intermediate_size": 16,
    "model.norm_topk_prob": True,
    "model.router_aux_loss_coef": 0.01,
}
# fp32. The layouts change the order of additions (data-parallel means, a token's two
# expert outputs, tensor=2's two partial down projections): ~1e-7 relative per op,
# which Adam and 4 steps compound. As tests/test_parallel.py: 1e-5 leaves a wide
# margin and still catches a token sent to the wrong expert (an O(1) change).
RTOL = 1e-5
LOGITS_ATOL = 1e-5  # logits are O(1); same reasoning


def _config(data_prefix, save_every=STEPS, **overrides):
    return tiny_config(
        data_prefix,
        **MODEL,
        **{
            "train.steps": STEPS,
            "train.save_every": save_every,
            "train.keep": 0,
            "data.eval_fraction": 0.0,
            "train.peak_flops": 1e11,
        },
        **overrides,
    )


def _logits(config) -> tuple[np.ndarray, int]:
    """Logits of a fixed batch from the trainer's initial parameters on ``config``'s
    mesh, and the number of all-to-alls in the compiled forward."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from neox_jax.model import (
        GPTNeoX,
        ModelConfig,
        abstract_params,
        init_params,
        param_logical_axes,
    )
    from neox_jax.parallel.rules import RULES, batch_sharding
    from neox_jax.training import trainer
    from neox_jax.training.optimizer import optimizer_from_config
    from neox_jax.training.state import abstract_train_state, init_train_state

    mesh = trainer.build_mesh(config.mesh)
    tx, _ = optimizer_from_config(config)
    model_config = ModelConfig.from_dict(config.model.to_dict())
    _, shardings = abstract_train_state(
        tx, abstract_params(model_config), param_logical_axes(model_config), mesh
    )
    tokens = np.random.default_rng(0).integers(0, 64, (8, 16))
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        state = init_train_state(
            lambda rng: init_params(model_config, rng), tx, shardings, config.train.seed
        )
        ids = jax.device_put(jnp.asarray(tokens), batch_sharding(mesh))
        forward = jax.jit(lambda p, x: GPTNeoX(model_config).apply({"params": p}, x))
        logits = forward(state.params, ids)
        hlo = forward.lower(state.params, ids).compile().as_text()
    return np.asarray(logits), hlo.count("all-to-all(")


def _greedy(config) -> dict[str, list[list[int]]]:
    """Greedy continuations of 8 prompts from random parameters, without a mesh and on
    expert-parallel meshes (the decode step dispatches one token per row)."""
    import jax

    from neox_jax.inference import SamplingParams
    from neox_jax.inference.generator import Generator
    from neox_jax.model import ModelConfig, init_params
    from neox_jax.parallel import create_mesh

    model_config = ModelConfig.from_dict(config.model.to_dict())
    params = init_params(model_config, jax.random.key(1))
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9], [10, 11, 12, 13], [3, 3], [4, 5], [7], [9, 8]]
    sampling = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    out = {}
    for name, mesh in {"single": None, **GENERATE_MESHES}.items():
        mesh = None if mesh is None else create_mesh(mesh)
        gen = Generator(model_config, params, max_cache_len=32, mesh=mesh, split_layers=False)
        out[name] = [list(map(int, r.token_ids)) for r in gen.generate(prompts, sampling)]
    return out


def _lora_logits(config) -> dict[str, float]:
    """Largest logit difference from one device with LoRA adapters on every expert
    projection (per-expert ``a [X, in, r]``, ``b [X, r, out]``, split as the kernels)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from neox_jax.finetune.lora import EXPERT_TARGETS, LoraConfig, attach, init_adapters
    from neox_jax.model import GPTNeoX, ModelConfig, init_params
    from neox_jax.parallel import create_mesh
    from neox_jax.parallel.rules import RULES

    model_config = ModelConfig.from_dict(config.model.to_dict())
    lora = LoraConfig(targets=EXPERT_TARGETS, rank=4)
    adapters = init_adapters(model_config, lora, jax.random.key(1))
    # B starts at zero; random values make the adapters change the output.
    adapters = jax.tree.map(
        lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), adapters
    )
    params = attach(init_params(model_config, jax.random.key(0)), adapters, lora)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (8, 16)))

    def forward(p, x):
        return GPTNeoX(model_config).apply({"params": p}, x)

    single = np.asarray(forward(params, tokens))
    out = {}
    for name, sizes in GENERATE_MESHES.items():
        with jax.set_mesh(create_mesh(sizes)), nn.logical_axis_rules(RULES):
            out[name] = float(np.max(np.abs(np.asarray(jax.jit(forward)(params, tokens)) - single)))
    return out


def worker(data_prefix: str, root: Path) -> None:
    from neox_jax.training.trainer import train_and_evaluate

    config = _config(data_prefix)
    report = {"generate": _greedy(config), "lora": _lora_logits(config)}
    for name, mesh in LOGIT_MESHES.items():
        save_every = RESUME_STEP if name == RESUME_FROM else STEPS
        config = _config(data_prefix, save_every, **mesh)
        logits, all_to_all = _logits(config)
        np.save(root / f"{name}_logits.npy", logits)
        report[name] = {"all_to_all": all_to_all}
        if name in MESHES:
            train_and_evaluate(config, root / name)
            report[name]["losses"] = logged(root / name)
    resumed = root / "resumed"
    shutil.copytree(
        root / RESUME_FROM / "checkpoints" / str(RESUME_STEP),
        resumed / "checkpoints" / str(RESUME_STEP),
    )
    train_and_evaluate(_config(data_prefix, **RESUME_ON), resumed)
    report["resumed"] = {"losses": logged(resumed)}
    (root / "report.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(8-device report, 1-device losses, 1-device logits, folder of the layouts' logits)."""
    root = tmp_path_factory.mktemp("expert_mesh")
    data = write_dataset(root / "counting")
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags(DEVICES),
        "JAX_PLATFORMS": "cpu",
    }
    cmd = [sys.executable, __file__, "--worker", data, str(root)]
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        from neox_jax.training.trainer import train_and_evaluate

        single = _config(data)
        single_logits, _ = _logits(single)
        train_and_evaluate(single, root / "single")
        output, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-4000:]
    report = json.loads((root / "report.json").read_text())
    return report, logged(root / "single"), single_logits, root


def _losses(report, name):
    return {int(k): v for k, v in report[name]["losses"].items()}


@pytest.mark.parametrize("mesh", list(LOGIT_MESHES))
def test_same_logits_as_one_device(runs, mesh):
    report, _, single_logits, root = runs
    # The sparse layers really exchange tokens: the scanned layer (compiled once) sends
    # the tokens and their expert ids and gets the results back, three all-to-alls;
    # not a silently replicated fallback.
    assert report[mesh]["all_to_all"] == 3, report[mesh]
    np.testing.assert_allclose(
        np.load(root / f"{mesh}_logits.npy"), single_logits, rtol=RTOL, atol=LOGITS_ATOL
    )


@pytest.mark.parametrize("mesh", list(MESHES))
def test_same_losses_as_one_device(runs, mesh):
    report, single, _, _ = runs
    losses = _losses(report, mesh)
    assert sorted(losses) == sorted(single) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(
        [losses[s] for s in single], [single[s] for s in single], rtol=RTOL, err_msg=mesh
    )
    assert losses[STEPS] < losses[1]  # and it trains


def test_resume_on_another_expert_mesh(runs):
    """expert=2's step-2 checkpoint continued on expert=4 x tensor=2 gives the losses of
    the run that was never stopped."""
    report, single, _, _ = runs
    resumed, source = _losses(report, "resumed"), _losses(report, RESUME_FROM)
    later = list(range(RESUME_STEP + 1, STEPS + 1))
    assert sorted(resumed) == later
    np.testing.assert_allclose([resumed[s] for s in later], [source[s] for s in later], rtol=RTOL)
    np.testing.assert_allclose([resumed[s] for s in later], [single[s] for s in later], rtol=RTOL)


@pytest.mark.parametrize("mesh", list(GENERATE_MESHES))
def test_greedy_decoding_on_expert_meshes(runs, mesh):
    # Greedy tokens are an argmax of fp32 logits equal to round-off: identical.
    generated = runs[0]["generate"]
    assert generated[mesh] == generated["single"]
    assert all(len(t) == 8 for t in generated["single"])


@pytest.mark.parametrize("mesh", list(GENERATE_MESHES))
def test_expert_lora_on_expert_meshes(runs, mesh):
    # fp32 logits of O(1): the layouts reorder additions only (see RTOL).
    assert runs[0]["lora"][mesh] < LOGITS_ATOL


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(sys.argv[2], Path(sys.argv[3]))
