"""TLS files (TLSCAFile, TLSCertFile, TLSKeyFile) loaded into an ``ssl.SSLContext``, one
way for every source that speaks TLS itself (DICOMweb over https, DIMSE over TLS).

:func:`load_context` raises :class:`TLSFileError` saying which file would not load (the
CA bundle, or the certificate and its key); each source words the message in its own
settings' terms.
"""

from __future__ import annotations

import ssl
from typing import Literal


class TLSFileError(Exception):
    """A TLS file that would not load: ``part`` is "ca" (the CA bundle) or "cert" (the
    certificate and its key); ``error`` is what ``ssl`` said."""

    def __init__(self, part: Literal["ca", "cert"], error: OSError | ssl.SSLError):
        super().__init__(str(error))
        self.part, self.error = part, error

    def message(self, ca: str, cert: str, key: str) -> str:
        """One line naming the setting to fix and the file(s) it names."""
        reason = getattr(self.error, "strerror", None) or self.error
        if self.part == "ca":
            return f"TLSCAFile: {ca} is not a PEM file of CA certificates ({reason})"
        return f"TLSCertFile/TLSKeyFile: {cert} and {key or cert} are not a PEM certificate and its key ({reason})"


def load_context(ca: str = "", cert: str = "", key: str = "", *, server_side: bool = False) -> ssl.SSLContext:
    """A TLS context trusting ``ca`` (else the system's CAs), presenting ``cert`` and
    ``key`` when given. ``server_side``: for a server we run (it asks clients for a
    certificate signed by ``ca`` when ``ca`` is set)."""
    purpose = ssl.Purpose.CLIENT_AUTH if server_side else ssl.Purpose.SERVER_AUTH
    try:
        context = ssl.create_default_context(purpose, cafile=ca or None)
    except (ssl.SSLError, OSError) as exc:
        raise TLSFileError("ca", exc) from None
    if cert:
        try:
            context.load_cert_chain(cert, key or None)
        except (ssl.SSLError, OSError) as exc:
            raise TLSFileError("cert", exc) from None
    if server_side and ca:
        context.verify_mode = ssl.CERT_REQUIRED
    return context
