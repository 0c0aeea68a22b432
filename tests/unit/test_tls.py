"""TLS files are loaded one way (clpipe.sources.tls) and a bad one is said one way, naming
the setting to fix, for DICOMweb as for DIMSE."""

from __future__ import annotations

import pytest

from clpipe.errors import ConfigError
from clpipe.sources.dicom import SourceSettings, parse_source_url


@pytest.fixture
def not_pem(tmp_path):
    path = tmp_path / "ca.pem"
    path.write_text("not a certificate\n")
    return str(path)


def test_a_bad_ca_file_names_tlscafile_for_dicomweb(not_pem):
    from clpipe.sources.dicomweb import DicomWebSource

    with pytest.raises(ConfigError, match=r"^TLSCAFile: .*ca\.pem is not a PEM file of CA certificates \("):
        DicomWebSource.check(parse_source_url("dicomweb+https://127.0.0.1:1/dicom-web"), SourceSettings(tls_ca=not_pem))


def test_a_bad_certificate_names_both_settings_for_dicomweb(not_pem):
    from clpipe.sources.dicomweb import DicomWebSource

    with pytest.raises(ConfigError, match=r"^TLSCertFile/TLSKeyFile: .*ca\.pem and .*ca\.pem are not a PEM certificate and its key"):
        DicomWebSource.check(parse_source_url("dicomweb+https://127.0.0.1:1/dicom-web"), SourceSettings(tls_cert=not_pem, tls_key=not_pem))


def test_dimse_says_it_the_same_way(not_pem):
    from clpipe.sources.dimse.association import tls_context

    with pytest.raises(ConfigError, match=r"^TLSCAFile: .*ca\.pem is not a PEM file of CA certificates \("):
        tls_context(SourceSettings(tls_ca=not_pem))
