"""The sampling CLI: ``python -m neox_jax.sample`` and the ``run`` function behind it."""

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.generate import make_model_dir
from helpers.xla import xla_flags

from neox_jax.cli import is_user_error
from neox_jax.convert import load_hf, save_checkpoint
from neox_jax.inference import cli

ROOT = Path(__file__).resolve().parents[1]


def _get_config(arg=None, **overrides):
    spec = importlib.util.spec_from_file_location("sample_config", ROOT / "configs/sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.update(overrides)
    return config


@contextlib.contextmanager
def user_error(match):
    """The block raises what the entry points report as a user error (exit 2, no traceback)."""
    with pytest.raises(Exception, match=match) as info:  # noqa: B017 - the kind is checked below
        yield
    assert is_user_error(info.value), repr(info.value)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "hf"
    make_model_dir(path)
    return path


def _run(config, stdin=""):
    out = io.StringIO()
    cli.run(config, io.StringIO(stdin), out)
    return out.getvalue()


def test_single_prompt_streams_and_matches_batch(hf_dir, tmp_path):
    base = dict(checkpoint=str(hf_dir), max_new_tokens=12, ignore_eos=True, seed=3)
    streamed = _run(_get_config(prompt="naïve café", **base))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "naïve café"}) + "\n" + '{"prompt": "ab"}\n')
    lines = _run(_get_config(prompt_file=str(prompts), **base)).splitlines()
    results = [json.loads(line) for line in lines]
    assert streamed == results[0]["text"] + "\n"
    assert [r["prompt"] for r in results] == ["naïve café", "ab"]
    assert all(r["finish_reason"] == "length" and r["num_tokens"] == 12 for r in results)


def test_prompt_file_text_output_file_and_beam(hf_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("first prompt\n\nsecond\nthird one\n")
    out = tmp_path / "out.jsonl"
    config = _get_config(
        "beam", checkpoint=str(hf_dir), prompt_file=str(prompts), output_file=str(out),
        max_new_tokens=6, batch_size=2,
    )  # fmt: skip
    assert _run(config) == ""
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in results] == ["first prompt", "second", "third one"]


def test_interactive_loop(hf_dir):
    config = _get_config(
        "greedy", checkpoint=str(hf_dir), interactive=True, max_new_tokens=4, echo_prompt=True
    )
    out = _run(config, stdin="hello\nwörld\n\n")
    assert out.count("> ") == 3 and "hello" in out and "wörld" in out


@pytest.mark.parametrize("kind", ["checkpoint", "run_dir"])
def test_loads_our_checkpoints(hf_dir, tmp_path, kind):
    config, params = load_hf(hf_dir)
    path = tmp_path / "ckpt" if kind == "checkpoint" else tmp_path / "run/checkpoints/100"
    save_checkpoint(config, params, path, tokenizer_dir=hf_dir)
    model = tmp_path / "ckpt" if kind == "checkpoint" else tmp_path / "run"
    args = dict(prompt="ab", max_new_tokens=5, temperature=0.0, top_p=1.0, ignore_eos=True)
    assert _run(_get_config(checkpoint=str(model), **args)) == _run(
        _get_config(checkpoint=str(hf_dir), **args)
    )


def test_bad_inputs_raise_user_errors(hf_dir, tmp_path):
    ok = dict(checkpoint=str(hf_dir), prompt="x")
    cases = [
        (dict(checkpoint=str(tmp_path / "missing"), prompt="x"), "does not exist"),
        (dict(checkpoint="", prompt="x"), "checkpoint"),
        (dict(ok, top_p=0.0), "top_p"),
        (dict(ok, temperature=-1.0), "temperature"),
        (dict(ok, max_new_tokens=10_000), "context"),
        (dict(ok, early_stopping="maybe"), "early_stopping"),
        (dict(ok, interactive=True), "exactly one"),
        (dict(checkpoint=str(hf_dir), prompt_file=str(tmp_path / "none.txt")), "prompt_file"),
        (dict(ok, tokenizer=str(tmp_path / "no_tok")), "tokenizer"),
    ]
    for overrides, match in cases:
        with user_error(match):
            _run(_get_config(**overrides))
    # A checkpoint whose config does not match its weights.
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    hf_config = json.loads((broken / "config.json").read_text())
    hf_config["intermediate_size"] += 8
    (broken / "config.json").write_text(json.dumps(hf_config))
    with user_error("intermediate|shape"):
        _run(_get_config(checkpoint=str(broken), prompt="x"))


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "neox_jax.sample", "--config=configs/sample.py", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_entry_point(hf_dir, tmp_path):
    ok = _cli(f"--config.checkpoint={hf_dir}", "--config.prompt=ab", "--config.max_new_tokens=4")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.endswith("\n")
    for args in (
        [f"--config.checkpoint={tmp_path / 'missing'}", "--config.prompt=x"],
        [f"--config.checkpoint={hf_dir}", "--config.prompt=x", "--config.topp=0.5"],
    ):
        bad = _cli(*args)
        assert bad.returncode == 2
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("neox_jax.sample: error:"), bad.stderr


def test_chat_mode_formats_turns_and_keeps_the_conversation(hf_dir, monkeypatch):
    from neox_jax.data.tokenizer import load_tokenizer
    from neox_jax.finetune.chat import format_chat
    from neox_jax.loading import find_tokenizer

    tok = load_tokenizer(find_tokenizer(hf_dir))
    args = dict(checkpoint=str(hf_dir), max_new_tokens=5, ignore_eos=True)
    user = [{"role": "user", "content": "hi"}]
    chat = _run(_get_config("greedy", prompt="hi", chat=True, **args))
    manual = _run(_get_config("greedy", prompt=format_chat(user, tok), **args))
    assert chat == manual

    seen = []
    stream = cli.Generator.stream

    def recording(self, prompt, sampling=None):
        seen.append(prompt)
        return (yield from stream(self, prompt, sampling))

    monkeypatch.setattr(cli.Generator, "stream", recording)
    out = _run(_get_config("greedy", interactive=True, chat=True, **args), stdin="hi\nmore\n\n")
    first_reply = out.split("> ")[1].rstrip("\n")
    history = [*user, {"role": "assistant", "content": first_reply}]
    assert seen == [
        format_chat(user, tok),
        format_chat([*history, {"role": "user", "content": "more"}], tok),
    ]
    with user_error("template"):
        _run(_get_config("greedy", prompt="hi", chat=True, chat_template="{% if %}", **args))


def test_chat_mode_with_a_tools_file(hf_dir, tmp_path, monkeypatch):
    """The tools are rendered into the prompt and calls in the reply are parsed, printed,
    answered by the tool's result read from stdin, and the model is prompted again. A
    random model never writes a call (and the tools prompt exceeds its 128 positions), so
    the model's stream is replaced by scripted replies that record their prompts; the
    rest is the CLI's own code, checked against ``format_chat`` of the expected turns."""
    from helpers.tool_templates import QWEN, TOOLS

    from neox_jax.data.tokenizer import load_tokenizer
    from neox_jax.finetune.chat import format_chat
    from neox_jax.loading import find_tokenizer

    tok = load_tokenizer(find_tokenizer(hf_dir))
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps({"tools": TOOLS}))
    args = dict(checkpoint=str(hf_dir), max_new_tokens=5, chat=True, chat_template=QWEN,
                tools_file=str(tools_file))  # fmt: skip
    user = [{"role": "user", "content": "hi"}]
    manual = format_chat(user, tok, QWEN, tools=TOOLS)
    assert "get_weather" in manual
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    replies, seen = [call, call, "It is 3 C."], []

    def scripted(self, prompt, sampling=None):
        seen.append(prompt)
        yield replies.pop(0)

    monkeypatch.setattr(cli.Generator, "stream", scripted)
    single = _run(_get_config("greedy", prompt="hi", **args)).splitlines()
    assert single[0] == call.splitlines()[0] and seen == [manual]
    printed = json.loads(single[-1])["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in printed] == [
        ("get_weather", {"city": "Oslo"})
    ]
    out = _run(_get_config("greedy", interactive=True, **args), stdin='hi\n{"temp": 3}\n\n')
    printed = json.loads(out.splitlines()[3])["tool_calls"]
    assert "tool get_weather> " in out and "It is 3 C." in out
    fn = {"name": "get_weather", "arguments": {"city": "Oslo"}}
    history = [
        *user,
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": printed[0]["id"], "type": "function", "function": fn}]},
        {"role": "tool", "tool_call_id": printed[0]["id"], "name": "get_weather",
         "content": '{"temp": 3}'},
    ]  # fmt: skip
    assert seen == [manual, manual, format_chat(history, tok, QWEN, tools=TOOLS)]

    with user_error("needs --config.chat=True"):
        _run(_get_config("greedy", prompt="hi", **{**args, "chat": False}))
    with user_error("no tool-call format"):
        _run(_get_config("greedy", prompt="hi", **{**args, "chat_template": ""}))
    tools_file.write_text("[1, 2]")
    with user_error("must hold a list of tool schemas"):
        _run(_get_config("greedy", prompt="hi", **args))


def test_tensor_and_pipeline_parallel_cli_equals_one_device(hf_dir):
    env = {**os.environ, "XLA_FLAGS": xla_flags(4)}
    args = [f"--config.checkpoint={hf_dir}", "--config.prompt=ab", "--config.max_new_tokens=6"]
    outs = [
        subprocess.run(
            [
                sys.executable,
                "-m",
                "neox_jax.sample",
                "--config=configs/sample.py:greedy",
                *args,
                *extra,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )  # fmt: skip
        for extra in ([], ["--config.tensor_parallel=2", "--config.pipeline_stages=2"])
    ]
    for r in outs:
        assert r.returncode == 0, r.stderr
    assert outs[0].stdout == outs[1].stdout
    with user_error("needs 8 devices"):
        _run(_get_config(checkpoint=str(hf_dir), prompt="x", tensor_parallel=8))


def test_samples_from_a_quantized_checkpoint(hf_dir, tmp_path):
    # python -m neox_jax.quantize output is a checkpoint the CLI (via load_model) takes.
    from neox_jax.data.tokenizer import load_tokenizer
    from neox_jax.inference import Generator, SamplingParams
    from neox_jax.loading import load_model
    from neox_jax.quant import QuantConfig, load_quantized, quantize_params, save_quantized

    config, params = load_hf(hf_dir)
    qconfig = QuantConfig(bits=8)
    save_quantized(
        config, qconfig, quantize_params(config, params, qconfig), tmp_path / "q",
        tokenizer_dir=hf_dir,
    )  # fmt: skip
    loaded_config, loaded = load_model(tmp_path / "q")
    assert loaded_config == config
    _, _, direct = load_quantized(tmp_path / "q")
    gen = Generator(config, direct, load_tokenizer(hf_dir))
    expected = gen.generate(["ab"], SamplingParams(max_new_tokens=5, ignore_eos=True))[0].text
    out = _run(_get_config("greedy", checkpoint=str(tmp_path / "q"), prompt="ab",
                           max_new_tokens=5, ignore_eos=True))  # fmt: skip
    assert out == expected + "\n"
