"""`clpipe modulefile` and the Lmod modulefile it writes, loaded by the real Lmod (Debian
package `lmod`, which scripts/setup.sh installs as root) in fresh login shells, with the
real Flywheel CLI behind a test `flywheel` module."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from clpipe import __version__
from clpipe.modulefile import lua_string

from helpers import FW_NEW, need_tool

pytestmark = pytest.mark.lmod

# Where Lmod's shell setup lives: Debian's login-shell hook first, then Lmod's own init.
LMOD_INITS = (Path("/etc/profile.d/lmod.sh"), Path("/usr/share/lmod/lmod/init/bash"))
SHELL_TIMEOUT = 120


def lmod_init() -> Path:
    for path in LMOD_INITS:
        if path.exists():
            return path
    return need_tool(LMOD_INITS[0], "Lmod (Debian package lmod: apt-get install lmod)")


def clpipe(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clpipe", *args], capture_output=True, text=True, timeout=timeout)


def write_modules(root: Path, *args: str, fw_module: str | None = "flywheel/18.5.1") -> Path:
    """A MODULEPATH folder with the clpipe modulefile and (unless None) a test module that
    puts the real fw on PATH."""
    modules = root / "modules"
    proc = clpipe("modulefile", "-output", str(modules), *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if fw_module is not None:
        fw = need_tool(FW_NEW, "flywheel-cli 18.5.1 (fw)")
        path = modules / f"{fw_module}.lua"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'whatis("Flywheel CLI (test module)")\nprepend_path("PATH", {lua_string(str(fw.parent))})\n')
    return modules


def login_shell(tmp_path: Path, modules: Path, script: str) -> subprocess.CompletedProcess:
    """``script`` in a fresh login shell: empty environment, system PATH, only ``modules``
    on MODULEPATH (Lmod adds its own folders). Lmod comes from the login profile; its init
    is sourced only where the login profile does not provide `module`."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    init = lmod_init()
    setup = f"type module >/dev/null 2>&1 || . {init}\n"
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "MODULEPATH": str(modules), "USER": "clpipe-test", "LOGNAME": "clpipe-test"}
    return subprocess.run(
        ["bash", "-l", "-c", setup + script], env=env, capture_output=True, text=True, timeout=SHELL_TIMEOUT, stdin=subprocess.DEVNULL
    )


def values(proc: subprocess.CompletedProcess) -> dict[str, str]:
    """``KEY=value`` lines the shell scripts print."""
    out = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.isupper():
            out[key] = value
    return out


def test_module_load_puts_clpipe_and_fw_on_path_and_unload_removes_them(tmp_path):
    modules = write_modules(tmp_path)
    assert (modules / "clpipe" / f"{__version__}.lua").is_file()
    proc = login_shell(
        tmp_path,
        modules,
        """
        echo "BEFORE_CLPIPE=$(command -v clpipe)"
        echo "BEFORE_FW=$(command -v fw)"
        module load clpipe; echo "LOAD_RC=$?"
        echo "CLPIPE_PATH=$(command -v clpipe)"
        echo "CLPIPE_VERSION=$(clpipe --version)"
        echo "FW_VERSION=$(fw version 2>/dev/null | tr -d ' \\n')"
        echo "LOADED=$(module -t list 2>&1 | tr '\\n' ' ')"
        module unload clpipe; echo "UNLOAD_RC=$?"
        command -v clpipe >/dev/null; echo "AFTER_CLPIPE_RC=$?"
        command -v fw >/dev/null; echo "AFTER_FW_RC=$?"
        echo "AFTER_LOADED=$(module -t list 2>&1 | tr '\\n' ' ')"
    """,
    )
    got = values(proc)
    assert got.get("LOAD_RC") == "0", proc.stdout + proc.stderr
    assert got["BEFORE_CLPIPE"] == "" and got["BEFORE_FW"] == ""
    assert got["CLPIPE_PATH"] == str(Path(sys.prefix) / "bin" / "clpipe")
    assert got["CLPIPE_VERSION"] == f"clpipe, version {__version__}"
    # fw 18.5.1 has no --version option; `fw version` prints "flywheel-cli\n  version: 18.5.1"
    assert got["FW_VERSION"] == "flywheel-cliversion:18.5.1", proc.stdout + proc.stderr
    assert "clpipe/" in got["LOADED"] and "flywheel/18.5.1" in got["LOADED"]
    assert got["UNLOAD_RC"] == "0"
    assert got["AFTER_CLPIPE_RC"] != "0" and got["AFTER_FW_RC"] != "0", proc.stdout + proc.stderr
    assert "clpipe" not in got["AFTER_LOADED"] and "flywheel" not in got["AFTER_LOADED"]
    assert "warning" not in proc.stderr


def test_fw_module_loaded_before_clpipe_stays_after_unload(tmp_path):
    modules = write_modules(tmp_path)
    proc = login_shell(
        tmp_path,
        modules,
        """
        module load flywheel clpipe && module unload clpipe
        command -v clpipe >/dev/null; echo "CLPIPE_RC=$?"
        echo "FW=$(command -v fw)"
    """,
    )
    got = values(proc)
    assert got.get("CLPIPE_RC") not in (None, "0"), proc.stdout + proc.stderr
    assert got["FW"] == str(FW_NEW.parent / "fw")


def test_fw_module_name_is_configurable(tmp_path):
    modules = write_modules(tmp_path, "-fw_module", "fw-cli/18.5.1", fw_module="fw-cli/18.5.1")
    proc = login_shell(
        tmp_path,
        modules,
        """
        module load clpipe; echo "LOAD_RC=$?"
        echo "FW=$(command -v fw)"
        echo "LOADED=$(module -t list 2>&1 | tr '\\n' ' ')"
    """,
    )
    got = values(proc)
    assert got.get("LOAD_RC") == "0", proc.stdout + proc.stderr
    assert got["FW"] == str(FW_NEW.parent / "fw")
    assert "fw-cli/18.5.1" in got["LOADED"]


def test_missing_fw_module_loads_clpipe_with_a_clear_message(tmp_path):
    modules = write_modules(tmp_path, fw_module=None)
    proc = login_shell(
        tmp_path,
        modules,
        """
        module load clpipe; echo "LOAD_RC=$?"
        echo "CLPIPE_VERSION=$(clpipe --version)"
        command -v fw >/dev/null; echo "FW_RC=$?"
    """,
    )
    got = values(proc)
    assert got.get("LOAD_RC") == "0", proc.stdout + proc.stderr  # job scripts with set -e keep going
    assert got["CLPIPE_VERSION"] == f"clpipe, version {__version__}"
    assert got["FW_RC"] != "0"
    message = " ".join(proc.stderr.split())  # Lmod wraps long messages
    assert "clpipe: warning: the module flywheel, which should provide the Flywheel CLI (fw), does not exist here" in message
    assert "so fw is not on PATH" in message
    assert "-engine native" in message and "pip install flywheel-cli" in message and "-fw_module" in message


def test_missing_fw_module_in_error_mode_refuses_to_load(tmp_path):
    modules = write_modules(tmp_path, "-fw_missing", "error", fw_module=None)
    proc = login_shell(
        tmp_path,
        modules,
        """
        module load clpipe; echo "LOAD_RC=$?"
        command -v clpipe >/dev/null; echo "CLPIPE_RC=$?"
    """,
    )
    got = values(proc)
    assert got.get("LOAD_RC") not in (None, "0"), proc.stdout + proc.stderr
    assert got["CLPIPE_RC"] != "0"
    message = " ".join(proc.stderr.split())
    assert "clpipe: the module flywheel, which should provide the Flywheel CLI (fw), does not exist here" in message
    assert "so clpipe was not loaded" in message and "-fw_module" in message


def test_other_prefix_with_awkward_path_and_its_own_version(tmp_path):
    """-prefix of another installation: its version comes from its own clpipe, and a path
    with quotes, spaces and a $ survives the trip through Lua."""
    prefix = tmp_path / 'site "apps" $HOME\\x' / "clpipe 2"
    (prefix / "bin").mkdir(parents=True)
    fake = prefix / "bin" / "clpipe"
    fake.write_text("#!/bin/sh\necho 'clpipe, version 9.8.7'\n")
    fake.chmod(0o755)
    modules = write_modules(tmp_path, "-prefix", str(prefix), "-fw_module", "", fw_module=None)
    assert (modules / "clpipe" / "9.8.7.lua").is_file()
    assert "isAvail" not in (modules / "clpipe" / "9.8.7.lua").read_text()  # -fw_module "": no fw module
    proc = login_shell(
        tmp_path,
        modules,
        """
        module load clpipe/9.8.7; echo "LOAD_RC=$?"
        echo "CLPIPE_PATH=$(command -v clpipe)"
        echo "CLPIPE_VERSION=$(clpipe --version)"
    """,
    )
    got = values(proc)
    assert got.get("LOAD_RC") == "0", proc.stdout + proc.stderr
    assert got["CLPIPE_PATH"] == str(fake)
    assert got["CLPIPE_VERSION"] == "clpipe, version 9.8.7"
    assert proc.stderr.strip() == ""


# --- the command itself (no Lmod needed) -------------------------------------------------


def test_prints_the_modulefile_by_default():
    proc = clpipe("modulefile")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert f'prepend_path("PATH", {lua_string(str(Path(sys.prefix) / "bin"))})' in text
    assert f'whatis("Version: {__version__}")' in text
    assert 'local fw_module = "flywheel"' in text and "depends_on(fw_module)" in text and "LmodMessage(" in text
    assert re.search(r"^\s+modulefile\s+Write an Lmod modulefile", clpipe("--help").stdout, re.MULTILINE)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-prefix", "/nonexistent/prefix"], "-prefix: /nonexistent/prefix/bin/clpipe does not exist or is not executable"),
        (["-version", "../1.0"], "-version: '../1.0' cannot be a module version"),
        (["-fw_module", 'fly"wheel'], "-fw_module: 'fly\"wheel' is not a module name"),
        (["-fw_missing", "ignore"], "'ignore' is not one of 'warn', 'error'"),
    ],
)
def test_bad_arguments_are_one_clear_line(args, message):
    proc = clpipe("modulefile", *args)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = clpipe("modulefile", "-output", str(blocker / "modules"))
    assert proc.returncode == 2
    assert f"-output: cannot write {blocker}/modules/clpipe/{__version__}.lua" in proc.stderr


def test_lua_string_escapes():
    assert lua_string('a"b\\c\nd\x01') == '"a\\"b\\\\c\\nd\\001"'
