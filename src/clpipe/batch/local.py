"""Run a job now, on this machine: output to the console and to the job's log file."""

from __future__ import annotations

import os
import subprocess
import sys

from .job import Job


def run_local(job: Job) -> int:
    """Run ``job.argv`` in ``job.cwd``, copying its output to stdout and ``job.log_path``.

    Returns the job's exit status (a signal ``N`` becomes ``128 + N`` as in a shell).
    """
    job.log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **job.env)
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
