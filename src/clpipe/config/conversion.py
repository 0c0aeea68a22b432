"""The BIDS conversion step's settings in ``clpipe_config.json`` (``DICOMToBIDSOptions``,
``convert2bids`` in clpipe 1.9) that the sync keeps in step with the layout it writes.

``clpipe project_setup`` writes that block with the ``DICOMFormatString`` of the layout it
chose (``LayoutTemplate``); a sync with another layout records the matching one there, so
the next step finds the sessions.
"""

from __future__ import annotations

import json
import os

from .loader import read_mapping
from .model import ProjectConfig


def write_dicom_format_string(config: ProjectConfig, value: str) -> str:
    """Record the DICOMFormatString that matches the sync's layout in the config file, for
    clpipe's BIDS conversion step. JSON files are updated in place (atomically, keys kept
    in order); YAML files are left alone (their comments would be lost). Returns what was
    done, for the user."""
    legacy = config.style == "legacy"
    section, key = ("DICOMToBIDSOptions", "DICOMFormatString") if legacy else ("convert2bids", "dicom_format_string")
    block = config.raw.get(section)
    current = block.get(key) if isinstance(block, dict) else None
    if current == value:
        return ""
    if config.path.suffix.lower() not in (".json", ""):
        return f"set {section}.{key} to {value!r} in {config.path} so the BIDS step finds the sessions"
    data = read_mapping(config.path)
    data.setdefault(section, {})
    if not isinstance(data[section], dict):
        return f"set {section}.{key} to {value!r} in {config.path} so the BIDS step finds the sessions"
    data[section][key] = value
    temp = config.path.with_name(f".{config.path.name}.tmp")
    try:
        temp.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")
        os.replace(temp, config.path)
    except BaseException:  # a full disk: the config stays as it was, and no half-written copy beside it
        temp.unlink(missing_ok=True)
        raise
    before = "was " + repr(current) if current is not None else "not set before"
    return f"{section}.{key} in {config.path} set to {value!r} ({before}) to match LayoutTemplate"
