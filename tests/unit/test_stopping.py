"""A run stopped before its end (sync/stopping.py) and a batch job continued at its time
limit (clpipe/continuation.py), without a scheduler: the engine's graceful stop on a slow
source, what a job asks the scheduler for, and what an allocation's end decides.
The real SLURM and Grid Engine runs are in tests/integration/test_time_limits.py."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

import clpipe
from clpipe.batch.config import load_batch_config
from clpipe.batch.job import Job, Resources
from clpipe.batch.scheduler import render
from clpipe.continuation import end_allocation
from clpipe.errors import SGE_REQUEUE_EXIT, STOPPED_EXIT, ConfigError, EndsHere
from clpipe.sources.base import RemoteEntry
from clpipe.sync.engine import Engine, Options
from clpipe.sync.manifest import SyncState
from clpipe.sync.stopping import MAX_DURATION, SIGNAL, TIME_LIMIT, StopRequest


def job(tmp_path: Path, seconds: int = 3600, graceful: bool = True, requeue: bool = True) -> Job:
    logs = tmp_path / "logs"
    return Job(
        name="flywheel_sync",
        argv=("python3", "-m", "clpipe", "_run_plan", str(logs / "x.plan.json")),
        resources=Resources(time_seconds=seconds, mem_mb=500, cores=1),
        log_path=logs / "x.log",
        cwd=logs,
        graceful=graceful,
        requeue=requeue,
    )


@pytest.mark.parametrize(("seconds", "warning"), [(60, 20), (30, 15), (600, 60), (3600, 300), (86400, 300)])
def test_the_warning_before_the_limit(seconds, warning):
    assert Resources(seconds, 1, 1).warning_seconds == warning


def test_slurm_job_asks_for_the_warning_and_to_be_requeued(tmp_path):
    batch = load_batch_config("slurmUNCConfig.json", tmp_path)  # its head says --no-requeue
    sub = render(job(tmp_path, 60), batch, None, tmp_path / "s.sh")
    directives = [line for line in sub.script.splitlines() if line.startswith("#SBATCH")]
    assert {"#SBATCH --signal=B:USR1@20", "#SBATCH --requeue", "#SBATCH --open-mode=append"} <= set(directives)
    assert sub.argv[:2] == ("sbatch", "--parsable") and "--no-requeue" not in sub.argv
    # Continue off: warned (a graceful stop), not requeued; the profile's --no-requeue stays
    sub = render(job(tmp_path, 60, requeue=False), batch, None, tmp_path / "s.sh")
    directives = [line for line in sub.script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=B:USR1@20" in directives and "#SBATCH --requeue" not in directives
    assert sub.argv[:2] == ("sbatch", "--no-requeue")
    # the fw-cli engine: neither
    sub = render(job(tmp_path, 60, graceful=False, requeue=False), batch, None, tmp_path / "s.sh")
    assert "--signal" not in sub.script and "--requeue" not in sub.script


def test_grid_engine_job_gets_a_soft_limit_below_the_hard_one(tmp_path):
    path = tmp_path / "sge.json"
    data = json.loads((Path(clpipe.__file__).parent / "data" / "batch_profiles" / "sgeDukeBIAC.json").read_text())
    path.write_text(json.dumps({**data, "TimeCommand": "-l h_rt={time}", "TimeCommandActive": True}))
    sub = render(job(tmp_path, 3600), load_batch_config(str(path), tmp_path), None, tmp_path / "s.sh")
    directives = [line for line in sub.script.splitlines() if line.startswith("#$")]
    assert "#$ -l h_rt=1:00:00" in directives and "#$ -l s_rt=0:55:00" in directives
    # a profile without a time limit: nothing to be warned before
    sub = render(job(tmp_path, 3600), load_batch_config("sgeDukeBIAC.json", tmp_path), None, tmp_path / "s.sh")
    assert "s_rt" not in sub.script


class SlowSource:
    """Files of 4 chunks, each chunk ``pause`` seconds apart."""

    def __init__(self, count: int, pause: float):
        self.entries = [RemoteEntry(f"k{i}", f"f{i}.dcm", 4, 0.0, None, False) for i in range(count)]
        self.pause = pause

    def close(self) -> None:
        pass

    @contextmanager
    def open(self, entry):
        def chunks():
            for _ in range(4):
                time.sleep(self.pause)
                yield b"x"

        yield chunks()


def run_engine(tmp_path: Path, source: SlowSource, request: StopRequest, jobs: int = 2):
    dropoff = tmp_path / "dropoff"
    dropoff.mkdir(exist_ok=True)
    state = SyncState(dropoff, "run")
    state.acquire()
    try:
        state.load()
        engine = Engine(source, state, Options(dropoff=dropoff, zip_tmp=tmp_path / "tmp", jobs=jobs, stop=request))
        outcome = engine.run(source.entries)
        state.save()
    finally:
        state.release()
    return outcome, dropoff


def test_a_stop_lets_the_transfers_under_way_finish_and_starts_no_more(tmp_path):
    request = StopRequest()
    threading.Timer(0.1, request.request, ("at the time limit", TIME_LIMIT, 5.0)).start()
    outcome, dropoff = run_engine(tmp_path, SlowSource(8, 0.1), request)
    # the two under way (0.4 s each) finished within the grace; the other six never started
    assert (outcome.created, outcome.not_synced, outcome.failed) == (2, 6, 0)
    assert outcome.stopped == "at the time limit" and outcome.stop_kind == TIME_LIMIT
    assert sorted(p.name for p in dropoff.glob("*.dcm")) == ["f0.dcm", "f1.dcm"]
    # saved: the next run skips those two and fetches the rest
    outcome, _ = run_engine(tmp_path, SlowSource(8, 0.0), StopRequest())
    assert (outcome.skipped, outcome.created, outcome.stopped) == (2, 6, "")


def test_after_the_grace_the_transfers_under_way_are_abandoned(tmp_path):
    request = StopRequest()
    threading.Timer(0.1, request.request, ("after MaxDuration 1s", MAX_DURATION, 0.2)).start()
    started = time.monotonic()
    outcome, dropoff = run_engine(tmp_path, SlowSource(4, 0.5), request)
    assert time.monotonic() - started < 1.5  # not the 2 s the files under way would take
    assert (outcome.created, outcome.not_synced) == (0, 4)
    assert not list(dropoff.glob("*.dcm")) and not list((dropoff / ".clpipe-sync" / "tmp").glob("*"))


def summary(tmp_path: Path, **counts) -> dict:
    plan_like = {"created": 0, "updated": 0, "adopted": 0, **counts}
    path = tmp_path / "s.summary.json"
    path.write_text(json.dumps(plan_like))
    return plan_like


class Plan:
    """The fields of a SyncPlan an allocation's end reads."""

    def __init__(self, tmp_path: Path, continue_job: bool = True, max_continuations: int = 10):
        self.sync_logs, self.job_name, self.run_id = str(tmp_path), "flywheel_sync", "r1"
        self.summary_json = str(tmp_path / "s.summary.json")
        self.continue_job, self.max_continuations = continue_job, max_continuations
        (tmp_path / "flywheel_sync-r1.job.json").write_text(json.dumps({"job_id": "42"}))

    def record(self) -> list:
        return json.loads(Path(self.sync_logs, "flywheel_sync-r1.job.json").read_text())["continuations"]


@pytest.fixture
def in_grid_engine_job(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("JOB_ID", "42")
    monkeypatch.setenv("SGE_ROOT", "/nonexistent")


def test_an_allocation_stopped_at_the_limit_is_continued_or_fails(tmp_path, in_grid_engine_job):
    plan = Plan(tmp_path, max_continuations=2)
    started = time.time() - 5
    for n in (1, 2):
        summary(tmp_path, created=3, stop_kind=TIME_LIMIT)
        with pytest.raises(EndsHere) as raised:
            end_allocation(plan, STOPPED_EXIT, started)  # type: ignore[arg-type]
        assert raised.value.exit_code == SGE_REQUEUE_EXIT
        assert plan.record()[-1]["requeued"] and plan.record()[-1]["files_done"] == 3 and len(plan.record()) == n
    summary(tmp_path, created=3, stop_kind=TIME_LIMIT)
    assert end_allocation(plan, STOPPED_EXIT, started) == STOPPED_EXIT  # type: ignore[arg-type]
    assert "MaxContinuations (2)" in plan.record()[-1]["why"] and not plan.record()[-1]["requeued"]


def test_an_allocation_that_did_nothing_or_was_cancelled_is_not_continued(tmp_path, in_grid_engine_job):
    plan = Plan(tmp_path)
    summary(tmp_path, stop_kind=TIME_LIMIT)
    assert end_allocation(plan, STOPPED_EXIT, time.time() - 5) == STOPPED_EXIT  # type: ignore[arg-type]
    assert "no file done in this allocation" in plan.record()[-1]["why"]
    summary(tmp_path, created=2, stop_kind=SIGNAL, stopped="by SIGTERM")  # scancel / qdel: no continuation
    assert end_allocation(plan, STOPPED_EXIT, time.time() - 5) == STOPPED_EXIT  # type: ignore[arg-type]
    assert plan.record()[-1]["why"] == "stopped by SIGTERM"
    summary(tmp_path, created=2)
    assert end_allocation(plan, 0, time.time() - 5) == 0  # type: ignore[arg-type]
    assert [r["allocation"] for r in plan.record()] == [1, 2, 3] and plan.record()[-1]["why"] == "completed"
    plan = Plan(tmp_path, continue_job=False)
    summary(tmp_path, created=2, stop_kind=TIME_LIMIT)
    assert end_allocation(plan, STOPPED_EXIT, time.time() - 5) == STOPPED_EXIT  # type: ignore[arg-type]
    assert plan.record()[-1]["why"] == "stopped at the time limit; Continue is off"


def test_the_keys_and_flags_reach_the_plan_and_the_job(tmp_path):
    from clpipe.config import load_project_config
    from clpipe.plan import make_plan

    from helpers import new_project

    config = new_project(tmp_path / "p", MaxDuration="90m", Continue=False, MaxContinuations=3)
    plan = make_plan(load_project_config(config))
    assert (plan.max_duration, plan.continue_job, plan.max_continuations) == (5400, False, 3)
    job = plan.job(("true",))
    assert job.graceful and not job.requeue
    plan = make_plan(load_project_config(config, flags={"max_duration": "2h", "continue_job": True}))
    assert (plan.max_duration, plan.continue_job) == (7200, True) and plan.job(("true",)).requeue
    with pytest.raises(ConfigError, match=r"Continue: 'maybe' is not valid: expected true or false"):
        load_project_config(new_project(tmp_path / "q", Continue="maybe"))


def test_a_run_clpipe_did_not_submit_is_never_requeued(tmp_path, in_grid_engine_job):
    """A run inside a batch allocation that clpipe did not submit (an interactive shell):
    no record of its submission, so nothing is recorded and nothing requeued."""
    plan = Plan(tmp_path)
    Path(plan.sync_logs, "flywheel_sync-r1.job.json").unlink()
    summary(tmp_path, created=3, stop_kind=TIME_LIMIT)
    assert end_allocation(plan, STOPPED_EXIT, time.time() - 5) == STOPPED_EXIT  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.summary.json"]
