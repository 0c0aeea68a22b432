"""The plan of one sync, for every source and both engines: what to sync, with which
engine, as which job. It is made once, from the validated config (:func:`make_plan`), and
every later step receives it: :mod:`clpipe.submit` shows, runs or submits its job, the job
reads it back on its node (:mod:`clpipe.runner`) and hands it to its engine
(:mod:`clpipe.engines`).

The source URL is parsed once, into a typed value (:attr:`SyncPlan.url`: a
:class:`~clpipe.sources.flywheel.FlywheelURL` or a DICOM
:class:`~clpipe.sources.dicom.SourceURL`); no later step reads the URL's text again.
``CommandLineOpts`` is read here too (:func:`parse_commandline_opts`): written for
``fw sync``, read by both engines.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .batch.job import Job, Resources
from .errors import ConfigError, PreflightError
from .sources.dicom import DICOMWEB_CREDENTIALS, SourceURL  # a DICOMweb login: to a batch job in a private file (batch/handoff.py)
from .sources.flywheel import API_KEY_ENV, FlywheelURL

if TYPE_CHECKING:  # the job on the node needs no config validation (pydantic)
    from .config.model import ProjectConfig

#: the typed value of a SourceURL: a Flywheel project or a DICOM source
SourceAddress = FlywheelURL | SourceURL

JOB_ENV = ("PATH", "FLYWHEEL_USER_HOME")  # what a batch job needs from the submitter's environment

# ---------------------------------------------------------------------------------------
# CommandLineOpts: parsed with a replica of `fw sync`'s own options (flywheel-cli 18.x), so a
# typo is caught before the job is queued, and so clpipe knows what fw was asked to do.


class _OptsParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _fw_sync_option_parser() -> argparse.ArgumentParser:
    p = _OptsParser(prog="fw sync", add_help=False, allow_abbrev=True)
    config = p.add_mutually_exclusive_group()
    config.add_argument("--config-file", "-C")
    config.add_argument("--no-config", action="store_true")
    p.add_argument("-y", "--yes", action="store_true")
    p.add_argument("--ca-certs")
    p.add_argument("--timezone")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("--debug", action="store_true")
    verbosity.add_argument("--quiet", action="store_true")
    p.add_argument("-i", "--include", action="append", default=[])
    p.add_argument("-e", "--exclude", action="append", default=[])
    tags = p.add_mutually_exclusive_group()
    tags.add_argument("--include-container-tags")
    tags.add_argument("--exclude-container-tags")
    mlset = p.add_mutually_exclusive_group()
    mlset.add_argument("--include-mlset", action="append", default=[])
    mlset.add_argument("--exclude-mlset", action="append", default=[])
    p.add_argument("-a", "--analyses", action="store_true")
    p.add_argument("-m", "--metadata", action="store_true")
    p.add_argument("-x", "--full-project", action="store_true")
    p.add_argument("-z", "--no-unpack", dest="unpack", action="store_false")
    p.add_argument("-l", "--list-only", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("-n", "--dry-run", action="store_true")
    p.add_argument("-j", "--jobs", type=int)
    p.add_argument("--tmp-path")
    p.add_argument("--delete", action="store_true")
    p.add_argument("--export-templates-file")
    p.add_argument("--save-audit-logs")
    p.add_argument("--no-audit-log", action="store_true")
    return p


@dataclass(frozen=True)
class SyncOptions:
    """What CommandLineOpts asks of a sync (written for ``fw sync``, read by both engines)."""

    args: tuple[str, ...]
    include: tuple[str, ...] = ("dicom",)
    exclude: tuple[str, ...] = ()
    container_filters: tuple = ()
    mlset_filters: dict | None = None
    analyses: bool = False
    metadata: bool = False
    unpack: bool = True
    transfers: bool = True  # False for --dry-run / --list-only: nothing to verify
    dry_run: bool = False
    list_only: bool = False
    verbose: bool = False
    jobs: int = 4
    delete: bool = False
    ca_certs: str | None = None
    export_templates_file: str | None = None
    quiet: bool = False

    def listing_request(self) -> tuple[dict, dict]:
        """The body filters and query parameters of the ``download/targets`` request."""
        body: dict = {"filters": [{"types": {"+": list(self.include)}}]}
        if self.exclude:
            body["filters"].append({"types": {"-": list(self.exclude)}})
        if self.container_filters:
            body["container_filters"] = list(self.container_filters)
        if self.mlset_filters:
            body["mlset_filters"] = self.mlset_filters
        if self.export_templates_file:
            import yaml

            try:
                body["export_templates"] = yaml.safe_load(Path(self.export_templates_file).read_text())
            except (OSError, yaml.YAMLError) as exc:
                raise PreflightError(f"--export-templates-file {self.export_templates_file}: cannot be read ({exc})") from None
        params = {}
        if self.analyses:
            params["analyses"] = "true"
        if self.metadata:
            params["metadata"] = "true"
        return body, params


# Options of `fw sync` that mean nothing to the native engine, and why.
NATIVE_MEANINGLESS = {
    "config_file": "--config-file (fw's own configuration file)",
    "no_config": "--no-config (fw's own configuration file)",
    "timezone": "--timezone (used by fw's importers only)",
}


# Options of `fw sync` that mean something for the DICOM sources (dicomweb, dimse, file).
DICOM_ALLOWED = {"yes", "debug", "quiet", "list_only", "verbose", "dry_run", "jobs", "delete", "ca_certs"}


def parse_commandline_opts(text: str, where: str, engine: str = "fw-cli") -> SyncOptions:
    """Split CommandLineOpts as a shell would and check them against fw sync's options."""
    try:
        args = shlex.split(text or "")
    except ValueError as exc:
        raise ConfigError(f"{where}: {text!r} cannot be split into options ({exc})") from None
    try:
        ns, extra = _fw_sync_option_parser().parse_known_args(args)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc} (see `fw sync --help`)") from None
    if extra:
        raise ConfigError(f"{where}: {' '.join(extra)!r} is not an fw sync option (see `fw sync --help`)")
    if ns.tmp_path is not None:
        raise ConfigError(f"{where}: --tmp-path is set by clpipe from TempDirectory; set TempDirectory instead")
    if ns.save_audit_logs is not None:
        raise ConfigError(f"{where}: --save-audit-logs is set by clpipe (the audit log goes to logs/sync_logs); remove it")
    if ns.jobs is not None and ns.jobs < 1:
        raise ConfigError(f"{where}: --jobs must be 1 or more")
    if engine == "dicom":  # a DICOM source: the general options only
        parser = _fw_sync_option_parser()
        defaults = vars(parser.parse_args([]))
        spelled = {action.dest: "/".join(action.option_strings) for action in parser._actions}
        for name, value in vars(ns).items():
            if name not in DICOM_ALLOWED and value != defaults[name]:
                raise ConfigError(
                    f"{where}: {spelled[name]} is an fw sync option for Flywheel projects; "
                    "a DICOM source takes only -j/--jobs, -n/--dry-run, -l/--list-only, -v, --delete, "
                    "--quiet, --debug, -y and --ca-certs; filter with the Query block instead"
                )
    elif engine == "native":
        for name, what in NATIVE_MEANINGLESS.items():
            if getattr(ns, name) not in (None, False):
                raise ConfigError(f'{where}: {what} means nothing to the native engine; remove it, or use Engine "fw-cli"')
    elif ns.delete and ns.unpack:
        raise ConfigError(
            f"{where}: --delete together with unpacking is refused: fw sync compares the zip names with the "
            "unpacked files and deletes the unpacked DICOMs; add -z (keep zips) or remove --delete"
        )
    container_filters: list[dict] = []
    for option, sign in ((ns.include_container_tags, "plus"), (ns.exclude_container_tags, "minus")):
        if option:
            try:
                tags = json.loads(option)
            except ValueError:
                raise ConfigError(f'{where}: container tags must be JSON such as \'{{"subject": ["tag"]}}\'') from None
            if not isinstance(tags, dict):
                raise ConfigError(f'{where}: container tags must be a JSON object such as \'{{"subject": ["tag"]}}\'')
            container_filters += [{"tags": {sign: v}, "type": k} for k, v in tags.items()]
    mlset = None
    if ns.include_mlset:
        mlset = {"plus": [m.lower().capitalize() for m in ns.include_mlset]}
    if ns.exclude_mlset:
        mlset = {"minus": [m.lower().capitalize() for m in ns.exclude_mlset]}
    return SyncOptions(
        args=tuple(args),
        include=tuple(["dicom", *ns.include]),
        exclude=tuple(ns.exclude),
        container_filters=tuple(container_filters),
        mlset_filters=mlset,
        analyses=ns.analyses or ns.full_project,
        metadata=ns.metadata or ns.full_project,
        unpack=ns.unpack,
        transfers=not (ns.dry_run or ns.list_only),
        dry_run=ns.dry_run,
        list_only=ns.list_only,
        verbose=ns.verbose,
        jobs=ns.jobs or 4,
        delete=ns.delete,
        ca_certs=ns.ca_certs,
        export_templates_file=ns.export_templates_file,
        quiet=ns.quiet,
    )


# ---------------------------------------------------------------------------------------
# The plan: everything a run needs, as JSON-able data (no secrets).


def parse_source(text: str) -> SourceAddress:
    """The typed value of a SourceURL's text, by the config's own check of the key (for a
    plan read back from its file; the config checked the URL when the plan was made)."""
    from .config.options import SOURCE_OPTION

    check = SOURCE_OPTION["source_url"].check
    assert check is not None
    address: SourceAddress = check(text)
    return address


@dataclass(frozen=True)
class SyncPlan:
    run_id: str
    source_url: str
    dropoff: str
    temp_dir: str
    sync_logs: str
    audit_csv: str
    log_path: str
    fw_argv: tuple[str, ...]
    job_name: str
    resources: dict
    options: dict = field(default_factory=dict)
    engine: str = "fw-cli"
    summary_json: str = ""
    layout_template: str = ""
    max_delete: int = 1000
    query: dict = field(default_factory=dict)  # DICOM sources: DicomQuery fields
    settings: dict = field(default_factory=dict)  # DICOM sources: SourceSettings fields (no secrets)
    project_dir: str = ""  # where clpipe's .pipeline/status_log.csv is
    stable_after: int = 1800  # seconds: a session changed more recently is "arriving" (0: off)
    bids_dir: str = ""  # BIDSDirectory, for the sessions' "converted" state ("": not known)
    bids_with_session: bool = True  # DICOMFormatString has {session}: BIDS folders are sub-X/ses-Y
    shards: int = 0  # -shards: split by subject into an array job of this many tasks (0, 1: not split; clpipe/arrays.py)
    array_throttle: int = 0  # ArrayThrottle: at most this many tasks at once (0: all)
    shard: int = -1  # the shard this task syncs (-1: the whole listing)
    schedule: dict = field(default_factory=dict)  # -every: how the next run is submitted (clpipe/schedule.py); {}: none
    max_duration: int = 0  # MaxDuration: seconds after which the run stops by itself (0: none; sync/stopping.py)
    continue_job: bool = True  # Continue: a batch job stopped at its time limit requeues itself (clpipe/continuation.py)
    max_continuations: int = 10  # MaxContinuations: at most this many requeues
    #: the source URL, parsed: given by :func:`make_plan` (from the config), else parsed
    #: once from ``source_url`` when the plan is read back; not written to the plan file
    url: SourceAddress | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.url is None:
            object.__setattr__(self, "url", parse_source(self.source_url))

    @property
    def flywheel_url(self) -> FlywheelURL:
        """The Flywheel project of a Flywheel plan (``ValueError`` for a DICOM source)."""
        if not isinstance(self.url, FlywheelURL):
            raise ValueError(f"{self.source_url} is not a Flywheel project")
        return self.url

    @property
    def is_flywheel(self) -> bool:
        """A Flywheel project (either engine), else a DICOM source (the native engine)."""
        return isinstance(self.url, FlywheelURL)

    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "url"}
        data["fw_argv"] = list(self.fw_argv)
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> SyncPlan:
        data = json.loads(text)
        data["fw_argv"] = tuple(data["fw_argv"])
        return cls(**data)

    @property
    def sync_options(self) -> SyncOptions:
        opts = dict(self.options)
        for key in ("args", "include", "exclude", "container_filters"):
            opts[key] = tuple(opts.get(key, ()))
        return SyncOptions(**opts)

    def login_names(self) -> tuple[str, ...]:
        """The environment variables a login to this plan's source can be in."""
        if self.is_flywheel:
            return (API_KEY_ENV,)
        if isinstance(self.url, SourceURL) and self.url.scheme == "dicomweb":
            return DICOMWEB_CREDENTIALS
        return ()

    def job(self, argv: tuple[str, ...]) -> Job:
        """The batch job that runs this plan. It carries the submitter's PATH (where `fw`
        is) and login location, never a credential; ``pass_env`` names the login variables
        set here that it needs (a batch job gets them in a private file, a local run in its
        environment, which holds no other login)."""
        env = {name: os.environ[name] for name in JOB_ENV if name in os.environ}
        secrets_by_name = tuple(name for name in self.login_names() if os.environ.get(name))
        return Job(
            name=self.job_name,
            argv=argv,
            resources=Resources(**self.resources),
            log_path=Path(self.log_path),
            cwd=Path(self.sync_logs),
            env=env,
            pass_env=secrets_by_name,
            graceful=self.engine == "native",
            requeue=self.engine == "native" and self.continue_job and self.max_continuations > 0,
        )


def new_run_id() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def make_plan(config: ProjectConfig, run_id: str | None = None) -> SyncPlan:
    """Build the run plan from a validated config (no network, no files written)."""
    source = config.source
    flywheel = source.is_flywheel
    options = parse_commandline_opts(
        source.commandline_opts, f"{config.path}: {config.key('commandline_opts')}", source.engine if flywheel else "dicom"
    )
    run_id = run_id or new_run_id()
    logs = config.sync_logs
    job_name = "flywheel_sync" if flywheel else "dicom_sync"
    audit_csv = logs / f"{job_name}-{run_id}.csv"
    query: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    if not flywheel:
        if options.ca_certs and isinstance(source.url, SourceURL) and source.url.scheme == "dimse":
            raise ConfigError(
                f"{config.path}: {config.key('commandline_opts')}: --ca-certs is for https sources; "
                "for DICOM over TLS set TLSCAFile (and TLSCertFile/TLSKeyFile if the PACS asks for them)"
            )
        query = asdict(source.query)
        settings = {
            "calling_aet": source.calling_aet,
            "retrieve": source.retrieve_method,
            "move_port": source.move_port,
            "tls_ca": source.tls_ca_file or (options.ca_certs or ""),
            "tls_cert": source.tls_cert_file,
            "tls_key": source.tls_key_file,
            "jobs": options.jobs,
            "timeout": source.network_timeout,
        }
    argv: tuple[str, ...] = (
        ()
        if source.engine == "native"
        else (
            "fw",
            "sync",
            "--include",
            "dicom",
            "--tmp-path",
            str(source.temp_directory),
            "-y",
            "--save-audit-logs",
            str(audit_csv),
            *(a for a in options.args if a not in ("-y", "--yes")),  # clpipe always passes -y
            str(source.url),
            str(source.dropoff_directory),
        )
    )
    return SyncPlan(
        run_id=run_id,
        source_url=str(source.url),
        dropoff=str(source.dropoff_directory),
        temp_dir=str(source.temp_directory),
        sync_logs=str(logs),
        audit_csv=str(audit_csv),
        log_path=str(logs / f"{job_name}-{run_id}.log"),
        fw_argv=argv,
        job_name=job_name,
        resources={"time_seconds": source.time_seconds, "mem_mb": source.mem_mb, "cores": source.cores},
        options=asdict(options),
        engine=source.engine,
        summary_json=str(logs / f"{job_name}-{run_id}.summary.json"),
        layout_template=source.layout_template,
        max_delete=source.max_delete,
        query=query,
        settings=settings,
        project_dir=str(config.project_directory),
        stable_after=source.stable_after,
        bids_dir=str(config.bids_directory or ""),
        bids_with_session="{session}" in (source.layout_template or config.dicom_format_string or "{session}"),
        shards=source.shards if source.shards > 1 else 0,
        array_throttle=source.array_throttle,
        max_duration=source.max_duration,
        continue_job=source.continue_job,
        max_continuations=source.max_continuations,
        url=source.url,
    )
