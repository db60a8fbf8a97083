"""Verify what the HiPKI component signed, and say who signed it.

Order matters for the error a user sees: first the signature and the
challenge (cheap, no network, and a forged or replayed blob must never cause
an OCSP request), then the path to a pinned issuing CA, the key usage and
strength, and last revocation (network).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import datetime

from asn1crypto import algos, cms, core, x509
from cryptography import x509 as cx509
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from pyhanko_certvalidator import errors as cv_errors

from . import errors, sig
from .revocation import RevocationChecker, RevocationStatus
from .trust import AnchorSet, TrustStore, same_name

OID_ID_LAST4 = "2.16.886.1.100.2.51"  # last four digits of the national ID (MOICA)
OID_SUBJECT_TYPE = "2.16.886.1.100.2.1"
# An extended key usage names what a key is for: these purposes alone are no person's login (a
# CA's OCSP responder, a server, a time-stamping unit). Cards name none, or email/client auth.
NOT_A_LOGIN = frozenset({"server_auth", "ocsp_signing", "time_stamping", "code_signing"})
# A card's key (PROTOCOLS 2: MOICA's are RSA-2048): a shorter RSA key can be factored, and a key on
# another curve, or of another kind, is none the cards carry.
MIN_RSA_BITS = 2048
EC_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})


@dataclass(frozen=True)
class CertificateIdentity:
    """Who signed. Bind accounts on ``(issuer_dn, subject_serial_number)``."""

    issuer_dn: str  # RFC 4514, e.g. "OU=內政部憑證管理中心,O=行政院,C=TW"
    subject_dn: str
    subject_cn: str | None
    subject_serial_number: str | None  # MOICA: the card-specific 16-character id
    id_last4: str | None  # from subjectDirectoryAttributes 2.16.886.1.100.2.51
    org_id: str | None  # from the anchor set's org_id_oid, organisation certificates
    cert_serial: int
    not_before: datetime
    not_after: datetime
    anchor_set: str
    kinds: frozenset[str]  # account kinds the anchor set serves
    fingerprint_sha256: str
    signing_time: datetime | None  # claimed by the client's clock: informative only
    form: str  # "cms" | "pkcs1" (a signature over our challenge) | "tls" (a proxy's handshake)
    revocation: RevocationStatus
    certificate: bytes  # DER, for the audit log

    @property
    def binding_key(self) -> tuple[str, str | None]:
        return self.issuer_dn, self.subject_serial_number


# -- decoding ---------------------------------------------------------------

def _b64(value: str) -> bytes:
    text = re.sub(r"-----[A-Z0-9 ]+-----|\s", "", value)
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise errors.BadFormat("not base64") from None


def _certificate(value) -> x509.Certificate:
    if isinstance(value, x509.Certificate):
        return value
    der = _b64(value) if isinstance(value, str) else bytes(value)
    try:
        cert = x509.Certificate.load(der, strict=True)
        cert.native  # force a full parse: a malformed certificate fails here, not later
    except Exception as exc:
        raise errors.BadFormat(f"certificate: {exc}") from None
    return cert


def _string(value: core.Asn1Value):
    """A directory attribute value as text, whatever string type the CA chose."""
    try:
        v = core.Asn1Value.load(value.dump()).native
    except Exception:
        return None
    return v if isinstance(v, str) else (str(v) if isinstance(v, int) else None)


def directory_attributes(cert: x509.Certificate) -> dict[str, str]:
    """subjectDirectoryAttributes (2.5.29.9) as {OID: first value}."""
    attrs = cert.subject_directory_attributes_value
    out = {}
    for attr in attrs or []:
        values = list(attr["values"])
        if values:
            out[attr["type"].dotted] = _string(values[0])
    return out


# -- the signature ----------------------------------------------------------

def _parse_cms(der: bytes):
    try:
        ci = cms.ContentInfo.load(der, strict=True)
        if ci["content_type"].native != "signed_data":
            return None
        sd = ci["content"]
        sd["signer_infos"], sd["encap_content_info"]  # noqa: B018 - parse the top level now
        return sd
    except Exception:
        return None


def _signer_cert(sd: cms.SignedData, si: cms.SignerInfo, supplied: x509.Certificate | None) -> x509.Certificate:
    sid = si["sid"]
    candidates = [supplied] if supplied is not None else []
    candidates += [c.chosen for c in sd["certificates"] or [] if c.name == "certificate"]
    for c in candidates:
        if sid.name == "issuer_and_serial_number":
            ias = sid.chosen
            if c.serial_number == ias["serial_number"].native and same_name(c.issuer, ias["issuer"]):
                return c
        elif sid.name == "subject_key_identifier" and c.key_identifier == sid.chosen.native:
            return c
    raise errors.BadFormat("signer certificate not found")


def _check_cms(sd: cms.SignedData, challenge: bytes, supplied: x509.Certificate | None):
    """The leaf and the claimed signing time, once signature and challenge check out."""
    if len(sd["signer_infos"]) != 1:
        raise errors.BadFormat("expected exactly one signer")
    si = sd["signer_infos"][0]
    leaf = _signer_cert(sd, si, supplied)
    encap = sd["encap_content_info"]
    if encap["content_type"].native != "data":
        raise errors.BadFormat("eContentType is not id-data")
    econtent = encap["content"].native if encap["content"] else None
    attached = econtent is not None
    content = econtent if attached else challenge
    digest_name = si["digest_algorithm"]["algorithm"].native
    try:
        h = sig.hash_for(digest_name)
    except ValueError as exc:
        raise errors.BadFormat(str(exc)) from None

    signed_attrs = si["signed_attrs"]
    signing_time = None
    if signed_attrs:
        by_type: dict[str, list] = {}
        for attr in signed_attrs:
            by_type.setdefault(attr["type"].native, []).append(attr["values"])
        digests = by_type.get("message_digest", [])
        if len(digests) != 1 or len(digests[0]) != 1:
            raise errors.BadFormat("expected one messageDigest")
        ctype = by_type.get("content_type")
        if ctype and ctype[0][0].native != encap["content_type"].native:
            raise errors.SignatureInvalid("contentType attribute differs from eContentType")
        if by_type.get("signing_time"):
            signing_time = by_type["signing_time"][0][0].native
        # RFC 5652 5.4: the signature covers the attributes as a SET OF (tag 0x31), not [0].
        tbs = b"\x31" + signed_attrs.dump()[1:]
    else:
        tbs = content
    try:
        ok = sig.check(leaf.public_key, si["signature_algorithm"], si["signature"].native, tbs, digest_name)
    except ValueError as exc:
        raise errors.BadFormat(str(exc)) from None
    if not ok:
        raise errors.SignatureInvalid("signature does not verify with the signer certificate")
    if signed_attrs:
        hasher = hashlib.new(h.name)
        hasher.update(content)
        if not hmac.compare_digest(digests[0][0].native, hasher.digest()):
            if attached:
                raise errors.SignatureInvalid("messageDigest does not match the content (altered)")
            raise errors.ChallengeMismatch("detached signature is over another content")
    if attached and not hmac.compare_digest(econtent, challenge):
        raise errors.ChallengeMismatch("signed content is not this login's challenge")
    return leaf, signing_time


def _check_pkcs1(signature: bytes, challenge: bytes, leaf: x509.Certificate, hash_name: str):
    algo = {"rsa": f"{hash_name}_rsa", "ec": f"{hash_name}_ecdsa"}.get(leaf.public_key.algorithm)
    if algo is None:
        raise errors.BadFormat(f"{leaf.public_key.algorithm} keys are not supported")
    try:
        ok = sig.check(leaf.public_key, algos.SignedDigestAlgorithm({"algorithm": algo}), signature, challenge)
    except ValueError as exc:
        raise errors.BadFormat(str(exc)) from None
    if not ok:
        # A bare signature cannot tell "other challenge" from "tampered".
        raise errors.SignatureInvalid("PKCS#1 signature does not verify over the challenge")


# -- the certificate ----------------------------------------------------------

async def _validate_path(leaf: x509.Certificate, trust: TrustStore, kind: str | None, now: datetime):
    """(anchor set, issuing CA) of the first pinned path that validates at ``now``."""
    candidates = trust.candidates(leaf, kind)
    if not candidates:
        raise errors.Untrusted(f"issuer {leaf.issuer.human_friendly} is not a pinned CA"
                               + (f" for {kind} accounts" if kind else ""))
    failure: errors.PKIError | None = None
    for aset, ca in candidates:
        window = trust.validated.get((leaf.sha256, aset.name))
        if window is not None and window[0] <= now <= window[1]:
            return aset, ca
        ctx = ValidationContext(trust_roots=list(aset.roots), other_certs=list(aset.issuers), moment=now,
                                allow_fetching=False, revocation_mode="soft-fail")
        try:
            path = await CertificateValidator(leaf, validation_context=ctx).async_validate_path()
        except cv_errors.ExpiredError as exc:
            failure = errors.Expired(str(exc))
            continue
        except cv_errors.NotYetValidError as exc:
            failure = errors.NotYetValid(str(exc))
            continue
        except (cv_errors.PathError, cv_errors.ValidationError) as exc:
            failure = failure or errors.Untrusted(str(exc))
            continue
        certs = list(path)
        issuer = certs[-2] if len(certs) >= 2 else None
        if issuer is None or issuer.dump() != ca.dump():
            failure = failure or errors.Untrusted("path does not go through the pinned issuing CA")
            continue
        trust.remember(leaf.sha256, aset.name, max(c.not_valid_before for c in certs),
                       min(c.not_valid_after for c in certs))
        return aset, ca
    raise failure


def _check_key_usage(leaf: x509.Certificate):
    """digitalSignature, entity authentication (PROTOCOLS 1; nonRepudiation alone is for
    signing documents), and no extended key usage for something else only (RFC 5280 4.2.1.12)."""
    ku = leaf.key_usage_value
    if ku is None or "digital_signature" not in ku.native:
        raise errors.KeyUsage("certificate is not for signatures (the card's encryption certificate?)")
    eku = leaf.extended_key_usage_value
    if eku is not None and set(eku.native) <= NOT_A_LOGIN:
        raise errors.KeyUsage(f"certificate is for {', '.join(sorted(eku.native))}, not a person's login")


def _check_key_strength(leaf: x509.Certificate):
    key = leaf.public_key
    if key.algorithm == "rsa":
        if key.bit_size < MIN_RSA_BITS:
            raise errors.WeakKey(f"RSA key of {key.bit_size} bits, under {MIN_RSA_BITS}")
    elif key.algorithm == "ec":
        form, curve = key.curve
        if form != "named" or curve not in EC_CURVES:
            raise errors.WeakKey(f"EC key on curve {curve if form == 'named' else form}")
    else:
        raise errors.WeakKey(f"{key.algorithm} keys are not accepted")


def _identity(leaf: x509.Certificate, aset: AnchorSet, signing_time, form: str,
              revocation: RevocationStatus) -> CertificateIdentity:
    c = cx509.load_der_x509_certificate(leaf.dump())
    subject = leaf.subject.native
    attrs = directory_attributes(leaf)
    return CertificateIdentity(
        issuer_dn=c.issuer.rfc4514_string(),
        subject_dn=c.subject.rfc4514_string(),
        subject_cn=subject.get("common_name"),
        subject_serial_number=subject.get("serial_number"),
        id_last4=attrs.get(OID_ID_LAST4),
        org_id=attrs.get(aset.org_id_oid) if aset.org_id_oid else None,
        cert_serial=leaf.serial_number,
        not_before=leaf.not_valid_before,
        not_after=leaf.not_valid_after,
        anchor_set=aset.name,
        kinds=aset.kinds,
        fingerprint_sha256=leaf.sha256.hex(),
        signing_time=signing_time,
        form=form,
        revocation=revocation,
        certificate=leaf.dump(),
    )


async def verify_signature(signed: bytes | str, challenge: bytes, *, trust: TrustStore,
                           revocation: RevocationChecker, now: datetime,
                           certificate: bytes | str | x509.Certificate | None = None,
                           kind: str | None = None, hash_algorithm: str = "sha256") -> CertificateIdentity:
    """Verify a HiPKI ``MakeSignature`` result over ``challenge``; see the package docstring."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    raw = _b64(signed) if isinstance(signed, str) else bytes(signed)
    supplied = _certificate(certificate) if certificate is not None else None
    sd = _parse_cms(raw)
    if sd is not None:
        try:
            leaf, signing_time = _check_cms(sd, challenge, supplied)
        except errors.PKIError:
            raise
        except Exception as exc:  # asn1crypto parses lazily: a malformed inner field fails here
            raise errors.BadFormat(f"CMS: {exc}") from None
        form = "cms"
    elif supplied is not None:
        _check_pkcs1(raw, challenge, supplied, hash_algorithm.lower().replace("-", ""))
        leaf, signing_time, form = supplied, None, "pkcs1"
    else:
        raise errors.BadFormat("neither CMS SignedData nor a PKCS#1 signature with its certificate")
    return await _check_certificate(leaf, trust, revocation, now, kind, form, signing_time)


async def _check_certificate(leaf: x509.Certificate, trust: TrustStore, revocation: RevocationChecker,
                             now: datetime, kind: str | None, form: str, signing_time=None) -> CertificateIdentity:
    aset, ca = await _validate_path(leaf, trust, kind, now)
    _check_key_usage(leaf)
    _check_key_strength(leaf)
    status = await revocation.check(leaf, ca, now)
    root = aset.root_of(ca)
    if root is not None and ca.crl_distribution_points:
        # The issuing CA itself, revoked by its root (GRCA's CRL of the CAs it issued): by CRL
        # alone, which is small and cached, where OCSP would be a round trip in every login.
        await revocation.check(ca, root, now, ocsp=False)
    return _identity(leaf, aset, signing_time, form, status)


async def verify_certificate(certificate: bytes | str | x509.Certificate, *, trust: TrustStore,
                             revocation: RevocationChecker, now: datetime, kind: str | None = None,
                             form: str = "tls") -> CertificateIdentity:
    """The path, key usage and revocation checks of ``verify_signature`` for a certificate
    whose key was proven some other way: a TLS handshake that a terminating proxy verified
    (``form="tls"``). The caller vouches for that proof; this checks whose key it is."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return await _check_certificate(_certificate(certificate), trust, revocation, now, kind, form)
