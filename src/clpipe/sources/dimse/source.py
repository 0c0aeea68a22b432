"""The DIMSE source: a PACS at ``dimse://CALLED_AET@host:port``, listed with Study Root
C-FINDs and retrieved by C-GET or C-MOVE on pooled associations (see the package
docstring)."""

from __future__ import annotations

import ipaddress
import queue
import select
import ssl
import threading
import time
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError, PermanentError, TransientError
from ..dicom import DicomQuery, Series, SourceSettings, SourceURL, cpus, is_ae_title
from ..part10 import part10_header
from .association import Channel, tls_context
from .identifiers import UTF8, Identifier
from .messages import (
    AFFECTED_SOP_CLASS_UID,
    AFFECTED_SOP_INSTANCE_UID,
    CANCEL,
    MOVE_DESTINATION_UNKNOWN,
    OUT_OF_RESOURCES,
    OUT_OF_RESOURCES_MATCHES,
    OUT_OF_RESOURCES_RANGE,
    REFUSED_NOT_AUTHORIZED,
    REFUSED_SOP_CLASS_NOT_SUPPORTED,
    SUBOPERATIONS_FAILED,
    SUCCESS,
    UNABLE_TO_PROCESS,
    UNABLE_TO_PROCESS_RANGE,
    Final,
    field_text,
    status_words,
    text,
)
from .storage import REFUSED, Delivery, End, StorageSCP, series_uid
from .uids import (
    COMPRESSED,
    EXPLICIT_LE,
    IMAGE_STORAGE,
    IMPLICIT_LE,
    OTHER_STORAGE,
    QR_FIND,
    QR_GET,
    QR_MOVE,
)

if TYPE_CHECKING:
    from typing_extensions import Self

#: DICOM keywords kept in ``Series.attrs``
STUDY_KEYS = ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyDescription", "AccessionNumber")
SERIES_KEYS = ("SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality")
#: DicomQuery fields matched at study level, and the keyword each one matches
STUDY_FILTERS = {"patient_id": "PatientID", "patient_name": "PatientName", "accession_number": "AccessionNumber", "study_date": "StudyDate"}

MAX_PDU = 1 << 20  # the largest PDU we accept (fewer, larger reads than the usual 16 KiB)
LISTING_ATTEMPTS = 3  # a listing that meets a transient fault is tried this often (1 s, 2 s apart)
IDLE_REUSE = 20.0  # a pooled association idle longer than this is closed, not reused
#: a C-FIND refused with these statuses is tried again
FIND_TRANSIENT = (OUT_OF_RESOURCES, OUT_OF_RESOURCES_MATCHES, CANCEL)
#: a C-GET/C-MOVE refused with these statuses is not tried again
RETRIEVE_REFUSED = (REFUSED_SOP_CLASS_NOT_SUPPORTED, REFUSED_NOT_AUTHORIZED)
#: final statuses of a retrieval that ended (with or without failed sub-operations)
RETRIEVE_ENDED = (SUCCESS, SUBOPERATIONS_FAILED)

Instances = Generator[tuple[str, bytes], None, None]


def _unanswered(query: DicomQuery, identifier: Identifier) -> DicomQuery:
    """The query without the study filters whose key the PACS left out of its answer: it
    was given them and matched them itself, and "" would never match here."""
    missing: dict[str, Any] = {name: "" for name, keyword in STUDY_FILTERS.items() if getattr(query, name) and keyword not in identifier}
    return replace(query, **missing) if missing else query


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DimseSource:
    """A PACS at ``dimse://CALLED_AET@host:port``. See the package docstring.

    ``settings``: calling_aet (our AE title), retrieve ("get" or "move"), move_port (our
    storage SCP, C-MOVE), tls_ca/tls_cert/tls_key, timeout (every connect, read and
    answer); ``settings.extra`` (for tests and benchmarks): ``reuse_associations``
    (default True), ``max_pdu`` (the largest PDU we accept, default 1 MiB),
    ``local_cpu_cap`` (default True: see :attr:`max_jobs`), ``one_thread`` (default True:
    see :attr:`one_thread`)."""

    def __init__(self, url: SourceURL, settings: SourceSettings):
        self.url, self.settings = url, settings
        self.called_aet, self.host, self.port = url.called_aet, url.host, url.port
        self.calling_aet = (settings.calling_aet or "CLPIPE").strip()
        if not is_ae_title(self.calling_aet):
            raise ConfigError(f"CallingAET: {self.calling_aet!r} must be 1-16 ASCII characters without a backslash")
        self.retrieve = (settings.retrieve or "get").lower()
        if self.retrieve not in ("get", "move"):
            raise ConfigError(f'RetrieveMethod: {settings.retrieve!r} is neither "get" (C-GET) nor "move" (C-MOVE)')
        if self.retrieve == "move" and not 0 < int(settings.move_port or 0) < 65536:
            raise ConfigError(
                'RetrieveMethod is "move": set MovePort to the TCP port on which the PACS sends the images '
                f"to AE {self.calling_aet} (the PACS must know that AE title, this machine and that port)"
            )
        self.timeout = float(settings.timeout or 60.0)
        self.reuse = bool(settings.extra.get("reuse_associations", True))
        self.jobs = max(1, int(settings.jobs or 1))
        self.local_cpu_cap = bool(settings.extra.get("local_cpu_cap", True))
        self.may_one_thread = bool(settings.extra.get("one_thread", True))
        self.max_pdu = int(settings.extra.get("max_pdu", MAX_PDU))
        self._tls = tls_context(settings)
        #: the presentation contexts we propose: C-FIND, and C-GET with one storage context
        #: per SOP class and transfer syntax (so that the PACS can send each instance as it
        #: holds it), or C-MOVE
        self.contexts: list[tuple[str, list[str]]] = [(QR_FIND, [EXPLICIT_LE, IMPLICIT_LE])]
        if self.retrieve == "move":
            self.contexts += [(QR_MOVE, [EXPLICIT_LE, IMPLICIT_LE])]
        else:
            self.contexts += [(QR_GET, [EXPLICIT_LE, IMPLICIT_LE])]
            self.contexts += [(c, [ts]) for c in IMAGE_STORAGE for ts in (EXPLICIT_LE, IMPLICIT_LE, *COMPRESSED)]
            self.contexts += [(c, [ts]) for c in OTHER_STORAGE for ts in (EXPLICIT_LE, IMPLICIT_LE)]
        self._lock = threading.Lock()
        self._idle_channels: list[Channel] = []
        self._scp: StorageSCP | None = None  # the C-MOVE storage SCP, started on first use
        self._routes: dict[str, Delivery] = {}  # C-MOVE: series UID -> its delivery
        self._closed = False
        self.associations_opened = 0  # for tests and the benchmark

    @classmethod
    def check(cls, url: SourceURL, settings: SourceSettings) -> None:
        """Before a job is queued, connecting to nothing: the AE title, RetrieveMethod,
        MovePort and TLS files (for C-MOVE also our own certificate: the PACS connects to us)."""
        cls(url, settings).close()
        if (settings.retrieve or "get").lower() == "move":
            tls_context(settings, server_side=True)

    def __repr__(self) -> str:
        return f"DimseSource({self.where})"

    @property
    def where(self) -> str:
        return f"{self.called_aet}@{self.host}:{self.port}"

    @property
    def tls(self) -> ssl.SSLContext | None:
        """The TLS context of the associations we request (None: plain TCP)."""
        return self._tls

    @property
    def max_jobs(self) -> int:
        """How many series are worth retrieving at once (read by the engine after the
        listing): ``jobs`` from a PACS elsewhere, whose answers each association waits for;
        from a PACS on this machine (a loopback address) read with a thread per association
        (C-MOVE, TLS), no more than this machine's CPUs. There both ends share the CPUs and
        nothing waits on a network, and each thread beyond the CPUs only added work on both
        sides (measured with Orthanc on 2 CPUs, 2,209 instances: 4 associations took 0.75 s
        of our CPU and 0.70 s of Orthanc's, 2 took 0.54 s and 0.52 s, and finished sooner:
        bench/README.md). Read from one thread (:attr:`one_thread`), more associations cost
        no more: ``jobs`` then too (4 against 2, 12 alternating tries: 0.545 s against
        0.595 s, 0.38 s of our CPU against 0.41 s, Orthanc's 0.45 s against 0.46 s)."""
        if self.local_cpu_cap and _is_loopback(self.host) and not self.one_thread:
            return min(self.jobs, cpus())
        return self.jobs

    # -- associations ------------------------------------------------------------------

    def _borrow_channel(self) -> Channel:
        """An idle C-GET association from the pool (still alive, not idle for long), else a new one."""
        stale, channel = [], None
        with self._lock:
            if self._closed:
                raise PermanentError(f"the connection to {self.where} was closed")
            while self._idle_channels:
                candidate = self._idle_channels.pop()
                if time.monotonic() - candidate.idle_since < IDLE_REUSE and candidate.alive():
                    channel = candidate
                    break
                stale.append(candidate)
        for old in stale:
            old.abort() if old.usable else old.close()
        if channel is None:
            channel = Channel(self)
            with self._lock:
                self.associations_opened += 1
        return channel

    def _give_back_channel(self, channel: Channel) -> None:
        with self._lock:
            if channel.usable and self.reuse and not self._closed:
                channel.idle_since = time.monotonic()
                self._idle_channels.append(channel)
                return
        channel.release() if channel.usable else channel.abort()

    def close(self) -> None:
        """Release the pooled associations and stop the C-MOVE storage SCP."""
        with self._lock:
            self._closed = True
            channels, self._idle_channels = self._idle_channels, []
            scp, self._scp = self._scp, None
        for channel in channels:
            channel.release()
        if scp is not None:
            scp.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- C-FIND ------------------------------------------------------------------------

    def _find(self, channel: Channel, level: str, keys: dict[str, str]) -> list[Identifier]:
        """One C-FIND; the identifiers of its matches."""
        query = {"QueryRetrieveLevel": level, **keys}
        if any(not v.isascii() for v in keys.values()):
            query["SpecificCharacterSet"] = UTF8
        matches = channel.find(query)
        code = channel.final.status
        assert code is not None  # find() ends with a final status or raises
        if code != SUCCESS:
            error = TransientError if code in FIND_TRANSIENT else PermanentError
            raise error(
                f"C-FIND at {level} level refused by {self.where} ({status_words(code)}); check that the "
                f"PACS allows Study Root queries from AE {self.calling_aet!r}"
            )
        return matches

    def series(self, query: DicomQuery) -> Iterator[Series]:
        """Every series matching the query, each once, with its instance count. A listing
        that meets a transient fault (no answer, a broken connection, a busy PACS) is
        tried again on a new association, LISTING_ATTEMPTS times in all."""
        for attempt in range(1, LISTING_ATTEMPTS + 1):
            try:
                found = self._list(query)
                break
            except TransientError as exc:
                if attempt == LISTING_ATTEMPTS:
                    reason = str(exc).replace("; it will be tried again", "")
                    raise TransientError(f"listing the PACS {self.where} failed {attempt} times: {reason}") from None
                time.sleep(min(2.0 ** (attempt - 1), 10.0))
        yield from found

    def _list(self, query: DicomQuery) -> list[Series]:
        channel = self._borrow_channel()
        try:
            studies = self._studies(channel, query)
            return [series for study in studies for series in self._series_of(channel, study, query)]
        finally:
            self._give_back_channel(channel)  # before the engine starts retrieving: it may reuse it

    def _studies(self, channel: Channel, query: DicomQuery) -> list[dict[str, str]]:
        first, last = query.date_bounds()
        keys = {
            "StudyInstanceUID": "",
            "PatientID": query.patient_id,
            "PatientName": query.patient_name,
            "StudyDate": f"{first}-{last}" if first != last else first,
            "StudyTime": "",
            "StudyDescription": "",
            "AccessionNumber": query.accession_number,
            "ModalitiesInStudy": query.modality,
        }
        studies: dict[str, dict[str, str]] = {}
        for identifier in self._find(channel, "STUDY", keys):
            attrs = {k: text(identifier, k) for k in STUDY_KEYS}
            uid = attrs["StudyInstanceUID"]
            if uid and uid not in studies and _unanswered(query, identifier).study_matches(attrs):
                studies[uid] = attrs
        found = list(studies.values())
        return found[: query.limit] if query.limit and query.limit > 0 else found

    def _series_of(self, channel: Channel, study: dict[str, str], query: DicomQuery) -> list[Series]:
        """A study's series. Modality and SeriesDescription are matched here, not by the
        PACS: servers differ in case sensitivity and in which keys they match at all."""
        keys = {
            "StudyInstanceUID": study["StudyInstanceUID"],
            "SeriesInstanceUID": "",
            "Modality": "",
            "SeriesNumber": "",
            "SeriesDescription": "",
            "NumberOfSeriesRelatedInstances": "",
        }
        found: dict[str, Series] = {}
        for identifier in self._find(channel, "SERIES", keys):
            attrs = dict(study)
            attrs.update({k: text(identifier, k) for k in SERIES_KEYS})
            attrs["StudyInstanceUID"] = study["StudyInstanceUID"]
            uid = attrs["SeriesInstanceUID"]
            if query.series_description and "SeriesDescription" not in identifier:
                raise PermanentError(
                    f"the PACS {self.where} does not return SeriesDescription in its C-FIND answers, "
                    "so the SeriesDescription filter cannot be applied; remove that filter (and filter "
                    "by patient, date, accession number or modality)"
                )
            if not uid or uid in found or not query.series_matches(attrs):
                continue
            count = text(identifier, "NumberOfSeriesRelatedInstances")
            found[uid] = Series(attrs=attrs, count=int(count) if count.isdigit() else None)
        for series in found.values():
            if series.count is None:  # the PACS does not say: count the instances
                keys = {"StudyInstanceUID": study["StudyInstanceUID"], "SeriesInstanceUID": series.uid, "SOPInstanceUID": ""}
                uids = {text(i, "SOPInstanceUID") for i in self._find(channel, "IMAGE", keys)}
                series.count = len(uids - {""})
            series.ref = {"StudyInstanceUID": study["StudyInstanceUID"], "SeriesInstanceUID": series.uid}
        return list(found.values())

    # -- C-GET / C-MOVE ----------------------------------------------------------------

    @contextmanager
    def instances(self, entry: Any) -> Iterator[Iterator[tuple[str, bytes]]]:
        """Retrieve one series (a :class:`Series`, or the engine's entry whose ``ref`` is
        one); yields ``(SOPInstanceUID, Part-10 bytes)`` as the instances arrive."""
        series = entry.ref if isinstance(getattr(entry, "ref", None), Series) else entry
        expected = getattr(entry, "count", 0) or series.count or 0
        items = self._get(series, expected) if self.retrieve == "get" else self._move(series, expected)
        try:
            yield items
        finally:
            items.close()  # an abandoned retrieval: its association is aborted, not reused

    def _get(self, series: Series, expected: int) -> Instances:
        """C-GET on an association of our own, in the engine's thread."""
        channel = self._borrow_channel()
        received = 0
        try:
            for item in channel.get(self._request(series)):
                received += 1
                yield item
        finally:
            self._give_back_channel(channel)
        self._verdict(series, channel.final, received, expected)

    @property
    def one_thread(self) -> bool:
        """Whether the engine retrieves the series from one thread (:meth:`instances_many`)
        rather than one thread per series: C-GET over plain TCP from a PACS on this
        machine. Then both ends share the CPUs and the CPU is the bound; threads reading
        associations side by side hand the GIL over at every system call, which cost about
        a third more of our CPU (Orthanc on 2 CPUs, 2,209 instances: 0.40 s from one thread,
        0.58 s from a thread per association, bench/results/dicom_dimse.md). From a PACS
        elsewhere each association mostly waits on the network and on the dropoff's file
        system (on a cluster often a network one), and threads overlap those waits."""
        return self.retrieve == "get" and self._tls is None and hasattr(select, "poll") and self.may_one_thread and _is_loopback(self.host)

    def instances_many(self, entries: Iterator[Any], jobs: int) -> Generator[tuple[Any, str, bytes | BaseException | None], None, None]:
        """Retrieve series by C-GET from this one thread, on up to ``jobs`` associations at
        once: each takes the next of ``entries`` (engine entries or :class:`Series`) when
        it is free, and the associations are read as their answers arrive (poll). Yields
        ``(entry, SOPInstanceUID, Part-10 bytes)`` for each instance, ``(entry, "", None)``
        when a series ended with all its instances, ``(entry, "", error)`` when it did not
        (the error :meth:`instances` would raise), and ``(None, "", None)`` after each
        half second with nothing to read (the caller may close the generator then).
        Closing the generator aborts the retrievals under way. An association silent for
        the timeout fails its series alone; the others go on (one that stops in the middle
        of a message holds them up until the timeout: a message is read whole)."""
        poller = select.poll()
        active: dict[int, _Retrieval] = {}
        pending = iter(entries)
        more = True
        check_at = time.monotonic() + 0.5
        try:
            while True:
                while more and len(active) < jobs:  # a free association: the next series
                    entry = next(pending, None)
                    if entry is None:
                        more = False
                        break
                    try:
                        retrieval = _Retrieval(self, entry)
                    except (TransientError, PermanentError) as exc:
                        yield entry, "", exc
                        continue
                    active[retrieval.fd] = retrieval
                    poller.register(retrieval.fd, select.POLLIN)
                if not active:
                    return
                ready = [fd for fd, r in active.items() if r.channel.unread()] or [fd for fd, _ in poller.poll(500)]
                now = time.monotonic()
                if not ready or now >= check_at:  # (twice a second at most: an association silent too long)
                    check_at = now + 0.5
                    for fd in [fd for fd, r in active.items() if r.deadline <= now]:
                        retrieval = active.pop(fd)
                        poller.unregister(fd)
                        retrieval.end()
                        yield retrieval.entry, "", self._silent(retrieval)
                    if not ready:
                        yield None, "", None
                        continue
                for fd in ready:
                    if fd not in active:  # found silent just now
                        continue
                    retrieval = active[fd]
                    try:
                        uid, data = next(retrieval.items)
                    except (StopIteration, TransientError, PermanentError) as exc:
                        del active[fd]
                        poller.unregister(fd)
                        retrieval.end()
                        yield retrieval.entry, "", retrieval.verdict(exc)
                        continue
                    retrieval.received += 1
                    retrieval.deadline = now + self.timeout
                    yield retrieval.entry, uid, data
        finally:
            for retrieval in active.values():  # cut short: aborted (never pooled half done)
                retrieval.end()

    def _silent(self, retrieval: _Retrieval) -> TransientError:
        what = f"C-GET of series {retrieval.series.uid} from {self.where}"
        return TransientError(f"{what}: no answer within {self.timeout:.0f} s (NetworkTimeout); it will be tried again")

    def _move(self, series: Series, expected: int) -> Instances:
        """C-MOVE: the request from a thread of its own, the instances through our storage
        SCP (routed to this series' delivery by SeriesInstanceUID)."""
        self._start_scp()
        delivery = Delivery(series.uid)
        with self._lock:
            if series.uid in self._routes:
                raise TransientError(f"series {series.uid} is already being retrieved")
            self._routes[series.uid] = delivery
        driver = channel = None
        try:
            channel = self._borrow_channel()
            driver = threading.Thread(target=self._drive, args=(channel, series, delivery), daemon=True, name="dimse-move")
            driver.start()
            end = yield from self._receive(delivery, driver)
        finally:
            delivery.cancelled.set()  # a C-STORE still waiting for room gives up
            if driver is not None and channel is not None and driver.is_alive():
                # the engine stopped reading before the C-MOVE ended: stop it at the PACS
                # too (A-ABORT ends the move's sub-operations), not left running
                channel.abort()
            with self._lock:
                if self._routes.get(series.uid) is delivery:
                    del self._routes[series.uid]
        if end.error is not None:
            if isinstance(end.error, (TransientError, PermanentError)):
                raise end.error
            raise TransientError(f"C-MOVE of series {series.uid} from {self.where} failed: {end.error.__class__.__name__}: {end.error}")
        self._verdict(series, end.status, delivery.received, expected)

    @staticmethod
    def _request(series: Series) -> Identifier:
        study = series.attrs.get("StudyInstanceUID", "")
        return {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study, "SeriesInstanceUID": series.uid}

    def _drive(self, channel: Channel, series: Series, delivery: Delivery) -> None:
        """In a thread of its own: send the C-MOVE and wait for its end, while the C-STOREs
        it causes go to the delivery; then the association back to the pool. A silent
        association is waited for while the delivery has received an instance within the
        timeout."""
        final, error = Final(None), None
        try:
            final = channel.move(
                self._request(series), self.calling_aet, lambda: time.monotonic() - delivery.last_arrival < channel.timeout
            )
        except Exception as exc:  # noqa: BLE001 - handed on to the engine's thread
            error = exc
        if channel.usable:  # back in the pool first: the engine's next series may take it at once
            self._give_back_channel(channel)
            delivery.finish(End(final, error))
        else:  # the engine need not wait for the association to be closed
            delivery.finish(End(final, error))
            self._give_back_channel(channel)

    @staticmethod
    def _receive(delivery: Delivery, driver: threading.Thread) -> Generator[tuple[str, bytes], None, End]:
        """The engine's side of a delivery: the instances; returns how it ended."""
        while True:
            try:
                item = delivery.items.get(timeout=1.0)
            except queue.Empty:
                if not driver.is_alive() and delivery.items.empty():
                    return End(Final(None), RuntimeError("the C-MOVE stopped without an answer"))
                continue
            if isinstance(item, End):
                return item
            yield item

    def _verdict(self, series: Series, final: Final, received: int, expected: int) -> None:
        """Nothing when the retrieval ended well and brought every instance; else an error
        saying how it ended and what to check."""
        what = f"C-{self.retrieve.upper()} of series {series.uid} from {self.where}"
        code = final.status
        if code is None:
            raise TransientError(f"{what}: no answer within {self.timeout:.0f} s, or the association was aborted; it will be tried again")
        if code == MOVE_DESTINATION_UNKNOWN:
            raise PermanentError(
                f"{what}: the PACS does not know the C-MOVE destination AE {self.calling_aet!r} "
                f"({status_words(code)}): register AE title {self.calling_aet!r} with this machine's "
                f'address and port {self.settings.move_port} on the PACS, or use RetrieveMethod "get"'
            )
        if code in RETRIEVE_REFUSED:
            raise PermanentError(
                f"{what} refused ({status_words(code)}); check that the PACS allows C-{self.retrieve.upper()} for AE {self.calling_aet!r}"
            )
        if code in RETRIEVE_ENDED and not final.failed and received >= expected:
            return
        hint = (
            f"check that the PACS knows AE {self.calling_aet!r} at this machine's address and port "
            f"{self.settings.move_port}, and that a firewall lets it connect there"
            if self.retrieve == "move"
            else "the PACS may hold a SOP class or transfer syntax clpipe did not offer"
        )
        comment = f" ({final.comment})" if final.comment else ""
        if code in RETRIEVE_ENDED or code in OUT_OF_RESOURCES_RANGE or code == CANCEL or code in UNABLE_TO_PROCESS_RANGE:
            raise TransientError(
                f"{what} ended with {status_words(code)}{comment}: {received} of {expected} instances "
                f"arrived, {final.failed} sub-operations failed; {hint}"
            )
        raise PermanentError(f"{what} refused ({status_words(code)}){comment}")

    # -- receiving C-STOREs (C-MOVE) ---------------------------------------------------

    def _start_scp(self) -> None:
        """The storage SCP that receives C-MOVE sub-operations (once per source), on the
        loopback interface when the PACS is on this machine, else on every interface."""
        with self._lock:
            if self._scp is not None:
                return
            if self._closed:
                raise PermanentError(f"the connection to {self.where} was closed")
            bind = "127.0.0.1" if _is_loopback(self.host) else "0.0.0.0"
            self._scp = StorageSCP(
                bind,
                int(self.settings.move_port),
                aet=self.calling_aet,
                timeout=self.timeout,
                max_pdu=self.max_pdu,
                tls=tls_context(self.settings, server_side=True),
                on_store=self._store,
            )

    def _store(self, fields: dict[int, bytes], data: list[bytes], syntax: str, source_aet: str) -> int:
        """A C-STORE from the PACS (C-MOVE): hand it to the delivery of its series."""
        dataset = b"".join(data)
        try:
            uid_of_series = series_uid(dataset, syntax)
        except Exception:  # noqa: BLE001 - an unreadable dataset is refused, not fatal
            return UNABLE_TO_PROCESS
        with self._lock:
            delivery = self._routes.get(uid_of_series)
        if delivery is None:
            return REFUSED
        uid = field_text(fields, AFFECTED_SOP_INSTANCE_UID)
        if not delivery.put((uid, part10_header(field_text(fields, AFFECTED_SOP_CLASS_UID), uid, syntax, source_aet) + dataset)):
            return REFUSED
        delivery.received += 1
        return SUCCESS


class _Retrieval:
    """One series' C-GET under way in :meth:`DimseSource.instances_many`: its association
    (borrowed from the pool, the request sent) and what has arrived."""

    def __init__(self, source: DimseSource, entry: Any):
        self.source, self.entry = source, entry
        self.series = entry.ref if isinstance(getattr(entry, "ref", None), Series) else entry
        self.expected = getattr(entry, "count", 0) or self.series.count or 0
        self.channel = source._borrow_channel()
        try:
            self.items = self.channel.send_get(source._request(self.series))
        except BaseException:
            source._give_back_channel(self.channel)
            raise
        self.fd = self.channel.sock.fileno()
        self.received = 0
        self.deadline = time.monotonic() + source.timeout

    def verdict(self, ended: BaseException) -> BaseException | None:
        """How the series ended: None when every instance arrived, else the error."""
        if not isinstance(ended, StopIteration):
            return ended
        try:
            self.source._verdict(self.series, self.channel.final, self.received, self.expected)
        except (TransientError, PermanentError) as exc:
            return exc
        return None

    def end(self) -> None:
        """The association back to the pool (aborted when its C-GET did not end)."""
        self.items.close()
        self.source._give_back_channel(self.channel)
