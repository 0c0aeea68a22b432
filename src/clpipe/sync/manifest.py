"""The sync state kept in the dropoff: manifest, journal and lock, safe on NFS/GPFS/Lustre.

Layout, under ``<dropoff>/.clpipe-sync/``:

* ``manifest.jsonl``: every remote file this tool wrote (key, remote version, local files
  with sizes and checksums), one JSON object per line after a version line, sorted by key,
  so that it is read and written one record at a time. A run holds only an index of it
  (:class:`_Index`: 16 to 32 bytes a record; a million files must not cost a million
  records in memory) and reads a record's line when it looks at it. Rewritten only whole:
  temp file, fsync, rename; the records of the file and those this run changed are merged
  as they are written.
* ``journal-<run>.jsonl``: one line per finished remote file, appended during a run and
  flushed at once, so a run killed at any moment loses nothing it finished. The next run
  replays it; a torn last line is ignored. Folded into the manifest at the end of a run.
* ``lock/``: names its holder (host, pid, start) in ``lock/owner.json``, written whole in a
  folder of its own and renamed to ``lock``: ``rename`` onto a name that does not exist is
  atomic on NFS as on local disks, so a lock never exists without its owner. A stale one
  (its holder gone from this host) is broken by exactly one of several racing runs: the one
  whose claim, renamed into it, lands first (see :meth:`SyncState.acquire`). No POSIX/fcntl
  locks and no SQLite (its locking and WAL shared memory are not reliable on network
  filesystems).
* ``tmp/``: downloads in progress (files, zip members, DICOM instances), on the dropoff's
  own filesystem so the final ``rename`` into place is atomic; emptied at the start of every
  run. Nothing half-written is ever in a folder that converters read.
"""

from __future__ import annotations

import bisect
import errno
import heapq
import itertools
import json
import os
import shutil
import socket
import time
import uuid
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

from ..errors import PreflightError
from ..layout import STATE_DIR  # the dropoff's state folder: part of its layout (sources skip it too)
from ..spill import SortedSpill
from .fileio import write_whole

LOCK, OWNER = "lock", "owner.json"
LOCK_GRACE = 30.0  # seconds after which a lock without owner (an older clpipe's, killed while taking it) is stale
FSYNC_EVERY = 1.0  # seconds between journal fsyncs (a flush happens after every line)


@dataclass(slots=True)
class Record:
    """What one remote file became locally."""

    key: str
    signature: list  # [size, modified, checksum] of the remote version written
    files: list  # [[relative path, size, sha256 or ""], ...]

    def to_json(self) -> dict:
        return {"key": self.key, "sig": self.signature, "files": self.files}


MANIFEST = "manifest.jsonl"
MANIFEST_VERSION = '{"clpipe_sync_manifest": 2}\n'
#: the last line of a manifest :meth:`SyncState.save` wrote: its records are in key order,
#: one a line (a line appended by anything else comes after it, and the file is read whole)
MANIFEST_END = '{{"clpipe_sync_manifest_end":{{"records":{}}}}}\n'


@dataclass
class SyncState:
    """Manifest + journal + lock of one dropoff."""

    dropoff: Path
    run_id: str
    # key -> the record's JSON line without its key (``{"sig":...,"files":...}``, see
    # _line), for the records of journals and of this run (and the rare manifest line not
    # in the form this module writes); they win over the manifest's (_index). A record is
    # parsed only when it is looked at.
    _lines: dict[str, str] = field(default_factory=dict)
    _index: _Blocks | _Index | None = None  # where each record of manifest.jsonl is in it
    _gone: set[str] = field(default_factory=set)  # keys of the manifest forgotten (or found damaged) since
    _journal: TextIO | None = None
    _torn: bool = False  # a journal write failed (a full disk): the next line starts on a line of its own
    _last_fsync: float = 0.0
    _changed: bool = False  # anything to fold into the manifest?
    _lock_token: str = ""  # the token in the owner.json of the lock this run holds
    #: the merge after an array job (sync/shards.py): every shard task has ended, so a
    #: shard's lock left behind (a task killed on another node) is stale
    shards_ended: bool = False

    @property
    def root(self) -> Path:
        return self.dropoff / STATE_DIR

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    # -- lock -------------------------------------------------------------------------
    # The lock is the folder lock/ holding owner.json (host, pid, start, a token). It is
    # written whole in a folder of its own (lock.new.<rand>.<pid>.<host>) and renamed to
    # lock/: a rename onto a name that does not exist is atomic, on NFS as on local disks,
    # so a lock never exists without its owner.
    #
    # A stale lock is broken by one run only. Having judged it (through an open handle of
    # that very folder, so a lock taken in its place meanwhile is never mistaken for it), a
    # run claims it by renaming its own staged folder into it as claim-<n>, n one more than
    # the newest claim there: of several runs racing, one rename succeeds. Only the claimer
    # moves the lock away (to lock.old.<rand>, removed afterwards) and renames its claim to
    # lock/. A claimer killed half-way leaves a claim naming a dead process (or, from
    # another host, one older than LOCK_GRACE): the next run claims claim-<n+1>.

    def acquire(self) -> None:
        """Take the dropoff's lock, or raise :class:`PreflightError` saying who holds it.

        A lock is stale when its owner's process is gone from this host, or (a lock without
        owner, left by an older clpipe killed while taking it) when it is older than
        ``LOCK_GRACE``; a stale lock is broken and taken. A lock held from another host is
        honoured: this host cannot tell whether that job still runs."""
        lock = self.root / LOCK
        staged: Path | None = None
        token = ""
        try:
            for _ in range(6):  # bounded: a broken lock is taken at once, or lost to another run
                if staged is None or not os.path.isdir(staged):  # (swept if this run was stopped for long)
                    staged, token = self._stage_lock(lock)
                if not os.path.lexists(lock):  # (a rename would replace an empty folder: an older clpipe's lock)
                    try:
                        os.rename(staged, lock)
                    except FileNotFoundError:
                        continue
                    except OSError as exc:
                        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                            raise PreflightError(
                                f"cannot take the lock {lock} ({exc.strerror}); check that {self.dropoff} is writable"
                            ) from None
                    else:
                        staged = None
                        break
                if self._take_over(lock, staged):
                    staged = None
                    break
            else:
                raise PreflightError(f"cannot take the lock {lock}; remove it if no sync is running")
        finally:
            if staged is not None:
                _remove(staged)
        self._lock_token = token
        self._sweep_lock_leftovers()
        self._check_others()

    def _check_others(self) -> None:
        """Refuse (the lock released) while a shard task of an array job writes to the
        dropoff: each has a lock of its own (``shard-<i>/lock``, sync/shards.py)."""
        if self.shards_ended:
            return
        for lock in sorted(self.root.glob(f"shard-*/{LOCK}")):
            holder = lock_holder(lock)
            if holder is not None:
                self.release()
                raise PreflightError(
                    f"a shard of a sharded sync is writing to {self.dropoff} ({holder}); wait for its array job, "
                    f"or if it is no longer running remove {lock}"
                )

    def _stage_lock(self, lock: Path) -> tuple[Path, str]:
        """A folder holding this run's owner.json, whole and flushed, ready to be renamed."""
        token = uuid.uuid4().hex[:16]
        host = socket.gethostname()
        staged = lock.with_name(f"{LOCK}.new.{token}.{os.getpid()}.{host}")
        owner = {
            "host": host,
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "run": self.run_id,
            "start": _process_start(os.getpid()),
            "token": token,
        }
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staged.mkdir()
            with open(staged / OWNER, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(owner))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            _remove(staged)
            raise PreflightError(f"cannot take the lock {lock} ({exc.strerror}); check that {self.dropoff} is writable") from None
        return staged, token

    def _take_over(self, lock: Path, staged: Path) -> bool:
        """Break the lock at ``lock`` if it is stale and take it with ``staged``. True: taken;
        False: it changed meanwhile, try again; PreflightError: it is held (or being broken)."""
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise PreflightError(f"{lock} is not a folder (no lock of clpipe's); remove it if no sync is running") from None
            raise PreflightError(f"cannot read the lock {lock} ({exc.strerror}); check that {self.dropoff} is readable") from None
        away = lock.with_name(f"{LOCK}.old.{uuid.uuid4().hex[:16]}")
        moved_away = False
        try:
            try:  # its age first: a claim made in it from now on makes it look younger
                now = os.stat(staged).st_mtime  # the filesystem's clock (on NFS the server's), as the ages below
                age = now - os.fstat(fd).st_mtime
            except OSError:
                return False
            owner, claims = _inspect_lock(fd)
            if not claims:  # a lock that some run found stale is stale: only its claims tell whether it is being broken
                if not _gone(owner, age, other_host=False):
                    raise PreflightError(self._busy(lock, owner, age))
            elif not _gone(claims[-1][1], now - claims[-1][2], other_host=True):
                raise PreflightError(self._busy(lock, claims[-1][1], None, breaking=True))
            claim = f"claim-{claims[-1][0] + 1 if claims else 1}"
            try:
                os.rename(staged, claim, dst_dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):  # another run claimed it first
                    raise PreflightError(self._busy(lock, {}, None, breaking=True)) from None
                return False  # removed meanwhile
            # This run alone breaks that lock now: nobody else moves it from lock/. Unless it
            # left lock/ already: a run that judged it too took it over meanwhile (its claim
            # gone from the old folder, which it has not removed yet), and lock/ is that run's
            # now: never moved, not even for an instant (a third run could take lock/ then).
            now_at, held = _lstat(lock), os.fstat(fd)
            if now_at is None or (now_at.st_dev, now_at.st_ino) != (held.st_dev, held.st_ino):
                _rename_quietly(claim, staged, src_dir_fd=fd)  # take the claim back, then try again
                return False
            try:
                os.rename(lock, away)
            except OSError:
                _rename_quietly(claim, staged, src_dir_fd=fd)  # take the claim back, then try again
                return False
            moved = _lstat(away)
            if moved is None or (moved.st_dev, moved.st_ino) != (held.st_dev, held.st_ino):
                _rename_quietly(away, lock)  # not the lock judged (cannot happen while claims are honoured)
                raise PreflightError(self._busy(lock, {}, None, breaking=True))
            moved_away = True
            try:
                os.rename(away / claim, lock)
            except OSError:  # a run took lock/ meanwhile
                _rename_quietly(away / claim, staged)
                return False
            return True
        finally:
            os.close(fd)  # before the removal: an open folder may not be removable on a network filesystem
            if moved_away:
                _remove(away)

    def _busy(self, lock: Path, owner: dict, age: float | None, breaking: bool = False) -> str:
        if breaking:
            what = (f"host {owner['host']}, pid {owner.get('pid', '?')}, " if owner.get("host") else "") + "taking over a stale lock"
        elif owner:
            what = f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, since {owner.get('since', '?')}"
        else:
            wait = f"{max(1, round(LOCK_GRACE - age))} s" if age is not None else f"{LOCK_GRACE:.0f} s"
            return (
                f"another sync is writing to {self.dropoff} (its lock {lock} has no owner yet); wait for it: "
                f"a lock without owner is stale after {LOCK_GRACE:.0f} s, so if no sync is running run again in {wait}"
            )
        return f"another sync is writing to {self.dropoff} ({what}); wait for it, or if it is no longer running remove {lock}"

    def _sweep_lock_leftovers(self) -> None:
        """Remove what killed runs left beside the lock: locks moved away to be removed
        (lock.old.*), and lock folders staged but never renamed (lock.new.*) whose process
        is gone from this host or that are older than LOCK_GRACE."""
        lock = self.root / LOCK
        host = socket.gethostname()
        try:
            with os.scandir(self.root) as it:
                names = [e.name for e in it if e.name.startswith(f"{LOCK}.")]
        except OSError:
            return
        for name in names:
            path = self.root / name
            if name.startswith(f"{LOCK}.old."):
                _remove(path)
            elif name.startswith(f"{LOCK}.new."):
                _, _, _, pid, owner_host = (name.split(".", 4) + [""] * 5)[:5]
                age = _age(path, lock)
                if (owner_host == host and not _pid_alive(pid)) or (age is not None and age > LOCK_GRACE):
                    _remove(path)

    def release(self) -> None:
        """Remove the lock, if it is still this run's (and close the manifest: its records
        are not read after this)."""
        self.close_manifest()
        token, self._lock_token = self._lock_token, ""
        if not token:
            return
        lock = self.root / LOCK
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            if _parse_owner(_read_at(fd, OWNER)).get("token") != token:
                return  # broken and taken by another run (this one was stopped for long): not ours to remove
            away = lock.with_name(f"{LOCK}.old.{uuid.uuid4().hex[:16]}")
            try:
                os.rename(lock, away)
            except OSError:
                return
            held, moved = os.fstat(fd), _lstat(away)
            if moved is None or (moved.st_dev, moved.st_ino) != (held.st_dev, held.st_ino):
                _rename_quietly(away, lock)
                return
        finally:
            os.close(fd)
        _remove(away)

    # -- manifest and journal -----------------------------------------------------------

    def load(self) -> None:
        """Read the manifest, then replay journals left by earlier (possibly killed) runs."""
        path = self.root / MANIFEST
        if path.exists():
            self._read_manifest(path)  # an unreadable line is skipped: its files are checked and adopted again
        for journal in sorted(self.root.glob("journal-*.jsonl")):
            self._changed = True
            self._read_lines(journal)  # a line torn by a kill is skipped the same way
        for journal in sorted(self.root.glob("shard-*/journal-*.jsonl")):  # a sharded sync's tasks (sync/shards.py): merged here
            self._changed = True
            self._read_lines(journal)
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def _read_manifest(self, path: Path) -> None:
        """Index ``path`` (a manifest). Sorted by key, as this module writes it: only the
        first key of each 64 KB block of it is held (:class:`_Blocks`), and a block's
        records are parsed when one of them is looked up; else (written by another tool, or
        appended to) each record line by its key's hash (:class:`_Index`). A line not of
        the form this module writes is parsed and held (:meth:`_parse`)."""
        self.close_manifest()
        handle = open(path, "rb")  # noqa: SIM115 (kept open: records are read from it as they are looked at; close_manifest)
        try:
            sampled = _sampled_blocks(handle)
            if sampled is not None:  # as save() wrote it: only a line a block is read (not a million)
                self._index = sampled
                return
            starts: list[int] = []
            firsts: list[str] = []
            others = []
            offset = count = boundary = 0
            last = ""
            ordered = True
            for raw in handle:
                start, offset = offset, offset + len(raw)
                key = _key_of(raw)
                if key is None:
                    others.append(raw.decode("utf-8", "replace"))
                    continue
                count += 1
                if key <= last:
                    ordered = False  # (a key twice, too: the later line wins, as in a dict)
                last = key
                if start >= boundary:
                    starts.append(start)
                    firsts.append(key)
                    boundary = start + CACHE_BLOCK
            if ordered:
                index: _Blocks | _Index = _Blocks(handle, starts, firsts, offset)
            else:
                index = _Index(handle, count)
                handle.seek(0)
                offset = 0
                for raw in handle:
                    start, offset = offset, offset + len(raw)
                    key = _key_of(raw)
                    if key is not None:
                        index.add(key, start, len(raw))
        except BaseException:
            handle.close()
            raise
        self._index = index
        self._parse(others)

    def _read_lines(self, path: Path) -> None:
        lines = self._lines
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                # A line this module wrote ({"key":"...","sig":[...],"files":[...]}) is split
                # at its key, which alone is decoded: a million lines are read in a third of
                # the time of parsing each. Its rest is parsed when the record is looked at
                # (get: a damaged one is dropped then). A line that does not end as a whole
                # record does (one torn by a kill) is parsed here, and skipped when broken.
                if line.startswith('{"key":"') and line.endswith(("]]}\n", "[]}\n")):
                    try:
                        key, end = _scan_string(line, 8)
                    except ValueError:
                        continue
                    if line.startswith(',"sig":[', end):
                        lines[key] = "{" + line[end + 1 : -1]
                        continue
                self._parse([line])

    def _parse(self, others: list[str]) -> None:
        """Lines not in the form this module writes: parsed now, each kept when whole."""
        lines = self._lines
        for line in others:
            try:
                data = json.loads(line)
                key = data["key"]
                if not isinstance(key, str) or not isinstance(data["sig"], list) or not isinstance(data["files"], list):
                    continue
            except (ValueError, KeyError, TypeError):
                continue
            lines[key] = json.dumps({"sig": data["sig"], "files": data["files"]}, separators=(",", ":"))

    # -- records ------------------------------------------------------------------------

    def _rest(self, key: str) -> str | None:
        """The record's JSON line without its key, from this run's records or the manifest."""
        rest = self._lines.get(key)
        if rest is None and self._index is not None and key not in self._gone:
            rest = self._index.get(key)
        return rest

    def get(self, key: str) -> Record | None:
        rest = self._rest(key)
        if rest is None:
            return None
        try:
            data = json.loads(rest)
            signature, files = data["sig"], data["files"]
            if not isinstance(signature, list) or not isinstance(files, list):
                raise TypeError(key)
        except (ValueError, KeyError, TypeError):  # a damaged line: as if never recorded (its files are checked again)
            self.forget(key)
            return None
        return Record(key, signature, files)

    def unchanged_file(self, key: str, signature: str, path: str, size: int) -> bool | None:
        """Is ``key`` recorded as one file at ``path`` of ``size`` bytes, for the remote
        version whose signature is ``signature`` (its JSON text)? Answered from the text of
        the record, not parsed: the no-op re-sync of a million files asks it a million
        times. None when the text is not of the plain form (then :meth:`get` it)."""
        rest = self._rest(key)
        if rest is None:
            return False
        head = f'{{"sig":{signature},"files":[["{path}",{size},'
        if not rest.startswith(head):
            return None
        tail = rest[len(head) :]
        return _hash_tail(tail)

    def __contains__(self, key: str) -> bool:
        return self._rest(key) is not None

    # -- the recorded files, checked ahead (sync/engine.py's _Ahead) ---------------------

    def plain_files(self) -> Iterator[tuple[int, list[tuple[str, str, int]]]]:
        """(block number, [(key, path, size), ...]) of the manifest's records of one file
        with a plain path (those :meth:`unchanged_file` answers), block by block in the
        file's order; nothing when the manifest is not read by blocks. Safe in another
        thread: each block is read for this alone (not the lookups' cache)."""
        index = self._index
        if not isinstance(index, _Blocks):
            return
        for number in range(len(index.firsts)):
            yield number, _plain_files(index.span(number))

    def block_of(self, key: str) -> int | None:
        """The number of the manifest block whose record of ``key`` :meth:`unchanged_file`
        reads (as :meth:`plain_files` numbers them), or None when it reads another: this
        run's or a journal's, or a manifest not read by blocks."""
        index = self._index
        if not isinstance(index, _Blocks) or key in self._lines or key in self._gone:
            return None
        return index.number(key)

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def keys(self) -> Iterator[str]:
        """Every key recorded when asked, once (the manifest's in its order, then this run's),
        also while records are written or forgotten meanwhile."""
        mine = list(self._lines)
        return itertools.chain(self._manifest_keys(set(mine), set(self._gone)), mine)

    def _manifest_keys(self, mine: set[str], gone: set[str]) -> Iterator[str]:
        if self._index is not None:
            for key, _, _ in self._index.lines():
                if key not in gone and key not in mine:
                    yield key

    def record(self, record: Record) -> None:
        """Note a finished remote file: journal line, flushed now, fsynced every second.
        A write that fails (a full disk) raises its ``OSError``, and a line it tore is
        skipped when the journal is read; the record is kept all the same, for
        :meth:`save`: its files are in place and whole, and the manifest may fit where
        the journal did not (the run's staged files are gone by then). Only a run that
        cannot save either leaves it unrecorded (the next run fetches it again)."""
        rest = json.dumps({"sig": record.signature, "files": record.files}, separators=(",", ":"))
        line = _line(record.key, rest)  # the same bytes as json.dumps(record.to_json(), separators=(",", ":"))
        self._lines[record.key] = rest
        self._changed = True
        try:
            if self._journal is None:
                self._journal = open(self.root / f"journal-{self.run_id}.jsonl", "a", encoding="utf-8")
            self._journal.write(("\n" if self._torn else "") + line + "\n")
            self._journal.flush()
            self._torn = False
            now = time.monotonic()
            if now - self._last_fsync >= FSYNC_EVERY:
                os.fsync(self._journal.fileno())
                self._last_fsync = now
        except OSError:
            self._torn = True
            self._close_journal()
            raise

    def _close_journal(self) -> None:
        journal, self._journal = self._journal, None
        if journal is None:
            return
        try:
            journal.close()
        except OSError:  # its last write failed again: the file is closed all the same
            pass

    def forget(self, key: str) -> None:
        self._lines.pop(key, None)
        if self._index is not None:
            self._gone.add(key)
        self._changed = True

    def save(self) -> None:
        """Fold everything into manifest.jsonl and drop the journals. A full disk raises
        its ``OSError`` and leaves the manifest as it was and the journals in place (the
        next run replays them)."""
        self.close_journal()
        if self._changed or not (self.root / MANIFEST).exists():  # a no-op run rewrites nothing
            mine = ((k, _line(k, self._lines[k]) + "\n") for k in sorted(self._lines))
            kept: Iterable[tuple[str, str]] = ()
            if self._index is not None:  # the manifest's lines not replaced or forgotten, as they are
                gone, lines = self._gone, self._lines
                kept = ((key, text) for key, _, text in self._index.lines(text=True) if key not in gone and key not in lines)
                if not self._index.sorted:  # sorted on disk first (clpipe/spill.py)
                    kept = _sorted(kept, self.tmp)
            merged = (text for _, text in heapq.merge(kept, mine, key=lambda item: item[0]))

            def fill(fh: TextIO) -> None:
                fh.write(MANIFEST_VERSION)
                count = 0
                for text in merged:
                    fh.write(text)
                    count += 1
                fh.write(MANIFEST_END.format(count))

            write_whole(self.root / MANIFEST, fill, durable=True)
            self._changed = False
        for journal in self.root.glob("journal-*.jsonl"):
            journal.unlink(missing_ok=True)
        for folder in self.root.glob("shard-*"):  # the shard tasks' journals, folded in above, and their leftovers
            for journal in folder.glob("journal-*.jsonl"):
                journal.unlink(missing_ok=True)
            _remove(folder)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def close_manifest(self) -> None:
        """Close the manifest file the index reads records from (forgetting them)."""
        index, self._index = self._index, None
        if index is not None:
            index.close()

    def close_journal(self) -> None:
        """Flush this run's journal to disk and close it (it stays for the next load)."""
        if self._journal is not None:
            try:
                self._journal.flush()
                os.fsync(self._journal.fileno())
            finally:
                self._close_journal()


CACHE_BLOCK = 1 << 16  # bytes of a block of the manifest (_Blocks)
CACHE_BLOCKS = 64  # blocks kept parsed (about 4 MB of records)


_ENDS = (b"]]}\n", b"[]}\n")
_TEXT_ENDS = ("]]}", "[]}")


def _key_end(raw: bytes) -> int:
    """Where the key of a manifest line of the form this module writes (``raw`` with its
    newline) ends, or -1 (not of that form)."""
    if not (raw.startswith(b'{"key":"') and raw.endswith(_ENDS)):
        return -1
    return raw.find(b'","sig":[', 8)


def _key_of(raw: bytes) -> str | None:
    """The key of a manifest line of the form this module writes, or None. Only the key
    is decoded: a million lines are read in a fraction of the time of parsing each."""
    end = _key_end(raw)
    if end < 0:
        return None
    text = raw[8:end]
    return text.decode("utf-8", "replace") if b"\\" not in text else _split(raw)[0]


def _sampled_blocks(handle: BinaryIO) -> _Blocks | None:
    """The blocks of a manifest as :meth:`SyncState.save` wrote it (its version line first,
    :data:`MANIFEST_END` last), found by reading the line that starts each block and the
    one its end cuts, not every line; None for any other file (read whole:
    :meth:`SyncState._read_manifest`)."""
    fd = handle.fileno()
    size = os.fstat(fd).st_size
    first = len(MANIFEST_VERSION)
    if os.pread(fd, first, 0) != MANIFEST_VERSION.encode():
        return None
    tail = os.pread(fd, min(size - first, 256), size - min(size - first, 256))
    cut = tail.rfind(b"\n", 0, len(tail) - 1)
    last = tail[cut + 1 :]
    if not (last.startswith(b'{"clpipe_sync_manifest_end":') and last.endswith(b"\n")) or (cut < 0 and size - len(last) != first):
        return None
    end = size - len(last)  # where the records end
    starts: list[int] = []
    firsts: list[str] = []
    at = first
    while at < end:
        line = _line_at(fd, at, end)
        key = _key_of(line)
        if key is None or (firsts and key <= firsts[-1]):  # not as save() writes it: read whole
            return None
        starts.append(at)
        firsts.append(key)
        at += CACHE_BLOCK - 1  # the next block starts after the newline at or after here
        at += len(_line_at(fd, at, end))
    return _Blocks(handle, starts, firsts, end)


def _line_at(fd: int, start: int, end: int) -> bytes:
    """The line of the file ``fd`` that starts at ``start``, with its newline (up to ``end``)."""
    parts = []
    while start < end:
        chunk = os.pread(fd, min(4096, end - start), start)
        if not chunk:
            break
        cut = chunk.find(b"\n")
        if cut >= 0:
            parts.append(chunk[: cut + 1])
            break
        parts.append(chunk)
        start += len(chunk)
    return b"".join(parts)


def _records(raw: bytes) -> dict[str, str]:
    """key -> rest of the record (``{"sig":...,"files":...}``) of every line of ``raw`` (a
    span of a manifest from a line's start) of the form this module writes, ending with its
    newline. The span is decoded at once and each key cut from the text (a no-op re-sync of
    a million files parses every block of its manifest)."""
    found: dict[str, str] = {}
    lines = raw.decode("utf-8", "replace").split("\n")
    lines.pop()  # what follows the last newline: nothing, or a line without its newline (parsed at load)
    for line in lines:
        if not (line.startswith('{"key":"') and line.endswith(_TEXT_ENDS)):
            continue
        end = line.find('","sig":[', 8)
        if end < 0:
            continue
        key = line[8:end]
        if "\\" not in key:
            found[key] = "{" + line[end + 2 :]
            continue
        try:  # a key with escapes: scanned as JSON
            key, end = _scan_string(line, 8)
        except ValueError:
            continue
        if line.startswith(',"sig":[', end):
            found[key] = "{" + line[end + 1 :]
    return found


_FILES = '],"files":[["'


def _hash_tail(tail: str) -> bool:
    """Is ``tail`` the end of a record of one file after its size: ``"<hash>"]]}``?"""
    return tail.endswith('"]]}') and tail[0] == '"' and tail.count('"') == 2


def _plain_files(raw: bytes) -> list[tuple[str, str, int]]:
    """(key, path, size) of each record in ``raw`` (as :func:`_records` reads it) that is of
    one file whose path needs no JSON escapes (``{"sig":[...],"files":[["<path>",<size>,
    "<hash>"]]}``): the records :meth:`SyncState.unchanged_file` answers."""
    found = []
    for key, rest in _records(raw).items():
        at = rest.find(_FILES)
        if at < 0:
            continue
        at += len(_FILES)
        end = rest.find('",', at)
        comma = rest.find(",", end + 2)
        if end < 0 or comma < 0 or "\\" in rest[at:end]:
            continue
        tail = rest[comma + 1 :]
        if not _hash_tail(tail):
            continue
        try:
            size = int(rest[end + 2 : comma])
        except ValueError:
            continue
        found.append((key, rest[at:end], size))
    return found


def _read_span(fd: int, start: int, stop: int) -> bytes:
    """The bytes of the file ``fd`` from ``start`` to ``stop`` (fewer at its end)."""
    parts = []
    while start < stop:
        chunk = os.pread(fd, stop - start, start)
        if not chunk:
            break
        parts.append(chunk)
        start += len(chunk)
    return b"".join(parts)


def _split(raw: bytes) -> tuple[str | None, str]:
    """(key, rest of the record: ``{"sig":...,"files":...}``) of a manifest line ((None,
    "") when it is not of the form this module writes)."""
    line = raw.decode("utf-8", "replace")
    try:
        key, end = _scan_string(line, 8)
    except ValueError:
        return None, ""
    if not line.startswith(',"sig":[', end):
        return None, ""
    return key, "{" + line[end + 1 : -1]


def _chunked_lines(fd: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(offset, line with its newline) of every line of the file ``fd`` from ``start`` (a
    line's start) to ``stop``, read 1 MB at a time."""
    offset, rest = start, b""
    while stop is None or offset < stop:
        chunk = os.pread(fd, 1 << 20 if stop is None else min(1 << 20, stop - offset), offset)
        if not chunk:
            break
        offset += len(chunk)
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        at = offset - len(rest) - sum(len(line) + 1 for line in lines)
        for line in lines:
            yield at, line + b"\n"
            at += len(line) + 1
    if rest:
        yield offset - len(rest), rest


class _Blocks:
    """Where the records of a manifest sorted by key are: the first key of each block of
    about 64 KB (a million records: about 2,500 keys held). A lookup finds its block by
    bisection and parses the whole block into a dict, kept among the newest
    ``CACHE_BLOCKS``: the records of one container are neighbours in the file, and the
    listing gives a container's files together."""

    sorted = True

    def __init__(self, handle: BinaryIO, starts: list[int], firsts: list[str], size: int) -> None:
        self._handle, self._fd = handle, handle.fileno()
        self._starts, self._firsts, self._size = starts, firsts, size
        self._cache: dict[int, dict[str, str]] = {}

    def _block(self, number: int) -> dict[str, str]:
        found = self._cache.get(number)
        if found is None:
            if len(self._cache) >= CACHE_BLOCKS:
                del self._cache[next(iter(self._cache))]  # the oldest
            found = self._cache[number] = _records(self.span(number))
        return found

    @property
    def firsts(self) -> list[str]:
        return self._firsts

    def number(self, key: str) -> int:
        """The block ``key`` would be in (-1: before the first)."""
        return bisect.bisect_right(self._firsts, key) - 1

    def span(self, number: int) -> bytes:
        """Block ``number``'s bytes, read anew (not cached)."""
        stop = self._starts[number + 1] if number + 1 < len(self._starts) else self._size
        return _read_span(self._fd, self._starts[number], stop)

    def get(self, key: str) -> str | None:
        number = self.number(key)
        return self._block(number).get(key) if number >= 0 else None

    def lines(self, text: bool = False) -> Iterator[tuple[str, int, str]]:
        """(key, offset, the line if ``text``) of every record line, in the file's order."""
        for start, raw in _chunked_lines(self._fd):
            key = _key_of(raw)
            if key is not None:
                yield key, start, raw.decode("utf-8", "replace") if text else ""

    def close(self) -> None:
        self._handle.close()


class _Index:
    """Where each record line of a manifest file is: the 64-bit hash of its key -> its
    offset and length, in two arrays (open addressing: 16 bytes a slot, at most 70 % of
    the slots used). A key is checked against the line it finds (two keys may share a
    hash); a later line of one key wins, as it would in a dict."""

    LOAD = 0.7

    def __init__(self, handle: BinaryIO, lines: int) -> None:
        self._handle = handle
        self._fd = handle.fileno()
        size = 1 << max(10, int(lines / self.LOAD + 1).bit_length())
        self._mask = size - 1
        self._hashes = array("q", bytes(8 * size))  # 0: a free slot
        self._where = array("q", bytes(8 * size))  # offset << 24 | length (a longer line: _long)
        self._long: dict[int, tuple[int, int]] = {}  # slot -> (offset, length) of a line of 16 MB or more
        self.count = 0
        self.sorted = False  # (an index of a file not in key order: saving sorts it)

    @staticmethod
    def _hash(key: str) -> int:
        return hash(key) or 1

    def _read(self, slot: int) -> tuple[str, str, int]:
        """(key, rest of the record, offset) of the line a slot points to."""
        where = self._where[slot]
        offset, length = self._long[slot] if where < 0 else (where >> 24, where & 0xFFFFFF)
        key, rest = _split(os.pread(self._fd, length, offset))
        return key or "", rest, offset

    def add(self, key: str, offset: int, length: int) -> None:
        if self.count + 1 > self.LOAD * (self._mask + 1):
            self._grow()
        value, mask = self._hash(key), self._mask
        slot = value & mask
        hashes = self._hashes
        while hashes[slot]:
            if hashes[slot] == value and self._read(slot)[0] == key:
                break  # the same key again: the later line wins
            slot = (slot + 1) & mask
        else:
            self.count += 1
        hashes[slot] = value
        if length < 1 << 24:
            self._where[slot] = offset << 24 | length
        else:
            self._where[slot] = -1
            self._long[slot] = (offset, length)

    def _grow(self) -> None:
        """Twice the slots, every member moved over from the old arrays (no list of them)."""
        hashes, wheres, longs = self._hashes, self._where, self._long
        size = 2 * (self._mask + 1)
        self._mask, self._hashes, self._where, self._long = size - 1, array("q", bytes(8 * size)), array("q", bytes(8 * size)), {}
        mask, new_hashes, new_wheres = self._mask, self._hashes, self._where
        for old, value in enumerate(hashes):
            if value:
                slot = value & mask
                while new_hashes[slot]:
                    slot = (slot + 1) & mask
                new_hashes[slot], new_wheres[slot] = value, wheres[old]
                if old in longs:
                    self._long[slot] = longs[old]

    def get(self, key: str) -> str | None:
        value, mask, hashes = self._hash(key), self._mask, self._hashes
        slot = value & mask
        while hashes[slot]:
            if hashes[slot] == value:
                found, rest, _ = self._read(slot)
                if found == key:
                    return rest
            slot = (slot + 1) & mask
        return None

    def _slot(self, key: str) -> int:
        value, mask, hashes = self._hash(key), self._mask, self._hashes
        slot = value & mask
        while hashes[slot]:
            if hashes[slot] == value and self._read(slot)[0] == key:
                return slot
            slot = (slot + 1) & mask
        return -1

    def lines(self, text: bool = False) -> Iterator[tuple[str, int, str]]:
        """(key, offset, the line if ``text``) of every indexed line, in the file's order,
        each key once (its line the index points to)."""
        for start, raw in _chunked_lines(self._fd):
            key = _key_of(raw)
            if key is None:
                continue
            slot = self._slot(key)
            if slot < 0 or self._read(slot)[2] != start:
                continue  # a line of a key that a later line replaced
            yield key, start, raw.decode("utf-8", "replace") if text else ""

    def close(self) -> None:
        self._handle.close()


def _sorted(items: Iterable[tuple[str, str]], folder: Path) -> Iterator[tuple[str, str]]:
    with SortedSpill(folder) as spill:
        for item in items:
            spill.append(item)
        yield from spill


def is_plain(text: str) -> bool:
    """Is ``text`` its own JSON string's content (printable ASCII, no ``"`` or ``\\``)?"""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


def signature_text(signature: list) -> str:
    """A remote version's signature as a record's JSON has it; the usual [size, modified,
    checksum] made without the JSON encoder (the same text)."""
    if len(signature) == 3:
        size, modified, checksum = signature
        if type(size) is int and type(modified) is float and modified - modified == 0 and type(checksum) is str and is_plain(checksum):
            return f'[{size},{modified!r},"{checksum}"]'
    return json.dumps(signature, separators=(",", ":"))


def lock_holder(lock: Path) -> str | None:
    """Who holds the lock folder ``lock`` ("host H, pid P, since S"), or None when there
    is none or it is stale (its process gone from this host; one without owner older than
    ``LOCK_GRACE``). A lock of another host is held: this host cannot tell."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        age = time.time() - os.fstat(fd).st_mtime
        owner, _ = _inspect_lock(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    if _gone(owner, age, other_host=False):
        return None
    if not owner:
        return "a lock being taken"
    return f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, since {owner.get('since', '?')}"


_scan_string = json.decoder.scanstring  # type: ignore[attr-defined]  # (C) a JSON string at an offset: (text, end)


def _line(key: str, rest: str) -> str:
    """A record's manifest line from its key and the rest of its JSON object."""
    return f'{{"key":{json.dumps(key)},{rest[1:]}'


def _pid_alive(pid: object, start: str = "") -> bool:
    """Whether process ``pid`` of this host runs (and, when ``start`` is known, is the one
    that started then, not a later process given the same pid)."""
    try:
        number = int(str(pid))
    except ValueError:
        return False
    if number <= 0:
        return False
    try:
        os.kill(number, 0)
    except PermissionError:
        pass  # it runs, as another user
    except (OSError, OverflowError):
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{number}/stat") as fh:
            if fh.read().rsplit(")", 1)[-1].split()[0] == "Z":
                return False
    except (OSError, IndexError):
        return True
    return not start or _process_start(number) in ("", start)


def _process_start(pid: int) -> str:
    """When process ``pid`` started ("<boot id>:<clock ticks since boot>"), or "" where
    /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            ticks = fh.read().rsplit(")", 1)[-1].split()[19]
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return f"{fh.read().strip()}:{ticks}"
    except (OSError, IndexError):
        return ""


def _parse_owner(text: str) -> dict:
    try:
        owner = json.loads(text)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _gone(owner: dict, age: float, other_host: bool) -> bool:
    """Whether the run named by ``owner`` (a lock's or a claim's, ``age`` seconds old) is
    gone: its process has ended on this host; one of another host only when ``other_host``
    (a claim, held for an instant) and older than LOCK_GRACE; a lock or claim without
    owner once older than LOCK_GRACE."""
    if owner.get("host") == socket.gethostname():
        return not _pid_alive(owner.get("pid", -1), owner.get("start", ""))
    if owner and not other_host:
        return False  # held from another host: only its user can tell whether that job still runs
    return age > LOCK_GRACE


def _read_at(fd: int, name: str) -> str:
    try:
        handle = os.open(name, os.O_RDONLY, dir_fd=fd)
    except OSError:
        return ""
    try:
        with open(handle, encoding="utf-8", errors="replace") as fh:
            return fh.read(65536)
    except OSError:
        return ""


def _inspect_lock(fd: int) -> tuple[dict, list[tuple[int, dict, float]]]:
    """The owner of the open lock folder ``fd`` ({}: none) and its claims, oldest first:
    (n, the claimer, mtime). An older clpipe killed before it renamed its owner file into
    place left only ``.owner.json.<pid>.tmp``: that names the owner when it is whole."""
    owner = _parse_owner(_read_at(fd, OWNER))
    claims = []
    temps = []
    try:
        with os.scandir(fd) as it:
            for entry in it:
                if entry.name.startswith("claim-") and entry.name[6:].isdigit():
                    try:
                        mtime = entry.stat(follow_symlinks=False).st_mtime
                    except OSError:
                        continue
                    claims.append((int(entry.name[6:]), _parse_owner(_read_at(fd, f"{entry.name}/{OWNER}")), mtime))
                elif entry.name.startswith(f".{OWNER}.") and entry.name.endswith(".tmp"):
                    temps.append(entry.name)
    except OSError:
        pass
    for temp in temps:
        owner = owner or _parse_owner(_read_at(fd, temp))
    return owner, sorted(claims, key=lambda c: c[0])


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def _rename_quietly(src: str | Path, dst: str | Path, src_dir_fd: int | None = None) -> None:
    try:
        os.rename(src, dst, src_dir_fd=src_dir_fd)
    except OSError:
        pass


def _age(path: Path, reference: Path) -> float | None:
    """Seconds from ``path``'s last change to ``reference``'s, both by the filesystem's
    clock (on NFS the server's: a client's clock that is off does not matter); None when
    either is gone."""
    try:
        return os.stat(reference).st_mtime - os.lstat(path).st_mtime
    except OSError:
        return None


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass
