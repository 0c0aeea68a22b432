"""Flywheel as a source: the ``fw://`` URL, the saved login, and the few API calls clpipe
makes itself (login check, project lookup, the bulk file listing).

The API key is read from the file ``fw login`` writes and only ever travels in the
``Authorization`` header; it never reaches a command line, a log or a report.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from ..errors import PreflightError
from .http import LazyModule
from .http import retry_after as _retry_after

if TYPE_CHECKING:
    import httpx
else:
    httpx = LazyModule("httpx")  # imported at the first request, not with the config's validation

LISTING_ATTEMPTS = 3  # the one listing request: tries before a transient fault ends the run
URL_EXPECTED = "expected fw://<group>/<project> or fw://<group>/<project>/ (`fw ls` lists your projects)"
LOGIN_HINT = "run `fw login <SITE>:<API KEY>` (the key is on your Flywheel profile page)"


@dataclass(frozen=True)
class FlywheelURL:
    """A Flywheel project address: ``fw://group/project`` with or without trailing slash.

    With the slash (rsync style) ``fw sync`` puts ``SUBJECTS/...`` straight into the
    dropoff; without it, inside a folder named after the project.
    """

    group: str
    project: str
    trailing_slash: bool

    def __str__(self) -> str:
        return f"fw://{self.group}/{self.project}" + ("/" if self.trailing_slash else "")


def parse_fw_url(value: str) -> FlywheelURL:
    """Parse and validate a SourceURL; raise ``ValueError`` saying what is expected."""
    if not isinstance(value, str) or not value.startswith("fw://"):
        raise ValueError(URL_EXPECTED)
    rest = value[len("fw://") :]
    trailing = rest.endswith("/")
    parts = rest.rstrip("/").split("/") if rest.strip("/") else []
    if len(parts) < 2 or any(not p.strip() for p in parts):
        raise ValueError(f"it does not name a project; {URL_EXPECTED}")
    if len(parts) > 2:
        raise ValueError(f"it points below a project ({'/'.join(parts[2:])}); fw sync takes a whole project; {URL_EXPECTED}")
    group, project = parts
    if not re.fullmatch(r"[0-9a-z][0-9a-z._-]*", group):
        raise ValueError(f"group id {group!r} is not a Flywheel group id (lowercase letters, digits, . _ -); {URL_EXPECTED}")
    return FlywheelURL(group, project, trailing)


# ---------------------------------------------------------------------------------------
# Credentials: the file `fw login` writes, read the way the SDK reads it.


def user_config_path() -> Path:
    """Where ``fw login`` stores the key: ``$FLYWHEEL_USER_HOME`` (default ``~``)."""
    home = os.environ.get("FLYWHEEL_USER_HOME") or os.path.expanduser("~")
    return Path(home) / ".config" / "flywheel" / "user.json"


@dataclass(frozen=True)
class Credentials:
    api_url: str  # e.g. https://lab.flywheel.io:443/api
    key: str  # the secret part sent in the Authorization header

    def __repr__(self) -> str:  # never show the key, even in a traceback
        return f"Credentials(api_url={self.api_url!r}, key=<hidden>)"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"scitran-user {self.key}"}


def credentials_from_api_key(api_key: str, where: str | None = None) -> Credentials:
    """Split a ``fw login`` key into API URL and secret, as the Flywheel SDK does.

    ``host:key`` -> https://host:443/api; ``host:port:key`` -> https://host:port/api; a part
    equal to ``__force_insecure`` switches to plain http.
    """
    parts = api_key.split(":")
    if len(parts) < 2 or not parts[-1]:
        raise PreflightError(f"the Flywheel API key in {where or user_config_path()} is not of the form <site>:<key>; {LOGIN_HINT}")
    insecure = "__force_insecure" in parts
    parts = [p for p in parts if p != "__force_insecure"]
    key = parts[-1]
    host = parts[0]
    port = parts[1] if len(parts) > 2 else "443"
    if not host or not port.isdigit():
        raise PreflightError(f"the Flywheel API key in {where or user_config_path()} does not name a site; {LOGIN_HINT}")
    scheme = "http" if insecure else "https"
    return Credentials(api_url=f"{scheme}://{host}:{port}/api", key=key)


API_KEY_ENV = "FLYWHEEL_API_KEY"


def load_credentials() -> Credentials:
    """The API key from ``$FLYWHEEL_API_KEY`` (same ``<site>:<key>`` form as ``fw login``
    takes) or else the one ``fw login`` saved; a clear error when there is none."""
    from_env = os.environ.get(API_KEY_ENV, "").strip()
    if from_env:
        return credentials_from_api_key(from_env, f"${API_KEY_ENV}")
    path = user_config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PreflightError(f"not logged in to Flywheel (no {path}); {LOGIN_HINT}") from None
    except (OSError, ValueError) as exc:
        raise PreflightError(f"cannot read the Flywheel login in {path} ({exc.__class__.__name__}); {LOGIN_HINT}") from None
    key = data.get("key") if isinstance(data, dict) else None
    if not key or not isinstance(key, str):
        raise PreflightError(f"not logged in to Flywheel ({path} holds no key); {LOGIN_HINT}")
    return credentials_from_api_key(key)


# ---------------------------------------------------------------------------------------
# API calls


class FlywheelAPI:
    """The handful of Flywheel API requests clpipe makes itself, with clear errors."""

    def __init__(self, credentials: Credentials, timeout: float = 30.0, client: httpx.Client | None = None):
        self.credentials = credentials
        self._client = client or httpx.Client(
            base_url=credentials.api_url,
            headers=credentials.headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=False,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> FlywheelAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, attempts: int = LISTING_ATTEMPTS, **kwargs: Any) -> httpx.Response:
        """One request of the run's start (the login check, the project's lookup; both only
        read): a connection dropped, refused or timed out is tried again, ``attempts`` times
        in all, 1, 2 ... s apart (a job starting while the site or its proxy blinks, or a
        requeued job meeting the connections its last allocation left), then one clear error."""
        site = self.credentials.api_url
        for attempt in range(1, attempts + 1):
            try:
                response = self._client.request(method, path, **kwargs)
                break
            except httpx.TransportError as exc:
                if attempt < attempts:
                    time.sleep(2 ** (attempt - 1))
                    continue
                if isinstance(exc, httpx.TimeoutException):
                    raise PreflightError(
                        f"Flywheel at {site} did not answer in time; check the site is up and reachable from this node"
                    ) from None
                raise PreflightError(
                    f"cannot reach Flywheel at {site} ({exc.__class__.__name__}: {exc}); check the network, "
                    f"or log in again with `fw login` if your site's address changed"
                ) from None
        if response.status_code == 401:
            raise PreflightError(
                f"Flywheel at {site} rejected the saved API key (expired or revoked); log in again with `fw login <SITE>:<NEW API KEY>`"
            )
        return response

    @staticmethod
    def _error_text(response: httpx.Response) -> str:
        try:
            body = response.json()
            return str(body.get("message") or body)
        except ValueError:
            return response.text[:200]

    def check_login(self) -> dict:
        """``GET auth/status``: proves the site is reachable and the key is accepted."""
        response = self._request("GET", "/auth/status")
        if response.status_code != 200:
            raise PreflightError(
                f"Flywheel at {self.credentials.api_url} answered the login check with HTTP "
                f"{response.status_code} ({self._error_text(response)}); try `fw status`, then `fw login` again"
            )
        return response.json()

    def lookup_project(self, url: FlywheelURL) -> dict:
        """``POST lookup``: the project's id, or a clear error when it does not exist."""
        response = self._request("POST", "/lookup", json={"path": [url.group, url.project]})
        if response.status_code in (403, 404):
            raise PreflightError(
                f"Flywheel project {url.group}/{url.project} was not found or you have no access to it; check SourceURL ({URL_EXPECTED})"
            )
        if response.status_code != 200:
            raise PreflightError(
                f"Flywheel lookup of {url.group}/{url.project} failed with HTTP {response.status_code} ({self._error_text(response)})"
            )
        body = response.json()
        if body.get("container_type") != "project":
            raise PreflightError(f"{url} is a {body.get('container_type')}, not a project; {URL_EXPECTED}")
        return body

    def download_targets(self, project_id: str, body_filters: dict, params: dict, attempts: int = LISTING_ATTEMPTS) -> Iterator[dict]:
        """``POST download/targets``: every file of the project in one NDJSON response.

        A transient fault before the first line (429, 5xx, a dropped or refused connection,
        a timeout) is tried again, ``attempts`` times in all, after the server's Retry-After
        or 1, 2, 4 ... s; a listing that breaks off after lines were used cannot be resumed
        (the run would act on half a listing), so that is an error at once."""
        payload = {"nodes": [{"level": "project", "_id": project_id}], **body_filters}
        query = {"type": "full", "prefix": "", **params}
        site = self.credentials.api_url
        for attempt in range(1, attempts + 1):
            last = attempt == attempts
            started = False
            wait: float | None = None
            try:
                with self._client.stream("POST", "/download/targets", params=query, json=payload) as response:
                    if response.status_code != 200:
                        response.read()
                        message = f"Flywheel listing of the project failed with HTTP {response.status_code} ({self._error_text(response)})"
                        transient = response.status_code == 429 or response.status_code >= 500
                        if not transient:
                            raise PreflightError(message)
                        if last:
                            raise PreflightError(f"{message}, {attempts} times; check the site's status, then run again")
                        wait = _retry_after(response)
                    else:
                        # lines split from the raw bytes and parsed by orjson: a million of
                        # them in a third of the time of iter_lines and json.loads
                        rest = b""
                        for chunk in response.iter_bytes(1 << 18):
                            lines = (rest + chunk).split(b"\n")
                            rest = lines.pop()
                            for line in lines:
                                if line.strip():
                                    started = True
                                    yield orjson.loads(line)
                        if rest.strip():
                            yield orjson.loads(rest)
                        return
            except httpx.TransportError as exc:
                if started or last:
                    raise PreflightError(
                        f"the file listing from Flywheel at {site} broke off ({exc.__class__.__name__}); "
                        "check the site is reachable from this node, then run again"
                    ) from None
            delay = wait if wait is not None else float(2 ** (attempt - 1))
            print(f"[retry] the project listing: transient fault; attempt {attempt + 1} of {attempts} in {delay:.1f} s", flush=True)
            time.sleep(delay)


# ---------------------------------------------------------------------------------------
# The source the native engine syncs from


# the folder part of a dst_path; a label may hold "/" (so: lazy groups, and the structure
# words around them), a container level may be missing (files of a project, subject, ...)
_DST_HEAD = re.compile(
    r"/?(?P<project>.+?)(?:/SUBJECTS/(?P<subject>.+?)(?:/SESSIONS/(?P<session>.+?)"
    r"(?:/ACQUISITIONS/(?P<acquisition>.+?))?)?)?(?:/ANALYSES/(?P<analysis>.+?))?"
    r"/(?P<kind>FILES|INPUT|OUTPUT)",
    re.DOTALL,
)
_LEVELS = (("SUBJECTS", "subject"), ("SESSIONS", "session"), ("ACQUISITIONS", "acquisition"), ("ANALYSES", "analysis"))
_ZIP_SUFFIX = re.compile(r"(\.(dcm|dicom))?\.zip$", re.IGNORECASE)
CHUNK = 1 << 20


_UNKNOWN: Any = object()


def url_segment(value: str) -> str:
    """One path segment of a request URL: every character but letters, digits and ``_.-~``
    percent-encoded, and a name that is ``.`` or ``..`` spelt ``%2E``/``%2E%2E``, so no client
    or server takes it for a dot-segment (``files/..`` would ask for the container itself)."""
    return "%2E" * len(value) if value in (".", "..") else quote(value, safe="")


def _http_error(response: httpx.Response, what: str = "") -> Exception:
    """The engine's error for a failed answer: 429 and 5xx are worth retrying, the rest not."""
    from ..errors import PermanentError, TransientError

    message = f"{what}HTTP {response.status_code} ({FlywheelAPI._error_text(response)})"
    if response.status_code == 429 or response.status_code >= 500:
        return TransientError(message, _retry_after(response))
    if response.status_code == 401:
        return PermanentError(f"{message}: the API key was rejected; log in again with `fw login`")
    return PermanentError(message)


def _transport_error(exc: httpx.TransportError, what: str = "") -> Exception:
    """The engine's error for a request that got no answer: worth retrying."""
    from ..errors import TransientError

    if isinstance(exc, httpx.TimeoutException):
        return TransientError(f"{what}timed out ({exc.__class__.__name__})")
    return TransientError(f"{what}connection problem ({exc.__class__.__name__}: {exc})")


def parse_hash(value: object) -> str | None:
    """Flywheel's file hash as ``algorithm:hex``: ``v0-sha384-<hex>`` or a bare sha384 hex;
    any other form (also an algorithm hashlib does not have, or a digest of the wrong
    length for its algorithm) counts as no hash (size check only), never as a mismatch."""
    if not isinstance(value, str):
        return None
    match = re.fullmatch(r"v0-(sha\d+)-([0-9a-f]+)", value.strip().lower())
    if match:
        try:
            size = hashlib.new(match.group(1)).digest_size
        except ValueError:
            return None
        return f"{match.group(1)}:{match.group(2)}" if len(match.group(2)) == 2 * size else None
    if re.fullmatch(r"[0-9a-f]{96}", value.strip().lower()):
        return f"sha384:{value.strip().lower()}"
    return None


def packed_hash(value: object) -> bytes | None:
    """:func:`parse_hash` kept small: the algorithm, ``:`` and the raw digest, 88 bytes in
    memory instead of 152 for the text (one is held per file to download for the whole
    run: 100,000 files, 6 MB). :func:`unpacked_hash` gives the text back."""
    parsed = parse_hash(value)
    if parsed is None:
        return None
    algorithm, _, digits = parsed.partition(":")
    return algorithm.encode("ascii") + b":" + bytes.fromhex(digits)


def unpacked_hash(value: bytes | None) -> str | None:
    """The ``algorithm:hex`` of a :func:`packed_hash` (None stays None)."""
    if value is None:
        return None
    algorithm, _, digest = value.partition(b":")  # (an algorithm's name has no ':')
    return f"{algorithm.decode('ascii')}:{digest.hex()}"


@lru_cache(maxsize=65536)  # files of one upload share a modification time
def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _dst_parts(head: str) -> tuple[list[str], dict[str, str] | None]:
    """The folders of a ``dst_path`` (without its file name) as Flywheel's labels and
    structure words, ``[project, "SUBJECTS", subject, ...,"FILES"]``, a label with ``/`` in
    it kept whole; and, for a file of an acquisition, its labels for a layout template."""
    match = _DST_HEAD.fullmatch(head)
    if match is None:  # not a form known here: its parts as they are
        return [part for part in head.split("/") if part], None
    parts = [match["project"]]
    for word, level in _LEVELS:
        if match[level] is not None:
            parts += [word, match[level]]
    parts.append(match["kind"])
    if match["acquisition"] is None or match["analysis"] is not None or match["kind"] != "FILES":
        return parts, None
    return parts, {level: match[level] for level in ("project", "subject", "session", "acquisition")}


@lru_cache(maxsize=65536)
def _subject_of(head: str) -> str:
    """The Flywheel subject label of a file in ``dst_path`` folder ``head`` ("": a file of
    no subject, e.g. the project's)."""
    match = _DST_HEAD.fullmatch(head)
    return (match["subject"] or "") if match is not None else ""


def _template_depths(template: str) -> tuple[int, int]:
    """The folders of a layout template that hold the subject and the session (0-based; -1:
    none)."""
    pieces = [piece for piece in template.split("/") if piece]
    subject = next((i for i, piece in enumerate(pieces) if "{subject}" in piece), -1)
    session = next((i for i, piece in enumerate(pieces) if "{session}" in piece), -1)
    return subject, session


def _session_info(head: str, template_depths: tuple[int, int] | None, trailing_slash: bool) -> tuple | None:
    """Where the session of a file in ``dst_path`` folder ``head`` is in its local path, and
    its Flywheel labels: ``((subject folder, session folder), subject, session)``, or None
    for a file of no session (the project's, a subject's, an analysis'). With a layout
    template only a file of an acquisition has one (the template places only those)."""
    match = _DST_HEAD.fullmatch(head)
    if match is None or match["subject"] is None or match["session"] is None or match["analysis"] is not None:
        return None
    if template_depths is not None:
        if match["acquisition"] is None or match["kind"] != "FILES" or template_depths[0] < 0:
            return None
        return template_depths, match["subject"], match["session"]
    first = 0 if trailing_slash else 1  # the project's folder, unless the URL ends with "/"
    return (first + 1, first + 3), match["subject"], match["session"]


class FlywheelSource:
    """Lists a project with one ``download/targets`` request and streams its files."""

    #: every entry of :meth:`entries` has a path of its own (named from the whole listing)
    unique_paths = True

    def __init__(self, credentials: Credentials, jobs: int = 4, timeout: float = 60.0, verify: bool | str = True):
        self.credentials = credentials
        self._client = httpx.Client(
            base_url=credentials.api_url,
            headers=credentials.headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=jobs + 4, max_keepalive_connections=jobs + 4),
            verify=verify,
        )
        self.api = FlywheelAPI(credentials, client=self._client)
        # the server's file hashes, per container (see checksum): fetched once each, under
        # a lock per container so that workers needing the same one wait for one request
        self._hashes: dict[str, dict[str, bytes | None]] = {}  # container -> file name -> packed_hash
        self._hash_locks: dict[str, threading.Lock] = {}
        self._hash_locks_lock = threading.Lock()
        # bulk downloads (open_bulk): the last listing's request body, and for each acquisition
        # with files in it: (dst_path folder, its path in a tar up to the acquisition)
        self._bulk_body: dict = {}
        self._bulk_acqs: dict[str, tuple[str, str]] = {}
        self._bulk_heads: dict[str, str | None] = {}
        self._project_id = ""

    @classmethod
    def open_project(cls, url: FlywheelURL, jobs: int = 4, verify: bool | str = True) -> tuple[FlywheelSource, dict]:
        """Log in (``$FLYWHEEL_API_KEY`` or the key ``fw login`` saved), check the login and
        find the project: the source, with one connection pool for everything, and the
        project's JSON. Each failure is one clear :class:`PreflightError`."""
        source = cls(load_credentials(), jobs=jobs, verify=verify)
        try:
            source.api.check_login()
            return source, source.api.lookup_project(url)
        except BaseException:
            source.close()
            raise

    def close(self) -> None:
        self._client.close()

    def entries(
        self,
        project_id: str,
        url: FlywheelURL,
        body_filters: dict,
        params: dict,
        unpack: bool = True,
        template: str | None = None,
        spill_dir: str | Path | None = None,
    ) -> Iterator:
        """The project's files as :class:`RemoteEntry` items, each with its own portable
        local path (clpipe/layout.py): the whole listing is read first, so that which of two
        files whose names collide keeps the plain name does not depend on the listing's
        order (the engine plans nothing before the listing has ended anyway). The listing
        is kept in ``spill_dir`` beyond 50,000 files (clpipe/spill.py), and names are
        decided by :class:`~clpipe.layout.StreamedNames`: memory does not grow with the
        number of files."""
        from ..layout import StreamedNames, bids_label, check_template, field_values, portable_name, template_parts
        from ..spill import Spill
        from .base import RemoteEntry, Session, session_of

        resolver = StreamedNames(spill_dir)
        self._bulk_body, self._bulk_acqs, self._bulk_heads = body_filters, {}, {}
        self._project_id = project_id
        known_sessions: dict = {}  # one Session per session folder
        template_depths = _template_depths(template) if template else None
        heads: dict[str, int] = {}  # dst_path's folder part -> its number (in the spilled items)
        where: list[tuple | None] = []  # by head number: (depths, subject label, session label)
        subjects: list[str] = []  # by head number: the Flywheel subject label
        labels_seen: dict[tuple[str, str], str] = {}  # (field, BIDS label) -> Flywheel label
        used = check_template(template) if template else []
        folders: dict[str, int] = {}  # dst_path's folder part -> planned folder's number (when the file name is not in it)
        with Spill(spill_dir) as listing:
            for target in self.api.download_targets(project_id, body_filters, params):
                dst = str(target.get("dst_path", ""))
                filename = str(target.get("filename", ""))
                sidecar = target.get("download_type") == "metadata_sidecar"
                is_zip = unpack and not sidecar and target.get("filetype") == "dicom" and filename.lower().endswith("zip")
                # "<container id>/<file name>": also how open() finds the file (ids have no "/")
                key = f"{target.get('container_id')}/{filename}" + ("#metadata" if sidecar else "")
                head, leaf = (
                    (dst[: -len(filename) - 1], filename) if filename and dst.endswith("/" + filename) else dst.rpartition("/")[::2]
                )
                number = folders.get(head)
                if number is None or "filename" in used:
                    raw, labels = _dst_parts(head)
                    if template and labels is not None:
                        labels.update(group=url.group, filename=leaf)
                        for field_name in ("subject", "session"):
                            safe = bids_label(labels[field_name], field_name)
                            other = labels_seen.setdefault((field_name, safe), labels[field_name])
                            if other != labels[field_name]:
                                raise PreflightError(
                                    f"the {field_name} labels {other!r} and {labels[field_name]!r} both become {safe!r} in the layout "
                                    f"template; rename one in Flywheel or use a template without {{{field_name}}}"
                                )
                        parts = template_parts(template, *field_values(labels))
                        if "filename" in used:
                            parts, (leaf, _) = parts[:-1], parts[-1]
                    else:
                        parts = [(part, portable_name(part)) for part in (raw[1:] if url.trailing_slash else raw)]
                    node = resolver.folder(parts)
                    number = node.number
                    folders[head] = number
                head_number = heads.get(head)
                if head_number is None:
                    head_number = heads[head] = len(where)
                    where.append(_session_info(head, template_depths, url.trailing_slash))
                    subjects.append(_subject_of(head))
                if is_zip:  # unpacked into a folder named after the zip
                    leaf = _ZIP_SUFFIX.sub("", leaf) or "_"
                name = portable_name(leaf)
                if not sidecar:  # (zips too: their hashes are prefetched by session; bulk_batches leaves them out)
                    self._note_bulk(head, str(target.get("container_id")), url)
                hashed = resolver.note(resolver.numbered(number), name)
                inline = json.dumps(target.get("metadata")).encode() if sidecar else None
                listing.append(
                    (
                        number,
                        key,
                        filename,
                        name,
                        name == leaf,
                        len(inline) if inline is not None else int(target.get("size") or 0),
                        _epoch(target["modified"]) if target.get("modified") else 0.0,
                        parse_hash(target.get("hash")),
                        is_zip,
                        inline,
                        head_number,
                        hashed,
                    )
                )
            if resolver.find_clashes():
                for number, key, _, name, unchanged, _, _, _, is_zip, _, _, hashed in listing:  # the few items whose names meet
                    folder = resolver.numbered(number)
                    if hashed in folder.clash:
                        resolver.add(folder, key, name, unchanged, is_zip)
            resolver.resolve()
            by_folder: dict[tuple[int, int], Session | None] = {}  # (folder, head) -> the session of its files
            for number, key, filename, name, unchanged, size, modified, checksum, is_zip, inline, head_number, hashed in listing:
                final = resolver.final(resolver.numbered(number), key, name, unchanged, hashed)
                if final is None:
                    continue  # the server may list a file twice (fw skips repeats too)
                path, renamed = final
                session = by_folder.get((number, head_number), _UNKNOWN)
                if session is _UNKNOWN:  # (one per folder: its files' paths differ only in their names)
                    info = where[head_number]
                    session = session_of(path, info[0], info[1], info[2], known_sessions) if info is not None else None
                    by_folder[(number, head_number)] = session
                yield RemoteEntry(
                    key=key,
                    path=path,
                    size=size,
                    modified=modified,
                    checksum=checksum,
                    unpack=is_zip,
                    ref=inline,  # the metadata sidecar's bytes; None for a file to download
                    name="" if path.endswith("/" + filename) or path == filename else filename,
                    renamed=renamed,
                    session=session,
                    subject=subjects[head_number],
                )

    @contextmanager
    def open(self, entry) -> Iterator[Iterator[bytes]]:
        if entry.ref is not None:  # a metadata sidecar, made from the listing
            yield iter([entry.ref])
            return
        container_id, filename = entry.key.split("/", 1)
        path = f"/containers/{url_segment(container_id)}/files/{url_segment(filename)}"
        try:
            with self._client.stream("GET", path) as response:
                if response.status_code != 200:
                    response.read()
                    raise _http_error(response)
                yield response.iter_bytes()  # pieces as they arrive: no re-chunking copies
        except httpx.TransportError as exc:
            raise _transport_error(exc) from None

    def _get(self, path: str, params: dict[str, str] | None = None) -> tuple[httpx.Response, bytes]:
        """``GET path``: the answer and its body (b"" for a failed answer, whose message
        stays readable on the answer). The body is read as a stream into bytes of our own:
        httpx keeps a ``read()`` answer's bytes on its Response, which is in a reference
        cycle and freed only when the garbage collector runs (a 100,000-file project's
        session listings, 4 MB each, were all held at once). Raises httpx's errors."""
        with self._client.stream("GET", path, params=params) as response:
            if response.status_code != 200:
                response.read()
                return response, b""
            return response, b"".join(response.iter_bytes())

    def members(self, entry) -> list[tuple[str, int]] | None:
        """The members of a zipped series (``?info=true``), to adopt an unpacked folder."""
        container_id, filename = entry.key.split("/", 1)
        try:
            response, body = self._get(f"/containers/{url_segment(container_id)}/files/{url_segment(filename)}", {"info": "true"})
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        try:
            return [(m["path"], int(m["size"])) for m in json.loads(body).get("members", []) if int(m.get("size") or 0) > 0]
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def checksum(self, entry) -> str | None:
        """The server's own hash of the entry's file (``algorithm:hex``), for an entry whose
        listing line had none: ``download/targets`` carries no hash, the file entries of its
        container do (``GET containers/{id}``, as the SDK's ``get_container``). One request
        per container, only for containers with files to download, cached, safe to call from
        several threads at once. None when the server gives no hash for the file (then only
        its size is checked). A failed request raises the engine's TransientError (retried)
        or PermanentError."""
        if entry.ref is not None:  # a metadata sidecar: its bytes are the listing's own
            return "sha384:" + hashlib.sha384(entry.ref).hexdigest()
        container_id, filename = entry.key.split("/", 1)
        with self._hash_locks_lock:
            lock = self._hash_locks.setdefault(container_id, threading.Lock())
        with lock:
            hashes = self._hashes.get(container_id)
            if hashes is None:  # a failed request is not cached: the retry asks again
                hashes = self._hashes[container_id] = self._container_hashes(container_id)
        return unpacked_hash(hashes.get(filename))

    def _container_hashes(self, container_id: str) -> dict[str, bytes | None]:
        """File name -> packed hash of every file of one container."""
        from ..errors import TransientError

        what = f"file hashes of container {container_id}: "
        try:
            response, body = self._get(f"/containers/{url_segment(container_id)}")
        except httpx.TransportError as exc:
            raise _transport_error(exc, what) from None
        if response.status_code != 200:
            raise _http_error(response, what)
        try:
            files = _decoded(body, CONTAINER_KEYS).get("files") or []
            return {f["name"]: packed_hash(f.get("hash")) for f in files if isinstance(f.get("name"), str)}
        except (ValueError, AttributeError, TypeError) as exc:  # a damaged answer: worth another try
            raise TransientError(f"{what}the answer is not a container ({exc.__class__.__name__})") from None

    # -- hashes ahead of the transfers (HasPrefetch) -------------------------------------

    def prefetch(self, entries, jobs: int) -> None:
        """The hashes of the containers of ``entries`` in a few requests, before the
        transfers ask for them one container at a time (:meth:`checksum`): the project's
        sessions (``GET projects/{id}/sessions``), then the acquisitions, with their files,
        of each session that holds such a container (``GET sessions/{id}/acquisitions``),
        ``jobs`` at once. Only when PREFETCH_MIN containers or more need hashes; a session
        is found by its subject and session labels (those of the files' ``dst_path``); a
        failed request, a page cut short, a container not found: asked for as before."""
        containers = {e.key.split("/", 1)[0] for e in entries if e.ref is None and e.checksum is None} - self._hashes.keys()
        labels = set()
        for cid in containers:
            where = self._bulk_acqs.get(cid)
            match = _DST_HEAD.fullmatch(where[0]) if where is not None else None
            if match is not None:
                labels.add((match["subject"], match["session"]))
        if len(containers) < PREFETCH_MIN or not labels or not self._project_id:
            return
        try:
            sessions = self._pages(f"/projects/{url_segment(self._project_id)}/sessions", SESSION_KEYS)
        except (httpx.HTTPError, ValueError, TypeError, AttributeError, KeyError):  # then per container
            return
        wanted = [
            str(s["_id"])
            for s in sessions
            if isinstance(s, dict)
            and "_id" in s
            and isinstance(s.get("subject"), dict)
            and (s["subject"].get("label"), s.get("label")) in labels
        ]

        def expand(session_id: str) -> None:
            try:
                acquisitions = self._pages(f"/sessions/{url_segment(session_id)}/acquisitions", ACQUISITION_KEYS)
            except (httpx.HTTPError, ValueError, TypeError, AttributeError, KeyError):  # then per container
                return
            for acq in acquisitions:
                if isinstance(acq, dict) and isinstance(acq.get("_id"), str) and isinstance(acq.get("files"), list):
                    hashes = {
                        f["name"]: packed_hash(f.get("hash"))
                        for f in acq["files"]
                        if isinstance(f, dict) and isinstance(f.get("name"), str)
                    }
                    self._hashes.setdefault(acq["_id"], hashes)

        if wanted:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(wanted))), thread_name_prefix="hashes") as pool:
                list(pool.map(expand, wanted))

    def _pages(self, path: str, keep: frozenset[str], limit: int = 1000) -> list:
        """Every item of a paged container listing (``limit`` and ``after_id``, as the SDK
        pages), each object with only the ``keep`` keys (:func:`_decoded`); a page shorter
        than ``limit`` is the last. Raises on any failure."""
        items: list = []
        after = ""
        for _ in range(10_000):  # bounded: 10 million items
            params = {"limit": str(limit), **({"after_id": after} if after else {})}
            response, body = self._get(path, params)
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            page = _decoded(body, keep)
            del body
            if not isinstance(page, list):
                raise ValueError("not a list")
            items += page
            if len(page) < limit:
                break
            after = str(page[-1]["_id"])
        return items

    # -- bulk downloads (HasBulk, sync/bulk.py) -----------------------------------------

    def _note_bulk(self, head: str, container_id: str, url: FlywheelURL) -> None:
        """Remember where the files of acquisition ``container_id`` (listed under the
        ``dst_path`` folder ``head``) are in a tar of ``POST download``: ``<group>/<project>/
        <subject>/<session>/<acquisition>``, each label cleaned as the server cleans it
        (:func:`tar_label`). Files of other containers are never fetched in bulk."""
        if container_id in self._bulk_acqs:
            return
        prefix = self._bulk_heads.get(head, "")
        if prefix == "":
            match = _DST_HEAD.fullmatch(head)
            levels = ("project", "subject", "session", "acquisition")
            if match is None or match["acquisition"] is None or match["analysis"] is not None or match["kind"] != "FILES":
                prefix = None
            else:
                prefix = "/".join([tar_label(url.group), *(tar_label(match[k]) for k in levels)])
            self._bulk_heads[head] = prefix
        if prefix is not None:
            self._bulk_acqs[container_id] = (head, prefix)

    def bulk_batches(self, entries) -> list:
        """The entries worth one tar per scan session: plain files (not zips to unpack, not
        sidecars) of acquisitions, up to BULK_MAX_FILE bytes each, BULK_MIN or more in the
        session. The acquisitions of one batch have distinct tar paths (two whose cleaned
        labels are the same are left out: which would get ``_0`` is the server's choice), so
        a member's path names exactly one entry."""
        from .base import BulkBatch

        if set(self._bulk_body) - {"filters", "container_filters"}:  # e.g. export templates: other paths
            return []
        sessions: dict[str, dict[str, list]] = {}  # dst_path folder of the session -> acquisition id -> entries
        for entry in entries:
            if entry.unpack or entry.series or entry.ref is not None or entry.size > BULK_MAX_FILE:
                continue
            container_id = entry.key.split("/", 1)[0]
            where = self._bulk_acqs.get(container_id)
            if where is not None:
                session_head = where[0].rsplit("/ACQUISITIONS/", 1)[0]
                sessions.setdefault(session_head, {}).setdefault(container_id, []).append(entry)
        batches = []
        for acqs in sessions.values():
            taken = Counter(self._bulk_acqs[cid][1] for cid in acqs)
            members: dict = {}
            cids: list[str] = []
            for cid, files in acqs.items():
                prefix = self._bulk_acqs[cid][1]
                if taken[prefix] > 1:
                    continue
                members.update((f"{prefix}/{e.key.split('/', 1)[1]}", e) for e in files)
                cids.append(cid)
                if len(members) >= BULK_MAX_BATCH:
                    batches.append(BulkBatch(members, cids))
                    members, cids = {}, []
            if len(members) >= BULK_MIN:
                batches.append(BulkBatch(members, cids))
        return batches

    @contextmanager
    def open_bulk(self, batch) -> Iterator[Iterator[bytes] | None]:
        """``POST download`` for the batch's acquisitions (with the listing's type filter),
        then ``GET download?ticket=`` streaming the tar. None (nothing fetched) when the
        ticket holds much more than the batch (files already synced, or other types)."""
        nodes = [{"level": "acquisition", "_id": cid} for cid in batch.ref]
        plus: list = []
        minus: list = []
        for flt in self._bulk_body.get("filters") or []:
            types = flt.get("types") or {}
            plus += types.get("+") or []
            minus += types.get("-") or []
        body: dict = {"nodes": nodes, "optional": True}
        if plus or minus:
            body["filters"] = [{"types": {k: v for k, v in (("+", plus), ("-", minus)) if v}}]
        if self._bulk_body.get("container_filters"):
            body["container_filters"] = self._bulk_body["container_filters"]
        what = f"bulk download of {len(batch.members)} files: "
        try:
            response = self._client.post("/download", params={"type": "classic"}, json=body)
            if response.status_code != 200:
                raise _http_error(response, what)
            try:
                offer, ticket = int(response.json().get("size") or 0), str(response.json()["ticket"])
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                from ..errors import TransientError

                raise TransientError(f"{what}the answer is not a ticket ({exc.__class__.__name__})") from None
            if offer > 2 * sum(e.size for e in batch.members.values()) + (1 << 20):
                yield None
                return
            with self._client.stream("GET", "/download", params={"ticket": ticket, "format": "tar"}) as stream:
                if stream.status_code != 200:
                    stream.read()
                    raise _http_error(stream, what)
                yield stream.iter_bytes()
        except httpx.TransportError as exc:  # also while the tar is read (thrown in at the yield)
            raise _transport_error(exc, what) from None


PREFETCH_MIN = 8  # containers needing hashes: fewer are asked for one by one
SESSION_KEYS = frozenset({"_id", "subject", "label"})  # what prefetch reads of a session (its subject's label too)
ACQUISITION_KEYS = frozenset({"_id", "files", "name", "hash"})  # ... and of an acquisition and its files
CONTAINER_KEYS = frozenset({"files", "name", "hash"})  # what checksum reads of one container
BULK_MAX_FILE = 4 << 20  # larger files: one request each costs little next to their bytes
BULK_MIN = 16  # fewer files of a session to fetch: one request each
BULK_MAX_BATCH = 5000  # files per tar at most (whole acquisitions), so that several stream at once


def _decoded(body: bytes, keep: frozenset[str]) -> Any:
    """A JSON answer with only the ``keep`` keys of each object, the rest dropped as each
    object is decoded, so that the whole metadata of a listing is never held at once: a
    session's acquisitions with their files (5,000 files of about a kilobyte each, a few
    sessions at once) decoded whole were the peak of a 100,000-file sync. Raises
    ValueError if it is not JSON."""
    return json.loads(body, object_pairs_hook=lambda pairs: {k: v for k, v in pairs if k in keep})


def tar_label(label: str) -> str:
    """A label as a path component of a bulk download's tar, as scitran core cleans it:
    only ASCII letters, digits, space, ``.``, ``_`` and ``-`` kept; ``untitled`` when
    nothing is left."""
    return re.sub(r"[^A-Za-z0-9 ._-]", "", label) or "untitled"
