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
token or a front-channel URL never carries a credential for the session; a pairwise
client's is its sector's own.

Durability: every delivery is also a job in the short-lived store (Redis
when several processes share it) until it succeeds or gives up: the logout
token, the attempts made, and a lease (``lease``, on the provider's clock)
that the process working on it renews before each attempt and each wait
between attempts. Every process sweeps the jobs of the last few minutes
(``sweep``, every ``SWEEP_SECONDS`` on its background loop, also at start): a
job whose lease ran out belongs to a process that died (or hung), so the
sweeper claims it (``take`` is atomic: one claimant) and carries on from the
attempts already made. Nothing is lost when a process dies mid-retry; only a
crash between a claim's ``take`` and its ``set`` (two store calls, no I/O
between) could drop one job. A hung process that wakes up after losing its
lease may deliver a second time: relying parties reject a replayed ``jti``.
The token's own expiry ends a job: a late delivery is worth nothing.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from dataclasses import asdict, dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from idp.protocol import claims as claims_
from idp.protocol.claims import public_sid
from idp.storage.kv import Batch

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
JOB, QUEUE = "bcl:job:", "bcl:queue:"  # a delivery's job; the jtis enqueued in one BUCKET_SECONDS
BUCKET_SECONDS = 60
LEASE_MARGIN = 5.0  # seconds past an attempt's timeout before another process may take the job over
SWEEP_SECONDS = 5.0


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
        "sid": public_sid(svc, sid, client),
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
            query += [("iss", svc.settings.issuer), ("sid", public_sid(svc, record["sid"], client))]
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
    exp: float = 0.0  # the token's expiry: no attempt after it
    attempts: int = 0  # made so far, by whichever process


async def _cancel_all_then_stop() -> None:
    """End the loop's deliveries where they are (their jobs stay in the store) and stop it."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    asyncio.get_running_loop().stop()


class BackChannel:
    """Sends logout tokens in the background. ``session_ended`` is a
    ``Sessions`` listener: it signs the tokens at once (cheap), stores them as
    jobs and hands the HTTP work to the background loop, so the caller never
    waits on a client."""

    def __init__(self, svc, timeout: float = TIMEOUT_SECONDS, delays: tuple[float, ...] = RETRY_DELAYS):
        self.svc, self.timeout, self.delays = svc, timeout, delays
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._pending: set = set()
        self._inflight: set[str] = set()  # jtis this process is delivering: alive, so never "abandoned"

    # -- what a session's end triggers ------------------------------------------------
    def session_ended(self, record: dict) -> list[Delivery]:
        deliveries = []
        for client_id in record.get("clients", {}):
            client = self.svc.server.query_client(client_id)
            uri = client and client.metadata.get("backchannel_logout_uri")
            if not uri:
                continue
            token, jti = logout_token(self.svc, client, record["account"], record["sid"])
            deliveries.append(Delivery(client_id, record["account"], uri, token, jti, self.svc.clock() + TOKEN_SECONDS))
        for delivery in deliveries:
            self.enqueue(delivery)
            self.submit(delivery)
        return deliveries

    def enqueue(self, delivery: Delivery) -> None:
        """The job in the store, leased to this process for its first attempt (one round trip)."""
        now = self.svc.clock()
        batch = Batch()
        batch.set(*self._job(delivery, now + self.timeout + LEASE_MARGIN))
        batch.add(QUEUE + str(int(now // BUCKET_SECONDS)), delivery.jti, TOKEN_SECONDS + 2 * BUCKET_SECONDS)
        self.svc.store.write(batch)

    def _job(self, delivery: Delivery, lease: float) -> tuple[str, dict, int]:
        """The (key, value, ttl) of a delivery's job, leased until ``lease``."""
        ttl = max(1, int(delivery.exp - self.svc.clock())) + BUCKET_SECONDS
        return JOB + delivery.jti, {**asdict(delivery), "lease": lease}, ttl

    def submit(self, delivery: Delivery) -> None:
        self._inflight.add(delivery.jti)
        future = asyncio.run_coroutine_threadsafe(self.deliver(delivery), self._ensure_loop())
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        future.add_done_callback(lambda _: self._inflight.discard(delivery.jti))

    def wait(self, timeout: float = 30.0) -> None:
        """Block until the deliveries under way are done (tests, shutdown)."""
        for future in list(self._pending):
            future.result(timeout)

    # -- jobs other processes left -------------------------------------------------------
    def claim_abandoned(self) -> list[Delivery]:
        """Take over the jobs of the last minutes whose lease has run out."""
        now, store = self.svc.clock(), self.svc.store
        first = int((now - TOKEN_SECONDS) // BUCKET_SECONDS) - 1
        jtis = set().union(*(store.members(QUEUE + str(b)) for b in range(first, int(now // BUCKET_SECONDS) + 1)))
        jtis = sorted(jtis - self._inflight)
        claimed = []
        for jti, job in zip(jtis, store.get_many([JOB + jti for jti in jtis])):
            if job is None or job["lease"] > now:
                continue  # done, or someone is on it
            job = store.take(JOB + jti)
            if job is None:
                continue  # another process claimed it first
            delivery = Delivery(**{k: v for k, v in job.items() if k != "lease"})
            # Put back at once (a renewed lease stays); ours if it had run out.
            lease = job["lease"] if job["lease"] > now else now + self.timeout + LEASE_MARGIN
            store.set(*self._job(delivery, lease))
            if job["lease"] <= now:
                claimed.append(delivery)
        return claimed

    def sweep(self) -> int:
        """Carry on the abandoned jobs on the background loop; how many were taken over."""
        claimed = self.claim_abandoned()
        for delivery in claimed:
            log.warning("back-channel logout to client %s taken over after %d attempts elsewhere",
                        delivery.client_id, delivery.attempts)
            self.submit(delivery)
        return len(claimed)

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.sweep)
            except Exception:  # noqa: BLE001 - a store hiccup: try again at the next sweep
                log.exception("back-channel logout sweep failed")
            await asyncio.sleep(SWEEP_SECONDS)

    # -- the background loop --------------------------------------------------------------
    def start(self) -> None:
        """Start the background loop (and its sweeps) now, not at the first logout."""
        self._ensure_loop()

    def stop(self) -> None:
        """Stop the background loop; the jobs it leaves are another process's to finish."""
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            asyncio.run_coroutine_threadsafe(_cancel_all_then_stop(), loop)

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="idp back-channel logout", daemon=True).start()
                asyncio.run_coroutine_threadsafe(self._sweep_forever(), loop)
                self._loop = loop
            return self._loop

    async def deliver(self, delivery: Delivery) -> bool:
        """POST the token, retrying on network errors and 5xx/429; a 4xx other
        than 429 is the client's final answer (Back-Channel Logout 2.8). The job's
        lease is renewed before each wait and each attempt."""
        delays, outcome = (0.0, *self.delays), ""
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as http:
            while delivery.attempts < len(delays):
                delay = delays[delivery.attempts]
                if delay:
                    lease = self.svc.clock() + delay + self.timeout + LEASE_MARGIN
                    await asyncio.to_thread(self.svc.store.set, *self._job(delivery, lease))
                    await asyncio.sleep(delay)
                if self.svc.clock() > delivery.exp:
                    outcome = outcome or "token expired"
                    break
                delivery.attempts += 1
                try:
                    # The whole attempt within the timeout the lease counts on (httpx's applies
                    # to each of connect, write and read).
                    async with asyncio.timeout(self.timeout):
                        response = await http.post(delivery.uri, data={"logout_token": delivery.token},
                                                   headers={"Cache-Control": "no-store"})
                except (httpx.HTTPError, TimeoutError) as exc:
                    outcome = type(exc).__name__
                else:
                    if 200 <= response.status_code < 300:
                        await self._record(delivery, True, delivery.attempts, f"HTTP {response.status_code}")
                        return True
                    outcome = f"HTTP {response.status_code}"
                    if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                        break
                log.warning("back-channel logout to client %s (%s) failed, attempt %d: %s",
                            delivery.client_id, delivery.uri, delivery.attempts, outcome)
        await self._record(delivery, False, delivery.attempts, outcome)
        return False

    async def _record(self, delivery: Delivery, ok: bool, attempts: int, outcome: str) -> None:
        await asyncio.to_thread(self.svc.store.delete, JOB + delivery.jti)  # done, either way
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
