"""Progress of a sync: a live bar on a terminal, a plain line every PROGRESS_EVERY seconds
in a batch log."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

PROGRESS_EVERY = 15.0  # seconds between progress lines in a batch log


def _terminal() -> TextIO:
    """Where the live bar goes: stdout when it is the terminal; else the terminal itself
    when the job was started from one (its stdout then also goes to the log, so it says it is
    no terminal: the bar is not copied there)."""
    if sys.stdout.isatty():
        return sys.stdout
    try:
        return open("/dev/tty", "w")
    except OSError:
        return sys.stdout


def watched() -> bool:
    """Does somebody watch this run on a terminal (then: a live bar, not progress lines)?
    Asked of the console itself: a job run here copies its output to its log through a
    ``sys.stdout`` that says it is no terminal (batch/local.py)."""
    try:
        return os.isatty(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # no console (a test's captured output)
        return False


class Progress:
    """A live bar on a terminal (rich), a plain line every PROGRESS_EVERY seconds otherwise."""

    def __init__(self, total_files: int, total_bytes: int, interactive: bool):
        self.total_files, self.total_bytes = total_files, total_bytes
        self.done_files = self.done_bytes = 0
        self.started = self._last = time.monotonic()
        self._lock = threading.Lock()
        self._bar = None
        if interactive and total_files:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import Progress as Bar

            self._bar = Bar(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(file=_terminal(), stderr=False),
            )
            self._task = self._bar.add_task(f"syncing {total_files} files", total=total_bytes or None)
            self._bar.start()

    def advance(self, nbytes: int, files: int = 0) -> None:
        with self._lock:
            self.done_bytes += nbytes
            self.done_files += files
            if self._bar is not None:
                self._bar.update(self._task, advance=nbytes)
            elif time.monotonic() - self._last >= PROGRESS_EVERY:
                self._last = time.monotonic()
                rate = self.done_bytes / max(self._last - self.started, 1e-6) / 1e6
                print(
                    f"[progress {time.strftime('%H:%M:%S')}] {self.done_files}/{self.total_files} files, "
                    f"{self.done_bytes / 1e6:.1f}/{self.total_bytes / 1e6:.1f} MB, {rate:.1f} MB/s",
                    flush=True,
                )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
