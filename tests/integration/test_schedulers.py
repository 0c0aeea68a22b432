"""Real batch submission: `clpipe dicom flywheel_sync -submit` through SLURM and Grid Engine
running on this machine (scripts/infra/schedulers-up.sh), against the bundled Flywheel server.

A missing or silent scheduler fails the test with the command that starts it;
scripts/test.sh installs and starts both, so in CI they always run."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import pytest

from helpers import KEY, PROFILES, files_under, project_for, wait_for


def when(scheduler: str, text: str) -> datetime:
    return datetime.fromisoformat(text) if scheduler == "slurm" else datetime.strptime(text, "%a %b %d %H:%M:%S %Y")


def submit(env, config: Path, scheduler: str, *extra) -> str:
    proc = env.clpipe("dicom", "flywheel_sync", "-c", config, "-batch_config", PROFILES[scheduler][1], "-submit", *extra, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"^Submitted batch job (\d+)$", proc.stdout, re.M)
    assert match, proc.stdout
    return match.group(1)


@pytest.mark.fwcli
def test_clean_sync_completes_and_is_recorded(scheduler, fw_env, server, demo_project, tmp_path):
    fw_env.fw_login(server.login_key(KEY))
    config = project_for(tmp_path)
    root = config.parent
    job_id = submit(fw_env, config, scheduler)
    result = wait_for(scheduler, job_id)
    assert (result["state"], result["exit"]) == ("COMPLETED", 0), result["raw"]

    assert files_under(root / "data_DICOMs") == demo_project.expected_dicom_paths(strip_root=True)
    logs = root / "logs" / "sync_logs"
    output = logs / f"Output-flywheel_sync-jobid-{job_id}.out"
    text = output.read_text()
    assert "sync complete" in text and "Sync summary: 14 created" in text

    records = sorted(logs.glob("flywheel_sync-*.job.json"))
    record = json.loads((logs / "flywheel_sync-latest.job.json").read_text())
    assert record["job_id"] == job_id and record["scheduler"] == scheduler
    assert Path(record["script"]).is_file() and record["output"] == str(output)
    assert len(records) == 2  # this run's record and the -latest copy

    # no secret in the script, the submit record, or the scheduler's record of the job
    script = Path(record["script"]).read_text()
    assert "pi@lab.example.edu" in script  # failure mail requested through the profile
    assert KEY not in script
    assert KEY not in json.dumps(record)
    assert KEY not in result["raw"]


@pytest.mark.fwcli
def test_a_failed_file_fails_the_job(scheduler, fw_env, server, demo_project, tmp_path):
    fw_env.fw_login(server.login_key(KEY))
    server.add_fault(r"/files/localizer\.dcm$", "status", status=404)
    config = project_for(tmp_path)
    job_id = submit(fw_env, config, scheduler)
    result = wait_for(scheduler, job_id)
    assert result["state"] == "FAILED" and result["exit"] != 0, result["raw"]
    output = config.parent / "logs" / "sync_logs" / f"Output-flywheel_sync-jobid-{job_id}.out"
    assert "localizer.dcm" in output.read_text() and "sync FAILED" in output.read_text()


@pytest.mark.fwcli
def test_dependency_chain_runs_in_order(scheduler, fw_env, server, tmp_path):
    fw_env.fw_login(server.login_key(KEY))
    server.add_fault(r"/files/localizer\.dcm$", "delay", delay=3.0)  # make the first job take a while
    first = submit(fw_env, project_for(tmp_path, "first"), scheduler)
    second = submit(fw_env, project_for(tmp_path, "second"), scheduler, "-after", first)
    a, b = wait_for(scheduler, first), wait_for(scheduler, second)
    assert a["state"] == b["state"] == "COMPLETED", (a["raw"], b["raw"])
    assert when(scheduler, b["start"]) >= when(scheduler, a["end"])


@pytest.mark.fwcli
def test_script_written_and_submitted_matches_printout(scheduler, fw_env, server, tmp_path):
    """What `-submit` runs is what the print mode showed (same directives and command)."""
    fw_env.fw_login(server.login_key(KEY))
    config = project_for(tmp_path)
    shown = fw_env.clpipe("dicom", "flywheel_sync", "-c", config, "-batch_config", PROFILES[scheduler][1]).stdout
    shown_script = shown.split("--- script ---\n", 1)[1].split("\n--------------", 1)[0]
    job_id = submit(fw_env, config, scheduler)
    wait_for(scheduler, job_id)
    record = json.loads((config.parent / "logs" / "sync_logs" / "flywheel_sync-latest.job.json").read_text())
    written = Path(record["script"]).read_text()
    strip = lambda s: [l for l in s.splitlines() if not l.startswith(("# Written", "exec "))]  # noqa: E731, E741
    assert strip(written) == strip(shown_script)
