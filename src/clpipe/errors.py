"""Errors a user can cause, each carrying the exit code the command ends with.

The CLI prints ``str(error)`` as one line (no traceback unless ``-debug``) and exits with
``error.exit_code``.
"""

from __future__ import annotations


class ClpipeError(Exception):
    """Base class: a problem the user can fix; the message says what to fix."""

    exit_code = 1


class ConfigError(ClpipeError):
    """Invalid configuration or command-line input (exit code 2)."""

    exit_code = 2


class PreflightError(ClpipeError):
    """The run cannot start: missing tool, login, unreachable server, unwritable folder."""

    exit_code = 1


class SyncFailed(ClpipeError):
    """The sync ran but not every file arrived intact."""

    exit_code = 1
