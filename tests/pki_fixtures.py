"""Test PKI on loopback for tests/test_pki.py: what a HiPKI MakeSignature would return."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.serialization import pkcs7

from deploy.dev import testpki
from deploy.dev.pki_responders import ResponderServer


@dataclass
class TestPKI:
    dir: Path
    manifest: dict
    server: ResponderServer

    def cert(self, name: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.dir / "leaves" / f"{name}.pem").read_bytes())

    def key(self, name: str):
        return serialization.load_pem_private_key((self.dir / "leaves" / f"{name}.key.pem").read_bytes(), None)

    def ca(self, name: str):
        d = self.dir / "ca"
        return (x509.load_pem_x509_certificate((d / f"{name}.pem").read_bytes()),
                serialization.load_pem_private_key((d / f"{name}.key.pem").read_bytes(), None))

    def certb64(self, name: str) -> str:
        return base64.b64encode(self.cert(name).public_bytes(serialization.Encoding.DER)).decode()

    def make_signature(self, name: str, tbs: bytes, *, detached: bool = False, pss: bool = False) -> str:
        """PKCS7 the way HiPKI's MakeSignature answers: attached CMS SignedData, SHA-256,
        signed attributes contentType/signingTime/messageDigest, only the leaf embedded;
        base64 text."""
        options = [pkcs7.PKCS7Options.NoCapabilities, pkcs7.PKCS7Options.Binary]
        if detached:
            options.append(pkcs7.PKCS7Options.DetachedSignature)
        kw = {}
        if pss:
            kw["rsa_padding"] = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
        der = (pkcs7.PKCS7SignatureBuilder().set_data(tbs).add_signer(self.cert(name), self.key(name), hashes.SHA256(), **kw)
               .sign(serialization.Encoding.DER, options))
        return base64.b64encode(der).decode()

    def make_pkcs1(self, name: str, tbs: bytes) -> str:
        """``signatureType: "PKCS1"``: a bare signature over the tbs (ECDSA for an EC key)."""
        key = self.key(name)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            raw = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
        else:
            raw = key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
        return base64.b64encode(raw).decode()


def start_test_pki(directory: Path) -> TestPKI:
    """Bind the responders first (free port), then generate a PKI whose URLs name that port."""
    server = ResponderServer("127.0.0.1", 0)
    manifest = testpki.generate(directory, server.url)
    server.load(directory).start()
    return TestPKI(directory, manifest, server)


@pytest.fixture(scope="module")
def tpki(tmp_path_factory):
    """The test PKI and its OCSP/CRL responders, for one test module."""
    p = start_test_pki(tmp_path_factory.mktemp("pki"))
    try:
        yield p
    finally:
        p.server.stop()
