"""Resource values as users write them in clpipe configs: times, memory sizes, core counts.

Each parser returns a normalised number or raises ``ValueError`` whose text says what is
expected; the config layer adds the key name and file.
"""

from __future__ import annotations

import math
import re

TIME_EXPECTED = (
    "expected a scheduler time such as 1:0:0 (hours:minutes:seconds), 90 (minutes), "
    "90:00 (minutes:seconds) or 1-12:00:00 (days-hours:minutes:seconds)"
)
MEM_EXPECTED = "expected a size such as 10000 (megabytes), 500M, 10G or 1T"
CORES_EXPECTED = "expected a whole number of cores, 1 or more"


def _int_field(text: str) -> int:
    if not text.isdigit():
        raise ValueError(TIME_EXPECTED)
    return int(text)


def parse_time(value: object) -> int:
    """Parse a SLURM-style time limit into seconds.

    Accepted forms (SLURM's ``--time`` forms; Grid Engine's ``h_rt`` takes the result
    as seconds or H:M:S): ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``.
    Fields after the first must be below 60 (minutes, seconds) or 24 (hours after days).
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(TIME_EXPECTED)  # noqa: TRY004 -- a user's value: its message, via the config model
    text = str(value).strip()
    if not text:
        raise ValueError(TIME_EXPECTED)
    days = 0
    if "-" in text:
        day_text, _, rest = text.partition("-")
        days = _int_field(day_text)
        parts = [_int_field(p) for p in rest.split(":")]
        if len(parts) > 3:
            raise ValueError(TIME_EXPECTED)
        parts += [0] * (3 - len(parts))
        hours, minutes, seconds = parts
        if hours >= 24:
            raise ValueError(f"hours after the day count must be below 24; {TIME_EXPECTED}")
    else:
        parts = [_int_field(p) for p in text.split(":")]
        if len(parts) == 1:
            hours, minutes, seconds = 0, parts[0], 0
        elif len(parts) == 2:
            hours, (minutes, seconds) = 0, parts
        elif len(parts) == 3:
            hours, minutes, seconds = parts
        else:
            raise ValueError(TIME_EXPECTED)
        if len(parts) == 3 and minutes >= 60:
            raise ValueError(f"minutes must be below 60; {TIME_EXPECTED}")
    if len(parts) >= 2 and seconds >= 60:
        raise ValueError(f"seconds must be below 60; {TIME_EXPECTED}")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise ValueError(f"a time limit must be more than 0; {TIME_EXPECTED}")
    return total


def format_hms(seconds: int) -> str:
    """Seconds as H:MM:SS (hours may exceed 24), the form both schedulers accept."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


_MEM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_MEM_FACTOR_MB = {"": 1.0, "k": 1 / 1024, "m": 1.0, "g": 1024.0, "t": 1024.0 * 1024}


def parse_mem_mb(value: object) -> int:
    """Parse a memory size into whole megabytes (rounded up).

    A bare number means megabytes, as in clpipe's legacy configs (``"10000"``) and SLURM's
    ``--mem``; suffixes K, M, G, T (optionally followed by B or iB) are binary units.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(MEM_EXPECTED)  # noqa: TRY004 -- a user's value: its message, via the config model
    match = _MEM_RE.match(str(value))
    if not match:
        raise ValueError(MEM_EXPECTED)
    number, unit = float(match.group(1)), match.group(2).lower()
    megabytes = math.ceil(number * _MEM_FACTOR_MB[unit])
    if megabytes <= 0:
        raise ValueError(f"memory must be more than 0; {MEM_EXPECTED}")
    return megabytes


def parse_cores(value: object) -> int:
    """Parse a core count: a positive integer, given as a number or a string of digits."""
    if isinstance(value, bool):
        raise ValueError(CORES_EXPECTED)  # noqa: TRY004 -- a user's value: its message, via the config model
    if isinstance(value, int):
        cores = value
    elif isinstance(value, str) and value.strip().isdigit():
        cores = int(value.strip())
    else:
        raise ValueError(CORES_EXPECTED)
    if cores < 1:
        raise ValueError(CORES_EXPECTED)
    return cores


DURATION_EXPECTED = "expected a duration such as 30m, 2h, 1d, 90s, or a number of minutes (0: off)"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)", re.IGNORECASE)
_DURATION_UNIT = {"": 60, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> int:
    """A duration in seconds: ``30m``, ``2h``, ``1d``, ``90s``, or a bare number of minutes
    (``0`` turns the feature off). Used by the keys that take a span of time rather than a
    scheduler's time limit (StableAfter, ...)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(DURATION_EXPECTED)  # noqa: TRY004 -- a user's value: its message, via the config model
    match = _DURATION.fullmatch(str(value).strip())
    if match is None:
        raise ValueError(DURATION_EXPECTED)
    seconds = float(match[1]) * _DURATION_UNIT[match[2].lower()]
    if not math.isfinite(seconds) or seconds > 366 * 86400:
        raise ValueError(f"at most a year; {DURATION_EXPECTED}")
    return round(seconds)


def format_duration(seconds: float) -> str:
    """Seconds as the shortest of ``45s``, ``30m``, ``2h``, ``1d`` (or ``1h30m``) for messages."""
    seconds = round(seconds)
    if seconds <= 0:
        return "0"
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out += f"{seconds // size}{unit}"
            seconds %= size
    return out
