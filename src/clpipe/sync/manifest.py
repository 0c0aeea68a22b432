"""The sync state kept in the dropoff: manifest, journal and lock, safe on NFS/GPFS/Lustre.

Layout, under ``<dropoff>/.clpipe-sync/``:

* ``manifest.jsonl``: every remote file this tool wrote (key, remote version, local files
  with sizes and checksums), one JSON object per line after a version line, so that it is
  read and written one record at a time (100,000 files must not need a giant document in
  memory). Rewritten only whole: temp file, fsync, rename.
* ``journal-<run>.jsonl``: one line per finished remote file, appended during a run and
  flushed at once, so a run killed at any moment loses nothing it finished. The next run
  replays it; a torn last line is ignored. Folded into the manifest at the end of a run.
* ``lock/``: made with ``mkdir``, which is atomic on NFS as on local disks; it names its
  holder (host, pid, start). No POSIX/fcntl locks and no SQLite (its locking and WAL
  shared memory are not reliable on network filesystems).
* ``tmp/``: downloads in progress, on the dropoff's own filesystem so the final
  ``rename`` into place is atomic; emptied at the start of every run.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import PreflightError

STATE_DIR = ".clpipe-sync"
FSYNC_EVERY = 1.0  # seconds between journal fsyncs (a flush happens after every line)


@dataclass(slots=True)
class Record:
    """What one remote file became locally."""

    key: str
    signature: list  # [size, modified, checksum] of the remote version written
    files: list  # [[relative path, size, sha256 or ""], ...]

    def to_json(self) -> dict:
        return {"key": self.key, "sig": self.signature, "files": self.files}

    @classmethod
    def from_json(cls, data: dict) -> "Record":
        return cls(data["key"], list(data["sig"]), [list(f) for f in data["files"]])


def _write_atomic(path: Path, text: str | Iterator[str]) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "w", encoding="utf-8") as fh:
        fh.writelines([text] if isinstance(text, str) else text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temp, path)
    _fsync_dir(path.parent)


MANIFEST = "manifest.jsonl"
MANIFEST_VERSION = '{"clpipe_sync_manifest": 2}\n'


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Series instances are staged in their own folder under a hidden name of this form (never
# *.dcm): .clpipe-<run token>-<n>.part, then renamed in place.
PART_PREFIX, PART_SUFFIX = ".clpipe-", ".part"


def clear_stale_parts(folder: Path, token: str = "") -> None:
    """Remove instances staged in ``folder`` by earlier runs that were killed before they
    renamed them (all but those of the run ``token``; the dropoff's lock means no other
    run is live)."""
    mine = f"{PART_PREFIX}{token}-" if token else None
    try:
        with os.scandir(folder) as it:
            stale = [e.path for e in it if e.name.startswith(PART_PREFIX) and e.name.endswith(PART_SUFFIX)
                     and not (mine and e.name.startswith(mine)) and e.is_file(follow_symlinks=False)]
    except OSError:
        return
    for path in stale:
        try:
            os.unlink(path)
        except OSError:
            pass


@dataclass
class SyncState:
    """Manifest + journal + lock of one dropoff."""

    dropoff: Path
    run_id: str
    # key -> the record's JSON line: a string costs a third of the parsed lists, which matters
    # with 100,000 files; a record is parsed only when it is looked at.
    _lines: dict[str, str] = field(default_factory=dict)
    _journal: object = None
    _last_fsync: float = 0.0
    _changed: bool = False  # anything to fold into the manifest?

    @property
    def root(self) -> Path:
        return self.dropoff / STATE_DIR

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    # -- lock -------------------------------------------------------------------------

    def acquire(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        lock = self.root / "lock"
        for _ in range(2):
            try:
                lock.mkdir()
            except FileExistsError:
                owner = self._lock_owner(lock)
                if owner.get("host") == socket.gethostname() and not _pid_alive(owner.get("pid", -1)):
                    shutil.rmtree(lock, ignore_errors=True)  # its holder died on this host
                    continue
                raise PreflightError(
                    f"another sync is writing to {self.dropoff} (host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, "
                    f"since {owner.get('since', '?')}); wait for it, or if it is no longer running remove {lock}"
                ) from None
            _write_atomic(lock / "owner.json", json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                           "since": time.strftime("%Y-%m-%d %H:%M:%S"), "run": self.run_id}))
            return
        raise PreflightError(f"cannot take the lock {lock}; remove it if no sync is running")

    @staticmethod
    def _lock_owner(lock: Path) -> dict:
        try:
            return json.loads((lock / "owner.json").read_text())
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        shutil.rmtree(self.root / "lock", ignore_errors=True)

    # -- manifest and journal -----------------------------------------------------------

    def load(self) -> None:
        """Read the manifest, then replay journals left by earlier (possibly killed) runs."""
        path = self.root / MANIFEST
        if path.exists():
            self._read_lines(path)  # an unreadable line is skipped: its files are checked and adopted again
        for journal in sorted(self.root.glob("journal-*.jsonl")):
            self._changed = True
            self._read_lines(journal)  # a line torn by a kill is skipped the same way
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._sweep_staging()

    # -- series being staged (DICOM sources) ----------------------------------------------
    # A series is staged in its own folder under hidden names (PART_PREFIX ... PART_SUFFIX)
    # and renamed in place. While that is under way a marker in staging/ names
    # the folder, so that the parts of a run killed half-way (a walltime limit, kill -9) are
    # removed by the next run's load, whether or not that series is fetched again.

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    def begin_staging(self, folder: Path, made: bool, name: str) -> Path:
        """Mark ``folder`` as being staged into (``made``: this fetch created it)."""
        self.staging.mkdir(parents=True, exist_ok=True)
        marker = self.staging / name
        marker.write_text(json.dumps({"folder": str(folder), "made": made}), encoding="utf-8")
        return marker

    @staticmethod
    def end_staging(marker: Path) -> None:
        marker.unlink(missing_ok=True)

    def _sweep_staging(self) -> None:
        if not self.staging.is_dir():
            return
        for marker in self.staging.iterdir():
            try:
                data = json.loads(marker.read_text(encoding="utf-8"))
                folder = Path(data["folder"])
                if folder.is_dir() and self.dropoff in folder.parents:
                    clear_stale_parts(folder)
                    if data.get("made") and not any(os.scandir(folder)):
                        folder.rmdir()
            except (OSError, ValueError, KeyError, TypeError):
                pass  # a marker torn by the kill: its folder's parts go when that series is fetched again
            marker.unlink(missing_ok=True)

    def _read_lines(self, path: Path) -> None:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    data = json.loads(line)
                    key = data["key"]
                    if not isinstance(key, str) or not isinstance(data["sig"], list) or not isinstance(data["files"], list):
                        continue
                except (ValueError, KeyError, TypeError):
                    continue
                self._lines[key] = line.rstrip("\n")

    # -- records ------------------------------------------------------------------------

    def get(self, key: str) -> Record | None:
        line = self._lines.get(key)
        if line is None:
            return None
        data = json.loads(line)
        return Record(data["key"], data["sig"], data["files"])

    def __contains__(self, key: str) -> bool:
        return key in self._lines

    def __len__(self) -> int:
        return len(self._lines)

    def keys(self) -> list[str]:
        return list(self._lines)

    def record(self, record: Record) -> None:
        """Note a finished remote file: journal line, flushed now, fsynced every second."""
        if self._journal is None:
            self._journal = open(self.root / f"journal-{self.run_id}.jsonl", "a", encoding="utf-8")
        line = json.dumps(record.to_json(), separators=(",", ":"))
        self._journal.write(line + "\n")
        self._journal.flush()
        now = time.monotonic()
        if now - self._last_fsync >= FSYNC_EVERY:
            os.fsync(self._journal.fileno())
            self._last_fsync = now
        self._lines[record.key] = line
        self._changed = True

    def forget(self, key: str) -> None:
        self._lines.pop(key, None)
        self._changed = True

    def save(self) -> None:
        """Fold everything into manifest.jsonl and drop the journals."""
        if self._journal is not None:
            self._journal.flush()
            os.fsync(self._journal.fileno())
            self._journal.close()
            self._journal = None
        if self._changed or not (self.root / MANIFEST).exists():  # a no-op run rewrites nothing
            lines = (self._lines[k] + "\n" for k in sorted(self._lines))
            _write_atomic(self.root / MANIFEST, itertools.chain([MANIFEST_VERSION], lines))
            self._changed = False
        for journal in self.root.glob("journal-*.jsonl"):
            journal.unlink(missing_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{int(pid)}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
