"""Configuration: the project's clpipe_config.json and the values in it.

The validation models are imported on first use only, so a batch job that merely runs a
plan does not pay for them.
"""

__all__ = ["ProjectConfig", "SourceConfig", "load_project_config"]


def __getattr__(name: str):
    if name in __all__:
        from . import project

        return getattr(project, name)
    raise AttributeError(name)
