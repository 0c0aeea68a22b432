"""The real DICOM test servers (scripts/infra/dicom-up.sh) and the synthetic data set they hold
(clpipe.testing.dicomdata).

The server tests use real clients (httpx for QIDO-RS/WADO-RS, pynetdicom for C-ECHO, C-FIND,
C-GET and C-MOVE) and check that each server holds exactly the data set described by
$CLPIPE_DICOM_EXPECTED, beside the patients whose PatientID starts with BENCH: those belong
to the benchmarks (bench/dicom_dimse.py, bench/dicom_sources.py), which may be running, or
may have been stopped before they removed them, and are left out. They never skip: without
the servers they fail, saying how to start them (scripts/test.sh does it). Every network
call is bounded by a timeout.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest

from clpipe.testing import dicomdata

from helpers import DICOM_START

TIMEOUT = 10  # seconds, for every association step and HTTP request
START = DICOM_START
SERVERS = ("orthanc", "dcmqrscp", "qrscp")
BENCH = "BENCH"  # PatientID prefix of the benchmarks' patients


def ours(patient_id: object) -> bool:
    """A patient of the test data set, not of a benchmark."""
    return not str(patient_id or "").startswith(BENCH)


# ------------------------------------------------------------------ the servers' environment


@pytest.fixture(scope="module")
def expected(dicom_expected) -> dict:
    return dicom_expected


@dataclass
class Dimse:
    aet: str
    host: str
    port: int


def dimse(dicom_env, server: str) -> Dimse:
    value = dicom_env[f"CLPIPE_{server.upper()}_DIMSE"]
    m = re.fullmatch(r"([^@]+)@([^:]+):(\d+)", value)
    assert m, f"CLPIPE_{server.upper()}_DIMSE={value!r} is not AET@HOST:PORT"
    return Dimse(m[1], m[2], int(m[3]))


def associate(target: Dimse, contexts, *, roles=(), handlers=()):
    from pynetdicom import AE

    ae = AE(ae_title="CLPIPE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.connection_timeout = TIMEOUT
    for ctx in contexts:
        if isinstance(ctx, tuple):  # (abstract syntax, [transfer syntaxes])
            ae.add_requested_context(*ctx)
        else:
            ae.add_requested_context(ctx)
    assoc = ae.associate(target.host, target.port, ae_title=target.aet, ext_neg=list(roles), evt_handlers=list(handlers))
    if not assoc.is_established:
        pytest.fail(f"{target.aet}@{target.host}:{target.port} refused or did not answer an association (is it running? `{START}`)")
    return assoc


def c_find(assoc, level: str, **keys) -> list:
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    query = Dataset()
    query.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(query, k, v)
    out = []
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        assert status, "C-FIND: no response within the DIMSE timeout"
        if status.Status in (0xFF00, 0xFF01):
            out.append(identifier)
        else:
            assert status.Status == 0x0000, f"C-FIND failed: status 0x{status.Status:04X}"
    return out


def by_uid(table: list[dict], key: str) -> dict[str, dict]:
    return {rec[key]: rec for rec in table}


# ------------------------------------------------------------------ Orthanc: HTTP and DICOMweb


def test_exports_point_at_the_data_set(dicom_env, expected):
    data = Path(dicom_env["CLPIPE_DICOM_DATA"])
    assert expected["format"] == dicomdata.FORMAT
    assert Path(expected["root"]) == data
    assert dicom_env["CLPIPE_ORTHANC_DICOMWEB"] == dicom_env["CLPIPE_ORTHANC_HTTP"] + "/dicom-web"
    assert int(dicom_env["CLPIPE_MOVE_PORT"]) > 0
    files = sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.is_file())
    assert files == sorted(rec["path"] for rec in expected["instances"])
    for rec in expected["instances"]:
        blob = (data / rec["path"]).read_bytes()
        assert (len(blob), hashlib.sha256(blob).hexdigest()) == (rec["size"], rec["sha256"]), rec["path"]


def test_orthanc_rest_counts(dicom_env, expected):
    """Orthanc's own counts of the data set's patients, studies, series and instances."""
    counts = [0, 0, 0, 0]
    with httpx.Client(base_url=dicom_env["CLPIPE_ORTHANC_HTTP"], timeout=TIMEOUT) as rest:
        for patient in rest.get("/patients", params={"expand": ""}).raise_for_status().json():
            if ours(patient["MainDicomTags"].get("PatientID")):
                stats = rest.get(f"/patients/{patient['ID']}/statistics").raise_for_status().json()
                for i, value in enumerate((1, stats["CountStudies"], stats["CountSeries"], stats["CountInstances"])):
                    counts[i] += int(value)
    c = expected["counts"]
    assert tuple(counts) == (
        c["patients"],
        c["studies"],
        c["series"],
        c["instances"],
    )


def _first(tag: dict | None):
    values = (tag or {}).get("Value") or [None]
    v = values[0]
    return v.get("Alphabetic") if isinstance(v, dict) else v


def test_orthanc_qido_rs_holds_exactly_the_data_set(dicom_env, expected):
    """QIDO-RS studies -> series -> instances: the same UIDs and the attributes, odd ones included."""
    studies_want = by_uid(expected["studies"], "StudyInstanceUID")
    series_want = by_uid(expected["series"], "SeriesInstanceUID")
    instances_want = {rec["SOPInstanceUID"]: rec["SeriesInstanceUID"] for rec in expected["instances"]}
    got_series, got_instances = {}, {}
    with httpx.Client(base_url=dicom_env["CLPIPE_ORTHANC_DICOMWEB"], timeout=TIMEOUT) as web:
        studies = web.get("/studies", headers={"Accept": "application/dicom+json"}).raise_for_status().json()
        got_studies = {_first(s["0020000D"]): s for s in studies if ours(_first(s.get("00100020")))}
        assert set(got_studies) == set(studies_want)
        for uid, s in got_studies.items():
            want = studies_want[uid]
            assert _first(s.get("00100020")) == want["PatientID"]
            assert _first(s.get("00100010")) == want["PatientName"]
            assert _first(s.get("00080020")) == want["StudyDate"]  # None: the study without a date
            for se in web.get(f"/studies/{uid}/series").raise_for_status().json():
                got_series[_first(se["0020000E"])] = (uid, se)
        assert set(got_series) == set(series_want)
        for se_uid, (st_uid, se) in got_series.items():
            want = series_want[se_uid]
            assert want["StudyInstanceUID"] == st_uid
            assert _first(se.get("0008103E")) == want["SeriesDescription"]  # tab, '/', '..', '*', é kept
            assert _first(se.get("00200011")) == want["SeriesNumber"]
            assert _first(se.get("00080060")) == "MR"
            for inst in web.get(f"/studies/{st_uid}/series/{se_uid}/instances").raise_for_status().json():
                got_instances[_first(inst["00080018"])] = se_uid
    assert got_instances == instances_want


def test_orthanc_wado_rs_gives_the_multiframe_instance_as_stored(dicom_env, expected):
    uid = expected["odd"]["multiframe_instance"]
    rec = next(r for r in expected["instances"] if r["SOPInstanceUID"] == uid)
    url = f"{dicom_env['CLPIPE_ORTHANC_DICOMWEB']}/studies/{rec['StudyInstanceUID']}/series/{rec['SeriesInstanceUID']}/instances/{uid}"
    r = httpx.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}, timeout=TIMEOUT)
    r.raise_for_status()
    body = r.content
    start = body.index(b"DICM") - 128
    ds = pydicom.dcmread(io.BytesIO(body[start:]))
    original = pydicom.dcmread(Path(dicom_env["CLPIPE_DICOM_DATA"]) / rec["path"])
    assert ds.SOPInstanceUID == uid and int(ds.NumberOfFrames) == rec["NumberOfFrames"] == 8
    assert ds.PixelData == original.PixelData


# ------------------------------------------------------------------ DIMSE: all three servers


@pytest.mark.parametrize("server", SERVERS)
def test_c_echo(dicom_env, server):
    from pynetdicom.sop_class import Verification

    assoc = associate(dimse(dicom_env, server), [Verification])
    try:
        status = assoc.send_c_echo()
        assert status and status.Status == 0x0000
    finally:
        assoc.release()


@pytest.mark.parametrize("server", SERVERS)
def test_c_find_study_level_holds_exactly_the_studies(dicom_env, expected, server):
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    assoc = associate(dimse(dicom_env, server), [StudyRootQueryRetrieveInformationModelFind])
    try:
        found = c_find(assoc, "STUDY", StudyInstanceUID="", PatientID="", PatientName="", StudyDate="")
    finally:
        assoc.release()
    found = [ds for ds in found if ours(ds.get("PatientID"))]
    # pynetdicom's qrscp answers once per instance, not per study: a client must de-duplicate
    if server == "qrscp":
        assert len(found) == expected["counts"]["instances"]
    else:
        assert len(found) == expected["counts"]["studies"]
    got = {ds.StudyInstanceUID: ds for ds in found}
    want = by_uid(expected["studies"], "StudyInstanceUID")
    assert set(got) == set(want)
    for uid, ds in got.items():
        assert ds.PatientID == want[uid]["PatientID"]
        assert str(ds.PatientName) == want[uid]["PatientName"]
        assert (ds.get("StudyDate") or None) == want[uid]["StudyDate"]


def _get_contexts(expected) -> list[tuple[str, list[str]]]:
    """One storage context per (SOP class, transfer syntax) of the data set, so that the server
    can send every instance in the transfer syntax it was stored in."""
    pairs = sorted({(r["SOPClassUID"], r["TransferSyntaxUID"]) for r in expected["instances"]})
    return [(cls, [ts]) for cls, ts in pairs]


@pytest.mark.parametrize("odd", ["rle_series", "multiframe_series", "implicit_vr_series"])
def test_c_get_series_from_orthanc(dicom_env, expected, odd):
    """C-GET one series from Orthanc: the instances decode to the expected SOP Instance UIDs,
    in their own transfer syntax, with the original pixel data."""
    from pydicom.dataset import Dataset
    from pynetdicom import build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    series_uid = expected["odd"][odd]
    series = by_uid(expected["series"], "SeriesInstanceUID")[series_uid]
    want = {r["SOPInstanceUID"]: r for r in expected["instances"] if r["SeriesInstanceUID"] == series_uid}
    received: dict[str, pydicom.Dataset] = {}

    def on_store(event):
        ds = pydicom.dcmread(io.BytesIO(event.encoded_dataset()))
        received[ds.SOPInstanceUID] = ds
        return 0x0000

    contexts = _get_contexts(expected)
    assoc = associate(
        dimse(dicom_env, "orthanc"),
        [StudyRootQueryRetrieveInformationModelGet, *contexts],
        roles=[build_role(cls, scp_role=True) for cls in expected["sop_classes"]],
        handlers=[(evt.EVT_C_STORE, on_store)],
    )
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID, query.SeriesInstanceUID = series["StudyInstanceUID"], series_uid
        final = None
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            assert status, "C-GET: no response within the DIMSE timeout"
            final = status
    finally:
        assoc.release()
    assert final is not None and final.Status == 0x0000, f"C-GET ended with {final}"
    assert set(received) == set(want)
    data = Path(dicom_env["CLPIPE_DICOM_DATA"])
    for uid, ds in received.items():
        original = pydicom.dcmread(data / want[uid]["path"])
        assert ds.file_meta.TransferSyntaxUID == want[uid]["TransferSyntaxUID"]
        assert ds.SeriesInstanceUID == series_uid
        assert ds.PixelData == original.PixelData


@pytest.mark.parametrize("server", SERVERS)
def test_c_move_to_the_clpipe_destination(dicom_env, expected, server):
    """Each server knows AE CLPIPE at 127.0.0.1:$CLPIPE_MOVE_PORT and sends it both studies of
    the patient with two (every odd series but the non-ASCII ones: RLE, multi-frame, ...)."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    patient = expected["odd"]["two_study_patient"]
    studies = [s["StudyInstanceUID"] for s in expected["studies"] if s["PatientID"] == patient]
    want = {r["SOPInstanceUID"]: r for r in expected["instances"] if r["StudyInstanceUID"] in studies}
    received: dict[str, str] = {}
    lock = threading.Lock()

    def on_store(event):
        with lock:
            received[event.request.AffectedSOPInstanceUID] = event.context.transfer_syntax
        return 0x0000

    scp = AE(ae_title="CLPIPE")
    scp.acse_timeout = scp.dimse_timeout = scp.network_timeout = TIMEOUT
    for cls in expected["sop_classes"]:
        scp.add_supported_context(cls, expected["transfer_syntaxes"])
    listener = scp.start_server(("127.0.0.1", int(dicom_env["CLPIPE_MOVE_PORT"])), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    finals = []
    try:
        assoc = associate(dimse(dicom_env, server), [StudyRootQueryRetrieveInformationModelMove])
        try:
            for uid in studies:
                query = Dataset()
                query.QueryRetrieveLevel = "STUDY"
                query.StudyInstanceUID = uid
                final = None
                for status, _ in assoc.send_c_move(query, "CLPIPE", StudyRootQueryRetrieveInformationModelMove):
                    assert status, "C-MOVE: no response within the DIMSE timeout"
                    final = status
                finals.append(final and final.Status)
        finally:
            assoc.release()
    finally:
        listener.shutdown()
    assert finals == [0x0000] * len(studies)
    assert set(received) == set(want)
    if server != "dcmqrscp":  # dcmqrscp holds the RLE series decompressed (see dicom-up.sh)
        assert received == {uid: rec["TransferSyntaxUID"] for uid, rec in want.items()}


# ------------------------------------------------------------------ the data set generator


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    return dicomdata.make_dataset(tmp_path_factory.mktemp("small") / "data", rows=16, cols=16)


def test_dataset_shape(small):
    assert small["counts"] | {"bytes": 0} == {"patients": 3, "studies": 4, "series": 13, "instances": 139, "frames": 146, "bytes": 0}
    studies_per_patient = {p["PatientID"]: p["studies"] for p in small["patients"]}
    assert studies_per_patient == {"SUB01": 2, "SUB02": 1, "SUB 03/x": 1}
    assert all(s["instances"] >= 1 for s in small["series"])
    assert set(small["transfer_syntaxes"]) == set(dicomdata.TRANSFER_SYNTAXES)
    assert set(small["sop_classes"]) == set(dicomdata.SOP_CLASSES)


def test_dataset_is_deterministic(small, tmp_path):
    again = dicomdata.make_dataset(tmp_path / "again", rows=16, cols=16)
    strip = lambda d: {k: v for k, v in d.items() if k != "root"}  # noqa: E731
    assert strip(again) == strip(small)
    other = dicomdata.make_dataset(tmp_path / "other", rows=16, cols=16, seed="1")
    assert not {r["SOPInstanceUID"] for r in other["instances"]} & {r["SOPInstanceUID"] for r in small["instances"]}


def test_dataset_files_match_their_description(small):
    root = Path(small["root"])
    uids = set()
    for rec in small["instances"]:
        blob = (root / rec["path"]).read_bytes()
        assert (len(blob), hashlib.sha256(blob).hexdigest()) == (rec["size"], rec["sha256"])
        assert blob[128:132] == b"DICM"
        ds = pydicom.dcmread(io.BytesIO(blob))
        assert ds.file_meta.TransferSyntaxUID == rec["TransferSyntaxUID"]
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == rec["SOPInstanceUID"]
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "PatientID", "Modality", "AccessionNumber", "SOPClassUID"):
            assert ds.get(key) == rec[key], key
        assert str(ds.PatientName) == rec["PatientName"]
        assert ds.get("StudyDate") == rec["StudyDate"]
        assert ds.get("SeriesDescription") == rec["SeriesDescription"]
        assert (int(ds.SeriesNumber) if "SeriesNumber" in ds else None) == rec["SeriesNumber"]
        assert int(ds.get("NumberOfFrames", 1)) == rec["NumberOfFrames"]
        for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID):
            assert re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid) and len(uid) <= 64
        uids.add(ds.SOPInstanceUID)
    assert len(uids) == len(small["instances"])


def test_dataset_has_the_odd_cases(small):
    series = by_uid(small["series"], "SeriesInstanceUID")
    studies = by_uid(small["studies"], "StudyInstanceUID")
    odd = small["odd"]
    descriptions = {s["SeriesDescription"] for s in small["series"]}
    assert {"rs-fMRI/run 1", "../../etc", "T2 RLE*", "DWI\tb=1000  x", "séquence localizer é"} <= descriptions
    assert series[odd["no_description_series"]]["SeriesNumber"] is None
    assert studies[odd["no_study_date_study"]]["StudyDate"] is None
    assert series[odd["rle_series"]]["TransferSyntaxUID"] == dicomdata.RLE_LOSSLESS
    assert series[odd["implicit_vr_series"]]["TransferSyntaxUID"] == dicomdata.IMPLICIT_LE
    assert series[odd["multiframe_series"]]["frames"] == 8
    names = {p["PatientName"] for p in small["patients"]}
    assert "Müller^José" in names and any("/" in p["PatientID"] for p in small["patients"])
    charsets = {p["SpecificCharacterSet"] for p in small["patients"]}
    assert charsets == {None, "ISO_IR 192", "ISO_IR 100"}


def test_rle_series_decodes_to_12_bit_pixels(small):
    from pydicom.pixels import get_decoder

    root = Path(small["root"])
    rec = next(r for r in small["instances"] if r["TransferSyntaxUID"] == dicomdata.RLE_LOSSLESS)
    ds = pydicom.dcmread(root / rec["path"])
    buf, _meta = get_decoder(dicomdata.RLE_LOSSLESS).as_buffer(ds)
    assert len(buf) == 16 * 16 * 2
    assert max(buf[1::2]) <= 0x0F and len(set(buf)) > 4  # 12 bits stored, and not blank


@pytest.mark.parametrize(
    "pixels",
    [
        bytes(range(256)) * 2,  # literals only
        b"\x00\x01" * 256,  # one long run per byte plane
        bytes([7] * 300 + [1, 2] + [9] * 3 + list(range(100)) + [5] * 107),  # runs > 128, short runs
    ],
)
def test_rle_encoder_round_trips(pixels):
    """The generator's own RLE encoder, decoded by pydicom's."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder

    rows, cols = 16, len(pixels) // 32
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = dicomdata.RLE_LOSSLESS
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = encapsulate([dicomdata._rle_frame(pixels, rows, cols)])
    buf, _ = get_decoder(dicomdata.RLE_LOSSLESS).as_buffer(ds)
    assert bytes(buf) == pixels


def test_scale_multiplies_the_instances(tmp_path):
    desc = dicomdata.make_dataset(tmp_path / "x2", scale=2, rows=8, cols=8)
    assert desc["counts"]["instances"] == 2 * 138 + 1  # the multi-frame series stays one instance
    assert desc["counts"]["series"] == 13


def test_file_tree(tmp_path):
    desc = dicomdata.make_file_tree(tmp_path / "tree", rows=16, cols=16)
    root = Path(desc["root"])
    tree = desc["tree"]
    on_disk = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    listed = sorted([f["path"] for f in tree["dicom_files"]] + [f["path"] for f in tree["other_files"]])
    assert on_disk == listed
    kinds = [f["kind"] for f in tree["dicom_files"]]
    assert kinds.count("no_preamble") == 1 and kinds.count("duplicate") == 3
    assert kinds.count("primary") == desc["counts"]["instances"] - 1
    assert any(Path(p).suffix == "" for p in on_disk if "IM" in p)  # DICOM files without extension
    assert any(len(Path(f["path"]).parts) >= 7 for f in tree["dicom_files"])  # a deeply nested series
    assert any("é" in p for p in on_disk)
    by_path = {f["path"]: f for f in tree["dicom_files"]}
    for f in tree["dicom_files"]:
        blob = (root / f["path"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == f["sha256"]
        if f["kind"] == "no_preamble":
            assert blob[128:132] != b"DICM"
            with pytest.raises(pydicom.errors.InvalidDicomError):
                pydicom.dcmread(io.BytesIO(blob))
            ds = pydicom.dcmread(io.BytesIO(blob), force=True)
        else:
            ds = pydicom.dcmread(io.BytesIO(blob))
        assert ds.SOPInstanceUID == f["SOPInstanceUID"]
    for dup in tree["duplicates"]:
        twin = [f for f in tree["dicom_files"] if f["SOPInstanceUID"] == by_path[dup]["SOPInstanceUID"] and f["path"] != dup]
        assert twin and twin[0]["sha256"] == by_path[dup]["sha256"]
    for f in tree["other_files"]:
        with pytest.raises(Exception):
            pydicom.dcmread(root / f["path"])
    assert {r["SOPInstanceUID"] for r in desc["instances"]} == {f["SOPInstanceUID"] for f in tree["dicom_files"]}
    with pytest.raises(FileExistsError):
        dicomdata.make_file_tree(root)


def test_cli_writes_data_and_description(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "clpipe.testing.dicomdata", str(tmp_path / "out"), "--size", "8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    desc = json.loads((tmp_path / "out.expected.json").read_text(encoding="utf-8"))
    assert desc["counts"]["instances"] == 139 and "139 instances" in proc.stderr
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 139
