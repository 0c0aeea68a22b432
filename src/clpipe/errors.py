"""Every error of clpipe, in one tree, each carrying the exit code the command ends with.

The CLI prints ``str(error)`` as one line (no traceback unless ``-debug``) and exits with
``error.exit_code``::

    ClpipeError              a problem the user can fix; the message says what (exit 1)
    ├── ConfigError          user error: the configuration or the command line (exit 2)
    ├── PreflightError       run failure before any transfer: tool, login, server, folder (1)
    ├── SyncFailed           run failure: not every file arrived intact (1)
    ├── DiskFull             run failure: a folder's filesystem or quota is full (1)
    └── TransferError        one remote item could not be fetched (1)
        ├── TransientError   worth retrying (429, 5xx, timeouts, resets, bad bodies); may
        │   │                carry the server's Retry-After
        │   └── VerifyError  the bytes that arrived are not the remote file
        └── PermanentError   not worth retrying (404, 403, a hostile name, retries used up)
    Terminated               (a BaseException) SIGTERM/SIGHUP: exit 128+N
    EndsHere                 (a BaseException) the process ends now, nothing follows the run

A run stopped before its end (a time limit, MaxDuration, Ctrl-C or SIGTERM: see
``sync/stopping.py``) is no error: it saves what it did, reports it, and exits with
:data:`STOPPED_EXIT`. docs/exit-codes.md lists every exit status.

A source raises :class:`TransientError` or :class:`PermanentError` for one item; the sync
engine retries the transient ones (``sync/transfer.py``) and reports each item that failed
in the end, so a transfer error reaches the CLI only when a step outside the engine (a
DICOM listing) lets it through, and it is said as one line like any other.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TypeGuard

#: the exit status of a run stopped before its end (a time limit, MaxDuration, Ctrl-C,
#: SIGTERM): what finished is kept and recorded; running it again goes on (EX_TEMPFAIL)
STOPPED_EXIT = 75
#: the exit status that makes Grid Engine requeue a job (its documented convention)
SGE_REQUEUE_EXIT = 99


class ClpipeError(Exception):
    """Base class: a problem the user can fix; the message says what to fix."""

    exit_code = 1


class ConfigError(ClpipeError):
    """Invalid configuration or command-line input (exit code 2)."""

    exit_code = 2


class PreflightError(ClpipeError):
    """The run cannot start: missing tool, login, unreachable server, unwritable folder."""

    exit_code = 1


class SyncFailed(ClpipeError):
    """The sync ran but not every file arrived intact."""

    exit_code = 1


class TransferError(ClpipeError):
    """One remote item (a file, a series) could not be fetched: see its two kinds."""

    exit_code = 1


class TransientError(TransferError):
    """Worth retrying: 429, 5xx, timeouts, dropped connections, bad bodies. ``retry_after``:
    the seconds the server asked to wait (Retry-After), or None."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class VerifyError(TransientError):
    """The bytes that arrived are not the remote file (wrong size, checksum or zip CRC)."""


class PermanentError(TransferError):
    """Not worth retrying (404, 403, ...)."""


#: the errors of a full filesystem, or of a full quota on it
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> TypeGuard[OSError]:
    """Is ``exc`` a write that failed because the filesystem (or the quota) is full?"""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


class DiskFull(ClpipeError):
    """A folder's filesystem (or the user's quota on it) is full: the run stopped there.
    ``outcome``: what the sync did before it stopped, when the engine raised it."""

    exit_code = 1

    def __init__(self, message: str, outcome: object = None, folder: Path | None = None):
        super().__init__(message)
        self.outcome = outcome
        self.folder = folder  # the folder named

    @classmethod
    def at(
        cls, exc: OSError, folders: Sequence[tuple[Path, str]], *, needed: int | None = None, purpose: str = "", outcome: object = None
    ) -> DiskFull:
        """The error for ``exc`` (ENOSPC or EDQUOT). ``folders``: (folder, how to move it
        elsewhere, e.g. "set DropoffDirectory elsewhere", or "") for each folder the step
        writes to; the one named holds the file ``exc`` names, else it is the fullest.
        ``needed``: about how many bytes ``purpose`` ("the 12 files still to sync") needs."""
        from .console import human_bytes

        folder, move = _where(exc, folders)
        free = _free_bytes(folder)
        quota = exc.errno == errno.EDQUOT
        facts = [] if quota or free is None else [f"{human_bytes(free)} free"]
        if needed and purpose:
            more = needed - free if free is not None and not quota and needed > free else needed
            facts.append(f"about {human_bytes(more)}{' more' if more != needed else ''} needed for {purpose}")
        elif purpose:
            facts.append(f"more needed for {purpose}")
        return cls(
            f"{'disk quota exceeded' if quota else 'no space left'} on {folder}"
            f"{' (' + '; '.join(facts) + ')' if facts else ''}; free space{' or ' + move if move else ' there'}, "
            "then run again: finished files are kept",
            outcome,
            folder,
        )


def _where(exc: OSError, folders: Sequence[tuple[Path, str]]) -> tuple[Path, str]:
    for name in (exc.filename2, exc.filename):  # a copy's destination is filename2
        if not isinstance(name, (str, bytes)) or not name:
            continue
        path = os.path.abspath(os.fsdecode(name))
        for folder, move in sorted(folders, key=lambda item: -len(str(item[0]))):  # the deepest folder first
            if path == str(folder) or path.startswith(str(folder).rstrip("/") + "/"):
                return folder, move
    known = [(free, n) for n, (folder, _) in enumerate(folders) if (free := _free_bytes(folder)) is not None]
    return folders[min(known)[1]] if known else folders[0]


def _free_bytes(folder: Path) -> int | None:
    """What an ordinary user may still write on ``folder``'s filesystem (as ``df`` shows)."""
    path = Path(folder)
    for candidate in (path, *path.parents):  # a folder that was not made yet: its nearest parent
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


class Terminated(BaseException):
    """The run was told to stop (SIGTERM from ``scancel`` or a batch time limit, SIGHUP when
    the terminal went away). A ``BaseException``, like ``KeyboardInterrupt``, so that no
    per-file ``except Exception`` takes it for one file's failure: it unwinds the whole run,
    whose ``finally`` blocks release the dropoff's lock (another node could not break a
    lock that names this host) and end the journal; the next run resumes."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} (a batch time limit, scancel or a closed terminal); "
            "finished files are kept and recorded: run the sync again to fetch the rest"
        )


def stop_on_signals() -> None:
    """In the process that runs a sync: SIGTERM and SIGHUP raise :class:`Terminated`."""
    import signal

    def handler(signum: int, _frame: object) -> None:
        raise Terminated(signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, handler)


class EndsHere(BaseException):
    """The process ends now with ``exit_code``, and nothing that follows a run's end (a
    scheduled next run) happens: a batch job requeued at its time limit goes on in its next
    allocation (``continuation.py``; Grid Engine: :data:`SGE_REQUEUE_EXIT`, which requeues
    it), or a run was stopped by a signal (cancelled)."""

    def __init__(self, exit_code: int, message: str = ""):
        super().__init__(message)
        self.exit_code = exit_code
