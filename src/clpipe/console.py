"""What a sync run prints, the same for both engines."""

from __future__ import annotations

import sys


def say(message: str, error: bool = False) -> None:
    """One line of a run's output, on stdout; an ``error`` (a FAILED line) on stderr, where
    a command-line tool's errors belong (a local run's log gets both: batch/local.py)."""
    if error:
        sys.stdout.flush()  # what came before it is written first
        sys.stderr.write(f"[clpipe] {message}\n")  # one write (print makes two): the log gets the line whole
        sys.stderr.flush()
    else:
        print(f"[clpipe] {message}", flush=True)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def summary_line(created: int, updated: int, skipped: int, failed: int, nbytes: int, seconds: float) -> str:
    return (
        f"Sync summary: {created} created, {updated} updated, {skipped} skipped, "
        f"{failed} failed; {human_bytes(nbytes)} ({nbytes} bytes); {seconds:.1f} s"
    )
