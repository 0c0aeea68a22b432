"""What every DICOM source shares: source URLs, query filters, series, and the layout.

A DICOM source (DICOMweb, DIMSE, a mounted folder) answers two questions:

* ``series(query)``: which series match the filters, as :class:`Series` items (study and
  series attributes plus the number of instances when the server says it), each series
  once (some servers answer once per instance);
* ``instances(series)``: a context manager yielding ``(sop_instance_uid, payload)`` for
  every instance of one series, where ``payload`` is the Part-10 file as ``bytes`` or the
  ``Path`` of a local file to copy.

:func:`entries` turns series into the engine's :class:`RemoteEntry` items: one entry per
series, kept in the manifest under its SeriesInstanceUID with the instance count as its
version, so a re-sync whose counts have not changed retrieves nothing. The engine writes
one file per SOPInstanceUID (``<uid>.dcm``), which also removes duplicates.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError
from ..layout import NameResolver, PlannedFolder, bids_label, check_template, portable_name, template_parts

SCHEMES = ("dicomweb+http", "dicomweb+https", "dimse", "file")
URL_FORMS = "dicomweb+http://host:port/path, dicomweb+https://host/path, dimse://CALLED_AET@host:port, file:///path/to/folder"

# Fields a DICOM layout template can use, and what they are made from.
DICOM_FIELDS = {
    "subject": "PatientID (else PatientName), as a BIDS label",
    "session": "StudyDate (YYYYMMDD), as a BIDS label",
    "study": "StudyDate and StudyTime, then StudyDescription",
    "series": "SeriesNumber (3 digits) and SeriesDescription",
    "modality": "Modality",
    "accession": "AccessionNumber",
    "study_uid": "StudyInstanceUID",
    "series_uid": "SeriesInstanceUID",
}
DEFAULT_TEMPLATE = "{subject}/{session}/{series}"
MISSING = "unknown"


@dataclass(frozen=True)
class SourceURL:
    scheme: str  # dicomweb | dimse | file
    text: str  # as the user wrote it
    base_url: str = ""  # dicomweb: the http(s) root of the DICOMweb service
    called_aet: str = ""  # dimse
    host: str = ""
    port: int = 0
    path: str = ""  # file

    def __str__(self) -> str:
        return self.text


#: the environment variables of a DICOMweb login: a Bearer token, or a user name and password
DICOMWEB_CREDENTIALS = ("CLPIPE_DICOMWEB_TOKEN", "CLPIPE_DICOMWEB_USER", "CLPIPE_DICOMWEB_PASSWORD")


AE_TITLE_MAX = 16  # characters in a DICOM AE title (PS3.5, VR AE)


def is_ae_title(text: str) -> bool:
    """An AE title clpipe can use (ours, the PACS's): 1-16 ASCII characters, no backslash,
    no leading or trailing spaces. The one check of every AE title (SourceURL, CallingAET,
    the DIMSE source); each caller words its own message."""
    return 0 < len(text) <= AE_TITLE_MAX and text.isascii() and "\\" not in text and text == text.strip()


def redact_url(text: str) -> str:
    """``text`` with the password of a ``user:password@`` in it replaced by ``***``, for
    every message that shows a URL. The user info ends at the host's last ``@`` (as
    ``urlsplit`` reads it), or at the last ``@`` at all when a ``/`` in the password hides it."""
    scheme, sep, rest = str(text).partition("://")
    if not sep or "@" not in rest:
        return str(text)
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    end = netloc.rfind("@") if "@" in netloc else rest.rfind("@")
    user, colon, _ = rest[:end].partition(":")
    return f"{scheme}://{user}:***{rest[end:]}" if colon else str(text)


def parse_source_url(value: str, where: str = "SourceURL") -> SourceURL:
    """Check a non-Flywheel SourceURL; ``ConfigError`` saying which form is expected (with
    the URL as :func:`redact_url` shows it: never a password)."""
    text = str(value).strip()
    shown = redact_url(text)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme not in SCHEMES:
        raise ConfigError(
            f"{where}: {shown!r} is not a source URL clpipe knows; use fw://group/project/ (clpipe dicom flywheel_sync) or {URL_FORMS}"
        )
    parts = urlsplit(text)
    if scheme.startswith("dicomweb"):
        if not parts.hostname:
            raise ConfigError(f"{where}: {shown!r} has no host; write it as dicomweb+http://host:port/dicom-web")
        try:
            _ = parts.port  # urlsplit checks the port only when asked
        except ValueError:
            raise ConfigError(f"{where}: {shown!r} has a port that is not a number") from None
        if parts.username or parts.password:
            raise ConfigError(
                f"{where}: put no user name or password in the URL (it would reach logs); "
                f"set {DICOMWEB_CREDENTIALS[1]} and {DICOMWEB_CREDENTIALS[2]}, or {DICOMWEB_CREDENTIALS[0]}"
            )
        base = f"{scheme.split('+', 1)[1]}://{parts.netloc}{parts.path.rstrip('/')}"
        return SourceURL("dicomweb", text, base_url=base)
    if scheme == "dimse":
        match = re.fullmatch(r"dimse://([^@/]+)@([^:/]+|\[[^\]]+\]):(\d+)/?", text, flags=re.IGNORECASE)
        if not match:
            raise ConfigError(
                f"{where}: {shown!r} is not a DIMSE address; write it as dimse://CALLED_AET@host:port, "
                "e.g. dimse://ORTHANC@pacs.example.org:4242"
            )
        aet, host, port = unquote(match.group(1)), match.group(2).strip("[]"), int(match.group(3))
        if not is_ae_title(aet):
            raise ConfigError(
                f"{where}: the called AE title {aet!r} must be 1-16 ASCII characters without a backslash or leading/trailing spaces"
            )
        if not 0 < port < 65536:
            raise ConfigError(f"{where}: port {port} is not a TCP port (1-65535)")
        return SourceURL("dimse", text, called_aet=aet, host=host, port=port)
    if parts.netloc not in ("", "localhost"):
        raise ConfigError(
            f"{where}: {shown!r}: a file:// URL names a folder on this machine, file:///path (three slashes); mount a network share first"
        )
    path = unquote(text[len("file://") :].removeprefix("localhost"))  # the whole rest: '#' and '?' are part of folder names
    if not path.startswith("/"):
        raise ConfigError(f"{where}: {shown!r} needs an absolute path: file:///path/to/folder")
    return SourceURL("file", text, path=path)


@dataclass(frozen=True)
class DicomQuery:
    """Which studies and series to sync. Patterns use DICOM wildcards (``*`` and ``?``)."""

    patient_id: str = ""
    patient_name: str = ""
    study_date: str = ""  # "YYYYMMDD", "YYYYMMDD-YYYYMMDD", "YYYYMMDD-" or "-YYYYMMDD"
    modality: str = ""
    series_description: str = ""
    accession_number: str = ""
    limit: int = 0  # at most this many studies (0: all)

    def date_bounds(self) -> tuple[str, str]:
        """(first, last) day, "" for an open end."""
        if not self.study_date:
            return "", ""
        first, sep, last = self.study_date.partition("-")
        return (first, last) if sep else (first, first)

    def study_matches(self, attrs: dict) -> bool:
        """The study-level filters, applied locally too: not every server applies them all."""
        first, last = self.date_bounds()
        date = str(attrs.get("StudyDate") or "")
        if (first or last) and not date:
            return False
        if first and date < first or last and date > last:
            return False
        return (
            _matches(self.patient_id, attrs.get("PatientID"))
            and _matches(self.patient_name, attrs.get("PatientName"))
            and _matches(self.accession_number, attrs.get("AccessionNumber"))
        )

    def series_matches(self, attrs: dict) -> bool:
        return _matches(self.modality, attrs.get("Modality")) and _matches(self.series_description, attrs.get("SeriesDescription"))


def _matches(pattern: str, value: object) -> bool:
    if not pattern:
        return True
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, str(value or ""), flags=re.IGNORECASE | re.DOTALL) is not None


def check_study_date(value: str, where: str) -> str:
    value = str(value or "").strip().replace("/", "").replace(" ", "")
    if value and not re.fullmatch(r"(\d{8})?-?(\d{8})?", value) or value == "-":
        raise ConfigError(f"{where}: {value!r} is not a date range; use YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD- or -YYYYMMDD")
    first, sep, last = value.partition("-")
    for day in (first, last):
        try:
            if day:
                datetime.strptime(day, "%Y%m%d")
        except ValueError:
            raise ConfigError(
                f"{where}: {value!r}: {day} is not a day of the calendar "
                f"(year {day[:4]}, month {day[4:6]}, day {day[6:]}); write dates as YYYYMMDD"
            ) from None
    if first and last and first > last:
        raise ConfigError(f"{where}: {value!r} ends before it starts")
    return value


@dataclass
class Series:
    """One series as the source lists it. ``attrs`` holds DICOM keywords -> str values
    (PatientID, PatientName, StudyInstanceUID, StudyDate, StudyTime, StudyDescription,
    AccessionNumber, SeriesInstanceUID, SeriesNumber, SeriesDescription, Modality)."""

    attrs: dict
    count: int | None = None  # instances in the series, when the server says
    ref: object = None  # whatever the source needs to retrieve it
    version: str = ""  # for sources that know more than a count (file://: a fingerprint)

    @property
    def uid(self) -> str:
        return str(self.attrs.get("SeriesInstanceUID") or "")


Payload = bytes | Path


class DicomSource(Protocol):
    def series(self, query: DicomQuery) -> Iterator[Series]: ...

    def instances(self, series: Series) -> AbstractContextManager[Iterator[tuple[str, Payload]]]: ...

    def close(self) -> None: ...


@dataclass
class SourceSettings:
    """Options for the non-Flywheel sources (SourceOptions keys and flags)."""

    calling_aet: str = "CLPIPE"
    retrieve: str = "get"  # dimse: get | move
    move_port: int = 0  # dimse C-MOVE: where our storage SCP listens
    tls_ca: str = ""  # dimse TLS / dicomweb https: CA bundle
    tls_cert: str = ""
    tls_key: str = ""
    jobs: int = 4
    timeout: float = 60.0
    extra: dict = field(default_factory=dict)


def cpus() -> int:
    """The CPUs this process may run on (its affinity: a batch job's share, not the node's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def open_source(url: SourceURL, settings: SourceSettings) -> DicomSource:
    """The source for a URL, found in the registry (:mod:`clpipe.sources.registry`); its
    module is imported only when used."""
    from .registry import source_class, url_scheme

    source: DicomSource = source_class(url_scheme(url.text))(url, settings)
    return source


def check_before_submit(url: SourceURL, settings: SourceSettings) -> None:
    """What can be checked on the submitting machine before a job is queued, without the
    network: a DICOMweb login in the environment and TLS files, the DIMSE settings and TLS
    files, a file:// folder that exists and can be listed (each source's ``check``
    classmethod). Raises the error the job would end with."""
    from .registry import source_class, url_scheme

    source_class(url_scheme(url.text)).check(url, settings)


# ----------------------------------------------------------------------------- layout


def check_dicom_template(template: str) -> list[str]:
    """The fields a DICOM layout template uses; ``ValueError`` naming what is wrong."""
    return check_template(template, DICOM_FIELDS, need_field=True)


def _text(attrs: dict, keyword: str) -> str:
    value = attrs.get(keyword)
    return str(value).strip() if value not in (None, "") else ""


def _values(attrs: dict) -> dict[str, str]:
    """Template values for one series as the attributes say them (a subject as its BIDS
    label, a session as its date); every missing attribute has a rule."""
    subject = _text(attrs, "PatientID") or _text(attrs, "PatientName")
    date = re.sub(r"\D", "", _text(attrs, "StudyDate"))[:8]
    time = re.sub(r"\D", "", _text(attrs, "StudyTime").split(".")[0])[:6]
    number = _text(attrs, "SeriesNumber")
    try:
        number = f"{int(float(number)):03d}"
    except ValueError:
        number = "NA"
    description = _text(attrs, "SeriesDescription") or _text(attrs, "Modality") or "series"
    study = "-".join(p for p in (date + (f"T{time}" if time else ""), _text(attrs, "StudyDescription")) if p)
    return {
        "subject": bids_label(subject, "subject") if subject else MISSING,
        "session": date or "nodate",
        "study": study or _text(attrs, "StudyInstanceUID") or MISSING,
        "series": f"{number}-{description}",
        "modality": _text(attrs, "Modality") or MISSING,
        "accession": _text(attrs, "AccessionNumber") or MISSING,
        "study_uid": _text(attrs, "StudyInstanceUID") or MISSING,
        "series_uid": _text(attrs, "SeriesInstanceUID") or MISSING,
    }


def labels(attrs: dict) -> dict[str, str]:
    """Template values for one series, each a portable name (clpipe/layout.py)."""
    return {k: portable_name(v) for k, v in _values(attrs).items()}


def _parts(template: str, attrs: dict) -> list[tuple[str, str]]:
    """The folders the template makes for one series: (the part with the attributes as
    they are, its portable name)."""
    values = _values(attrs)
    return template_parts(template, values, {k: portable_name(v) for k, v in values.items()})


def series_folder(template: str, attrs: dict) -> str:
    """The folder of one series (before it is told apart from another series' that has
    the same name: :func:`entries`)."""
    return "/".join(name for _, name in _parts(template, attrs))


def entries(source: DicomSource, query: DicomQuery, template: str = DEFAULT_TEMPLATE) -> Iterator:
    """One engine entry per series (each series once), with its folder from the template,
    every part a portable name. Series whose folders come out the same are told apart as
    any remote items are (clpipe/layout.py :class:`NameResolver`): the series whose folder
    name needed no change, else the one with the smallest SeriesInstanceUID, keeps it; the
    others get ``~`` and hex digits from their UID. Every series is listed before the first
    is yielded, so that does not depend on the order the source lists them in.

    The entries come largest series first (by the instance count the source gave; series
    of equal count in listing order): the engine retrieves ``jobs`` series at a time, and
    a large series started last would leave the others' associations idle while it alone
    runs on (measured on the DIMSE benchmark: 0.58 s instead of 0.63 s for 2,209
    instances). The order changes nothing but the time: every series is retrieved."""
    from .base import RemoteEntry, session_of

    check_dicom_template(template)
    pieces = [piece for piece in template.split("/") if piece][:-1]  # the series' own folder holds no session
    depths = (
        next((i for i, piece in enumerate(pieces) if "{subject}" in piece), -1),
        next((i for i, piece in enumerate(pieces) if "{session}" in piece), -1),
    )
    known_sessions: dict = {}  # one Session per session folder
    resolver = NameResolver()
    planned: list[tuple[Series, PlannedFolder, str]] = []
    seen: set[str] = set()
    for series in source.series(query):
        uid = series.uid
        if not uid or uid in seen:  # each series once (some servers answer once per instance)
            continue
        seen.add(uid)
        key = f"series/{uid}"
        parts = _parts(template, series.attrs)
        (raw, name), folder = parts[-1], resolver.folder(parts[:-1])
        resolver.add(folder, key, name, name == raw, is_folder=True)
        planned.append((series, folder, key))
    resolver.resolve()
    found = []
    for series, folder, key in planned:
        path, renamed = resolver.path(folder, key)
        count = series.count if series.count is not None and series.count >= 0 else None
        values = _values(series.attrs)
        subject = _text(series.attrs, "PatientID") or _text(series.attrs, "PatientName")
        session = session_of(path, depths, subject, values["study"], known_sessions)
        found.append(
            RemoteEntry(
                key=key,
                path=path,
                size=0,  # bytes are not known before retrieval
                modified=0.0,
                checksum=None,
                unpack=True,
                ref=series,
                count=count or 0,
                version=series.version or (f"n={count}" if count is not None else ""),
                series=True,
                renamed=renamed,
                session=session,
                subject=subject,
            )
        )
    found.sort(key=lambda entry: -entry.count)  # stable: equal counts keep the listing's order
    yield from found
