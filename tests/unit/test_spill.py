"""Issue 15: what a run holds of a million files. Items kept on disk beyond a limit
(clpipe/spill.py), names decided without holding the listing (layout.StreamedNames, the
same names as layout.NameResolver), the manifest read through an index (sync/manifest.py)."""

from __future__ import annotations

import json
import os
import random
import unicodedata

import pytest

import clpipe.layout as layout
from clpipe.spill import SortedSpill, Spill
from clpipe.sync import manifest as manifest_module
from clpipe.sync.manifest import Record, SyncState, signature_text

from helpers import PlainFiles, landed_files, manifest_with, run_engine


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_spill_gives_its_items_back_in_order_as_often_as_asked(tmp_path):
    items = [(i, f"k{i}", float(i) / 3, None if i % 2 else b"x" * i, i % 3 == 0) for i in range(1000)]
    fds = open_fds()
    with Spill(tmp_path, hold=64) as spill:
        for item in items:
            spill.append(item)
        assert spill.on_disk and len(spill) == 1000
        assert list(spill) == items and list(spill) == items
        assert os.listdir(tmp_path) == []  # the file has no name: nothing is left behind, however the run ends
    assert open_fds() == fds
    with Spill(tmp_path, hold=5000) as small:  # under the limit: nothing touches the disk
        for item in items:
            small.append(item)
        assert not small.on_disk and list(small) == items


def test_a_sorted_spill_merges_its_runs():
    rng = random.Random(3)
    words = [f"{rng.randrange(10**6):06d}/{rng.choice('abc')}" for _ in range(10_000)] + ["dup"] * 3
    spill = SortedSpill(hold=700)
    for word in words:
        spill.append(word)
    assert spill.on_disk
    assert list(spill) == sorted(words) and list(spill) == sorted(words)  # twice (the reports count, then write)
    spill.close()


def streamed(items):
    """StreamedNames over ``items`` (folders, key, wanted, unchanged, is_folder), as the
    Flywheel source uses it: note, find the clashes, add those, resolve, final."""
    resolver = layout.StreamedNames()
    placed = [(resolver.folder(folders), key, wanted, unchanged, is_folder) for folders, key, wanted, unchanged, is_folder in items]
    for folder, _, wanted, _, _ in placed:
        resolver.note(folder, wanted)
    resolver.find_clashes()
    for folder, key, wanted, unchanged, is_folder in placed:
        if resolver.clashes(folder, wanted):
            resolver.add(folder, key, wanted, unchanged, is_folder)
    resolver.resolve()
    out = {}
    for folder, key, wanted, unchanged, _ in placed:
        final = resolver.final(folder, key, wanted, unchanged)
        if final is not None:
            assert key not in out
            out[key] = final
    return out


def resolved(items):
    resolver = layout.NameResolver()
    placed = []
    for folders, key, wanted, unchanged, is_folder in items:
        folder = resolver.folder(folders)
        if resolver.add(folder, key, wanted, unchanged, is_folder):
            placed.append((folder, key))
    resolver.resolve()
    return {key: resolver.path(folder, key) for folder, key in placed}


@pytest.mark.parametrize("seed", range(12))
def test_streamed_names_are_the_names_the_resolver_gives(seed, monkeypatch):
    """Random listings full of collisions (case, portable forms, a folder and a file on one
    name, a suffix that meets a plain name, a file listed twice): the same path and the same
    'renamed' for every file, whichever way the names are decided (the names' hashes held,
    or sorted on disk in runs of 7)."""
    from clpipe import spill

    if seed % 2:
        monkeypatch.setattr(spill, "HOLD", 7)
    rng = random.Random(seed)
    labels = ["T1", "t1", " T1 ", "T1~" + layout.identity_suffix("c1")[1:], unicodedata.normalize("NFD", "Jé"), "Jé", "x"]
    names = ["a.dcm", "A.dcm", " a.dcm", "a~" + layout.identity_suffix("c0/a.dcm")[1:] + ".dcm", "b.dcm", "T1", "t1", "é.dcm"]
    items = []
    for n in range(rng.randrange(20, 200)):
        depth = rng.randrange(0, 3)
        folders = tuple((label, layout.portable_name(label)) for label in rng.sample(labels, depth))
        name = rng.choice(names)
        wanted = layout.portable_name(name)
        items.append((folders, f"c{rng.randrange(8)}/{name}#{n}", wanted, wanted == name, rng.random() < 0.2))
    items += [items[0], items[len(items) // 2]]  # listed twice
    rng.shuffle(items)
    expected = resolved(items)
    assert any(renamed for _, renamed in expected.values())  # the listing did collide
    assert streamed(items) == expected


def test_the_flywheel_listing_names_files_the_same_when_it_is_kept_on_disk(monkeypatch, tmp_path):
    """The hostile project of test_names (16 files whose names collide every way, one listed
    twice) through FlywheelSource.entries with the listing in memory and on disk."""
    from clpipe import spill
    from clpipe.sources.flywheel import FlywheelSource, credentials_from_api_key, parse_fw_url
    from clpipe.testing.fwserver import FlywheelTestServer

    from helpers import hostile_project

    project, _ = hostile_project()
    url = parse_fw_url("fw://lab/hostile/")
    with FlywheelTestServer(projects=[project], api_keys={"k"}) as server:
        source = FlywheelSource(credentials_from_api_key(server.login_key("k")))
        try:
            project_id = source.api.lookup_project(url)["_id"]

            def listing(folder):
                return [(e.key, e.path, e.renamed, e.size) for e in source.entries(project_id, url, {}, {}, spill_dir=folder)]

            held = listing(None)
            monkeypatch.setattr(spill, "HOLD", 3)
            kept = listing(tmp_path / "spill")
        finally:
            source.close()
    assert len(held) == 16 and sum(renamed for _, _, renamed, _ in held) == 11
    assert sorted(kept) == sorted(held)
    assert os.listdir(tmp_path / "spill") == []


def test_the_manifest_is_read_through_its_index(tmp_path, monkeypatch):
    """Records found by key from the file (also when every key has one hash), a later line
    of a key wins, a damaged line is as if never recorded, a forgotten key stays forgotten,
    and the manifest written again holds the same lines, sorted, as one written whole."""
    records = [Record(f"c{i % 7}/f{i}.dcm", [i, 1.5, f"sha1:{i:x}"], [[f"s/f{i}.dcm", i, ""]]) for i in range(300)]
    records.append(Record('c/na\u00efve "q".dcm', [10, 1.5, None], [["a/na\u00efve.dcm", 10, ""]]))
    manifest_with(tmp_path, records)
    path = tmp_path / ".clpipe-sync" / "manifest.jsonl"
    with path.open("a") as fh:
        fh.write('{"key":"c0/f0.dcm","sig":[0,2.5,"new"],"files":[["s/f0.dcm",0,""]]}\n')  # a later line of a key
        fh.write('{"key":"damaged","sig":[1,0,null],"files":[["d.dcm",1,"]]}\n')
        fh.write(json.dumps({"files": [["c.dcm", 3, ""]], "sig": [3, 0, None], "key": "other/c.dcm"}) + "\n")
    monkeypatch.setattr(manifest_module._Index, "_hash", staticmethod(lambda key: 7))  # every key collides
    state = SyncState(tmp_path, "r")
    state.acquire()
    state.load()
    assert state.get("c0/f0.dcm").signature == [0, 2.5, "new"]
    assert all(state.get(r.key) == r for r in records[1:])
    assert state.get("other/c.dcm") == Record("other/c.dcm", [3, 0, None], [["c.dcm", 3, ""]])
    assert state.get("damaged") is None and "damaged" not in state and state.get("nothing") is None
    one = records[5]
    assert state.unchanged_file(one.key, signature_text(one.signature), "s/f5.dcm", 5) is True
    assert not state.unchanged_file(one.key, signature_text([5, 1.5, "other"]), "s/f5.dcm", 5)
    assert state.unchanged_file("nothing", '[1,1.0,""]', "x", 1) is False
    state.forget(records[9].key)
    assert state.get(records[9].key) is None
    state.record(Record("new/x.dcm", [1, 0.5, ""], [["x.dcm", 1, ""]]))
    assert len(state) == len(records) + 1  # + other, + new, - forgotten
    state.save()
    state.release()
    lines = path.read_text().splitlines()[1:]
    assert lines.pop() == f'{{"clpipe_sync_manifest_end":{{"records":{len(records) + 1}}}}}'
    assert lines == sorted(lines) and len(lines) == len(records) + 1
    want = {json.dumps(r.to_json(), separators=(",", ":")) for r in records[1:] if r.key != records[9].key}
    assert want <= set(lines) and '{"key":"c0/f0.dcm","sig":[0,2.5,"new"],"files":[["s/f0.dcm",0,""]]}' in lines


def test_signature_text_is_the_records_json():
    for signature in (
        [1, 1.5, "sha1:ab"],
        [0, 0.0, ""],
        [3, 1700000000.123456, "x"],
        [1, 2, "a"],
        [1, 1.5, 'q"'],
        [1, 1.5, "é"],
        [1, 1.5, "", "v2"],
    ):
        assert signature_text(signature) == json.dumps(signature, separators=(",", ":"))


def test_a_hash_set_is_a_set():
    rng = random.Random(5)
    values = [rng.getrandbits(64) - (1 << 63) for _ in range(5000)] + [0, 1, -1, 1024, 2048]
    members = layout.HashSet()
    for value in values[::2]:
        members.add(value)
        members.add(value)
    assert len(members) == len(set(values[::2]))
    assert all(v in members for v in values[::2])
    assert not any(v in members for v in values[1::2] if v not in set(values[::2]) and (v or 1) not in {w or 1 for w in values[::2]})


def test_a_sorted_manifest_is_read_by_blocks(tmp_path, monkeypatch):
    """A manifest as this module writes it (sorted by key) is looked up by block: only each
    block's first key is held, blocks are parsed when looked at and the oldest forgotten;
    escaped keys, a damaged record and keys that fall between blocks all read right."""
    monkeypatch.setattr(manifest_module, "CACHE_BLOCK", 300)
    monkeypatch.setattr(manifest_module, "CACHE_BLOCKS", 2)
    records = [Record(f"c{i:03d}/f{i}.dcm", [i, 0.5, ""], [[f"p/f{i}.dcm", i, ""]]) for i in range(0, 400, 2)]
    records += [
        Record('c1/"quoted"\\.dcm', [1, 0.5, ""], [["q.dcm", 1, ""]]),
        Record("c2/na\u00efve.dcm", [2, 0.5, ""], [["n.dcm", 2, ""]]),
    ]
    manifest_with(tmp_path, records)
    state = SyncState(tmp_path, "r")
    state.acquire()
    state.load()
    assert isinstance(state._index, manifest_module._Blocks) and len(state._index._firsts) > 20
    order = records[:]
    random.Random(1).shuffle(order)
    assert all(state.get(r.key) == r for r in order)
    assert all(state.get(f"c{i:03d}/f{i}.dcm") is None for i in range(1, 400, 2))  # between two records
    assert state.get("a-before-all") is None and state.get("z-after-all") is None
    assert len(state._index._cache) <= 2
    assert sorted(state.keys()) == sorted(r.key for r in records)
    state.release()


def _blocks_read_whole(tmp_path, monkeypatch) -> tuple[list[int], list[str]]:
    with monkeypatch.context() as patch:
        patch.setattr(manifest_module, "_sampled_blocks", lambda handle: None)
        state = SyncState(tmp_path, "whole")
        state.load()
        index = state._index
        assert isinstance(index, manifest_module._Blocks)
        state.close_manifest()
    return index._starts, index._firsts


def test_a_manifest_written_whole_is_opened_by_reading_a_line_a_block(tmp_path, monkeypatch):
    """Issue 15: the no-op re-sync of a million files read every line of the manifest
    before its listing began (0.85 s). A manifest as save() writes it (its end line last)
    is opened by reading two lines a block at most (its first, and the one its end cuts),
    and finds the same blocks, with
    lines longer than a block among them; a line appended after the end line, or keys out
    of order, and the file is read whole as before."""
    monkeypatch.setattr(manifest_module, "CACHE_BLOCK", 300)
    records = [Record(f"c{i:03d}/f{i}.dcm", [i, 0.5, ""], [[f"p/f{i}.dcm", i, ""]]) for i in range(0, 400, 2)]
    records += [Record(f"c{i:03d}/long{i}.dcm", [i, 0.5, ""], [[f"p/{'y' * 700}{i}.dcm", i, ""]]) for i in range(1, 40, 4)]
    manifest_with(tmp_path, records)
    path = tmp_path / ".clpipe-sync" / "manifest.jsonl"
    read: list[int] = []
    line_at = manifest_module._line_at
    monkeypatch.setattr(manifest_module, "_line_at", lambda fd, start, end: read.append(start) or line_at(fd, start, end))
    state = SyncState(tmp_path, "r")
    state.load()
    index = state._index
    assert isinstance(index, manifest_module._Blocks) and len(index._starts) > 20
    # per block: its first line, and the line its end cuts (to find where the next starts)
    assert set(index._starts) <= set(read) and len(read) <= 2 * len(index._starts)
    assert (index._starts, index._firsts) == _blocks_read_whole(tmp_path, monkeypatch)
    assert all(state.get(r.key) == r for r in records) and state.get("c001/f1.dcm") is None
    state.close_manifest()

    text = path.read_text().split("\n")
    head, body, end = text[0], text[1:-2], text[-2]
    late = '{"key":"c000/late.dcm","sig":[1,0.5,""],"files":[["late.dcm",1,""]]}'
    sampled = manifest_module._sampled_blocks
    found: list = []
    monkeypatch.setattr(manifest_module, "_sampled_blocks", lambda handle: found.append(sampled(handle)) or found[-1])
    for lines in (body + [end, late], body[40:] + body[:40] + [end]):  # a line appended; keys out of order
        path.write_text("\n".join([head, *lines]) + "\n")
        state = SyncState(tmp_path, "r")
        state.load()
        assert found.pop() is None and isinstance(state._index, manifest_module._Index)  # read whole
        assert all(state.get(r.key) == r for r in records)
        assert (state.get("c000/late.dcm") is not None) == (late in lines)  # the appended line is read
        state.close_manifest()


def _entries(paths: dict[str, str], files: dict[str, bytes]):
    from clpipe.sources.base import RemoteEntry

    return [RemoteEntry(key, path, len(files[key]), 1.0, None, False) for key, path in paths.items()]


@pytest.mark.parametrize("unique_paths", [True, False], ids=["spilled-claims", "claims"])
def test_a_source_that_breaks_its_promise_of_unique_paths_merges_nothing(tmp_path, unique_paths, monkeypatch):
    """Three entries on one path, one inside another's file: with the claimed paths kept on
    disk (SpilledClaims, the guard built after the listing) they land on the same distinct
    paths as with the guard held in memory, and the next run finds each in place."""
    from clpipe import spill

    monkeypatch.setattr(spill, "HOLD", 2)  # the claimed paths go to disk
    files = {f"k{n}": f"content {n}".encode() * (n + 1) for n in range(5)}
    paths = {"k0": "s/a.dcm", "k1": "s/x.dcm", "k2": "s/x.dcm", "k3": "s/x.dcm/y.dcm", "k4": "s/b.dcm"}
    source = PlainFiles(files, unique_paths)
    dropoff = tmp_path / "dropoff"
    outcome = run_engine(source, dropoff, _entries(paths, files))
    assert (outcome.created, outcome.failed) == (5, 0), outcome.failures
    landed = landed_files(dropoff)
    assert sorted(landed.values()) == sorted(files.values())  # five files, none merged or lost
    assert landed["s/x.dcm"] == files["k1"]  # the first listed keeps the path
    assert landed["s/x" + layout.identity_suffix("k2") + ".dcm"] == files["k2"]
    assert landed["s/" + layout.fit_name("x.dcm", layout.identity_suffix("k3"), True) + "/y.dcm"] == files["k3"]
    again = run_engine(source, dropoff, _entries(paths, files), "run2")
    assert (again.created, again.updated, again.skipped, again.failed) == (0, 0, 5, 0), again.failures
    assert sorted(source.opened) == sorted(files)  # none fetched twice
    assert landed_files(dropoff) == landed


def test_a_no_op_of_a_source_with_unique_paths_builds_no_guard(tmp_path, monkeypatch):
    """Every entry in place: the claimed paths were only spilled, never held (the guard is
    built for entries to fetch, or when --delete asks whether a path is taken)."""
    from clpipe import spill
    from clpipe.sync.engine import Engine, Options
    from clpipe.sync.manifest import SyncState

    monkeypatch.setattr(spill, "HOLD", 2)
    files = {f"k{n}": b"x" * n for n in range(1, 7)}
    paths = {key: f"s{n % 2}/f{n}.dcm" for n, key in enumerate(files)}
    source = PlainFiles(files, True)
    dropoff = tmp_path / "dropoff"
    assert run_engine(source, dropoff, _entries(paths, files)).created == 6
    state = SyncState(dropoff, "run2")
    state.acquire()
    try:
        state.load()
        engine = Engine(source, state, Options(dropoff=dropoff, zip_tmp=tmp_path / "z"))
        outcome = engine.run(_entries(paths, files))
        assert outcome.skipped == 6 and isinstance(engine._claims, layout.SpilledClaims)
        assert engine._claims._claims is None  # never built
        assert engine._claims.taken("s0/f0.dcm") and engine._claims.taken("s1") and not engine._claims.taken("s0/f9.dcm")
    finally:
        state.release()
    # a file gone from the listing is deleted (--delete asks the guard), the others stay
    del paths["k6"]
    outcome = run_engine(source, dropoff, _entries(paths, files), "run3", delete=True)
    assert outcome.deleted == 1 and sorted(landed_files(dropoff)) == sorted(paths.values())


def test_the_hash_index_grows_and_finds_every_record(tmp_path):
    """An index sized for one line, given 3,000 (as a manifest longer than counted): it
    doubles its slots as it fills, moving every member, and finds each record after."""
    path = tmp_path / "manifest.jsonl"
    keys = [f"c{i % 13}/f{i}.dcm" for i in range(3000)]
    with path.open("wb") as out:
        where = []
        for i, key in enumerate(keys):
            line = (manifest_module._line(key, f'{{"sig":[{i},0.5,""],"files":[["p/{i}.dcm",{i},""]]}}') + "\n").encode()
            where.append((key, out.tell(), len(line)))
            out.write(line)
    with path.open("rb") as handle:
        index = manifest_module._Index(handle, 1)
        for key, offset, length in where:
            index.add(key, offset, length)
        assert index.count == len(keys) and index._mask + 1 >= len(keys) / index.LOAD
        assert all(json.loads(index.get(key))["sig"][0] == i for i, key in enumerate(keys))
        assert index.get("c0/none.dcm") is None
