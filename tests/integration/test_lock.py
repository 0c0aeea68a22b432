"""The dropoff's lock (``.clpipe-sync/lock``): taken, checked and broken safely at every
instant, with ``mkdir`` and ``rename`` only (NFS has no reliable POSIX locks).

- a run killed between any two steps of taking, breaking or releasing the lock never
  blocks the next run, which proceeds or says why;
- a lock left by an older clpipe (a folder without owner, or with only its temporary owner
  file) is stale after a short grace period, not forever;
- of several runs racing to break a stale lock, exactly one wins; the others say "another
  sync is writing" (a PreflightError), never anything else;
- real ``clpipe dicom flywheel_sync -submit`` runs killed with SIGKILL at many points,
  including while they take the lock: the next run always completes.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from clpipe.errors import PreflightError
from clpipe.sync.manifest import LOCK_GRACE, STATE_DIR, SyncState
from clpipe.testing.fwserver import FlywheelTestServer, make_demo_project

from helpers import KEY, dicoms, login, new_project, start_native

pytestmark = pytest.mark.fw

HOST = socket.gethostname()


def lock_dir(dropoff: Path) -> Path:
    return dropoff / STATE_DIR / "lock"


def lock_names(dropoff: Path) -> list[str]:
    """What is beside the lock: the lock itself and any leftovers of taking or breaking one."""
    return sorted(p.name for p in (dropoff / STATE_DIR).iterdir() if p.name.startswith("lock"))


def owner(dropoff: Path) -> dict:
    return json.loads((lock_dir(dropoff) / "owner.json").read_text())


def dead_pid() -> int:
    """The pid of a process of this host that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def make_old(path: Path, seconds: float = LOCK_GRACE + 30) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def takes_and_releases(dropoff: Path) -> None:
    """The next run takes the lock (leftovers of killed runs swept), and gives it back."""
    state = SyncState(dropoff, "next")
    state.acquire()
    assert owner(dropoff)["pid"] == os.getpid() and owner(dropoff)["run"] == "next"
    assert lock_names(dropoff) == ["lock"], lock_names(dropoff)
    state.release()
    assert lock_names(dropoff) == []


# ------------------------------------------------------------------ kills between steps
# A forked child takes, breaks or releases the lock and kills itself with SIGKILL just
# before its n-th file-system operation (an audit event: open, mkdir, rename, unlink,
# rmdir, scandir, ...), for n = 1, 2, ... until it gets through: a kill between every two
# steps, whatever the steps are.

AUDITED = (
    "open",
    "os.mkdir",
    "os.rename",
    "os.remove",
    "os.rmdir",
    "os.scandir",
    "os.listdir",
    "shutil.rmtree",
    "os.utime",
    "os.chmod",
    "os.kill",
)
_armed = {"left": 0}


def _hook(event: str, _args: tuple) -> None:
    if _armed["left"] and event in AUDITED:
        _armed["left"] -= 1
        if not _armed["left"]:
            os.kill(os.getpid(), signal.SIGKILL)


def killed_at(step: int, dropoff: Path, phase: str) -> bool:
    """Run ``phase`` in a child killed before its ``step``-th operation; False when the
    child got through without reaching it."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            sys.addaudithook(_hook)  # (an audit hook stays for the life of the process: the child's only)
            state = SyncState(dropoff, f"killed-{step}")
            if phase == "release":
                state.acquire()
            _armed["left"] = step
            if phase == "release":
                state.release()
            else:
                state.acquire()
            _armed["left"] = 0
            os._exit(0)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the child failed before it was killed"
    return False


def stale_lock_of_a_dead_run(dropoff: Path) -> None:
    lock = lock_dir(dropoff)
    lock.mkdir(parents=True)
    (lock / "owner.json").write_text(json.dumps({"host": HOST, "pid": dead_pid(), "since": "then", "run": "old"}))


def legacy_lock_without_owner(dropoff: Path) -> None:
    lock = lock_dir(dropoff)
    lock.mkdir(parents=True)
    (lock / f".owner.json.{dead_pid()}.tmp").write_text('{"host": "')  # killed in the middle of writing it
    make_old(lock)


START = {
    "take": lambda dropoff: None,  # nothing yet: a first run
    "release": lambda dropoff: None,
    "take over a dead run's lock": stale_lock_of_a_dead_run,
    "take over an old clpipe's lock without owner": legacy_lock_without_owner,
}


@pytest.mark.parametrize("start", list(START))
def test_a_kill_between_any_two_steps_never_blocks_the_next_run(tmp_path, start):
    phase = "release" if start == "release" else "take"
    step = 0
    for step in range(1, 200):
        dropoff = tmp_path / f"d{step}"
        START[start](dropoff)
        if not killed_at(step, dropoff, phase):
            break
        takes_and_releases(dropoff)  # the next run proceeds at once, leftovers swept
    else:
        pytest.fail("the child never got through")
    assert step > 3, f"only {step - 1} steps to kill between"


def test_a_kill_at_the_worst_moment_of_the_old_scheme(tmp_path):
    """What older versions left when killed between ``mkdir lock`` and renaming their owner
    file into it: a lock folder that is empty or holds only ``.owner.json.<pid>.tmp``. Within
    the grace period (a run may be taking it right now) the next run says why it stops and
    for how long; after it, the lock is stale and taken."""
    empty = tmp_path / "empty"
    lock_dir(empty).mkdir(parents=True)
    with pytest.raises(
        PreflightError,
        match=rf"^another sync is writing to {re.escape(str(empty))} \(its lock .* has "
        rf"no owner yet\); wait for it: a lock without owner is stale after {LOCK_GRACE:.0f} s, so if no "
        r"sync is running run again in \d+ s$",
    ):
        SyncState(empty, "next").acquire()
    assert lock_names(empty) == ["lock"]  # left as it was (its own staging removed)
    make_old(lock_dir(empty))
    takes_and_releases(empty)

    torn = tmp_path / "torn"  # the temporary owner file, half written
    lock_dir(torn).mkdir(parents=True)
    (lock_dir(torn) / ".owner.json.4242.tmp").write_text('{"host": "')
    with pytest.raises(PreflightError, match="has no owner yet"):
        SyncState(torn, "next").acquire()
    make_old(lock_dir(torn))
    takes_and_releases(torn)

    whole = tmp_path / "whole"  # the temporary owner file complete: its run is known to be gone, at once
    lock_dir(whole).mkdir(parents=True)
    pid = dead_pid()
    (lock_dir(whole) / f".owner.json.{pid}.tmp").write_text(json.dumps({"host": HOST, "pid": pid, "since": "x"}))
    takes_and_releases(whole)


def test_a_live_holder_is_honoured_and_named(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = lock_dir(tmp_path)
        lock.mkdir(parents=True)
        (lock / "owner.json").write_text(json.dumps({"host": HOST, "pid": holder.pid, "since": "2024-01-01 10:00:00"}))
        make_old(lock)
        with pytest.raises(
            PreflightError,
            match=rf"^another sync is writing to {re.escape(str(tmp_path))} \(host "
            rf"{re.escape(HOST)}, pid {holder.pid}, since 2024-01-01 10:00:00\); wait for it, or if it is "
            rf"no longer running remove {re.escape(str(lock))}$",
        ):
            SyncState(tmp_path, "next").acquire()
        assert owner(tmp_path)["pid"] == holder.pid
        # the same pid, but a process that started at another time: a later process given a dead holder's pid
        (lock / "owner.json").write_text(json.dumps({"host": HOST, "pid": holder.pid, "start": "another-boot:1"}))
        takes_and_releases(tmp_path)
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_a_lock_from_another_host_is_honoured(tmp_path):
    lock = lock_dir(tmp_path)
    lock.mkdir(parents=True)
    (lock / "owner.json").write_text(json.dumps({"host": "node17.cluster", "pid": 1, "since": "2024-01-01 10:00:00"}))
    make_old(lock, 86400)
    with pytest.raises(PreflightError, match=r"another sync is writing to .* \(host node17\.cluster, pid 1, since "):
        SyncState(tmp_path, "next").acquire()
    assert owner(tmp_path)["host"] == "node17.cluster"


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    """A run stopped for long (its lock broken and taken by another run meanwhile) must not
    remove the other run's lock when it ends."""
    first = SyncState(tmp_path, "first")
    first.acquire()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (lock_dir(tmp_path) / "owner.json").write_text(json.dumps({"host": HOST, "pid": holder.pid, "token": "theirs"}))
        first.release()
        assert owner(tmp_path)["token"] == "theirs"
    finally:
        holder.kill()
        holder.wait(timeout=10)


# -------------------------------------------------------------------------- the race

RACERS = 8


def race(dropoff: Path) -> list[str]:
    """RACERS forked processes take the lock at the same instant; what each one got: "won",
    "busy: <message>" (PreflightError) or "error: <exception>"."""
    read, write = os.pipe()
    start = time.time() + 0.3
    pids = []
    for n in range(RACERS):
        pid = os.fork()
        if pid == 0:  # a racer: never returns into pytest
            try:
                os.close(read)
                while time.time() < start:
                    time.sleep(0.0005)
                try:
                    SyncState(dropoff, f"racer{n}").acquire()
                    got = "won"
                except PreflightError as exc:
                    got = f"busy: {exc}"
                except Exception as exc:  # noqa: BLE001 - what the test looks for: anything but a PreflightError
                    got = f"error: {exc!r}"
                os.write(write, (json.dumps(got)[:3000] + "\n").encode())  # one write under PIPE_BUF: not interleaved
                if got == "won":
                    time.sleep(60)  # holds the lock until the parent has every answer (it kills this process)
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(write)
    answers: list[str] = []
    buffer = b""
    deadline = time.monotonic() + 60
    try:
        while len(answers) < RACERS and time.monotonic() < deadline:
            ready, _, _ = select.select([read], [], [], 1.0)
            if ready:
                chunk = os.read(read, 65536)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                answers += [json.loads(line) for line in lines]
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
        os.close(read)
    return answers


STALE = {
    "a dead run's lock": stale_lock_of_a_dead_run,
    "an old clpipe's lock without owner": legacy_lock_without_owner,
    "an old clpipe's empty lock": lambda dropoff: (lock_dir(dropoff).mkdir(parents=True), make_old(lock_dir(dropoff))),
}


@pytest.mark.parametrize("stale", list(STALE))
def test_of_runs_racing_to_break_a_stale_lock_exactly_one_wins(tmp_path, stale):
    for attempt in range(4):
        dropoff = tmp_path / f"r{attempt}"
        STALE[stale](dropoff)
        answers = race(dropoff)
        assert len(answers) == RACERS, answers
        errors = [a for a in answers if not (a == "won" or a.startswith("busy: another sync is writing to "))]
        assert not errors, errors
        assert answers.count("won") == 1, answers
        assert owner(dropoff)["run"].startswith("racer")  # the winner's lock, whole


def test_a_run_never_moves_a_lock_it_did_not_judge(tmp_path, monkeypatch):
    """Run B judged a stale lock; run A broke it and took lock/ before B claimed it (A's
    claim already gone from the old folder, which A had not removed yet), so B's claim in
    the old folder succeeds. B must then leave lock/ alone: it is A's. Moving it away, even
    to put it back at once, let a third run take lock/ in between: two runs won the race
    (seen once in CI, test_of_runs_racing_to_break_a_stale_lock_exactly_one_wins)."""
    from clpipe.sync import manifest as M

    stale_lock_of_a_dead_run(tmp_path)
    lock = lock_dir(tmp_path)
    a, b = SyncState(tmp_path, "a"), SyncState(tmp_path, "b")
    real_inspect, real_remove, real_rename = M._inspect_lock, M._remove, os.rename
    moved: list[str] = []

    def a_takes_over_after_b_judged(fd):
        judged = real_inspect(fd)
        monkeypatch.setattr(M, "_inspect_lock", real_inspect)
        monkeypatch.setattr(M, "_remove", lambda path: None)  # A has not removed the old lock yet
        a.acquire()
        monkeypatch.setattr(M, "_remove", real_remove)
        monkeypatch.setattr(M.os, "rename", rename)
        return judged

    def rename(src, dst, *args, **kwargs):
        if str(src) == str(lock):
            moved.append(str(dst))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(M, "_inspect_lock", a_takes_over_after_b_judged)
    with pytest.raises(PreflightError, match="another sync is writing to"):
        b.acquire()
    assert moved == [], f"B moved A's lock to {moved}"
    assert owner(tmp_path)["run"] == "a"
    a.release()


# ----------------------------------------------------- real runs killed with SIGKILL


def kill_when(proc: subprocess.Popen, dropoff: Path, trigger: str, value: float) -> None:
    """SIGKILL the run's process group when ``trigger`` happens (bounded: 60 s)."""
    state = dropoff / STATE_DIR
    started = time.monotonic()
    while proc.poll() is None and time.monotonic() - started < 60:
        if trigger == "after":
            hit = time.monotonic() - started >= value
        else:
            try:
                names = os.listdir(state)
            except OSError:
                names = []
            if trigger == "state folder":
                hit = state.exists()
            elif trigger == "lock being taken":
                hit = any(n.startswith("lock") for n in names)
            elif trigger == "lock taken":
                hit = "lock" in names
            else:  # "files landed"
                hit = len(dicoms(dropoff)) >= value
        if hit:
            if value and trigger != "after" and trigger != "files landed":
                time.sleep(value)
            break
        time.sleep(0.0005)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_real_runs_killed_at_many_points_the_next_run_always_completes(no_fw_env, tmp_path):
    seed = int(os.environ.get("CLPIPE_TEST_SEED", time.time()))
    rng = random.Random(seed)
    project = make_demo_project(subjects=2, sessions=1, acquisitions=2, slices=3)
    expected = project.expected_dicom_paths(strip_root=True)
    # when to kill: as the state folder appears, while the lock is taken (its staged folder
    # there, or just renamed), at random small delays after that (mid-transfer), after files
    # landed, and at random times from the start
    triggers = [
        ("state folder", 0.0),
        ("lock being taken", 0.0),
        ("lock taken", 0.0),
        ("lock being taken", 0.001),
        ("lock taken", 0.002),
        ("files landed", 1),
        ("files landed", 4),
    ]
    triggers += [("lock being taken", round(rng.uniform(0, 0.01), 4)) for _ in range(3)]
    triggers += [("lock taken", round(rng.uniform(0.01, 0.5), 3)) for _ in range(4)]
    triggers += [("after", round(rng.uniform(0.2, 1.0), 3)) for _ in range(4)]
    with FlywheelTestServer(projects=[project], api_keys={KEY}) as server:
        server.add_fault(r"/files/", "delay", delay=0.1)  # transfers take a while: kills land mid-transfer too
        login(no_fw_env, server)
        config = new_project(tmp_path / "p", CommandLineOpts="-y -j 2")
        dropoff = config.parent / "data_DICOMs"
        killed = 0
        for n, (trigger, value) in enumerate(triggers):
            if n % 3 != 2 and dropoff.exists():  # most kills hit a run with files to fetch
                for path in dropoff.iterdir():
                    if path.name != STATE_DIR:
                        subprocess.run(["rm", "-rf", str(path)], check=True, timeout=60)
            proc = start_native(no_fw_env, config)
            kill_when(proc, dropoff, trigger, value)
            killed += proc.returncode == -signal.SIGKILL
            print(
                f"kill at {trigger} {value}: exit {proc.returncode}, {len(dicoms(dropoff))} files, "
                f"left {lock_names(dropoff) if (dropoff / STATE_DIR).exists() else '-'}"
            )
            for path, data in dicoms(dropoff).items():  # whatever the kill hit, every file is whole
                assert expected[path] == data, f"seed {seed}, kill {trigger} {value}: partial file {path}"
            done = no_fw_env.clpipe("dicom", "flywheel_sync", "-c", config, "-engine", "native", "-submit", timeout=180)
            out = done.stdout + done.stderr
            assert done.returncode == 0, f"seed {seed}, after a kill at {trigger} {value}:\n{out}"
            assert dicoms(dropoff) == expected, f"seed {seed}, after a kill at {trigger} {value}"
            assert lock_names(dropoff) == [], lock_names(dropoff)  # no lock, no leftover beside it
        assert killed >= 12, f"only {killed} of {len(triggers)} runs were killed before they ended"


def test_a_sigterm_releases_the_lock_and_the_next_run_resumes(no_fw_env, tmp_path):
    """scancel and a batch time limit send SIGTERM (SIGKILL only after KillWait). A run that
    dies of it without unwinding leaves a lock naming its node, which a run on another node
    must honour: so the run stops at once (cleanly: what finished is saved), releases the
    lock, says why, and the next run fetches only what is missing."""
    project = make_demo_project(subjects=2, sessions=1, acquisitions=3, slices=3)
    expected = project.expected_dicom_paths(strip_root=True)
    with FlywheelTestServer(projects=[project], api_keys={KEY}) as server:
        server.add_fault(r"/files/", "delay", delay=0.3)  # slow transfers: the signal lands mid-run
        login(no_fw_env, server)
        config = new_project(tmp_path / "p", CommandLineOpts="-y -j 2")
        dropoff = config.parent / "data_DICOMs"
        proc = start_native(no_fw_env, config, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started = time.monotonic()
        while not dicoms(dropoff) and proc.poll() is None and time.monotonic() - started < 60:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before the signal could be sent"
        before = set(dicoms(dropoff))
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
        # a clean stop (sync/stopping.py): the transfers under way are abandoned at once, what
        # finished is saved and reported, exit status 75
        assert proc.returncode == 75, out + err
        assert "stopped by SIGTERM: " in out and "internal error" not in out + err, out + err
        assert took < 10, f"took {took:.1f} s to stop"
        assert lock_names(dropoff) == [], lock_names(dropoff)  # released: another node can go on
        landed = dicoms(dropoff)
        assert set(landed) >= before and len(landed) < len(expected)
        for path, data in landed.items():
            assert expected[path] == data, path
        server.clear_faults()
        server.requests.clear()
        done = no_fw_env.clpipe("dicom", "flywheel_sync", "-c", config, "-engine", "native", "-submit", timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        assert dicoms(dropoff) == expected
        summaries = sorted((config.parent / "logs" / "sync_logs").glob("*.summary.json"), key=os.path.getmtime)
        final = json.loads(summaries[-1].read_text())
        # what landed before the signal is neither fetched nor written again
        # (a file renamed into place just before the signal, not yet journalled, is adopted: not fetched)
        assert final["created"] + final["updated"] == len(expected) - len(landed), final
        assert final["adopted"] <= len(landed), final
