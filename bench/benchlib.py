"""What every benchmark here shares: running a peer as a measured process tree, and
describing the machine. Each benchmark keeps its own rows, checks and goals."""

from __future__ import annotations

import fcntl
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1e6
SAMPLE_EVERY = 0.05  # seconds between RSS samples


def tree_rss(root: int) -> int:
    """Summed RSS (bytes) of ``root`` and all its descendants, from /proc/*/stat."""
    kids: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue  # the process has gone
            kids.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * PAGE
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += kids.get(pid, [])
    return total


@dataclass
class Measured:
    seconds: float
    cpu: float  # user + system seconds of the process tree
    rss_mb: float  # peak summed RSS of the tree
    code: int | None  # exit status; None after the timeout
    output: str

    def failure(self, timeout: float, width: int = 160) -> str:
        """ "" when the run succeeded, else why it did not (for the table's result column)."""
        if self.code is None:
            return f"TIMEOUT after {timeout:.0f} s"
        if self.code != 0:
            return f"FAILED (exit {self.code}): {last_line(self.output)[:width]}"
        return ""


def run_measured(cmd: list[str], env: dict, log: Path, timeout: float, cwd: Path | None = None) -> Measured:
    """Run ``cmd`` in its own session with its output in ``log``: wall time, CPU time and
    peak summed RSS of its process tree (sampled every 50 ms). On the timeout (or Ctrl-C)
    the whole session is killed."""
    stop, peak = threading.Event(), [0]

    def sample(pid: int) -> None:
        while not stop.wait(SAMPLE_EVERY):
            peak[0] = max(peak[0], tree_rss(pid))

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    code = None
    timed_out = threading.Event()
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        sampler = threading.Thread(target=sample, args=(proc.pid,), daemon=True)
        sampler.start()

        def expire() -> None:
            timed_out.set()
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        # a timer kills it on the timeout, and the wait blocks until the exit: Popen.wait(timeout)
        # polls, every 50 ms at last, which added up to 50 ms to a run of a tenth of a second
        watchdog = threading.Timer(timeout, expire)
        watchdog.start()
        try:
            code = proc.wait()
        finally:
            seconds = time.perf_counter() - start
            watchdog.cancel()
            if proc.poll() is None or code is None or timed_out.is_set():
                code = None
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            stop.set()
            sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    return Measured(seconds, cpu, peak[0] / MB, code, log.read_text(errors="replace"))


def isolated_env(home: Path, fw: Path) -> dict[str, str]:
    """The environment of a benchmark's runs: its own HOME (so its own `fw login`, made in
    ``home``, which is created), no proxy, and ``fw``'s folder first on PATH with no other fw."""
    home.mkdir()
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and not Path(p, "fw").exists()]
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(
        HOME=str(home),
        FLYWHEEL_USER_HOME=str(home),
        PYTHONWARNINGS="ignore",
        NO_PROXY="127.0.0.1,localhost",
        PATH=os.pathsep.join([str(fw.parent), *path]),
    )
    return env


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def machine() -> str:
    """CPUs, memory, kernel and Python, for the table's header."""
    mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1]) * 1024
    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    return (
        f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}, "
        f"{cpu[1] if cpu else platform.machine()}), {mem / 2**30:.1f} GiB memory, "
        f"Linux {platform.release()}, Python {platform.python_version()}"
    )


@contextmanager
def orthanc_data_lock():
    """Held while a benchmark has its BENCH* patients in the test Orthanc: the DICOM
    benchmarks upload and delete such patients, so two of them (or a benchmark and the
    test that runs its quick mode) must not overlap. A second one waits, saying so."""
    path = Path(tempfile.gettempdir()) / "clpipe-bench-orthanc-data.lock"
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another benchmark that uses the test Orthanc's BENCH* patients ({path})", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class Run:
    """One row of a benchmark table: what ran, on how much data, and how it went (each
    benchmark adds the columns of its own in a subclass)."""

    name: str
    files: int = 0
    nbytes: int = 0
    seconds: float | None = None
    rss_mb: float | None = None
    cpu: float | None = None  # user + system seconds of the process tree
    status: str = "ok"  # or "INVALID: ...", "FAILED ...", "TIMEOUT ...", "not available: ..."
    noop: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def save_results(path: Path, text: str) -> None:
    """Write a benchmark's table to ``path`` (under bench/results/) and say so."""
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    print(f"saved to {path}")


def leave(work: Path, keep: bool) -> None:
    """The end of a benchmark: its work folder kept (``--keep``) or removed."""
    if keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
