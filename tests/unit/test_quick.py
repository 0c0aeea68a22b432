"""The folder source's stamp (clpipe/sync/quick.py): a run that finds the tree and the
dropoff as the last complete run left them replays its report; any change the engine
would act on, and any doubt (a damaged stamp, a journal, a lock), means listing again."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from clpipe import layout
from clpipe.sources.localdir import FolderStats, walk_files
from clpipe.sync import manifest, quick
from clpipe.testing.dicomdata import make_file_tree

KEY = quick.key("file:///tree", {"subject": ["01"]}, "{subject}/{series}", "test")
PAYLOAD = {"skipped": 3, "notes": ["a note"]}


class Dropoff:
    """A source tree, a dropoff with three files and a manifest, and a stamp of them."""

    def __init__(self, tmp: Path) -> None:
        self.tree, self.dropoff = tmp / "tree", tmp / "dropoff"
        self.state = self.dropoff / ".clpipe-sync"
        for rel in ("a/1.dcm", "a/2.dcm", "b/c/3.dcm", "top.dcm", ".hidden"):
            path = self.tree / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rel.encode() * 10)
        self.files = {"S1/one.dcm": 10, "S1/two.dcm": 20, "S2/three.dcm": 30}
        for rel, size in self.files.items():
            path = self.dropoff / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * size)
        self.state.mkdir(parents=True)
        (self.state / manifest.MANIFEST).write_text("{}\n")

    def stamp(self, key: str = KEY) -> bool:
        """Check (finding no stamp or a stale one) and write the stamp from that walk."""
        snapshot = quick.Snapshot(str(self.state), key)
        quick.check(str(self.state), key, str(self.tree), str(self.dropoff), locked=True, snapshot=snapshot)
        return snapshot.finish(iter(sorted(self.files.items())), PAYLOAD)

    def check(self, locked: bool = True, key: str = KEY):
        return quick.check(str(self.state), key, str(self.tree), str(self.dropoff), locked=locked)


@pytest.fixture
def old_files(monkeypatch):
    """The test's files were written a moment ago; they count as old enough to be trusted."""
    monkeypatch.setattr(quick, "RACY_NS", 0)


@pytest.fixture
def made(tmp_path, old_files) -> Dropoff:
    d = Dropoff(tmp_path)
    assert d.stamp()
    return d


def test_nothing_changed_replays_the_report(made):
    assert made.check(locked=True) == PAYLOAD
    assert made.check(locked=False) == PAYLOAD
    paths: list[str] = []
    assert quick.check(str(made.state), KEY, str(made.tree), str(made.dropoff), locked=True, paths=paths) == PAYLOAD
    assert paths == sorted(made.files)  # the audit's rows of the replayed run
    assert not [p for p in made.state.iterdir() if ".new." in p.name]  # the snapshot became the stamp


def _append(d: Dropoff) -> None:
    with open(d.tree / "a/1.dcm", "ab") as out:
        out.write(b"!")


def _same_size_later(d: Dropoff) -> None:
    path = d.tree / "a/2.dcm"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def _replaced(d: Dropoff) -> None:  # same size and time, another file (inode, change time)
    path = d.tree / "top.dcm"
    st = path.stat()
    other = d.tree / "other"
    other.write_bytes(path.read_bytes())
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, path)


CHANGES = {
    "a file grew": _append,
    "a file's time changed, same size": _same_size_later,
    "a file replaced by one of the same size and time": _replaced,
    "a file added": lambda d: (d.tree / "b/new.dcm").write_bytes(b"new"),
    "a file added in a new folder": lambda d: (d.tree / "z/y").mkdir(parents=True) or (d.tree / "z/y/new.dcm").write_bytes(b"n"),
    "a file removed": lambda d: (d.tree / "b/c/3.dcm").unlink(),
    "a file renamed": lambda d: (d.tree / "a/1.dcm").rename(d.tree / "a/1b.dcm"),
    "a link to a folder added": lambda d: (d.tree / "link").symlink_to(d.tree / "b"),
    "a broken link added": lambda d: (d.tree / "broken").symlink_to(d.tree / "nowhere"),
    "a folder became a dropoff": lambda d: (d.tree / "b/c/.clpipe-sync").mkdir(),
    "a dropoff file removed": lambda d: (d.dropoff / "S1/two.dcm").unlink(),
    "a dropoff file truncated": lambda d: (d.dropoff / "S2/three.dcm").write_bytes(b"x"),
    "the manifest rewritten": lambda d: (d.state / manifest.MANIFEST).write_text("{}\n{}\n"),
    "the manifest gone": lambda d: (d.state / manifest.MANIFEST).unlink(),
    "a journal waiting": lambda d: (d.state / "journal-run.jsonl").write_text("{}\n"),
    "a shard task's folder": lambda d: (d.state / "shard-0").mkdir(),
    "the tree gone": lambda d: shutil.rmtree(d.tree),
    "the stamp cut short": lambda d: os.truncate(d.state / quick.STAMP, (d.state / quick.STAMP).stat().st_size - 5),
    "the stamp emptied": lambda d: (d.state / quick.STAMP).write_bytes(b""),
    "the stamp overwritten": lambda d: (d.state / quick.STAMP).write_bytes(os.urandom(300)),
    "the stamp removed": lambda d: quick.forget(str(d.state)),
}


@pytest.mark.parametrize("change", CHANGES)
def test_any_change_means_listing_again(made, change):
    CHANGES[change](made)
    assert made.check(locked=True) is None
    assert made.check(locked=False) is None


def test_what_the_source_does_not_sync_changes_nothing(made):
    (made.tree / ".DS_Store").write_bytes(b"finder")  # hidden: the folder source skips it
    (made.tree / "a/._1.dcm").write_bytes(b"appledouble")
    (made.dropoff / "S1/extra.txt").write_text("a file the user put there")  # not the run's: a no-op leaves it
    assert made.check() == PAYLOAD


def test_another_key_is_another_run(made):
    other = quick.key("file:///tree", {"subject": ["02"]}, "{subject}/{series}", "test")
    assert made.check(key=other) is None
    assert quick.key("file:///tree", {"subject": ["01"]}, "{subject}/{series}", "other version") != KEY


def test_without_the_lock_a_run_holding_it_means_no_answer(made):
    (made.state / quick.LOCK).mkdir()
    assert made.check(locked=False) is None
    assert made.check(locked=True) == PAYLOAD  # the caller holds it


def test_a_snapshot_fed_past_a_difference_makes_the_next_stamp(made):
    _append(made)
    snapshot = quick.Snapshot(str(made.state), KEY)
    assert quick.check(str(made.state), KEY, str(made.tree), str(made.dropoff), locked=True, snapshot=snapshot) is None
    assert snapshot.files == 4  # the whole tree, not only up to the difference
    assert snapshot.finish(iter(sorted(made.files.items())), PAYLOAD)
    assert made.check() == PAYLOAD


def test_a_tree_changed_a_moment_ago_is_not_stamped(tmp_path):
    d = Dropoff(tmp_path)  # written now: within RACY_NS of the walk
    assert not d.stamp()
    assert not (d.state / quick.STAMP).exists()
    assert not [p for p in d.state.iterdir() if ".new." in p.name]


def test_an_unreadable_tree_is_not_stamped(tmp_path, old_files, monkeypatch):
    d = Dropoff(tmp_path)
    real = os.scandir

    def failing(path):
        if path != str(d.state) and not isinstance(path, str):  # the tree's folders are read by handle
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(quick.os, "scandir", failing)
    assert not d.stamp()
    assert not (d.state / quick.STAMP).exists()


def test_a_killed_run_s_snapshot_is_removed_by_the_next(made):
    left = made.state / f"{quick.STAMP}.new.999999"
    left.write_bytes(b"half")
    quick.Snapshot(str(made.state), KEY).discard()
    assert not left.exists()


def test_the_walk_finds_the_files_the_folder_source_lists(tmp_path, old_files):
    root = tmp_path / "export"
    make_file_tree(root)
    (root / "linked").symlink_to(root / "duplicates")
    (root / "inner dropoff" / ".clpipe-sync").mkdir(parents=True)
    (root / "inner dropoff" / "x.dcm").write_bytes(b"x")
    stats = FolderStats()
    listed = {p[len(str(root)) + 1 :] for p in walk_files(str(root), stats)} | {
        p[len(str(root)) + 1 :] for p in stats.not_dicom if p.startswith(str(root))
    }
    walked = list(quick.walk(str(root)))
    assert {item[0] for item in walked if len(item) == 5} == listed
    assert ("linked", quick.LINKED) in walked and ("inner dropoff", quick.DROPOFF) in walked
    assert walked == list(quick.walk(str(root) + "/"))  # the same, whatever the root's spelling


def test_the_constants_agree_with_their_homes():
    assert quick.STATE_DIR == layout.STATE_DIR
    assert quick.LOCK == manifest.LOCK
    assert quick.MANIFEST == manifest.MANIFEST


def test_the_check_imports_nothing_heavy():
    import subprocess
    import sys

    code = "import sys; import clpipe.sync.quick; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout.split())
    assert not loaded & {"re", "json", "typing", "pathlib", "dataclasses", "clpipe.sync.engine", "clpipe.sync.manifest"}


def test_a_stamp_is_written_in_time_order(made):
    """A later stamp replaces the file (a new inode): a check that read the old one meanwhile sees it."""
    before = (made.state / quick.STAMP).stat().st_ino
    time.sleep(0.01)
    assert made.stamp()
    assert (made.state / quick.STAMP).stat().st_ino != before


def test_names_no_text_format_could_hold(tmp_path, old_files):
    """Newlines, tabs and bytes that are not UTF-8 in the tree's names: kept exactly, and
    a change to such a file is seen."""
    d = Dropoff(tmp_path)
    odd = os.fsencode(d.tree) + b"/line\nbreak\tand \xff byte.dcm"
    with open(odd, "wb") as out:
        out.write(b"odd")
    assert d.stamp()
    assert d.check() == PAYLOAD
    with open(odd, "ab") as out:
        out.write(b"!")
    assert d.check() is None
