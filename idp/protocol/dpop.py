"""DPoP: access tokens bound to the client's key (RFC 9449).

A client that sends a DPoP proof to the token endpoint gets tokens bound to
the proof's key (``cnf.jkt``, the key's RFC 7638 thumbprint); such an access
token is then good only with a fresh proof by the same key, so a leaked token
is worthless on its own. A public client's refresh token is bound the same way
(section 5). Proofs are single-use: their ``jti`` is kept in the store for as
long as their ``iat`` would be accepted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
from urllib.parse import urlsplit

import orjson
from authlib.oauth2.base import OAuth2Error
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry
from joserfc.jws import JWSRegistry

ALGORITHMS = ["ES256", "ES384", "PS256", "RS256"]  # asymmetric only (section 4.3, check 5)
# The proof's header carries its public key: a 4096-bit RSA key's JWK is some 750 bytes, past
# joserfc's default limit of 512, which refused every RSA proof.
_REGISTRY = JWSRegistry(algorithms=ALGORITHMS)
_REGISTRY.max_header_length = 2048
WINDOW = 60  # seconds a proof's iat may be off from our clock, either way
MAX_PROOF = 8192  # bytes: a proof carries one public key, never more


class InvalidProof(OAuth2Error):
    """A proof that fails a check of section 4.3 (``error_description`` says which)."""

    error = "invalid_dpop_proof"


def challenge(description: str) -> str:
    """The WWW-Authenticate value of a resource refusing a proof (section 7.1)."""
    return f'DPoP error="invalid_dpop_proof", error_description="{description}", algs="{" ".join(ALGORITHMS)}"'


def token_hash(access_token: str) -> str:
    """The ``ath`` of a proof sent with ``access_token``."""
    return base64.urlsafe_b64encode(hashlib.sha256(access_token.encode()).digest()).rstrip(b"=").decode()


def _header(value: str) -> dict:
    encoded = value.split(".", 1)[0]
    header = orjson.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    if not isinstance(header, dict):
        raise ValueError("the JOSE header is not a JSON object")
    return header


def _time(value) -> bool:
    """A JSON number usable as a time: Python's JSON reader also takes NaN, Infinity and
    integers too large for a float, and NaN is never "too far" from now."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _target(uri) -> str:
    """A URI as section 4.3 compares ``htu``: without query and fragment, normalised as RFC
    3986 6.2.2-6.2.3 say (scheme and host in lower case, no default port)."""
    try:
        parts = urlsplit(uri if isinstance(uri, str) else "")
        port = parts.port
    except ValueError:
        return ""
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    port = "" if port in (None, {"http": 80, "https": 443}.get(scheme)) else f":{port}"
    return f"{scheme}://{host}{port}{parts.path or '/'}"


def proof_key(svc, headers, method: str, uri: str, access_token: str | None = None) -> str | None:
    """The thumbprint of the key of the request's DPoP proof, or None when it
    sends none. Raises ``InvalidProof`` for a proof that fails any check of
    section 4.3; ``access_token`` is given at a resource (check 12, ``ath``)."""
    values = headers.getlist("dpop")
    if not values:
        return None
    if len(values) > 1 or len(values[0]) > MAX_PROOF:
        raise InvalidProof("Send exactly one DPoP proof.")
    value = values[0]
    try:
        header = _header(value)
        if header.get("typ") != "dpop+jwt" or header.get("alg") not in ALGORITHMS or not isinstance(header.get("jwk"), dict):
            raise InvalidProof("The DPoP proof needs typ dpop+jwt, an asymmetric alg and its public jwk.")
        key = JWKRegistry.import_key(header["jwk"])
        if key.is_private:
            raise InvalidProof("The DPoP proof's jwk must not hold a private key.")
        claims = jwt.decode(value, key, registry=_REGISTRY).claims
    except InvalidProof:
        raise
    except (JoseError, ValueError, KeyError, TypeError, orjson.JSONDecodeError):
        raise InvalidProof("The DPoP proof is not a JWT signed by its jwk.") from None
    if claims.get("htm") != method or _target(claims.get("htu")) != _target(uri):
        raise InvalidProof("The DPoP proof was made for another request (htm, htu).")
    iat, now = claims.get("iat"), svc.clock()
    if not _time(iat) or abs(now - iat) > WINDOW:
        raise InvalidProof("The DPoP proof is too old or from the future (iat).")
    if access_token is not None and not hmac.compare_digest(str(claims.get("ath", "")).encode(),
                                                            token_hash(access_token).encode()):
        raise InvalidProof("The DPoP proof was made for another access token (ath).")
    jkt, jti = key.thumbprint(), claims.get("jti")
    if not isinstance(jti, str) or not 0 < len(jti) <= 256:
        raise InvalidProof("The DPoP proof needs a jti.")
    digest = hashlib.sha256(f"{jkt}:{jti}".encode()).hexdigest()
    if not svc.store.set("dpop-jti:" + digest, {}, 2 * WINDOW + 1, only_new=True):
        raise InvalidProof("The DPoP proof was already used (jti).")
    return jkt
