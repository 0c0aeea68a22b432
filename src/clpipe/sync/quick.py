"""A no-op re-sync of a folder (file://) told without listing it: the tree's stamp.

A run of a folder source that left every listed file in the dropoff (nothing failed,
stopped, adopted, moved or deleted) writes a *stamp* into the dropoff's state folder. It
holds:

* every entry of the source tree as the run found it *before* it listed the tree: each
  file's relative path, size, modification time, inode and change time (the listing
  cache's test of "unchanged", sources/localdir.py), and each folder it skipped (a
  dropoff, a symbolic link to a folder) or odd entry (a broken link, a FIFO);
* each file of the run's entries in the dropoff with the size the manifest records (the
  engine's test of "in place", sync/engine.py);
* the manifest's own size, modification time and inode;
* what a no-op run would report: the counts, the notes, the sessions' tallies.

The next run walks the tree in the same order and compares entry by entry, stats each
dropoff file the stamp lists, and checks that no journal is waiting. When nothing
differs, the engine could do nothing but skip every file: the run reports what the stamp
says without reading a header, a manifest record or the listing cache. Any difference,
any error, a damaged, missing or foreign stamp: the run goes the usual way, and writes a
new stamp if it ends complete. A stamp whose tree had a file changed less than
:data:`RACY_NS` before the walk is not written (a second change within a timestamp's
granularity could go unseen), as the listing cache does.

The walk is taken when the run begins and before the engine reads the tree, so a file
changed while the run copies it differs from the stamp next time. The check reads
only; it may run before the dropoff's lock is taken (``locked=False``): then the lock must
be absent before and after the check, and the stamp the same file throughout, so that no
run changed the dropoff meanwhile.

The stamp is a stream of :mod:`marshal` records (one list of at most :data:`CHUNK`
entries each), read as it is compared: the check holds no more than a chunk, whatever
the tree's size. This module imports only built-in modules, so a check costs little more
than the walk itself.
"""

from __future__ import annotations

import marshal
import os
import time

TYPE_CHECKING = False  # (typing itself costs more to import than a small tree's walk)
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

STAMP = "folder-stamp"  # in the dropoff's state folder
MAGIC = "clpipe folder stamp"
FORMAT = 1
CHUNK = 4096  # entries per marshal record
RACY_NS = 2_000_000_000  # as sources/localdir.py's listing cache: a file changed this recently is not trusted
STATE_DIR = ".clpipe-sync"  # layout.STATE_DIR (not imported: this module stays light); a test checks they agree
LOCK = "lock"  # sync/manifest.py's lock folder in the state folder; a test checks they agree
MANIFEST = "manifest.jsonl"  # sync/manifest.py's MANIFEST; a test checks they agree

# what the walk records of an entry that is not a file to read
DROPOFF, LINKED, ODD = -1, -2, -3


class Unreadable(Exception):
    """A folder or entry of the tree could not be read: no stamp can vouch for it."""


def key(url: str, query: dict, template: str, version: str) -> str:
    """What the run's result depends on besides the tree: the source's URL, the query, the
    layout and clpipe's version. A stamp made under another key is not used."""
    return repr((version, url, sorted(query.items()), template))


def walk(root: str) -> Iterator[tuple]:
    """The tree under ``root`` in a fixed order (each folder's names sorted, its entries
    before its subfolders), skipping what the folder source skips (hidden names, the inside
    of a dropoff or of a linked folder): ``(path, size, mtime_ns, ino, ctime_ns)`` for a file,
    ``(path, DROPOFF | LINKED | ODD)`` for what the source skips or notes. Raises
    :class:`Unreadable`. (Each folder is read through a handle of its own, and its entries
    looked at relative to it: no path is resolved again from the root.)"""
    base = root.rstrip("/") + "/"
    stack = [""]  # folders to read, relative to root ("" the root itself)
    while stack:
        folder = stack.pop()
        try:
            fd = os.open(base + folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise Unreadable(base + folder) from exc
        try:
            with os.scandir(fd) as found:
                names = sorted((e.name, e) for e in found if not e.name.startswith("."))
            prefix = folder + "/" if folder else ""
            subfolders = []
            for name, entry in names:
                if entry.is_dir(follow_symlinks=False):
                    if _is_dir(f"{name}/{STATE_DIR}", fd):
                        yield prefix + name, DROPOFF
                    else:
                        subfolders.append(prefix + name)
                elif entry.is_file():
                    st = entry.stat()
                    yield prefix + name, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns
                else:
                    yield prefix + name, LINKED if entry.is_dir() else ODD
        except OSError as exc:
            raise Unreadable(base + folder) from exc
        finally:
            os.close(fd)
        stack.extend(reversed(subfolders))


def _is_dir(path: str, dir_fd: int) -> bool:
    try:
        return os.stat(path, dir_fd=dir_fd).st_mode & 0o170000 == 0o040000
    except OSError:
        return False


def _dump(item: tuple, out) -> None:
    """One record of the stamp: its length, then its marshal bytes (read back whole by
    :func:`_load`: marshal reading a file object itself asks it for a few bytes at a time)."""
    blob = marshal.dumps(item)
    out.write(len(blob).to_bytes(8, "little") + blob)


def _load(handle) -> Any:
    """The next record of the stamp; ``EOFError`` at its end or a cut record."""
    head = handle.read(8)
    if len(head) < 8:
        raise EOFError
    size = int.from_bytes(head, "little")
    if size > os.fstat(handle.fileno()).st_size:  # not a length this module wrote: a damaged stamp
        raise EOFError
    blob = handle.read(size)
    if len(blob) < size:
        raise EOFError
    return marshal.loads(blob)


def _stat(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def _journals(state_root: str) -> bool:
    """Is a journal waiting in the state folder (a run that did not save: the manifest is
    not the whole truth)?"""
    try:
        return any(name.startswith("journal-") or name.startswith("shard-") for name in os.listdir(state_root))
    except OSError:
        return True


class Snapshot:
    """The tree as a run found it when it began, written (chunk by chunk) to a file of its
    own in the state folder; made a stamp by :meth:`finish` when the run ends complete."""

    def __init__(self, state_root: str, stamp_key: str) -> None:
        """Raises ``OSError`` when the state folder cannot take the file (then the run has
        no stamp to write). Called with the dropoff's lock held: a snapshot file left by a
        run that was killed is removed."""
        self.state_root = state_root
        for name in os.listdir(state_root):
            if name.startswith(STAMP + ".new."):
                try:
                    os.unlink(f"{state_root}/{name}")
                except OSError:
                    pass
        self.path = f"{state_root}/{STAMP}.new.{os.getpid()}"
        self.started_ns = time.time_ns()
        self.newest_ns = 0  # the latest modification or change time of a file in the tree
        self.usable = True  # False: the walk failed, a write failed, or a file changed too recently
        self.files = 0
        self._chunk: list[tuple] = []
        self._out = open(self.path, "wb", buffering=1 << 16)  # noqa: SIM115 (closed by finish or discard)
        self._write((MAGIC, FORMAT, stamp_key))

    def _write(self, item: tuple) -> None:
        if not self.usable:
            return
        try:
            _dump(item, self._out)
        except (OSError, ValueError):  # a full disk: this run writes no stamp (the next one lists the tree)
            self.usable = False

    def add(self, item: tuple) -> None:
        if len(item) == 5:
            self.files += 1
            newest = item[2] if item[2] > item[4] else item[4]
            if newest > self.newest_ns:
                self.newest_ns = newest
        chunk = self._chunk
        chunk.append(item)
        if len(chunk) >= CHUNK:
            self._write(("S", chunk))
            chunk.clear()

    def finish(self, dest: Iterator[tuple[str, int]], payload: dict[str, Any]) -> bool:
        """Make this snapshot the dropoff's stamp, with the files in the dropoff and their
        sizes (``dest``) and what a no-op run reports (``payload``). False (and nothing
        written) when the snapshot cannot vouch for the tree."""
        if not self.usable or self.newest_ns >= self.started_ns - RACY_NS:
            self.discard()
            return False
        out = self._out
        try:
            if self._chunk:
                _dump(("S", self._chunk), out)
            _dump(("S", []), out)  # the tree's end
            chunk: list[tuple[str, int]] = []
            for item in dest:
                chunk.append(item)
                if len(chunk) >= CHUNK:
                    _dump(("D", chunk), out)
                    chunk = []
            manifest = _stat(f"{self.state_root}/{MANIFEST}")
            if manifest is None:
                raise OSError("no manifest")
            _dump(("D", chunk), out)
            _dump(("M", manifest), out)
            _dump(("P", payload), out)
            out.close()
            os.replace(self.path, f"{self.state_root}/{STAMP}")
        except (OSError, ValueError):  # a full disk, a value marshal cannot write: no stamp (the next run lists the tree)
            self.discard()
            return False
        return True

    def discard(self) -> None:
        try:
            self._out.close()
        except OSError:
            pass
        try:
            os.unlink(self.path)
        except OSError:
            pass


def forget(state_root: str) -> None:
    """Remove the dropoff's stamp (a run that may change the dropoff begins)."""
    try:
        os.unlink(f"{state_root}/{STAMP}")
    except FileNotFoundError:
        pass


def check(
    state_root: str,
    stamp_key: str,
    tree: str,
    dropoff: str,
    *,
    locked: bool,
    snapshot: Snapshot | None = None,
    paths: Any = None,
) -> dict[str, Any] | None:
    """What the last complete run reported, when nothing it depended on has changed since
    (see the module's docstring); None otherwise. ``snapshot``: fed the whole walk (also
    past a difference), for the stamp this run may write. ``paths``: given (``append``)
    each dropoff path the stamp lists as it is checked, in order: the audit's rows of a
    run that replays the report (meaningless when the answer is None). ``locked``: the
    caller holds the dropoff's lock; if not, a run holding it or taking it meanwhile makes
    the answer None."""
    lock = f"{state_root}/{LOCK}"
    if not locked and os.path.lexists(lock):
        if snapshot is not None:
            _feed(snapshot, walk(tree))
        return None
    stamp_path = f"{state_root}/{STAMP}"
    try:
        handle = open(stamp_path, "rb", buffering=1 << 16)  # noqa: SIM115
    except OSError:
        if snapshot is not None:
            _feed(snapshot, walk(tree))
        return None
    with handle:
        before = os.fstat(handle.fileno())
        payload = _compare(handle, stamp_key, tree, dropoff, state_root, snapshot, paths)
        if payload is None:
            return None
        if not locked and os.path.lexists(lock):
            return None
        now = _stat(stamp_path)
        if now is None or now[2] != before.st_ino or now[1] != before.st_mtime_ns:
            return None
    if _journals(state_root):
        return None
    return payload


def _feed(snapshot: Snapshot, items: Iterator[tuple]) -> None:
    try:
        for item in items:
            snapshot.add(item)
    except Unreadable:
        snapshot.usable = False


def _compare(
    handle, stamp_key: str, tree: str, dropoff: str, state_root: str, snapshot: Snapshot | None, paths: Any
) -> dict[str, Any] | None:
    items = walk(tree)
    same = True
    try:
        if _load(handle) != (MAGIC, FORMAT, stamp_key):
            same = False
        while same:  # the tree, chunk by chunk against the walk
            kind, chunk = _load(handle)
            if kind != "S":
                same = False
                break
            if not chunk:  # the tree's end: the walk must end too
                more = next(items, None)
                if more is not None:
                    same = False
                    if snapshot is not None:
                        snapshot.add(more)
                break
            for stored in chunk:
                item: tuple | None = next(items, None)
                if item is None:
                    same = False
                    break
                if snapshot is not None:
                    snapshot.add(item)
                if item != stored:
                    same = False
                    break
    except (EOFError, ValueError, TypeError):  # a damaged or foreign stamp
        same = False
    except Unreadable:
        if snapshot is not None:
            snapshot.usable = False
        return None
    if snapshot is not None:  # the rest of the tree, for the next stamp
        _feed(snapshot, items)
    if not same or (snapshot is not None and not snapshot.usable):
        return None
    prefix = dropoff.rstrip("/") + "/"
    opened, fd = None, -1  # the dropoff folder whose handle is open (the stamp lists its files together)
    try:
        while True:
            kind, chunk = _load(handle)
            if kind == "M":
                if _stat(f"{state_root}/{MANIFEST}") != tuple(chunk):
                    return None
                continue
            if kind == "P":
                return chunk if isinstance(chunk, dict) else None
            if kind != "D":
                return None
            for path, size in chunk:
                folder, _, name = path.rpartition("/")
                if folder != opened:
                    if fd >= 0:
                        os.close(fd)
                        fd = -1
                    fd, opened = os.open(prefix + folder, os.O_RDONLY | os.O_DIRECTORY), folder
                if os.stat(name, dir_fd=fd).st_size != size:
                    return None
                if paths is not None:
                    paths.append(path)
    except (OSError, EOFError, ValueError, TypeError):  # a file gone, a damaged stamp
        return None
    finally:
        if fd >= 0:
            os.close(fd)
