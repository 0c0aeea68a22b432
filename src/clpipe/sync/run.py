"""Run a sync plan with the native engine: Flywheel (no ``fw`` needed) or a DICOM source
(DICOMweb, DIMSE, a mounted folder). Same steps for all: pre-flight, list, plan against the
manifest, transfer, verify, record, report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable

from ..console import say
from ..errors import DiskFull, PreflightError, TransferError, is_disk_full
from ..sources.base import HasNotes
from .engine import Engine, Options
from .manifest import MANIFEST, SyncState
from .progress import watched
from .reports import write_reports


def run_native(plan) -> int:
    """A Flywheel project with the native engine. Exit status 0 only when every listed
    file is in the dropoff, whole."""
    from ..sources.flywheel import FlywheelSource, load_credentials, parse_fw_url

    started = time.monotonic()
    url = parse_fw_url(plan.source_url)
    opts = plan.sync_options
    credentials = load_credentials()
    source = FlywheelSource(credentials, jobs=opts.jobs, verify=opts.ca_certs or True)  # one connection pool for everything
    try:
        source.api.check_login()
        project = source.api.lookup_project(url)
        say(f"native engine; logged in to {credentials.api_url}; project {url.group}/{url.project} found")
        return _sync(plan, source, lambda: source.entries(project["_id"], url, *opts.listing_request(), unpack=opts.unpack,
                                                          template=plan.layout_template or None), started)
    finally:
        source.close()


def run_dicom(plan) -> int:
    """A DICOM source (dicomweb+http(s)://, dimse://, file://) with the native engine."""
    from ..sources.dicom import DEFAULT_TEMPLATE, DicomQuery, SourceSettings, entries, open_source, parse_source_url

    started = time.monotonic()
    url = parse_source_url(plan.source_url)
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


def _sync(plan, source, listing: Callable[[], Iterable], started: float) -> int:
    opts = plan.sync_options
    dropoff, temp = Path(plan.dropoff), Path(plan.temp_dir)
    for folder, what in ((dropoff, "DropoffDirectory"), (temp, "TempDirectory"), (Path(plan.sync_logs), "log folder")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PreflightError(f"cannot create the {what} {folder}: {exc.strerror}") from None
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
            engine = Engine(source, state, Options(
                dropoff=dropoff, zip_tmp=temp, jobs=opts.jobs, dry_run=opts.dry_run, delete=opts.delete,
                max_delete=plan.max_delete, interactive=watched() and not opts.quiet,
            ))
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
        if plan.source_url.startswith("fw:"):
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
                    full = DiskFull.at(exc, folders, needed=_manifest_bytes(state),
                                       purpose="the manifest of the synced files (the dropoff's .clpipe-sync folder)")
    finally:
        state.release()
    outcome.seconds = time.monotonic() - started
    audit, summary = Path(plan.audit_csv), Path(plan.summary_json)
    failures = list(outcome.failures)  # printed as FAILED lines; a full disk is the error line instead
    if full is not None:
        outcome.failures.append(str(full))
    reported = True
    try:
        write_reports(outcome, audit, summary, {"engine": "native", "source": plan.source_url, "dropoff": plan.dropoff,
                                                "run_id": plan.run_id}, state)
    except DiskFull as exc:
        full, reported = full or exc, False
    for failure in failures[:50]:
        say(f"FAILED {failure}", error=True)
    if len(failures) > 50:
        say(f"... and {len(failures) - 50} more failures (all in {summary if reported else 'the summary, not written'})", error=True)
    for note in outcome.notes:
        say(note)
    if outcome.adopted:
        say(f"{outcome.adopted} files already intact in the dropoff were adopted without downloading")
    say(outcome.summary())
    if reported:
        say(f"audit log: {audit}; summary: {summary}")
    if full is not None:
        raise full  # one line: the folder, its free space, about how much more is needed
    if outcome.failed:
        say("sync FAILED: not every file arrived; the exit status is non-zero", error=True)
        return 1
    say("sync complete: every listed file is in the dropoff" if not opts.dry_run else "dry run complete")
    return 0


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
