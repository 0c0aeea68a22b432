"""A sync split by subject into shards, each run by a task of its own (``-shards N``, a
batch array job), and the merge of their bookkeeping.

**The rule.** An entry goes to shard ``sha256(subject label, UTF-8) as a 64-bit number mod
N`` (:func:`shard_of`): the first 8 bytes of the digest, big-endian. The subject is the
source's own label (a Flywheel subject's label; a DICOM source's PatientID, else its
PatientName), never a local folder name, so the same subject lands in the same shard
whatever the layout, in every run with the same N. An entry of no subject (a project's or
an analysis's file) goes to shard 0.

**The bookkeeping.** A shard task never writes a file another task writes:
``<dropoff>/.clpipe-sync/shard-<i>/`` holds its lock, its journal and its staging folder
(:class:`ShardState`). It reads the dropoff's manifest (what earlier runs synced) but
never writes it. The merge, by the job that runs after the whole array, is what any
plain run does with a journal left behind: :meth:`SyncState.load` replays the shard
journals and :meth:`SyncState.save` folds them into ``manifest.jsonl`` and removes the
shard folders. So a merge that never ran (its job cancelled) is done by the next sync.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import PreflightError
from ..sources.base import RemoteEntry
from .manifest import LOCK, MANIFEST, SyncState, lock_holder

SHARD_PREFIX = "shard-"
RULE = "sha256 of the subject label, as a 64-bit number, mod the number of shards (entries of no subject: shard 0)"


def shard_of(subject: str, shards: int) -> int:
    """The shard (0 .. ``shards``-1) of a subject label: see the module's doc."""
    if shards <= 1 or not subject:
        return 0
    digest = hashlib.sha256(subject.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % shards


def shard_folder(dropoff: str | Path, index: int) -> Path:
    return SyncState(Path(dropoff), "").root / f"{SHARD_PREFIX}{index}"


class ShardView:
    """What one shard task sees: its part of the listing and its own bookkeeping. For a
    plan that is not a shard task (``index`` < 0) everything passes and the state is the
    dropoff's own."""

    def __init__(self, index: int = -1, shards: int = 0):
        self.index, self.shards = index, shards
        self.listed = 0  # entries the source listed
        self.kept = 0  # of them, this shard's
        self.subjects: set[str] = set()  # this shard's subjects

    @property
    def active(self) -> bool:
        return self.index >= 0 and self.shards > 1

    def state(self, dropoff: Path, run_id: str) -> SyncState:
        return ShardState(dropoff, run_id, index=self.index) if self.active else SyncState(dropoff, run_id)

    def filter(self, entries: Iterable[RemoteEntry]) -> Iterator[RemoteEntry]:
        """The entries of this shard (all of them, as they come, for a plan that is not a
        shard task: nothing counted, nothing to say)."""
        return self._filtered(entries) if self.active else iter(entries)

    def _filtered(self, entries: Iterable[RemoteEntry]) -> Iterator[RemoteEntry]:
        for entry in entries:
            self.listed += 1
            if shard_of(entry.subject, self.shards) != self.index:
                continue
            self.kept += 1
            if entry.subject:
                self.subjects.add(entry.subject)
            yield entry

    def notes(self) -> list[str]:
        if not self.active:
            return []
        if self.kept == 0:
            return [
                f"shard {self.index} of {self.shards}: none of the {self.listed} listed items is of a subject of this shard; "
                "nothing to do (an empty shard is complete)"
            ]
        subjects = f"{len(self.subjects)} subject{'s' if len(self.subjects) != 1 else ''}"
        return [f"shard {self.index} of {self.shards}: {self.kept} of {self.listed} listed items, {subjects}"]


class ShardState(SyncState):
    """The bookkeeping of one shard task: lock, journal and staging folder in
    ``.clpipe-sync/shard-<i>/``; the dropoff's manifest is read, never written."""

    def __init__(self, dropoff: Path, run_id: str, index: int):
        super().__init__(dropoff, run_id)
        self.index = index

    @property
    def root(self) -> Path:
        return self.dropoff / ".clpipe-sync" / f"{SHARD_PREFIX}{self.index}"

    @property
    def main(self) -> Path:
        return self.root.parent

    def _check_others(self) -> None:
        """Refused (this shard's lock released) while a plain sync holds the dropoff's lock."""
        holder = lock_holder(self.main / LOCK)
        if holder is not None:
            self.release()
            raise PreflightError(
                f"another sync is writing to {self.dropoff} ({holder}); wait for it, "
                f"or if it is no longer running remove {self.main / LOCK}"
            )

    def load(self) -> None:
        """The dropoff's manifest and left-over journals (read only), then this shard's own
        journals (an earlier attempt of this shard's task)."""
        main = self.main / MANIFEST
        if main.exists():
            self._read_manifest(main)
        for journal in sorted(self.main.glob("journal-*.jsonl")):
            self._read_lines(journal)
        for journal in sorted(self.root.glob("journal-*.jsonl")):
            self._read_lines(journal)
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        """The journal flushed and kept: the merge folds it into the manifest."""
        self.close_journal()
        shutil.rmtree(self.tmp, ignore_errors=True)
