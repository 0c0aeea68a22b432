"""``clpipe modulefile``: write an Lmod modulefile for an installed clpipe (cluster admins)."""

from __future__ import annotations

from pathlib import Path

import click

from ..modulefile import DEFAULT_FW_MODULE, FW_MISSING
from .options import debug_option


@click.command("modulefile")
@click.option(
    "-prefix",
    "--prefix",
    "prefix",
    type=click.Path(file_okay=False),
    help="The installation to load: the folder whose bin/ holds clpipe, e.g. its virtual environment. "
    "Default: the one running this command.",
)
@click.option(
    "-version",
    "--version",
    "version",
    help="The module's version, used as the file name <version>.lua. Default: the version of the clpipe under -prefix.",
)
@click.option(
    "-fw_module",
    "--fw-module",
    "fw_module",
    default=DEFAULT_FW_MODULE,
    show_default=True,
    help='The module that provides the Flywheel CLI (fw), loaded with clpipe; "" loads none.',
)
@click.option(
    "-fw_missing",
    "--fw-missing",
    "fw_missing",
    type=click.Choice(FW_MISSING),
    default="warn",
    show_default=True,
    help="When the -fw_module module does not exist at load time: warn (clpipe is loaded, fw is not) or error (nothing is loaded).",
)
@click.option(
    "-output",
    "-o",
    "--output",
    "output",
    type=click.Path(file_okay=False),
    help="A folder on MODULEPATH: the file is written to <folder>/clpipe/<version>.lua. Default: print it.",
)
@debug_option
def modulefile_cli(prefix, version, fw_module, fw_missing, output) -> int:
    """Write an Lmod modulefile for an installed clpipe.

    `module load clpipe` then puts clpipe on PATH and loads the module that provides the
    Flywheel CLI (fw). Without -output the modulefile is printed.
    """
    from ..modulefile import (
        check_fw_module,
        check_prefix,
        check_version,
        default_prefix,
        installed_version,
        render_modulefile,
        write_modulefile,
    )

    root = check_prefix(Path(prefix) if prefix else default_prefix())
    version = check_version(version if version else installed_version(root))
    text = render_modulefile(root, version, check_fw_module(fw_module), fw_missing)
    if output is None:
        click.echo(text, nl=False)
        return 0
    path, replaced = write_modulefile(text, Path(output), version)
    click.echo(f"Wrote {path}" + (" (replacing the one that was there)" if replaced else ""))
    click.echo(f"Users: `module use {path.parent.parent}` (or add it to MODULEPATH), then `module load clpipe`")
    return 0
