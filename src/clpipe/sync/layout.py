"""Where files land: safe path parts, BIDS-safe labels, layout templates, zip members.

Everything that turns remote text (labels, file names, zip member names) into a local
path goes through :func:`safe_part`, so a name with ``..``, a leading ``/`` or control
characters can never write outside the dropoff.
"""

from __future__ import annotations

import posixpath
import re
import string
import unicodedata
from functools import lru_cache
from pathlib import Path, PurePosixPath

_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")
FIELDS = ("group", "project", "subject", "session", "acquisition", "filename")
_BIDS_PREFIX = {"subject": "sub-", "session": "ses-"}


@lru_cache(maxsize=65536)  # folder names repeat across thousands of files
def safe_part(text: str) -> str:
    """One path component: separators and control characters become ``_``; ``.``/``..``
    and empty names become ``_``; at most 255 bytes."""
    text = unicodedata.normalize("NFC", str(text))
    text = _UNSAFE.sub("_", text).strip()
    if text in ("", ".", ".."):
        text = "_" if not text else text.replace(".", "_")
    while len(text.encode("utf-8")) > 255:
        text = text[:-1]
    return text


def safe_relpath(path: str) -> str:
    """A relative POSIX path whose every part is safe; absolute paths and ``..`` are
    neutralised. (A plain string: 100,000 of these are built per listing.)"""
    parts = [safe_part(p) for p in str(path).replace("\\", "/").split("/") if p]
    return "/".join(parts) if parts else "_"


def inside(root: Path, relative: str) -> Path:
    """``root / relative``, checked to stay inside ``root`` (a last line of defence behind
    :func:`safe_relpath`): no absolute path, no ``..`` part. The check is lexical, so a
    symlink the user placed inside the dropoff is followed, as the user intends."""
    parts = relative.split("/")
    if relative.startswith("/") or ".." in parts or "" in parts:
        raise ValueError(f"refusing to write outside the dropoff: {relative}")
    return root / relative


def bids_label(text: str, field: str = "") -> str:
    """A BIDS label: letters and digits only, without a leading ``sub-``/``ses-`` (clpipe's
    BIDS step adds the prefix back). ``"sub-01"`` -> ``"01"``, ``"Pilot 3_b"`` -> ``"Pilot3b"``."""
    text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode()
    prefix = _BIDS_PREFIX.get(field)
    if prefix and text.lower().startswith(prefix):
        text = text[len(prefix):]
    label = re.sub(r"[^A-Za-z0-9]", "", text)
    return label or "unknown"


def check_template(template: str, fields=FIELDS, need_field: bool = False) -> list[str]:
    """The fields a layout template uses (from ``fields``); ``ValueError`` naming what is
    wrong. ``need_field``: a template without any field is refused too."""
    used = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{template!r} is not a valid template ({exc})") from None
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in fields or spec or conversion:
            raise ValueError(f"unknown field {{{field}}} in {template!r}; use {', '.join('{' + f + '}' for f in fields)}")
        used.append(field)
    if template.startswith("/") or ".." in PurePosixPath(template).parts:
        raise ValueError(f"{template!r} must be a relative path without '..'")
    if need_field and not used:
        raise ValueError(f"{template!r} uses no field, so every series would land in one folder; use e.g. {{subject}}/{{session}}/{{series}}")
    return used


def render(template: str, labels: dict[str, str]) -> str:
    """Render a layout template with BIDS-safe subject/session labels and safe other parts.

    Without ``{filename}`` in the template the file name is appended.
    """
    used = check_template(template)
    values = {}
    for field in FIELDS:
        raw = labels.get(field, "")
        values[field] = bids_label(raw, field) if field in ("subject", "session") else safe_part(raw)
    path = safe_relpath(template.format(**values))
    if "filename" not in used:
        path = f"{path}/{safe_part(labels.get('filename', ''))}"
    return path


def dicom_format_string(template: str) -> str:
    """The ``DICOMFormatString`` for clpipe's BIDS step: the template up to ``{session}``
    (or ``{subject}``), with a trailing slash."""
    parts = PurePosixPath(template).parts
    for last in ("{session}", "{subject}"):
        for i, part in enumerate(parts):
            if last in part:
                return posixpath.join(*parts[: i + 1]) + "/"
    return ""


def flatten_members(names: list[str]) -> dict[str, str]:
    """Zip member -> file name in the series folder: base names, as ``fw sync`` does, but a
    second member with the same base name gets ``_2``, ``_3``... instead of overwriting."""
    taken: set[str] = set()
    result = {}
    for name in names:
        base = safe_part(PurePosixPath(name.replace("\\", "/")).name)
        candidate, n = base, 1
        stem, dot, suffix = base.partition(".")
        while candidate in taken:
            n += 1
            candidate = f"{stem}_{n}{dot}{suffix}"
        taken.add(candidate)
        result[name] = candidate
    return result
