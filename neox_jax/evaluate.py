"""Evaluate a model: perplexity and lm-evaluation-harness tasks, from a config.

  python -m neox_jax.evaluate --config=configs/evaluate.py --config.checkpoint=PATH \
      --config.perplexity.text_file=held_out.txt --config.harness.tasks=lambada_openai

Every field of ``configs/evaluate.py`` can be overridden on the command line. The work
is done by ``neox_jax.evaluation.runner.run``, which a notebook can call too; results
are printed as JSON. lm-eval's own CLI with this model is
``neox-lm-eval --model neox_jax --model_args checkpoint=...``.
"""

from neox_jax.evaluation.runner import run
from neox_jax.retrieval.cli import run_app

if __name__ == "__main__":
    run_app(run, "neox_jax.evaluate", "configs/evaluate.py")
