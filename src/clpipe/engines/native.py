"""The native engine: clpipe's own, for a Flywheel project (no ``fw`` needed) or a DICOM
source (DICOMweb, DIMSE, a mounted folder). Same steps for all: pre-flight, list, plan
against the manifest, transfer, verify, record, report (the parts are in :mod:`clpipe.sync`)."""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..console import say
from ..errors import DiskFull, PreflightError, TransferError, is_disk_full
from ..layout import STATE_DIR
from ..sources.base import HasListingCache, HasNotes, HasTreeStamp
from ..sources.registry import source_class
from ..spill import SortedSpill
from ..sync import quick
from ..sync import sessions as session_states
from ..sync.engine import Engine, Options
from ..sync.manifest import MANIFEST, SyncState
from ..sync.progress import watched
from ..sync.reports import Outcome, write_reports
from ..sync.shards import ShardView
from ..sync.stopping import current as current_stop
from .base import SYNC_COMPLETE, close, close_stopped, make_folders, say_failed

if TYPE_CHECKING:
    from ..plan import SyncPlan


def run(plan: SyncPlan) -> int:
    """Run ``plan`` with the native engine. Exit status 0 only when every listed file is in
    the dropoff, whole."""
    return run_native(plan) if plan.is_flywheel else run_dicom(plan)


def run_native(plan: SyncPlan) -> int:
    """A Flywheel project with the native engine (its source picked by the registry)."""
    started = time.monotonic()
    url = plan.flywheel_url
    opts = plan.sync_options
    source, project = source_class("fw").open_project(url, jobs=opts.jobs, verify=opts.ca_certs or True)
    try:
        say(f"native engine; logged in to {source.credentials.api_url}; project {url.group}/{url.project} found")
        return _sync(
            plan,
            source,
            lambda: _flywheel_listing(plan, source, project),
            started,
        )
    finally:
        source.close()


def _flywheel_listing(plan: SyncPlan, source, project: dict) -> Iterable:
    """The entries of a Flywheel project as the plan asks for them (kept in its TempDirectory
    beyond 50,000 files: clpipe/spill.py)."""
    opts = plan.sync_options
    template = plan.layout_template or None
    request = opts.listing_request()
    return source.entries(project["_id"], plan.flywheel_url, *request, unpack=opts.unpack, template=template, spill_dir=plan.temp_dir)


def run_dicom(plan: SyncPlan) -> int:
    """A DICOM source (dicomweb+http(s)://, dimse://, file://) with the native engine."""
    from ..sources.dicom import DEFAULT_TEMPLATE, DicomQuery, SourceSettings, SourceURL, entries, open_source

    started = time.monotonic()
    url = plan.url
    assert isinstance(url, SourceURL)
    source = open_source(url, SourceSettings(**plan.settings))
    try:
        query = DicomQuery(**plan.query)
        template = plan.layout_template or DEFAULT_TEMPLATE
        login = getattr(source, "login", "")
        say(f"native engine; source {url}{'; ' + login if login else ''}; layout {template}")
        try:
            return _sync(plan, source, lambda: entries(source, query, template), started)
        except TransferError as exc:
            # the listing failed (a PACS that refuses the association or cannot be reached;
            # a retrieval's failure is one entry's, reported by the engine): the message says
            # what to check, and nothing was transferred
            raise PreflightError(str(exc)) from None
    finally:
        source.close()


def list_sessions(plan: SyncPlan) -> session_states.Tallies:
    """One listing of the plan's source, no download: each session's entries, newest change
    and fingerprint (for ``clpipe dicom status -refresh``)."""
    tallies = session_states.Tallies()

    def tally(entries: Iterable) -> None:
        for entry in entries:
            tallies.listed(entry)

    if plan.is_flywheel:
        url = plan.flywheel_url
        opts = plan.sync_options
        source, project = source_class("fw").open_project(url, jobs=opts.jobs, verify=opts.ca_certs or True)
        try:
            tally(_flywheel_listing(plan, source, project))
        finally:
            source.close()
        return tallies
    from ..sources.dicom import DEFAULT_TEMPLATE, DicomQuery, SourceSettings, SourceURL, entries, open_source

    assert isinstance(plan.url, SourceURL)
    dicom = open_source(plan.url, SourceSettings(**plan.settings))
    if isinstance(dicom, HasListingCache):  # file://: the last sync's listing cache, read only (no lock is held)
        dicom.cache_listing(Path(plan.dropoff) / STATE_DIR, write=False)
    try:
        tally(entries(dicom, DicomQuery(**plan.query), plan.layout_template or DEFAULT_TEMPLATE))
    except TransferError as exc:
        raise PreflightError(str(exc)) from None
    finally:
        dicom.close()
    return tallies


def _sync(plan: SyncPlan, source, listing: Callable[[], Iterable], started: float) -> int:
    opts = plan.sync_options
    dropoff, temp = Path(plan.dropoff), Path(plan.temp_dir)
    make_folders(plan, ("dropoff", "temp", "logs"))
    if opts.list_only:
        found = sorted(listing(), key=lambda e: e.path)
        say(f"listed {len(found)} remote items")
        for entry in found:
            size = f"{entry.count} instances" if entry.series else f"{entry.size} bytes"
            print(f"{entry.path}{'/' if entry.unpack else ''}" + (f"  ({size})" if opts.verbose else ""))
        return 0

    folders = [(dropoff, "set DropoffDirectory elsewhere"), (temp, "set TempDirectory elsewhere"), (Path(plan.sync_logs), "")]
    full: DiskFull | None = None  # a full disk stops the run; what finished is kept, and said
    sessions: SessionStates | None = None
    shard = ShardView(plan.shard, plan.shards)  # a shard task of an array job: its subjects, its own bookkeeping
    state = shard.state(dropoff, plan.run_id)
    try:
        state.acquire()
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise DiskFull.at(exc, folders, purpose="the sync's lock") from exc
    stamp: Stamp | None = None
    try:
        try:
            state.load()
            stamp = Stamp.of(plan, source, state, shard)
            replay = stamp.check(temp) if stamp is not None else None
            if not opts.dry_run and replay is None:  # this run may change the dropoff: the last stamp no longer holds
                quick.forget(str(state.root))
            if isinstance(source, HasListingCache):  # file://: a file unchanged since the last run is not opened again
                source.cache_listing(dropoff / STATE_DIR, write=not opts.dry_run)
            engine = Engine(
                source,
                state,
                Options(
                    dropoff=dropoff,
                    zip_tmp=temp,
                    jobs=opts.jobs,
                    dry_run=opts.dry_run,
                    delete=opts.delete,
                    max_delete=plan.max_delete,
                    interactive=watched() and not opts.quiet,
                    stop=current_stop(),  # a time limit, MaxDuration, Ctrl-C: a graceful stop (sync/stopping.py)
                ),
            )
            try:
                if replay is not None:  # nothing changed since the last complete run (sync/quick.py): its report
                    say(
                        "nothing changed in the source folder or the dropoff since the last complete sync "
                        f"({quick.STAMP} in {state.root}): not listed again"
                    )
                    outcome = replay.outcome
                    engine.sessions, engine.listed, engine.listed_bytes = replay.tallies, replay.listed, replay.listed_bytes
                    outcome.notes += replay.notes
                else:
                    outcome = engine.run(shard.filter(listing()))  # checks each entry as the listing streams in
            except DiskFull as exc:  # the engine stopped at a full disk, with what it did
                full, outcome = exc, exc.outcome  # type: ignore[assignment]
        except OSError as exc:  # a full disk before any transfer (the state, the adoption of files)
            if not is_disk_full(exc):
                raise
            raise DiskFull.at(
                exc, folders, purpose="this sync's bookkeeping (the dropoff's .clpipe-sync folder; a large listing in TempDirectory)"
            ) from exc
        source_notes = list(source.notes) if isinstance(source, HasNotes) and replay is None else []
        outcome.notes += source_notes  # what the source skipped or had to change
        outcome.notes += shard.notes()
        if plan.is_flywheel:
            say(f"listed {engine.listed} remote files ({engine.listed_bytes / 1e6:.1f} MB) in one request")
        elif replay is not None:
            say(f"{engine.listed} series, as the last complete sync listed them")
        else:
            say(f"listed {engine.listed} series")
        if not opts.dry_run:
            try:
                state.save()
            except OSError as exc:  # the manifest stays as it was and the journal in place: the next run replays it
                if not is_disk_full(exc):
                    raise
                if full is None:
                    full = DiskFull.at(
                        exc,
                        folders,
                        needed=_manifest_bytes(state),
                        purpose="the manifest of the synced files (the dropoff's .clpipe-sync folder)",
                    )
            engine.sessions.whole = not outcome.listing_cut  # a listing cut short says nothing of what it did not reach
            if shard.active and not opts.dry_run:  # a shard task: its tallies, for the final job to merge (arrays.py)
                try:
                    engine.sessions.save(state.root / SHARD_TALLIES)
                except OSError as exc:
                    if not is_disk_full(exc):
                        raise
                    full = full or DiskFull.at(exc, folders, purpose="the sessions' tallies of this shard")
            if stamp is not None and replay is None and full is None:
                stamp.write(outcome, engine, source_notes)  # when this run ended complete: the next may skip listing
            sessions = None if opts.dry_run or shard.active else SessionStates.after(plan, engine.sessions, outcome.notes)
            if sessions is not None and sessions.error is not None and full is None:
                full = DiskFull.at(sessions.error, folders, purpose="the sessions' states (the dropoff's .clpipe-sync folder)")
    finally:
        if stamp is not None:
            stamp.discard()
        state.release()
    outcome.seconds = time.monotonic() - started
    audit, summary = Path(plan.audit_csv), Path(plan.summary_json)
    failures = list(outcome.failures)  # printed as FAILED lines; a full disk is the error line instead
    if full is not None:
        outcome.failures.append(str(full))
    reported = True
    extra: dict[str, Any] = {"engine": "native", "source": plan.source_url, "dropoff": plan.dropoff, "run_id": plan.run_id}
    # how the run ended, for `clpipe dicom status` (its last_sync and history)
    extra["finished"] = session_states.iso(time.time())
    extra["exit_state"] = (
        "dry run"
        if opts.dry_run
        else ("failed" if outcome.failed or full is not None else "stopped" if outcome.stopped else "complete")  # stopped: sync/stopping.py
    )
    if sessions is not None:
        extra["sessions"] = sessions.counts
        extra["sessions_tsv"] = sessions.tsv
    try:
        write_reports(outcome, audit, summary, extra)
        if sessions is not None:
            sessions.report(plan)
    except DiskFull as exc:
        full, reported = full or exc, False
    say_failed(failures, "failures", f" (all in {summary if reported else 'the summary, not written'})")
    for note in outcome.notes:
        say(note)
    if outcome.adopted:
        say(f"{outcome.adopted} files already intact in the dropoff were adopted without downloading")
    if sessions is not None and sessions.records:
        say(sessions.line())
    say(outcome.summary())
    if reported:
        say(f"audit log: {audit}; summary: {summary}")
    if full is not None:
        raise full  # one line: the folder, its free space, about how much more is needed
    if outcome.stopped:  # saved and reported like any run; said, with its own exit status
        return close_stopped(outcome, engine.listed, "remote files" if plan.is_flywheel else "series")
    return close(bool(outcome.failed), done=SYNC_COMPLETE if not opts.dry_run else "dry run complete")


def _manifest_bytes(state: SyncState) -> int:
    """About the size of the manifest that could not be written: the old one and the
    journals it folds in."""
    total = 0
    for path in (state.root / MANIFEST, *state.root.glob("journal-*.jsonl")):
        try:
            total += path.stat().st_size
        except OSError:
            pass
    return total


class Replay:
    """What the last complete run reported, for a run that found nothing changed since
    (sync/quick.py): the counts of a run that skipped every file, the audit's rows (given
    by the stamp's check, kept on disk beyond 50,000: clpipe/spill.py), the notes and the
    sessions' tallies. Raises ``KeyError``, ``TypeError`` or ``ValueError`` for a payload
    this code did not write."""

    def __init__(self, payload: dict[str, Any], unchanged: SortedSpill) -> None:
        self.listed: int = payload["listed"]
        self.listed_bytes: int = payload["listed_bytes"]
        self.notes: list[str] = [str(note) for note in payload["notes"]]
        self.outcome = Outcome(skipped=int(payload["skipped"]), renamed=int(payload["renamed"]), unchanged=unchanged)
        self.tallies = session_states.Tallies()
        if not self.tallies.add_data(payload["tallies"]):
            raise ValueError("not tallies")


class Stamp:
    """A folder source's stamp for one run (sync/quick.py): checked when the run begins,
    its walk kept, and written when the run ends complete."""

    def __init__(self, state: SyncState, tree: str, key: str) -> None:
        self.state, self.tree, self.key = state, tree, key
        self.root = str(state.root)
        self.snapshot: quick.Snapshot | None = None

    @classmethod
    def of(cls, plan: SyncPlan, source, state: SyncState, shard: ShardView) -> Stamp | None:
        """The stamp of this run; None when it may not use one: a source that is not a
        folder, a dry run, a list-only run, a run that deletes, or a shard task."""
        opts = plan.sync_options
        if not isinstance(source, HasTreeStamp) or opts.dry_run or opts.delete or opts.list_only or shard.active:
            return None
        template = plan.layout_template or ""
        return cls(state, source.tree_root, quick.key(str(plan.url), plan.query, template, __version__))

    def check(self, spill: Path) -> Replay | None:
        """The last complete run's report when nothing changed since; None otherwise (the
        tree's walk is kept for the stamp this run may write)."""
        try:
            self.snapshot = quick.Snapshot(self.root, self.key)
        except OSError:  # the state folder takes no file now (a full disk): no stamp this run, the tree is listed
            return None
        unchanged = SortedSpill(spill)
        root, dropoff = self.root, str(self.state.dropoff)
        payload = quick.check(root, self.key, self.tree, dropoff, locked=True, snapshot=self.snapshot, paths=unchanged)
        try:
            replay = Replay(payload, unchanged) if payload is not None else None
        except (KeyError, TypeError, ValueError):  # not a report this code wrote: the run lists the tree
            replay = None
        if replay is None:
            unchanged.close()
            return None
        self.discard()
        return replay

    def write(self, outcome: Outcome, engine: Engine, notes: list[str]) -> None:
        """Make the walk the stamp if the run ended complete with no change of its own to
        report (every listed file in place, nothing failed, stopped, moved or deleted)."""
        snapshot, self.snapshot = self.snapshot, None
        if snapshot is None:
            return
        complete = not (outcome.files or outcome.failed or outcome.failures or outcome.stopped or outcome.listing_cut)
        if not complete or outcome.deleted or outcome.moved or outcome.adopted:
            snapshot.discard()
            return
        sizes: dict[str, int] = {}
        for key in self.state.keys():
            record = self.state.get(key)
            if record is not None:
                for path, size, *_ in record.files:
                    sizes[path] = size
        paths = list(heapq.merge(outcome.unchanged, outcome.created_paths, outcome.updated_paths))
        if any(path not in sizes for path in paths):
            snapshot.discard()
            return
        payload = {
            "skipped": len(paths),
            "renamed": outcome.renamed,
            "listed": engine.listed,
            "listed_bytes": engine.listed_bytes,
            "notes": [note for note in (engine.names_note(),) if note] + list(notes),
            "tallies": engine.sessions.data(no_op=True),
        }
        snapshot.finish(((path, sizes[path]) for path in paths), payload)

    def discard(self) -> None:
        if self.snapshot is not None:
            self.snapshot.discard()
            self.snapshot = None


SHARD_TALLIES = "sessions-tallies.json"  # in a shard task's folder: what it found of each session


class SessionStates:
    """The sessions' states after a run (sync/sessions.py): merged with the earlier runs'
    records and saved beside the manifest while the lock is held; then the run's changes
    are written to ``<run>.sessions.tsv`` and clpipe's status_log.csv. The final job of a
    sharded sync (arrays.py) does the same with the tallies of all its shards."""

    def __init__(self, previous: dict[str, dict], records: dict[str, dict], tsv: str) -> None:
        self.previous, self.records, self.tsv = previous, records, tsv
        self.error: OSError | None = None  # a full disk while saving them
        self.counts = session_states.counts(records.values())

    @classmethod
    def after(cls, plan: SyncPlan, tallies: session_states.Tallies, notes: list[str], whole_listing: bool = True) -> SessionStates:
        now = time.time()
        try:
            previous = session_states.load(plan.dropoff)
        except ValueError as exc:  # damaged: written anew from this run's listing
            notes.append(str(exc))
            previous = {}
        bids = session_states.BidsCheck(plan.bids_dir, plan.bids_with_session) if plan.bids_dir else None
        records = session_states.merge(previous, tallies, now, plan.run_id, whole_listing and tallies.whole)
        records = session_states.with_states(records, now, plan.stable_after, bids)
        tsv = str(Path(plan.audit_csv).with_suffix(".sessions.tsv"))
        made = cls(previous, records, tsv)
        try:
            session_states.save(plan.dropoff, records, plan.run_id)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            made.error = exc
        return made

    def report(self, plan: SyncPlan) -> None:
        """The run's changes: the sessions TSV (every run, a header at least) and the rows
        of clpipe's status_log.csv (only sessions whose state changed). (A dry run makes no
        SessionStates: it writes neither.)"""
        changed = session_states.changes(self.previous, self.records)
        folders = [(Path(plan.sync_logs), ""), (Path(plan.project_dir) / ".pipeline", "")]
        try:
            session_states.write_changes(Path(self.tsv), changed, plan.dropoff)
            if plan.project_dir:
                session_states.append_status_log(plan.project_dir, changed)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            raise DiskFull.at(exc, folders, purpose="the sessions' changes (the .sessions.tsv and .pipeline/status_log.csv)") from exc

    def line(self) -> str:
        shown = ", ".join(f"{n} {state}" for state, n in self.counts.items() if n)
        return f"sessions: {shown} (clpipe dicom status shows them; changes in {self.tsv})"
