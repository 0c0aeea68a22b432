"""The truth per scan session: what every run learns of each session, kept beside the
manifest, and the states the BIDS step and a person read.

A run *tallies* each session it lists (:class:`Tallies`: the entries the source has, how
many are in place, the files and bytes in the dropoff, the failures, the newest change on
the source and a fingerprint of the listing), and :func:`merge` folds the tallies into the
records of the earlier runs. The records are written whole (temporary file, fsync, rename)
to ``<dropoff>/.clpipe-sync/sessions.json`` under the dropoff's lock, as the manifest is,
so a crash or a full disk leaves the previous file.

A record keeps a *base* state, what the listing and the dropoff said at the end of the run:

- ``synced``: every listed entry of the session is in place, verified;
- ``partial``: some failed or are missing (a run stopped before them, a 404);
- ``new``: on the source, nothing of it in the dropoff yet (and nothing failed);
- ``removed``: no longer listed by the source (with the same filters).

:func:`state_of` turns it into the state users see, at the time they look: a synced
session is ``arriving`` while its last change on the source is younger than StableAfter
(new series may still come), ``converted`` when its BIDS folder exists and holds a file
newer than the session's last sync, else ``complete``.

When the source gives no modification times (DIMSE and DICOMweb list none), the last
change is the time a run first saw the session's current listing: a study synced for the
first time counts as arriving for StableAfter, the safe side for the BIDS step.

After each run :func:`write_changes` writes ``<run>.sessions.tsv`` (the sessions whose
state changed) and :func:`append_status_log` appends them to clpipe's
``<project>/.pipeline/status_log.csv`` (step ``ingestion``).

This module reads only local files: ``clpipe dicom status`` uses it without a network.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import posixpath
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..layout import STATE_DIR, bids_label
from ..sources.base import RemoteEntry, Session
from .fileio import write_whole

SESSIONS = "sessions.json"
FORMAT = 1
STATES = ("complete", "arriving", "partial", "new", "removed", "converted")
MAX_FAILURES = 20  # failures kept per session (the audit CSV has them all)
TSV_HEADER = ("subject", "session", "old_state", "new_state", "path")
STATUS_LOG_HEADER = ("subject", "session", "step", "event", "timestamp", "source", "note")
STATUS_LOG_SOURCE = "clpipe dicom sync"


def _fingerprint(entry: RemoteEntry, signature: list | None = None) -> int:
    """64 bits of the entry's identity and version (``signature``: its signature, when
    known already): XORed over a session, so the listing's order does not matter, and any
    added, removed or changed entry changes the sum."""
    text = f"{entry.key}\0{entry.signature if signature is None else signature}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


@dataclass(slots=True)
class Tally:
    """One session as one run found it."""

    session: Session
    entries: int = 0  # listed
    in_place: int = 0  # listed entries whose files are in the dropoff, whole
    files: int = 0  # local files (zip members and instances, not zips)
    bytes: int = 0
    placed: int = 0  # files this run wrote or moved into place
    modified: float = 0.0  # the newest change the source gives (0: it gives none)
    fingerprint: int = 0
    failures: list[str] = field(default_factory=list)
    series: set[str] = field(default_factory=set)


class Tallies:
    """The sessions of one run, filled by the engine as it plans and transfers. Entries of
    no session (a project's own files) are not counted."""

    def __init__(self) -> None:
        self.by_path: dict[str, Tally] = {}
        self.whole = True  # the listing was read to its end (a stopped run's may not be)

    def _tally(self, entry: RemoteEntry) -> Tally | None:
        session = entry.session
        if session is None:
            return None
        tally = self.by_path.get(session.path)
        if tally is None:
            tally = self.by_path[session.path] = Tally(session)
        return tally

    def listed(self, entry: RemoteEntry, signature: list | None = None) -> None:
        session = entry.session  # (inline: a million times in a no-op re-sync)
        if session is None:
            return
        tally = self.by_path.get(session.path)
        if tally is None:
            tally = self.by_path[session.path] = Tally(session)
        tally.entries += 1
        tally.fingerprint ^= _fingerprint(entry, signature)
        if entry.modified > tally.modified:
            tally.modified = entry.modified
        # a series: a folder the entry is unpacked into, else the folder of a single file
        tally.series.add(entry.path if entry.unpack or entry.series else entry.path.rpartition("/")[0])

    def in_place(self, entry: RemoteEntry, files: Iterable[Sequence], placed: int = 0) -> None:
        """``entry`` is in place with ``files`` ([path, size, ...] each); ``placed`` of them
        were written or moved by this run."""
        tally = self._tally(entry)
        if tally is None:
            return
        tally.in_place += 1
        tally.placed += placed
        for _, size, *_ in files:
            tally.files += 1
            tally.bytes += size

    def failed(self, entry: RemoteEntry, reason: str) -> None:
        tally = self._tally(entry)
        if tally is not None and len(tally.failures) < MAX_FAILURES:
            tally.failures.append(f"{entry.describe()}: {reason}")

    def __len__(self) -> int:
        return len(self.by_path)

    # A shard task of an array job (-shards) keeps its tallies in its own folder; the final
    # job adds them up and merges them as one run's (arrays.py).

    def data(self, *, no_op: bool = False) -> dict[str, Any]:
        """The tallies as plain data (JSON and marshal can write it). ``no_op``: as a run
        that found every file in place would tally them (nothing placed)."""
        items = [
            {
                "session": [t.session.path, t.session.subject, t.session.session, t.session.source_subject, t.session.source_session],
                "entries": t.entries,
                "in_place": t.in_place,
                "files": t.files,
                "bytes": t.bytes,
                "placed": 0 if no_op else t.placed,
                "modified": t.modified,
                "fingerprint": t.fingerprint,
                "failures": t.failures,
                "series": sorted(t.series),
            }
            for t in self.by_path.values()
        ]
        return {"clpipe_session_tallies": FORMAT, "whole": self.whole, "tallies": items}

    def save(self, path: Path) -> None:
        """Write the tallies whole to ``path`` (a shard task's folder)."""
        text = json.dumps(self.data()) + "\n"
        write_whole(path, lambda out: out.write(text), durable=True)

    def add_saved(self, path: Path) -> bool:
        """Add the tallies a shard task saved at ``path``; False when there are none (the
        task did not finish) or they cannot be read."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return self.add_data(data)

    def add_data(self, data: Any) -> bool:
        """Add tallies given as :meth:`data` made them; False when they are not such data."""
        try:
            items = data["tallies"] if data.get("clpipe_session_tallies") == FORMAT else None
        except (AttributeError, KeyError, TypeError):
            return False
        if not isinstance(items, list):
            return False
        self.whole = self.whole and data.get("whole") is True
        try:
            for item in items:
                session = Session(*item["session"])
                tally = self.by_path.get(session.path)
                if tally is None:
                    tally = self.by_path[session.path] = Tally(session)
                tally.entries += item["entries"]
                tally.in_place += item["in_place"]
                tally.files += item["files"]
                tally.bytes += item["bytes"]
                tally.placed += item["placed"]
                tally.modified = max(tally.modified, item["modified"])
                tally.fingerprint ^= item["fingerprint"]
                tally.failures += item["failures"][: MAX_FAILURES - len(tally.failures)]
                tally.series.update(item["series"])
        except (AttributeError, KeyError, TypeError, ValueError):
            return False
        return True


# ----------------------------------------------------------------------------- records


def merge(previous: dict[str, dict], tallies: Tallies, now: float, run_id: str, whole_listing: bool = True) -> dict[str, dict]:
    """The session records after a run: each listed session's from its tally and its
    earlier record; an earlier session the run did not list is ``removed`` when
    ``whole_listing`` (the run listed all the source has), else kept as it was."""
    records: dict[str, dict] = {}
    for path, tally in tallies.by_path.items():
        old = previous.get(path) or {}
        session = tally.session
        missing = tally.entries - tally.in_place
        if missing == 0:
            base = "synced"
        elif tally.in_place == 0 and not tally.failures and old.get("base", "new") == "new":
            base = "new"
        else:
            base = "partial"
        fingerprint = f"{tally.fingerprint:016x}"
        if not old or old.get("base") == "removed":
            last_change = tally.modified or now
        elif old.get("fingerprint") != fingerprint:  # added, removed or changed on the source
            last_change = tally.modified if tally.modified > (old.get("last_change") or 0) else now
        else:
            last_change = old.get("last_change") or tally.modified or now
        here = tally.in_place > 0
        records[path] = {
            "path": path,
            "subject": session.subject,
            "session": session.session,
            "source_subject": session.source_subject,
            "source_session": session.source_session,
            "base": base,
            "entries": tally.entries,
            "missing": missing,
            "files": tally.files,
            "bytes": tally.bytes,
            "series": len(tally.series),
            "failures": tally.failures,
            "first_synced": old.get("first_synced") or (now if here else None),
            "last_synced": now if tally.placed or (here and not old.get("last_synced")) else old.get("last_synced"),
            "last_seen": now,
            "last_change": last_change,
            "fingerprint": fingerprint,
            "run": run_id,
        }
    for path, old in previous.items():
        if path in records:
            continue
        if whole_listing and old.get("base") != "removed":
            old = {**old, "base": "removed", "last_change": now, "run": run_id}
        records[path] = old
    return records


def refreshed(records: dict[str, dict], tallies: Tallies, now: float) -> dict[str, dict]:
    """The records as a fresh listing (no download) shows them, for ``clpipe dicom status
    -refresh``: a session the records do not have is ``new``; one the listing no longer
    has is ``removed``; one whose listing changed since the last sync gets ``changed``
    and is ``partial`` (the dropoff lacks what the source has now), its last change the
    listing's newest (or now, when the source gives no times), so it shows as arriving
    while that is recent. Nothing is written."""
    out: dict[str, dict] = {}
    for path, tally in tallies.by_path.items():
        old = records.get(path)
        fingerprint = f"{tally.fingerprint:016x}"
        if old is None or old.get("base") == "removed":
            session = tally.session
            out[path] = {
                **(old or {}),
                "path": path,
                "subject": session.subject,
                "session": session.session,
                "source_subject": session.source_subject,
                "source_session": session.source_session,
                "base": "new",
                "entries": tally.entries,
                "missing": tally.entries,
                "files": (old or {}).get("files", 0),
                "bytes": (old or {}).get("bytes", 0),
                "series": len(tally.series),
                "failures": [],
                "last_change": tally.modified or now,
                "changed": True,
            }
        elif old.get("fingerprint") != fingerprint:
            last = old.get("last_change") or 0
            out[path] = {
                **old,
                "base": "partial" if old.get("base") != "new" else "new",
                "entries": tally.entries,
                "series": len(tally.series),
                "last_change": tally.modified if tally.modified > last else now,
                "changed": True,
            }
        else:
            out[path] = {**old, "changed": False}
    for path, old in records.items():
        if path not in out:
            out[path] = {**old, "base": "removed", "changed": old.get("base") != "removed"}
    return out


@dataclass(frozen=True)
class BidsCheck:
    """Where clpipe's BIDS step writes: BIDSDirectory, and whether DICOMFormatString has a
    ``{session}`` (then a session's folder is ``sub-<label>/ses-<label>``)."""

    bids_dir: str
    with_session: bool = True

    def folder(self, record: dict) -> str:
        subject, session = bids_labels(record)
        parts = [self.bids_dir, f"sub-{subject}"] + ([f"ses-{session}"] if self.with_session and record.get("session") else [])
        return os.path.join(*parts)

    def converted(self, record: dict) -> bool:
        """Its BIDS folder exists and holds a file newer than the session's last sync."""
        synced = record.get("last_synced") or 0
        return _newest(self.folder(record), synced) > synced


def _newest(folder: str, floor: float) -> float:
    """The newest modification time of a file under ``folder`` (0: none), stopping as soon
    as one newer than ``floor`` is found."""
    newest = 0.0
    stack = [folder]
    while stack:
        try:
            with os.scandir(stack.pop()) as items:
                for item in items:
                    if item.is_dir(follow_symlinks=False):
                        stack.append(item.path)
                        continue
                    mtime = item.stat(follow_symlinks=False).st_mtime
                    if mtime > newest:
                        newest = mtime
                        if newest > floor:
                            return newest
        except OSError:
            continue
    return newest


def bids_labels(record: dict) -> tuple[str, str]:
    """The BIDS labels of a session (ASCII letters and digits only, as convert2bids needs):
    ``sübject-03`` -> ``subject03``."""
    session = record.get("session") or ""
    return bids_label(record.get("subject") or "", "subject"), (bids_label(session, "session") if session else "")


def state_of(record: dict, now: float, stable_after: float, bids: BidsCheck | None) -> str:
    """The state a user sees now (see the module's doc)."""
    base = record.get("base", "new")
    recent = stable_after > 0 and now - (record.get("last_change") or 0) < stable_after
    if base == "partial" and recent and record.get("changed") and not record.get("failures"):
        return "arriving"  # a listing (status -refresh) saw it change just now: more may come
    if base != "synced":
        return base
    if recent:
        return "arriving"
    if bids is not None and bids.converted(record):
        return "converted"
    return "complete"


def with_states(records: dict[str, dict], now: float, stable_after: float, bids: BidsCheck | None) -> dict[str, dict]:
    """The records with their ``state`` as of ``now``."""
    return {path: {**record, "state": state_of(record, now, stable_after, bids)} for path, record in records.items()}


# ----------------------------------------------------------------------------- the file


def sessions_file(dropoff: str | Path) -> Path:
    return Path(dropoff) / STATE_DIR / SESSIONS


def load(dropoff: str | Path) -> dict[str, dict]:
    """The session records of a dropoff ({}: none yet). ``ValueError`` when the file is
    not one this tool wrote (damaged, or of a newer version)."""
    path = sessions_file(dropoff)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read ({getattr(exc, 'strerror', None) or exc}); the next sync writes it anew") from None
    if not isinstance(data, dict) or data.get("clpipe_sessions") != FORMAT or not isinstance(data.get("sessions"), list):
        raise ValueError(f"{path} is not a sessions file of this clpipe version; the next sync writes it anew")
    return {record["path"]: record for record in data["sessions"] if isinstance(record, dict) and "path" in record}


def save(dropoff: str | Path, records: dict[str, dict], run_id: str) -> None:
    """Write the records whole (temporary file, fsync, rename): a crash or a full disk
    leaves the previous file. The derived ``state`` is kept as of this run, so the next
    run can say what changed."""
    data = {"clpipe_sessions": FORMAT, "run": run_id, "sessions": [records[path] for path in sorted(records)]}
    text = json.dumps(data, indent=1) + "\n"
    target = sessions_file(dropoff)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_whole(target, lambda out: out.write(text), durable=True)


# ----------------------------------------------------------------------------- after a run


@dataclass(frozen=True, slots=True)
class Change:
    subject: str
    session: str
    old: str  # "" for a session seen for the first time
    new: str
    path: str
    note: str = ""


def changes(previous: dict[str, dict], current: dict[str, dict]) -> list[Change]:
    """The sessions whose state (as each run saw it) changed, by path."""
    out = []
    for path in sorted(current):
        record = current[path]
        old = previous.get(path, {}).get("state", "")
        if record.get("state") != old:
            failures = record.get("failures") or []
            note = f"{len(failures)} failed: {failures[0]}" if failures else ""
            if not note and record.get("missing"):
                note = f"{record['missing']} of {record.get('entries', 0)} not synced yet"
            out.append(Change(record.get("subject", ""), record.get("session", ""), old, record["state"], path, note))
    return out


def write_changes(tsv: Path, changed: list[Change], dropoff: str) -> None:
    """``<run>.sessions.tsv``: a header, then one line per session whose state changed
    (the path absolute). Written whole, by every run."""

    def write(out: Any) -> None:
        writer = csv.writer(out, delimiter="\t", lineterminator="\n")
        writer.writerow(TSV_HEADER)
        for change in changed:
            writer.writerow([change.subject, change.session, change.old, change.new, posixpath.join(dropoff, change.path)])

    write_whole(tsv, write)


def append_status_log(project_dir: str | Path, changed: list[Change], when: float | None = None) -> Path:
    """Append one row per changed session to clpipe's ``.pipeline/status_log.csv`` (its
    header first when the file is new): step ``ingestion``, event the new state."""
    log = Path(project_dir) / ".pipeline" / "status_log.csv"
    if not changed:
        return log
    stamp = datetime.fromtimestamp(when if when is not None else time.time(), timezone.utc).astimezone().isoformat(timespec="seconds")
    log.parent.mkdir(parents=True, exist_ok=True)
    new = not log.exists() or log.stat().st_size == 0
    with open(log, "a", encoding="utf-8", newline="") as out:
        writer = csv.writer(out, lineterminator="\n")
        if new:
            writer.writerow(STATUS_LOG_HEADER)
        for change in changed:
            writer.writerow([change.subject, change.session, "ingestion", change.new, stamp, STATUS_LOG_SOURCE, change.note])
        out.flush()
        os.fsync(out.fileno())
    return log


def iso(epoch: float | None) -> str | None:
    """An epoch time as ISO 8601 in local time with its offset (None stays None)."""
    if not epoch:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).astimezone().isoformat(timespec="seconds")


def counts(records: Iterable[dict]) -> dict[str, int]:
    """Sessions per state, every state named (0 when none)."""
    out = dict.fromkeys(STATES, 0)
    for record in records:
        out[record["state"]] = out.get(record["state"], 0) + 1
    return out


def rows(records: dict[str, dict]) -> Iterator[dict]:
    """The records sorted by subject, session, path."""
    return iter(sorted(records.values(), key=lambda r: (r.get("subject", ""), r.get("session", ""), r["path"])))
