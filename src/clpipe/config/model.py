"""The validation model of the source block, derived from the declarations in
:mod:`clpipe.config.options`, and the validated project config the other steps receive."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, create_model

from ..sources.flywheel import FlywheelURL
from .options import (
    SOURCE_OPTION,
    SOURCE_OPTIONS,
    SOURCE_SECTION,
    Option,
    Style,
    key_name,
)

if TYPE_CHECKING:
    from ..sources.dicom import SourceURL


def _field(option: Option) -> Any:
    kind = option.type if option.check is None else Annotated[option.type, BeforeValidator(option.check)]
    return (kind, option.default)


# Validation of the source block (values already under their names in code): one field per
# declared key, in the declared order (the first wrong key in that order is reported), each
# checked by its declared check. Unknown keys are refused.
SourceModel: type[BaseModel] = create_model(
    "SourceModel",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Validation of the source block (values already under canonical names).",
    **{option.snake: _field(option) for option in SOURCE_OPTIONS},
)


def _default(name: str) -> Any:
    return SOURCE_OPTION[name].default


@dataclass(frozen=True)
class SourceConfig:
    """The validated, resolved source block (absolute paths)."""

    url: FlywheelURL | SourceURL  # a Flywheel project, or a DICOM source
    dropoff_directory: Path
    temp_directory: Path
    commandline_opts: str
    time_seconds: int
    mem_mb: int
    cores: int
    raw_time: str  # as the user wrote it, for display
    raw_mem: str
    engine: str = _default("engine")
    layout_template: str = _default("layout_template")
    max_delete: int = _default("max_delete")
    query: Any = None  # DicomQuery, for the DICOM sources
    calling_aet: str = _default("calling_aet")
    retrieve_method: str = _default("retrieve_method")
    move_port: int = _default("move_port")
    tls_ca_file: str = _default("tls_ca_file")
    tls_cert_file: str = _default("tls_cert_file")
    tls_key_file: str = _default("tls_key_file")
    network_timeout: float = float(_default("network_timeout"))
    shards: int = 0  # Shards (clpipe/arrays.py)
    array_throttle: int = 0  # ArrayThrottle
    every: int = 0  # Every, in seconds (clpipe/schedule.py); 0: none
    stable_after: int = 1800  # seconds (StableAfter; 0: off)
    max_duration: int = 0  # MaxDuration, in seconds (sync/stopping.py); 0: none
    continue_job: bool = True  # Continue: a batch job stopped at its time limit requeues itself (clpipe/continuation.py)
    max_continuations: int = 10  # MaxContinuations

    @property
    def is_flywheel(self) -> bool:
        return isinstance(self.url, FlywheelURL)


@dataclass(frozen=True)
class ProjectConfig:
    """What the sync step needs from ``clpipe_config.json``."""

    path: Path
    style: Style
    project_directory: Path
    project_title: str
    email_address: str | None
    batch_config: str | None
    source: SourceConfig
    bids_directory: Path | None = None  # DICOMToBIDSOptions.BIDSDirectory (convert2bids.bids_directory)
    dicom_format_string: str = ""  # DICOMToBIDSOptions.DICOMFormatString
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def sync_logs(self) -> Path:
        return self.project_directory / "logs" / "sync_logs"

    def key(self, canonical: str) -> str:
        """The user's own spelling of a source key, for messages: ``SourceOptions.TimeUsage``."""
        section = SOURCE_SECTION[0] if self.style == "legacy" else SOURCE_SECTION[1]
        return f"{section}.{key_name(canonical, self.style)}"
