"""Real batch submission: `clpipe dicom flywheel_sync -submit` through SLURM and Grid Engine
running on this machine (scripts/infra/schedulers-up.sh), against the bundled Flywheel server.

A missing or silent scheduler fails the test with the command that starts it;
scripts/test.sh installs and starts both, so in CI they always run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import files_under, new_project

KEY = "test-key-s3cr3t"
WEIRD = "lab's $HOME \"quoted\" dir"
PROFILES = {"slurm": ("sbatch", "slurmUNCConfig.json"), "sge": ("qsub", "sgeDukeBIAC.json")}
TERMINAL_SLURM = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
WAIT_SECONDS = 240


def _run(*argv, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(params=sorted(PROFILES))
def scheduler(request) -> str:
    name = request.param
    binary = PROFILES[name][0]
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} is not installed: the {name} tests need a real scheduler; run "
                    f"`eval \"$(scripts/infra/schedulers-up.sh)\"` as root (scripts/test.sh does it)")
    probe = _run("sinfo", "-h", "-o", "%T") if name == "slurm" else _run("qstat", "-f")
    if probe.returncode != 0:
        pytest.fail(f"{binary} is installed but {name} is not answering ({probe.stderr.strip()}); start it with scripts/infra/schedulers-up.sh")
    return name


def wait_for(scheduler: str, job_id: str) -> dict:
    """Poll (bounded) until the job has ended; return its state, exit code and times."""
    deadline = time.monotonic() + WAIT_SECONDS
    seen = []  # every record the scheduler showed of the job while it was queued or running
    while time.monotonic() < deadline:
        if scheduler == "slurm":
            proc = _run("scontrol", "show", "job", "-o", job_id)
            seen.append(proc.stdout)
            fields = dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
            if fields.get("JobState") in TERMINAL_SLURM:
                code = int(fields["ExitCode"].split(":")[0])
                return {"state": fields["JobState"], "exit": code, "start": fields["StartTime"], "end": fields["EndTime"], "raw": "\n".join(seen)}
        else:
            queued = _run("qstat", "-j", job_id)
            seen.append(queued.stdout)
            if "error reason" in queued.stdout:  # Eqw: it would wait for qdel forever
                _run("qdel", job_id)
                return {"state": "ERROR", "exit": -1, "start": "", "end": "", "raw": queued.stdout}
            if queued.returncode != 0:  # no longer queued or running
                proc = _run("qacct", "-j", job_id)
                if proc.returncode == 0:
                    fields = dict(re.findall(r"^(\w+)\s+(.*?)\s*$", proc.stdout, re.M))
                    code = int(fields["exit_status"].split()[0])
                    return {"state": "COMPLETED" if code == 0 and fields["failed"].startswith("0") else "FAILED",
                            "exit": code, "start": fields["start_time"], "end": fields["end_time"], "raw": "\n".join([*seen, proc.stdout])}
        time.sleep(0.5)
    raise AssertionError(f"{scheduler} job {job_id} did not finish within {WAIT_SECONDS} s")


def when(scheduler: str, text: str) -> datetime:
    return datetime.fromisoformat(text) if scheduler == "slurm" else datetime.strptime(text, "%a %b %d %H:%M:%S %Y")


def submit(env, config: Path, scheduler: str, *extra) -> str:
    proc = env.clpipe("dicom", "flywheel_sync", "-c", config, "-batch_config", PROFILES[scheduler][1], "-submit", *extra, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"^Submitted batch job (\d+)$", proc.stdout, re.M)
    assert match, proc.stdout
    return match.group(1)


def project_for(tmp_path: Path, name: str = "p") -> Path:
    # small resources so the one-node test cluster can run it; a path that needs quoting;
    # an e-mail address, so the profile's failure-mail option goes to the real scheduler too
    config = new_project(tmp_path / WEIRD / name, MemUsage="500", TimeUsage="0:10:0", CoreUsage="1")
    data = json.loads(config.read_text())
    data["EmailAddress"] = "pi@lab.example.edu"
    config.write_text(json.dumps(data, indent=2))
    return config


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
    strip = lambda s: [l for l in s.splitlines() if not l.startswith(("# Written", "exec "))]  # noqa: E731
    assert strip(written) == strip(shown_script)
