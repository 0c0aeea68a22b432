"""One declaration per key of the ``SourceOptions`` block (and of its ``Query`` block).

Each key is declared once, with its names in both dialects (legacy CamelCase, which
clpipe wrote up to 1.8 and the documentation shows, and clpipe 1.9 snake_case, which is
also the name used in code), the type of its checked value, its default, one line of help,
the check that turns what a user wrote into that value, and the command-line flag that
overrides it. Everything else is derived from these declarations:

* the key tables and defaults the loader reads with (:data:`SOURCE_KEYS`,
  :data:`QUERY_KEYS`, :data:`SOURCE_DEFAULTS`) and the "did you mean" suggestions;
* the validation model (:mod:`clpipe.config.model`);
* the help of the CLI flags that override a key (:func:`flag_help`);
* the option tables in the documentation (:func:`markdown_table`;
  ``python -m clpipe.config.options`` prints them, tests/test_docs.py compares).

Importing this module is cheap (no pydantic, no source module): the CLI reads it for its
flag help on every command.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .units import parse_cores, parse_duration, parse_mem_mb, parse_time

Style = Literal["legacy", "snake"]

SOURCE_SECTION = ("SourceOptions", "source")
ENGINES = ("fw-cli", "native")
RETRIEVE_METHODS = ("get", "move")


@dataclass(frozen=True)
class Option:
    """One config key. ``snake`` is its clpipe 1.9 name and its name in code."""

    legacy: str  # clpipe <= 1.8 (CamelCase), as the documentation shows it
    snake: str  # clpipe 1.9 (snake_case)
    type: Any  # the type of the checked value
    default: Any  # used when the key is absent
    help: str  # one line: the docs' table, and the help of the flag that overrides the key
    check: Callable[[Any], Any] | None = None  # what the user wrote -> the value; ValueError says what is expected
    flag: str = ""  # the command-line flag that overrides the key, for messages and its help
    value: str = "text"  # what the docs call the value's form
    default_doc: str = ""  # the default as the docs say it, when the value alone would mislead
    sources: str = "every source"  # the sources that read the key

    def name(self, style: Style) -> str:
        """The key as a file in ``style`` spells it."""
        return self.legacy if style == "legacy" else self.snake


# ----------------------------------------------------------------------------- checks
# Each raises ValueError with what is expected; the loader adds the file and the key.


def _text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError("expected a text value")  # noqa: TRY004 -- the user's message, via the model
    return value


def _source_url(value: Any) -> Any:
    """A FlywheelURL (fw://) or a SourceURL (the DICOM sources)."""
    from ..errors import ConfigError
    from ..sources.dicom import SourceURL, parse_source_url
    from ..sources.flywheel import FlywheelURL, parse_fw_url

    if isinstance(value, (FlywheelURL, SourceURL)):
        return value
    if not isinstance(value, str):
        raise ValueError("expected a text value such as fw://<group>/<project>/")  # noqa: TRY004 -- as above
    if value.strip().lower().startswith("fw:") or "://" not in value:
        return parse_fw_url(value.strip())
    try:
        return parse_source_url(value.strip())
    except ConfigError as exc:
        raise ValueError(str(exc).removeprefix("SourceURL: ")) from None


def _engine(value: Any) -> str:
    if value not in ENGINES:
        raise ValueError(f"expected one of {', '.join(ENGINES)}")
    return str(value)


def _layout_template(value: Any) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise ValueError("expected a template such as {subject}/{session}/{acquisition}")  # noqa: TRY004 -- as above
    return value  # its fields depend on the source: checked by the loader


def _max_delete(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise ValueError("expected a whole number of files, 0 or more")
    return int(value)


def _calling_aet(value: Any) -> str:
    from ..sources.dicom import is_ae_title

    text = str(value or "").strip()
    if not is_ae_title(text):
        raise ValueError("expected an AE title of 1-16 ASCII characters without a backslash")
    return text


def _retrieve_method(value: Any) -> str:
    text = str(value or "").strip().lower().removeprefix("c-")
    if text not in RETRIEVE_METHODS:
        raise ValueError('expected "get" (C-GET) or "move" (C-MOVE, which needs MovePort)')
    return text


def _port(value: Any) -> int:
    if isinstance(value, bool) or not str(value).strip().isdigit() or not 0 <= int(value) < 65536:
        raise ValueError("expected a TCP port number (1-65535), or 0 for none")
    return int(value)


def _file(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError("expected a file path as text")  # noqa: TRY004 -- as above
    if value and not Path(value).expanduser().is_file():
        raise ValueError("no such file")
    return value


def _seconds(value: Any) -> float:
    try:
        seconds = float(str(value).strip())
    except ValueError:
        seconds = -1.0
    if isinstance(value, bool) or not 1 <= seconds <= 86400:
        raise ValueError(
            "expected a number of seconds from 1 to 86400 (a PACS that fetches from slow archive storage may need 600 or more)"
        )
    return seconds


def _whole(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise ValueError(what)
    return int(value)


def _shards(value: Any) -> int:
    """-shards / Shards: 0 or 1 (not split) or more (clpipe/arrays.py)."""
    return _whole(value, "expected a whole number of shards (0 or 1: not split)")


def _array_throttle(value: Any) -> int:
    return _whole(value, "expected a whole number of tasks that may run at once (0: all)")


def _every(value: Any) -> int:
    """-every / Every: a span of time in seconds (0, "": no schedule)."""
    if value is None or value == "":
        return 0
    seconds = parse_duration(value)
    if 0 < seconds < 60:
        raise ValueError("expected at least a minute between runs, e.g. 12h or 1d (0: no schedule)")
    return seconds


def _switch(value: Any) -> bool:
    """Continue: true or false (also yes/no, on/off, 1/0)."""
    text = str(value).strip().lower()
    if isinstance(value, bool):
        return value
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError("expected true or false")


def _max_duration(value: Any) -> int:
    """MaxDuration / -max_duration: a span of time in seconds (0, "": no limit)."""
    if value is None or value == "":
        return 0
    return parse_duration(value)


def _max_continuations(value: Any) -> int:
    return _whole(value, "expected a whole number of requeues (0: a job stopped at its time limit is never continued)")


# ----------------------------------------------------------------------------- declarations

# The Query block of a DICOM source. Its values are checked by the loader (a StudyDate
# message names the flag or the key it came from), so these declare no check.
QUERY_OPTIONS: tuple[Option, ...] = (
    Option(
        "PatientID",
        "patient_id",
        str,
        None,
        "Only these patients: a PatientID or pattern with * and ?",
        flag="-patient_id",
        value="pattern",
        default_doc="any",
    ),
    Option(
        "PatientName",
        "patient_name",
        str,
        None,
        "Only these patients: a PatientName pattern, e.g. 'DOE^*'",
        flag="-patient_name",
        value="pattern",
        default_doc="any",
    ),
    Option(
        "StudyDate",
        "study_date",
        str,
        None,
        "Only studies in this date range: YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD- or -YYYYMMDD",
        flag="-study_date",
        value="date range",
        default_doc="any",
    ),
    Option("Modality", "modality", str, None, "Only series of this modality, e.g. MR", flag="-modality", default_doc="any"),
    Option(
        "SeriesDescription",
        "series_description",
        str,
        None,
        "Only series whose description matches this pattern",
        flag="-series_description",
        value="pattern",
        default_doc="any",
    ),
    Option(
        "AccessionNumber",
        "accession_number",
        str,
        None,
        "Only the study with this accession number or pattern",
        flag="-accession_number",
        value="pattern",
        default_doc="any",
    ),
    Option("Limit", "limit", int, None, "At most this many studies (0: all)", flag="-limit", value="whole number", default_doc="0 (all)"),
)

SOURCE_OPTIONS: tuple[Option, ...] = (
    Option(
        "SourceURL",
        "source_url",
        Any,
        "fw://",
        "What to sync: fw://group/project/ (Flywheel), dicomweb+http(s)://host:port/path, dimse://CALLED_AET@host:port or file:///folder",
        _source_url,
        flag="-source_url",
        value="URL",
        default_doc="none: it must be set",
    ),
    Option(
        "DropoffDirectory",
        "dropoff_directory",
        str,
        "",
        "Where synced DICOMs go",
        _text,
        flag="-dropoff_dir",
        value="folder",
        default_doc="`<project>/data_DICOMs`",
    ),
    Option(
        "TempDirectory",
        "temp_directory",
        str,
        "",
        "Where temporary files go",
        _text,
        flag="-temp_dir",
        value="folder",
        default_doc="`<project>/flywheel_tmp`",
    ),
    Option(
        "CommandLineOpts",
        "commandline_opts",
        str,
        "-y",
        "Extra `fw sync` options, split as a shell would (a DICOM source takes a few of them)",
        _text,
        value="options",
    ),
    Option("TimeUsage", "time_usage", int, "1:0:0", "The batch job's time limit: H:M:S, minutes, M:S or D-H:M:S", parse_time, value="time"),
    Option(
        "MemUsage", "mem_usage", int, "10G", "The batch job's memory: megabytes (10000) or a size (500M, 10G)", parse_mem_mb, value="memory"
    ),
    Option("CoreUsage", "core_usage", int, "1", "Cores for the batch job", parse_cores, value="whole number"),
    Option(
        "Engine",
        "engine",
        str,
        "native",
        "native: clpipe's own engine, no fw needed (the default); fw-cli: run the Flywheel CLI's fw sync",
        _engine,
        flag="-engine",
        value=" or ".join(ENGINES),
        sources="fw://",
    ),
    Option(
        "LayoutTemplate",
        "layout_template",
        str,
        "",
        "Native engine: the folders the files land in, e.g. {subject}/{session}/{acquisition}",
        _layout_template,
        value="template",
        default_doc="empty: Flywheel's layout, or for DICOM sources the one in {doc}`other-sources`",
    ),
    Option(
        "MaxDelete",
        "max_delete",
        int,
        1000,
        "Native engine: the most files `--delete` may remove in one run",
        _max_delete,
        value="whole number",
    ),
    Option(
        "Query",
        "query",
        Any,
        None,
        "Which studies and series, a block of " + ", ".join(q.legacy for q in QUERY_OPTIONS),
        value="object",
        default_doc="everything",
        sources="DICOM",
    ),
    Option(
        "CallingAET",
        "calling_aet",
        str,
        "CLPIPE",
        "Our AE title, which the PACS must know",
        _calling_aet,
        value="AE title",
        sources="dimse://",
    ),
    Option(
        "RetrieveMethod",
        "retrieve_method",
        str,
        "get",
        "get (C-GET) or move (C-MOVE, which needs MovePort)",
        _retrieve_method,
        value=" or ".join(RETRIEVE_METHODS),
        sources="dimse://",
    ),
    Option(
        "MovePort", "move_port", int, 0, "With move: the TCP port clpipe receives the images on", _port, value="port", sources="dimse://"
    ),
    Option(
        "TLSCAFile",
        "tls_ca_file",
        str,
        "",
        "TLS: the CA certificates that signed the server's certificate (PEM)",
        _file,
        value="file",
        sources="dimse://, dicomweb+https://",
    ),
    Option(
        "TLSCertFile",
        "tls_cert_file",
        str,
        "",
        "TLS: our certificate, when the server asks for one (PEM)",
        _file,
        value="file",
        sources="dimse://, dicomweb+https://",
    ),
    Option(
        "TLSKeyFile",
        "tls_key_file",
        str,
        "",
        "TLS: the key of TLSCertFile (PEM)",
        _file,
        value="file",
        sources="dimse://, dicomweb+https://",
    ),
    Option(
        "NetworkTimeout",
        "network_timeout",
        float,
        60,
        "Seconds every read and answer from the server may take",
        _seconds,
        value="seconds",
        sources="dimse://, dicomweb",
    ),
    Option(
        "StableAfter",
        "stable_after",
        int,
        "30m",
        "A session whose source changed more recently than this is 'arriving', not 'complete' (30m, 2h, minutes; 0: off)",
        parse_duration,
        flag="-stable_after",
        value="duration",
        default_doc="30m",
    ),
    Option(
        "Shards",
        "shards",
        int,
        0,
        "Batch jobs, native engine: split the sync by subject into an array job of this many tasks, then one job that merges",
        _shards,
        flag="-shards",
        value="whole number",
        default_doc="0 (not split)",
    ),
    Option(
        "ArrayThrottle",
        "array_throttle",
        int,
        0,
        "With Shards: at most this many of the array's tasks run at once",
        _array_throttle,
        value="whole number",
        default_doc="0 (all at once)",
    ),
    Option(
        "Every",
        "every",
        int,
        "",
        "Batch jobs: each run submits the next to start this long after it ends (1d, 12h, 90m); `clpipe dicom unschedule` stops it",
        _every,
        flag="-every",
        value="duration",
        default_doc="empty (no schedule)",
    ),
    Option(
        "MaxDuration",
        "max_duration",
        int,
        "",
        "Native engine: stop the run by itself after this long (30m, 2h), as at a time limit: what finished is kept; exit status 75",
        _max_duration,
        flag="-max_duration",
        value="duration",
        default_doc="empty (no limit)",
    ),
    Option(
        "Continue",
        "continue_job",
        bool,
        True,
        "Batch jobs, native engine: a job stopped at its time limit requeues itself and goes on under the same job id (-no_continue: off)",
        _switch,
        flag="-continue",
        value="true or false",
        default_doc="`true`",
    ),
    Option(
        "MaxContinuations",
        "max_continuations",
        int,
        10,
        "With Continue: at most this many requeues of one job",
        _max_continuations,
        value="whole number",
    ),
)

SOURCE_OPTION: dict[str, Option] = {o.snake: o for o in SOURCE_OPTIONS}
QUERY_OPTION: dict[str, Option] = {o.snake: o for o in QUERY_OPTIONS}

# name in code -> (legacy CamelCase, clpipe 1.9 snake_case)
SOURCE_KEYS: dict[str, tuple[str, str]] = {o.snake: (o.legacy, o.snake) for o in SOURCE_OPTIONS}
QUERY_KEYS: dict[str, tuple[str, str]] = {o.snake: (o.legacy, o.snake) for o in QUERY_OPTIONS}
SOURCE_DEFAULTS: dict[str, Any] = {o.snake: o.default for o in SOURCE_OPTIONS}
# the flags that override a source key, for messages: "-dropoff_dir: ..."
SOURCE_FLAGS: dict[str, str] = {o.snake: o.flag for o in SOURCE_OPTIONS if o.flag}

# Top-level keys this step reads: name in code -> (legacy, snake)
TOP_KEYS: dict[str, tuple[str, str]] = {
    "project_title": ("ProjectTitle", "project_title"),
    "project_directory": ("ProjectDirectory", "project_directory"),
    "email_address": ("EmailAddress", "email_address"),
    "batch_config": ("BatchConfig", "batch_config_path"),
}

# Top-level keys owned by other clpipe steps (any version): accepted and left alone.
OTHER_TOP_LEGACY = {
    "ConfigTitle",
    "Authors/Contributors",
    "TempDirectory",
    "DICOMToBIDSOptions",
    "BIDSValidationOptions",
    "FMRIPrepOptions",
    "PostProcessingOptions",
    "PostProcessingOptions2",
    "PostProcessingMemoryUsage",
    "ProcessingStreams",
    "BetaSeriesOptions",
    "SUSANOptions",
    "ROIExtractionOptions",
    "ReHoExtraction",
    "T2StarExtraction",
    "GLMSetupOptions",
    "RunLog",
    "StatusCache",
    "version",
}
OTHER_TOP_SNAKE = {
    "clpipe_version",
    "version",
    "contributors",
    "convert2bids",
    "bids_validation",
    "fmriprep",
    "postprocessing",
    "processing_streams",
    "beta_series",
    "roi_extraction",
    "reho_extraction",
    "t2star_extraction",
    "glm_setup",
    "status_cache",
    "run_log",
}


def key_name(canonical: str, style: Style, table: dict[str, tuple[str, str]] = SOURCE_KEYS) -> str:
    """A key of ``table`` as a file in ``style`` spells it."""
    legacy, snake = table[canonical]
    return legacy if style == "legacy" else snake


def flag_help(name: str, text: str = "") -> str:
    """The help of the flag that overrides key ``name`` (a SourceOptions or Query key):
    ``text`` (by default the key's own help) with the key it overrides, where ``text``
    says ``{key}``, else at the end."""
    option = SOURCE_OPTION.get(name)
    key = option.legacy if option is not None else f"Query.{QUERY_OPTION[name].legacy}"
    text = text or (option or QUERY_OPTION[name]).help
    if "{key}" in text:
        return text.replace("{key}", key)
    return f"{text} (overrides {key})."


# ----------------------------------------------------------------------------- the docs' tables

TABLES: dict[str, tuple[Option, ...]] = {"source": SOURCE_OPTIONS, "query": QUERY_OPTIONS}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default_doc(option: Option) -> str:
    if option.default_doc:
        return option.default_doc
    return "empty" if option.default == "" else f"`{option.default}`"


def markdown_table(which: str) -> str:
    """The docs' table of the SourceOptions keys (``source``) or of the Query keys
    (``query``), as Markdown."""
    with_sources = which == "source"  # the Query keys are all for the DICOM sources
    header = ["key (legacy / clpipe 1.9)", "value", "default", *(["for"] if with_sources else []), "flag", "meaning"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for o in TABLES[which]:
        cells = [
            f"`{o.legacy}` / `{o.snake}`",
            o.value,
            _default_doc(o),
            *([o.sources] if with_sources else []),
            f"`{o.flag}`" if o.flag else "",
            o.help + ".",
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m clpipe.config.options [source|query]: a table for the docs
    import sys

    for table in sys.argv[1:] or list(TABLES):
        print(markdown_table(table))
