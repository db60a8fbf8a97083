"""The receiving end of OpenID Connect Back-Channel Logout 1.0.

The provider POSTs a signed logout token when the user's single sign-on
session ends (logged out at another portal, at the provider, or by an
administrator). The portal keeps its sessions in a signed cookie it cannot
reach from here, so it remembers which provider sessions (``sid``) ended, and
``EndedSessions`` clears a portal session belonging to one on its next request.
The same record holds the portal sessions logged out at the portal itself (by
the id each gets at login): clearing the browser's cookie leaves any copy of
it valid, and the provider may send no logout token at all (its own session
over already, or not reachable). In memory: right for these one-process demos;
a portal with several processes would keep these records in a shared store.
"""

from __future__ import annotations

import logging
import threading
import time

from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from starlette.responses import JSONResponse, Response

log = logging.getLogger(__name__)

EVENT = "http://schemas.openid.net/event/backchannel-logout"
ALGORITHMS = ["ES256", "RS256"]
MAX_AGE = 300  # a logout token older than this (by iat) is refused
LEEWAY = 60  # clock skew allowed between provider and portal
SESSION_SECONDS = 8 * 3600  # a portal session's life from its login, however used; a record outlives it


class LogoutTokenError(ValueError):
    pass


def for_this_portal(aud, client_id: str) -> bool:
    """Whether a token's ``aud`` is this portal alone (a string or a list of one): it trusts
    no other audience (OIDC Core 3.1.3.7 step 3), and a token for several could be any
    of theirs to use (Back-Channel Logout 2.6 checks aud as for ID tokens)."""
    return aud in (client_id, [client_id])


class Ended:
    """Ended provider sessions (by sid), subjects logged out everywhere (by sub,
    with the time), portal sessions logged out here (by their id), and the
    logout tokens already used (by jti)."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self._sids: dict[str, float] = {}  # sid -> remembered until
        self._ids: dict[str, float] = {}  # portal session id -> remembered until
        self._subs: dict[str, tuple[float, float]] = {}  # sub -> (sessions begun before this ended, remembered until)
        self._jtis: dict[str, float] = {}  # jti -> remembered until
        self._lock = threading.Lock()

    def _gc(self, now):
        for table in (self._sids, self._ids, self._jtis):
            for key in [k for k, until in table.items() if until < now]:
                del table[key]
        for sub in [s for s, (_, until) in self._subs.items() if until < now]:
            del self._subs[sub]

    def use_jti(self, jti: str) -> bool:
        """True the first time a jti is seen."""
        with self._lock:
            now = self.clock()
            self._gc(now)
            if jti in self._jtis:
                return False
            self._jtis[jti] = now + MAX_AGE + LEEWAY
            return True

    def end(self, sid: str | None, sub: str | None, iat: float) -> None:
        with self._lock:
            until = self.clock() + SESSION_SECONDS
            if sid:
                self._sids[sid] = until
            elif sub:  # no sid: every session of sub that began before the token
                self._subs[sub] = (max(iat, self._subs.get(sub, (0, 0))[0]), until)

    def log_out(self, session_id: str) -> None:
        """A portal session logged out at the portal. Its provider sid is not recorded: a
        later login by single sign-on at this portal gets the same one."""
        with self._lock:
            now = self.clock()
            self._gc(now)
            self._ids[session_id] = now + SESSION_SECONDS

    def has_ended(self, session: dict) -> bool:
        """Whether a logged-in portal session is over (a session without a login is not)."""
        if "user" not in session:
            return False
        user = session["user"]
        with self._lock:
            # Its cookie slides with each answer; its login does not. So no session outlives a record.
            if self.clock() - session.get("logged_in_at", 0) > SESSION_SECONDS:
                return True
            if session.get("id") in self._ids or (user.get("sid") and user["sid"] in self._sids):
                return True
            since, _ = self._subs.get(user.get("sub"), (None, None))
            return since is not None and session.get("logged_in_at", 0) <= since


def validate(token: str, keys: KeySet, issuer: str, client_id: str, now: float) -> dict:
    """Back-Channel Logout 1.0 section 2.6, in its order; returns the claims."""
    try:
        decoded = jwt.decode(token, keys, algorithms=ALGORITHMS)
    except (JoseError, ValueError) as exc:
        raise LogoutTokenError(f"signature: {type(exc).__name__}") from None
    if decoded.header.get("typ") != "logout+jwt":
        raise LogoutTokenError("typ is not logout+jwt")
    c = decoded.claims
    aud = c.get("aud")
    if c.get("iss") != issuer:
        raise LogoutTokenError("wrong iss")
    if not for_this_portal(aud, client_id):
        raise LogoutTokenError("wrong aud")
    iat = c.get("iat")
    if not isinstance(iat, (int, float)) or iat > now + LEEWAY or iat < now - MAX_AGE:
        raise LogoutTokenError("iat missing or out of range")
    exp = c.get("exp")  # required (section 2.4)
    if not isinstance(exp, (int, float)) or exp < now - LEEWAY:
        raise LogoutTokenError("exp missing or passed")
    events = c.get("events")
    if not isinstance(events, dict) or not isinstance(events.get(EVENT), dict):
        raise LogoutTokenError("no back-channel logout event")
    if "nonce" in c:
        raise LogoutTokenError("a logout token has no nonce")
    if not (isinstance(c.get("sid"), str) or isinstance(c.get("sub"), str)):
        raise LogoutTokenError("neither sid nor sub")
    if not isinstance(c.get("jti"), str):
        raise LogoutTokenError("no jti")
    return c


def _kid(token: str) -> str | None:
    """The key the token names (a malformed one names none)."""
    try:
        kid = jws.extract_compact(token.encode()).headers().get("kid")
    except (JoseError, ValueError):
        return None
    return kid if isinstance(kid, str) else None


def _error(description: str, status=400) -> Response:
    return JSONResponse({"error": "invalid_request", "error_description": description}, status,
                        headers={"Cache-Control": "no-store"})


async def backchannel_logout(request):
    """POST /backchannel-logout: validate the logout token, end the sessions it names."""
    state = request.app.state
    async with request.form() as form:
        token = form.get("logout_token")
    if not isinstance(token, str) or not token:
        return _error("logout_token is missing")
    now = state.ended.clock()
    try:
        keys = await state.provider_keys.get(now, _kid(token))
        claims = validate(token, keys, state.issuer, state.client_id, now)
    except LogoutTokenError as exc:
        log.warning("back-channel logout refused: %s", exc)
        return _error(str(exc))
    except Exception as exc:  # noqa: BLE001 - the provider's JWKS unreachable: let it retry
        log.warning("back-channel logout: cannot check the token: %r", exc)
        return _error("cannot check the token now", 503)
    if not state.ended.use_jti(claims["jti"]):
        return _error("logout token replayed")
    state.ended.end(claims.get("sid"), claims.get("sub"), claims["iat"])
    log.info("back-channel logout for sid=%s", claims.get("sid"))
    return Response(status_code=200, headers={"Cache-Control": "no-store"})


class EndedSessions:
    """ASGI middleware (inside ``SessionMiddleware``): a portal session that is
    over (see ``Ended.has_ended``) is cleared before any route sees it."""

    def __init__(self, app, ended: Ended):
        self.app, self.ended = app, ended

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            session = scope.get("session")
            if session and self.ended.has_ended(session):
                session.clear()
        await self.app(scope, receive, send)
