"""Reading ``clpipe_config.json`` (or ``.yaml``): validating and resolving it, with one-line
messages that name the file and the user's own spelling of the key.

Two spellings exist in the wild and both are read:

* legacy CamelCase files (``SourceOptions`` / ``SourceURL`` / ...), which clpipe wrote up
  to 1.8 and whose keys the documentation shows;
* clpipe 1.9 snake_case files (``source`` / ``source_url`` / ...), marked by
  ``clpipe_version`` or ``version``.

Only what the sync step uses is validated in depth (the source block, the project
directory, e-mail, batch config). The other sections belong to later pipeline steps and
are passed over, but a top-level key that no clpipe version knows is reported, with the
nearest known key suggested, because a misspelt ``SourceOptions`` would otherwise be
silently ignored.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import ConfigError
from ..sources.flywheel import FlywheelURL
from .model import ProjectConfig, SourceConfig, SourceModel
from .options import (
    OTHER_TOP_LEGACY,
    OTHER_TOP_SNAKE,
    QUERY_KEYS,
    QUERY_OPTION,
    SOURCE_DEFAULTS,
    SOURCE_FLAGS,
    SOURCE_KEYS,
    SOURCE_SECTION,
    TOP_KEYS,
    Style,
    key_name,
)


def read_mapping(path: Path) -> dict[str, Any]:
    """Read JSON or YAML into a dict; errors name the file, line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; create one with `clpipe project_setup` or pass -config_file") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; pass the path of clpipe_config.json") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml  # here: only a YAML config needs it (~10 ms at start-up)

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object {{...}} at the top level, found {type(data).__name__}")
    return data


def _detect_style(data: dict[str, Any], path: Path) -> Style:
    legacy_hits = {k for k in data if k in {v[0] for v in TOP_KEYS.values()} | {SOURCE_SECTION[0]}}
    snake_hits = {k for k in data if k in {v[1] for v in TOP_KEYS.values()} | {SOURCE_SECTION[1], "clpipe_version"}}
    if SOURCE_SECTION[0] in data and SOURCE_SECTION[1] in data:
        raise ConfigError(f"{path}: has both SourceOptions (legacy) and source (clpipe 1.9) blocks; keep one of them")
    if snake_hits and not legacy_hits:
        return "snake"
    if legacy_hits and not snake_hits:
        return "legacy"
    if "clpipe_version" in data or SOURCE_SECTION[1] in data:
        return "snake"
    return "legacy"


def _unknown_key(path: Path, where: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:
        lowered = {k.lower(): k for k in known}
        close = [lowered[key.lower()]] if key.lower() in lowered else []
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"{path}: unknown key {key!r} in {where}{hint}")


def _check_top_level(data: dict[str, Any], style: Style, path: Path) -> None:
    ours = [v[0] if style == "legacy" else v[1] for v in TOP_KEYS.values()]
    section = SOURCE_SECTION[0] if style == "legacy" else SOURCE_SECTION[1]
    others = OTHER_TOP_LEGACY if style == "legacy" else OTHER_TOP_SNAKE
    known = ours + [section] + sorted(others)
    for key in data:
        if key not in known:
            raise _unknown_key(path, "the top level", key, known)


def _canonical_source(block: Any, style: Style, path: Path) -> dict[str, Any]:
    section = SOURCE_SECTION[0] if style == "legacy" else SOURCE_SECTION[1]
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: {section}: expected an object {{...}}, found {type(block).__name__}")
    by_name = {key_name(c, style): c for c in SOURCE_KEYS}
    out = {}
    for key, value in block.items():
        if key not in by_name:
            raise _unknown_key(path, section, key, list(by_name))
        out[by_name[key]] = value
    return out


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


def check_writable_dir(path: Path, what: str) -> None:
    """Fail unless ``path`` is a folder that exists and is writable, or could be created."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{what}: {path} cannot be created because {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        why = f"no write permission on {probe}"
        try:
            if os.statvfs(probe).f_flag & os.ST_RDONLY:
                why = f"{probe} is on a read-only filesystem"
        except OSError:
            pass
        raise ConfigError(f"{what}: {path} cannot be written ({why})")


def load_project_config(
    config_file: str | os.PathLike[str],
    source_url: str | None = None,
    dropoff_dir: str | None = None,
    temp_dir: str | None = None,
    engine: str | None = None,
    query: dict[str, Any] | None = None,
    flags: dict[str, Any] | None = None,
) -> ProjectConfig:
    """Read, validate and resolve a project config; flags override the file's values
    (``query``: Query keys by canonical name, from the flags of ``clpipe dicom sync``;
    ``flags``: any other SourceOptions keys by canonical name, None for a flag not given)."""
    path = Path(config_file).expanduser().absolute()
    data = read_mapping(path)
    style = _detect_style(data, path)
    _check_top_level(data, style, path)
    section = SOURCE_SECTION[0] if style == "legacy" else SOURCE_SECTION[1]

    def top(canonical: str) -> Any:
        return data.get(key_name(canonical, style, TOP_KEYS))

    project_dir_value = top("project_directory")
    if project_dir_value is not None and not isinstance(project_dir_value, str):
        raise ConfigError(f"{path}: {key_name('project_directory', style, TOP_KEYS)}: expected a folder path as text")
    project_dir = _resolve(path.parent, project_dir_value) if project_dir_value else path.parent

    values = dict(SOURCE_DEFAULTS)
    values.update(_canonical_source(data.get(section), style, path))
    from_flag: set[str] = set()
    overrides = (
        ("source_url", source_url),
        ("dropoff_directory", dropoff_dir),
        ("temp_directory", temp_dir),
        ("engine", engine),
        *(flags or {}).items(),
    )
    for canonical, value in overrides:
        if value is not None:
            values[canonical] = value
            from_flag.add(canonical)

    def where(canonical: str) -> str:
        """The flag or the key a value came from, for messages."""
        return SOURCE_FLAGS[canonical] if canonical in from_flag else f"{section}.{key_name(canonical, style)}"

    try:
        checked = dict(SourceModel.model_validate(values))
    except ValidationError as exc:
        error = exc.errors()[0]
        canonical = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")
        bad = values.get(canonical)
        if isinstance(bad, str):  # a URL's password is never shown
            from ..sources.dicom import redact_url

            bad = redact_url(bad)
        raise ConfigError(f"{path}: {where(canonical)}: {bad!r} is not valid: {message}") from None
    url = checked["source_url"]
    flywheel = isinstance(url, FlywheelURL)
    engine_value = checked["engine"]
    engine_given = "engine" in from_flag or key_name("engine", style) in (data.get(section) or {})
    if not flywheel:
        if engine_given and checked["engine"] != "native":
            raise ConfigError(
                f"{path}: {where('engine')}: the fw-cli engine syncs only from Flywheel (fw://); "
                f'remove {key_name("engine", style)} or set it to "native" for {url}'
            )
        engine_value = "native"
    layout_template: str = checked["layout_template"]
    if layout_template:
        from ..layout import check_template

        try:
            if flywheel:
                check_template(layout_template)
            else:
                from ..sources.dicom import check_dicom_template

                check_dicom_template(layout_template)
        except ValueError as exc:
            raise ConfigError(f"{path}: {where('layout_template')}: {exc}") from None
        if engine_value != "native":
            raise ConfigError(
                f"{path}: {section}.{key_name('layout_template', style)}: a layout template needs the native engine; "
                f'set {key_name("engine", style)} to "native", or remove {key_name("layout_template", style)} to use fw sync '
                f"(it always writes Flywheel's layout; then set {'DICOMFormatString' if style == 'legacy' else 'dicom_format_string'} "
                "to SUBJECTS/{subject}/SESSIONS/{session}/)"
            )
    dicom_query = None if flywheel else _query(checked["query"], query or {}, style, path, f"{section}.{key_name('query', style)}")
    if not flywheel and checked["retrieve_method"] == "move" and not checked["move_port"]:
        raise ConfigError(
            f'{path}: {where("retrieve_method")} is "move": set {key_name("move_port", style)} to the port on which '
            "this machine receives the images (the PACS must know our AE title at that port)"
        )

    dropoff_value: str = checked["dropoff_directory"]
    temp_value: str = checked["temp_directory"]
    dropoff = _resolve(project_dir, dropoff_value) if dropoff_value.strip() else project_dir / "data_DICOMs"
    temp = _resolve(project_dir, temp_value) if temp_value.strip() else project_dir / "flywheel_tmp"
    check_writable_dir(dropoff, f"{path}: {where('dropoff_directory')}")
    check_writable_dir(temp, f"{path}: {where('temp_directory')}")
    check_writable_dir(project_dir / "logs" / "sync_logs", f"{path}: the log folder")

    email = top("email_address")
    if isinstance(email, str) and ("@" not in email or email.strip().upper() == "SET EMAIL ADDRESS"):
        email = None
    batch = top("batch_config")
    if batch is not None and not isinstance(batch, str):
        raise ConfigError(f"{path}: {key_name('batch_config', style, TOP_KEYS)}: expected a profile name or a file path as text")
    title = top("project_title")

    def tls_file(name: str) -> str:
        value: str = checked[name]
        return str(Path(value).expanduser()) if value else ""

    source = SourceConfig(
        url=url,
        dropoff_directory=dropoff,
        temp_directory=temp,
        commandline_opts=checked["commandline_opts"],
        time_seconds=checked["time_usage"],
        mem_mb=checked["mem_usage"],
        cores=checked["core_usage"],
        raw_time=str(values["time_usage"]),
        raw_mem=str(values["mem_usage"]),
        engine=engine_value,
        layout_template=layout_template,
        max_delete=checked["max_delete"],
        query=dicom_query,
        calling_aet=checked["calling_aet"],
        retrieve_method=checked["retrieve_method"],
        move_port=checked["move_port"],
        tls_ca_file=tls_file("tls_ca_file"),
        tls_cert_file=tls_file("tls_cert_file"),
        tls_key_file=tls_file("tls_key_file"),
        network_timeout=checked["network_timeout"],
        shards=checked["shards"],
        array_throttle=checked["array_throttle"],
        every=checked["every"],
        stable_after=checked["stable_after"],
        max_duration=checked["max_duration"],
        continue_job=checked["continue_job"],
        max_continuations=checked["max_continuations"],
    )
    bids_dir, format_string = _bids_settings(data, style, project_dir)
    return ProjectConfig(
        path=path,
        bids_directory=bids_dir,
        dicom_format_string=format_string,
        style=style,
        project_directory=project_dir,
        project_title=title if isinstance(title, str) and title else project_dir.name,
        email_address=email if isinstance(email, str) and email else None,
        batch_config=batch or None,
        source=source,
        raw=data,
    )


def _bids_settings(data: dict, style: Style, project_dir: Path) -> tuple[Path | None, str]:
    """BIDSDirectory and DICOMFormatString of the BIDS step's block (``DICOMToBIDSOptions``,
    ``convert2bids`` in clpipe 1.9), for the sessions' ``converted`` state; what is not
    there (or not text) is None / empty."""
    section, bids_key, format_key = (
        ("DICOMToBIDSOptions", "BIDSDirectory", "DICOMFormatString")
        if style == "legacy"
        else ("convert2bids", "bids_directory", "dicom_format_string")
    )
    block = data.get(section)
    if not isinstance(block, dict):
        return None, ""
    bids, fmt = block.get(bids_key), block.get(format_key)
    return (
        _resolve(project_dir, bids) if isinstance(bids, str) and bids.strip() else None,
        fmt if isinstance(fmt, str) else "",
    )


def _query(block: Any, flags: dict[str, Any], style: Style, path: Path, where: str) -> Any:
    """The Query block (+ flags) as a DicomQuery; messages name the user's own key."""
    from ..sources.dicom import DicomQuery, check_study_date

    if block is None:
        block = {}
    if not isinstance(block, dict):
        raise ConfigError(f'{path}: {where}: expected an object such as {{"PatientID": "SUBJ*"}}, found {type(block).__name__}')
    by_name = {key_name(c, style, QUERY_KEYS): c for c in QUERY_KEYS}
    values: dict[str, Any] = {}
    shown: dict[str, str] = {}
    for key, value in block.items():
        if key not in by_name:
            raise _unknown_key(path, where, key, list(by_name))
        values[by_name[key]] = value
        shown[by_name[key]] = f"{path}: {where}.{key}"
    for canonical, value in flags.items():
        if value is not None:
            values[canonical] = value
            shown[canonical] = QUERY_OPTION[canonical].flag
    out: dict[str, Any] = {}
    for canonical, value in values.items():
        if canonical == "limit":
            if isinstance(value, bool) or not str(value).strip().isdigit():
                raise ConfigError(f"{shown[canonical]}: {value!r} is not valid: expected a whole number of studies (0: no limit)")
            out["limit"] = int(value)
        elif value is None:
            continue
        elif not isinstance(value, (str, int)):
            raise ConfigError(f"{shown[canonical]}: {value!r} is not valid: expected text (DICOM wildcards * and ? allowed)")
        elif canonical == "study_date":
            out["study_date"] = check_study_date(str(value), shown[canonical])
        else:
            out[canonical] = str(value).strip()
    return DicomQuery(**out)
