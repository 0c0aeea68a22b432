"""The documentation site builds without a single warning, and its CLI reference is
generated from the click commands themselves (sphinx-click), so it cannot drift from them."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from clpipe.cli import cli, flywheel_sync_cli
from clpipe.cli.modulefile import modulefile_cli

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT = 300


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    try:
        import myst_parser  # noqa: F401
        import sphinx  # noqa: F401
        import sphinx_click  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"the docs extras are not installed ({exc}); run scripts/setup.sh (it installs .[test,docs])")
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d", str(out / "doctrees"),
         str(ROOT / "docs"), str(out / "html")],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT, cwd=ROOT,
    )
    assert proc.returncode == 0, f"sphinx-build -W failed:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stderr.strip() == "", proc.stderr  # -q: only warnings and errors would be printed
    return out / "html"


def option_signatures(page: Path) -> set[str]:
    """The option names Sphinx documented as objects (``.. option::``) on a page."""
    text = page.read_text(encoding="utf-8")
    names = set()
    for dt in re.findall(r'<dt class="sig sig-object std" id="cmdoption-[^"]*">(.*?)</dt>', text, re.S):
        names.update(html.unescape(n) for n in re.findall(r'<span class="sig-name descname"><span class="pre">([^<]*)</span>', dt))
    return names


def page_text(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text(encoding="utf-8")))


def option_names(command: click.Command) -> set[str]:
    return {name for p in command.params if isinstance(p, click.Option) and not p.hidden for name in (*p.opts, *p.secondary_opts)}


def visible_commands(group: click.Group, prefix: str = "clpipe"):
    for name, command in group.commands.items():
        if command.hidden:
            continue
        yield f"{prefix} {name}", command
        if isinstance(command, click.Group):
            yield from visible_commands(command, f"{prefix} {name}")


def test_flywheel_sync_page_documents_every_option_of_the_command(site):
    documented = option_signatures(site / "flywheel-sync.html")
    assert {"-config_file", "-c", "--config-file", "-submit", "-s", "--submit", "-engine", "--engine",
            "-batch_config", "-after", "-source_url", "-dropoff_dir", "-temp_dir", "-debug"} <= documented
    assert option_names(flywheel_sync_cli) <= documented
    text = page_text(site / "flywheel-sync.html")
    assert ".. click::" not in text and ".. option::" not in text  # the directive ran as reST, not as text
    assert "clpipe dicom flywheel_sync [OPTIONS]" in text
    assert flywheel_sync_cli.help.splitlines()[0].split("`")[0] in text


def test_cli_reference_covers_every_visible_command(site):
    text = page_text(site / "cli.html")
    documented = option_signatures(site / "cli.html")
    commands = list(visible_commands(cli))
    assert {path for path, _ in commands} >= {"clpipe dicom", "clpipe dicom flywheel_sync", "clpipe project_setup", "clpipe modulefile"}
    for path, command in commands:
        assert f"{path} [OPTIONS]" in text, f"{path} is missing from the CLI reference"
        assert option_names(command) <= documented, path
    assert "_run_plan" not in text  # hidden commands stay out


def test_modulefile_and_project_setup_pages_document_their_options(site):
    assert option_names(modulefile_cli) <= option_signatures(site / "cluster-module.html")
    assert {"-project_title", "-project_dir", "-source_url", "-profile"} <= option_signatures(site / "project-setup.html")


def test_every_page_is_in_the_toctree_and_the_design_notes_are_kept(site):
    index = (site / "index.html").read_text(encoding="utf-8")
    for page in ("install", "project-setup", "flywheel-sync", "engines", "other-sources", "batch",
                 "troubleshooting", "cli", "cluster-module", "developer/sync-engine"):
        assert (site / f"{page}.html").is_file(), page
        assert f'href="{page}.html"' in index, page
