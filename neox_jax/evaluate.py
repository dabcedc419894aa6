"""Evaluate a model: perplexity and lm-evaluation-harness tasks, from a config.

  python -m neox_jax.evaluate --config=configs/evaluate.py --config.checkpoint=PATH \
      --config.perplexity.text_file=held_out.txt --config.harness.tasks=lambada_openai

Every field of ``configs/evaluate.py`` can be overridden on the command line. The work
is done by ``neox_jax.evaluation.runner.run``, which a notebook can call too; results
are printed as JSON. lm-eval's own CLI with this model is
``neox-lm-eval --model neox_jax --model_args checkpoint=...``.
"""

from neox_jax import cli, config_checks
from neox_jax.evaluation.runner import run


def main(config) -> None:
    """Check the config, then evaluate (``neox_jax.evaluation.runner.run``)."""
    config_checks.evaluate(config)
    run(config)


COMMAND = cli.Command(main, "neox_jax.evaluate", default_config="evaluate.py")

if __name__ == "__main__":
    COMMAND.run()
