"""Local names: every remote file gets its own local file (never two on one path, never a
name over 255 bytes), every name the tool builds is portable (ASCII, no spaces, none of
``/ \\ : * ? " < > |``, no control characters, not starting with ``.`` or ``-``), the suffix
that tells two colliding names apart is stable whatever the listing order, and a dropoff
synced under earlier names is renamed in place, not downloaded again (issue 11, points 4-5).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import unicodedata
from pathlib import Path

import pytest

import clpipe.layout as layout
from clpipe.sources.dicom import series_folder
from clpipe.sync.manifest import Record, SyncState
from clpipe.testing.fwserver import Acquisition, FlywheelTestServer, FwFile, Project, Session, Subject

from helpers import (
    KEY,
    SeriesSource,
    dicoms,
    file_gets,
    hostile_project,
    instances,
    landed_files,
    login,
    native,
    new_project,
    resync_has_nothing_to_do,
    resync_renames_in_place,
    run_engine,
    series_entry,
    zip_bytes,
)

pytestmark = pytest.mark.fw

NFC, NFD = unicodedata.normalize("NFC", "José"), unicodedata.normalize("NFD", "José")
BAD = set('/\\:*?"<>| ')


@pytest.fixture
def nenv(no_fw_env):
    return no_fw_env


def assert_portable(path: str) -> None:
    for part in path.split("/"):
        assert part.isascii() and not BAD & set(part) and not any(ord(c) < 32 or ord(c) == 127 for c in part), path
        assert not part.startswith((".", "-")) and 0 < len(part.encode()) <= 255, path


def suffix(identity: str) -> str:
    return "~" + hashlib.sha1(identity.encode()).hexdigest()[:6]


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "text, name",
    [
        ("003-DWI *b1000*", "003-DWI_b1000"),
        ("001-localizer: 3-plane", "001-localizer_3-plane"),
        ("003-Séquence T2* coronal  Jörg", "003-Sequence_T2_coronal_Jorg"),
        ("Straße", "Strasse"),
        (NFD, "Jose"),
        (NFC, "Jose"),
        (" normal ", "normal"),
        ("a/../normal", "a_.._normal"),
        ("ctl\x07name.dcm", "ctl_name.dcm"),
        ("..", "_"),
        (".hidden", "_hidden"),
        ("-rf", "_rf"),
        ("", "_"),
        ('a\\b:c*d?e"f<g>h|i', "a_b_c_d_e_f_g_h_i"),
        ("trailing.", "trailing"),
        ("NUL.txt", "NUL_.txt"),
        ("1.2.840.10008.5.1.4.dcm", "1.2.840.10008.5.1.4.dcm"),
        ("sub-01_T1w.nii.gz", "sub-01_T1w.nii.gz"),
    ],
)
def test_portable_names(text, name):
    assert layout.portable_name(text) == name
    assert_portable(layout.portable_name(text))


def test_long_names_keep_their_extension_and_fit_with_a_suffix():
    long = "Ü" * 300 + ".dicom.zip"
    name = layout.portable_name(long)
    assert name.endswith(".dicom.zip") and len(name.encode()) == 255
    with_suffix = layout.fit_name(name, layout.identity_suffix("key"))
    assert with_suffix.endswith(suffix("key") + ".dicom.zip") and len(with_suffix.encode()) == 255
    cut = layout.fit_name("é" * 200, "~abc", folder=True)  # cut on a character boundary, never half of one
    assert cut.endswith("~abc") and len(cut.encode()) <= 255 and cut[:-4] == "é" * 125


def test_the_issues_dicom_folders_are_portable():
    attrs = {"PatientID": "P1", "StudyDate": "20240115"}
    for number, description, folder in [
        (3, "DWI *b1000*", "003-DWI_b1000"),
        (1, "localizer: 3-plane", "001-localizer_3-plane"),
        (3, "Séquence T2* coronal  Jörg", "003-Sequence_T2_coronal_Jorg"),
    ]:
        path = series_folder("{subject}/{session}/{series}", dict(attrs, SeriesNumber=str(number), SeriesDescription=description))
        assert path == f"P1/20240115/{folder}"


def resolve(items: list[tuple[tuple[tuple[str, str], ...], str, str, bool]]) -> dict[str, tuple[str, bool]]:
    resolver = layout.NameResolver()
    placed = []
    for folders, key, wanted, unchanged in items:
        folder = resolver.folder(folders)
        resolver.add(folder, key, wanted, unchanged)
        placed.append((folder, key))
    resolver.resolve()
    return {key: resolver.path(folder, key) for folder, key in placed}


def test_the_resolver_is_the_same_in_any_order_and_the_unchanged_name_wins():
    sub = lambda label: (("SUBJECTS", "SUBJECTS"), (label, layout.portable_name(label)))  # noqa: E731
    items = [
        (sub(NFC), "c1/a.dcm", "a.dcm", True),
        (sub(NFD), "c2/a.dcm", "a.dcm", True),  # two subjects, one name
        (sub("P"), "c3/sp.dcm", "sp.dcm", True),
        (sub("P"), "c3/ sp.dcm", "sp.dcm", False),  # unchanged wins
        (sub("P"), "c4/sp.dcm", "sp.dcm", True),  # the same name in another container: key order
        (sub("P"), "c5/SP.dcm", "SP.dcm", True),  # differs only in case: apart on SMB/NTFS too
    ]
    first = resolve(items)
    for seed in range(20):
        shuffled = items[:]
        random.Random(seed).shuffle(shuffled)
        assert resolve(shuffled) == first
    assert first["c2/a.dcm"] == ("SUBJECTS/Jose/a.dcm", True)  # NFD sorts first: it keeps the plain name
    assert first["c1/a.dcm"] == (f"SUBJECTS/Jose{suffix(NFC)}/a.dcm", True)
    assert first["c3/sp.dcm"] == ("SUBJECTS/P/sp.dcm", False)
    assert first["c3/ sp.dcm"] == (f"SUBJECTS/P/sp{suffix('c3/ sp.dcm')}.dcm", True)
    assert first["c4/sp.dcm"] == (f"SUBJECTS/P/sp{suffix('c4/sp.dcm')}.dcm", True)
    assert first["c5/SP.dcm"] == (f"SUBJECTS/P/SP{suffix('c5/SP.dcm')}.dcm", True)
    assert len({path.lower() for path, _ in first.values()}) == len(items)


def test_a_suffix_never_lands_on_a_name_that_exists():
    taken = f"sp{suffix('k2')}.dcm"  # a file really named like the suffixed one
    got = resolve([((), "k1", "sp.dcm", True), ((), "k2", "sp.dcm", True), ((), "k3", taken, True)])
    assert got["k1"][0] == "sp.dcm" and got["k3"][0] == taken
    assert got["k2"][0] == f"sp~{hashlib.sha1(b'k2').hexdigest()[:10]}.dcm"


def test_zip_members_with_300_character_names():
    members = [f"d{n}/" + "M" * 300 + ".dcm" for n in (3, 1, 2)]
    names = layout.flatten_members(members)
    assert len(set(names.values())) == 3 and all(len(n.encode()) <= 255 and n.endswith(".dcm") for n in names.values())
    assert names[members[1]] == "M" * 251 + ".dcm"  # the smallest path keeps the plain (cut) name
    assert names[members[0]] == "M" * 244 + suffix(members[0]) + ".dcm"
    assert layout.flatten_members(list(reversed(members))) == names


def test_claims_keep_files_and_folders_apart():
    claims = layout.Claims()
    assert claims.claim("A/FILES/x", "k1") == "A/FILES/x"
    assert claims.claim("A/FILES/x", "k2", is_folder=True) == f"A/FILES/x{suffix('k2')}"  # a zip's folder
    # inside another entry's file: the folder part that clashes gets the suffix
    assert claims.claim("A/FILES/x/IM1.dcm", "k3") == f"A/FILES/x{suffix('k3')}/IM1.dcm"
    claims = layout.Claims()
    claims.claim("A/B/f.dcm", "k1")
    assert claims.claim("A/B", "k2") == f"A/B{suffix('k2')}"  # a file where another's folder is
    claims.claim("C/D", "k3")
    assert claims.claim("C/D/e.dcm", "k4") != "C/D/e.dcm"  # inside another entry's file: never
    assert claims.taken("A/B/f.dcm") and claims.taken("A") and not claims.taken("A/B/g.dcm")


# ----------------------------------------------------------------------------- Flywheel, end to end


def summary_json(config: Path) -> dict:
    # the newest run's (two runs in one second have run ids in random order: by time written)
    newest = max((config.parent / "logs" / "sync_logs").glob("*.summary.json"), key=lambda p: p.stat().st_mtime_ns)
    return json.loads(newest.read_text())


def test_sixteen_colliding_files_land_as_sixteen_files_in_any_listing_order(nenv, tmp_path):
    project, plain = hostile_project()
    contents = sorted({f.content for _, f in project.iter_files()})
    assert len(contents) == 16
    with FlywheelTestServer(projects=[project], api_keys={KEY}) as server:
        login(nenv, server)
        config = new_project(tmp_path / "a", "fw://lab/hostile/")
        code, out, summary = native(nenv, config)
        assert code == 0 and summary == (16, 0, 0, 0), out
        assert "listed 16 remote files" in out and "11 files renamed: their names collided" in out
        report = summary_json(config)
        assert report["renamed"] == 11 and report["failed"] == 0
        landed = dicoms(config.parent / "data_DICOMs")
        assert sorted(landed.values()) == contents  # every file once, with its own bytes
        for path in landed:
            assert_portable(path)
        by_bytes = {data: path for path, data in landed.items()}
        for data, path in plain.items():
            assert by_bytes[data] == path
        assert by_bytes[b"nfd-subject:" * 7].startswith("SUBJECTS/Jose/")  # NFD sorts before NFC
        assert re.fullmatch(r"SUBJECTS/Jose~[0-9a-f]{6}/SESSIONS/s1/ACQUISITIONS/T1/FILES/a\.dcm", by_bytes[b"nfc-subject:" * 7])

        # the same files, listed in another order, land under the same names
        before = [(node.obj.id, f.name) for node, f in project.iter_files()]
        rng = random.Random(7)
        rng.shuffle(project.subjects)
        for subject in project.subjects:
            rng.shuffle(subject.sessions)
            for session in subject.sessions:
                rng.shuffle(session.acquisitions)
                for acquisition in session.acquisitions:
                    rng.shuffle(acquisition.files)
        assert [(node.obj.id, f.name) for node, f in project.iter_files()] != before
        shuffled = new_project(tmp_path / "b", "fw://lab/hostile/")
        code, out, summary = native(nenv, shuffled)
        assert code == 0 and summary == (16, 0, 0, 0), out
        assert dicoms(shuffled.parent / "data_DICOMs") == landed

        # and a second run of the first dropoff, in the new order, has nothing to do
        mark = len(server.requests)
        code, out, summary = native(nenv, config)
        assert code == 0 and summary == (0, 0, 16, 0) and file_gets(server, mark) == [], out
        assert dicoms(config.parent / "data_DICOMs") == landed


def test_zip_members_with_300_character_names_all_land(nenv, tmp_path):
    members = {f"d{n}/" + "M" * 300 + ".dcm": bytes([n]) * (100 + n) for n in (1, 2, 3)}
    project = Project(
        "lab",
        "zips",
        [Subject("P1", [Session("s1", [Acquisition("DWI *b1000*", [FwFile("1.2.3 series.dicom.zip", zip_bytes(members))])])])],
    )
    with FlywheelTestServer(projects=[project], api_keys={KEY}) as server:
        login(nenv, server)
        config = new_project(tmp_path / "p", "fw://lab/zips/")
        code, out, summary = native(nenv, config)
    assert code == 0 and summary == (3, 0, 0, 0), out
    landed = dicoms(config.parent / "data_DICOMs")
    assert sorted(landed.values()) == sorted(members.values())
    folder = "SUBJECTS/P1/SESSIONS/s1/ACQUISITIONS/DWI_b1000/FILES/1.2.3_series"
    assert {p.rsplit("/", 1)[0] for p in landed} == {folder}
    for path in landed:
        assert_portable(path)
        assert path.endswith(".dcm")


def test_a_name_taken_by_a_new_file_moves_the_old_one_aside_without_a_download(nenv, tmp_path):
    """José.dcm had the name Jose.dcm to itself; then a file really named Jose.dcm (same
    size) arrives: it takes the name (an unchanged name wins), José.dcm is renamed in
    place, and the newcomer is downloaded, never mistaken for José's bytes."""
    acquisition = Acquisition("T1", [FwFile(NFC + ".dcm", b"accented" * 4)])
    project = Project("lab", "steal", [Subject("P1", [Session("s1", [acquisition])])])
    folder = "SUBJECTS/P1/SESSIONS/s1/ACQUISITIONS/T1/FILES"
    with FlywheelTestServer(projects=[project], api_keys={KEY}) as server:
        login(nenv, server)
        config = new_project(tmp_path / "p", "fw://lab/steal/")
        dropoff = config.parent / "data_DICOMs"
        assert native(nenv, config)[0] == 0
        assert dicoms(dropoff) == {f"{folder}/Jose.dcm": b"accented" * 4}
        acquisition.files.append(FwFile("Jose.dcm", b"plain..." * 4))  # as long as José's
        mark = len(server.requests)
        code, out, summary = native(nenv, config)
        assert code == 0, out
        assert file_gets(server, mark) == ["Jose.dcm"]
        key = f"{acquisition.id}/{NFC}.dcm"
        assert dicoms(dropoff) == {f"{folder}/Jose.dcm": b"plain..." * 4, f"{folder}/Jose{suffix(key)}.dcm": b"accented" * 4}
        assert "1 files synced under earlier names were renamed in place" in out


# ----------------------------------------------------------------------------- migration


def old_name(text: str) -> str:
    """How clpipe named a path part before portable names (safe_part of the time)."""
    text = re.sub(r"[\x00-\x1f\x7f/\\]", "_", unicodedata.normalize("NFC", text)).strip()
    return "_" if text in ("", ".", "..") else text


def test_a_dropoff_synced_under_the_earlier_names_is_renamed_in_place(nenv, tmp_path):
    members = {"s/IM 1.dcm": b"one" * 30, "s/IM2.dcm": b"two" * 30}
    project = Project(
        "lab",
        "old",
        [
            Subject(
                "Jörg",
                [
                    Session(
                        "ses 1",
                        [
                            Acquisition(
                                "T2* coronal",
                                [
                                    FwFile("a b.dcm", b"ab" * 40),
                                    FwFile("ok.dcm", b"ok" * 40),
                                    FwFile("series.dicom.zip", zip_bytes(members)),
                                ],
                            )
                        ],
                    )
                ],
            )
        ],
    )
    new = "SUBJECTS/Jorg/SESSIONS/ses_1/ACQUISITIONS/T2_coronal/FILES"
    old = f"SUBJECTS/{old_name('Jörg')}/SESSIONS/{old_name('ses 1')}/ACQUISITIONS/{old_name('T2* coronal')}/FILES"
    expected = {
        f"{new}/a_b.dcm": b"ab" * 40,
        f"{new}/ok.dcm": b"ok" * 40,
        f"{new}/series/IM_1.dcm": b"one" * 30,
        f"{new}/series/IM2.dcm": b"two" * 30,
    }
    with FlywheelTestServer(projects=[project], api_keys={KEY}) as server:
        login(nenv, server)
        config = new_project(tmp_path / "p", "fw://lab/old/")
        dropoff = config.parent / "data_DICOMs"
        assert native(nenv, config)[0] == 0
        assert dicoms(dropoff) == expected
        # make it the dropoff an earlier clpipe left: its names, its manifest
        earlier = {}
        for path in expected:
            before = earlier[path] = path.replace(new, old).replace("a_b.dcm", "a b.dcm").replace("IM_1.dcm", "IM 1.dcm")
            (dropoff / before).parent.mkdir(parents=True, exist_ok=True)
            (dropoff / path).rename(dropoff / before)
        for folder in sorted(dropoff.joinpath("SUBJECTS", "Jorg").rglob("*"), key=lambda p: -len(p.parts)):
            folder.rmdir()
        dropoff.joinpath("SUBJECTS", "Jorg").rmdir()
        state = SyncState(dropoff, "rewrite")
        state.acquire()
        state.load()
        for key in state.keys():
            record = state.get(key)
            state.record(Record(key, record.signature, [[earlier[f[0]], *f[1:]] for f in record.files]))
        state.save()
        state.release()
        assert sorted(dicoms(dropoff)) == sorted(earlier.values())

        assert len(expected) == 4
        resync_renames_in_place(nenv, server, config, expected)  # every file once, under its new name
        assert not (dropoff / "SUBJECTS" / old_name("Jörg")).exists()  # the emptied old folders are gone
        assert summary_json(config)["renamed_in_place"] == 4
        state = SyncState(dropoff, "check")
        state.load()
        assert {f[0] for key in state.keys() for f in state.get(key).files} == set(expected)

        resync_has_nothing_to_do(nenv, server, config, 4)


def test_a_series_synced_under_its_earlier_folder_name_moves_without_a_retrieval(tmp_path):
    dropoff = tmp_path / "dropoff"
    one = instances("1", 3)
    source = SeriesSource({"series/1": one})
    earlier = run_engine(source, dropoff, [series_entry("series/1", "P1/20240115/003-DWI *b1000*", 3)])
    assert earlier.created == 3
    moved = run_engine(source, dropoff, [series_entry("series/1", "P1/20240115/003-DWI_b1000", 3)], "run2")
    assert (moved.created, moved.updated, moved.skipped, moved.moved, moved.failed) == (0, 0, 3, 3, 0)
    assert source.opened == ["series/1"]  # retrieved by the first run only
    assert landed_files(dropoff) == {f"P1/20240115/003-DWI_b1000/{uid}.dcm": data for uid, data in one}


# ----------------------------------------------------------------------------- DICOM, end to end


def test_dicom_folders_are_portable_and_two_series_on_one_name_are_told_apart(nenv, tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    export = tmp_path / "export"
    export.mkdir()
    series = [
        ("1.2.826.0.1.9.1", 3, "DWI *b1000*"),
        ("1.2.826.0.1.9.2", 3, "DWI *b1000*"),
        ("1.2.826.0.1.9.3", 1, "localizer: 3-plane"),
        ("1.2.826.0.1.9.4", 3, "Séquence T2* coronal  Jörg"),
    ]
    written = {}
    for uid, number, description in series:
        for n in (1, 2):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = f"{uid}.{n}"
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.9", uid
            ds.PatientID, ds.StudyDate, ds.Modality = "P1", "20240115", "MR"
            ds.SeriesNumber, ds.SeriesDescription = number, description
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            (export / f"{uid}.{n}.dcm").write_bytes(buffer.getvalue())
            written[f"{uid}.{n}"] = buffer.getvalue()
    config = new_project(tmp_path / "p", f"file://{export}")
    proc = nenv.clpipe("dicom", "sync", "-c", config, "-submit", timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    landed = dicoms(config.parent / "data_DICOMs")
    folders = {path.rsplit("/", 1)[0] for path in landed}
    assert folders == {
        "P1/20240115/003-DWI_b1000",
        f"P1/20240115/003-DWI_b1000{suffix('series/1.2.826.0.1.9.2')}",
        "P1/20240115/001-localizer_3-plane",
        "P1/20240115/003-Sequence_T2_coronal_Jorg",
    }
    assert {path.rsplit("/", 1)[1]: data for path, data in landed.items()} == {f"{k}.dcm": v for k, v in written.items()}
    assert "4 series folders renamed" in out
