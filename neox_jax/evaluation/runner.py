"""What ``python -m neox_jax.evaluate`` does, as importable functions.

``run(config)`` loads the model once, then computes the perplexity of a text file and/or
an indexed dataset, then runs lm-evaluation-harness tasks through ``NeoxLM``; it
returns (and prints) one JSON-serialisable dict. Task YAML files are parsed up front, so
a file that does not parse is reported with its path and line instead of lm-eval
skipping it silently and then not finding the task.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

import yaml

from neox_jax.evaluation import perplexity as ppl
from neox_jax.evaluation.scoring import LogLikelihoodScorer
from neox_jax.loading import load_from_config
from neox_jax.optional import require

log = logging.getLogger(__name__)


class _TaskYamlLoader(yaml.SafeLoader):
    """Safe YAML plus lm-eval's ``!function module.name`` tag (kept as a string)."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def check_task_files(paths: list[str]) -> None:
    """Parse every task YAML file under ``paths`` (files or folders).

    Raises:
      FileNotFoundError: a path that does not exist.
      ValueError: a file that does not parse, or is not a mapping (names file and line).
    """
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"task path {root} does not exist.")
        files = [root] if root.is_file() else sorted(root.rglob("*.y*ml"))
        for f in files:
            try:
                data = yaml.load(f.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)  # noqa: S506
            except yaml.YAMLError as e:
                raise ValueError(
                    f"task file {f} does not parse as YAML: {' '.join(str(e).split())}"
                ) from None
            if not isinstance(data, dict):
                raise ValueError(f"task file {f} must hold a mapping, got {type(data).__name__}.")


def _split(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def run_harness(lm, harness_config) -> dict[str, Any]:
    """Run lm-eval tasks on an ``lm_eval`` model; returns ``{"results", "versions", ...}``."""
    lm_eval = require("lm_eval", "config.harness.tasks")
    from lm_eval.tasks import TaskManager  # optional: the [eval] extra

    tasks = _split(harness_config.tasks)
    include = _split(harness_config.include_path)
    check_task_files(include + [t for t in tasks if t.endswith((".yaml", ".yml"))])
    manager = TaskManager(
        include_path=include or None, include_defaults=harness_config.include_defaults
    )
    limit = harness_config.limit
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=None if harness_config.num_fewshot < 0 else harness_config.num_fewshot,
            limit=None if not limit else (int(limit) if limit >= 1 else float(limit)),
            bootstrap_iters=harness_config.bootstrap_iters,
            task_manager=manager,
            log_samples=False,
            random_seed=harness_config.seed,
            numpy_random_seed=harness_config.seed,
            torch_random_seed=harness_config.seed,
            fewshot_random_seed=harness_config.seed,
        )
    except KeyError as e:
        raise ValueError(
            f"lm-eval cannot find a task: {e.args[0] if e.args else e}. Check the name, add its "
            "folder with --config.harness.include_path=, or keep include_defaults=True."
        ) from None
    keep = ("results", "versions", "n-shot", "higher_is_better", "n-samples")
    return {k: out[k] for k in keep if k in out}


def run(config, out: TextIO | None = None) -> dict[str, Any]:
    """Run the evaluation described by a ``configs/evaluate.py`` config.

    Returns:
      ``{"model": ..., "perplexity": {...}, "harness": {...}}`` (sections present when asked).

    Raises:
      ValueError / OSError for bad input (the message names the problem and the fix).
    """
    out = out or sys.stdout
    p, h = config.perplexity, config.harness
    if not (p.text_file or p.indexed_dataset or h.tasks):
        raise ValueError(
            "nothing to evaluate: set --config.perplexity.text_file=, "
            "--config.perplexity.indexed_dataset= and/or --config.harness.tasks=."
        )
    if h.tasks:  # fail on a broken task file before loading the model
        check_task_files(_split(h.include_path))
    model_config, params, tokenizer = load_from_config(config)
    scorer = LogLikelihoodScorer(
        model_config, params, batch_size=config.batch_size, max_length=config.max_length or None
    )
    results: dict[str, Any] = {
        "model": {
            "checkpoint": str(config.checkpoint),
            "max_length": scorer.max_length,
            "rope_scaling": model_config.rope_scaling_dict,
        },
    }
    prefix = tokenizer.eos_id if p.prefix_eos else None
    stride = p.stride or None
    if p.text_file or p.indexed_dataset:
        results["perplexity"] = {"stride": stride or scorer.max_length}
    if p.text_file:
        res = ppl.perplexity_of_text_file(
            scorer, tokenizer, p.text_file, stride=stride, prefix_token_id=prefix
        )
        results["perplexity"]["text_file"] = {"path": p.text_file, **res.to_dict()}
    if p.indexed_dataset:
        res = ppl.perplexity_of_indexed_dataset(
            scorer,
            p.indexed_dataset,
            stride=stride,
            prefix_token_id=prefix,
            max_sequences=p.max_sequences,
        )
        results["perplexity"]["indexed_dataset"] = {"path": p.indexed_dataset, **res.to_dict()}
    if h.tasks:
        from neox_jax.evaluation.lm_eval_adapter import (
            NeoxLM,  # optional: imports lm_eval ([eval] extra)
        )

        lm = NeoxLM(
            config=model_config,
            params=scorer.placement.params,
            tokenizer=tokenizer,
            batch_size=config.batch_size,
            max_length=config.max_length or None,
            max_gen_toks=h.max_gen_toks,
        )
        results["harness"] = run_harness(lm, h)
    text = json.dumps(results, indent=2, default=_jsonable)
    if config.output_file:
        Path(config.output_file).write_text(text + "\n", encoding="utf-8")
    out.write(text + "\n")
    out.flush()
    return json.loads(text)


def _jsonable(value):
    try:
        return float(value)  # numpy scalars
    except (TypeError, ValueError):
        return str(value)
