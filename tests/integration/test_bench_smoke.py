"""The benchmark's own code keeps working: `bench/flywheel_sync.py --quick` runs every peer
(real fw, native engine, floor) on tiny projects, checks their results and prints the table.
It proves no speed (that is the full run's job, outside the tests); it proves the
benchmark still measures what it says."""

from __future__ import annotations

import pytest

from helpers import FW_NEW, need_tool, run_quick_bench

pytestmark = pytest.mark.fw


@pytest.mark.fwcli
def test_benchmark_quick_mode_runs_every_peer(tmp_path):
    fw = need_tool(FW_NEW, "flywheel-cli 18.5.1 (fw)")
    _, rows = run_quick_bench("flywheel_sync.py", "flywheel_sync.md", "--fw", fw, "--workdir", tmp_path)
    for run in ("fw full", "fw no-op", "native full", "native no-op", "floor full", "native large full", "native large no-op"):
        assert run in rows and rows[run].rstrip().endswith("| ok |"), rows.get(run, f"no row {run!r}")


def test_dicomweb_benchmark_quick_mode_runs_every_peer(tmp_path, dicom_env):
    _, rows = run_quick_bench(
        "dicom_sources.py", "dicom_sources.md", "--only", "dicomweb", "--workdir", tmp_path, timeout=300, env=dicom_env
    )
    for run in ("native full", "native no-op", "dicomweb-client loop"):
        assert run in rows and rows[run].rstrip().endswith("| ok |"), rows.get(run, f"no row {run!r}")


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
