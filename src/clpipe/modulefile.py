"""An Lmod modulefile for an installed clpipe, for cluster admins.

``module load clpipe`` then puts the installation's ``bin/`` (where the ``clpipe`` command
is) on ``PATH`` and loads the module that provides the Flywheel CLI ``fw`` (``flywheel`` by
default). When that module does not exist, the load either goes ahead with a warning
message (the default: clpipe's native engine, project setup and dry runs need no ``fw``)
or stops with an error (``fw_missing="error"``); both name the module and say how to fix
it.

The modulefile is Lua (Lmod's own format): every value written into it is a quoted Lua
string, so no path or name can change what the file does.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .errors import ConfigError

DEFAULT_FW_MODULE = "flywheel"
FW_MISSING = ("warn", "error")
VERSION_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+-]*")
# Lmod module names: name or name/version, possibly with category folders (a/b/c)
MODULE_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+-]*(/[0-9A-Za-z][0-9A-Za-z._+-]*)*")
VERSION_TIMEOUT = 60


def lua_string(text: str) -> str:
    """``text`` as a double-quoted Lua string literal (any byte is safe inside it)."""
    out = []
    for char in text:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif ord(char) < 32 or ord(char) == 127:
            out.append(f"\\{ord(char):03d}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def default_prefix() -> Path:
    """The prefix of the running clpipe: its (virtual) environment."""
    return Path(sys.prefix)


def installed_version(prefix: Path) -> str:
    """The version of the clpipe installed under ``prefix``: this one's when it is the
    running installation, else what ``<prefix>/bin/clpipe --version`` says."""
    if _same_path(prefix, default_prefix()):
        return __version__
    command = prefix / "bin" / "clpipe"
    try:
        proc = subprocess.run(
            [str(command), "--version"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=VERSION_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"-prefix: cannot ask {command} for its version ({exc.__class__.__name__}); pass -version") from None
    match = re.search(r"version\s+(\S+)", proc.stdout)
    if proc.returncode != 0 or not match:
        raise ConfigError(f"-prefix: {command} --version did not print a version (exit {proc.returncode}); pass -version")
    return match.group(1)


def _same_path(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_prefix(prefix: Path) -> Path:
    """The absolute prefix, checked to hold an installed ``bin/clpipe``."""
    prefix = Path(prefix).expanduser().absolute()
    if re.search(r"[\x00-\x1f\x7f]", str(prefix)):
        raise ConfigError(f"-prefix: {str(prefix)!r} contains a control character (a line break?); use a plain folder path")
    command = prefix / "bin" / "clpipe"
    if not (command.is_file() and os.access(command, os.X_OK)):
        raise ConfigError(
            f"-prefix: {command} does not exist or is not executable; pass the prefix of an installed clpipe "
            f"(the folder whose bin/ holds the clpipe command, e.g. the virtual environment it was installed into)"
        )
    return prefix


def check_version(version: str) -> str:
    if not VERSION_RE.fullmatch(version):
        raise ConfigError(f"-version: {version!r} cannot be a module version (use letters, digits and . _ + -, e.g. 0.1.0)")
    return version


def check_fw_module(name: str) -> str:
    name = name.strip()
    if name and (not MODULE_RE.fullmatch(name) or ".." in name.split("/")):
        raise ConfigError(f'-fw_module: {name!r} is not a module name (e.g. flywheel or flywheel/18.5.1); "" loads none')
    return name


def render_modulefile(prefix: Path, version: str, fw_module: str = DEFAULT_FW_MODULE, fw_missing: str = "warn") -> str:
    """The Lua modulefile text. ``prefix`` and the names must already be checked."""
    if fw_missing not in FW_MISSING:
        raise ConfigError(f"-fw_missing: expected one of {', '.join(FW_MISSING)}")
    bin_dir = str(Path(prefix) / "bin")
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    regenerate = shlex.join(
        ["clpipe", "modulefile", "-prefix", str(prefix), "-version", version, "-fw_module", fw_module, "-fw_missing", fw_missing]
    )
    loads = f" and loads the module {fw_module}, which provides the Flywheel CLI (fw)" if fw_module else ""
    help_text = (
        f"clpipe {version}: the DICOM sync step of the clpipe MRI pipeline (clpipe dicom flywheel_sync).\n"
        f"Puts the clpipe command from {prefix} on PATH{loads}.\n"
        "Log in to Flywheel once with: fw login <site>:<API key>\n"
    )
    lines = [
        f"-- clpipe {version} environment module (Lmod), written by clpipe {__version__} on {written}.",
        f"-- Regenerate with: {regenerate}",
        "",
        f"help({lua_string(help_text)})",
        "",
        'whatis("Name: clpipe")',
        f"whatis({lua_string('Version: ' + version)})",
        'whatis("Description: the DICOM sync step of the clpipe MRI pipeline: Flywheel to the cluster, as a batch job")',
        f"whatis({lua_string('Prefix: ' + str(prefix))})",
        "",
        f'prepend_path("PATH", {lua_string(bin_dir)})',
    ]
    if fw_module:
        missing = (
            f"the module {fw_module}, which should provide the Flywheel CLI (fw), does not exist here "
            f"(module avail {fw_module} finds nothing), "
        )
        fix = (
            f"Admins: install a module named {fw_module} that puts fw on PATH, or write this file again with "
            f'clpipe modulefile -fw_module <the module that provides fw> ("" for none).'
        )
        if fw_missing == "error":
            call, parts = "LmodError", ["clpipe: " + missing + "so clpipe was not loaded. ", fix]
        else:
            # LmodMessage, not LmodWarning: a warning makes `module load` exit 1, which would
            # stop job scripts run with `set -e` although clpipe itself was loaded.
            call, parts = (
                "LmodMessage",
                [
                    "clpipe: warning: " + missing + "so fw is not on PATH. ",
                    "clpipe's default engine (native, -engine native) needs no fw; "
                    "for the fw-cli engine (-engine fw-cli), install the Flywheel CLI "
                    "(python3 -m venv ~/fw-cli && ~/fw-cli/bin/pip install flywheel-cli) "
                    "and add ~/fw-cli/bin to PATH. ",
                    fix,
                ],
            )
        lines += [
            "",
            "-- The Flywheel CLI (fw) comes from its own module. depends_on() loads it with clpipe and",
            "-- unloads it with clpipe, unless it was loaded before clpipe or another module needs it.",
            f"local fw_module = {lua_string(fw_module)}",
            "if isAvail(fw_module) then",
            "    depends_on(fw_module)",
            'elseif mode() == "load" then',
            f"    {call}(",
            "        " + "\n        .. ".join(lua_string(p) for p in parts),
            "    )",
            "end",
        ]
    return "\n".join(lines) + "\n"


def modulefile_path(output_dir: Path, version: str) -> Path:
    """Where Lmod looks for ``clpipe/<version>``: ``<dir>/clpipe/<version>.lua``."""
    return Path(output_dir).expanduser().absolute() / "clpipe" / f"{version}.lua"


def write_modulefile(text: str, output_dir: Path, version: str) -> tuple[Path, bool]:
    """Write the modulefile atomically; returns its path and whether one was replaced."""
    path = modulefile_path(output_dir, version)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replaced = path.exists()
        temp = path.with_name(f".{path.name}.tmp")
        temp.write_text(text, encoding="utf-8")
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except OSError as exc:
        raise ConfigError(f"-output: cannot write {path}: {exc.strerror or exc}") from None
    return path, replaced
