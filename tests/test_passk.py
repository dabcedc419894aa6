"""pass@k: the unbiased estimator, the sandbox (timeouts, refused writes, no network),
the harness surviving bad completions, the problems, and code stop sequences."""

import json
import math
import time
from fractions import Fraction

import pytest
from helpers.evaluation import tiny_model

from neox_jax.evaluation import passk
from neox_jax.evaluation.sandbox import run_program
from neox_jax.inference import Generator


def test_estimator_equals_closed_form():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert passk.pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)
    # Large n: the binomials overflow a float (C(1000, 500) ~ 1e299 * 1e1), the product does not.
    exact = 1 - Fraction(math.comb(1000 - 37, 500), math.comb(1000, 500))
    assert passk.pass_at_k(1000, 37, 500) == pytest.approx(float(exact), rel=1e-9)
    assert passk.pass_at_k(10, 0, 3) == 0.0 and passk.pass_at_k(10, 8, 3) == 1.0
    for bad in ((5, 6, 1), (5, 2, 0), (5, 2, 6)):
        with pytest.raises(ValueError, match="pass@k needs"):
            passk.pass_at_k(*bad)


def test_reference_solutions_pass_and_wrong_ones_fail():
    problems = passk.PROBLEMS
    assert len(problems) == 5
    completions = {p.task_id: [p.canonical_solution, "    return None\n"] for p in problems}
    report = passk.evaluate(problems, completions, ks=(1, 2, 5), timeout=10)
    assert report.pass_at_k == {1: 0.5, 2: 1.0}  # k=5 > n=2 is left out
    for row in report.per_problem.values():
        assert row["statuses"] == ["passed", "failed"]


def test_sandbox_kills_a_runaway_and_the_harness_survives(tmp_path):
    outside = tmp_path / "outside.txt"  # not under the sandbox's temporary directory
    problem = passk.PROBLEMS[2]  # running_sum
    completions = {
        problem.task_id: [
            "    while True:\n        pass\n",  # hangs
            f"    open({str(outside)!r}, 'w').write('x')\n    return []\n",  # writes outside
            f"    try:\n        open({str(outside)!r}, 'a')\n    except PermissionError:\n"
            "        pass\n" + problem.canonical_solution,  # catches the refusal: still flagged
            "    import socket\n    socket.create_connection(('10.255.255.1', 80), timeout=1)\n",
            "    import sys\n    sys.exit(0)\n",  # leaves early with status 0: not a pass
            problem.canonical_solution,
        ]
    }
    start = time.monotonic()
    report = passk.evaluate([problem], completions, ks=(1,), timeout=2.0)
    statuses = report.per_problem[problem.task_id]["statuses"]
    assert statuses == [
        "timeout",
        "sandbox_violation",
        "sandbox_violation",
        "sandbox_violation",
        "failed",
        "passed",
    ]
    assert not outside.exists()
    details = report.per_problem[problem.task_id]["details"]
    assert "killed after 2 s" in details[0] and str(outside) in details[1]
    assert report.pass_at_k[1] == pytest.approx(1 / 6)
    # Two workers, one 2 s timeout: the hang does not hold the others up for long.
    assert time.monotonic() - start < 60


def test_sandbox_limits_and_cleanup():
    assert run_program("x = bytearray(4 << 30)", memory_mb=512).status == "failed"  # no 4 GiB
    result = run_program("import os\nos.system('true')")
    assert result.status == "sandbox_violation" and "os.system" in result.detail
    inside = run_program("open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read()")
    assert inside.passed


def test_load_problems(tmp_path):
    p = passk.PROBLEMS[0]
    path = tmp_path / "problems.jsonl"
    fields = {
        "task_id": p.task_id,
        "prompt": p.prompt,
        "test": p.test,
        "entry_point": p.entry_point,
    }
    path.write_text(json.dumps(fields) + "\n")
    assert passk.load_problems(path)[0] == passk.Problem(**fields)
    path.write_text('{"task_id": "x"}\n')
    with pytest.raises(ValueError, match="problems.jsonl:1"):
        passk.load_problems(path)
    with pytest.raises(ValueError, match="no completions"):
        passk.evaluate([p], {})


def test_generated_completions_stop_at_code_boundaries():
    _, _, config, params, tok = tiny_model()
    # The test tokenizer spells code byte by byte (~190 tokens a prompt) and the tiny model
    # has 128 positions: RoPE scaling gives it room.
    scaled = config.replace(rope_scaling={"type": "linear", "factor": 4.0})
    generator = Generator(scaled, params, tok)
    problems = passk.PROBLEMS[:2]
    completions = passk.generate_completions(
        generator, problems, n=2, temperature=1.0, max_new_tokens=24, seed=0
    )
    assert set(completions) == {p.task_id for p in problems}
    for texts in completions.values():
        assert len(texts) == 2
        for text in texts:  # cut before any top-level statement
            assert not any(stop in text for stop in passk.CODE_STOP_SEQUENCES)
    # A random model's code fails (or is cut short); the harness still reports.
    report = passk.evaluate(problems, completions, ks=(1, 2), timeout=5)
    assert set(report.pass_at_k) == {1, 2}
