"""The benchmark's own code keeps working: `bench/flywheel_sync.py --quick` runs every peer
(real fw, native engine, floor) on tiny projects, checks their results and prints the table.
It proves no speed (that is the full run's job, outside the tests); it proves the
benchmark still measures what it says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FW_NEW, need_tool

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.fwcli
def test_benchmark_quick_mode_runs_every_peer(tmp_path):
    fw = need_tool(FW_NEW, "flywheel-cli 18.5.1 (fw)")
    results = ROOT / "bench" / "results" / "flywheel_sync.md"
    before = results.read_bytes() if results.exists() else None
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "flywheel_sync.py"), "--quick", "--fw", str(fw), "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ") and "|" in line[2:]}
    for run in ("fw full", "fw no-op", "native full", "native no-op", "floor full", "native large full", "native large no-op"):
        assert run in rows and rows[run].rstrip().endswith("| ok |"), rows.get(run, f"no row {run!r}")
    assert (results.read_bytes() if results.exists() else None) == before  # --quick never overwrites the saved table


def test_dicomweb_benchmark_quick_mode_runs_every_peer(tmp_path, dicom_env):
    results = ROOT / "bench" / "results" / "dicom_sources.md"
    before = results.read_bytes() if results.exists() else None
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "dicom_sources.py"), "--quick", "--only", "dicomweb", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, **dicom_env, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ") and "|" in line[2:]}
    for run in ("native full", "native no-op", "dicomweb-client loop"):
        assert run in rows and rows[run].rstrip().endswith("| ok |"), rows.get(run, f"no row {run!r}")
    assert (results.read_bytes() if results.exists() else None) == before  # --quick never overwrites the saved table
