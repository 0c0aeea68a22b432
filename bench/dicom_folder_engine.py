"""One run of clpipe's native engine with the file:// source, for bench/dicom_folder.py:

    python bench/dicom_folder_engine.py TREE DEST JOBS [--no-stamp] [--no-cache]

The engine as clpipe's runner drives it (engines/native.py: lock, manifest, the tree's
stamp and the listing cache in the dropoff's state folder, run, save), without the CLI
around it (config, log files, reports). A script of its own, importing only what that
run needs, so that the benchmark's own imports (argparse, subprocess, its helpers) are not
counted as the engine's start-up.

First, before anything else is imported, the stamp's check (sync/quick.py) without the
lock, as a process that only asks "did anything change?" may run it: when the tree and
the dropoff are as the last complete run left them, it prints that run's counts and
exits; it writes nothing. Otherwise (or with ``--no-stamp``) the run as the runner makes
it: the lock, the stamp checked again under it (its walk kept), the engine, and a new
stamp when the run ends complete. ``--no-cache``: without the listing cache either (every
header read again), as before both existed. Prints one JSON line.
"""

from __future__ import annotations

import os
import sys
import time


def main(tree: str, dest: str, jobs: int, cache: bool = True, stamp: bool = True) -> int:
    started = time.perf_counter()
    from clpipe import __version__
    from clpipe.sync import quick

    root = os.path.abspath(tree)
    key = quick.key(root, {}, "", __version__)  # (the runner keys on the plan's source URL, query and layout)
    if stamp:  # nothing changed since the last complete run? (read only, no lock: sync/quick.py)
        checking = time.perf_counter()
        payload = quick.check(f"{os.path.abspath(dest)}/.clpipe-sync", key, root, os.path.abspath(dest), locked=False)
        if payload is not None:  # its counts (numbers only: written without importing json)
            done = time.perf_counter()
            counts = f'"created": 0, "updated": 0, "skipped": {int(payload["skipped"])}, "failed": 0, "cached": 0, "stamp": true'
            times = f'"import_s": {checking - started!r}, "list_s": {done - checking!r}, "copy_s": 0.0, "save_s": 0.0, "jobs": 0'
            print(f"{{{counts}, {times}}}")
            return 0

    import json
    from pathlib import Path

    from clpipe.engines.native import Stamp
    from clpipe.sources.dicom import DicomQuery, SourceSettings, entries, open_source, parse_source_url
    from clpipe.sync.engine import Engine, Options
    from clpipe.sync.manifest import SyncState

    imported = time.perf_counter()
    dropoff = Path(dest)
    dropoff.mkdir(parents=True, exist_ok=True)
    source = open_source(parse_source_url(Path(root).as_uri()), SourceSettings(jobs=jobs))
    listed = [0.0]

    def timed(items):
        yield from items
        listed[0] = time.perf_counter()  # the engine takes the whole listing before it copies

    state = SyncState(dropoff, f"bench-{os.getpid()}")
    state.acquire()
    stamper = Stamp(state, source.tree_root, key) if stamp else None
    try:
        state.load()
        begun = time.perf_counter()
        # as engines/native.py does: the stamp checked under the lock (its walk kept for the
        # new one), then forgotten, as this run may change the dropoff
        if stamper is not None and stamper.check(dropoff.parent / f"{dropoff.name}.zips") is not None:
            sys.exit("the stamp holds under the lock but did not without it: run again")
        quick.forget(str(state.root))
        if cache:  # as engines/native.py does: a file unchanged since the last listing is not opened again
            source.cache_listing(state.root)
        engine = Engine(source, state, Options(dropoff=dropoff, zip_tmp=dropoff.parent / f"{dropoff.name}.zips", jobs=jobs))
        outcome = engine.run(timed(entries(source, DicomQuery())))
        copied = time.perf_counter()
        state.save()
        if stamper is not None:
            stamper.write(outcome, engine, list(source.notes))
    finally:
        if stamper is not None:
            stamper.discard()
        state.release()
        source.close()
    done = time.perf_counter()
    print(
        json.dumps(
            {
                "created": outcome.created,
                "updated": outcome.updated,
                "skipped": outcome.skipped,
                "failed": outcome.failed,
                "failures": outcome.failures[:5],
                "notes": getattr(source, "notes", []),
                "cached": source.stats.cached,
                "import_s": imported - started,
                "list_s": (listed[0] or copied) - begun,
                "copy_s": copied - (listed[0] or copied),
                "save_s": done - copied,
                "jobs": engine.jobs,
            }
        )
    )
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a not in ("--no-cache", "--no-stamp")]
    if len(args) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    flags = sys.argv[1:]
    sys.exit(
        main(args[0], args[1], int(args[2]), cache="--no-cache" not in flags, stamp="--no-stamp" not in flags and "--no-cache" not in flags)
    )
