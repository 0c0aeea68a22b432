"""Sharded syncs (`-shards N`: an array job by subject, then one final job) and schedules
(`-every`: each run submits the next) through the real SLURM and Grid Engine on this
machine (scripts/infra/schedulers-up.sh), against the bundled Flywheel server."""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

import pytest

from helpers import PROFILES, files_under, login, project_for, wait_for


@pytest.fixture
def demo_project():
    """Five subjects, so that each of 3 shards has some (sha256 rule: sub-05 -> 0, sub-01 ->
    1, sub-02..04 -> 2; tests/unit/test_shards.py pins the rule)."""
    from clpipe.testing.fwserver import make_demo_project

    return make_demo_project(group="lab", label="study", subjects=5, sessions=1, acquisitions=2, slices=2, non_dicom=False)


def submit_sharded(env, config: Path, scheduler: str, shards: int = 3) -> tuple[str, str, str]:
    proc = env.clpipe(
        "dicom", "flywheel_sync", "-c", config, "-batch_config", PROFILES[scheduler][1], "-submit", "-shards", shards, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    final = re.fullmatch(r"Submitted batch job (\d+)", lines[-1])  # the final job's line comes last
    array = re.search(rf"^Submitted array job (\d+): {shards} shards by subject", proc.stdout, re.M)
    assert final and array, proc.stdout
    return array.group(1), final.group(1), proc.stdout


def shard_summaries(logs: Path) -> dict[int, dict]:
    found = {}
    for path in logs.glob("flywheel_sync-*.shard-*.summary.json"):
        found[int(path.name.split(".shard-")[1].split(".")[0])] = json.loads(path.read_text())
    return found


def expected_bytes(project) -> list[bytes]:
    return sorted(project.expected_dicom_paths(strip_root=True).values())


def test_three_shards_land_every_file_once(scheduler, no_fw_env, server, demo_project, tmp_path):
    login(no_fw_env, server)
    config = project_for(tmp_path)
    root = config.parent
    logs = root / "logs" / "sync_logs"
    array_id, final_id, _ = submit_sharded(no_fw_env, config, scheduler)
    result = wait_for(scheduler, final_id)
    assert (result["state"], result["exit"]) == ("COMPLETED", 0), result["raw"]

    landed = files_under(root / "data_DICOMs")
    assert sorted(landed.values()) == expected_bytes(demo_project)
    # every shard did a part, none did another's: each file was written once, by one task
    parts = shard_summaries(logs)
    assert sorted(parts) == [0, 1, 2] and all(p["created"] > 0 and p["failed"] == 0 for p in parts.values())
    assert sum(p["created"] for p in parts.values()) == len(landed)
    state = root / "data_DICOMs" / ".clpipe-sync"
    assert not list(state.glob("shard-*"))  # merged: no shard's bookkeeping is left
    keys = [json.loads(line)["key"] for line in (state / "manifest.jsonl").read_text().splitlines()[1:-1]]
    assert len(keys) == len(set(keys)) == 5 * 3  # 2 series zips and a localizer per subject
    (summary_path,) = [p for p in logs.glob("flywheel_sync-*.summary.json") if ".shard-" not in p.name]
    summary = json.loads(summary_path.read_text())
    assert [s["state"] for s in summary["shards"]] == ["COMPLETED"] * 3 and summary["created"] == len(landed)
    # the final job merged the shards' sessions as one run's: five complete sessions, each once
    assert session_states(root) == {f"sub-{i:02d}": "complete" for i in range(1, 6)}
    assert summary["sessions"]["complete"] == 5
    tsv = Path(summary["sessions_tsv"]).read_text().splitlines()
    assert len(tsv) == 1 + 5 and all(line.split("\t")[3] == "complete" for line in tsv[1:])
    with open(summary["audit_csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["dest_path"] for r in rows) == sorted(landed)  # one row per file

    record = json.loads((logs / "flywheel_sync-latest.job.json").read_text())
    assert record["job_id"] == final_id and record["array_job_id"] == array_id and record["shards"] == 3
    output = Path(record["output"]).read_text()
    assert "sync complete" in output and "(3 shards)" in output
    tasks = sorted(logs.glob(f"Output-flywheel_sync-jobid-{array_id}[._]*.out"))
    assert len(tasks) == 3 and all("sync complete" in t.read_text() for t in tasks)
    # a second run, in 5 shards (two of them without a subject: sub-01..05 -> 1, 1, 2, 2, 3),
    # has nothing to do; its empty shards are complete, with a note
    _, final2, out2 = submit_sharded(no_fw_env, config, scheduler, 5)
    assert wait_for(scheduler, final2)["state"] == "COMPLETED"
    run2 = re.search(r"flywheel_sync-([0-9a-f-]+)\.job\.json", out2).group(1)
    summary2 = json.loads((logs / f"flywheel_sync-{run2}.summary.json").read_text())
    assert [s["state"] for s in summary2["shards"]] == ["COMPLETED"] * 5
    assert (summary2["created"], summary2["skipped"], summary2["failed"]) == (0, len(landed), 0)
    empty = json.loads((logs / f"flywheel_sync-{run2}.shard-4.summary.json").read_text())
    assert any("nothing to do (an empty shard is complete)" in note for note in empty["notes"])


def test_a_shard_that_meets_a_404_fails_the_final_job(scheduler, no_fw_env, server, demo_project, tmp_path):
    login(no_fw_env, server)
    sub01 = demo_project.subjects[0].sessions[0].acquisitions[0]  # sub-01: shard 1
    server.add_fault(rf"/{sub01.id}/files/localizer\.dcm$", "status", status=404)
    config = project_for(tmp_path)
    root = config.parent
    _, final_id, _ = submit_sharded(no_fw_env, config, scheduler)
    result = wait_for(scheduler, final_id)
    assert result["state"] == "FAILED" and result["exit"] != 0, result["raw"]
    parts = shard_summaries(root / "logs" / "sync_logs")
    assert [parts[i]["failed"] for i in range(3)] == [0, 1, 0]
    landed = sorted(files_under(root / "data_DICOMs").values())
    missing = next(f.content for f in sub01.files if f.name == "localizer.dcm")
    assert landed == sorted(b for b in expected_bytes(demo_project) if b != missing)  # the other shards' files are in place
    output = Path(json.loads((root / "logs" / "sync_logs" / "flywheel_sync-latest.job.json").read_text())["output"]).read_text()
    assert "localizer.dcm" in output and "sync FAILED: shard 1 of 3 failed" in output
    assert session_states(root) == {"sub-01": "partial", **{f"sub-{i:02d}": "complete" for i in range(2, 6)}}


def session_states(root: Path) -> dict[str, str]:
    """subject -> state of the dropoff's sessions (one session per subject here)."""
    data = json.loads((root / "data_DICOMs" / ".clpipe-sync" / "sessions.json").read_text())
    states = {r["source_subject"]: r["state"] for r in data["sessions"]}
    assert len(states) == len(data["sessions"])
    return states


def test_more_shards_than_the_cluster_allows_are_refused(scheduler, no_fw_env, tmp_path):
    config = project_for(tmp_path)
    limit, where = {"slurm": (1001, "MaxArraySize"), "sge": (75000, "max_aj_tasks")}[scheduler]
    proc = no_fw_env.clpipe("dicom", "flywheel_sync", "-c", config, "-batch_config", PROFILES[scheduler][1], "-shards", limit + 1)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (
        f"clpipe: error: -shards {limit + 1}: this cluster takes at most {limit} tasks in an array job "
        f"({where} in `{'scontrol show config' if scheduler == 'slurm' else 'qconf -sconf'}`); use -shards {limit} or fewer"
    )
    ok = no_fw_env.clpipe("dicom", "flywheel_sync", "-c", config, "-batch_config", PROFILES[scheduler][1], "-shards", limit)
    assert ok.returncode == 0, ok.stderr


def pending_begin(scheduler: str, job_id: str) -> str:
    """When the pending job may start, as the scheduler shows it ("" when it is not pending)."""
    if scheduler == "slurm":
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30).stdout
        fields = dict(re.findall(r"(\w+)=(\S*)", out))
        return fields.get("EligibleTime", "") if fields.get("JobState") == "PENDING" and fields.get("Reason") == "BeginTime" else ""
    out = subprocess.run(["qstat", "-j", job_id], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"^execution_time:\s+(.+)$", out, re.M)
    return match.group(1).strip() if match else ""


def test_every_leaves_a_pending_next_run_that_unschedule_removes(scheduler, no_fw_env, server, demo_project, tmp_path):
    login(no_fw_env, server)
    config = project_for(tmp_path)
    logs = config.parent / "logs" / "sync_logs"
    proc = no_fw_env.clpipe(
        "dicom", "flywheel_sync", "-c", config, "-batch_config", PROFILES[scheduler][1], "-submit", "-every", "1d", timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = re.search(r"^Submitted batch job (\d+)$", proc.stdout, re.M).group(1)
    assert "Schedule:  every 1d from the end of each run" in proc.stdout
    assert wait_for(scheduler, first)["state"] == "COMPLETED"
    chain = json.loads((logs / "schedule.json").read_text())["chains"]
    assert len(chain) == 1 and chain[0]["dropoff"] == str(config.parent / "data_DICOMs") and chain[0]["interval"] == "1d"
    following = chain[0]["job_id"]
    assert following != first and [r["job_id"] for r in chain[0]["runs"]] == [first, following]
    assert pending_begin(scheduler, following), f"job {following} is not waiting for a start time"
    output = Path(json.loads((logs / f"flywheel_sync-{chain[0]['runs'][0]['run_id']}.job.json").read_text())["output"]).read_text()
    assert f"schedule: next run submitted: job {following}" in output

    # a second -every for the same dropoff replaces the first, saying so
    again = no_fw_env.clpipe(
        "dicom", "flywheel_sync", "-c", config, "-batch_config", PROFILES[scheduler][1], "-submit", "-every", "12h", timeout=120
    )
    assert again.returncode == 0, again.stderr
    assert (
        f"replaces the one of {config.parent / 'data_DICOMs'} (every 1d, next run job {following}): cancelled job {following}"
        in again.stdout
    )
    assert not pending_begin(scheduler, following)
    second = re.search(r"^Submitted batch job (\d+)$", again.stdout, re.M).group(1)
    assert wait_for(scheduler, second)["state"] == "COMPLETED"
    chain = json.loads((logs / "schedule.json").read_text())["chains"]
    assert len(chain) == 1 and chain[0]["interval"] == "12h"
    pending = chain[0]["job_id"]
    assert pending_begin(scheduler, pending)

    gone = no_fw_env.clpipe("dicom", "unschedule", "-c", config, timeout=60)
    assert gone.returncode == 0, gone.stderr
    assert f"Unscheduled: cancelled job {pending}" in gone.stdout
    assert json.loads((logs / "schedule.json").read_text())["chains"] == []
    assert not pending_begin(scheduler, pending)
    nothing = no_fw_env.clpipe("dicom", "unschedule", "-config_file", config, timeout=60)
    assert nothing.returncode == 0 and "Nothing is scheduled for" in nothing.stdout


@pytest.mark.parametrize("scheduler", ["slurm"], indirect=True)
def test_a_dicom_source_is_sharded_by_patient(scheduler, no_fw_env, tmp_path):
    """A file:// export tree of three patients (SUB 03/x -> shard 0, SUB01 and SUB02 -> 1):
    every instance lands once, each patient's by its own shard's task."""
    from clpipe.testing import dicomdata

    desc = dicomdata.make_file_tree(tmp_path / "export")
    config = project_for(tmp_path)
    data = json.loads(config.read_text())
    data["SourceOptions"].update(SourceURL=f"file://{tmp_path / 'export'}", LayoutTemplate="")
    config.write_text(json.dumps(data, indent=2))
    proc = no_fw_env.clpipe("dicom", "sync", "-c", config, "-batch_config", PROFILES[scheduler][1], "-submit", "-shards", "2", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    final_id = re.fullmatch(r"Submitted batch job (\d+)", proc.stdout.strip().splitlines()[-1]).group(1)
    result = wait_for(scheduler, final_id)
    assert (result["state"], result["exit"]) == ("COMPLETED", 0), result["raw"]
    landed = files_under(config.parent / "data_DICOMs")
    uids = {r["SOPInstanceUID"] for r in desc["instances"]}
    assert sorted(Path(p).name for p in landed) == sorted(f"{uid}.dcm" for uid in uids)
    by_patient: dict[str, int] = {}
    for record in desc["instances"]:
        by_patient[record["PatientID"]] = by_patient.get(record["PatientID"], 0) + 1
    parts = {}
    for path in (config.parent / "logs" / "sync_logs").glob("dicom_sync-*.shard-*.summary.json"):
        parts[int(path.name.split(".shard-")[1].split(".")[0])] = json.loads(path.read_text())["created"]
    assert parts == {0: by_patient["SUB 03/x"], 1: by_patient["SUB01"] + by_patient["SUB02"]}
