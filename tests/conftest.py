"""Shared fixtures: the real Flywheel CLI in its own environment, an isolated login home,
the bundled Flywheel-compatible server, and a fresh clpipe project.

Tool locations come from the environment (scripts/test.sh sets them):
CLPIPE_TEST_FW (fw 18.5.1), CLPIPE_TEST_FW_OLD (fw 17.5.1), CLPIPE_TEST_SDK_PYTHON.
A missing tool fails the test with how to install it: scripts/test.sh installs them all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TOOLS = Path(os.environ.get("CLPIPE_TOOLS", Path.home() / ".cache" / "clpipe-tests"))
FW_NEW = Path(os.environ.get("CLPIPE_TEST_FW", TOOLS / "fw-18.5.1" / "bin" / "fw"))
FW_OLD = Path(os.environ.get("CLPIPE_TEST_FW_OLD", TOOLS / "fw-17.5.1" / "bin" / "fw"))


def need_tool(path: Path, what: str) -> Path:
    """The tool, or a failed test saying how to get it (never a silent skip)."""
    if path.exists():
        return path
    pytest.fail(f"{what} not found at {path}; run scripts/setup.sh (scripts/test.sh does it for you)")


@dataclass
class Env:
    """An isolated user: its own HOME (so its own `fw login`), fw on PATH."""

    home: Path
    vars: dict

    def run(self, *argv, timeout=180, cwd=None, check=False) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(a) for a in argv], env=self.vars, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def clpipe(self, *args, **kw) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "clpipe", *args, **kw)

    def fw_login(self, login_key: str) -> None:
        proc = self.run("fw", "login", login_key, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def make_env(tmp_path: Path, fw: Path | None) -> Env:
    home = tmp_path / "home"
    home.mkdir()
    path = os.environ.get("PATH", "")
    # a PATH without any other fw on it
    parts = [p for p in path.split(os.pathsep) if p and not (Path(p) / "fw").exists()]
    if fw is not None:
        parts.insert(0, str(fw.parent))
    variables = dict(os.environ, HOME=str(home), FLYWHEEL_USER_HOME=str(home), PATH=os.pathsep.join(parts), PYTHONWARNINGS="ignore")
    return Env(home=home, vars=variables)


@pytest.fixture
def fw_env(tmp_path) -> Env:
    return make_env(tmp_path, need_tool(FW_NEW, "flywheel-cli 18.5.1 (fw)"))


@pytest.fixture
def fw_old_env(tmp_path) -> Env:
    return make_env(tmp_path, need_tool(FW_OLD, "flywheel-cli 17.5.1 (fw)"))


@pytest.fixture
def no_fw_env(tmp_path) -> Env:
    return make_env(tmp_path, None)


@pytest.fixture
def demo_project():
    from clpipe.testing.fwserver import make_demo_project

    return make_demo_project(group="lab", label="study", subjects=2, sessions=1, acquisitions=2, slices=3)


@pytest.fixture
def server(demo_project):
    from clpipe.testing.fwserver import FlywheelTestServer

    with FlywheelTestServer(projects=[demo_project], api_keys={"test-key-s3cr3t"}) as srv:
        yield srv


def new_project(root: Path, source_url: str = "fw://lab/study/", **source) -> Path:
    """A clpipe project made by `clpipe project_setup`, with SourceOptions changes applied."""
    proc = subprocess.run(
        [sys.executable, "-m", "clpipe", "project_setup", "-project_title", "t", "-project_dir", str(root), "-source_url", source_url],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    config = root / "clpipe_config.json"
    if source:
        data = json.loads(config.read_text())
        data["SourceOptions"].update(source)
        config.write_text(json.dumps(data, indent=2))
    return config


def files_under(root: Path) -> dict[str, bytes]:
    """Every synced file under ``root`` (the native engine's own bookkeeping in
    ``.clpipe-sync/`` is not a synced file)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not str(p.relative_to(root)).startswith(".clpipe-sync/")}


# ------------------------------------------------------------- the DICOM test servers

DICOM_START = 'eval "$(scripts/infra/dicom-up.sh)"'
DICOM_EXPORTS = ("CLPIPE_ORTHANC_HTTP", "CLPIPE_ORTHANC_DICOMWEB", "CLPIPE_ORTHANC_DIMSE", "CLPIPE_DCMQRSCP_DIMSE",
                 "CLPIPE_QRSCP_DIMSE", "CLPIPE_MOVE_PORT", "CLPIPE_DICOM_DATA", "CLPIPE_DICOM_EXPECTED")


@pytest.fixture(scope="session")
def dicom_env() -> dict[str, str]:
    """The exports of dicom-up.sh: from the environment, else from the env.sh it writes;
    a failed test saying how to start the servers when they are not set up."""
    import re

    env = {k: os.environ[k] for k in DICOM_EXPORTS if os.environ.get(k)}
    env_file = Path(os.environ.get("CLPIPE_INFRA", "/tmp/clpipe-infra")) / "dicom" / "env.sh"
    if len(env) < len(DICOM_EXPORTS) and env_file.is_file():
        found = dict(re.findall(r"^export (\w+)=(.*)$", env_file.read_text(), re.M))
        env = {k: found[k] for k in DICOM_EXPORTS if k in found}
    missing = [k for k in DICOM_EXPORTS if k not in env]
    if missing:
        pytest.fail(f"the DICOM test servers are not set up ({', '.join(missing)} not set): "
                    f"run `{DICOM_START}` (as root; scripts/test.sh does it for you)")
    return env


@pytest.fixture(scope="session")
def dicom_expected(dicom_env) -> dict:
    """What the servers hold: the data set's expected JSON (clpipe.testing.dicomdata)."""
    from clpipe.testing import dicomdata

    path = Path(dicom_env["CLPIPE_DICOM_EXPECTED"])
    if not path.is_file():
        pytest.fail(f"{path} (CLPIPE_DICOM_EXPECTED) does not exist: run `{DICOM_START}` again")
    return dicomdata.load_expected(path)
