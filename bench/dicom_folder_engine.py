"""One run of clpipe's native engine with the file:// source, for bench/dicom_folder.py:

    python bench/dicom_folder_engine.py TREE DEST JOBS [--no-cache]

The engine as clpipe's runner drives it (engines/native.py: lock, manifest, the listing
cache in the dropoff's state folder, run, save), without the CLI around it (config, log
files, reports). A script of its own, importing only what that run needs, so that the
benchmark's own imports (argparse, subprocess, its helpers) are not counted as the
engine's start-up. ``--no-cache``: without the listing cache (every header read again),
as before it existed. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main(tree: str, dest: str, jobs: int, cache: bool = True) -> int:
    started = time.perf_counter()
    from clpipe.sources.dicom import DicomQuery, SourceSettings, entries, open_source, parse_source_url
    from clpipe.sync.engine import Engine, Options
    from clpipe.sync.manifest import SyncState

    imported = time.perf_counter()
    dropoff = Path(dest)
    dropoff.mkdir(parents=True, exist_ok=True)
    source = open_source(parse_source_url(Path(tree).absolute().as_uri()), SourceSettings(jobs=jobs))
    listed = [0.0]

    def timed(items):
        yield from items
        listed[0] = time.perf_counter()  # the engine takes the whole listing before it copies

    state = SyncState(dropoff, f"bench-{os.getpid()}")
    state.acquire()
    try:
        state.load()
        if cache:  # as engines/native.py does: a file unchanged since the last listing is not opened again
            source.cache_listing(state.root)
        begun = time.perf_counter()
        engine = Engine(source, state, Options(dropoff=dropoff, zip_tmp=dropoff.parent / f"{dropoff.name}.zips", jobs=jobs))
        outcome = engine.run(timed(entries(source, DicomQuery())))
        copied = time.perf_counter()
        state.save()
    finally:
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
    args = [a for a in sys.argv[1:] if a != "--no-cache"]
    if len(args) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    sys.exit(main(args[0], args[1], int(args[2]), cache="--no-cache" not in sys.argv[1:]))
