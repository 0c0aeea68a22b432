"""One native run of bench/dicom_dimse.py, in a fresh interpreter:

    python -c "import dicom_dimse_native ..." ADDRESS DEST JOBS RETRIEVE REUSE MOVE_PORT CAP [ONE_THREAD]

A DimseSource and the Engine as ``clpipe dicom`` runs them: the C-FIND listing of the
benchmark's patients, then one C-GET (or C-MOVE) per series, into DEST. A module of its
own, importing only what that run needs, so that the benchmark's own imports (argparse,
subprocess, its helpers: ~11 ms here) are not counted as the engine's start-up, as
bench/dicom_folder_engine.py does for the file:// source. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

PREFIX = "BENCHDIMSE"  # the benchmark's PatientIDs (bench/dicom_dimse.py uploads them)


def run(address: str, dest: Path, jobs: int, retrieve: str, reuse: bool, move_port: int, cap: bool = True, one_thread: bool = True) -> int:
    """List the benchmark's patients and sync them with the engine; a JSON summary."""
    from clpipe.sources.dicom import DicomQuery, SourceSettings, entries, parse_source_url
    from clpipe.sources.dimse import DimseSource
    from clpipe.sync.engine import Engine, Options
    from clpipe.sync.manifest import SyncState

    settings = SourceSettings(
        retrieve=retrieve,
        move_port=move_port,
        jobs=jobs,
        timeout=60,
        extra={"reuse_associations": reuse, "local_cpu_cap": cap, "one_thread": one_thread},
    )
    started = time.perf_counter()
    source = DimseSource(parse_source_url(f"dimse://{address}"), settings)
    dest.mkdir(parents=True, exist_ok=True)
    state = SyncState(dest, "bench")
    state.acquire()
    try:
        state.load()
        engine = Engine(source, state, Options(dropoff=dest, zip_tmp=dest.parent / "zip-tmp", jobs=jobs))
        outcome = engine.run(entries(source, DicomQuery(patient_id=PREFIX + "*")))
        state.save()
    finally:
        state.release()
        source.close()
    print(
        json.dumps(
            {
                "created": outcome.created,
                "skipped": outcome.skipped,
                "failed": outcome.failed,
                "failures": outcome.failures[:3],
                "associations": source.associations_opened,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
    )
    return 1 if outcome.failed else 0


def main(argv: list[str]) -> int:
    address, dest, jobs, retrieve, reuse, port, cap, *one_thread = argv
    return run(address, Path(dest), int(jobs), retrieve, reuse == "1", int(port), cap == "1", one_thread != ["0"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
