"""The DIMSE source (clpipe.sources.dimse) against the three real DICOM servers of
scripts/infra/dicom-up.sh: Orthanc, dcmtk's dcmqrscp and pynetdicom's qrscp.

Every server holds the synthetic data set described by $CLPIPE_DICOM_EXPECTED; the tests
check the listing (series, attributes, counts, filters, each series once), that C-GET and
C-MOVE bring every instance with the same content in the same transfer syntax (small PDUs
too), a whole engine run, C-FIND and C-GET over TLS (a pynetdicom Q/R SCP with TLS, in this
process), and the messages for wrong AE titles, closed or silent ports, unknown C-MOVE
destinations, a busy MovePort and bad TLS files; and that bench/dicom_dimse.py --quick runs.
Patients whose PatientID starts with BENCH belong to bench/dicom_dimse.py, which may be
running: they are left out of the comparisons. Without the servers the tests fail, saying
how to start them; every association has a timeout.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from pathlib import Path

import pydicom
import pytest

from clpipe.errors import ConfigError
from clpipe.sources.dicom import DEFAULT_TEMPLATE, DicomQuery, Series, SourceSettings, entries, parse_source_url, series_folder
from clpipe.sources.dimse import DimseSource, part10_header, tls_context
from clpipe.sync.engine import Engine, Options, PermanentError, TransientError
from clpipe.sync.manifest import SyncState
from clpipe.testing import dicomdata

from helpers import check_instance, make_certificate, run_quick_bench

TIMEOUT = 20.0  # seconds, for every association step
SERVERS = ("orthanc", "dcmqrscp", "qrscp")
BENCH = "BENCH"  # PatientID prefix of the benchmark's data (bench/dicom_dimse.py)
#: keys a server leaves out of its C-FIND answers (dcmqrscp's index has no SeriesDescription;
#: pynetdicom's qrscp keeps neither description)
NOT_ANSWERED = {"orthanc": set(), "dcmqrscp": {"SeriesDescription"}, "qrscp": {"SeriesDescription", "StudyDescription"}}

pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------------ servers and data set


@pytest.fixture(scope="module")
def expected(dicom_expected) -> dict:
    return dicom_expected


def url_of(dicom_env, server: str):
    return parse_source_url(f"dimse://{dicom_env[f'CLPIPE_{server.upper()}_DIMSE']}")


def settings(dicom_env, retrieve: str = "get", **kw) -> SourceSettings:
    return SourceSettings(retrieve=retrieve, move_port=int(dicom_env["CLPIPE_MOVE_PORT"]), timeout=TIMEOUT, **kw)


def open_source(dicom_env, server: str, retrieve: str = "get", **kw) -> DimseSource:
    return DimseSource(url_of(dicom_env, server), settings(dicom_env, retrieve, **kw))


def listing(source: DimseSource, query: DicomQuery = DicomQuery()) -> list[Series]:
    """The source's series, without the benchmark's patients."""
    return [s for s in source.series(query) if not s.attrs.get("PatientID", "").startswith(BENCH)]


def expected_series(expected: dict) -> dict[str, dict]:
    """Series UID -> the attributes the listing must give, made from the expected JSON."""
    studies = {st["StudyInstanceUID"]: st for st in expected["studies"]}
    out = {}
    for se in expected["series"]:
        st = studies[se["StudyInstanceUID"]]
        out[se["SeriesInstanceUID"]] = {
            "PatientID": st["PatientID"],
            "PatientName": st["PatientName"],
            "StudyInstanceUID": st["StudyInstanceUID"],
            "StudyDate": st["StudyDate"] or "",
            "StudyDescription": st["StudyDescription"] or "",
            "AccessionNumber": st["AccessionNumber"] or "",
            "SeriesInstanceUID": se["SeriesInstanceUID"],
            "SeriesNumber": "" if se["SeriesNumber"] is None else str(se["SeriesNumber"]),
            "SeriesDescription": se["SeriesDescription"] or "",
            "Modality": se["Modality"],
            "count": se["instances"],
        }
    return out


def instances_of(expected: dict, series_uid: str) -> dict[str, dict]:
    return {r["SOPInstanceUID"]: r for r in expected["instances"] if r["SeriesInstanceUID"] == series_uid}


# ------------------------------------------------------------------ listing


@pytest.mark.parametrize("server", SERVERS)
def test_series_lists_exactly_the_data_set(dicom_env, expected, server):
    with open_source(dicom_env, server) as source:
        found = listing(source)
    uids = [s.uid for s in found]
    assert len(uids) == len(set(uids)), "a series was listed twice"
    want = expected_series(expected)
    assert set(uids) == set(want)
    for s in found:
        w = want[s.uid]
        assert s.count == w["count"], (s.uid, s.attrs)
        for key, value in w.items():
            if key != "count":
                assert s.attrs.get(key, "") == ("" if key in NOT_ANSWERED[server] else value), (key, s.attrs)
        assert s.attrs.get("StudyTime")  # every study of the data set has one


def test_qrscp_answers_once_per_instance_and_the_listing_once_per_series(dicom_env, expected):
    """pynetdicom's qrscp answers a STUDY-level C-FIND once per instance: the de-duplication is needed."""
    source = open_source(dicom_env, "qrscp")
    try:
        channel = source._borrow_channel()
        try:
            matches = source._find(channel, "STUDY", {"StudyInstanceUID": "", "PatientID": "SUB01"})
        finally:
            source._give_back_channel(channel)
        sub01 = [s for s in expected["studies"] if s["PatientID"] == "SUB01"]
        assert len(matches) == sum(s["instances"] for s in sub01) > len(sub01)
        found = listing(source, DicomQuery(patient_id="SUB01"))
        assert sorted(s.uid for s in found) == sorted(se["SeriesInstanceUID"] for se in expected["series"] if se["PatientID"] == "SUB01")
    finally:
        source.close()


FILTERS = {
    "patient_id": DicomQuery(patient_id="SUB01"),
    "patient_id_space_slash": DicomQuery(patient_id="SUB 03/x"),
    "patient_name_wildcard": DicomQuery(patient_name="Doe^*"),
    "patient_name_non_ascii": DicomQuery(patient_name="Müller*"),
    "study_date": DicomQuery(study_date="20240115"),
    "study_date_range": DicomQuery(study_date="20240201-20240310"),
    "study_date_open_start": DicomQuery(study_date="-20240131"),
    "study_date_open_end": DicomQuery(study_date="20240220-"),
    "accession_number": DicomQuery(accession_number="ACC0002"),
    "modality": DicomQuery(modality="MR"),
    "modality_none": DicomQuery(modality="CT"),
    "series_description": DicomQuery(series_description="T1w*"),
    "combined": DicomQuery(patient_id="SUB0*", series_description="*RLE*"),
}


@pytest.mark.parametrize("name", list(FILTERS))
@pytest.mark.parametrize("server", SERVERS)
def test_filters(dicom_env, expected, server, name):
    """Each filter gives exactly the series the filter's own rules pick from the expected data."""
    query = FILTERS[name]
    if query.series_description and "SeriesDescription" in NOT_ANSWERED[server]:
        with open_source(dicom_env, server) as source:  # not silently nothing, nor everything
            with pytest.raises(PermanentError, match="does not return SeriesDescription.*cannot be applied"):
                listing(source, query)
        return
    want = {uid for uid, attrs in expected_series(expected).items() if query.study_matches(attrs) and query.series_matches(attrs)}
    with open_source(dicom_env, server) as source:
        got = {s.uid for s in listing(source, query)}
    assert got == want
    if name not in ("modality_none",):
        assert got, "a filter that should match something matched nothing"


@pytest.mark.parametrize("server", SERVERS)
def test_limit_counts_studies(dicom_env, expected, server):
    with open_source(dicom_env, server) as source:
        found = listing(source, DicomQuery(patient_id="SUB*", limit=2))
    studies = {s.attrs["StudyInstanceUID"] for s in found}
    assert len(studies) == 2
    by_study = {}
    for se in expected["series"]:
        by_study.setdefault(se["StudyInstanceUID"], set()).add(se["SeriesInstanceUID"])
    assert {s.uid for s in found} == set().union(*(by_study[uid] for uid in studies))


# ------------------------------------------------------------------ retrieval


#: servers that send every instance in the first storage context accepted for its SOP class
#: (DCMTK's C-GET and C-MOVE): Explicit VR Little Endian, decompressing RLE, whatever it stored
CONVERTS = {"dcmqrscp"}


def retrieve_once_each(source: DimseSource, series: Series, tries: int = 1) -> dict[str, bytes]:
    """The series' instances, each arriving once; a TransientError is tried again, as the
    engine would, up to ``tries`` times."""
    for attempt in range(tries):
        received: dict[str, bytes] = {}
        try:
            with source.instances(series) as items:
                for uid, data in items:
                    assert uid not in received, f"{uid} arrived twice"
                    received[uid] = data
            return received
        except TransientError:
            if attempt + 1 == tries:
                raise
    return {}


@pytest.mark.parametrize("retrieve", ["get", "move"])
@pytest.mark.parametrize("server", SERVERS)
def test_instances_bring_every_instance_unchanged(dicom_env, expected, server, retrieve):
    """Every instance, once, unchanged. qrscp's C-MOVE may be tried twice, as the engine
    would: its C-STORE sender (pynetdicom's send_c_store) can lose a response that comes
    too soon (a race in pynetdicom; 3 of 195 C-MOVEs here when answered at once). The
    storage SCP answers pynetdicom peers 5 ms late (0 of 390); the retry is the margin."""
    data_root = Path(dicom_env["CLPIPE_DICOM_DATA"])
    tries = 2 if (server, retrieve) == ("qrscp", "move") else 1
    with open_source(dicom_env, server, retrieve) as source:
        found = listing(source)
        assert found
        for series in found:
            want = instances_of(expected, series.uid)
            received = retrieve_once_each(source, series, tries)
            assert set(received) == set(want), series.attrs
            for uid, data in received.items():
                check_instance(uid, data, want[uid], data_root, converts=server in CONVERTS)


@pytest.mark.parametrize("server", SERVERS)
def test_small_pdus_are_put_together(dicom_env, expected, server):
    """With a 4 KiB maximum PDU every instance and most command sets arrive in pieces
    (several PDVs over several PDUs): each must be put together exactly."""
    data_root = Path(dicom_env["CLPIPE_DICOM_DATA"])
    with open_source(dicom_env, server, extra={"max_pdu": 4096}) as source:
        found = listing(source, DicomQuery(patient_id="SUB01"))
        assert len(found) == sum(1 for se in expected["series"] if se["PatientID"] == "SUB01")
        for series in found:
            want = instances_of(expected, series.uid)
            with source.instances(series) as items:
                received = dict(items)
            assert set(received) == set(want)
            for uid, data in received.items():
                check_instance(uid, data, want[uid], data_root, converts=server in CONVERTS)


def test_odd_series_arrive_as_stored(dicom_env, expected):
    """RLE stays RLE (the pixel bytes are not decoded), Implicit VR stays Implicit VR, the
    8-frame Enhanced MR instance keeps its frames."""
    odd = expected["odd"]
    data_root = Path(dicom_env["CLPIPE_DICOM_DATA"])
    with open_source(dicom_env, "orthanc") as source:
        found = {s.uid: s for s in listing(source)}
        for key, syntax in (
            ("rle_series", dicomdata.RLE_LOSSLESS),
            ("implicit_vr_series", dicomdata.IMPLICIT_LE),
            ("multiframe_series", dicomdata.EXPLICIT_LE),
        ):
            with source.instances(found[odd[key]]) as items:
                received = dict(items)
            want = instances_of(expected, odd[key])
            assert set(received) == set(want)
            for uid, data in received.items():
                ds = pydicom.dcmread(io.BytesIO(data))
                assert ds.file_meta.TransferSyntaxUID == syntax
                original = pydicom.dcmread(data_root / want[uid]["path"])
                assert ds.PixelData == original.PixelData
        mf = pydicom.dcmread(io.BytesIO(received[odd["multiframe_instance"]]))
        assert int(mf.NumberOfFrames) == 8 and mf.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.1"


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_abandoned_retrieval_leaves_the_source_usable(dicom_env, expected, retrieve):
    """The engine may stop reading mid-series (a full disk): the retrieval is stopped at the
    PACS too (a C-MOVE's association is aborted, its thread ends), and the next retrieval
    of the same series still brings every instance."""
    with open_source(dicom_env, "orthanc", retrieve) as source:
        found = sorted(listing(source), key=lambda s: -s.count)
        big = found[0]
        with source.instances(big) as items:
            next(iter(items))
        opened = source.associations_opened
        deadline = time.monotonic() + TIMEOUT
        while any(t.name == "dimse-move" for t in threading.enumerate()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(t.name == "dimse-move" for t in threading.enumerate()), "the abandoned C-MOVE is still running"
        with source.instances(big) as items:
            assert {uid for uid, _ in items} == set(instances_of(expected, big.uid))
        # the abandoned association was aborted, never pooled: the retry needed a new one
        assert source.associations_opened == opened + 1


def test_instances_accepts_the_engine_entry(dicom_env, expected):
    """The engine passes its RemoteEntry (``ref``: the Series, ``count``: its instances)."""
    with open_source(dicom_env, "dcmqrscp") as source:
        entry = next(e for e in entries(source, DicomQuery(patient_id="SUB02")))
        assert isinstance(entry.ref, Series) and entry.count == entry.ref.count
        with source.instances(entry) as items:
            assert {uid for uid, _ in items} == set(instances_of(expected, entry.ref.uid))


# ------------------------------------------------------------------ errors, in words


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wrong_called_ae_title_is_a_permanent_error_naming_it(dicom_env):
    url = url_of(dicom_env, "dcmqrscp")
    source = DimseSource(parse_source_url(f"dimse://NOSUCHAE@{url.host}:{url.port}"), settings(dicom_env))
    with pytest.raises(PermanentError, match=r"called AE title 'NOSUCHAE'.*SourceURL"):
        list(source.series(DicomQuery()))
    source.close()


def test_closed_port_is_a_transient_error_saying_connection_refused(dicom_env):
    port = free_port()
    source = DimseSource(parse_source_url(f"dimse://ORTHANC@127.0.0.1:{port}"), settings(dicom_env))
    with pytest.raises(TransientError, match=rf"could not connect to the PACS ORTHANC@127.0.0.1:{port}: connection refused"):
        list(source.series(DicomQuery()))
    source.close()


@pytest.fixture
def silent_port():
    """A TCP port that accepts connections and then says nothing (or hangs up at once)."""
    listener = socket.create_server(("127.0.0.1", 0))
    mode = {"hang_up": False}
    accepted = []

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if mode["hang_up"]:
                conn.close()
            else:
                accepted.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], mode
    listener.close()
    for conn in accepted:
        conn.close()


def test_a_pacs_that_never_answers_times_out_in_words(silent_port):
    port, _ = silent_port
    source = DimseSource(parse_source_url(f"dimse://PACS@127.0.0.1:{port}"), SourceSettings(timeout=1.0))
    with pytest.raises(
        TransientError,
        match=rf"^listing the PACS PACS@127.0.0.1:{port} failed 3 times: no answer from "
        rf"the PACS PACS@127.0.0.1:{port} within 1 s \(NetworkTimeout\)$",
    ):
        list(source.series(DicomQuery()))  # tried three times, and the message no longer promises another try
    source.close()


def test_a_pacs_that_hangs_up_is_said(silent_port):
    port, mode = silent_port
    mode["hang_up"] = True
    source = DimseSource(parse_source_url(f"dimse://PACS@127.0.0.1:{port}"), SourceSettings(timeout=5.0))
    with pytest.raises(TransientError, match=rf"(the PACS PACS@127.0.0.1:{port} closed the connection|broke)"):
        list(source.series(DicomQuery()))
    source.close()


@pytest.mark.parametrize("server", SERVERS)
def test_move_to_an_ae_the_pacs_does_not_know(dicom_env, expected, server):
    """C-MOVE to an AE title the PACS has no address for: dcmqrscp and qrscp say so (0xA801), a
    permanent error saying to register it; Orthanc only says "unable to process" (0xC000),
    which may pass, so it is retried, and the message says what to check."""
    with open_source(dicom_env, server, "move", calling_aet="NOTREGISTERED") as source:
        series = listing(source, DicomQuery(patient_id="SUB02"))[0]
        if server == "orthanc":
            error, words = TransientError, r"0xC000.*0 of \d+ instances arrived.*knows AE 'NOTREGISTERED'"
        else:
            error, words = PermanentError, r"does not know the C-MOVE destination AE 'NOTREGISTERED'.*register"
        with pytest.raises(error, match=words):
            with source.instances(series) as items:
                list(items)


def test_move_when_the_pacs_cannot_reach_our_port(dicom_env, expected):
    """The PACS knows CLPIPE at $CLPIPE_MOVE_PORT, but we listen elsewhere: its sub-operations
    fail, and the message says what to check."""
    source = DimseSource(url_of(dicom_env, "orthanc"), SourceSettings(retrieve="move", move_port=free_port(), timeout=TIMEOUT))
    with source:
        series = listing(source, DicomQuery(patient_id="SUB02"))[0]
        with pytest.raises(TransientError, match=r"0 of \d+ instances arrived.*knows AE 'CLPIPE'.*firewall"):
            with source.instances(series) as items:
                list(items)


def test_our_storage_scp_answers_a_c_echo_from_orthanc(dicom_env):
    """Orthanc (REST: /modalities/clpipe/echo) opens an association to our C-MOVE storage
    SCP and sends a C-ECHO: the association is accepted and the echo answered."""
    import httpx

    with open_source(dicom_env, "orthanc", "move") as source:
        source._start_scp()
        r = httpx.post(dicom_env["CLPIPE_ORTHANC_HTTP"] + "/modalities/clpipe/echo", content=b"{}", timeout=TIMEOUT)
    assert r.status_code == 200, r.text


def test_our_storage_scp_refuses_an_association_to_another_ae_title(dicom_env):
    """The C-MOVE storage SCP takes associations to our own AE title only (any other
    caller's instances are not ours to route): another called AE is rejected."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    with open_source(dicom_env, "orthanc", "move") as source:
        source._start_scp()
        ae = AE(ae_title="SOMEONE")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = TIMEOUT
        port = int(dicom_env["CLPIPE_MOVE_PORT"])
        wrong = ae.associate("127.0.0.1", port, ae_title="NOT_CLPIPE")
        assert wrong.is_rejected and not wrong.is_established
        right = ae.associate("127.0.0.1", port, ae_title=source.calling_aet)
        try:
            assert right.is_established and right.send_c_echo().Status == 0x0000
        finally:
            right.release()


def test_move_port_in_use_is_said(dicom_env):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        source = DimseSource(url_of(dicom_env, "orthanc"), SourceSettings(retrieve="move", move_port=port, timeout=TIMEOUT))
        series = Series(attrs={"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4"}, count=1)
        with pytest.raises(PermanentError, match=rf"cannot receive C-MOVE images on 127.0.0.1:{port}.*MovePort"):
            with source.instances(series) as items:
                list(items)
        source.close()


def test_settings_are_checked():
    url = parse_source_url("dimse://PACS@127.0.0.1:104")
    with pytest.raises(ConfigError, match="MovePort"):
        DimseSource(url, SourceSettings(retrieve="move", move_port=0))
    with pytest.raises(ConfigError, match="RetrieveMethod"):
        DimseSource(url, SourceSettings(retrieve="fetch"))
    with pytest.raises(ConfigError, match="CallingAET"):
        DimseSource(url, SourceSettings(calling_aet="A" * 17))


# ------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("tls"))


def test_tls_context_is_built_from_the_files(certificate):
    cert, key = certificate
    assert tls_context(SourceSettings()) is None
    client = tls_context(SourceSettings(tls_ca=str(cert), tls_cert=str(cert), tls_key=str(key)))
    assert client is not None and client.check_hostname
    server = tls_context(SourceSettings(tls_ca=str(cert), tls_cert=str(cert), tls_key=str(key)), server_side=True)
    assert server is not None
    source = DimseSource(parse_source_url("dimse://PACS@127.0.0.1:104"), SourceSettings(tls_ca=str(cert)))
    assert source._tls is not None
    source.close()


def test_tls_bad_files_are_named(certificate, tmp_path):
    cert, key = certificate
    with pytest.raises(ConfigError, match=r"TLSCAFile: .*/nothere.pem does not exist"):
        tls_context(SourceSettings(tls_ca=str(tmp_path / "nothere.pem")))
    with pytest.raises(ConfigError, match="TLSCertFile and TLSKeyFile go together"):
        tls_context(SourceSettings(tls_cert=str(cert)))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="TLSCAFile: .* is not a PEM file"):
        tls_context(SourceSettings(tls_ca=str(garbage)))
    with pytest.raises(ConfigError, match="TLSCertFile/TLSKeyFile"):
        tls_context(SourceSettings(tls_cert=str(garbage), tls_key=str(key)))
    with pytest.raises(ConfigError, match="TLSCertFile and TLSKeyFile"):
        tls_context(SourceSettings(tls_ca=str(cert)), server_side=True)


def test_tls_against_a_plain_port_fails_in_words(dicom_env, certificate):
    cert, _ = certificate
    source = DimseSource(url_of(dicom_env, "orthanc"), settings(dicom_env, tls_ca=str(cert)))
    with pytest.raises((TransientError, PermanentError), match=r"ORTHANC@127.0.0.1:\d+.*TLS"):
        list(source.series(DicomQuery()))
    source.close()


@pytest.fixture(scope="module")
def tls_pacs(certificate, expected, dicom_env):
    """A Q/R SCP speaking TLS (pynetdicom, in this process, on a free port) that holds one
    series of the data set: the RLE one."""
    import ssl

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

    cert, key = certificate
    data_root = Path(dicom_env["CLPIPE_DICOM_DATA"])
    series_uid = expected["odd"]["rle_series"]
    stored = [pydicom.dcmread(data_root / rec["path"]) for rec in instances_of(expected, series_uid).values()]

    def on_find(event):
        level = event.identifier.QueryRetrieveLevel
        for ds in stored if level == "IMAGE" else stored[:1]:
            answer = pydicom.Dataset()
            answer.QueryRetrieveLevel = level
            for keyword in (
                "PatientID",
                "PatientName",
                "StudyInstanceUID",
                "StudyDate",
                "StudyTime",
                "Modality",
                "SeriesInstanceUID",
                "SeriesNumber",
                "SeriesDescription",
                "SOPInstanceUID",
            ):
                if keyword in ds and keyword in event.identifier:
                    setattr(answer, keyword, ds.data_element(keyword).value)
            yield 0xFF00, answer

    def on_get(event):
        yield len(stored)
        for ds in stored:
            yield 0xFF00, ds

    ae = AE(ae_title="TLSPACS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_supported_context(FIND)
    ae.add_supported_context(GET)
    ae.add_supported_context(stored[0].SOPClassUID, [dicomdata.RLE_LOSSLESS], scu_role=True, scp_role=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, ssl_context=context, evt_handlers=[(evt.EVT_C_FIND, on_find), (evt.EVT_C_GET, on_get)]
    )
    yield f"TLSPACS@127.0.0.1:{port}", series_uid
    server.shutdown()


def test_tls_listing_and_c_get_over_tls(tls_pacs, certificate, expected, dicom_env):
    address, series_uid = tls_pacs
    cert, _ = certificate
    source = DimseSource(parse_source_url(f"dimse://{address}"), SourceSettings(tls_ca=str(cert), timeout=TIMEOUT))
    with source:
        found = list(source.series(DicomQuery()))
        assert [s.uid for s in found] == [series_uid] and found[0].count == len(instances_of(expected, series_uid))
        with source.instances(found[0]) as items:
            received = dict(items)
    want = instances_of(expected, series_uid)
    assert set(received) == set(want)
    for uid, data in received.items():
        check_instance(uid, data, want[uid], Path(dicom_env["CLPIPE_DICOM_DATA"]))


def test_tls_untrusted_certificate_is_said(tls_pacs, tmp_path):
    address, _ = tls_pacs
    other_ca, _ = make_certificate(tmp_path)  # not the one that signed the PACS's certificate
    source = DimseSource(parse_source_url(f"dimse://{address}"), SourceSettings(tls_ca=str(other_ca), timeout=TIMEOUT))
    with pytest.raises(PermanentError, match=r"TLSPACS@127.0.0.1:\d+: its TLS certificate is not trusted.*TLSCAFile"):
        list(source.series(DicomQuery()))
    source.close()


# ------------------------------------------------------------------ the file meta


def test_part10_header_is_what_pydicom_reads():
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID = "1.2.840.10008.5.1.4.1.1.4", "1.2.3.45", "X"
    header = part10_header(ds.SOPClassUID, ds.SOPInstanceUID, dicomdata.EXPLICIT_LE, "PACS")
    read = pydicom.dcmread(io.BytesIO(header + _explicit_le(ds)))
    meta = read.file_meta
    assert meta.MediaStorageSOPClassUID == ds.SOPClassUID and meta.MediaStorageSOPInstanceUID == "1.2.3.45"
    assert meta.TransferSyntaxUID == dicomdata.EXPLICIT_LE and meta.SourceApplicationEntityTitle == "PACS"
    assert meta.FileMetaInformationVersion == b"\x00\x01" and meta.ImplementationClassUID
    assert read.PatientID == "X"


def _explicit_le(ds) -> bytes:
    out = io.BytesIO()
    fp = pydicom.filebase.DicomFileLike(out)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(fp, ds)
    return out.getvalue()


# ------------------------------------------------------------------ the engine, end to end


def run_engine(source, dropoff: Path, jobs: int = 4):
    state = SyncState(dropoff, "test")
    state.acquire()
    try:
        state.load()
        outcome = Engine(source, state, Options(dropoff=dropoff, zip_tmp=dropoff.parent / "ziptmp", jobs=jobs, retries=1, backoff=0.1)).run(
            entries(source, DicomQuery())
        )
        state.save()
    finally:
        state.release()
    return outcome


class Counting:
    """The source, with its retrievals counted (one per C-GET/C-MOVE request)."""

    def __init__(self, source: DimseSource):
        self.source, self.retrievals, self._lock = source, 0, threading.Lock()

    def series(self, query):
        return (s for s in self.source.series(query) if not s.attrs.get("PatientID", "").startswith(BENCH))

    def instances(self, entry):
        with self._lock:
            self.retrievals += 1
        return self.source.instances(entry)

    @property
    def max_jobs(self) -> int:
        return self.source.max_jobs

    def close(self):
        self.source.close()


def test_a_pacs_on_this_machine_gets_no_more_threads_than_cpus(dicom_env, expected, tmp_path, monkeypatch):
    """From a PACS at a loopback address read with a thread per association (C-MOVE, TLS,
    or the one thread turned off) the engine retrieves one series per CPU at a time: both
    ends share the CPUs and nothing waits on a network, so more threads only add work on
    both sides (bench/README.md). Read from one thread (C-GET over plain TCP) it gets every
    job, and so do a PACS elsewhere and this one with the cap off."""
    from clpipe.sources.dimse import source as dimse_source

    monkeypatch.setattr(dimse_source, "cpus", lambda: 1)
    dropoff = tmp_path / "dropoff"
    dropoff.mkdir()
    source = Counting(open_source(dicom_env, "orthanc", "get", jobs=4, extra={"one_thread": False}))
    try:
        assert source.max_jobs == 1
        outcome = run_engine(source, dropoff, jobs=4)
        assert outcome.failed == 0, outcome.failures
        assert source.retrievals == expected["counts"]["series"] > 4
        assert source.source.associations_opened == 1  # the listing's, then every series on it, one at a time
    finally:
        source.close()
    four = SourceSettings(jobs=4)
    threads = SourceSettings(jobs=4, extra={"one_thread": False})
    assert DimseSource(parse_source_url("dimse://PACS@pacs.example.org:104"), four).max_jobs == 4
    assert DimseSource(parse_source_url("dimse://PACS@10.1.2.3:104"), four).max_jobs == 4
    assert DimseSource(parse_source_url("dimse://PACS@localhost:104"), threads).max_jobs == 1
    assert (
        DimseSource(parse_source_url("dimse://PACS@localhost:104"), SourceSettings(jobs=4, retrieve="move", move_port=11112)).max_jobs == 1
    )
    assert DimseSource(parse_source_url("dimse://PACS@localhost:104"), four).max_jobs == 4  # one thread: C-GET, plain TCP
    assert (
        DimseSource(
            parse_source_url("dimse://PACS@127.0.0.1:104"), SourceSettings(jobs=4, extra={"local_cpu_cap": False, "one_thread": False})
        ).max_jobs
        == 4
    )
    monkeypatch.setattr(dimse_source, "cpus", lambda: 8)
    assert DimseSource(parse_source_url("dimse://PACS@127.0.0.1:104"), threads).max_jobs == 4  # never more than asked


@pytest.mark.parametrize("server,retrieve", [("orthanc", "get"), ("dcmqrscp", "move"), ("qrscp", "get")])
def test_engine_run_lands_every_instance_once_and_a_second_run_retrieves_nothing(dicom_env, expected, tmp_path, server, retrieve):
    dropoff = tmp_path / "dropoff"
    dropoff.mkdir()
    source = Counting(open_source(dicom_env, server, retrieve))
    try:
        first = run_engine(source, dropoff)
        assert first.failed == 0, first.failures
        assert source.retrievals == expected["counts"]["series"]
        assert source.source.associations_opened <= 4 + 1  # jobs, plus the listing's (pooled, reused)
        studies = {st["StudyInstanceUID"]: st for st in expected["studies"]}
        want = set()
        for se in expected["series"]:
            st = studies[se["StudyInstanceUID"]]
            attrs = {
                "PatientID": se["PatientID"],
                "StudyDate": st["StudyDate"] or "",
                "SeriesNumber": "" if se["SeriesNumber"] is None else str(se["SeriesNumber"]),
                "SeriesDescription": "" if "SeriesDescription" in NOT_ANSWERED[server] else se["SeriesDescription"] or "",
                "Modality": se["Modality"],
            }
            folder = series_folder(DEFAULT_TEMPLATE, attrs)
            want |= {f"{folder}/{uid}.dcm" for uid in instances_of(expected, se["SeriesInstanceUID"])}
        got = {str(p.relative_to(dropoff)) for p in dropoff.rglob("*.dcm") if ".clpipe" not in p.parts[0]}
        assert got == want
        assert first.created == expected["counts"]["instances"]
        source.retrievals = 0
        second = run_engine(source, dropoff)
        assert second.failed == 0 and second.created == 0 and second.skipped == expected["counts"]["instances"]
        assert source.retrievals == 0
    finally:
        source.close()


# ------------------------------------------------------------------ the benchmark's own code


def test_benchmark_quick_mode_runs_every_row(dicom_env, tmp_path):
    """bench/dicom_dimse.py --quick: every row runs and is checked ok, every row shows the
    CPU time the Orthanc of dicom-up.sh spent on it (what makes the rows CPU-bound on a
    2-core machine), and the saved table is left alone (it proves no speed: that is the
    full run's job)."""
    _, rows = run_quick_bench("dicom_dimse.py", "dicom_dimse.md", "--workdir", tmp_path)
    header = next(line for first, line in rows.items() if first == "run")
    columns = [cell.strip() for cell in header.split("|")[1:-1]]
    server_cpu, busy = columns.index("Orthanc CPU s"), columns.index("cores busy")
    native = [cell.strip() for cell in rows["native C-GET, 4 jobs"].split("|")[1:-1]]
    assert float(native[server_cpu]) > 0, native  # Orthanc served every instance of the row
    assert float(native[busy]) > 0, native
    # 4 jobs asked of a PACS on this machine: 4 associations read from one thread; with a
    # thread per series one association per CPU (DimseSource.max_jobs), and 4 with the cap off
    associations = columns.index("associations")
    assert int(native[associations]) == 4, native
    threads = rows["native C-GET, 4 jobs, a thread per series"].split("|")[1:-1][associations].strip()
    assert int(threads) == min(4, len(os.sched_getaffinity(0)))
    assert rows["native C-GET, 4 jobs, a thread per series, no CPU cap"].split("|")[1:-1][associations].strip() == "4"
    for name in (
        "getscu, per patient",
        "getscu, per patient, 3 at once",
        "getscu, per series, xargs -P 2",
        "getscu, per series, xargs -P 4",
        "getscu, per series, xargs -P 8",
        "native C-GET, 4 jobs",
        "native C-GET, 4 jobs, no-op re-sync",
        "native C-GET, 4 jobs, a thread per series",
        "native C-GET, 4 jobs, a thread per series, no CPU cap",
        "native C-GET, 1 job",
        "native C-GET, 4 jobs, new association per series",
        "native C-MOVE, 4 jobs",
        "pynetdicom C-GET, per patient",
        "pynetdicom C-GET, per patient, 3 at once",
    ):
        assert name in rows and rows[name].rstrip().split("|")[-2].strip().startswith("ok"), rows.get(name, f"no row {name!r}")


def non_image_instance(sop_class: str, patient_id: str, study_uid: str, series_uid: str, n: int) -> bytes:
    """A small Part-10 instance of a non-image SOP class (no pixels), as a PACS holds them."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import generate_uid

    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.PatientID, ds.PatientName = patient_id, "Bench^NonImage"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDate, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "20240101", "SR", 900 + n, 1
    ds.ContentDate, ds.ContentTime = "20240101", "120000"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = dicomdata.EXPLICIT_LE
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_c_get_brings_the_non_image_objects_of_mr_and_pet_studies(dicom_env):
    """Dose reports, key objects, text reports, segmentations and Siemens' private CSA
    objects are in real studies: C-GET offers a storage context for each, so a series of
    them arrives (here uploaded to Orthanc under a BENCH* patient, which the other tests
    leave out, and removed afterwards)."""
    import httpx
    from pydicom.uid import generate_uid

    from clpipe.sources.dimse import OTHER_STORAGE

    classes = [
        "1.2.840.10008.5.1.4.1.1.88.67",
        "1.2.840.10008.5.1.4.1.1.88.59",
        "1.2.840.10008.5.1.4.1.1.88.11",
        "1.2.840.10008.5.1.4.1.1.66.4",
        "1.3.12.2.1107.5.9.1",
    ]
    assert set(classes) <= set(OTHER_STORAGE)
    patient, study = f"BENCHSOP{os.getpid()}", generate_uid()
    series = {sop_class: generate_uid() for sop_class in classes}
    sent = {}
    with httpx.Client(base_url=dicom_env["CLPIPE_ORTHANC_HTTP"], timeout=TIMEOUT) as http:
        try:
            for n, (sop_class, series_uid) in enumerate(series.items()):
                data = non_image_instance(sop_class, patient, study, series_uid, n)
                http.post("/instances", content=data).raise_for_status()
                sent[series_uid] = data
            source = open_source(dicom_env, "orthanc")
            try:
                found = {s.uid: s for s in source.series(DicomQuery(patient_id=patient))}
                assert set(found) == set(series.values())
                for series_uid, data in sent.items():
                    with source.instances(found[series_uid]) as items:
                        ((uid, got),) = list(items)
                    assert pydicom.dcmread(io.BytesIO(got)) == pydicom.dcmread(io.BytesIO(data))
            finally:
                source.close()
        finally:
            ids = http.post("/tools/find", json={"Level": "Patient", "Query": {"PatientID": patient}}).json()
            for ident in ids:
                http.delete(f"/patients/{ident}")


def test_a_silent_read_is_waited_for_while_keep_waiting_says_so():
    """A C-MOVE's association may stay silent (Pending responses are optional) while its
    instances arrive on our storage SCP: a read that times out asks keep_waiting, and
    waits on while it says so; then it fails in words."""
    from clpipe.sources.dimse.wire import Wire as _Wire

    ours, theirs = socket.socketpair()
    ours.settimeout(0.2)
    wire = _Wire(ours, "the PACS X", 0.2)
    asked = []
    wire.keep_waiting = lambda: asked.append(1) or len(asked) < 4
    sender = threading.Timer(0.5, lambda: theirs.sendall(b"abcdef"))
    sender.start()
    try:
        assert wire._recv(6) == b"abcdef" and len(asked) >= 2  # waited past two timeouts
        wire.keep_waiting = lambda: False
        with pytest.raises(TransientError, match="no answer from the PACS X within"):
            wire._recv(1)
    finally:
        sender.cancel()
        ours.close()
        theirs.close()


def test_a_release_collision_is_answered_at_once():
    """Both sides ask to release at the same moment: we (the requestor) answer the PACS's
    A-RELEASE-RQ with an A-RELEASE-RP and close, rather than wait for an answer to ours."""
    import struct

    from clpipe.sources.dimse.association import Channel as _Channel
    from clpipe.sources.dimse.wire import Wire as _Wire

    ours, theirs = socket.socketpair()
    channel = _Channel.__new__(_Channel)  # an established association, without connecting
    channel.source = type("S", (), {"timeout": 5.0})()
    _Wire.__init__(channel, ours, "the PACS X", 5.0)
    channel.usable = True
    theirs.sendall(struct.pack(">BBI", 5, 0, 4) + bytes(4))  # the PACS's release request, already on its way
    started = time.monotonic()
    channel.release()
    assert time.monotonic() - started < 1.0
    theirs.settimeout(1.0)
    got = b""
    while len(got) < 20:
        chunk = theirs.recv(20 - len(got))
        if not chunk:
            break
        got += chunk
    assert got[:10] == struct.pack(">BBI", 5, 0, 4) + bytes(4)  # our request
    assert got[10:20] == struct.pack(">BBI", 6, 0, 4) + bytes(4)  # our answer to theirs
    theirs.close()


# ------------------------------------------------------------------ several series from one thread


def ours(found) -> list:
    return [s for s in found if not s.attrs.get("PatientID", "").startswith(BENCH)]


def test_one_thread_only_for_c_get_over_plain_tcp_from_this_machine(certificate):
    """The engine retrieves from one thread only where the CPU is the bound: C-GET from a
    PACS at a loopback address, without TLS (DimseSource.one_thread; the benchmark can
    turn it off)."""
    cert, _ = certificate
    url = parse_source_url("dimse://PACS@127.0.0.1:104")
    assert DimseSource(url, SourceSettings()).one_thread
    assert DimseSource(parse_source_url("dimse://PACS@localhost:104"), SourceSettings()).one_thread
    assert not DimseSource(parse_source_url("dimse://PACS@pacs.example.org:104"), SourceSettings()).one_thread
    assert not DimseSource(url, SourceSettings(retrieve="move", move_port=11112)).one_thread
    assert not DimseSource(url, SourceSettings(tls_ca=str(cert))).one_thread
    assert DimseSource(url, SourceSettings(extra={"local_cpu_cap": False})).one_thread
    assert not DimseSource(url, SourceSettings(extra={"one_thread": False})).one_thread


def test_instances_many_brings_every_series_from_this_thread(dicom_env, expected):
    """Every series of the data set retrieved on two associations read from the calling
    thread: each instance once, unchanged, each series ended without error, no thread
    started, the listing's association reused."""
    data_root = Path(dicom_env["CLPIPE_DICOM_DATA"])
    with open_source(dicom_env, "orthanc") as source:
        found = listing(source)
        threads = threading.active_count()
        received: dict[str, dict[str, bytes]] = {s.uid: {} for s in found}
        ended: dict[str, object] = {}
        for series, uid, payload in source.instances_many(iter(found), 2):
            assert threading.active_count() == threads
            if series is None:
                continue
            assert series.uid not in ended
            if uid:
                assert uid not in received[series.uid]
                received[series.uid][uid] = payload
            else:
                ended[series.uid] = payload
        assert ended == {s.uid: None for s in found}
        assert source.associations_opened <= 2
    for series_uid, got in received.items():
        want = instances_of(expected, series_uid)
        assert set(got) == set(want)
        for uid, data in got.items():
            check_instance(uid, data, want[uid], data_root)


def test_the_engine_retrieves_from_one_thread_and_a_second_run_retrieves_nothing(dicom_env, expected, tmp_path, monkeypatch):
    """From Orthanc on this machine the engine takes the one-thread way: with the
    per-series way broken, every instance still lands, once; the next run retrieves nothing."""

    def broken(*args):
        raise AssertionError("retrieved one series per thread")

    monkeypatch.setattr(Engine, "_fetch_series", broken)
    dropoff = tmp_path / "dropoff"
    dropoff.mkdir()
    source = open_source(dicom_env, "orthanc", jobs=4)
    source.series = lambda query: iter(ours(DimseSource.series(source, query)))  # type: ignore[method-assign]
    try:
        first = run_engine(source, dropoff)
        assert first.failed == 0, first.failures
        assert first.created == expected["counts"]["instances"]
        landed = sorted(p.name for p in dropoff.rglob("*.dcm") if ".clpipe" not in p.parts[0])
        assert landed == sorted(f"{r['SOPInstanceUID']}.dcm" for r in expected["instances"])
        assert not list(dropoff.glob(".clpipe-sync/tmp/*"))
        second = run_engine(source, dropoff)
        assert (second.failed, second.created, second.skipped) == (0, 0, expected["counts"]["instances"])
    finally:
        source.close()


@pytest.fixture
def stalling_pacs(expected, dicom_env):
    """A Q/R SCP (pynetdicom, in this process, plain TCP) holding three series of the data
    set, that answers the first C-GET of the first one only after ``stall[0]`` seconds;
    (its address, the three series UIDs, the C-GETs it answered per series)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

    data_root = Path(dicom_env["CLPIPE_DICOM_DATA"])
    chosen = [s["SeriesInstanceUID"] for s in expected["series"] if s["instances"] >= 8][:3]
    stored = {uid: [pydicom.dcmread(data_root / r["path"]) for r in instances_of(expected, uid).values()] for uid in chosen}
    asked = {uid: 0 for uid in chosen}
    stall = [3.0]

    def on_find(event):
        level, ident = event.identifier.QueryRetrieveLevel, event.identifier
        first = [group[0] for group in stored.values()]
        if level == "STUDY":
            answers = list({ds.StudyInstanceUID: ds for ds in first}.values())
        else:
            answers = [ds for ds in first if ds.StudyInstanceUID == ident.StudyInstanceUID]
        for ds in answers:
            answer = pydicom.Dataset()
            answer.QueryRetrieveLevel = level
            for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "Modality", "SeriesInstanceUID", "SeriesNumber"):
                if keyword in ds and keyword in ident:
                    setattr(answer, keyword, ds.data_element(keyword).value)
            if level == "SERIES":
                answer.NumberOfSeriesRelatedInstances = len(stored[ds.SeriesInstanceUID])
            yield 0xFF00, answer

    def on_get(event):
        uid = event.identifier.SeriesInstanceUID
        asked[uid] += 1
        if uid == chosen[0] and asked[uid] == 1:
            time.sleep(stall[0])
        yield len(stored[uid])
        for ds in stored[uid]:
            yield 0xFF00, ds

    ae = AE(ae_title="SLOWPACS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_supported_context(FIND)
    ae.add_supported_context(GET)
    for sop_class, syntax in {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for group in stored.values() for ds in group}:
        ae.add_supported_context(sop_class, [syntax], scu_role=True, scp_role=True)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find), (evt.EVT_C_GET, on_get)])
    yield f"SLOWPACS@127.0.0.1:{port}", chosen, asked
    server.shutdown()


def test_a_silent_association_fails_its_series_alone_and_it_is_tried_again(stalling_pacs, expected, tmp_path, capsys):
    """The PACS keeps one series' first C-GET silent past the timeout (1 s): that series
    fails alone (the other two arrive meanwhile on the other association), is said in a
    [retry] line and retrieved again after them; every instance lands."""
    address, chosen, asked = stalling_pacs
    source = DimseSource(parse_source_url(f"dimse://{address}"), SourceSettings(timeout=1.0, jobs=2))
    assert source.one_thread
    dropoff = tmp_path / "dropoff"
    dropoff.mkdir()
    started = time.monotonic()
    try:
        outcome = run_engine(source, dropoff, jobs=2)
    finally:
        source.close()
    assert outcome.failed == 0, outcome.failures
    assert time.monotonic() - started < 10
    assert asked == {chosen[0]: 2, chosen[1]: 1, chosen[2]: 1}
    want = {r["SOPInstanceUID"] for uid in chosen for r in instances_of(expected, uid).values()}
    assert outcome.created == len(want)
    assert {p.stem for p in dropoff.rglob("*.dcm") if ".clpipe" not in p.parts[0]} == want
    out = capsys.readouterr().out
    retries = [line for line in out.splitlines() if line.startswith("[retry]")]
    assert len(retries) == 1 and f"C-GET of series {chosen[0]}" in retries[0] and "no answer within 1 s" in retries[0], out


def synced_series(dropoff: Path, expected: dict) -> tuple[int, int]:
    """(series folders holding all their instances, series folders holding only some)."""
    count = {}
    for r in expected["instances"]:
        count.setdefault(r["SeriesInstanceUID"], set()).add(f"{r['SOPInstanceUID']}.dcm")
    whole = partial = 0
    for folder in {p.parent for p in dropoff.rglob("*.dcm") if ".clpipe" not in p.parts[0]}:
        names = {p.name for p in folder.iterdir()}
        owner = next(uid for uid, want in count.items() if names <= want)
        whole += names == count[owner]
        partial += names != count[owner]
    return whole, partial


@pytest.mark.parametrize("how", ["stop", "abort", "disk full"])
def test_one_thread_stops_as_the_per_series_way_does(dicom_env, expected, tmp_path, monkeypatch, how):
    """Told to stop at the first instance, the two series under way end whole and no other
    starts; told to abort (the grace over), or when the disk is full, they are abandoned:
    their staged instances removed, no series folder half filled. A second run, not
    stopped, syncs the rest."""
    from clpipe.errors import DiskFull
    from clpipe.sync import engine as engine_module
    from clpipe.sync.stopping import TIME_LIMIT, StopRequest

    request = StopRequest()
    real = engine_module._Series.add
    written = [0]

    def add(self, uid, payload, progress):
        written[0] += 1
        if written[0] == 1 and how != "disk full":
            request.request("at the time limit", TIME_LIMIT, 60.0 if how == "stop" else 0.0)
        if written[0] == 5 and how == "disk full":
            raise OSError(28, "No space left on device", f"{self.stage}/{uid}.dcm")
        real(self, uid, payload, progress)

    monkeypatch.setattr(engine_module._Series, "add", add)
    dropoff = tmp_path / "dropoff"
    dropoff.mkdir()
    source = open_source(dicom_env, "orthanc", jobs=2)
    source.series = lambda query: iter(ours(DimseSource.series(source, query)))  # type: ignore[method-assign]
    total = len(expected["series"])
    try:
        state = SyncState(dropoff, "test")
        state.acquire()
        try:
            state.load()
            engine = Engine(source, state, Options(dropoff=dropoff, zip_tmp=tmp_path / "ziptmp", jobs=2, retries=1, stop=request))
            if how == "disk full":
                with pytest.raises(DiskFull) as info:
                    engine.run(entries(source, DicomQuery()))
                outcome = info.value.outcome
            else:
                outcome = engine.run(entries(source, DicomQuery()))
            state.save()
        finally:
            state.release()
        whole, partial = synced_series(dropoff, expected)
        assert (whole, partial) == (2 if how == "stop" else 0, 0)
        landed = [p for p in dropoff.rglob("*.dcm") if ".clpipe" not in p.parts[0]]
        assert outcome.created == len(landed)
        assert not list(dropoff.glob(".clpipe-sync/tmp/*"))
        if how == "disk full":
            assert outcome.failed == total and str(info.value).startswith(f"no space left on {dropoff}")
        else:
            assert (outcome.failed, outcome.not_synced, outcome.stopped) == (0, total - whole, "at the time limit")
        monkeypatch.setattr(engine_module._Series, "add", real)
        again = run_engine(source, dropoff, jobs=2)
        assert again.failed == 0, again.failures
        assert synced_series(dropoff, expected) == (total, 0)
    finally:
        source.close()
