"""Long syncs finish by themselves (issue 14, points 1 and 2): a sync job stopped at its
time limit saves what it did, requeues itself and goes on under the same job id until it
is done; a step waiting on that id starts only then; a continuation that gets nothing done
fails instead of looping. Locally, MaxDuration and Ctrl-C stop a run the same way.

Against the real single-node SLURM and Grid Engine (scripts/infra/schedulers-up.sh) and
the bundled Flywheel server, slowed per request so a sync outlasts a 1-minute TimeUsage.
Each test is bounded (``wait_for``'s deadline, the subprocess timeouts)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

import clpipe

from helpers import PROFILES, files_under, login, new_project, wait_for

DOWNLOADS = r"/files/"  # the per-file download requests of the native engine
STOPPED_EXIT = 75


def batch_config(tmp_path: Path, scheduler: str) -> str:
    """The scheduler's profile, with a time limit (the Grid Engine one has none)."""
    if scheduler == "slurm":
        return PROFILES[scheduler][1]

    data = json.loads((Path(clpipe.__file__).parent / "data" / "batch_profiles" / PROFILES[scheduler][1]).read_text())
    data.update({"TimeCommand": "-l h_rt={time}", "TimeCommandActive": True})
    path = tmp_path / "sge-with-time.json"
    path.write_text(json.dumps(data))
    return str(path)


def project(tmp_path: Path, name: str) -> Path:
    # one download at a time, a 1-minute limit; in Flywheel's layout (as the server lists it)
    return new_project(tmp_path / name, MemUsage="500", TimeUsage="1", CoreUsage="1", CommandLineOpts="-y -j 1")


def submit(env, config: Path, profile: str, *extra) -> str:
    proc = env.clpipe("dicom", "flywheel_sync", "-c", config, "-batch_config", profile, "-submit", *extra, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"^Submitted batch job (\d+)$", proc.stdout, re.M)
    assert match, proc.stdout
    return match.group(1)


def submit_after(scheduler: str, job_id: str, folder: Path, out: Path) -> str:
    """A downstream step waiting on ``job_id``: it writes when it started and the files it saw."""
    script = out.with_suffix(".sh")
    script.write_text(
        "#!/bin/bash\n"
        f"date -u +%s > '{out}.start'\n"
        f"cd '{folder}' && find . -path ./.clpipe-sync -prune -o -type f -print | sort > '{out}'\n"
    )
    if scheduler == "slurm":
        argv = ["sbatch", "--parsable", "--mem=100", "-o", "/dev/null", f"--dependency=afterok:{job_id}", str(script)]
    else:
        argv = ["qsub", "-terse", "-S", "/bin/bash", "-j", "y", "-o", "/dev/null", "-hold_jid", job_id, str(script)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0].split(".")[0]


def record_of(config: Path) -> dict:
    return json.loads((config.parent / "logs" / "sync_logs" / "flywheel_sync-latest.job.json").read_text())


@pytest.mark.timeout(480)
def test_stopped_at_the_limit_continues_under_the_same_job_id(scheduler, no_fw_env, server, demo_project, tmp_path):
    """Every download takes 10 s, one at a time: the first allocation is warned before its
    1-minute limit, finishes what is under way, saves, and requeues itself; the next one
    syncs the rest and ends COMPLETED, under the first job id; a job submitted afterok on
    that id starts after it and sees every file."""
    login(no_fw_env, server)
    server.add_fault(DOWNLOADS, "delay", delay=10.0)
    config = project(tmp_path, "p")
    job_id = submit(no_fw_env, config, batch_config(tmp_path, scheduler))
    dropoff = config.parent / "data_DICOMs"
    seen = tmp_path / "downstream.txt"
    downstream = submit_after(scheduler, job_id, dropoff, seen)

    result = wait_for(scheduler, job_id, seconds=360)
    assert (result["state"], result["exit"]) == ("COMPLETED", 0), result["raw"]
    expected = demo_project.expected_dicom_paths(strip_root=True)
    assert files_under(dropoff) == expected

    record = record_of(config)
    assert record["job_id"] == job_id
    runs = record["continuations"]
    assert len(runs) >= 2, runs
    assert all(r["requeued"] and r["files_done"] > 0 and r["exit_status"] == STOPPED_EXIT for r in runs[:-1]), runs
    assert runs[-1]["why"] == "completed" and runs[-1]["exit_status"] == 0, runs
    assert sum(r["files_done"] for r in runs) == len(expected)  # nothing fetched twice
    if scheduler == "slurm":
        assert f"Restarts={len(runs) - 1}" in result["raw"]

    log = (config.parent / "logs" / "sync_logs" / f"Output-flywheel_sync-jobid-{job_id}.out").read_text()
    assert re.search(r"stopped at the time limit: \d of 6 remote files done", log), log
    assert "the sync goes on in its next allocation under the same job id" in log
    assert log.rstrip().endswith("sync complete: every listed file is in the dropoff"), log

    after = wait_for(scheduler, downstream, seconds=120)
    assert after["state"] == "COMPLETED", after["raw"]
    assert float((tmp_path / "downstream.txt.start").read_text()) >= datetime.fromisoformat(runs[-1]["end"]).timestamp() - 1
    assert seen.read_text().split() == sorted(f"./{p}" for p in expected)


@pytest.mark.timeout(240)
def test_a_continuation_that_gets_nothing_done_fails(scheduler, no_fw_env, server, tmp_path):
    """No download can end within an allocation: the job stops at its limit with no file
    done, and fails instead of requeueing itself for ever."""
    login(no_fw_env, server)
    server.add_fault(DOWNLOADS, "delay", delay=120.0)
    config = project(tmp_path, "p")
    job_id = submit(no_fw_env, config, batch_config(tmp_path, scheduler))
    result = wait_for(scheduler, job_id, seconds=180)
    assert (result["state"], result["exit"]) == ("FAILED", STOPPED_EXIT), result["raw"]
    runs = record_of(config)["continuations"]
    assert len(runs) == 1 and not runs[0]["requeued"] and runs[0]["files_done"] == 0, runs
    assert "no file done in this allocation" in runs[0]["why"]
    if scheduler == "slurm":
        assert "Restarts=0" in result["raw"]


def run_here(env, config: Path, *extra, interrupt_after: float | None = None) -> tuple[int, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "clpipe", "dicom", "flywheel_sync", "-c", str(config), "-submit", *extra],
        env=env.vars,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if interrupt_after is not None:
        time.sleep(interrupt_after)
        proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=90)
    return proc.returncode, out


@pytest.mark.timeout(200)
def test_max_duration_and_ctrl_c_stop_a_local_run_gracefully(no_fw_env, server, demo_project, tmp_path):
    """MaxDuration, then Ctrl-C: each run stops with what it finished saved and reported
    (exit status 75, the summary says why); a run without them completes the rest."""
    login(no_fw_env, server)
    server.add_fault(DOWNLOADS, "delay", delay=2.0)
    config = project(tmp_path, "p")
    dropoff = config.parent / "data_DICOMs"
    logs = config.parent / "logs" / "sync_logs"
    expected = demo_project.expected_dicom_paths(strip_root=True)

    def summary() -> dict:
        return json.loads(max(logs.glob("*.summary.json"), key=lambda p: p.stat().st_mtime).read_text())

    started = time.monotonic()
    code, out = run_here(no_fw_env, config, "-max_duration", "5s")
    assert code == STOPPED_EXIT, out
    assert time.monotonic() - started < 20, out  # 5 s, the 2 s grace, the bookkeeping
    assert re.search(r"stopped after MaxDuration 5s: [1-5] of 6 remote files done", out), out
    first = summary()
    assert first["stop_kind"] == "max_duration" and first["not_synced"] >= 1 and first["created"] >= 1
    # what is in the dropoff is whole and recorded: a re-run skips exactly that
    got = files_under(dropoff)
    assert got and all(expected[p] == data for p, data in got.items())

    code, out = run_here(no_fw_env, config, interrupt_after=4.0)
    assert code == STOPPED_EXIT, out
    assert "stopping by Ctrl-C: no new transfers start" in out
    assert re.search(r"stopped by Ctrl-C: [2-5] of 6 remote files done", out), out
    assert summary()["stop_kind"] == "signal" and summary()["skipped"] == len(got)

    server.clear_faults()
    code, out = run_here(no_fw_env, config)
    assert code == 0, out
    assert files_under(dropoff) == expected
