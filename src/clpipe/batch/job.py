"""A batch job as plain data: what to run, with which resources, logging where.

Rendering (a script, a scheduler's directives) and running (locally, SLURM, Grid Engine)
are separate steps that take a :class:`Job`; nothing here knows about a scheduler.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config.units import format_hms


@dataclass(frozen=True)
class Resources:
    time_seconds: int
    mem_mb: int
    cores: int

    def describe(self) -> str:
        return f"time {format_hms(self.time_seconds)}, memory {self.mem_mb} MB, cores {self.cores}"

    @property
    def warning_seconds(self) -> int:
        """How long before its time limit the job asks to be warned (SLURM ``--signal``, Grid
        Engine ``s_rt``): a tenth of the limit, from 20 s to 5 minutes, at most half of it.
        The transfers under way get half of it to finish; the rest is for saving."""
        return max(1, min(max(20, self.time_seconds // 10), 300, self.time_seconds // 2))


@dataclass(frozen=True)
class Job:
    name: str
    argv: tuple[str, ...]
    resources: Resources
    log_path: Path
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)  # never secrets
    #: names of environment variables holding secrets the job needs (a DICOMweb login, a Flywheel key):
    #: a batch job gets their values through a private hand-off file (batch/handoff.py),
    #: never through its script, a command line or the scheduler
    pass_env: tuple[str, ...] = ()
    #: the job stops gracefully when warned before its time limit (the native engine; sync/stopping.py)
    graceful: bool = False
    #: ... and then requeues itself to go on under the same job id (Continue; clpipe/continuation.py)
    requeue: bool = False

    def command_line(self) -> str:
        """The argv as one correctly quoted shell line, for display and scripts."""
        return shlex.join(self.argv)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["argv"] = list(self.argv)
        data["pass_env"] = list(self.pass_env)
        data["log_path"] = str(self.log_path)
        data["cwd"] = str(self.cwd)
        return data


def secret_names() -> tuple[str, ...]:
    """The environment variables that hold a login clpipe reads: the Flywheel API key and
    the DICOMweb credentials."""
    from ..sources.dicom import DICOMWEB_CREDENTIALS
    from ..sources.flywheel import API_KEY_ENV

    return (API_KEY_ENV, *DICOMWEB_CREDENTIALS)


def without_secrets(env: Mapping[str, str], keep: Iterable[str] = ()) -> dict[str, str]:
    """``env`` for a process clpipe starts: without the logins (:func:`secret_names`) other
    than those in ``keep``, the ones that process needs."""
    drop = set(secret_names()) - set(keep)
    return {name: value for name, value in env.items() if name not in drop}
