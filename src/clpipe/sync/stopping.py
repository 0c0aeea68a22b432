"""A run told to stop before its end stops gracefully: no transfer starts after it, those
under way get a grace period to finish and are then abandoned (their partial files are
removed or left in the dropoff's tmp/, never under a final name), and the run goes on to
its normal end: the manifest is saved, the reports are written, and the summary says
"stopped <why>: N of M files done". The exit status is :data:`~clpipe.errors.STOPPED_EXIT`.

What asks for the stop (:class:`StopRequest`), installed by the runner for the native
engine (:func:`install`):

* the batch system's warning before a time limit: SIGUSR1 (SLURM ``--signal=B:USR1@S``,
  Grid Engine's soft limit ``s_rt``), or SIGXCPU (Grid Engine's ``s_cpu``); the transfers
  under way get half the warning (``grace``);
* SIGTERM or SIGHUP (``scancel``, a limit reached without a warning, ``kill``, a closed
  terminal): transfers under way are abandoned at once;
* Ctrl-C (SIGINT): they get :data:`CTRL_C_GRACE` seconds; a second Ctrl-C abandons them;
* ``MaxDuration``: a timer, as if the time limit's warning had come (but not continued).

A signal that comes once transfers are being abandoned ends the run at once, as before
this module existed (:class:`~clpipe.errors.Terminated`, or KeyboardInterrupt for Ctrl-C).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from ..errors import Terminated

CTRL_C_GRACE = 10.0  # seconds the transfers under way get after Ctrl-C
#: why a run stopped, as the summary says it and the continuation logic reads it
TIME_LIMIT, MAX_DURATION, SIGNAL = "time_limit", "max_duration", "signal"


class StopRequest:
    """The stop of one run. ``stop``: no transfer starts (set by the first request);
    ``abort``: transfers under way are abandoned (set ``grace`` seconds later, or at once).
    ``why`` says it for the summary ("at the time limit"); ``kind`` is one of
    :data:`TIME_LIMIT`, :data:`MAX_DURATION`, :data:`SIGNAL`; empty while not requested
    (the engine also sets both events itself when a disk is full, without a ``why``)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.abort = threading.Event()
        self.why = ""
        self.kind = ""
        self.abandoned = 0  # transfers left running in their threads when the run ended
        self._lock = threading.Lock()
        self._timers: list[threading.Timer] = []
        self.say: Callable[[str], object] | None = None  # how a stop is announced (the console)

    @property
    def requested(self) -> bool:
        return bool(self.why)

    def request(self, why: str, kind: str, grace: float) -> None:
        """Stop: no transfer starts from now on; those under way get ``grace`` seconds (0:
        abandoned now). A later request can only shorten the grace."""
        with self._lock:
            first = not self.why
            if first:
                self.why, self.kind = why, kind
            self.stop.set()
        if grace <= 0:
            self.abort.set()
        else:
            timer = threading.Timer(grace, self.abort.set)
            timer.daemon = True
            timer.start()
            self._timers.append(timer)
        if first and self.say is not None:
            what = "abandoned now" if grace <= 0 else f"get {grace:.0f} s to finish"
            # said from a thread of its own: a signal handler must not write to a stream the
            # main thread may be writing to
            line = f"stopping {why}: no new transfers start; those under way {what}; the manifest and reports are saved"
            threading.Thread(target=self.say, args=(line,), daemon=True).start()

    def after(self, seconds: float, why: str, kind: str, grace: float) -> None:
        """Request the stop by itself after ``seconds`` (MaxDuration)."""
        timer = threading.Timer(seconds, self.request, (why, kind, grace))
        timer.daemon = True
        timer.start()
        self._timers.append(timer)

    def close(self) -> None:
        """The run is over: no timer fires any more."""
        for timer in self._timers:
            timer.cancel()


_CURRENT: StopRequest | None = None


def current() -> StopRequest | None:
    """The stop request of the run in this process (:func:`install`), if any."""
    return _CURRENT


def install(warning_grace: float, say: Callable[[str], object] | None = None) -> StopRequest:
    """In the process that runs a native sync: the signals above stop it gracefully.
    ``warning_grace``: the seconds transfers under way get after the time limit's warning."""
    global _CURRENT
    request = _CURRENT = StopRequest()
    request.say = say

    def handler(signum: int, _frame: object) -> None:
        if request.abort.is_set():  # already abandoning transfers: a further signal ends the run now
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise Terminated(signum)
        if signum in (signal.SIGUSR1, signal.SIGXCPU):
            request.request("at the time limit", TIME_LIMIT, warning_grace)
        elif signum == signal.SIGINT:
            if request.stop.is_set():
                request.request("by Ctrl-C", SIGNAL, 0)
            else:
                request.request("by Ctrl-C", SIGNAL, CTRL_C_GRACE)
        else:  # SIGTERM, SIGHUP: after a time limit's warning, the limit itself
            request.request(f"by {signal.Signals(signum).name}", SIGNAL, 0)

    for signum in (signal.SIGUSR1, signal.SIGXCPU, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, handler)
    return request
