"""Shared by the bad-input tests: the entry points by name, the tiny artifacts every
row points at (module fixture ``art``), and the in-process runner."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from helpers.evaluation import tiny_model
from neox_jax import batch_viewer as batch_viewer_cli
from neox_jax import embed as embed_cli
from neox_jax import evaluate as evaluate_cli
from neox_jax import quantize as quantize_cli
from neox_jax import rag as rag_cli
from neox_jax import sample as sample_cli
from neox_jax import serve as serve_cli
from neox_jax import sweep as sweep_cli
from neox_jax import train as train_cli
from neox_jax.convert import __main__ as convert_cli
from neox_jax.data import preprocess as preprocess_cli
from neox_jax.data import spm_training as spm_cli
from neox_jax.finetune import export as export_cli

REPO = Path(__file__).resolve().parents[2]
COMMANDS = {
    "sample": sample_cli.COMMAND,
    "evaluate": evaluate_cli.COMMAND,
    "embed": embed_cli.COMMAND,
    "rag": rag_cli.COMMAND,
    "quantize": quantize_cli.COMMAND,
    "convert": convert_cli.COMMAND,
    "export": export_cli.COMMAND,
    "preprocess": preprocess_cli.COMMAND,
    "spm": spm_cli.COMMAND,
    "train": train_cli.COMMAND,
    "serve": serve_cli.COMMAND,
    "sweep": sweep_cli.COMMAND,
    "batch_viewer": batch_viewer_cli.COMMAND,
}
# Where nobody may write, even root (sysfs refuses new folders).
READ_ONLY = "/sys/neox_jax_bad_inputs_dst"


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """Tiny artifacts shared by every row: ``{name: path}`` (``{x}`` in a row's argv)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    model = tiny_model()[0]  # a Hugging Face folder with its tokenizer.json
    paths = {"model": model, "tok": model / "tokenizer.json", "root": root}

    def write(name, data):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
        paths[name.replace(".", "_").replace("/", "_")] = path
        return path

    write("good.txt", "alpha beta gamma\ndelta river ocean\n")
    write("latin1.txt", "caf\xe9 na\xefve\n".encode("latin-1"))
    write("bad_line.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    write("no_key.jsonl", '{"text": "ok"}\n{"body": "no text key"}\n')
    write("empty_docs.jsonl", '{"text": ""}\n{"text": ""}\n')
    write("empty.txt", "")
    write("prompts_bad.jsonl", '{"prompt": "a"}\n{"prompt": 3}\n')
    write("questions.txt", "what?\n")
    write("bad_task/broken.yaml", "task: broken\ndataset_path: json\n  oops: [\n")
    write("full/keep.txt", "keep me\n")  # a non-empty destination
    write("a_file", "not a folder\n")
    paths["full"] = root / "full"
    paths["missing"] = root / "missing"
    paths["new"] = root / "new_dst"
    paths["ro"] = READ_ONLY
    # Broken copies of the model folder.
    for name in ("truncated", "no_key_cfg", "bad_json_cfg", "bad_tok"):
        shutil.copytree(model, root / name)
        paths[name] = root / name
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cfg = json.loads((model / "config.json").read_text())
    del cfg["hidden_size"]
    (root / "no_key_cfg" / "config.json").write_text(json.dumps(cfg))
    (root / "bad_json_cfg" / "config.json").write_text('{"hidden_size": 64,')
    (root / "bad_tok" / "tokenizer.json").write_text('{"model": ')
    for name in ("index.faiss", "chunks.jsonl"):  # an index folder with broken settings
        write(f"bad_index/{name}", "")
    write("bad_index/index.json", "{oops")
    write("bad_lora_run/lora.json", "[1, 2")
    write("bad_peft/adapter_config.json", '{"r": ')
    write("bad_peft/adapter_model.safetensors", b"")
    for name in ("bad_index", "bad_lora_run", "bad_peft"):
        paths[name] = root / name
    return paths


def fill(argv, art):
    return [a.format(**art) for a in argv]


def snapshot(path: Path):
    """What a destination holds: None when absent, else {relative path: bytes}."""
    if path is None:
        return None
    if not path.exists():
        return None
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def run_command(name: str, argv: list[str]) -> tuple[int, str, str]:
    """``COMMANDS[name]`` in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = COMMANDS[name]([COMMANDS[name].prog, *argv])
        except SystemExit as e:  # nothing should exit past the runner; count it anyway
            code = e.code
    return code, out.getvalue(), err.getvalue()
