"""The DIMSE source's own protocol code, without a server: the A-ASSOCIATE-RQ/AC PDUs
(sources/dimse/pdu.py) checked against pynetdicom's decoder and encoder, the C-FIND/C-GET
identifiers (sources/dimse/identifiers.py) against pydicom's reader and writer, the
receive buffer of sources/dimse/wire.py, and that the source starts without importing
pydicom, pynetdicom or numpy (issue 15: ~0.25 s of every run's start-up)."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext

from clpipe.errors import TransientError
from clpipe.sources.dimse import identifiers
from clpipe.sources.dimse.pdu import (
    A_ASSOCIATE_AC_PDU,
    A_ASSOCIATE_RQ_PDU,
    HEADER,
    P_DATA_TF_PDU,
    associate_ac,
    associate_rq,
    decode_associate,
)
from clpipe.sources.dimse.uids import APPLICATION_CONTEXT, EXPLICIT_LE, IMPLICIT_LE, QR_FIND
from clpipe.sources.dimse.wire import READ_SIZE, Wire
from clpipe.sources.part10 import IMPLEMENTATION_UID, IMPLEMENTATION_VERSION

MR, RLE = "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.5"
CONTEXTS = [(QR_FIND, [EXPLICIT_LE, IMPLICIT_LE]), (MR, [RLE]), (MR, [EXPLICIT_LE])]


# ------------------------------------------------------------------ A-ASSOCIATE


def test_our_associate_rq_is_what_pynetdicom_reads_and_writes():
    ours = associate_rq("ORTHANC", "CLPIPE", CONTEXTS, [MR], 1 << 20)
    decoder = A_ASSOCIATE_RQ()
    decoder.decode(ours)
    primitive = decoder.to_primitive()
    assert (primitive.called_ae_title, primitive.calling_ae_title) == ("ORTHANC", "CLPIPE")
    assert primitive.application_context_name == APPLICATION_CONTEXT
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntax) for c in primitive.presentation_context_definition_list] == [
        (1, QR_FIND, [EXPLICIT_LE, IMPLICIT_LE]),
        (3, MR, [RLE]),
        (5, MR, [EXPLICIT_LE]),
    ]
    assert primitive.maximum_length_received == 1 << 20
    assert primitive.implementation_class_uid == IMPLEMENTATION_UID
    version = next(i for i in primitive.user_information if type(i).__name__ == "ImplementationVersionNameNotification")
    assert version.implementation_version_name == IMPLEMENTATION_VERSION
    roles = [i for i in primitive.user_information if type(i).__name__ == "SCP_SCU_RoleSelectionNegotiation"]
    assert [(r.sop_class_uid, r.scu_role, r.scp_role) for r in roles] == [(MR, False, True)]  # C-GET's C-STOREs come to us
    encoder = A_ASSOCIATE_RQ()
    encoder.from_primitive(primitive)
    assert encoder.encode() == ours  # byte for byte what pynetdicom would send


def test_an_associate_ac_from_pynetdicom_is_read_and_ours_is_what_it_reads():
    request = decode_associate(A_ASSOCIATE_RQ_PDU, associate_rq("CLPIPE", "ORTHANC", CONTEXTS, [], 16384)[HEADER.size :], "x")
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntax) for c in request.contexts] == [
        (1, QR_FIND, [EXPLICIT_LE, IMPLICIT_LE]),
        (3, MR, [RLE]),
        (5, MR, [EXPLICIT_LE]),
    ]
    assert (request.called_ae_title, request.calling_ae_title, request.maximum_length_received) == ("CLPIPE", "ORTHANC", 16384)
    assert request.implementation_class_uid == IMPLEMENTATION_UID

    ours = associate_ac(request, [(1, EXPLICIT_LE, True), (3, RLE, False), (5, EXPLICIT_LE, True)], 65536)
    decoder = A_ASSOCIATE_AC()
    decoder.decode(ours)
    primitive = decoder.to_primitive()
    results = [(c.context_id, c.result, c.transfer_syntax) for c in primitive.presentation_context_definition_results_list]
    assert results == [(1, 0, [EXPLICIT_LE]), (3, 4, [RLE]), (5, 0, [EXPLICIT_LE])]
    assert primitive.maximum_length_received == 65536

    # and pynetdicom's own A-ASSOCIATE-AC (a PACS built on it) as we read it
    answer = A_ASSOCIATE()
    answer.application_context_name = APPLICATION_CONTEXT
    answer.called_ae_title, answer.calling_ae_title = "QRSCP", "CLPIPE"
    answer.result, answer.result_source = 0, 1
    contexts = []
    for number, syntax, result in ((1, IMPLICIT_LE, 0), (3, RLE, 3)):
        context = PresentationContext()
        context.context_id, context.transfer_syntax, context.result = number, [syntax], result
        contexts.append(context)
    answer.presentation_context_definition_results_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = 0  # no limit
    answer.user_information = [length]
    encoder = A_ASSOCIATE_AC()
    encoder.from_primitive(answer)
    read = decode_associate(A_ASSOCIATE_AC_PDU, encoder.encode()[HEADER.size :], "x")
    assert [(c.context_id, c.result, c.transfer_syntax) for c in read.contexts] == [(1, 0, [IMPLICIT_LE]), (3, 3, [RLE])]
    assert read.maximum_length_received == 0


def test_a_broken_association_pdu_is_a_transient_error_naming_the_peer():
    body = associate_rq("ORTHANC", "CLPIPE", CONTEXTS, [], 16384)[HEADER.size :]
    first = 68 + 4 + len(APPLICATION_CONTEXT)  # the first presentation context item: its length made too long
    for broken in (body[:40], body[:-3], body[:first] + b"\x20\x00\xff\xff" + body[first + 4 :]):
        with pytest.raises(TransientError, match="the PACS X sent an association PDU that cannot be read"):
            decode_associate(A_ASSOCIATE_AC_PDU, broken, "the PACS X")


# ------------------------------------------------------------------ identifiers


@pytest.mark.parametrize("implicit", [False, True])
def test_an_identifier_we_write_is_what_pydicom_reads(implicit):
    query = {
        "QueryRetrieveLevel": "SERIES",
        "SpecificCharacterSet": "ISO_IR 192",
        "PatientName": "Müller^Jörg*",  # odd length in UTF-8: padded with a space
        "StudyInstanceUID": "1.2.3",  # odd: padded with NUL
        "SeriesInstanceUID": "",
        "NumberOfSeriesRelatedInstances": "",
        "StudyDate": "20240101-20240131",
    }
    ds = read_dataset(BytesIO(identifiers.encode(query, implicit)), implicit, True)
    assert [e.keyword for e in ds] == sorted(query, key=lambda k: identifiers.KEYS[k][0])  # in tag order
    assert str(ds.PatientName) == "Müller^Jörg*" and ds.StudyInstanceUID == "1.2.3" and ds.StudyDate == "20240101-20240131"
    assert ds.SeriesInstanceUID == "" and ds.NumberOfSeriesRelatedInstances is None  # present, empty: universal matching


def written(ds: Dataset, implicit: bool) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, implicit
    write_dataset(out, ds)
    return out.getvalue()


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize(
    "charset,name",
    [
        (None, "Smith^John"),
        ("ISO_IR 100", "O'Brien^Siobhán"),
        ("ISO_IR 192", "Müller^Jörg=ミュラー"),
        ("\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎"),
    ],
)
def test_an_answer_is_read_as_pydicom_reads_it(implicit, charset, name):
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.PatientID = "P1"
    ds.StudyDescription = "  leading spaces kept"
    ds.SeriesNumber = "7"
    ds.NumberOfSeriesRelatedInstances = "160"
    ds.Modality = "MR"
    ds.SeriesDescription = ""  # present but empty: the PACS knows the key
    ds.SeriesInstanceUID = "1.2.840.99.1"
    ds.ReferencedStudySequence = Sequence([Dataset()])  # skipped, never decoded
    ds.ReferencedStudySequence[0].ReferencedSOPInstanceUID = "1.2.3.4"
    ds.InstitutionName = "not asked for"
    got = identifiers.decode(written(ds, implicit), implicit)
    assert got == {
        **({"SpecificCharacterSet": charset} if charset else {}),
        "PatientName": name,
        "PatientID": "P1",
        "StudyDescription": "  leading spaces kept",
        "SeriesNumber": "7",
        "NumberOfSeriesRelatedInstances": "160",
        "Modality": "MR",
        "SeriesDescription": "",
        "SeriesInstanceUID": "1.2.840.99.1",
    }


def test_an_unreadable_answer_is_said():
    with pytest.raises(identifiers.Unreadable):
        identifiers.decode(struct.pack("<HH2sH", 0x0010, 0x0010, b"XX", 5) + b"abcde", False)  # no such VR


# ------------------------------------------------------------------ the receive buffer


@pytest.mark.parametrize("unblocked", [False, True])
def test_pdus_larger_than_the_buffer_and_split_anywhere_are_read_whole(unblocked):
    ours, theirs = socket.socketpair()
    ours.settimeout(5.0)
    wire = Wire(ours, "the PACS X", 5.0)
    if unblocked:  # non-blocking, polled only when not ready (plain TCP associations)
        wire._unblock()
    pdus = [bytes([n % 251]) * size for n, size in enumerate((10, READ_SIZE * 3 + 7, 1, 70000, READ_SIZE - 6, 5))]
    stream = b"".join(HEADER.pack(P_DATA_TF_PDU, 0, len(body)) + body for body in pdus)

    def send() -> None:  # in pieces that cut headers and bodies anywhere
        for start in range(0, len(stream), 99991):
            theirs.sendall(stream[start : start + 99991])

    sender = threading.Thread(target=send)
    sender.start()
    try:
        for body in pdus:
            assert wire._read_pdu() == (P_DATA_TF_PDU, body)
    finally:
        sender.join(5.0)
        ours.close()
        theirs.close()


def test_a_non_blocking_wire_waits_its_timeout_then_says_so_and_writes_everything():
    ours, theirs = socket.socketpair()
    wire = Wire(ours, "the PACS X", 0.3)
    wire._unblock()
    asked = []
    wire.keep_waiting = lambda: asked.append(1) or len(asked) < 2  # one more timeout, then no
    try:
        started = time.monotonic()
        with pytest.raises(TransientError, match="no answer from the PACS X within 0 s"):
            wire._recv(1)
        assert 0.5 < time.monotonic() - started < 3.0 and len(asked) == 2
        big = bytes(range(256)) * 40000  # more than the socket buffers hold: written as the peer reads
        received = bytearray()

        def read() -> None:
            while len(received) < len(big):
                received.extend(theirs.recv(1 << 16))

        reader = threading.Thread(target=read)
        reader.start()
        wire._send(big)
        reader.join(5.0)
        assert bytes(received) == big
        with pytest.raises(TransientError, match="the connection to the PACS X broke"):
            wire._send(big)  # nobody reads: the write times out
    finally:
        ours.close()
        theirs.close()


# ------------------------------------------------------------------ start-up


def test_the_dimse_source_starts_without_pydicom_pynetdicom_or_numpy():
    code = (
        "import sys\n"
        "from clpipe.sources.dimse import DimseSource\n"
        "from clpipe.sources.dicom import SourceSettings, parse_source_url\n"
        "DimseSource(parse_source_url('dimse://PACS@127.0.0.1:104'), SourceSettings()).close()\n"
        "print(sorted(m for m in ('pydicom', 'pynetdicom', 'numpy') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
