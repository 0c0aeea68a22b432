"""`clpipe dicom status`'s reading and rendering (clpipe/status/): the history from the run
summaries, the session objects, `-ready`, and the page's escaping and chart. The real runs
(a sync, then status, the page in Chromium) are in tests/integration/test_status.py."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from clpipe.status import Status, read_history, session_object
from clpipe.status.page import chart, render
from clpipe.sync import sessions as S

NOW = 1_800_000_000.0


def summary(folder: Path, name: str, **data) -> Path:
    path = folder / name
    path.write_text(json.dumps({"dropoff": "/d", "created": 0, "updated": 0, "bytes": 0, **data}))
    return path


def test_history_is_the_newest_runs_of_this_dropoff_oldest_first(tmp_path):
    summary(tmp_path, "dicom_sync-20261201-100000-aaaa.summary.json", run_id="A", created=3, bytes=30, exit_state="complete",
            finished="2026-12-01T10:00:05+00:00")  # fmt: skip
    summary(tmp_path, "flywheel_sync-20261202-100000-bbbb.summary.json", run_id="B", failed=1, failures=["x: 404"])  # an older clpipe's
    summary(tmp_path, "dicom_sync-20261203-100000-cccc.summary.json", run_id="C", dropoff="/elsewhere")  # another dropoff
    summary(tmp_path, "dicom_sync-20261204-100000-dddd.shard-0.summary.json", run_id="D")  # a shard task: in its run's
    (tmp_path / "dicom_sync-20261205-100000-eeee.summary.json").write_text("{ half")  # being written
    summary(tmp_path, "dicom_sync-20261206-100000-ffff.summary.json", run_id="F", created=1, updated=1, skipped=5, bytes=7,
            exit_state="dry run", finished="2026-12-06T10:00:00+01:00")  # fmt: skip
    os.utime(tmp_path / "flywheel_sync-20261202-100000-bbbb.summary.json", (NOW, NOW))
    runs = read_history(tmp_path, "/d")
    assert [r["run_id"] for r in runs] == ["A", "F", "B"]  # by finish time (B's: its file's time, 2027)
    a, f, b = runs
    assert (a["exit_state"], a["files"], a["bytes"], a["time"]) == ("complete", 3, 30, "2026-12-01T10:00:05+00:00")
    assert (f["exit_state"], f["files"], f["files_in_place"]) == ("dry run", 2, 7)
    assert b["exit_state"] == "failed" and b["failed"] == 1 and b["time"] == S.iso(NOW)
    assert [r["run_id"] for r in read_history(tmp_path, "/d", limit=1)] == ["F"]  # the newest by the run's stamp
    assert read_history(tmp_path / "no logs yet", "/d") == []


def record(subject: str, session: str, state: str, **more) -> dict:
    return {
        "path": f"{subject}/{session}" if session else subject,
        "subject": subject,
        "session": session,
        "state": state,
        "files": 2,
        "bytes": 20,
        **more,
    }


def make_status(sessions: list[dict], history: list[dict] | None = None, refreshed: bool = False) -> Status:
    objects = [session_object(r, "/data/dropoff", refreshed) for r in sessions]
    return Status("p", "file:///x", "/data/dropoff", 1800, "", NOW, None, objects, history or [], refreshed)


def test_session_objects_and_ready_lines():
    status = make_status(
        [
            record("sübject-03", "ses 1", "complete", last_synced=NOW, source_subject="Sübject 03"),
            record("s2", "b", "arriving"),
            record("s3", "c", "converted"),
            record("s4", "", "complete"),
        ]
    )
    first = status.sessions[0]
    assert first["path"] == "/data/dropoff/sübject-03/ses 1" and first["last_synced"] == S.iso(NOW)
    assert (first["bids_subject"], first["bids_session"], first["source_subject"]) == ("subject03", "ses1", "Sübject 03")
    assert status.sessions[3]["bids_session"] is None
    assert status.ready() == ["sübject-03\tses 1\t/data/dropoff/sübject-03/ses 1", "s4\t\t/data/dropoff/s4"]
    assert status.counts == {"complete": 2, "arriving": 1, "partial": 0, "new": 0, "removed": 0, "converted": 1}
    assert "change" not in first  # only after -refresh
    refreshed = make_status(
        [record("s1", "a", "new", changed=True, base="new"), record("s2", "b", "partial", changed=True, base="partial")], refreshed=True
    )
    assert [s["change"] for s in refreshed.sessions] == ["new", "changed"] and refreshed.changes == {"new": 1, "changed": 1, "removed": 0}


def test_the_page_escapes_every_label_and_draws_one_bar_per_run_and_measure():
    hostile = '<script>alert("x")</script>'
    history = [
        {"run_id": "r1", "time": "2026-12-01T10:00:00+00:00", "exit_state": "complete", "files": 10, "bytes": 1000},
        {"run_id": "r2", "time": "2026-12-02T10:00:00+00:00", "exit_state": "failed", "files": 0, "bytes": 0},
    ]
    status = make_status([record(hostile, "a&b", "partial", failures=['f "1" <x>'])], history)
    page = render(status)
    assert hostile not in page and "&lt;script&gt;" in page and "a&amp;b" in page
    assert page.count("<script>") == 1  # the page's own script alone
    assert page.count('<tr data-state="partial">') == 1
    assert page.count('<rect class="run"') == 4 and page.count('fill="#cf222e"') == 2  # the failed run's bars are red
    assert "Content-Security-Policy" in page and not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "no run summaries yet" in chart([]) and "<rect" not in chart([])
