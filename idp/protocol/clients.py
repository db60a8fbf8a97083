"""Relying parties: their registration metadata and authlib's client interface.

A client's metadata follows RFC 7591 / OpenID Connect Dynamic Registration
names (``redirect_uris``, ``grant_types``, ``token_endpoint_auth_method``,
``post_logout_redirect_uris``, ``subject_type`` (with ``sector_identifier_uri``),
``id_token_signed_response_alg``, ``jwks`` or ``jwks_uri``, and the logout URIs of
Back-Channel and Front-Channel Logout 1.0: ``backchannel_logout_uri``,
``backchannel_logout_session_required``, ``frontchannel_logout_uri``,
``frontchannel_logout_session_required``, RFC 9126's
``require_pushed_authorization_requests`` and RFC 9449's ``dpop_bound_access_tokens``,
``default_acr_values``, ``default_max_age``, ``require_auth_time``, the
human-readable ``client_name``, ``client_uri``, ``logo_uri``, ``tos_uri``,
``policy_uri`` (each also with a ``#language`` tag), ``contacts``,
``software_id``, ``software_version``) plus our own policy fields
(``first_party``, ``minimum_acr``, ``allowed_factors``,
``access_token_lifetime``, ``refresh_token_lifetime``).

Metadata the provider does not understand is dropped, as RFC 7591 2 asks, so
the registration response never lists it as registered; metadata it
understands but cannot honour (encrypted ID tokens, signed UserInfo, request
objects by reference) is refused.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from urllib.parse import urlsplit

from authlib.oauth2.rfc6749 import ClientMixin
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy import select

from idp.acr import LADDER, earned, rank, with_mfa
from idp.protocol import remote
from idp.storage.models import Client, InitialAccessToken

AUTH_METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt", "none")
GRANT_TYPES = ("authorization_code", "refresh_token", "client_credentials")
SCOPES = ("openid", "profile", "email", "phone", "offline_access")
HUMAN = ("client_name", "client_uri", "logo_uri", "tos_uri", "policy_uri")  # may carry a "#language" tag
PAGES = ("client_uri", "logo_uri", "tos_uri", "policy_uri")  # of HUMAN, the client's web pages
KNOWN = (
    "redirect_uris", "post_logout_redirect_uris", "grant_types", "response_types", "token_endpoint_auth_method",
    "token_endpoint_auth_signing_alg", "jwks", "jwks_uri", "scope", "subject_type", "sector_identifier_uri",
    "id_token_signed_response_alg", "default_acr_values", "default_max_age", "require_auth_time",
    "backchannel_logout_uri", "backchannel_logout_session_required", "frontchannel_logout_uri",
    "frontchannel_logout_session_required", "require_pushed_authorization_requests", "dpop_bound_access_tokens",
    "contacts", "software_id", "software_version",
    "first_party", "minimum_acr", "allowed_factors", "access_token_lifetime", "refresh_token_lifetime",
)
UNSUPPORTED = ("request_uris", "id_token_encrypted_response_alg", "id_token_encrypted_response_enc",
               "userinfo_signed_response_alg", "userinfo_encrypted_response_alg", "userinfo_encrypted_response_enc",
               "request_object_signing_alg", "request_object_encryption_alg", "request_object_encryption_enc",
               "software_statement")


class ClientError(ValueError):
    """Invalid client metadata; ``error`` is the RFC 7591 error code. A login policy no login
    can meet has a ``reason`` too, and the ``params`` that say it to an administrator."""

    def __init__(self, description: str, error: str = "invalid_client_metadata", reason: str | None = None, **params):
        super().__init__(description)
        self.error = error
        self.description = description
        self.reason, self.params = reason, params


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)  # 256 bits


class OAuthClient(ClientMixin):
    """A read-only view of a ``Client`` row for authlib."""

    def __init__(self, row: Client):
        self.client_id = row.client_id
        self.secret_hash = row.secret_hash
        self.registration_token_hash = row.registration_token_hash
        self.first_party = row.first_party
        self.metadata = dict(row.metadata_)
        self.client_id_issued_at = int(row.created_at.timestamp()) if row.created_at else 0

    # -- metadata shortcuts --------------------------------------------------
    @property
    def name(self) -> str:
        return self.shown_name("")

    def shown_name(self, locale: str) -> str:
        """The name the pages show in ``locale``, as registered (never looked up as one of the
        provider's messages), else the client_id."""
        return self._shown("client_name", locale) or self.client_id

    def shown_page(self, field: str, locale: str) -> str | None:
        """The client's ``policy_uri`` or ``tos_uri`` the login pages link to in ``locale``
        (Registration 1.0 2: the provider SHOULD show them), or its ``logo_uri``; only an https
        URL, for a registration stored before others were refused."""
        uri = self._shown(field, locale)
        return uri if is_https_page(uri) else None

    def logo_origins(self) -> list[str]:
        """The origins of the client's logo_uri values (any language), which the login page
        may load an image from (its Content-Security-Policy)."""
        return sorted({_origin_text(uri) for key, uri in self.metadata.items()
                       if key.partition("#")[0] == "logo_uri" and is_https_page(uri)})

    def _shown(self, field: str, locale: str) -> str | None:
        """``field#<tag>`` for the language of ``locale``, the same language in another
        region, the untagged value, any value (RFC 7591 2.2)."""
        values = {key.partition("#")[2].lower(): value for key, value in self.metadata.items()
                  if key.partition("#")[0] == field and value}
        language = locale.lower().partition("-")[0]
        return (values.get(locale.lower())
                or next((value for tag, value in values.items() if tag and tag.partition("-")[0] == language), None)
                or values.get("") or next(iter(values.values()), None))

    @property
    def auth_method(self) -> str:
        return self.metadata.get("token_endpoint_auth_method", "client_secret_basic")

    @property
    def is_public(self) -> bool:
        return self.auth_method == "none"

    @property
    def redirect_uris(self) -> list[str]:
        return self.metadata.get("redirect_uris", [])

    @property
    def post_logout_redirect_uris(self) -> list[str]:
        return self.metadata.get("post_logout_redirect_uris", [])

    @property
    def id_token_signed_response_alg(self) -> str | None:
        return self.metadata.get("id_token_signed_response_alg")

    @property
    def minimum_acr(self) -> str | None:
        return self.metadata.get("minimum_acr")

    def allows(self, factor: str) -> bool:
        """Whether this client accepts logins with ``factor`` (all, unless it lists some)."""
        allowed = self.metadata.get("allowed_factors")
        return allowed is None or factor in allowed

    def lifetime(self, kind: str, default: int) -> int:
        return int(self.metadata.get(f"{kind}_lifetime") or default)

    def sector_identifier(self) -> str:
        """The host pairwise subjects are computed for (OIDC Core 8.1)."""
        return sector(self.metadata) or self.client_id

    # -- authlib's ClientMixin ---------------------------------------------------
    def get_client_id(self):
        return self.client_id

    def get_default_redirect_uri(self):
        # Only an unambiguous single registration may be implied.
        return self.redirect_uris[0] if len(self.redirect_uris) == 1 else None

    def get_allowed_scope(self, scope):
        if not scope:
            return self.metadata.get("scope", "openid")
        allowed = set(self.metadata.get("scope", " ".join(SCOPES)).split())
        return " ".join(s for s in scope.split() if s in allowed)

    def check_redirect_uri(self, redirect_uri):
        if redirect_uri in self.redirect_uris:  # exact match, no prefixes
            return True
        # RFC 8252 7.3: a native app listens on a loopback port the system gives it at the time of
        # the request, so a registered loopback IP address matches on any port (but nothing else).
        loopback = _loopback_portless(redirect_uri)
        return loopback is not None and loopback in map(_loopback_portless, self.redirect_uris)

    def check_client_secret(self, client_secret):
        if not self.secret_hash:
            return False
        return hmac.compare_digest(digest(client_secret), self.secret_hash)

    def check_endpoint_auth_method(self, method, endpoint):
        return method == self.auth_method

    def check_response_type(self, response_type):
        return response_type in self.metadata.get("response_types", ["code"])

    def check_grant_type(self, grant_type):
        return grant_type in self.metadata.get("grant_types", ["authorization_code"])


def sector(meta: dict) -> str | None:
    """The host of a client's sector_identifier_uri, else of its redirect URIs, for which its
    pairwise subjects are computed (OIDC Core 8.1)."""
    uri = meta.get("sector_identifier_uri") or (meta.get("redirect_uris") or [""])[0]
    return urlsplit(uri).hostname


def validate_metadata(meta: dict) -> dict:
    """Normalise and check client metadata; raises ``ClientError``."""
    refused = sorted(k for k in UNSUPPORTED if meta.get(k) is not None)
    if refused:
        raise ClientError(f"not supported: {', '.join(refused)}")
    meta = {k: v for k, v in meta.items() if v is not None and (k in KNOWN or k.partition("#")[0] in HUMAN)}
    for key in ("redirect_uris", "post_logout_redirect_uris", "grant_types", "response_types"):
        value = meta.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ClientError(f"{key} must be a list of strings")
    grant_types = meta.setdefault("grant_types", ["authorization_code", "refresh_token"])
    unknown = set(grant_types) - set(GRANT_TYPES)
    if unknown:
        raise ClientError(f"unsupported grant_types: {', '.join(sorted(unknown))}")
    meta.setdefault("response_types", ["code"] if "authorization_code" in grant_types else [])
    if set(meta["response_types"]) - {"code"}:
        raise ClientError("only the response type 'code' is supported")
    if ("code" in meta["response_types"]) != ("authorization_code" in grant_types):
        raise ClientError("response_types 'code' and grant_types 'authorization_code' go together (RFC 7591 2.1)")
    if not grant_types:
        raise ClientError("grant_types must not be empty")
    for key, value in meta.items():
        if key.partition("#")[0] in HUMAN + ("software_id", "software_version") and not (
                isinstance(value, str) and 0 < len(value) <= 300):
            raise ClientError(f"{key} must be a string of at most 300 characters")
    for key, value in meta.items():
        # The login pages link to the client's pages: a javascript: or data: URI
        # there would run in the provider's origin at a click.
        if key.partition("#")[0] in PAGES and not is_https_page(value):
            raise ClientError(f"{key} must be an https URL")
    contacts = meta.get("contacts", [])
    if not isinstance(contacts, list) or not all(isinstance(c, str) and len(c) <= 320 for c in contacts):
        raise ClientError("contacts must be a list of email addresses")
    for key in ("redirect_uris", "post_logout_redirect_uris"):
        for uri in meta.get(key, []):
            _check_uri(uri, key)
    if "authorization_code" in grant_types and not meta.get("redirect_uris"):
        raise ClientError("redirect_uris is required for the authorization_code grant", "invalid_redirect_uri")
    method = meta.setdefault("token_endpoint_auth_method", "client_secret_basic")
    if method not in AUTH_METHODS:
        raise ClientError(f"unsupported token_endpoint_auth_method: {method}")
    if method == "none" and "client_credentials" in grant_types:
        raise ClientError("a public client cannot use client_credentials")
    if "jwks" in meta and "jwks_uri" in meta:
        raise ClientError("jwks and jwks_uri must not both be given (OpenID Connect Registration 1.0 2)")
    if method == "private_key_jwt" and not (meta.get("jwks") or meta.get("jwks_uri")):
        raise ClientError("private_key_jwt needs jwks or jwks_uri")
    if "jwks" in meta:
        check_jwks(meta["jwks"])
    if "jwks_uri" in meta:  # fetched when the client authenticates (idp.protocol.remote)
        if not isinstance(meta["jwks_uri"], str):
            raise ClientError("jwks_uri must be a string")
        _check_uri(meta["jwks_uri"], "jwks_uri", "invalid_client_metadata")
    for key in ("id_token_signed_response_alg", "token_endpoint_auth_signing_alg"):
        if meta.get(key, "ES256") not in ("ES256", "RS256"):
            raise ClientError(f"{key} must be ES256 or RS256")
    alg = meta.get("token_endpoint_auth_signing_alg")
    if method == "private_key_jwt" and alg and "jwks" in meta and not any(
            (k.get("kty"), k.get("crv")) in ((("EC", "P-256"),) if alg == "ES256" else (("RSA", None),))
            and k.get("alg", alg) == alg for k in meta["jwks"]["keys"]):
        raise ClientError(f"jwks has no key that can make the {alg} assertions token_endpoint_auth_signing_alg names")
    if meta.get("subject_type", "public") not in ("public", "pairwise"):
        raise ClientError("subject_type must be public or pairwise")
    # The sector a pairwise sub is computed for (OIDC Core 8.1): the host of the sector_identifier_uri,
    # whose document lists this client's redirect URIs, else the redirect URIs' one host.
    if "sector_identifier_uri" in meta:
        _check_sector_document(meta)
    elif meta.get("subject_type") == "pairwise" and len({urlsplit(u).hostname for u in meta.get("redirect_uris", [])}) > 1:
        raise ClientError("a pairwise client's redirect_uris must share one host, its sector, or be listed at a "
                          "sector_identifier_uri (OpenID Connect Core 8.1)")
    check_policy(meta)
    for key in ("backchannel_logout_uri", "frontchannel_logout_uri"):
        if key in meta:
            if not isinstance(meta[key], str):
                raise ClientError(f"{key} must be a string")
            _check_uri(meta[key], key, "invalid_client_metadata")
    # Front-Channel Logout 1.0 2: the provider's logged-out page frames this URI, so it must be
    # the client's own origin, one of its redirect URIs', not any page a registrant names.
    if "frontchannel_logout_uri" in meta and _origin(meta["frontchannel_logout_uri"]) not in {
            _origin(uri) for uri in meta.get("redirect_uris", [])}:
        raise ClientError("frontchannel_logout_uri must have the scheme, host and port of a redirect URI")
    acr_values = meta.get("default_acr_values", [])
    if not isinstance(acr_values, list) or not all(isinstance(v, str) for v in acr_values) or set(acr_values) - set(LADDER):
        raise ClientError(f"default_acr_values may only contain: {' '.join(LADDER)}")
    max_age = meta.get("default_max_age", 0)
    if not isinstance(max_age, int) or isinstance(max_age, bool) or not 0 <= max_age < 10**9:
        raise ClientError("default_max_age must be a non-negative number of seconds")
    for key in ("backchannel_logout_session_required", "frontchannel_logout_session_required",
                "require_pushed_authorization_requests", "dpop_bound_access_tokens", "require_auth_time"):
        if key in meta and not isinstance(meta[key], bool):
            raise ClientError(f"{key} must be true or false")
    scope = meta.get("scope")
    if scope is not None and (not isinstance(scope, str) or set(scope.split()) - set(SCOPES)):
        raise ClientError(f"scope may only contain: {' '.join(SCOPES)}")
    return meta


def _check_sector_document(meta: dict) -> None:
    """OIDC Registration 1.0 5: the document at sector_identifier_uri, a JSON array of URLs,
    must list every redirect_uri. Named by the client alone, the sector would let any
    registration take another client's and learn the subjects that client's users have there."""
    uri = meta["sector_identifier_uri"]
    if not isinstance(uri, str):
        raise ClientError("sector_identifier_uri must be a string")
    _check_uri(uri, "sector_identifier_uri", "invalid_client_metadata")
    try:
        listed = remote.fetch_json(uri)
    except remote.FetchError:
        raise ClientError("sector_identifier_uri could not be read as JSON") from None
    if not isinstance(listed, list) or not all(isinstance(u, str) for u in listed):
        raise ClientError("sector_identifier_uri must hold a JSON array of URLs")
    missing = [u for u in meta.get("redirect_uris", []) if u not in listed]
    if missing:
        raise ClientError(f"the document at sector_identifier_uri does not list the redirect_uris {' '.join(missing)}")


def check_policy(meta: dict) -> None:
    """The login policy fields an administrator sets (``allowed_factors``, ``minimum_acr``),
    and that some login can meet them: a policy none can would send every user of the client
    back with an error before any page."""
    from idp.factors import FACTORS  # the factors are the login's business; imported late

    allowed = meta.get("allowed_factors")
    if allowed is not None and (not isinstance(allowed, list) or set(allowed) - set(FACTORS)):
        raise ClientError(f"allowed_factors must be a list of: {', '.join(FACTORS)}")
    minimum = meta.get("minimum_acr")
    if minimum not in (None, *LADDER):
        raise ClientError(f"minimum_acr must be one of {' '.join(LADDER)}")
    factors = [FACTORS[name] for name in (FACTORS if allowed is None else allowed)]
    if not any(f.first for f in factors):  # an empty list has none either
        first = ", ".join(name for name, f in FACTORS.items() if f.first)
        raise ClientError(f"allowed_factors must include a way to begin a login: {first}", reason="no_first_factor",
                          first=first)
    # A first factor, alone or followed by one more: the best level the allowed factors reach.
    best = max(rank(earned(with_mfa(first.amr + (then.amr if then is not first else []))))
               for first in factors if first.first for then in factors)
    if rank(minimum) > best:
        raise ClientError(f"minimum_acr {minimum} is beyond what the allowed factors can reach ({LADDER[best - 1]})",
                          reason="unreachable", minimum=minimum, best=LADDER[best - 1])


def check_jwks(jwks) -> None:
    """Client assertions are verified with these keys, so they must parse (or
    /token fails with a 500) and be public EC or RSA keys: a symmetric key here
    would let a "private_key_jwt" client sign with a secret anyone reading its
    metadata can see."""
    try:
        keys = KeySet.import_key_set(jwks).keys
    except (JoseError, TypeError, KeyError, ValueError):
        raise ClientError("jwks is not a valid JWK set") from None
    if not keys or any(k.key_type not in ("EC", "RSA") or k.is_private for k in keys):
        raise ClientError("jwks must hold only public EC or RSA keys")


def _check_uri(uri: str, key: str, error: str = "invalid_redirect_uri") -> None:
    try:
        parts = urlsplit(uri)
        port = parts.port  # a bad port raises here, not in a later look at it
    except ValueError:
        raise ClientError(f"{key}: {uri!r} is not a valid URI", error) from None
    # A host name or an address, and no character a URI may not hold (RFC 3986 2): urlsplit takes
    # "portal example.tw" or "host;frame-src *" as a host, which pages and headers repeat.
    if not _HOST.fullmatch(parts.hostname or "") or not _URI_CHARS.fullmatch(uri) or port == 0:
        raise ClientError(f"{key}: {uri!r} is not a valid URI", error)
    local = parts.hostname in ("localhost", "127.0.0.1", "::1")
    if parts.scheme not in ("https", "http") or not parts.hostname or "#" in uri:
        raise ClientError(f"{key}: {uri!r} is not an absolute http(s) URI without fragment", error)
    if parts.username is not None or "*" in parts.hostname:
        raise ClientError(f"{key}: {uri!r} may hold neither a user name nor a wildcard host", error)
    if parts.scheme == "http" and not local:
        raise ClientError(f"{key}: {uri!r} must use https", error)


_HOST = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]+")  # a name (a container's, with "_"), an IP address
_URI_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")


def is_https_page(uri) -> bool:
    """Whether ``uri`` is an https URL at a plain host, with no user name and no character a URI
    may not hold (so nothing a page or header repeating it would read otherwise)."""
    try:
        parts = urlsplit(uri)
        port = parts.port  # a bad port raises here
    except (TypeError, ValueError, AttributeError):
        return False
    return (parts.scheme == "https" and _HOST.fullmatch(parts.hostname or "") is not None and port != 0
            and parts.username is None and _URI_CHARS.fullmatch(uri) is not None)


def _loopback_portless(uri: str) -> str | None:
    """An http URI at 127.0.0.1 or [::1] without its port; None for any other URI."""
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - a bad port raises here
    except ValueError:
        return None
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "::1") or parts.username is not None:
        return None
    host = "[::1]" if parts.hostname == "::1" else parts.hostname
    return parts._replace(netloc=host).geturl()


def _origin(uri: str) -> tuple:
    parts = urlsplit(uri)
    return parts.scheme, parts.hostname, parts.port or {"https": 443, "http": 80}.get(parts.scheme)


def _origin_text(uri: str) -> str:
    """``scheme://host[:port]`` of ``uri``, as a Content-Security-Policy source names it."""
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _new_client_id() -> str:
    """128 random bits, never starting with "-": command lines (``idp clients show ID``) take that for an option."""
    while (client_id := secrets.token_urlsafe(16)).startswith("-"):
        pass
    return client_id


def create_client(session, meta: dict, *, first_party: bool = False, with_registration_token: bool = False,
                  validated: bool = False):
    """Register a client; returns (row, secret, registration_access_token), secrets shown once.
    ``validated``: ``meta`` is what ``validate_metadata`` returned (its documents fetched, not
    again within the caller's transaction)."""
    meta = meta if validated else validate_metadata(meta)
    secret = None if meta["token_endpoint_auth_method"] in ("none", "private_key_jwt") else new_secret()
    reg_token = new_secret() if with_registration_token else None
    row = Client(
        client_id=_new_client_id(),
        secret_hash=digest(secret) if secret else None,
        registration_token_hash=digest(reg_token) if reg_token else None,
        metadata_=meta,
        first_party=first_party,
    )
    session.add(row)
    session.flush()
    return row, secret, reg_token


def client_info(row: Client, secret: str | None = None, reg_token: str | None = None, issuer: str = "") -> dict:
    info = {"client_id": row.client_id, "client_id_issued_at": int(row.created_at.timestamp()), **row.metadata_}
    info["first_party"] = row.first_party
    if secret:
        info["client_secret"] = secret
        info["client_secret_expires_at"] = 0
    if reg_token:
        info["registration_access_token"] = reg_token
        info["registration_client_uri"] = f"{issuer}/register/{row.client_id}"
    return info


def find(session, client_id: str) -> Client | None:
    return session.execute(select(Client).where(Client.client_id == client_id)).scalar_one_or_none()


def new_initial_access_token(session, lifetime_seconds: int, now: dt.datetime) -> str:
    """An RFC 7591 initial access token, good for one registration."""
    token = new_secret()
    session.add(InitialAccessToken(token_hash=digest(token), expires_at=now + dt.timedelta(seconds=lifetime_seconds)))
    return token
