"""The signatures ``MakeSignature`` returns (PROTOCOLS 1).

``PKCS7``: attached CMS SignedData (RFC 5652): eContent is the tbs, SHA-256,
signed attributes contentType, signingTime and messageDigest, plus the page's
nonce (1.2.840.113549.1.9.25.3) and the card number (2.16.886.1.100.2.204) as
newer component versions add, RSA PKCS#1 v1.5 over their DER (as a SET OF), the
signer named by issuer and serial number, and only the card's certificate
embedded. ``PKCS1``: the bare signature over the tbs.
``sign`` is the card's SHA256-RSA-PKCS operation; the key never leaves the card.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

from asn1crypto import algos, cms, core, x509


OID_NONCE = "1.2.840.113549.1.9.25.3"  # PKCS #9 randomNonce
OID_CARD_SN = "2.16.886.1.100.2.204"


def _any(value: core.Asn1Value) -> core.Any:
    return core.Any.load(value.dump())


def pkcs7(sign, cert_der: bytes, tbs: bytes, *, nonce: str = "", card: str = "",
          now: datetime | None = None) -> bytes:
    cert = x509.Certificate.load(cert_der)
    digest = algos.DigestAlgorithm({"algorithm": "sha256"})
    attrs = [
        {"type": "content_type", "values": ["data"]},
        {"type": "signing_time", "values": [cms.Time({"utc_time": now or datetime.now(timezone.utc)})]},
        {"type": "message_digest", "values": [hashlib.sha256(tbs).digest()]},
    ]
    if nonce:
        attrs.append({"type": OID_NONCE, "values": [_any(core.OctetString(nonce.encode()))]})
    if card:
        attrs.append({"type": OID_CARD_SN, "values": [_any(core.PrintableString(card))]})
    attrs = cms.CMSAttributes(attrs)
    signature = sign(attrs.dump())  # a standalone CMSAttributes is DER-encoded as the SET OF it signs
    signer = cms.SignerInfo({
        "version": "v1",
        "sid": cms.SignerIdentifier({"issuer_and_serial_number": cms.IssuerAndSerialNumber(
            {"issuer": cert.issuer, "serial_number": cert.serial_number})}),
        "digest_algorithm": digest,
        "signed_attrs": attrs,
        "signature_algorithm": algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15"}),
        "signature": signature,
    })
    signed = cms.SignedData({
        "version": "v1",
        "digest_algorithms": [digest],
        "encap_content_info": {"content_type": "data", "content": core.OctetString(tbs)},
        "certificates": [cert],
        "signer_infos": [signer],
    })
    return cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()


def pkcs1(sign, cert_der: bytes, tbs: bytes, **_) -> bytes:
    return sign(tbs)
