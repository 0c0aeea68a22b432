"""On the node: what a sync job runs (``clpipe _run_plan PLAN``). It reads the plan that
:mod:`clpipe.submit` wrote, takes the login handed to it, runs the plan's engine and
returns its exit status."""

from __future__ import annotations

from pathlib import Path

from .batch.handoff import take_handoff
from .batch.job import secret_names
from .engines import run
from .errors import stop_on_signals
from .plan import SyncPlan


def run_plan_file(plan_file: str | Path) -> int:
    """Run the plan in ``plan_file`` on this machine; the exit status (a signal that stops
    it raises :class:`~clpipe.errors.Terminated`)."""
    stop_on_signals()  # scancel / a time limit: unwind, so the lock is released and the journal ends
    take_handoff(secret_names())
    plan = SyncPlan.from_json(Path(plan_file).read_text())
    return run(plan)
