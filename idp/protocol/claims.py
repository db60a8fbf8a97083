"""What a relying party learns about a user: ``sub``, UserInfo claims and the ID token."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from joserfc import jwt

from idp.protocol.clients import OAuthClient
from idp.storage.models import Account


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def subject(account_id: str, client: OAuthClient, pairwise_salt: bytes) -> str:
    """Public ``sub`` is the account id; pairwise differs per sector (OIDC Core 8.1)."""
    if client.metadata.get("subject_type") != "pairwise":
        return account_id
    mac = hmac.new(pairwise_salt, f"{client.sector_identifier()}|{account_id}".encode(), hashlib.sha256)
    return _b64(mac.digest())


def public_sid(svc, sid: str, client: OAuthClient) -> str:
    """The ``sid`` ``client`` sees (ID tokens, logout tokens, front-channel URLs): stable per
    session but an HMAC of the session cookie's value, never the value itself, which would
    let anyone holding an ID token take over the single sign-on session. A pairwise client's
    is its sector's own: one sid for every client would link the subjects pairwise keeps
    apart (OIDC Core 8.1)."""
    context = b"session-id\x00"
    if client.metadata.get("subject_type") == "pairwise":
        context += client.sector_identifier().encode() + b"\x00"
    mac = hmac.new(svc.pairwise_salt, context + sid.encode(), hashlib.sha256)
    return _b64(mac.digest()[:18])


# Which scope releases which claim (OIDC Core 5.4, plus the portals' own).
SCOPE_CLAIMS = {
    "profile": ("name", "preferred_username", "account_kind", "org"),
    "email": ("email", "email_verified"),
    "phone": ("phone_number", "phone_number_verified"),
}


def profile(account: Account, scope: str) -> dict:
    """The account's claims that ``scope`` releases (all but ``sub``)."""
    scopes = set(scope.split())
    claims = {}
    if "profile" in scopes:
        claims.update(
            name=account.name,
            preferred_username=account.username,
            # The portals' own claims: personal account or an organisation's AA administrator.
            account_kind=account.kind,
        )
        if account.org:
            claims["org"] = account.org
    if "email" in scopes and account.email:
        claims.update(email=account.email, email_verified=account.email_verified)
    if "phone" in scopes and account.phone:
        claims.update(phone_number=account.phone, phone_number_verified=False)
    return claims


def narrowed(claims: dict, scope: str) -> dict:
    """Of ``claims`` (a ``profile`` taken for a wider scope), those ``scope`` releases."""
    released = {name for s in scope.split() for name in SCOPE_CLAIMS.get(s, ())}
    return {k: v for k, v in claims.items() if k in released}


def userinfo(account: Account, scope: str, sub: str) -> dict:
    return {"sub": sub, **profile(account, scope)}


def half_hash(value: str) -> str:
    """``at_hash``/``c_hash``: the left half of SHA-256, for ES256 and RS256 alike."""
    return _b64(hashlib.sha256(value.encode()).digest()[:16])


def sign(keys, alg: str, claims: dict, typ: str = "JWT") -> str:
    key = keys.signing_key(alg)
    return jwt.encode({"alg": alg, "kid": key.kid, "typ": typ}, claims, key)


def id_token(svc, client: OAuthClient, account_id: str, claims_: dict, auth: dict, *, nonce=None,
             access_token=None) -> str:
    """The ID token for ``account_id``; ``claims_`` are its released claims (``profile``),
    taken when the code was issued, so no database read is needed here."""
    now = int(svc.clock())
    claims = {
        "iss": svc.settings.issuer,
        "sub": subject(account_id, client, svc.pairwise_salt),
        "aud": client.client_id,
        "azp": client.client_id,
        "iat": now,
        "exp": now + svc.settings.id_token_seconds,
        "auth_time": int(auth["auth_time"]),
        "acr": auth["acr"],
        "amr": auth["amr"],
        "sid": public_sid(svc, auth["sid"], client),
        "jti": secrets.token_urlsafe(12),
    }
    if nonce:
        claims["nonce"] = nonce
    if access_token:
        claims["at_hash"] = half_hash(access_token)
    for name, value in claims_.items():
        claims.setdefault(name, value)
    alg = client.id_token_signed_response_alg or svc.settings.signing_alg
    return sign(svc.keys, alg, claims)
