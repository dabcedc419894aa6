"""Answer questions with an index built by ``neox_jax.embed``: the command-line entry point.

  python -m neox_jax.rag --config=configs/rag.py --config.checkpoint=PATH \
      --config.index_dir=/tmp/docs_index --config.question="How do I open a file?"

Every field of ``configs/rag.py`` can be overridden; ``--config.question_file=`` takes
one question per line (or JSON lines with "question"). One JSON answer per line goes to
stdout (or ``--config.output_file=``). The work is done by
``neox_jax.retrieval.cli.answer_from_config``, which a notebook can call too.
"""

from neox_jax import cli, config_checks
from neox_jax.retrieval.cli import answer_from_config


def main(config) -> None:
    """Check the config, then answer."""
    config_checks.rag(config, building=False)
    answer_from_config(config)


COMMAND = cli.Command(main, "neox_jax.rag", default_config="rag.py")

if __name__ == "__main__":
    COMMAND.run()
