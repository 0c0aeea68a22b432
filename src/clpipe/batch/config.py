"""clpipe batch configurations: how jobs reach a scheduler.

A batch configuration is clpipe's JSON file of submission settings (``SubmissionHead``,
``MemoryCommand``, ...), in the legacy CamelCase spelling or clpipe 1.9's snake_case one.
It is chosen by name (a built-in profile such as ``slurmUNCConfig.json``) or by path, from
``BatchConfig`` / ``batch_config_path`` in clpipe_config.json or the ``-batch_config``
flag. An empty value means: no batch system, run here.
"""

from __future__ import annotations

import difflib
import json
import shlex
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError

PROFILE_PACKAGE = "clpipe.data.batch_profiles"

# canonical -> (legacy CamelCase, clpipe 1.9 snake_case, expected type)
KEYS: dict[str, tuple[str, str, type]] = {
    "submission_head": ("SubmissionHead", "submission_head", str),
    "submission_options": ("SubmissionOptions", "submission_options", list),
    "sub_options_equal": ("SubOptionsEqual", "sub_options_equal", list),
    "n_threads_command": ("NThreadsCommand", "n_threads_command", str),
    "n_threads": ("NThreads", "n_threads", str),
    "memory_command": ("MemoryCommand", "memory_command", str),
    "memory_default": ("MemoryDefault", "memory_default", str),
    "time_command": ("TimeCommand", "time_command", str),
    "time_default": ("TimeDefault", "time_default", str),
    "job_id_command": ("JobIDCommand", "job_id_command", str),
    "output_command": ("OutputCommand", "output_command", str),
    "command_wrapper": ("CommandWrapper", "command_wrapper", str),
    "email_address": ("EmailAddress", "email_address", str),
    "email_command": ("EmailCommand", "email_command", str),
    "fmriprep_batch_commands": ("FMRIPrepBatchCommands", "fmri_prep_batch_commands", str),
    "no_quotes": ("NoQuotes", "no_quotes", bool),
    "time_command_active": ("TimeCommandActive", "time_command_active", bool),
    "thread_command_active": ("ThreadCommandActive", "thread_command_active", bool),
    "job_id_command_active": ("JobIDCommandActive", "job_id_command_active", bool),
    "output_command_active": ("OutputCommandActive", "output_command_active", bool),
    "singularity_bind_paths": ("SingularityBindPaths", "singularity_bind_paths", str),
}
# clpipe 1.9's own dataclass spells this one with a capital A; accept it as written there.
ALIASES = {"output_command_Active": "output_command_active"}
REQUIRED = ("submission_head",)
LOCAL_NAMES = {"", "local", "none"}


def builtin_profiles() -> list[str]:
    return sorted(p.name for p in resources.files(PROFILE_PACKAGE).iterdir() if p.name.endswith(".json"))


@dataclass(frozen=True)
class BatchConfig:
    """A validated batch configuration (values under canonical names)."""

    name: str  # profile name or file path, as given
    source: str  # where it was read from, for messages
    values: dict

    def __getattr__(self, item: str) -> Any:
        try:
            return self.values[item]
        except KeyError:
            raise AttributeError(item) from None

    @property
    def head(self) -> list[str]:
        return shlex.split(self.values["submission_head"])

    @property
    def scheduler(self) -> str:
        """``slurm``, ``sge`` or ``generic``, from the submission command."""
        command = Path(self.head[0]).name if self.head else ""
        return {"sbatch": "slurm", "qsub": "sge"}.get(command, "generic")


def _defaults() -> dict:
    return {
        "submission_options": [],
        "sub_options_equal": [],
        "n_threads_command": "",
        "n_threads": "",
        "memory_command": "",
        "memory_default": "",
        "time_command": "",
        "time_default": "",
        "job_id_command": "",
        "output_command": "",
        "command_wrapper": "",
        "email_address": "",
        "email_command": "",
        "fmriprep_batch_commands": "",
        "no_quotes": False,
        "time_command_active": False,
        "thread_command_active": False,
        "job_id_command_active": False,
        "output_command_active": False,
        "singularity_bind_paths": "",
    }


def _validate(data: Any, source: str, name: str) -> BatchConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object {{...}} at the top level, found {type(data).__name__}")
    by_name: dict[str, str] = {}
    for canonical, (legacy, snake, _) in KEYS.items():
        by_name[legacy] = canonical
        by_name[snake] = canonical
    by_name.update(ALIASES)
    values = _defaults()
    for key, value in data.items():
        found = by_name.get(key)
        if found is None:
            close = difflib.get_close_matches(key, list(by_name), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown batch configuration key {key!r}{hint}")
        expected = KEYS[found][2]
        if expected is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, expected):
            what = {str: "text", list: 'a list of {"command": ..., "args": ...} objects', bool: "true or false"}[expected]
            raise ConfigError(f"{source}: {key}: expected {what}, found {json.dumps(value)}")
        if isinstance(value, list):
            for item in value:
                if not (isinstance(item, dict) and set(item) == {"command", "args"} and all(isinstance(v, str) for v in item.values())):
                    raise ConfigError(
                        f'{source}: {key}: each entry must be {{"command": "...", "args": "..."}} '
                        f"with text values, found {json.dumps(item)}"
                    )
        values[found] = value
    for canonical in REQUIRED:
        if not values.get(canonical, "").strip():
            legacy, snake, _ = KEYS[canonical]
            raise ConfigError(f'{source}: {legacy} (or {snake}) is missing or empty; expected the submit command, e.g. "sbatch" or "qsub"')
    try:
        shlex.split(values["submission_head"])
    except ValueError as exc:
        raise ConfigError(f"{source}: SubmissionHead: {values['submission_head']!r} cannot be split into words ({exc})") from None
    return BatchConfig(name=name, source=source, values=values)


def load_batch_config(value: str | None, project_dir: Path) -> BatchConfig | None:
    """Resolve a BatchConfig value: None for local runs, else the validated configuration.

    A value is a built-in profile name (``slurmUNCConfig.json``, with or without
    ``.json``) or a path (relative paths resolve against the project directory).
    """
    if value is None or value.strip().lower() in LOCAL_NAMES:
        return None
    value = value.strip()
    profiles = builtin_profiles()
    candidate = value if value.endswith(".json") else value + ".json"
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = project_dir / path
    if path.exists():
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read batch configuration {path}: {exc}") from None
    elif "/" not in value and candidate in profiles:
        source = f"built-in profile {candidate}"
        text = resources.files(PROFILE_PACKAGE).joinpath(candidate).read_text(encoding="utf-8")
    else:
        close = difflib.get_close_matches(candidate, profiles, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"batch configuration {value!r} is neither a file (looked at {path}) nor a built-in profile "
            f'({", ".join(profiles)}){hint}; use "" to run without a batch system'
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    return _validate(data, source, value)


def builtin_profile_text(name: str) -> str:
    candidate = name if name.endswith(".json") else name + ".json"
    if candidate not in builtin_profiles():
        raise ConfigError(f"-profile: {name!r} is not a built-in profile; choose one of: local, {', '.join(builtin_profiles())}")
    return resources.files(PROFILE_PACKAGE).joinpath(candidate).read_text(encoding="utf-8")
