"""Mobile natural-person certificate login (SPEC A4; seed 001 section 四, 行動自然人憑證).

The user types their national ID number and the captcha; the provider finds
the account bound to that number (``Account.national_id``), then asks the
mobile-ID service for *two* tickets of one login attempt: a push to the
phone (``requestAthOrSignPush``) and a QR code (``getSpTicket``, I-SCAN) for
"no push? scan instead". The page counts down from the tickets' expiry and
polls ``GET /login/mobileid/status`` (``idp.web.mobileid``); when one ticket
comes back verified, the page posts ``/login/factor/mobileid`` and
``verify`` hands the account to the login flow like any other factor.

Decisions:

- **amr** ``["hwk", "user"]`` (RFC 8176). ``hwk``: the certificate's key is
  held by the phone's secure hardware (the MOICA app keeps it in the
  keystore/secure element) and proven by its signature over our fresh
  ``sign_data``, verified with the certificate chained to MOICA, not revoked
  (``idp.pki``, as the card login);
  ``user``: the app signs only after the holder's biometric or device
  passcode (the seed's step 11). The flow adds ``mfa``; ``hwk`` is in
  ``acr.CERTIFICATE_AMR``, so the login earns ``urn:idp:loa:3`` and satisfies
  the two-factor policy alone, as the seed's "mobile certificate login" does.
- **first = True, possession = True**: it finds the account itself, and it
  is a bound second factor for an account that has a national ID number on
  file (offered for step-up to loa:3 after a password, too).
- **Switched off** when ``IDP_MOBILEID_URL`` is empty: ``enabled(svc)`` is
  False and the login flow does not offer the factor.
- **Captcha always**, whatever ``IDP_CAPTCHA`` says: each start sends a push
  to a person's phone given only their ID number (push fatigue); the seed's
  form has one. One answer per start.
- **Resolves once.** The first ticket that comes back verified claims the
  attempt atomically (``store.set(..., only_new=True)``); the other ticket is
  dropped and never polled again, and the claim is taken once by ``verify``.
  A result after the ticket's expiry is refused (the connector checks the
  deadline before polling and again when the answer lands).
- **No later surprise logout** (the seed's known bug): the tickets live only
  in this login attempt; the SSO session is made by the flow with its own
  lifetime and nothing about the tickets touches it afterwards.
- **Push fatigue**: starting needs only a person's ID number and a captcha, so
  more than ``mobileid_max_unanswered`` requests in a row not approved pause
  the requests to that account's phone for ``lockout_seconds`` (as the push
  app's, ``idp.factors.Fatigue``); a login by mobile ID starts the count again.
- **Failures** (denied on the phone, expired, an answer that does not
  verify) end the attempt: the page shows why and offers to try again with
  the number kept. An approval wins over a failure seen in the same poll
  (approved by QR, the late push then dismissed). A service that does not
  answer is asked again at the next poll, until the tickets' deadline. A push
  that cannot be sent while the QR ticket can still lets the user scan.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import secrets
from urllib.parse import urlsplit

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from idp import bridge, captcha
from idp.factors import Fatigue, Outcome, while_locked
from idp.factors.totp import qr_svg
from idp.mobileid import MobileIdConfig, MobileIdConnector, MobileIdError, Ticket, Verified, checksum
from idp.mobileid import errors as e
from idp.mobileid.config import TIME_LIMIT_RANGE
from idp.mobileid.national_id import InvalidNationalId, validate
from idp.storage.kv import Batch
from idp.settings import SettingsError
from idp.storage.models import Account
from idp.web.pages import who

log = logging.getLogger("idp.mobileid")

ATTEMPT = "mobileid:"         # the tickets of one attempt
WON = "mobileid-won:"         # the one verified result of an attempt, claimed atomically
FATIGUE = Fatigue("mobileid")  # a start needs only a national ID number and a captcha
PENDING, DONE, NONE = "pending", "done", "none"
FAILURES = {  # connector errors -> message keys
    e.Denied: "mobileid.denied",
    e.Expired: "mobileid.expired",
    e.ServiceUnavailable: "mobileid.unavailable",
    e.CertificateInvalid: "mobileid.certificate_invalid",
    e.RevocationUnavailable: "mobileid.revocation_unavailable",
}

try:  # the project depends on httpx2; plain httpx has the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx


def build_connector(svc) -> MobileIdConnector | None:
    """The connector of ``IDP_MOBILEID_*``; None when the URL is empty (the factor is off).
    The holder's certificate is checked by the card login's validator and revocation checker.
    A setting that cannot work is a SettingsError naming it (the web app builds this at start)."""
    settings = svc.settings
    if not settings.mobileid_url:
        return None
    _check_service_url(settings.mobileid_url)
    if not settings.mobileid_sp_service_id:
        raise SettingsError("IDP_MOBILEID_SP_SERVICE_ID must be set with IDP_MOBILEID_URL")
    try:
        key = checksum.parse_key(settings.mobileid_key)
    except ValueError as exc:
        raise SettingsError(f"IDP_MOBILEID_KEY: {exc}") from None
    low, high = TIME_LIMIT_RANGE
    if not low <= settings.mobileid_time_limit <= high:
        raise SettingsError(f"IDP_MOBILEID_TIME_LIMIT must be {low} to {high} seconds, not {settings.mobileid_time_limit}")
    config = MobileIdConfig(service_url=settings.mobileid_url, sp_service_id=settings.mobileid_sp_service_id,
                            key=key, time_limit=settings.mobileid_time_limit)
    trust = svc.trust_of("mobileid_trust") if settings.mobileid_trust else svc.pki_trust
    # No kept-alive connections: a pooled connection belongs to one event loop.
    http = httpx.AsyncClient(timeout=config.timeout, limits=httpx.Limits(max_keepalive_connections=0))
    return MobileIdConnector(config, trust=trust, revocation=svc.revocation, http=http, clock=svc.clock)


def _check_service_url(url: str) -> None:
    # A URL without scheme or host started and failed at the first mobile-ID login. The national
    # ID and the signed challenge travel to it: https, but for the demo's simulator on this computer.
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a bad port raises here
    except ValueError:
        parts = None
    if not parts or not parts.hostname or parts.scheme != "https" and not (
            parts.scheme == "http" and _loopback(parts.hostname)):
        raise SettingsError(f"IDP_MOBILEID_URL must be an https:// URL with a host (http:// only on this "
                            f"computer: localhost, 127.0.0.1, [::1]), not {url!r}")


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def seconds_left(svc, state: dict) -> int:
    """Whole seconds until the attempt's tickets expire (the page's countdown)."""
    return max(0, math.ceil(state["expires_at"] - svc.clock()))


def mask(nid: str) -> str:
    return nid[:3] + "****" + nid[-3:] if len(nid) == 10 else nid


class MobileIdFactor:
    name = "mobileid"
    amr = ["hwk", "user"]
    first = True
    possession = True
    template = "factor_mobileid.html"

    def enabled(self, svc) -> bool:
        return bool(svc.settings.mobileid_url)

    def bound(self, account) -> bool:
        # A personal credential: AA accounts log in with their organisation's card (A3).
        return bool(account.national_id) and account.kind != "aa"

    def context(self, svc, tx, account) -> dict:
        state = tx.get("mobileid")
        if state:
            record = svc.store.get(ATTEMPT + state["attempt"]) or {"tickets": {}}
            qr = record["tickets"].get("qr")
            remaining = seconds_left(svc, state)
            return {"waiting": True, "remaining": remaining, "qr": qr_svg(qr["sp_ticket"]) if qr else None,
                    "push_sent": "push" in record["tickets"], "masked_id": mask(state["national_id"]),
                    "poll_seconds": svc.mobileid.config.poll_interval}
        if not tx.get("captcha"):  # the form always has a captcha (see the module's note); saved with the page
            tx["captcha"] = captcha.new_answer()
        return {"waiting": False, "national_id": "", "time_limit": svc.settings.mobileid_time_limit}

    # -- starting: POST /login/mobileid/start ---------------------------------------------
    async def start(self, request, svc, tx, form) -> Outcome:
        """Send the push and make the QR ticket. An error Outcome, or an empty one when sent."""
        if tx.get("mobileid"):
            return Outcome()  # already waiting for this login: the page shows it
        raw = (form.get("national_id") or "")[:32]
        keep = {"national_id": raw.strip()}
        if not await bridge.run(captcha.take, svc, tx, form.get("captcha")):
            return Outcome(error="captcha.wrong", keep=keep)
        try:
            nid = validate(raw)
        except InvalidNationalId as exc:
            return Outcome(error="mobileid.id." + exc.reason, keep=keep)
        keep = {"national_id": nid}
        account = await run_in_threadpool(_by_national_id, svc, nid)
        seen = {**who(request), "client_id": tx["client_id"], "method": self.name}
        if account is None:
            await svc.db.call(svc.audit.record, "login.failure", username=mask(nid), reason="mobileid.unbound", **seen)
            return Outcome(error="mobileid.unbound", keep=keep)
        if tx.get("account") and tx["account"] != account.id:
            return Outcome(error="mobileid.other_person", keep=keep)
        if not self.bound(account):
            await svc.db.call(svc.audit.record, "login.failure", account_id=account.id, username=account.username,
                              reason="wrong_kind", **seen)
            return Outcome(error="mobileid.wrong_kind", keep=keep)
        if account.disabled:
            await svc.db.call(svc.audit.record, "login.disabled", account_id=account.id, username=account.username, **seen)
            return Outcome(error="login.disabled", keep=keep)
        if (locked := await svc.db.call(while_locked, svc, account.id, account.username, seen, keep)) is not None:
            return locked
        if await bridge.run(FATIGUE.refuses, svc, account.id, svc.settings.mobileid_max_unanswered):
            await svc.db.call(svc.audit.record, "login.push_refused", account_id=account.id, username=account.username,
                              **seen)
            return Outcome(error="mobileid.too_many", params={"n": svc.settings.mobileid_max_unanswered}, keep=keep)

        connector = svc.mobileid
        tickets, errors = {}, []
        for via, call in (("push", connector.request_push), ("qr", connector.get_sp_ticket)):
            try:
                tickets[via] = (await call(nid)).to_dict()
            except MobileIdError as exc:
                log.warning("mobile ID %s for %s could not start: %s", via, account.username, exc)
                errors.append(exc)
        if not tickets:
            await bridge.run(FATIGUE.give_back, svc, account.id)  # nothing reached the phone
            return Outcome(error=_message(errors[0]), keep=keep)
        attempt = secrets.token_urlsafe(18)
        expires_at = max(t["expires_at"] for t in tickets.values())
        ttl = int(expires_at - svc.clock()) + 120
        await bridge.run(svc.store.set, ATTEMPT + attempt, {"tx": tx["id"], "account": account.id, "tickets": tickets}, ttl)
        tx["mobileid"] = {"attempt": attempt, "national_id": nid, "account": account.id, "expires_at": expires_at}
        return Outcome()

    # -- polling: GET /login/mobileid/status, and verify --------------------------------------
    async def poll(self, svc, tx) -> str:
        """Where this login's attempt stands: ``none``, ``pending``, ``done`` or a message key
        (the attempt failed). Asks the service at most once per ticket per poll interval."""
        state = tx.get("mobileid")
        if not state:
            return NONE
        attempt = state["attempt"]
        won, record = await bridge.run(svc.store.get_many, [WON + attempt, ATTEMPT + attempt])
        if won is not None:
            return DONE
        if record is None or svc.clock() > state["expires_at"]:
            # The service's silence, if it never answered since, not the user's slowness.
            return "mobileid.unavailable" if record and record.get("unanswered") else "mobileid.expired"
        outcome, failed = PENDING, None
        for via in ("push", "qr"):
            data = record["tickets"].get(via)
            if data is None:
                continue
            ticket = Ticket.from_dict(data)
            try:
                result = await svc.mobileid.get_result(ticket)
            except e.AlreadyUsed:  # redeemed by another poll that did not get to claim it
                record["tickets"].pop(via)
                continue
            except e.ServiceUnavailable as exc:  # no answer is not a failure: asked again at the next poll
                log.warning("mobile ID %s for %s not polled: %s", via, state["national_id"][-4:], exc)
                record["tickets"][via] = ticket.to_dict()  # when it was last asked
                record["unanswered"] = True
                continue
            except MobileIdError as exc:  # the other ticket may hold an approval: it wins
                log.warning("mobile ID %s for %s failed: %s", via, state["national_id"][-4:], exc)
                failed = failed or _message(exc)
                continue
            record["tickets"][via] = ticket.to_dict()  # when it was last polled
            record.pop("unanswered", None)
            if isinstance(result, Verified):
                outcome = await bridge.run(self._claim, svc, state, record, via, result)
                break
        if outcome == PENDING and (failed or not record["tickets"]):
            outcome = failed or "mobileid.expired"
        ttl = int(state["expires_at"] - svc.clock()) + 120
        if outcome == PENDING:
            await bridge.run(svc.store.set, ATTEMPT + attempt, record, max(ttl, 1))
        else:
            await bridge.run(svc.store.delete, ATTEMPT + attempt)  # the other ticket is dropped: never polled again
        return outcome

    def _claim(self, svc, state, record, via, result: Verified) -> str:
        if result.national_id != state["national_id"]:
            return "mobileid.failed"
        won = {"via": via, "account": state["account"], "at": svc.clock(), "card_serial": result.card_serial}
        ttl = int(state["expires_at"] - svc.clock()) + 120
        svc.store.set(WON + state["attempt"], won, max(ttl, 60), only_new=True)  # the first one wins
        return DONE

    @staticmethod
    def _end(svc, attempt: str, done: bool):
        """The attempt's win (None when not ``done``, or taken already by another request of
        this login), taken, and its record dropped: one round trip."""
        batch = Batch()
        if done:
            batch.take(WON + attempt)
        batch.delete(ATTEMPT + attempt)
        return svc.store.write(batch)[0] if done else None

    def give_up(self, tx, error: str, writes: Batch) -> None:
        """End a failed attempt (its records dropped in ``writes``): the page shows ``error``
        above the form, the number kept."""
        state = tx.pop("mobileid", None) or {}
        if state:
            writes.delete(ATTEMPT + state["attempt"], WON + state["attempt"])
        tx["flash"] = {"error": error, "params": {}, "keep": {"national_id": state.get("national_id", "")}}

    async def verify(self, request, svc, tx, form, account) -> Outcome:
        """The page's "continue" (posted by its script once the status says done, or by hand)."""
        state = tx.get("mobileid")
        if not state:
            return Outcome(error="mobileid.no_request")
        outcome = await self.poll(svc, tx)
        if outcome == PENDING:
            return Outcome(error="mobileid.waiting")
        # Read before the approval is taken: a read that fails (the database away) leaves it
        # for the next "continue".
        account = await run_in_threadpool(_by_national_id, svc, state["national_id"]) if outcome == DONE else None
        won = await bridge.run(self._end, svc, state["attempt"], outcome == DONE)
        tx.pop("mobileid", None)
        seen = {**who(request), "client_id": tx["client_id"], "method": self.name}
        if won is None:  # failed, or used already by another request of this login
            error = outcome if outcome not in (DONE, NONE) else "mobileid.expired"
            await svc.db.call(svc.audit.record, "login.failure", account_id=state["account"],
                              username=mask(state["national_id"]), reason=error, **seen)
            return Outcome(error=error, keep={"national_id": state["national_id"]})
        if account is None or account.id != won["account"] or not self.bound(account):  # changed meanwhile
            return Outcome(error="mobileid.unbound", keep={"national_id": state["national_id"]})
        keep = {"national_id": state["national_id"]}
        if (locked := await svc.db.call(while_locked, svc, account.id, account.username, seen, keep)) is not None:
            return locked
        await bridge.run(FATIGUE.approved, svc, account.id)
        return Outcome(account_id=account.id)


def _message(exc: MobileIdError) -> str:
    for cls, key in FAILURES.items():
        if isinstance(exc, cls):
            return key
    return "mobileid.failed"


def _by_national_id(svc, nid: str) -> Account | None:
    with svc.db.session() as session:
        account = session.execute(select(Account).where(Account.national_id == nid)).scalar_one_or_none()
        if account is not None:
            session.expunge(account)
        return account


MOBILEID = MobileIdFactor()
