"""Bulk downloads (issue 15, point 1): many small files of a scan session in one tar
(``POST /api/download`` -> ticket, ``GET /api/download?ticket=``), against the bundled
Flywheel test server, whose implementation the real flywheel-sdk's ``download_tar`` reads;
and the test servers' simulated WAN (a fixed delay per request, a bandwidth cap).

The engine must land every file once, checked (size, and the server's hash), match tar
members to listing entries exactly (hostile labels included), and fetch one by one what a
tar did not deliver: a damaged or missing member, a tar cut short.
"""

from __future__ import annotations

import gc
import io
import json
import os
import subprocess
import tarfile
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import httpx
import pytest

from clpipe.sources.flywheel import FlywheelSource, credentials_from_api_key, parse_fw_url, tar_label
from clpipe.sync.engine import Engine, Options, Outcome
from clpipe.sync.manifest import SyncState
from clpipe.testing.faultproxy import FaultProxy
from clpipe.testing.fwserver import Acquisition, FlywheelTestServer, FwFile, Project, Session, Subject, clean_label, make_demo_project

from helpers import KEY, TOOLS, files_under, need_tool

pytestmark = pytest.mark.fw

URL = parse_fw_url("fw://lab/study/")
DICOM_ONLY = {"filters": [{"types": {"+": ["dicom"]}}]}
SDK_PYTHON = os.environ.get("CLPIPE_TEST_SDK_PYTHON", str(TOOLS / "sdk" / "bin" / "python"))


class NoBulk(FlywheelSource):
    """The same source without bulk downloads: every file one request."""

    def bulk_batches(self, entries) -> list:
        return []


def engine_sync(server, dropoff: Path, source_class=FlywheelSource, jobs: int = 4, retries: int = 2, stop=None) -> Outcome:
    """One engine run of the test server's project into ``dropoff`` (its DICOM files), told
    to stop by ``stop`` (a StopRequest) if one is given."""
    source = source_class(credentials_from_api_key(server.login_key(KEY)), jobs=jobs)
    try:
        project = source.api.lookup_project(URL)
        state = SyncState(dropoff, "run-bulk")
        state.acquire()
        try:
            state.load()
            options = Options(dropoff=dropoff, zip_tmp=dropoff.parent / "ziptmp", jobs=jobs, retries=retries, backoff=0.01, stop=stop)
            outcome = Engine(source, state, options).run(source.entries(project["_id"], URL, DICOM_ONLY, {}))
            state.save()
        finally:
            state.release()
        return outcome
    finally:
        source.close()


def singles(**kw) -> Project:
    """Single DICOM files: 2 subjects x 2 sessions x 2 acquisitions x 12 slices (24 a session)."""
    args = dict(subjects=2, sessions=2, acquisitions=2, slices=12, zipped=False, fast=True, single_dicoms=True)
    return make_demo_project(**{**args, **kw})


def counts(server, since: int = 0) -> Counter:
    """Requests by kind: "ticket", "tar", "file" (one file's download), "container"."""
    out: Counter = Counter()
    for r in server.requests[since:]:
        path = r["path"]
        if path == "/api/download":
            out["ticket" if r["method"] == "POST" else "tar"] += 1
        elif "/files/" in path and r["method"] == "GET":
            out["file"] += 1
        elif path.startswith("/api/containers/") and path.count("/") == 3:
            out["container"] += 1
        elif path.endswith(("/sessions", "/acquisitions")):
            out["listing"] += 1
    return out


def sessions_of(project: Project) -> int:
    return sum(len(s.sessions) for s in project.subjects)


# --------------------------------------------------------------------------------- the bulk path


@pytest.mark.parametrize("file_system", ["fast", "slow"])
def test_bulk_lands_every_file_once_checked(tmp_path, monkeypatch, file_system):
    # fast: tars write in turn and the staged files are placed by the run's own thread;
    # slow (every file-system call counts as slow, as on NFS): side by side, in the pool
    from clpipe.sync import bulk, engine

    monkeypatch.setattr(bulk, "SLOW_IO", 1e9 if file_system == "fast" else 0.0)
    placed_by: set[str] = set()
    place = engine._place

    def watched(part, final):
        placed_by.add(threading.current_thread().name)
        place(part, final)

    monkeypatch.setattr(engine, "_place", watched)
    project = singles()
    with FlywheelTestServer([project], api_keys={KEY}) as server:
        outcome = engine_sync(server, tmp_path / "dropoff")
        if file_system == "fast":
            assert placed_by == {"MainThread"}
        else:
            assert placed_by and all(name.startswith("sync") for name in placed_by), placed_by
        assert outcome.failed == 0, outcome.failures
        expected = project.expected_dicom_paths(strip_root=True)
        assert outcome.created == len(expected)
        assert files_under(tmp_path / "dropoff") == expected
        n = counts(server)
        # one tar per session, no file downloaded alone; the hashes: the project's sessions,
        # then each session's acquisitions (not one request per acquisition)
        assert n["ticket"] == n["tar"] == sessions_of(project) and n["file"] == 0, n
        assert n["container"] == 0 and n["listing"] == 1 + sessions_of(project), n
        assert any(note.startswith(f"bulk download: {len(expected)} files in {sessions_of(project)} archives") for note in outcome.notes)
        assert not any("content not verified" in note for note in outcome.notes)  # every member's hash checked
        # nothing left staged, and a re-sync asks for nothing
        assert not [p for p in (tmp_path / "dropoff" / ".clpipe-sync" / "tmp").rglob("*") if p.is_file()]
        mark = len(server.requests)
        again = engine_sync(server, tmp_path / "dropoff")
        assert again.created == again.failed == 0 and counts(server, mark) == Counter()


def test_hashes_come_from_one_listing_per_session_or_else_per_container(tmp_path):
    """Zipped series (no bulk path): the hashes of 8 acquisitions' files are fetched ahead,
    one listing per session; when those listings fail, one request per container, as
    before; either way every file is checked against its hash."""
    project = make_demo_project(subjects=2, sessions=2, acquisitions=2, slices=2, fast=True, single_dicoms=False)
    acquisitions = sum(1 for node in project.walk() if node.kind == "acquisition")
    with FlywheelTestServer([project], api_keys={KEY}) as server:
        server.add_fault(r"\.zip$", "corrupt", count=1)  # caught by the prefetched hash, fetched again
        outcome = engine_sync(server, tmp_path / "ahead")
        n = counts(server)
        assert outcome.failed == 0 and n["container"] == 0 and n["listing"] == 1 + sessions_of(project), n
        assert n["file"] == acquisitions + 1  # one zip each, one of them twice
        mark = len(server.requests)
        server.add_fault(r"/acquisitions$", "status", status=500)
        outcome = engine_sync(server, tmp_path / "per-container")
        assert outcome.failed == 0 and counts(server, mark)["container"] == acquisitions
    assert files_under(tmp_path / "ahead") == files_under(tmp_path / "per-container") == project.expected_dicom_paths(strip_root=True)


def test_the_hash_prefetch_keeps_the_hashes_and_no_answer_behind():
    """The prefetch's answers (a session's acquisitions with every file's metadata: 4 MB
    each at 100,000 files, a few at once) were the peak of a large full sync, and httpx
    keeps a read answer's bytes on a Response that is in a reference cycle, freed only
    when the garbage collector runs. Once prefetch returns, only the hashes are held
    (name and raw digest a file), even with the collector off."""
    project = singles(slices=150, non_dicom=False)  # 8 acquisitions of 150 files: 600 a session
    with FlywheelTestServer([project], api_keys={KEY}) as server:
        source = FlywheelSource(credentials_from_api_key(server.login_key(KEY)), jobs=2)
        try:
            entries = list(source.entries(source.api.lookup_project(URL)["_id"], URL, DICOM_ONLY, {}))
            mark = len(server.requests)
            gc.collect()
            gc.disable()
            tracemalloc.start()
            try:
                source.prefetch(entries, 2)
                held = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
                gc.enable()
            listed = [r for r in server.requests[mark:] if r["path"].endswith("/acquisitions")]
            hashes = {e.key: source.checksum(e) for e in entries}
        finally:
            source.close()
    assert len(listed) == sessions_of(project) and len(entries) >= 4 * 300, (len(listed), len(entries))
    assert counts(server, mark)["container"] == 0 and all(h and h.startswith("sha384:") for h in hashes.values())
    # measured: about 490 bytes a file held (the hashes, and the test server's own records:
    # it runs in this process); with the answers kept, as before, about 1,350
    assert held < 800 * len(entries), f"{held:,} bytes held after the prefetch of {len(entries)} files' hashes"


def test_hashes_asked_per_container_keep_no_answer_behind():
    """When the listings ahead fail, the hashes are asked for one container at a time
    (``GET containers/{id}``): those answers too are read into bodies of our own, so that
    none stays on an httpx Response until the garbage collector runs."""
    project = singles(slices=150, non_dicom=False)
    with FlywheelTestServer([project], api_keys={KEY}) as server:
        server.add_fault(r"/acquisitions$", "status", status=500)
        source = FlywheelSource(credentials_from_api_key(server.login_key(KEY)), jobs=2)
        try:
            entries = list(source.entries(source.api.lookup_project(URL)["_id"], URL, DICOM_ONLY, {}))
            source.prefetch(entries, 2)  # fails: nothing fetched ahead
            mark = len(server.requests)
            gc.collect()
            gc.disable()
            tracemalloc.start()
            try:
                hashes = {e.key: source.checksum(e) for e in entries}
                held = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
                gc.enable()
        finally:
            source.close()
    assert counts(server, mark)["container"] == 8 and all(h and h.startswith("sha384:") for h in hashes.values())
    # measured: about 660 bytes a file held (the hashes, a lock per container, the test
    # server's own records); with each container's answer kept on its Response, about 1,470
    assert held < 1000 * len(entries), f"{held:,} bytes held after asking {len(entries)} files' hashes per container"


def test_a_small_session_is_fetched_file_by_file(tmp_path):
    project = singles(subjects=1, sessions=1, acquisitions=1, slices=5)
    with FlywheelTestServer([project], api_keys={KEY}) as server:
        outcome = engine_sync(server, tmp_path / "dropoff")
        assert outcome.failed == 0 and counts(server)["ticket"] == 0 and counts(server)["file"] == 6
    assert files_under(tmp_path / "dropoff") == project.expected_dicom_paths(strip_root=True)


def test_a_corrupted_member_is_fetched_again_alone(tmp_path):
    """Bytes flipped inside the first member's content (same size): its hash catches it, and
    that one file is downloaded by itself; the others of the tar land from the tar."""
    project = singles(subjects=1, sessions=1)
    with FlywheelTestServer([project], api_keys={KEY}) as server:
        server.add_fault(r"^/api/download$", "corrupt", method="GET", count=1, span=(1024 + 200, 1024 + 300))
        outcome = engine_sync(server, tmp_path / "dropoff")
        assert outcome.failed == 0, outcome.failures
        assert counts(server)["file"] == 1 and counts(server)["tar"] == 1
        assert any("1 failed their check" in note for note in outcome.notes), outcome.notes
    assert files_under(tmp_path / "dropoff") == project.expected_dicom_paths(strip_root=True)


def test_a_missing_member_and_a_cut_tar_fall_back_to_single_downloads(tmp_path):
    project = singles(subjects=1, sessions=2)
    first_acq = project.subjects[0].sessions[0].acquisitions[0]
    with FlywheelTestServer([project], api_keys={KEY}) as server:
        server.missing_content.add((first_acq.id, "IM0003.dcm"))  # in the tar: "<path>.MISSING", empty
        server.add_fault(r"^/api/download$", "truncate", method="GET", count=1)  # one of the two tars: half of it
        outcome = engine_sync(server, tmp_path / "dropoff")
        assert outcome.failed == 0, outcome.failures
        files = [r["path"] for r in server.requests if "/files/" in r["path"]]
        assert 1 <= len(files) < 26 and len(set(files)) == len(files)  # only what a tar did not deliver, once each
    assert files_under(tmp_path / "dropoff") == project.expected_dicom_paths(strip_root=True)


def test_a_refused_ticket_falls_back(tmp_path):
    project = singles(subjects=1, sessions=1)
    with FlywheelTestServer([project], api_keys={KEY}) as server:
        server.add_fault(r"^/api/download$", "status", method="POST", status=403)
        outcome = engine_sync(server, tmp_path / "dropoff")
        assert outcome.failed == 0 and counts(server)["file"] == 25 and counts(server)["tar"] == 0
        assert any("bulk download broke off" in note and "HTTP 403" in note for note in outcome.notes), outcome.notes
    assert files_under(tmp_path / "dropoff") == project.expected_dicom_paths(strip_root=True)


def test_a_server_naming_members_otherwise_costs_one_tar_per_session_and_no_file(tmp_path, monkeypatch):
    """Member paths of another form (here: labels upper-cased) match no listing entry: no
    member is taken, every file is downloaded alone, all land right."""
    import clpipe.testing.fwserver as fwserver

    monkeypatch.setattr(fwserver, "clean_label", lambda label: label.upper())
    project = singles(subjects=1, sessions=1, acquisitions=8, slices=10)  # 81 files: the tar is abandoned after 64
    with FlywheelTestServer([project], api_keys={KEY}) as server:
        outcome = engine_sync(server, tmp_path / "dropoff")
        assert outcome.failed == 0 and counts(server)["tar"] == 1 and counts(server)["file"] == 81
        assert any(note.startswith("bulk download: 0 files in 1 archives") for note in outcome.notes), outcome.notes
    assert files_under(tmp_path / "dropoff") == project.expected_dicom_paths(strip_root=True)


def test_a_stop_while_tars_stream_starts_no_tar_and_places_nothing_half(tmp_path):
    """Told to stop (sync/stopping.py) while the first tars arrive slowly: no further tar
    starts, those under way end at the stop (no grace), and nothing but whole, checked
    files is under a final name; the next run syncs the rest."""
    from clpipe.sync.stopping import MAX_DURATION, StopRequest

    project = singles(subjects=2, sessions=4)  # 8 sessions: 8 tars, 4 at once
    expected = project.expected_dicom_paths(strip_root=True)
    dropoff = tmp_path / "dropoff"
    with FlywheelTestServer([project], api_keys={KEY}) as server:
        server.add_fault(r"^/api/download$", "delay", method="GET", delay=2.0)  # each tar 2 s late
        request = StopRequest()
        request.after(1.0, "after MaxDuration", MAX_DURATION, 0)
        started = time.monotonic()
        outcome = engine_sync(server, dropoff, retries=1, stop=request)
        took = time.monotonic() - started
        assert took < 10 and counts(server)["tar"] <= 4, (took, counts(server))
        assert outcome.failed == 0 and outcome.not_synced > 0, (outcome.failures, outcome.not_synced)
        landed = files_under(dropoff)
        assert len(landed) < len(expected) and all(expected[path] == data for path, data in landed.items())
        server.clear_faults()
        again = engine_sync(server, dropoff)
        assert again.failed == 0
    assert files_under(dropoff) == expected


def test_what_a_tar_brought_before_a_stop_is_placed(tmp_path):
    """Stopped at the time limit (a grace for the transfers under way) while the tars
    stream: the files of a tar that had arrived whole are placed and journalled (renames
    only), so a continuation starts with them done; the rest is not synced."""
    from clpipe.sync.stopping import TIME_LIMIT, StopRequest

    project = singles(subjects=2, sessions=4)  # 8 sessions: 8 tars, 4 at once
    expected = project.expected_dicom_paths(strip_root=True)
    dropoff = tmp_path / "dropoff"
    with FlywheelTestServer([project], api_keys={KEY}) as server:
        server.add_fault(r"^/api/download$", "delay", method="GET", delay=0.0, count=1)  # the first tar at once
        server.add_fault(r"^/api/download$", "delay", method="GET", delay=3.0)  # the others late
        request = StopRequest()
        request.after(1.0, "at the time limit", TIME_LIMIT, 10.0)
        outcome = engine_sync(server, dropoff, retries=1, stop=request)
        landed = files_under(dropoff)
        assert outcome.created > 0 and outcome.created == len(landed) < len(expected), (outcome.created, len(landed))
        assert outcome.not_synced > 0 and outcome.failed == 0
        assert all(expected[path] == data for path, data in landed.items())
        recorded = SyncState(dropoff, "check")
        recorded.load()
        assert len(recorded) == len(landed)  # journalled: the next run skips them


def test_no_hash_on_the_server_is_said(tmp_path):
    project = singles(subjects=1, sessions=1)
    with FlywheelTestServer([project], api_keys={KEY}) as server:
        server.file_hashes = False
        outcome = engine_sync(server, tmp_path / "dropoff")
        assert outcome.failed == 0 and counts(server)["file"] == 0
        assert any(note.startswith("content not verified: 25 files") for note in outcome.notes), outcome.notes
    assert files_under(tmp_path / "dropoff") == project.expected_dicom_paths(strip_root=True)


def hostile_project() -> Project:
    """Labels the tar's cleaning makes equal or empty, with "/", "..", non-ASCII, and file
    names with "/" and ".MISSING"; every file's bytes unique."""
    n = iter(range(10_000))

    def files(*names: str) -> list[FwFile]:
        return [FwFile(name, b"DICM" + f"{name}/{next(n)}".encode() * 3) for name in names]

    many = [f"IM{i:02d}.dcm" for i in range(10)]
    session_a = Session(
        "ses 1",
        [
            Acquisition("T1w", files(*many)),
            Acquisition("T1w?", files(*many)),  # cleaned: "T1w" as well
            Acquisition("a/b", files(*many, "x/y.dcm")),  # cleaned: "ab"
            Acquisition("ab", files("z.dcm", "ab.dcm")),  # "ab" too: both left to single downloads
            Acquisition("ü", files(*many, "v.dcm.MISSING", "v.dcm")),  # cleaned: "untitled"
            Acquisition("..", files(*many)),
            Acquisition("T1w_0", files(*many)),
        ],
    )
    session_b = Session("ses 1", [Acquisition("T2w", files(*many, *(f"b{i}.dcm" for i in range(10))))])  # same label: "ses 1_0"
    return Project(
        "lab",
        "study",
        [
            Subject("sub/01", [session_a, session_b]),
            Subject("sub-02", [Session("ses:1", [Acquisition("x", files(*many, *(f"c{i}" for i in range(10))))])]),
        ],
    )


def test_hostile_labels_map_exactly(tmp_path):
    """The same dropoff, byte for byte, with the bulk path as with one request per file:
    a member is taken only for the entry whose path it exactly is."""
    project = hostile_project()
    with FlywheelTestServer([project], api_keys={KEY}) as server:
        single = engine_sync(server, tmp_path / "single", source_class=NoBulk)
        mark = len(server.requests)
        bulk = engine_sync(server, tmp_path / "bulk")
        assert single.failed == bulk.failed == 0, bulk.failures
        assert counts(server, mark)["tar"] >= 1 and any(note.startswith("bulk download:") for note in bulk.notes)
    assert files_under(tmp_path / "bulk") == files_under(tmp_path / "single")
    assert len(files_under(tmp_path / "bulk")) == sum(1 for _ in project.iter_files())


def test_the_servers_tar_paths(tmp_path):
    """The test server names members as scitran core does: cleaned labels, ``_0`` for a
    path another container has, the ``scitran/`` prefix for a project node only, empty
    ``.MISSING`` members; and the client computes the same names (tar_label)."""
    project = hostile_project()
    assert all(clean_label(x) == tar_label(x) for x in ("T1w?", "a/b", "ü", "..", "ses:1", "", "A b.c_d-e"))
    session_a, session_b = project.subjects[0].sessions
    acq = session_a.acquisitions[0]
    with FlywheelTestServer([project], api_keys={KEY}) as server:
        server.missing_content.add((acq.id, "IM00.dcm"))
        with httpx.Client(base_url=server.base_url + "/api", headers={"Authorization": f"scitran-user {KEY}"}, timeout=10) as api:

            def tar(nodes, **params) -> dict[str, bytes]:
                ticket = api.post("/download", params=params, json={"nodes": nodes, "optional": True}).json()
                with tarfile.open(fileobj=io.BytesIO(api.get("/download", params={"ticket": ticket["ticket"]}).content)) as tf:
                    members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
                assert ticket["file_cnt"] == len(members)
                return members

            members = tar([{"level": "session", "_id": session_a.id}, {"level": "session", "_id": session_b.id}])
            assert members["lab/study/sub01/ses 1/T1w/IM01.dcm"] == acq.files[1].content
            assert members["lab/study/sub01/ses 1/T1w/IM00.dcm.MISSING"] == b""
            assert members["lab/study/sub01/ses 1/T1w_0/IM01.dcm"] == session_a.acquisitions[1].files[1].content  # "T1w?"
            assert members["lab/study/sub01/ses 1/T1w_0_0/IM01.dcm"] == session_a.acquisitions[6].files[1].content  # "T1w_0"
            assert members["lab/study/sub01/ses 1/untitled/v.dcm.MISSING"] == session_a.acquisitions[4].files[10].content
            assert members["lab/study/sub01/ses 1/ab/x/y.dcm"] == session_a.acquisitions[2].files[10].content
            assert "lab/study/sub01/ses 1_0/T2w/b0.dcm" in members
            project_tar = tar([{"level": "project", "_id": project.id}])
            assert "scitran/lab/study/sub01/ses 1/T1w/IM01.dcm" in project_tar
            assert tar([{"level": "project", "_id": project.id}], prefix="mine").keys() == {
                "mine" + name.removeprefix("scitran") for name in project_tar
            }
            assert api.get("/download", params={"ticket": "nope"}).status_code == 404
            ticket = api.post("/download", json={"nodes": [{"level": "session", "_id": session_b.id}]}).json()["ticket"]
            assert api.get("/download", params={"ticket": ticket, "format": "zip"}).status_code == 400
            assert api.post("/download", json={"nodes": [{"level": "session", "_id": "0" * 24}]}).status_code == 404


# ------------------------------------------------------------------------- the real SDK's tar

SDK_TAR_SCRIPT = r"""
import json, sys, tarfile
import flywheel
client = flywheel.Client(sys.argv[1])
project = client.lookup("lab/study")
session = project.subjects()[0].sessions()[0]
out = {}
for name, containers, kw in (
    ("project", project, {}),
    ("session", session, {"include_types": ["dicom"]}),
    ("acquisitions", session.acquisitions(), {"exclude_types": ["nifti"]}),
):
    dest = sys.argv[2] + "/" + name + ".tar"
    summary = client.download_tar(containers, dest, **kw)
    with tarfile.open(dest) as tf:
        out[name] = {"file_cnt": summary.file_cnt, "size": summary.size,
                     "members": {m.name: tf.extractfile(m).read().hex() for m in tf.getmembers()}}
print(json.dumps(out))
"""


def test_sdk_download_tar(tmp_path):
    """flywheel-sdk 23's ``download_tar`` (a ticket, then the tar) of a project, a session
    with ``include_types`` and acquisitions with ``exclude_types``."""
    need_tool(Path(SDK_PYTHON), "flywheel-sdk's interpreter (CLPIPE_TEST_SDK_PYTHON)")
    project = make_demo_project(subjects=2, sessions=1, acquisitions=2, slices=3)
    script = tmp_path / "tar.py"
    script.write_text(SDK_TAR_SCRIPT)
    env = dict(os.environ, HOME=str(tmp_path), FLYWHEEL_USER_HOME=str(tmp_path), PYTHONWARNINGS="ignore")
    with FlywheelTestServer([project], api_keys={KEY}) as server:
        proc = subprocess.run(
            [SDK_PYTHON, str(script), server.login_key(KEY), str(tmp_path)], capture_output=True, text=True, timeout=180, env=env
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert [r["status"] for r in server.requests if r["path"] == "/api/download"] == [200] * 6
    got = json.loads(proc.stdout)

    def expect(prefix: str, keep, subjects=None) -> dict[str, str]:
        return {
            f"{prefix}lab/study/{n.subject.label}/{n.session.label}/{n.acquisition.label}/{f.name}": f.content.hex()
            for n, f in project.iter_files()
            if keep(f) and (subjects is None or n.subject in subjects)
        }

    first = project.subjects[0]
    assert got["project"]["members"] == expect("scitran/", lambda f: True)
    assert got["session"]["members"] == expect("", lambda f: f.type == "dicom", [first])
    assert got["acquisitions"]["members"] == expect("", lambda f: f.type != "nifti", [first])
    for part in got.values():
        assert part["file_cnt"] == len(part["members"]) and part["size"] == sum(len(v) // 2 for v in part["members"].values())


# ------------------------------------------------------------------------------ the slow link


def timed(client: httpx.Client, url: str) -> tuple[float, bytes]:
    start = time.perf_counter()
    body = client.get(url).raise_for_status().content
    return time.perf_counter() - start, body


def test_latency_and_bandwidth_of_the_test_server_and_the_proxy():
    big = FwFile("big.dcm", os.urandom(400_000))
    project = Project("lab", "study", [Subject("s", [Session("x", [Acquisition("a", [big])])])])
    headers = {"Authorization": f"scitran-user {KEY}"}
    with FlywheelTestServer([project], api_keys={KEY}) as server, httpx.Client(headers=headers, timeout=30) as client:
        acq = project.subjects[0].sessions[0].acquisitions[0].id
        url = f"{server.base_url}/api/containers/{acq}/files/big.dcm"
        base, _ = timed(client, url)
        server.link.latency = 0.2
        slow, body = timed(client, f"{server.base_url}/api/version")
        assert slow >= 0.2
        server.link.latency, server.link.bandwidth = 0.0, 1_000_000  # 1 MB/s: 0.4 s for the file
        capped, body = timed(client, url)
        assert body == big.content and capped >= 0.35 > base
        with FaultProxy(server.base_url, latency=0.1, bandwidth=2_000_000) as proxy:
            server.link.bandwidth = 0
            through, body = timed(client, f"{proxy.base_url}/api/containers/{acq}/files/big.dcm")
            assert body == big.content and through >= 0.1 + 0.18
    with pytest.raises(ValueError):
        FlywheelTestServer(latency=-1)


def test_the_command_line_options_of_the_servers(tmp_path):
    url_file = tmp_path / "login"
    server = subprocess.Popen(
        ["python", "-m", "clpipe.testing.fwserver", "--port", "0", "--latency-ms", "150", "--url-file", str(url_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PATH=f"{Path(os.sys.executable).parent}:{os.environ['PATH']}"),
    )
    try:
        for _ in range(300):
            if url_file.exists():
                break
            time.sleep(0.1)
        host, port, *_ = url_file.read_text().strip().split(":")
        with httpx.Client(timeout=10) as client:
            took, _ = timed(client, f"http://{host}:{port}/api/config")
            assert took >= 0.15
            proxy = subprocess.Popen(
                [os.sys.executable, "-m", "clpipe.testing.faultproxy", "--upstream", f"http://{host}:{port}", "--latency-ms", "100"],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                line = proxy.stdout.readline()
                assert line.startswith("forwarding http://127.0.0.1:"), line
                took, _ = timed(client, line.split()[1] + "/api/config")
                assert took >= 0.25
            finally:
                proxy.terminate()
                proxy.wait(10)
    finally:
        server.terminate()
        server.wait(10)
    bad = subprocess.run(
        [os.sys.executable, "-m", "clpipe.testing.faultproxy", "--upstream", "http://example.org"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "loopback" in bad.stderr
