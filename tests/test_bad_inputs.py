"""Every command line and main API, fed bad input: a clear message, the right exit, no damage.

Each row of ``CASES`` runs one entry point in-process (its ``COMMAND``, the same object
``python -m`` runs) with a bad command line and asserts: the exit status (2 for user
errors), a key phrase of the message, no traceback, and that the row's destination
(if any) is exactly as it was before (absent stays absent, contents unchanged). Rows of
``API_CASES`` call library functions and assert the exception type and phrase. A few
subprocess tests check what only a real process shows (``python -m``, the debug switch,
Ctrl-C). The cases are listed for users in docs/errors.md.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.evaluation import tiny_model

from neox_jax import batch_viewer as batch_viewer_cli
from neox_jax import cli, config_checks, errors
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

REPO = Path(__file__).resolve().parents[1]
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


def _fill(argv, art):
    return [a.format(**art) for a in argv]


def _snapshot(path: Path):
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


def _generic_cases():
    """The same four command-line mistakes for every entry point."""
    rows = []
    for name in COMMANDS:
        base = ["--workdir={new}"] if name in ("train", "sweep") else []
        config = ["--config=configs/pretrain.py:tiny"] if name == "train" else []
        rows += [
            (name, [*config, *base, "--config.no_such_field=1"], 2, "unknown config field", None),
            (name, [*base, "--config=configs/no_such_config.py"], 2, "cannot load config", None),
            (name, [*config, *base, "stray_argument"], 2, "unexpected arguments", None),
            (name, [*config, *base, "--no_such_flag=1"], 2, "unknown flag --no_such_flag", None),
        ]
    return rows


# (command, argv, exit status, key phrase of the message, destination that must not change)
# A valid training command line; the rows add one bad --config value each.
TINY_RUN = ["--config=configs/pretrain.py:tiny", "--workdir={new}"]
# A valid sweep command line (one grid axis of two values).
SWEEP_RUN = ["--config.train_config=configs/pretrain.py:tiny", "--workdir={new}",
             "--config.grid=optimizer.lr=1e-3,3e-3"]  # fmt: skip

CASES = _generic_cases() + [
    # --- sample
    ("sample", ["--config.prompt=x"], 2, "missing --config.checkpoint", None),
    ("sample", ["--checkpoint={model}", "--config.prompt=x"], 2,
     "did you mean --config.checkpoint", None),
    ("sample", ["--config.checkpoint={missing}", "--config.prompt=x"], 2, "missing", None),
    ("sample", ["--config.checkpoint={model}", "--config.prompt=x", "--config.interactive=True"],
     2, "exactly one of", None),
    ("sample", ["--config.checkpoint={model}", "--config.prompt=x", "--config.top_p=0"], 2,
     "top_p", None),
    ("sample", ["--config.checkpoint={model}", "--config.prompt=x", "--config.temperature=-1"], 2,
     "temperature", None),
    ("sample", ["--config.checkpoint={model}", "--config.prompt=x",
                "--config.early_stopping=maybe"], 2, "early_stopping", None),
    ("sample", ["--config.checkpoint={model}", "--config.prompt=x", "--config.dtype=float8"], 2,
     "choose one of", None),
    ("sample", ["--config.checkpoint={model}", "--config.prompt=x",
                "--config.attention_impl=flash"], 2, "attention_impl", None),
    ("sample", ["--config.checkpoint={model}", "--config.prompt=x", "--config.batch_size=0"], 2,
     "batch_size", None),
    ("sample", ["--config.checkpoint={model}", "--config.prompt_file={missing}"], 2,
     "does not exist", None),
    ("sample", ["--config.checkpoint={model}", "--config.prompt_file={latin1_txt}"], 2,
     "not UTF-8", None),
    ("sample", ["--config.checkpoint={model}", "--config.prompt_file={root}"], 2, "is a folder",
     None),
    ("sample", ["--config.checkpoint={model}", "--config.prompt_file={prompts_bad_jsonl}"], 2,
     "prompts_bad.jsonl:2", None),
    ("sample", ["--config.checkpoint={model}", "--config.prompt=x",
                "--config.tokenizer={missing}"], 2, "missing", None),
    ("sample", ["--config.checkpoint={model}", "--config.prompt=x",
                "--config.max_new_tokens=100000"], 2, "context", None),
    ("sample", ["--config.checkpoint={model}", "--config.prompt=x",
                "--config.tensor_parallel=64"], 2, "devices", None),
    ("sample", ["--config.checkpoint={model}", "--config.prompt_file={good_txt}",
                "--config.output_file={missing}/out.jsonl"], 2, "does not exist", None),
    ("sample", ["--config.checkpoint={model}", "--config.prompt=x", "--config.top_k=abc"], 2,
     "top_k", None),
    ("sample", ["--config.checkpoint={model}", "--config.prompt=x",
                "--config.stop_strings=[1,"], 2, "stop_strings", None),
    ("sample", ["--config.checkpoint={truncated}", "--config.prompt=x"], 2, "truncated", None),
    ("sample", ["--config=configs/sample.py:nucleus", "--config.checkpoint={model}"], 2,
     "Unknown preset", None),
    ("sample", ["--config.checkpoint={bad_tok}", "--config.prompt=x"], 2, "tokenizer.json",
     None),
    ("sample", ["--config.checkpoint={model}", "--config.prompt=x", "--config.chat=True",
                "--config.tools_file={missing}"], 2, "tools_file", None),
    ("sample", ["--config.checkpoint={model}", "--config.prompt=x",
                "--config.tools_file={good_txt}"], 2, "needs --config.chat=True", None),
    ("sample", ["--config.checkpoint={model}", "--config.prompt=x", "--config.chat=True",
                "--config.tools_file={good_txt}"], 2, "is not JSON", None),
    # --- evaluate
    ("evaluate", ["--config.checkpoint={model}"], 2, "nothing to evaluate", None),
    ("evaluate", ["--config.perplexity.text_file={good_txt}"], 2, "missing --config.checkpoint",
     None),
    ("evaluate", ["--config.checkpoint={model}", "--config.perplexity.text_file={missing}"], 2,
     "missing", None),
    ("evaluate", ["--config.checkpoint={model}", "--config.perplexity.text_file={latin1_txt}"],
     2, "UTF-8", None),
    ("evaluate", ["--config.checkpoint={model}", "--config.perplexity.text_file={good_txt}",
                  "--config.batch_size=0"], 2, "batch_size", None),
    ("evaluate", ["--config.checkpoint={model}", "--config.harness.tasks=tiny_mc",
                  "--config.harness.include_path={missing}"], 2, "does not exist", None),
    ("evaluate", ["--config.checkpoint={model}", "--config.harness.tasks=broken",
                  "--config.harness.include_path={root}/bad_task",
                  "--config.harness.include_defaults=False"], 2, "broken.yaml", None),
    ("evaluate", ["--config.checkpoint={model}", "--config.perplexity.indexed_dataset={missing}"],
     2, "missing", None),
    ("evaluate", ["--config.checkpoint={model}", "--config.perplexity.indexed_dataset={good_txt}"],
     2, "good.txt", None),
    ("evaluate", ["--config.checkpoint={model}", "--config.perplexity.text_file={good_txt}",
                  "--config.output_file={missing}/r.json"], 2, "does not exist", None),
    # --- embed / rag
    ("embed", ["--config.checkpoint={model}", "--config.index_dir={new}"], 2,
     "missing --config.corpus", "new"),
    ("embed", ["--config.checkpoint={model}", "--config.corpus={missing}",
               "--config.index_dir={new}"], 2, "missing", "new"),
    ("embed", ["--config.checkpoint={model}", "--config.corpus={good_txt}",
               "--config.index_dir={new}", "--config.embed.pooling=median"], 2, "embed.pooling",
     "new"),
    ("embed", ["--config.checkpoint={model}", "--config.corpus={good_txt}",
               "--config.index_dir={new}", "--config.index.kind=annoy"], 2, "index.kind", "new"),
    ("embed", ["--config.checkpoint={model}", "--config.corpus={good_txt}",
               "--config.index_dir={new}", "--config.chunk_overlap=300"], 2, "chunk_overlap",
     "new"),
    ("embed", ["--config.checkpoint={model}", "--config.corpus={good_txt}",
               "--config.index_dir={full}"], 2, "not empty", "full"),
    ("embed", ["--config.checkpoint={model}", "--config.corpus={good_txt}",
               f"--config.index_dir={READ_ONLY}"], 2, "cannot write", None),
    ("embed", ["--config.checkpoint={model}", "--config.corpus={bad_line_jsonl}",
               "--config.index_dir={new}"], 2, "bad_line.jsonl", "new"),
    ("embed", ["--config.checkpoint={model}", "--config.corpus={latin1_txt}",
               "--config.index_dir={new}"], 2, "latin1.txt", "new"),
    ("rag", ["--config.checkpoint={model}", "--config.question=hi"], 2,
     "missing --config.index_dir", None),
    ("rag", ["--config.checkpoint={model}", "--config.index_dir={missing}",
             "--config.question=hi"], 2, "missing", None),
    ("rag", ["--config.checkpoint={model}", "--config.index_dir={full}", "--config.question=hi",
             "--config.question_file={questions_txt}"], 2, "exactly one of", None),
    ("rag", ["--config.checkpoint={model}", "--config.index_dir={full}",
             "--config.question_file={latin1_txt}"], 2, "not UTF-8", None),
    ("rag", ["--config.checkpoint={model}", "--config.index_dir={full}", "--config.question=hi"],
     2, "full", None),
    ("rag", ["--config.checkpoint={model}", "--config.index_dir={full}", "--config.question=hi",
             "--config.top_k=0"], 2, "top_k", None),
    ("rag", ["--config.checkpoint={model}", "--config.index_dir={bad_index}",
             "--config.question=hi"], 2, "index.json is not valid JSON", None),
    # --- quantize (old spellings included: the README documented them)
    ("quantize", ["--config.src={missing}", "--config.dst={new}"], 2, "missing", "new"),
    ("quantize", ["--config.src={model}"], 2, "missing --config.dst", None),
    ("quantize", ["--src={model}", "--dst={new}", "--bits=3"], 2, "config.bits", "new"),
    ("quantize", ["--config.src={model}", "--config.dst={new}", "--config.method=gptq"], 2,
     "calibration", "new"),
    ("quantize", ["--config.src={model}", "--config.dst={new}", "--config.method=awq"], 2,
     "config.method", "new"),
    ("quantize", ["--config.src={model}", "--config.dst={full}"], 2, "not empty", "full"),
    ("quantize", ["--config.src={model}", "--config.dst={a_file}"], 2, "is a file", "a_file"),
    ("quantize", ["--config.src={model}", f"--config.dst={READ_ONLY}"], 2, "cannot write",
     None),
    ("quantize", ["--src={model}", "--dst={new}", "--bits=4", "--group_size=48"], 2,
     "group_size 48", "new"),
    ("quantize", ["--config=configs/quantize.py:gptq4", "--config.src={model}",
                  "--config.dst={new}", "--config.calibration={missing}"], 2, "missing", "new"),
    ("quantize", ["--config=configs/quantize.py:gptq4", "--config.src={model}",
                  "--config.dst={new}", "--config.calibration={good_txt}"], 2,
     "fewer than one window", "new"),
    ("quantize", ["--config.src={truncated}", "--config.dst={new}"], 2, "truncated", "new"),
    ("quantize", ["--src={model}", "--dst={new}", "--scale_dtype=int8"], 2, "scale_dtype",
     "new"),
    # the destination is refused before the (here broken) source is read
    ("quantize", ["--src={truncated}", "--dst={full}"], 2, "not empty", "full"),
    # --- convert (old spellings included)
    ("convert", ["--src={missing}", "--dst={new}", "--to=neox"], 2, "missing", "new"),
    ("convert", ["--src={model}", "--dst={new}", "--to=onnx"], 2, "config.to", "new"),
    ("convert", ["--config.src={model}", "--config.dst={new}"], 2, "missing --config.to", "new"),
    ("convert", ["--src={model}", "--dst={full}", "--to=neox"], 2, "not empty", "full"),
    ("convert", ["--src={model}", f"--dst={READ_ONLY}", "--to=hf"], 2, "cannot write", None),
    ("convert", ["--src={truncated}", "--dst={new}", "--to=neox"], 2, "truncated", "new"),
    ("convert", ["--src={no_key_cfg}", "--dst={new}", "--to=neox"], 2, "hidden_size", "new"),
    ("convert", ["--src={bad_json_cfg}", "--dst={new}", "--to=neox"], 2, "config.json", "new"),
    ("convert", ["--src={model}", "--dst={new}", "--to=hf", "--dtype=int8"], 2, "config.dtype",
     "new"),
    ("convert", ["--src={truncated}", "--dst={full}", "--to=hf"], 2, "not empty", "full"),
    ("convert", ["--src={model}", "--dst={new}", "--to=neox", "--push_to_hub=me/x"], 2,
     "config.to=hf", "new"),
    # --- finetune.export (old spellings included)
    ("export", [], 2, "pass --config.run", None),
    ("export", ["--run={missing}", "--hf_out={new}"], 2, "missing", "new"),
    ("export", ["--peft_in={model}", "--hf_out={new}"], 2, "missing --config.base", "new"),
    ("export", ["--run={model}", "--peft_in={model}", "--base={model}", "--hf_out={new}"], 2,
     "not both", "new"),
    ("export", ["--run={model}", "--peft_out={new}"], 2, "not a LoRA run", "new"),
    ("export", ["--run={model}", "--hf_out={full}"], 2, "not empty", "full"),
    ("export", ["--run={model}", "--hf_out={new}", "--dtype=int4"], 2, "config.dtype", "new"),
    ("export", ["--run={bad_lora_run}", "--hf_out={new}"], 2, "lora.json is not valid JSON",
     "new"),
    ("export", ["--base={model}", "--peft_in={bad_peft}", "--hf_out={new}"], 2,
     "adapter_config.json is not valid JSON", "new"),
    # --- data.preprocess (old spellings included)
    ("preprocess", ["--input={missing}", "--tokenizer={tok}", "--output_prefix={new}"], 2,
     "missing", None),
    ("preprocess", ["--input={bad_line_jsonl}", "--tokenizer={tok}", "--output_prefix={new}"], 2,
     "bad_line.jsonl:2", None),
    ("preprocess", ["--input={no_key_jsonl}", "--tokenizer={tok}", "--output_prefix={new}"], 2,
     "no key 'text'", None),
    ("preprocess", ["--input={latin1_txt}", "--tokenizer={tok}", "--output_prefix={new}"], 2,
     "not UTF-8", None),
    ("preprocess", ["--input={empty_docs_jsonl}", "--tokenizer={tok}",
                    "--output_prefix={new}"], 2, "empty corpus", None),
    ("preprocess", ["--input={good_txt}", "--tokenizer={missing}", "--output_prefix={new}"], 2,
     "missing", None),
    ("preprocess", ["--input={good_txt}", "--tokenizer={tok}", "--output_prefix={new}",
                    "--text_split=paragraph"], 2, "text_split", None),
    ("preprocess", ["--input={good_txt}", "--tokenizer={tok}", "--output_prefix={new}",
                    "--workers=0"], 2, "workers", None),
    ("preprocess", ["--input={good_txt}", "--tokenizer={tok}"], 2,
     "missing --config.output_prefix", None),
    # --- data.spm_training (old spellings included)
    ("spm", ["--input={missing}", "--output={new}/spm.model"], 2, "missing", "new"),
    ("spm", ["--input={latin1_txt}", "--output={new}/spm.model", "--vocab_size=300"], 2,
     "UTF-8", "new"),
    ("spm", ["--input={empty_txt}", "--output={new}/spm.model", "--vocab_size=300"], 2,
     "no training text", "new"),
    ("spm", ["--input={good_txt}", "--output={new}/spm.model", "--vocab_size=100"], 2,
     "vocab_size", "new"),
    ("spm", ["--input={good_txt}", "--output={new}/spm.model", "--model_type=word"], 2,
     "model_type", "new"),
    ("spm", ["--input={good_txt}", "--output={new}/spm.model", "--vocab_size=abc"], 2,
     "vocab_size", "new"),
    # --- train: the command line itself (training configs: tests/test_train*.py)
    ("train", ["--config=configs/pretrain.py:tiny"], 2, "missing --workdir", None),
    ("train", ["--workdir={new}"], 2, "missing --config", "new"),
    ("train", ["--config=configs/pretrain.py:tiny", "--workdir={a_file}"], 2, "is a file",
     "a_file"),
    ("train", ["--config=configs/pretrain.py:nope", "--workdir={new}"], 2, "unknown config",
     "new"),
    # --- train: config values, refused before anything is written or compiled
    ("train", [*TINY_RUN, "--config.train.steps=0"], 2,
     "train.steps=0 must be a whole number >= 1", "new"),
    ("train", [*TINY_RUN, "--config.optimizer.lr=-0.001"], 2,
     "optimizer.lr=-0.001 must be a number in (0, inf)", "new"),
    ("train", [*TINY_RUN, "--config.optimizer.b2=1.0"], 2,
     "optimizer.b2=1.0 must be a number in [0, 1)", "new"),
    ("train", [*TINY_RUN, "--config.train.nonfinite=ignore"], 2,
     "choose one of 'stop', 'skip'", "new"),
    ("train", [*TINY_RUN, "--config.train.eval_batches=0"], 2,
     "set train.eval_every above train.steps", "new"),
    ("train", [*TINY_RUN, "--config.train.save_every=0"], 2,
     "train.save_every=0 must be a whole number >= 1", "new"),
    ("train", [*TINY_RUN, "--config.train.log_every=0"], 2,
     "train.log_every=0 must be a whole number >= 1", "new"),
    ("train", [*TINY_RUN, "--config.train.eval_every=0"], 2,
     "train.eval_every=0 must be a whole number >= 1", "new"),
    ("train", [*TINY_RUN, "--config.data.seq_len=4096"], 2,
     "exceeds the model's context of 2048", "new"),
    ("train", [*TINY_RUN, "--config.optimizer.warmup_steps=-2"], 2,
     "warmup_steps=-2 must be a whole number >= -1", "new"),
    ("train", [*TINY_RUN, "--config.model.num_experts=4", "--config.model.num_experts_per_tok=5",
               "--config.model.gated_mlp=True", "--config.model.mlp_bias=False"], 2,
     "num_experts_per_tok (5) exceeds num_experts (4)", "new"),
    ("train", [*TINY_RUN, "--config.model.capacity_factor=0.0"], 2,
     "capacity_factor must be > 0", "new"),
    # --- sweep: its own config, checked before any run starts or anything is written
    ("sweep", [*SWEEP_RUN, "--config.grid="], 2, "the grid is empty", "new"),
    ("sweep", [*SWEEP_RUN, "--config.grid=optimizer.lr=loguniform(1e-4,1e-2)"], 2,
     "need --config.random=K", "new"),
    ("sweep", ["--workdir={new}", "--config.grid=optimizer.lr=1e-3"], 2,
     "config.train_config is empty", "new"),
    ("sweep", [*SWEEP_RUN, "--config.parallel=0"], 2, "config.parallel=0 must be >= 1", "new"),
    # --- batch_viewer
    ("batch_viewer", [], 2, "--config.data is required", None),
    ("batch_viewer", ["--config.data={missing}"], 2, "missing.idx does not exist", None),
]  # fmt: skip


LEGEND = {
    "model": "a tiny Hugging Face folder with its tokenizer", "tok": "its tokenizer.json",
    "missing": "a path that does not exist", "new": "a folder that does not exist yet",
    "full": "a non-empty folder", "a_file": "a plain file", "latin1_txt": "a Latin-1 text file",
    "good_txt": "a two-line UTF-8 text file", "bad_line_jsonl": "JSON lines, line 2 broken",
    "no_key_jsonl": "JSON lines, line 2 without 'text'", "empty_docs_jsonl": "only empty texts",
    "empty_txt": "an empty file", "prompts_bad_jsonl": "prompts, line 2 not a string",
    "questions_txt": "one question", "truncated": "the model with its weights cut short",
    "no_key_cfg": "the model without hidden_size in config.json",
    "bad_json_cfg": "the model with an unparsable config.json", "root": "the scratch folder",
    "bad_tok": "the model with an unparsable tokenizer.json",
    "bad_index": "an index folder whose index.json does not parse",
    "bad_lora_run": "a run folder whose lora.json does not parse",
    "bad_peft": "a PEFT folder whose adapter_config.json does not parse",
}  # fmt: skip


def errors_markdown() -> str:
    """docs/errors.md: every case of this module, for users."""
    lines = [
        "# Bad inputs and what they get",
        "",
        "Generated from `tests/test_bad_inputs.py`, which runs every row (regenerate with",
        "`python -c \"import sys; sys.path[:0] = ['tests', '.']; import test_bad_inputs as t; "
        't.write_errors_markdown()"`). Each command-line row exits with the status shown,',
        "prints `<prog>: error: ...` containing the phrase, shows no traceback, and leaves",
        'its destination as it was. The convention is in the README, "Errors and command lines".',
        "",
        "Placeholders: " + "; ".join(f"`{{{k}}}` {v}" for k, v in LEGEND.items()) + ".",
        "",
        "| # | command | arguments | exit | message contains |",
        "| --- | --- | --- | --- | --- |",
    ]
    for i, (name, argv, code, phrase, _) in enumerate(CASES):
        args = " ".join(argv).replace("|", "\\|") or "(none)"
        lines.append(f"| {i} | `{COMMANDS[name].prog}` | `{args}` | {code} | {phrase} |")
    lines += ["", "| API call | raises | message contains |", "| --- | --- | --- |"]
    for fn, kind, phrase in API_CASES:
        lines.append(f"| {fn.__doc__.strip()} | `{kind.__name__}` | {phrase} |")
    return "\n".join(lines) + "\n"


def write_errors_markdown() -> None:
    (REPO / "docs" / "errors.md").write_text(errors_markdown())


def test_docs_list_every_case():
    assert (REPO / "docs" / "errors.md").read_text() == errors_markdown(), (
        "docs/errors.md is stale; regenerate it (see its first lines)"
    )


@pytest.mark.parametrize(
    "name,argv,code,phrase,dest", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_bad_command_line(art, monkeypatch, name, argv, code, phrase, dest):
    monkeypatch.chdir(REPO)  # configs/... paths in argv are relative to the repository
    dest_path = Path(art[dest]) if dest else None
    before = _snapshot(dest_path)
    status, out, err = run_command(name, _fill(argv, art))
    assert status == code, f"exit {status}, expected {code}\nstdout: {out}\nstderr: {err}"
    assert phrase.lower() in err.lower(), err
    assert "Traceback" not in err and "Traceback" not in out, err
    assert err.startswith(f"{COMMANDS[name].prog}: error: "), err
    assert len(err.strip().splitlines()) <= 3, err
    assert _snapshot(dest_path) == before, f"{dest_path} changed"
    assert not Path(READ_ONLY).exists()


def test_the_table_is_large_enough():
    assert len(CASES) + len(API_CASES) >= 80


# --- library functions ----------------------------------------------------------------------
def _api_load_model(art):
    """`load_model` of a missing path"""
    from neox_jax.loading import load_model

    load_model(art["missing"])


def _api_read_prompts(art):
    """`read_prompts` of a non-UTF-8 file"""
    from neox_jax.inference.cli import read_prompts

    read_prompts(art["latin1_txt"])


def _api_load_json(art):
    """`errors.load_json` of a broken config.json"""
    errors.load_json(art["bad_json_cfg"] / "config.json", "model config")


def _api_sampling(art):
    """`SamplingParams(temperature=-1)`"""
    from neox_jax.inference import SamplingParams

    SamplingParams(temperature=-1.0)


def _api_preprocess_empty(art):
    """`preprocess` of documents that are all empty"""
    from neox_jax.data.preprocess import preprocess

    preprocess([str(art["empty_docs_jsonl"])], str(art["tok"]), str(art["new"]), progress=False)


def _api_indexed_dataset(art):
    """`IndexedDataset` of a missing prefix"""
    from neox_jax.data.indexed_dataset import IndexedDataset

    IndexedDataset(str(art["missing"]))


def _api_load_tokenizer(art):
    """`load_tokenizer` of a missing path"""
    from neox_jax.data.tokenizer import load_tokenizer

    load_tokenizer(art["missing"])


def _dataset(art, name, docs):
    import numpy as np

    from neox_jax.data.indexed_dataset import IndexedDatasetBuilder

    prefix = str(art["root"] / name)
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for doc in docs:
            builder.add_document(np.asarray(doc, np.uint16))
    return prefix


def _api_blend_weights(art):
    """`make_sources` with `data.weights=1,abc`"""
    from neox_jax.training.data import make_sources

    prefix = _dataset(art, "blend", [[5, 6, 7, 8]] * 8)
    data = _load_pretrain_config().data
    data.update(source="indexed", weights="1,abc", seq_len=2)
    make_sources(data, [prefix, prefix], None, 2)


def _api_no_tokens(art):
    """`PretrainSource` of a dataset whose documents are all empty"""
    from neox_jax.data.pretrain_data import PretrainSource

    PretrainSource(_dataset(art, "hollow", [[], []]), 4, 1)


def _load_pretrain_config():
    from configs.pretrain import get_config

    return get_config("tiny")


def _api_choice(art):
    """`config_checks.quantize` with `bits=5`"""
    config_checks.quantize(_load_config("quantize", bits=5))


def _load_config(name, **overrides):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_cfg", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(None)
    config.update(src="a", dst="b", **overrides)
    return config


# (function, exception type, key phrase)
API_CASES = [
    (_api_load_model, Exception, "missing"),
    (_api_read_prompts, errors.UserError, "not UTF-8"),
    (_api_load_json, errors.UserError, "config.json is not valid JSON"),
    (_api_sampling, ValueError, "temperature"),
    (_api_preprocess_empty, ValueError, "empty corpus"),
    (_api_indexed_dataset, Exception, "missing"),
    (_api_load_tokenizer, Exception, "missing"),
    (_api_choice, errors.UserError, "--config.bits=5"),
    (_api_blend_weights, errors.UserError, "data.weights='1,abc'"),
    (_api_no_tokens, errors.UserError, "hollow.*holds no tokens"),
]


@pytest.mark.parametrize("fn,kind,phrase", API_CASES, ids=[c[0].__name__ for c in API_CASES])
def test_bad_api_input(art, fn, kind, phrase):
    with pytest.raises(kind, match=phrase) as info:
        fn(art)
    assert cli.is_user_error(info.value), repr(info.value)


# --- the README's commands ----------------------------------------------------------------
def _readme_commands():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", text, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line[line.index("python -m ") :] for line in lines if "python -m neox_jax." in line]


@pytest.mark.parametrize("line", _readme_commands())
def test_readme_command_lines_parse(line, monkeypatch):
    # Every documented command line is valid for today's flags and configs (paths are
    # the reader's, so only the parsing is checked, not the run).
    # GPT-NeoX's own configs are named as a GPT-NeoX checkout holds them.
    monkeypatch.chdir(REPO / "tests" / "data" / "neox_configs" if "--neox_config" in line else REPO)
    _, _, module, *args = shlex.split(line, comments=True)
    if module == "neox_jax.evaluation.lm_eval_cli":
        pytest.skip("lm-eval's own command line")
    package = importlib.import_module(module)
    command = (
        getattr(package, "COMMAND", None) or importlib.import_module(f"{module}.__main__").COMMAND
    )
    parsed = command.parse([module, *args])
    assert parsed.config is not None


# --- what only a real process shows ---------------------------------------------------------
def _python_m(module, *args, env=None, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
        timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}, **kwargs,
    )  # fmt: skip


def test_python_m_user_error_and_debug_switch(art):
    args = [f"--src={art['missing']}", f"--dst={art['new']}", "--to=neox"]
    plain = _python_m("neox_jax.convert", *args)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr, plain.stderr
    assert plain.stderr.startswith("neox_jax.convert: error: ")
    debug = _python_m("neox_jax.convert", *args, env={"NEOX_JAX_DEBUG": "1"})
    assert debug.returncode == 2 and "Traceback" in debug.stderr, debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip().splitlines()[-1]
    assert not art["new"].exists()


def test_old_rag_spelling_names_the_new_one():
    proc = _python_m("neox_jax.retrieval.rag", "--config=configs/rag.py")
    assert proc.returncode == 2 and "python -m neox_jax.rag" in proc.stderr, proc.stderr


def test_ctrl_c_exits_130(art):
    # Interactive sampling waits on stdin: interrupt it there.
    proc = subprocess.Popen(
        [sys.executable, "-m", "neox_jax.sample", f"--config.checkpoint={art['model']}",
         "--config.interactive=True"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    deadline = time.time() + 240
    prompt = ""
    while "> " not in prompt and time.time() < deadline:
        prompt += proc.stdout.read(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err


def test_internal_error_shows_summary_then_traceback(capsys):
    def broken(config):
        raise RuntimeError("boom")

    command = cli.Command(broken, "neox_jax.demo", default_config="convert.py")
    assert command(["demo"]) == cli.EXIT_INTERNAL_ERROR
    err = capsys.readouterr().err
    first, *rest = err.strip().splitlines()
    assert first.startswith("neox_jax.demo: internal error: RuntimeError: boom")
    assert "Traceback" in rest[0]


def test_quantize_success_is_quiet(art, monkeypatch, capfd):
    # orbax logs each save at INFO (about 70 lines for a quantized checkpoint): hidden.
    monkeypatch.chdir(REPO)
    dst = art["root"] / "int8"
    assert quantize_cli.COMMAND(["q", f"--src={art['model']}", f"--dst={dst}"]) == 0
    out, err = capfd.readouterr()
    assert f"wrote {dst}" in out and "INFO" not in err and len(err.splitlines()) <= 2, err


def test_batch_sample_says_what_it_wrote(art, monkeypatch):
    monkeypatch.chdir(REPO)
    out = art["root"] / "samples.jsonl"
    status, stdout, err = run_command(
        "sample",
        [f"--config.checkpoint={art['model']}", f"--config.prompt_file={art['good_txt']}",
         f"--config.output_file={out}", "--config.max_new_tokens=2"],
    )  # fmt: skip
    assert status == 0, err
    assert f"wrote 2 results to {out}" in err and len(out.read_text().splitlines()) == 2


def test_help_lists_the_config_fields(capsys):
    assert quantize_cli.COMMAND(["q", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config.FIELD=VALUE" in out and "calibration_seq_len: 512" in out


# Modules run with python -m that are not on the convention, and why.
NOT_A_COMMAND = {
    "neox_jax/evaluation/lm_eval_cli.py": "lm-eval's own command line, our model registered",
    "neox_jax/retrieval/rag.py": "only says that the command moved to neox_jax.rag",
}


def test_every_entry_point_is_a_command():
    for path in sorted((REPO / "neox_jax").rglob("*.py")):
        name = str(path.relative_to(REPO))
        text = path.read_text()
        if '\nif __name__ == "__main__":' not in text or name in NOT_A_COMMAND:
            continue
        assert "COMMAND = cli.Command(" in text and "COMMAND.run()" in text, name
