"""The DICOMweb source: QIDO-RS to list series, WADO-RS to retrieve a whole series at once.

Listing is two kinds of request: ``GET {base}/studies`` with the study-level filters (paged
with ``limit``/``offset``), then ``GET {base}/studies/{uid}/series`` per study. The instance
count comes from NumberOfSeriesRelatedInstances, or, when a server does not return it, from
counting ``GET .../series/{uid}/instances``. No instance is retrieved while listing.

Retrieval is ONE request per series, ``Accept: multipart/related; type="application/dicom";
transfer-syntax=*``: the ``*`` asks for every instance as the server stores it (without it,
DICOMweb servers transcode to Explicit VR Little Endian: compressed pixel data would be
decompressed). The multipart body is parsed as it streams in, so only one instance is in
memory at a time; each part's SOPInstanceUID comes from its file meta (pydicom reads the
data set only for a part without one).

Filters go to the server widened to characters every server reads alike (some, e.g. Orthanc
1.10, do not percent-decode query strings, so ``SUB%2003`` would match nothing): a character
that needs percent-encoding becomes the ``?`` wildcard, a run of non-ASCII characters ``*``.
The server thus answers a superset, and :class:`DicomQuery`'s exact filters are applied here.

Credentials come from the environment only: ``CLPIPE_DICOMWEB_TOKEN`` (Bearer) or
``CLPIPE_DICOMWEB_USER`` + ``CLPIPE_DICOMWEB_PASSWORD`` (Basic). They never appear in a
message or a log line.
"""

from __future__ import annotations

import os
import re
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from io import BytesIO
from urllib.parse import quote

import httpx

from ..errors import ConfigError, PermanentError, PreflightError, TransientError
from .dicom import DICOMWEB_CREDENTIALS, DicomQuery, Series, SourceSettings, SourceURL
from .http import retry_after as _retry_after
from .part10 import meta_sop_instance_uid
from .tls import TLSFileError, load_context

TOKEN_VAR, USER_VAR, PASSWORD_VAR = DICOMWEB_CREDENTIALS
CREDENTIAL_HINT = f"check {TOKEN_VAR}, or {USER_VAR} and {PASSWORD_VAR}"
ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_DEFAULT = 'multipart/related; type="application/dicom"'  # the server's choice (usually Explicit VR LE)
PAGE = 500  # QIDO results asked for per request
LISTING_ATTEMPTS = 4  # a listing request that meets a 429/5xx/timeout is tried this often
RETRY_AFTER_CAP = 60.0

STUDY_KEYWORDS = ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyTime", "StudyDescription", "AccessionNumber")
SERIES_KEYWORDS = ("SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality", "NumberOfSeriesRelatedInstances")
# characters a query value may carry as they are: every server reads these the same way
_PLAIN = re.compile(r"[A-Za-z0-9\-._~*?/:@]")


@cache
def _tag(keyword: str) -> str:
    """The DICOM JSON key ("0020000D") of a keyword."""
    from pydicom.datadict import tag_for_keyword

    return f"{tag_for_keyword(keyword):08X}"


# ----------------------------------------------------------------------------- DICOM JSON


def json_value(element: object) -> str:
    """One attribute of the DICOM JSON model as text: a person name's alphabetic form,
    several values joined with a backslash (as DICOM itself writes them), "" when empty."""
    if not isinstance(element, dict):
        return ""
    values = element.get("Value") or []
    texts = []
    for value in values:
        if isinstance(value, dict):  # PN: {"Alphabetic": ..., "Ideographic": ..., "Phonetic": ...}
            value = value.get("Alphabetic") or value.get("Ideographic") or value.get("Phonetic") or ""
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        texts.append("" if value is None else str(value))
    return "\\".join(texts)


def json_attrs(item: dict, keywords: Iterable[str]) -> dict[str, str]:
    return {keyword: json_value(item.get(_tag(keyword))) for keyword in keywords}


def widen(pattern: str) -> str:
    """A DICOM wildcard pattern that matches at least what ``pattern`` matches and is made
    only of characters no server percent-decodes differently (see the module docstring)."""
    out: list[str] = []
    for char in pattern:
        if _PLAIN.fullmatch(char):
            out.append(char)
        elif not char.isascii():
            if out[-1:] != ["*"]:
                out.append("*")
        else:
            out.append("?")
    return "".join(out)


def _query_string(params: list[tuple[str, str]]) -> bytes:
    """The query string as sent: values are already plain (see :func:`widen`), so they go
    unencoded; httpx would percent-encode ``*`` and ``?``, which some servers do not decode."""
    return "&".join(f"{key}={value}" for key, value in params).encode("ascii")


# ----------------------------------------------------------------------------- multipart


def content_type_params(value: str) -> tuple[str, dict[str, str]]:
    """``multipart/related; type="application/dicom"; boundary=abc`` -> media type and
    parameters (names lower-cased; quoted values unquoted, ``;`` inside quotes kept)."""
    media_type, _, rest = value.partition(";")
    params = {}
    for name, quoted, plain in re.findall(r'\s*([^=;\s]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]*))\s*;?', rest):
        params[name.lower()] = re.sub(r"\\(.)", r"\1", quoted) if quoted else plain.strip()
    return media_type.strip().lower(), params


class _Stream:
    """A growing buffer over an iterator of chunks, to search for delimiters without
    scanning any byte twice."""

    def __init__(self, chunks: Iterable[bytes], start: bytes = b""):
        self.buf = bytearray(start)
        self._chunks = iter(chunks)

    def _more(self) -> bool:
        for chunk in self._chunks:
            if chunk:
                self.buf += chunk
                return True
        return False

    def find(self, needle: bytes) -> int:
        scan = 0
        while True:
            found = self.buf.find(needle, scan)
            if found >= 0:
                return found
            scan = max(0, len(self.buf) - len(needle) + 1)
            if not self._more():
                return -1

    def fill(self, size: int) -> bool:
        while len(self.buf) < size:
            if not self._more():
                return False
        return True

    def take(self, size: int) -> bytes:
        with memoryview(self.buf) as view:
            data = bytes(view[:size])
        del self.buf[:size]  # CPython moves the start of a bytearray: no copy of the rest
        return data

    def skip(self, size: int) -> None:
        del self.buf[:size]


def _truncated(why: str) -> TransientError:
    return TransientError(f"the server's multipart answer broke off ({why})")


def read_multipart(chunks: Iterable[bytes], boundary: str | bytes) -> Iterator[tuple[dict[str, str], bytes]]:
    """Yield ``(headers, body)`` for each part of a multipart body (RFC 2046) as it streams
    in; only the part being read is held. A body that ends before the close delimiter
    (``--boundary--``) raises :class:`TransientError`: the connection broke off."""
    if isinstance(boundary, str):
        boundary = boundary.encode("latin-1")
    delimiter = b"\r\n--" + boundary
    stream = _Stream(chunks, b"\r\n")  # so a boundary at the very start is found like the others
    at = stream.find(delimiter)
    if at < 0:
        raise _truncated("no boundary line")
    stream.skip(at + len(delimiter))
    while True:
        if not stream.fill(2):
            raise _truncated("after a boundary")
        if stream.buf[:2] == b"--":
            return  # the close delimiter; an epilogue after it means nothing
        eol = stream.find(b"\r\n")  # the rest of the boundary line (transport padding)
        if eol < 0:
            raise _truncated("in a boundary line")
        stream.skip(eol + 2)
        headers: dict[str, str] = {}
        if not stream.fill(2):
            raise _truncated("before a part's headers")
        if stream.buf[:2] == b"\r\n":
            stream.skip(2)
        else:
            end = stream.find(b"\r\n\r\n")
            if end < 0:
                raise _truncated("in a part's headers")
            for line in bytes(stream.buf[:end]).decode("latin-1").split("\r\n"):
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            stream.skip(end + 4)
        end = stream.find(delimiter)
        if end < 0:
            raise _truncated("in the middle of an instance")
        body = stream.take(end)
        stream.skip(len(delimiter))
        yield headers, body


def sop_instance_uid(part: bytes) -> str:
    """The SOPInstanceUID of a Part-10 file: from its file meta, else (no meta, or no UID in
    it) from the data set, reading it with pydicom up to the pixel data."""
    uid = meta_sop_instance_uid(part)
    if uid:
        return uid
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(BytesIO(part), stop_before_pixels=True, force=True, specific_tags=[pydicom.tag.Tag("SOPInstanceUID")])
        uid = ds.get("SOPInstanceUID")
    except (InvalidDicomError, ValueError, KeyError, EOFError, OSError, AttributeError, TypeError) as exc:
        raise TransientError(f"a part of the server's answer is not a DICOM file ({exc.__class__.__name__})") from None
    uid = str(uid or "").strip().rstrip("\0")
    if not uid:
        raise TransientError("a part of the server's answer is a DICOM file without SOPInstanceUID")
    return uid


# ----------------------------------------------------------------------------- HTTP helpers


def retry_after(response: httpx.Response) -> float | None:
    """The server's Retry-After in seconds, capped at RETRY_AFTER_CAP."""
    return _retry_after(response, RETRY_AFTER_CAP)


def _reason(response: httpx.Response) -> str:
    """A short excerpt of an error answer (never the request: it may carry credentials)."""
    try:
        text = response.text
    except (httpx.HTTPError, UnicodeDecodeError):
        return ""
    text = " ".join(text.split())[:160]
    return f": {text}" if text else ""


def _credentials() -> tuple[dict[str, str], httpx.Auth | None, str]:
    """Headers, auth and a description of the credentials from the environment."""
    token = os.environ.get(TOKEN_VAR, "").strip()
    user = os.environ.get(USER_VAR, "")
    password = os.environ.get(PASSWORD_VAR, "")
    if token and (user or password):
        raise ConfigError(f"set either {TOKEN_VAR} (a Bearer token) or {USER_VAR} and {PASSWORD_VAR}, not both")
    if token:
        return {"Authorization": f"Bearer {token}"}, None, f"the token in {TOKEN_VAR}"
    if user or password:
        if not (user and password):
            missing = PASSWORD_VAR if user else USER_VAR
            raise ConfigError(f"{USER_VAR} and {PASSWORD_VAR} go together: {missing} is not set")
        return {}, httpx.BasicAuth(user, password), f"the user name and password in {USER_VAR}/{PASSWORD_VAR}"
    return {}, None, "no credentials"


def _tls(url: SourceURL, settings: SourceSettings) -> ssl.SSLContext | bool:
    if not url.base_url.startswith("https:") or not (settings.tls_ca or settings.tls_cert):
        return True
    try:
        return load_context(settings.tls_ca, settings.tls_cert, settings.tls_key)
    except TLSFileError as exc:
        raise ConfigError(exc.message(settings.tls_ca or "", settings.tls_cert or "", settings.tls_key or "")) from None


# ----------------------------------------------------------------------------- the source


class DicomWebSource:
    """A DICOMweb service (QIDO-RS and WADO-RS) as a DICOM source."""

    def __init__(self, url: SourceURL, settings: SourceSettings, transport: httpx.BaseTransport | None = None):
        self.url, self.base = url, url.base_url.rstrip("/")
        headers, auth, self._who = _credentials()
        # for the log: which credentials, never their value
        self.login = "credentials: none set" if self._who == "no credentials" else f"credentials: {self._who}"
        jobs = max(1, settings.jobs)
        self._client = httpx.Client(
            headers={**headers, "User-Agent": "clpipe"},
            auth=auth,
            timeout=httpx.Timeout(settings.timeout, connect=min(settings.timeout, 15.0)),
            limits=httpx.Limits(max_connections=jobs + 2, max_keepalive_connections=jobs + 2),
            verify=_tls(url, settings),
            transport=transport,
        )
        self._accept = ACCEPT_AS_STORED
        self._lock = threading.Lock()
        self.notes: list[str] = []  # what a user should know about this server (e.g. transcoding)

    @classmethod
    def check(cls, url: SourceURL, settings: SourceSettings) -> None:
        """Before a job is queued, without the network: the login in the environment and
        the TLS files."""
        _credentials()
        _tls(url, settings)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> DicomWebSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:  # no credentials, ever
        return f"DicomWebSource({self.base!r})"

    # -- listing (QIDO-RS) ---------------------------------------------------------------

    def _get_json(self, path: str, params: list[tuple[str, str]]) -> tuple[list, bool]:
        """One QIDO-RS request: (results, whether the server says there are more). Retries
        429/5xx/timeouts a few times; anything else that stops the listing is a
        :class:`PreflightError` saying what to check."""
        url = httpx.URL(self.base + path, query=_query_string(params))
        where = f"the DICOMweb server at {self.base}"
        for attempt in range(1, LISTING_ATTEMPTS + 1):
            wait = min(2.0 ** (attempt - 1), 30.0)
            try:
                response = self._client.get(url, headers={"Accept": "application/dicom+json, application/json"})
            except httpx.ConnectError as exc:
                if _untrusted(exc):
                    raise PreflightError(
                        f"cannot connect to {where}: its TLS certificate is not trusted here "
                        f"({_connect_reason(exc)}); set TLSCAFile (or --ca-certs in CommandLineOpts) "
                        "to the PEM file of the CA that signed it"
                    ) from None
                raise PreflightError(
                    f"cannot connect to {where} ({_connect_reason(exc)}); check the SourceURL "
                    f"{self.url} and that the server is running and reachable from this node"
                ) from None
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                problem = f"{exc.__class__.__name__}"
            else:
                status = response.status_code
                if status in (200, 206):
                    try:
                        data = response.json() if response.content.strip() else []
                    except ValueError:
                        raise PreflightError(
                            f"{where} answered {path} with something that is not DICOM JSON "
                            f"({response.headers.get('content-type', 'no content type')}); "
                            "check the SourceURL's path (e.g. /dicom-web)"
                        ) from None
                    if not isinstance(data, list):
                        raise PreflightError(
                            f"{where} answered {path} with JSON that is not a list of results; check the SourceURL's path (e.g. /dicom-web)"
                        )
                    more = "warning" in response.headers and bool(data)  # e.g. '299 ...: additional results'
                    return data, more
                if status == 204:
                    return [], False
                if status in (401, 403):
                    raise PreflightError(f"{where} refused access (HTTP {status}) with {self._who}; {CREDENTIAL_HINT}")
                if status == 429 or status >= 500:
                    problem = f"HTTP {status}{_reason(response)}"
                    asked = retry_after(response)
                    wait = wait if asked is None else asked
                elif status == 404 and path == "/studies":
                    raise PreflightError(
                        f"{where} has no QIDO-RS service at {self.base}/studies (HTTP 404); "
                        "check the SourceURL's path (e.g. dicomweb+http://host:8042/dicom-web)"
                    )
                elif status == 404:
                    return [], False  # a study deleted while listing: nothing to list there
                else:
                    raise PreflightError(f"{where} rejected the query {path} (HTTP {status}{_reason(response)})")
            if attempt < LISTING_ATTEMPTS:
                time.sleep(wait)
        raise PreflightError(f"{where} did not answer the query {path} after {LISTING_ATTEMPTS} attempts ({problem}); try again later")

    def _results(self, path: str, params: list[tuple[str, str]], key: str, page: int = PAGE, exhaustive: bool = True) -> Iterator[dict]:
        """Every result of a query, each once (by ``key``, a DICOM JSON tag), asked for in
        pages. ``exhaustive``: keep asking until a page comes back empty (a server may cap
        its answers without saying so); else stop at a page shorter than asked for,
        unless the server warned that there is more."""
        seen: set[str] = set()
        offset = 0
        while True:
            results, more = self._get_json(path, params + [("limit", str(page)), ("offset", str(offset))])
            new = 0
            for item in results:
                uid = json_value(item.get(key)) if isinstance(item, dict) else ""
                if uid and uid not in seen:
                    seen.add(uid)
                    new += 1
                    yield item
            offset += len(results)
            if not results or not new:  # the end, or a server that ignores offset
                return
            if not exhaustive and len(results) < page and not more:
                return

    def _studies(self, query: DicomQuery) -> Iterator[dict[str, str]]:
        params = [
            (keyword, widen(value))
            for keyword, value in (
                ("PatientID", query.patient_id),
                ("PatientName", query.patient_name),
                ("AccessionNumber", query.accession_number),
                ("ModalitiesInStudy", query.modality),
            )
            if value
        ]
        if query.study_date:
            params.append(("StudyDate", query.study_date))  # YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD-, -YYYYMMDD
        params += [("includefield", _tag(k)) for k in STUDY_KEYWORDS]
        page = min(PAGE, query.limit) if query.limit > 0 else PAGE
        for item in self._results("/studies", params, _tag("StudyInstanceUID"), page=page):
            attrs = json_attrs(item, STUDY_KEYWORDS)
            if query.study_matches(attrs):
                yield attrs

    def _series_in(self, study: dict[str, str], query: DicomQuery) -> Iterator[Series]:
        params = [
            (keyword, widen(value))
            for keyword, value in (("Modality", query.modality), ("SeriesDescription", query.series_description))
            if value
        ]
        params += [("includefield", _tag(k)) for k in SERIES_KEYWORDS]
        path = f"/studies/{quote(study['StudyInstanceUID'], safe='')}/series"
        for item in self._results(path, params, _tag("SeriesInstanceUID"), exhaustive=False):
            attrs = {**study, **json_attrs(item, SERIES_KEYWORDS)}
            count_text = attrs.pop("NumberOfSeriesRelatedInstances")
            if not attrs["SeriesInstanceUID"] or not query.series_matches(attrs):
                continue
            try:
                count = int(float(count_text))
            except ValueError:
                count = self._count_instances(attrs)
            yield Series(attrs=attrs, count=count, ref=(attrs["StudyInstanceUID"], attrs["SeriesInstanceUID"]))

    def _count_instances(self, attrs: dict[str, str]) -> int:
        """For a server that does not say NumberOfSeriesRelatedInstances: count them."""
        path = f"/studies/{quote(attrs['StudyInstanceUID'], safe='')}/series/{quote(attrs['SeriesInstanceUID'], safe='')}/instances"
        key = _tag("SOPInstanceUID")
        return sum(1 for _ in self._results(path, [("includefield", key)], key))

    def series(self, query: DicomQuery) -> Iterator[Series]:
        """Every series that matches ``query``, each once, with its instance count.
        ``query.limit`` counts studies that have at least one matching series."""
        studies = 0
        seen: set[str] = set()
        for study in self._studies(query):
            if not study["StudyInstanceUID"]:
                continue
            found = False
            for series in self._series_in(study, query):
                if series.uid in seen:
                    continue
                seen.add(series.uid)
                found = True
                yield series
            studies += found
            if query.limit and studies >= query.limit:
                return

    # -- retrieval (WADO-RS) -------------------------------------------------------------

    def _check_retrieve(self, response: httpx.Response, what: str) -> None:
        """Raise what the engine needs for an answer that is not a series' instances."""
        status = response.status_code
        if status in (200, 206):
            return
        response.read()
        message = f"{what}: the DICOMweb server at {self.base} answered HTTP {status}"
        if status == 429 or status >= 500:
            raise TransientError(message + _reason(response), retry_after(response))
        if status in (401, 403):
            raise PermanentError(f"{message} (access refused with {self._who}); {CREDENTIAL_HINT}")
        if status in (404, 410):
            raise PermanentError(f"{message}: series gone (deleted from the server since it was listed?)")
        if status == 204:
            raise PermanentError(f"{message}: the server has no instances for this series")
        raise PermanentError(message + _reason(response))

    @contextmanager
    def _retrieve(self, url: str, what: str) -> Iterator[httpx.Response]:
        """The series' WADO-RS answer, checked; falls back once to the server's default
        transfer syntax when it refuses ``transfer-syntax=*`` (HTTP 406)."""
        with self._client.stream("GET", url, headers={"Accept": self._accept}) as response:
            if response.status_code != 406 or self._accept == ACCEPT_DEFAULT:
                self._check_retrieve(response, what)
                yield response
                return
        with self._lock:
            if self._accept != ACCEPT_DEFAULT:
                self._accept = ACCEPT_DEFAULT
                self.notes.append(
                    f"the DICOMweb server at {self.base} refused to send instances as stored "
                    "(transfer-syntax=*, HTTP 406): they arrive in its default transfer syntax"
                )
        with self._client.stream("GET", url, headers={"Accept": ACCEPT_DEFAULT}) as response:
            self._check_retrieve(response, what)
            yield response

    @contextmanager
    def instances(self, entry) -> Iterator[Iterator[tuple[str, bytes]]]:
        """Every instance of one series, as stored on the server, from ONE WADO-RS request:
        ``(SOPInstanceUID, Part-10 bytes)`` as the multipart answer streams in. ``entry`` is
        a :class:`Series` or the engine's entry whose ``ref`` is one."""
        series = entry if isinstance(entry, Series) else entry.ref
        study_uid, series_uid = series.attrs["StudyInstanceUID"], series.attrs["SeriesInstanceUID"]
        url = f"{self.base}/studies/{quote(study_uid, safe='')}/series/{quote(series_uid, safe='')}"
        what = f"series {series_uid}"
        try:
            with self._retrieve(url, what) as response:
                yield self._parts(response, what)
        except httpx.TimeoutException as exc:
            raise TransientError(f"{what}: the DICOMweb server at {self.base} did not answer in time ({exc.__class__.__name__})") from None
        except httpx.ConnectError as exc:
            raise TransientError(f"{what}: cannot connect to the DICOMweb server at {self.base} ({_connect_reason(exc)})") from None
        except httpx.TransportError as exc:
            raise TransientError(f"{what}: the connection to the DICOMweb server at {self.base} broke ({exc.__class__.__name__})") from None

    def _parts(self, response: httpx.Response, what: str) -> Iterator[tuple[str, bytes]]:
        media_type, params = content_type_params(response.headers.get("content-type", ""))
        if media_type == "application/dicom":  # one instance, not wrapped (some servers do)
            body = response.read()
            yield sop_instance_uid(body), body
            return
        if not media_type.startswith("multipart/"):
            raise PermanentError(
                f"{what}: the DICOMweb server at {self.base} answered {media_type or 'without a content type'}, "
                "not multipart/related DICOM; check the SourceURL's path (e.g. /dicom-web)"
            )
        if not params.get("boundary"):
            raise PermanentError(f"{what}: the DICOMweb server at {self.base} sent a multipart answer without a boundary")
        for _headers, body in read_multipart(response.iter_bytes(), params["boundary"]):
            yield sop_instance_uid(body), body


def _untrusted(exc: Exception) -> bool:
    return "certificate_verify_failed" in str(exc).lower() or "certificate verify failed" in str(exc).lower()


def _connect_reason(exc: Exception) -> str:
    text = str(exc).lower()
    if _untrusted(exc):
        detail = str(exc).split("certificate verify failed:", 1)[-1].split("(_ssl", 1)[0].strip()
        return f"certificate verify failed: {detail}" if detail else "certificate verify failed"
    if "refused" in text:
        return "connection refused"
    if "name or service not known" in text or "nodename" in text or "getaddrinfo" in text:
        return "unknown host name"
    return exc.__class__.__name__
