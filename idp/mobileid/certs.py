"""The holder's certificate: path validation to a trust set, the signature over
our sign_data, and the last four ID digits a MOICA certificate carries.

``validate_chain`` is this package's own small path validation, until the
certificate factor's shared validator (``idp/pki``, with revocation) replaces
it: the connector takes any callable ``(leaf, at) -> chain``.

Every certificate in the trust set is an anchor: the shared set
(``../shared/trust``) ships the MOICA CAs beside the GRCA roots, and the
service returns the leaf alone, so the leaf must be issued by one of them.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from idp.mobileid.errors import BadSignature, UntrustedCertificate

SUBJECT_DIRECTORY_ATTRIBUTES = x509.ObjectIdentifier("2.5.29.9")
ID_LAST_FOUR = "2.16.886.1.100.2.51"


def load_certificate(text: str) -> x509.Certificate:
    """The service's ``cert``: base64 DER (or PEM)."""
    try:
        if "-----BEGIN" in text:
            return x509.load_pem_x509_certificate(text.encode())
        return x509.load_der_x509_certificate(base64.b64decode(text))
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same refusal
        raise UntrustedCertificate(f"the certificate cannot be read: {exc}") from None


def load_trust(paths: Iterable[str | Path]) -> list[x509.Certificate]:
    """Certificates from PEM files, or from every *.pem in a directory."""
    out: list[x509.Certificate] = []
    for path in map(Path, paths):
        files = sorted(path.glob("*.pem")) if path.is_dir() else [path]
        for file in files:
            out.extend(x509.load_pem_x509_certificates(file.read_bytes()))
    return out


def _valid_at(cert: x509.Certificate, at: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= at <= cert.not_valid_after_utc


def _ext(cert: x509.Certificate, cls):
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


class TrustSet:
    def __init__(self, anchors: Sequence[x509.Certificate]):
        self.anchors = list(anchors)

    def validate_chain(self, leaf: x509.Certificate, at: dt.datetime) -> list[x509.Certificate]:
        """[leaf, anchor], or UntrustedCertificate. No revocation check (see module doc)."""
        if not _valid_at(leaf, at):
            raise UntrustedCertificate("the certificate is not valid at this time")
        constraints = _ext(leaf, x509.BasicConstraints)
        if constraints is not None and constraints.ca:
            raise UntrustedCertificate("a CA certificate cannot sign a login")
        usage = _ext(leaf, x509.KeyUsage)
        if usage is not None and not (usage.digital_signature or usage.content_commitment):
            raise UntrustedCertificate("the certificate is not for signatures")
        for anchor in self.anchors:
            if anchor.subject != leaf.issuer or not _valid_at(anchor, at):
                continue
            anchor_constraints = _ext(anchor, x509.BasicConstraints)
            anchor_usage = _ext(anchor, x509.KeyUsage)
            if anchor_constraints is None or not anchor_constraints.ca:
                continue
            if anchor_usage is not None and not anchor_usage.key_cert_sign:
                continue
            try:
                leaf.verify_directly_issued_by(anchor)
            except (ValueError, TypeError, InvalidSignature):
                continue  # same name, other key (MOICA G2 and G3 share their DN)
            return [leaf, anchor]
        raise UntrustedCertificate("the certificate is not issued by a trusted authority")


def verify_signature(cert: x509.Certificate, data: bytes, signature: bytes) -> None:
    """PKCS#1 v1.5 / SHA-256 (RSA, as MOICA keys are) or ECDSA / SHA-256, else BadSignature."""
    key = cert.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            raise BadSignature("unsupported key type")
    except InvalidSignature:
        raise BadSignature() from None


def id_last_four(cert: x509.Certificate) -> str | None:
    """The 2.16.886.1.100.2.51 attribute of subjectDirectoryAttributes, if present."""
    try:
        ext = cert.extensions.get_extension_for_oid(SUBJECT_DIRECTORY_ATTRIBUTES).value
    except x509.ExtensionNotFound:
        return None
    raw = getattr(ext, "value", None)
    if raw is None:
        return None
    try:
        for attribute in _der_children(_der_read(raw, 0)[1]):
            parts = _der_children(attribute)
            if _der_oid(parts[0]) == ID_LAST_FOUR:
                value = _der_children(parts[1])[0]
                return value.decode("ascii")
    except (IndexError, ValueError, UnicodeDecodeError):
        return None
    return None


# -- a minimal DER reader for the one extension cryptography does not parse ------------------
def _der_read(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """(tag, content, next position) of the element at ``pos``."""
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, data[pos:pos + length], pos + length


def _der_children(content: bytes) -> list[bytes]:
    """The contents of each element inside a constructed element's content."""
    out, pos = [], 0
    while pos < len(content):
        _, inner, pos = _der_read(content, pos)
        out.append(inner)
    return out


def _der_oid(content: bytes) -> str:
    first, rest = divmod(content[0], 40) if content[0] < 80 else (2, content[0] - 80)
    arcs, value = [first, rest], 0
    for byte in content[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    return ".".join(map(str, arcs))
