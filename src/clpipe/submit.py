"""From a validated config to a sync job: plan it, then print it, run it here, or submit it
to the batch system (an executor of :mod:`clpipe.batch`).

:func:`prepare` makes the plan and its job (with the login hand-off a batch job needs, the
source's checks that can be made here, the rendered script); :func:`describe` is what is
shown without ``-submit``; :func:`launch` writes the plan (and the config's
DICOMFormatString) and runs or submits the job. The CLI prints what they return.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ClpipeError, ConfigError, DiskFull, is_disk_full
from .plan import SyncPlan, make_plan

if TYPE_CHECKING:
    from .arrays import ArrayJobs
    from .batch.config import BatchConfig
    from .batch.job import Job
    from .batch.scheduler import Submission
    from .config.model import ProjectConfig


@dataclass(frozen=True)
class SyncJob:
    """A planned sync job, not yet run."""

    config: ProjectConfig
    plan: SyncPlan
    job: Job
    batch: BatchConfig | None  # None: run here, with no batch system
    plan_path: Path  # where the job reads its plan
    handoff: Path | None  # the private file that takes a login to a batch job
    submission: Submission | None  # the rendered batch script (None: run here)
    layout: str  # the native engine's layout template ("" for fw's own)
    source_problem: str  # what the source's check found on this machine (a batch node may differ)
    after: str | None
    array: ArrayJobs | None = None  # -shards: the array job and its final job (clpipe/arrays.py)

    @property
    def logs(self) -> Path:
        return Path(self.plan.sync_logs)

    @property
    def stem(self) -> str:
        return f"{self.plan.job_name}-{self.plan.run_id}"


def prepare(config: ProjectConfig, batch_config: str | None, after: str | None, submit: bool, debug: bool = False) -> SyncJob:
    """Plan the sync and its job; nothing is written. ``debug``: the job shows tracebacks."""
    from .batch.config import load_batch_config

    batch = load_batch_config(batch_config if batch_config is not None else config.batch_config, config.project_directory)
    plan = make_plan(config)
    if config.source.every:  # -every: each run submits the next (clpipe/schedule.py)
        from .schedule import schedule_for, with_chain

        plan = with_chain(replace(plan, schedule=schedule_for(config, batch, debug)))
    logs = Path(plan.sync_logs)
    stem = f"{plan.job_name}-{plan.run_id}"
    plan_path = logs / f"{stem}.plan.json"
    # -debug reaches the process that runs the sync (its traceback is the one worth reading)
    job = plan.job((sys.executable, "-m", "clpipe", "_run_plan", *(["-debug"] if debug else []), str(plan_path)))
    handoff = None
    if batch is not None and job.pass_env:  # a login from this shell: handed over in a private file
        from .batch.handoff import HANDOFF_VAR, handoff_path

        handoff = handoff_path(stem)
        job = replace(job, env={**job.env, HANDOFF_VAR: str(handoff)})
    if after is not None and batch is None:
        raise ConfigError("-after: waiting for another job needs a batch system; set BatchConfig or -batch_config")
    layout = plan.layout_template
    source_problem = ""
    if not plan.is_flywheel:
        from .sources.dicom import DEFAULT_TEMPLATE, SourceSettings, SourceURL, check_before_submit

        layout = layout or DEFAULT_TEMPLATE
        assert isinstance(plan.url, SourceURL)
        try:
            check_before_submit(plan.url, SourceSettings(**plan.settings))
        except ConfigError:
            raise  # the same on every node: a login set twice, a TLS file that is not there
        except ClpipeError as exc:
            # a folder this machine cannot reach: a run here would fail; a batch job's node
            # may mount shares this login node does not, so there it is a note
            if submit and batch is None:
                raise
            source_problem = str(exc)

    submission = None
    if batch is not None:
        from .batch.scheduler import render

        submission = render(job, batch, config.email_address, logs / f"{stem}.sh", after=after)
    array = None
    if plan.shards:  # -shards: an array job by subject, then one final job (clpipe/arrays.py)
        from .arrays import plan_array

        array = plan_array(plan, job, batch, config.email_address, stem, after, debug)
        submission, handoff = array.tasks, None
    return SyncJob(config, plan, job, batch, plan_path, handoff, submission, layout, source_problem, after, array)


def describe(sj: SyncJob) -> list[str]:
    """What the job would do, as the lines shown without ``-submit``."""
    from .layout import dicom_format_string

    plan, job, batch, submission = sj.plan, sj.job, sj.batch, sj.submission
    where = "here, with no batch system" if batch is None else f"as a {batch.scheduler} batch job ({batch.name})"
    lines = [f"Job:       {job.name}, would run {where}", f"Source:    {plan.source_url}"]
    if plan.query:
        shown = ", ".join(f"{k}={v!r}" for k, v in plan.query.items() if v)
        lines.append(f"Query:     {shown or 'everything the source holds'}")
    lines += [
        f"Dropoff:   {plan.dropoff}",
        f"Temp:      {plan.temp_dir}",
        f"Resources: {job.resources.describe()}",
        f"Log:       {job.log_path if submission is None else sj.logs / submission.output_pattern}",
        f"Audit log: {plan.audit_csv}",
    ]
    if plan.engine == "native":
        unit = "downloads" if plan.is_flywheel else "retrievals"
        lines.append(f"Engine:    native (clpipe's own; no fw needed), {plan.sync_options.jobs} parallel {unit}")
        lines.append(f"Summary:   {plan.summary_json}")
        if sj.layout:
            lines.append(f"Layout:    {sj.layout} (DICOMFormatString {dicom_format_string(sj.layout)!r})")
    else:
        lines.append(f"Command:   {shlex.join(plan.fw_argv)}")
    lines += _stop_lines(sj)
    if submission is not None:
        lines += [
            f"Script:    {submission.script_path}",
            f"Submit:    {submission.command_line()}",
            "--- script ---",
            submission.script.rstrip("\n"),
            "--------------",
        ]
    if sj.array is not None:
        from .arrays import describe_array

        lines += describe_array(sj.array)
    if plan.schedule:
        from .schedule import describe as describe_schedule

        lines += describe_schedule(plan)
    if sj.source_problem:
        lines.append(f"Note:      the job would stop here: {sj.source_problem}")
    if plan.engine == "fw-cli" and shutil.which("fw") is None:
        lines.append("Note:      `fw` is not on PATH here; install the Flywheel CLI before running (see the README).")
    lines.append("Nothing was run. Add -submit to run it.")
    return lines


def _stop_lines(sj: SyncJob) -> list[str]:
    """How the run stops before its end, when it may (sync/stopping.py, clpipe/continuation.py)."""
    from .config.units import format_duration

    plan, job, batch = sj.plan, sj.job, sj.batch
    lines = []
    if job.graceful and plan.max_duration:
        lines.append(f"Stops:     by itself after MaxDuration {format_duration(plan.max_duration)}, cleanly (exit status 75)")
    timed = batch is not None and (
        batch.scheduler == "slurm" or (batch.scheduler == "sge" and batch.time_command_active and bool(batch.time_command))
    )
    if job.graceful and timed:
        then = (
            f"requeues itself to go on under the same job id (Continue; at most {plan.max_continuations} times)"
            if job.requeue
            else "ends (Continue is off: run it again to go on)"
        )
        warned = format_duration(job.resources.warning_seconds)
        lines.append(f"Limit:     warned {warned} before its time limit, the sync stops cleanly and {then}")
    return lines


def launch(sj: SyncJob, echo: Callable[[str], object]) -> int:
    """Write the plan, record the layout in the config, and run the job here (this process
    becomes the job) or submit it; ``echo`` shows each line as it happens. The exit status."""
    from .layout import dicom_format_string

    plan, job, logs, plan_path = sj.plan, sj.job, sj.logs, sj.plan_path
    if sj.source_problem:
        echo(f"Note:      on this machine: {sj.source_problem}; the job will check again on its node")
    logs.mkdir(parents=True, exist_ok=True)
    text = plan.to_json()
    try:
        plan_path.write_text(text)
    except BaseException as exc:  # a full disk: no half-written plan is left behind
        plan_path.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise DiskFull.at(exc, [(logs, "")], needed=len(text.encode()), purpose=f"the plan {plan_path.name}") from exc
        raise
    if sj.layout and dicom_format_string(sj.layout):
        from .config.conversion import write_dicom_format_string

        done = write_dicom_format_string(sj.config, dicom_format_string(sj.layout))
        if done:
            echo(f"Note:      {done}")
    if sj.array is not None:  # -shards: the tasks, then the final job, whose id is said last
        from .arrays import submit_array

        array_id, final_id = submit_array(sj.array, plan, sj.stem, sj.after, echo)
        if plan.schedule:
            from .schedule import start_chain

            for line in start_chain(plan, [array_id, final_id], sj.array.tasks.scheduler):
                echo(line)
        echo(f"Submitted batch job {final_id}")
        return 0
    if sj.submission is None:
        from .batch.local import run_local

        echo(f"Running {job.name} here; log: {job.log_path}")
        return run_local(job)

    from .batch.handoff import write_handoff
    from .batch.scheduler import record_submission
    from .batch.scheduler import submit as submit_job

    try:
        if sj.handoff is not None:
            write_handoff(sj.handoff, job.pass_env)  # a full home: no half-written login is left either
        job_id = submit_job(sj.submission)
    except BaseException:
        if sj.handoff is not None:
            sj.handoff.unlink(missing_ok=True)
        raise
    record = record_submission(sj.submission, job, job_id, sj.after, logs / f"{sj.stem}.job.json")
    echo(f"Submitted batch job {job_id}")
    echo(f"Output:    {record['output']}")
    echo(f"Record:    {logs / f'{sj.stem}.job.json'} (next step: {record['wait_for_it']})")
    if plan.schedule:  # -every (clpipe/schedule.py)
        from .schedule import start_chain

        for line in start_chain(plan, [job_id], sj.submission.scheduler):
            echo(line)
    return 0
