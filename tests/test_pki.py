"""Certificate-login verification (idp.pki) against a generated test PKI with live CRL/OCSP responders.

The PKI has the MOICA/XCA profile (deploy/dev/testpki.py); the responders
sign CRLs and OCSP answers per request on loopback, so revocation runs the
real network path. The real GRCA/MOICA certificates in keys/trust are used
only for loading and chain building.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from asn1crypto import x509 as ax509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID

from deploy.dev import testpki
from idp import pki
from idp.pki import revocation as rev

CHALLENGE = b"idp-login:3f6c1d0e9a7b4e21"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trust(tpki):
    return pki.load_trust(tpki.dir / "trust")


@pytest.fixture(autouse=True)
def _reset(tpki):
    tpki.server.hits.clear()
    tpki.server.down = False


def now():
    return datetime.now(timezone.utc)


def verify(signed, challenge=CHALLENGE, *, trust, mode="hard-fail", at=None, **kw):
    async def run():
        checker = pki.RevocationChecker(pki.RevocationPolicy(mode=mode, timeout=2.0))
        try:
            return await pki.verify_signature(signed, challenge, trust=trust, revocation=checker, now=at or now(), **kw)
        finally:
            await checker.aclose()

    return asyncio.run(run())


# -- good signatures -----------------------------------------------------------

def test_citizen_cms_signature_verifies_and_names_the_card(tpki, trust):
    who = verify(tpki.make_signature("citizen", CHALLENGE), trust=trust, kind="personal")
    leaf = tpki.manifest["leaves"]["citizen"]
    assert who.form == "cms"
    assert who.anchor_set == "moica" and who.kinds == {"personal"}
    assert who.subject_serial_number == leaf["card_serial"] and len(who.subject_serial_number) == 16
    assert who.id_last4 == "6789"
    assert who.subject_cn == "王小明"
    assert who.issuer_dn == "OU=內政部憑證管理中心 測試,O=行政院,C=TW"
    assert who.binding_key == (who.issuer_dn, leaf["card_serial"])
    assert who.cert_serial == leaf["serial"]
    assert who.signing_time is not None
    assert who.revocation.status == "good" and who.revocation.source == "ocsp"
    assert tpki.server.hits["/ocsp/moica"] == 1 and tpki.server.hits["/crl/moica.crl"] == 0


def test_pkcs1_form_with_the_certificate_alongside(tpki, trust):
    who = verify(tpki.make_pkcs1("citizen", CHALLENGE), trust=trust, certificate=tpki.certb64("citizen"))
    assert who.form == "pkcs1" and who.id_last4 == "6789"


def test_detached_cms_ecdsa_and_rsa_pss(tpki, trust):
    assert verify(tpki.make_signature("citizen", CHALLENGE, detached=True), trust=trust).form == "cms"
    assert verify(tpki.make_signature("citizen", CHALLENGE, pss=True), trust=trust).id_last4 == "6789"
    who = verify(tpki.make_signature("citizen_ec", CHALLENGE), trust=trust)
    assert who.id_last4 == "6780" and who.subject_cn == "陳小華"
    assert verify(tpki.make_pkcs1("citizen_ec", CHALLENGE), trust=trust, certificate=tpki.certb64("citizen_ec")).form == "pkcs1"


def test_organisation_certificate_maps_to_the_aa_anchor_set(tpki, trust):
    who = verify(tpki.make_signature("org", CHALLENGE), trust=trust, kind="aa")
    assert who.anchor_set == "organisation" and who.kinds == {"aa"}
    assert who.org_id == "379123456" and who.id_last4 is None
    assert who.subject_dn.startswith("O=臺北市立測試國民小學")
    with pytest.raises(pki.Untrusted):  # an organisation certificate cannot log in a personal account
        verify(tpki.make_signature("org", CHALLENGE), trust=trust, kind="personal")
    with pytest.raises(pki.Untrusted):  # nor a citizen an AA account
        verify(tpki.make_signature("citizen", CHALLENGE), trust=trust, kind="aa")


# -- refused signatures ----------------------------------------------------------

def test_signature_over_another_challenge_is_refused(tpki, trust):
    with pytest.raises(pki.ChallengeMismatch) as e:
        verify(tpki.make_signature("citizen", b"idp-login:an-older-challenge"), trust=trust)
    assert e.value.code == "challenge_mismatch"
    with pytest.raises(pki.ChallengeMismatch):
        verify(tpki.make_signature("citizen", b"idp-login:an-older-challenge", detached=True), trust=trust)
    with pytest.raises(pki.SignatureInvalid):  # a bare signature can't tell replay from tampering
        verify(tpki.make_pkcs1("citizen", b"other"), trust=trust, certificate=tpki.certb64("citizen"))
    assert sum(tpki.server.hits.values()) == 0  # no network for a refused signature


def _flip_signing_time(der: bytes) -> bytes:
    oid = bytes.fromhex("06092a864886f70d010905")  # signingTime
    i = der.index(oid) + len(oid)
    j = der.index(b"\x17\x0d", i) + 2  # its UTCTime value
    digit = der[j + 1:j + 2]
    return der[:j + 1] + (b"0" if digit != b"0" else b"1") + der[j + 2:]


def test_tampered_signed_attributes_or_content_are_refused(tpki, trust):
    der = base64.b64decode(tpki.make_signature("citizen", CHALLENGE))
    with pytest.raises(pki.SignatureInvalid) as e:
        verify(_flip_signing_time(der), trust=trust)
    assert e.value.code == "signature_invalid"
    with pytest.raises(pki.SignatureInvalid):  # eContent changed, messageDigest no longer matches
        verify(der.replace(CHALLENGE, CHALLENGE[:-1] + b"X"), CHALLENGE[:-1] + b"X", trust=trust)


def test_garbage_is_bad_format(tpki, trust):
    for blob in ("not base64!", base64.b64encode(b"\x30\x03\x02\x01\x00").decode(), b""):
        with pytest.raises(pki.BadFormat) as e:
            verify(blob, trust=trust)
        assert e.value.code == "bad_format"


def test_certificate_from_an_untrusted_ca_with_the_same_dn(tpki, trust):
    forged = tpki.cert("forged")
    assert forged.issuer == tpki.cert("citizen").issuer  # same DN as the trusted test MOICA
    with pytest.raises(pki.Untrusted) as e:
        verify(tpki.make_signature("forged", CHALLENGE), trust=trust)
    assert e.value.code == "untrusted"


def test_expired_and_not_yet_valid(tpki, trust):
    cert = tpki.cert("citizen")
    blob = tpki.make_signature("citizen", CHALLENGE)
    with pytest.raises(pki.Expired) as e:
        verify(blob, trust=trust, at=cert.not_valid_after_utc + timedelta(days=1))
    assert e.value.code == "expired"
    with pytest.raises(pki.NotYetValid):
        verify(blob, trust=trust, at=cert.not_valid_before_utc - timedelta(days=1))


def test_encryption_certificate_is_not_for_login(tpki, trust):
    with pytest.raises(pki.KeyUsage) as e:
        verify(tpki.make_signature("citizen_enc", CHALLENGE), trust=trust)
    assert e.value.code == "key_usage"


@pytest.mark.parametrize("name", ["weak_rsa", "odd_curve"])
def test_a_key_too_short_or_on_a_curve_no_card_uses_is_refused(tpki, trust, name):
    """RSA under 2048 bits, EC on secp256k1: the chain is good, the key is not (PROTOCOLS 2)."""
    with pytest.raises(pki.WeakKey) as e:
        verify(tpki.make_signature(name, CHALLENGE), trust=trust, kind="personal")
    assert e.value.code == "weak_key"
    with pytest.raises(pki.WeakKey):
        verify(tpki.make_pkcs1(name, CHALLENGE), trust=trust, certificate=tpki.certb64(name))

    async def presented_over_tls():
        checker = pki.RevocationChecker(pki.RevocationPolicy(timeout=2.0))
        try:
            return await pki.verify_certificate(tpki.certb64(name), trust=trust, revocation=checker, now=now())
        finally:
            await checker.aclose()

    with pytest.raises(pki.WeakKey):
        asyncio.run(presented_over_tls())
    assert sum(tpki.server.hits.values()) == 0  # refused before any revocation request


def _card(tpki, ku, *extensions):
    """A CMS signature over CHALLENGE by a card the test MOICA issued with key usage ``ku`` and
    ``extensions`` (revocation by CRL, so that it is really checked)."""
    moica, moica_key = tpki.ca("moica")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    b = (x509.CertificateBuilder().subject_name(testpki.citizen_dn("王小明", "TEST" + secrets.token_hex(6).upper()))
         .issuer_name(moica.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now() - timedelta(days=1)).not_valid_after(now() + timedelta(days=365))
         .add_extension(ku, critical=True)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(moica_key.public_key()), critical=False))
    for extension, critical in [*extensions, *testpki._revocation_urls(tpki.server.url, "moica", ocsp=False)]:
        b = b.add_extension(extension, critical=critical)
    cert = b.sign(moica_key, hashes.SHA256())
    der = (pkcs7.PKCS7SignatureBuilder().set_data(CHALLENGE).add_signer(cert, key, hashes.SHA256())
           .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.NoCapabilities, pkcs7.PKCS7Options.Binary]))
    return base64.b64encode(der).decode()


@pytest.mark.parametrize("purpose", [ExtendedKeyUsageOID.OCSP_SIGNING, ExtendedKeyUsageOID.SERVER_AUTH,
                                     ExtendedKeyUsageOID.TIME_STAMPING])
def test_a_certificate_for_another_purpose_or_for_documents_only_is_no_login(tpki, trust, purpose):
    """RFC 5280 4.2.1.12: an OCSP responder's, a server's, a time stamper's certificate of a
    trusted CA; 4.2.1.3 (PROTOCOLS 1): nonRepudiation alone signs documents, not logins."""
    signing = testpki._ku(digital_signature=True, content_commitment=True)
    with pytest.raises(pki.KeyUsage):
        verify(_card(tpki, signing, (x509.ExtendedKeyUsage([purpose]), True)), trust=trust, kind="personal")
    with pytest.raises(pki.KeyUsage):
        verify(_card(tpki, testpki._ku(content_commitment=True)), trust=trust, kind="personal")
    verify(_card(tpki, signing, (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)),
           trust=trust, kind="personal")


# -- revocation ----------------------------------------------------------------

def test_revoked_via_ocsp(tpki, trust):
    with pytest.raises(pki.Revoked) as e:
        verify(tpki.make_signature("revoked_ocsp", CHALLENGE), trust=trust, mode="soft-fail")
    assert e.value.code == "revoked" and "OCSP" in str(e.value)
    assert tpki.server.hits["/ocsp/moica"] == 1 and tpki.server.hits["/crl/moica.crl"] == 0


def test_revoked_via_crl(tpki, trust):
    with pytest.raises(pki.Revoked) as e:
        verify(tpki.make_signature("revoked_crl", CHALLENGE), trust=trust, mode="soft-fail")
    assert "CRL" in str(e.value)
    assert tpki.server.hits["/crl/moica.crl"] == 1 and tpki.server.hits["/ocsp/moica"] == 0


def test_a_revocation_dated_ahead_of_our_clock_is_still_a_revocation(tpki, trust):
    with pytest.raises(pki.Revoked):
        verify(tpki.make_signature("revoked_ahead", CHALLENGE), trust=trust, mode="soft-fail")


def test_a_card_of_a_revoked_issuing_ca_is_refused(tpki, trust):
    """The root revoking the issuing CA (GRCA's CRL of the CAs it issued) revokes every card
    that CA issued, whatever the card's own OCSP answer says."""
    moica = tpki.ca("moica")[0]
    blob = tpki.make_signature("citizen", CHALLENGE)
    revoked = tpki.server.state.manifest["revoked"]["root"]
    revoked.append({"serial": moica.serial_number, "date": now().isoformat(), "reason": "ca_compromise"})
    try:
        with pytest.raises(pki.Revoked) as e:
            verify(blob, trust=trust, mode="soft-fail")
        assert "root.crl" in str(e.value)
        assert tpki.server.hits["/ocsp/moica"] == 1 and tpki.server.hits["/ocsp/root"] == 0  # the CA by CRL only
    finally:
        revoked.clear()
    assert verify(blob, trust=trust).revocation.status == "good"


def test_crl_when_policy_prefers_it_and_the_cache_honours_next_update(tpki, trust):
    blob = tpki.make_signature("citizen", CHALLENGE)

    async def run():
        checker = pki.RevocationChecker(pki.RevocationPolicy(prefer_ocsp=False))
        try:
            t = now()
            for _ in range(3):
                who = await pki.verify_signature(blob, CHALLENGE, trust=trust, revocation=checker, now=t)
                assert who.revocation.source == "crl"
            assert tpki.server.hits["/crl/moica.crl"] == 1  # downloaded once
            later = t + timedelta(days=2)
            tpki.server.state.clock = lambda: later  # the CA signs a new CRL at that time
            await pki.verify_signature(blob, CHALLENGE, trust=trust, revocation=checker, now=later)
            assert tpki.server.hits["/crl/moica.crl"] == 2  # past nextUpdate: fetched again
        finally:
            tpki.server.state.clock = now
            await checker.aclose()

    asyncio.run(run())


def test_a_stale_crl_is_not_downloaded_again_at_every_login(tpki, trust):
    """A CA that stopped publishing serves a CRL past its nextUpdate: the card is refused
    (hard-fail), and the list is fetched again only after ``retry_after``, as after a failed
    download, not once per login (MOICA's is megabytes)."""
    blob = tpki.make_signature("citizen", CHALLENGE)

    async def run():
        checker = pki.RevocationChecker(pki.RevocationPolicy(prefer_ocsp=False))
        try:
            later = now() + timedelta(days=3)  # the served CRL's nextUpdate is a day from now
            for _ in range(3):
                with pytest.raises(pki.RevocationUnavailable):
                    await pki.verify_signature(blob, CHALLENGE, trust=trust, revocation=checker, now=later)
            assert tpki.server.hits["/crl/moica.crl"] == 1
        finally:
            await checker.aclose()

    asyncio.run(run())


def test_responder_unreachable_soft_fail_accepts_and_logs(tpki, trust, caplog):
    caplog.set_level(logging.WARNING, logger="idp.pki")
    who = verify(tpki.make_signature("offline", CHALLENGE), trust=trust, mode="soft-fail")
    assert who.revocation.status == "unavailable"
    assert any("ACCEPTED under soft-fail" in r.getMessage() for r in caplog.records)


def test_responder_unreachable_hard_fail_refuses(tpki, trust):
    with pytest.raises(pki.RevocationUnavailable) as e:
        verify(tpki.make_signature("offline", CHALLENGE), trust=trust, mode="hard-fail")
    assert e.value.code == "revocation_unavailable"
    tpki.server.down = True  # our responder answers 503 to OCSP and CRL alike
    with pytest.raises(pki.RevocationUnavailable):
        verify(tpki.make_signature("citizen", CHALLENGE), trust=trust, mode="hard-fail")
    assert tpki.server.hits["/ocsp/moica"] == 1 and tpki.server.hits["/crl/moica.crl"] == 1


def test_ocsp_answer_from_an_undelegated_signer_is_not_believed(tpki):
    from cryptography.x509 import ocsp

    leaf, (moica, _), (xca, xca_key) = tpki.cert("revoked_ocsp"), tpki.ca("moica"), tpki.ca("xca")
    t = now()
    forged = (ocsp.OCSPResponseBuilder()
              .add_response(leaf, moica, hashes.SHA1(), ocsp.OCSPCertStatus.GOOD, t, t + timedelta(hours=1), None, None)
              .responder_id(ocsp.OCSPResponderEncoding.HASH, xca).certificates([xca])
              .sign(xca_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    a = lambda c: ax509.Certificate.load(c.public_bytes(serialization.Encoding.DER))  # noqa: E731
    with pytest.raises(ValueError, match="responder"):
        rev.check_ocsp_response(forged, a(leaf), a(moica), t, pki.RevocationPolicy(), None)


def _ocsp_good(tpki, leaf, this_update, nonce=None):
    """A "good" answer for ``leaf`` signed by MOICA's delegated responder, with no nextUpdate."""
    from cryptography.x509 import ocsp

    signer, signer_key = tpki.ca("moica-ocsp")
    b = (ocsp.OCSPResponseBuilder()
         .add_response(leaf, tpki.ca("moica")[0], hashes.SHA1(), ocsp.OCSPCertStatus.GOOD, this_update, None, None, None)
         .responder_id(ocsp.OCSPResponderEncoding.HASH, signer).certificates([signer]))
    if nonce is not None:
        b = b.add_extension(x509.OCSPNonce(nonce), critical=False)
    return b.sign(signer_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_an_ocsp_answer_without_the_nonce_sent_is_not_believed(tpki):
    """Anyone can get a nonce-less "good" answer from the responder while a card is good; one
    replayed after the card's revocation (the CRL blocked too) must not clear it."""
    leaf, moica = tpki.cert("revoked_ocsp"), tpki.ca("moica")[0]
    a = lambda c: ax509.Certificate.load(c.public_bytes(serialization.Encoding.DER))  # noqa: E731
    t = now()
    old = _ocsp_good(tpki, leaf, t - timedelta(hours=20))

    def handler(request):
        if "/ocsp/" in str(request.url):
            return rev.httpx.Response(200, content=old)
        return rev.httpx.Response(503)

    async def run():
        checker = pki.RevocationChecker(pki.RevocationPolicy(), rev.httpx.AsyncClient(
            transport=rev.httpx.MockTransport(handler)))
        try:
            return await checker.check(a(leaf), a(moica), t)
        finally:
            await checker.aclose()

    with pytest.raises(pki.RevocationUnavailable, match="nonce"):
        asyncio.run(run())
    policy, sent = pki.RevocationPolicy(), bytes(range(16))
    for answer in (_ocsp_good(tpki, leaf, t), _ocsp_good(tpki, leaf, t, nonce=bytes(16))):  # none, another
        with pytest.raises(ValueError, match="nonce"):
            rev.check_ocsp_response(answer, a(leaf), a(moica), t, policy, sent)
    state, _ = rev.check_ocsp_response(_ocsp_good(tpki, leaf, t, nonce=sent), a(leaf), a(moica), t, policy, sent)
    assert state == "good"


def test_crl_of_100k_entries_is_indexed_by_serial(tpki):
    moica, key = tpki.ca("moica")
    t = now()
    der = testpki.big_crl(moica, key, 100_000, now=t, include=[0xABCDEF])
    issuer = ax509.Certificate.load(moica.public_bytes(serialization.Encoding.DER))
    crl = rev.parse_crl(der, issuer)  # its cost is measured by bench/certificate.py, not here
    assert len(crl) == 100_001
    assert crl.lookup(0x1234) is None
    assert crl.lookup(0xABCDEF)["revocation_date"].native < t
    assert crl.lookup(0x10_0000_0000 + 3 * 7919)["crl_entry_extensions"][0]["extn_value"].native == "key_compromise"
    xca = ax509.Certificate.load(tpki.ca("xca")[0].public_bytes(serialization.Encoding.DER))
    with pytest.raises(ValueError):  # another CA's CRL
        rev.parse_crl(der, xca)
    with pytest.raises(ValueError, match="signature"):
        rev.parse_crl(der[:-5] + bytes(5), issuer)


# -- the real anchors ------------------------------------------------------------

def test_real_grca_moica_anchors_load_and_chain():
    trust = pki.load_trust(REPO / "keys" / "trust")
    moica = trust.get("moica")
    assert moica.kinds == {"personal"}
    assert [c.subject.native.get("common_name") or c.subject.native["organization_name"] for c in moica.roots] == [
        "Government Root Certification Authority - G3", "Government Root Certification Authority"]
    assert len(moica.roots) == 2 and all(c.self_signed == "maybe" for c in moica.roots)
    assert len(moica.issuers) == 2 and moica.issuers[0].subject == moica.issuers[1].subject  # same DN, G2 and G3
    assert moica.issuers[0].key_identifier != moica.issuers[1].key_identifier
    # openssl verify -CAfile GRCA-G3.pem MOICA-G3.pem, likewise G2, as of today
    report = asyncio.run(pki.check_issuers(trust, now()))
    assert report == {"moica": []}
    g3 = next(c for c in moica.issuers if "ocsp.grca.nat.gov.tw" in "".join(c.ocsp_urls))
    assert g3.public_key.bit_size == 4096
    # MOICA G2 has expired by 2034-02: the check notices
    later = asyncio.run(pki.check_issuers(trust, datetime(2035, 1, 1, tzinfo=timezone.utc)))
    assert len(later["moica"]) == 1 and "expired" in later["moica"][0]


def test_real_anchors_pin_the_issuer_by_key_identifier(tpki):
    """A test citizen certificate whose issuer DN differs is no candidate for the real set;
    one claiming the real MOICA DN with another key is no candidate either."""
    trust = pki.load_trust(REPO / "keys" / "trust")
    leaf = ax509.Certificate.load(tpki.cert("citizen").public_bytes(serialization.Encoding.DER))
    assert trust.candidates(leaf) == []
    with pytest.raises(pki.Untrusted):
        verify(tpki.make_signature("citizen", CHALLENGE), trust=trust)



# -- a CRL's scope (RFC 5280 6.3.3) ----------------------------------------------
# The CRL comes over plain HTTP: a network attacker who makes OCSP fail can answer the card's
# CRL URL with another fresh CRL the same CA signed. Only one whose scope covers the card may
# clear it.

def _idp(*, url=None, user=False, ca=False, reasons=None):
    return x509.IssuingDistributionPoint(
        full_name=[x509.UniformResourceIdentifier(url)] if url else None, relative_name=None,
        only_contains_user_certs=user, only_contains_ca_certs=ca, only_some_reasons=reasons, indirect_crl=False,
        only_contains_attribute_certs=False)


def _moica_crl(tpki, idp, revoked=()):
    """A fresh CRL signed by the test MOICA with the IssuingDistributionPoint ``idp``, listing ``revoked``."""
    moica, key = tpki.ca("moica")
    t = now()
    b = (x509.CertificateRevocationListBuilder().issuer_name(moica.subject)
         .last_update(t - timedelta(minutes=1)).next_update(t + timedelta(days=1))
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)
         .add_extension(x509.CRLNumber(1), False).add_extension(idp, True))
    for name in revoked:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(tpki.cert(name).serial_number)
                                      .revocation_date(t - timedelta(days=1)).build())
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)



def test_a_crl_with_a_critical_extension_it_does_not_know_is_not_used(tpki):
    """RFC 5280 5.2: such an extension may narrow what the CRL covers; believing it could clear
    a revoked card."""
    unknown = (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"), True)
    moica, key = tpki.ca("moica")
    der = (x509.CertificateRevocationListBuilder().issuer_name(moica.subject)
           .last_update(now() - timedelta(minutes=1)).next_update(now() + timedelta(days=1))
           .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)
           .add_extension(*unknown).sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    with pytest.raises(ValueError, match="critical extensions"):
        rev.parse_crl(der, ax509.Certificate.load(moica.public_bytes(serialization.Encoding.DER)))

def test_a_crl_with_a_critical_entry_extension_it_does_not_know_is_not_used(tpki, trust, caplog):
    """RFC 5280 5.3: such an extension may change what the entries after it mean (whose
    certificates they list); the CRL then clears no card, as an unreachable one: refused under
    hard-fail, let through with a warning under soft-fail."""
    blob = _card(tpki, testpki._ku(digital_signature=True, content_commitment=True))  # by CRL alone
    assert verify(blob, trust=trust).revocation.source == "crl"
    revoked = tpki.server.state.manifest["revoked"]["moica"]
    revoked.append({"serial": 0x5E5E, "date": now().isoformat(), "reason": "key_compromise",
                    "critical_extension": "1.3.6.1.4.1.99999.2"})
    try:
        with pytest.raises(pki.RevocationUnavailable, match="critical extensions"):
            verify(blob, trust=trust)
        caplog.set_level(logging.WARNING, logger="idp.pki")
        assert verify(blob, trust=trust, mode="soft-fail").revocation.status == "unavailable"
        assert any("ACCEPTED under soft-fail" in r.getMessage() for r in caplog.records)
    finally:
        revoked.pop()
    moica, key = tpki.ca("moica")  # a critical reasonCode changes nothing: listed is revoked
    der = (x509.CertificateRevocationListBuilder().issuer_name(moica.subject)
           .last_update(now() - timedelta(minutes=1)).next_update(now() + timedelta(days=1))
           .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(0x5E5E).revocation_date(now())
                                    .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), True).build())
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    assert rev.parse_crl(der, ax509.Certificate.load(moica.public_bytes(serialization.Encoding.DER))).lookup(0x5E5E)


def _check_with_crls(tpki, name, crls, times, crl_dir=None):
    """Check ``name`` at each of ``times`` under hard-fail, with OCSP down and the CRL URL answered
    by ``crls`` in turn: the status or the refusal of each check."""
    answers = iter(crls)
    a = lambda c: ax509.Certificate.load(c.public_bytes(serialization.Encoding.DER))  # noqa: E731

    def handler(request):
        if "/ocsp/" in str(request.url):
            return rev.httpx.Response(503)
        return rev.httpx.Response(200, content=next(answers))

    async def run():
        checker = pki.RevocationChecker(pki.RevocationPolicy(), rev.httpx.AsyncClient(
            transport=rev.httpx.MockTransport(handler)), crl_dir)
        out = []
        try:
            for t in times:
                try:
                    out.append(await checker.check(a(tpki.cert(name)), a(tpki.ca("moica")[0]), t))
                except pki.PKIError as exc:
                    out.append(exc)
            return out
        finally:
            await checker.aclose()

    return asyncio.run(run())


@pytest.mark.parametrize("scope", [
    {"url": "/crl/moica-part-0002.crl", "user": True},  # another partition of the CA's CRL
    {"ca": True},  # the CA's authority revocation list
    {"reasons": frozenset({x509.ReasonFlags.ca_compromise})},  # a list for some reasons only
], ids=["another-partition", "arl", "some-reasons"])
def test_a_crl_whose_scope_does_not_cover_the_card_does_not_clear_it(tpki, scope):
    if "url" in scope:
        scope["url"] = tpki.manifest["base_url"] + scope["url"]
    [refused] = _check_with_crls(tpki, "revoked_ocsp", [_moica_crl(tpki, _idp(**scope))], [now()])
    assert isinstance(refused, pki.RevocationUnavailable) and "scope" in str(refused)


def test_the_partition_the_card_names_is_believed(tpki):
    url = tpki.manifest["base_url"] + "/crl/moica.crl"  # the test cards' CRL distribution point
    mine = _moica_crl(tpki, _idp(url=url, user=True), revoked=["revoked_ocsp"])
    [good] = _check_with_crls(tpki, "citizen", [mine], [now()])
    assert good.status == "good" and good.source == "crl"
    [refused] = _check_with_crls(tpki, "revoked_ocsp", [mine], [now()])
    assert isinstance(refused, pki.Revoked)


def test_an_out_of_scope_crl_is_not_kept_in_place_of_the_cards(tpki, tmp_path):
    url = tpki.manifest["base_url"] + "/crl/moica.crl"
    arl, mine = _moica_crl(tpki, _idp(ca=True)), _moica_crl(tpki, _idp(url=url))
    t = now()
    first, soon, later = _check_with_crls(tpki, "citizen", [arl, mine], [t, t + timedelta(seconds=1),
                                                                         t + pki.RevocationPolicy().retry_after], tmp_path)
    assert isinstance(first, pki.RevocationUnavailable) and isinstance(soon, pki.RevocationUnavailable)
    assert later.source == "crl"  # as after a failed download: fetched again after retry_after
