"""The benchmark's own code keeps working: `bench/flywheel_sync.py --quick` runs every peer
(real fw, native engine, floor) on tiny projects, checks their results and prints the table.
It proves no speed (that is the full run's job, outside the tests); it proves the
benchmark still measures what it says."""

from __future__ import annotations

import re

import pytest

from helpers import FW_NEW, need_tool, run_quick_bench

pytestmark = pytest.mark.fw


@pytest.mark.fwcli
def test_benchmark_quick_mode_runs_every_peer(tmp_path):
    fw = need_tool(FW_NEW, "flywheel-cli 18.5.1 (fw)")
    _, rows = run_quick_bench("flywheel_sync.py", "flywheel_sync.md", "--fw", fw, "--workdir", tmp_path)
    for run in ("fw full", "fw no-op", "native full", "native no-op", "floor full", "native large full", "native large no-op"):
        assert run in rows and rows[run].rstrip().endswith("| ok |"), rows.get(run, f"no row {run!r}")


@pytest.mark.fwcli
def test_wan_benchmark_quick_mode_runs_every_peer(tmp_path):
    """`bench/flywheel_wan.py --quick`: fw, native and the floor on both projects (zipped
    series, single files) behind a 40 ms delay per request, each result checked."""
    fw = need_tool(FW_NEW, "flywheel-cli 18.5.1 (fw)")
    out, rows = run_quick_bench("flywheel_wan.py", "flywheel_wan.md", "--fw", fw, "--workdir", tmp_path)
    for tag in ("(a)", "(b)"):
        for run in (f"fw {tag} full", f"native {tag} full", f"native {tag} no-op", f"floor {tag} full"):
            assert run in rows and rows[run].rstrip().endswith("| ok |"), rows.get(run, f"no row {run!r}")
    assert "sleeps 40 ms before every answer" in out


def test_million_benchmark_quick_mode_prints_the_growth_curve(tmp_path):
    """`bench/flywheel_sync.py --million --quick` (issue 15): the native engine's full and
    no-op syncs at two project sizes and the floor on the smaller one, each checked file by
    file, then the goals and the growth curve (no fw needed)."""
    out, rows = run_quick_bench("flywheel_sync.py", "flywheel_million.md", "--million", "--workdir", tmp_path, timeout=300)
    for run in ("native 400 full", "native 400 no-op", "floor 400 full", "native 1,200 full", "native 1,200 no-op"):
        assert run in rows and rows[run].rstrip().endswith("| ok |"), rows.get(run, f"no row {run!r}")
    assert "## Growth curve (native)" in out
    assert re.search(r"^\| 1,200 \| [\d.]+ \| [\d,]+ \| \d+ \| [\d.]+ \| [\d,]+ \| \d+ \| -?\d+ \|$", out, re.MULTILINE), out[-2000:]
    assert re.search(r"^\| 1,200-file no-op re-sync, native peak RSS \| \d+ MB \| < 200 MB \| (met|NOT met) \|$", out, re.MULTILINE)


def other_benchmarks_patient(dicom_env, patient: str) -> bytes:
    """One instance of the test data set under ``patient`` with UIDs of its own."""
    import io
    from pathlib import Path

    import pydicom
    from pydicom.uid import generate_uid

    first = next(p for p in sorted(Path(dicom_env["CLPIPE_DICOM_DATA"]).rglob("*")) if p.is_file() and p.suffix == ".dcm")
    ds = pydicom.dcmread(first)
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient, generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def test_dicomweb_benchmark_quick_mode_runs_every_peer(tmp_path, dicom_env):
    """Every peer runs and is checked; another benchmark's patient left in Orthanc (the
    DIMSE benchmark's BENCHDIMSE*, after its --keep) is neither synced with this
    benchmark's data nor deleted by it."""
    import os

    import httpx

    patient = f"BENCHDIMSE{os.getpid()}"
    with httpx.Client(base_url=dicom_env["CLPIPE_ORTHANC_HTTP"], timeout=60, trust_env=False) as http:
        http.post("/instances", content=other_benchmarks_patient(dicom_env, patient)).raise_for_status()
        try:
            _, rows = run_quick_bench(
                "dicom_sources.py", "dicom_sources.md", "--only", "dicomweb", "--workdir", tmp_path, timeout=300, env=dicom_env
            )
            left = http.post("/tools/find", json={"Level": "Patient", "Query": {"PatientID": patient}}).raise_for_status().json()
        finally:
            for ident in http.post("/tools/find", json={"Level": "Patient", "Query": {"PatientID": patient}}).json():
                http.delete(f"/patients/{ident}")
    for run in ("native full", "native no-op", "dicomweb-client loop", "dicomweb-client retrieve_series, 4 threads"):
        assert run in rows and rows[run].rstrip().endswith("| ok |"), rows.get(run, f"no row {run!r}")
    assert "full sync: native speed-up over dicomweb-client retrieve_series, 4 threads" in rows
    assert len(left) == 1, f"the benchmark deleted another benchmark's patient {patient}"


def test_reliability_quick_mode_prints_every_table_and_meets_the_done_criteria(tmp_path, dicom_env):
    """`bench/reliability.py --quick` runs a few of every scenario of issue 11 (kills per source,
    network faults, a full disk, two runs on one dropoff, a read-only dropoff, bad input,
    hostile names, secrets) and prints the tables; the done criteria are its totals: no
    corrupted file, no silently lost file, no internal error, no leaked secret."""
    import re

    out, _ = run_quick_bench("reliability.py", "reliability.md", "--workdir", tmp_path, env=dicom_env)
    for section in (
        "Reference runs",
        "Kills",
        "Network faults",
        "Full disk",
        "Two runs on one dropoff",
        "Read-only dropoff",
        "Bad input",
        "Hostile and colliding names",
        "Secrets",
        "Totals",
    ):
        assert f"\n## {section}" in out, f"no {section!r} table"
    assert "harness error" not in out and "not measured" not in out, out[-6000:]
    totals = re.search(
        r"^TOTALS: corrupted files (\d+), silently lost files (\d+), internal errors (\d+), "
        r"leaked secrets (\d+)",
        out,
        re.MULTILINE,
    )
    assert totals, out[-3000:]
    assert [int(n) for n in totals.groups()] == [0, 0, 0, 0], out[out.find("## Totals") :]


def test_status_benchmark_quick_mode_measures_every_command(tmp_path):
    """`bench/status.py --quick`: two tiny projects synced from the bundled Flywheel server,
    then every `clpipe dicom status` output measured and checked against the dropoff."""
    out, _ = run_quick_bench("status.py", "status.md", "--workdir", tmp_path, "--repeats", "1", timeout=300)
    for project in ("many", "wide"):
        for command in ("table", "-json", "-ready", "-html"):
            assert re.search(rf"^\| {project} \| {re.escape(command)} \|.*\| ok \|$", out, re.MULTILINE), (project, command, out[-3000:])
        assert re.search(rf"^\| status on [\d,]+ files \({project}\).*\| (met|NOT met) \|$", out, re.MULTILINE), out[-3000:]


def test_a_measured_run_ends_when_the_process_does_and_a_timeout_kills_it(tmp_path):
    """benchlib.run_measured times a run by the process's exit, not by a poll: Popen.wait
    with a timeout polls at last every 50 ms, which made a 0.07 s run read 0.11 s or more
    (rsync's no-op and the Python floor are that short). A run past its timeout is killed
    with its whole session and reported as a timeout."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from benchlib import run_measured

    short = run_measured(["sleep", "0.07"], {}, tmp_path / "short.log", 30)
    assert short.code == 0 and short.failure(30) == ""
    assert 0.07 <= short.seconds < 0.105, short.seconds  # a poll would have seen the exit at 0.1135 s at the earliest
    long = run_measured(["sh", "-c", "sleep 30 & sleep 30"], {}, tmp_path / "long.log", 0.5)
    assert long.code is None and long.failure(0.5).startswith("TIMEOUT") and long.seconds < 5


def test_the_growth_curve_never_prints_a_negative_zero():
    """A no-op's peak RSS a fraction of a MB lower at the larger size is no growth: the
    goal row and the curve say 0.0 and 0, not -0.0 and -0."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import flywheel_sync as fs

    runs = []
    for files, rss in ((100_000, 58.3), (300_000, 58.2), (1_000_000, 58.1)):
        runs += [fs.Run(f"native {files:,} full", files, 1, 10.0, 100.0), fs.Run(f"native {files:,} no-op", files, 1, 1.0, rss)]
    curve = fs.growth_curve(runs)
    assert curve.rstrip().endswith("| 58 | 0 |") and "| -0 |" not in curve, curve
    growth = next(row for row in fs.million_goals(runs, [100_000, 1_000_000]) if row[0].startswith("no-op memory growth"))
    assert growth[1:] == ("0.0 MB per 100k files", "none (< 1 MB per 100k files)", "met")
