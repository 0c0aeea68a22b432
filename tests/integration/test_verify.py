"""Every file the native engine downloads from Flywheel is checked against the server's own
hash (issue 11, point 2): the listing (``download/targets``) carries none, so the engine
asks the source for the hashes of the containers with work to do (``GET containers/{id}``,
once each); a no-op re-sync still makes one listing request and nothing else. Where the
server has no hash the run says so. A damaged zip header is a transient fault. Request URLs
keep a file named ``..`` or ``.`` a file name (point 4)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

import clpipe.sync.engine as engine_module
from clpipe.sources.flywheel import FlywheelSource, credentials_from_api_key, parse_fw_url
from clpipe.sync.engine import Engine, Options, Outcome, RemoteEntry
from clpipe.sync.manifest import SyncState
from clpipe.testing.fwserver import Acquisition, FlywheelTestServer, FwFile, Project, Session, Subject, make_demo_project

from helpers import KEY, SUMMARY_RE, files_under, login, new_project

pytestmark = pytest.mark.fw

URL = parse_fw_url("fw://lab/study/")
DICOM_ONLY = {"filters": [{"types": {"+": ["dicom"]}}]}
CONTAINER_RE = re.compile(r"^/api/containers/([^/]+)$")
PREFLIGHT = ("/api/auth/status", "/api/lookup")  # every run's login check and project lookup


def native(env, config: Path, *extra, timeout=180) -> tuple[int, str]:
    proc = env.clpipe("dicom", "flywheel_sync", "-c", config, "-engine", "native", "-submit", *extra, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def summary_json(config: Path) -> dict:
    # the newest run's (two runs in one second have run ids in random order: by time written)
    newest = max((config.parent / "logs" / "sync_logs").glob("*.summary.json"), key=lambda p: p.stat().st_mtime_ns)
    return json.loads(newest.read_text())


def dicoms(config: Path) -> dict[str, bytes]:
    return files_under(config.parent / "data_DICOMs")


def container_gets(server, since: int = 0) -> list[str]:
    """Ids of the containers asked for (``GET containers/{id}``) since request ``since``."""
    return [m.group(1) for r in server.requests[since:] if r["method"] == "GET" for m in [CONTAINER_RE.match(r["path"])] if m]


def file_gets(server, name: str, since: int = 0) -> list[dict]:
    return [r for r in server.requests[since:] if r["method"] == "GET" and r["path"].endswith(f"/files/{name}")]


def acquisition_ids(project: Project) -> list[str]:
    return [node.obj.id for node in project.walk() if node.kind == "acquisition"]


def engine_sync(server, dropoff: Path, entries=None, jobs: int = 4, retries: int = 1) -> Outcome:
    """The native engine with the real Flywheel source against ``server``, in this process
    (retries quick enough for a test)."""
    source = FlywheelSource(credentials_from_api_key(server.login_key(KEY)), jobs=jobs)
    try:
        project = source.api.lookup_project(URL)
        listing = entries if entries is not None else source.entries(project["_id"], URL, DICOM_ONLY, {})
        state = SyncState(dropoff, "run-verify")
        state.acquire()
        try:
            state.load()
            outcome = Engine(
                source, state, Options(dropoff=dropoff, zip_tmp=dropoff.parent / "ziptmp", jobs=jobs, retries=retries, backoff=0.01)
            ).run(listing)
            state.save()
        finally:
            state.release()
        return outcome
    finally:
        source.close()


# ------------------------------------------------------------------ flipped bytes, same length


def test_flipped_bytes_of_a_plain_dicom_are_caught_and_retried(no_fw_env, server, demo_project, tmp_path):
    """``localizer.dcm`` is a plain DICOM file: the listing gives only its size, so bytes
    flipped in transit used to land. Its container's hash catches them; the retry lands
    the right bytes."""
    login(no_fw_env, server)
    server.add_fault(r"/files/localizer\.dcm$", "corrupt", count=1)
    config = new_project(tmp_path / "p")
    code, out = native(no_fw_env, config)
    assert code == 0, out
    assert "checksum mismatch" in out and "[retry]" in out, out
    localizers = sum(f.name == "localizer.dcm" for _, f in demo_project.iter_files())
    assert len(file_gets(server, "localizer.dcm")) == localizers + 1
    assert dicoms(config) == demo_project.expected_dicom_paths(strip_root=True)
    assert "content not verified" not in out  # every file had a hash to check


def test_a_persistent_corruption_fails_naming_the_file_and_lands_nothing(server, demo_project, tmp_path):
    server.add_fault(r"/files/localizer\.dcm$", "corrupt")  # every time
    dropoff = tmp_path / "dropoff"
    outcome = engine_sync(server, dropoff, retries=2)
    localizers = [path for path in demo_project.expected_dicom_paths(strip_root=True) if path.endswith("localizer.dcm")]
    assert outcome.failed == len(localizers) == 2
    assert all("localizer.dcm" in f and "checksum mismatch" in f and "gave up after 3 attempts" in f for f in outcome.failures), (
        outcome.failures
    )
    assert len(file_gets(server, "localizer.dcm")) == 3 * len(localizers)
    for path in localizers:
        assert not (dropoff / path).exists()
    assert not [p for p in (dropoff / ".clpipe-sync" / "tmp").rglob("*") if p.is_file()]
    # the other files landed whole
    expected = demo_project.expected_dicom_paths(strip_root=True)
    assert files_under(dropoff) == {k: v for k, v in expected.items() if k not in localizers}


# ----------------------------------------------------------------- which containers are asked


def test_only_containers_with_work_are_asked_and_a_noop_is_one_listing(no_fw_env, server, demo_project, tmp_path):
    login(no_fw_env, server)
    config = new_project(tmp_path / "p")
    code, out = native(no_fw_env, config)
    assert code == 0, out
    # the first run: every acquisition has files to download, each is asked for once
    assert Counter(container_gets(server)) == Counter(acquisition_ids(demo_project))

    # nothing changed: the login check, the project lookup and ONE listing; nothing else
    mark = len(server.requests)
    code, out = native(no_fw_env, config)
    assert code == 0 and SUMMARY_RE.search(out).group(1, 2, 4) == ("0", "0", "0"), out
    assert [r["path"] for r in server.requests[mark:] if r["path"] not in PREFLIGHT] == ["/api/download/targets"]

    # one file of one acquisition changed: that acquisition alone is asked, once
    node, changed = next((n, f) for n, f in demo_project.iter_files() if f.name == "localizer.dcm")
    content = bytearray(changed.content)
    content[-1] ^= 0xFF  # same size: only its hash tells the new bytes from a corruption
    changed.replace_content(bytes(content))
    mark = len(server.requests)
    code, out = native(no_fw_env, config)
    assert code == 0 and SUMMARY_RE.search(out).group(2) == "1", out
    assert container_gets(server, mark) == [node.obj.id]
    assert dicoms(config) == demo_project.expected_dicom_paths(strip_root=True)


def test_a_listing_with_hashes_needs_no_container_request(server, demo_project, tmp_path):
    server.targets_hash = True
    outcome = engine_sync(server, tmp_path / "dropoff")
    assert outcome.failed == 0 and container_gets(server) == [] and not outcome.notes
    assert files_under(tmp_path / "dropoff") == demo_project.expected_dicom_paths(strip_root=True)


def test_parallel_workers_ask_for_each_container_once(tmp_path):
    """Eight single DICOM files of one acquisition, downloaded by eight workers at once,
    while the container's answer is slow: one request, every file checked (a flip caught)."""
    project = make_demo_project(subjects=1, acquisitions=1, slices=8, zipped=False, single_dicoms=False, non_dicom=False)
    with FlywheelTestServer([project], api_keys={KEY}) as server:
        server.add_fault(CONTAINER_RE.pattern, "delay", delay=0.3)
        server.add_fault(r"/files/IM0005\.dcm$", "corrupt", count=1)
        outcome = engine_sync(server, tmp_path / "dropoff", jobs=8)
        assert outcome.failed == 0 and outcome.created == 8, outcome.failures
        assert container_gets(server) == acquisition_ids(project)  # one acquisition, one request
        assert len(file_gets(server, "IM0005.dcm")) == 2  # the corrupted one was fetched again
        assert not outcome.notes
    assert files_under(tmp_path / "dropoff") == project.expected_dicom_paths(strip_root=True)


def test_a_failed_hash_lookup_is_retried(server, demo_project, tmp_path):
    acq = acquisition_ids(demo_project)[0]
    server.add_fault(f"^/api/containers/{acq}$", "status", status=503, count=1)
    server.add_fault(f"^/api/containers/{acq}$", "corrupt", count=1)  # then an answer that is not JSON
    outcome = engine_sync(server, tmp_path / "dropoff", retries=3)
    assert outcome.failed == 0, outcome.failures
    assert Counter(container_gets(server))[acq] == 3
    assert files_under(tmp_path / "dropoff") == demo_project.expected_dicom_paths(strip_root=True)


# ---------------------------------------------------------------- a server without hashes


def test_a_server_without_hashes_says_content_not_verified(no_fw_env, server, demo_project, tmp_path):
    server.file_hashes = False
    login(no_fw_env, server)
    config = new_project(tmp_path / "p")
    code, out = native(no_fw_env, config)
    assert code == 0, out
    # the two plain localizers; the zipped series' members are checked by their CRCs
    localizers = sum(f.name == "localizer.dcm" for _, f in demo_project.iter_files())
    note = f"content not verified: {localizers} files"
    assert out.count(note) == 1, out
    assert [n for n in summary_json(config)["notes"] if n.startswith("content not verified")][0].startswith(note)
    assert dicoms(config) == demo_project.expected_dicom_paths(strip_root=True)
    # a no-op run verifies nothing, so says nothing
    code, out = native(no_fw_env, config)
    assert code == 0 and "content not verified" not in out, out


# -------------------------------------------------------------------- a damaged zip header


def _zip_header_field(content: bytes, field: str) -> tuple[int, int]:
    """Byte range of one header field of a zip: the first central directory entry's
    "version needed to extract" (flipped: NotImplementedError "zip file version ..."), or the
    end record's offset of the central directory (flipped: ValueError "negative seek value")."""
    if field == "version":
        at = content.index(b"PK\x01\x02") + 6
        return at, at + 2
    at = content.rindex(b"PK\x05\x06") + 16
    return at, at + 4


@pytest.mark.parametrize("field", ["version", "cd_offset"])
def test_a_damaged_zip_header_is_retried(no_fw_env, server, demo_project, tmp_path, field):
    server.file_hashes = False  # no hash to catch it first: the zip must be opened to see it
    login(no_fw_env, server)
    zip_file = next(f for _, f in demo_project.iter_files() if f.is_zip)
    server.add_fault(re.escape(zip_file.name) + "$", "corrupt", count=1, span=_zip_header_field(zip_file.content, field))
    config = new_project(tmp_path / "p")
    code, out = native(no_fw_env, config)
    assert code == 0, out
    assert "damaged zip" in out and "[retry]" in out and "internal error" not in out, out
    assert len(file_gets(server, zip_file.name)) == 2
    assert dicoms(config) == demo_project.expected_dicom_paths(strip_root=True)


def test_a_damaged_zip_header_on_disk_is_retried(server, demo_project, tmp_path, monkeypatch, capsys):
    """A zip too big for memory is unpacked from a file: there a damaged offset makes the
    seek fail with EINVAL (OSError), which is damage too, not a disk problem."""
    monkeypatch.setattr(engine_module, "IN_MEMORY_ZIP", 0)
    server.file_hashes = False
    zip_file = next(f for _, f in demo_project.iter_files() if f.is_zip)
    server.add_fault(re.escape(zip_file.name) + "$", "corrupt", count=1, span=_zip_header_field(zip_file.content, "cd_offset"))
    outcome = engine_sync(server, tmp_path / "dropoff", retries=1)
    assert outcome.failed == 0, outcome.failures
    assert "damaged zip ([Errno 22]" in capsys.readouterr().out
    assert files_under(tmp_path / "dropoff") == demo_project.expected_dicom_paths(strip_root=True)
    assert not list((tmp_path / "ziptmp").iterdir())


# ------------------------------------------------------------------- names that are dots


def test_files_named_dot_and_dotdot_fetch_their_own_bytes(tmp_path):
    """``files/..`` would be normalised to the container itself and ``files/.`` to its file
    list: each path segment is quoted, the dots percent-encoded, so each file's own bytes
    come back and match the server's hash. (Where such names land in the dropoff is the
    layout's business: here they are given plain local paths.)"""
    acq = Acquisition(
        "acq", [FwFile("..", b"the file named two dots\n"), FwFile(".", b"the file named one dot\n"), FwFile("plain.dcm", b"plain\n")]
    )
    project = Project("lab", "study", [Subject("sub", [Session("ses", [acq])])])
    with FlywheelTestServer([project], api_keys={KEY}) as server:
        entries = [
            RemoteEntry(
                key=f"{acq.id}/{f.name}", path=f"files/{local}", size=f.size, modified=0.0, checksum=None, unpack=False, name=f.name
            )
            for f, local in zip(acq.files, ["dotdot", "dot", "plain.dcm"], strict=False)
        ]
        outcome = engine_sync(server, tmp_path / "dropoff", entries=entries)
        assert outcome.failed == 0 and outcome.created == 3, outcome.failures
        gets = {r["path"]: r["status"] for r in server.requests if r["method"] == "GET"}
        assert gets == {
            f"/api/containers/{acq.id}": 200,
            f"/api/containers/{acq.id}/files/..": 200,
            f"/api/containers/{acq.id}/files/.": 200,
            f"/api/containers/{acq.id}/files/plain.dcm": 200,
        }
        assert not outcome.notes  # each matched its hash
    assert files_under(tmp_path / "dropoff") == {
        "files/dotdot": acq.files[0].content,
        "files/dot": acq.files[1].content,
        "files/plain.dcm": b"plain\n",
    }


def test_a_listed_project_with_dot_names_syncs_each_file_whole(tmp_path):
    """The same through the project listing: wherever the layout puts ``..`` and ``.``, the
    bytes that land are those of each file, fetched by its own name, each request once."""
    files = [FwFile("..", b"the file named two dots\n"), FwFile(".", b"the file named one dot\n"), FwFile("plain.dcm", b"plain\n")]
    acq = Acquisition("acq", files)
    project = Project("lab", "study", [Subject("sub", [Session("ses", [acq])])])
    with FlywheelTestServer([project], api_keys={KEY}) as server:
        outcome = engine_sync(server, tmp_path / "dropoff")
        assert outcome.failed == 0 and outcome.created == 3, outcome.failures
        assert sorted(r["path"] for r in server.requests if r["method"] == "GET" and "/files/" in r["path"]) == sorted(
            f"/api/containers/{acq.id}/files/{f.name}" for f in files
        )
        assert all(r["status"] == 200 for r in server.requests)
    assert sorted(files_under(tmp_path / "dropoff").values()) == sorted(f.content for f in files)
