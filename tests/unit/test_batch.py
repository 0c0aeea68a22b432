"""Batch configurations and the scripts rendered from them (no scheduler needed)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from clpipe.batch.config import builtin_profiles, load_batch_config
from clpipe.batch.job import Job, Resources
from clpipe.batch.scheduler import memory_value, parse_job_id, render
from clpipe.errors import ConfigError

WEIRD = 'lab\'s $HOME "quoted" dir'


def job(tmp_path: Path, **kw) -> Job:
    logs = tmp_path / WEIRD / "logs" / "sync_logs"
    return Job(
        name="flywheel_sync",
        argv=("/usr/bin/python3", "-m", "clpipe", "_run_plan", str(logs / "x.plan.json")),
        resources=Resources(time_seconds=5400, mem_mb=kw.get("mem_mb", 10000), cores=2),
        log_path=logs / "x.log",
        cwd=logs,
        env={"PATH": "/opt/fw bin:/usr/bin"},
    )


def test_builtin_profiles_load_with_their_scheduler():
    kinds = {name: load_batch_config(name, Path("/nonexistent")).scheduler for name in builtin_profiles()}
    assert kinds == {
        "pittWorkstation.json": "generic",
        "sgeDukeBIAC.json": "sge",
        "slurmUNCConfig.json": "slurm",
        "slurmUVAConfig.json": "slurm",
    }
    assert load_batch_config("slurmUNCConfig", Path("/x")).name == "slurmUNCConfig"  # .json optional
    for local in (None, "", "local"):
        assert load_batch_config(local, Path("/x")) is None


def test_profile_name_typo_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'slurmUNCConfig.json'\?"):
        load_batch_config("slurmUNCconfig.json", tmp_path)
    with pytest.raises(ConfigError, match=r"neither a file"):
        load_batch_config("conf/mine.json", tmp_path)


def write(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "batch.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_custom_file_in_either_spelling(tmp_path):
    legacy = load_batch_config(
        write(tmp_path, {"SubmissionHead": "sbatch", "MemoryCommand": "--mem=", "TimeCommandActive": False}), tmp_path
    )
    assert legacy.scheduler == "slurm" and legacy.memory_command == "--mem="
    snake = load_batch_config(
        write(tmp_path, {"submission_head": "qsub", "memory_command": "-l h_vmem={mem}G", "output_command_Active": True}), tmp_path
    )
    assert snake.scheduler == "sge" and snake.output_command_active is True
    relative = load_batch_config("batch.json", tmp_path)  # relative to the project directory
    assert relative.scheduler == "sge"


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"SubmissionHead": "sbatch", "MemoryComand": "--mem="},
            r"unknown batch configuration key 'MemoryComand'; did you mean 'MemoryCommand'\?",
        ),
        ({"SubmissionHead": "sbatch", "TimeCommandActive": "yes"}, r"TimeCommandActive: expected true or false"),
        ({"SubmissionHead": "sbatch", "SubmissionOptions": [{"command": "-n"}]}, r"SubmissionOptions: each entry must be"),
        ({"MemoryCommand": "--mem="}, r"SubmissionHead \(or submission_head\) is missing"),
        ([], r"expected a JSON object"),
    ],
)
def test_invalid_batch_files(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        load_batch_config(write(tmp_path, data), tmp_path)


def test_bad_json_batch_file(tmp_path):
    path = tmp_path / "b.json"
    path.write_text('{"SubmissionHead": "sbatch",,}')
    with pytest.raises(ConfigError, match=r"not valid JSON at line 1, column \d+"):
        load_batch_config(str(path), tmp_path)


@pytest.mark.parametrize(
    "template, scheduler, expected",
    [
        ("--mem={mem}", "slurm", "10000"),
        ("--mem=", "slurm", "10000"),
        ("-l h_vmem={mem}G", "sge", "10"),
        ("-l h_vmem={mem}", "sge", "10000M"),
        ("-l h_vmem={mem}M", "sge", "10000"),
        ("--mem={mem}G", "slurm", "10"),
    ],
)
def test_memory_units_follow_template_and_scheduler(template, scheduler, expected):
    assert memory_value(template, 10000, scheduler) == expected


def test_slurm_script_directives_and_quoting(tmp_path):
    batch = load_batch_config("slurmUNCConfig.json", tmp_path)
    sub = render(job(tmp_path), batch, "pi@lab.edu", tmp_path / "s.sh", after="123")
    lines = sub.script.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH -n 1",
        "#SBATCH --mem=10000",
        "#SBATCH --time=1:30:00",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --job-name=flywheel_sync",
        "#SBATCH --mail-user=pi@lab.edu --mail-type=FAIL",
        "#SBATCH --output=Output-flywheel_sync-jobid-%j.out",
    ]
    assert "set -euo pipefail" in lines
    assert sub.argv == ("sbatch", "--no-requeue", "--parsable", "--dependency=afterok:123", str(tmp_path / "s.sh"))
    assert sub.cwd == tmp_path / WEIRD / "logs" / "sync_logs"
    # the script's command survives a shell: bash parses it back into the same argv
    exec_line = next(line for line in lines if line.startswith("exec "))
    assert shlex.split(exec_line)[1:] == list(job(tmp_path).argv)
    out = subprocess.run(
        ["bash", "-c", exec_line.replace("exec ", "printf '%s\\n' ", 1)], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines() == list(job(tmp_path).argv)
    assert "export PATH='/opt/fw bin:/usr/bin'" in lines


def test_sge_script_converts_memory_and_waits_with_hold_jid(tmp_path):
    batch = load_batch_config("sgeDukeBIAC.json", tmp_path)
    sub = render(job(tmp_path, mem_mb=3000), batch, None, tmp_path / "s.sh", after="77")
    directives = [line for line in sub.script.splitlines() if line.startswith("#$")]
    assert "#$ -l h_vmem=3G" in directives and "#$ -N flywheel_sync" in directives
    assert "#$ -o /dev/null" in directives and "#$ -j y" in directives
    # Grid Engine would expand the `$HOME` in this path: the script logs for itself instead
    redirect = next(line for line in sub.script.splitlines() if line.startswith("exec >>"))
    logs = tmp_path / WEIRD / "logs" / "sync_logs"
    out = subprocess.run(
        ["bash", "-c", redirect.replace("exec >>", "printf '%s' ", 1).replace(" 2>&1", "")],
        env={"JOB_ID": "77"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == f"{logs}/Output-flywheel_sync-jobid-77.out"
    assert not any("h_rt" in d for d in directives)  # the profile has no time option
    assert sub.argv[:4] == ("qsub", "-terse", "-hold_jid", "77")


def test_bad_after_and_email(tmp_path):
    batch = load_batch_config("slurmUNCConfig.json", tmp_path)
    with pytest.raises(ConfigError, match=r"-after: '12; rm -rf /' is not a job id"):
        render(job(tmp_path), batch, None, tmp_path / "s.sh", after="12; rm -rf /")
    with pytest.raises(ConfigError, match=r"not an e-mail address"):
        render(job(tmp_path), batch, "a b@c", tmp_path / "s.sh")


def test_job_id_parsing():
    assert parse_job_id("slurm", "4242\n") == "4242"
    assert parse_job_id("slurm", "4242;cluster\n") == "4242"
    assert parse_job_id("sge", "77.1-4:1\n") == "77"
    assert parse_job_id("sge", "Your job 77 has been submitted") is None
    assert parse_job_id("generic", "queued as job 901") == "901"
    assert parse_job_id("slurm", "") is None


def test_cli_prints_script_and_submit_command(tmp_path):
    from helpers import new_project

    config = new_project(tmp_path / WEIRD)
    proc = subprocess.run(
        [sys.executable, "-m", "clpipe", "dicom", "flywheel_sync", "-c", str(config), "-batch_config", "slurmUNCConfig.json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "would run as a slurm batch job (slurmUNCConfig.json)" in proc.stdout
    submit = next(line for line in proc.stdout.splitlines() if line.startswith("Submit:"))
    words = shlex.split(submit.split(":", 1)[1])
    assert words[0] == "cd" and words[1] == str(tmp_path / WEIRD / "logs" / "sync_logs")
    # the job continues at its time limit (Continue, the default): the profile's --no-requeue is dropped
    assert words[3:5] == ["sbatch", "--parsable"] and "--no-requeue" not in words
    assert "#SBATCH --mem=10000" in proc.stdout and "#SBATCH --requeue" in proc.stdout
    assert not list((tmp_path / WEIRD / "logs" / "sync_logs").iterdir())  # printing writes nothing
    proc = subprocess.run(
        [sys.executable, "-m", "clpipe", "dicom", "flywheel_sync", "-c", str(config), "-after", "5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "needs a batch system" in proc.stderr


LOCAL_JOB = r"""
import os, sys
from pathlib import Path
from clpipe.batch.job import Job, Resources
from clpipe.batch.local import run_local
log = Path(sys.argv[1])
body = '''
import os, sys
from clpipe.batch.local import finish_job, start_job_log
start_job_log()
print("job pid", os.getpid(), os.environ.get("CLPIPE_TEST_MARK"), flush=True)
for i in range(3000):
    print("line", i, "x" * 60)
print("error line", file=sys.stderr)
print("last line", flush=True)
sys.exit(finish_job(3))
'''
print("launcher pid", os.getpid(), flush=True)
job = Job("t", (sys.executable, "-c", body), Resources(60, 100, 1), log, log.parent, {"CLPIPE_TEST_MARK": "1"})
sys.exit(run_local(job))
"""


def test_run_local_becomes_the_job_and_the_log_is_complete_when_it_returns(tmp_path):
    # the command's own process becomes the job (no idle parent holding memory), its exit
    # status is the job's; the job's stdout is on the console's stdout, its stderr on the
    # console's stderr, and the log holds both, in the order they were printed
    log = tmp_path / "logs" / "job.log"
    proc = subprocess.run([sys.executable, "-c", LOCAL_JOB, str(log)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stdout.splitlines()
    launcher, job_pid = lines[0].split()[-1], lines[1].split()[-2]
    assert launcher == job_pid and lines[1].endswith(" 1")
    assert lines[-1] == "last line" and "error line" not in lines and sum(line.startswith("line ") for line in lines) == 3000
    assert proc.stderr.splitlines() == ["error line"]
    logged = log.read_text().splitlines()
    assert logged == [*lines[1:-1], "error line", "last line"]  # the launcher's own line came before the job


def test_run_local_that_cannot_start_the_job_says_so_and_leaves_this_process_as_it_was(tmp_path):
    """A job whose program is gone: one line naming it; stdin, the working folder and the
    open files of this process are as before (no descriptor left behind)."""
    from clpipe.batch.job import Job, Resources
    from clpipe.batch.local import run_local
    from clpipe.errors import PreflightError

    job = Job("t", (str(tmp_path / "no-such-python"), "-c", "pass"), Resources(60, 100, 1), tmp_path / "job.log", tmp_path)
    fds, cwd, stdin = sorted(os.listdir("/proc/self/fd")), os.getcwd(), os.fstat(0)
    with pytest.raises(PreflightError, match=r"cannot start .*no-such-python: No such file or directory; .*install it again"):
        run_local(job)
    assert sorted(os.listdir("/proc/self/fd")) == fds and os.getcwd() == cwd
    assert (os.fstat(0).st_dev, os.fstat(0).st_ino) == (stdin.st_dev, stdin.st_ino)


def test_a_job_run_from_a_terminal_draws_its_bar_there_and_keeps_it_out_of_its_log(tmp_path):
    """A job run here on a terminal copies its output to its log through a stream that is no
    terminal, yet knows that somebody watches: the live bar goes to the terminal only."""
    import pty

    from clpipe.batch.local import JOB_LOG

    body = (
        "import sys\n"
        "from clpipe.batch.local import start_job_log\n"
        "from clpipe.sync.progress import watched\n"
        "start_job_log()\n"
        "print('stdout is a terminal:', sys.stdout.isatty(), '; watched:', watched())\n"
    )
    log = tmp_path / "job.log"
    primary, secondary = pty.openpty()
    try:
        env = {**os.environ, JOB_LOG: str(log)}
        proc = subprocess.run([sys.executable, "-c", body], stdout=secondary, stderr=subprocess.PIPE, env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
    finally:
        os.close(secondary)
        os.close(primary)
    assert log.read_text() == "stdout is a terminal: False ; watched: True\n"
    piped = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, env=env, timeout=60)
    assert piped.stdout == "stdout is a terminal: False ; watched: False\n", piped.stderr


def test_handoff_file_is_private_read_once_and_only_for_allowed_names(tmp_path, monkeypatch):
    """The DICOMweb login's hand-off: 0600 in a 0700 folder; the job takes the allowed names
    only, deletes the file, and a second start says the login is gone."""
    import stat

    from clpipe.batch.handoff import HANDOFF_VAR, take_handoff, write_handoff
    from clpipe.errors import PreflightError

    monkeypatch.setenv("CLPIPE_DICOMWEB_TOKEN", "tok-123")
    monkeypatch.setenv("OTHER_SECRET", "x")
    path = tmp_path / "home" / ".clpipe" / "handoff" / "job.json"
    write_handoff(path, ("CLPIPE_DICOMWEB_TOKEN", "OTHER_SECRET"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    monkeypatch.delenv("CLPIPE_DICOMWEB_TOKEN")
    monkeypatch.delenv("OTHER_SECRET")
    monkeypatch.setenv(HANDOFF_VAR, str(path))
    assert take_handoff(("CLPIPE_DICOMWEB_TOKEN",)) == ["CLPIPE_DICOMWEB_TOKEN"]
    assert os.environ["CLPIPE_DICOMWEB_TOKEN"] == "tok-123" and "OTHER_SECRET" not in os.environ
    assert not path.exists() and HANDOFF_VAR not in os.environ
    monkeypatch.setenv(HANDOFF_VAR, str(path))
    with pytest.raises(PreflightError, match="the login handed to this job is gone"):
        take_handoff(("CLPIPE_DICOMWEB_TOKEN",))
