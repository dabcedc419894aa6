"""Sample from a model: the command-line entry point.

  python -m neox_jax.sample --config=configs/sample.py --config.checkpoint=PATH \
      --config.prompt="Once upon a time"

Every field of ``configs/sample.py`` can be overridden (``--config.temperature=0``).
The work is done by ``neox_jax.inference.cli.run``, which a notebook can call too.
Bad input (a missing checkpoint, a model/tokenizer mismatch, invalid sampling values,
an unknown config field) prints a short message on stderr and exits with status 2
(see ``neox_jax.cli``).
"""

from neox_jax import cli
from neox_jax.inference.cli import run

COMMAND = cli.Command(run, "neox_jax.sample", default_config="sample.py")

if __name__ == "__main__":
    COMMAND.run()
