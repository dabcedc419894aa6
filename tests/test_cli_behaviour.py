"""What the command-line convention promises beyond single bad flags: every README command
line parses, and what only a real process shows (``python -m``, the debug switch, Ctrl-C),
plus the quiet success, the help text and that every ``python -m`` module is a command."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import bad_inputs
from helpers.bad_inputs import run_command
from helpers.docs import documentation

from neox_jax import cli
from neox_jax import quantize as quantize_cli

REPO = Path(__file__).resolve().parents[1]
art = bad_inputs.art  # the module fixture: tiny artifacts every row points at


# --- the README's commands ----------------------------------------------------------------
def _readme_commands():
    text = documentation()
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


@contextlib.contextmanager
def _ctrl_c_as_in_a_terminal():
    """Ctrl-C raising KeyboardInterrupt, for the block and the processes it starts.

    The suite may itself run with Ctrl-C ignored: a command started in the background
    by a non-interactive shell (``cmd &`` in a script, no job control) inherits SIGINT
    ignored, and so does every process it starts. Our commands then rightly keep it
    ignored (as under ``nohup``), so these tests set it as a terminal has it. A signal
    with a Python handler is reset to the default in a child, which Python then handles.
    """
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def test_ctrl_c_exits_130(art):
    # Interactive sampling waits on stdin: interrupt it there.
    with _ctrl_c_as_in_a_terminal():
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
    # Signal only at the prompt: earlier, the interrupt would land in the imports, before
    # the command's handling (a traceback, as any Python program shows there).
    assert "> " in prompt, f"no prompt in 240 s: {prompt!r}"
    proc.send_signal(signal.SIGINT)
    # communicate() also closes stdin: the interrupt races end of input, and wins, even
    # where Python raised it in a garbage-collection callback that swallowed it.
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err


def test_a_swallowed_ctrl_c_still_ends_the_run_as_interrupted(capsys):
    """Python raises KeyboardInterrupt wherever the main thread is; in a callback that
    swallows it (a gc callback, C++ clearing the error), the run would go on to exit 0."""

    def swallowing(config):
        with contextlib.suppress(KeyboardInterrupt):  # as an "Exception ignored" callback
            signal.raise_signal(signal.SIGINT)  # the handler runs before this returns
        print("the run went on")

    command = cli.Command(swallowing, "neox_jax.demo", default_config="convert.py")
    with _ctrl_c_as_in_a_terminal():
        before = signal.getsignal(signal.SIGINT)
        assert command(["demo"]) == cli.EXIT_INTERRUPTED
        assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    out, err = capsys.readouterr()
    assert "the run went on" in out and err.strip() == "neox_jax.demo: interrupted", err


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


# --- threads for fake CPU devices ---------------------------------------------------------
_FLAG = "--xla_force_host_platform_device_count"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"XLA_FLAGS": f"--xla_cpu_ftz=true {_FLAG}=4"}, max(os.cpu_count() or 1, 16)),
        ({"XLA_FLAGS": f"{_FLAG}=2 {_FLAG}=8"}, max(os.cpu_count() or 1, 32)),  # the last
        ({"XLA_FLAGS": f"{_FLAG}=1"}, None),  # one device: XLA's own sizing is enough
        ({}, None),
        ({"XLA_FLAGS": f"{_FLAG}=4", "PJRT_NPROC": "3"}, 3),  # the user's choice is kept
        ({"XLA_FLAGS": f"{_FLAG}=4", "NPROC": "3"}, None),  # XLA's older knob, also kept
    ],
)
def test_fake_devices_get_four_threads_each(environ, expected):
    environ = dict(environ)
    cli.threads_for_fake_devices(environ)
    assert (None if "PJRT_NPROC" not in environ else int(environ["PJRT_NPROC"])) == expected


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts Linux threads")
def test_pjrt_nproc_sizes_the_installed_jaxlibs_thread_pools():
    # The knob threads_for_fake_devices sets must be the one this jaxlib reads: its CPU
    # client makes two pools (intra-op and dispatch) of max(PJRT_NPROC, devices) threads.
    script = "import os, jax; jax.devices(); print(len(os.listdir('/proc/self/task')))"
    counts = {}
    for nproc in ("1", "24"):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PJRT_NPROC": nproc,
               "XLA_FLAGS": f"{_FLAG}=2"}  # fmt: skip
        r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, timeout=300, check=True)  # fmt: skip
        counts[nproc] = int(r.stdout.split()[-1])
    assert counts["24"] - counts["1"] >= 2 * (24 - 2), counts
