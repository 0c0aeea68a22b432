"""The sync engines, behind one small interface: a module per engine with a function
``run(plan) -> int`` (the exit status: 0 only when every listed file is in the dropoff,
whole; a run that cannot start raises a :class:`~clpipe.errors.ClpipeError`).

The plan names its engine (:attr:`clpipe.plan.SyncPlan.engine`, from ``Engine`` in the
config); :func:`run` imports that engine's module only when it is used. What the engines
share (the outcome of a run, its closing lines, the pre-run checks) is in :mod:`.base`.

* ``native``: clpipe's own engine, for every source (:mod:`.native`);
* ``fw-cli``: the Flywheel CLI's ``fw sync``, run and checked (:mod:`.fwcli`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..plan import SyncPlan

#: engine name (as ``Engine`` in the config spells it) -> the module that runs it
ENGINES: dict[str, str] = {
    "native": "clpipe.engines.native",
    "fw-cli": "clpipe.engines.fwcli",
}


class EngineModule(Protocol):
    """What every engine module provides."""

    def run(self, plan: SyncPlan) -> int: ...


def engine_for(plan: SyncPlan) -> EngineModule:
    """The engine the plan names, its module imported now."""
    module: EngineModule = importlib.import_module(ENGINES[plan.engine])
    return module


def run(plan: SyncPlan) -> int:
    """Run ``plan`` with its engine on this machine; the exit status."""
    return engine_for(plan).run(plan)
