"""What the HTTP sources (Flywheel, DICOMweb) share."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: importing httpx costs ~30 ms at start-up
    import httpx

import importlib
from typing import Any


class LazyModule:
    """A module imported when first used (an attribute read), not when its user is
    imported: ``httpx`` costs ~30 ms, and the command line imports the sources to validate
    a config long before (or without) any request."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


RETRY_AFTER_CAP = 300.0  # seconds: a server asking for longer is waited on this long, then asked again


def retry_after(response: httpx.Response, cap: float = RETRY_AFTER_CAP) -> float | None:
    """The server's Retry-After (seconds or an HTTP date) in seconds, between 0 and ``cap``."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        from datetime import datetime, timezone
        from email.utils import parsedate_to_datetime

        try:
            seconds = (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), cap)
