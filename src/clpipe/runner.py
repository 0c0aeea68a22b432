"""On the node: what a sync job runs (``clpipe _run_plan PLAN``). It reads the plan that
:mod:`clpipe.submit` wrote, takes the login handed to it, runs the plan's engine and
returns its exit status."""

from __future__ import annotations

import os
from pathlib import Path

from .arrays import final_plan, merge, task_environment, task_plan
from .batch.handoff import HANDOFF_VAR, take_handoff
from .batch.job import secret_names
from .continuation import run_allocation
from .engines import run
from .errors import stop_on_signals
from .plan import SyncPlan
from .schedule import run_then_next


def run_plan_file(plan_file: str | Path) -> int:
    """Run the plan in ``plan_file`` on this machine; the exit status. The native engine
    stops gracefully at a time limit, MaxDuration, Ctrl-C or SIGTERM, and a batch job
    stopped at its time limit goes on in its next allocation (clpipe/continuation.py); until
    the run starts (and for the fw-cli engine) a signal raises :class:`~clpipe.errors.Terminated`."""
    stop_on_signals()  # scancel / a time limit: unwind, so the lock is released and the journal ends
    task_environment()  # an array task (-shards): its own login hand-off file
    handoff = os.environ.get(HANDOFF_VAR, "")  # written again for a continuation (the file is deleted now)
    names = take_handoff(secret_names())
    plan = task_plan(SyncPlan.from_json(Path(plan_file).read_text()))  # an array task: its shard (clpipe/arrays.py)
    # -every: the next run is submitted when this one ends (clpipe/schedule.py); not when it is requeued
    return run_then_next(plan, lambda p: run_allocation(p, run, handoff, names))


def merge_plan_file(plan_file: str | Path) -> int:
    """The final job of a sharded sync (``clpipe _merge_shards PLAN``): merge the shards
    (clpipe/arrays.py); with -every, then submit the next run."""
    stop_on_signals()
    plan = final_plan(plan_file)
    return run_then_next(plan, merge)
