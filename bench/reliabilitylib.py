"""Scenario helpers of bench/reliability.py that tests can reuse: running a clpipe command in
its own process group (and killing the group), judging a dropoff against a reference,
portable names, secrets in an strace log, and tmpfs / read-only mounts.

Nothing here knows about a particular scenario; bench/reliability.py composes them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

STATE_DIR = ".clpipe-sync"  # the engine's own bookkeeping in a dropoff: not a synced file
INTERNAL = ("internal error", "Traceback (most recent call last)")
LOCK_BUSY = "another sync is writing"
SECRET_VARS = ("FLYWHEEL_API_KEY", "CLPIPE_DICOMWEB_TOKEN", "CLPIPE_DICOMWEB_USER", "CLPIPE_DICOMWEB_PASSWORD")

_LIVE: dict[int, subprocess.Popen] = {}  # process groups started here and not yet reaped
#: when set, the folder holding the ``clpipe`` package every run imports (put first on
#: PYTHONPATH), e.g. an older tree from ``git archive``: the same scenarios against other code
CLPIPE_PATH: str = ""


# ------------------------------------------------------------------------------ running


def base_env(home: Path) -> dict[str, str]:
    """The environment of every run: an isolated HOME (so its own saved login), loopback
    never proxied, no secret inherited from the caller's shell, no warnings in the output."""
    env = {
        k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k not in SECRET_VARS and not k.startswith("CLPIPE_TTY")
    }
    env.update(
        HOME=str(home), FLYWHEEL_USER_HOME=str(home), PYTHONWARNINGS="ignore", NO_PROXY="127.0.0.1,localhost", PYTHONDONTWRITEBYTECODE="1"
    )
    if CLPIPE_PATH:
        env["PYTHONPATH"] = os.pathsep.join([CLPIPE_PATH, *filter(None, [env.get("PYTHONPATH")])])
    return env


def clpipe(*args: str) -> list[str]:
    return [sys.executable, "-m", "clpipe", *args]


@dataclass
class Result:
    """What one run did: exit status (None: killed by us, at the timeout or on purpose),
    its output and how long it ran."""

    argv: list[str]
    code: int | None
    stdout: str
    stderr: str
    seconds: float
    killed: bool = False  # SIGKILLed by the scenario (not a timeout)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def internal(self) -> bool:
        return any(mark in self.output for mark in INTERNAL)

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.output

    @property
    def multiline_error(self) -> bool:
        """More than one line on stderr, or a traceback anywhere."""
        return self.traceback or len([ln for ln in self.stderr.splitlines() if ln.strip()]) > 1

    @property
    def first_stderr(self) -> str:
        return first_line(self.stderr)

    def message(self) -> str:
        """The line a user reads first: stderr's first line (with more lines on stderr, also
        the one that says what is wrong: click prints its usage first); when stderr is
        empty, the first line of stdout that reports a problem (marked ``(stdout)``)."""
        errors = [ln.strip() for ln in self.stderr.splitlines() if ln.strip()]
        if len(errors) > 1:  # e.g. click's "Usage: ..." first: show the line that says what is wrong too
            said = next((ln for ln in reversed(errors) if re.match(r"(Error|clpipe: )", ln)), errors[-1])
            return f"{errors[0]} [... {len(errors) - 2} more lines ...] {said}" if len(errors) > 2 else f"{errors[0]} / {said}"
        if errors:
            return errors[0]
        lines = [ln.strip() for ln in self.stdout.splitlines() if ln.strip()]
        for pattern in (r"clpipe: (internal )?error", r"\bFAILED\b", r"(?i)error|cannot|refus|denied|no space"):
            for ln in lines:
                if re.search(pattern, ln):
                    return f"(stdout) {ln}"
        return f"(stdout) {lines[0]}" if lines else "(no output)"

    @property
    def status(self) -> str:
        if self.killed:
            return "killed"
        return "TIMEOUT" if self.code is None else str(self.code)

    def paths(self) -> tuple[Path | None, Path | None]:
        """(audit CSV, JSON summary) the run reported, if it got that far."""
        found = re.findall(r"audit log: (.+?); summary: (.+?)$", self.stdout, flags=re.MULTILINE)
        if not found:
            return None, None
        audit, summary = found[-1]
        return Path(audit.strip()), Path(summary.strip())


def first_line(text: str) -> str:
    for ln in text.splitlines():
        if ln.strip():
            return ln.strip()
    return ""


def run(argv: list[str], env: dict, timeout: float, cwd: Path | None = None, prefix: list[str] | None = None) -> Result:
    """Run ``argv`` (after ``prefix``, e.g. strace) in its own session; on the timeout the
    whole process group is killed and ``code`` is None."""
    full = [*(prefix or []), *argv]
    start = time.monotonic()
    proc = subprocess.Popen(
        full, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    _LIVE[proc.pid] = proc
    try:
        out, err = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        _killpg(proc.pid)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a process outside the group holds the pipes
            out, err = b"", b""
        code = None
    finally:
        _reap_group(proc)
    return Result(full, code, out.decode(errors="replace"), err.decode(errors="replace"), time.monotonic() - start)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap_group(proc: subprocess.Popen) -> None:
    """Make sure nothing of the group outlives its run (a tee, a forked helper)."""
    _killpg(proc.pid)
    _LIVE.pop(proc.pid, None)


def kill_everything_started() -> None:
    """At the end (also after an error or Ctrl-C): kill every group started here."""
    for pid, proc in list(_LIVE.items()):
        _killpg(pid)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        _LIVE.pop(pid, None)


def run_and_kill(
    argv: list[str],
    env: dict,
    delay: float,
    cwd: Path | None = None,
    watch: Path | None = None,
    after_watch: bool = False,
    limit: float = 600.0,
) -> tuple[Result, float | None]:
    """Start ``argv`` in its own process group and SIGKILL the whole group ``delay`` seconds
    after the start, or (``after_watch``) ``delay`` seconds after the path ``watch`` (e.g.
    the dropoff's lock folder) first appeared; a run still going after ``limit`` seconds is
    killed too. Returns the result (``killed`` unless it ended first) and when ``watch`` was
    first seen (seconds after the start; polled every 2 ms), or None."""
    start = time.monotonic()
    with open(os.devnull, "rb") as devnull, _temp_output() as (out, err):
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=devnull, stdout=out, stderr=err, start_new_session=True)
        _LIVE[proc.pid] = proc
        seen = None
        killed = False
        try:
            while proc.poll() is None:
                now = time.monotonic() - start
                if watch is not None and seen is None and os.path.lexists(watch):
                    seen = now
                if now >= limit:
                    break
                if not after_watch and now >= delay:
                    break
                if after_watch and seen is not None and now >= seen + delay:
                    break
                time.sleep(0.002)
            if proc.poll() is None:
                _killpg(proc.pid)
                killed = True
            proc.wait(timeout=30)
        finally:
            _reap_group(proc)
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        result = Result(
            argv,
            None if killed else proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            seconds,
            killed=killed,
        )
    return result, seen


@contextmanager
def _temp_output():
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        yield out, err


def closed_port() -> int:
    """A loopback TCP port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ dropoffs


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def synced_files(dropoff: Path) -> dict[str, Path]:
    """Relative path -> file, for every file under ``dropoff`` outside its ``.clpipe-sync``."""
    out: dict[str, Path] = {}
    if not dropoff.is_dir():
        return out
    for folder, dirs, files in os.walk(dropoff):
        rel_folder = os.path.relpath(folder, dropoff)
        if rel_folder == ".":
            dirs[:] = [d for d in dirs if d != STATE_DIR]
            rel_folder = ""
        for name in files:
            rel = f"{rel_folder}/{name}" if rel_folder else name
            out[rel] = Path(folder, name)
    return out


def digests(dropoff: Path) -> dict[str, str]:
    out = {}
    for rel, path in synced_files(dropoff).items():
        try:
            out[rel] = digest(path.read_bytes())
        except OSError:
            out[rel] = "unreadable"
    return out


def is_hidden(rel: str) -> bool:
    return Path(rel).name.startswith(".")


@dataclass
class Check:
    """A dropoff against a reference (relative path -> digest)."""

    whole: set[str] = field(default_factory=set)  # under a final name, bytes as the reference's
    corrupted: list[str] = field(default_factory=list)  # under a final name, other bytes
    unexpected: list[str] = field(default_factory=list)  # a final name the reference has not
    hidden: list[str] = field(default_factory=list)  # hidden (partial / staging) files outside .clpipe-sync
    missing: list[str] = field(default_factory=list)  # in the reference, not here

    @property
    def bad(self) -> int:
        """Files under final names that are not the source's: corrupted or unexpected."""
        return len(self.corrupted) + len(self.unexpected)


def check(dropoff: Path, reference: dict[str, str]) -> Check:
    result = Check()
    found = digests(dropoff)
    for rel, value in found.items():
        if rel not in reference and is_hidden(rel):
            result.hidden.append(rel)
        elif rel not in reference:
            result.unexpected.append(rel)
        elif value == reference[rel]:
            result.whole.add(rel)
        else:
            result.corrupted.append(rel)
    result.missing = sorted(set(reference) - set(found))
    return result


def audit_rows(result: Result) -> list[dict] | None:
    """The rows of the audit CSV a run reported (None when it reported none)."""
    audit, summary = result.paths()
    if summary is not None and summary.is_file():
        try:
            named = json.loads(summary.read_text()).get("audit_csv")
            audit = Path(named) if named else audit
        except (OSError, ValueError):
            pass
    if audit is None or not audit.is_file():
        return None
    with open(audit, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def fetched_paths(result: Result) -> set[str] | None:
    """Files the run wrote (created or updated), from its audit CSV."""
    rows = audit_rows(result)
    if rows is None:
        return None
    return {r["dest_path"] for r in rows if r.get("status") == "completed" and not (r.get("action_taken") or "").startswith("Deleted")}


def summary_data(result: Result) -> dict:
    _, summary = result.paths()
    try:
        return json.loads(summary.read_text()) if summary is not None else {}
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------ DICOM content


def dataset_offset(data: bytes) -> int:
    """Where the data set starts in a DICOM file (after preamble and file meta, if any)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = io.BytesIO(data)
    try:
        preamble = read_preamble(fp, True)
        if preamble is None and data[:4] != b"DICM":
            return 0  # a bare data set
        _read_file_meta_info(fp)
    except Exception:  # noqa: BLE001 - not a Part-10 file: compare it whole
        return 0
    return fp.tell()


def same_dataset(a: bytes, b: bytes) -> bool:
    """Same DICOM data set (file meta aside: servers write their own)."""
    return a[dataset_offset(a) :] == b[dataset_offset(b) :]


# ------------------------------------------------------------------------------ names

NOT_PORTABLE_CHARS = set('/\\:*?"<>|')


def name_problem(name: str) -> str:
    """Why a file or folder name is not portable (ASCII, no spaces, none of /\\:*?"<>|, no
    control characters, no leading . or -, at most 255 bytes), or ""."""
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        return "longer than 255 bytes"
    if not name.isascii():
        return "non-ASCII"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "control character"
    if " " in name:
        return "space"
    bad = sorted(set(name) & NOT_PORTABLE_CHARS)
    if bad:
        return "contains " + "".join(bad)
    if name.startswith((".", "-")):
        return f"starts with {name[0]}"
    return ""


def non_portable(dropoff: Path) -> dict[str, str]:
    """Each distinct name (file or folder, outside .clpipe-sync) that is not portable -> why."""
    out: dict[str, str] = {}
    for rel in synced_files(dropoff):
        for part in rel.split("/"):
            if part not in out:
                why = name_problem(part)
                if why:
                    out[part] = why
    return out


def shown(name: str, width: int = 40) -> str:
    """A name for a table cell: escapes for controls, NFC/NFD made visible, shortened."""
    text = name.encode("unicode_escape").decode("ascii") if not name.isprintable() else name
    if unicodedata.normalize("NFC", name) != name:
        text += " (NFD)"
    text = text.replace("|", "\\|")
    return text if len(text) <= width else f"{text[: width - 12]}...({len(name.encode())} B)"


# ------------------------------------------------------------------------------ strace


@dataclass
class Exec:
    pid: int
    program: str
    argv: list[str]
    env: list[str]


_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"(\.\.\.)?')


def _c_unescape(text: str) -> str:
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape", errors="replace")


def _string_list(text: str, pos: int) -> tuple[list[str], int]:
    """Parse ``["a", "b"]`` starting at ``text[pos] == "["``; returns (items, end)."""
    assert text[pos] == "["
    pos += 1
    items = []
    while pos < len(text) and text[pos] != "]":
        if text[pos] == '"':
            m = _STRING.match(text, pos)
            if not m:
                break
            items.append(_c_unescape(m.group(1)))
            pos = m.end()
        else:
            pos += 1
    return items, pos + 1


def strace_prefix(out: Path) -> list[str]:
    """``strace`` logging every ``execve`` (argv and environment in full) of a command and
    of every process it starts, one file per process (``out/trace.<pid>``, so that lines of
    processes running at once are never split)."""
    out.mkdir(parents=True, exist_ok=True)
    return ["strace", "-f", "-ff", "-qq", "-e", "trace=execve", "-s", "65536", "-v", "-o", str(out / "trace")]


def read_strace(out: Path) -> list[Exec]:
    """The successful ``execve`` calls logged under ``out`` by :func:`strace_prefix`."""
    execs = []
    for path in sorted(out.glob("trace.*"), key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0):
        pid = int(path.suffix[1:]) if path.suffix[1:].isdigit() else 0
        execs += [Exec(pid, e.program, e.argv, e.env) for e in parse_strace(path.read_text(errors="replace"), pid)]
    return execs


def parse_strace(text: str, pid: int = 0) -> list[Exec]:
    """The successful ``execve`` calls of an ``strace -v -s N -e trace=execve`` log (with or
    without ``-f``'s pid column)."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^(?:(\d+)\s+)?execve\(", line)
        if not m or not line.rstrip().endswith("= 0"):
            continue
        pos = m.end()
        prog = _STRING.match(line, pos)
        if not prog:
            continue
        pos = line.find("[", prog.end())
        argv, pos = _string_list(line, pos)
        pos = line.find("[", pos)
        env, _ = _string_list(line, pos) if pos >= 0 else ([], 0)
        out.append(Exec(int(m.group(1)) if m.group(1) else pid, _c_unescape(prog.group(1)), argv, env))
    return out


def count_in_files(roots: list[Path], markers: list[str], skip: frozenset[Path] | set[Path] = frozenset()) -> dict[str, int]:
    """Occurrences of the markers in every file under ``roots`` (path -> count, only > 0)."""
    needles = [m.encode() for m in markers]
    out: dict[str, int] = {}
    for root in roots:
        if not root.exists():
            continue
        for folder, _dirs, files in os.walk(root):
            for name in files:
                path = Path(folder, name)
                if path in skip or path.is_symlink():
                    continue
                try:
                    data = path.read_bytes()
                except OSError:
                    continue
                n = sum(data.count(needle) for needle in needles)
                if n:
                    out[str(path)] = n
    return out


# ------------------------------------------------------------------------------ mounts


_MOUNTS: list[Path] = []


def mount_tmpfs(folder: Path, size: str, options: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (f",{options}" if options else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], check=True, capture_output=True, timeout=30)
    _MOUNTS.append(folder)


def remount(folder: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True, capture_output=True, timeout=30)


def bind_readonly(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True, capture_output=True, timeout=30)
    _MOUNTS.append(target)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True, capture_output=True, timeout=30)


def umount(folder: Path) -> None:
    for _ in range(20):
        done = subprocess.run(["umount", str(folder)], capture_output=True, timeout=30, check=False)
        if done.returncode == 0:
            break
        time.sleep(0.2)  # a process of the group may still be closing its files
    if folder in _MOUNTS:
        _MOUNTS.remove(folder)


def umount_everything() -> None:
    for folder in reversed(list(_MOUNTS)):
        umount(folder)


def can_mount() -> str:
    """ "" when this process may mount tmpfs (root, not forbidden), else why not."""
    if os.geteuid() != 0:
        return "needs root (mount -t tmpfs)"
    import tempfile

    probe = Path(tempfile.mkdtemp(prefix="clpipe-mount-probe-"))
    try:
        mount_tmpfs(probe, "64k")
        umount(probe)
        return ""
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"mount -t tmpfs failed ({exc})"
    finally:
        try:
            probe.rmdir()
        except OSError:
            pass


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    mount_tmpfs(folder, size)
    try:
        yield folder
    finally:
        umount(folder)
