"""The ``fw-cli`` engine: run the real Flywheel CLI's ``fw sync`` and tell the truth about it.

``fw sync`` exits 0 when single files fail, can leave 0-byte files, and some versions leave
an oddly named temporary folder behind. This module wraps one run of a plan
(:mod:`clpipe.plan` made the exact ``fw sync`` argument list, never a shell string, and
where its logs go):

1. pre-flight: ``fw`` on PATH, a login the site accepts, the project exists, folders made;
2. run: stream fw's output to the console and the log, with the API key redacted;
3. verify: fw's exit status, its ``ERROR`` lines, the audit CSV against the project's own
   file listing, empty files, size mismatches;
4. clean up the ``<TemporaryDirectory '...'>`` folder if (and only if) fw left one;
5. one summary line, and an exit status that is non-zero whenever a file is missing.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ..batch.job import without_secrets
from ..console import say
from ..errors import PreflightError
from ..sources.flywheel import FlywheelAPI, FlywheelURL, load_credentials
from .base import Outcome, close, make_folders, say_failed

if TYPE_CHECKING:
    from ..plan import SyncPlan

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
        if len(paths) % 2 == 1 and paths[half] == "," and paths[:half] == paths[half + 1 :]:
            src, dest = paths[:half], paths[half + 1 :]
        elif paths.startswith(","):
            src, dest = "", paths[1:]
        else:
            src, _, dest = paths.partition(",")
        error, _, action = match.group("rest").rpartition(",")
        rows.append(AuditRow(src, dest, match.group("status"), match.group("existing"), error, action))
    return rows


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
    """Fill ``outcome`` from the audit rows and check every expected file is there, whole
    (what is not: ``outcome.failures``)."""
    dropoff = Path(plan.dropoff)
    audited: set[str] = set()
    for row in rows:
        dest = os.path.normpath(row.dest_path) if row.dest_path else ""
        if row.action_taken.startswith("Deleted"):
            outcome.deleted += 1
            continue
        audited.add(dest)
        if row.status == "canceled":
            outcome.failures.append(f"{dest}: cancelled by fw sync (not written)")
            continue
        path = dropoff / dest
        try:
            size = path.stat().st_size
        except OSError:
            outcome.failures.append(f"{dest}: listed as {row.status} in the audit log but missing from the dropoff")
            continue
        if size == 0:
            outcome.failures.append(f"{dest}: is an empty (0-byte) file")
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
    url = plan.url
    assert isinstance(url, FlywheelURL)
    files, folders = expected_destinations(targets, url.trailing_slash, sync_opts.unpack)
    for name, listed_size in sorted(files.items()):
        if name not in audited:
            outcome.failures.append(f"{name}: listed by Flywheel but missing from fw's audit log (not synced)")
            continue
        path = dropoff / name
        if listed_size is not None and path.exists() and path.stat().st_size != listed_size:
            outcome.failures.append(f"{name}: size on disk {path.stat().st_size} differs from Flywheel's {listed_size}")
    audited_dirs = {os.path.dirname(a) for a in audited}
    for folder in sorted(folders):
        if folder not in audited_dirs:
            outcome.failures.append(f"{folder}/: zipped series listed by Flywheel but no file of it was synced")


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
            self._pending = self._pending[match.end() :]
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


def run(plan: SyncPlan) -> int:
    """Run one sync on this machine: pre-flight, fw sync, verify, clean up, summarise.

    Returns the exit status: 0 only when every expected file is in the dropoff, whole.
    Raises :class:`PreflightError` when the run cannot start.
    """
    started = time.monotonic()
    url = plan.url
    assert isinstance(url, FlywheelURL)
    fw = shutil.which(plan.fw_argv[0])
    if fw is None:
        raise PreflightError(FW_INSTALL_HINT)
    credentials = load_credentials()
    with FlywheelAPI(credentials) as api:
        api.check_login()
        project = api.lookup_project(url)
    say(f"logged in to {credentials.api_url}; project {url.group}/{url.project} found")
    make_folders(plan, ("temp", "dropoff", "logs"))

    argv = [fw, *plan.fw_argv[1:]]
    say("running: " + shlex.join(plan.fw_argv))
    # fw reads its login from the login home (HOME or FLYWHEEL_USER_HOME), never from the
    # environment: it gets no login variable at all
    env = dict(without_secrets(os.environ), PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    streamer = _Streamer(sys.stdout, credentials.key, interactive=sys.stdout.isatty())
    proc = subprocess.Popen(
        argv,
        cwd=plan.temp_dir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
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

    outcome = Outcome()
    sync_opts = plan.sync_options
    audit = Path(plan.audit_csv)
    rows = read_audit_csv(audit) if audit.exists() else []
    if returncode != 0:
        outcome.failures.append(f"fw sync exited with status {returncode}")
    elif sync_opts.transfers:
        if not audit.exists():
            outcome.failures.append(f"fw sync wrote no audit log at {audit}")
        targets = None
        try:
            with FlywheelAPI(credentials) as api:
                targets = list(api.download_targets(project["_id"], *sync_opts.listing_request()))
        except PreflightError as exc:
            outcome.failures.append(f"could not list the project to check the result: {exc}")
        verify(plan, rows, targets, outcome)
    outcome.seconds = time.monotonic() - started
    # a file is failed when fw said so (an ERROR line) or when the check found it missing
    outcome.failed = max(len(outcome.failures), len(streamer.error_lines))

    for line in streamer.error_lines[:20]:
        say(f"fw reported an error: {line}", error=True)
    say_failed(outcome.failures, "problems")
    say(outcome.summary())
    say(f"audit log: {audit}" if audit.exists() else "no audit log was written")
    return close(bool(outcome.failed) or returncode != 0, code=returncode if returncode != 0 else 1)
