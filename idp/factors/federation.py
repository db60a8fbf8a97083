"""Google federation (SPEC A6): a generic upstream OpenID Connect connector.

One upstream is configured by ``IDP_UPSTREAM_*`` (issuer, client id/secret,
scopes, button label); Google is the default entry. Any OpenID provider works:
the connector reads the upstream's discovery document, sends the browser there
with ``state``, ``nonce`` and PKCE (S256) through authlib's OAuth 2 client,
redeems the code with authlib's client (client_secret_basic), and validates the
ID token itself (signature against the upstream's JWKS, ``iss``, ``aud``,
``azp``, ``exp``/``iat``, ``nonce``).

Decisions:

- **amr** ``["fed"]`` (RFC 8176): alone it earns ``urn:idp:loa:1``; with the
  two-factor policy on, the login flow then asks for the bound OTP (or
  certificate), so a Google login is always followed by that step.
- **first = True, possession = False**: it finds the account itself, by the
  binding ``google`` whose ``external_id`` is ``issuer|sub``. ``bound`` is
  False: it is a way in, never a second factor after a password (the flow
  would otherwise offer password + Google as two factors for step-up).
- **Binding** happens in the account area (after re-verification), only when
  OTP or a certificate is bound; one upstream account binds to at most one
  local account (``uq_binding_external``); rebinding replaces the old one.
- **Switched off** when ``IDP_UPSTREAM_ISSUER`` is empty.
- Errors never become a 500: an upstream that cannot be reached, answers
  with an error, or sends an ID token that does not validate ends with a
  message key (``google.*``) shown on the login or settings page.
"""

from __future__ import annotations

import logging
import secrets
import time

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from idp.factors import Outcome

log = logging.getLogger("idp.federation")

from authlib.integrations.httpx_client import AsyncOAuth2Client

try:  # authlib's client is built on httpx2 when it is installed (our dependency), else on httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

STATE = "upstream:"  # one redirect to the upstream, by its state
STATE_SECONDS = 600
CACHE_SECONDS = 300
LEEWAY = 120


class UpstreamError(Exception):
    """A failure with the message key to show."""

    def __init__(self, key: str, detail: str = ""):
        super().__init__(detail or key)
        self.key = key


class Upstream:
    """One configured upstream OpenID provider."""

    def __init__(self, issuer: str, client_id: str, client_secret: str, scopes: str, timeout: float = 10.0):
        self.issuer, self.client_id, self.client_secret = issuer.rstrip("/"), client_id, client_secret
        self.scopes, self.timeout = scopes, timeout
        self._metadata: tuple[float, dict] | None = None
        self._jwks: tuple[float, KeySet] | None = None

    def _client(self, redirect_uri: str | None = None):
        return AsyncOAuth2Client(self.client_id, self.client_secret, scope=self.scopes, redirect_uri=redirect_uri,
                                 code_challenge_method="S256", timeout=self.timeout,
                                 limits=httpx.Limits(max_keepalive_connections=0))

    async def metadata(self) -> dict:
        if self._metadata and self._metadata[0] > time.monotonic():
            return self._metadata[1]
        url = self.issuer + "/.well-known/openid-configuration"
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as http:
                response = await http.get(url)
                response.raise_for_status()
                data = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise UpstreamError("google.unavailable", f"discovery {url}: {exc}") from exc
        if data.get("issuer", "").rstrip("/") != self.issuer:
            raise UpstreamError("google.unavailable", f"discovery names issuer {data.get('issuer')!r}")
        self._metadata = (time.monotonic() + CACHE_SECONDS, data)
        return data

    async def keys(self, refresh: bool = False) -> KeySet:
        if self._jwks and not refresh and self._jwks[0] > time.monotonic():
            return self._jwks[1]
        meta = await self.metadata()
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as http:
                response = await http.get(meta["jwks_uri"])
                response.raise_for_status()
                keys = KeySet.import_key_set(response.json())
        except (httpx.HTTPError, ValueError, KeyError, JoseError) as exc:
            raise UpstreamError("google.unavailable", f"jwks: {exc}") from exc
        self._jwks = (time.monotonic() + CACHE_SECONDS, keys)
        return keys

    async def authorization_url(self, redirect_uri: str) -> tuple[str, dict]:
        """The URL to send the browser to, and what the callback needs (state, nonce, verifier)."""
        meta = await self.metadata()
        state, nonce, verifier = secrets.token_urlsafe(24), secrets.token_urlsafe(24), secrets.token_urlsafe(48)
        async with self._client(redirect_uri) as client:
            url, _ = client.create_authorization_url(meta["authorization_endpoint"], state=state, nonce=nonce,
                                                     code_verifier=verifier)
        return url, {"state": state, "nonce": nonce, "verifier": verifier, "redirect_uri": redirect_uri}

    async def finish(self, params, pending: dict, now: float) -> dict:
        """The validated ID token claims of the callback ``params``; UpstreamError otherwise."""
        if params.get("error"):
            key = "google.denied" if params.get("error") == "access_denied" else "google.error"
            raise UpstreamError(key, f"upstream error {params.get('error')}: {params.get('error_description', '')}")
        if params.get("iss") and params.get("iss").rstrip("/") != self.issuer:  # RFC 9207 mix-up defence
            raise UpstreamError("google.invalid", f"callback from issuer {params.get('iss')!r}")
        code = params.get("code")
        if not code:
            raise UpstreamError("google.error", "callback without a code")
        meta = await self.metadata()
        try:
            async with self._client(pending["redirect_uri"]) as client:
                token = await client.fetch_token(meta["token_endpoint"], code=code, code_verifier=pending["verifier"],
                                                 grant_type="authorization_code")
        except httpx.HTTPError as exc:
            raise UpstreamError("google.unavailable", f"token endpoint: {exc}") from exc
        except Exception as exc:  # authlib's OAuthError and friends: the upstream refused the code
            raise UpstreamError("google.error", f"token endpoint refused: {exc}") from exc
        id_token = token.get("id_token")
        if not id_token:
            raise UpstreamError("google.invalid", "no id_token in the token response")
        return await self.validate(id_token, pending["nonce"], now)

    async def validate(self, id_token: str, nonce: str, now: float) -> dict:
        keys = await self.keys()
        try:
            try:
                token = jwt.decode(id_token, keys)
            except JoseError:  # perhaps rotated keys: fetch once more
                token = jwt.decode(id_token, await self.keys(refresh=True))
        except (JoseError, ValueError) as exc:
            raise UpstreamError("google.invalid", f"id_token signature: {exc}") from exc
        if token.header.get("alg", "none") == "none" or token.header.get("alg", "").startswith("HS"):
            raise UpstreamError("google.invalid", "id_token alg not allowed")
        claims = token.claims
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        problems = []
        if str(claims.get("iss", "")).rstrip("/") != self.issuer:
            problems.append("iss")
        if self.client_id not in audiences or (len(audiences) > 1 and claims.get("azp") != self.client_id):
            problems.append("aud")
        if not isinstance(claims.get("exp"), (int, float)) or claims["exp"] + LEEWAY < now:
            problems.append("exp")
        if not isinstance(claims.get("iat"), (int, float)) or claims["iat"] - LEEWAY > now:
            problems.append("iat")
        if not nonce or not secrets.compare_digest(str(claims.get("nonce", "")), nonce):
            problems.append("nonce")
        if not claims.get("sub"):
            problems.append("sub")
        if problems:
            raise UpstreamError("google.invalid", "id_token claims wrong: " + ", ".join(problems))
        return claims


def external_id(issuer: str, sub: str) -> str:
    return f"{issuer.rstrip('/')}|{sub}"


class FederationFactor:
    name = "google"
    amr = ["fed"]
    first = True
    possession = False
    template = "factor_password.html"  # the first step's page: with the password, or alone, its button

    def __init__(self):
        self._upstream: Upstream | None = None
        self._config = None

    def enabled(self, svc) -> bool:
        return bool(svc.settings.upstream_issuer)

    def bound(self, account) -> bool:
        return False  # a way in only (see the module's note)

    def context(self, svc, tx, account) -> dict:
        return {}

    def upstream(self, svc) -> Upstream:
        s = svc.settings
        config = (s.upstream_issuer, s.upstream_client_id, s.upstream_client_secret, s.upstream_scopes)
        if self._upstream is None or self._config != config:
            self._upstream, self._config = Upstream(*config), config
        return self._upstream

    async def verify(self, request, svc, tx, form, account) -> Outcome:
        # Recorded by the callback (idp.web.federation); posting the factor by hand does nothing.
        return Outcome(error="google.use_button")


GOOGLE = FederationFactor()
