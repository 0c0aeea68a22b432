"""What a scheduler is asked beyond one plain job: array jobs (``-shards``), a job that
waits for a whole array, a start time (``-every``), and the few questions clpipe asks it
(the largest array it takes, whether a job is still pending, cancelling one).

Each takes a rendered :class:`~clpipe.batch.scheduler.Submission` and returns another;
only SLURM and Grid Engine are known here (a generic scheduler has no agreed syntax).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import replace

from ..errors import ClpipeError
from .job import without_secrets
from .scheduler import Submission

ASK_TIMEOUT = 30  # seconds for scontrol / qconf / squeue / qstat / scancel / qdel

#: the output file of an array task, with the scheduler's placeholders of the array's id and the task's index
TASK_OUTPUT = {"slurm": ("%j", "%A_%a"), "sge": ('"$JOB_ID"', '"$JOB_ID"."$SGE_TASK_ID"')}


def array_flags(scheduler: str, tasks: int, throttle: int = 0) -> tuple[str, ...]:
    """The submit flags of an array of ``tasks`` tasks, at most ``throttle`` at once (0:
    all). SLURM numbers them 0 .. tasks-1; Grid Engine 1 .. tasks."""
    limit = 0 < throttle < tasks
    if scheduler == "slurm":
        return (f"--array=0-{tasks - 1}" + (f"%{throttle}" if limit else ""),)
    if scheduler == "sge":
        return ("-t", f"1-{tasks}", *(("-tc", str(throttle)) if limit else ()))
    raise ClpipeError(f"no array jobs are known for the scheduler {scheduler!r}")


def after_any_flags(scheduler: str, job_id: str) -> tuple[str, ...]:
    """Submit flags of a job that starts when ``job_id`` (all of an array's tasks) has
    ended, however it ended."""
    if scheduler == "slurm":
        return (f"--dependency=afterany:{job_id}",)
    if scheduler == "sge":
        return ("-hold_jid", job_id)  # Grid Engine waits for the end, whatever the exit status
    raise ClpipeError(f"no dependencies are known for the scheduler {scheduler!r}")


def begin_flags(scheduler: str, seconds: int, now: float | None = None) -> tuple[str, ...]:
    """Submit flags of a job that may start ``seconds`` from now, not before."""
    if scheduler == "slurm":
        return (f"--begin=now+{int(seconds)}",)
    if scheduler == "sge":
        when = time.localtime((time.time() if now is None else now) + seconds)
        return ("-a", time.strftime("%Y%m%d%H%M.%S", when))
    raise ClpipeError(f"no start times are known for the scheduler {scheduler!r}")


def with_flags(submission: Submission, flags: tuple[str, ...]) -> Submission:
    """``submission`` with ``flags`` given to the submit command, before the script."""
    argv = submission.argv
    return replace(submission, argv=(*argv[:-1], *flags, argv[-1]))


def as_array(submission: Submission, tasks: int, throttle: int = 0) -> Submission:
    """``submission`` as an array job of ``tasks`` tasks, each with an output file of its
    own (``Output-<name>-jobid-<array id>_<index>.out``; Grid Engine: ``.<task id>``)."""
    plain, task = TASK_OUTPUT[submission.scheduler]
    script = submission.script
    old, new = f"-jobid-{plain}.out", f"-jobid-{task}.out"
    if old not in script:
        raise ClpipeError(f"the batch script {submission.script_path} has no output file clpipe can number per task")
    pattern = submission.output_pattern.replace(plain.strip('"'), task.replace('"', ""))
    return with_flags(
        replace(submission, script=script.replace(old, new), output_pattern=pattern), array_flags(submission.scheduler, tasks, throttle)
    )


def _ask(argv: list[str]) -> subprocess.CompletedProcess | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=ASK_TIMEOUT, env=without_secrets(os.environ)
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def max_array_size(scheduler: str) -> tuple[int, str] | None:
    """The most tasks an array job may have on this cluster and where that was read, or
    None when it cannot be told here (no scheduler command, no answer, no limit)."""
    if scheduler == "slurm":
        proc = _ask(["scontrol", "show", "config"])
        match = re.search(r"^MaxArraySize\s*=\s*(\d+)", proc.stdout, re.M) if proc is not None and proc.returncode == 0 else None
        return (int(match.group(1)), "MaxArraySize in `scontrol show config`") if match else None
    if scheduler == "sge":
        proc = _ask(["qconf", "-sconf"])
        match = re.search(r"^max_aj_tasks\s+(\d+)", proc.stdout, re.M) if proc is not None and proc.returncode == 0 else None
        if match and int(match.group(1)) > 0:  # 0: no limit
            return int(match.group(1)), "max_aj_tasks in `qconf -sconf`"
    return None


def is_pending(scheduler: str, job_id: str) -> bool | None:
    """Whether ``job_id`` waits to start (True), has started or ended (False), or None
    when the scheduler cannot be asked."""
    if scheduler == "slurm":
        proc = _ask(["squeue", "-h", "-j", job_id, "-o", "%T"])
        if proc is None:
            return None
        return proc.returncode == 0 and any(line.strip() == "PENDING" for line in proc.stdout.splitlines())
    if scheduler == "sge":
        proc = _ask(["qstat", "-u", "*"])
        if proc is None:
            return None
        for line in proc.stdout.splitlines()[2:]:
            words = line.split()
            if len(words) >= 5 and words[0] == job_id:
                return "q" in words[4] and "r" not in words[4]  # qw, hqw: waiting; r, t, Rr: running
        return False
    return None


def cancel(scheduler: str, job_id: str) -> str:
    """Cancel ``job_id``: "" when done, else what the scheduler said."""
    proc = _ask(["scancel", job_id] if scheduler == "slurm" else ["qdel", job_id])
    if proc is None:
        return f"{'scancel' if scheduler == 'slurm' else 'qdel'} could not be run here"
    if proc.returncode != 0:
        return (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()[-1]
    return ""
