"""What a native sync did: the per-file results, the counts, the closing summary line,
the audit CSV (in ``fw sync``'s columns) and the JSON summary."""

from __future__ import annotations

import csv
import heapq
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..console import summary_line
from ..errors import DiskFull, is_disk_full
from ..spill import SortedSpill
from .fileio import write_whole


@dataclass(slots=True)
class FileResult:
    path: str
    status: str  # completed | skipped | failed
    existing: bool
    action: str
    error: str = ""


@dataclass
class Outcome:
    created: int = 0
    updated: int = 0
    skipped: int = 0
    adopted: int = 0
    deleted: int = 0
    failed: int = 0
    bytes: int = 0
    seconds: float = 0.0
    files: list[FileResult] = field(default_factory=list)
    # the paths of the files skipped as already synced, kept sorted on disk beyond 50,000
    # (clpipe/spill.py): their rows are all alike, made when reporting
    unchanged: SortedSpill = field(default_factory=SortedSpill)
    # the same for the files this run wrote: new ("Created file on destination") and
    # replaced ("Updated file on destination"); a full sync of a million files holds no
    # row per file
    created_paths: SortedSpill = field(default_factory=SortedSpill)
    updated_paths: SortedSpill = field(default_factory=SortedSpill)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    renamed: int = 0  # entries whose local name is not their remote one (see layout.py)
    moved: int = 0  # files synced under an earlier name, renamed in place to the current one
    stopped: str = ""  # told to stop before its end (sync/stopping.py): why, as said ("at the time limit")
    stop_kind: str = ""  # time_limit | max_duration | signal
    not_synced: int = 0  # entries a stopped run did not get to (not failures: the next run syncs them)
    listing_cut: bool = False  # stopped before the source's listing ended

    def summary(self) -> str:
        return summary_line(self.created, self.updated, self.skipped, self.failed, self.bytes, self.seconds)


_BLOCK = 4096  # audit rows made at once (_write_alike)
_PLAIN_CSV = frozenset(',"\r\n')  # a field without these is written as it is (csv's default dialect)
CREATED = "Created file on destination"  # the audit's action of a file this run wrote new
UPDATED = "Updated file on destination"  # ... and of one it replaced


def _rows_of(paths: SortedSpill, status: str, existing: bool, action: str) -> Iterator[tuple[str, str, bool, str, str]]:
    """The audit rows of files whose rows are alike, made from their paths."""
    for path in paths:
        yield path, status, existing, "", action


def _write_alike(out: TextIO | _Counter, writer: Any, paths: SortedSpill, status: str, existing: bool, action: str) -> None:
    """The audit rows of files whose rows differ only in their path, a block of paths at a
    time: a block with no path that needs quoting (no ``,``, ``"`` or line break) is one
    join (a million rows in half the time of one ``write`` a row)."""
    end = f",{status},{existing},,{action}\r\n"
    it = iter(paths)
    while block := list(itertools.islice(it, _BLOCK)):
        joined = "\n".join(block)
        if "," in joined or '"' in joined or "\r" in joined or joined.count("\n") != len(block) - 1:
            writer.writerows([path, path, status, str(existing), "", action] for path in block)
            continue
        out.write("".join([f"{path},{path}{end}" for path in block]))


def write_reports(outcome: Outcome, audit_csv: Path, summary_json: Path, extra: dict) -> None:
    """The audit CSV in fw's columns (properly quoted; failed files get a row too) and a
    JSON summary beside it.

    Each is written whole under a temporary name and renamed, so a full disk never leaves
    half a report: it raises :class:`DiskFull` naming the folder and about how many bytes
    the reports need."""
    rows = sorted(((f.path, f.status, f.existing, f.error, f.action) for f in outcome.files), key=lambda row: row[0])
    # the unchanged, created and updated files' rows are alike: only their paths are kept
    # (a sync of a million files must not cost a million tuples), merged in path order
    # when written
    alike = (
        (outcome.unchanged, "skipped", True, ""),
        (outcome.created_paths, "completed", False, CREATED),
        (outcome.updated_paths, "completed", True, UPDATED),
    )

    def audit(out: TextIO | _Counter) -> None:
        writer = csv.writer(out)
        writer.writerow(["src_path", "dest_path", "status", "existing", "error_message", "action_taken"])
        filled = [kind for kind in alike if len(kind[0])]
        if not rows and len(filled) == 1:  # every row alike (a no-op re-sync, a first sync): a block at a time
            _write_alike(out, writer, *filled[0])
            return
        streams = [_rows_of(*kind) for kind in filled]
        for path, status, existing, error, action in heapq.merge(rows, *streams, key=lambda row: row[0]):
            if not error and _PLAIN_CSV.isdisjoint(path):  # (a million of these: no quoting needed)
                if status == "skipped" and not action:
                    out.write(f"{path},{path},skipped,True,,\r\n")
                    continue
                if status == "completed" and action in (CREATED, UPDATED):
                    out.write(f"{path},{path},completed,{existing},,{action}\r\n")
                    continue
            writer.writerow(["" if action.startswith("Deleted") else path, path, status, str(existing), error, action])

    data = {
        **extra,
        "created": outcome.created,
        "updated": outcome.updated,
        "skipped": outcome.skipped,
        "adopted": outcome.adopted,
        "deleted": outcome.deleted,
        "failed": outcome.failed,
        "renamed": outcome.renamed,
        "renamed_in_place": outcome.moved,
        "stopped": outcome.stopped or None,
        "stop_kind": outcome.stop_kind or None,
        "not_synced": outcome.not_synced,
        "bytes": outcome.bytes,
        "seconds": round(outcome.seconds, 3),
        "failures": outcome.failures,
        "notes": outcome.notes,
        "audit_csv": str(audit_csv),
    }
    summary = json.dumps(data, indent=2) + "\n"
    try:
        audit_csv.parent.mkdir(parents=True, exist_ok=True)
        write_whole(audit_csv, audit)
        write_whole(summary_json, lambda out: out.write(summary))
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        counter = _Counter()
        audit(counter)
        needed = counter.bytes + len(summary.encode())
        raise DiskFull.at(
            exc,
            [(audit_csv.parent, ""), (summary_json.parent, "")],
            needed=needed,
            purpose=f"the audit log {audit_csv.name} and the summary {summary_json.name}",
        ) from exc


class _Counter:
    """A text sink that only counts the UTF-8 bytes written to it."""

    def __init__(self) -> None:
        self.bytes = 0

    def write(self, text: str) -> int:
        self.bytes += len(text.encode("utf-8"))
        return len(text)
