"""Configuration: the project's clpipe_config.json and the values in it.

The parts: ``options`` (one declaration per SourceOptions key, from which the rest is
derived), ``model`` (the validation model and the validated config), ``loader`` (reading
and validating a file), ``conversion`` (the BIDS step's DICOMFormatString the sync keeps in
step), ``units`` (times, memory sizes, core counts).

The validation models are imported on first use only, so a batch job that merely runs a
plan does not pay for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loader import load_project_config
    from .model import ProjectConfig, SourceConfig

__all__ = ["ProjectConfig", "SourceConfig", "load_project_config"]


def __getattr__(name: str) -> Any:
    if name == "load_project_config":
        from . import loader

        return loader.load_project_config
    if name in __all__:
        from . import model

        return getattr(model, name)
    raise AttributeError(name)
