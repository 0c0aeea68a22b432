"""Shared fixtures: the real Flywheel CLI in its own environment, an isolated login home,
the bundled Flywheel-compatible server, a real batch scheduler, the DICOM test servers; and
the pytest markers of the real servers each test uses (fw, slurm, sge, orthanc, dcmqrscp,
qrscp, lmod: `pytest -m orthanc` runs the Orthanc part). Helpers are in tests/helpers.py.

Tool locations come from the environment (scripts/test.sh sets them):
CLPIPE_TEST_FW (fw 18.5.1), CLPIPE_TEST_FW_OLD (fw 17.5.1), CLPIPE_TEST_SDK_PYTHON.
A missing tool fails the test with how to install it: scripts/test.sh installs them all.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
from pathlib import Path

import pytest

from helpers import DICOM_EXPORTS, DICOM_START, FW_NEW, FW_OLD, KEY, PROFILES, Env, _run, make_env, need_tool

DICOM_SERVERS = ("orthanc", "dcmqrscp", "qrscp")
SCHEDULERS = ("slurm", "sge")
#: fixtures that mean "uses Flywheel" (the bundled test server or the real fw CLI)
FW_FIXTURES = {"fw_env", "fw_old_env", "server", "demo_project"}
#: how a test's own code names a DICOM server when no parameter says which
SERVER_WORDS = {"orthanc": r"ORTHANC|\borthanc\b", "dcmqrscp": r"DCMQRSCP|\bdcmqrscp\b", "qrscp": r"\bQRSCP|(?<![a-z])qrscp\b"}


def pytest_collection_modifyitems(config, items) -> None:
    """Mark each test with the real servers it uses, from its parameters (server, scheduler,
    a case name such as ``dimse-get-orthanc``), its fixtures, else the servers its code names."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        values = {str(v) for v in params.values()}
        found = {s for s in DICOM_SERVERS + SCHEDULERS if s in values}
        found |= {s for s in DICOM_SERVERS + SCHEDULERS for v in values if re.search(rf"(?<![a-z]){s}\b", v)}
        fixtures = set(getattr(item, "fixturenames", ()))
        if "dicom_env" in fixtures and not found & set(DICOM_SERVERS):
            try:
                code = inspect.getsource(item.function)
            except (OSError, TypeError):
                code = ""
            found |= {s for s, words in SERVER_WORDS.items() if re.search(words, code)}
        if fixtures & FW_FIXTURES and "dicom_env" not in fixtures:
            found.add("fw")
        for name in sorted(found):
            if not item.get_closest_marker(name):
                item.add_marker(getattr(pytest.mark, name))


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

    with FlywheelTestServer(projects=[demo_project], api_keys={KEY}) as srv:
        yield srv


# ------------------------------------------------------------- a real batch scheduler


@pytest.fixture(params=sorted(PROFILES))
def scheduler(request) -> str:
    name = request.param
    binary = PROFILES[name][0]
    if shutil.which(binary) is None:
        pytest.fail(
            f"{binary} is not installed: the {name} tests need a real scheduler; run "
            f'`eval "$(scripts/infra/schedulers-up.sh)"` as root (scripts/test.sh does it)'
        )
    probe = _run("sinfo", "-h", "-o", "%T") if name == "slurm" else _run("qstat", "-f")
    if probe.returncode != 0:
        pytest.fail(
            f"{binary} is installed but {name} is not answering ({probe.stderr.strip()}); start it with scripts/infra/schedulers-up.sh"
        )
    return name


# ------------------------------------------------------------- the DICOM test servers


@pytest.fixture(scope="session")
def dicom_env() -> dict[str, str]:
    """The exports of dicom-up.sh: from the environment, else from the env.sh it writes;
    a failed test saying how to start the servers when they are not set up."""
    env = {k: os.environ[k] for k in DICOM_EXPORTS if os.environ.get(k)}
    env_file = Path(os.environ.get("CLPIPE_INFRA", "/tmp/clpipe-infra")) / "dicom" / "env.sh"
    if len(env) < len(DICOM_EXPORTS) and env_file.is_file():
        found = dict(re.findall(r"^export (\w+)=(.*)$", env_file.read_text(), re.M))
        env = {k: found[k] for k in DICOM_EXPORTS if k in found}
    missing = [k for k in DICOM_EXPORTS if k not in env]
    if missing:
        pytest.fail(
            f"the DICOM test servers are not set up ({', '.join(missing)} not set): "
            f"run `{DICOM_START}` (as root; scripts/test.sh does it for you)"
        )
    return env


@pytest.fixture(scope="session")
def dicom_expected(dicom_env) -> dict:
    """What the servers hold: the data set's expected JSON (clpipe.testing.dicomdata)."""
    from clpipe.testing import dicomdata

    path = Path(dicom_env["CLPIPE_DICOM_EXPECTED"])
    if not path.is_file():
        pytest.fail(f"{path} (CLPIPE_DICOM_EXPECTED) does not exist: run `{DICOM_START}` again")
    return dicomdata.load_expected(path)
