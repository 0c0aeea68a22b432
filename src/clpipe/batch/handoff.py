"""Secrets a batch job needs from the shell that submitted it (a DICOMweb login).

They are never written into the job script, passed on a command line or handed to the
scheduler as environment (Grid Engine's ``qsub -v`` stores values in the job's
``env_list``, which ``qstat -j`` shows to other users). Instead, at submission they go into
a file only the user can read, in the home folder (which the compute nodes share, as they
share the saved ``fw login``): ``~/.clpipe/handoff/<job>.json``, mode 0600 in a 0700
folder. The job script carries the file's path (``CLPIPE_HANDOFF_FILE``); the job reads the
file when it starts, deletes it, and puts the values in its own environment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import PreflightError

HANDOFF_VAR = "CLPIPE_HANDOFF_FILE"


def handoff_path(stem: str) -> Path:
    return Path.home() / ".clpipe" / "handoff" / f"{stem}.json"


def write_handoff(path: Path, names: tuple[str, ...]) -> None:
    """Write the current values of ``names`` to ``path`` (created new, mode 0600)."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    values = {name: os.environ[name] for name in names if name in os.environ}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(values, out)


def take_handoff(allowed: tuple[str, ...]) -> list[str]:
    """In the job: read the hand-off file named by CLPIPE_HANDOFF_FILE (if any), delete it,
    and set the values of ``allowed`` names in this process's environment; returns the
    names set."""
    where = os.environ.pop(HANDOFF_VAR, "")
    if not where:
        return []
    path = Path(where)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PreflightError(
            f"the login handed to this job is gone ({path}): each submission's hand-off file is read "
            "once and deleted when its job starts; submit the job again"
        ) from None
    except (OSError, ValueError) as exc:
        raise PreflightError(f"cannot read the login handed to this job ({path}: {exc}); submit the job again") from None
    finally:
        path.unlink(missing_ok=True)
    names = [name for name in allowed if isinstance(values.get(name), str)]
    for name in names:
        os.environ[name] = values[name]
    return names
