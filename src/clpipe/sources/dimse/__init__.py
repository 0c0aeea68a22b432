"""The DIMSE source: a PACS reached with C-FIND, and C-GET or C-MOVE.

``series(query)`` asks the PACS with Study Root C-FINDs: the studies that match the
filters, then each study's series, each once (pynetdicom's own Q/R SCP answers once per
instance at STUDY and SERIES level), each with its instance count
(NumberOfSeriesRelatedInstances, else an IMAGE-level C-FIND that counts distinct SOP
Instance UIDs) so that an unchanged series is never retrieved again. Keys the PACS leaves
out of its answers stay empty (dcmqrscp has no SeriesDescription); a SeriesDescription
filter on such a PACS is an error, not a silent "nothing matched".

``instances(entry)`` retrieves one series, by C-GET (default: the instances come back on
our own association) or by C-MOVE (the PACS opens an association to the storage SCP this
source runs on ``move_port``; the PACS must know our AE title, host and port). Every
received dataset is handed on as a Part-10 file made of its bytes as they arrived (file
meta written here, pixel data never decoded), so what the PACS sends compressed stays
compressed. (Which transfer syntax it sends is its choice: Orthanc and pynetdicom send
each instance as stored; dcmtk's dcmqrscp sends the first context accepted for the SOP
class, Explicit VR Little Endian, decompressing RLE.)

How the protocol is spoken: all of it is clpipe's own code, on both sides of an
association (:class:`association.Channel` for the associations we request,
:class:`storage.StorageSCP` for those the PACS opens to deliver a C-MOVE): A-ASSOCIATE-RQ/AC
(presentation contexts, SCP role selection, maximum PDU length, implementation UID; checked
byte for byte against pynetdicom's encoder in the tests), the per-instance path (P-DATA-TF
fragments, the group-0000 command sets of C-FIND, C-GET, C-MOVE, C-STORE and C-ECHO from
PS3.7, A-RELEASE, A-ABORT) and the identifiers of C-FIND, C-GET and C-MOVE
(``identifiers``). Neither pydicom nor pynetdicom is imported before the first
association: pynetdicom's tables only name a failure's status code, and pydicom reads
only what the fast readers cannot follow (an answer in a character set with code
extensions, a C-MOVE dataset the walker cannot follow); their import (with numpy's, ~0.25
s) was more than a third of a whole 2,000-instance retrieval (issue 15). Why not
pynetdicom's Association (measured with pynetdicom 3.0.4 and py-spy, and in
bench/results/dicom_dimse.md, whose pynetdicom C-GET rows use its fastest settings): per
received instance it runs three threads, a polling loop and pydicom encodes and decodes
three command sets, ~2 ms of CPU under the GIL, so parallel associations in one process do
not add up. Here an instance costs one read and one write on the socket (which is
non-blocking and polled only when not ready: a socket with a timeout polls before every
call, and every system call gives the GIL up, which the engine's parallel associations
contend for) and ~0.1 ms of CPU in all; the rest is the PACS and the file system. Received
datasets are never decoded (only read up to SeriesInstanceUID to route a C-MOVE's
instances).

* C-GET runs in the engine's own thread: no hand-off, backpressure for free (the next
  instance is read when the engine asks for it), and a series the engine stops reading
  is aborted, not left half done. From a PACS on this machine (a loopback address, plain
  TCP) one thread retrieves every series (``instances_many``, the ``HasManyInstances``
  ability): it keeps ``jobs`` associations busy, each taking the next series as one
  ends, and reads whichever has an answer (poll). There the CPU is the bound, and
  threads reading associations side by side hand the GIL over at each system call
  (~5 futex calls per instance): one thread used a fifth to a third less of our CPU. A PACS
  elsewhere keeps one thread per series, which overlaps the waits on the network and on
  the dropoff's file system. C-MOVE sends the request from a thread of its own; the
  storage SCP's threads hand instances to the engine through a bounded queue.
* Every socket has Nagle off (else each sub-operation can wait ~40 ms for a delayed ACK)
  and every wait a timeout (``SourceSettings.timeout``); associations are kept in a small
  pool and reused for the next series (dropped when idle for long, when the PACS closed
  them, or when an operation was left half done).

The modules follow the protocol's layers, lowest first (as pynetdicom's do):

- ``uids``: transfer syntaxes, storage SOP classes, Query/Retrieve models, clpipe's
  implementation UID.
- ``pdu``: upper-layer PDUs (PS3.8): types, A-ASSOCIATE-RQ/AC encoded and decoded,
  A-ASSOCIATE-RJ/-AC codes, P-DATA-TF framing. No sockets.
- ``messages``: DIMSE command sets (PS3.7): command fields, elements, statuses in words.
- ``identifiers``: the datasets of C-FIND/C-GET/C-MOVE requests and C-FIND answers.
- ``wire``: PDUs and messages over one socket, either side of an association.
- ``association``: the associations we request (connect, TLS, negotiate, C-FIND, C-GET,
  C-MOVE, release, abort), and the TLS context.
- ``storage``: the storage SCP receiving a C-MOVE's instances, and their delivery to the
  engine's thread.
- ``source``: :class:`DimseSource`, what the rest of clpipe uses.

A received dataset's Part-10 file meta is written by :mod:`clpipe.sources.part10`, the
Part-10 reader/writer every DICOM source shares.
"""

from __future__ import annotations

from importlib.util import find_spec

from ..part10 import part10_header
from .association import tls_context
from .source import DimseSource
from .uids import COMPRESSED, EXPLICIT_LE, IMAGE_STORAGE, IMPLICIT_LE, OTHER_STORAGE

# pynetdicom (status codes in words) and pydicom (what the fast readers cannot follow) are
# imported only where they are needed, not at start-up: a missing one is said now, as the
# registry says it (one line naming the package), not in the middle of a run
for _package in ("pynetdicom", "pydicom"):
    if find_spec(_package) is None:
        raise ModuleNotFoundError(f"No module named {_package!r}", name=_package)

__all__ = [
    "COMPRESSED",
    "EXPLICIT_LE",
    "IMAGE_STORAGE",
    "IMPLICIT_LE",
    "OTHER_STORAGE",
    "DimseSource",
    "part10_header",
    "tls_context",
]
