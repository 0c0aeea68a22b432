"""The one retry policy of a transfer, and how its bytes are checked.

A source raises :class:`~clpipe.errors.TransientError` for a fault worth another try (429,
5xx, timeouts, resets, truncated or corrupted bodies; :class:`~clpipe.errors.VerifyError`
when the bytes are not the remote file) and :class:`~clpipe.errors.PermanentError` for one
that is not. :class:`RetryPolicy` tries a transfer again after a transient fault, waiting
what the server asked (Retry-After) or else an exponential backoff with jitter, and gives
up as a permanent error after its retries; a run that stops (a full disk, SIGTERM) ends
the wait at once with :class:`Stopped`.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import PermanentError, TransientError

T = TypeVar("T")


class Stopped(Exception):
    """A transfer not started, not retried or cut short because the run stopped: a disk is
    full, or the process was told to stop (SIGTERM, Ctrl-C)."""


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5  # tries after the first
    backoff: float = 0.5  # seconds before the second try, doubled for each further one
    backoff_cap: float = 30.0  # the longest backoff (a server's Retry-After is the server's)

    def delay(self, attempt: int, exc: TransientError) -> float:
        """Seconds to wait after try ``attempt`` (1, 2, ...) failed with ``exc``: the
        server's Retry-After, else the backoff, within 20% either way so that parallel
        transfers do not all come back at once."""
        if exc.retry_after is not None:
            return exc.retry_after
        return min(self.backoff_cap, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)

    def run(self, attempt: Callable[[], T], describe: Callable[[], str], stop: threading.Event) -> T:
        """``attempt()`` until it returns, retrying after each :class:`TransientError`;
        then a :class:`PermanentError` saying how many tries it took. Each retry is said in
        one ``[retry]`` line naming ``describe()``. Once ``stop`` is set, no try starts and
        a wait ends: :class:`Stopped`."""
        tries = 0
        while True:
            tries += 1
            if stop.is_set():  # the run is stopping: this transfer stays to do
                raise Stopped()
            try:
                return attempt()
            except TransientError as exc:
                if tries > self.retries:
                    raise PermanentError(f"{exc} (gave up after {tries} attempts)") from None
                wait = self.delay(tries, exc)
                print(f"[retry] {describe()}: {exc}; attempt {tries + 1} in {wait:.1f} s", flush=True)
                if stop.wait(wait):
                    raise Stopped() from None


def hasher(checksum: str | None) -> hashlib._Hash | None:
    """A hash object for a checksum given as ``algorithm:hex`` (None: no checksum, or an
    algorithm this Python does not have: the size alone is checked)."""
    if not checksum:
        return None
    algorithm = checksum.split(":", 1)[0]
    try:
        return hashlib.new(algorithm)
    except ValueError:
        return None
