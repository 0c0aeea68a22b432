"""The DICOMweb source against the real Orthanc + DICOMweb plugin (scripts/infra/dicom-up.sh):
listing with every filter, retrieval of whole series as stored, and the engine end to end.

Orthanc holds the synthetic data set described by $CLPIPE_DICOM_EXPECTED. The benchmark
(bench/dicom_sources.py) may add patients whose PatientID starts with ``BENCH``; every test
here leaves those out. Only what Orthanc cannot be made to do (429, 503, 401, a broken
body, refusing ``transfer-syntax=*``) is played by a local ``httpx.MockTransport``.

Orthanc received the data set over DIMSE (C-STORE), so it wrote its own file meta
(implementation UID and version of DCMTK): the files it serves differ from the generated
ones in the file meta only. So the tests check that each served file is byte for byte the
file Orthanc stores (its REST API), and that its data set (everything after the file meta)
is byte for byte the generated one, in the same transfer syntax.
"""

from __future__ import annotations

import hashlib
import io
import re
import socket
from pathlib import Path

import httpx
import pytest

from clpipe.errors import ConfigError, PreflightError
from clpipe.sources.dicom import DEFAULT_TEMPLATE, DicomQuery, Series, SourceSettings, entries, parse_source_url, series_folder
from clpipe.sources.dicomweb import (
    ACCEPT_AS_STORED,
    DicomWebSource,
    content_type_params,
    json_value,
    meta_sop_instance_uid,
    read_multipart,
    sop_instance_uid,
    widen,
)
from clpipe.sync.engine import Engine, Options, PermanentError, TransientError
from clpipe.sync.manifest import STATE_DIR, SyncState

from helpers import DICOM_START, assert_same_instance, make_certificate, original, stored_file

pytestmark = pytest.mark.orthanc

TIMEOUT = 20.0  # seconds, every HTTP request
START = DICOM_START
AUTH_VARS = ("CLPIPE_DICOMWEB_TOKEN", "CLPIPE_DICOMWEB_USER", "CLPIPE_DICOMWEB_PASSWORD")
BENCH_PREFIX = "BENCH"  # the benchmark's patients: never part of what these tests expect


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def expected(dicom_expected) -> dict:
    return dicom_expected


@pytest.fixture
def no_credentials(monkeypatch):
    for var in AUTH_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def source(dicom_env, no_credentials):
    src = DicomWebSource(parse_source_url("dicomweb+" + dicom_env["CLPIPE_ORTHANC_DICOMWEB"]), SourceSettings(jobs=4, timeout=TIMEOUT))
    yield src
    src.close()


def listed(src: DicomWebSource, query: DicomQuery = DicomQuery()) -> list[Series]:
    """The source's series, the benchmark's patients left out."""
    return [s for s in src.series(query) if not s.attrs["PatientID"].startswith(BENCH_PREFIX)]


def expected_uids(expected: dict, keep=lambda series, study: True) -> set[str]:
    studies = {st["StudyInstanceUID"]: st for st in expected["studies"]}
    return {se["SeriesInstanceUID"] for se in expected["series"] if keep(se, studies[se["StudyInstanceUID"]])}


# ----------------------------------------------------------------------------- listing


def test_lists_exactly_the_expected_series_with_counts_and_attributes(source, expected):
    found = listed(source)
    assert len(found) == len({s.uid for s in found}), "a series was listed twice"
    by_uid = {s.uid: s for s in found}
    assert set(by_uid) == expected_uids(expected)
    studies = {st["StudyInstanceUID"]: st for st in expected["studies"]}
    patients = {p["PatientID"]: p for p in expected["patients"]}
    for se in expected["series"]:
        got, st = by_uid[se["SeriesInstanceUID"]], studies[se["StudyInstanceUID"]]
        assert got.count == se["instances"], se["SeriesDescription"]
        want = {
            "PatientID": se["PatientID"],
            "PatientName": patients[se["PatientID"]]["PatientName"],
            "StudyInstanceUID": se["StudyInstanceUID"],
            "StudyDate": st["StudyDate"] or "",
            "StudyDescription": st["StudyDescription"] or "",
            "AccessionNumber": st["AccessionNumber"] or "",
            "SeriesInstanceUID": se["SeriesInstanceUID"],
            "Modality": se["Modality"],
            "SeriesNumber": "" if se["SeriesNumber"] is None else str(se["SeriesNumber"]),
            "SeriesDescription": se["SeriesDescription"] or "",
        }
        assert {k: got.attrs[k] for k in want} == want
        assert re.fullmatch(r"\d{6}", got.attrs["StudyTime"])


def test_series_missing_optional_attributes_are_listed(source, expected):
    by_uid = {s.uid: s for s in listed(source)}
    odd = expected["odd"]
    no_description = by_uid[odd["no_description_series"]]
    assert (no_description.attrs["SeriesDescription"], no_description.attrs["SeriesNumber"]) == ("", "")
    assert no_description.count == 10 * expected["generator"]["scale"]
    undated = [s for s in by_uid.values() if s.attrs["StudyInstanceUID"] == odd["no_study_date_study"]]
    assert undated and all(s.attrs["StudyDate"] == "" and s.attrs["AccessionNumber"] == "" for s in undated)


FILTERS = [
    # (query, which expected series it keeps)
    (DicomQuery(patient_id="SUB0*"), lambda se, st: se["PatientID"] in ("SUB01", "SUB02")),
    (DicomQuery(patient_id="SUB 03/x"), lambda se, st: se["PatientID"] == "SUB 03/x"),
    (DicomQuery(patient_id="sub01"), lambda se, st: se["PatientID"] == "SUB01"),
    (DicomQuery(patient_name="müller^josé"), lambda se, st: se["PatientID"] == "SUB02"),
    (DicomQuery(patient_name="O'Brien*"), lambda se, st: se["PatientID"] == "SUB 03/x"),
    (
        DicomQuery(study_date="20240101-20240228"),
        lambda se, st: (st["StudyDate"] or "0") >= "20240101" and (st["StudyDate"] or "9") <= "20240228",
    ),
    (DicomQuery(study_date="20240301-"), lambda se, st: (st["StudyDate"] or "0") >= "20240301"),
    (DicomQuery(study_date="-20240131"), lambda se, st: (st["StudyDate"] or "9") <= "20240131"),
    (DicomQuery(study_date="20240220"), lambda se, st: st["StudyDate"] == "20240220"),
    (DicomQuery(modality="MR"), lambda se, st: True),
    (DicomQuery(modality="CT"), lambda se, st: False),
    (DicomQuery(series_description="T1w"), lambda se, st: se["SeriesDescription"] == "T1w"),
    (DicomQuery(series_description="T2 RLE*"), lambda se, st: (se["SeriesDescription"] or "").startswith("T2 RLE")),
    (DicomQuery(series_description="DWI\tb=1000  x"), lambda se, st: se["SeriesDescription"] == "DWI\tb=1000  x"),
    (DicomQuery(series_description="Série 1: a?b<c>|d"), lambda se, st: se["SeriesDescription"] == "Série 1: a?b<c>|d"),
    (DicomQuery(series_description="séquence*"), lambda se, st: (se["SeriesDescription"] or "").startswith("séquence")),
    (DicomQuery(accession_number="ACC 0003/b"), lambda se, st: st["AccessionNumber"] == "ACC 0003/b"),
    (DicomQuery(accession_number="ACC000?"), lambda se, st: st["AccessionNumber"] in ("ACC0001", "ACC0002")),
    (
        DicomQuery(patient_id="SUB01", series_description="*RLE*", study_date="20240115"),
        lambda se, st: se["SeriesDescription"] == "T2 RLE*",
    ),
]


@pytest.mark.parametrize("query,keep", FILTERS, ids=[repr({k: v for k, v in vars(q).items() if v}) for q, _ in FILTERS])
def test_each_filter(source, expected, query, keep):
    found = listed(source, query)
    assert {s.uid for s in found} == expected_uids(expected, keep)
    assert len(found) == len({s.uid for s in found})


def test_limit_counts_studies(source, expected):
    per_study: dict[str, set] = {}
    for se in expected["series"]:
        per_study.setdefault(se["StudyInstanceUID"], set()).add(se["SeriesInstanceUID"])
    for limit in (1, 2, len(per_study)):
        found = list(source.series(DicomQuery(patient_id="SUB*", limit=limit)))
        studies = {s.attrs["StudyInstanceUID"] for s in found}
        assert len(studies) == limit
        for study in studies:  # whole studies, never part of one
            assert {s.uid for s in found if s.attrs["StudyInstanceUID"] == study} == per_study[study]
    # a study without a matching series does not use up the limit
    found = list(source.series(DicomQuery(patient_id="SUB*", series_description="T2 RLE*", limit=1)))
    assert [s.uid for s in found] == [expected["odd"]["rle_series"]]


def test_listing_pages_through_studies(source, expected, monkeypatch):
    import clpipe.sources.dicomweb as dicomweb

    monkeypatch.setattr(dicomweb, "PAGE", 1)  # one study per QIDO answer: offset paging does the rest
    assert {s.uid for s in listed(source)} == expected_uids(expected)


def test_listing_retrieves_no_instance(dicom_env, no_credentials, expected):
    seen: list[str] = []
    client_hooks = {"request": [lambda request: seen.append(request.url.path)]}
    src = DicomWebSource(parse_source_url("dicomweb+" + dicom_env["CLPIPE_ORTHANC_DICOMWEB"]), SourceSettings(timeout=TIMEOUT))
    src._client.event_hooks = client_hooks
    try:
        list(src.series(DicomQuery(patient_id="SUB*")))
    finally:
        src.close()
    assert seen and all(path.endswith(("/studies", "/series")) for path in seen), seen
    assert len(seen) <= 2 + len(expected["studies"])  # the study pages, then one query per study


# ----------------------------------------------------------------------------- retrieval


def retrieve(src: DicomWebSource, series: Series) -> dict[str, bytes]:
    got: dict[str, bytes] = {}
    with src.instances(series) as items:
        for uid, data in items:
            assert uid not in got, f"{uid} arrived twice"
            got[uid] = data
    return got


def test_instances_are_the_stored_files_of_the_series(source, expected, dicom_env):
    by_uid = {s.uid: s for s in listed(source)}
    records: dict[str, list[dict]] = {}
    for rec in expected["instances"]:
        records.setdefault(rec["SeriesInstanceUID"], []).append(rec)
    for series_uid, recs in records.items():
        got = retrieve(source, by_uid[series_uid])
        assert set(got) == {r["SOPInstanceUID"] for r in recs}
        for rec in recs:
            assert_same_instance(dicom_env, rec, got[rec["SOPInstanceUID"]])


@pytest.mark.parametrize("which", ["rle_series", "implicit_vr_series", "multiframe_series"])
def test_odd_series_arrive_byte_for_byte_as_stored(source, expected, dicom_env, which):
    """transfer-syntax=* makes Orthanc send what it stores: RLE stays RLE, Implicit VR stays
    Implicit VR, the 8-frame instance is whole."""
    series_uid = expected["odd"][which]
    series = next(s for s in listed(source) if s.uid == series_uid)
    got = retrieve(source, series)
    recs = [r for r in expected["instances"] if r["SeriesInstanceUID"] == series_uid]
    assert set(got) == {r["SOPInstanceUID"] for r in recs}
    for rec in recs:
        data = got[rec["SOPInstanceUID"]]
        assert hashlib.sha256(data).digest() == hashlib.sha256(stored_file(dicom_env, rec["SOPInstanceUID"])).digest()
        assert_same_instance(dicom_env, rec, data)
    if which == "multiframe_series":
        import pydicom

        (data,) = got.values()
        assert int(pydicom.dcmread(io.BytesIO(data)).NumberOfFrames) == 8
        assert set(got) == {expected["odd"]["multiframe_instance"]}


def test_a_series_gone_from_the_server_is_a_permanent_error(source, expected):
    study = expected["studies"][0]
    gone = Series(attrs={"StudyInstanceUID": study["StudyInstanceUID"], "SeriesInstanceUID": "1.2.3.4.5.6.7.8.9"})
    with pytest.raises(PermanentError, match="series gone"):
        with source.instances(gone) as items:
            list(items)


# ----------------------------------------------------------------------------- multipart parser


def multipart(
    parts: list[bytes], boundary: bytes = b"b0undary", preamble: bytes = b"", epilogue: bytes = b"", padding: bytes = b""
) -> bytes:
    out = preamble + (b"\r\n" if preamble else b"")
    for part in parts:
        out += b"--" + boundary + padding + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
    return out + b"--" + boundary + b"--" + epilogue


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


PARTS = [b"first", b"\r\n--b0undar not the boundary\r\n--", b"", bytes(range(256)) * 40, b"--b0undary"[:-1] + b"X"]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 11, 64, 1000, 1 << 20])
def test_multipart_parts_whatever_the_chunks(size):
    body = multipart(PARTS, preamble=b"ignored preamble", epilogue=b"\r\nignored epilogue", padding=b" \t")
    got = list(read_multipart(chunked(body, size), "b0undary"))
    assert [data for _, data in got] == PARTS
    assert all(headers == {"content-type": "application/dicom"} for headers, _ in got)


def test_multipart_boundary_at_the_very_start_and_a_part_without_headers():
    body = b"--xyz\r\n\r\nno headers\r\n--xyz\r\nA: 1\r\n\r\nwith\r\n--xyz--"
    assert list(read_multipart([body], b"xyz")) == [({}, b"no headers"), ({"a": "1"}, b"with")]


@pytest.mark.parametrize("cut", [0, 5, 20, 60, -40, -13, -3, -1])
def test_truncated_multipart_is_transient(cut):
    body = multipart([b"A" * 50, b"B" * 50])
    with pytest.raises(TransientError, match="broke off"):
        list(read_multipart(chunked(body[:cut], 7), "b0undary"))


def test_content_type_parameters():
    assert content_type_params('multipart/related; type="application/dicom"; boundary="a;b=c \\"q\\""') == (
        "multipart/related",
        {"type": "application/dicom", "boundary": 'a;b=c "q"'},
    )
    assert content_type_params("Multipart/Related;boundary=abc-123;type=application/dicom") == (
        "multipart/related",
        {"boundary": "abc-123", "type": "application/dicom"},
    )
    assert content_type_params("application/dicom") == ("application/dicom", {})


def test_widened_filters_only_use_plain_characters():
    assert widen("SUB0*") == "SUB0*"
    assert widen("SUB 03/x") == "SUB?03/x"
    assert widen("Müller^José") == "M*ller?Jos*"
    assert widen("a&b=c#d%e+f\\g") == "a?b?c?d?e?f?g"
    assert widen("ééé") == "*"


def test_json_values():
    assert json_value({"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}) == "Doe^Jane"
    assert json_value({"vr": "PN", "Value": [{"Ideographic": "山田"}]}) == "山田"
    assert json_value({"vr": "IS", "Value": [3]}) == "3"
    assert json_value({"vr": "DS", "Value": [2.0]}) == "2"
    assert json_value({"vr": "CS", "Value": ["A", "B"]}) == "A\\B"
    assert json_value({"vr": "LO"}) == "" and json_value(None) == ""


def test_sop_instance_uid_of_a_part(dicom_env, expected):
    for rec in expected["instances"]:  # every transfer syntax, the multi-frame one too
        data = original(dicom_env, rec)
        assert meta_sop_instance_uid(data) == rec["SOPInstanceUID"]
        assert sop_instance_uid(data) == rec["SOPInstanceUID"]
    # no file meta (a bare data set, as old files are): pydicom reads it from the data set
    bare = instance_bytes("1.2.3.4.99", part10=False)
    assert meta_sop_instance_uid(bare) == "" and sop_instance_uid(bare) == "1.2.3.4.99"
    with pytest.raises(TransientError, match="not a DICOM file|without SOPInstanceUID"):
        sop_instance_uid(b"<html>oops</html>")


# ----------------------------------------------------------------------------- what Orthanc cannot do


def instance_bytes(uid: str, part10: bool = True) -> bytes:
    """A small Part-10 file with this SOPInstanceUID (``part10=False``: the bare data set,
    Implicit VR Little Endian, without preamble or file meta)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.4", uid
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    if int(pydicom.__version__.split(".")[0]) >= 3:
        if part10:
            ds.save_as(buf, enforce_file_format=True)
        else:
            del ds.file_meta
            ds.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=False)
    else:  # pragma: no cover
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(buf, write_like_original=False)
    return buf.getvalue()


SERIES = Series(attrs={"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4"}, count=2)
MOCK_URL = parse_source_url("dicomweb+http://pacs.example.org/dicom-web")


def mock_source(handler, **settings) -> DicomWebSource:
    return DicomWebSource(MOCK_URL, SourceSettings(timeout=5, **settings), transport=httpx.MockTransport(handler))


def series_answer(parts: list[bytes], status: int = 200, cut: int = 0) -> httpx.Response:
    body = multipart(parts, boundary=b"abc")
    return httpx.Response(
        status, content=body[: len(body) - cut], headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary="abc"'}
    )


def test_credentials_from_the_environment(monkeypatch, no_credentials):
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Authorization"))
        return httpx.Response(200, json=[])

    for env, want in (
        ({}, None),
        ({"CLPIPE_DICOMWEB_TOKEN": "t0ken"}, "Bearer t0ken"),
        ({"CLPIPE_DICOMWEB_USER": "ann", "CLPIPE_DICOMWEB_PASSWORD": "pw:1"}, "Basic YW5uOnB3OjE="),
    ):
        for var in AUTH_VARS:
            monkeypatch.delenv(var, raising=False)
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        with mock_source(handler) as src:
            list(src.series(DicomQuery()))
        assert seen[-1] == want
    monkeypatch.setenv("CLPIPE_DICOMWEB_TOKEN", "t0ken")
    with pytest.raises(ConfigError, match="not both"):
        mock_source(handler)
    monkeypatch.delenv("CLPIPE_DICOMWEB_TOKEN")
    monkeypatch.delenv("CLPIPE_DICOMWEB_PASSWORD")
    with pytest.raises(ConfigError, match="CLPIPE_DICOMWEB_PASSWORD is not set"):
        mock_source(handler)


def test_retrieve_errors_map_to_transient_and_permanent(monkeypatch, no_credentials):
    monkeypatch.setenv("CLPIPE_DICOMWEB_TOKEN", "s3cr3t-t0ken")
    answers = {
        429: httpx.Response(429, headers={"Retry-After": "7"}, text="slow down"),
        503: httpx.Response(503, text="maintenance"),
        401: httpx.Response(401),
        403: httpx.Response(403),
        404: httpx.Response(404),
        400: httpx.Response(400, text="bad request"),
    }
    for status, answer in answers.items():
        with mock_source(lambda request, a=answer: a) as src:
            with pytest.raises((TransientError, PermanentError)) as info:
                with src.instances(SERIES) as items:
                    list(items)
        message = str(info.value)
        assert "s3cr3t" not in message and f"HTTP {status}" in message and "pacs.example.org" in message
        if status in (429, 503):
            assert type(info.value) is TransientError
            assert info.value.retry_after == (7.0 if status == 429 else None)
        else:
            assert type(info.value) is PermanentError
        if status in (401, 403):
            assert "CLPIPE_DICOMWEB_TOKEN" in message and "the token in CLPIPE_DICOMWEB_TOKEN" in message
        if status == 404:
            assert "series gone" in message


def test_retrieve_transport_faults_are_transient(no_credentials):
    def timeout(request):
        raise httpx.ReadTimeout("timed out", request=request)

    def reset(request):
        raise httpx.RemoteProtocolError("peer closed connection", request=request)

    for handler, words in (
        (timeout, "did not answer in time"),
        (reset, "broke"),
        (lambda request: series_answer([instance_bytes("1.2.3.4.1"), instance_bytes("1.2.3.4.2")], cut=9), "broke off"),
    ):
        with mock_source(handler) as src:
            with pytest.raises(TransientError, match=words):
                with src.instances(SERIES) as items:
                    list(items)


def test_a_server_refusing_transfer_syntax_star_gets_its_default(no_credentials):
    accepts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        accepts.append(request.headers["Accept"])
        if "transfer-syntax=*" in request.headers["Accept"]:
            return httpx.Response(406)
        return series_answer([instance_bytes("1.2.3.4.1"), instance_bytes("1.2.3.4.2")])

    with mock_source(handler) as src:
        for _ in range(2):
            with src.instances(SERIES) as items:
                assert [uid for uid, _ in items] == ["1.2.3.4.1", "1.2.3.4.2"]
        assert accepts == [ACCEPT_AS_STORED, 'multipart/related; type="application/dicom"', 'multipart/related; type="application/dicom"']
        assert src.notes and "406" in src.notes[0]


def test_listing_retries_transient_answers_then_says_what_is_wrong(monkeypatch, no_credentials):
    import clpipe.sources.dicomweb as dicomweb

    monkeypatch.setattr(dicomweb.time, "sleep", lambda seconds: None)
    calls: list[str] = []
    study = {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "00100020": {"vr": "LO", "Value": ["P1"]}}
    series = {"0020000E": {"vr": "UI", "Value": ["1.2.3.4"]}, "00080060": {"vr": "CS", "Value": ["MR"]}}

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 1:
            return httpx.Response(503, headers={"Retry-After": "0"})
        if request.url.path.endswith("/instances"):  # no NumberOfSeriesRelatedInstances: counted
            offset = int(request.url.params["offset"])
            items = [{"00080018": {"vr": "UI", "Value": [f"1.2.3.4.{i}"]}} for i in range(3)]
            return httpx.Response(200, json=items[offset:])
        if request.url.path.endswith("/series"):
            return httpx.Response(200, json=[series])
        return httpx.Response(200, json=[study] if request.url.params["offset"] == "0" else [])

    with mock_source(flaky) as src:
        (found,) = src.series(DicomQuery())
    assert (found.uid, found.count, found.attrs["PatientID"]) == ("1.2.3.4", 3, "P1")

    monkeypatch.setenv("CLPIPE_DICOMWEB_TOKEN", "s3cr3t-t0ken")
    for answer, words in (
        (httpx.Response(401), "refused access .*CLPIPE_DICOMWEB_TOKEN"),
        (httpx.Response(503), "did not answer the query /studies after 4 attempts"),
        (httpx.Response(404), "no QIDO-RS service at http://pacs.example.org/dicom-web/studies"),
        (httpx.Response(200, text="<html>login</html>"), "not DICOM JSON"),
    ):
        with mock_source(lambda request, a=answer: a) as src:
            with pytest.raises(PreflightError, match=words) as info:
                list(src.series(DicomQuery()))
        assert "s3cr3t" not in str(info.value)


def test_listing_an_unreachable_server_names_the_url(no_credentials):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"dicomweb+http://127.0.0.1:{port}/dicom-web"
    with DicomWebSource(parse_source_url(url), SourceSettings(timeout=5)) as src:
        with pytest.raises(PreflightError, match=rf"cannot connect .*127\.0\.0\.1:{port}/dicom-web \(connection refused\)"):
            list(src.series(DicomQuery()))


# ----------------------------------------------------------------------------- the engine, end to end


class CountingSource:
    """The real source, counting the series it is asked to retrieve."""

    def __init__(self, inner: DicomWebSource):
        self.inner, self.retrieved = inner, []

    def series(self, query):
        return self.inner.series(query)

    def instances(self, entry):
        self.retrieved.append(entry.key)
        return self.inner.instances(entry)


def sync(src, dropoff: Path, tmp: Path, query: DicomQuery):
    state = SyncState(dropoff, "test")
    state.acquire()
    try:
        state.load()
        outcome = Engine(src, state, Options(dropoff=dropoff, zip_tmp=tmp, jobs=4, backoff=0.1)).run(entries(src, query))
        state.save()
    finally:
        state.release()
    return outcome


def test_engine_syncs_every_instance_once_then_nothing_then_what_went_missing(source, expected, dicom_env, tmp_path):
    dropoff, tmp = tmp_path / "dropoff", tmp_path / "tmp"
    counting = CountingSource(source)
    query = DicomQuery(patient_id="SUB*")  # leaves the benchmark's BENCH* patients out
    outcome = sync(counting, dropoff, tmp, query)
    assert outcome.failed == 0, outcome.failures
    assert len(counting.retrieved) == len(expected["series"])

    folders = {s.uid: series_folder(DEFAULT_TEMPLATE, s.attrs) for s in listed(source, query)}
    files = {p.relative_to(dropoff).as_posix(): p for p in dropoff.rglob("*.dcm") if STATE_DIR not in p.parts}
    want = {f"{folders[r['SeriesInstanceUID']]}/{r['SOPInstanceUID']}.dcm": r for r in expected["instances"]}
    assert set(files) == set(want)
    assert outcome.created == len(want)
    for rel, rec in want.items():
        assert_same_instance(dicom_env, rec, files[rel].read_bytes())
    assert all(not part.startswith("..") for rel in files for part in rel.split("/"))

    counting.retrieved.clear()
    outcome = sync(counting, dropoff, tmp, query)
    assert (outcome.failed, outcome.created, counting.retrieved) == (0, 0, [])
    assert outcome.skipped == len(want)

    victim = next(rel for rel, rec in want.items() if rec["SeriesInstanceUID"] == expected["odd"]["rle_series"])
    files[victim].unlink()
    outcome = sync(counting, dropoff, tmp, query)
    assert outcome.failed == 0 and counting.retrieved == [f"series/{expected['odd']['rle_series']}"]
    assert_same_instance(dicom_env, want[victim], files[victim].read_bytes())


# ----------------------------------------------------------------------------- https


@pytest.fixture
def https_qido(tmp_path):
    """A DICOMweb server on loopback over https with a self-signed certificate (for
    127.0.0.1), answering every QIDO-RS search with no studies; (base URL, its cert)."""
    import http.server
    import ssl
    import threading

    cert, key = make_certificate(tmp_path)

    class Empty(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server name
            body = b"[]"
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Empty)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"dicomweb+https://127.0.0.1:{server.server_address[1]}/dicom-web", cert
    finally:
        server.shutdown()
        server.server_close()


def test_https_with_an_untrusted_certificate_says_to_set_the_ca(https_qido, no_credentials):
    url, cert = https_qido
    src = DicomWebSource(parse_source_url(url), SourceSettings(timeout=10))
    try:
        with pytest.raises(
            PreflightError,
            match="its TLS certificate is not trusted here "
            r"\(certificate verify failed: self.signed certificate\); set TLSCAFile",
        ):
            listed(src)
    finally:
        src.close()
    trusting = DicomWebSource(parse_source_url(url), SourceSettings(timeout=10, tls_ca=str(cert)))
    try:
        assert listed(trusting) == []  # the same server, its CA given: the listing goes through
    finally:
        trusting.close()
