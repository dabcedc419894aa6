"""The serving engine on meshes of fake CPU devices against the same engine on one device.

Each check runs in its own process: the CPU device count is fixed when jax starts. The
tiny model of ``helpers.hf_reference.make_hf_model`` has O(1) logits, so a greedy token
could only flip at a near-tie within fp32 round-off of a reordered sum (~1e-6): tokens
must agree exactly.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers.xla import xla_flags


def _run_on_fake_devices(script: str, devices: int, tmp_path: Path) -> None:
    tests = Path(__file__).resolve().parent
    env = dict(
        os.environ,
        XLA_FLAGS=xla_flags(devices),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]),
    )
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), str(tmp_path / "model")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0 and "SAME_TOKENS" in out.stdout, out.stderr[-3000:]


MESH_SCRIPT = """
import sys
import jax
import numpy as np
from helpers.hf_reference import make_hf_model
from neox_jax.convert import load_hf
from neox_jax.inference import SamplingParams
from neox_jax.parallel import create_mesh
from neox_jax.serving import Engine

make_hf_model(sys.argv[1], vocab_size=96, max_position_embeddings=64)
config, params = load_hf(sys.argv[1])
rng = np.random.default_rng(0)
prompts = [[int(t) for t in rng.integers(2, 96, n)] for n in (3, 9, 14, 5)]
sampling = SamplingParams(max_new_tokens=10, ignore_eos=True)
kw = dict(num_slots=2, max_len=32, prefill_buckets=(16,))
mesh = create_mesh({"tensor": 2}, devices=jax.devices()[:2])
sharded = Engine(config, params, mesh=mesh, **kw)
spec = sharded.state.cache["k"][0].sharding.spec
assert tuple(spec)[1] == "tensor", spec  # [N, H, S, D]: heads split over the devices
ours = [r[0] for r in sharded.generate(prompts, sampling)]
alone = [r[0] for r in Engine(config, params, **kw).generate(prompts, sampling)]
assert ours == alone, (ours, alone)
print("SAME_TOKENS")
"""


def test_tensor_parallel_engine_equals_one_device(tmp_path):
    """On 2 fake CPU devices (own process: the device count is fixed at start-up),
    the engine with weights and KV cache split over ``tensor`` gives one device's
    greedy tokens (exact, as above: the split only reorders fp32 sums)."""
    _run_on_fake_devices(MESH_SCRIPT, 2, tmp_path)


PIPELINE_SCRIPT = """
import dataclasses
import sys
import jax
import numpy as np
from helpers.hf_reference import make_hf_model
from neox_jax.convert import load_hf
from neox_jax.errors import UserError
from neox_jax.inference import SamplingParams
from neox_jax.parallel import create_mesh
from neox_jax.serving import Engine

make_hf_model(sys.argv[1], vocab_size=96, max_position_embeddings=64)
config, params = load_hf(sys.argv[1])
rng = np.random.default_rng(0)
prompts = [[int(t) for t in rng.integers(2, 96, n)] for n in (3, 9, 14, 5)]
prompts.append(prompts[2][:8] + [7, 8, 9, 10, 11])  # shares a cached block with prompts[2]
samplings = [SamplingParams(max_new_tokens=10, ignore_eos=True)] * 4
samplings.append(SamplingParams(max_new_tokens=6, temperature=0.8, top_k=20, seed=3))
# Prompts over 8 tokens are prefilled in chunks, their first block cached and reused.
kw = dict(num_slots=2, max_len=32, prefill_chunk=8, prefix_cache_blocks=4)
mesh = create_mesh({"stage": 2, "tensor": 2}, devices=jax.devices()[:4])
piped = Engine(config, params, mesh=mesh, **kw)
spec = tuple(piped.state.cache["k"].sharding.spec)
assert spec[0] == "stage" and spec[2] == "tensor", spec  # [L, N, H, S, D]
ours = [r[0] for r in piped.generate(prompts, samplings)]
assert piped.prefix_cache.hit_tokens == 8, piped.prefix_cache.hit_tokens
alone = Engine(config, params, **kw)
assert ours == [r[0] for r in alone.generate(prompts, samplings)], ours
# Prompt scoring (echo with logprobs), on a prompt longer than every prefill bucket.
a, b = piped.prompt_logprobs(prompts[2], 3), alone.prompt_logprobs(prompts[2], 3)
np.testing.assert_allclose([x[0] for x in a], [x[0] for x in b], rtol=1e-5, atol=1e-5)
assert [[i for i, _ in x[1]] for x in a] == [[i for i, _ in x[1]] for x in b]
try:  # a layer count the stages do not divide is refused, naming the fix
    Engine(dataclasses.replace(config, num_hidden_layers=3), params, mesh=mesh, **kw)
    raise AssertionError("3 layers over 2 stages was accepted")
except UserError as e:
    assert "pipeline stages" in str(e), e
print("SAME_TOKENS")
"""


def test_pipeline_engine_equals_one_device(tmp_path):
    """On 4 fake CPU devices, a ``{"stage": 2, "tensor": 2}`` mesh: the layers and the
    stacked KV cache split over the stages, heads over ``tensor``, every slot pipelined
    through the stages. Greedy and seeded-sampling tokens, chunked prefill and a prefix
    cache hit equal one device's exactly (same model as above; the stages change no
    arithmetic, the tensor split only the order of fp32 sums); prompt logprobs within
    1e-5 (that reordering)."""
    _run_on_fake_devices(PIPELINE_SCRIPT, 4, tmp_path)
