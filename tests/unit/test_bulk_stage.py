"""sync/bulk.py's staging of tar members, and the engine's placing of a file, without a
server: tars made here, served from memory by a stand-in for a HasBulk source."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import tarfile
import threading
import time

import pytest

from clpipe.sources.base import BulkBatch, RemoteEntry
from clpipe.sync import bulk
from clpipe.sync.engine import _place


def _tar(prefix: str, members: int, size: int) -> tuple[bytes, dict[str, bytes]]:
    contents = {f"{prefix}/f{i}.dcm": hashlib.sha256(f"{prefix}{i}".encode()).digest() * (size // 32) for i in range(members)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as archive:
        for name, data in contents.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buf.getvalue(), contents


class _Tars:
    """A HasBulk source whose batches are tars in memory, sent in pieces of ``piece`` bytes."""

    def __init__(self, tars: int, members: int, size: int = 512, piece: int = 4096):
        self.tars = [_tar(f"g/p/s{k}/a", members, size) for k in range(tars)]
        self.piece = piece

    def bulk_batches(self, entries) -> list:
        return [
            BulkBatch(
                {
                    name: RemoteEntry(key=f"c{k}/{name}", path=name, size=len(data), modified=0.0, checksum=None, unpack=False)
                    for name, data in contents.items()
                },
                [k],
            )
            for k, (_, contents) in enumerate(self.tars)
        ]

    @contextlib.contextmanager
    def open_bulk(self, batch):
        raw = self.tars[batch.ref[0]][0]
        yield (raw[i : i + self.piece] for i in range(0, len(raw), self.piece))


class _Progress:
    def advance(self, nbytes: int, files: int = 0) -> None:
        pass


def _stage(source: _Tars, tmp) -> bulk.Staged:
    return bulk.stage(source, [], tmp, _Progress(), len(source.tars), threading.Event(), lambda entry: None)


def _check(staged: bulk.Staged, source: _Tars) -> None:
    """Every member staged once, with its own bytes."""
    for k, (_, contents) in enumerate(source.tars):
        for name, data in contents.items():
            part, _ = staged.part(staged.parts[f"c{k}/{name}"])
            with open(part, "rb") as f:
                assert f.read() == data, name
    assert len(staged.parts) == sum(len(contents) for _, contents in source.tars)
    assert not staged.problems and not staged.rejected


def test_the_tar_reader_gives_the_stream_back_for_any_pieces_and_reads():
    rng = random.Random(7)
    data = bytes(rng.randrange(256) for _ in range(50_000))
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randrange(0, 40)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        turn = threading.Lock()
        turn.acquire()  # (read by the turn's holder, as in stage)
        reader = bulk._Reader(iter(pieces), turn)
        out = []
        while True:
            size = rng.choice([-1, 0, 1, 7, 512, 10240, 70_000]) if rng.random() < 0.1 else rng.randrange(1, 12_000)
            got = reader.read(size)
            if size == 0:
                assert got == b""
                continue
            out.append(got)
            if size < 0 or len(got) < size:
                break
            assert len(got) == size
        assert b"".join(out) == data
        assert reader.read(10) == b""


def _concurrency(monkeypatch, delay: float) -> list[int]:
    """Patch the member writes to take ``delay`` seconds each and count how many run at
    once; returns [the most at once]."""
    lock, now, most = threading.Lock(), [0], [0]
    write = bulk.write_all

    def counted(fd: int, data: bytes) -> None:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        try:
            time.sleep(delay)  # (gives the GIL up, as a slow file system does)
            write(fd, data)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(bulk, "write_all", counted)
    return most


@pytest.mark.parametrize(
    ("slow_io", "delay", "one_at_a_time"),
    [
        # every file-system call counts as fast: the tars take turns (before the turn, four
        # threads wrote at once, and each of their system calls handed the GIL on)
        (1e9, 0.002, True),
        # every call counts as slow (a network file system): the writes overlap
        (0.0, 0.005, False),
    ],
    ids=["fast-file-system", "slow-file-system"],
)
def test_tar_members_are_written_one_tar_at_a_time_unless_the_file_system_is_slow(tmp_path, monkeypatch, slow_io, delay, one_at_a_time):
    monkeypatch.setattr(bulk, "SLOW_IO", slow_io)
    most = _concurrency(monkeypatch, delay)
    source = _Tars(tars=4, members=25)
    staged = _stage(source, tmp_path)
    _check(staged, source)
    assert (most[0] == 1) if one_at_a_time else (most[0] > 1)


def test_large_members_in_small_pieces_are_staged_whole(tmp_path):
    source = _Tars(tars=3, members=4, size=300_000, piece=1000)
    _check(_stage(source, tmp_path), source)


def test_a_tar_that_breaks_off_leaves_the_turn_to_the_others(tmp_path):
    source = _Tars(tars=3, members=20)
    raw, contents = source.tars[1]
    source.tars[1] = (raw[: len(raw) // 2 + 700], contents)  # cut in the middle of a member's bytes
    staged = _stage(source, tmp_path)
    cut = [name for name in contents if f"c1/{name}" not in staged.parts]
    assert 0 < len(cut) < len(contents)  # what came before the cut is kept; the rest is left to single downloads
    assert staged.problems or staged.rejected
    for k in (0, 2):  # the other tars, before and after it in turn, are whole
        assert all(f"c{k}/{name}" in staged.parts for name in source.tars[k][1])


def test_placing_a_file_makes_its_folders_only_when_missing(tmp_path, monkeypatch):
    made = []
    mkdir = type(tmp_path).mkdir

    def counting(self, *args, **kwargs):
        made.append(self)
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "mkdir", counting)
    after = []
    for i in range(20):
        part = tmp_path / f"{i}.part"
        part.write_bytes(b"x" * i)
        _place(part, tmp_path / "dropoff" / "sub" / f"{i}.dcm")
        after.append(len(made))
    assert set(made) == {tmp_path / "dropoff", tmp_path / "dropoff" / "sub"}
    assert after == [after[0]] * 20  # all for the first file; before, a mkdir (and a stat) for each
    assert sorted(p.name for p in (tmp_path / "dropoff" / "sub").iterdir()) == sorted(f"{i}.dcm" for i in range(20))
    assert (tmp_path / "dropoff" / "sub" / "7.dcm").read_bytes() == b"x" * 7


def test_placing_a_file_under_a_file_or_from_a_missing_part_fails(tmp_path):
    (tmp_path / "taken").write_text("a file where a folder should be")
    part = tmp_path / "a.part"
    part.write_bytes(b"x")
    with pytest.raises(FileExistsError):
        _place(part, tmp_path / "taken" / "a.dcm")
    assert part.exists()
    with pytest.raises(FileNotFoundError):
        _place(tmp_path / "gone.part", tmp_path / "new" / "a.dcm")
    assert not os.path.lexists(tmp_path / "new" / "a.dcm")


def test_cheap_items_run_in_the_callers_thread_and_the_rest_in_the_pool():
    from concurrent.futures import ThreadPoolExecutor

    from clpipe.sync.engine import _bounded

    me = threading.get_ident()
    ran: dict[str, int] = {}

    def work(entry: str, progress) -> str:
        ran[entry] = threading.get_ident()
        if entry.endswith("bad"):
            raise OSError(f"{entry} failed")
        return entry.upper()

    items = [(f"{'staged' if i % 2 else 'remote'}-{i}{'-bad' if i % 5 == 0 else ''}", None) for i in range(40)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(_bounded(pool, work, iter(items), _Progress(), 4, threading.Event(), inline=lambda e: e.startswith("staged")))
    assert sorted(item for _, item in results) == sorted(items)  # each once
    for future, (entry, _) in results:
        assert (ran[entry] == me) == entry.startswith("staged")
        if entry.endswith("bad"):
            assert isinstance(future.exception(), OSError)  # reported by the caller, as from the pool
        else:
            assert future.result() == entry.upper()
