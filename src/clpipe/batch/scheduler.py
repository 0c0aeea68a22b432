"""Render a :class:`~clpipe.batch.job.Job` as a batch script and submit it.

The script carries the scheduler's resource directives (from the batch configuration's
templates, with TimeUsage/MemUsage/CoreUsage converted to the units each scheduler
expects), fail-fast shell settings and the command as a quoted argument list. It is
submitted with the scheduler's own command (``sbatch --parsable`` / ``qsub -terse``) run
as an argument list, and the job id is read from its answer.

Paths never appear in directives: the submit command runs in the log folder, and the
job's output file is named relative to it, so a project path with spaces, quotes or ``$``
cannot be misread by the scheduler.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..config.units import format_hms
from ..errors import ClpipeError, ConfigError
from .config import BatchConfig
from .job import Job, without_secrets

JOB_ID_RE = re.compile(r"^\d+(?:_\d+)?$")
EMAIL_RE = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+$")
SUBMIT_TIMEOUT = 120


@dataclass(frozen=True)
class Submission:
    scheduler: str  # slurm | sge | generic
    script_path: Path
    script: str
    argv: tuple[str, ...]  # the submit command
    cwd: Path
    output_pattern: str  # the job's output file, with the scheduler's job-id placeholder

    def command_line(self) -> str:
        return f"cd {shlex.quote(str(self.cwd))} && {shlex.join(self.argv)}"


@dataclass(frozen=True)
class _Dialect:
    prefix: str
    output_name: str  # {name} is the job name; the scheduler's job-id placeholder follows
    extra: tuple[str, ...]
    submit_flags: tuple[str, ...]
    self_logging: bool  # the script sends its own output to the log file


DIALECTS = {
    # sbatch runs in the log folder, so a relative --output lands there; the folder's own
    # path is never parsed by SLURM.
    "slurm": _Dialect("#SBATCH", "Output-{name}-jobid-%j.out", ("--output=Output-{name}-jobid-%j.out",), ("--parsable",), False),
    # Grid Engine expands $VARIABLES in -cwd/-wd/-o paths, so a project path with a `$`
    # would break them: the script redirects its own output (a shell-quoted path) instead.
    "sge": _Dialect("#$", "Output-{name}-jobid-$JOB_ID.out", ("-S /bin/bash", "-j y", "-o /dev/null"), ("-terse",), True),
}


def _fill(template: str, key: str, value: str) -> str:
    """clpipe templates come as ``--mem={mem}`` (1.9) or ``--mem=`` (legacy: value appended)."""
    placeholder = "{" + key + "}"
    return template.replace(placeholder, value) if placeholder in template else template + value


def memory_value(template: str, mem_mb: int, scheduler: str) -> str:
    """Memory in the unit the template and scheduler expect: ``{mem}G`` gets gigabytes
    (rounded up), ``{mem}M`` megabytes; a bare value is megabytes for SLURM and gets an
    ``M`` for Grid Engine (whose bare numbers are bytes)."""
    match = re.search(r"\{mem\}([KkMmGgTt])", template)
    unit = match.group(1).upper() if match else ""
    if unit == "G":
        return str(math.ceil(mem_mb / 1024))
    if unit == "T":
        return str(math.ceil(mem_mb / (1024 * 1024)))
    if unit == "K":
        return str(mem_mb * 1024)
    if unit == "M" or scheduler != "sge":
        return str(mem_mb)
    return f"{mem_mb}M"


def _directive_words(text: str, source: str, what: str) -> list[str]:
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"{source}: {what}: {text!r} cannot be split into words ({exc})") from None
    for word in words:
        if "\n" in word or "\r" in word:
            raise ConfigError(f"{source}: {what}: a line break is not allowed in a scheduler option")
    return words


def directives(job: Job, batch: BatchConfig, email: str | None) -> list[list[str]]:
    """The resource options for the job, one word list per directive line."""
    scheduler = batch.scheduler
    lines: list[list[str]] = []

    def add(text: str, what: str) -> None:
        words = _directive_words(text, batch.source, what)
        if words:
            lines.append(words)

    for option in batch.submission_options:
        add(f"{option['command']} {option['args']}", "SubmissionOptions")
    for option in batch.sub_options_equal:
        add(f"{option['command']}={option['args']}", "SubOptionsEqual")
    if batch.memory_command:
        add(_fill(batch.memory_command, "mem", memory_value(batch.memory_command, job.resources.mem_mb, scheduler)), "MemoryCommand")
    if batch.time_command_active and batch.time_command:
        add(_fill(batch.time_command, "time", format_hms(job.resources.time_seconds)), "TimeCommand")
    if batch.thread_command_active and batch.n_threads_command:
        add(_fill(batch.n_threads_command, "nthreads", str(job.resources.cores)), "NThreadsCommand")
    if batch.job_id_command_active and batch.job_id_command:
        add(_fill(batch.job_id_command, "jobid", job.name), "JobIDCommand")
    if email and batch.email_command:
        if not EMAIL_RE.match(email):
            raise ConfigError(f"EmailAddress: {email!r} is not an e-mail address the scheduler can use")
        add(_fill(batch.email_command, "email", email), "EmailCommand")
    return lines


def limit_directives(job: Job, batch: BatchConfig) -> list[list[str]]:
    """What a job that stops gracefully asks for (``job.graceful``, ``job.requeue``): a
    warning before its time limit, SIGUSR1 (SLURM ``--signal=B:USR1@S``: to the batch shell,
    which is the sync itself, as the script ``exec``s it; Grid Engine a soft limit ``s_rt``
    that many seconds below the hard one, which sends SIGUSR1 to the job; ``-notify`` would
    warn only at the hard limit, for a time the queue sets, and before a suspension too);
    for a job that continues, SLURM's ``--requeue`` and ``--open-mode=append`` (each
    allocation adds to the same log; Grid Engine's script appends already)."""
    if not job.graceful:
        return []
    warning = job.resources.warning_seconds
    timed = batch.time_command_active and bool(batch.time_command)
    if batch.scheduler == "slurm":
        words = [[f"--signal=B:USR1@{warning}"]]
        if job.requeue:
            words += [["--requeue"], ["--open-mode=append"]]
        return words
    if batch.scheduler == "sge" and timed:
        return [["-l", f"s_rt={format_hms(job.resources.time_seconds - warning)}"]]
    return []


def submit_head(job: Job, batch: BatchConfig) -> list[str]:
    """The submit command of the batch configuration; for a SLURM job that continues at its
    time limit, without a ``--no-requeue`` it may carry (the job's ``--requeue`` wins)."""
    if job.requeue and batch.scheduler == "slurm":
        return [word for word in batch.head if word != "--no-requeue"]
    return [*batch.head]


def _self_log_line(job: Job, output_pattern: str) -> str:
    """``exec >>'<log folder>'/Output-<name>-jobid-"$JOB_ID".out 2>&1``: the folder quoted for
    the shell, the job id left for the shell to fill in."""
    name = output_pattern.replace("$JOB_ID", '"$JOB_ID"')
    return f"exec >>{shlex.quote(str(job.log_path.parent))}/{name} 2>&1"


def render(job: Job, batch: BatchConfig, email: str | None, script_path: Path, after: str | None = None) -> Submission:
    """The batch script for ``job`` and the exact command that submits it."""
    if after is not None and not JOB_ID_RE.match(after):
        raise ConfigError(f"-after: {after!r} is not a job id (expected digits, e.g. 12345)")
    scheduler = batch.scheduler
    dialect = DIALECTS.get(scheduler)
    lines = ["#!/bin/bash"]
    output_pattern = ""
    if dialect is not None:
        output_pattern = dialect.output_name.format(name=job.name)
        for words in [*directives(job, batch, email), *limit_directives(job, batch)]:
            lines.append(f"{dialect.prefix} {' '.join(words)}")
        for extra in dialect.extra:
            lines.append(f"{dialect.prefix} {extra.format(name=job.name)}")
    lines += [
        f"# Written by clpipe {__version__} on {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC "
        f"from batch configuration {json.dumps(batch.name)} ({scheduler}).",
        "# It holds no credentials: "
        + (
            f"{', '.join(job.pass_env)} reach the job in a file only you can read ($CLPIPE_HANDOFF_FILE), deleted when it starts."
            if job.pass_env
            else "a Flywheel job reads the saved `fw login` when it runs."
        ),
        "set -euo pipefail",
        *(f"export {name}={shlex.quote(value)}" for name, value in sorted(job.env.items())),
        *([_self_log_line(job, output_pattern)] if dialect is not None and dialect.self_logging else []),
        f"cd {shlex.quote(str(job.cwd))}",
        f"exec {shlex.join(job.argv)}",
        "",
    ]
    argv = submit_head(job, batch)
    if dialect is not None:
        argv += dialect.submit_flags
    if after is not None:
        if scheduler == "slurm":
            argv.append(f"--dependency=afterok:{after}")
        elif scheduler == "sge":
            argv += ["-hold_jid", after]
        else:
            raise ConfigError(f"-after: the batch configuration {batch.name!r} ({batch.head[0]}) has no known way to wait for a job")
    argv.append(str(script_path))
    return Submission(scheduler, script_path, "\n".join(lines), tuple(argv), job.log_path.parent, output_pattern)


def parse_job_id(scheduler: str, stdout: str) -> str | None:
    text = stdout.strip()
    if not text:
        return None
    first = text.splitlines()[-1 if scheduler == "generic" else 0].strip()
    if scheduler == "slurm":
        candidate = first.split(";")[0]  # --parsable: "ID" or "ID;cluster"
    elif scheduler == "sge":
        candidate = first.split(".")[0]  # -terse: "ID" or "ID.1-4:1" for arrays
    else:
        match = re.search(r"\b(\d+)\b", text)
        candidate = match.group(1) if match else ""
    return candidate if JOB_ID_RE.match(candidate) else None


def submit(submission: Submission) -> str:
    """Write the script, run the submit command, and return the job id."""
    command = submission.argv[0]
    if shutil.which(command) is None:
        raise ClpipeError(
            f"{command} was not found on PATH: this machine cannot submit to the batch system in the batch "
            'configuration; run clpipe on a login node, or set BatchConfig to "" to run here'
        )
    submission.script_path.parent.mkdir(parents=True, exist_ok=True)
    temp = submission.script_path.with_name(submission.script_path.name + ".tmp")
    temp.write_text(submission.script)
    os.chmod(temp, 0o750)
    os.replace(temp, submission.script_path)
    try:
        # no login in the submit command's environment: sbatch would copy it into the job's
        # (kept by the scheduler); a job gets the logins it needs in a private file (handoff.py)
        proc = subprocess.run(
            list(submission.argv),
            cwd=submission.cwd,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=SUBMIT_TIMEOUT,
            env=without_secrets(os.environ),
        )
    except subprocess.TimeoutExpired:
        raise ClpipeError(
            f"{command} did not answer within {SUBMIT_TIMEOUT} s; the scheduler may be down (the job may or may not have been queued)"
        ) from None
    if proc.returncode != 0:
        reason = (proc.stderr.strip() or proc.stdout.strip() or "no message").splitlines()[-1]
        raise ClpipeError(f"{command} refused the job (exit {proc.returncode}): {reason}")
    job_id = parse_job_id(submission.scheduler, proc.stdout)
    if job_id is None:
        if submission.scheduler == "generic":  # e.g. bq: accepted, but it names no job id
            return "unknown"
        raise ClpipeError(f"{command} answered without a job id: {proc.stdout.strip()[:200]!r}")
    return job_id


def record_submission(submission: Submission, job: Job, job_id: str, after: str | None, record_path: Path) -> dict:
    """Write what was submitted, as JSON, for the next pipeline step to wait on."""
    output = submission.output_pattern.replace("%j", job_id).replace("$JOB_ID", job_id)
    record = {
        "job_id": job_id,
        "job_name": job.name,
        "scheduler": submission.scheduler,
        "submitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "script": str(submission.script_path),
        "submit_command": list(submission.argv),
        "output": str(submission.cwd / output) if output else None,
        "after": after,
        "resources": {"time_seconds": job.resources.time_seconds, "mem_mb": job.resources.mem_mb, "cores": job.resources.cores},
        "wait_for_it": {"slurm": f"--dependency=afterok:{job_id}", "sge": f"-hold_jid {job_id}"}.get(submission.scheduler),
    }
    text = json.dumps(record, indent=2) + "\n"
    for path in (record_path, record_path.with_name(f"{job.name}-latest.job.json")):
        temp = path.with_name(path.name + ".tmp")
        temp.write_text(text)
        os.replace(temp, path)
    return record
