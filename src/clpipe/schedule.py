"""A sync that repeats itself (``-every 1d``): each run, when it ends, submits the next to
start that long after (SLURM ``--begin=now+<seconds>``, Grid Engine ``-a <time>``), so a
lab keeps its dropoff current without a hand-written loop.

The chain is recorded in ``<project>/logs/sync_logs/schedule.json``, one chain per
dropoff: the pending (or running) job of the next run, its dropoff, the interval, when it
may begin, and the runs so far. A second ``-every`` for the same dropoff replaces the
first (its pending run is cancelled, and that is said). ``clpipe dicom unschedule``
cancels the pending run and removes the chain; a run already running then ends without
submitting another (each run looks for its chain in the file before it submits the next).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from .config.units import format_duration
from .console import say
from .errors import ClpipeError, ConfigError
from .plan import SyncPlan, new_run_id

if TYPE_CHECKING:
    from collections.abc import Callable

    from .batch.config import BatchConfig
    from .config.model import ProjectConfig

SCHEDULE = "schedule.json"
FORMAT = 1
RUNS_KEPT = 20


def schedule_for(config: ProjectConfig, batch: BatchConfig | None, debug: bool) -> dict:
    """The plan's ``schedule``: how a run submits the next ({} without ``-every``)."""
    every = config.source.every
    if not every:
        return {}
    if batch is None:
        raise ConfigError("-every: a schedule needs a batch system (each run submits the next); set BatchConfig or -batch_config")
    if batch.scheduler not in ("slurm", "sge"):
        raise ConfigError(
            f"-every: the batch configuration {batch.name!r} ({batch.head[0]}) has no known start times; use SLURM or Grid Engine"
        )
    return {
        "every": every,
        "batch_config": batch.name,
        "project_directory": str(config.project_directory),
        "email": config.email_address,
        "debug": debug,
        "config": str(config.path),
        "chain": "",  # set at submission: the first run's id
    }


def describe(plan: SyncPlan) -> list[str]:
    if not plan.schedule:
        return []
    return [
        f"Schedule:  every {format_duration(plan.schedule['every'])}, counted from the end of each run: "
        f"each run submits the next (recorded in {Path(plan.sync_logs) / SCHEDULE})"
    ]


# ---------------------------------------------------------------------------- the file


def schedule_file(logs: str | Path) -> Path:
    return Path(logs) / SCHEDULE


def _load(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise ClpipeError(f"{path} cannot be read ({getattr(exc, 'strerror', None) or exc}); remove it and schedule again") from None
    chains = data.get("chains") if isinstance(data, dict) else None
    return [c for c in chains if isinstance(c, dict) and "dropoff" in c] if isinstance(chains, list) else []


def _save(path: Path, chains: list[dict]) -> None:
    text = json.dumps({"clpipe_schedule": FORMAT, "chains": chains}, indent=2) + "\n"
    temp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _cancel_pending(chain: dict) -> list[str]:
    """Cancel the chain's jobs that have not started; what was done, one line each."""
    from .batch.array import cancel, is_pending

    lines = []
    scheduler = chain.get("scheduler", "slurm")
    for job_id in reversed(chain.get("job_ids") or [chain.get("job_id")]):
        if not job_id:
            continue
        pending = is_pending(scheduler, str(job_id))
        if pending:
            problem = cancel(scheduler, str(job_id))
            lines.append(f"cancelled job {job_id}" if not problem else f"job {job_id} could not be cancelled: {problem}")
        elif pending is False:
            lines.append(f"job {job_id} has started or ended; it submits no further run")
        else:
            lines.append(f"job {job_id}: the scheduler cannot be asked here; cancel it with scancel/qdel if it is still pending")
    return lines


# ---------------------------------------------------------------------------- submitting


def start_chain(plan: SyncPlan, job_ids: list[str], scheduler: str) -> list[str]:
    """Record a new chain for the plan's dropoff, its first run being ``job_ids`` (the
    final one last); a chain already there is replaced (its pending run cancelled). The
    lines to show."""
    path = schedule_file(plan.sync_logs)
    chains = _load(path)
    lines = []
    for old in [c for c in chains if c["dropoff"] == plan.dropoff]:
        done = _cancel_pending(old)
        lines.append(
            f"Note:      this schedule replaces the one of {plan.dropoff} (every {old.get('interval', '?')}, "
            f"next run job {old.get('job_id')}): {'; '.join(done) or 'nothing pending'}"
        )
        chains.remove(old)
    chains.append(
        {
            "dropoff": plan.dropoff,
            "chain": plan.schedule["chain"],
            "interval": format_duration(plan.schedule["every"]),
            "every_seconds": plan.schedule["every"],
            "scheduler": scheduler,
            "job_id": job_ids[-1],
            "job_ids": job_ids,
            "begins": "now",
            "config": plan.schedule.get("config", ""),
            "runs": [{"run_id": plan.run_id, "job_id": job_ids[-1], "submitted_at": _now()}],
        }
    )
    _save(path, chains)
    lines.append(
        f"Schedule:  every {format_duration(plan.schedule['every'])} from the end of each run; each run submits the next "
        f"({path}); stop it with `clpipe dicom unschedule -c {plan.schedule.get('config') or 'CONFIG'}`"
    )
    return lines


def with_chain(plan: SyncPlan) -> SyncPlan:
    """The plan of the first run of a new chain (the chain is named after it)."""
    return replace(plan, schedule={**plan.schedule, "chain": plan.run_id}) if plan.schedule else plan


def next_plan(plan: SyncPlan) -> SyncPlan:
    """The plan of the next run: a new run id, and its own logs."""
    new = new_run_id()

    def moved(text: str) -> str:
        return text.replace(plan.run_id, new) if text else text

    return replace(
        plan,
        run_id=new,
        shard=-1,
        audit_csv=moved(plan.audit_csv),
        log_path=moved(plan.log_path),
        summary_json=moved(plan.summary_json),
        fw_argv=tuple(moved(a) for a in plan.fw_argv),
    )


def _clean_environment() -> None:
    """What a job submitting from inside a job must not hand on: the scheduler's variables
    of this job (sbatch would read some of them as options)."""
    for name in list(os.environ):
        if (name.startswith("SLURM_") and name != "SLURM_CONF") or name.startswith("SBATCH_"):
            os.environ.pop(name, None)


def submit_next(plan: SyncPlan) -> list[str]:
    """At the end of a scheduled run: submit the next (to begin ``every`` from now) when
    the chain is still in schedule.json, and record it there. The lines to show."""
    from .batch.array import begin_flags, with_flags
    from .batch.config import load_batch_config
    from .batch.handoff import HANDOFF_VAR, handoff_path, write_handoff
    from .batch.scheduler import record_submission, render
    from .batch.scheduler import submit as submit_job

    schedule = plan.schedule
    path = schedule_file(plan.sync_logs)
    chains = _load(path)
    chain = next((c for c in chains if c["dropoff"] == plan.dropoff and c.get("chain") == schedule.get("chain")), None)
    if chain is None:
        return [f"schedule: this chain is no longer in {path} (unscheduled or replaced): no next run is submitted"]
    batch = load_batch_config(schedule["batch_config"], Path(schedule["project_directory"]))
    if batch is None:
        raise ConfigError(f"schedule: the batch configuration {schedule['batch_config']!r} names no batch system; schedule again")
    _clean_environment()
    following = next_plan(plan)
    logs = Path(following.sync_logs)
    stem = f"{following.job_name}-{following.run_id}"
    plan_path = logs / f"{stem}.plan.json"
    plan_path.write_text(following.to_json())
    job = following.job((sys.executable, "-m", "clpipe", "_run_plan", *(["-debug"] if schedule.get("debug") else []), str(plan_path)))
    begin = begin_flags(batch.scheduler, int(schedule["every"]))
    begins = (datetime.now(timezone.utc) + timedelta(seconds=int(schedule["every"]))).isoformat(timespec="seconds")
    job_ids: list[str]
    if following.shards:
        from .arrays import plan_array, submit_array

        handoff_env = {HANDOFF_VAR: str(handoff_path(stem))} if job.pass_env else {}
        job = replace(job, env={**job.env, **handoff_env})
        array = plan_array(following, job, batch, schedule.get("email"), stem, None, bool(schedule.get("debug")))
        array = replace(array, tasks=with_flags(array.tasks, begin))
        job_ids = list(submit_array(array, following, stem, None, lambda line: None))
    else:
        handoff = None
        if job.pass_env:
            handoff = handoff_path(stem)
            job = replace(job, env={**job.env, HANDOFF_VAR: str(handoff)})
        submission = with_flags(render(job, batch, schedule.get("email"), logs / f"{stem}.sh"), begin)
        try:
            if handoff is not None:
                write_handoff(handoff, job.pass_env)
            job_id = submit_job(submission)
        except BaseException:
            if handoff is not None:
                handoff.unlink(missing_ok=True)
            raise
        record_submission(submission, job, job_id, None, logs / f"{stem}.job.json")
        job_ids = [job_id]
    chains = _load(path)  # again: unschedule may have run meanwhile
    chain = next((c for c in chains if c["dropoff"] == plan.dropoff and c.get("chain") == schedule.get("chain")), None)
    if chain is None:
        from .batch.array import cancel

        for job_id in reversed(job_ids):
            cancel(batch.scheduler, job_id)
        return [f"schedule: unscheduled while this run ended: the next run (job {job_ids[-1]}) was cancelled"]
    runs = [*chain.get("runs", []), {"run_id": following.run_id, "job_id": job_ids[-1], "submitted_at": _now(), "begins": begins}]
    chain.update(job_id=job_ids[-1], job_ids=job_ids, begins=begins, runs=runs[-RUNS_KEPT:])
    _save(path, chains)
    return [f"schedule: next run submitted: job {job_ids[-1]}, not before {begins} (every {chain.get('interval')}; {path})"]


def run_then_next(plan: SyncPlan, run: Callable[[SyncPlan], int]) -> int:
    """Run the plan; a scheduled run then submits the next, whether it succeeded or failed
    (a lab's dropoff stays current through a PACS that was down for a night). A run ended by
    a signal (cancelled, or stopped at its time limit to continue) submits none."""
    try:
        code = run(plan)
    except ClpipeError:
        after_run(plan)
        raise
    after_run(plan)
    return code


def after_run(plan: SyncPlan) -> None:
    """A scheduled run has ended (whatever its outcome): submit the next; a failure to do
    so is said, never hides the run's own outcome."""
    if not plan.schedule or plan.shard >= 0:  # a shard task: the final job submits the next
        return
    try:
        lines = submit_next(plan)
    except ClpipeError as exc:
        say(f"schedule: the next run could not be submitted: {exc}; the chain has stopped, schedule it again", error=True)
        return
    for line in lines:
        say(line)


# ---------------------------------------------------------------------------- unschedule


def unschedule(config: ProjectConfig, echo: Callable[[str], object]) -> int:
    """Cancel the pending run of the config's dropoff and remove its chain."""
    path = schedule_file(config.sync_logs)
    dropoff = str(config.source.dropoff_directory)
    chains = _load(path)
    mine = [c for c in chains if c["dropoff"] == dropoff]
    if not mine:
        echo(f"Nothing is scheduled for {dropoff} (no chain in {path}).")
        return 0
    for chain in mine:
        for line in _cancel_pending(chain):
            echo(f"Unscheduled: {line}")
        chains.remove(chain)
    _save(path, chains)
    echo(f"Unscheduled: the sync of {dropoff} (every {mine[0].get('interval', '?')}) will not run again; {path} updated")
    return 0
