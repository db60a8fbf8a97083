"""A test PKI with the real GRCA/MOICA/XCA profile, so certificate login is tested on the real code path.

``python -m deploy.dev.testpki OUTDIR [--base-url http://127.0.0.1:8089]`` writes::

    OUTDIR/trust/      root.pem moica.pem xca.pem anchors.toml   (IDP trust directory)
    OUTDIR/ca/         CA and OCSP-responder certificates and keys
    OUTDIR/leaves/     NAME.pem NAME.key.pem NAME.der            (end-entity certificates)
    OUTDIR/pki.json    the manifest the responders read (CAs, issued serials, revocations)

Profile copied from PROTOCOLS.md section 2: citizen subject ``C=TW, CN=<name>,
serialNumber=<16 characters>``; subjectDirectoryAttributes (2.5.29.9) with the
subject type (2.16.886.1.100.2.1) and the last four ID digits
(2.16.886.1.100.2.51); critical keyUsage digitalSignature+nonRepudiation on
the signing certificate, keyEncipherment+dataEncipherment on the encryption
one; CRL distribution point and AIA (OCSP + caIssuers) naming the local
responders at ``base_url``. The CA DNs have the real shape with a "測試" mark,
so a test certificate can never be mistaken for a real one. Keys are
RSA-2048 everywhere (the real CAs are RSA-4096: slower to generate, same path).
"""

from __future__ import annotations

import argparse
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID, ObjectIdentifier

OID_SDA = ObjectIdentifier("2.5.29.9")
OID_SUBJECT_TYPE = "2.16.886.1.100.2.1"
OID_ID_LAST4 = "2.16.886.1.100.2.51"
OID_ORG_ID = "2.16.886.1.100.2.102"  # reported for GCA/XCA, unverified: configurable per anchor set


class _AnySet(core.SetOf):
    _child_spec = core.Any


class _Attribute(core.Sequence):
    _fields = [("type", core.ObjectIdentifier), ("values", _AnySet)]


class _Attributes(core.SequenceOf):
    _child_spec = _Attribute


def directory_attributes(values: dict[str, str]) -> x509.UnrecognizedExtension:
    """subjectDirectoryAttributes with PrintableString values (cryptography has no type for it)."""
    der = _Attributes([
        {"type": oid, "values": [core.Any.load(core.PrintableString(v).dump())]} for oid, v in values.items()
    ]).dump()
    return x509.UnrecognizedExtension(OID_SDA, der)


def _name(*pairs) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in pairs])


ROOT_DN = _name((NameOID.COUNTRY_NAME, "TW"), (NameOID.ORGANIZATION_NAME, "行政院"),
                (NameOID.COMMON_NAME, "Government Root Certification Authority - 測試"))
MOICA_DN = _name((NameOID.COUNTRY_NAME, "TW"), (NameOID.ORGANIZATION_NAME, "行政院"),
                 (NameOID.ORGANIZATIONAL_UNIT_NAME, "內政部憑證管理中心 測試"))
XCA_DN = _name((NameOID.COUNTRY_NAME, "TW"), (NameOID.ORGANIZATION_NAME, "行政院"),
               (NameOID.ORGANIZATIONAL_UNIT_NAME, "組織及團體憑證管理中心 測試"))


def citizen_dn(name: str, card_serial: str) -> x509.Name:
    return _name((NameOID.COUNTRY_NAME, "TW"), (NameOID.COMMON_NAME, name), (NameOID.SERIAL_NUMBER, card_serial))


def organisation_dn(org: str, city: str = "臺北市") -> x509.Name:
    return _name((NameOID.COUNTRY_NAME, "TW"), (NameOID.LOCALITY_NAME, city), (NameOID.ORGANIZATION_NAME, org))


@dataclass
class Issued:
    name: str
    cert: x509.Certificate
    key: object


def _key(kind: str = "rsa", *, bits: int = 2048, curve: ec.EllipticCurve = ec.SECP256R1()):
    if kind == "ec":
        return ec.generate_private_key(curve)
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _ku(**on) -> x509.KeyUsage:
    fields = ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
              "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"]
    return x509.KeyUsage(**{f: on.get(f, False) for f in fields})


def _cert(subject, key, issuer: Issued | None, *, not_before, not_after, ca=False, ku, extra=(), serial=None):
    """Sign one certificate; ``issuer`` None means self-signed."""
    issuer_name = subject if issuer is None else issuer.cert.subject
    issuer_key = key if issuer is None else issuer.key
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
         .serial_number(serial or x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca and issuer else None), critical=ca)
         .add_extension(ku, critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
    for ext, critical in extra:
        b = b.add_extension(ext, critical=critical)
    return b.sign(issuer_key, hashes.SHA256())


def _revocation_urls(base: str, ca: str, *, ocsp: bool = True, crl: bool = True):
    out = []
    if crl:
        out.append((x509.CRLDistributionPoints([x509.DistributionPoint(
            [x509.UniformResourceIdentifier(f"{base}/crl/{ca}.crl")], None, None, None)]), False))
    access = [x509.AccessDescription(AuthorityInformationAccessOID.CA_ISSUERS,
                                     x509.UniformResourceIdentifier(f"{base}/certs/{ca}.crt"))]
    if ocsp:
        access.append(x509.AccessDescription(AuthorityInformationAccessOID.OCSP,
                                             x509.UniformResourceIdentifier(f"{base}/ocsp/{ca}")))
    out.append((x509.AuthorityInformationAccess(access), False))
    return out


def _pem(path: Path, cert: x509.Certificate, key=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".der").write_bytes(cert.public_bytes(serialization.Encoding.DER))
    if key is not None:
        path.with_suffix(".key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


ANCHORS_TOML = """\
# Test PKI anchors (deploy/dev/testpki.py): same shape as keys/trust/anchors.toml.
[[anchor_set]]
name = "moica"
kinds = ["personal"]
roots = ["root.pem"]
issuers = ["moica.pem"]

[[anchor_set]]
name = "organisation"
kinds = ["aa"]
roots = ["root.pem"]
issuers = ["xca.pem"]
org_id_oid = "2.16.886.1.100.2.102"
"""


def generate(outdir: str | Path, base_url: str, *, offline_url: str = "http://127.0.0.1:9",
             now: datetime | None = None) -> dict:
    """Write the test PKI under ``outdir``; return the manifest (also in pki.json).

    ``offline_url`` is where the "offline" citizen's OCSP and CRL point: a
    port nobody listens on, to test soft- and hard-fail."""
    out = Path(outdir)
    now = (now or datetime.now(timezone.utc)).replace(microsecond=0)
    base_url = base_url.rstrip("/")
    long = dict(not_before=now - timedelta(days=365), not_after=now + timedelta(days=3650))
    ca_ku = _ku(digital_signature=True, key_cert_sign=True, crl_sign=True)

    rk = _key()
    root = Issued("root", _cert(ROOT_DN, rk, None, ca=True, ku=ca_ku, **long), rk)
    cas = {"root": root}
    for name, dn in (("moica", MOICA_DN), ("xca", XCA_DN)):
        k = _key()
        cas[name] = Issued(name, _cert(dn, k, root, ca=True, ku=ca_ku, extra=_revocation_urls(base_url, "root", ocsp=False), **long), k)
    # GRCA's OCSP answers through a delegated responder: the MOICA one does too; XCA signs its own.
    ok = _key()
    responder = Issued("moica-ocsp", _cert(
        _name((NameOID.COUNTRY_NAME, "TW"), (NameOID.ORGANIZATION_NAME, "行政院"), (NameOID.COMMON_NAME, "MOICA OCSP 測試")),
        ok, cas["moica"], ku=_ku(digital_signature=True),
        extra=[(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), False), (x509.OCSPNoCheck(), False)],
        not_before=now - timedelta(days=1), not_after=now + timedelta(days=365)), ok)
    # Same DN as the test MOICA, another key: what a forger would make.
    fk = _key()
    fake = Issued("fake-moica", _cert(MOICA_DN, fk, None, ca=True, ku=ca_ku, **long), fk)

    sign_ku = _ku(digital_signature=True, content_commitment=True)
    leaves: dict[str, Issued] = {}
    manifest_leaves = {}

    def citizen(name, *, ca="moica", key=None, person="王小明", id_number="A123456789", ku=sign_ku,
                urls=None, validity=None):
        k = key or _key()
        card = secrets.token_hex(8).upper()  # 16 characters, like the card-specific serialNumber
        issuer = cas.get(ca) or fake
        extra = [(directory_attributes({OID_SUBJECT_TYPE: "1", OID_ID_LAST4: id_number[-4:]}), False)]
        extra += urls if urls is not None else _revocation_urls(base_url, ca)
        cert = _cert(citizen_dn(person, card), k, issuer, ku=ku, extra=extra,
                     **(validity or dict(not_before=now - timedelta(days=30), not_after=now + timedelta(days=5 * 365))))
        leaves[name] = Issued(name, cert, k)
        manifest_leaves[name] = {"ca": ca, "serial": cert.serial_number, "card_serial": card, "id_last4": id_number[-4:]}
        return k

    ck = citizen("citizen")
    citizen("citizen_enc", key=ck, ku=_ku(key_encipherment=True, data_encipherment=True))  # the card's 2nd pair
    citizen("citizen_ec", key=_key("ec"), person="陳小華", id_number="B223456780")
    # Keys no card carries, in otherwise valid certificates: RSA-1024, and EC on the bitcoin curve.
    citizen("weak_rsa", key=_key(bits=1024), person="周小強", id_number="G112345674")
    citizen("odd_curve", key=_key("ec", curve=ec.SECP256K1()), person="周小強", id_number="G112345674")
    citizen("revoked_ocsp", person="林大同", id_number="C134567891")
    citizen("revoked_crl", person="張美玲", id_number="D245678902", urls=_revocation_urls(base_url, "moica", ocsp=False))
    # Its revocation dated ahead of the provider's clock, as by a CA whose clock runs ahead.
    citizen("revoked_ahead", person="吳建國", id_number="F127654320", urls=_revocation_urls(base_url, "moica", ocsp=False))
    citizen("offline", person="黃志明", id_number="E156789013", urls=_revocation_urls(offline_url, "moica"))
    citizen("forged", ca="fake-moica")
    # Two cards of one school (its organisation id on both): each a card of its own to bind.
    for name in ("org", "org_other"):
        ok_org = _key()
        org_cert = _cert(organisation_dn("臺北市立測試國民小學"), ok_org, cas["xca"], ku=sign_ku,
                         extra=[(directory_attributes({OID_SUBJECT_TYPE: "2", OID_ORG_ID: "379123456"}), False)]
                         + _revocation_urls(base_url, "xca"),
                         not_before=now - timedelta(days=30), not_after=now + timedelta(days=3 * 365))
        leaves[name] = Issued(name, org_cert, ok_org)
        manifest_leaves[name] = {"ca": "xca", "serial": org_cert.serial_number, "org_id": "379123456"}

    revoked_at = (now - timedelta(days=2)).isoformat()
    revoked = {
        "moica": [{"serial": leaves[n].cert.serial_number, "date": revoked_at, "reason": "key_compromise"}
                  for n in ("revoked_ocsp", "revoked_crl")]
        + [{"serial": leaves["revoked_ahead"].cert.serial_number, "date": (now + timedelta(days=1)).isoformat(),
            "reason": "key_compromise"}],
        "xca": [], "root": [],
    }

    for i in (*cas.values(), responder, fake):
        _pem(out / "ca" / i.name, i.cert, i.key)
    for i in leaves.values():
        _pem(out / "leaves" / i.name, i.cert, i.key)
    trust = out / "trust"
    for name in ("root", "moica", "xca"):
        _pem(trust / name, cas[name].cert)
        (trust / f"{name}.der").unlink()
    (trust / "anchors.toml").write_text(ANCHORS_TOML, "utf-8")

    manifest = {
        "base_url": base_url,
        "generated": now.isoformat(),
        "cas": {
            "root": {"ocsp_signer": None},
            "moica": {"ocsp_signer": "moica-ocsp"},
            "xca": {"ocsp_signer": None},
        },
        "leaves": manifest_leaves,
        "revoked": revoked,
    }
    (out / "pki.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), "utf-8")
    return manifest


# -- a big CRL, for the parse-time benchmark -----------------------------------

def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _int(value: int) -> bytes:
    return _tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))


def _utc(t: datetime) -> bytes:
    return _tlv(0x17, t.strftime("%y%m%d%H%M%SZ").encode())


def big_crl(ca_cert: x509.Certificate, ca_key, n: int, *, now: datetime, include: list[int] = (),
            issued_ago: timedelta = timedelta(minutes=1), valid_for: timedelta | None = timedelta(days=1)) -> bytes:
    """A signed CRL with ``n`` revoked serials (plus ``include``), built as raw DER: thisUpdate
    ``issued_ago`` before ``now``, nextUpdate ``valid_for`` after it (None: no nextUpdate,
    which cryptography's builder cannot leave out).

    cryptography's CRL builder takes seconds for 100k entries; MOICA's
    real CRL is that size, and the point is to time *our* parser on it."""
    sha256_rsa = _tlv(0x30, bytes.fromhex("06092a864886f70d01010b0500"))
    when = _utc(now - timedelta(days=1))
    reason = _tlv(0x30, _tlv(0x30, bytes.fromhex("0603551d15") + _tlv(0x04, bytes.fromhex("0a0101"))))
    serials = [0x10_0000_0000 + i * 7919 for i in range(n)] + list(include)
    entries = b"".join(_tlv(0x30, _int(s) + when + (reason if i % 3 == 0 else b"")) for i, s in enumerate(serials))
    next_update = _utc(now + valid_for) if valid_for is not None else b""
    tbs = _tlv(0x30, _int(1) + sha256_rsa + ca_cert.subject.public_bytes() + _utc(now - issued_ago)
               + next_update + _tlv(0x30, entries))
    signature = ca_key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
    return _tlv(0x30, tbs + sha256_rsa + _tlv(0x03, b"\x00" + signature))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("outdir")
    p.add_argument("--base-url", default="http://127.0.0.1:8089", help="where deploy.dev.pki_responders listens")
    p.add_argument("--offline-url", default="http://127.0.0.1:9")
    a = p.parse_args(argv)
    m = generate(a.outdir, a.base_url, offline_url=a.offline_url)
    print(f"test PKI in {a.outdir}: {len(m['leaves'])} leaf certificates; trust directory {Path(a.outdir) / 'trust'}")


if __name__ == "__main__":
    main()
