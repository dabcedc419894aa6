"""The one command-line convention of every ``python -m neox_jax.<tool>`` entry point.

An entry point is a function of its config, wrapped in a ``Command``:

    def quantize(config) -> None: ...                # importable, a notebook can call it

    COMMAND = cli.Command(quantize, "neox_jax.quantize", default_config="quantize.py")
    if __name__ == "__main__":
        COMMAND.run()

Flags are absl flags with an ml_collections config file (``--config=configs/X.py[:arg]``;
every field overridable as ``--config.a.b=v``; the config is locked, so a typo fails).
How it ends, for every tool:

* success: exit 0;
* a mistake the user can fix (``neox_jax.errors.UserError``, a ``ValueError`` raised by
  neox_jax's own checks, a missing/unwritable file, an unknown config field, a missing
  config file, a bad override value): ``<prog>: error: <message>`` on stderr, exit 2;
* Ctrl-C: ``<prog>: interrupted``, exit 130;
* anything else is a bug: a one-line summary, then the traceback, exit 1.

``--debug`` (or ``NEOX_JAX_DEBUG=1``) adds the traceback to user errors too. Logging is
at WARNING (orbax logs every save at INFO) unless ``--verbosity=0`` asks for INFO.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import importlib.util
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from absl import flags, logging
from ml_collections import config_flags

from neox_jax.errors import UserError
from neox_jax.tpu_probe import quiet_tpu_probe

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_INTERNAL_ERROR = 1
# The repository's configs/ folder (a source checkout or an editable install).
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# OSError kinds that mean "the path you gave is wrong", not "the program is wrong".
_USER_ERRNOS = {
    errno.ENOENT, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR,
    errno.ENOSPC, errno.EROFS, errno.ENOTEMPTY, errno.EDQUOT,
}  # fmt: skip


def debug_requested(argv: Sequence[str] = ()) -> bool:
    """``--debug`` on the command line or ``NEOX_JAX_DEBUG=1`` in the environment."""
    return "--debug" in argv or os.environ.get("NEOX_JAX_DEBUG", "") not in ("", "0")


def one_line(error: BaseException | str) -> str:
    """An exception message collapsed onto a single line."""
    text = " ".join(str(error).split())
    return text or (type(error).__name__ if isinstance(error, BaseException) else "")


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is a mistake the user can fix (see the module docstring)."""
    if isinstance(error, UserError | flags.Error):
        return True
    if isinstance(error, OSError):
        return error.errno in _USER_ERRNOS or isinstance(error, FileNotFoundError)
    # A ValueError raised by neox_jax's own checks is a validation message; one raised
    # inside jax/numpy/json (a shape clash deep in a computation) is a bug.
    return isinstance(error, ValueError) and not _foreign(error)


def _foreign(error: BaseException) -> bool:
    """Whether the innermost frame that raised ``error`` is outside neox_jax."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return "neox_jax" not in Path(tb.tb_frame.f_code.co_filename).parts


def user_message(error: BaseException) -> str:
    """What to print for a user error: its message, an OSError's path and reason."""
    if isinstance(error, OSError) and not isinstance(error, UserError) and error.filename:
        reason = error.strerror or one_line(error)
        hint = {
            errno.ENOSPC: " (the disk is full; free space or pick another destination)",
            errno.EROFS: " (read-only file system; pick another destination)",
            errno.EACCES: " (no permission; pick a destination you can write)",
        }.get(error.errno, "")
        return f"{error.filename}: {reason}{hint}"
    return str(error).strip() or type(error).__name__


def _fail(prog: str, message: str) -> int:
    lines = [line for line in str(message).strip().splitlines() if line.strip()] or ["?"]
    print(f"{prog}: error: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(f"  {line.strip()}", file=sys.stderr)
    return EXIT_USER_ERROR


def default_config_path(name: str | None) -> str | None:
    """``configs/<name>`` of this checkout, when it exists (else the flag is required)."""
    if not name:
        return None
    path = CONFIGS / name
    return str(path) if path.is_file() else None


def translate_legacy(argv: Sequence[str], legacy: Mapping[str, str]) -> list[str]:
    """Rewrite old plain flags (``--src=X``, ``--nosymmetric``) to ``--config.<field>``.

    ``legacy`` maps an old flag name to its config field. ``--name=v``, ``--name v`` and
    the boolean forms ``--name`` / ``--noname`` are all understood.
    """
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        name, eq, value = arg.lstrip("-").partition("=")
        if not arg.startswith("--") or arg == "--":
            out.append(arg)
            continue
        if name in legacy:
            if not eq and i < len(args) and not args[i].startswith("--"):
                value, eq = args[i], "="
                i += 1
            out.append(f"--config.{legacy[name]}={value if eq else True}")
        elif not eq and name.startswith("no") and name[2:] in legacy:
            out.append(f"--config.{legacy[name[2:]]}=False")
        else:
            out.append(arg)
    return out


def _config_fields(config) -> list[str]:
    if config is None:
        return []
    flat = config.to_dict() if hasattr(config, "to_dict") else {}

    def walk(d, prefix=""):
        for k, v in d.items():
            yield f"{prefix}{k}"
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")

    return list(walk(flat))


def _parse_error(error: Exception, argv: Sequence[str], config, config_help: str) -> str:
    """The message for a flag/config parsing failure: name the flag, field or file."""
    text = str(error)
    if isinstance(error, OSError) and "config file" in text:
        missing = [line.strip() for line in text.splitlines() if line.strip()]
        path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "?")
        return (
            f"cannot load config file {path.split(':')[0]!r} ({missing[-1]}); "
            f"pass an existing file, e.g. --config={config_help}"
        )
    if isinstance(error, AttributeError | KeyError) or "Unknown command line flag 'config." in text:
        fields = _config_fields(config)
        for arg in argv:
            if arg.startswith("--config.") and "=" in arg:
                key = arg[len("--config.") : arg.index("=")]
                if fields and key not in fields:
                    close = difflib.get_close_matches(key, fields, n=1)
                    hint = f"; did you mean --config.{close[0]}?" if close else ""
                    return f"unknown config field --config.{key}{hint}"
        return f"unknown config field ({one_line(text)})"
    if isinstance(error, flags.UnrecognizedFlagError):  # a plain --field: hint --config.field
        fields = _config_fields(config)
        close = difflib.get_close_matches(error.flagname, fields, n=1)
        hint = f"; did you mean --config.{close[0]}=...?" if close else ""
        return f"unknown flag --{error.flagname}{hint}"
    if "Error whilst parsing config file" in text:  # get_config raised: keep its last line
        last = [line for line in text.splitlines() if line.strip()][-1]
        return f"bad --config: {last.strip()}"
    return one_line(text)


class CommandLineError(UserError):
    """A command line that cannot be parsed (message names the flag, field or file)."""


@dataclasses.dataclass(frozen=True)
class Parsed:
    """A parsed command line: the config, the extra flags' values and the switches."""

    config: Any
    extras: dict[str, Any]
    verbosity: int = -1
    help_text: str | None = None  # set when --help was asked for


def parse(
    argv: Sequence[str],
    *,
    prog: str,
    default_config: str | None = None,
    extra_flags: Mapping[str, tuple[str | None, str]] | None = None,
    required: Sequence[str] = (),
    legacy: Mapping[str, str] | None = None,
    expand: Callable[[list[str]], list[str]] | None = None,
) -> Parsed:
    """Parse a command line (program name first) without running anything.

    Raises:
      CommandLineError: an unknown flag or config field, a config file that does not
        load, a bad override value, a missing required flag or a stray argument.
    """
    quiet_tpu_probe()  # no libtpu warnings on machines without a TPU (neox_jax/tpu_probe.py)
    argv = [argv[0], *translate_legacy(argv[1:], legacy or {})]
    if expand is not None:  # flags that stand for config overrides (--neox_config=...)
        try:
            argv = [argv[0], *expand(argv[1:])]
        except UserError as e:
            raise CommandLineError(str(e)) from e
    config_help = f"configs/{default_config}" if default_config else "configs/<name>.py"
    fv = flags.FlagValues()
    try:  # the config file is loaded (and overridden) while flags are defined and parsed
        holder = config_flags.DEFINE_config_file(
            "config", default_config_path(default_config), f"Config file ({config_help}).",
            flag_values=fv, lock_config=True, sys_argv=argv,
        )  # fmt: skip
        flags.DEFINE_bool("debug", False, "Show tracebacks for user errors.", flag_values=fv)
        flags.DEFINE_integer("verbosity", -1, "-1 WARNING, 0 INFO, 1 DEBUG.", flag_values=fv)
        flags.DEFINE_bool("help", False, "Show this help.", flag_values=fv, short_name="h")
        for name, (default, help_text) in (extra_flags or {}).items():
            flags.DEFINE_string(name, default, help_text, flag_values=fv)
        rest = fv(argv)
        config = holder.value
        if config is not None:
            config.keys()  # a config file that failed to load raises only when touched
    except Exception as e:  # noqa: BLE001 - every parsing failure is the user's
        config = _config_for_message(argv, default_config)
        raise CommandLineError(_parse_error(e, argv, config, config_help)) from e
    if fv.help:
        usage = f"usage: python -m {prog} --config={config_help} [--config.FIELD=VALUE ...]"
        fields = f"\n\nconfig fields and their values:\n{config}" if config is not None else ""
        return Parsed(None, {}, help_text=f"{usage}\n\n{fv.get_help()}{fields}")
    if len(rest) > 1:
        raise CommandLineError(
            f"unexpected arguments: {' '.join(rest[1:])} (flags look like --x=y)"
        )
    missing = [f"--{name}" for name in required if not fv[name].value]
    if config is None:
        missing.insert(0, f"--config={config_help}")
    if missing:
        raise CommandLineError(f"missing {', '.join(missing)}")
    extras = {name: fv[name].value for name in extra_flags or {}}
    return Parsed(config, extras, fv.verbosity)


def main(fn: Callable[..., Any], argv: Sequence[str], *, prog: str, **options) -> int:
    """Parse ``argv``, run ``fn(config, **extra_flags)``; returns the exit status.

    Args:
      fn: the entry point's function; gets the config and the extra string flags.
      argv: the command line, program name first.
      prog: the name used in messages (``neox_jax.quantize``).
      **options: ``parse``'s: ``default_config`` (a file under ``configs/`` used when
        ``--config`` is absent), ``extra_flags`` (other string flags, ``name -> (default,
        help)``), ``required`` (extra flags that must be given), ``legacy`` (old flag
        name -> config field, for spellings the README once documented), ``expand``
        (rewrites the flags into ``--config`` ones before parsing; the user's own
        ``--config.x=y`` stay after, so they apply on top).
    """
    debug = debug_requested(argv)
    try:
        parsed = parse(argv, prog=prog, **options)
    except CommandLineError as e:
        if debug:
            traceback.print_exc()
        return _fail(prog, str(e))
    if parsed.help_text is not None:
        print(parsed.help_text)
        return 0
    logging.set_verbosity(parsed.verbosity)
    return _call(fn, parsed.config, parsed.extras, prog, debug)


def _config_for_message(argv: Sequence[str], default_config: str | None):
    """The config named on the command line, without overrides (None if it won't load)."""
    spec_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    spec_arg = spec_arg or default_config_path(default_config)
    if not spec_arg:
        return None
    path, _, arg = spec_arg.partition(":")
    with contextlib.suppress(Exception):
        spec = importlib.util.spec_from_file_location("_neox_jax_cli_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(arg or None)
    return None


@contextlib.contextmanager
def _remembered_ctrl_c():
    """Yield a list that gets an entry for each Ctrl-C during the block.

    Python raises ``KeyboardInterrupt`` wherever the main thread is when the signal
    lands. Where that is a garbage-collection callback (JAX registers one) or C++ that
    clears errors, the exception is swallowed and the run goes on: an interactive
    session then ends at end of input with exit 0, as if never interrupted. Remembering
    the signal lets the run end as interrupted anyway, and a swallowed interrupt's
    "Exception ignored" report is not shown (the "interrupted" line says it all). Only
    in the main thread, and only where Ctrl-C is not ignored (``nohup``)."""
    seen: list[int] = []

    def on_sigint(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    def unraisable(report, previous=sys.unraisablehook):
        if not (report.exc_type and issubclass(report.exc_type, KeyboardInterrupt) and seen):
            previous(report)

    try:
        old = signal.getsignal(signal.SIGINT)
        if old is signal.SIG_IGN or old is None:
            yield seen
            return
        signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        yield seen
        return
    old_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, old)
        sys.unraisablehook = old_hook


def _call(fn, config, extras, prog: str, debug: bool) -> int:
    with _remembered_ctrl_c() as ctrl_c:
        try:
            fn(config, **extras)
            if ctrl_c:
                raise KeyboardInterrupt  # it was swallowed where it landed; the run went on
        except KeyboardInterrupt:
            return _interrupted(prog)
        except Exception as e:  # noqa: BLE001 - the one place that decides how a run ends
            if ctrl_c:  # a library turned the interrupt into an error of its own
                return _interrupted(prog)
            if is_user_error(e):
                if debug:
                    traceback.print_exc()
                return _fail(prog, user_message(e))
            print(
                f"{prog}: internal error: {type(e).__name__}: {one_line(e)[:300]} "
                "(a bug; the traceback follows, please report it)",
                file=sys.stderr,
            )
            traceback.print_exc()
            return EXIT_INTERNAL_ERROR
    return 0


def _interrupted(prog: str) -> int:
    print(f"\n{prog}: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


@dataclasses.dataclass(frozen=True)
class Command:
    """An entry point: ``COMMAND(argv)`` returns the exit status, ``COMMAND.run()`` exits.

    The fields are ``main``'s arguments; tests call ``COMMAND([prog, *flags])`` in-process.
    """

    fn: Callable[..., Any]
    prog: str
    default_config: str | None = None
    extra_flags: Mapping[str, tuple[str | None, str]] | None = None
    required: Sequence[str] = ()
    legacy: Mapping[str, str] | None = None
    expand: Callable[[list[str]], list[str]] | None = None

    def _options(self) -> dict[str, Any]:
        return dict(default_config=self.default_config, extra_flags=self.extra_flags,
                    required=self.required, legacy=self.legacy, expand=self.expand)  # fmt: skip

    def __call__(self, argv: Sequence[str]) -> int:
        return main(self.fn, argv, prog=self.prog, **self._options())

    def parse(self, argv: Sequence[str]) -> Parsed:
        """The command line parsed, nothing run (raises ``CommandLineError``)."""
        return parse(argv, prog=self.prog, **self._options())

    def run(self) -> None:
        """Run on ``sys.argv`` and exit with the status (the ``__main__`` block)."""
        threads_for_fake_devices(os.environ)
        sys.exit(self(sys.argv))


_FAKE_DEVICES = re.compile(r"--xla_force_host_platform_device_count=(\d+)")
THREADS_PER_FAKE_DEVICE = 4


def threads_for_fake_devices(environ: MutableMapping[str, str]) -> None:
    """Give XLA:CPU enough threads for the fake CPU devices ``XLA_FLAGS`` asks for.

    XLA:CPU sizes its thread pools to ``max(cores, devices)`` (``PJRT_NPROC`` in place of
    the cores where set), and a collective holds its thread until every device has joined
    it. A program in which one device runs two collectives at once (the pipeline's
    ``ppermute`` beside a tensor-parallel all-gather) can then hold every thread in a
    rendezvous while the last device waits for a thread to reach it: XLA aborts after
    40 s ("Termination timeout for `collective permute ...` ... only 3 of them arrived"),
    seen on 2 cores with 4 fake devices in about one run in three under load, never with
    more threads. So a command-line run with ``N`` fake devices gets ``4 N`` threads
    (``PJRT_NPROC``, read when JAX starts its CPU backend, so call this before that);
    threads beyond the cores only wait, and a choice the user made (``PJRT_NPROC`` or
    ``NPROC``, XLA's older name) is kept. Only the ``__main__`` path calls it: importing
    neox_jax sets nothing.
    """
    if "PJRT_NPROC" in environ or "NPROC" in environ:
        return
    found = _FAKE_DEVICES.findall(environ.get("XLA_FLAGS", ""))
    devices = int(found[-1]) if found else 1  # XLA takes the last of a repeated flag
    if devices > 1:
        threads = max(os.cpu_count() or 1, THREADS_PER_FAKE_DEVICE * devices)
        environ["PJRT_NPROC"] = str(threads)
