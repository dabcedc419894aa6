"""The README's commands, run as written.

Every line of every ```bash``` block and every ```python``` block of README.md and of the
``docs/`` pages it links (``helpers/docs.py``) runs here, in README order and then each
page's, in a fresh folder holding only a link to ``configs/`` (as a clone would),
through ``bash`` / ``python`` in subprocesses. Three kinds of change, all listed below
and named in the README's "Tested as written" note:

* stand-ins: what a reader replaces (``/models/...``, ``PATH``, the Hub ids, port 8000)
  points at a tiny random GPT-NeoX folder this test builds, the Hub ids through an offline
  Hub cache in huggingface_hub's own layout (``HF_HUB_OFFLINE=1``); a command with mesh
  flags sees 8 fake CPU devices (``XLA_FLAGS``) in place of accelerators, and one that
  sets ``XLA_FLAGS`` itself keeps the suite's (tests/helpers/xla.py) in front of its own;
* APPENDED: flags appended to a command so it takes seconds (fewer steps, a tiny shape);
  appended flags win over the command's own;
* SKIPPED: the lines that cannot run here (installing, a TPU VM, uploads, a 20B model,
  benchmark tasks that download their data), each with the reason and, where one exists,
  the test that covers it another way.

A README command that is neither run nor skipped fails, so a new command is run the day
it is documented. Commands that use ``runs/tiny`` (the main command's run) are one chain
and the rest another.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers.docs import documentation, pages
from helpers.generate import make_model_dir
from helpers.hub import add_repo

from neox_jax.data.indexed_dataset import IndexedDatasetBuilder

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # seconds per command; each takes seconds to a minute here

SKIPPED = {
    "python -m pytest": "the test command itself: CI runs exactly it",
    'pip install -e ".[serve]"': "installing; the suite's environment has the extras",
    "git clone ": "a TPU VM's set-up",
    'pip install -e ".[tpu]"': "a TPU VM's set-up (tests/test_tpu_probe.py)",
    "print(jax.devices())": "a TPU VM's set-up",
    "--config.push_to_hub=": "an upload (tests/test_hub.py runs it against a mocked HfApi)",
    "neox-lm-eval ": "lm-eval tasks download their data (tests/test_lm_eval.py runs local tasks)",
    "/models/neox-20b": "a 20B model on 8 accelerators (tests/test_parallel_inference.py: tiny)",
}
# The install in front of the main command: the suite runs in the installed environment.
INSTALL_PREFIX = re.compile(
    r"^python3 -m venv \.venv && \. \.venv/bin/activate && pip install [^&]*&& "
)  # noqa: E501
HUB_IDS = {  # the Hub ids the README uses, and the revisions it names
    "EleutherAI/pythia-70m": ("main", "step3000"),
    "EleutherAI/pythia-160m": ("main", "step143000"),
    "EleutherAI/pythia-1.4b": ("main",),
}
TINY_SHAPE = (
    "--config.model.num_hidden_layers=2 --config.model.hidden_size=64 "
    "--config.model.num_attention_heads=4 --config.model.intermediate_size=128 "
    "--config.data.seq_len=32 --config.data.global_batch_size=32"
)
SHORT = "--config.train.steps=2 --config.train.eval_every=2 --config.train.eval_batches=1"
# Rows of 64 tokens, not the tiny config's 256: its 16 x 256-token steps took most of each
# of its runs here (the batch stays 16, which the recipes' 8-way meshes divide).
SHORT_ROWS = "--config.data.seq_len=64"
STDLIB = "--config.data.stdlib_max_mb=1 --config.data.tokenizer_vocab_size=1000"
# (what the command contains, the flags appended to it); the first match applies.
APPENDED = [
    ("neox_jax.sweep", f"{SHORT} {STDLIB} {SHORT_ROWS}"),  # each run trains a tokenizer
    ("--config.workers=8", "--config.workers=2"),  # still a pool of spawned workers, not 8
    (
        "configs/pretrain.py:tiny",
        f"{SHORT} {STDLIB} {SHORT_ROWS} --config.sample.max_new_tokens=8",
    ),
    ("configs/pretrain.py:", f"{SHORT} {TINY_SHAPE}"),
    ("configs/finetune.py:", f"{SHORT} --config.data.seq_len=64 --config.data.global_batch_size=4"),
    ("neox_jax.evaluate", "--config.harness.tasks="),  # its lm-eval task downloads data
    (
        "--neox_config=local_setup.yml",
        # The stand-in tokenizer, which also sizes the vocabulary (GPT-NeoX's vocab_file is
        # not at hand; without a tokenizer the mapping assumes the 20B one's 50277 rows).
        f"{SHORT} {TINY_SHAPE} --config.data.tokenizer=tokenizer.json",
    ),
    ("neox_jax.batch_viewer", "--config.batch_size=2"),  # steps of 2 sequences, not 1024
    # 16 x 64 calibration tokens, not 128 x 512: their forwards were most of its 25 s here.
    ("quantize.py:gptq4", "--config.num_calibration_samples=16 --config.calibration_seq_len=64"),
    # Each program compiles on its first request instead of every prefill bucket and slot
    # count before listening (minutes here; tests/test_serving_api.py tests the warm-up).
    ("python -m neox_jax.serve", "--config.warmup=false"),
]


def _commands() -> list[tuple[str, str]]:
    """(kind, text) for each bash command line and python block, in README order."""
    text = documentation()
    out = []
    for lang, body in re.findall(r"```(bash|python)\n(.*?)\n```", text, re.S):
        if lang == "python":
            out.append(("python", body))
            continue
        pending = ""
        for line in body.replace("\\\n", " ").splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            pending = f"{pending} {line.strip()}".strip()
            try:
                shlex.split(pending, comments=True)  # a quoted string may span lines
            except ValueError:
                continue
            out.append(("bash", re.sub(r"\s+", " ", pending)))
            pending = ""
    return out


def _skip_reason(text: str) -> str | None:
    return next((why for key, why in SKIPPED.items() if key in text), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workspace:
    """A fresh folder with the README's inputs and the stand-ins, and a runner."""

    def __init__(self, root: Path, model: Path):
        self.root, self.port, self.server = root, _free_port(), None
        (root / "configs").symlink_to(REPO / "configs")
        cache = root / "hub_cache"
        for repo_id, revisions in HUB_IDS.items():
            add_repo(cache, repo_id, dict.fromkeys(revisions, model))
        for name in ("pythia-70m", "pythia-160m", "pythia-410m", "pythia-1b"):
            (root / "models").mkdir(exist_ok=True)
            (root / "models" / name).symlink_to(model)  # served under the README's name
        self.stand_ins = {
            "/models/": "models/",
            "checkpoint=PATH": "checkpoint=models/pythia-160m",
            "/export/": "export/",
            "=/tmp/": "=tmp/",
            "=/data/pythia/": "=pythia_data/",
            ":8000": f":{self.port}",
            "port=8000": f"port={self.port}",
        }  # fmt: skip
        self.env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "HF_HUB_CACHE": str(cache),
            "HF_HUB_OFFLINE": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self._write_inputs(model)

    def _write_inputs(self, model: Path) -> None:
        lines = [
            "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
            "The capital of France is Paris. The capital of Italy is Rome.",
            "How do I open a file? Use open(path) and read it in a with block.",
        ]
        docs = [{"text": f"{t} ({i})"} for i in range(40) for t in lines]
        for name in ("corpus.jsonl", "my.jsonl", "docs.jsonl"):
            (self.root / name).write_text("\n".join(json.dumps(d) for d in docs) + "\n")
        chats = [{"messages": [{"role": "user", "content": f"Say {w}."},
                               {"role": "assistant", "content": f"{w}!"}]}
                 for w in ("hello", "goodbye", "yes", "no") * 4]  # fmt: skip
        (self.root / "train.jsonl").write_text("\n".join(json.dumps(c) for c in chats) + "\n")
        (self.root / "prompts.txt").write_text("def \nThe capital of\n")
        for name in ("held_out.txt", "val.txt"):
            (self.root / name).write_text("\n\n".join(lines * 4) + "\n")
        shutil.copy(model / "tokenizer.json", self.root / "tokenizer.json")
        for item in (REPO / "tests" / "data" / "neox_configs").iterdir():  # GPT-NeoX's own
            (self.root / item.name).symlink_to(item)
        shutil.copy(model / "tokenizer.json", self.root / "20B_tokenizer.json")
        rng = np.random.default_rng(0)
        vocab = self.vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        self._write_dataset("data/enwik8/enwik8_text_document", rng.integers(3, vocab, (400, 50)))
        self._write_dataset("pythia_data/document", rng.integers(3, vocab, (2002, 9)))  # 2 x 1001
        stdlib = Path(os.__file__).parent
        sources = [p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:120]]
        (self.root / "corpus.txt").write_text("\n".join(sources))

    def _write_dataset(self, prefix: str, rows: np.ndarray) -> None:
        (self.root / prefix).parent.mkdir(parents=True, exist_ok=True)
        with IndexedDatasetBuilder(str(self.root / prefix)) as builder:
            for row in rows.astype(np.uint16):
                builder.add_document(row)

    def prepare(self, kind: str, text: str) -> str:
        text = INSTALL_PREFIX.sub("", text)
        for old, new in self.stand_ins.items():
            text = text.replace(old, new)
        if kind == "bash":
            flags = next((f for key, f in APPENDED if key in text), "").format(vocab=self.vocab)
            if "--config.mesh." in text and "XLA_FLAGS" not in text:  # devices stand in too
                text = f'XLA_FLAGS="$XLA_FLAGS --xla_force_host_platform_device_count=8" {text}'
            text = re.sub(r"\bXLA_FLAGS=([^\s\"']+)", r'XLA_FLAGS="$XLA_FLAGS \1"', text)
            code, _, comment = text.partition(" # ")
            text = f"{code} {flags}".strip() + (f"  # {comment}" if comment else "")
        return text

    def run(self, kind: str, text: str) -> None:
        text = self.prepare(kind, text)
        if "python -m neox_jax.serve" in text:
            return self._start_server(text)
        if kind == "python":
            script = self.root / f"readme_{abs(hash(text))}.py"
            script.write_text(text)
            argv = [sys.executable, str(script)]
        else:
            argv = ["bash", "-ec", text]
        stdin = "def \n" if "interactive=True" in text else ""
        proc = subprocess.run(argv, cwd=self.root, env=self.env, input=stdin, text=True,
                              capture_output=True, timeout=TIMEOUT)  # fmt: skip
        output = proc.stdout + proc.stderr
        failed = f"README command failed ({proc.returncode}):\n{text}\n{output[-3000:]}"
        assert proc.returncode == 0, failed
        for line in text.splitlines():  # a documented output, `print(x)  # 123`, is printed
            printed = re.match(r"print\(.*\)\s+#\s*([\d,]+)\b", line.strip())
            if printed:
                assert printed.group(1).replace(",", "") in proc.stdout, (line, proc.stdout)

    def _start_server(self, text: str) -> None:
        self.server = subprocess.Popen(shlex.split(text.split(" # ")[0]), cwd=self.root,
                                       env=self.env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)  # fmt: skip
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            assert self.server.poll() is None, f"serve exited:\n{self.server.stdout.read()}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise AssertionError("the README's serve command never became healthy")

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.send_signal(signal.SIGTERM)
            out, _ = self.server.communicate(timeout=60)
            assert self.server.returncode == 0, out[-3000:]


COMMANDS = _commands()


def _in_main_chain(text: str) -> bool:
    return "runs/tiny" in text or text.startswith("python3 -m venv")


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    """The tiny GPT-NeoX folder (byte-level BPE beside it) behind every /models/ path and
    Hub id: 2048 positions (the serve and sample lengths fit) and width 128 (the GPTQ
    default group of 128 divides it)."""
    path = tmp_path_factory.mktemp("stand_in") / "model"
    make_model_dir(path, max_position_embeddings=2048, hidden_size=128, intermediate_size=256)
    return path


def test_every_readme_command_is_run_or_skipped_with_a_reason():
    assert any(_in_main_chain(t) for _, t in COMMANDS)
    for kind, text in COMMANDS:
        runs = kind == "python" or "python -m neox_jax." in text or text.startswith("curl ")
        assert runs or _skip_reason(text), f"README command neither run nor skipped: {text}"


def test_every_docs_page_with_commands_is_linked_from_the_readme():
    # An unlinked page's commands would never run here.
    linked = set(pages())
    for page in sorted((REPO / "docs").glob("*.md")):
        has_code = re.search(r"```(bash|python)\n", page.read_text())
        assert page in linked or not has_code, f"README.md does not link {page.name}"


@pytest.mark.parametrize("chain", ["main", "others"])
def test_readme_commands_run_as_written(chain, stand_in, tmp_path):
    work = Workspace(tmp_path, stand_in)
    commands = [(k, t) for k, t in COMMANDS if _skip_reason(t) is None]
    commands = [(k, t) for k, t in commands if _in_main_chain(t) == (chain == "main")]
    if chain == "main":  # the main command first: the others read its run
        commands.sort(key=lambda c: not c[1].startswith("python3 -m venv"))
    try:
        for kind, text in commands:
            if text.startswith("curl ") and shutil.which("curl") is None:
                continue  # the openai client example below covers the same request
            work.run(kind, text)
    finally:
        work.stop_server()
