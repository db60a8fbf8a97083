"""Logging a session out at its relying parties (SPEC P6).

- **Back-channel** (OpenID Connect Back-Channel Logout 1.0): when a session
  ends, every client of the session that registered a
  ``backchannel_logout_uri`` is sent a signed logout token
  (``POST logout_token=...``), off the request path: deliveries run on one
  background event loop (its own thread), each with a timeout and a few
  retries with backoff. Outcomes are logged (never the token) and audited.
- **Front-channel** (OpenID Connect Front-Channel Logout 1.0): the logged-out
  page renders an invisible iframe per client that registered a
  ``frontchannel_logout_uri`` (``frontchannel_urls``).

The ``sid`` relying parties see is not the session cookie's value: it is an
HMAC of it under an instance secret (``claims.public_sid``), so an ID token, a logout
token or a front-channel URL never carries a credential for the session.

Durability: deliveries in flight live in the process that ended the session.
If that process dies mid-retry, the remaining attempts are lost (the token
is short-lived anyway, so a late delivery is worth little); relying parties
should also bound their local sessions by the ID token's lifetime or check
with ``prompt=none``. A durable queue in Redis is future work.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from idp.protocol import claims as claims_
from idp.protocol.claims import public_sid

try:  # the project depends on httpx2; plain httpx has the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

log = logging.getLogger("idp.logout")

EVENT = "http://schemas.openid.net/event/backchannel-logout"
TOKEN_TYPE = "logout+jwt"
TOKEN_SECONDS = 120  # long enough to cover every retry below, short enough to be worthless later
TIMEOUT_SECONDS = 5.0
RETRY_DELAYS = (1.0, 5.0, 20.0)  # after the first attempt: 4 attempts in about 45 s at worst


def logout_token(svc, client, account_id: str, sid: str) -> tuple[str, str]:
    """A logout token (Back-Channel Logout 1.0 section 2.4) and its ``jti``."""
    now = int(svc.clock())
    jti = secrets.token_urlsafe(16)
    body = {
        "iss": svc.settings.issuer,
        "aud": client.client_id,
        "iat": now,
        "exp": now + TOKEN_SECONDS,
        "jti": jti,
        "sub": claims_.subject(account_id, client, svc.pairwise_salt),
        "sid": public_sid(svc, sid),
        "events": {EVENT: {}},
    }
    alg = client.id_token_signed_response_alg or svc.settings.signing_alg
    return claims_.sign(svc.keys, alg, body, typ=TOKEN_TYPE), jti


def frontchannel_urls(svc, record: dict) -> list[str]:
    """The front-channel logout URLs of an ended session's clients (iss and sid
    added for the clients that require them)."""
    urls = []
    for client_id in record.get("clients", {}):
        client = svc.server.query_client(client_id)
        uri = client and client.metadata.get("frontchannel_logout_uri")
        if not uri:
            continue
        if client.metadata.get("frontchannel_logout_session_required"):
            parts = urlsplit(uri)
            query = parse_qsl(parts.query, keep_blank_values=True)
            query += [("iss", svc.settings.issuer), ("sid", public_sid(svc, record["sid"]))]
            uri = urlunsplit(parts._replace(query=urlencode(query)))
        urls.append(uri)
    return urls


@dataclass
class Delivery:
    client_id: str
    account_id: str
    uri: str
    token: str = field(repr=False)  # never logged
    jti: str = ""


class BackChannel:
    """Sends logout tokens in the background. ``session_ended`` is a
    ``Sessions`` listener: it signs the tokens at once (cheap) and hands the
    HTTP work to the background loop, so the caller never waits on a client."""

    def __init__(self, svc, timeout: float = TIMEOUT_SECONDS, delays: tuple[float, ...] = RETRY_DELAYS):
        self.svc, self.timeout, self.delays = svc, timeout, delays
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._pending: set = set()

    # -- what a session's end triggers ------------------------------------------------
    def session_ended(self, record: dict) -> list[Delivery]:
        deliveries = []
        for client_id in record.get("clients", {}):
            client = self.svc.server.query_client(client_id)
            uri = client and client.metadata.get("backchannel_logout_uri")
            if not uri:
                continue
            token, jti = logout_token(self.svc, client, record["account"], record["sid"])
            deliveries.append(Delivery(client_id, record["account"], uri, token, jti))
        for delivery in deliveries:
            self.submit(delivery)
        return deliveries

    def submit(self, delivery: Delivery) -> None:
        future = asyncio.run_coroutine_threadsafe(self.deliver(delivery), self._ensure_loop())
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    def wait(self, timeout: float = 30.0) -> None:
        """Block until the deliveries under way are done (tests, shutdown)."""
        for future in list(self._pending):
            future.result(timeout)

    # -- the background loop --------------------------------------------------------------
    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="idp back-channel logout", daemon=True).start()
                self._loop = loop
            return self._loop

    async def deliver(self, delivery: Delivery) -> bool:
        """POST the token, retrying on network errors and 5xx/429; a 4xx other
        than 429 is the client's final answer (Back-Channel Logout 2.8)."""
        attempts, outcome = 0, ""
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as http:
            for delay in (0.0, *self.delays):
                if delay:
                    await asyncio.sleep(delay)
                attempts += 1
                try:
                    response = await http.post(delivery.uri, data={"logout_token": delivery.token},
                                               headers={"Cache-Control": "no-store"})
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                else:
                    if 200 <= response.status_code < 300:
                        await self._record(delivery, True, attempts, f"HTTP {response.status_code}")
                        return True
                    outcome = f"HTTP {response.status_code}"
                    if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                        break
                log.warning("back-channel logout to client %s (%s) failed, attempt %d: %s",
                            delivery.client_id, delivery.uri, attempts, outcome)
        await self._record(delivery, False, attempts, outcome)
        return False

    async def _record(self, delivery: Delivery, ok: bool, attempts: int, outcome: str) -> None:
        if not ok:
            log.error("back-channel logout to client %s gave up after %d attempts: %s",
                      delivery.client_id, attempts, outcome)
        try:
            await asyncio.to_thread(
                self.svc.audit.record, "logout.backchannel" if ok else "logout.backchannel_failed",
                account_id=delivery.account_id, client_id=delivery.client_id, method="backchannel",
                attempts=attempts, outcome=outcome,
            )
        except Exception:  # noqa: BLE001 - an audit failure must not kill the loop
            log.exception("could not audit a back-channel logout")
