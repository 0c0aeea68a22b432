"""The command line without a server: project_setup, the printed job, option checks, errors."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from clpipe.config import load_project_config
from clpipe.engines.fwcli import read_audit_csv
from clpipe.errors import ConfigError
from clpipe.plan import make_plan, parse_commandline_opts


def clpipe(*args, cwd=None, env=None):
    """Run the real console entry point in a subprocess; return (code, stdout, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "clpipe", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_project_setup_creates_layout_with_source_filled_in(tmp_path):
    project = tmp_path / "study"
    code, out, err = clpipe("project_setup", "-project_title", "My Study", "-project_dir", project, "-source_url", "fw://lab/study/")
    assert code == 0, err
    for sub in ("data_DICOMs", "data_BIDS", "logs/sync_logs", "scripts", "conversion_config.json"):
        assert (project / sub).exists(), sub
    config = json.loads((project / "clpipe_config.json").read_text())
    source = config["SourceOptions"]
    assert source["SourceURL"] == "fw://lab/study/"
    assert source["DropoffDirectory"] == str(project / "data_DICOMs")
    assert source["TempDirectory"] == str(project / "flywheel_tmp")
    assert all(value != "" for value in source.values())
    # the file it writes is one the sync step accepts as it is
    loaded = load_project_config(project / "clpipe_config.json")
    assert loaded.source.dropoff_directory == project / "data_DICOMs"
    # and it never overwrites an existing project
    code, out, err = clpipe("project_setup", "-project_title", "x", "-project_dir", project)
    assert code == 2 and "already exists" in err


def test_project_setup_rejects_bad_url(tmp_path):
    code, out, err = clpipe("project_setup", "-project_title", "x", "-project_dir", tmp_path / "p", "-source_url", "fw://lab")
    assert code == 2
    assert "-source_url: 'fw://lab' is not valid" in err
    assert not (tmp_path / "p" / "clpipe_config.json").exists()


@pytest.fixture
def project(tmp_path):
    """A project as project_setup made it before it wrote a LayoutTemplate: Flywheel's layout,
    which both engines write (the new default is tested in test_project_setup.py)."""
    root = tmp_path / "proj with space"
    code, _, err = clpipe("project_setup", "-project_title", "p", "-project_dir", root, "-source_url", "fw://lab/study/")
    assert code == 0, err
    config = root / "clpipe_config.json"
    data = json.loads(config.read_text())
    del data["SourceOptions"]["LayoutTemplate"]
    data["DICOMToBIDSOptions"]["DICOMFormatString"] = "SUBJECTS/{subject}/SESSIONS/{session}/"
    config.write_text(json.dumps(data, indent=4))
    return root


def test_without_submit_prints_the_job_and_touches_nothing(project):
    before = sorted(p.relative_to(project) for p in project.rglob("*"))
    code, out, err = clpipe("dicom", "flywheel_sync", "-c", project / "clpipe_config.json")
    assert code == 0, err
    assert "Engine:    native (clpipe's own; no fw needed), 4 parallel downloads" in out  # the default
    code, out, err = clpipe("dicom", "flywheel_sync", "-c", project / "clpipe_config.json", "-engine", "fw-cli")
    assert code == 0, err
    command = next(line for line in out.splitlines() if line.startswith("Command:"))
    argv = shlex.split(command.split(":", 1)[1])
    assert argv[:4] == ["fw", "sync", "--include", "dicom"]
    assert argv[argv.index("--tmp-path") + 1] == str(project / "flywheel_tmp")
    audit = argv[argv.index("--save-audit-logs") + 1]
    assert audit.startswith(str(project / "logs" / "sync_logs")) and audit.endswith(".csv")
    assert argv[-2:] == ["fw://lab/study/", str(project / "data_DICOMs")]
    assert argv.count("-y") == 1
    assert "time 1:00:00, memory 10000 MB, cores 1" in out
    assert "Nothing was run" in out
    assert sorted(p.relative_to(project) for p in project.rglob("*")) == before


def test_clpipe_style_and_gnu_style_options_are_aliases(project):
    cfg = project / "clpipe_config.json"
    a = clpipe(
        "dicom", "flywheel_sync", "-config_file", cfg, "-source_url", "fw://g/p", "-dropoff_dir", project / "d", "-temp_dir", project / "t"
    )
    b = clpipe(
        "dicom",
        "flywheel_sync",
        "--config-file",
        cfg,
        "--source-url",
        "fw://g/p",
        "--dropoff-dir",
        project / "d",
        "--temp-dir",
        project / "t",
    )
    assert a[0] == b[0] == 0
    strip = lambda out: [l for l in out.splitlines() if l.startswith(("Source", "Dropoff", "Temp"))]  # noqa: E731, E741
    assert strip(a[1]) == strip(b[1])
    assert f"Dropoff:   {project / 'd'}" in a[1]
    assert "Source:    fw://g/p" in a[1]


def test_config_found_in_current_directory(project):
    code, out, err = clpipe("dicom", "flywheel_sync", cwd=project)
    assert code == 0, err
    code, out, err = clpipe("dicom", "flywheel_sync", cwd=project.parent)
    assert code == 2 and "pass -config_file" in err


def test_errors_are_one_line_without_traceback_unless_debug(project):
    cfg = project / "clpipe_config.json"
    data = json.loads(cfg.read_text())
    data["SourceOptions"]["TimeUsage"] = "forever"
    cfg.write_text(json.dumps(data))
    code, out, err = clpipe("dicom", "flywheel_sync", "-c", cfg)
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "SourceOptions.TimeUsage: 'forever' is not valid" in err
    assert "Traceback" not in err
    code, out, err = clpipe("dicom", "flywheel_sync", "-c", cfg, "-debug")
    assert code == 2 and "Traceback" in err


@pytest.mark.parametrize(
    "opts, expected",
    [
        ("--delete", "--delete together with unpacking is refused"),
        ("--bogus", "'--bogus' is not an fw sync option"),
        ("-j", "expected one argument"),
        ("--tmp-path /x", "set TempDirectory instead"),
        ("--save-audit-logs a.csv", "--save-audit-logs is set by clpipe"),
        ("-i 'unclosed", "cannot be split into options"),
        ("--include-container-tags notjson", "container tags must be JSON"),
    ],
)
def test_bad_commandline_opts(project, opts, expected):
    cfg = project / "clpipe_config.json"
    data = json.loads(cfg.read_text())
    data["SourceOptions"].update(CommandLineOpts=opts, Engine="fw-cli")  # fw sync's own rules
    cfg.write_text(json.dumps(data))
    code, out, err = clpipe("dicom", "flywheel_sync", "-c", cfg)
    assert code == 2, out
    assert "SourceOptions.CommandLineOpts" in err and expected in err


def test_commandline_opts_parsed_like_fw():
    opts = parse_commandline_opts('-y -z --delete -e nifti -j 8 --include-container-tags \'{"subject": ["ok"]}\' -n', "x")
    assert not opts.unpack and not opts.transfers
    assert opts.include == ("dicom",) and opts.exclude == ("nifti",)
    assert opts.container_filters == ({"tags": {"plus": ["ok"]}, "type": "subject"},)
    with pytest.raises(ConfigError):
        parse_commandline_opts("--delete", "x")


def test_user_options_come_before_positionals(project):
    cfg = project / "clpipe_config.json"
    data = json.loads(cfg.read_text())
    data["SourceOptions"].update(CommandLineOpts='-y -j 2 --exclude-container-tags \'{"session": ["bad scan"]}\'', Engine="fw-cli")
    cfg.write_text(json.dumps(data))
    plan = make_plan(load_project_config(cfg))
    argv = list(plan.fw_argv)
    assert argv[-2:] == ["fw://lab/study/", str(project / "data_DICOMs")]
    assert argv[argv.index("-j") + 1] == "2"
    assert '{"session": ["bad scan"]}' in argv  # one argument, quotes intact
    assert "-y" in argv and argv.count("-y") == 1


def test_audit_csv_with_commas_in_names(tmp_path):
    csv = tmp_path / "a.csv"
    csv.write_text(
        "src_path,dest_path,status,existing,error_message,action_taken\n"
        "SUBJECTS/a,b/FILES/x.dcm,SUBJECTS/a,b/FILES/x.dcm,completed,False,,Created file on destination\n"
        "S/one.dcm,S/one.dcm,skipped,True,,\n"
        "S/two.dcm,S/two.dcm,canceled,,,\n"
        ",S/old.dcm,completed,,,Deleted from destination\n"
    )
    rows = read_audit_csv(csv)
    assert [(r.dest_path, r.status) for r in rows] == [
        ("SUBJECTS/a,b/FILES/x.dcm", "completed"),
        ("S/one.dcm", "skipped"),
        ("S/two.dcm", "canceled"),
        ("S/old.dcm", "completed"),
    ]
    assert rows[0].existing == "False" and rows[0].action_taken == "Created file on destination"
    assert rows[3].src_path == "" and rows[3].action_taken == "Deleted from destination"


def test_version_and_help():
    code, out, _ = clpipe("--version")
    assert code == 0 and "clpipe" in out
    code, out, _ = clpipe("dicom", "flywheel_sync", "-help")
    assert code == 0 and "-config_file" in out and "-submit" in out and "-temp_dir" in out


@pytest.mark.parametrize(
    "args, expected",
    [
        (["dicom", "sync", "-sourceurl", "file:///x"], "no such option: -sourceurl; did you mean -source_url?"),
        (["dicom", "sync", "-limit", "-3"], "-3 is not in the range x>=0"),
        (["dicom", "flywheel_sync", "-confg_file", "x"], "no such option: -confg_file; did you mean -config_file?"),
        (["dicom", "flywheel_sync", "-engine", "turbo"], "'turbo' is not one of 'fw-cli', 'native'"),
        (["dicom", "sync", "-c", "."], "is a directory"),
    ],
)
def test_a_mistyped_command_line_is_one_line_naming_the_fix(tmp_path, args, expected):
    """click's usage errors print a usage block and a hint on three lines, and name a
    mistyped single-dash word by one of its letters (-o): one line, like every other error."""
    code, out, err = clpipe(*args, cwd=tmp_path)
    assert code == 2
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith("clpipe: error: ") and expected in line and "-help`" in line, err
