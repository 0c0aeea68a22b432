"""Run a job now, on this machine: output to the console and to the job's log file.

This process *becomes* the job (``exec``), so no idle process holds memory beside it for
the hours a sync can take, and the exit status is the job's own. The job writes to the
console itself, stdout to stdout and stderr (errors, FAILED lines) to stderr, as a
command-line tool should, and copies every line to its log in the order it printed them
(:func:`start_job_log`): one writer, so the log has both streams, interleaved as they
happened, and a full disk under the log is the job's own to report. No other process is
started, so no other process sees the job's environment, which holds the login the job
needs (``job.pass_env``) and no other.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from pathlib import Path

from ..errors import DiskFull, PreflightError, is_disk_full
from .job import Job, without_secrets

JOB_LOG = "CLPIPE_JOB_LOG"  # set for a job run here: the log it copies its output to


def run_local(job: Job) -> int:
    """Run ``job.argv`` in ``job.cwd``, its output to the console and to ``job.log_path``.

    On POSIX this process becomes the job and does not return (a job that cannot be
    started is a :class:`PreflightError`); elsewhere the job runs as a child and its status
    is returned (a signal ``N`` becomes ``128 + N`` as in a shell).
    """
    job.log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**without_secrets(os.environ, keep=job.pass_env), **job.env, JOB_LOG: str(job.log_path)}
    if os.name != "posix":
        code = subprocess.call(list(job.argv), cwd=job.cwd, env=env, stdin=subprocess.DEVNULL)
        return code if code >= 0 else 128 - code
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_RDONLY)
    saved_stdin, saved_cwd = os.dup(0), os.getcwd()
    os.dup2(devnull, 0)
    os.close(devnull)
    try:
        os.chdir(job.cwd)
        os.execvpe(job.argv[0], list(job.argv), env)
    except OSError as exc:
        os.dup2(saved_stdin, 0)
        os.close(saved_stdin)
        os.chdir(saved_cwd)
        raise PreflightError(
            f"cannot start {job.argv[0]}: {exc.strerror}; the clpipe installation was probably moved or removed: install it again"
        ) from None
    raise AssertionError("unreachable: exec returned")  # pragma: no cover


class _Log:
    """The job's log, shared by its stdout and stderr: each write goes to the console, then
    to the log, under one lock, so the log has the lines in the order they were printed.
    A write to the log that fails (a full disk) ends the copying; what the log misses is
    counted for the message at the end."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        self.lock = threading.Lock()
        self.problem: OSError | None = None
        self.missing = 0  # bytes the log did not get

    def write(self, console: int, data: bytes) -> None:
        with self.lock:
            _write_all(console, data)
            if self.problem is not None:
                self.missing += len(data)
                return
            try:
                _write_all(self.fd, data)
            except OSError as exc:
                self.problem = exc
                self.missing += len(data)  # about: a short write may have put a part of it there


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Tee(io.RawIOBase):
    """A console stream (fd 1 or 2) whose every write is copied to the job's log."""

    def __init__(self, fd: int, log: _Log):
        super().__init__()
        self._fd, self._log = fd, log

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        self._log.write(self._fd, data)
        return len(data)

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        # as for a pipe: a live progress bar is drawn on the terminal itself (/dev/tty),
        # never into the log
        return False


_LOG: _Log | None = None


def start_job_log() -> None:
    """In a job started by :func:`run_local`: from now on, everything this process prints
    on stdout and stderr is also appended to the job's log, in the order it is printed.
    Both streams are line-buffered, so a line is in the log as soon as it is printed."""
    global _LOG
    path = os.environ.pop(JOB_LOG, "")
    if not path or _LOG is not None:
        return
    try:
        log = _Log(path)
    except OSError as exc:
        print(f"clpipe: error: cannot write the log {path}: {exc.strerror}; the run goes on without it", file=sys.stderr, flush=True)
        return
    _LOG = log
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        stream.flush()
        setattr(
            sys,
            name,
            io.TextIOWrapper(io.BufferedWriter(_Tee(fd, log)), encoding=stream.encoding, errors=stream.errors, line_buffering=True),
        )


def finish_job(code: int, error: BaseException | None = None) -> int:
    """The exit status of a job started by :func:`run_local` (``code`` elsewhere), once its
    output is written out: non-zero, with one line on the console, when the log could not
    be written whole (not said again when the job ended on a full disk of the same
    filesystem: ``error``)."""
    if _LOG is None:
        return code
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    problem = _LOG.problem
    if problem is None:
        return code
    folder = os.path.dirname(_LOG.path)
    if is_disk_full(problem):
        said = isinstance(error, DiskFull) and error.folder is not None and _same_filesystem(error.folder, folder)
        if said:
            return code or 1
        line = str(
            DiskFull.at(
                problem, [(Path(folder), "")], needed=_LOG.missing, purpose=f"the rest of this run's log {os.path.basename(_LOG.path)}"
            )
        )
    else:
        line = f"the log {_LOG.path} misses the end of this run's output ({problem.strerror}); the console has it all"
    try:
        _write_all(2, f"clpipe: error: {line}\n".encode())
    except OSError:
        pass
    return code or 1


def _same_filesystem(a: Path, b: str) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False
