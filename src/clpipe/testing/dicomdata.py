"""A deterministic synthetic MR DICOM data set for testing and benchmarking DICOM sources.

The same data set is loaded into the real test servers (scripts/infra/dicom-up.sh: Orthanc
with DICOMweb, dcmtk's dcmqrscp, pynetdicom's qrscp) and laid out as a folder tree for
``file://`` tests, so every source can be checked against one description of what it holds.

Shape at ``scale=1`` (139 instances; ``scale=N`` multiplies the instances of every
single-frame series by N, e.g. ``scale=16`` gives 2,209):

======== ============== =================================================================
patient  study          series (SeriesNumber, SeriesDescription, instances, what is odd)
======== ============== =================================================================
SUB01    2024-01-15     1 "T1w MPRAGE" 16; 2 "rs-fMRI/run 1" 20 (``/``);
Doe^Jane                3 "../../etc" 8 (``..``); 4 "T2 RLE*" 8 (RLE Lossless, ``*``)
         (no StudyDate) (none, none) 10 (no SeriesNumber, no SeriesDescription);
         empty Acc.No.  2 "DWI<TAB>b=1000  x" 10 (a control character, double space);
                        3 "Enhanced MR multiframe" 1 instance of 8 frames (Enhanced MR)
SUB02    2024-02-20     1 "séquence localizer é" 12 (Implicit VR Little Endian, UTF-8);
Müller^  (ISO_IR 192)   2 "T1w" 12; 3 "T1w" 12 (two series with the same description)
José
SUB 03/x 2024-03-05     1 "Série 1: a?b<c>|d" 10 (Latin-1, Windows-unsafe characters);
O'Brien^ (ISO_IR 100)   2 "  leading spaces" 10; 3 "x" * 64 (the longest LO) 10
Sam-Lee
======== ============== =================================================================

Every file is a proper DICOM Part 10 file (preamble, ``DICM``, file meta with fixed
implementation UID and version name), so the bytes depend only on the arguments and the
pydicom version that wrote them. UIDs are derived from the arguments (under pydicom's UID
root); pixel data is a 12-bit pattern made without numpy; RLE is encoded here too.

:func:`make_dataset` writes the data set and returns its description (:func:`describe`; its
keys are listed in scripts/infra/README.md); :func:`make_file_tree` writes the same instances as a messy folder tree (nested folders,
files without extension, non-DICOM files, a DICOM file without preamble, duplicates).

Command line: ``python -m clpipe.testing.dicomdata OUTDIR [--scale N] [--tree]`` writes the
data under OUTDIR and its description to ``OUTDIR.expected.json`` (or ``--expected FILE``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "clpipe-dicom-expected/1"
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root; generate_uid adds a hash of our keys
IMPLEMENTATION_VERSION = "CLPIPE_TESTDATA"

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"

#: the SOP classes in the data set (a C-GET client needs a storage context for each)
SOP_CLASSES = (MR_IMAGE, ENHANCED_MR_IMAGE)
#: the transfer syntaxes of the data set's files
TRANSFER_SYNTAXES = (EXPLICIT_LE, IMPLICIT_LE, RLE_LOSSLESS)


@dataclass
class _Series:
    number: int | None
    description: str | None
    instances: int
    transfer_syntax: str = EXPLICIT_LE
    frames: int = 0  # > 0: one Enhanced MR instance with this many frames
    odd: list[str] = field(default_factory=list)


@dataclass
class _Study:
    date: str | None
    time: str
    description: str
    accession: str
    series: list[_Series]
    odd: list[str] = field(default_factory=list)


@dataclass
class _Patient:
    patient_id: str
    name: str
    charset: str | None
    birth_date: str
    sex: str
    studies: list[_Study]
    odd: list[str] = field(default_factory=list)


def _plan(scale: int) -> list[_Patient]:
    """The data set's hierarchy; ``scale`` multiplies the instances of single-frame series."""
    n = lambda k: k * scale  # noqa: E731
    return [
        _Patient(
            "SUB01",
            "Doe^Jane",
            None,
            "19800101",
            "F",
            [
                _Study(
                    "20240115",
                    "093000",
                    "Brain^Research",
                    "ACC0001",
                    [
                        _Series(1, "T1w MPRAGE", n(16)),
                        _Series(2, "rs-fMRI/run 1", n(20), odd=["slash in SeriesDescription"]),
                        _Series(3, "../../etc", n(8), odd=["'..' and '/' in SeriesDescription"]),
                        _Series(4, "T2 RLE*", n(8), RLE_LOSSLESS, odd=["RLE Lossless transfer syntax", "'*' in SeriesDescription"]),
                    ],
                ),
                _Study(
                    None,
                    "101500",
                    "Follow up",
                    "",
                    [
                        _Series(None, None, n(10), odd=["no SeriesNumber", "no SeriesDescription"]),
                        _Series(2, "DWI\tb=1000  x", n(10), odd=["control character (TAB) in SeriesDescription", "double space"]),
                        _Series(3, "Enhanced MR multiframe", 1, frames=8, odd=["multi-frame (Enhanced MR Image Storage, 8 frames)"]),
                    ],
                    odd=["no StudyDate", "empty AccessionNumber"],
                ),
            ],
        ),
        _Patient(
            "SUB02",
            "Müller^José",
            "ISO_IR 192",
            "19751231",
            "M",
            [
                _Study(
                    "20240220",
                    "140000",
                    "Kopf Übersicht",
                    "ACC0002",
                    [
                        _Series(
                            1,
                            "séquence localizer é",
                            n(12),
                            IMPLICIT_LE,
                            odd=["Implicit VR Little Endian", "non-ASCII SeriesDescription (UTF-8)"],
                        ),
                        _Series(2, "T1w", n(12)),
                        _Series(3, "T1w", n(12), odd=["same SeriesDescription as series 2"]),
                    ],
                ),
            ],
            odd=["non-ASCII PatientName (ISO_IR 192, UTF-8)"],
        ),
        _Patient(
            "SUB 03/x",
            "O'Brien^Sam-Lee",
            "ISO_IR 100",
            "20000229",
            "O",
            [
                _Study(
                    "20240305",
                    "080000",
                    "Étude",
                    "ACC 0003/b",
                    [
                        _Series(
                            1, "Série 1: a?b<c>|d", n(10), odd=["non-ASCII SeriesDescription (Latin-1)", "':?<>|' in SeriesDescription"]
                        ),
                        _Series(2, "  leading spaces", n(10), odd=["leading spaces in SeriesDescription"]),
                        _Series(3, "x" * 64, n(10), odd=["64-character SeriesDescription"]),
                    ],
                    odd=["' ' and '/' in AccessionNumber"],
                ),
            ],
            odd=["' ' and '/' in PatientID", "apostrophe in PatientName"],
        ),
    ]


def _uid(seed: object, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(prefix=UID_ROOT, entropy_srcs=["clpipe-dicomdata", str(seed), *map(str, parts)])


def _pattern(rows: int, cols: int, seed: object) -> bytes:
    """Twice one frame of 12-bit little-endian samples: a smooth ramp plus a little noise, so
    slices at different offsets differ and RLE still compresses them somewhat."""
    rng = random.Random(f"clpipe-dicomdata-pixels/{seed}")
    n = 2 * rows * cols
    noise = rng.randbytes(n)
    values = [((k % cols) * 37 + (k // cols) * 11 + (noise[k] & 0x0F)) & 0x0FFF for k in range(n)]
    return struct.pack(f"<{n}H", *values)


def _frame(pattern: bytes, rows: int, cols: int, offset: int) -> bytes:
    size = 2 * rows * cols
    start = 2 * (offset % (rows * cols))
    return pattern[start : start + size]


# -- RLE Lossless (DICOM PS3.5 Annex G), without numpy ------------------------------------


def _packbits(row: bytes) -> bytes:
    """One row as PackBits: runs of 3+ equal bytes as (1-n, byte), the rest as literals."""
    out = bytearray()
    i, n = 0, len(row)
    literal = bytearray()

    def flush() -> None:
        for k in range(0, len(literal), 128):
            chunk = literal[k : k + 128]
            out.append(len(chunk) - 1)
            out.extend(chunk)
        literal.clear()

    while i < n:
        j = i + 1
        while j < n and j - i < 128 and row[j] == row[i]:
            j += 1
        if j - i >= 3:
            flush()
            out.append(257 - (j - i))  # -(run-1) as an unsigned byte
            out.append(row[i])
        else:
            literal.extend(row[i:j])
        i = j
    flush()
    return bytes(out)


def _rle_frame(pixels: bytes, rows: int, cols: int) -> bytes:
    """One frame of 16-bit little-endian samples as an RLE Lossless fragment: a 64-byte
    header, then the high-byte segment and the low-byte segment, each row by row."""
    segments = []
    for byte in (1, 0):  # most significant byte first
        plane = pixels[byte::2]
        seg = b"".join(_packbits(plane[r * cols : (r + 1) * cols]) for r in range(rows))
        segments.append(seg + b"\0" * (len(seg) % 2))
    offsets, pos = [], 64
    for seg in segments:
        offsets.append(pos)
        pos += len(seg)
    header = struct.pack(f"<{1 + 15}L", len(segments), *offsets, *([0] * (15 - len(offsets))))
    return header + b"".join(segments)


# -- datasets -------------------------------------------------------------------------------


def _base_dataset(
    pat: _Patient, st: _Study, se: _Series, *, study_uid: str, series_uid: str, sop_uid: str, sop_class: str, number: int, for_uid: str
):
    from pydicom.dataset import Dataset, FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = se.transfer_syntax
    meta.ImplementationClassUID = UID_ROOT + "1.2024.1"
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds = Dataset()
    ds.file_meta = meta
    if pat.charset:
        ds.SpecificCharacterSet = pat.charset
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    if st.date:
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = st.date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = st.time
    ds.AccessionNumber = st.accession
    ds.Modality, ds.Manufacturer = "MR", "clpipe synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = st.description
    if se.description is not None:
        ds.SeriesDescription = ds.ProtocolName = se.description
    ds.PatientName, ds.PatientID = pat.name, pat.patient_id
    ds.PatientBirthDate, ds.PatientSex = pat.birth_date, pat.sex
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyID = "1"
    if se.number is not None:
        ds.SeriesNumber = se.number
    ds.InstanceNumber = number
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    return ds


def _image_pixels(ds, rows: int, cols: int, frames: int) -> None:
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames:
        ds.NumberOfFrames = frames


def _mr_image(ds, i: int, rows: int, cols: int, pixels: bytes, transfer_syntax: str) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "GR", "NONE", ""
    ds.MRAcquisitionType = "2D"
    ds.MagneticFieldStrength, ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = 3, 2.5, 2000, 1
    ds.SliceThickness, ds.PixelSpacing = 1, [1, 1]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, float(i)]
    ds.SliceLocation = float(i)
    _image_pixels(ds, rows, cols, 0)
    _set_pixels(ds, [pixels], transfer_syntax, rows, cols)


def _enhanced_mr(ds, rows: int, cols: int, frames: list[bytes], seed: object) -> None:
    from pydicom.dataset import Dataset

    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.ContentQualification, ds.ResonantNucleus = "RESEARCH", "1H"
    ds.MRAcquisitionType, ds.MagneticFieldStrength = "3D", 3
    ds.AcquisitionDateTime = f"{ds.get('StudyDate', '20240101')}101500"
    ds.PixelPresentation, ds.VolumetricProperties, ds.VolumeBasedCalculationTechnique = ("MONOCHROME", "VOLUME", "NONE")
    ds.ComplexImageComponent, ds.AcquisitionContrast = "MAGNITUDE", "T1"
    ds.BurnedInAnnotation, ds.LossyImageCompression = "NO", "00"
    measures, orient = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [1, 1], 1
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared = Dataset()
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orient]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k in range(len(frames)):
        content, position, item = Dataset(), Dataset(), Dataset()
        content.FrameAcquisitionNumber, content.InStackPositionNumber = 1, k + 1
        content.StackID, content.DimensionIndexValues = "1", [1, k + 1]
        position.ImagePositionPatient = [0, 0, float(k)]
        item.FrameContentSequence, item.PlanePositionSequence = [content], [position]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    dim_org = _uid(seed, "dimension-organization")
    org = Dataset()
    org.DimensionOrganizationUID = dim_org
    ds.DimensionOrganizationSequence = [org]
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = []
    for pointer, group in ((0x00209056, 0x00209111), (0x00209057, 0x00209111)):
        idx = Dataset()
        idx.DimensionOrganizationUID = dim_org
        idx.DimensionIndexPointer, idx.FunctionalGroupPointer = pointer, group
        ds.DimensionIndexSequence.append(idx)
    _image_pixels(ds, rows, cols, len(frames))
    _set_pixels(ds, frames, ds.file_meta.TransferSyntaxUID, rows, cols)


def _set_pixels(ds, frames: list[bytes], transfer_syntax: str, rows: int, cols: int) -> None:
    if transfer_syntax == RLE_LOSSLESS:
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([_rle_frame(f, rows, cols) for f in frames])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = b"".join(frames)
        ds["PixelData"].VR = "OW"


def _pydicom3() -> bool:
    import pydicom

    return int(pydicom.__version__.split(".")[0]) >= 3


def _encode(ds, *, part10: bool = True) -> bytes:
    """The dataset as a Part 10 file (or, ``part10=False``, as a bare Implicit VR Little
    Endian data set without preamble or file meta, as old ACR-NEMA style files are)."""
    import io

    buf = io.BytesIO()
    if part10:
        if _pydicom3():
            ds.save_as(buf, enforce_file_format=True)
        else:  # pragma: no cover - pydicom 2.x
            ds.is_little_endian = True
            ds.is_implicit_VR = ds.file_meta.TransferSyntaxUID == IMPLICIT_LE
            ds.save_as(buf, write_like_original=False)
        return buf.getvalue()
    from pydicom.dataset import Dataset

    bare = Dataset()  # the same elements, no file meta, no preamble
    for elem in ds:
        bare.add(elem)
    if _pydicom3():
        bare.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=False)
    else:  # pragma: no cover - pydicom 2.x
        bare.is_little_endian, bare.is_implicit_VR = True, True
        bare.save_as(buf, write_like_original=True)
    return buf.getvalue()


def _generate(scale: int, rows: int, cols: int, seed: object):
    """Yield ``(indexes, attributes, dataset)`` for every instance of the data set, in order."""
    if scale < 1:
        raise ValueError("scale must be at least 1")
    pattern = _pattern(rows, cols, seed)
    key = (seed, scale)
    for p, pat in enumerate(_plan(scale)):
        for s, st in enumerate(pat.studies):
            study_uid = _uid(key, p, s)
            for k, se in enumerate(st.series):
                series_uid = _uid(key, p, s, k)
                for_uid = _uid(key, p, s, k, "frame-of-reference")
                count = 1 if se.frames else se.instances
                for i in range(1, count + 1):
                    sop_uid = _uid(key, p, s, k, i)
                    sop_class = ENHANCED_MR_IMAGE if se.frames else MR_IMAGE
                    ds = _base_dataset(
                        pat,
                        st,
                        se,
                        study_uid=study_uid,
                        series_uid=series_uid,
                        sop_uid=sop_uid,
                        sop_class=sop_class,
                        number=i,
                        for_uid=for_uid,
                    )
                    offset = 977 * (p * 10000 + s * 1000 + k * 100) + 131 * i
                    if se.frames:
                        frames = [_frame(pattern, rows, cols, offset + 257 * f) for f in range(se.frames)]
                        _enhanced_mr(ds, rows, cols, frames, key)
                    else:
                        _mr_image(ds, i, rows, cols, _frame(pattern, rows, cols, offset), se.transfer_syntax)
                    yield (p, s, k, i), (pat, st, se), ds


def _record(ds, pat: _Patient, st: _Study, se: _Series, path: str, data: bytes) -> dict:
    return {
        "SOPInstanceUID": ds.SOPInstanceUID,
        "SOPClassUID": ds.SOPClassUID,
        "StudyInstanceUID": ds.StudyInstanceUID,
        "SeriesInstanceUID": ds.SeriesInstanceUID,
        "PatientID": pat.patient_id,
        "PatientName": pat.name,
        "StudyDate": st.date,
        "StudyDescription": st.description,
        "AccessionNumber": st.accession,
        "Modality": "MR",
        "SeriesNumber": se.number,
        "SeriesDescription": se.description,
        "InstanceNumber": int(ds.InstanceNumber),
        "NumberOfFrames": se.frames or 1,
        "SpecificCharacterSet": pat.charset,
        "TransferSyntaxUID": se.transfer_syntax,
        "path": path,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def describe(entries: list[tuple[dict, _Patient, _Study, _Series]], *, root: Path, scale: int, rows: int, cols: int, seed: str) -> dict:
    """The expected-content description (the JSON written next to the data) of the instances
    in ``entries``: (instance record, its patient, study and series in the plan)."""
    instances = [rec for rec, *_ in entries]
    patients: dict[str, dict] = {}
    studies: dict[str, dict] = {}
    series: dict[str, dict] = {}
    for rec, pat, st, se in entries:
        pr = patients.get(rec["PatientID"])
        if pr is None:
            pr = patients[rec["PatientID"]] = {
                "PatientID": pat.patient_id,
                "PatientName": pat.name,
                "SpecificCharacterSet": pat.charset,
                "studies": 0,
                "series": 0,
                "instances": 0,
                "odd": pat.odd,
            }
        sr = studies.get(rec["StudyInstanceUID"])
        if sr is None:
            pr["studies"] += 1
            sr = studies[rec["StudyInstanceUID"]] = {
                "StudyInstanceUID": rec["StudyInstanceUID"],
                "PatientID": pat.patient_id,
                "PatientName": pat.name,
                "StudyDate": st.date,
                "StudyDescription": st.description,
                "AccessionNumber": st.accession,
                "series": 0,
                "instances": 0,
                "odd": st.odd,
            }
        er = series.get(rec["SeriesInstanceUID"])
        if er is None:
            pr["series"] += 1
            sr["series"] += 1
            er = series[rec["SeriesInstanceUID"]] = {
                "SeriesInstanceUID": rec["SeriesInstanceUID"],
                "StudyInstanceUID": rec["StudyInstanceUID"],
                "PatientID": pat.patient_id,
                "Modality": "MR",
                "SeriesNumber": se.number,
                "SeriesDescription": se.description,
                "SOPClassUID": rec["SOPClassUID"],
                "TransferSyntaxUID": se.transfer_syntax,
                "instances": 0,
                "frames": 0,
                "bytes": 0,
                "odd": se.odd,
            }
        pr["instances"] += 1
        sr["instances"] += 1
        er["instances"] += 1
        er["frames"] += rec["NumberOfFrames"]
        er["bytes"] += rec["size"]
    odd = {
        "rle_series": _find(series, lambda r: r["TransferSyntaxUID"] == RLE_LOSSLESS),
        "implicit_vr_series": _find(series, lambda r: r["TransferSyntaxUID"] == IMPLICIT_LE),
        "multiframe_series": _find(series, lambda r: r["SOPClassUID"] == ENHANCED_MR_IMAGE),
        "multiframe_instance": next(r["SOPInstanceUID"] for r in instances if r["NumberOfFrames"] > 1),
        "no_description_series": _find(series, lambda r: r["SeriesDescription"] is None),
        "control_char_series": _find(series, lambda r: "\t" in (r["SeriesDescription"] or "")),
        "dotdot_series": _find(series, lambda r: ".." in (r["SeriesDescription"] or "")),
        "no_study_date_study": _find(studies, lambda r: r["StudyDate"] is None),
        "non_ascii_patient": _find(patients, lambda r: not r["PatientName"].isascii()),
        "slash_patient": _find(patients, lambda r: "/" in r["PatientID"]),
        "two_study_patient": _find(patients, lambda r: r["studies"] > 1),
    }
    return {
        "format": FORMAT,
        "root": str(root),
        "generator": {"module": __name__, "scale": scale, "rows": rows, "columns": cols, "seed": seed},
        "counts": {
            "patients": len(patients),
            "studies": len(studies),
            "series": len(series),
            "instances": len(instances),
            "frames": sum(r["NumberOfFrames"] for r in instances),
            "bytes": sum(r["size"] for r in instances),
        },
        "sop_classes": sorted({r["SOPClassUID"] for r in instances}),
        "transfer_syntaxes": sorted({r["TransferSyntaxUID"] for r in instances}),
        "odd": odd,
        "patients": list(patients.values()),
        "studies": list(studies.values()),
        "series": list(series.values()),
        "instances": instances,
    }


def _find(table: dict, pred) -> str:
    return next(uid for uid, rec in table.items() if pred(rec))


def make_dataset(
    folder: str | os.PathLike, *, scale: int = 1, rows: int = 64, cols: int = 64, seed: str = "0", expected: str | os.PathLike | None = None
) -> dict:
    """Write the data set under ``folder`` as ``PAT<p>/STUDY<s>/SERIES<k>/<SOPInstanceUID>.dcm``
    (only DICOM files, ``folder`` is emptied of earlier ones first) and return its description;
    ``expected``: also write the description there as JSON. Paths in it are relative to ``folder``."""
    root = Path(folder).absolute()
    if root.exists():
        for old in root.glob("PAT*"):
            shutil.rmtree(old)
    records = []
    for (p, s, k, _i), (pat, st, se), ds in _generate(scale, rows, cols, seed):
        rel = f"PAT{p + 1}/STUDY{s + 1}/SERIES{k + 1:02d}/{ds.SOPInstanceUID}.dcm"
        data = _encode(ds)
        _write(root / rel, data)
        records.append((_record(ds, pat, st, se, rel, data), pat, st, se))
    desc = describe(records, root=root, scale=scale, rows=rows, cols=cols, seed=seed)
    if expected is not None:
        write_expected(desc, expected)
    return desc


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_expected(desc: dict, path: str | os.PathLike) -> None:
    """Write a description as JSON (UTF-8, non-ASCII kept), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(desc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def load_expected(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _folder_name(text: str | None, fallback: str) -> str:
    """A folder name for a tree, keeping spaces and non-ASCII; '/' and controls become '_'."""
    if not text:
        return fallback
    name = "".join("_" if c == "/" or ord(c) < 32 else c for c in text).strip()
    return name if name not in ("", ".", "..") else fallback


_EXTENSIONS = [".dcm", "", ".DCM", ".ima", ".dcm", "", ".dicom", ".dcm", "", ".dcm"]


def make_file_tree(
    folder: str | os.PathLike, *, scale: int = 1, rows: int = 64, cols: int = 64, seed: str = "0", expected: str | os.PathLike | None = None
) -> dict:
    """Write the same instances as :func:`make_dataset` as an untidy export tree, for
    ``file://`` sources, and return the description with the tree's paths plus a ``tree`` key.

    - nested folders named after patient, study and series, with spaces and non-ASCII
      (``Müller^José/20240220 Kopf Übersicht/001 séquence localizer é/``), one series four
      levels deeper than the others;
    - file names with ``.dcm``, ``.DCM``, ``.ima``, ``.dicom`` or no extension at all;
    - non-DICOM files: ``README`` (no extension), ``notes.txt``, ``series.json``, an empty
      ``empty.dcm``, an AppleDouble ``._IM0001.dcm`` (not DICOM despite its name);
    - one instance without preamble and file meta (bare Implicit VR data set, readable with
      ``pydicom.dcmread(force=True)``), in place of its normal file;
    - byte-identical copies of three instances under other names (``duplicates/``, and
      ``IM0001 (1).dcm`` next to its original).

    ``tree``: ``dicom_files`` (every DICOM file: path, SOPInstanceUID, kind ``primary`` /
    ``no_preamble`` / ``duplicate``, size, sha256), ``other_files`` (path, size, what) and
    ``no_preamble`` / ``duplicates`` (paths). ``instances[*].path`` is each instance's primary file.
    """
    root = Path(folder).absolute()
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty: make_file_tree writes into a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    records, dicom_files, other = [], [], []
    duplicates, no_preamble = [], []
    first_of_series: dict[tuple, tuple[str, bytes]] = {}
    for (p, s, k, i), (pat, st, se), ds in _generate(scale, rows, cols, seed):
        parts = [_folder_name(pat.name, f"patient{p + 1}"), _folder_name(f"{st.date or 'nodate'} {st.description}", f"study{s + 1}")]
        if (p, s, k) == (0, 0, 1):
            parts += ["extra", "deeper", "and deeper", "still"]
        number = f"{se.number:03d}" if se.number is not None else "000"
        parts.append(_folder_name(f"{number} {se.description or ''}".strip(), f"series{k + 1}"))
        ext = _EXTENSIONS[(p * 3 + s * 2 + k) % len(_EXTENSIONS)]
        rel = "/".join(parts + [f"IM{i:04d}{ext}"])
        kind = "primary"
        if (p, s, k, i) == (1, 0, 1, 2):  # SUB02's "T1w", second instance: no preamble
            data = _encode(ds, part10=False)
            kind = "no_preamble"
            no_preamble.append(rel)
        else:
            data = _encode(ds)
        _write(root / rel, data)
        records.append((_record(ds, pat, st, se, rel, data), pat, st, se))
        dicom_files.append(
            {"path": rel, "SOPInstanceUID": ds.SOPInstanceUID, "kind": kind, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )
        first_of_series.setdefault((p, s, k), (rel, data))
    # duplicates: byte-identical copies under other names
    for n, key in enumerate([(0, 0, 0), (1, 0, 2), (2, 0, 0)]):
        rel, data = first_of_series[key]
        dup = f"duplicates/copy {n + 1} of {Path(rel).name}" if n else str(Path(rel).with_name("IM0001 (1).dcm"))
        _write(root / dup, data)
        sop = next(d["SOPInstanceUID"] for d in dicom_files if d["path"] == rel)
        dicom_files.append(
            {"path": dup, "SOPInstanceUID": sop, "kind": "duplicate", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )
        duplicates.append(dup)
    # non-DICOM files mixed in
    series_dir = str(Path(first_of_series[(0, 0, 0)][0]).parent)
    junk = [
        ("README", b"Synthetic export for clpipe's file:// tests. Not DICOM.\n", "text without extension"),
        ("notes.txt", "scan notes: é\n".encode(), "text file"),
        (f"{series_dir}/series.json", json.dumps({"series": "T1w MPRAGE"}).encode(), "JSON sidecar"),
        (f"{series_dir}/empty.dcm", b"", "empty file with .dcm extension"),
        (
            f"{series_dir}/._IM0001.dcm",
            b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(40),
            "AppleDouble metadata with .dcm extension",
        ),
    ]
    for rel, data, what in junk:
        _write(root / rel, data)
        other.append({"path": rel, "size": len(data), "what": what})
    desc = describe(records, root=root, scale=scale, rows=rows, cols=cols, seed=seed)
    desc["tree"] = {"dicom_files": dicom_files, "other_files": other, "no_preamble": no_preamble, "duplicates": duplicates}
    if expected is not None:
        write_expected(desc, expected)
    return desc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m clpipe.testing.dicomdata", description="Write clpipe's synthetic MR DICOM test data set and its description."
    )
    ap.add_argument("outdir", help="folder to write the data set into")
    ap.add_argument("--scale", type=int, default=1, help="multiply the instances per series (default 1: 139 instances)")
    ap.add_argument("--size", type=int, default=64, help="rows and columns of every image (default 64)")
    ap.add_argument("--seed", default="0", help="another seed gives other UIDs and pixels (default 0)")
    ap.add_argument("--tree", action="store_true", help="write the untidy file:// tree instead of the plain layout")
    ap.add_argument(
        "--expected",
        help="where to write the JSON description (default OUTDIR.expected.json, beside OUTDIR so that OUTDIR holds only the data)",
    )
    args = ap.parse_args(argv)
    if args.scale < 1:
        ap.error("--scale must be at least 1")
    expected = args.expected or os.path.normpath(args.outdir) + ".expected.json"
    make = make_file_tree if args.tree else make_dataset
    desc = make(args.outdir, scale=args.scale, rows=args.size, cols=args.size, seed=args.seed, expected=expected)
    c = desc["counts"]
    print(
        f"wrote {c['patients']} patients, {c['studies']} studies, {c['series']} series, "
        f"{c['instances']} instances ({c['bytes']} bytes) to {desc['root']}; description: {expected}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
