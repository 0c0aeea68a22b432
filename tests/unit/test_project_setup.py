"""`clpipe project_setup` gives a new project a shallow, BIDS-ready layout (LayoutTemplate and
the matching DICOMFormatString) for every kind of source; a config without LayoutTemplate
keeps Flywheel's layout (issue 13, point 4). The sync into that layout and its conversion by
dcm2niix: tests/integration/test_layout_default.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clpipe.config import load_project_config
from clpipe.layout import dicom_format_string
from clpipe.plan import make_plan
from clpipe.sources.dicom import DEFAULT_TEMPLATE

FW_TEMPLATE = "{subject}/{session}/{acquisition}"
FW_FORMAT = "SUBJECTS/{subject}/SESSIONS/{session}/"


def clpipe(*args):
    proc = subprocess.run([sys.executable, "-m", "clpipe", *map(str, args)], capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def setup(root, *url):
    code, _, err = clpipe("project_setup", "-project_title", "t", "-project_dir", root, *(("-source_url", *url) if url else ()))
    assert code == 0, err
    config = root / "clpipe_config.json"
    return config, json.loads(config.read_text())


@pytest.mark.parametrize("url", ["fw://lab/study/", "fw://lab/study", None])
def test_a_flywheel_project_gets_one_folder_per_subject_session_and_acquisition(tmp_path, url):
    config, data = setup(tmp_path / "p", *([url] if url else []))
    assert data["SourceOptions"]["LayoutTemplate"] == FW_TEMPLATE
    assert data["DICOMToBIDSOptions"]["DICOMFormatString"] == "{subject}/{session}/" == dicom_format_string(FW_TEMPLATE)
    if url is None:
        return  # the placeholder URL is refused by the sync until it is replaced
    loaded = load_project_config(config)
    assert loaded.source.layout_template == FW_TEMPLATE and loaded.source.engine == "native"
    assert make_plan(loaded).layout_template == FW_TEMPLATE
    code, out, err = clpipe("dicom", "flywheel_sync", "-c", config)
    assert code == 0, err
    assert "Layout:    {subject}/{session}/{acquisition} (DICOMFormatString '{subject}/{session}/')" in out


@pytest.mark.parametrize(
    "url",
    [
        "dicomweb+http://127.0.0.1:8042/dicom-web",
        "dicomweb+https://pacs.example.org/wado",
        "dimse://PACS@127.0.0.1:104",
        "file:///srv/export",
    ],
)
def test_a_dicom_project_gets_the_dicom_default_layout_written_out(tmp_path, url):
    config, data = setup(tmp_path / "p", url)
    assert data["SourceOptions"]["LayoutTemplate"] == DEFAULT_TEMPLATE == "{subject}/{session}/{series}"
    assert data["DICOMToBIDSOptions"]["DICOMFormatString"] == "{subject}/{session}/"
    loaded = load_project_config(config)
    assert loaded.source.layout_template == DEFAULT_TEMPLATE
    code, out, err = clpipe("dicom", "sync", "-c", config)
    assert code == 0, err
    assert "Layout:    {subject}/{session}/{series} (DICOMFormatString '{subject}/{session}/')" in out


def test_a_config_without_layout_template_keeps_flywheels_layout(tmp_path):
    config, data = setup(tmp_path / "p", "fw://lab/study/")
    del data["SourceOptions"]["LayoutTemplate"]  # as every project made before
    data["DICOMToBIDSOptions"]["DICOMFormatString"] = FW_FORMAT
    config.write_text(json.dumps(data, indent=4))
    loaded = load_project_config(config)
    assert loaded.source.layout_template == ""
    assert make_plan(loaded).layout_template == ""  # the engine lists files in Flywheel's layout
    code, out, err = clpipe("dicom", "flywheel_sync", "-c", config)
    assert code == 0, err
    assert "Layout:" not in out
    code, out, err = clpipe("dicom", "flywheel_sync", "-c", config, "-engine", "fw-cli")
    assert code == 0 and "Command:   fw sync" in out, err
    assert json.loads(config.read_text())["DICOMToBIDSOptions"]["DICOMFormatString"] == FW_FORMAT


def test_fw_cli_on_a_new_project_says_what_to_change(tmp_path):
    config, _ = setup(tmp_path / "p", "fw://lab/study/")
    code, out, err = clpipe("dicom", "flywheel_sync", "-c", config, "-engine", "fw-cli")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "SourceOptions.LayoutTemplate: a layout template needs the native engine" in err
    assert "remove LayoutTemplate to use fw sync" in err and FW_FORMAT in err


def test_project_setup_keeps_the_source_url_check(tmp_path):
    code, _, err = clpipe("project_setup", "-project_title", "t", "-project_dir", tmp_path / "p", "-source_url", "dimse://host:1")
    assert code == 2 and "dimse://CALLED_AET@host:port" in err
    assert not (tmp_path / "p" / "clpipe_config.json").exists()
