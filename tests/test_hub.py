"""Hub model ids (``owner/name[@revision]``) wherever a model path is taken; push_to_hub.

No network: the Hub cache is a folder the test builds in huggingface_hub's own layout
(``models--owner--name/refs/<revision>`` -> ``snapshots/<sha>/``), read with
``HF_HUB_OFFLINE=1``; uploads go to a mocked ``HfApi``.
"""

import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import jax
import numpy as np
import pytest
from helpers.finetune import write_char_tokenizer

from neox_jax import hub
from neox_jax.convert import save_hf
from neox_jax.errors import UserError
from neox_jax.model import ModelConfig, init_params

TINY = ModelConfig(
    vocab_size=96,  # the character tokenizer has 84 tokens
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=32,
)
REVISIONS = {"main": "a" * 40, "step3000": "b" * 40}


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A cache holding ``neox-test/tiny`` at two revisions with different weights."""
    cache = tmp_path_factory.mktemp("hub_cache")
    repo = cache / "models--neox-test--tiny"
    (repo / "refs").mkdir(parents=True)
    for seed, (revision, sha) in enumerate(REVISIONS.items()):
        (repo / "refs" / revision).write_text(sha)
        params = jax.device_get(init_params(TINY, jax.random.key(seed)))
        save_hf(TINY, params, repo / "snapshots" / sha, tokenizer_dir=write_char_tokenizer(
            tmp_path_factory.mktemp("tok")))  # fmt: skip
    return cache


def _checksum_offline(cache: Path, model: str) -> float:
    script = (
        "import sys, jax, numpy as np\n"
        "from neox_jax.loading import load_model\n"
        "from neox_jax.data.tokenizer import load_tokenizer\n"
        "_, params = load_model(sys.argv[1])\n"
        "assert load_tokenizer(sys.argv[1]).encode('ab') == [3, 4]\n"  # the char tokenizer
        "print(sum(float(np.abs(x).sum()) for x in jax.tree.leaves(params)))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", script, model], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return float(out.stdout.split()[-1])


def _checksum(path) -> float:
    from neox_jax.loading import load_model

    return sum(float(np.abs(x).sum()) for x in jax.tree.leaves(load_model(path)[1]))


def test_load_model_by_hub_id_and_revision_offline(hub_cache):
    snapshots = hub_cache / "models--neox-test--tiny" / "snapshots"
    main, step = (_checksum(snapshots / sha) for sha in REVISIONS.values())
    assert main != step
    assert _checksum_offline(hub_cache, "neox-test/tiny") == pytest.approx(main, rel=1e-6)
    assert _checksum_offline(hub_cache, "neox-test/tiny@step3000") == pytest.approx(step, rel=1e-6)


def test_local_paths_pass_through_and_ids_are_parsed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    for local in ("runs/tiny", "./x/y", "/abs/path", "~/models/p", "plain"):
        assert hub.resolve(local) == local
    assert hub.parse_hub_id("EleutherAI/pythia-70m@step3000") == (
        "EleutherAI/pythia-70m",
        "step3000",
    )
    assert hub.parse_hub_id("EleutherAI/pythia-160m") == ("EleutherAI/pythia-160m", None)
    assert hub.parse_hub_id("data/tokenizer.json") is None


def test_only_weights_config_and_tokenizer_files_are_fetched(tmp_path, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, list(allow_patterns)))
        folder = tmp_path / f"snap{len(calls)}"
        folder.mkdir()
        return str(folder)  # no safetensors there: the .bin weights are asked for next

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert hub.resolve("EleutherAI/pythia-70m@step3000") == tmp_path / "snap2"
    (repo, rev, first), (_, _, second) = calls
    assert (repo, rev) == ("EleutherAI/pythia-70m", "step3000")
    assert not any(".bin" in p for p in first)
    names = ["model.safetensors", "model-00002-of-00003.safetensors",
             "model.safetensors.index.json", "consolidated.safetensors"]  # fmt: skip
    fetched = [any(fnmatch.fnmatch(n, p) for p in first) for n in names]
    assert fetched == [True, True, True, False]  # not Mistral's consolidated (a second copy)
    assert "pytorch_model*.bin" in second and "config.json" in second
    assert "tokenizer.json" in first and "tokenizer_config.json" in first


def test_config_and_tokenizer_lookups_fetch_no_weights(hub_cache, monkeypatch):
    """peek_config and find_tokenizer on a Hub id ask the Hub for metadata files only."""
    from neox_jax.loading import find_tokenizer, peek_config

    snapshot = hub_cache / "models--neox-test--tiny" / "snapshots" / REVISIONS["main"]
    asked = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        asked.append(list(allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert peek_config("neox-test/tiny").num_hidden_layers == TINY.num_hidden_layers
    assert find_tokenizer("neox-test/tiny") == snapshot
    assert len(asked) == 2
    assert not any(p.endswith((".safetensors", ".bin")) for patterns in asked for p in patterns)


def test_a_peft_adapter_by_hub_id_merges_onto_its_base_by_hub_id(hub_cache, tmp_path, monkeypatch):
    """An adapter repository names its base as another Hub id; both resolve, the adapter
    is merged onto the base, and the base's tokenizer serves it."""
    from neox_jax.finetune.lora import LoraConfig, init_adapters, merge
    from neox_jax.finetune.peft_format import save_peft_adapter
    from neox_jax.loading import find_tokenizer, load_model

    base = hub_cache / "models--neox-test--tiny" / "snapshots" / REVISIONS["main"]
    lora = LoraConfig(rank=2, alpha=4.0, targets=("query_key_value",))
    adapters = jax.tree.map(
        lambda a: np.full(a.shape, 0.1, np.float32),
        init_adapters(TINY, lora, jax.random.key(0)),
    )
    save_peft_adapter(TINY, adapters, lora, tmp_path / "adapter",
                      base_model_name_or_path="neox-test/tiny")  # fmt: skip
    repos = {"me/tiny-lora": tmp_path / "adapter", "neox-test/tiny": base}
    asked = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        asked.append((repo_id, list(allow_patterns)))
        return str(repos[repo_id])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    _, params = load_model("me/tiny-lora")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(asked[0][1])
    _, base_params = load_model(base)
    want = jax.device_get(merge(base_params, adapters, lora))
    for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        # The same merge of the same arrays (load_model runs it under jit, which may fuse
        # the add): at most float32 round-off apart.
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    assert find_tokenizer("me/tiny-lora") == base


def test_missing_model_offline_says_what_is_wrong(hub_cache):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub_cache))
    script = "from neox_jax import hub; hub.resolve('neox-test/absent')"
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert "neox-test/absent: no such local path, and no Hub model" in out.stderr


def test_convert_push_to_hub_with_the_api_mocked(hub_cache, tmp_path, monkeypatch):
    # huggingface_hub's HfApi is replaced: no credentials and no network are needed.
    from neox_jax.convert.__main__ import convert

    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            uploads.append(("create", repo_id, kw.get("private")))

        def upload_folder(self, folder_path, repo_id, **kw):
            files = sorted(p.name for p in Path(folder_path).iterdir())
            uploads.append(("upload", repo_id, files))
            return "https://huggingface.co/me/tiny/commit/0"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    src = hub_cache / "models--neox-test--tiny" / "snapshots" / REVISIONS["main"]
    convert(str(src), str(tmp_path / "out"), "hf", push_to_hub="me/tiny")
    assert uploads[0] == ("create", "me/tiny", False)
    assert uploads[1][:2] == ("upload", "me/tiny")
    assert {"config.json", "model.safetensors"} <= set(uploads[1][2])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "gpt_neox"
    with pytest.raises(UserError, match="--to=hf"):
        convert(str(src), str(tmp_path / "out2"), "neox", push_to_hub="me/tiny")
    with pytest.raises(UserError, match="not a Hub repository id"):
        hub.push_to_hub(tmp_path / "out", "no-owner")


def test_train_init_from_a_hub_id_offline(hub_cache, tmp_path):
    from helpers.train import REPO, tiny_config, train_command, write_dataset

    data = write_dataset(tmp_path / "counting")
    hub_id = "neox-test/tiny@step3000"
    config = tiny_config(data, **{"train.steps": 2, "train.init_from": hub_id})
    config.data.tokenizer = hub_id
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub_cache), JAX_PLATFORMS="cpu")
    out = subprocess.run(
        train_command(config, tmp_path / "run"), cwd=REPO, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    snapshot = hub_cache / "models--neox-test--tiny" / "snapshots" / REVISIONS["step3000"]
    assert f"Initialised from {snapshot}" in out.stdout
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["init_from"] == str(snapshot)  # the run records where it started
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()  # copied from the Hub
