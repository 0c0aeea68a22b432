"""Configuration: the project's clpipe_config.json and the values in it."""

from .project import ProjectConfig, SourceConfig, load_project_config

__all__ = ["ProjectConfig", "SourceConfig", "load_project_config"]
