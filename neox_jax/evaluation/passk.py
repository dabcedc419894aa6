"""Code completion: stop sequences for code, and a small pass@k harness.

A ``Problem`` is a HumanEval-style item: a ``prompt`` (signature and docstring) that the
model continues, a ``test`` defining ``check(candidate)``, and the ``entry_point`` name.
Each completion runs as ``prompt + completion + test + check(entry_point)`` in the
sandbox (``neox_jax.evaluation.sandbox``: a separate process with a timeout, resource
limits, no network and writes confined to a temporary directory). A hang, a crash or a
refused write fails that sample; the harness carries on.

pass@k is the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models
Trained on Code", section 2.1): with ``n`` samples of which ``c`` pass,
``pass@k = 1 - C(n - c, k) / C(n, k)``, computed as a product to avoid huge binomials.

    from neox_jax.evaluation import passk
    completions = passk.generate_completions(generator, passk.PROBLEMS, n=10, temperature=0.8)
    report = passk.evaluate(passk.PROBLEMS, completions, ks=(1, 5, 10))
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from neox_jax.errors import read_utf8
from neox_jax.evaluation.code_problems import PROBLEMS, Problem
from neox_jax.evaluation.sandbox import ExecResult, run_program
from neox_jax.inference import SamplingParams

# Where a function body ends in top-level Python: the next top-level statement. Each
# starts at column 0 right after a newline, so indented code never matches.
CODE_STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\n#", "\nprint(", "\n```")

__all__ = [
    "CODE_STOP_SEQUENCES",
    "PROBLEMS",
    "PassKReport",
    "Problem",
    "evaluate",
    "generate_completions",
    "load_problems",
    "pass_at_k",
    "run_completion",
]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples with ``c`` correct.

    ``1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i)``; the product form
    never forms the binomials, which overflow floats for n in the hundreds.

    Raises:
      ValueError: unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}.")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def load_problems(path: str | os.PathLike) -> list[Problem]:
    """Problems from JSON lines with ``task_id``, ``prompt``, ``test``, ``entry_point``."""
    path = Path(path)
    problems = []
    for n, line in enumerate(read_utf8(path, "problems file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problems.append(Problem(**{f.name: record[f.name] for f in _REQUIRED}))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            names = [f.name for f in _REQUIRED]
            raise ValueError(f"{path}:{n}: expected a JSON object with {names} ({e}).") from None
    if not problems:
        raise ValueError(f"{path} holds no problems.")
    return problems


_REQUIRED = [f for f in dataclasses.fields(Problem) if f.name != "canonical_solution"]


def program_for(problem: Problem, completion: str) -> str:
    """The source that tests one completion."""
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def run_completion(
    problem: Problem, completion: str, *, timeout: float = 5.0, memory_mb: int = 1024
) -> ExecResult:
    """Run one completion against its problem's tests in the sandbox."""
    return run_program(program_for(problem, completion), timeout=timeout, memory_mb=memory_mb)


@dataclasses.dataclass(frozen=True)
class PassKReport:
    """Results of a pass@k run.

    Attributes:
      pass_at_k: ``{k: mean over problems}`` for every k with ``k <= n`` on all problems.
      per_problem: ``{task_id: {"n", "c", "statuses"}}``.
    """

    pass_at_k: dict[int, float]
    per_problem: dict[str, dict]

    def to_dict(self) -> dict:
        return {
            "pass_at_k": {f"pass@{k}": v for k, v in self.pass_at_k.items()},
            "per_problem": self.per_problem,
        }


def evaluate(
    problems: Sequence[Problem],
    completions: Mapping[str, Sequence[str]],
    *,
    ks: Sequence[int] = (1, 10, 100),
    timeout: float = 5.0,
    memory_mb: int = 1024,
    workers: int = 2,
) -> PassKReport:
    """Run every completion and estimate pass@k.

    Args:
      problems: the problems.
      completions: ``{task_id: [completion, ...]}``; every problem needs at least one.
      ks: the k values; those above the smallest sample count are left out.
      timeout, memory_mb: per-run sandbox limits.
      workers: runs in parallel (each is one child process).

    Returns:
      A ``PassKReport``.
    """
    missing = [p.task_id for p in problems if not completions.get(p.task_id)]
    if missing:
        raise ValueError(f"no completions for {missing}; give each problem at least one.")
    jobs = [(p, i, c) for p in problems for i, c in enumerate(completions[p.task_id])]
    results: dict[str, list[ExecResult | None]] = {
        p.task_id: [None] * len(completions[p.task_id]) for p in problems
    }
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {
            pool.submit(run_completion, p, c, timeout=timeout, memory_mb=memory_mb): (p, i)
            for p, i, c in jobs
        }
        for future in concurrent.futures.as_completed(futures):
            p, i = futures[future]
            results[p.task_id][i] = future.result()
    per_problem = {}
    for task_id, runs in results.items():
        per_problem[task_id] = {
            "n": len(runs),
            "c": sum(r.passed for r in runs),
            "statuses": [r.status for r in runs],
            "details": [r.detail for r in runs],
        }
    n_min = min(v["n"] for v in per_problem.values())
    scores = {
        k: float(np.mean([pass_at_k(v["n"], v["c"], k) for v in per_problem.values()]))
        for k in sorted(set(ks))
        if 1 <= k <= n_min
    }
    return PassKReport(scores, per_problem)


def generate_completions(
    generator,
    problems: Sequence[Problem],
    *,
    n: int = 1,
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_new_tokens: int = 128,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Sample ``n`` completions per problem, cut at ``CODE_STOP_SEQUENCES``.

    Args:
      generator: a ``neox_jax.inference.Generator`` with a tokenizer.
      problems: the problems; each prompt is continued.
      n: samples per problem (``n > 1`` needs ``temperature > 0`` to differ).
      temperature, top_p, max_new_tokens: sampling settings.
      seed: sample ``i`` of every problem uses ``seed + i``.

    Returns:
      ``{task_id: [completion, ...]}``.
    """
    prompts, params = [], []
    for p in problems:
        for i in range(n):
            prompts.append(p.prompt)
            params.append(
                SamplingParams(
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p if temperature > 0 else 1.0,
                    seed=seed + i,
                    stop_strings=CODE_STOP_SEQUENCES,
                )
            )
    texts = [r.text for r in generator.generate(prompts, params)]
    return {p.task_id: texts[j * n : (j + 1) * n] for j, p in enumerate(problems)}
