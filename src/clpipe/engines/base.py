"""What both engines share: the outcome of a run (one type, :class:`Outcome`, with its
summary line), the pre-run checks of the plan's folders, and the closing lines."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..console import say
from ..errors import STOPPED_EXIT, PreflightError
from ..sync.reports import Outcome

if TYPE_CHECKING:
    from ..plan import SyncPlan

__all__ = ["FAILED_SHOWN", "Outcome", "close", "close_stopped", "make_folders", "say_failed", "stopped_line"]

FAILED_SHOWN = 50  # FAILED lines printed; the rest are counted (and in the reports)
SYNC_FAILED = "sync FAILED: not every file arrived; the exit status is non-zero"
SYNC_COMPLETE = "sync complete: every listed file is in the dropoff"

#: the folders of a plan a run writes to, and how the config names them
FOLDERS = {"dropoff": "DropoffDirectory", "temp": "TempDirectory", "logs": "log folder"}


def _folder(plan: SyncPlan, which: str) -> str:
    return {"dropoff": plan.dropoff, "temp": plan.temp_dir, "logs": plan.sync_logs}[which]


def make_folders(plan: SyncPlan, order: tuple[str, ...] = ("dropoff", "temp", "logs")) -> None:
    """The pre-run check of both engines: create the plan's folders (in ``order``), or
    stop with one line naming the one that cannot be created."""
    for which in order:
        folder = _folder(plan, which)
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PreflightError(f"cannot create the {FOLDERS[which]} {folder}: {exc.strerror}") from None


def say_failed(failures: list[str], noun: str, where: str = "") -> None:
    """A FAILED line (on stderr) for each of the first :data:`FAILED_SHOWN` failures, then
    how many more there are."""
    for failure in failures[:FAILED_SHOWN]:
        say(f"FAILED {failure}", error=True)
    if len(failures) > FAILED_SHOWN:
        say(f"... and {len(failures) - FAILED_SHOWN} more {noun}{where}", error=True)


def stopped_line(outcome: Outcome, listed: int, unit: str = "files") -> str:
    """The line of a run stopped before its end (sync/stopping.py): "stopped at the time
    limit: N of M files done" (``unit``: what the source lists, files or series)."""
    done = max(0, listed - outcome.not_synced - outcome.failed)
    of = f"{done} of {'at least ' if outcome.listing_cut else ''}{listed} {unit} done"
    return f"stopped {outcome.stopped}: {of}; finished files are kept and recorded: run the sync again to go on"


def close_stopped(outcome: Outcome, listed: int, unit: str = "files") -> int:
    """The last line of a run stopped before its end, and its exit status
    (:data:`~clpipe.errors.STOPPED_EXIT`)."""
    say(stopped_line(outcome, listed, unit))
    return STOPPED_EXIT


def close(failed: bool, code: int = 1, done: str = SYNC_COMPLETE) -> int:
    """The last line of a run, and its exit status: ``code`` when a file is missing."""
    if failed:
        say(SYNC_FAILED, error=True)
        return code
    say(done)
    return 0
