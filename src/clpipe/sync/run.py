"""Run a sync plan with the native engine against Flywheel (no ``fw`` needed)."""

from __future__ import annotations

import time
from pathlib import Path

from ..console import say
from ..errors import PreflightError
from ..sources.flywheel import FlywheelSource, load_credentials, parse_fw_url
from .engine import Engine, Options, watched, write_reports
from .manifest import SyncState


def run_native(plan) -> int:
    """Pre-flight, list (one request), sync, verify, record, report. Exit status 0 only
    when every listed file is in the dropoff, whole."""
    started = time.monotonic()
    url = parse_fw_url(plan.source_url)
    opts = plan.sync_options
    credentials = load_credentials()
    source = FlywheelSource(credentials, jobs=opts.jobs, verify=opts.ca_certs or True)  # one connection pool for everything
    try:
        source.api.check_login()
        project = source.api.lookup_project(url)
    except BaseException:
        source.close()
        raise
    say(f"native engine; logged in to {credentials.api_url}; project {url.group}/{url.project} found")
    dropoff, temp = Path(plan.dropoff), Path(plan.temp_dir)
    for folder, what in ((dropoff, "DropoffDirectory"), (temp, "TempDirectory"), (Path(plan.sync_logs), "log folder")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            source.close()
            raise PreflightError(f"cannot create the {what} {folder}: {exc.strerror}") from None

    state = SyncState(dropoff, plan.run_id)
    try:
        entries = source.entries(project["_id"], url, *opts.listing_request(), unpack=opts.unpack,
                                 template=plan.layout_template or None)
        if opts.list_only:
            entries = sorted(entries, key=lambda e: e.path)
            say(f"listed {len(entries)} remote files ({sum(e.size for e in entries) / 1e6:.1f} MB) in one request")
            for entry in entries:
                print(f"{entry.path}{'/' if entry.unpack else ''}" + (f"  ({entry.size} bytes)" if opts.verbose else ""))
            return 0
        state.acquire()
        try:
            state.load()
            engine = Engine(source, state, Options(
                dropoff=dropoff, zip_tmp=temp, jobs=opts.jobs, dry_run=opts.dry_run, delete=opts.delete,
                max_delete=plan.max_delete, interactive=watched() and not opts.quiet,
            ))
            outcome = engine.run(entries)  # checks each entry as the listing streams in
            say(f"listed {engine.listed} remote files ({engine.listed_bytes / 1e6:.1f} MB) in one request")
            if not opts.dry_run:
                state.save()
        finally:
            state.release()
    finally:
        source.close()
    outcome.seconds = time.monotonic() - started
    audit, summary = Path(plan.audit_csv), Path(plan.summary_json)
    write_reports(outcome, audit, summary, {"engine": "native", "source": plan.source_url, "dropoff": plan.dropoff, "run_id": plan.run_id}, state)
    for failure in outcome.failures[:50]:
        say(f"FAILED {failure}")
    if len(outcome.failures) > 50:
        say(f"... and {len(outcome.failures) - 50} more failures (all in {summary})")
    for note in outcome.notes:
        say(note)
    if outcome.adopted:
        say(f"{outcome.adopted} files already intact in the dropoff were adopted without downloading")
    say(outcome.summary())
    say(f"audit log: {audit}; summary: {summary}")
    if outcome.failed:
        say("sync FAILED: not every file arrived; the exit status is non-zero")
        return 1
    say("sync complete: every listed file is in the dropoff" if not opts.dry_run else "dry run complete")
    return 0
