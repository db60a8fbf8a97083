"""One signature check for CMS signers, CRLs and OCSP responses.

The algorithm comes from the signed object, the key type from the
certificate; they must agree (an RSA algorithm on an EC key is a forgery
attempt, not a format we tolerate). SHA-1 and MD5 are refused.
"""

from __future__ import annotations

from asn1crypto import algos, keys
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


def hash_for(name: str) -> hashes.HashAlgorithm:
    try:
        return HASHES[name]()
    except KeyError:
        raise ValueError(f"digest algorithm {name} not allowed") from None


def check(public_key: keys.PublicKeyInfo, algorithm: algos.SignedDigestAlgorithm, signature: bytes,
          data: bytes, digest: str | None = None) -> bool:
    """True when ``signature`` over ``data`` verifies with ``public_key``.

    ``digest`` names the hash when ``algorithm`` is bare (CMS signerInfos
    often say just rsaEncryption and carry the hash in digestAlgorithm)."""
    key = serialization.load_der_public_key(public_key.dump())
    sig_algo = algorithm.signature_algo
    if sig_algo == "rsassa_pss":
        params = algorithm["parameters"]
        h = hash_for(params["hash_algorithm"]["algorithm"].native)
        mgf = params["mask_gen_algorithm"]
        if mgf["algorithm"].native != "mgf1":
            raise ValueError("RSA-PSS mask generation must be MGF1")
        mgf_hash = hash_for(mgf["parameters"]["algorithm"].native)
        pad = padding.PSS(padding.MGF1(mgf_hash), params["salt_length"].native)
    else:
        try:
            name = algorithm.hash_algo
        except ValueError:
            name = digest
        if name is None:
            raise ValueError("no digest algorithm")
        h = hash_for(name)
        pad = padding.PKCS1v15()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            if sig_algo not in ("rsassa_pkcs1v15", "rsassa_pss"):
                return False
            key.verify(signature, data, pad, h)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if sig_algo != "ecdsa":
                return False
            key.verify(signature, data, ec.ECDSA(h))
        else:
            return False
    except InvalidSignature:
        return False
    return True
