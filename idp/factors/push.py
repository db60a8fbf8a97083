"""Push-approval app login (SPEC A5; seed 000, the IDExpert app; PROTOCOLS.md section 4).

A phone is *registered* from the settings page: the page shows a QR code
carrying a one-time URL (``push_registration_seconds``); the app makes an
ECDSA P-256 key pair and posts its public key to that URL, signed with the
new key; the provider answers with a TOTP secret for the app's 6-digit codes.
The user then types a name, a mobile number and the code the app shows, and
saves (the code proves the scan was theirs, not whoever reached the one-time
URL first): the phone becomes a
``Binding`` (factor ``push``, ``external_id`` the key's RFC 7638 thumbprint,
so one key binds once). An account may have several phones.

At *login*, after the password, the user picks one of their phones, then
either types the app's code (amr ``swk`` + ``otp``) or presses "push": the
provider records a request (application, account, local time, a two-digit
number shown on the login page), the app fetches it (``/push/device/poll``,
long-poll), shows it with three numbers, and the user picks the one the page
shows (number matching against push fatigue). The app's answer is signed by
the device key (amr ``swk``).

Decisions:

- **Every device message is a compact JWS (ES256)** by the device key, with
  ``aud`` (the endpoint's URL), ``iat`` (within ``SKEW``) and a ``jti`` that
  is claimed once per device: no cookies, no bearer secret to steal, and a
  replayed message is refused. Registration carries the new key in the JWS
  header (``jwk``), as ACME does, so it proves possession of the key.
- **Once-only** by the store's atomic operations: the registration code is
  ``take``-n, the answer of a request is ``set(..., only_new=True)`` and
  taken once by ``verify``. A request lives ``push_request_seconds``; an
  answer after that is refused.
- **Push fatigue**: a wrong number fails the request; more than
  ``push_max_unanswered`` pushes in a row not approved (unanswered, denied or
  the wrong number) refuse the next one until ``lockout_seconds`` after the
  first (the user can still type the code).
- **All state in the store** (registrations, requests, answers, counters),
  so any process serves the app and the browser alike; a process waiting on a
  long-poll looks at the store, never at its own memory.
- **A mobile push gateway** (FCM/APNs) is a deployment detail: the app's
  ``channel`` is kept with the device, and the app long-polls either way
  (``clients/authenticator/README.md``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets

import orjson
import pyotp
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from idp import bridge
from idp.factors import TAIPEI, Fatigue, Outcome, plain, while_locked
from idp.factors.totp import CODE, STEP, binding_code, check_code
from idp.storage.models import Binding
from idp.web.pages import who

NAME = "push"
PHONE = re.compile(r"09[0-9]{8}|8869[0-9]{8}")
SKEW = 300  # seconds a device's clock may be off
REGISTER_PATH, POLL_PATH, ANSWER_PATH = "/push/register", "/push/device/poll", "/push/device/answer"

REG = "push-reg:"                # sha256(one-time code) -> the account registering
# The settings page's registration in progress, and what its scan left. Each has one writer
# (the page, the app), so a scan that ends after the page cancelled or started again
# cannot bring the older registration back.
PENDING = "push-pending:"        # account -> the registration's code (written by the page)
SCANNED = "push-scanned:"        # account -> the key the app registered, for that code only
REQUEST = "push-req:"            # request id -> the login request
INBOX = "push-inbox:"            # device -> the request waiting for it
ANSWER = "push-answer:"          # request id -> its one answer
SEEN = "push-jti:"               # device:jti -> a device message already used
FATIGUE = Fatigue("push")

APPROVED, DENIED, WRONG_NUMBER = "approved", "denied", "wrong_number"


class DeviceError(Exception):
    """A device message refused: ``code`` for the app, ``status`` for HTTP."""

    def __init__(self, code: str, status: int = 400):
        super().__init__(code)
        self.code, self.status = code, status


def mask(phone: str) -> str:
    """0912345678 -> 0912***678: enough to tell one's phones apart."""
    return phone[:4] + "*" * (len(phone) - 7) + phone[-3:]


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def devices_of(account) -> list:
    return sorted((b for b in account.bindings if b.factor == NAME), key=lambda b: b.created_at)


# -- device messages ------------------------------------------------------------------------
def _public_key(jwk) -> ECKey:
    if not isinstance(jwk, dict) or jwk.get("kty") != "EC" or jwk.get("crv") != "P-256" or "d" in jwk:
        raise DeviceError("invalid_key")
    try:
        return ECKey.import_key({k: jwk[k] for k in ("kty", "crv", "x", "y")})
    except (JoseError, KeyError, ValueError, TypeError):
        raise DeviceError("invalid_key") from None


def read_message(svc, token: str, path: str) -> tuple[dict, dict, Binding | None]:
    """Verify a device's signed message for the endpoint ``path``: (payload, public JWK,
    the device's binding). Registration (``REGISTER_PATH``) carries its new key in the header."""
    try:
        header = jws.extract_compact(token.encode()).headers()
    except (JoseError, ValueError, TypeError, AttributeError):
        raise DeviceError("invalid_message") from None
    if header.get("alg") != "ES256":
        raise DeviceError("invalid_message")
    binding = None
    if path == REGISTER_PATH:
        jwk = header.get("jwk")
    else:
        binding = _device(svc, str(header.get("kid") or ""))
        if binding is None:
            raise DeviceError("unknown_device", 401)
        jwk = binding.data["jwk"]
    key = _public_key(jwk)
    try:
        payload = orjson.loads(jws.deserialize_compact(token, key, algorithms=["ES256"]).payload)
    except (JoseError, ValueError):
        raise DeviceError("invalid_signature", 401) from None
    if not isinstance(payload, dict) or payload.get("aud") != svc.settings.issuer + path:
        raise DeviceError("invalid_message")
    iat, jti = payload.get("iat"), payload.get("jti")
    if not isinstance(iat, (int, float)) or abs(iat - svc.clock()) > SKEW:
        raise DeviceError("clock_skew")
    if not isinstance(jti, str) or not 16 <= len(jti) <= 128:
        raise DeviceError("invalid_message")
    # Remembered longer than any iat is accepted (now +- SKEW), so a replay cannot outlive its jti.
    if not svc.store.set(f"{SEEN}{key.thumbprint()}:{jti}", {}, 2 * SKEW + 2, only_new=True):
        raise DeviceError("replayed", 409)
    return payload, key.as_dict(private=False), binding


def _device(svc, device_id: str) -> Binding | None:
    with svc.db.session() as session:
        binding = session.execute(
            select(Binding).where(Binding.factor == NAME, Binding.external_id == device_id)
        ).scalar_one_or_none()
        if binding is not None:
            session.expunge(binding)
        return binding


# -- registration (the settings page and the app) -------------------------------------------------
def start_registration(svc, account_id: str) -> dict:
    """A new one-time registration code for the settings page's QR (an older one stops working)."""
    old = svc.store.get(PENDING + account_id)
    if old:
        svc.store.delete(REG + _digest(old["code"]))
    ttl = svc.settings.push_registration_seconds
    code = secrets.token_urlsafe(24)
    pending = {"code": code, "exp": svc.clock() + ttl}
    # Kept as long as a scan at the last moment plus the time that scan gives to save.
    svc.store.set_many([(REG + _digest(code), {"account": account_id}, ttl),
                        (PENDING + account_id, pending, 2 * ttl + 60)])
    return {**pending, "device": None}


def current_registration(svc, account_id: str) -> dict | None:
    """The registration in progress: its ``code``, the scanning app's ``device`` (None
    before the scan) and its ``exp``; None when there is none or it expired."""
    pending, scanned = svc.store.get_many([PENDING + account_id, SCANNED + account_id])
    if pending is None:
        return None
    if scanned is None or not hmac.compare_digest(scanned["code"], _digest(pending["code"])):
        scanned = {"device": None, "exp": pending["exp"]}  # not scanned, or a scan of an older code
    current = {"code": pending["code"], "device": scanned["device"], "exp": scanned["exp"]}
    return current if current["exp"] >= svc.clock() else None


def cancel_registration(svc, account_id: str) -> None:
    pending = svc.store.take(PENDING + account_id)
    if pending:
        svc.store.delete(REG + _digest(pending["code"]), SCANNED + account_id)


def registration_url(svc, code: str) -> str:
    return f"{svc.settings.issuer}{REGISTER_PATH}?code={code}"


def register(svc, payload: dict, jwk: dict) -> dict:
    """The app scanned the QR: claim the code (once), keep its key with the page's
    registration, and give the app its OTP secret and endpoints."""
    code = payload.get("code")
    claimed = svc.store.take(REG + _digest(code)) if isinstance(code, str) else None
    pending = svc.store.get(PENDING + claimed["account"]) if claimed else None
    if pending is None or pending["exp"] < svc.clock() or not hmac.compare_digest(pending["code"], code):
        raise DeviceError("registration_expired", 410)
    device_id = _public_key(jwk).thumbprint()
    if _device(svc, device_id) is not None:
        raise DeviceError("registration_expired", 410)  # the seed's one message for both
    secret = pyotp.random_base32()
    channel = payload.get("channel") if isinstance(payload.get("channel"), str) else "poll"
    ttl = svc.settings.push_registration_seconds  # from the scan, as long again to type the name and number
    device = {"id": device_id, "jwk": jwk, "channel": channel[:512], "secret": svc.box.seal(secret, claimed["account"])}
    svc.store.set(SCANNED + claimed["account"], {"code": _digest(code), "device": device, "exp": svc.clock() + ttl},
                  ttl + 60)
    issuer = svc.settings.issuer
    return {"device": device_id, "issuer": issuer, "issuer_name": svc.settings.otp_issuer,
            "otp": {"secret": secret, "digits": 6, "period": STEP, "algorithm": "SHA1"},
            "endpoints": {"poll": issuer + POLL_PATH, "answer": issuer + ANSWER_PATH}}


def save_registration(svc, account_id: str, name: str, phone: str, code: str) -> str | None:
    """The page's 儲存: bind the scanned phone with its name and number once ``code``, the
    scanning app's current OTP, proves the user holds that app; an error key or None."""
    name, phone = (name or "").strip(), plain(phone)
    if not 1 <= len(name) <= 40:
        return "push.error.name"
    if not PHONE.fullmatch(phone):
        return "push.error.phone"
    pending = current_registration(svc, account_id)
    if pending is None:
        return "push.error.registration_expired"
    if not pending["device"]:
        return "push.error.not_scanned"
    device = pending["device"]
    # A wrong code keeps the registration, so the user can retry.
    error, step = binding_code(svc, svc.box.open(device["secret"], account_id), code, "push.error.code")
    if error:
        return error
    taken = svc.store.take(PENDING + account_id)
    if taken is None or taken["code"] != pending["code"]:
        return "push.error.registration_expired"  # saved, cancelled or started again meanwhile
    svc.store.delete(SCANNED + account_id)
    try:
        with svc.db.session() as session:
            session.add(Binding(account_id=account_id, factor=NAME, external_id=device["id"], label=name,
                                data={"phone": phone, "jwk": device["jwk"], "secret": device["secret"],
                                      "channel": device["channel"],
                                      # the code typed here is spent: login takes only a later one
                                      "last_step": step}))
    except IntegrityError:  # the same key saved to another account meanwhile
        return "push.error.registration_expired"
    return None


def remove(svc, account_id: str, binding_id: str) -> str | None:
    """Remove one of the account's phones; its name, or None when it has no such phone."""
    with svc.db.session() as session:
        binding = session.execute(select(Binding).where(
            Binding.id == binding_id, Binding.account_id == account_id, Binding.factor == NAME)).scalar_one_or_none()
        if binding is None:
            return None
        session.delete(binding)
        return binding.label


# -- login requests ------------------------------------------------------------------------------
def _numbers() -> tuple[int, list[int]]:
    """The number the login page shows, and the three the app offers (one of them it)."""
    choices = set()
    while len(choices) < 3:
        choices.add(10 + secrets.randbelow(90))
    choices = sorted(choices)
    return choices[secrets.randbelow(3)], choices


def _live(svc, request: dict | None) -> bool:
    """Whether a request may still be answered: not expired, and its login still going (a
    login cancelled, ended another way or expired takes its request with it)."""
    return (request is not None and request["exp"] >= svc.clock()
            and ("tx" not in request or svc.transactions.get(request["tx"]) is not None))


def pending_request(svc, device_id: str) -> dict | None:
    """What the app shows: the request waiting for this device, if any (without the number)."""
    inbox = svc.store.get(INBOX + device_id)
    request = svc.store.get(REQUEST + inbox["request"]) if inbox else None
    if not _live(svc, request) or svc.store.get(ANSWER + request["id"]) is not None:
        return None
    return {"id": request["id"], "application": request["application"], "account": request["username"],
            "time": request["time"], "choices": request["choices"], "expires_in": int(request["exp"] - svc.clock())}


def answer(svc, device: Binding, payload: dict) -> str:
    """The app's signed answer to a request: ``approved``, ``denied`` or ``wrong_number``, once."""
    shown = payload.get("request")
    rid = shown.get("id") if isinstance(shown, dict) else None
    request = svc.store.get(REQUEST + rid) if isinstance(rid, str) else None
    if not _live(svc, request):
        raise DeviceError("request_expired", 410)
    if request["device"] != device.external_id:
        raise DeviceError("unknown_request", 404)
    if (shown.get("application"), shown.get("account"), shown.get("time")) != (
            request["application"], request["username"], request["time"]):
        raise DeviceError("request_mismatch")  # signed over something else than what we asked
    decision = payload.get("decision")
    if decision not in ("approve", "deny"):
        raise DeviceError("invalid_message")
    if decision == "deny":
        result = DENIED
    else:
        right = hmac.compare_digest(str(payload.get("number")).encode(), str(request["number"]).encode())
        result = APPROVED if right else WRONG_NUMBER
    ttl = int(request["exp"] - svc.clock()) + 60
    record = {"result": result, "account": request["account"], "device": device.external_id, "at": svc.clock()}
    if not svc.store.set(ANSWER + rid, record, ttl, only_new=True):
        raise DeviceError("already_answered", 409)
    if result == APPROVED:
        FATIGUE.approved(svc, request["account"])
    # In the account's activity log: a wrong number or a denial may be someone else's login.
    svc.audit.record("push." + result, account_id=request["account"], username=request["username"],
                     client_id=request["client_id"], method=NAME, device=device.label)
    return result


class PushFactor:
    name = NAME
    amr = ["swk"]
    first = False
    possession = True
    template = "factor_push.html"

    def enabled(self, svc) -> bool:
        return True

    def bound(self, account) -> bool:
        return any(b.factor == self.name for b in account.bindings)

    def context(self, svc, tx, account) -> dict:
        devices = [{"id": b.id, "label": b.label, "phone": mask(b.data["phone"])} for b in devices_of(account)]
        state = tx.get("push")
        waiting = None
        if state:
            device = next((d for d in devices if d["id"] == state["device"]), None)
            waiting = {"number": state["number"], "device": device,
                       "remaining": max(0, int(state["exp"] - svc.clock()))}
        return {"devices": devices, "waiting": waiting, "chosen": state["device"] if state else None}

    # -- POST /login/push/start ------------------------------------------------------------------
    def start(self, request, svc, tx, account, form, application: str) -> Outcome:
        """Send a push to the chosen phone. An error Outcome, or an empty one when sent."""
        binding = next((b for b in devices_of(account) if b.id == form.get("device")), None)
        if binding is None:
            return Outcome(error="push.error.choose")
        seen = {**who(request), "client_id": tx["client_id"], "method": self.name}
        if (locked := while_locked(svc, account.id, account.username, seen, {"chosen": binding.id})) is not None:
            return locked
        self.drop(svc, tx)
        if FATIGUE.refuses(svc, account.id, svc.settings.push_max_unanswered):
            svc.audit.record("login.push_refused", account_id=account.id, username=account.username, **seen)
            return Outcome(error="push.error.too_many", params={"n": svc.settings.push_max_unanswered},
                           keep={"chosen": binding.id})
        now = svc.clock()
        number, choices = _numbers()
        rid = secrets.token_urlsafe(18)
        exp = now + svc.settings.push_request_seconds
        local = dt.datetime.fromtimestamp(now, TAIPEI).strftime("%Y-%m-%d %H:%M:%S")
        record = {"id": rid, "tx": tx["id"], "device": binding.external_id, "account": account.id,
                  "username": account.username,
                  "client_id": tx["client_id"], "application": application, "time": local, "number": number, "choices": choices, "exp": exp}
        ttl = svc.settings.push_request_seconds + 60
        svc.store.set_many([(REQUEST + rid, record, ttl), (INBOX + binding.external_id, {"request": rid}, ttl)])
        tx["push"] = {"request": rid, "device": binding.id, "number": number, "exp": exp}
        return Outcome()

    def drop(self, svc, tx) -> None:
        """Forget this login's request: a later answer to it finds nothing."""
        state = tx.pop("push", None)
        if state:
            svc.store.delete(REQUEST + state["request"])

    def status(self, svc, tx) -> str:
        """``none``, ``pending``, ``approved`` or the error key of a failed request."""
        state = tx.get("push")
        if not state:
            return "none"
        record = svc.store.get(ANSWER + state["request"])
        if record is not None:
            return APPROVED if record["result"] == APPROVED else "push.error." + record["result"]
        return "push.error.expired" if state["exp"] < svc.clock() else "pending"

    async def verify(self, request, svc, tx, form, account) -> Outcome:
        seen = {**who(request), "client_id": tx["client_id"], "method": self.name}
        if "otp" in form:  # the 【OTP 登入】 button: the chosen phone's app code
            code = plain(form.get("otp"))
            if not CODE.fullmatch(code):
                return Outcome(error="otp.malformed", keep={"chosen": form.get("device")})
            binding_id = str(form.get("device") or "")
            binding = next((b for b in account.bindings if b.factor == self.name and b.id == binding_id), None)
            outcome = await svc.db.call(check_code, svc, tx, code, seen, binding, binding_id)
            outcome.amr, outcome.keep = ["swk", "otp"], {"chosen": binding_id}
            if outcome.ok and tx.get("push"):
                # A push sent earlier in this login (the form as it was before 推播通知) is
                # decided now: the phone no longer asks about it, nor can approve it.
                await bridge.run(self.drop, svc, tx)
            return outcome
        if not tx.get("push"):
            return Outcome(error="push.error.no_request")
        return await svc.db.call(self._answered, svc, tx, seen)

    def _answered(self, svc, tx, seen) -> Outcome:
        """The phone's answer to this login's request, taken (it is used once); its store and
        audit calls awaited through ``svc.db.call``, not made on the event loop."""
        state = tx["push"]
        if (locked := while_locked(svc, tx["account"], tx["username"], seen, {"chosen": state["device"]})) is not None:
            self.drop(svc, tx)
            return locked
        status = self.status(svc, tx)
        if status == "pending":
            return Outcome(error="push.error.waiting")
        record = svc.store.take(ANSWER + state["request"])
        self.drop(svc, tx)
        if status != APPROVED or record is None or record["account"] != tx["account"]:
            error = status if status.startswith("push.error.") else "push.error.expired"
            svc.audit.record("login.failure", account_id=tx["account"], username=tx["username"], reason=error, **seen)
            return Outcome(error=error, keep={"chosen": state["device"]})
        return Outcome(account_id=tx["account"])


PUSH = PushFactor()
