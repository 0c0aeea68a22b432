"""Configuration: both key styles, path resolution, flag overrides, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from clpipe.config import load_project_config
from clpipe.config.units import format_hms, parse_cores, parse_mem_mb, parse_time
from clpipe.errors import ConfigError


def write_legacy(tmp_path: Path, **source) -> Path:
    block = {
        "SourceURL": "fw://lab/study/",
        "DropoffDirectory": "data_DICOMs",
        "TempDirectory": "",
        "CommandLineOpts": "-y",
        "TimeUsage": "1:0:0",
        "MemUsage": "10000",
        "CoreUsage": "1",
    }
    block.update(source)
    data = {
        "ProjectTitle": "t",
        "ProjectDirectory": str(tmp_path),
        "EmailAddress": "a@b.edu",
        "SourceOptions": block,
        "DICOMToBIDSOptions": {"DICOMDirectory": ""},
        "BatchConfig": "",
        "RunLog": [],
    }
    path = tmp_path / "clpipe_config.json"
    path.write_text(json.dumps(data))
    return path


def write_snake(tmp_path: Path, suffix=".json", **source) -> Path:
    block = {
        "source_url": "fw://lab/study",
        "dropoff_directory": "",
        "temp_directory": "",
        "commandline_opts": "-y",
        "time_usage": "1:0:0",
        "mem_usage": "10G",
        "core_usage": "2",
    }
    block.update(source)
    data = {
        "clpipe_version": "1.9.1",
        "project_title": "t",
        "project_directory": "",
        "email_address": "SET EMAIL ADDRESS",
        "source": block,
        "convert2bids": {},
        "batch_config_path": "",
    }
    path = tmp_path / f"clpipe_config{suffix}"
    path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
    return path


def test_legacy_file_resolves_paths_against_project(tmp_path):
    cfg = load_project_config(write_legacy(tmp_path))
    assert cfg.style == "legacy"
    assert cfg.source.url.group == "lab" and cfg.source.url.project == "study" and cfg.source.url.trailing_slash
    assert cfg.source.dropoff_directory == tmp_path / "data_DICOMs"
    assert cfg.source.temp_directory == tmp_path / "flywheel_tmp"  # empty -> 1.9 default
    assert cfg.source.mem_mb == 10000 and cfg.source.cores == 1 and cfg.source.time_seconds == 3600
    assert cfg.sync_logs == tmp_path / "logs" / "sync_logs"
    assert cfg.email_address == "a@b.edu"


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_snake_case_file_and_yaml(tmp_path, suffix):
    cfg = load_project_config(write_snake(tmp_path, suffix=suffix))
    assert cfg.style == "snake"
    assert not cfg.source.url.trailing_slash
    # empty project_directory -> the config file's folder; empty dropoff -> data_DICOMs
    assert cfg.project_directory == tmp_path
    assert cfg.source.dropoff_directory == tmp_path / "data_DICOMs"
    assert cfg.source.mem_mb == 10 * 1024 and cfg.source.cores == 2
    assert cfg.email_address is None  # the placeholder is not an address


def test_flags_override_file(tmp_path):
    cfg = load_project_config(write_legacy(tmp_path), source_url="fw://other/proj", dropoff_dir="elsewhere", temp_dir="/tmp/x")
    assert str(cfg.source.url) == "fw://other/proj"
    assert cfg.source.dropoff_directory == tmp_path / "elsewhere"
    assert cfg.source.temp_directory == Path("/tmp/x")


@pytest.mark.parametrize(
    "source, expected",
    [
        ({"SourceURL": "fw://"}, "SourceOptions.SourceURL: 'fw://' is not valid: it does not name a project"),
        (
            {"SourceURL": "https://lab/study"},
            "SourceOptions.SourceURL: 'https://lab/study' is not valid: 'https://lab/study' is not a source URL clpipe knows; use fw://group/project/",
        ),
        ({"SourceURL": "fw://lab/study/subj"}, "points below a project"),
        ({"SourceURL": "fw://Lab Group/study"}, "is not a Flywheel group id"),
        ({"TimeUsage": "25:99:00"}, "SourceOptions.TimeUsage: '25:99:00' is not valid: minutes must be below 60"),
        ({"TimeUsage": "soon"}, "SourceOptions.TimeUsage: 'soon' is not valid: expected a scheduler time"),
        ({"TimeUsage": "0:0:0"}, "more than 0"),
        ({"MemUsage": "lots"}, "SourceOptions.MemUsage: 'lots' is not valid: expected a size"),
        ({"CoreUsage": "0"}, "SourceOptions.CoreUsage: '0' is not valid: expected a whole number of cores"),
        ({"CoreUsage": 1.5}, "SourceOptions.CoreUsage: 1.5 is not valid"),
        ({"SourceUrl": "fw://lab/study"}, "unknown key 'SourceUrl' in SourceOptions; did you mean 'SourceURL'?"),
        ({"DropofDirectory": "x"}, "did you mean 'DropoffDirectory'?"),
    ],
)
def test_invalid_source_values_name_the_key(tmp_path, source, expected):
    with pytest.raises(ConfigError) as info:
        load_project_config(write_legacy(tmp_path, **source))
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert info.value.exit_code == 2


def test_snake_case_errors_use_snake_names(tmp_path):
    with pytest.raises(ConfigError, match=r"source\.mem_usage: '10 gigs' is not valid"):
        load_project_config(write_snake(tmp_path, mem_usage="10 gigs"))
    with pytest.raises(ConfigError, match=r"unknown key 'sourceurl' in source; did you mean 'source_url'\?"):
        load_project_config(write_snake(tmp_path, sourceurl="fw://a/b"))


def test_unknown_top_level_key_suggests_nearest(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"ProjectTitle": "t", "SourceOption": {}}))
    with pytest.raises(ConfigError, match=r"unknown key 'SourceOption' in the top level; did you mean 'SourceOptions'\?"):
        load_project_config(path)


def test_other_pipeline_sections_are_accepted(tmp_path):
    path = write_legacy(tmp_path)
    data = json.loads(path.read_text())
    data.update({"FMRIPrepOptions": {"X": 1}, "PostProcessingOptions": {}, "ProcessingStreams": [], "Authors/Contributors": "me"})
    path.write_text(json.dumps(data))
    assert load_project_config(path).project_title == "t"


def test_bad_json_reports_line_and_column(tmp_path):
    path = tmp_path / "clpipe_config.json"
    path.write_text('{\n  "ProjectTitle": "t",\n  "SourceOptions": {"SourceURL": "fw://a/b",}\n}\n')
    with pytest.raises(ConfigError, match=r"not valid JSON at line 3, column \d+"):
        load_project_config(path)


def test_bad_yaml_reports_line(tmp_path):
    path = tmp_path / "clpipe_config.yaml"
    path.write_text("source:\n  source_url: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_project_config(path)


def test_missing_file_and_non_object(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_project_config(tmp_path / "nope.json")
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_project_config(path)


def test_both_styles_in_one_file_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"SourceOptions": {}, "source": {}}))
    with pytest.raises(ConfigError, match="keep one of them"):
        load_project_config(path)


def test_dropoff_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"SourceOptions\.DropoffDirectory: .*a_file is a file, not a folder"):
        load_project_config(write_legacy(tmp_path, DropoffDirectory=str(blocker / "dicoms")))
    with pytest.raises(ConfigError, match=r"-dropoff_dir: "):
        load_project_config(write_legacy(tmp_path), dropoff_dir=str(blocker / "sub"))


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("1:0:0", 3600),
        ("90", 5400),
        ("90:30", 5430),
        ("1-12", 129600),
        ("2-0:30", 174600),
        ("1-0:0:1", 86401),
        (45, 2700),
        ("48:00:00", 172800),
    ],
)
def test_time_forms(text, seconds):
    assert parse_time(text) == seconds


def test_time_round_trip_and_bad_forms():
    assert format_hms(parse_time("1-2:03:04")) == "26:03:04"
    for bad in ("", "1:2:3:4", "1-25", "a:b", "-5", "1:60", True, None, 1.5):
        with pytest.raises(ValueError):
            parse_time(bad)


@pytest.mark.parametrize(
    "text, mb",
    [
        ("10000", 10000),
        (10000, 10000),
        ("10G", 10240),
        ("10gb", 10240),
        ("500M", 500),
        ("1.5G", 1536),
        ("2T", 2097152),
        ("512K", 1),
        ("4GiB", 4096),
    ],
)
def test_memory_forms(text, mb):
    assert parse_mem_mb(text) == mb


def test_memory_and_cores_bad_forms():
    for bad in ("ten", "10X", "0", "", "-1G", None, True):
        with pytest.raises(ValueError):
            parse_mem_mb(bad)
    assert parse_cores("4") == 4 and parse_cores(2) == 2
    for bad in ("0", -1, "two", 1.0, True, ""):
        with pytest.raises(ValueError):
            parse_cores(bad)


def test_the_engines_a_config_may_name_are_the_engines_there_are():
    """Engine names are declared for the config (validation, -engine choices) and mapped to
    their modules in clpipe.engines: the two lists must not drift apart."""
    import importlib

    from clpipe.config.options import ENGINES as declared
    from clpipe.engines import ENGINES as modules

    assert sorted(declared) == sorted(modules)
    for module in modules.values():
        assert callable(importlib.import_module(module).run)
