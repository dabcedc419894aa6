"""The README's mesh recipe (data=2 x fsdp=4 on fake CPU devices) compiles without XLA
resharding activations (#14 item 8): FSDP gathers weights, never hidden states.

XLA warned "Involuntary full rematerialization" here: the input embedding table is stored
split along ``embed``, so the lookup gave embeddings split along ``embed`` that XLA then
gathered to the batch layout. The check reads the compiled train step: every all-gather
must produce a (per-layer) parameter's shape, none an activation's.
"""

import json
import os
import subprocess
import sys

from helpers.train import REPO
from helpers.xla import xla_flags

SCRIPT = r"""
import json, re, sys
import jax
sys.path.insert(0, sys.argv[1])
from configs.pretrain import get_config
from neox_jax.aot import lower_train_step

config = get_config("tiny")
config.mesh.data, config.mesh.fsdp, config.train.microbatches = 2, 4, 2
lowered, abstract, _, _, _ = lower_train_step(config, jax.devices())
text = lowered.compile().as_text()
gathered = set(re.findall(r"= \w+\[([\d,]*)\][^=]*? all-gather(?:-start)?\(", text))
shapes = {tuple(x.shape) for x in jax.tree.leaves(abstract.params)}
shapes |= {s[1:] for s in shapes}  # a layer's slice of the stacked [layers, ...] weights
shapes |= {s[::-1] for s in shapes}  # XLA may gather a transposed layout
print(json.dumps({"gathered": sorted(gathered), "params": sorted(map(list, shapes))}))
"""


def test_readme_mesh_recipe_gathers_only_weights():
    env = {"XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(REPO)], capture_output=True, text=True,
        timeout=600, env={**os.environ, **env},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    params = {tuple(s) for s in result["params"]}
    gathered = [tuple(int(d) for d in s.split(",") if d) for s in result["gathered"]]
    assert gathered, "FSDP must gather weights"
    activations = [s for s in gathered if s not in params]
    assert not activations, f"activations gathered: {activations}"
    assert "Involuntary full rematerialization" not in out.stderr
