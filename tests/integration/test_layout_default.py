"""The shallow, BIDS-ready layout new projects get (issue 13, point 4): a project made by
`clpipe project_setup` syncs into one folder per subject, session and series, and Debian's
dcm2niix converts every series of a session from the folder DICOMFormatString names at its
default search depth (from Flywheel and from a DICOM export); an existing project (Flywheel's layout, no LayoutTemplate) moves to
the new layout by setting LayoutTemplate and DICOMFormatString and syncing again, which
renames the files in place and downloads nothing."""

from __future__ import annotations

import glob
import json
import re
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from clpipe.testing.fwserver import Acquisition, FlywheelTestServer, FwFile, Project, Session, Subject

from helpers import KEY, dicoms, login, native, need_tool, new_project, resync_has_nothing_to_do, resync_renames_in_place, zip_bytes


@pytest.fixture
def nenv(no_fw_env):
    return no_fw_env


def dcm2niix() -> Path:
    return need_tool(
        Path(shutil.which("dcm2niix") or "/usr/bin/dcm2niix"), "dcm2niix (Debian package dcm2niix; scripts/setup.sh installs it)"
    )


def session_folders(config: Path) -> list[Path]:
    """The session folders as clpipe's BIDS step finds them: DICOMFormatString globbed below
    DICOMDirectory."""
    options = json.loads(config.read_text())["DICOMToBIDSOptions"]
    pattern = options["DICOMFormatString"].replace("{subject}", "*").replace("{session}", "*")
    return sorted(Path(p) for p in glob.glob(str(Path(options["DICOMDirectory"]) / pattern)))


def series_numbers(folder: Path) -> set[int]:
    """The SeriesNumber of every DICOM series below ``folder``."""
    found = set()
    for path in folder.rglob("*"):
        if path.is_file():
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            if "SeriesInstanceUID" in ds:
                found.add(int(ds.SeriesNumber))
    return found


@pytest.mark.dcm2niix
def test_a_new_project_is_converted_by_dcm2niix_at_its_default_depth(nenv, server, demo_project, tmp_path):
    tool = dcm2niix()
    login(nenv, server)
    config = new_project(tmp_path / "p", layout=True)  # as project_setup writes it
    data = json.loads(config.read_text())
    assert data["SourceOptions"]["LayoutTemplate"] == "{subject}/{session}/{acquisition}"
    assert data["DICOMToBIDSOptions"]["DICOMFormatString"] == "{subject}/{session}/"
    code, out, summary = native(nenv, config)
    assert code == 0, out
    assert "DICOMFormatString" not in out  # project_setup wrote the matching one already: nothing to change

    dropoff = config.parent / "data_DICOMs"
    landed = dicoms(dropoff)
    assert sorted(landed.values()) == sorted(demo_project.expected_dicom_paths(strip_root=True).values())
    # BIDS labels (sub-01 -> 01, ses-01 -> 01), one folder per series (the acquisition), the
    # zip of a series (<uid>.dicom.zip) unpacked into a folder <uid>: slices 2 folders below the session
    for path in landed:
        assert re.fullmatch(r"0[12]/01/T[12]w/([0-9.]+/IM000[1-3]\.dcm|localizer\.dcm)", path), path

    sessions = session_folders(config)
    assert [p.relative_to(dropoff).as_posix() for p in sessions] == ["01/01", "02/01"]
    session = sessions[0]
    expected = series_numbers(session)
    assert expected == {1, 2, 99}  # T1w, T2w and the localizer
    out_dir = tmp_path / "nifti"
    out_dir.mkdir()
    # no -d: dcm2niix's default depth (5), as dcm2bids runs it; %s: the series number
    proc = subprocess.run(
        [str(tool), "-f", "%s", "-z", "y", "-b", "y", "-o", str(out_dir), str(session)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    converted = {int(p.name.split(".")[0]) for p in out_dir.glob("*.nii.gz")}
    assert converted == expected, proc.stdout
    for number in expected:  # every series whole: its BIDS sidecar names it
        sidecar = json.loads((out_dir / f"{number}.json").read_text())
        assert sidecar["SeriesNumber"] == number


def series_uids(folder: Path) -> set[str]:
    """The SeriesInstanceUID of every DICOM series below ``folder``."""
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in folder.rglob("*.dcm")}


@pytest.mark.dcm2niix
def test_a_new_dicom_project_is_converted_by_dcm2niix_at_its_default_depth(no_fw_env, tmp_path):
    """The synthetic data set (RLE, Implicit VR, multi-frame, hostile descriptions) from a
    file:// export: every series of every session converts from its session's folder."""
    from clpipe.testing.dicomdata import make_dataset

    tool = dcm2niix()
    desc = make_dataset(tmp_path / "export", rows=16, cols=16)
    config = new_project(tmp_path / "p", f"file://{tmp_path / 'export'}")
    assert json.loads(config.read_text())["DICOMToBIDSOptions"]["DICOMFormatString"] == "{subject}/{session}/"
    proc = no_fw_env.clpipe("dicom", "sync", "-c", config, "-submit", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sessions = session_folders(config)
    assert len(sessions) == desc["counts"]["studies"] == 4
    converted: set[str] = set()
    for n, session in enumerate(sessions):
        out_dir = tmp_path / f"nifti{n}"
        out_dir.mkdir()
        # no -d: dcm2niix's default depth; %j: the SeriesInstanceUID
        run = subprocess.run(
            [str(tool), "-f", "%j", "-z", "n", "-o", str(out_dir), str(session)], capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stdout + run.stderr
        got = {p.name.removesuffix(".nii") for p in out_dir.glob("*.nii")}
        assert got == series_uids(session), (session, run.stdout)
        converted |= got
    assert len(converted) == desc["counts"]["series"] == 13


@pytest.mark.parametrize("url, top", [("fw://lab/study/", "SUBJECTS"), ("fw://lab/study", "study")])
def test_an_existing_project_moves_to_the_new_layout_without_downloads(nenv, server, demo_project, tmp_path, url, top):
    login(nenv, server)
    config = new_project(tmp_path / "old", url)  # Flywheel's layout: no LayoutTemplate
    dropoff = config.parent / "data_DICOMs"
    code, out, summary = native(nenv, config)
    assert code == 0, out
    n = len(demo_project.expected_dicom_paths(strip_root=True))
    assert summary == (n, 0, 0, 0) and all(p.split("/")[0] == top and "/SESSIONS/" in p for p in dicoms(dropoff))
    assert json.loads(config.read_text())["DICOMToBIDSOptions"]["DICOMFormatString"] == "SUBJECTS/{subject}/SESSIONS/{session}/"
    before = dicoms(dropoff)

    # what a new project gets, synced from scratch: where every file must end up
    fresh = new_project(tmp_path / "fresh", url, layout=True)
    code, out, _ = native(nenv, fresh)
    assert code == 0, out
    wanted = dicoms(fresh.parent / "data_DICOMs")
    new_keys = json.loads(fresh.read_text())

    # the move the README describes: set LayoutTemplate and DICOMFormatString, sync again
    data = json.loads(config.read_text())
    data["SourceOptions"]["LayoutTemplate"] = new_keys["SourceOptions"]["LayoutTemplate"]
    data["DICOMToBIDSOptions"]["DICOMFormatString"] = new_keys["DICOMToBIDSOptions"]["DICOMFormatString"]
    config.write_text(json.dumps(data, indent=4))
    assert len(wanted) == n
    resync_renames_in_place(nenv, server, config, wanted)
    assert sorted(wanted.values()) == sorted(before.values())
    assert not (dropoff / top).exists()  # the emptied old folders are gone
    resync_has_nothing_to_do(nenv, server, config, n)  # and the next run has nothing to do


@pytest.mark.fw  # the bundled Flywheel test server
def test_labels_that_change_and_colliding_zip_members_move_too(nenv, tmp_path):
    """Labels that become other BIDS labels (Jörg -> Jorg, ses 1 -> ses1, sub-02 -> 02),
    names that are made portable, zip members whose names collide: renamed in place all the
    same, to where a new project puts them."""
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
                                    FwFile("series.dicom.zip", zip_bytes({"s/IM 1.dcm": b"one" * 30, "s/IM2.dcm": b"two" * 30})),
                                ],
                            )
                        ],
                    ),
                    Session("ses-2", [Acquisition("T2* coronal", [FwFile("a b.dcm", b"cd" * 40)])]),
                ],
            ),
            Subject(
                "sub-02",
                [Session("x", [Acquisition("dup", [FwFile("1.dicom.zip", zip_bytes({"a/1.dcm": b"1" * 10, "b/1.dcm": b"2" * 10}))])])],
            ),
        ],
    )
    with FlywheelTestServer(projects=[project], api_keys={KEY}) as server:
        login(nenv, server)
        config = new_project(tmp_path / "old", "fw://lab/old/")
        assert native(nenv, config)[::2] == (0, (6, 0, 0, 0))
        fresh = new_project(tmp_path / "fresh", "fw://lab/old/", layout=True)
        assert native(nenv, fresh)[::2] == (0, (6, 0, 0, 0))
        wanted = dicoms(fresh.parent / "data_DICOMs")
        assert {p.rsplit("/", 1)[0] for p in wanted} == {
            "Jorg/ses1/T2_coronal",
            "Jorg/ses1/T2_coronal/series",
            "Jorg/2/T2_coronal",
            "02/x/dup/1",
        }

        data = json.loads(config.read_text())
        data["SourceOptions"]["LayoutTemplate"] = "{subject}/{session}/{acquisition}"
        config.write_text(json.dumps(data, indent=4))
        assert len(wanted) == 6
        resync_renames_in_place(nenv, server, config, wanted)
        # the sync wrote the DICOMFormatString the new layout needs into the config
        assert json.loads(config.read_text())["DICOMToBIDSOptions"]["DICOMFormatString"] == "{subject}/{session}/"
