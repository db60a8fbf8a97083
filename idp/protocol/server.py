"""The OAuth 2.0 / OpenID Connect core on authlib's server components.

authlib validates requests and authenticates clients; this module supplies
storage (``Tokens``, the client table) and the ID token. All methods here are
synchronous. The token, revocation and introspection endpoints run them on the
event loop through ``idp.bridge.run``, where the store's Redis round trips are
awaited; the database reads left on this path (a client missing from the cache;
the disabled flag at refresh and introspection, with the in-process store only)
are single indexed rows, read blocking.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import time
from collections import defaultdict
from contextvars import ContextVar

import orjson
from authlib.oauth2 import rfc7009, rfc7523, rfc7662
from authlib.oauth2.rfc6749 import AuthorizationServer, OAuth2Request, grants
from authlib.oauth2.rfc6749.errors import InvalidClientError, InvalidGrantError, InvalidRequestError
from authlib.oauth2.rfc6749.requests import OAuth2Payload
from authlib.oauth2.rfc7636 import CodeChallenge
from joserfc.jwk import KeySet
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from idp.accounts import disabled_mark
from idp.protocol import claims, dpop, remote
from idp.protocol.clients import ClientError, OAuthClient, check_jwks, find
from idp.protocol.tokens import REPLAYED, grant_ended, not_before_mark
from idp.storage.kv import Batch
from idp.storage.models import Account

# TLS is terminated in front of us (or this is a loopback demo); the issuer's
# scheme decides cookie security. authlib's own http check would only see the
# internal hop.
os.environ.setdefault("AUTHLIB_INSECURE_TRANSPORT", "1")

log = logging.getLogger(__name__)

CLIENT_CACHE_SIZE = 10_000
# The client ``consent_grant`` found, for authlib's ``query_client`` within that one call.
_RESOLVED: ContextVar = ContextVar("idp_resolved_client", default=None)
ALL_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]
CONFIDENTIAL_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt"]


class _Payload(OAuth2Payload):
    def __init__(self, data: dict, datalist: dict):
        self._data, self._datalist = data, datalist

    @property
    def data(self):
        return self._data

    @property
    def datalist(self):
        return self._datalist


class Request(OAuth2Request):
    """An authlib request built from an already-read Starlette request."""

    def __init__(self, method: str, uri: str, headers, query: list[tuple[str, str]], form: list[tuple[str, str]]):
        super().__init__(method, uri, headers=headers)
        datalist = defaultdict(list)
        for k, v in [*query, *form]:
            datalist[k].append(v)
        self._args = {k: v for k, v in query}
        self._form = {k: v for k, v in form}
        self.payload = _Payload({k: v[0] for k, v in datalist.items()}, datalist)
        self.idp_auth = None  # the login that authorizes this request (set by the web layer)
        self.dpop_jkt = None  # the key of a valid DPoP proof sent with it (set by the web layer)

    @property
    def args(self):
        return self._args

    @property
    def form(self):
        return self._form


class AuthCode:
    """A claimed authorization code, in the shape authlib's grant expects."""

    def __init__(self, record: dict):
        self.record = record
        self.code_challenge = record.get("code_challenge")
        self.code_challenge_method = record.get("code_challenge_method")

    def get_redirect_uri(self):
        return self.record["redirect_uri"]

    def get_scope(self):
        return self.record["scope"]


class RefreshRecord:
    def __init__(self, token: str, record: dict, grant: dict):
        self.token, self.record, self.grant = token, record, grant

    def get_scope(self):
        return self.record["scope"]


class S256Only(CodeChallenge):
    """PKCE with S256 only (``plain`` protects nothing); required for public clients."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]
    DEFAULT_CODE_CHALLENGE_METHOD = "S256"

    def validate_code_challenge(self, grant, redirect_uri):
        data = grant.request.payload.data
        if grant.request.client.is_public and not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: send code_challenge with code_challenge_method=S256")
        if data.get("code_challenge") and not data.get("code_challenge_method"):
            # Without it the method is "plain" (RFC 7636 4.3), which protects nothing here.
            raise InvalidRequestError("Send code_challenge_method=S256: plain, the default, is not supported.")
        super().validate_code_challenge(grant, redirect_uri)


def _issue(grant, batch: Batch, *, account_id: str | None, scope: str, gid: str, auth: dict | None,
           profile: dict | None = None, nonce=None, refresh=True, record: dict | None = None,
           rotating: dict | None = None, sid: str | None = None, refresh_scope: str | None = None,
           left: float = float("inf"), from_code: bool = False):
    """Mint the token response of one grant: access token, refresh token, ID token.
    The client, account and login are the grant's (in its record); the tokens' own
    records hold the scope (the refresh token's ``refresh_scope`` when given) and whatever
    else ``record`` adds. Their store writes join
    those already in ``batch``, all sent in one round trip; so is the read of the
    account's disabled mark, when ``rotating`` (a refresh token's record) its claim, and with
    ``sid`` the SSO session the grant joins, and ``from_code`` whether its code was used again
    meanwhile. A disabled account, a lost claim or a session that has ended (a logout since the
    code) revokes the grant, the new tokens with it; so does a replayed code, after the answer.
    No token outlives the grant: ``left``, the seconds it has."""
    svc, client = grant.server.svc, grant.request.client

    def lifetime(kind: str, default: int) -> int:
        return max(1, int(min(client.lifetime(kind, default), left)))

    at_lifetime = lifetime("access_token", svc.settings.access_token_seconds)
    record = {"scope": scope, **(record or {})}
    token = {"token_type": "Bearer", "expires_in": at_lifetime}
    if scope:  # RFC 6749 3.3: a scope is one or more scope-tokens; none, and there is nothing to say
        token["scope"] = scope
    jkt = grant.request.dpop_jkt
    _require_dpop(grant.request, client)
    if jkt:
        record["cnf"] = {"jkt": jkt}  # RFC 9449 6: the tokens are good only with this key's proofs
        token["token_type"] = "DPoP"
    token["access_token"] = svc.tokens.issue("at", gid, record, at_lifetime, batch)
    if refresh and client.check_grant_type("refresh_token"):
        rt_lifetime = lifetime("refresh_token", svc.settings.refresh_token_seconds)
        token["refresh_token"] = svc.tokens.issue("rt", gid, {**record, "scope": refresh_scope or scope}, rt_lifetime,
                                                  batch)
    # Everything that can fail comes before the write: once it is sent, a rotated refresh
    # token is spent, and a retry after a 500 would look like its reuse.
    if account_id is not None and "openid" in scope.split():
        token["id_token"] = claims.id_token(svc, client, account_id, claims.narrowed(profile, scope), auth,
                                            nonce=nonce, access_token=token["access_token"])
    # Checked in the write's own round trip: the account's disabled mark; for a refresh, whether
    # the account's sessions were ended since its grant opened; with ``sid``, the session, and
    # whether its end marked the list the grant was added to (``Sessions.ended_mark``), both
    # after the addition: a logout after them finds the grant in the list and revokes it.
    reads = {}
    if account_id is not None:
        reads["disabled"] = batch.read(disabled_mark(account_id))
    if account_id is not None and rotating is not None:
        reads["not_before"] = batch.read(not_before_mark(account_id))
    if sid is not None:
        reads["session"] = batch.read("sess:" + sid)
        marked = svc.sessions.ended_mark(sid, batch)
    if from_code:
        reads["replayed"] = batch.read(REPLAYED + gid)
    found = svc.store.write(batch)
    taken, read = found[:len(batch.takes)], found[len(batch.takes):]
    held = found[len(found) - len(batch.has_members):]
    read = {name: read[i] for name, i in reads.items()}
    reused = rotating is not None and taken[0] is None  # another request claimed the refresh token first
    disabled = read.get("disabled") is not None
    ended = ("session" in read and (read["session"] is None or held[marked])
             or grant_ended(rotating or {}, read.get("not_before")))
    if reused or disabled or ended:
        svc.tokens.revoke_grant(gid)  # with the tokens just written: they were never handed out
        raise InvalidGrantError("The account is disabled." if disabled else "The login's session has ended." if ended
                                else "The refresh token is invalid, expired, revoked or already used.")
    if read.get("replayed") is not None:
        # The code's second use came while these were written; it revokes them as if it came after
        # (the first use is answered, as the winner of a raced refresh token is).
        svc.tokens.revoke_grant(gid)
    return token


def _require_dpop(request, client) -> None:
    """RFC 9449 5: a client registered with ``dpop_bound_access_tokens`` gets no token without a proof."""
    if not request.dpop_jkt and client.metadata.get("dpop_bound_access_tokens"):
        raise dpop.InvalidProof("This client's tokens must be DPoP-bound: send a DPoP proof.")


def account_active(svc, account_id: str) -> bool:
    """Whether the account is not disabled: introspection calls its tokens inactive, and the
    token endpoint refuses its refresh tokens, the moment it is disabled (a code exchange or
    a refresh also reads the mark in the round trip that writes its tokens, ``_issue``).

    With a shared store (Redis), one GET of the account's disabled mark there (``idp.accounts.
    set_disabled``), awaited on the event loop inside ``idp.bridge.run``. With the in-process
    store, one indexed read of the database's flag (``Database.scalar``): ``idp users disable``
    runs in a process of its own, whose in-process store the server never sees."""
    if svc.store.shared:
        return svc.store.get(disabled_mark(account_id)) is None
    disabled = svc.db.scalar("SELECT disabled FROM accounts WHERE id = %s", account_id)
    return disabled is not None and not disabled  # SQLite answers 0 or 1


def token_active(svc, record: dict) -> bool:
    """Whether a token (its record, with its grant's fields) still speaks for its account: the
    account not disabled (``account_active``), its sessions not ended since the grant opened
    (``Tokens.end_account``). With a shared store, both marks in one round trip."""
    account_id = record["account"]
    if svc.store.shared:
        disabled, not_before = svc.store.get_many([disabled_mark(account_id), not_before_mark(account_id)])
        return disabled is None and not grant_ended(record, not_before)
    return account_active(svc, account_id) and not svc.tokens.ended(record)


def _profile(svc, stored: dict, account_id: str, scope: str) -> dict:
    """The released claims stored with a code or grant at issue time; records written
    before they were stored there (refresh tokens live for days) read the account."""
    if "claims" in stored:
        return stored["claims"]
    with svc.db.session() as session:
        account = session.get(Account, account_id)
        if account is None or account.disabled:
            raise InvalidGrantError("The account is disabled.")
        return claims.profile(account, scope)


class AuthorizationCodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ALL_AUTH_METHODS

    def create_authorization_response(self, redirect_uri, grant_user):
        raise NotImplementedError("the web layer issues codes through Provider.issue_code")

    def validate_requested_scope(self):
        """OIDC Core 3.1.2.1: scope values the provider does not understand are ignored, not an
        invalid_scope; the client's ``get_allowed_scope`` leaves them out of what is granted."""

    def query_authorization_code(self, code, client):
        _require_dpop(self.request, client)  # before the claim, which spends the code
        record = self.server.svc.tokens.claim_code(code)
        if record is None or record["client_id"] != client.client_id:
            return None
        bound = record.get("dpop_jkt")
        if bound and not hmac.compare_digest(bound, self.request.dpop_jkt or ""):
            raise dpop.InvalidProof("This code was requested for another DPoP key (dpop_jkt): send a proof by that key.")
        return AuthCode(record)

    def delete_authorization_code(self, authorization_code):
        pass  # claimed (and so deleted) atomically in query_authorization_code

    def create_token_response(self):
        """No database read: the login that issued the code checked the account and
        stored the claims the ID token needs in the code (one disabled since is refused
        by ``_issue``)."""
        svc = self.server.svc
        code, batch = self.request.authorization_code.record, Batch()
        sid = code["auth"]["sid"]
        profile = _profile(svc, code, code["account"], code["scope"])
        lifetime = self.request.client.lifetime("refresh_token", svc.settings.refresh_token_seconds)
        if "ends" in code["auth"]:  # a login with an end of its own (a one-day password's day): no token outlives it
            left = int(code["auth"]["ends"] - svc.clock())
            if left < 1:  # a code of the last moments before midnight, redeemed after
                raise InvalidGrantError("The login this code was issued for has ended.")
            lifetime = min(lifetime, left)
        gid = svc.tokens.open_grant(
            {"client_id": code["client_id"], "account": code["account"], "auth": code["auth"], "claims": profile},
            lifetime,
            gid=code["grant"],
            batch=batch,
        )
        svc.sessions.add_grant(sid, code["client_id"], gid, batch, offline="offline_access" in code["scope"].split())
        token = _issue(self, batch, account_id=code["account"], scope=code["scope"], gid=gid, auth=code["auth"],
                       profile=profile, nonce=code.get("nonce"), sid=sid, left=lifetime, from_code=True)
        return 200, token, self.TOKEN_RESPONSE_HEADER


class RefreshTokenGrant(grants.RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ALL_AUTH_METHODS

    def _validate_request_token(self, client):
        token = self.request.form.get("refresh_token")
        if not token:
            raise InvalidRequestError("Missing 'refresh_token' in request.")
        tokens = self.server.svc.tokens
        record, grant = tokens.find_refresh(token)  # also what detects reuse of a rotated token
        if record is None:
            raise InvalidGrantError("The refresh token is invalid, expired, revoked or already used.")
        # Another client's token is refused without burning it for its owner.
        if record["client_id"] != client.client_id:
            raise InvalidGrantError("The refresh token was issued to another client.")
        # RFC 9449 5: a public client's refresh token is bound to its key, so a
        # stolen one is worthless; checked before rotation, which would burn it.
        bound = (record.get("cnf") or {}).get("jkt")
        if client.is_public and bound and not hmac.compare_digest(bound, self.request.dpop_jkt or ""):
            raise InvalidGrantError("The refresh token is bound to another DPoP key.")
        return RefreshRecord(token, record, grant)  # claimed (rotated) with the new tokens' writes

    def create_token_response(self):
        svc = self.server.svc
        refresh = self.request.refresh_token
        record = refresh.record
        # ``_issue`` reads the account's disabled mark in its write's round trip; the
        # in-process store cannot see the marks the CLI writes, so the database answers first.
        if not svc.store.shared and not account_active(svc, record["account"]):
            raise InvalidGrantError("The account is disabled.")
        profile = _profile(svc, refresh.grant, record["account"], record["scope"])
        scope = self.request.payload.scope or record["scope"]
        # Grants opened before the login moved into them keep it in their tokens.
        carried = {"auth": record["auth"]} if "auth" not in refresh.grant and record.get("auth") else {}
        batch = Batch()
        svc.tokens.rotate_refresh(refresh.token, record, batch)
        # A narrower access token leaves the new refresh token the scope of the one presented
        # (RFC 6749 section 6): the next refresh may ask for all of it again.
        token = _issue(self, batch, account_id=record["account"], scope=scope, gid=record["grant"],
                       auth=record.get("auth"), profile=profile, record=carried, rotating=record,
                       refresh_scope=record["scope"], left=svc.tokens.left(refresh.grant))
        return 200, token, self.TOKEN_RESPONSE_HEADER


class ClientCredentialsGrant(grants.ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = CONFIDENTIAL_AUTH_METHODS

    def create_token_response(self):
        svc, client = self.server.svc, self.request.client
        scope = client.get_allowed_scope(self.request.payload.scope) or ""
        scope = " ".join(s for s in scope.split() if s != "openid")
        lifetime = client.lifetime("access_token", svc.settings.access_token_seconds)
        batch = Batch()
        gid = svc.tokens.open_grant({"client_id": client.client_id}, lifetime, batch=batch)
        token = _issue(self, batch, account_id=None, scope=scope, gid=gid, auth=None, refresh=False)
        return 200, token, self.TOKEN_RESPONSE_HEADER


ASSERTION_SECONDS = 86400  # the longest a private_key_jwt client assertion may live


class PrivateKeyJWT(rfc7523.JWTBearerClientAssertion):
    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(self, svc):
        super().__init__(validate_jti=True)
        self.svc = svc
        self.remote_keys = remote.ClientKeys(svc.clock, check_jwks)

    def get_audiences(self):
        issuer = self.svc.settings.issuer
        # RFC 7523 3: anything that names this server; clients commonly sign for the endpoint
        # they call (RFC 9126 2 allows any of these at /par).
        return [issuer] + [issuer + path for path in ("/token", "/par", "/revoke", "/introspect")]

    def resolve_client_public_key(self, client):
        # joserfc's default algorithms are discovery's ES256 and RS256 (HS256 needs a key these
        # EC and RSA keys are not). OIDC Core 9: with an algorithm registered, only that one,
        # which joserfc enforces for a key that names its "alg".
        alg = client.metadata.get("token_endpoint_auth_signing_alg")

        def key_set(jwks):
            return KeySet.import_key_set({"keys": [{**key, "alg": alg} if alg else key for key in jwks["keys"]]})

        uri = client.metadata.get("jwks_uri")
        if not uri:
            return key_set(client.metadata.get("jwks") or {"keys": []})

        def fetched(assertion):  # joserfc calls this with the assertion: its kid picks the fetch
            try:
                return key_set(self.remote_keys.get(uri, assertion.headers().get("kid")))
            except (remote.FetchError, ClientError) as exc:
                log.warning("jwks_uri of client %s (%s) unusable: %s", client.client_id, uri, exc)
                raise InvalidClientError(description="The client's jwks_uri could not be read.") from None

        return fetched

    def validate_jti(self, claims, jti):
        # Remember the jti for as long as authlib would accept the assertion (its
        # exp, checked on the wall clock, plus leeway): forgotten sooner, it could
        # be replayed (RFC 7523 3). So an assertion may not live longer than the
        # store keeps a jti: a day, well above what client libraries make (authlib's
        # own: an hour).
        remaining = claims["exp"] - time.time()
        if remaining > ASSERTION_SECONDS + self.leeway:
            raise InvalidClientError(description=f"The client assertion must expire within {ASSERTION_SECONDS} seconds.")
        key = f"jti:{claims['iss']}:{jti}"
        # joserfc compares exp with the clock's whole seconds: good until exp + leeway + 1.
        return self.svc.store.set(key, {}, max(1, math.ceil(remaining)) + self.leeway + 1, only_new=True)


class _TokenLookup:
    """A token found by revocation or introspection, in authlib's token shape."""

    def __init__(self, kind: str, value: str, record: dict, clock):
        self.kind, self.value, self.record, self._clock = kind, value, record, clock

    def check_client(self, client):
        return client.client_id == self.record["client_id"]

    def is_expired(self):
        return self.record["exp"] < self._clock()

    def is_revoked(self):
        return False  # revoked tokens are gone from the store


def _query(svc, token, hint):
    order = ["rt", "at"] if hint == "refresh_token" else ["at", "rt"]
    for kind in order:
        record = svc.tokens.lookup(kind, token)
        if record is not None:
            return _TokenLookup(kind, token, record, svc.clock)
    return None


class RevocationEndpoint(rfc7009.RevocationEndpoint):
    CLIENT_AUTH_METHODS = ALL_AUTH_METHODS

    def query_token(self, token_string, token_type_hint):
        return _query(self.server.svc, token_string, token_type_hint)

    def revoke_token(self, token, request):
        self.server.svc.tokens.revoke(token.kind, token.value, token.record)


class IntrospectionEndpoint(rfc7662.IntrospectionEndpoint):
    CLIENT_AUTH_METHODS = CONFIDENTIAL_AUTH_METHODS

    def query_token(self, token_string, token_type_hint):
        return _query(self.server.svc, token_string, token_type_hint)

    def check_permission(self, token, client, request):
        return True  # any confidential client may ask; it only learns about its own tokens

    def check_params(self, request, client):
        # RFC 7662 2.1: a hint the server does not know is no error; the search just takes every type.
        if "token" not in request.form:
            raise InvalidRequestError()

    def authenticate_token(self, request, client):
        self.check_params(request, client)
        token = self.query_token(request.form["token"], request.form.get("token_type_hint"))
        # A token of another client is reported inactive, not as an error.
        return token if token and token.check_client(client) else None

    def introspect_token(self, token):
        svc, record = self.server.svc, token.record
        if record.get("account") and not token_active(svc, record):
            return {"active": False}  # a disabled account's tokens are dead, as at UserInfo and refresh
        payload = {"active": True, "client_id": record["client_id"], "exp": int(record["exp"]), "iss": svc.settings.issuer}
        if record["scope"]:
            payload["scope"] = record["scope"]
        if token.kind == "at":  # RFC 7662 2.2: an access token's type (RFC 6749 7.1); a refresh token has none
            payload["token_type"] = "DPoP" if record.get("cnf") else "Bearer"
        if record.get("cnf"):
            payload["cnf"] = record["cnf"]  # RFC 9449 6.2: the resource server checks proofs against it
        if record.get("account"):
            client = self.server.query_client(record["client_id"])
            payload["sub"] = claims.subject(record["account"], client, svc.pairwise_salt)
            payload["acr"] = record["auth"]["acr"]
        return payload


class Server(AuthorizationServer):
    def __init__(self, svc):
        super().__init__(scopes_supported=["openid", "profile", "email", "phone", "offline_access"])
        self.svc = svc
        self._clients: dict[str, tuple[float, OAuthClient]] = {}
        self.register_grant(AuthorizationCodeGrant, [S256Only(required=True)])
        self.register_grant(RefreshTokenGrant)
        self.register_grant(ClientCredentialsGrant)
        self.register_client_auth_method("private_key_jwt", PrivateKeyJWT(svc))
        self.register_endpoint(RevocationEndpoint)
        self.register_endpoint(IntrospectionEndpoint)

    def query_client(self, client_id):
        """The client, from a short in-process cache: every token request needs it, and a
        database round trip per request was most of the token endpoint's time. Changes
        made through this process are seen at once (``forget_client``); changes made
        elsewhere (the CLI, other processes) within ``client_cache_seconds``."""
        if not isinstance(client_id, str) or not 0 < len(client_id) <= 64 or "\x00" in client_id:
            return None  # no client's id (a Basic header's, an assertion's sub): the database is not asked
        resolved = _RESOLVED.get()
        if resolved is not None and resolved.client_id == client_id:
            return resolved
        now = time.monotonic()
        cached = self._cached(client_id, now)
        if cached:
            return cached
        with self.svc.db.session() as session:
            row = find(session, client_id)
            client = OAuthClient(row) if row else None
        if client is not None:  # unknown ids are not cached: no filling the cache from outside
            if len(self._clients) >= CLIENT_CACHE_SIZE:
                self._clients.clear()
            self._clients[client_id] = (now + self.svc.settings.client_cache_seconds, client)
        return client

    async def client(self, client_id: str):
        """``query_client`` for the event loop: the database read, on a cache miss, in the thread pool."""
        return self._cached(client_id, time.monotonic()) or await run_in_threadpool(self.query_client, client_id)

    async def consent_grant(self, request, end_user=None):
        """``get_consent_grant`` (the authorization request validated) for the event loop: the
        client is found first (``client``), so the validation reads no database; an unknown
        client's error comes from the thread pool."""
        client_id = request.payload.client_id
        client = await self.client(client_id) if isinstance(client_id, str) else None
        if client is None:
            return await run_in_threadpool(self.get_consent_grant, request, end_user)
        resolved = _RESOLVED.set(client)  # authlib's own query_client gets it, whatever the cache holds by then
        try:
            return self.get_consent_grant(request, end_user)
        finally:
            _RESOLVED.reset(resolved)

    def _cached(self, client_id: str, now: float):
        cached = self._clients.get(client_id)
        return cached[1] if cached and cached[0] > now else None

    def forget_client(self, client_id: str) -> None:
        self._clients.pop(client_id, None)

    def create_oauth2_request(self, request):
        return request  # the web layer builds ``Request`` from the already-read body

    def save_token(self, token, request):
        pass  # tokens are stored as they are minted (``Tokens.issue``)

    def send_signal(self, name, *args, **kwargs):
        pass

    def handle_response(self, status, body, headers):
        if isinstance(body, dict):
            body = orjson.dumps(body)
        headers = dict(headers)
        headers.setdefault("Cache-Control", "no-store")
        headers.setdefault("Pragma", "no-cache")
        return Response(body, status_code=status, headers=headers)
