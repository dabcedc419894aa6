"""The one error type for mistakes a user can fix.

Library code raises ``UserError`` for bad input (a config field, a path, a file's
contents, a sampling parameter) with a message of one to three lines that names the
file, field or value and says how to fix it. Entry points (``neox_jax/cli.py``) print
such a message without a traceback and exit with code 2; any other exception is an
internal error. ``UserError`` is a ``ValueError`` so that callers which already catch
``ValueError`` keep working.
"""


class UserError(ValueError):
    """Bad input from the user; the message names what is wrong and the fix."""
