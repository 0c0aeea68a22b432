"""``clpipe_config.json`` (or ``.yaml``): the names that code and tests import from here.

The parts live in their own modules: the key declarations in :mod:`.options`, the
validation model and the validated config in :mod:`.model`, reading and validating a file
in :mod:`.loader`, and the writer of the BIDS conversion step's DICOMFormatString in
:mod:`.conversion`.
"""

from __future__ import annotations

from .conversion import write_dicom_format_string
from .loader import check_writable_dir, load_project_config
from .model import ProjectConfig, SourceConfig, SourceModel
from .options import (
    ENGINES,
    OTHER_TOP_LEGACY,
    OTHER_TOP_SNAKE,
    QUERY_KEYS,
    RETRIEVE_METHODS,
    SOURCE_DEFAULTS,
    SOURCE_KEYS,
    SOURCE_SECTION,
    TOP_KEYS,
    Style,
    key_name,
)

__all__ = [
    "ENGINES",
    "OTHER_TOP_LEGACY",
    "OTHER_TOP_SNAKE",
    "QUERY_KEYS",
    "RETRIEVE_METHODS",
    "SOURCE_DEFAULTS",
    "SOURCE_KEYS",
    "SOURCE_SECTION",
    "TOP_KEYS",
    "ProjectConfig",
    "SourceConfig",
    "SourceModel",
    "Style",
    "check_writable_dir",
    "key_name",
    "load_project_config",
    "write_dicom_format_string",
]
