"""Certificate-login verification core (SPEC A3): HiPKI signatures, chains, revocation.

The web layer needs four names::

    from idp.pki import load_trust, RevocationChecker, RevocationPolicy, verify_signature, PKIError

    trust = load_trust("keys/trust")                       # once, at start-up
    checker = RevocationChecker(RevocationPolicy(mode="hard-fail"))   # once: holds the CRL cache
    try:
        who = await verify_signature(
            result["signature"],            # base64 str from MakeSignature (PKCS7), or bytes (DER)
            challenge,                      # bytes: exactly the tbs this login transaction issued
            certificate=result.get("certb64"),  # needed for signatureType "PKCS1"; optional for PKCS7
            trust=trust, revocation=checker, now=clock_now_aware_datetime,
            kind="personal",                # or "aa"; None = any anchor set
        )
    except PKIError as exc:
        exc.code   # bad_format | challenge_mismatch | signature_invalid | untrusted | expired |
                   # not_yet_valid | key_usage | weak_key | revoked | revocation_unavailable
    who.binding_key            # (issuer_dn, subject_serial_number): what an account binds to
    who.id_last4               # compare with the account's ID number, when it has one
    who.anchor_set, who.kinds  # which configured set matched; kinds it may log in

``verify_certificate(cert, trust=..., revocation=..., now=..., kind=...)`` runs the
same path, key-usage, key-strength and revocation checks on a certificate whose key was proven
elsewhere (the TLS client-certificate mode: a proxy verified the handshake).

Accepted forms: CMS SignedData (attached eContent, or detached with the
challenge supplied here), signed attributes with messageDigest, SHA-256/384/512,
RSA PKCS#1 v1.5, RSA-PSS or ECDSA as the key dictates, signer by
issuerAndSerialNumber or subjectKeyIdentifier; and the bare PKCS#1 signature
over the challenge with the certificate passed separately.

The verification is ``async`` because revocation may go to the network
(httpx); signature and path checks are CPU only (a few ms). The challenge
must be single-use: this module proves the card signed *these bytes*, the
caller proves the bytes were fresh. ``now`` comes from the caller's clock so
tests inject time. ``errors``: stable codes; ``trust``: anchor sets and
their account kinds; ``revocation``: OCSP/CRL with soft/hard-fail.
"""

from .errors import (
    BadFormat, ChallengeMismatch, Expired, KeyUsage, NotYetValid, PKIError, Revoked, RevocationUnavailable,
    SignatureInvalid, Untrusted, WeakKey,
)
from .revocation import RevocationChecker, RevocationPolicy, RevocationStatus
from .trust import AnchorSet, TrustStore, check_issuers, load_trust
from .verify import CertificateIdentity, directory_attributes, verify_certificate, verify_signature

__all__ = [
    "AnchorSet", "BadFormat", "CertificateIdentity", "ChallengeMismatch", "Expired", "KeyUsage", "NotYetValid",
    "PKIError", "RevocationChecker", "RevocationPolicy", "RevocationStatus", "RevocationUnavailable", "Revoked",
    "SignatureInvalid", "TrustStore", "Untrusted", "WeakKey", "check_issuers", "directory_attributes", "load_trust",
    "verify_certificate", "verify_signature",
]
