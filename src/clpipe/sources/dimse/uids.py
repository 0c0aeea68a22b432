"""The UIDs the DIMSE source offers and names itself by (PS3.6 Annex A): transfer
syntaxes, the storage SOP classes offered for C-GET, the Study Root Query/Retrieve
models, the application context (clpipe's implementation class UID is in
:mod:`clpipe.sources.part10`: the file meta names it too)."""

from __future__ import annotations

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"  # retired; never accepted by our storage SCP
#: compressed transfer syntaxes offered for image storage (so such data arrives unchanged):
#: RLE Lossless, JPEG Baseline, JPEG Lossless SV1, JPEG-LS Lossless, JPEG 2000 (lossless, any)
COMPRESSED = (
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
)
#: image storage SOP classes an MRI archive holds, each offered with every transfer syntax above
IMAGE_STORAGE = (
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.128",  # PET Image
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image
)
#: other storage SOP classes found in MR studies (uncompressed transfer syntaxes only)
OTHER_STORAGE = (
    "1.2.840.10008.5.1.4.1.1.4.2",  # MR Spectroscopy
    "1.2.840.10008.5.1.4.1.1.66",  # Raw Data (vendor data, e.g. Siemens CSA)
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection Document
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR (CT and PET studies)
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.3.12.2.1107.5.9.1",  # Siemens CSA Non-Image (private: spectroscopy raw data, protocols)
)
QR_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND
QR_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
QR_GET = "1.2.840.10008.5.1.4.1.2.2.3"
#: the Query/Retrieve models (every other abstract syntax we propose is a storage SOP class)
QUERY_RETRIEVE = (QR_FIND, QR_GET, QR_MOVE)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # the DICOM Application Context Name (PS3.7 A.2.1)
#: how clpipe names itself in associations and file meta: a UUID-derived UID (PS3.5 B.2)
#: the implementation class UID root of pynetdicom (see storage.PYNETDICOM_DELAY)
PYNETDICOM_ROOT = "1.2.826.0.1.3680043.9.3811."
