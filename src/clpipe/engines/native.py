"""The native engine: clpipe's own, for a Flywheel project (no ``fw`` needed) or a DICOM
source (DICOMweb, DIMSE, a mounted folder). Same steps for all: pre-flight, list, plan
against the manifest, transfer, verify, record, report (the parts are in :mod:`clpipe.sync`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..console import say
from ..errors import DiskFull, PreflightError, TransferError, is_disk_full
from ..sources.base import HasNotes
from ..sources.registry import source_class
from ..sync.engine import Engine, Options
from ..sync.manifest import MANIFEST, SyncState
from ..sync.progress import watched
from ..sync.reports import write_reports
from .base import SYNC_COMPLETE, close, make_folders, say_failed

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
            lambda: source.entries(project["_id"], url, *opts.listing_request(), unpack=opts.unpack, template=plan.layout_template or None),
            started,
        )
    finally:
        source.close()


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
    state = SyncState(dropoff, plan.run_id)
    try:
        state.acquire()
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise DiskFull.at(exc, folders, purpose="the sync's lock") from exc
    try:
        try:
            state.load()
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
                ),
            )
            try:
                outcome = engine.run(listing())  # checks each entry as the listing streams in
            except DiskFull as exc:  # the engine stopped at a full disk, with what it did
                full, outcome = exc, exc.outcome  # type: ignore[assignment]
        except OSError as exc:  # a full disk before any transfer (the state, the adoption of files)
            if not is_disk_full(exc):
                raise
            raise DiskFull.at(exc, folders, purpose="this sync's bookkeeping (the dropoff's .clpipe-sync folder)") from exc
        if isinstance(source, HasNotes):  # what the source skipped or had to change
            outcome.notes += list(source.notes)
        if plan.is_flywheel:
            say(f"listed {engine.listed} remote files ({engine.listed_bytes / 1e6:.1f} MB) in one request")
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
    finally:
        state.release()
    outcome.seconds = time.monotonic() - started
    audit, summary = Path(plan.audit_csv), Path(plan.summary_json)
    failures = list(outcome.failures)  # printed as FAILED lines; a full disk is the error line instead
    if full is not None:
        outcome.failures.append(str(full))
    reported = True
    try:
        write_reports(
            outcome, audit, summary, {"engine": "native", "source": plan.source_url, "dropoff": plan.dropoff, "run_id": plan.run_id}, state
        )
    except DiskFull as exc:
        full, reported = full or exc, False
    say_failed(failures, "failures", f" (all in {summary if reported else 'the summary, not written'})")
    for note in outcome.notes:
        say(note)
    if outcome.adopted:
        say(f"{outcome.adopted} files already intact in the dropoff were adopted without downloading")
    say(outcome.summary())
    if reported:
        say(f"audit log: {audit}; summary: {summary}")
    if full is not None:
        raise full  # one line: the folder, its free space, about how much more is needed
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
