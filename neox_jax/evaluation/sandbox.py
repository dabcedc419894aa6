"""Run untrusted Python (model-written code) in a child process, best effort.

What the child gets, and why each layer is there (none of it is a security boundary
against a determined attacker; it keeps a buggy or runaway completion from harming the
evaluating machine, as in Chen et al. 2021's HumanEval harness):

* a separate process (``python -I -B``: no user site, no PYTHON* env, no .pyc writes),
  in its own session so that the whole process group is killed on timeout;
* a wall-clock timeout enforced by the parent, and ``resource`` limits set by the child
  on itself before the program runs (CPU seconds, address space, file size, no core);
* no network: ``unshare -rn`` (an empty network namespace) when the kernel allows
  unprivileged user namespaces; always also proxies pointed at a closed port and
  ``socket.socket`` replaced by a function that raises;
* writes confined to a fresh temporary directory (the cwd): ``open``/``io.open``/
  ``os.open`` in a writing mode and the ``os``/``shutil`` functions that create, remove,
  rename or change files refuse paths outside it; ``os.system``, ``fork``, ``exec*``,
  ``kill`` and ``subprocess`` are disabled. Native code (ctypes) bypasses all of this.

A refused operation raises ``PermissionError`` in the child and leaves a marker on its
stderr, so the parent reports ``sandbox_violation`` even if the program catches the
error. Success requires the program to run to its end (a nonce printed after it), so a
program that calls ``sys.exit(0)`` or ``os._exit(0)`` early does not pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VIOLATION = "@@NEOX_SANDBOX_VIOLATION@@"
_TAIL_BYTES = 4096

# Installed in the child before the program runs. {limits} and {nonce} are filled in.
_GUARD = r"""
import builtins, io, os, resource, shutil, socket, subprocess, sys
for _res, _val in {limits}:
    resource.setrlimit(_res, (_val, _val))
_ROOT = os.path.realpath(os.getcwd())
_real_open, _real_os_open, _err = builtins.open, os.open, sys.stderr

def _inside(path):
    if isinstance(path, int):
        return True  # an already open descriptor
    p = os.path.realpath(os.fspath(path))
    return p == _ROOT or p.startswith(_ROOT + os.sep)

def _refuse(what, path=None):
    target = "" if path is None else f" {{os.fspath(path)!r}}"
    rule = f"writes only under {{_ROOT}}, no processes, no network"
    msg = f"sandbox: {{what}}{{target}} refused ({{rule}})"
    try:
        _err.write("{violation} " + msg + "\n"); _err.flush()
    except Exception:
        pass
    raise PermissionError(msg)

def _open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _inside(file):
        _refuse("write to", file)
    return _real_open(file, mode, *args, **kwargs)

_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def _os_open(path, flags, mode=0o777, *, dir_fd=None):
    if flags & _WRITE and not _inside(path):
        _refuse("write to", path)
    return _real_os_open(path, flags, mode, dir_fd=dir_fd)

def _paths_checked(fn, positions):
    def wrapper(*args, **kwargs):
        for p in (args[i] for i in positions if i < len(args)):
            if not _inside(p):
                _refuse(fn.__name__ + " on", p)
        return fn(*args, **kwargs)
    return wrapper

def _disabled(name):
    def wrapper(*args, **kwargs):
        _refuse(name)
    return wrapper

builtins.open = io.open = _open
os.open = _os_open
for _n in ("remove", "unlink", "rmdir", "mkdir", "makedirs", "removedirs", "truncate",
           "chmod", "chown", "lchown", "utime", "mkfifo", "mknod"):
    if hasattr(os, _n):
        setattr(os, _n, _paths_checked(getattr(os, _n), (0,)))
for _n in ("rename", "renames", "replace", "link", "symlink"):
    setattr(os, _n, _paths_checked(getattr(os, _n), (0, 1)))
for _n, _pos in (("rmtree", (0,)), ("move", (0, 1)), ("chown", (0,)), ("copy", (1,)),
                 ("copy2", (1,)), ("copyfile", (1,)), ("copytree", (1,))):
    setattr(shutil, _n, _paths_checked(getattr(shutil, _n), _pos))
for _n in ("system", "popen", "fork", "forkpty", "kill", "killpg", "execv", "execve",
           "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve",
           "spawnl", "posix_spawn", "posix_spawnp", "putenv", "setuid", "chroot"):
    if hasattr(os, _n):
        setattr(os, _n, _disabled("os." + _n))
subprocess.Popen = _disabled("subprocess.Popen")
class _NoSocket(socket.socket):  # a class, so that modules subclassing it (ssl) import
    def __init__(self, *args, **kwargs):
        _refuse("network access (socket)")
socket.socket = _NoSocket
socket.create_connection = _disabled("network access (socket.create_connection)")

_code = compile(_real_open("program.py", encoding="utf-8").read(), "program.py", "exec")
exec(_code, {{"__name__": "__main__", "__builtins__": builtins}})
sys.stdout.flush()
os.write(1, b"\n{nonce}\n")  # reached only when the program ran to its end
"""


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """The outcome of one run.

    Attributes:
      status: "passed", "failed", "timeout" or "sandbox_violation".
      detail: the last lines of the child's stderr (or why it was stopped).
      seconds: wall-clock time of the run.
    """

    status: str
    detail: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def network_isolation_available() -> bool:
    """Whether ``unshare -rn`` (a private, empty network namespace) works here."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    try:
        done = subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _limits(timeout: float, memory_mb: int) -> str:
    import resource  # POSIX only

    limits = [
        (resource.RLIMIT_CPU, int(timeout) + 1),  # a busy loop dies even if the parent stalls
        (resource.RLIMIT_AS, memory_mb << 20),
        (resource.RLIMIT_FSIZE, 16 << 20),  # also caps the captured stdout/stderr files
        (resource.RLIMIT_CORE, 0),
    ]
    return repr([(int(r), int(v)) for r, v in limits])


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_program(program: str, *, timeout: float = 5.0, memory_mb: int = 1024) -> ExecResult:
    """Run ``program`` (Python source) in the sandbox; see the module docstring.

    Args:
      program: the full source to run (e.g. prompt + completion + tests).
      timeout: wall-clock seconds before the process group is killed.
      memory_mb: address-space limit of the child.

    Returns:
      An ``ExecResult``; never raises for anything the program does.
    """
    workdir = Path(tempfile.mkdtemp(prefix="neox_sandbox_"))
    nonce = secrets.token_hex(16)
    guard = _GUARD.format(limits=_limits(timeout, memory_mb), nonce=nonce, violation=VIOLATION)
    (workdir / "program.py").write_text(program, encoding="utf-8")
    cmd = [sys.executable, "-I", "-B", "-c", guard]
    if network_isolation_available():
        cmd = ["unshare", "-rn", *cmd]
    proxy = "http://127.0.0.1:9"  # the discard port: nothing listens, connections fail
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "LANG": "C.UTF-8",
        **{k: proxy for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")},
        "no_proxy": "",
    }
    start = time.monotonic()
    try:
        with open(workdir / "stdout", "wb") as out, open(workdir / "stderr", "wb") as err:
            proc = subprocess.Popen(
                cmd,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group, killed as a whole
            )
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                with contextlib.suppress(ProcessLookupError):  # it may have just exited
                    os.killpg(proc.pid, signal.SIGKILL)  # our child's own group (its session)
                proc.wait()
        seconds = time.monotonic() - start
        stderr, stdout = _tail(workdir / "stderr"), _tail(workdir / "stdout")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _classify(proc.returncode, timed_out, stdout, stderr, nonce, timeout, seconds)


def _classify(rc, timed_out, stdout, stderr, nonce, timeout, seconds) -> ExecResult:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    violations = [ln.replace(VIOLATION, "").strip() for ln in lines if VIOLATION in ln]
    if violations:
        return ExecResult("sandbox_violation", violations[0], seconds)
    if timed_out:
        return ExecResult("timeout", f"killed after {timeout:g} s", seconds)
    if rc == 0 and nonce in stdout:
        return ExecResult("passed", "", seconds)
    if rc < 0:
        reason = f"killed by signal {-rc} (a resource limit: CPU time or memory)"
        return ExecResult("failed", reason, seconds)
    tail = "\n".join(lines[-3:]) or f"exit status {rc} before the end of the program"
    return ExecResult("failed", tail, seconds)
