"""Which source serves a URL scheme: one line per scheme, the module imported only when used.

As fsspec's ``known_implementations``: each URL scheme maps to ``"module:Class"`` and the
third-party packages that module needs. Nothing is imported until a source is asked for,
so listing the schemes (or checking a Flywheel URL) never loads pynetdicom; and when the
import fails because a package is missing, the error is one line naming the package to
install, not an ``ImportError`` traceback.

Adding a source scheme is one module (a class with the methods of
:class:`clpipe.sources.base.Source` and its abilities, and a ``check(url, settings)``
classmethod for what can be checked before a job is queued) and one line here.

This module imports no source: the sources import it (or :mod:`clpipe.sources.dicom`
does, in a function), never the other way round.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class Registration:
    """One URL scheme: where its source class lives and what it needs installed."""

    target: str  # "package.module:Class"
    packages: tuple[str, ...] = ()  # the third-party packages its module imports (as pip names them)


#: URL scheme (as written before ``://``) -> its source
SOURCES: dict[str, Registration] = {
    "fw": Registration("clpipe.sources.flywheel:FlywheelSource", ("httpx",)),
    "dicomweb+http": Registration("clpipe.sources.dicomweb:DicomWebSource", ("httpx", "pydicom")),
    "dicomweb+https": Registration("clpipe.sources.dicomweb:DicomWebSource", ("httpx", "pydicom")),
    "dimse": Registration("clpipe.sources.dimse:DimseSource", ("pynetdicom", "pydicom")),
    "file": Registration("clpipe.sources.localdir:FolderSource", ("pydicom",)),
}


def url_scheme(url: object) -> str:
    """The scheme of a URL as the registry knows it (lower case), "" when it has none."""
    text = str(url).strip()
    return text.split("://", 1)[0].lower() if "://" in text else ""


def registration(scheme: str) -> Registration:
    """The registration of ``scheme``; ``ConfigError`` for a scheme no source serves."""
    try:
        return SOURCES[scheme.lower()]
    except KeyError:
        raise ConfigError(f"no clpipe source serves {scheme}:// URLs (known: {', '.join(s + '://' for s in SOURCES)})") from None


def source_class(scheme: str) -> Any:
    """The source class serving ``scheme``, its module imported now (once: Python caches
    it). A third-party package missing from the environment is one line naming it."""
    entry = registration(scheme)
    module_name, _, class_name = entry.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".", 1)[0]
        if not missing or missing == "clpipe":
            raise
        package = next((p for p in entry.packages if p.lower() == missing.lower()), missing)
        raise ConfigError(
            f"{scheme}:// sources need the Python package {package!r}, which is not installed; "
            f"install it (pip install {package}) in the environment that runs clpipe"
        ) from None
    return getattr(module, class_name)
