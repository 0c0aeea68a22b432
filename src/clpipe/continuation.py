"""One allocation of a sync job, and what follows it: a batch job stopped at its time limit
goes on in its next allocation under the same job id, so that a step waiting on it
(``afterok:<id>``, ``-hold_jid <id>``) waits for the real end.

:func:`run_allocation` runs the plan with a graceful stop installed (sync/stopping.py: the
time limit's warning, MaxDuration, Ctrl-C, SIGTERM), then records the allocation in the
job record (``logs/sync_logs/<job>-<run>.job.json``, its ``continuations`` list: start,
end, files done, why it ended, exit status). A job stopped at its time limit with
``Continue`` on is requeued (SLURM: ``scontrol requeue $SLURM_JOB_ID``, after everything
is saved, since it ends the allocation at once; Grid Engine: exit status 99), unless this
allocation completed no file (the first one included: a sync that cannot get one file done
in a whole allocation would loop for ever) or the job was requeued ``MaxContinuations``
times already: then it fails (exit status 75, the scheduler says FAILED). A requeued job
runs the same script, so the same plan, run id and job record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from .batch.job import Resources
from .config.units import format_duration
from .console import say
from .errors import SGE_REQUEUE_EXIT, STOPPED_EXIT, ClpipeError, EndsHere
from .sync import stopping

if TYPE_CHECKING:
    from .plan import SyncPlan

REQUEUE_TIMEOUT = 60  # seconds scontrol may take
KILL_WAIT = 120  # seconds to wait for SLURM to end the allocation it requeued


def batch_job() -> tuple[str, str] | None:
    """(scheduler, job id) of the batch job this process runs in, or None."""
    if os.environ.get("SLURM_JOB_ID"):
        return "slurm", os.environ["SLURM_JOB_ID"]
    if os.environ.get("JOB_ID") and (os.environ.get("SGE_ROOT") or os.environ.get("SGE_TASK_ID")):
        return "sge", os.environ["JOB_ID"]
    return None


def max_duration_grace(seconds: int) -> float:
    """What the transfers under way get when MaxDuration is reached: a tenth of it, 2-60 s."""
    return min(60.0, max(2.0, seconds / 10))


def run_allocation(plan: SyncPlan, run: Callable[[SyncPlan], int], handoff: str = "", names: Iterable[str] = ()) -> int:
    """Run ``plan`` (``run``: the engines' run) in this allocation; the exit status. A native
    run stops gracefully; a batch job's allocation is recorded and, stopped at its time
    limit, continued (:class:`~clpipe.errors.EndsHere`; so is a run stopped by a signal:
    nothing follows it, as no scheduled next run). ``handoff``, ``names``: the login
    hand-off file the job read and the names it held, written again for a continuation."""
    started = time.time()
    request = None
    if plan.engine == "native":
        request = stopping.install(Resources(**plan.resources).warning_seconds / 2, say)
        if plan.max_duration:
            why = f"after MaxDuration {format_duration(plan.max_duration)}"
            request.after(plan.max_duration, why, stopping.MAX_DURATION, max_duration_grace(plan.max_duration))
    try:
        code = run(plan)
    except ClpipeError as exc:
        _record(plan, started, exc.exit_code, f"failed: {exc}", False)
        raise
    finally:
        if request is not None:
            request.close()
    code = end_allocation(plan, code, started, handoff, tuple(names))
    if code == STOPPED_EXIT and request is not None and request.kind == stopping.SIGNAL:
        raise EndsHere(code, "stopped by a signal")  # cancelled (scancel, qdel, Ctrl-C): no scheduled next run either
    return code


def end_allocation(plan: SyncPlan, code: int, started: float, handoff: str = "", names: tuple[str, ...] = ()) -> int:
    """Record the allocation; requeue the job when it stopped at its time limit and may go on."""
    job = batch_job()
    if job is None or _record_data(plan, job[1]) is None:  # not a job clpipe submitted (a run in an salloc shell)
        return code
    scheduler, job_id = job
    summary = _summary(plan, started)
    at_limit = code == STOPPED_EXIT and summary.get("stop_kind") == stopping.TIME_LIMIT
    done = int(summary.get("created", 0)) + int(summary.get("updated", 0)) + int(summary.get("adopted", 0))
    requeue = False
    if at_limit and plan.continue_job:
        found = _record_data(plan, job_id)
        requeued = sum(1 for entry in (found[1] if found else {}).get("continuations", []) if entry.get("requeued"))
        if done == 0:
            why = "stopped at the time limit with no file done in this allocation: not continued, the job fails"
        elif requeued >= plan.max_continuations:
            why = f"stopped at the time limit; MaxContinuations ({plan.max_continuations}) requeues done: not continued, the job fails"
        else:
            why = f"stopped at the time limit: requeued ({requeued + 1} of at most {plan.max_continuations})"
            requeue = True
    elif at_limit:
        why = "stopped at the time limit; Continue is off"
    elif code == 0:
        why = "completed"
    elif code == STOPPED_EXIT:
        why = f"stopped {summary.get('stopped') or ''}".strip()
    else:
        why = f"failed (exit status {code})"
    _record(plan, started, code, why, requeue, done)
    if not requeue:
        if at_limit and plan.continue_job:
            say(f"job {job_id}: {why}", error=True)
        return code
    if handoff and names:  # the login read (and deleted) at the start: for the next allocation
        from .batch.handoff import write_handoff

        try:
            write_handoff(Path(handoff), names)
        except OSError as exc:
            say(f"job {job_id}: cannot hand the login on to the next allocation ({exc}); it will stop at its start", error=True)
    say(f"job {job_id}: {why}; the sync goes on in its next allocation under the same job id")
    if scheduler == "sge":
        raise EndsHere(SGE_REQUEUE_EXIT, "requeued (exit status 99)")
    problem = _requeue_slurm(job_id)
    _record(plan, started, code, f"stopped at the time limit; the requeue failed: {problem}", False, done, replace=True)
    say(f"job {job_id}: the requeue failed: {problem}; run the sync again to go on", error=True)
    raise EndsHere(STOPPED_EXIT, problem)


def _requeue_slurm(job_id: str) -> str:
    """``scontrol requeue``: SLURM ends this allocation at once (SIGTERM), which ends this
    process. Returns what went wrong when it does not."""
    sys.stdout.flush()
    sys.stderr.flush()
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the requeue's SIGTERM: the end of this allocation
    try:
        proc = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=REQUEUE_TIMEOUT, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        signal.signal(signal.SIGTERM, previous)
        return f"scontrol requeue {job_id}: {exc}"
    if proc.returncode != 0:
        signal.signal(signal.SIGTERM, previous)
        return f"scontrol requeue {job_id}: {(proc.stderr or proc.stdout).strip() or f'exit status {proc.returncode}'}"
    time.sleep(KILL_WAIT)
    return f"SLURM did not end the allocation within {KILL_WAIT} s of the requeue"


def _summary(plan: SyncPlan, started: float) -> dict:
    """The summary this allocation wrote ({} when it wrote none)."""
    path = Path(plan.summary_json)
    try:
        if path.stat().st_mtime < started - 1:
            return {}
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record_data(plan: SyncPlan, job_id: str) -> tuple[Path, dict] | None:
    """The job record this job's allocations go into, and what it holds: the record of the
    submission (``<job>-<run>.job.json``) when it names this job, else one of this job's own
    beside it (``<job>-<run>.job-<id>.json``, e.g. a task of an array). None when the plan
    was not submitted as a batch job (no record of its submission)."""
    logs = Path(plan.sync_logs)
    stem = f"{plan.job_name}-{plan.run_id}"
    if not (logs / f"{stem}.job.json").exists():
        return None
    for path in (logs / f"{stem}.job.json", logs / f"{stem}.job-{job_id}.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and str(data.get("job_id")) == job_id:
            return path, data
    return logs / f"{stem}.job-{job_id}.json", {"job_id": job_id}


def _record(plan: SyncPlan, started: float, code: int, why: str, requeued: bool, done: int = 0, replace: bool = False) -> None:
    """Add this allocation to the job record's ``continuations`` (``replace``: instead of
    the entry it added last)."""
    job = batch_job()
    found = None if job is None else _record_data(plan, job[1])
    if found is None:
        return
    path, data = found
    entries = data.setdefault("continuations", [])
    if replace and entries:
        entries.pop()
    entries.append(
        {
            "allocation": len(entries) + 1,
            "start": _iso(started),
            "end": _iso(time.time()),
            "files_done": done,
            "why": why,
            "exit_status": code,
            "requeued": requeued,
        }
    )
    text = json.dumps(data, indent=2) + "\n"
    latest = path.with_name(f"{plan.job_name}-latest.job.json")
    targets = [path]
    try:
        if json.loads(latest.read_text()).get("job_id") == data["job_id"]:
            targets.append(latest)
    except (OSError, ValueError, AttributeError):
        pass
    for target in targets:
        temp = target.with_name(target.name + ".tmp")
        try:
            temp.write_text(text)
            os.replace(temp, target)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            say(f"cannot write the job record {target}: {exc.strerror}", error=True)


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="seconds")
