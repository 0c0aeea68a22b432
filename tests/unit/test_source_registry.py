"""The source registry (sources/registry.py), the sources' layering, and the one DICOM
Part-10 reader/writer (sources/part10.py) every DICOM source shares."""

from __future__ import annotations

import ast
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import pytest

import clpipe.sources
from clpipe.errors import ConfigError
from clpipe.sources import registry
from clpipe.sources.dicom import SCHEMES, SourceSettings, check_before_submit, parse_source_url
from clpipe.sources.part10 import meta_sop_instance_uid, part10_header

SOURCES_DIR = Path(clpipe.sources.__file__).parent


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)


def test_every_url_scheme_has_a_source_class():
    for scheme in (*SCHEMES, "fw"):
        cls = registry.source_class(scheme)
        assert isinstance(cls, type) and cls.__name__.endswith("Source"), scheme
    for scheme in SCHEMES:  # what the submitting machine checks before a job is queued
        assert callable(getattr(registry.source_class(scheme), "check", None)), scheme
    assert registry.url_scheme(" DIMSE://AE@host:104") == "dimse" and registry.url_scheme("/no/scheme") == ""
    with pytest.raises(ConfigError, match=r"no clpipe source serves s3:// URLs \(known: fw://"):
        registry.source_class("s3")


def test_a_source_module_is_imported_only_when_used():
    done = _run(
        "import sys; from clpipe.sources import registry, dicom; "
        "print(sorted(m for m in sys.modules if m.startswith(('clpipe.sources.', 'pynetdicom', 'pydicom')))); "
        "registry.source_class('dimse'); print('clpipe.sources.dimse' in sys.modules)"
    )
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first == "['clpipe.sources.dicom', 'clpipe.sources.registry']" and second == "True"


def test_a_missing_package_is_one_line_naming_it():
    done = _run(
        "import sys; sys.modules['pynetdicom'] = None\n"
        "from clpipe.errors import ConfigError\n"
        "from clpipe.sources.dicom import SourceSettings, check_before_submit, parse_source_url\n"
        "try:\n"
        "    check_before_submit(parse_source_url('dimse://PACS@127.0.0.1:104'), SourceSettings())\n"
        "except ConfigError as exc:\n"
        "    print(exc.exit_code, exc)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "2 dimse:// sources need the Python package 'pynetdicom', which is not installed; "
        "install it (pip install pynetdicom) in the environment that runs clpipe"
    )


def test_check_before_submit_goes_through_each_source_class(tmp_path):
    check_before_submit(parse_source_url(tmp_path.as_uri()), SourceSettings())  # a folder that can be listed
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        (tmp_path / "f").write_text("x")
        check_before_submit(parse_source_url((tmp_path / "f").as_uri()), SourceSettings())
    with pytest.raises(ConfigError, match=r"CallingAET: 'BAD\\\\AE' must be 1-16 ASCII"):
        check_before_submit(parse_source_url("dimse://PACS@127.0.0.1:104"), SourceSettings(calling_aet="BAD\\AE"))
    with pytest.raises(ConfigError, match="TLSCAFile: .* does not exist"):
        check_before_submit(parse_source_url("dimse://PACS@127.0.0.1:104"), SourceSettings(tls_ca=str(tmp_path / "no.pem")))


def _imports(path: Path) -> set[str]:
    """Every module a file imports (at module level or in functions), relative ones resolved
    against clpipe.sources[.dimse]."""
    package = "clpipe.sources.dimse" if path.parent.name == "dimse" else "clpipe.sources"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_the_sources_import_nothing_above_them_and_dicom_no_source():
    for path in sorted(SOURCES_DIR.rglob("*.py")):
        above = {n for n in _imports(path) if n.startswith(("clpipe.sync", "clpipe.engines", "clpipe.cli", "clpipe.batch"))}
        assert not above, f"{path.name} imports {above}"
    concrete = {
        n
        for n in _imports(SOURCES_DIR / "dicom.py")
        if n.startswith(("clpipe.sources.dicomweb", "clpipe.sources.dimse", "clpipe.sources.localdir"))
    }
    assert not concrete


def test_part10_meta_is_read_as_pydicom_reads_it():
    import pydicom

    dataset = b"\x08\x00\x18\x00\x08\x00\x00\x001.2.3.4\x00"  # (0008,0018) SOPInstanceUID, Implicit VR LE
    for aet in ("", "ORTHANC"):
        data = part10_header("1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.1", "1.2.840.10008.1.2", aet) + dataset
        assert meta_sop_instance_uid(data) == "1.2.826.0.1.3680043.8.498.1"
        ds = pydicom.dcmread(BytesIO(data))
        assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.826.0.1.3680043.8.498.1"
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2" and ds.SOPInstanceUID == "1.2.3.4"
        assert str(ds.file_meta.get("SourceApplicationEntityTitle", "")).strip() == aet
        assert meta_sop_instance_uid(data[:140]) == ""  # cut inside the meta: no UID, never an exception
    assert meta_sop_instance_uid(dataset) == "" and meta_sop_instance_uid(b"\0" * 128 + b"DICM") == ""


def test_a_received_dataset_is_routed_by_its_series_uid_as_pydicom_reads_it():
    import zlib

    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.sequence import Sequence

    from clpipe.sources.dimse.storage import series_uid
    from clpipe.sources.part10 import Unfollowable, dataset_text

    item = Dataset()
    item.CodeValue, item.CodeMeaning = "T1", "a sequence item before the series UID"
    ds = Dataset()
    ds.SOPInstanceUID, ds.PatientName = "1.2.3.4.5", "Müller^José"
    ds.ProcedureCodeSequence = Sequence([item])  # (0008,1032): undefined length when implicit
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = "1.2.3", "1.2.3.77", 7
    for implicit, syntax in ((True, "1.2.840.10008.1.2"), (False, "1.2.840.10008.1.2.1")):
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
        write_dataset(buffer, ds)
        data = buffer.getvalue()
        assert dataset_text(data, 0x0020000E, implicit=implicit) == "1.2.3.77"
        assert series_uid(data, syntax) == "1.2.3.77"
        if not implicit:
            packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
            assert series_uid(packer.compress(data) + packer.flush(), "1.2.840.10008.1.2.1.99") == "1.2.3.77"
            with pytest.raises(Unfollowable):  # an unknown VR: pydicom reads it instead
                dataset_text(data[:4] + b"ZZ" + data[6:], 0x0020000E, implicit=False)
    assert dataset_text(b"", 0x0020000E, implicit=True) == ""
