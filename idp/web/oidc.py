"""The protocol endpoints: discovery, JWKS, authorize, token, UserInfo,
revocation, introspection, RP-initiated logout and client registration."""

from __future__ import annotations

import base64
import datetime as dt
import hmac
import re
import secrets
from collections import Counter
from urllib.parse import urlencode

import orjson
from authlib.oauth2.rfc6749.errors import OAuth2Error
from joserfc import jwt
from joserfc.errors import JoseError
from sqlalchemy import delete, update
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from idp import acr, bridge, flow
from idp.protocol import claims, dpop, logout as logout_, par
from idp.protocol.clients import (ClientError, OAuthClient, client_info, create_client, digest, find, new_secret,
                                  sector, validate_metadata)
from idp.protocol.server import ALL_AUTH_METHODS, Request as OAuthRequest, account_active
from idp.storage.models import Account, Client, InitialAccessToken
from idp.web import login
from idp.web.forms import BadRequest, read_form, read_json, read_query
from idp.web.pages import (CSRF_COOKIE, csrf_ok, csrf_token, delete_cookie, error_page, get_cookie, render,
                           set_cookie, who)

PROMPTS = {"none", "login", "consent", "select_account"}
RETRY_SECONDS = 5  # Retry-After while Redis or the database is unreachable: a client's retry soon finds it back


def _json(data, status=200, headers=None) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json", headers=headers)


def _oauth_error(error: str, description: str, status: int = 400, headers=None) -> Response:
    return _json({"error": error, "error_description": description}, status,
                 {"Cache-Control": "no-store", **(headers or {})})


def unavailable(request: Request) -> Response | None:
    """The answer of a protocol endpoint (``JSON_ENDPOINTS``) whose Redis or database did not
    answer: the client's back end reads a JSON error and may retry; None for any other route."""
    if request.scope.get("endpoint") not in JSON_ENDPOINTS:
        return None
    return _oauth_error("temporarily_unavailable", "The provider cannot serve the request now; try again shortly.",
                        503, {"Retry-After": str(RETRY_SECONDS)})


# -- discovery -----------------------------------------------------------------------
async def discovery(request: Request) -> Response:
    svc = request.app.state.svc
    iss = svc.settings.issuer
    doc = {
        "issuer": iss,
        "authorization_endpoint": f"{iss}/authorize",
        "token_endpoint": f"{iss}/token",
        "userinfo_endpoint": f"{iss}/userinfo",
        "jwks_uri": f"{iss}/jwks",
        "registration_endpoint": f"{iss}/register",
        "revocation_endpoint": f"{iss}/revoke",
        "introspection_endpoint": f"{iss}/introspect",
        "end_session_endpoint": f"{iss}/logout",
        "pushed_authorization_request_endpoint": f"{iss}/par",
        "require_pushed_authorization_requests": svc.settings.par_required,
        "scopes_supported": ["openid", "profile", "email", "phone", "offline_access"],
        "response_types_supported": ["code"],
        "response_modes_supported": ["query", "form_post"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "subject_types_supported": ["public", "pairwise"],
        "id_token_signing_alg_values_supported": ["ES256", "RS256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt", "none"],
        "token_endpoint_auth_signing_alg_values_supported": ["ES256", "RS256"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt", "none"],
        "revocation_endpoint_auth_signing_alg_values_supported": ["ES256", "RS256"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt"],
        "introspection_endpoint_auth_signing_alg_values_supported": ["ES256", "RS256"],
        "code_challenge_methods_supported": ["S256"],
        "dpop_signing_alg_values_supported": dpop.ALGORITHMS,
        "acr_values_supported": list(acr.LADDER),
        "prompt_values_supported": sorted(PROMPTS),
        "claims_supported": [
            "sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "acr", "amr", "sid", "azp", "at_hash", "jti",
            "name", "preferred_username", "email", "email_verified", "phone_number", "phone_number_verified",
            "account_kind", "org",
        ],
        "claims_parameter_supported": False,
        "request_parameter_supported": False,
        "request_uri_parameter_supported": False,
        "ui_locales_supported": ["zh-TW", "en"],
        "authorization_response_iss_parameter_supported": True,
        "frontchannel_logout_supported": True,
        "frontchannel_logout_session_supported": True,
        "backchannel_logout_supported": True,
        "backchannel_logout_session_supported": True,
    }
    return _json(doc, headers={"Cache-Control": "public, max-age=300"})


async def jwks(request: Request) -> Response:
    return _json(request.app.state.svc.keys.jwks(), headers={"Cache-Control": "public, max-age=300"})


# -- authorization endpoint ------------------------------------------------------------
def _oauth_request(request: Request, query, form) -> OAuthRequest:
    svc = request.app.state.svc
    return OAuthRequest(request.method, svc.settings.issuer + request.scope["path"], request.headers, query, form)


def _bad_authorization_page(request: Request, error: OAuth2Error, ui_locales: str | None) -> Response:
    """Errors we must not send to the redirect URI: unknown client, unregistered URI."""
    return error_page(request, "error.authorize.title", "error.authorize.detail", status=400, ui_locales=ui_locales,
                      error=error.error, description=error.description or "")


def _unreadable_basic(request: Request) -> Response | None:
    """The answer to HTTP Basic credentials that are no base64 of UTF-8 text (RFC 6749 2.3.1,
    5.2: invalid_client, 401 with its challenge), which authlib's reading would raise on."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        base64.b64decode(value.strip()).decode()  # as authlib reads it
        return None
    except ValueError:  # not base64 (binascii.Error), a header byte past ASCII, not UTF-8 text
        return _oauth_error("invalid_client", "The Basic credentials cannot be read.", 401,
                            {"WWW-Authenticate": 'Basic error="invalid_client"'})


# The authorization request parameters the provider reads (``request`` and ``request_uri`` to
# refuse them). RFC 6749 3.1: any other is ignored, and so not kept with the login either: an
# anonymous request would park up to a body's 64 KB of its own in the store.
AUTHORIZATION_PARAMS = frozenset({
    "response_type", "client_id", "redirect_uri", "scope", "state", "nonce", "code_challenge",
    "code_challenge_method", "response_mode", "prompt", "max_age", "acr_values", "ui_locales",
    "id_token_hint", "dpop_jkt", "request", "request_uri"})
MAX_PARAM_CHARS = 4096  # an ID token hint, a client's state: far below; nginx's request line is 8 KB


def _known(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The authorization request parameters of ``pairs`` (``AUTHORIZATION_PARAMS``); RFC 6749 3.1: one
    sent without a value is treated as if it were omitted."""
    return [(key, value) for key, value in pairs if value and key in AUTHORIZATION_PARAMS]


def _repeated(pairs) -> str | None:
    """RFC 6749 3.1 and 3.2: no parameter more than once (authlib checks five of them at the
    authorization endpoint). Read first-wins in one place and last-wins in another, a repeated
    prompt, max_age or code would be obeyed by one part of the provider and ignored by another."""
    keys = [key for key, _ in pairs]
    if len(set(keys)) == len(keys):  # every request but a bad one: no counting
        return None
    repeated = sorted(key for key, count in Counter(keys).items() if count > 1)
    return f"Parameters must not be repeated: {', '.join(repeated)}."


def _check_extras(data: dict, pairs) -> tuple[str, str] | None:
    """Authorization request parameters authlib leaves to us; returns (error, description)."""
    if repeated := _repeated(pairs):
        return "invalid_request", repeated
    if long := sorted(key for key, value in pairs if len(value) > MAX_PARAM_CHARS):
        return "invalid_request", f"Longer than {MAX_PARAM_CHARS} characters: {', '.join(long)}."
    if data.get("request"):
        return "request_not_supported", "Request objects are not supported."
    if data.get("request_uri"):
        return "request_uri_not_supported", "request_uri is not supported."
    if data.get("response_mode", "query") not in ("query", "form_post"):
        return "invalid_request", "response_mode must be query or form_post."
    prompts = set(data.get("prompt", "").split())
    if prompts - PROMPTS:
        return "invalid_request", "Unknown prompt value."
    if "none" in prompts and len(prompts) > 1:
        return "invalid_request", "prompt=none cannot be combined with other values."
    if "openid" in data.get("scope", "").split() and not data.get("redirect_uri"):
        # Required by OpenID Connect Core 3.1.2.1; authlib would take the client's only one, and
        # the code, bound to none, would then be redeemed with any.
        return "invalid_request", "redirect_uri is required."
    max_age = data.get("max_age")
    if max_age is not None and not (max_age.isascii() and max_age.isdigit() and len(max_age) < 10):
        return "invalid_request", "max_age must be a non-negative integer."
    if data.get("dpop_jkt") is not None and not _THUMBPRINT.fullmatch(data["dpop_jkt"]):
        return "invalid_request", "dpop_jkt must be a JWK SHA-256 thumbprint (RFC 7638), base64url."
    return None


_THUMBPRINT = re.compile(r"[A-Za-z0-9_-]{43}")


def _hint_subject(svc, hint: str) -> dict | None:
    """The claims of an ID token we issued (expired is fine), or None if it is not ours."""
    try:
        token = jwt.decode(hint, svc.keys.verification_keys(), algorithms=["ES256", "RS256"])
    except (JoseError, ValueError):
        return None
    return token.claims if token.claims.get("iss") == svc.settings.issuer else None


async def _unusable_request_uri(request: Request, sent: dict) -> Response:
    """The page for a PAR request_uri that cannot be used: for a registered client, the user's
    request expired or was used (a reload, the back button), which going back to the portal mends."""
    client_id = sent.get("client_id")
    client = await request.app.state.svc.server.client(client_id) if isinstance(client_id, str) else None
    if client is None:
        return _bad_authorization_page(request, OAuth2Error("The client is not registered.", error="invalid_client"),
                                       sent.get("ui_locales"))
    return error_page(request, "error.request_uri.title", "error.request_uri.detail", status=400,
                      ui_locales=sent.get("ui_locales"), error="invalid_request_uri",
                      description="The request_uri is expired, already used or another client's.")


async def authorize(request: Request) -> Response:
    svc = request.app.state.svc
    try:
        query, form = _known(read_query(request)), _known(await read_form(request))
    except BadRequest as e:
        return error_page(request, "error.bad_request.title", "error.bad_request.detail", status=e.status)
    # Only a PAR request_uri is ours to look up; any other is refused to the client's redirect_uri
    # (request_uri_not_supported, ``_check_extras``) once the client and that URI are known.
    pushed = any(key == "request_uri" and value.startswith(par.REQUEST_URI_PREFIX) for key, value in query + form)
    if pushed:
        sent = dict(query + form)
        query, form = await bridge.run(par.pull, svc, sent.get("client_id"), sent.get("request_uri")) or [], []
        if not query:
            return await _unusable_request_uri(request, sent)
    oauth_request = _oauth_request(request, query, form)
    try:
        grant = await svc.server.consent_grant(oauth_request)
    except OAuth2Error as error:
        if not error.redirect_uri:
            return _bad_authorization_page(request, error, dict(query + form).get("ui_locales"))
        params = [("error", error.error)] + ([("error_description", error.description)] if error.description else [])
        return login.to_client(request, error.redirect_uri, params, oauth_request.payload.data)
    data = oauth_request.payload.data
    client: OAuthClient = grant.request.client
    problem = _check_extras(data, query + form)
    if problem is None and not pushed and par.required(svc, client):
        problem = "invalid_request", "This client must push its authorization requests to the PAR endpoint first."
    if problem:
        return login.to_client(request, grant.redirect_uri, [("error", problem[0]), ("error_description", problem[1])], data)

    prompts = set(data.get("prompt", "").split())
    session = await bridge.run(svc.sessions.get, get_cookie(request, login.SESSION_COOKIE))
    if session is not None:
        account_ok = await svc.db.call(account_active, svc, session["account"])
        if not account_ok:
            await bridge.run(svc.sessions.end, session["sid"], svc.tokens)
            session = None
    if session is not None:
        session = flow.within_policy(session, client)  # what this client accepts of it
    if session is not None:
        session = flow.within_day(session, svc.clock())
    fresh = bool(prompts & {"login", "select_account"})
    # The client's registered defaults stand in for what its request leaves out.
    max_age = data.get("max_age", client.metadata.get("default_max_age"))
    if session and max_age is not None:
        max_age = int(max_age)
        fresh = fresh or max_age == 0
        session = flow.within_age(session, max_age, svc.clock())
    hint = None
    if data.get("id_token_hint"):
        hint = _hint_subject(svc, data["id_token_hint"])
        if hint is None:
            return login.to_client(request, grant.redirect_uri, [("error", "invalid_request"), ("error_description", "id_token_hint is not valid.")], data)
        if session is None or hint["sub"] != claims.subject(session["account"], client, svc.pairwise_salt):
            fresh = True
    levels = acr.requested(data.get("acr_values") or " ".join(client.metadata.get("default_acr_values", [])),
                           client.minimum_acr)
    tx = svc.transactions.create(
        params=query + form,
        client_id=client.client_id,
        browser=csrf_token(request),
        fresh=fresh,
        target_acr=levels[0],
        fallback_acr=levels[1:],
        session=session,
        locale_hint=data.get("ui_locales"),
    )
    if hint is not None:
        tx["hint_sub"] = hint["sub"]  # only that user's login answers (``login.finish``)
    if "none" in prompts and (session is None or fresh):
        return await login.respond_error(request, tx, "login_required")
    return await login.advance(request, tx, interactive="none" not in prompts)


# -- pushed authorization requests (RFC 9126) ---------------------------------------------
async def pushed_authorization(request: Request) -> Response:
    """Authenticate the client, validate its request as /authorize would, keep it."""
    svc = request.app.state.svc
    try:
        form = await read_form(request)
    except BadRequest as e:
        return _oauth_error("invalid_request", e.description, e.status)
    if repeated := _repeated(form):
        return _oauth_error("invalid_request", repeated)
    if unreadable := _unreadable_basic(request):
        return unreadable
    try:
        client = await run_in_threadpool(svc.server.authenticate_client, _oauth_request(request, [], form),
                                         ALL_AUTH_METHODS, "par")
    except OAuth2Error as error:  # 401 and its challenge for credentials in the Authorization header (RFC 6749 5.2)
        return _oauth_error(error.error, error.description or "Client authentication failed.", error.status_code,
                            dict(error.get_headers()))
    params = _known(form)  # not the client's authentication, nor what the authorization ignores
    try:  # RFC 9449 10.1: a proof here binds the code to its key, as dpop_jkt does
        jkt = await _proof_key(request, svc.settings.issuer + "/par")
    except dpop.InvalidProof as e:
        return _oauth_error(e.error, e.description)
    if jkt:
        if dict(params).setdefault("dpop_jkt", jkt) != jkt:
            return _oauth_error("invalid_dpop_proof", "dpop_jkt is not the thumbprint of the DPoP proof's key.")
        params = [(k, v) for k, v in params if k != "dpop_jkt"] + [("dpop_jkt", jkt)]
    if any(k == "request_uri" for k, _ in params):
        return _oauth_error("invalid_request", "request_uri cannot be pushed.")
    if dict(params).setdefault("client_id", client.client_id) != client.client_id:
        return _oauth_error("invalid_request", "client_id does not match the authenticated client.")
    params = [(k, v) for k, v in params if k != "client_id"] + [("client_id", client.client_id)]
    check = OAuthRequest("GET", svc.settings.issuer + "/authorize", request.headers, params, [])
    try:
        await svc.server.consent_grant(check)
    except OAuth2Error as error:
        return _oauth_error(error.error, error.description or "The authorization request is invalid.")
    if problem := _check_extras(check.payload.data, params):
        return _oauth_error(*problem)
    request_uri, expires_in = await bridge.run(par.push, svc, client.client_id, params)
    return _json({"request_uri": request_uri, "expires_in": expires_in}, 201, {"Cache-Control": "no-store"})


# -- token, revocation, introspection ------------------------------------------------------
async def _form_endpoint(request: Request, handler, dpop_jkt: str | None = None) -> Response:
    try:
        form = await read_form(request)
    except BadRequest as e:
        return _oauth_error("invalid_request", e.description, e.status)
    if repeated := _repeated(form):
        return _oauth_error("invalid_request", repeated)
    if unreadable := _unreadable_basic(request):
        return unreadable
    oauth_request = _oauth_request(request, [], form)
    oauth_request.dpop_jkt = dpop_jkt
    return await bridge.run(handler, oauth_request)


async def _proof_key(request: Request, uri: str, access_token: str | None = None) -> str | None:
    """The key of the request's DPoP proof (its jti's store write awaited)."""
    if "dpop" not in request.headers:
        return None
    return await bridge.run(dpop.proof_key, request.app.state.svc, request.headers, request.method, uri, access_token)


async def token(request: Request) -> Response:
    svc = request.app.state.svc
    grant = []

    def respond(oauth_request):
        grant.append(oauth_request.form.get("grant_type"))
        return svc.server.create_token_response(oauth_request)

    try:
        jkt = await _proof_key(request, svc.settings.issuer + "/token")
    except dpop.InvalidProof as e:
        response = _oauth_error(e.error, e.description)
    else:
        response = await _form_endpoint(request, respond, jkt)
    svc.metrics.token_request(grant[0] if grant else None, response)
    return response


async def revoke(request: Request) -> Response:
    server = request.app.state.svc.server
    return await _form_endpoint(request, lambda r: server.create_endpoint_response("revocation", r))


async def introspect(request: Request) -> Response:
    server = request.app.state.svc.server
    return await _form_endpoint(request, lambda r: server.create_endpoint_response("introspection", r))


# -- UserInfo ----------------------------------------------------------------------------
def _bearer(request: Request, form) -> str | None:
    scheme, token = _access_token(request, form)
    return token if scheme == "bearer" else None


def _access_token(request: Request, form) -> tuple[str, str | None]:
    """(scheme, token): a Bearer token (RFC 6750, header or form) or a DPoP one (RFC 9449 7.1, header only)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() in ("bearer", "dpop") and token.strip():
        return scheme.lower(), token.strip()
    return "bearer", dict(form).get("access_token")


async def userinfo(request: Request) -> Response:
    svc = request.app.state.svc
    scheme, token = _access_token(request, [])
    if not token and request.method == "POST":  # in the body (RFC 6750 2.2); with the header, a body is none of ours
        try:
            scheme, token = _access_token(request, await read_form(request))
        except BadRequest as e:
            return _oauth_error("invalid_request", e.description, e.status)
    if not token:  # RFC 6750 3.1: no credentials, no error code
        return Response(status_code=401, headers={"WWW-Authenticate": "Bearer", "Cache-Control": "no-store"})
    record = await bridge.run(svc.tokens.lookup, "at", token)
    bound = (record or {}).get("cnf", {}).get("jkt")
    challenge = ("DPoP" if bound else "Bearer") + ' error="invalid_token"'
    if record is None or not record.get("account") or scheme != ("dpop" if bound else "bearer"):
        return _oauth_error("invalid_token", "The access token is invalid or expired.", 401, {"WWW-Authenticate": challenge})
    if bound:
        try:
            jkt = await _proof_key(request, svc.settings.issuer + "/userinfo", token)
            if not (jkt and hmac.compare_digest(jkt, bound)):
                raise dpop.InvalidProof("Send a DPoP proof made with the key the token is bound to.")
        except dpop.InvalidProof as e:
            return _oauth_error(e.error, e.description, 401, {"WWW-Authenticate": dpop.challenge(e.description)})
    if "openid" not in record["scope"].split():
        return _oauth_error("insufficient_scope", "The token lacks the openid scope.", 403,
                            {"WWW-Authenticate": ("DPoP" if bound else "Bearer") + ' error="insufficient_scope", scope="openid"'})
    info = await run_in_threadpool(_userinfo, svc, record)
    if info is None:
        return _oauth_error("invalid_token", "The token is no longer valid: the account is disabled or its sessions "
                            "were ended.", 401, {"WWW-Authenticate": challenge})
    return _json(info, headers={"Cache-Control": "no-store"})


def _userinfo(svc, record):
    client = svc.server.query_client(record["client_id"])
    with svc.db.session() as session:
        account = session.get(Account, record["account"])
        if account is None or account.disabled or client is None or svc.tokens.ended(record):
            return None
        return claims.userinfo(account, record["scope"], claims.subject(account.id, client, svc.pairwise_salt))


# -- RP-initiated logout -------------------------------------------------------------------
async def logout(request: Request) -> Response:
    """OpenID Connect RP-Initiated Logout 1.0. A valid ``id_token_hint`` for the
    current session logs out at once; otherwise the user confirms (CSRF-safe).
    A redirect goes only to a URI registered for the client, never elsewhere."""
    svc = request.app.state.svc
    try:
        data = dict(read_query(request) + await read_form(request))
    except BadRequest as e:
        return error_page(request, "error.bad_request.title", "error.bad_request.detail", status=e.status)
    ui = data.get("ui_locales")  # RP-Initiated Logout 1.0 2: the portal's user's language
    hint = None
    if data.get("id_token_hint"):
        hint = _hint_subject(svc, data["id_token_hint"])
        if hint is None:
            return error_page(request, "error.logout.title", "error.logout.bad_hint", ui_locales=ui)
    client_id = data.get("client_id") or (hint or {}).get("aud")
    if hint and data.get("client_id") and data["client_id"] != hint.get("aud"):
        return error_page(request, "error.logout.title", "error.logout.client_mismatch", ui_locales=ui)
    client = await svc.server.client(client_id) if isinstance(client_id, str) else None
    target = data.get("post_logout_redirect_uri")
    if target and (client is None or target not in client.post_logout_redirect_uris):
        return error_page(request, "error.logout.title", "error.logout.bad_redirect", ui_locales=ui)
    session = await bridge.run(svc.sessions.get, get_cookie(request, login.SESSION_COOKIE))
    confirmed = request.method == "POST" and data.get("confirm") == "yes" and csrf_ok(request, data)
    hint_matches = bool(hint and session and client and hint.get("sid") == claims.public_sid(svc, session["sid"], client))
    if session and not (confirmed or hint_matches):
        return render(request, "logout_confirm.html", ui_locales=ui, client=client, target=target or "",
                      state=data.get("state", ""), client_id=client.client_id if client else "")
    frames = []
    if session:
        # Ending the session also sends the back-channel logout tokens, in the background.
        ended = await bridge.run(svc.sessions.end, session["sid"], svc.tokens)
        await svc.db.call(svc.audit.record, "logout", account_id=session["account"], username=session.get("username"),
                          client_id=client.client_id if client else None, **who(request), method="rp-initiated")
        if ended:
            frames = await run_in_threadpool(logout_.frontchannel_urls, svc, ended)
    if target:
        params = {"state": data["state"]} if data.get("state") else {}
        target = target + (("&" if "?" in target else "?") + urlencode(params) if params else "")
    if frames:
        response = login.frontchannel_page(request, frames, target, client, ui)
    elif target:
        response = RedirectResponse(target, status_code=303)
    else:
        response = render(request, "logged_out.html", ui_locales=ui, client=client)
    delete_cookie(request, response, login.SESSION_COOKIE)
    if session:  # a new browser token: a login left half done in another tab (a shared PC) ends here too
        set_cookie(request, response, CSRF_COOKIE, secrets.token_urlsafe(24))
    return response


# -- dynamic client registration (RFC 7591) and management (RFC 7592) ----------------------------
# Never taken from a client's own request: what the server assigns (RFC 7591
# 3.2.1), and our policy fields, which are the administrator's to give.
SERVER_ASSIGNED = ("client_id", "client_secret", "registration_access_token", "registration_client_uri",
                   "client_id_issued_at", "client_secret_expires_at")
POLICY = ("first_party", "minimum_acr", "allowed_factors", "access_token_lifetime", "refresh_token_lifetime")


def _own_metadata(body: dict) -> dict:
    """The metadata a client may set about itself."""
    return {k: v for k, v in body.items() if k not in SERVER_ASSIGNED + POLICY}


def _stated(svc, meta: dict) -> dict:
    """``meta`` naming the ID token algorithm the provider signs with for it: a client that names
    none reads the omission as RS256 (OpenID Connect Registration 1.0 2), and the provider's
    default is ES256 (SPEC P1), so the answer says so (RFC 7591 3.2.1) and the row keeps it."""
    return {"id_token_signed_response_alg": svc.settings.signing_alg, **meta}


def _registration_error(e: ClientError) -> Response:
    return _oauth_error(e.error, e.description)


async def register(request: Request) -> Response:
    svc = request.app.state.svc
    token = _bearer(request, [])
    if not token:
        return _oauth_error("invalid_token", "An initial access token is required.", 401, {"WWW-Authenticate": "Bearer"})
    try:
        meta = await read_json(request)
    except BadRequest as e:
        return _oauth_error("invalid_client_metadata", e.description, e.status)
    try:
        info = await run_in_threadpool(_register, svc, token, meta)
    except ClientError as e:
        return _registration_error(e)
    if info is None:
        return _oauth_error("invalid_token", "The initial access token is invalid, used or expired.", 401, {"WWW-Authenticate": 'Bearer error="invalid_token"'})
    await svc.db.call(svc.audit.record, "client.registered", client_id=info["client_id"], **who(request),
                      method="rfc7591")
    return _json(info, 201, {"Cache-Control": "no-store"})


def _register(svc, token, meta):
    now = dt.datetime.fromtimestamp(svc.clock(), dt.timezone.utc)
    meta = _stated(svc, validate_metadata(_own_metadata(meta)))
    with svc.db.session() as session:
        # Deleting the row is the claim: of two concurrent uses, one deletes it.
        claimed = session.execute(
            delete(InitialAccessToken).where(InitialAccessToken.token_hash == digest(token)).returning(InitialAccessToken.expires_at)
        ).scalar_one_or_none()
        if claimed is None or claimed < now:
            return None
        row, secret, reg = create_client(session, meta, with_registration_token=True, validated=True)
        return client_info(row, secret, reg, svc.settings.issuer)


async def manage_client(request: Request) -> Response:
    """RFC 7592: read, replace or delete a registration with its registration access token."""
    svc = request.app.state.svc
    token = _bearer(request, [])
    client_id = request.path_params["client_id"]
    body = None
    if request.method == "PUT":
        try:
            body = await read_json(request)
        except BadRequest as e:
            return _oauth_error("invalid_client_metadata", e.description, e.status)
    try:
        status, result = await run_in_threadpool(_manage, svc, request.method, client_id, token, body)
        svc.server.forget_client(client_id)
    except ClientError as e:
        return _registration_error(e)
    if status == 401:
        return _oauth_error("invalid_token", "The registration access token is invalid.", 401, {"WWW-Authenticate": 'Bearer error="invalid_token"'})
    if status == 204:
        await svc.db.call(svc.audit.record, "client.deleted", client_id=client_id, method="rfc7592")
        return Response(status_code=204)
    return _json(result, status, {"Cache-Control": "no-store"})


def _subjects(meta: dict) -> tuple:
    """How a client's subjects are made: public, or pairwise for a sector."""
    pairwise = meta.get("subject_type") == "pairwise"
    return pairwise, sector(meta) if pairwise else None


def _manage(svc, method, client_id, token, body):
    with svc.db.session() as session:
        row: Client | None = find(session, client_id)
        if row is None or not token or not row.registration_token_hash or not hmac.compare_digest(digest(token), row.registration_token_hash):
            return 401, None
        # RFC 7592 3 requires the token in every response, and only its hash is kept: each
        # request spends the token and hands out a new one (the client MUST discard the old).
        # Spent where it is still the one stored: of two requests with one token, one goes on.
        reg_token = new_secret()
        spent = session.execute(update(Client).where(Client.client_id == client_id,
                                                     Client.registration_token_hash == row.registration_token_hash)
                                .values(registration_token_hash=digest(reg_token)))
        if spent.rowcount != 1:
            return 401, None
        if method == "DELETE":
            session.delete(row)
            return 204, None
        if method == "PUT":
            if body.get("client_id") != client_id:
                raise ClientError("client_id in the body must match", "invalid_request")
            if "client_secret" in body and (not row.secret_hash or not hmac.compare_digest(digest(str(body["client_secret"])), row.secret_hash)):
                raise ClientError("client_secret does not match", "invalid_request")
            meta = _own_metadata(body)
            current = row.metadata_.get("token_endpoint_auth_method")
            # Omitted means unchanged: validate_metadata would default it to
            # client_secret_basic, locking a public or private_key_jwt client out.
            if meta.setdefault("token_endpoint_auth_method", current) != current:
                raise ClientError("token_endpoint_auth_method cannot change")
            # A sector_identifier_uri omitted stays too (the sector must not change), and its document
            # is read again: it must list the redirect URIs this update names (Registration 1.0 5).
            if "sector_identifier_uri" in row.metadata_:
                meta.setdefault("sector_identifier_uri", row.metadata_["sector_identifier_uri"])
            # The provider's own keys stay: the administrator's policy.
            updated = {**_stated(svc, validate_metadata(meta)),
                       **{k: row.metadata_[k] for k in POLICY if k in row.metadata_}}
            # A client that could move its sector after its users logged in would get another
            # client's pairwise subjects for them, its tokens' and refreshes' included.
            if _subjects(row.metadata_) != _subjects(updated):
                raise ClientError("subject_type, and a pairwise client's sector (the host of its sector_identifier_uri "
                                  "or of its redirect_uris), cannot change")
            row.metadata_ = updated
        return 200, client_info(row, reg_token=reg_token, issuer=svc.settings.issuer)


# The endpoints a relying party's back end calls, which answer JSON, errors included.
JSON_ENDPOINTS = {token, userinfo, introspect, revoke, pushed_authorization, register, manage_client}
