"""Sharded syncs and schedules without a scheduler: the shard rule, the shard tasks' own
bookkeeping and its merge, the subjects the sources give, the scheduler flags, and the
refusals of -shards and -every (the real SLURM / Grid Engine runs are in
tests/integration/test_shards_schedule.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from clpipe.arrays import task_plan
from clpipe.batch.array import array_flags, as_array, begin_flags
from clpipe.batch.scheduler import Submission
from clpipe.errors import PreflightError
from clpipe.plan import SyncPlan
from clpipe.sources.base import RemoteEntry
from clpipe.sync.manifest import Record, SyncState
from clpipe.sync.shards import ShardState, ShardView, shard_of


def test_the_shard_rule_is_the_documented_one_and_stable():
    # sha256 of the label, its first 8 bytes as a big-endian number, mod N (docs/batch.md)
    for label in ("sub-01", "SUBJ 7", "Ünïcode", "1.2.840.99"):
        digest = hashlib.sha256(label.encode("utf-8")).digest()
        assert shard_of(label, 7) == int.from_bytes(digest[:8], "big") % 7
    # pinned, so that a change of the rule (which would move subjects between shards) is seen
    assert [shard_of(f"sub-{i:02d}", 3) for i in range(1, 6)] == [1, 2, 2, 2, 0]
    assert shard_of("", 5) == 0 and shard_of("sub-01", 1) == 0 and shard_of("sub-01", 0) == 0
    spread = Counter(shard_of(f"PATIENT-{i}", 4) for i in range(4000))
    assert sorted(spread) == [0, 1, 2, 3] and all(900 < n < 1100 for n in spread.values())


def entry(key: str, subject: str) -> RemoteEntry:
    return RemoteEntry(key=key, path=key, size=1, modified=0.0, checksum=None, unpack=False, subject=subject)


def test_a_shard_task_sees_only_its_subjects_and_notes_an_empty_shard():
    listing = [entry(f"f{i}", f"sub-{i % 5 + 1:02d}") for i in range(20)] + [entry("project.txt", "")]
    seen = {index: [e.key for e in ShardView(index, 3).filter(listing)] for index in range(3)}
    assert sorted(k for keys in seen.values() for k in keys) == sorted(e.key for e in listing)  # each once
    assert "project.txt" in seen[0]  # of no subject: shard 0
    view = ShardView(1, 3)
    assert [e.subject for e in view.filter(listing)] == ["sub-01"] * 4
    assert view.notes() == ["shard 1 of 3: 4 of 21 listed items, 1 subject"]
    empty = ShardView(2, 3)
    assert list(empty.filter([entry("a", "sub-05")])) == []
    assert empty.notes() == [
        "shard 2 of 3: none of the 1 listed items is of a subject of this shard; nothing to do (an empty shard is complete)"
    ]
    whole = ShardView()
    assert len(list(whole.filter(listing))) == 21 and whole.notes() == [] and type(whole.state(Path("/x"), "r")) is SyncState


def test_shard_tasks_keep_their_own_bookkeeping_and_any_later_sync_merges_it(tmp_path):
    earlier = SyncState(tmp_path, "run0")
    earlier.acquire()
    earlier.load()
    earlier.record(Record("old", [1, 0, ""], [["old.dcm", 1, ""]]))
    earlier.save()
    earlier.release()
    manifest = tmp_path / ".clpipe-sync" / "manifest.jsonl"
    before = manifest.read_bytes()
    for index in (0, 1):
        state = ShardState(tmp_path, "run1", index)
        state.acquire()
        state.load()
        assert state.get("old") is not None  # what earlier runs synced is known to every shard
        state.record(Record(f"k{index}", [1, 0, ""], [[f"s{index}.dcm", 1, ""]]))
        state.save()
        state.release()
    assert manifest.read_bytes() == before  # no task writes the dropoff's manifest
    shard_files = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / ".clpipe-sync").rglob("*") if p.is_file())
    assert shard_files == [
        ".clpipe-sync/manifest.jsonl",
        ".clpipe-sync/shard-0/journal-run1.jsonl",
        ".clpipe-sync/shard-1/journal-run1.jsonl",
    ]
    merge = SyncState(tmp_path, "run1", shards_ended=True)
    merge.acquire()
    merge.load()
    merge.save()
    merge.release()
    assert sorted(json.loads(line)["key"] for line in manifest.read_text().splitlines()[1:-1]) == ["k0", "k1", "old"]
    assert not list((tmp_path / ".clpipe-sync").glob("shard-*"))


def test_a_shard_and_a_plain_sync_never_write_the_dropoff_at_once(tmp_path):
    plain = SyncState(tmp_path, "plain")
    plain.acquire()
    with pytest.raises(PreflightError, match="another sync is writing to .*; wait for it"):
        ShardState(tmp_path, "arr", 0).acquire()
    assert not (tmp_path / ".clpipe-sync" / "shard-0" / "lock").exists()  # its own lock was given back
    plain.release()
    shard = ShardState(tmp_path, "arr", 2)
    shard.acquire()
    other = ShardState(tmp_path, "arr", 1)  # shards run side by side
    other.acquire()
    other.release()
    with pytest.raises(PreflightError, match="a shard of a sharded sync is writing to .*shard-2/lock"):
        SyncState(tmp_path, "plain2").acquire()
    assert not (tmp_path / ".clpipe-sync" / "lock").exists()
    shard.release()
    SyncState(tmp_path, "plain3").acquire()


def test_the_sources_give_the_subject_label():
    from clpipe.sources.dicom import DicomQuery, Series, entries
    from clpipe.sources.flywheel import _subject_of

    class Listing:
        def series(self, query):
            yield Series({"PatientID": "P1", "PatientName": "DOE^J", "SeriesInstanceUID": "1.1", "StudyDate": "20240101"}, 1)
            yield Series({"PatientName": "ROE^R", "SeriesInstanceUID": "1.2", "StudyDate": "20240101"}, 1)

    assert [e.subject for e in entries(Listing(), DicomQuery())] == ["P1", "ROE^R"]  # PatientID, else PatientName
    assert _subject_of("/study/SUBJECTS/sub 01/SESSIONS/s/ACQUISITIONS/a/FILES") == "sub 01"
    assert _subject_of("/study/SUBJECTS/sub-02/FILES") == "sub-02"
    assert _subject_of("/study/FILES") == ""


def test_array_and_start_time_flags():
    assert array_flags("slurm", 3) == ("--array=0-2",)
    assert array_flags("slurm", 10, 4) == ("--array=0-9%4",)
    assert array_flags("sge", 10, 4) == ("-t", "1-10", "-tc", "4")
    assert array_flags("sge", 3, 3) == ("-t", "1-3")  # a throttle of all of them is none
    assert begin_flags("slurm", 86400) == ("--begin=now+86400",)
    now = time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))
    assert begin_flags("sge", 3600, now=now) == ("-a", "202601020404.05")
    slurm = Submission(
        "slurm",
        Path("/l/s.sh"),
        "#SBATCH --output=Output-x-jobid-%j.out\n",
        ("sbatch", "--parsable", "/l/s.sh"),
        Path("/l"),
        "Output-x-jobid-%j.out",
    )
    tasks = as_array(slurm, 3, 2)
    assert tasks.argv == ("sbatch", "--parsable", "--array=0-2%2", "/l/s.sh")
    assert tasks.script == "#SBATCH --output=Output-x-jobid-%A_%a.out\n" and tasks.output_pattern == "Output-x-jobid-%A_%a.out"
    sge = Submission(
        "sge",
        Path("/l/s.sh"),
        "exec >>'/l'/Output-x-jobid-\"$JOB_ID\".out 2>&1\n",
        ("qsub", "-terse", "/l/s.sh"),
        Path("/l"),
        "Output-x-jobid-$JOB_ID.out",
    )
    tasks = as_array(sge, 3)
    assert tasks.argv == ("qsub", "-terse", "-t", "1-3", "/l/s.sh")
    assert tasks.script == 'exec >>\'/l\'/Output-x-jobid-"$JOB_ID"."$SGE_TASK_ID".out 2>&1\n'


def test_an_array_task_runs_its_own_shard(monkeypatch, tmp_path):
    plan = SyncPlan(
        run_id="r1",
        source_url="fw://lab/study/",
        dropoff=str(tmp_path / "d"),
        temp_dir=str(tmp_path / "t"),
        sync_logs=str(tmp_path),
        audit_csv=str(tmp_path / "flywheel_sync-r1.csv"),
        log_path=str(tmp_path / "flywheel_sync-r1.log"),
        fw_argv=(),
        job_name="flywheel_sync",
        resources={"time_seconds": 60, "mem_mb": 100, "cores": 1},
        engine="native",
        summary_json=str(tmp_path / "flywheel_sync-r1.summary.json"),
        shards=3,
    )
    for name in ("SLURM_ARRAY_TASK_ID", "SGE_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(PreflightError, match="split into 3 shards: it runs as the tasks of an array job"):
        task_plan(plan)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    mine = task_plan(plan)
    assert (mine.shard, mine.summary_json, mine.audit_csv) == (
        2,
        str(tmp_path / "flywheel_sync-r1.shard-2.summary.json"),
        str(tmp_path / "flywheel_sync-r1.shard-2.csv"),
    )
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.setenv("SGE_TASK_ID", "1")  # Grid Engine counts from 1
    assert task_plan(plan).shard == 0
    assert SyncPlan.from_json(mine.to_json()).shard == 2


def clpipe(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clpipe", *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-shards", "3"], "-shards 3: an array job needs a batch system; set BatchConfig or -batch_config, or remove -shards"),
        (["-every", "1d"], "-every: a schedule needs a batch system (each run submits the next); set BatchConfig or -batch_config"),
        (["-every", "10s"], "-every: '10s' is not valid: expected at least a minute between runs"),
        (["-every", "soon"], "-every: 'soon' is not valid: expected a duration such as 30m"),
        (
            ["-shards", "3", "-batch_config", "slurmUNCConfig.json", "-engine", "fw-cli"],
            'fw sync cannot sync a part of a project; set Engine to "native"',
        ),
        (["-shards", "3", "-batch_config", "pittWorkstation.json"], "has no known array jobs; use SLURM or Grid Engine"),
    ],
)
def test_what_shards_and_every_refuse(tmp_path, args, message):
    assert clpipe("project_setup", "-project_title", "t", "-project_dir", tmp_path / "p", "-source_url", "fw://lab/study/").returncode == 0
    config = tmp_path / "p" / "clpipe_config.json"
    data = json.loads(config.read_text())
    del data["SourceOptions"]["LayoutTemplate"]  # so that fw-cli may be asked for
    config.write_text(json.dumps(data))
    proc = clpipe("dicom", "flywheel_sync", "-c", config, *args)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_shards_refuse_delete(tmp_path):
    assert clpipe("project_setup", "-project_title", "t", "-project_dir", tmp_path / "p", "-source_url", "fw://lab/study/").returncode == 0
    config = tmp_path / "p" / "clpipe_config.json"
    data = json.loads(config.read_text())
    data["SourceOptions"].update(CommandLineOpts="-y --delete", Shards=4, ArrayThrottle=2)
    config.write_text(json.dumps(data))
    proc = clpipe("dicom", "flywheel_sync", "-c", config, "-batch_config", "slurmUNCConfig.json")
    assert proc.returncode == 2 and "-shards 4: --delete needs the whole listing" in proc.stderr


def test_each_task_gets_a_login_file_of_its_own(monkeypatch, tmp_path):
    """A login from the submitting shell (a DICOMweb password) reaches every task through a
    hand-off file of its own, which that task deletes; the final job, which needs no login,
    gets none (unless it must submit the next run of a schedule)."""
    from clpipe.arrays import plan_array, task_environment
    from clpipe.batch.config import load_batch_config
    from clpipe.batch.handoff import HANDOFF_VAR, handoff_path
    from clpipe.batch.job import Job, Resources

    monkeypatch.setattr("clpipe.batch.array.max_array_size", lambda scheduler: None)
    plan = SyncPlan.from_json(
        json.dumps(
            {
                "run_id": "r1",
                "source_url": "file:///data",
                "dropoff": str(tmp_path / "d"),
                "temp_dir": str(tmp_path / "t"),
                "sync_logs": str(tmp_path),
                "audit_csv": str(tmp_path / "dicom_sync-r1.csv"),
                "log_path": str(tmp_path / "dicom_sync-r1.log"),
                "fw_argv": [],
                "job_name": "dicom_sync",
                "resources": {"time_seconds": 600, "mem_mb": 100, "cores": 1},
                "engine": "native",
                "shards": 3,
            }
        )
    )
    job = Job(
        "dicom_sync",
        ("python", "run"),
        Resources(600, 100, 1),
        tmp_path / "x.log",
        tmp_path,
        {HANDOFF_VAR: "h"},
        ("CLPIPE_DICOMWEB_PASSWORD",),
    )
    batch = load_batch_config("slurmUNCConfig.json", tmp_path)
    array = plan_array(plan, job, batch, None, "dicom_sync-r1", None, False)
    assert array.handoffs == tuple(handoff_path(f"dicom_sync-r1.task-{i}") for i in range(3))
    assert f"export CLPIPE_HANDOFF_FILE={shlex.quote(str(handoff_path('dicom_sync-r1.task-{task}')))}" in array.tasks.script
    assert "CLPIPE_HANDOFF_FILE" not in array.final.script and array.final_job.pass_env == ()
    monkeypatch.setenv(HANDOFF_VAR, str(handoff_path("dicom_sync-r1.task-{task}")))
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    task_environment()
    assert Path(os.environ[HANDOFF_VAR]) == handoff_path("dicom_sync-r1.task-1")
