"""``clpipe_config.json`` (or ``.yaml``): reading, validating and resolving it.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ..errors import ConfigError
from ..sources.flywheel import FlywheelURL, parse_fw_url
from .units import parse_cores, parse_mem_mb, parse_time

Style = Literal["legacy", "snake"]

# canonical name -> (legacy CamelCase, clpipe 1.9 snake_case)
SOURCE_KEYS: dict[str, tuple[str, str]] = {
    "source_url": ("SourceURL", "source_url"),
    "dropoff_directory": ("DropoffDirectory", "dropoff_directory"),
    "temp_directory": ("TempDirectory", "temp_directory"),
    "commandline_opts": ("CommandLineOpts", "commandline_opts"),
    "time_usage": ("TimeUsage", "time_usage"),
    "mem_usage": ("MemUsage", "mem_usage"),
    "core_usage": ("CoreUsage", "core_usage"),
    "engine": ("Engine", "engine"),
    "layout_template": ("LayoutTemplate", "layout_template"),
    "max_delete": ("MaxDelete", "max_delete"),
    # DICOM sources (dicomweb+http(s)://, dimse://, file://): `clpipe dicom sync`
    "query": ("Query", "query"),
    "calling_aet": ("CallingAET", "calling_aet"),
    "retrieve_method": ("RetrieveMethod", "retrieve_method"),
    "move_port": ("MovePort", "move_port"),
    "tls_ca_file": ("TLSCAFile", "tls_ca_file"),
    "tls_cert_file": ("TLSCertFile", "tls_cert_file"),
    "tls_key_file": ("TLSKeyFile", "tls_key_file"),
    "network_timeout": ("NetworkTimeout", "network_timeout"),
}
# The Query block: canonical -> (legacy, snake)
QUERY_KEYS: dict[str, tuple[str, str]] = {
    "patient_id": ("PatientID", "patient_id"),
    "patient_name": ("PatientName", "patient_name"),
    "study_date": ("StudyDate", "study_date"),
    "modality": ("Modality", "modality"),
    "series_description": ("SeriesDescription", "series_description"),
    "accession_number": ("AccessionNumber", "accession_number"),
    "limit": ("Limit", "limit"),
}
SOURCE_SECTION = ("SourceOptions", "source")

# Top-level keys this step reads: canonical -> (legacy, snake)
TOP_KEYS: dict[str, tuple[str, str]] = {
    "project_title": ("ProjectTitle", "project_title"),
    "project_directory": ("ProjectDirectory", "project_directory"),
    "email_address": ("EmailAddress", "email_address"),
    "batch_config": ("BatchConfig", "batch_config_path"),
}

# Top-level keys owned by other clpipe steps (any version): accepted and left alone.
OTHER_TOP_LEGACY = {
    "ConfigTitle", "Authors/Contributors", "TempDirectory", "DICOMToBIDSOptions",
    "BIDSValidationOptions", "FMRIPrepOptions", "PostProcessingOptions",
    "PostProcessingOptions2", "PostProcessingMemoryUsage", "ProcessingStreams",
    "BetaSeriesOptions", "SUSANOptions", "ROIExtractionOptions", "ReHoExtraction",
    "T2StarExtraction", "GLMSetupOptions", "RunLog", "StatusCache", "version",
}
OTHER_TOP_SNAKE = {
    "clpipe_version", "version", "contributors", "convert2bids", "bids_validation",
    "fmriprep", "postprocessing", "processing_streams", "beta_series", "roi_extraction",
    "reho_extraction", "t2star_extraction", "glm_setup", "status_cache", "run_log",
}

# clpipe 1.9 defaults for the source block; legacy files had the same ones bar memory.
SOURCE_DEFAULTS = {
    "source_url": "fw://",
    "dropoff_directory": "",
    "temp_directory": "",
    "commandline_opts": "-y",
    "time_usage": "1:0:0",
    "mem_usage": "10G",
    "core_usage": "1",
    "engine": "native",
    "layout_template": "",
    "max_delete": 1000,
    "query": None,
    "calling_aet": "CLPIPE",
    "retrieve_method": "get",
    "move_port": 0,
    "tls_ca_file": "",
    "tls_cert_file": "",
    "tls_key_file": "",
    "network_timeout": 60,
}
ENGINES = ("fw-cli", "native")
RETRIEVE_METHODS = ("get", "move")


def key_name(canonical: str, style: Style, table: dict[str, tuple[str, str]] = SOURCE_KEYS) -> str:
    legacy, snake = table[canonical]
    return legacy if style == "legacy" else snake


class SourceModel(BaseModel):
    """Validation of the source block (values already under canonical names)."""

    model_config = ConfigDict(extra="forbid")

    source_url: Any  # FlywheelURL (fw://) or SourceURL (the DICOM sources)
    dropoff_directory: str
    temp_directory: str
    commandline_opts: str
    time_usage: int  # seconds
    mem_usage: int  # megabytes
    core_usage: int
    engine: str
    layout_template: str
    max_delete: int
    query: Any = None  # validated in load_project_config (its keys need the file's spelling)
    calling_aet: str = "CLPIPE"
    retrieve_method: str = "get"
    move_port: int = 0
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    network_timeout: float = 60

    @field_validator("network_timeout", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> float:
        try:
            seconds = float(str(value).strip())
        except ValueError:
            seconds = -1.0
        if isinstance(value, bool) or not 1 <= seconds <= 86400:
            raise ValueError("expected a number of seconds from 1 to 86400 (a PACS that fetches from slow "
                             "archive storage may need 600 or more)")
        return seconds

    @field_validator("calling_aet", mode="before")
    @classmethod
    def _aet(cls, value: Any) -> str:
        text = str(value or "").strip()
        if not 0 < len(text) <= 16 or not text.isascii() or "\\" in text:
            raise ValueError("expected an AE title of 1-16 ASCII characters without a backslash")
        return text

    @field_validator("retrieve_method", mode="before")
    @classmethod
    def _retrieve(cls, value: Any) -> str:
        text = str(value or "").strip().lower().removeprefix("c-")
        if text not in RETRIEVE_METHODS:
            raise ValueError("expected \"get\" (C-GET) or \"move\" (C-MOVE, which needs MovePort)")
        return text

    @field_validator("move_port", mode="before")
    @classmethod
    def _port(cls, value: Any) -> int:
        if isinstance(value, bool) or not str(value).strip().isdigit() or not 0 <= int(value) < 65536:
            raise ValueError("expected a TCP port number (1-65535), or 0 for none")
        return int(value)

    @field_validator("tls_ca_file", "tls_cert_file", "tls_key_file", mode="before")
    @classmethod
    def _file(cls, value: Any) -> str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ValueError("expected a file path as text")
        if value and not Path(value).expanduser().is_file():
            raise ValueError("no such file")
        return value

    @field_validator("engine", mode="before")
    @classmethod
    def _engine(cls, value: Any) -> str:
        if value not in ENGINES:
            raise ValueError(f"expected one of {', '.join(ENGINES)}")
        return value

    @field_validator("layout_template", mode="before")
    @classmethod
    def _template(cls, value: Any) -> str:
        if value is None or value == "":
            return ""
        if not isinstance(value, str):
            raise ValueError("expected a template such as {subject}/{session}/{acquisition}")
        return value  # its fields depend on the source: checked in load_project_config

    @field_validator("max_delete", mode="before")
    @classmethod
    def _max_delete(cls, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
            raise ValueError("expected a whole number of files, 0 or more")
        return int(value)

    @field_validator("source_url", mode="before")
    @classmethod
    def _url(cls, value: Any) -> Any:
        from ..sources.dicom import SourceURL, parse_source_url

        if isinstance(value, (FlywheelURL, SourceURL)):
            return value
        if not isinstance(value, str):
            raise ValueError("expected a text value such as fw://<group>/<project>/")
        if value.strip().lower().startswith("fw:") or "://" not in value:
            return parse_fw_url(value.strip())
        try:
            return parse_source_url(value.strip())
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("SourceURL: ")) from None

    @field_validator("dropoff_directory", "temp_directory", "commandline_opts", mode="before")
    @classmethod
    def _text(cls, value: Any) -> str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ValueError("expected a text value")
        return value

    @field_validator("time_usage", mode="before")
    @classmethod
    def _time(cls, value: Any) -> int:
        return parse_time(value)

    @field_validator("mem_usage", mode="before")
    @classmethod
    def _mem(cls, value: Any) -> int:
        return parse_mem_mb(value)

    @field_validator("core_usage", mode="before")
    @classmethod
    def _cores(cls, value: Any) -> int:
        return parse_cores(value)


@dataclass(frozen=True)
class SourceConfig:
    """The validated, resolved source block (absolute paths)."""

    url: FlywheelURL
    dropoff_directory: Path
    temp_directory: Path
    commandline_opts: str
    time_seconds: int
    mem_mb: int
    cores: int
    raw_time: str  # as the user wrote it, for display
    raw_mem: str
    engine: str = "native"
    layout_template: str = ""
    max_delete: int = 1000
    query: Any = None  # DicomQuery, for the DICOM sources
    calling_aet: str = "CLPIPE"
    retrieve_method: str = "get"
    move_port: int = 0
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    network_timeout: float = 60.0

    @property
    def is_flywheel(self) -> bool:
        return isinstance(self.url, FlywheelURL)


@dataclass(frozen=True)
class ProjectConfig:
    """What the sync step needs from ``clpipe_config.json``."""

    path: Path
    style: Style
    project_directory: Path
    project_title: str
    email_address: str | None
    batch_config: str | None
    source: SourceConfig
    raw: dict = field(repr=False, compare=False, default_factory=dict)

    @property
    def sync_logs(self) -> Path:
        return self.project_directory / "logs" / "sync_logs"

    def key(self, canonical: str) -> str:
        """The user's own spelling of a source key, for messages: ``SourceOptions.TimeUsage``."""
        section = SOURCE_SECTION[0] if self.style == "legacy" else SOURCE_SECTION[1]
        return f"{section}.{key_name(canonical, self.style)}"


def _read_mapping(path: Path) -> dict:
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


def _detect_style(data: dict, path: Path) -> Style:
    legacy_hits = {k for k in data if k in {v[0] for v in TOP_KEYS.values()} | {SOURCE_SECTION[0]}}
    snake_hits = {k for k in data if k in {v[1] for v in TOP_KEYS.values()} | {SOURCE_SECTION[1], "clpipe_version"}}
    if SOURCE_SECTION[0] in data and SOURCE_SECTION[1] in data:
        raise ConfigError(
            f"{path}: has both SourceOptions (legacy) and source (clpipe 1.9) blocks; keep one of them"
        )
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


def _check_top_level(data: dict, style: Style, path: Path) -> None:
    ours = [v[0] if style == "legacy" else v[1] for v in TOP_KEYS.values()]
    section = SOURCE_SECTION[0] if style == "legacy" else SOURCE_SECTION[1]
    others = OTHER_TOP_LEGACY if style == "legacy" else OTHER_TOP_SNAKE
    known = ours + [section] + sorted(others)
    for key in data:
        if key not in known:
            raise _unknown_key(path, "the top level", key, known)


def _canonical_source(block: Any, style: Style, path: Path) -> dict:
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
        raise ConfigError(f"{what}: {path} cannot be written (no write permission on {probe})")


def load_project_config(
    config_file: str | os.PathLike,
    source_url: str | None = None,
    dropoff_dir: str | None = None,
    temp_dir: str | None = None,
    engine: str | None = None,
    query: dict | None = None,
) -> ProjectConfig:
    """Read, validate and resolve a project config; flags override the file's values
    (``query``: Query keys by canonical name, from the flags of ``clpipe dicom sync``)."""
    path = Path(config_file).expanduser().absolute()
    data = _read_mapping(path)
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
    flag_names = {"source_url": "-source_url", "dropoff_directory": "-dropoff_dir", "temp_directory": "-temp_dir", "engine": "-engine"}
    from_flag: set[str] = set()
    for canonical, value in (("source_url", source_url), ("dropoff_directory", dropoff_dir), ("temp_directory", temp_dir), ("engine", engine)):
        if value is not None:
            values[canonical] = value
            from_flag.add(canonical)

    try:
        model = SourceModel.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        canonical = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")
        shown = flag_names[canonical] if canonical in from_flag else f"{section}.{key_name(canonical, style)}"
        bad = values.get(canonical)
        if isinstance(bad, str):  # a URL's password is never shown
            from ..sources.dicom import redact_url

            bad = redact_url(bad)
        raise ConfigError(f"{path}: {shown}: {bad!r} is not valid: {message}") from None
    where = lambda c: flag_names[c] if c in from_flag else f"{section}.{key_name(c, style)}"  # noqa: E731
    flywheel = isinstance(model.source_url, FlywheelURL)
    engine_value = model.engine
    engine_given = "engine" in from_flag or key_name("engine", style) in (data.get(section) or {})
    if not flywheel:
        if engine_given and model.engine != "native":
            raise ConfigError(f"{path}: {where('engine')}: the fw-cli engine syncs only from Flywheel (fw://); "
                              f"remove {key_name('engine', style)} or set it to \"native\" for {model.source_url}")
        engine_value = "native"
    if model.layout_template:
        from ..sync.layout import check_template

        try:
            if flywheel:
                check_template(model.layout_template)
            else:
                from ..sources.dicom import check_dicom_template

                check_dicom_template(model.layout_template)
        except ValueError as exc:
            raise ConfigError(f"{path}: {where('layout_template')}: {exc}") from None
        if engine_value != "native":
            raise ConfigError(f"{path}: {section}.{key_name('layout_template', style)}: a layout template needs the native engine; "
                              f"set {key_name('engine', style)} to \"native\" (fw sync always uses Flywheel's layout)")
    dicom_query = None if flywheel else _query(model.query, query or {}, style, path, f"{section}.{key_name('query', style)}")
    if not flywheel and model.retrieve_method == "move" and not model.move_port:
        raise ConfigError(f"{path}: {where('retrieve_method')} is \"move\": set {key_name('move_port', style)} to the port on which "
                          "this machine receives the images (the PACS must know our AE title at that port)")

    dropoff = _resolve(project_dir, model.dropoff_directory) if model.dropoff_directory.strip() else project_dir / "data_DICOMs"
    temp = _resolve(project_dir, model.temp_directory) if model.temp_directory.strip() else project_dir / "flywheel_tmp"
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

    source = SourceConfig(
        url=model.source_url,
        dropoff_directory=dropoff,
        temp_directory=temp,
        commandline_opts=model.commandline_opts,
        time_seconds=model.time_usage,
        mem_mb=model.mem_usage,
        cores=model.core_usage,
        raw_time=str(values["time_usage"]),
        raw_mem=str(values["mem_usage"]),
        engine=engine_value,
        layout_template=model.layout_template,
        max_delete=model.max_delete,
        query=dicom_query,
        calling_aet=model.calling_aet,
        retrieve_method=model.retrieve_method,
        move_port=model.move_port,
        tls_ca_file=str(Path(model.tls_ca_file).expanduser()) if model.tls_ca_file else "",
        tls_cert_file=str(Path(model.tls_cert_file).expanduser()) if model.tls_cert_file else "",
        tls_key_file=str(Path(model.tls_key_file).expanduser()) if model.tls_key_file else "",
        network_timeout=model.network_timeout,
    )
    return ProjectConfig(
        path=path,
        style=style,
        project_directory=project_dir,
        project_title=title if isinstance(title, str) and title else project_dir.name,
        email_address=email if isinstance(email, str) and email else None,
        batch_config=batch or None,
        source=source,
        raw=data,
    )



def _query(block: Any, flags: dict, style: Style, path: Path, where: str):
    """The Query block (+ flags) as a DicomQuery; messages name the user's own key."""
    from ..sources.dicom import DicomQuery, check_study_date

    if block is None:
        block = {}
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: {where}: expected an object such as {{\"PatientID\": \"SUBJ*\"}}, found {type(block).__name__}")
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
            shown[canonical] = f"-{canonical}"
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


def write_dicom_format_string(config: ProjectConfig, value: str) -> str:
    """Record the DICOMFormatString that matches the sync's layout in the config file, for
    clpipe's BIDS conversion step. JSON files are updated in place (atomically, keys kept
    in order); YAML files are left alone (their comments would be lost). Returns what was
    done, for the user."""
    legacy = config.style == "legacy"
    section, key = ("DICOMToBIDSOptions", "DICOMFormatString") if legacy else ("convert2bids", "dicom_format_string")
    block = config.raw.get(section)
    current = block.get(key) if isinstance(block, dict) else None
    if current == value:
        return ""
    if config.path.suffix.lower() not in (".json", ""):
        return f"set {section}.{key} to {value!r} in {config.path} so the BIDS step finds the sessions"
    data = _read_mapping(config.path)
    data.setdefault(section, {})
    if not isinstance(data[section], dict):
        return f"set {section}.{key} to {value!r} in {config.path} so the BIDS step finds the sessions"
    data[section][key] = value
    temp = config.path.with_name(f".{config.path.name}.tmp")
    try:
        temp.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")
        os.replace(temp, config.path)
    except BaseException:  # a full disk: the config stays as it was, and no half-written copy beside it
        temp.unlink(missing_ok=True)
        raise
    return f"{section}.{key} in {config.path} set to {value!r} ({'was ' + repr(current) if current is not None else 'not set before'}) to match LayoutTemplate"
