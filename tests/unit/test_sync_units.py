"""The engine's building blocks: path safety, labels, templates, manifest/journal/lock."""

from __future__ import annotations

import json
import os

import pytest

from clpipe.errors import PreflightError
from clpipe.layout import (
    bids_label,
    check_template,
    dicom_format_string,
    field_values,
    flatten_members,
    inside,
    portable_name,
    template_parts,
)
from clpipe.sources.flywheel import packed_hash, parse_hash, unpacked_hash
from clpipe.sync.manifest import Record, SyncState


@pytest.mark.parametrize(
    "text, safe", [("..", "_"), (".", "_"), ("", "_"), ("a/b", "a_b"), ("a\x00b\x1f", "a_b"), (" x ", "x"), ("ok.dcm", "ok.dcm")]
)
def test_portable_name(text, safe):
    assert portable_name(text) == safe


def test_no_name_leaves_the_dropoff(tmp_path):
    for hostile in ("..", ".", "../../etc/passwd", "/etc/passwd", "..\\..\\win", "x/\x1b[31m/y"):
        name = portable_name(hostile)
        assert name not in (".", "..") and "/" not in name and "\\" not in name
        assert inside(tmp_path, name).parent == tmp_path
    for escape in ("../x", "/etc/passwd", "a/../b", "a//b"):
        with pytest.raises(ValueError):
            inside(tmp_path, escape)


def test_bids_labels_and_templates():
    assert bids_label("sub-01", "subject") == "01"
    assert bids_label("Pilot 3_b", "subject") == "Pilot3b"
    assert bids_label("ses-Baseline", "session") == "Baseline"
    assert bids_label("***", "subject") == "unknown"
    labels = {"subject": "sub-01", "session": "ses 2", "acquisition": "T1w/../x", "filename": "a.dcm"}
    parts = template_parts("{subject}/{session}/{acquisition}/{filename}", *field_values(labels))
    assert "/".join(name for _, name in parts) == "01/ses2/T1w_.._x/a.dcm"
    assert dicom_format_string("{subject}/{session}/{acquisition}") == "{subject}/{session}/"
    assert dicom_format_string("raw/{subject}/{acquisition}") == "raw/{subject}/"
    for bad in ("{subjct}/{session}", "/abs/{subject}", "../{subject}", "{subject!r}"):
        with pytest.raises(ValueError):
            check_template(bad)


def test_flatten_members_never_overwrites():
    names = flatten_members(["c/IM1.dcm", "a/IM1.dcm", "b/IM1.dcm", "IM2.dcm", "../../x.dcm"])
    # the smallest path keeps the name; the others get ~ and hex digits of their path (tests/integration/test_names.py)
    assert names == {
        "a/IM1.dcm": "IM1.dcm",
        "b/IM1.dcm": "IM1~c56d7c.dcm",
        "c/IM1.dcm": "IM1~c782e6.dcm",
        "IM2.dcm": "IM2.dcm",
        "../../x.dcm": "x.dcm",
    }


def test_hash_forms():
    hexd = "ab" * 48
    assert parse_hash(f"v0-sha384-{hexd}") == f"sha384:{hexd}"
    assert parse_hash(hexd) == f"sha384:{hexd}"
    assert parse_hash("md5:123") is None and parse_hash(None) is None
    assert parse_hash(f"v0-sha256-{'cd' * 32}") == f"sha256:{'cd' * 32}"


def test_a_hash_of_the_wrong_length_or_an_unknown_algorithm_is_no_hash_not_a_mismatch():
    """A digest that cannot be what its algorithm gives would fail every download's check
    for ever: it counts as no hash (size only), as any other form parse_hash does not know."""
    assert parse_hash("v0-sha384-abc") is None  # 3 digits, not 96
    assert parse_hash(f"v0-sha384-{'ab' * 32}") is None  # a sha256's length
    assert parse_hash(f"v0-sha999-{'ab' * 48}") is None  # no such algorithm


def test_a_packed_hash_gives_back_the_parsed_text():
    for value in (f"v0-sha384-{'0a' * 48}", "3a" * 48, f"v0-sha256-{'3a' * 32}", f"v0-sha1-{'ff' * 20}", "md5:1", None, 7):
        assert unpacked_hash(packed_hash(value)) == parse_hash(value)
    assert len(packed_hash("ab" * 48) or b"") == len(b"sha384:") + 48  # the raw digest, not its hex


def test_journal_survives_a_torn_line_and_is_folded_into_the_manifest(tmp_path):
    state = SyncState(tmp_path, "run1")
    state.acquire()
    state.load()
    state.record(Record("c/a.dcm", [10, 1.0, ""], [["x/a.dcm", 10, ""]]))
    state.record(Record("c/b.dcm", [20, 1.0, ""], [["x/b.dcm", 20, ""]]))
    journal = tmp_path / ".clpipe-sync" / "journal-run1.jsonl"
    with open(journal, "a") as fh:
        fh.write('{"key": "c/torn", "sig": [1')  # a kill in the middle of a line
    # a later run (the first one was killed: its lock holder is gone)
    (tmp_path / ".clpipe-sync" / "lock" / "owner.json").write_text(json.dumps({"host": os.uname().nodename, "pid": 999999999}))
    again = SyncState(tmp_path, "run2")
    again.acquire()
    again.load()
    assert set(again.keys()) == {"c/a.dcm", "c/b.dcm"} and again.get("c/b.dcm").files == [["x/b.dcm", 20, ""]]
    again.save()
    again.release()
    assert not list((tmp_path / ".clpipe-sync").glob("journal-*"))
    lines = (tmp_path / ".clpipe-sync" / "manifest.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"clpipe_sync_manifest": 2}
    assert json.loads(lines[-1]) == {"clpipe_sync_manifest_end": {"records": 2}}  # written whole, in key order
    assert {json.loads(line)["key"] for line in lines[1:-1]} == {"c/a.dcm", "c/b.dcm"}


def test_a_live_lock_stops_a_second_writer(tmp_path):
    first = SyncState(tmp_path, "a")
    first.acquire()
    with pytest.raises(PreflightError, match="another sync is writing to"):
        SyncState(tmp_path, "b").acquire()
    first.release()
    SyncState(tmp_path, "c").acquire()


def test_manifest_holds_each_key_once_and_writes_the_same_lines(tmp_path):
    """Issue 15: a million records must not hold each key twice (as the dict's key and in
    its JSON line); the manifest's lines stay byte for byte what they were, and a line
    whose members come in another order is still read."""
    import tracemalloc

    state = SyncState(tmp_path, "r1")
    state.acquire()
    state.load()
    records = [
        Record(f"{i:024x}/{'x' * 80}-{i}.dcm", [1400, 1700000000.5, None], [[f"sub/ses/acq/{'y' * 40}-{i}.dcm", 1400, ""]])
        for i in range(3000)
    ]
    records.append(Record('cid/na\u00efve "q".dcm', [10, 1.5, "sha256:ab"], [["a/b/na\u00efve.dcm", 10, ""]]))
    for record in records:
        state.record(record)
    state.save()
    state.release()
    manifest = tmp_path / ".clpipe-sync" / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    assert lines[1:-1] == sorted(json.dumps(r.to_json(), separators=(",", ":")) for r in records)
    with manifest.open("a") as fh:  # another writer's member order; a line damaged inside that ends as a whole one
        fh.write(json.dumps({"files": [["c.dcm", 3, ""]], "sig": [3, 0, None], "key": "other/c.dcm"}) + "\n")
        fh.write('{"key":"damaged","sig":[1,0,null],"files":[["d.dcm",1,"]]}\n')

    tracemalloc.start()
    try:
        again = SyncState(tmp_path, "r2")
        again.load()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert again.get("other/c.dcm") == Record("other/c.dcm", [3, 0, None], [["c.dcm", 3, ""]])
    assert again.get("damaged") is None and "damaged" not in again  # as if never recorded: its file is checked again
    assert all(again.get(r.key) == r for r in records)
    line = len(lines[1])  # ~230 characters, ~110 of them the key
    assert held / len(records) < line + 200, f"{held / len(records):.0f} bytes held per record of {line} characters"


def audit_rows(outcome, tmp_path) -> tuple[list[list[str]], int]:
    """The audit CSV's rows that write_reports writes for ``outcome`` (without the
    header), and the most memory it held meanwhile."""
    import csv
    import tracemalloc

    from clpipe.sync.reports import write_reports

    tracemalloc.start()
    try:
        write_reports(outcome, tmp_path / "audit.csv", tmp_path / "summary.json", {})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    with open(tmp_path / "audit.csv", newline="") as fh:
        return list(csv.reader(fh))[1:], peak


def test_audit_csv_holds_only_the_paths_of_unchanged_files(tmp_path):
    """Issue 15: the audit CSV of a no-op re-sync lists every unchanged file, in path order
    with the other rows, without a row or a path per file in memory: beyond ``hold`` paths
    they are sorted on disk (clpipe/spill.py) and merged as the CSV is written."""

    from clpipe.spill import SortedSpill
    from clpipe.sync.reports import FileResult, Outcome

    outcome = Outcome(
        files=[FileResult("b/2.dcm", "completed", False, "Created file on destination"), FileResult("z.dcm", "failed", True, "", "boom")],
        unchanged=SortedSpill(tmp_path / "spill", hold=5000),
    )
    count = 20000
    for i in range(count):
        outcome.unchanged.append(f"sub-01/ses-01/acq-{i % 50}/{'x' * 30}{i}.dcm")
    outcome.unchanged.append("a.dcm")
    rows, peak = audit_rows(outcome, tmp_path)
    paths = [row[1] for row in rows]
    assert paths == sorted(paths) and len(rows) == count + 3
    assert paths[0] == "a.dcm" and rows[0][2:] == ["skipped", "True", "", ""]
    assert rows[1][1:] == ["b/2.dcm", "completed", "False", "", "Created file on destination"]
    assert rows[-1][1:] == ["z.dcm", "failed", "True", "boom", ""]
    assert outcome.unchanged.on_disk and len(outcome.unchanged) == count + 1
    assert peak / count < 40, f"{peak / count:.0f} bytes per unchanged file while writing the reports"


@pytest.mark.parametrize("kind", ["unchanged", "created_paths"])
def test_audit_rows_all_alike_are_written_a_block_at_a_time_as_csv_writes_them(tmp_path, kind):
    """Issue 15: a no-op re-sync of a million files writes a million audit rows that differ
    only in their path; they are made a block of paths at a time, each block by one join.
    The file is byte for byte what csv writes row by row, also for blocks holding a path
    that must be quoted (a comma, a quote, a line break)."""
    import csv
    import io

    from clpipe.spill import SortedSpill
    from clpipe.sync.reports import Outcome, write_reports

    paths = [f"sub-01/ses-01/acq-{i % 7}/IM{i:05d}.dcm" for i in range(9000)]
    paths += ["sub-01/a,b.dcm", 'sub-01/q"uote.dcm', "sub-01/line\nbreak.dcm", "sub-01/cr\rx.dcm"]
    outcome = Outcome(**{kind: SortedSpill(tmp_path / "spill", hold=2000)})
    for path in paths:
        getattr(outcome, kind).append(path)
    write_reports(outcome, tmp_path / "audit.csv", tmp_path / "summary.json", {})
    status, existing, action = ("skipped", True, "") if kind == "unchanged" else ("completed", False, "Created file on destination")
    want = io.StringIO(newline="")
    writer = csv.writer(want)
    writer.writerow(["src_path", "dest_path", "status", "existing", "error_message", "action_taken"])
    writer.writerows([path, path, status, str(existing), "", action] for path in sorted(paths))
    assert (tmp_path / "audit.csv").read_bytes() == want.getvalue().encode()


def test_audit_csv_holds_only_the_paths_of_the_files_a_run_wrote(tmp_path):
    """The files a full sync wrote (new or replaced) are kept as their paths only, sorted on
    disk beyond ``hold`` (a full sync of a million files holds no row per file), and
    written in path order with every other row, each with its action."""

    from clpipe.spill import SortedSpill
    from clpipe.sync.reports import FileResult, Outcome

    outcome = Outcome(
        files=[FileResult("m.dcm", "failed", False, "", "boom"), FileResult("c,d.dcm", "skipped", True, "adopted: already intact")],
        unchanged=SortedSpill(tmp_path / "spill", hold=5000),
        created_paths=SortedSpill(tmp_path / "spill", hold=5000),
        updated_paths=SortedSpill(tmp_path / "spill", hold=5000),
    )
    count = 20000
    for i in range(count):
        outcome.created_paths.append(f"sub-01/ses-01/acq-{i % 50}/{'x' * 30}{i}.dcm")
    outcome.updated_paths.append("b,1.dcm")  # a comma: quoted as csv quotes it
    outcome.updated_paths.append("n.dcm")
    outcome.unchanged.append("a.dcm")
    rows, peak = audit_rows(outcome, tmp_path)
    paths = [row[1] for row in rows]
    assert paths == sorted(paths) and len(rows) == count + 5
    by_path = {row[1]: row for row in rows}
    assert by_path["a.dcm"][2:] == ["skipped", "True", "", ""]
    assert by_path["b,1.dcm"] == ["b,1.dcm", "b,1.dcm", "completed", "True", "", "Updated file on destination"]
    assert by_path["n.dcm"][2:] == ["completed", "True", "", "Updated file on destination"]
    assert by_path["c,d.dcm"][2:] == ["skipped", "True", "", "adopted: already intact"]
    assert by_path["m.dcm"][2:] == ["failed", "False", "boom", ""]
    created = [row for row in rows if row[1].startswith("sub-01/")]
    assert len(created) == count and all(
        row[0] == row[1] and row[2:] == ["completed", "False", "", "Created file on destination"] for row in created
    )
    assert outcome.created_paths.on_disk
    assert peak / count < 40, f"{peak / count:.0f} bytes per written file while writing the reports"


def test_all_portable_is_is_portable_of_each():
    """The one-match check of many names (a series' instances in a re-sync) says what
    is_portable says of every name, for names near every rule: reserved, dots, dashes,
    whitespace, non-ASCII, 255 characters and one more, a newline inside a name."""
    import random

    from clpipe.layout import NAME_MAX, all_portable, is_portable

    rng = random.Random(11)
    parts = ["a", "Z", "0", ".", "-", "_", " ", "\n", "\t", "é", "CON", "nul", "com1", "LPT9", "x" * (NAME_MAX - 2), ":", "~"]
    names = ["".join(rng.choice(parts) for _ in range(rng.randrange(1, 5))) for _ in range(3000)]
    names += ["a" * NAME_MAX, "a" * (NAME_MAX + 1), "CON", "con.dcm", "CONX", "a.", "1.2.3.dcm"]
    for name in names:
        assert all_portable([name]) == is_portable(name), repr(name)
    for _ in range(500):
        group = rng.sample(names, rng.randrange(0, 6))
        assert all_portable(group) == all(map(is_portable, group)), group
    good = [name for name in names if is_portable(name)]
    assert len(good) > 100 and all_portable(good)


def test_each_engine_run_counts_only_its_own_renamed_entries(tmp_path):
    """An Engine run twice says how many entries each run renamed, not the sum of both runs
    (run() resets the count; a line lost in a review made it add up)."""
    from clpipe.sources.base import RemoteEntry
    from clpipe.sync.engine import Engine, Options

    from helpers import PlainFiles

    files = {f"c/f{i:02d}.dcm": bytes([i]) * (10 + i) for i in range(20)}
    entries = [
        RemoteEntry(key, f"sub-1/{key}", len(data), 1.0, None, False, renamed=i % 4 == 0) for i, (key, data) in enumerate(files.items())
    ]
    dropoff = tmp_path / "dropoff"
    state = SyncState(dropoff, "twice")
    state.acquire()
    try:
        state.load()
        engine = Engine(PlainFiles(files, False), state, Options(dropoff=dropoff, zip_tmp=tmp_path / "ziptmp", jobs=1, retries=1))
        first = engine.run(list(entries))
        second = engine.run(list(entries))
    finally:
        state.release()
    assert (first.created, second.skipped) == (20, 20)
    assert first.renamed == second.renamed == 5
