"""Click helpers every ``clpipe`` command shares: the ``-debug`` flag (and whether it was
given), the ``-config_file`` option, the help texts of the common options."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

#: what the command line asked for, beyond each command's own values (``-debug``)
STATE = {"debug": False}

CONFIG_HELP = "The project's clpipe_config.json (or .yaml). Default: ./clpipe_config.json"
SUBMIT_HELP = "Run the job (submit it to the batch system, or run it here when there is none). Without it, only print the job."
DEBUG_HELP = "Show tracebacks and extra detail."


def debug_option(func: F) -> F:
    """``-debug`` / ``-d`` / ``--debug``: tracebacks, and a job that shows its own."""

    def remember(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
        if value:
            STATE["debug"] = True
        return value

    return click.option(
        "-debug", "-d", "--debug", "debug", is_flag=True, help=DEBUG_HELP, callback=remember, expose_value=False, is_eager=True
    )(func)


def config_file_option(func: F) -> F:
    """``-config_file`` / ``-c`` / ``--config-file``: the project's config (the command finds
    ``./clpipe_config.json`` when it is not given)."""
    return click.option("-config_file", "-c", "--config-file", "config_file", type=click.Path(dir_okay=False), help=CONFIG_HELP)(func)
