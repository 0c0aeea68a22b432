"""The per-session states (clpipe/sync/sessions.py): tallies, the merge with earlier runs,
the states as of a time, the BIDS check, the sessions TSV and clpipe's status_log.csv."""

from __future__ import annotations

import csv
import json
import os

import pytest

from clpipe.sources.base import RemoteEntry, Session, session_of
from clpipe.sync import sessions as S

NOW = 1_800_000_000.0
HOUR = 3600.0


def entry(path: str, session: Session | None, key: str = "", modified: float = 0.0, size: int = 10) -> RemoteEntry:
    return RemoteEntry(key or path, path, size, modified, None, False, session=session)


def one_session(subject: str = "s01", label: str = "baseline") -> Session:
    return Session(f"{subject}/{label}", subject, label, subject.upper(), label.title())


def tallied(entries: list[RemoteEntry], placed: set[str] | None = None, failed: dict[str, str] | None = None) -> S.Tallies:
    """Tallies of a run that listed ``entries``, placed those in ``placed`` (all by
    default) and failed those in ``failed``."""
    tallies = S.Tallies()
    for item in entries:
        tallies.listed(item)
        if failed and item.path in failed:
            tallies.failed(item, failed[item.path])
        elif placed is None or item.path in placed:
            tallies.in_place(item, [[item.path, item.size, ""]], placed=1)
    return tallies


def states(records: dict, now: float = NOW, stable_after: float = 1800, bids: S.BidsCheck | None = None) -> dict[str, str]:
    return {path: r["state"] for path, r in S.with_states(records, now, stable_after, bids).items()}


def test_session_of_shares_one_object_per_folder_and_skips_files_of_no_session():
    known: dict = {}
    a = session_of("sub01/ses1/series-1/x.dcm", (0, 1), "Sub 01", "Ses 1", known)
    b = session_of("sub01/ses1/series-2", (0, 1), "Sub 01", "Ses 1", known)
    assert a is b and a is not None
    assert (a.path, a.subject, a.session, a.source_subject) == ("sub01/ses1", "sub01", "ses1", "Sub 01")
    assert session_of("sub01/ses1", (0, 1), "", "", known) is None  # the session's folder itself is no entry of it
    assert session_of("project-file.txt", (-1, -1), "", "", known) is None
    only_subject = session_of("sub02/series-1", (0, -1), "s", "", known)
    assert only_subject is not None and (only_subject.path, only_subject.session) == ("sub02", "")


def test_dicom_series_come_largest_first_and_keep_their_sessions():
    """The engine retrieves ``jobs`` series at a time: the DICOM entries come largest
    first (a large series listed last would run on alone), equal counts in listing order,
    and the order changes neither a series' folder nor its session."""
    from clpipe.sources.dicom import DicomQuery, Series, entries

    listed = [("1.1", "20240101", 5), ("1.2", "20240101", 300), ("1.3", "20240202", 40), ("1.4", "20240101", 40), ("1.5", "20240202", None)]

    class Listing:
        def series(self, query):
            for number, (uid, date, count) in enumerate(listed, 1):
                attrs = {"PatientID": "P1", "SeriesInstanceUID": uid, "StudyDate": date, "SeriesNumber": str(number)}
                yield Series(attrs, count)

    got = list(entries(Listing(), DicomQuery(), "{subject}/{session}/{series}"))
    assert [e.key for e in got] == ["series/1.2", "series/1.3", "series/1.4", "series/1.1", "series/1.5"]
    assert [e.count for e in got] == [300, 40, 40, 5, 0]  # no count given: last
    by_uid = {e.key: e for e in got}
    assert by_uid["series/1.1"].session is by_uid["series/1.2"].session is by_uid["series/1.4"].session
    assert by_uid["series/1.3"].session is by_uid["series/1.5"].session is not by_uid["series/1.1"].session
    assert by_uid["series/1.2"].path.startswith(by_uid["series/1.2"].session.path + "/")


def test_complete_arriving_partial_new_and_their_counts():
    s1, s2, s3 = one_session("s01"), one_session("s02"), one_session("s03")
    listed = [
        entry("s01/baseline/a/1.dcm", s1, modified=NOW - 2 * HOUR),
        entry("s01/baseline/b/1.dcm", s1, modified=NOW - 3 * HOUR),
        entry("s02/baseline/a/1.dcm", s2, modified=NOW - 60),  # changed a minute ago
        entry("s03/baseline/a/1.dcm", s3, modified=NOW - 2 * HOUR),
        entry("s03/baseline/b/1.dcm", s3, modified=NOW - 2 * HOUR),
    ]
    tallies = tallied(listed, failed={"s03/baseline/b/1.dcm": "HTTP 404"})
    records = S.merge({}, tallies, NOW, "run1")
    got = states(records)
    assert got == {"s01/baseline": "complete", "s02/baseline": "arriving", "s03/baseline": "partial"}
    assert records["s01/baseline"]["series"] == 2 and records["s01/baseline"]["files"] == 2
    assert records["s01/baseline"]["bytes"] == 20 and records["s01/baseline"]["last_change"] == NOW - 2 * HOUR
    assert records["s03/baseline"]["failures"] == ["s03/baseline/b/1.dcm: HTTP 404"]
    assert records["s03/baseline"]["missing"] == 1
    # StableAfter 0 turns "arriving" off
    assert states(records, stable_after=0)["s02/baseline"] == "complete"
    # a run stopped before any file of a session: new, not partial
    stopped = S.merge({}, tallied(listed, placed={"s01/baseline/a/1.dcm", "s01/baseline/b/1.dcm"}), NOW, "run1")
    assert states(stopped)["s03/baseline"] == "new"
    counted = S.counts(S.with_states(records, NOW, 1800, None).values())
    assert counted == {"complete": 1, "arriving": 1, "partial": 1, "new": 0, "removed": 0, "converted": 0}


def test_last_change_comes_from_the_listing_or_from_when_a_change_was_seen():
    s1 = one_session()
    first = [entry("s01/baseline/a", s1, key="k1")]  # a DICOM source: no modification times
    records = S.merge({}, tallied(first), NOW, "run1")
    assert records["s01/baseline"]["last_change"] == NOW  # first seen now: arriving for StableAfter
    later = NOW + 2 * HOUR
    same = S.merge(S.with_states(records, NOW, 1800, None), tallied(first), later, "run2")
    assert same["s01/baseline"]["last_change"] == NOW  # nothing changed: stable
    assert states(same, now=later)["s01/baseline"] == "complete"
    grown = [*first, entry("s01/baseline/b", s1, key="k2")]  # a new series arrived
    changed = S.merge(same, tallied(grown), later, "run3")
    assert changed["s01/baseline"]["last_change"] == later
    assert states(changed, now=later)["s01/baseline"] == "arriving"


def test_removed_upstream_and_back():
    s1, s2 = one_session("s01"), one_session("s02")
    both = [entry("s01/baseline/a", s1, modified=NOW - 2 * HOUR), entry("s02/baseline/a", s2, modified=NOW - 2 * HOUR)]
    records = S.with_states(S.merge({}, tallied(both), NOW, "r1"), NOW, 1800, None)
    after = S.merge(records, tallied(both[:1]), NOW + 10, "r2")
    assert states(after)["s02/baseline"] == "removed"
    assert after["s02/baseline"]["files"] == 1  # still in the dropoff
    partial_listing = S.merge(records, tallied(both[:1]), NOW + 10, "r2", whole_listing=False)
    assert states(partial_listing)["s02/baseline"] == "complete"  # a listing of a part says nothing of the rest
    back = S.merge(after, tallied(both), NOW + 20, "r3")
    assert states(back, now=NOW + 20 + 2 * HOUR)["s02/baseline"] == "complete"


def test_converted_when_the_bids_folder_has_a_file_newer_than_the_last_sync(tmp_path):
    s1 = Session("sübject-03/ses 1", "sübject-03", "ses 1")
    records = S.with_states(S.merge({}, tallied([entry("x/a", s1, modified=NOW - 2 * HOUR)]), NOW, "r1"), NOW, 1800, None)
    record = records["sübject-03/ses 1"]
    assert S.bids_labels(record) == ("subject03", "ses1")
    bids = S.BidsCheck(str(tmp_path / "bids"))
    assert states(records, bids=bids)["sübject-03/ses 1"] == "complete"  # no BIDS folder
    nifti = tmp_path / "bids" / "sub-subject03" / "ses-ses1" / "anat" / "sub-subject03_ses-ses1_T1w.nii.gz"
    nifti.parent.mkdir(parents=True)
    nifti.write_bytes(b"x")
    os.utime(nifti, (NOW - HOUR, NOW - HOUR))  # converted before the last sync: not converted
    assert states(records, bids=bids)["sübject-03/ses 1"] == "complete"
    os.utime(nifti, (NOW + 60, NOW + 60))
    assert states(records, bids=bids)["sübject-03/ses 1"] == "converted"
    # DICOMFormatString without {session}: sub-<label> alone
    assert S.BidsCheck(str(tmp_path / "bids"), with_session=False).folder(record).endswith("sub-subject03")


def test_save_and_load_round_trip_and_damaged_files(tmp_path):
    s1 = one_session()
    records = S.with_states(S.merge({}, tallied([entry("s01/baseline/a", s1, modified=NOW - 2 * HOUR)]), NOW, "r1"), NOW, 1800, None)
    S.save(tmp_path, records, "r1")
    assert S.load(tmp_path) == records
    assert not [p for p in (tmp_path / ".clpipe-sync").iterdir() if p.name != "sessions.json"]  # no temporary file left
    S.sessions_file(tmp_path).write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        S.load(tmp_path)
    S.sessions_file(tmp_path).write_text(json.dumps({"clpipe_sessions": 99, "sessions": []}))
    with pytest.raises(ValueError, match="not a sessions file"):
        S.load(tmp_path)
    assert S.load(tmp_path / "nothing-here") == {}


def test_changes_tsv_and_status_log(tmp_path):
    s1, s2 = one_session("s01"), one_session("s02")
    listed = [entry("s01/baseline/a", s1, modified=NOW - 2 * HOUR), entry("s02/baseline/a", s2, modified=NOW - 2 * HOUR)]
    first = S.with_states(S.merge({}, tallied(listed, failed={"s02/baseline/a": "HTTP 404"}), NOW, "r1"), NOW, 1800, None)
    changed = S.changes({}, first)
    assert [(c.subject, c.old, c.new) for c in changed] == [("s01", "", "complete"), ("s02", "", "partial")]
    tsv = tmp_path / "logs" / "run1.sessions.tsv"
    tsv.parent.mkdir()
    S.write_changes(tsv, changed, "/data/dropoff")
    lines = tsv.read_text().splitlines()
    assert lines[0] == "subject\tsession\told_state\tnew_state\tpath"
    assert lines[1] == "s01\tbaseline\t\tcomplete\t/data/dropoff/s01/baseline"
    log = S.append_status_log(tmp_path / "project", changed, when=NOW)
    with open(log, newline="") as fh:
        got = list(csv.reader(fh))
    assert got[0] == ["subject", "session", "step", "event", "timestamp", "source", "note"]
    assert got[1][:4] == ["s01", "baseline", "ingestion", "complete"] and got[1][5] == "clpipe dicom sync"
    assert got[2][3] == "partial" and "HTTP 404" in got[2][6]
    # the next run with nothing changed: a header-only TSV, no status_log rows
    second = S.with_states(S.merge(first, tallied(listed, failed={"s02/baseline/a": "HTTP 404"}), NOW + 5, "r2"), NOW + 5, 1800, None)
    assert S.changes(first, second) == []
    S.write_changes(tsv, [], "/data/dropoff")
    assert tsv.read_text().splitlines() == ["subject\tsession\told_state\tnew_state\tpath"]
    S.append_status_log(tmp_path / "project", [], when=NOW)
    assert len(log.read_text().splitlines()) == 3


def test_refresh_shows_new_changed_and_removed_without_writing():
    s1, s2, s3 = one_session("s01"), one_session("s02"), one_session("s03")
    synced = [entry("s01/baseline/a", s1, modified=NOW - 2 * HOUR), entry("s02/baseline/a", s2, modified=NOW - 2 * HOUR)]
    records = S.with_states(S.merge({}, tallied(synced), NOW, "r1"), NOW, 1800, None)
    listing = S.Tallies()
    for item in [synced[0], entry("s01/baseline/b", s1, modified=NOW + 50), entry("s03/baseline/a", s3, modified=NOW - HOUR)]:
        listing.listed(item)
    seen = S.refreshed(records, listing, NOW + 60)
    got = states(seen, now=NOW + 60)
    assert got == {"s01/baseline": "arriving", "s02/baseline": "removed", "s03/baseline": "new"}
    assert seen["s01/baseline"]["changed"] and seen["s03/baseline"]["changed"]
    assert states(seen, now=NOW + 3 * HOUR)["s01/baseline"] == "partial"  # the dropoff lacks the new series
