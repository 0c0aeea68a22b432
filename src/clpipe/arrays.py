"""A sync split by subject into an array job (``-shards N``), and the job that ends it.

Submitting (:func:`plan_array`, :func:`describe_array`, :func:`submit_array`): the plan
goes to an array job of N tasks (SLURM ``--array=0-<N-1>[%M]``, Grid Engine ``-t 1-N
[-tc M]``; M is ``ArrayThrottle``), then to one final job that waits for the whole array
(``afterany`` / ``-hold_jid``). The final job's id is printed last (``Submitted batch job
<id>``) and recorded, so the next pipeline step waits on it.

On the node (:func:`task_plan`, :func:`merge`): each task syncs the subjects of
its shard (the rule: :mod:`clpipe.sync.shards`) with its own bookkeeping and reports; the
final job folds the shards' journals into the dropoff's manifest, writes the run's summary
and audit log from the shards' own, and fails when any shard failed or never finished.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from .batch.handoff import HANDOFF_VAR, handoff_path, write_handoff
from .console import say, summary_line
from .errors import ConfigError, PreflightError
from .plan import SyncPlan
from .sync.shards import RULE

if TYPE_CHECKING:
    from collections.abc import Callable

    from .batch.config import BatchConfig
    from .batch.job import Job
    from .batch.scheduler import Submission

MERGE_COMMAND = "_merge_shards"
TASK = "{task}"  # in a task's hand-off file name: its index, filled in on the node


@dataclass(frozen=True)
class ArrayJobs:
    """The two submissions of a sharded sync: its tasks and the final job."""

    shards: int
    throttle: int
    tasks: Submission
    task_job: Job
    final: Submission  # without its dependency (it names the array's id, known once submitted)
    final_job: Job
    handoffs: tuple[Path, ...]  # the login hand-off files to write (one per task, one for the final job)


# ---------------------------------------------------------------------------- submitting


def plan_array(
    plan: SyncPlan, job: Job, batch: BatchConfig | None, email: str | None, stem: str, after: str | None, debug: bool
) -> ArrayJobs:
    """The array job and the final job of a sharded plan, checked against what the cluster
    takes; nothing is written. Each refusal is one :class:`ConfigError` saying what to do."""
    from .batch.array import as_array, max_array_size
    from .batch.scheduler import render

    n = plan.shards
    what = f"-shards {n}"
    if batch is None:
        raise ConfigError(f"{what}: an array job needs a batch system; set BatchConfig or -batch_config, or remove -shards")
    if batch.scheduler not in ("slurm", "sge"):
        raise ConfigError(
            f"{what}: the batch configuration {batch.name!r} ({batch.head[0]}) has no known array jobs; use SLURM or Grid Engine"
        )
    if plan.engine != "native":
        raise ConfigError(f'{what}: fw sync cannot sync a part of a project; set Engine to "native" (or -engine native), or remove -shards')
    opts = plan.sync_options
    if opts.delete:
        raise ConfigError(f"{what}: --delete needs the whole listing (a task sees only its subjects); run a sync without -shards to delete")
    if opts.list_only:
        raise ConfigError(f"{what}: -l/--list-only lists the whole source; run it without -shards")
    limit = max_array_size(batch.scheduler)
    if limit is not None and n > limit[0]:
        raise ConfigError(
            f"{what}: this cluster takes at most {limit[0]} tasks in an array job ({limit[1]}); use -shards {limit[0]} or fewer"
        )
    logs = Path(plan.sync_logs)
    env = dict(job.env)
    handoffs: list[Path] = []
    final_env = {k: v for k, v in env.items() if k != HANDOFF_VAR}
    if HANDOFF_VAR in env:  # a login from this shell: a file for each task (each deletes its own), and one for the final job
        env[HANDOFF_VAR] = str(handoff_path(f"{stem}.task-{TASK}"))
        handoffs += [handoff_path(f"{stem}.task-{i}") for i in range(n)]
        if plan.schedule:  # the final job submits the next run: it needs the login too
            final_env[HANDOFF_VAR] = str(handoff_path(f"{stem}.final"))
            handoffs.append(handoff_path(f"{stem}.final"))
    task_job = replace(job, env=env)
    tasks = as_array(render(task_job, batch, email, logs / f"{stem}.sh", after=after), n, plan.array_throttle)
    final_argv = (sys.executable, "-m", "clpipe", MERGE_COMMAND, *(["-debug"] if debug else []), str(logs / f"{stem}.plan.json"))
    final_job = replace(
        job, argv=final_argv, env=final_env, pass_env=job.pass_env if HANDOFF_VAR in final_env else (), graceful=False, requeue=False
    )  # a merge takes seconds: no time-limit warning, no continuation
    final = render(final_job, batch, email, logs / f"{stem}.final.sh")
    return ArrayJobs(n, plan.array_throttle, tasks, task_job, final, final_job, tuple(handoffs))


def describe_array(array: ArrayJobs) -> list[str]:
    """What the print mode shows of a sharded sync, after the tasks' script."""
    at_once = f"at most {array.throttle} at once" if 0 < array.throttle < array.shards else "all at once"
    return [
        f"Shards:    {array.shards} tasks of one array job ({at_once}); a subject's shard: {RULE}",
        f"Then:      one final job, after the whole array: merges the shards' bookkeeping, writes the summary, "
        f"fails if any shard failed ({array.final_job.command_line()})",
        f"Submit:    {array.final.command_line()} (with the array's id as its dependency)",
    ]


def submit_array(array: ArrayJobs, plan: SyncPlan, stem: str, after: str | None, echo: Callable[[str], object]) -> tuple[str, str]:
    """Submit the tasks, then the final job after them, and record the final job: the
    array's id and the final job's, whose ``Submitted batch job <id>`` line the caller
    prints last."""
    from .batch.array import after_any_flags, cancel, with_flags
    from .batch.scheduler import record_submission
    from .batch.scheduler import submit as submit_job

    logs = Path(plan.sync_logs)
    written: list[Path] = []
    try:
        for path in array.handoffs:
            write_handoff(path, array.task_job.pass_env)
            written.append(path)
        array_id = submit_job(array.tasks)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    scheduler = array.tasks.scheduler
    final = with_flags(array.final, after_any_flags(scheduler, array_id))
    try:
        final_id = submit_job(final)
    except BaseException:
        cancel(scheduler, array_id)  # no array without the job that merges it
        for path in written:
            path.unlink(missing_ok=True)
        raise
    record_path = logs / f"{stem}.job.json"
    record = record_submission(final, array.final_job, final_id, after, record_path)
    record.update(
        array_job_id=array_id,
        shards=array.shards,
        array_throttle=array.throttle,
        array_script=str(array.tasks.script_path),
        array_submit_command=list(array.tasks.argv),
        array_output=str(logs / _task_output(array.tasks.output_pattern, array_id)),
    )
    text = json.dumps(record, indent=2) + "\n"
    for path in (record_path, record_path.with_name(f"{array.final_job.name}-latest.job.json")):
        temp = path.with_name(path.name + ".tmp")
        temp.write_text(text)
        os.replace(temp, path)
    first, last = (0, array.shards - 1) if scheduler == "slurm" else (1, array.shards)
    at_once = f", at most {array.throttle} at once" if 0 < array.throttle < array.shards else ""
    echo(f"Submitted array job {array_id}: {array.shards} shards by subject (tasks {first}-{last}{at_once})")
    echo(f"Output:    {record['array_output']} (each task), {record['output']} (the final job)")
    echo(f"Record:    {record_path} (next step: {record['wait_for_it']})")
    return array_id, final_id


def _task_output(pattern: str, array_id: str) -> str:
    """The tasks' output files, ``<task>`` standing for each task's index (SLURM) or id (Grid Engine)."""
    return pattern.replace("%A", array_id).replace("%a", "<task>").replace("$JOB_ID", array_id).replace("$SGE_TASK_ID", "<task>")


# ---------------------------------------------------------------------------- on the node


def task_index() -> int | None:
    """This array task's shard (SLURM's task index; Grid Engine's task id less one), or
    None outside an array task."""
    slurm = os.environ.get("SLURM_ARRAY_TASK_ID", "")
    if slurm.isdigit():
        return int(slurm)
    sge = os.environ.get("SGE_TASK_ID", "")
    if sge.isdigit():
        return int(sge) - 1
    return None


def task_environment() -> None:
    """An array task's own login hand-off file: its index put in the name the script gives."""
    where = os.environ.get(HANDOFF_VAR, "")
    index = task_index()
    if TASK in where and index is not None:
        os.environ[HANDOFF_VAR] = where.replace(TASK, str(index))


def shard_paths(plan: SyncPlan, index: int) -> SyncPlan:
    """The plan of shard ``index``: its own audit log and summary beside the run's."""
    summary = plan.summary_json.removesuffix(".summary.json")
    audit = plan.audit_csv.removesuffix(".csv")
    return replace(
        plan,
        shard=index,
        audit_csv=f"{audit}.shard-{index}.csv",
        summary_json=f"{summary}.shard-{index}.summary.json",
        log_path=plan.log_path.removesuffix(".log") + f".shard-{index}.log",
    )


def task_plan(plan: SyncPlan) -> SyncPlan:
    """The plan this process runs: a sharded plan becomes its task's shard."""
    if plan.shards <= 1 or plan.shard >= 0:
        return plan
    index = task_index()
    if index is None or not 0 <= index < plan.shards:
        raise PreflightError(
            f"this sync is split into {plan.shards} shards: it runs as the tasks of an array job "
            "(SLURM_ARRAY_TASK_ID or SGE_TASK_ID names the task); submit it again with -submit"
        )
    return shard_paths(plan, index)


def final_plan(plan_file: str | Path) -> SyncPlan:
    """The plan of a sharded sync's final job (and the login handed to it: with a schedule,
    the next run needs it)."""
    from .batch.handoff import take_handoff
    from .batch.job import secret_names

    take_handoff(secret_names())
    return SyncPlan.from_json(Path(plan_file).read_text())


def merge(plan: SyncPlan) -> int:
    """The final job of a sharded sync: fold the shards' journals into the dropoff's
    manifest, write the run's summary and audit log, and fail when any shard failed; the
    exit status."""
    from .engines.native import SHARD_TALLIES, SessionStates
    from .sync.manifest import SyncState
    from .sync.sessions import Tallies
    from .sync.shards import shard_folder

    dropoff = Path(plan.dropoff)
    state = SyncState(dropoff, plan.run_id, shards_ended=True)  # every task has ended: their locks are stale
    sessions: SessionStates | None = None
    session_notes: list[str] = []
    if not plan.sync_options.dry_run and dropoff.is_dir():
        tallies = Tallies()  # read before the merge removes the shards' folders
        every = all([tallies.add_saved(shard_folder(dropoff, index) / SHARD_TALLIES) for index in range(plan.shards)])
        state.acquire()
        try:
            state.load()
            state.save()
            # the sessions of all shards as one run's; a session is "removed" only when every
            # shard listed the whole source (a shard that never finished listed nothing)
            sessions = SessionStates.after(plan, tallies, session_notes, whole_listing=every)
            count = len(state)
        finally:
            state.release()
        say(f"merged the bookkeeping of {plan.shards} shards into {state.root / 'manifest.jsonl'} ({count} synced items)")
    totals = dict.fromkeys(("created", "updated", "skipped", "adopted", "deleted", "failed", "renamed", "renamed_in_place", "bytes"), 0)
    failures: list[str] = []
    notes: list[str] = []
    shards = []
    seconds = 0.0
    for index in range(plan.shards):
        part = shard_paths(plan, index)
        try:
            data = json.loads(Path(part.summary_json).read_text())
        except (OSError, ValueError):
            failures.append(f"shard {index}: no summary ({part.summary_json}): its task did not finish; see its output in {plan.sync_logs}")
            shards.append({"shard": index, "state": "FAILED", "summary": None})
            continue
        for key in totals:
            totals[key] += int(data.get(key, 0) or 0)
        seconds = max(seconds, float(data.get("seconds", 0) or 0))
        failures += [f"shard {index}: {f}" for f in data.get("failures", [])]
        notes += [f"shard {index}: {n}" if not str(n).startswith("shard ") else str(n) for n in data.get("notes", [])]
        failed = int(data.get("failed", 0) or 0) > 0
        shards.append({"shard": index, "state": "FAILED" if failed else "COMPLETED", "summary": part.summary_json})
    bad = [s["shard"] for s in shards if s["state"] == "FAILED"]
    if bad and not totals["failed"]:
        totals["failed"] = len(bad)
    _merge_audit(plan, Path(plan.audit_csv))
    summary = {
        "engine": plan.engine,
        "source": plan.source_url,
        "dropoff": plan.dropoff,
        "run_id": plan.run_id,
        "shards": shards,
        "finished": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),  # as the native engine writes it
        "exit_state": "failed" if bad else "complete",
        **({"sessions": sessions.counts, "sessions_tsv": sessions.tsv} if sessions is not None else {}),
        **totals,
        "seconds": round(seconds, 3),
        "failures": failures,
        "notes": notes,
        "audit_csv": plan.audit_csv,
    }
    Path(plan.summary_json).write_text(json.dumps(summary, indent=2) + "\n")
    if sessions is not None:
        sessions.report(plan)
        notes += session_notes
    for failure in failures[:50]:
        say(f"FAILED {failure}", error=True)
    for note in notes:
        say(note)
    say(summary_line(totals["created"], totals["updated"], totals["skipped"], totals["failed"], totals["bytes"], seconds))
    say(f"audit log: {plan.audit_csv}; summary: {plan.summary_json}")
    if sessions is not None and sessions.records:
        say(sessions.line())
    if bad:
        say(f"sync FAILED: shard {', '.join(map(str, bad))} of {plan.shards} failed; the other shards' files are in place", error=True)
        return 1
    say(f"sync complete: every listed file is in the dropoff ({plan.shards} shards)")
    return 0


def _merge_audit(plan: SyncPlan, target: Path) -> None:
    """The run's audit CSV: the shards' rows under one header."""
    temp = target.with_name(target.name + ".tmp")
    with open(temp, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        header_written = False
        for index in range(plan.shards):
            path = Path(shard_paths(plan, index).audit_csv)
            try:
                with open(path, newline="", encoding="utf-8") as fh:
                    rows = list(csv.reader(fh))
            except OSError:
                continue
            if rows and not header_written:
                writer.writerow(rows[0])
                header_written = True
            writer.writerows(rows[1:])
        if not header_written:
            writer.writerow(["src_path", "dest_path", "status", "existing", "error_message", "action_taken"])
    os.replace(temp, target)
