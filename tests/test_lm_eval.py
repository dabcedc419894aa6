"""The lm-evaluation-harness model: registration, loglikelihood against the reference,
loglikelihood_rolling against the perplexity path, generate_until, and lm-eval end to end
on local tasks (YAML + jsonl) with nothing downloaded.

Sums of log-probabilities are compared with atol 2e-4 (fp32 versus float64 log_softmax
over a few dozen tokens: ~1e-5 apart; any off-by-one is O(1)).
"""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

# Offline before lm-eval / datasets are imported: a test must never reach the hub.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import lm_eval  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers.evaluation import corpus_lines, hf_token_logprobs, load_config, tiny_model  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model, model_registry  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from neox_jax.evaluation import perplexity_of_text  # noqa: E402
from neox_jax.evaluation.lm_eval_adapter import NeoxLM  # noqa: E402
from neox_jax.evaluation.runner import run  # noqa: E402
from neox_jax.inference import SamplingParams  # noqa: E402

ATOL = 2e-4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm():
    _, _, config, params, tok = tiny_model()
    return NeoxLM(config=config, params=params, tokenizer=tok, batch_size=4, max_gen_toks=8)


def _instances(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_registered_without_hiding_builtin_models():
    assert get_model("neox_jax") is NeoxLM
    assert "hf" in model_registry and "neox_jax" in model_registry


def test_model_args_win_over_generic_cli_arguments():
    path = tiny_model()[0]
    lm = NeoxLM.create_from_arg_string(
        f"checkpoint={path},batch_size=2", {"batch_size": 1, "device": None, "max_batch_size": 4}
    )
    assert lm.batch_size == 2 and lm.eot_token_id == 0
    with pytest.raises(TypeError, match="unknown model_args"):
        NeoxLM.create_from_arg_string(f"checkpoint={path},temprature=1")


def test_loglikelihood_matches_reference(lm):
    ref, tok = tiny_model()[1], tiny_model()[4]
    pairs = [
        ("The river", " ocean"),
        ("alpha beta gamma ", "delta"),
        ("", "kernel matrix"),
        ("question passage answer", " library harbor castle"),
    ]
    results = lm.loglikelihood(_instances("loglikelihood", pairs))
    for (context, continuation), (logprob, greedy) in zip(pairs, results, strict=True):
        if context:  # lm-eval moves the context's trailing space into the continuation
            stripped = context.rstrip()
            whole = tok.encode(stripped + context[len(stripped) :] + continuation)
            n_ctx = len(tok.encode(stripped))
        else:  # an empty context is the EOT token
            whole, n_ctx = [0] + tok.encode(continuation), 1
        expected = hf_token_logprobs(ref, whole)[n_ctx - 1 :].sum()
        assert logprob == pytest.approx(expected, abs=ATOL) and isinstance(greedy, bool)


def test_loglikelihood_rolling_agrees_with_perplexity(lm):
    ref, config, params, tok = tiny_model()[1:]
    texts = [" ".join(corpus_lines(12, seed=1)), "alpha"]
    rolling = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in texts]))
    for text, value in zip(texts, rolling, strict=True):
        ppl = perplexity_of_text(lm.scorer, tok, text, stride=lm.max_length, prefix_token_id=0)
        # Two programs of different shapes sum in different orders (the suite compiles at
        # -O0): fp32 round-off, a few ulps of a sum of log-probs near 9.
        assert value == pytest.approx(-ppl.nll, rel=1e-6)
    # Short texts fit one window: the reference is one forward pass over [EOT] + tokens.
    assert rolling[1] == pytest.approx(
        hf_token_logprobs(ref, [0] + tok.encode("alpha")).sum(), abs=ATOL
    )
    assert len(tok.encode(texts[0])) > lm.max_length  # the long text spans several windows


def test_generate_until(lm):
    requests = [
        ("alpha beta", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}),
        ("river", {"until": "ocean", "max_gen_toks": 6}),
        ("gamma", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}),
    ]
    outputs = lm.generate_until(_instances("generate_until", requests))
    assert len(outputs) == 3 and all(isinstance(o, str) for o in outputs)
    assert "\n" not in outputs[0] and "ocean" not in outputs[1]
    direct = lm.generator.generate(
        [lm.tok_encode("alpha beta")], SamplingParams(max_new_tokens=6, stop_strings=("\n",))
    )[0]
    assert outputs[0] == direct.text
    # Penalties in a task's generation_kwargs reach the sampler (as lm-eval's vllm model
    # passes them), not dropped with a warning.
    penalties = {"presence_penalty": 2.0, "frequency_penalty": 1.5, "repetition_penalty": 1.3}
    kwargs = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}
    (got,) = lm.generate_until(_instances("generate_until", [("gamma", kwargs | penalties)]))
    plain = SamplingParams(max_new_tokens=8, stop_strings=("\n",))
    want, plain = lm.generator.generate(
        [lm.tok_encode("gamma")] * 2, [plain.replace(**penalties), plain]
    )
    assert got == want.text != plain.text  # the penalties did something


def _write_tasks(directory):
    """Three local tasks over jsonl files: multiple choice, generation, rolling loglik."""
    data = directory / "data.jsonl"
    rows = [
        {
            "question": f"{q} is",
            "choices": [" alpha", " river", " kernel"],
            "label": i % 3,
            "answer": "alpha",
            "text": q,
        }
        for i, q in enumerate(corpus_lines(6, seed=9))
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {directory / 'hf_cache'}\ntest_split: test\n"
    )
    (directory / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (directory / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common + "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    (directory / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\n" + common + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )


def test_lm_eval_end_to_end_on_local_tasks(tmp_path):
    _write_tasks(tmp_path)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    path = tiny_model()[0]
    out = lm_eval.simple_evaluate(
        model="neox_jax",
        model_args={"checkpoint": str(path), "batch_size": 4},
        tasks=["tiny_mc", "tiny_gen", "tiny_ppl"],
        task_manager=manager,
        bootstrap_iters=0,
    )
    results = out["results"]
    assert 0.0 <= results["tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["tiny_gen"]["exact_match,none"] <= 1.0
    assert np.isfinite(results["tiny_ppl"]["word_perplexity,none"])
    assert out["n-samples"]["tiny_mc"]["effective"] == 6


def _console_script(name):
    script = Path(sys.executable).parent / name
    if not script.exists():
        pytest.skip(f"{name} is not installed next to {sys.executable} (pip install -e .)")
    return [str(script)]


def _run_cli(program, tmp_path, *args):
    proc = subprocess.run(
        [*program, *args, "--tasks", "tiny_mc", "--include_path", str(tmp_path),
         "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (written,) = list((tmp_path / "out").rglob("results*.json"))
    return json.loads(written.read_text())["results"]["tiny_mc"]["acc,none"]


def test_lm_eval_command_line_matches_simple_evaluate(tmp_path):
    # `neox-lm-eval` (the console script setup.cfg declares) is lm-eval's CLI with the
    # adapter imported first; the accuracy must be what simple_evaluate computes
    # in-process for the same model.
    _write_tasks(tmp_path)
    path = tiny_model()[0]
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    expected = lm_eval.simple_evaluate(
        model="neox_jax",
        model_args={"checkpoint": str(path), "batch_size": 4},
        tasks=["tiny_mc"],
        task_manager=manager,
        bootstrap_iters=0,
    )["results"]["tiny_mc"]["acc,none"]
    args = ("--model", "neox_jax", "--model_args", f"checkpoint={path},batch_size=4")
    assert _run_cli(_console_script("neox-lm-eval"), tmp_path, *args) == expected


def test_module_form_is_the_same_command():
    # `python -m neox_jax.evaluation.lm_eval_cli` runs the console script's main(), so
    # the run above covers what it computes; here, that the module form reaches lm-eval's
    # CLI (its usage) and that the console script names that same function. Each full
    # lm-eval run indexes lm-eval's ~15,000 built-in tasks first (~30 s here).
    entry = re.search(r"neox-lm-eval\s*=\s*(\S+)", (REPO / "setup.cfg").read_text())
    assert entry and entry.group(1) == "neox_jax.evaluation.lm_eval_cli:main"
    proc = subprocess.run(
        [sys.executable, "-m", "neox_jax.evaluation.lm_eval_cli", "run", "--help"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lm-eval run --model" in proc.stdout and "--model_args" in proc.stdout


def test_lm_eval_own_builtin_models_unchanged_by_installing_neox_jax(tmp_path):
    # lm-eval's own console script, nothing imported by hand: its built-in "hf" model runs
    # on the tiny Hugging Face folder (an installed start-up hook that filled lm-eval's
    # registry first used to hide every built-in model). The accuracy is what the
    # in-process "hf" model computes: the same torch code on the same weights.
    _write_tasks(tmp_path)
    path = tiny_model()[0]
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    model_args = f"pretrained={path},dtype=float32"
    expected = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=["tiny_mc"],
        task_manager=manager,
        bootstrap_iters=0,
        device="cpu",
    )["results"]["tiny_mc"]["acc,none"]
    args = ("--model", "hf", "--model_args", model_args, "--device", "cpu")
    assert _run_cli(_console_script("lm_eval"), tmp_path, *args) == expected


def test_python_start_up_imports_nothing_of_neox_jax(tmp_path):
    # Installing neox_jax must not change other programs: no .pth hook importing it.
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; print('neox_jax' in sys.modules)"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stdout + proc.stderr


def test_evaluate_runner_from_config(tmp_path):
    _write_tasks(tmp_path)
    (tmp_path / "held_out.txt").write_text("\n".join(corpus_lines(20, seed=3)))
    config = load_config("evaluate")
    config.checkpoint = str(tiny_model()[0])
    config.batch_size = 4
    config.output_file = str(tmp_path / "results.json")
    config.perplexity.text_file = str(tmp_path / "held_out.txt")
    config.perplexity.stride = 64
    config.harness.update(tasks="tiny_mc", include_path=str(tmp_path), include_defaults=False)
    out = io.StringIO()
    results = run(config, out)
    ppl = results["perplexity"]["text_file"]
    assert (
        ppl["perplexity"] > 1.0
        and ppl["num_tokens"] > 128
        and results["perplexity"]["stride"] == 64
    )
    assert "tiny_mc" in results["harness"]["results"]
    assert (
        json.loads((tmp_path / "results.json").read_text()) == results == json.loads(out.getvalue())
    )


def test_bad_task_files_and_names(tmp_path):
    (tmp_path / "broken.yaml").write_text("task: broken\ndataset_path: json\n  oops: [\n")
    config = load_config("evaluate")
    config.checkpoint = str(tiny_model()[0])
    config.harness.update(tasks="broken", include_path=str(tmp_path), include_defaults=False)
    with pytest.raises(ValueError, match=r"broken.yaml does not parse as YAML.*line 3"):
        run(config, io.StringIO())
    (tmp_path / "broken.yaml").unlink()
    config.harness.tasks = "no_such_task"
    with pytest.raises(ValueError, match="cannot find a task"):
        run(config, io.StringIO())
