"""Start-up cost (issue 15): the command line validates a config and writes a plan without
importing what only the transfers need (httpx, ~30 ms) or what a JSON config never needs
(yaml), and no clpipe process imports httpx's own command line tool (rich and pygments,
~40 ms), and transliteration (anyascii) is loaded only for a name that needs it.
bench/startup.py measures the effect."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import clpipe

HEAVY = ("httpx", "yaml", "rich", "pygments", "anyascii")


def loaded_after(code: str) -> list[str]:
    """Which of HEAVY a fresh interpreter holds after running ``code`` (at exit)."""
    probe = f"import atexit, sys\natexit.register(lambda: print(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n{code}"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    return eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 (our own repr of a list of names)


def test_validating_a_config_and_planning_import_no_http_client_and_no_yaml():
    assert loaded_after("import clpipe.cli, clpipe.config.loader, clpipe.plan, clpipe.submit, clpipe.sources.flywheel") == []


def test_the_flywheel_source_imports_httpx_at_its_first_use():
    code = (
        "from clpipe.sources.flywheel import FlywheelSource, credentials_from_api_key\n"
        "assert 'httpx' not in sys.modules\n"
        "FlywheelSource(credentials_from_api_key('127.0.0.1:9:__force_insecure:k')).close()"
    )
    assert "httpx" in loaded_after(code)


def test_a_clpipe_process_imports_httpx_without_its_command_line_tool():
    # what clpipe/__main__.py does before anything can import httpx ...
    assert loaded_after("sys.modules.setdefault('httpx._main', None)\nimport httpx") == ["httpx"]
    assert set(loaded_after("import httpx")) >= {"httpx", "rich"}  # ... and what that avoids
    main = (Path(clpipe.__file__).parent / "__main__.py").read_text()
    assert main.index('sys.modules.setdefault("httpx._main", None)') < main.index("from clpipe.cli import main")


def test_anyascii_is_imported_only_for_a_name_that_needs_it():
    """Transliteration (anyascii, with importlib.resources: ~3 ms of every start) is loaded
    by the first name that is not ASCII, not by importing the engine and the sources."""
    code = (
        "import clpipe.sync.engine, clpipe.sources.dimse, clpipe.sources.localdir\n"
        "from clpipe.layout import bids_label, portable_name\n"
        "assert portable_name('T1w MPRAGE') == 'T1w_MPRAGE' and bids_label('Pilot 3_b') == 'Pilot3b'\n"
        "assert 'anyascii' not in sys.modules\n"
        "assert portable_name('Müller José') == 'Muller_Jose' and bids_label('Straße') == 'Strasse'"
    )
    assert loaded_after(code) == ["anyascii"]
