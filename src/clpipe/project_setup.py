"""``clpipe project_setup``: the project layout users know, with the sync step filled in.

A new project gets a shallow, BIDS-ready dropoff layout (``LayoutTemplate``): one folder per
subject, session and series, subject and session as BIDS labels (``sub-01`` -> ``01``), and
the matching ``DICOMFormatString`` for clpipe's BIDS step. From a session's folder the
slices are at most two folders down (Flywheel: ``<acquisition>/<zip name>/``, the zip of a
series unpacked into a folder named after it; DICOM sources: ``<series>/``), well within
the default search depth of dcm2niix (``-d 5``) and so of dcm2bids, which runs it. A config
without ``LayoutTemplate`` (every project made before) keeps Flywheel's own layout.
"""

from __future__ import annotations

import json
from pathlib import Path

from .batch.config import LOCAL_NAMES, builtin_profile_text
from .errors import ConfigError
from .layout import dicom_format_string
from .sources.flywheel import parse_fw_url

LOG_FOLDERS = ("sync_logs", "DCM2BIDS_logs", "bids_validation_logs", "FMRIprep_logs", "postproc_logs")

#: the layout of a new project synced from Flywheel: a zipped series is unpacked into a
#: folder named after the zip below its acquisition's folder (sources/flywheel.py)
FLYWHEEL_TEMPLATE = "{subject}/{session}/{acquisition}"
#: the DICOMFormatString of Flywheel's own layout (`fw sync`; a config without LayoutTemplate)
FW_DICOM_FORMAT_STRING = "SUBJECTS/{subject}/SESSIONS/{session}/"


def is_flywheel_url(source_url: str) -> bool:
    text = source_url.strip().lower()
    return text.startswith("fw:") or "://" not in text


def default_layout(source_url: str) -> str:
    """The LayoutTemplate a new project gets: one folder per subject, session and series."""
    if is_flywheel_url(source_url):
        return FLYWHEEL_TEMPLATE
    from .sources.dicom import DEFAULT_TEMPLATE

    return DEFAULT_TEMPLATE


def project_config(title: str, project_dir: Path, source_url: str) -> dict:
    """A legacy-style (CamelCase) clpipe_config.json, the form the documentation shows, with
    the default layout for ``source_url`` and its DICOMFormatString."""
    template = default_layout(source_url)
    return {
        "ProjectTitle": title,
        "Authors/Contributors": "SET AUTHOR",
        "ProjectDirectory": str(project_dir),
        "EmailAddress": "SET EMAIL ADDRESS",
        "SourceOptions": {
            "SourceURL": source_url,
            "DropoffDirectory": str(project_dir / "data_DICOMs"),
            "TempDirectory": str(project_dir / "flywheel_tmp"),
            "CommandLineOpts": "-y",
            "TimeUsage": "1:0:0",
            "MemUsage": "10000",
            "CoreUsage": "1",
            "LayoutTemplate": template,
        },
        "DICOMToBIDSOptions": {
            "DICOMDirectory": str(project_dir / "data_DICOMs"),
            "BIDSDirectory": str(project_dir / "data_BIDS"),
            "ConversionConfig": str(project_dir / "conversion_config.json"),
            "DICOMFormatString": dicom_format_string(template),
            "TimeUsage": "1:0:0",
            "MemUsage": "5000",
            "CoreUsage": "2",
            "LogDirectory": str(project_dir / "logs" / "DCM2BIDS_logs"),
        },
        "BatchConfig": "",
    }


def setup_project(title: str, project_dir: str, source_url: str | None = None, profile: str = "local") -> Path:
    """Create the project folder tree and its clpipe_config.json; never overwrite one.

    ``profile`` is ``local`` (no batch system) or a built-in batch profile, which is copied
    to ``.clpipe/batch_config.json`` for the lab to adjust, and named in ``BatchConfig``.
    """
    profile_text = None if profile.strip().lower() in LOCAL_NAMES else builtin_profile_text(profile.strip())
    if not title or not title.strip():
        raise ConfigError("-project_title: give the project a name, e.g. -project_title my_study")
    root = Path(project_dir).expanduser().absolute()
    url = source_url or "fw://<group>/<project>/"
    if source_url is not None:
        if is_flywheel_url(source_url):
            try:
                parse_fw_url(source_url)
            except ValueError as exc:
                raise ConfigError(f"-source_url: {source_url!r} is not valid: {exc}") from None
        else:  # a DICOM source for `clpipe dicom sync`
            from .sources.dicom import parse_source_url

            parse_source_url(source_url, "-source_url")
    config_path = root / "clpipe_config.json"
    if config_path.exists():
        raise ConfigError(f"{config_path} already exists; choose another -project_dir or edit that file")
    if root.exists() and not root.is_dir():
        raise ConfigError(f"-project_dir: {root} is a file, not a folder")
    try:
        for sub in ("data_DICOMs", "data_BIDS", "scripts", ".clpipe", *(f"logs/{name}" for name in LOG_FOLDERS)):
            (root / sub).mkdir(parents=True, exist_ok=True)
        conversion = root / "conversion_config.json"
        if not conversion.exists():
            conversion.write_text(json.dumps({"descriptions": []}, indent=4) + "\n")
        config = project_config(title.strip(), root, url)
        if profile_text is not None:
            batch_path = root / ".clpipe" / "batch_config.json"
            batch_path.write_text(profile_text)
            config["BatchConfig"] = str(batch_path)
        config_path.write_text(json.dumps(config, indent=4) + "\n")
    except OSError as exc:
        raise ConfigError(f"-project_dir: cannot create the project in {root}: {exc.strerror}") from None
    return config_path
