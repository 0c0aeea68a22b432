"""The ``fw-cli`` engine: run the real Flywheel CLI's ``fw sync`` and tell the truth about it.

``fw sync`` exits 0 when single files fail, can leave 0-byte files, and some versions leave
an oddly named temporary folder behind. This module wraps one run:

1. plan: the exact ``fw sync`` argument list (never a shell string) and where its logs go;
2. pre-flight: ``fw`` on PATH, a login the site accepts, the project exists, folders made;
3. run: stream fw's output to the console and the log, with the API key redacted;
4. verify: fw's exit status, its ``ERROR`` lines, the audit CSV against the project's own
   file listing, empty files, size mismatches;
5. clean up the ``<TemporaryDirectory '...'>`` folder if (and only if) fw left one;
6. one summary line, and an exit status that is non-zero whenever a file is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .batch.job import Job, Resources, without_secrets
from .console import say, summary_line
from .errors import ConfigError, PreflightError
from .sources.dicom import DICOMWEB_CREDENTIALS  # a DICOMweb login: to a batch job in a private file (batch/handoff.py)
from .sources.flywheel import API_KEY_ENV, FlywheelAPI, load_credentials, parse_fw_url

if TYPE_CHECKING:  # the job on the node needs no config validation (pydantic)
    from .config.project import ProjectConfig

FW_INSTALL_HINT = (
    "the Flywheel CLI `fw` was not found on PATH; install it in an environment of its own, e.g. "
    "`python3 -m venv ~/fw-cli && ~/fw-cli/bin/pip install flywheel-cli` and add ~/fw-cli/bin to PATH "
    "(on a cluster, `module load flywheel` may provide it)"
)
# fw 15.9-17.6 use the repr of a TemporaryDirectory as a relative path, "<TemporaryDirectory
# '/abs/tmpXYZ'>/x.zip"; its slashes make a tree whose top folder is "<TemporaryDirectory '".
STRAY_TEMP_GLOB = "<TemporaryDirectory *"
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]?")
ERROR_RE = re.compile(r"\bERROR - (.*)")
PROGRESS_EVERY = 15.0  # seconds between progress lines in a batch log
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
                raise ConfigError(f"{where}: {spelled[name]} is an fw sync option for Flywheel projects; "
                                  "a DICOM source takes only -j/--jobs, -n/--dry-run, -l/--list-only, -v, --delete, "
                                  "--quiet, --debug, -y and --ca-certs; filter with the Query block instead")
    elif engine == "native":
        for name, what in NATIVE_MEANINGLESS.items():
            if getattr(ns, name) not in (None, False):
                raise ConfigError(f"{where}: {what} means nothing to the native engine; remove it, or use Engine \"fw-cli\"")
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
                raise ConfigError(f"{where}: container tags must be JSON such as '{{\"subject\": [\"tag\"]}}'") from None
            if not isinstance(tags, dict):
                raise ConfigError(f"{where}: container tags must be a JSON object such as '{{\"subject\": [\"tag\"]}}'")
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

    def to_json(self) -> str:
        data = asdict(self)
        data["fw_argv"] = list(self.fw_argv)
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "SyncPlan":
        data = json.loads(text)
        data["fw_argv"] = tuple(data["fw_argv"])
        return cls(**data)

    @property
    def sync_options(self) -> SyncOptions:
        opts = dict(self.options)
        for key in ("args", "include", "exclude", "container_filters"):
            opts[key] = tuple(opts.get(key, ()))
        return SyncOptions(**opts)

    def job(self, argv: tuple[str, ...]) -> Job:
        """The batch job that runs this plan. It carries the submitter's PATH (where `fw`
        is) and login location, never a credential; ``pass_env`` names the login variables
        set here that it needs (a batch job gets them in a private file, a local run in its
        environment, which holds no other login)."""
        env = {name: os.environ[name] for name in JOB_ENV if name in os.environ}
        needed = DICOMWEB_CREDENTIALS if self.source_url.startswith("dicomweb") else \
            (API_KEY_ENV,) if self.source_url.startswith("fw:") else ()
        secrets_by_name = tuple(name for name in needed if os.environ.get(name))
        return Job(
            name=self.job_name,
            argv=argv,
            resources=Resources(**self.resources),
            log_path=Path(self.log_path),
            cwd=Path(self.sync_logs),
            env=env,
            pass_env=secrets_by_name,
        )


def new_run_id() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def make_plan(config: "ProjectConfig", run_id: str | None = None) -> SyncPlan:
    """Build the run plan from a validated config (no network, no files written)."""
    source = config.source
    flywheel = source.is_flywheel
    options = parse_commandline_opts(source.commandline_opts, f"{config.path}: {config.key('commandline_opts')}",
                                     source.engine if flywheel else "dicom")
    run_id = run_id or new_run_id()
    logs = config.sync_logs
    job_name = "flywheel_sync" if flywheel else "dicom_sync"
    audit_csv = logs / f"{job_name}-{run_id}.csv"
    query, settings = {}, {}
    if not flywheel:
        if options.ca_certs and source.url.scheme == "dimse":
            raise ConfigError(f"{config.path}: {config.key('commandline_opts')}: --ca-certs is for https sources; "
                              "for DICOM over TLS set TLSCAFile (and TLSCertFile/TLSKeyFile if the PACS asks for them)")
        query = asdict(source.query)
        settings = {"calling_aet": source.calling_aet, "retrieve": source.retrieve_method, "move_port": source.move_port,
                    "tls_ca": source.tls_ca_file or (options.ca_certs or ""), "tls_cert": source.tls_cert_file,
                    "tls_key": source.tls_key_file, "jobs": options.jobs, "timeout": source.network_timeout}
    argv = () if source.engine == "native" else (
        "fw", "sync",
        "--include", "dicom",
        "--tmp-path", str(source.temp_directory),
        "-y",
        "--save-audit-logs", str(audit_csv),
        *(a for a in options.args if a not in ("-y", "--yes")),  # clpipe always passes -y
        str(source.url),
        str(source.dropoff_directory),
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
    )


# ---------------------------------------------------------------------------------------
# Audit CSV and verification


@dataclass
class AuditRow:
    src_path: str
    dest_path: str
    status: str  # completed | skipped | canceled
    existing: str
    error_message: str
    action_taken: str


_ROW_RE = re.compile(r"^(?P<paths>.*),(?P<status>completed|skipped|canceled),(?P<existing>True|False|),(?P<rest>.*)$")


def read_audit_csv(path: Path) -> list[AuditRow]:
    """Read fw's audit CSV. fw writes it without quoting, so names with commas are split
    by position: status and existing are fixed words, and src and dest are the same
    relative path for stored files (src is empty for deletions)."""
    rows = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for line in lines[1:]:
        match = _ROW_RE.match(line)
        if not match:
            continue
        paths = match.group("paths")
        half = (len(paths) - 1) // 2
        if len(paths) % 2 == 1 and paths[half] == "," and paths[:half] == paths[half + 1:]:
            src, dest = paths[:half], paths[half + 1:]
        elif paths.startswith(","):
            src, dest = "", paths[1:]
        else:
            src, _, dest = paths.partition(",")
        error, _, action = match.group("rest").rpartition(",")
        rows.append(AuditRow(src, dest, match.group("status"), match.group("existing"), error, action))
    return rows


@dataclass
class Outcome:
    created: int = 0
    updated: int = 0
    skipped: int = 0
    deleted: int = 0
    bytes: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    error_lines: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return max(len(self.problems), len(self.error_lines))

    def summary(self) -> str:
        return summary_line(self.created, self.updated, self.skipped, self.failed, self.bytes, self.seconds)


def expected_destinations(targets: list[dict], trailing_slash: bool, unpack: bool) -> tuple[dict[str, int | None], set[str]]:
    """From the project listing: files fw must write (relative path -> size, or None when
    unknown) and folders into which zipped series are unpacked."""
    files: dict[str, int | None] = {}
    folders: set[str] = set()
    strip = r"^/?[^/]+/" if trailing_slash else r"^/"
    for target in targets:
        name = os.path.normpath(re.sub(strip, "", target["dst_path"]))
        filename = target.get("filename", "")
        if target.get("download_type") == "metadata_sidecar":
            files[name] = None
        elif unpack and target.get("filetype") == "dicom" and filename.lower().endswith("zip"):
            folders.add(re.sub(r"(\.(dcm|dicom))?\.zip$", "", name, flags=re.IGNORECASE))
        else:
            files[name] = target.get("size")
    return files, folders


def verify(plan: SyncPlan, rows: list[AuditRow], targets: list[dict] | None, outcome: Outcome) -> None:
    """Fill ``outcome`` from the audit rows and check every expected file is there, whole."""
    dropoff = Path(plan.dropoff)
    audited: set[str] = set()
    for row in rows:
        dest = os.path.normpath(row.dest_path) if row.dest_path else ""
        if row.action_taken.startswith("Deleted"):
            outcome.deleted += 1
            continue
        audited.add(dest)
        if row.status == "canceled":
            outcome.problems.append(f"{dest}: cancelled by fw sync (not written)")
            continue
        path = dropoff / dest
        try:
            size = path.stat().st_size
        except OSError:
            outcome.problems.append(f"{dest}: listed as {row.status} in the audit log but missing from the dropoff")
            continue
        if size == 0:
            outcome.problems.append(f"{dest}: is an empty (0-byte) file")
            continue
        if row.status == "skipped":
            outcome.skipped += 1
        elif row.existing == "True":
            outcome.updated += 1
            outcome.bytes += size
        else:
            outcome.created += 1
            outcome.bytes += size
    if targets is None:
        return
    sync_opts = plan.sync_options
    files, folders = expected_destinations(targets, plan.source_url.endswith("/"), sync_opts.unpack)
    for name, size in sorted(files.items()):
        if name not in audited:
            outcome.problems.append(f"{name}: listed by Flywheel but missing from fw's audit log (not synced)")
            continue
        path = dropoff / name
        if size is not None and path.exists() and path.stat().st_size != size:
            outcome.problems.append(f"{name}: size on disk {path.stat().st_size} differs from Flywheel's {size}")
    audited_dirs = {os.path.dirname(a) for a in audited}
    for folder in sorted(folders):
        if folder not in audited_dirs:
            outcome.problems.append(f"{folder}/: zipped series listed by Flywheel but no file of it was synced")


def remove_stray_temp_dirs(where: Path) -> list[Path]:
    """Remove the ``<TemporaryDirectory '...'>`` folder tree that fw 15.9-17.6 leave in their
    working directory (clpipe runs fw inside TempDirectory); only if it exists."""
    removed = []
    for path in where.glob(STRAY_TEMP_GLOB):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------
# The run


class _Streamer:
    """Copy fw's output to ours, redacting the key, keeping ERROR lines, and turning fw's
    carriage-return progress bar into a line every PROGRESS_EVERY seconds off a terminal."""

    def __init__(self, out, secret: str, interactive: bool):
        self.out = out
        self.secret = secret
        self.interactive = interactive
        self.error_lines: list[str] = []
        self._pending = ""
        self._last_progress = 0.0

    def feed(self, chunk: str) -> None:
        if self.secret:
            chunk = chunk.replace(self.secret, "<redacted>")
        self._pending += chunk
        while True:
            match = re.search(r"\r\n|\n|\r", self._pending)
            if not match:
                break
            segment, sep = self._pending[: match.start()], match.group()
            self._pending = self._pending[match.end():]
            self._segment(segment, progress=(sep == "\r"))

    def close(self) -> None:
        if self._pending:
            self._segment(self._pending, progress=False)
            self._pending = ""

    def _segment(self, text: str, progress: bool) -> None:
        plain = ANSI_RE.sub("", text)
        if progress:
            now = time.monotonic()
            if self.interactive:
                self.out.write(text + "\r")
            elif plain.strip() and now - self._last_progress >= PROGRESS_EVERY:
                self.out.write(f"[progress {datetime.now():%H:%M:%S}] {plain.strip()}\n")
                self._last_progress = now
            self.out.flush()
            return
        match = ERROR_RE.search(plain)
        if match:
            self.error_lines.append(match.group(1).strip())
        self.out.write((plain if not self.interactive else text).rstrip() + "\n")
        self.out.flush()


def run_plan(plan: SyncPlan) -> int:
    """Run one sync on this machine: pre-flight, fw sync, verify, clean up, summarise.

    Returns the exit status: 0 only when every expected file is in the dropoff, whole.
    Raises :class:`PreflightError` when the run cannot start.
    """
    started = time.monotonic()
    url = parse_fw_url(plan.source_url)
    fw = shutil.which(plan.fw_argv[0])
    if fw is None:
        raise PreflightError(FW_INSTALL_HINT)
    credentials = load_credentials()
    with FlywheelAPI(credentials) as api:
        api.check_login()
        project = api.lookup_project(url)
    say(f"logged in to {credentials.api_url}; project {url.group}/{url.project} found")
    for folder, what in ((plan.temp_dir, "TempDirectory"), (plan.dropoff, "DropoffDirectory"), (plan.sync_logs, "log folder")):
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PreflightError(f"cannot create the {what} {folder}: {exc.strerror}") from None

    argv = [fw, *plan.fw_argv[1:]]
    say("running: " + shlex.join(plan.fw_argv))
    # fw reads its login from the login home (HOME or FLYWHEEL_USER_HOME), never from the
    # environment: it gets no login variable at all
    env = dict(without_secrets(os.environ), PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    streamer = _Streamer(sys.stdout, credentials.key, interactive=sys.stdout.isatty())
    proc = subprocess.Popen(
        argv, cwd=plan.temp_dir, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    reader = os.fdopen(proc.stdout.fileno(), "rb", buffering=0, closefd=False)
    while True:
        chunk = reader.read(65536)
        if not chunk:
            break
        streamer.feed(chunk.decode("utf-8", errors="replace"))
    streamer.close()
    returncode = proc.wait()
    proc.stdout.close()

    removed = remove_stray_temp_dirs(Path(plan.temp_dir))
    if removed:
        say(f"removed {len(removed)} temporary folder(s) named <TemporaryDirectory ...> left by fw in {plan.temp_dir}")

    outcome = Outcome(error_lines=streamer.error_lines)
    sync_opts = plan.sync_options
    audit = Path(plan.audit_csv)
    rows = read_audit_csv(audit) if audit.exists() else []
    if returncode != 0:
        outcome.problems.append(f"fw sync exited with status {returncode}")
    elif sync_opts.transfers:
        if not audit.exists():
            outcome.problems.append(f"fw sync wrote no audit log at {audit}")
        targets = None
        try:
            with FlywheelAPI(credentials) as api:
                targets = list(api.download_targets(project["_id"], *sync_opts.listing_request()))
        except PreflightError as exc:
            outcome.problems.append(f"could not list the project to check the result: {exc}")
        verify(plan, rows, targets, outcome)
    outcome.seconds = time.monotonic() - started

    for line in outcome.error_lines[:20]:
        say(f"fw reported an error: {line}", error=True)
    for problem in outcome.problems[:50]:
        say(f"FAILED {problem}", error=True)
    if len(outcome.problems) > 50:
        say(f"... and {len(outcome.problems) - 50} more problems", error=True)
    say(outcome.summary())
    say(f"audit log: {audit}" if audit.exists() else "no audit log was written")
    if outcome.failed or returncode != 0:
        say("sync FAILED: not every file arrived; the exit status is non-zero", error=True)
        return returncode if returncode != 0 else 1
    say("sync complete: every listed file is in the dropoff")
    return 0

