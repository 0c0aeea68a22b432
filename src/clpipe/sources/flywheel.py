"""Flywheel as a source: the ``fw://`` URL, the saved login, and the few API calls clpipe
makes itself (login check, project lookup, the bulk file listing).

The API key is read from the file ``fw login`` writes and only ever travels in the
``Authorization`` header; it never reaches a command line, a log or a report.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator
from urllib.parse import quote

import httpx

from ..errors import PreflightError
from .http import retry_after as _retry_after

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
    rest = value[len("fw://"):]
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
        raise PreflightError(
            f"the Flywheel API key in {where or user_config_path()} is not of the form <site>:<key>; {LOGIN_HINT}"
        )
    insecure = "__force_insecure" in parts
    parts = [p for p in parts if p != "__force_insecure"]
    key = parts[-1]
    host = parts[0]
    port = parts[1] if len(parts) > 2 else "443"
    if not host or not port.isdigit():
        raise PreflightError(
            f"the Flywheel API key in {where or user_config_path()} does not name a site; {LOGIN_HINT}"
        )
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

    def __enter__(self) -> "FlywheelAPI":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        site = self.credentials.api_url
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise PreflightError(f"Flywheel at {site} did not answer in time; check the site is up and reachable from this node") from None
        except httpx.TransportError as exc:
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
                f"Flywheel project {url.group}/{url.project} was not found or you have no access to it; "
                f"check SourceURL ({URL_EXPECTED})"
            )
        if response.status_code != 200:
            raise PreflightError(
                f"Flywheel lookup of {url.group}/{url.project} failed with HTTP {response.status_code} ({self._error_text(response)})"
            )
        body = response.json()
        if body.get("container_type") != "project":
            raise PreflightError(f"{url} is a {body.get('container_type')}, not a project; {URL_EXPECTED}")
        return body

    def download_targets(self, project_id: str, body_filters: dict, params: dict) -> Iterator[dict]:
        """``POST download/targets``: every file of the project in one NDJSON response."""
        payload = {"nodes": [{"level": "project", "_id": project_id}], **body_filters}
        query = {"type": "full", "prefix": "", **params}
        site = self.credentials.api_url
        try:
            with self._client.stream("POST", "/download/targets", params=query, json=payload) as response:
                if response.status_code != 200:
                    response.read()
                    raise PreflightError(
                        f"Flywheel listing of the project failed with HTTP {response.status_code} ({self._error_text(response)})"
                    )
                for line in response.iter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.TransportError as exc:
            raise PreflightError(f"the file listing from Flywheel at {site} broke off ({exc.__class__.__name__})") from None


# ---------------------------------------------------------------------------------------
# The source the native engine syncs from


_DST_RE = re.compile(r"^/?(?P<project>[^/]+)/SUBJECTS/(?P<subject>[^/]+)/SESSIONS/(?P<session>[^/]+)/ACQUISITIONS/(?P<acquisition>[^/]+)/FILES/(?P<filename>[^/]+)$")
_ZIP_SUFFIX = re.compile(r"(\.(dcm|dicom))?\.zip$", re.IGNORECASE)
CHUNK = 1 << 20


def parse_hash(value: object) -> str | None:
    """Flywheel's file hash as ``algorithm:hex``: ``v0-sha384-<hex>`` or a bare sha384 hex;
    any other form counts as no hash (size check only), never as a mismatch."""
    if not isinstance(value, str):
        return None
    match = re.fullmatch(r"v0-(sha\d+)-([0-9a-f]+)", value.strip().lower())
    if match:
        return f"{match.group(1)}:{match.group(2)}"
    if re.fullmatch(r"[0-9a-f]{96}", value.strip().lower()):
        return f"sha384:{value.strip().lower()}"
    return None


@lru_cache(maxsize=65536)  # files of one upload share a modification time
def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class FlywheelSource:
    """Lists a project with one ``download/targets`` request and streams its files."""

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

    def close(self) -> None:
        self._client.close()

    def entries(self, project_id: str, url: FlywheelURL, body_filters: dict, params: dict,
                unpack: bool = True, template: str | None = None) -> Iterator:
        """The project's files as :class:`RemoteEntry` items, yielded as the listing streams in."""
        from ..sync.engine import RemoteEntry
        from ..sync.layout import bids_label, render, safe_relpath

        strip = re.compile(r"^/?[^/]+/" if url.trailing_slash else r"^/")
        seen: set[str] = set()  # local paths (the entries' own strings: no copies)
        labels_seen: dict[tuple[str, str], str] = {}  # (field, safe label) -> Flywheel label
        for target in self.api.download_targets(project_id, body_filters, params):
            dst = target.get("dst_path", "")
            name = os.path.normpath(strip.sub("", dst))
            filename = target.get("filename", "")
            sidecar = target.get("download_type") == "metadata_sidecar"
            is_zip = unpack and not sidecar and target.get("filetype") == "dicom" and filename.lower().endswith("zip")
            match = _DST_RE.match(dst)
            if template and match:
                labels = dict(match.groupdict(), group=url.group)
                for field_name in ("subject", "session"):
                    safe = bids_label(labels[field_name], field_name)
                    other = labels_seen.setdefault((field_name, safe), labels[field_name])
                    if other != labels[field_name]:
                        raise PreflightError(
                            f"the {field_name} labels {other!r} and {labels[field_name]!r} both become {safe!r} in the layout "
                            f"template; rename one in Flywheel or use a template without {{{field_name}}}"
                        )
                path = render(template, labels)
            else:
                path = safe_relpath(name)
            if is_zip:
                head, _, tail = path.rpartition("/")
                tail = _ZIP_SUFFIX.sub("", tail) or "_"
                path = f"{head}/{tail}" if head else tail
            if path in seen:  # the server may list a file twice (fw skips repeats too)
                continue
            seen.add(path)
            inline = json.dumps(target.get("metadata")).encode() if sidecar else None
            yield RemoteEntry(
                # "<container id>/<file name>": also how open() finds the file (ids have no "/")
                key=f"{target.get('container_id')}/{filename}" + ("#metadata" if sidecar else ""),
                path=path,
                size=len(inline) if inline is not None else int(target.get("size") or 0),
                modified=_epoch(target["modified"]) if target.get("modified") else 0.0,
                checksum=parse_hash(target.get("hash")),
                unpack=is_zip,
                ref=inline,  # the metadata sidecar's bytes; None for a file to download
                name="" if path.endswith("/" + filename) or path == filename else filename,
            )

    @contextmanager
    def open(self, entry) -> Iterator[Iterator[bytes]]:
        from ..sync.engine import PermanentError, TransientError

        if entry.ref is not None:  # a metadata sidecar, made from the listing
            yield iter([entry.ref])
            return
        container_id, filename = entry.key.split("/", 1)
        path = f"/containers/{container_id}/files/{quote(filename, safe='')}"
        try:
            with self._client.stream("GET", path) as response:
                if response.status_code != 200:
                    response.read()
                    message = f"HTTP {response.status_code} ({FlywheelAPI._error_text(response)})"
                    if response.status_code == 429 or response.status_code >= 500:
                        raise TransientError(message, _retry_after(response))
                    if response.status_code == 401:
                        raise PermanentError(f"{message}: the API key was rejected; log in again with `fw login`")
                    raise PermanentError(message)
                yield response.iter_bytes()  # pieces as they arrive: no re-chunking copies
        except httpx.TimeoutException as exc:
            raise TransientError(f"timed out ({exc.__class__.__name__})") from None
        except httpx.TransportError as exc:
            raise TransientError(f"connection problem ({exc.__class__.__name__}: {exc})") from None

    def members(self, entry) -> list[tuple[str, int]] | None:
        """The members of a zipped series (``?info=true``), to adopt an unpacked folder."""
        container_id, filename = entry.key.split("/", 1)
        try:
            response = self._client.get(f"/containers/{container_id}/files/{quote(filename, safe='')}", params={"info": "true"})
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        try:
            return [(m["path"], int(m["size"])) for m in response.json().get("members", []) if int(m.get("size") or 0) > 0]
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
