"""A small Flywheel-compatible HTTP server for tests and the no-account demo.

It speaks just enough of the Flywheel core API (under ``/api``) for the real clients to work
against it: ``fw login`` and ``fw sync`` (flywheel-cli 17.x/18.x) and a hierarchy walk plus
file download with flywheel-sdk 23. The data is a tree of plain dataclasses
(:class:`Project` > :class:`Subject` > :class:`Session` > :class:`Acquisition` > :class:`FwFile`);
the server reads the tree on every request, so tests can change it in place between syncs.

Faults (error statuses, dropped or truncated connections, delays, corrupted bodies) can be
injected per request path to test a client's error handling; a wide-area network can be
simulated (a fixed delay before every answer, a bandwidth cap: ``FlywheelTestServer.link``,
``--latency-ms`` and ``--bandwidth-mbps``). Bulk downloads (``POST /api/download``, then a
tar from ``GET /api/download?ticket=``) work as in scitran core. The API key is never logged
or recorded.

Run ``python -m clpipe.testing.fwserver --port 8123 --key demo-key`` to serve a demo project
``fw://lab/study`` on 127.0.0.1 (``--latency-ms 40`` to answer every request 40 ms late).
"""

from __future__ import annotations

import argparse
import email
import gzip
import hashlib
import io
import json
import logging
import os
import random
import re
import signal
import socket
import socketserver
import struct
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

from .faults import Fault, Faults, Link, corrupted, write_body

log = logging.getLogger(__name__)

#: Default ``modified`` of files and ``created`` of containers: fixed, so demo data is reproducible.
FIXED_TIME = datetime(2024, 1, 15, 12, 0, 0, tzinfo=timezone.utc)
USER_ID = "demo.user@example.org"
_MIMETYPES = {"dicom": "application/dicom", "qa": "application/json"}  # else octet-stream


def _iso(dt: datetime) -> str:
    return dt.isoformat(timespec="microseconds")


# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------


@dataclass
class FwFile:
    """A file attached to a container; ``type`` is the Flywheel file type ("dicom", "nifti", ...)."""

    name: str
    content: bytes
    type: str = "dicom"
    modified: datetime | None = None  # None -> FIXED_TIME
    version: int = 1
    _digest: tuple = field(default=(None, ""), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.modified is None:
            self.modified = FIXED_TIME
        elif self.modified.tzinfo is None:
            raise ValueError("FwFile.modified must be timezone-aware")

    @property
    def size(self) -> int:
        return len(self.content)

    @property
    def is_zip(self) -> bool:
        return self.name.lower().endswith(".zip")

    @property
    def hash(self) -> str:
        """``v0-sha384-<hex>`` of the content (cached while the content object is unchanged)."""
        if self._digest[0] is not self.content:
            self._digest = (self.content, "v0-sha384-" + hashlib.sha384(self.content).hexdigest())
        return self._digest[1]

    def zip_members(self) -> list[zipfile.ZipInfo]:
        """Entries of a zip file (directories included); raises zipfile.BadZipFile otherwise."""
        with zipfile.ZipFile(io.BytesIO(self.content)) as zf:
            return zf.infolist()

    def replace_content(self, content: bytes, modified: datetime | None = None) -> None:
        """Replace the bytes like a re-upload does: bump ``version`` and move ``modified`` on."""
        now = datetime.now(timezone.utc)
        self.content = content
        self.version += 1
        self.modified = modified or max(now, self.modified + timedelta(seconds=1))


@dataclass
class Acquisition:
    label: str
    files: list[FwFile] = field(default_factory=list)
    id: str = ""


@dataclass
class Session:
    label: str
    acquisitions: list[Acquisition] = field(default_factory=list)
    id: str = ""


@dataclass
class Subject:
    label: str
    sessions: list[Session] = field(default_factory=list)
    id: str = ""


class Node(NamedTuple):
    """One container of a project tree with its ancestors (None above its own level)."""

    kind: str  # "project", "subject", "session" or "acquisition"
    obj: object
    project: Project
    subject: Subject | None = None
    session: Session | None = None
    acquisition: Acquisition | None = None


@dataclass
class Project:
    group: str
    label: str
    subjects: list[Subject] = field(default_factory=list)
    id: str = ""
    # Ids are <12 hex chars from group/label><12 hex digit sequence>: unique across projects,
    # reproducible for the same tree, and ascending in creation (pre-order) order.
    _id_prefix: str = field(default="", init=False, repr=False, compare=False)
    _next_seq: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.assign_ids()

    def walk(self) -> Iterator[Node]:
        """Every container, parents before children, in list order."""
        yield Node("project", self, self)
        for sub in self.subjects:
            yield Node("subject", sub, self, sub)
            for ses in sub.sessions:
                yield Node("session", ses, self, sub, ses)
                for acq in ses.acquisitions:
                    yield Node("acquisition", acq, self, sub, ses, acq)

    def assign_ids(self) -> None:
        """Give an id to every container that has none (containers added later get one too)."""
        if not self._id_prefix:
            self._id_prefix = hashlib.sha1(f"{self.group}/{self.label}".encode()).hexdigest()[:12]
        for node in self.walk():
            if not node.obj.id:
                node.obj.id = f"{self._id_prefix}{self._next_seq:012x}"
                self._next_seq += 1

    def iter_files(self) -> Iterator[tuple[Node, FwFile]]:
        for node in self.walk():
            if node.kind == "acquisition":
                for f in node.obj.files:
                    yield node, f

    def dst_path(self, node: Node, name: str) -> str:
        """The ``dst_path`` download/targets reports for a file of an acquisition."""
        return (
            f"/{self.label}/SUBJECTS/{node.subject.label}/SESSIONS/{node.session.label}/ACQUISITIONS/{node.acquisition.label}/FILES/{name}"
        )

    def expected_paths(self, types: set[str] | None = None, strip_root: bool = True, unpack: bool = True) -> dict[str, bytes]:
        """Relative path -> bytes of what ``fw sync`` writes for files of the given types.

        Mirrors the CLI: dicom zips are unpacked into a folder named after the zip minus
        ``(.dcm|.dicom)?.zip`` with members flattened to their base names.
        """
        out: dict[str, bytes] = {}
        for node, f in self.iter_files():
            if types is not None and f.type not in types:
                continue
            path = self.dst_path(node, f.name)
            path = re.sub(r"^/[^/]+/", "", path) if strip_root else path.lstrip("/")
            if unpack and f.type == "dicom" and f.name.lower().endswith("zip"):
                folder = re.sub(r"(\.(dcm|dicom))?\.zip$", "", path, flags=re.IGNORECASE)
                with zipfile.ZipFile(io.BytesIO(f.content)) as zf:
                    for info in zf.infolist():
                        if not info.is_dir():
                            out[f"{folder}/{os.path.basename(info.filename)}"] = zf.read(info)
            else:
                out[path] = f.content
        return out

    def expected_dicom_paths(self, strip_root: bool, unpack: bool = True) -> dict[str, bytes]:
        return self.expected_paths({"dicom"}, strip_root=strip_root, unpack=unpack)


# --------------------------------------------------------------------------------------------
# Demo data
# --------------------------------------------------------------------------------------------

_ACQ_NAMES = ["T1w", "T2w", "BOLD", "DWI", "FLAIR", "SWI"]


def _uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _dicom_dataset(
    *,
    patient: str,
    study_uid: str,
    study_dt: datetime,
    series_uid: str,
    series_number: int,
    description: str,
    instance: int,
    sop_uid: str,
    rows: int,
    cols: int,
    pixels: bytes,
):
    """One MR image (``rows`` x ``cols``, uint16, 12 bits stored) as a pydicom dataset."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    date, tm = study_dt.strftime("%Y%m%d"), study_dt.strftime("%H%M%S")
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = tm
    ds.Modality, ds.Manufacturer = "MR", "clpipe demo"
    ds.PatientName, ds.PatientID = f"Demo^{patient}", patient
    ds.PatientBirthDate, ds.PatientSex = "19900101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = _uid("for", study_uid)
    ds.StudyID, ds.AccessionNumber, ds.StudyDescription = "1", "", "clpipe demo study"
    ds.SeriesNumber, ds.InstanceNumber = series_number, instance
    ds.SeriesDescription = ds.ProtocolName = description
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "GR", "NONE", "2D"
    ds.MagneticFieldStrength, ds.EchoTime, ds.RepetitionTime = 3, 2.5, 2000
    ds.SliceThickness, ds.PixelSpacing = 1, [1, 1]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, float(instance)]
    ds.SliceLocation = float(instance)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels
    return ds


def _dicom_bytes(rng: random.Random, *, rows: int = 8, cols: int = 8, **attrs) -> bytes:
    """One small MR image (8x8 by default, uint16) as a DICOM Part 10 file, Explicit VR Little
    Endian; ``attrs`` are those of :func:`_dicom_dataset`."""
    import pydicom

    n = rows * cols
    pixels = struct.pack(f"<{n}H", *(rng.randrange(4096) for _ in range(n)))
    ds = _dicom_dataset(rows=rows, cols=cols, pixels=pixels, **attrs)
    buf = io.BytesIO()
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(buf, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(buf, write_like_original=False)
    return buf.getvalue()


_MASK_12BIT = bytes(i & 0x0F for i in range(256))  # the high byte of a 12-bit uint16 sample
_TAG_META_LENGTH, _TAG_META_SOP = 0x00020000, 0x00020003
_TAG_SOP, _TAG_INSTANCE, _TAG_POSITION, _TAG_LOCATION, _TAG_PIXELS = (0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010)


def _element(tag: int, vr: str, value: bytes) -> bytes:
    """One Explicit VR Little Endian data element; ``value`` padded to an even length."""
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    head = struct.pack("<HH2s", tag >> 16, tag & 0xFFFF, vr.encode())
    if vr in ("OB", "OW"):
        return head + struct.pack("<HI", 0, len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _encoded(ds) -> dict[int, bytes]:
    """Tag -> encoded element (Explicit VR Little Endian) of every element of ``ds``."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    out = {}
    for elem in ds:
        if elem.tag == _TAG_PIXELS:
            continue  # its VR is ambiguous until written; added per slice
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem)
        out[int(elem.tag)] = fp.getvalue()
    return out


def _fast_series(rng: random.Random, slices: int, *, rows: int, cols: int, series_uid: str, **attrs) -> list[tuple[str, bytes]]:
    """``(IMnnnn.dcm, bytes)`` of a series, much faster than :func:`_dicom_bytes` per slice.

    The elements every slice shares are encoded once with pydicom; the per-slice ones (SOP
    instance UID, instance number, position, random 12-bit pixels) by hand. The files are
    the ones pydicom writes for the same values.
    """
    from pydicom.dataset import validate_file_meta

    template = _dicom_dataset(rows=rows, cols=cols, series_uid=series_uid, instance=1, sop_uid="1", pixels=b"", **attrs)
    validate_file_meta(template.file_meta, enforce_standard=True)  # as save_as completes it
    meta, body = _encoded(template.file_meta), _encoded(template)
    meta.pop(_TAG_META_LENGTH, None)
    out = []
    for n in range(1, slices + 1):
        sop = _uid(series_uid, n).encode()
        pixels = bytearray(rng.randbytes(2 * rows * cols))
        pixels[1::2] = pixels[1::2].translate(_MASK_12BIT)
        meta[_TAG_META_SOP] = _element(_TAG_META_SOP, "UI", sop)
        body[_TAG_SOP] = _element(_TAG_SOP, "UI", sop)
        body[_TAG_INSTANCE] = _element(_TAG_INSTANCE, "IS", str(n).encode())
        body[_TAG_POSITION] = _element(_TAG_POSITION, "DS", f"0.0\\0.0\\{float(n)}".encode())
        body[_TAG_LOCATION] = _element(_TAG_LOCATION, "DS", str(float(n)).encode())
        body[_TAG_PIXELS] = _element(_TAG_PIXELS, "OW", bytes(pixels))
        group = b"".join(meta[t] for t in sorted(meta))
        length = _element(_TAG_META_LENGTH, "UL", struct.pack("<I", len(group)))
        out.append((f"IM{n:04d}.dcm", b"".join([bytes(128), b"DICM", length, group, *(body[t] for t in sorted(body))])))
    return out


def _zip_bytes(folder: str, members: list[tuple[str, bytes]], when: datetime) -> bytes:
    """A deterministic zip: a directory entry plus members under it, with fixed timestamps."""
    date_time = when.timetuple()[:6]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        d = zipfile.ZipInfo(f"{folder}/", date_time)
        d.external_attr = (0o40755 << 16) | 0x10
        zf.writestr(d, b"")
        for name, data in members:
            zi = zipfile.ZipInfo(f"{folder}/{name}", date_time)
            zi.compress_type = zipfile.ZIP_DEFLATED
            zi.external_attr = 0o100644 << 16
            zf.writestr(zi, data)
    return buf.getvalue()


def make_demo_project(
    group: str = "lab",
    label: str = "study",
    subjects: int = 2,
    sessions: int = 1,
    acquisitions: int = 2,
    slices: int = 3,
    single_dicoms: bool = True,
    non_dicom: bool = True,
    seed: int = 0,
    rows: int = 8,
    cols: int = 8,
    zipped: bool = True,
    fast: bool = False,
) -> Project:
    """A project of real (tiny) MR DICOM data; the same arguments give the same bytes.

    Each acquisition holds ``<SeriesInstanceUID>.dicom.zip`` (members ``<uid>/IM0001.dcm``...);
    with ``single_dicoms`` the first acquisition of each session also holds ``localizer.dcm``;
    with ``non_dicom`` each acquisition also holds ``<label>.nii.gz`` (nifti) and ``qa.json`` (qa).

    For benchmarks: images are ``rows`` x ``cols``; without ``zipped`` the slices are single
    files ``IM0001.dcm``... of the acquisition instead of one zip; ``fast`` builds the slices
    of a series from one template with random pixels from ``Random.randbytes`` (about 100x
    faster for big projects; other bytes than without it, equally deterministic).
    """
    subj_list = []
    for si in range(subjects):
        sub_label = f"sub-{si + 1:02d}"
        patient = f"{label}-{sub_label}"
        sess_list = []
        for ssi in range(sessions):
            study_uid = _uid(seed, group, label, "study", si, ssi)
            study_dt = FIXED_TIME - timedelta(days=30 * (sessions - ssi), hours=si)
            common = dict(patient=patient, study_uid=study_uid, study_dt=study_dt)
            acq_list = []
            for ai in range(acquisitions):
                acq_label = _ACQ_NAMES[ai] if ai < len(_ACQ_NAMES) else f"ACQ{ai + 1:02d}"
                rng = random.Random(f"{seed}/{group}/{label}/{si}/{ssi}/{ai}")
                series_uid = _uid(seed, study_uid, "series", ai)
                series = dict(common, series_uid=series_uid, series_number=ai + 1, description=acq_label, rows=rows, cols=cols)
                if fast:
                    slices_ = _fast_series(rng, slices, **series)
                else:
                    slices_ = [
                        (f"IM{n:04d}.dcm", _dicom_bytes(rng, **series, instance=n, sop_uid=_uid(series_uid, n)))
                        for n in range(1, slices + 1)
                    ]
                if zipped:
                    files = [FwFile(f"{series_uid}.dicom.zip", _zip_bytes(series_uid, slices_, study_dt))]
                else:
                    files = [FwFile(name, data) for name, data in slices_]
                if single_dicoms and ai == 0:
                    loc_uid = _uid(seed, study_uid, "localizer")
                    files.append(
                        FwFile(
                            "localizer.dcm",
                            _dicom_bytes(
                                rng,
                                **common,
                                rows=rows,
                                cols=cols,
                                series_uid=loc_uid,
                                series_number=99,
                                description="localizer",
                                instance=1,
                                sop_uid=_uid(loc_uid, 1),
                            ),
                        )
                    )
                if non_dicom:
                    volume = bytes(rng.randrange(256) for _ in range(348))
                    files.append(FwFile(f"{acq_label.lower()}.nii.gz", gzip.compress(volume, mtime=0), "nifti"))
                    qa = {"series": series_uid, "snr": round(rng.uniform(10, 40), 3)}
                    files.append(FwFile("qa.json", json.dumps(qa).encode(), "qa"))
                acq_list.append(Acquisition(acq_label, files))
            sess_list.append(Session(f"ses-{ssi + 1:02d}", acq_list))
        subj_list.append(Subject(sub_label, sess_list))
    return Project(group, label, subj_list)


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, message: str, detail: object = None):
        super().__init__(message)
        self.status, self.message, self.detail = status, message, detail


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # listen backlog (default 5)

    def __init__(self, address, app: FlywheelTestServer):
        self.app = app
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn), which can be slow.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return  # a client that went away (killed, or gave up): no traceback on the server's stderr
        super().handle_error(request, client_address)

    def close_open_connections(self) -> None:
        """Kick idle keep-alive connections so no handler thread outlives the server."""
        with self.sockets_lock:
            for sock in list(self.open_sockets):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class FlywheelTestServer:
    """A threaded HTTP server on ``host:port`` (0 = a free port) serving ``projects``.

    ``api_keys`` (a mutable set) lists the keys accepted in ``Authorization: scitran-user KEY``.
    ``requests`` records ``{method, path, query, status, auth_ok, fault}`` for each request, with
    ``path`` URL-decoded and ``query`` mapping each name to its last value; status 0 means the
    connection was dropped. ``uploads`` collects ``(filename, bytes)`` of uploaded files.
    ``targets_hash`` adds each file's hash to the ``download/targets`` lines (off: real
    listings carry none); ``file_hashes`` (on) gives it in the file entries of containers
    (``GET containers/{id}`` and the per-level container endpoints).

    A slow network is simulated by ``link`` (:class:`~clpipe.testing.faults.Link`):
    ``latency`` seconds slept before every answer and ``bandwidth`` bytes/s at most for all
    bodies together (0: no cap); both can be changed at any time (``srv.link.latency = 0.04``).

    Bulk downloads (``POST /api/download`` with nodes and filters gives a ticket, ``GET
    /api/download?ticket=T`` a tar of the files) are built as in scitran core: member paths
    ``[<prefix>/]<group>/<project>/<subject>/<session>/<acquisition>/<file name>`` (the
    prefix only for a project node), each label cleaned by :func:`clean_label`, a container
    path already taken by another container gets ``_0``, ``_1``, ...; a file listed in
    ``missing_content`` (``(acquisition id, file name)``) arrives as an empty
    ``<path>.MISSING`` member. The tar is built in memory: for test-sized data.
    """

    def __init__(
        self,
        projects: list[Project] | None = None,
        api_keys=("demo-key",),
        host: str = "127.0.0.1",
        port: int = 0,
        release: str = "23.0.0",
        latency: float = 0.0,
        bandwidth: float = 0.0,
    ):
        self.projects: list[Project] = list(projects or [])
        # A set passed in is used as is, so the caller can also revoke keys through it.
        self.api_keys: set[str] = api_keys if isinstance(api_keys, set) else {api_keys} if isinstance(api_keys, str) else set(api_keys)
        self.host, self.port, self.release = host, port, release
        self.targets_hash = False  # add each file's hash to download/targets lines
        self.file_hashes = True  # False: file entries of containers carry no hash (a server that gives none)
        self.requests: list[dict] = []
        self.uploads: list[tuple[str, bytes]] = []
        self.link = Link(latency, bandwidth)
        self.missing_content: set[tuple[str, str]] = set()  # (acquisition id, file name): ".MISSING" in a tar
        self._tickets: dict[str, list[tuple[str, FwFile | None]]] = {}
        self._faults = Faults()
        self._lock = threading.RLock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> FlywheelTestServer:
        if self._httpd is not None:
            return self
        self._httpd = _HTTPServer((self.host, self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name=f"fwserver-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.close_open_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FlywheelTestServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def login_key(self, key: str = "demo-key") -> str:
        """The string to pass to ``fw login`` / ``flywheel.Client`` for this server."""
        return f"{self.host}:{self.port}:__force_insecure:{key}"

    # -- data access ----------------------------------------------------------------------
    def project(self, label_or_id: str | None = None, group: str | None = None) -> Project:
        """The first project matching label or id (and group if given); any project if None."""
        for p in self.projects:
            if (label_or_id in (None, p.label, p.id)) and group in (None, p.group):
                return p
        raise KeyError(f"no project {group or '*'}/{label_or_id}")

    def acquisition(self, label_or_id: str) -> Acquisition:
        """The first acquisition (over all projects) with this label or id."""
        for node in self._nodes():
            if node.kind == "acquisition" and label_or_id in (node.obj.label, node.obj.id):
                return node.obj
        raise KeyError(f"no acquisition {label_or_id}")

    def remove_file(self, acquisition_label_or_id: str, name: str) -> FwFile:
        acq = self.acquisition(acquisition_label_or_id)
        with self._lock:
            for i, f in enumerate(acq.files):
                if f.name == name:
                    return acq.files.pop(i)
        raise KeyError(f"no file {name} in {acquisition_label_or_id}")

    def _nodes(self) -> list[Node]:
        with self._lock:  # ids for containers added since the last request
            for p in self.projects:
                p.assign_ids()
            return [node for p in self.projects for node in p.walk()]

    def _node(self, cid: str, kind: str | None = None) -> Node:
        for node in self._nodes():
            if node.obj.id == cid and kind in (None, node.kind):
                return node
        raise ApiError(404, f"{(kind or 'container').capitalize()} {cid} not found")

    # -- faults ---------------------------------------------------------------------------
    def add_fault(
        self,
        path_pattern: str,
        kind: str,
        count: int | None = None,
        status: int = 500,
        delay: float = 0.0,
        method: str | None = None,
        retry_after: str | None = None,
        span: tuple[int, int] | None = None,
    ) -> Fault:
        """Make requests whose (URL-decoded) path matches the regex ``path_pattern`` fail.

        kinds: "status" (reply ``status`` with a JSON error), "drop" (close without a reply),
        "truncate" (full Content-Length, half the body, close), "reset" (the same, then a TCP
        reset instead of a normal close: "connection reset by peer" mid-body), "delay" (sleep ``delay`` s, then
        answer normally), "corrupt" (flip the middle third of the body's bytes, same length;
        with ``span=(start, end)`` the bytes ``body[start:end]`` instead, e.g. one field of a
        zip header; negative offsets count from the end).
        ``delay`` also applies before the other kinds. ``count`` limits how many matching
        requests are hit (None = all); the first matching fault with hits left wins.
        """
        return self._faults.add(path_pattern, kind, count, status, delay, method, retry_after, span)

    def clear_faults(self) -> None:
        self._faults.clear()

    def _auth_ok(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "scitran-user" or not token.strip():
            return False
        # The CLI may send "host:key"; the key is what follows the last colon.
        return token.strip().rsplit(":", 1)[-1] in self.api_keys

    # -- API ------------------------------------------------------------------------------
    def _route(self, method: str, parts: list[str], query: dict, body: bytes, auth_ok: bool, ctype: str = ""):
        """Return (status, body bytes, content type) for an /api request, or raise ApiError."""
        if parts == ["config"] and method == "GET":  # the only call made without a key
            return _json({"features": {}, "site": {}})  # no signed URLs: files come from /api
        if parts == ["download"] and method == "GET" and query.get("ticket"):  # the ticket is the permission
            if query.get("format", "tar") != "tar":
                raise ApiError(400, f"Download format {query['format']!r} is not supported by this test server (only tar)")
            return self._download_tar(query["ticket"])
        if not auth_ok:
            raise ApiError(401, "Invalid or expired API key", "Authentication required")
        kinds = {"projects": "project", "subjects": "subject", "sessions": "session", "acquisitions": "acquisition"}
        children = {"project": "subjects", "subject": "sessions", "session": "acquisitions"}
        n = len(parts)
        if method == "GET":
            if parts == ["version"]:
                return _json({"release": self.release, "flywheel_release": self.release})
            if parts == ["auth", "status"]:
                return _json(
                    {"origin": {"type": "user", "id": USER_ID}, "user_id": USER_ID, "user_is_admin": False, "is_device": False, "roles": []}
                )
            if parts == ["users", "self"]:
                return _json(
                    {
                        "_id": USER_ID,
                        "firstname": "Demo",
                        "lastname": "User",
                        "email": USER_ID,
                        "roles": [],
                        "root": False,
                        "disabled": False,
                    }
                )
            if parts == ["projects"]:
                return _json(_page([self._container_json(n) for n in self._nodes() if n.kind == "project"], query))
            if n == 2 and parts[0] == "containers":  # any container by id, as the SDK's get_container/get
                node = self._node(parts[1])
                return _json({**self._container_json(node), "container_type": node.kind})
            if n == 4 and parts[0] in ("containers", *kinds) and parts[2] == "files":
                kind = None if parts[0] == "containers" else kinds[parts[0]]
                return self._file_response(self._node(parts[1], kind), parts[3], query)
            if n in (2, 3) and parts[0] in kinds:
                node = self._node(parts[1], kinds[parts[0]])
                if n == 2:
                    return _json(self._container_json(node))
                if children.get(node.kind) == parts[2] or (node.kind, parts[2]) == ("project", "sessions"):
                    items = [c for c in self._nodes() if c.kind == kinds[parts[2]] and getattr(c, node.kind) is node.obj]
                    return _json(_page([self._container_json(c) for c in items], query))
        elif method == "POST":
            if parts == ["lookup"]:
                return _json(self._lookup(_json_body(body).get("path") or []))
            if parts == ["download", "targets"]:
                return self._download_targets(_json_body(body))
            if parts == ["download"]:
                return self._download_ticket(_json_body(body), query)
            if n == 3 and parts[0] in kinds and parts[2] == "files":
                self._node(parts[1], kinds[parts[0]])
                return _json(self._upload(body, ctype))
        raise ApiError(404, "The resource could not be found.", "/api/" + "/".join(parts))

    def _lookup(self, path: list[str]) -> dict:
        if not path:
            raise ApiError(400, "Lookup path is empty")
        if len(path) == 1:
            if any(p.group == path[0] for p in self.projects):
                return {"container_type": "group", "_id": path[0], "label": path[0]}
            raise ApiError(404, f"Group {path[0]} not found", {"path": path})
        for node in self._nodes():
            labels = [node.project.group, node.project.label] + [
                c.label for c in (node.subject, node.session, node.acquisition) if c is not None
            ]
            if labels == path:
                return {"container_type": node.kind, **self._container_json(node)}
        raise ApiError(404, f"Could not resolve path {'/'.join(path)}", {"path": path})

    def _download_targets(self, payload: dict):
        nodes = payload.get("nodes") or []
        plus, minus = set(), set()
        for flt in payload.get("filters") or []:  # [{"types": {"+": [..]}}, {"types": {"-": [..]}}]
            types = (flt or {}).get("types") or {}
            plus.update(t.lower() for t in types.get("+") or [])
            minus.update(t.lower() for t in types.get("-") or [])
        # Container tag / mlset filters and analyses/metadata options are accepted and ignored.
        wanted = {(n.get("level"), n.get("_id")) for n in nodes if isinstance(n, dict)}
        if not wanted & {(n.kind, n.obj.id) for n in self._nodes()}:  # (also assigns new ids)
            raise ApiError(404, "No such container", {"nodes": nodes})
        lines = []
        for p in self.projects:
            for node, f in p.iter_files():
                ids = {(k, getattr(node, k).id) for k in ("project", "subject", "session", "acquisition")}
                ftype = (f.type or "").lower()
                if not wanted & ids or (plus and ftype not in plus) or ftype in minus:
                    continue
                target = {
                    "download_type": "file",
                    "container_type": "acquisition",
                    "container_id": node.obj.id,
                    "filename": f.name,
                    "filetype": f.type,
                    "size": f.size,
                    "modified": _iso(f.modified),
                    "dst_path": p.dst_path(node, f.name),
                }
                if self.targets_hash:  # whether real servers send it here is unknown: optional
                    target["hash"] = f.hash
                lines.append(json.dumps(target))
        return 200, "".join(line + "\n" for line in lines).encode(), "application/x-ndjson"

    def _download_ticket(self, payload: dict, query: dict):
        """``POST download``: the files of ``nodes`` that pass ``filters`` as a ticket for one
        tar (scitran core's preflight; see the class docstring for the member paths)."""
        if query.get("bulk", "").lower() in ("true", "1"):
            raise ApiError(400, "Bulk downloads of listed files are not supported by this test server")
        filters = payload.get("filters") or []
        prefix = query.get("prefix", "scitran")
        paths: dict[str, str] = {}  # container id -> its path in the tar
        targets: list[tuple[str, FwFile | None]] = []
        size = 0

        def path_of(parent: str, label: str, cid: str) -> str:
            if cid not in paths:  # a new container: its path, unless another's already
                base = f"{parent}/{clean_label(label)}" if parent else clean_label(label)
                taken, path, n = set(paths.values()), base, 0
                while path in taken:
                    path, n = f"{base}_{n}", n + 1
                paths[cid] = path
            return paths[cid]

        nodes = {(n.kind, n.obj.id): n for n in self._nodes()}
        for item in payload.get("nodes") or []:
            top = nodes.get((item.get("level"), item.get("_id"))) if isinstance(item, dict) else None
            if top is None:
                continue  # as core: a missing (or forbidden) node is skipped
            for node in top.project.walk():
                if node.kind != "acquisition" or getattr(node, top.kind) is not top.obj:
                    continue
                head = f"{prefix}/" if top.kind == "project" and prefix else ""
                project = path_of(head + clean_label(node.project.group), node.project.label, node.project.id)
                subject = path_of(project, node.subject.label, node.subject.id)
                session = path_of(subject, node.session.label, node.session.id)
                path = path_of(session, node.acquisition.label, node.obj.id)
                for f in node.obj.files:
                    if filters and not any(_passes(flt, f.type) for flt in filters if isinstance(flt, dict)):
                        continue
                    if (node.obj.id, f.name) in self.missing_content:
                        targets.append((f"{path}/{f.name}.MISSING", None))
                    else:
                        targets.append((f"{path}/{f.name}", f))
                        size += f.size
        if not targets:
            raise ApiError(404, "No requested containers could be found")
        ticket = hashlib.sha1(os.urandom(16)).hexdigest()
        filename = f"{prefix or 'scitran'}_{datetime.now(timezone.utc):%Y%m%d_%H%M%S}.tar"
        with self._lock:
            self._tickets[ticket] = targets
        return _json({"ticket": ticket, "file_cnt": len(targets), "size": size, "filename": filename})

    def _download_tar(self, ticket: str):
        """``GET download?ticket=T``: the ticket's files as one (uncompressed) tar."""
        with self._lock:
            targets = self._tickets.get(ticket)
        if targets is None:
            raise ApiError(404, "no such ticket")
        out = []
        for path, f in targets:
            info = tarfile.TarInfo(path)
            info.size = f.size if f is not None else 0
            info.mtime = int((f.modified if f is not None else FIXED_TIME).timestamp())
            info.mode = 0o644
            out.append(info.tobuf(tarfile.PAX_FORMAT))
            if f is not None:
                out += [f.content, b"\0" * (-f.size % tarfile.BLOCKSIZE)]
        out.append(b"\0" * (2 * tarfile.BLOCKSIZE))
        data = b"".join(out)
        return 200, data + b"\0" * (-len(data) % tarfile.RECORDSIZE), "application/octet-stream"

    def _file_response(self, node: Node, name: str, query: dict):
        files = getattr(node.obj, "files", [])
        f = next((f for f in files if f.name == name), None)
        if f is None:
            raise ApiError(404, f"File {name} not found in {node.kind} {node.obj.id}")
        want_info = query.get("info", "").lower() in ("true", "1")
        if want_info or query.get("member"):
            try:
                members = f.zip_members()
            except zipfile.BadZipFile:
                raise ApiError(400, f"Cannot open {name} as a zip file") from None
            if want_info:
                return _json(
                    {
                        "comment": "",
                        "members": [
                            {"path": m.filename, "size": m.file_size, "timestamp": _iso(datetime(*m.date_time, tzinfo=timezone.utc))}
                            for m in members
                        ],
                    }
                )
            with zipfile.ZipFile(io.BytesIO(f.content)) as zf:
                try:
                    return 200, zf.read(query["member"]), "application/octet-stream"
                except KeyError:
                    raise ApiError(404, f"Member {query['member']} not found in {name}") from None
        # `version` is accepted but only the current version of a file is kept.
        return 200, f.content, "application/octet-stream"

    def _upload(self, body: bytes, ctype: str) -> list[dict]:
        """Store the files of a multipart/form-data upload in ``self.uploads``."""
        msg = email.message_from_bytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n")
        boundary = msg.get_param("boundary")
        if not ctype.startswith("multipart/") or not boundary:
            raise ApiError(400, "Expected a multipart/form-data upload")
        out = []
        for part in body.split(b"--" + boundary.encode())[1:]:
            if part.startswith(b"--"):
                break
            head, _, data = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
            headers = email.message_from_bytes(head + b"\r\n\r\n")
            filename = headers.get_param("filename", header="content-disposition")
            if filename is None:
                continue  # e.g. the "metadata" field
            data = data.removesuffix(b"\r\n")
            with self._lock:
                self.uploads.append((filename, data))
            now = _iso(datetime.now(timezone.utc))
            out.append(
                {
                    "name": filename,
                    "size": len(data),
                    "version": 1,
                    "type": "tabular data",
                    "mimetype": headers.get_content_type(),
                    "created": now,
                    "modified": now,
                    "hash": "v0-sha384-" + hashlib.sha384(data).hexdigest(),
                }
            )
        return out

    # -- JSON shapes ----------------------------------------------------------------------
    def _file_json(self, node: Node, f: FwFile) -> dict:
        fid = hashlib.sha1(f"{node.obj.id}/{f.name}".encode()).hexdigest()[:24]
        d = {
            "_id": fid,
            "file_id": fid,
            "name": f.name,
            "type": f.type,
            "mimetype": _MIMETYPES.get(f.type, "application/octet-stream"),
            "classification": {},
            "tags": [],
            "info": {},
            "info_exists": False,
            "origin": {"type": "user", "id": USER_ID},
            "created": _iso(FIXED_TIME),
            "modified": _iso(f.modified),
            "size": f.size,
            "version": f.version,
            "parent_ref": {"id": node.obj.id, "type": node.kind},
            "parents": self._parents(node, include_self=True),
        }
        if self.file_hashes:
            d["hash"] = f.hash
        if f.type == "dicom":
            d["modality"] = "MR"
        if f.is_zip:
            try:
                d["zip_member_count"] = sum(not m.is_dir() for m in f.zip_members())
            except zipfile.BadZipFile:
                pass
        return d

    @staticmethod
    def _parents(node: Node, include_self: bool = False) -> dict:
        """Ids of the containers above ``node`` (and of ``node`` itself if ``include_self``)."""
        levels = ["project", "subject", "session", "acquisition"]
        upto = levels.index(node.kind) + include_self
        return {"group": node.project.group, **{k: getattr(node, k).id for k in levels[:upto]}}

    def _container_json(self, node: Node) -> dict:
        obj = node.obj
        d = {
            "_id": obj.id,
            "label": obj.label,
            "parents": self._parents(node),
            "info": {},
            "tags": [],
            "notes": [],
            "permissions": [],
            "created": _iso(FIXED_TIME),
            "modified": _iso(FIXED_TIME),
            "files": [self._file_json(node, f) for f in getattr(obj, "files", [])],
        }
        if node.kind == "project":
            d.update(group=obj.group, description="")
        elif node.kind == "subject":
            d.update(project=node.project.id, code=obj.label)
        elif node.kind == "session":
            d.update(
                group=node.project.group,
                project=node.project.id,
                timestamp=_iso(FIXED_TIME),
                timezone="UTC",
                subject={"_id": node.subject.id, "label": node.subject.label, "code": node.subject.label, "project": node.project.id},
            )
        else:
            d.update(session=node.session.id, timestamp=_iso(FIXED_TIME), timezone="UTC")
        return d


def clean_label(label: str) -> str:
    """A container label as a path component of a bulk download (scitran core): only ASCII
    letters, digits, space, ``.``, ``_`` and ``-`` kept; ``untitled`` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9 ._-]", "", label) or "untitled"


def _passes(flt: dict, ftype: str | None) -> bool:
    """Whether a file of type ``ftype`` passes one download filter's ``types``
    (``{"+": [...], "-": [...]}``, or ``plus``/``minus`` as the SDK sends them)."""
    types = flt.get("types") or {}
    plus = {t.lower() for t in (types.get("+") or []) + (types.get("plus") or [])}
    minus = {t.lower() for t in (types.get("-") or []) + (types.get("minus") or [])}
    have = {ftype.lower()} if ftype else set()
    return not (minus & have) and (not plus or bool(plus & have))


def _json(obj) -> tuple[int, bytes, str]:
    return 200, json.dumps(obj).encode(), "application/json; charset=utf-8"


def _error(exc: ApiError) -> tuple[int, bytes, str]:
    """Flywheel's JSON error shape."""
    body = {"status_code": exc.status, "message": exc.message, "detail": exc.detail}
    return exc.status, json.dumps(body).encode(), "application/json; charset=utf-8"


def _json_body(body: bytes) -> dict:
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise ApiError(400, "Request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "Request body must be a JSON object")
    return data


def _page(items: list[dict], query: dict) -> list[dict]:
    """Flywheel-style paging: sorted by id, then ``after_id``, ``skip`` and ``limit``."""
    items = sorted(items, key=lambda d: d["_id"])
    try:
        if query.get("after_id"):
            items = [d for d in items if d["_id"] > query["after_id"]]
        items = items[int(query.get("skip") or 0) :]
        if query.get("limit"):
            items = items[: int(query["limit"])]
    except ValueError:
        raise ApiError(400, "Invalid paging parameters") from None
    return items


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so every response carries Content-Length
    server_version = "FlywheelTestServer/1.0"
    timeout = 60  # seconds an idle keep-alive connection is kept
    _record: dict | None = None  # this request, until it is in the server's log (_log_request)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)  # request line only, no headers

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        app: FlywheelTestServer = self.server.app
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")]  # per segment: names may hold %2F
        path = unquote(url.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        self._status = 0
        auth_ok = app._auth_ok(self.headers.get("Authorization"))
        self._fault = fault = app._faults.take(self.command, path)
        self._record = {"method": self.command, "path": path, "query": query, "auth_ok": auth_ok, "fault": fault.kind if fault else None}
        try:
            body = self._read_body()  # always read it, so a kept-alive connection stays in step
            app.link.wait()
            if fault and fault.delay:
                time.sleep(fault.delay)
            if fault and fault.kind == "drop":
                self.close_connection = True
                return
            if fault and fault.kind == "status":
                self._fault = None  # the error body itself is sent intact
                injected = ApiError(fault.status, f"Injected fault (HTTP {fault.status})", path)
                self._extra_headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                self._send(*_error(injected))
                return
            try:
                if parts[:2] != ["", "api"]:
                    raise ApiError(404, "The resource could not be found.", path)
                api_parts = parts[2:-1] if parts[-1] == "" else parts[2:]  # tolerate a trailing /
                response = app._route(self.command, api_parts, query, body, auth_ok, self.headers.get("Content-Type") or "")
            except ApiError as exc:
                response = _error(exc)
            except Exception:  # a server bug: answer 500 rather than hang the client
                log.exception("fwserver: error handling %s %s", self.command, path)
                response = _error(ApiError(500, "Internal server error"))
            self._send(*response)
        except OSError:  # the client went away
            self.close_connection = True
        finally:
            self._log_request()  # (no answer was sent: a dropped connection, the client gone)

    def _log_request(self) -> None:
        """Add this request to ``app.requests``, once: before its answer goes out, so that a
        client holding the answer finds the request in the log."""
        record, self._record = self._record, None
        if record is not None:
            app: FlywheelTestServer = self.server.app
            with app._lock:
                app.requests.append({**record, "status": self._status})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch

    def _send(self, status: int, data: bytes, ctype: str) -> None:
        fault = self._fault
        data = corrupted(data, fault)
        self._status = status
        self._log_request()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for name, value in getattr(self, "_extra_headers", {}).items():
            self.send_header(name, value)
        self._extra_headers = {}
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        write_body(self, data, fault, self.server.app.link)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clpipe.testing.fwserver",
        description="Serve a demo Flywheel project fw://lab/study on 127.0.0.1 until SIGTERM/SIGINT.",
    )
    parser.add_argument("--port", type=int, default=8123, help="port (0 = any free port)")
    parser.add_argument("--key", default="demo-key", help="the API key to accept")
    parser.add_argument("--subjects", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--acquisitions", type=int, default=2)
    parser.add_argument("--slices", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--url-file", help="write the `fw login` string here once listening")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="a fixed delay before every answer, in ms (a WAN's round trip)")
    parser.add_argument("--bandwidth-mbps", type=float, default=0.0, help="cap all answers together at this many megabits/s (0: no cap)")
    args = parser.parse_args(argv)
    if args.latency_ms < 0 or args.bandwidth_mbps < 0:
        parser.error("--latency-ms and --bandwidth-mbps must not be negative")
    if ":" in args.key or not args.key:
        parser.error("--key must be non-empty and contain no ':'")

    project = make_demo_project(
        subjects=args.subjects, sessions=args.sessions, acquisitions=args.acquisitions, slices=args.slices, seed=args.seed
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    srv = FlywheelTestServer(
        [project],
        api_keys={args.key},
        host="127.0.0.1",
        port=args.port,
        latency=args.latency_ms / 1000,
        bandwidth=args.bandwidth_mbps * 1e6 / 8,
    )
    srv.start()
    login = srv.login_key(args.key)
    try:
        print(f"Flywheel test server at {srv.base_url}/api serving fw://{project.group}/{project.label}")
        print(f"fw login {login}", flush=True)
        if args.url_file:
            tmp = f"{args.url_file}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(login + "\n")
            os.replace(tmp, args.url_file)  # atomic: readers never see a partial line
        while not stop.wait(0.5):
            pass
    finally:
        srv.stop()
        if args.url_file and os.path.exists(args.url_file):
            os.remove(args.url_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
