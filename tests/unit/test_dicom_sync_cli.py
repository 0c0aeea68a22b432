"""`clpipe dicom sync` without a server: source URLs, the Query block and flags, the
printed job, and the messages for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clpipe.config import load_project_config
from clpipe.errors import ConfigError
from clpipe.plan import make_plan
from clpipe.sources.dicom import DicomQuery, labels, parse_source_url, series_folder


def clpipe(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "clpipe", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def project(tmp_path: Path, url: str, **source) -> Path:
    root = tmp_path / "p"
    code, _, err = clpipe("project_setup", "-project_title", "t", "-project_dir", root, "-source_url", "fw://lab/study/")
    assert code == 0, err
    config = root / "clpipe_config.json"
    data = json.loads(config.read_text())
    del data["SourceOptions"]["LayoutTemplate"]  # Flywheel's fields: the DICOM source's default instead
    data["SourceOptions"].update(SourceURL=url, **source)
    config.write_text(json.dumps(data, indent=2))
    return config


@pytest.mark.parametrize(
    "url, kind, detail",
    [
        ("dicomweb+http://127.0.0.1:8042/dicom-web", "dicomweb", "http://127.0.0.1:8042/dicom-web"),
        ("dicomweb+https://pacs.example.org/wado/", "dicomweb", "https://pacs.example.org/wado"),
        ("dimse://ORTHANC@127.0.0.1:4242", "dimse", ("ORTHANC", "127.0.0.1", 4242)),
        ("file:///mnt/scanner/export", "file", "/mnt/scanner/export"),
    ],
)
def test_source_urls(url, kind, detail):
    parsed = parse_source_url(url)
    assert parsed.scheme == kind and str(parsed) == url
    got = {"dicomweb": parsed.base_url, "dimse": (parsed.called_aet, parsed.host, parsed.port), "file": parsed.path}[kind]
    assert got == detail


@pytest.mark.parametrize(
    "url, words",
    [
        ("http://host/dicom-web", "is not a source URL clpipe knows"),
        ("dicomweb+http:///dicom-web", "has no host"),
        ("dicomweb+https://user:secret@host/dicom-web", "CLPIPE_DICOMWEB_TOKEN"),
        ("dimse://127.0.0.1:4242", "dimse://CALLED_AET@host:port"),
        ("dimse://THIS_AE_TITLE_IS_TOO_LONG@host:104", "1-16 ASCII characters"),
        ("dimse://PACS@host:70000", "is not a TCP port"),
        ("file://server/share", "three slashes"),
    ],
)
def test_bad_source_urls_say_what_to_write(url, words):
    with pytest.raises(ConfigError) as info:
        parse_source_url(url)
    assert words in str(info.value)
    assert "secret" not in str(info.value)


def test_query_block_and_flags(tmp_path):
    config = project(
        tmp_path, "file:///mnt/export", Query={"PatientID": "SUBJ*", "StudyDate": "20240101-20241231", "Modality": "MR", "Limit": 5}
    )
    cfg = load_project_config(config, query={"modality": "CT", "series_description": None})
    assert cfg.source.query == DicomQuery(patient_id="SUBJ*", study_date="20240101-20241231", modality="CT", limit=5)
    assert cfg.source.engine == "native"
    plan = make_plan(cfg)
    assert plan.job_name == "dicom_sync" and plan.query["patient_id"] == "SUBJ*" and plan.settings["calling_aet"] == "CLPIPE"


@pytest.mark.parametrize(
    "source, words",
    [
        ({"Query": {"PatientId": "x"}}, "unknown key 'PatientId' in SourceOptions.Query; did you mean 'PatientID'?"),
        ({"Query": {"StudyDate": "2024-01-01"}}, "is not a date range"),
        ({"Query": {"StudyDate": "20241231-20240101"}}, "ends before it starts"),
        ({"Query": {"Limit": -1}}, "expected a whole number of studies"),
        ({"Query": "PatientID=1"}, "expected an object"),
        ({"RetrieveMethod": "push"}, 'expected "get" (C-GET) or "move"'),
        ({"RetrieveMethod": "move"}, "set MovePort"),
        ({"CallingAET": "A" * 17}, "1-16 ASCII characters"),
        ({"TLSCAFile": "/no/such/ca.pem"}, "no such file"),
        ({"Engine": "fw-cli"}, "the fw-cli engine syncs only from Flywheel"),
        ({"NetworkTimeout": 0}, "expected a number of seconds from 1 to 86400"),
        ({"NetworkTimeout": "soon"}, "expected a number of seconds from 1 to 86400"),
        ({"LayoutTemplate": "{subject}/{acquisition}"}, "unknown field {acquisition}"),
        ({"CommandLineOpts": '--include-container-tags \'{"subject": ["x"]}\''}, "filter with the Query block instead"),
    ],
)
def test_bad_dicom_options_name_the_key(tmp_path, source, words):
    config = project(tmp_path, "dimse://PACS@127.0.0.1:104", **source)
    code, out, err = clpipe("dicom", "sync", "-c", config)
    assert code == 2 and words in err and err.count("\n") == 1, err


def test_printed_job_shows_query_layout_and_format_string(tmp_path):
    config = project(tmp_path, "dicomweb+http://127.0.0.1:9/dicom-web", Query={"PatientID": "S*"})
    code, out, err = clpipe("dicom", "sync", "-c", config, "-study_date", "20240101-", "-limit", "2")
    assert code == 0, err
    assert "Job:       dicom_sync" in out and "patient_id='S*'" in out and "study_date='20240101-'" in out and "limit=2" in out
    assert "Layout:    {subject}/{session}/{series} (DICOMFormatString '{subject}/{session}/')" in out
    assert "Nothing was run" in out and not list((config.parent / "logs" / "sync_logs").glob("*"))


def test_flywheel_sync_refuses_other_sources_and_dicom_sync_takes_fw(tmp_path):
    config = project(tmp_path, "file:///mnt/export")
    code, _, err = clpipe("dicom", "flywheel_sync", "-c", config)
    assert code == 2 and "use `clpipe dicom sync`" in err
    code, out, err = clpipe("dicom", "sync", "-c", config, "-source_url", "fw://lab/study/")
    assert code == 0 and "Job:       flywheel_sync" in out, err
    code, _, err = clpipe("dicom", "sync", "-c", config, "-source_url", "fw://lab/study/", "-modality", "MR")
    assert code == 2 and "are for DICOM sources" in err


def test_layout_rules_for_missing_and_odd_attributes():
    odd = {
        "PatientID": "sub-01/../x",
        "StudyDate": "20240131",
        "SeriesNumber": "7",
        "SeriesDescription": "T1w MPRAGE / *é*\x01",
        "SeriesInstanceUID": "1.2.3",
    }
    assert (
        series_folder("{subject}/{session}/{series}", odd) == "01x/20240131/007-T1w_MPRAGE_e"
    )  # portable: tests/integration/test_names.py
    bare = {"SeriesInstanceUID": "1.2.4", "Modality": "MR"}
    assert labels(bare)["subject"] == "unknown" and labels(bare)["session"] == "nodate" and labels(bare)["series"] == "NA-MR"
    assert series_folder("{subject}/{session}/{series}", {}) == "unknown/nodate/NA-series"


def test_project_setup_takes_a_dicom_source(tmp_path):
    code, _, err = clpipe(
        "project_setup", "-project_title", "t", "-project_dir", tmp_path / "p", "-source_url", "dimse://ORTHANC@127.0.0.1:4242"
    )
    assert code == 0, err
    config = json.loads((tmp_path / "p" / "clpipe_config.json").read_text())
    assert config["SourceOptions"]["SourceURL"] == "dimse://ORTHANC@127.0.0.1:4242"
    code, out, err = clpipe("dicom", "sync", "-c", tmp_path / "p" / "clpipe_config.json")
    assert code == 0 and "Job:       dicom_sync" in out, err
    code, _, err = clpipe("project_setup", "-project_title", "t", "-project_dir", tmp_path / "q", "-source_url", "dimse://host:1")
    assert code == 2 and "dimse://CALLED_AET@host:port" in err


def test_network_timeout_reaches_the_source_settings(tmp_path):
    """NetworkTimeout (seconds) is what every connect, read and answer of the job waits."""
    from clpipe.plan import make_plan

    config = project(tmp_path, "dimse://PACS@127.0.0.1:104", NetworkTimeout=900)
    assert make_plan(load_project_config(config)).settings["timeout"] == 900
    assert make_plan(load_project_config(project(tmp_path / "b", "dimse://PACS@127.0.0.1:104"))).settings["timeout"] == 60
