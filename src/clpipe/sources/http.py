"""What the HTTP sources (Flywheel, DICOMweb) share."""

from __future__ import annotations

import httpx

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
