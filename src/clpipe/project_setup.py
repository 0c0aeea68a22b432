"""``clpipe project_setup``: the project layout users know, with the sync step filled in."""

from __future__ import annotations

import json
from pathlib import Path

from .batch.config import LOCAL_NAMES, builtin_profile_text
from .errors import ConfigError
from .sources.flywheel import parse_fw_url

LOG_FOLDERS = ("sync_logs", "DCM2BIDS_logs", "bids_validation_logs", "FMRIprep_logs", "postproc_logs")


def project_config(title: str, project_dir: Path, source_url: str) -> dict:
    """A legacy-style (CamelCase) clpipe_config.json, the form the documentation shows."""
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
        },
        "DICOMToBIDSOptions": {
            "DICOMDirectory": str(project_dir / "data_DICOMs"),
            "BIDSDirectory": str(project_dir / "data_BIDS"),
            "ConversionConfig": str(project_dir / "conversion_config.json"),
            # the layout `fw sync fw://group/project/` writes
            "DICOMFormatString": "SUBJECTS/{subject}/SESSIONS/{session}/",
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
        if source_url.strip().lower().startswith("fw:") or "://" not in source_url:
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
