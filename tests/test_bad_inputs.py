"""Every command line fed bad input: a clear message, the right exit, no damage.

Each row of ``CASES`` runs one entry point in-process (its ``COMMAND``, the same object
``python -m`` runs) with a bad command line and asserts: the exit status (2 for user
errors), a key phrase of the message, no traceback, and that the row's destination
(if any) is exactly as it was before (absent stays absent, contents unchanged). Library
functions fed bad input are tests/test_bad_inputs_api.py; what only a real process shows
(``python -m``, the debug switch, Ctrl-C) is tests/test_cli_behaviour.py. The cases of
both tables are listed for users in docs/errors.md, written here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import bad_inputs
from helpers.bad_inputs import COMMANDS, READ_ONLY, fill, run_command, snapshot
from test_bad_inputs_api import API_CASES

REPO = Path(__file__).resolve().parents[1]
art = bad_inputs.art  # the module fixture: tiny artifacts every row points at


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
                "--config.frequency_penalty=2.5"], 2, "frequency_penalty=2.5 must be in [-2, 2]",
     None),
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
    before = snapshot(dest_path)
    status, out, err = run_command(name, fill(argv, art))
    assert status == code, f"exit {status}, expected {code}\nstdout: {out}\nstderr: {err}"
    assert phrase.lower() in err.lower(), err
    assert "Traceback" not in err and "Traceback" not in out, err
    assert err.startswith(f"{COMMANDS[name].prog}: error: "), err
    assert len(err.strip().splitlines()) <= 3, err
    assert snapshot(dest_path) == before, f"{dest_path} changed"
    assert not Path(READ_ONLY).exists()


def test_the_table_is_large_enough():
    assert len(CASES) + len(API_CASES) >= 80
