"""The one error type for mistakes a user can fix.

Library code raises ``UserError`` for bad input (a config field, a path, a file's
contents, a sampling parameter) with a message of one to three lines that names the
file, field or value and says how to fix it. Entry points (``neox_jax/cli.py``) print
such a message without a traceback and exit with code 2; any other exception is an
internal error. ``UserError`` is a ``ValueError`` so that callers which already catch
``ValueError`` keep working. ``read_utf8`` and ``load_json`` read a user's file and
turn a missing, non-UTF-8 or unparsable one into such a message naming its path.
"""

import json
import os


class UserError(ValueError):
    """Bad input from the user; the message names what is wrong and the fix."""


def read_utf8(path, what: str = "file") -> str:
    """The text of ``path``; a missing or non-UTF-8 file is a ``UserError`` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError as e:
        raise UserError(f"{what} {os.fspath(path)} does not exist.") from e
    except IsADirectoryError as e:
        raise UserError(f"{what} {os.fspath(path)} is a folder; pass a file.") from e
    except UnicodeDecodeError as e:
        raise UserError(
            f"{what} {os.fspath(path)} is not UTF-8 text (byte {e.start}: {e.reason}); "
            "convert it to UTF-8 first."
        ) from e


def load_json(path, what: str = "JSON file"):
    """The parsed JSON of ``path``; a file that does not parse is a ``UserError`` naming it."""
    try:
        return json.loads(read_utf8(path, what))
    except json.JSONDecodeError as e:
        raise UserError(
            f"{what} {os.fspath(path)} is not valid JSON ({e.msg} at line {e.lineno}, "
            f"column {e.colno}); fix or replace the file."
        ) from e
