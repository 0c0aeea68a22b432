"""Tests of the Flywheel-compatible test server (clpipe.testing.fwserver).

Plain httpx checks of the protocol, the fault injection and the demo data, plus a walk and
download with the real flywheel-sdk 23 (run in its own interpreter, see CLPIPE_TEST_SDK_PYTHON).
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from datetime import datetime
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from clpipe.testing.fwserver import (
    Acquisition,
    FlywheelTestServer,
    FwFile,
    Project,
    Session,
    Subject,
    make_demo_project,
)

from helpers import TOOLS, need_tool

pytestmark = pytest.mark.fw

KEY = "test-key-123"
TIMEOUT = httpx.Timeout(10.0)
SDK_PYTHON = os.environ.get("CLPIPE_TEST_SDK_PYTHON", str(TOOLS / "sdk" / "bin" / "python"))


@pytest.fixture(scope="module")
def demo() -> Project:
    return make_demo_project(subjects=2, sessions=1, acquisitions=2, slices=3)


@pytest.fixture
def project(demo) -> Project:
    return copy.deepcopy(demo)  # tests may mutate it


@pytest.fixture
def srv(project):
    with FlywheelTestServer([project], api_keys={KEY}) as server:
        yield server


@pytest.fixture
def api(srv):
    with httpx.Client(base_url=srv.base_url + "/api", timeout=TIMEOUT, headers={"Authorization": f"scitran-user {KEY}"}) as client:
        yield client


def targets(api, filters=None, **extra) -> list[dict]:
    pid = api.post("/lookup", json={"path": ["lab", "study"]}).json()["_id"]
    body = {"nodes": [{"level": "project", "_id": pid}], **extra}
    if filters:
        body["filters"] = filters
    r = api.post("/download/targets", params={"type": "full", "prefix": ""}, json=body)
    assert r.status_code == 200
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


def zip_file(project: Project) -> tuple[Acquisition, FwFile]:
    node, f = next((n, f) for n, f in project.iter_files() if f.name.endswith(".dicom.zip"))
    return node.obj, f


# --- demo data ------------------------------------------------------------------------------


def test_demo_project_is_deterministic_real_dicom(demo):
    again = make_demo_project(subjects=2, sessions=1, acquisitions=2, slices=3)
    assert [(f.name, f.content) for _, f in again.iter_files()] == [(f.name, f.content) for _, f in demo.iter_files()]
    other = make_demo_project(subjects=2, sessions=1, acquisitions=2, slices=3, seed=1)
    assert other.expected_dicom_paths(strip_root=True).keys() != demo.expected_dicom_paths(True).keys()

    for node, f in demo.iter_files():
        if not f.name.endswith(".dicom.zip"):
            continue
        series_uid = f.name[: -len(".dicom.zip")]
        with zipfile.ZipFile(io.BytesIO(f.content)) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            assert [m.filename for m in members] == [f"{series_uid}/IM{i:04d}.dcm" for i in (1, 2, 3)]
            datasets = [pydicom.dcmread(io.BytesIO(zf.read(m))) for m in members]
        for ds in datasets:
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.Modality == "MR" and (ds.Rows, ds.Columns, ds.BitsAllocated) == (8, 8, 16)
            assert len(ds.PixelData) == 8 * 8 * 2
            assert ds.SeriesInstanceUID == series_uid
            assert ds.SeriesDescription == node.acquisition.label
            assert ds.PatientID.endswith(node.subject.label)
        assert len({ds.SOPInstanceUID for ds in datasets}) == 3
        # All series of a session share one study.
        study_uids = set()
        for acq in node.session.acquisitions:
            for g in acq.files:
                if g.type == "dicom" and not g.name.endswith(".zip"):
                    study_uids.add(pydicom.dcmread(io.BytesIO(g.content)).StudyInstanceUID)
        assert study_uids == {datasets[0].StudyInstanceUID}


def test_demo_project_options():
    p = make_demo_project(subjects=1, sessions=2, acquisitions=3, slices=2, single_dicoms=False, non_dicom=False)
    assert [s.label for s in p.subjects[0].sessions] == ["ses-01", "ses-02"]
    files = [f for _, f in p.iter_files()]
    assert len(files) == 6 and all(f.type == "dicom" and f.name.endswith(".dicom.zip") for f in files)
    full = make_demo_project(subjects=1, sessions=1, acquisitions=2)
    types = sorted(f.type for _, f in full.iter_files())
    assert types == ["dicom"] * 3 + ["nifti"] * 2 + ["qa"] * 2
    assert sum(f.name.endswith(".dcm") for _, f in full.iter_files()) == 1


def test_expected_paths(demo):
    stripped = demo.expected_dicom_paths(strip_root=True)
    rooted = demo.expected_dicom_paths(strip_root=False)
    assert len(stripped) == 2 * (2 * 3 + 1)  # subjects * (acquisitions * slices + localizer)
    assert {"study/" + k: v for k, v in stripped.items()} == rooted
    acq, zf = zip_file(demo)
    folder = "SUBJECTS/sub-01/SESSIONS/ses-01/ACQUISITIONS/T1w/FILES/" + zf.name[: -len(".dicom.zip")]
    with zipfile.ZipFile(io.BytesIO(zf.content)) as z:
        assert stripped[f"{folder}/IM0002.dcm"] == z.read(f"{zf.name[:-10]}/IM0002.dcm")
    packed = demo.expected_dicom_paths(strip_root=True, unpack=False)
    assert packed[f"{folder}.dicom.zip"] == zf.content
    assert not any(k.endswith((".nii.gz", ".json")) for k in rooted)


def test_ids_unique_ordered_and_assigned_to_new_containers(srv, api, project):
    ids = [n.obj.id for n in project.walk()]
    assert all(re.fullmatch(r"[0-9a-f]{24}", i) for i in ids)
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    session = project.subjects[0].sessions[0]
    session.acquisitions.append(Acquisition("late", [FwFile("late.dcm", b"DICM-ish", "dicom")]))
    listed = api.get(f"/sessions/{session.id}/acquisitions").json()
    assert [a["label"] for a in listed] == ["T1w", "T2w", "late"]
    assert listed[-1]["_id"] > listed[-2]["_id"]
    late = [t for t in targets(api) if t["filename"] == "late.dcm"]
    assert [t["container_id"] for t in late] == [listed[-1]["_id"]]


def test_hand_built_project_next_to_demo(project):
    mine = Project(
        "other",
        "pilot",
        [Subject("s1", [Session("baseline", [Acquisition("scan", [FwFile("a.dcm", b"A" * 10), FwFile("notes.txt", b"hi", "text")])])])],
    )
    assert {n.obj.id for n in mine.walk()}.isdisjoint({n.obj.id for n in project.walk()})
    assert mine.expected_dicom_paths(strip_root=False) == {"pilot/SUBJECTS/s1/SESSIONS/baseline/ACQUISITIONS/scan/FILES/a.dcm": b"A" * 10}
    with (
        FlywheelTestServer([project, mine], api_keys={KEY}) as srv,
        httpx.Client(base_url=srv.base_url + "/api", timeout=TIMEOUT, headers={"Authorization": f"scitran-user {KEY}"}) as api,
    ):
        found = api.post("/lookup", json={"path": ["other", "pilot"]}).json()
        assert found["_id"] == mine.id and srv.project("pilot", group="other") is mine
        listed = api.get("/projects").json()
        assert {p["label"] for p in listed} == {"study", "pilot"}
        acq = mine.subjects[0].sessions[0].acquisitions[0]
        assert api.get(f"/containers/{acq.id}/files/notes.txt").content == b"hi"


# --- auth and basic endpoints ---------------------------------------------------------------


def test_auth(srv, api):
    with httpx.Client(base_url=srv.base_url + "/api", timeout=TIMEOUT) as anon:
        assert anon.get("/config").json() == {"features": {}, "site": {}}
        r = anon.get("/auth/status")
        assert r.status_code == 401 and {"message", "detail"} <= r.json().keys()
        bad = anon.get("/auth/status", headers={"Authorization": "scitran-user nope"})
        assert bad.status_code == 401
    assert api.get("/auth/status").json()["origin"]["type"] == "user"
    assert api.get("/users/self").json()["firstname"] == "Demo"
    assert "release" in api.get("/version").json()
    # Keys can be revoked while running.
    srv.api_keys.discard(KEY)
    assert api.get("/auth/status").status_code == 401
    assert [r["auth_ok"] for r in srv.requests if r["path"] == "/api/auth/status"] == [False, False, True, False]
    assert KEY not in repr(srv.requests)


def test_login_key_and_bind_address(srv):
    host, port, insecure, key = srv.login_key(KEY).split(":")
    assert (host, int(port), insecure, key) == ("127.0.0.1", srv.port, "__force_insecure", KEY)
    assert srv.base_url == f"http://127.0.0.1:{srv.port}"


def test_lookup_and_unknown(api, project):
    p = api.post("/lookup", json={"path": ["lab", "study"]}).json()
    assert (p["container_type"], p["_id"], p["label"], p["group"]) == ("project", project.id, "study", "lab")
    assert api.post("/lookup", json={"path": ["lab"]}).json()["container_type"] == "group"
    sub = api.post("/lookup", json={"path": ["lab", "study", "sub-02"]}).json()
    assert (sub["container_type"], sub["label"]) == ("subject", "sub-02")
    missing = api.post("/lookup", json={"path": ["lab", "nope"]})
    assert missing.status_code == 404 and "message" in missing.json() and "detail" in missing.json()
    unknown = api.get("/no/such/endpoint")
    assert unknown.status_code == 404 and "message" in unknown.json()
    assert api.get("/subjects/ffffffffffffffffffffffff").status_code == 404


def test_container_json(api, project):
    acq = project.subjects[0].sessions[0].acquisitions[0]
    data = api.get(f"/acquisitions/{acq.id}").json()
    assert data["label"] == "T1w" and data["parents"]["session"] == project.subjects[0].sessions[0].id
    by_name = {f["name"]: f for f in data["files"]}
    assert set(by_name) == {f.name for f in acq.files}
    for f in acq.files:
        entry = by_name[f.name]
        assert entry["size"] == f.size and entry["version"] == 1 and entry["type"] == f.type
        assert entry["hash"] == f.hash and re.fullmatch(r"v0-sha384-[0-9a-f]{96}", f.hash)
        assert datetime.fromisoformat(entry["modified"]).utcoffset() is not None
    session = api.get(f"/sessions/{project.subjects[0].sessions[0].id}").json()
    assert session["subject"]["label"] == "sub-01"
    assert api.get(f"/subjects/{project.subjects[1].id}").json()["label"] == "sub-02"
    assert api.get(f"/projects/{project.id}").json()["label"] == "study"


def test_any_container_by_id_with_its_file_hashes(srv, api, project):
    """``GET containers/{cid}`` (the SDK's get_container): the container of any level, typed,
    with its files' hashes; a server told to give none leaves ``hash`` out."""
    session = project.subjects[0].sessions[0]
    acq = session.acquisitions[0]
    data = api.get(f"/containers/{acq.id}").json()
    assert data["container_type"] == "acquisition" and data["_id"] == acq.id and data["label"] == acq.label
    assert {f["name"]: (f["hash"], f["size"]) for f in data["files"]} == {f.name: (f.hash, f.size) for f in acq.files}
    assert {k: v for k, v in data.items() if k != "container_type"} == api.get(f"/acquisitions/{acq.id}").json()
    assert api.get(f"/containers/{session.id}").json()["container_type"] == "session"
    assert api.get(f"/containers/{project.id}").json()["container_type"] == "project"
    missing = api.get(f"/containers/{'0' * 24}")
    assert missing.status_code == 404 and "message" in missing.json()
    srv.file_hashes = False
    assert all("hash" not in f for f in api.get(f"/containers/{acq.id}").json()["files"])


def test_dot_segments_are_file_names(api, project):
    """A file literally named ``..`` or ``.``: asked for with its dots percent-encoded (a
    client that sent ``files/..`` would get the container), the server decodes the segment
    and serves that file."""
    acq = project.subjects[0].sessions[0].acquisitions[0]
    acq.files += [FwFile("..", b"two dots"), FwFile(".", b"one dot")]
    assert api.get(f"/containers/{acq.id}/files/%2E%2E").content == b"two dots"
    assert api.get(f"/containers/{acq.id}/files/%2e").content == b"one dot"
    assert api.get(f"/containers/{acq.id}/files/.%2E").content == b"two dots"


def test_paging(api, project):
    pid = project.id
    seen, after = [], None
    for _ in range(10):  # bounded: must end with an empty page
        params = {"limit": 1, **({"after_id": after} if after else {})}
        page = api.get(f"/projects/{pid}/subjects", params=params).json()
        if not page:
            break
        assert len(page) == 1
        seen.append(page[0]["_id"])
        after = page[0]["_id"]
    else:
        pytest.fail("paging did not terminate")
    assert seen == sorted(seen) == [s.id for s in project.subjects]
    assert api.get(f"/projects/{pid}/subjects", params={"limit": "x"}).status_code == 400


# --- download/targets and files -------------------------------------------------------------


def test_download_targets_filters(api, project):
    everything = targets(api)
    assert len(everything) == sum(1 for _ in project.iter_files())
    dicom = targets(api, [{"types": {"+": ["dicom"]}}])
    assert {t["filetype"] for t in dicom} == {"dicom"} and len(dicom) == 6
    no_dicom = targets(api, [{"types": {"-": ["dicom"]}}])
    assert {t["filetype"] for t in no_dicom} == {"nifti", "qa"}
    both = targets(api, [{"types": {"+": ["dicom", "qa"]}}, {"types": {"-": ["qa"]}}])
    assert {t["filetype"] for t in both} == {"dicom"}
    # Tag filters are accepted (and ignored).
    tagged = targets(api, [{"types": {"+": ["dicom"]}}], container_filters=[{"tags": {"plus": ["x"]}, "type": "subject"}])
    assert len(tagged) == len(dicom)
    unknown = api.post("/download/targets", json={"nodes": [{"level": "project", "_id": "0" * 24}]})
    assert unknown.status_code == 404 and "message" in unknown.json()
    for t in dicom:
        assert t["download_type"] == "file"
        assert re.fullmatch(r"/study/SUBJECTS/sub-0\d/SESSIONS/ses-01/ACQUISITIONS/T[12]w/FILES/.+", t["dst_path"])
        assert t["dst_path"].endswith("/" + t["filename"])
        assert datetime.fromisoformat(t["modified"]).utcoffset() is not None
        acq = next(a for n in project.walk() if n.kind == "acquisition" for a in [n.obj] if a.id == t["container_id"])
        assert t["size"] == next(f.size for f in acq.files if f.name == t["filename"])


def test_file_download_info_and_member(api, project):
    acq, zf = zip_file(project)
    r = api.get(f"/containers/{acq.id}/files/{zf.name}")
    assert r.content == zf.content
    assert r.headers["content-type"] == "application/octet-stream"
    assert int(r.headers["content-length"]) == zf.size and "content-encoding" not in r.headers
    sdk_style = api.get(f"/acquisitions/{acq.id}/files/{zf.name}", params={"version": 1})
    assert sdk_style.content == zf.content
    info = api.get(f"/containers/{acq.id}/files/{zf.name}", params={"info": "true"}).json()
    with zipfile.ZipFile(io.BytesIO(zf.content)) as z:
        assert [(m["path"], m["size"]) for m in info["members"]] == [(i.filename, i.file_size) for i in z.infolist()]
        member = z.infolist()[1].filename
        assert api.get(f"/acquisitions/{acq.id}/files/{zf.name}", params={"member": member}).content == z.read(member)
    assert all(datetime.fromisoformat(m["timestamp"]) for m in info["members"])
    not_zip = api.get(f"/containers/{acq.id}/files/localizer.dcm", params={"info": "true"})
    assert not_zip.status_code == 400 and "message" in not_zip.json()
    assert api.get(f"/containers/{acq.id}/files/missing.dcm").status_code == 404


def test_mutations_are_served(srv, api, project):
    acq, zf = zip_file(project)
    old_modified = zf.modified
    zf.replace_content(b"new bytes")
    entry = next(f for f in api.get(f"/acquisitions/{acq.id}").json()["files"] if f["name"] == zf.name)
    assert entry["version"] == 2 and entry["size"] == 9
    assert datetime.fromisoformat(entry["modified"]) > old_modified
    assert api.get(f"/containers/{acq.id}/files/{zf.name}").content == b"new bytes"
    srv.remove_file(acq.label, "qa.json")
    assert "qa.json" not in {t["filename"] for t in targets(api) if t["container_id"] == acq.id}
    assert api.get(f"/containers/{acq.id}/files/qa.json").status_code == 404
    assert srv.project("study") is project and srv.acquisition(acq.id) is acq


def test_upload(srv, api, project):
    r = api.post(f"/projects/{project.id}/files", data={"metadata": "{}"}, files={"file": ("sync_log.csv", b"a,b\r\n1,2\r\n", "text/csv")})
    assert r.status_code == 200 and r.json()[0]["name"] == "sync_log.csv"
    assert srv.uploads == [("sync_log.csv", b"a,b\r\n1,2\r\n")]


# --- faults ---------------------------------------------------------------------------------


def test_a_request_is_in_the_log_before_its_answer_arrives(srv, api, project, monkeypatch):
    """A client holding an answer finds its request in ``srv.requests``: the server logs
    it before the answer goes out (it logged it after the body was written, so a test
    that read the log right after a response could miss the last request; seen in CI in
    test_fault_status)."""
    import time

    from clpipe.testing import fwserver

    real = fwserver.write_body

    def write_then_linger(handler, data, fault, link):
        real(handler, data, fault, link)
        time.sleep(0.3)  # the client has the whole answer; the server's thread is not done yet

    monkeypatch.setattr(fwserver, "write_body", write_then_linger)
    acq, zf = zip_file(project)
    before = len(srv.requests)
    assert api.get(f"/containers/{acq.id}/files/{zf.name}").content == zf.content
    assert len(srv.requests) == before + 1 and srv.requests[-1]["status"] == 200, srv.requests[before:]


def test_fault_status(srv, api, project):
    acq, zf = zip_file(project)
    fault = srv.add_fault(re.escape(zf.name) + "$", "status", count=1, status=503)
    first = api.get(f"/containers/{acq.id}/files/{zf.name}")
    assert first.status_code == 503 and "message" in first.json()
    assert api.get(f"/containers/{acq.id}/files/{zf.name}").content == zf.content
    assert fault.hits == 1
    assert [(r["status"], r["fault"]) for r in srv.requests[-2:]] == [(503, "status"), (200, None)]
    # A file that download/targets lists can still 404.
    srv.add_fault(r"/localizer\.dcm$", "status", status=404)
    assert "localizer.dcm" in {t["filename"] for t in targets(api)}
    assert api.get(f"/containers/{acq.id}/files/localizer.dcm").status_code == 404


def test_fault_drop(srv, api, project):
    acq, zf = zip_file(project)
    srv.add_fault(r"\.dicom\.zip$", "drop", count=1)
    with pytest.raises(httpx.RemoteProtocolError):
        api.get(f"/containers/{acq.id}/files/{zf.name}")
    assert api.get(f"/containers/{acq.id}/files/{zf.name}").content == zf.content
    # the server thread records the dropped request after closing the socket, so the
    # retry's record may come first: look at both, with a bounded wait
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and len([r for r in srv.requests if zf.name in r["path"]]) < 2:
        time.sleep(0.01)
    mine = [r for r in srv.requests if zf.name in r["path"]]
    assert sorted((r["status"], r["fault"] or "") for r in mine[-2:]) == [(0, "drop"), (200, "")]


def test_fault_truncate(srv, api, project):
    acq, zf = zip_file(project)
    srv.add_fault(r"\.dicom\.zip$", "truncate", count=1)
    received = bytearray()
    with pytest.raises(httpx.RemoteProtocolError):
        with api.stream("GET", f"/containers/{acq.id}/files/{zf.name}") as r:
            assert int(r.headers["content-length"]) == zf.size
            for chunk in r.iter_raw():
                received += chunk
    assert 0 < len(received) < zf.size and zf.content.startswith(bytes(received))
    assert api.get(f"/containers/{acq.id}/files/{zf.name}").content == zf.content


def test_fault_reset_mid_body(srv, api, project):
    """ "reset": the headers and half the body, then a TCP reset (not a clean close)."""
    acq, zf = zip_file(project)
    srv.add_fault(r"\.dicom\.zip$", "reset", count=1)
    received = bytearray()
    with pytest.raises(httpx.ReadError, match="reset"):
        with api.stream("GET", f"/containers/{acq.id}/files/{zf.name}") as r:
            assert int(r.headers["content-length"]) == zf.size
            for chunk in r.iter_raw():
                received += chunk
    assert len(received) < zf.size and zf.content.startswith(bytes(received))
    assert api.get(f"/containers/{acq.id}/files/{zf.name}").content == zf.content


def test_fault_delay(srv, api, project):
    acq, zf = zip_file(project)
    srv.add_fault(r"\.dicom\.zip$", "delay", count=2, delay=0.6, method="GET")
    t0 = time.monotonic()
    assert api.get(f"/containers/{acq.id}/files/{zf.name}").content == zf.content
    assert time.monotonic() - t0 >= 0.6
    with pytest.raises(httpx.ReadTimeout):
        api.get(f"/containers/{acq.id}/files/{zf.name}", timeout=0.2)
    t0 = time.monotonic()
    assert api.get(f"/containers/{acq.id}/files/{zf.name}").content == zf.content
    assert time.monotonic() - t0 < 0.5  # count exhausted


def test_fault_corrupt_and_method_filter(srv, api, project):
    acq, zf = zip_file(project)
    srv.add_fault(r"\.dicom\.zip$", "corrupt", method="POST")
    assert api.get(f"/containers/{acq.id}/files/{zf.name}").content == zf.content  # GET unaffected
    srv.clear_faults()
    srv.add_fault(r"\.dicom\.zip$", "corrupt")
    bad = api.get(f"/containers/{acq.id}/files/{zf.name}").content
    assert len(bad) == zf.size and bad != zf.content
    srv.clear_faults()
    srv.add_fault(r"\.dicom\.zip$", "corrupt", span=(4, 6))  # just these bytes, e.g. one zip header field
    bad = api.get(f"/containers/{acq.id}/files/{zf.name}").content
    assert len(bad) == zf.size and bad[4:6] == bytes(b ^ 0xFF for b in zf.content[4:6])
    assert bad[:4] == zf.content[:4] and bad[6:] == zf.content[6:]
    srv.clear_faults()
    srv.add_fault(r"\.dicom\.zip$", "corrupt", span=(-2, zf.size))  # negative: from the end
    bad = api.get(f"/containers/{acq.id}/files/{zf.name}").content
    assert bad[:-2] == zf.content[:-2] and bad[-2:] == bytes(b ^ 0xFF for b in zf.content[-2:])
    srv.clear_faults()
    assert api.get(f"/containers/{acq.id}/files/{zf.name}").content == zf.content
    with pytest.raises(ValueError):
        srv.add_fault(".*", "explode")


# --- lifecycle and command line -------------------------------------------------------------


def test_stop_closes_keep_alive_connections(project):
    srv = FlywheelTestServer([project], api_keys={KEY}).start()
    with httpx.Client(base_url=srv.base_url + "/api", timeout=TIMEOUT) as client:
        assert client.get("/config").status_code == 200  # leaves a pooled connection
        t0 = time.monotonic()
        srv.stop()
        assert time.monotonic() - t0 < 5
        with pytest.raises(httpx.TransportError):
            client.get("/config")


def test_main_serves_until_sigterm(tmp_path):
    url_file = tmp_path / "login.txt"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clpipe.testing.fwserver",
            "--port",
            "0",
            "--key",
            "cli-key",
            "--subjects",
            "1",
            "--acquisitions",
            "1",
            "--slices",
            "2",
            "--url-file",
            str(url_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not url_file.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        login = url_file.read_text().strip()
        host, port, _, key = login.split(":")
        assert (host, key) == ("127.0.0.1", "cli-key")
        headers = {"Authorization": f"scitran-user {key}"}
        p = httpx.post(f"http://{host}:{port}/api/lookup", json={"path": ["lab", "study"]}, headers=headers, timeout=TIMEOUT).json()
        subjects = httpx.get(f"http://{host}:{port}/api/projects/{p['_id']}/subjects", headers=headers, timeout=TIMEOUT).json()
        assert [s["label"] for s in subjects] == ["sub-01"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert f"fw login {login}" in out
    assert not url_file.exists()


# --- the real SDK ---------------------------------------------------------------------------

SDK_SCRIPT = r"""
import json, os, sys
import flywheel
client = flywheel.Client(sys.argv[1])
out = sys.argv[2]
project = client.lookup("lab/study")
result = {"project": project.id, "files": [], "paged": [s.label for s in project.subjects.iter(limit=1)]}
for subject in project.subjects.iter():
    for session in subject.sessions.iter():
        for acq in session.acquisitions.iter():
            for f in acq.files:
                dest = os.path.join(out, acq.id + "-" + f.name)
                acq.download_file(f.name, dest)
                result["files"].append({"acq": acq.id, "name": f.name, "dest": dest, "size": f.size,
                                        "hash": f.hash, "labels": [subject.label, session.label, acq.label]})
            first = acq.files[0]
            first.download(os.path.join(out, "via-entry-" + acq.id))  # GET ...?version=N
print(json.dumps(result))
"""


SDK_CONTAINER_SCRIPT = r"""
import json, sys
import flywheel
client = flywheel.Client(sys.argv[1])
out = []
for cid in sys.argv[2:]:
    for how, container in (("get_container", client.get_container(cid)), ("get", client.get(cid))):
        out.append({"id": cid, "how": how, "type": type(container).__name__, "label": container.label,
                    "files": [[f.name, f.hash, f.size] for f in (container.files or [])]})
print(json.dumps(out))
"""


def test_sdk_get_container_gives_file_hashes(srv, project, tmp_path):
    """The real SDK reads ``GET containers/{cid}`` (``fw.get_container(id)``, ``fw.get(id)``)
    as the container of the right type, with each file's hash: what the native engine
    checks downloads against."""
    need_tool(Path(SDK_PYTHON), "flywheel-sdk's interpreter (CLPIPE_TEST_SDK_PYTHON)")
    script = tmp_path / "get.py"
    script.write_text(SDK_CONTAINER_SCRIPT)
    session = project.subjects[0].sessions[0]
    acqs = [a for s in project.subjects for ses in s.sessions for a in ses.acquisitions]
    env = dict(os.environ, HOME=str(tmp_path), FLYWHEEL_USER_HOME=str(tmp_path), PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [SDK_PYTHON, str(script), srv.login_key(KEY), session.id, *(a.id for a in acqs)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert [(r["id"], r["how"]) for r in result] == [
        (c, how) for c in [session.id, *(a.id for a in acqs)] for how in ("get_container", "get")
    ]
    assert {r["type"] for r in result if r["id"] == session.id} == {"SessionOutput"}
    assert {r["label"] for r in result if r["id"] == session.id} == {session.label}
    for acq in acqs:
        got = [r for r in result if r["id"] == acq.id]
        assert {r["type"] for r in got} == {"AcquisitionOutput"} and {r["label"] for r in got} == {acq.label}
        for r in got:
            assert r["files"] == [[f.name, f.hash, f.size] for f in acq.files]
    assert all(
        r["path"].startswith("/api/containers/") and r["status"] == 200
        for r in srv.requests
        if r["path"] not in ("/api/config", "/api/version", "/api/auth/status")
    )


def test_sdk_walk_and_download(srv, project, tmp_path):
    need_tool(Path(SDK_PYTHON), "flywheel-sdk's interpreter (CLPIPE_TEST_SDK_PYTHON)")
    script = tmp_path / "walk.py"
    script.write_text(SDK_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, HOME=str(tmp_path), FLYWHEEL_USER_HOME=str(tmp_path), PYTHONWARNINGS="ignore")
    proc = subprocess.run([SDK_PYTHON, str(script), srv.login_key(KEY), str(out)], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["project"] == project.id
    assert result["paged"] == ["sub-01", "sub-02"]
    source = {(n.obj.id, f.name): f for n, f in project.iter_files()}
    assert {(e["acq"], e["name"]) for e in result["files"]} == set(source)
    for e in result["files"]:
        f = source[(e["acq"], e["name"])]
        assert Path(e["dest"]).read_bytes() == f.content
        assert (e["size"], e["hash"]) == (f.size, f.hash)
    for node in project.walk():
        if node.kind == "acquisition":
            assert (out / f"via-entry-{node.obj.id}").read_bytes() == node.obj.files[0].content
    assert any(r["query"].get("version") == "1" for r in srv.requests)
    # Every listing ended with an empty after_id page (the SDK stops on an empty list).
    listings = [r for r in srv.requests if re.search(r"/(subjects|sessions|acquisitions)$", r["path"])]
    assert listings and all(r["status"] == 200 for r in listings)
    assert sum("after_id" in r["query"] for r in listings) >= len(project.subjects)
    assert all(r["auth_ok"] for r in srv.requests)
