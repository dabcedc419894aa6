"""Sample from a model: the command-line entry point.

  python -m neox_jax.sample --config=configs/sample.py --config.checkpoint=PATH \
      --config.prompt="Once upon a time"

Every field of ``configs/sample.py`` can be overridden (``--config.temperature=0``).
The work is done by ``neox_jax.inference.cli.run``, which a notebook can call too.
Bad input (a missing checkpoint, a model/tokenizer mismatch, invalid sampling values,
an unknown config field) prints one line on stderr and exits with status 1.
"""

import ast
import contextlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from neox_jax.inference.cli import UserError, one_line, run

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Sampling config file (configs/sample.py).", lock_config=True
)


def _fail(message: str) -> None:
    print(f"neox_jax.sample: error: {message}", file=sys.stderr)
    sys.exit(1)


def _parse_flags(argv):
    # A locked config rejects unknown fields with a KeyError/AttributeError raised from
    # inside flag parsing; absl would print a traceback, we print one line.
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(one_line(e))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        message = str(e.args[0]) if e.args else str(e)
        with contextlib.suppress(ValueError, SyntaxError):  # a KeyError's repr, nested
            message = str(ast.literal_eval(message))
        _fail(f"bad --config override: unknown or invalid field {one_line(message)}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep stderr for errors, stdout for text
    try:
        config = _CONFIG.value
        if config is None:
            _fail("pass --config=configs/sample.py")
        run(config)
    except UserError as e:
        _fail(one_line(e))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
