"""Run a job now, on this machine: output to the console and to the job's log file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from .job import Job

TTY_PROGRESS = "CLPIPE_TTY_PROGRESS"  # set for the job when the user watches a terminal: draw the live bar there
TEE_PID = "CLPIPE_TEE_PID"  # the tee copying the job's output: the job waits for it before it exits


def run_local(job: Job) -> int:
    """Run ``job.argv`` in ``job.cwd``, copying its output to stdout and ``job.log_path``.

    Where ``tee`` exists (every POSIX system), this process *becomes* the job, as
    ``job 2>&1 | tee -a LOG`` would, so no idle Python process holds memory beside it for
    the hours a sync can take, and the exit status is the job's own. Returns only when it
    cannot exec (then the job runs as a child and its status is returned; a signal ``N``
    becomes ``128 + N`` as in a shell).
    """
    job.log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **job.env)
    if sys.stdout.isatty():
        env[TTY_PROGRESS] = "1"
    else:
        env.pop(TTY_PROGRESS, None)
    tee = shutil.which("tee")
    if tee and hasattr(os, "fork"):
        _exec_with_tee(job, env, tee)  # does not return
    return _run_child(job, env)


def _exec_with_tee(job: Job, env: dict, tee: str) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the tee: the pipe to the console and the log; -i: Ctrl-C stops the job, not the copy
        try:
            os.close(write_end)
            os.dup2(read_end, 0)
            os.close(read_end)
            os.execv(tee, [tee, "-i", "-a", str(job.log_path)])
        finally:
            os._exit(127)
    os.close(read_end)
    env[TEE_PID] = str(pid)
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.chdir(job.cwd)
    try:
        os.execvpe(job.argv[0], list(job.argv), env)
    except OSError as exc:
        print(f"[clpipe] cannot start {job.argv[0]}: {exc.strerror}", flush=True)
        os._exit(127)


def wait_for_tee() -> None:
    """In a job started by :func:`run_local`: let the tee write out the last lines before this
    process exits, so the console and the log are complete when the command returns."""
    pid = os.environ.pop(TEE_PID, "")
    if not pid.isdigit():
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        os.waitpid(int(pid), 0)
    except ChildProcessError:
        pass


def _run_child(job: Job, env: dict) -> int:
    out = sys.stdout.buffer
    with open(job.log_path, "ab") as log:
        proc = subprocess.Popen(
            list(job.argv), cwd=job.cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        assert proc.stdout is not None
        try:
            while True:
                chunk = proc.stdout.read1(65536)
                if not chunk:
                    break
                out.write(chunk)
                out.flush()
                log.write(chunk)
                log.flush()
        except KeyboardInterrupt:
            proc.terminate()
            raise
        finally:
            proc.stdout.close()
        code = proc.wait()
    return code if code >= 0 else 128 - code
