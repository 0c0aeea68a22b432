"""What ``clpipe dicom status`` reads and shows: the sessions of a dropoff and their states
as of now, the last sync, and the history of the runs.

It reads only local files: the sessions file the syncs keep beside the manifest
(``<dropoff>/.clpipe-sync/sessions.json``, :mod:`clpipe.sync.sessions`), the BIDS folders
(for ``converted``), and the runs' JSON summaries in ``<project>/logs/sync_logs``. Only
``refresh=True`` asks the source, for one listing without downloads
(:func:`clpipe.engines.native.list_sessions`), to show the sessions that are new on the
source, changed since the last sync, or removed from it. Nothing is written, except the
HTML page when asked for (:mod:`clpipe.status.page`).

The CLI renders a :class:`Status` as a table (:func:`table`), as one JSON object
(:meth:`Status.to_json`, described by ``docs/status.schema.json``), as the lines of
``-ready`` (:meth:`Status.ready`), or as a page.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..console import human_bytes
from ..errors import PreflightError
from ..sync import sessions as states

if TYPE_CHECKING:
    from ..config.model import ProjectConfig
    from ..plan import SyncPlan

#: the newest run summaries read for the history (a sync every 30 minutes for two days)
HISTORY_RUNS = 100
SCHEMA_VERSION = 1
_RUN_STAMP = re.compile(r"(\d{8}-\d{6})")


@dataclass
class Status:
    """The state of one project's dropoff, as of :attr:`now`."""

    project: str
    source: str
    dropoff: str
    stable_after: int
    bids_dir: str
    now: float
    last_sync: dict | None  # run_id, time, exit_state (+ summary, files, bytes, failed); None: no summary yet
    sessions: list[dict]  # the JSON objects, sorted by subject, session, path
    history: list[dict] = field(default_factory=list)  # the runs, oldest first
    refreshed: bool = False  # the source was listed (-refresh): sessions carry "change"
    synced: bool = True  # a sync has written the sessions file

    @property
    def counts(self) -> dict[str, int]:
        return states.counts(self.sessions)

    @property
    def changes(self) -> dict[str, int]:
        """After a refresh: how many sessions are new, changed, removed on the source."""
        out = {"new": 0, "changed": 0, "removed": 0}
        for record in self.sessions:
            if record.get("change"):
                out[record["change"]] += 1
        return out

    def ready(self) -> list[str]:
        """The lines of ``-ready``: the complete sessions (stable, not converted), as
        ``subject<TAB>session<TAB>absolute path``."""
        return [f"{r['subject']}\t{r['session']}\t{r['path']}" for r in self.sessions if r["state"] == "complete"]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "clpipe_status": SCHEMA_VERSION,
            "project": self.project,
            "source": self.source,
            "dropoff": self.dropoff,
            "generated": states.iso(self.now),
            "stable_after": self.stable_after,
            "bids_directory": self.bids_dir or None,
            "refreshed": self.refreshed,
            "last_sync": self.last_sync,
            "counts": self.counts,
            "sessions": self.sessions,
            "history": [{key: value for key, value in run.items() if key != "epoch"} for run in self.history],
        }
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)


def read_status(config: ProjectConfig, refresh: bool = False, now: float | None = None) -> Status:
    """The status of ``config``'s dropoff (see the module's doc). A sessions file that
    cannot be read is a :class:`PreflightError`; a listing that fails too (``refresh``)."""
    from ..plan import make_plan

    plan = make_plan(config)
    now = time.time() if now is None else now
    try:
        records = states.load(plan.dropoff)
    except ValueError as exc:
        raise PreflightError(str(exc)) from None
    synced = states.sessions_file(plan.dropoff).exists()
    if refresh:
        records = _refresh(plan, records, now)
    bids = states.BidsCheck(plan.bids_dir, plan.bids_with_session) if plan.bids_dir else None
    current = states.with_states(records, now, plan.stable_after, bids)
    history = read_history(Path(plan.sync_logs), plan.dropoff)
    return Status(
        project=config.project_title,
        source=plan.source_url,
        dropoff=plan.dropoff,
        stable_after=plan.stable_after,
        bids_dir=plan.bids_dir,
        now=now,
        last_sync=_last_sync(history[-1]) if history else None,
        sessions=[session_object(r, plan.dropoff, refresh) for r in states.rows(current)],
        history=history,
        refreshed=refresh,
        synced=synced,
    )


def _refresh(plan: SyncPlan, records: dict[str, dict], now: float) -> dict[str, dict]:
    from ..engines.native import list_sessions  # the only step that asks the source

    return states.refreshed(records, list_sessions(plan), now)


def session_object(record: dict, dropoff: str, refresh: bool = False) -> dict[str, Any]:
    """A session record as ``-json`` gives it (times as ISO 8601 with their offset, the
    path absolute, the BIDS labels)."""
    bids_subject, bids_session = states.bids_labels(record)
    out: dict[str, Any] = {
        "subject": record.get("subject", ""),
        "session": record.get("session", ""),
        "path": os.path.join(os.path.abspath(dropoff), record["path"]),
        "state": record["state"],
        "files": int(record.get("files") or 0),
        "bytes": int(record.get("bytes") or 0),
        "series": int(record.get("series") or 0),
        "entries": int(record.get("entries") or 0),
        "missing": int(record.get("missing") or 0),
        "last_synced": states.iso(record.get("last_synced")),
        "first_synced": states.iso(record.get("first_synced")),
        "last_change": states.iso(record.get("last_change")),
        "source_subject": record.get("source_subject") or "",
        "source_session": record.get("source_session") or "",
        "bids_subject": bids_subject,
        "bids_session": bids_session or None,
        "failures": list(record.get("failures") or []),
    }
    if refresh:
        change = None
        if record.get("changed"):
            change = {"new": "new", "removed": "removed"}.get(record.get("base", ""), "changed")
        out["change"] = change
    return out


# ----------------------------------------------------------------------------- the runs


def read_history(sync_logs: Path, dropoff: str, limit: int = HISTORY_RUNS) -> list[dict]:
    """The newest ``limit`` runs of this dropoff that wrote a JSON summary, oldest first:
    run id, time, exit state, files and bytes transferred, files in place, failures."""
    try:
        # a shard task's own summary (<run>.shard-<i>.summary.json) is counted in its run's
        names = [entry.name for entry in os.scandir(sync_logs) if entry.name.endswith(".summary.json") and ".shard-" not in entry.name]
    except OSError:  # no log folder yet: no run
        return []
    names.sort(key=_run_order, reverse=True)
    runs: list[dict] = []
    for name in names:
        if len(runs) >= limit:
            break
        path = sync_logs / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            mtime = path.stat().st_mtime
        except (OSError, UnicodeDecodeError, ValueError):
            continue  # a summary being written, or not one of ours: the others tell the history
        if not isinstance(data, dict) or (data.get("dropoff") and os.path.abspath(data["dropoff"]) != os.path.abspath(dropoff)):
            continue
        runs.append(_run(data, path, mtime))
    runs.sort(key=lambda run: (run["epoch"], run["run_id"]))
    return runs


def _run_order(name: str) -> str:
    match = _RUN_STAMP.search(name)
    return match.group(1) if match else ""


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _run(data: dict, path: Path, mtime: float) -> dict[str, Any]:
    """One run of the history, from its summary (a summary of an older clpipe has no
    finish time or exit state: the file's time, and the failures, say them)."""
    finished = data.get("finished")
    epoch = mtime
    if isinstance(finished, str):
        try:
            epoch = datetime.fromisoformat(finished).timestamp()
        except ValueError:
            finished = None
    failed = _int(data.get("failed"))
    exit_state = data.get("exit_state")
    if not isinstance(exit_state, str):
        exit_state = "failed" if failed or data.get("failures") else "complete"
    transferred = _int(data.get("created")) + _int(data.get("updated"))
    in_place = transferred + _int(data.get("skipped")) + _int(data.get("adopted")) + _int(data.get("renamed"))
    run_id = data.get("run_id") if isinstance(data.get("run_id"), str) else path.name.removesuffix(".summary.json")
    return {
        "run_id": run_id,
        "time": finished if isinstance(finished, str) else states.iso(mtime),
        "epoch": epoch,
        "exit_state": exit_state,
        "files": transferred,
        "bytes": _int(data.get("bytes")),
        "files_in_place": in_place,
        "failed": failed,
        "seconds": data.get("seconds") if isinstance(data.get("seconds"), (int, float)) else None,
        "summary": str(path),
    }


def _last_sync(run: dict) -> dict[str, Any]:
    return {key: run[key] for key in ("run_id", "time", "exit_state", "files", "bytes", "failed", "summary")}


# ----------------------------------------------------------------------------- the terminal

#: how each state is shown on a terminal (ANSI colours)
STATE_COLOUR = {"complete": "32", "converted": "34", "arriving": "33", "partial": "31", "new": "36", "removed": "35"}
_NUMERIC = {"files", "size", "series", "failures"}


def counts_line(status: Status) -> str:
    counts = status.counts
    return ", ".join(f"{counts[state]} {state}" for state in states.STATES)


def last_sync_line(status: Status) -> str:
    last = status.last_sync
    if last is None:
        return "last sync: none with a summary in the log folder"
    moved = f"{last['files']} files, {human_bytes(last['bytes'])} transferred"
    return f"last sync: run {last['run_id']} at {last['time']}, {last['exit_state']} ({moved})"


def no_sync_line(status: Status, config_file: str) -> str:
    return (
        f"no sync has run yet for {status.dropoff} (no session states in it): "
        f"run `clpipe dicom sync -c {config_file} -submit` first (the native engine keeps them)"
    )


def table(status: Status, colour: bool = False) -> str:
    """The sessions as a text table, one row per session (its columns aligned, the states
    coloured when ``colour``), with a title line and the counts below. Plain string work:
    a thousand sessions take milliseconds (a rich Table took seconds)."""
    from ..config.units import format_duration

    columns = ["subject", "session", "state", "files", "size", "series", "last synced", "last change", "failures"]
    if status.refreshed:
        columns.insert(3, "source")
    rows = []
    for row in status.sessions:
        cells = [
            row["subject"],
            row["session"],
            row["state"],
            f"{row['files']:,}",
            human_bytes(row["bytes"]),
            str(row["series"]),
            _short(row["last_synced"]),
            _short(row["last_change"]),
            str(len(row["failures"])) if row["failures"] else "",
        ]
        if status.refreshed:
            cells.insert(3, row.get("change") or "")
        rows.append(cells)
    widths = [max([len(name)] + [len(cells[i]) for cells in rows]) for i, name in enumerate(columns)]
    state = columns.index("state")

    def line(cells: list[str], paint: bool = False) -> str:
        out = []
        for i, (cell, width) in enumerate(zip(cells, widths, strict=True)):
            text = cell.rjust(width) if columns[i] in _NUMERIC else cell.ljust(width)
            if paint and i == state and cell in STATE_COLOUR:
                text = f"\x1b[{STATE_COLOUR[cell]}m{text}\x1b[0m"
            out.append(text)
        return "  ".join(out).rstrip()

    lines = [f"{status.project}: {len(status.sessions)} sessions in {status.dropoff}", line(columns), line(["\u2500" * w for w in widths])]
    lines += [line(cells, colour) for cells in rows]
    lines.append(f"{counts_line(status)}; StableAfter {format_duration(status.stable_after)}")
    return "\n".join(lines)


def _short(stamp: str | None) -> str:
    """An ISO time as ``2026-12-06 04:12`` (a table's width)."""
    return stamp[:16].replace("T", " ") if stamp else "-"
