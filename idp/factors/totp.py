"""TOTP (SPEC A2): RFC 6238, SHA-1, 6 digits, 30 s, as Google and Microsoft
Authenticator generate them.

- A code is good one step either side of now (clock drift) and never twice:
  each used step is claimed atomically in the store, and a binding remembers
  its last step so older codes stay refused.
- A code that is right for a step further off (within ``otp_drift_minutes``)
  is still refused, but the user is told their phone's clock is off and how
  to correct it, instead of a bare "failed".
- Wrong codes count towards the same lockout as wrong passwords (seed 001).
- Binding shows a QR code that is good for that page only (a pending secret
  with an expiry, kept for the page's owner: the login transaction at forced
  binding, the account and its SSO session in the login settings); rebuilding
  it makes a new version and the old pending secret stops working; the binding
  counts only once the user proves a code. The secret is stored encrypted
  (``SecretBox``), bound to the account id.
"""

from __future__ import annotations

import hmac
import re

import pyotp
import segno
from sqlalchemy import bindparam, delete, update

from idp.factors import Outcome, locked_out, plain
from idp.storage.kv import Batch
from idp.storage.models import Account, Binding
from idp.web.pages import who

STEP = 30
WINDOW = 1  # steps either side accepted
PENDING_SECONDS = 600
CODE = re.compile(r"[0-9]{6}")


def _at(secret: str, step: int) -> str:
    return pyotp.TOTP(secret).at(step * STEP)


def match(secret: str, code: str, now: float, drift_minutes: int) -> int | None:
    """The offset in steps at which ``code`` is right, searching outwards from now."""
    here = int(now // STEP)
    for distance in range(0, drift_minutes * 60 // STEP + 1):
        for offset in {distance, -distance}:
            if hmac.compare_digest(_at(secret, here + offset), code):
                return offset
    return None


def uri(secret: str, username: str, issuer: str, version: int) -> str:
    """The otpauth:// URI; the label carries the version, so the app shows which QR it holds."""
    return pyotp.TOTP(secret).provisioning_uri(name=f"{username} (v{version})", issuer_name=issuer)


def qr_svg(text: str) -> str:
    return segno.make(text, error="m").svg_inline(scale=5, title="QR code")


class TotpFactor:
    name = "otp"
    amr = ["otp"]
    first = False
    possession = True
    template = "factor_otp.html"

    def enabled(self, svc) -> bool:
        return True

    def bound(self, account) -> bool:
        return any(b.factor == self.name for b in account.bindings)

    def context(self, svc, tx, account) -> dict:
        binding = next((b for b in account.bindings if b.factor == self.name), None)
        return {"version": binding.data.get("version", 1) if binding else None}

    async def verify(self, request, svc, tx, form, account) -> Outcome:
        code = plain(form.get("otp"))
        if not CODE.fullmatch(code):
            return Outcome(error="otp.malformed")
        seen = {**who(request), "client_id": tx["client_id"], "method": self.name}
        binding = next((b for b in account.bindings if b.factor == self.name), None)
        return await svc.db.call(check_code, svc, tx, code, seen, binding, account.id)


# Written on every login: a statement built once (``Database.write``).
_LAST_STEP = update(Binding).where(Binding.id == bindparam("binding")).values(data=bindparam("data"))


def check_code(svc, tx, code, seen, binding, claim: str) -> Outcome:
    """Check ``code`` against ``binding`` (the account's OTP app, or one of its push apps:
    SPEC A5; None: not bound); a used step is claimed under ``claim``."""
    username, lockout = tx["username"], svc.lockout
    batch = Batch()  # the attempt's count and the code's claim: one round trip
    lockout.count(username, batch)
    if binding is not None:
        now = svc.clock()
        secret = svc.box.open(binding.data["secret"], tx["account"])
        offset = match(secret, code, now, svc.settings.otp_drift_minutes)
        step = int(now // STEP) + (offset or 0)
        if offset is not None and abs(offset) <= WINDOW and step > binding.data.get("last_step", -1):
            # The atomic claim: of two requests with the same code, one wins (against a lock, the
            # step is spent unused, as it soon would be anyway).
            batch.claim(f"otp-used:{claim}:{step}", STEP * (2 * WINDOW + 2))
    lock, attempt, *claimed = svc.store.write(batch)
    until, attempt = lockout.counted(username, lock, attempt)
    if until:
        return locked_out(svc, until, tx["account"], username, seen)
    if binding is None:
        return Outcome(error="otp.not_bound")
    if claimed and claimed[0]:
        try:
            svc.db.write(_LAST_STEP, binding=binding.id, data={**binding.data, "last_step": step})
        except Exception:  # the provider's failure (its database away), not a guess: the attempt
            lockout.release(username)  # is given back, and the code, unused, works once it is back
            svc.store.delete(f"otp-used:{claim}:{step}")
            raise
        writes = Batch()  # sent with the login's next write
        lockout.release(username, writes)
        return Outcome(account_id=tx["account"], writes=writes)

    if offset is not None and abs(offset) > WINDOW:
        lockout.release(username)  # a right code from a drifted clock is not a guess
        if offset > 0:
            # Its step is spent now: the answer says it matched, and a guess that hit a step
            # still to come must not be sent again when that step comes.
            svc.store.set(f"otp-used:{claim}:{step}", {}, STEP * (offset + 2 * WINDOW + 2), only_new=True)
        minutes = round(offset * STEP / 60)
        svc.audit.record("login.otp_drift", account_id=tx["account"], username=username, drift_minutes=minutes, **seen)
        return Outcome(error="otp.drift_ahead" if minutes > 0 else "otp.drift_behind", params={"minutes": abs(minutes)})
    svc.audit.record("login.failure", account_id=tx["account"], username=username, **seen)
    if attempt >= lockout.threshold:
        return locked_out(svc, lockout.lock(username), tx["account"], username, seen)
    error = "otp.reused" if offset is not None else "otp.wrong"
    return Outcome(error=error, params={"left": lockout.threshold - attempt})


# -- binding -------------------------------------------------------------------------
class Enrolment:
    """A pending OTP secret, shown as a QR code on one page, versioned.

    Kept per ``owner``, the page's (the login transaction at forced binding; in the login
    settings the account in its SSO session, ``idp.web.account.session_owner``), never per
    account alone: a browser that read the QR and was then logged out (other sessions ended,
    bindings reset) must not know the secret the owner's next page shows and binds.
    Another owner gets a new secret."""

    def __init__(self, svc):
        self.svc = svc

    def _key(self, account_id: str, owner: str) -> str:
        return f"otp-pending:{account_id}:{owner}"

    def current(self, account_id: str, owner: str) -> dict | None:
        pending = self.svc.store.get(self._key(account_id, owner))
        if pending is None or pending["exp"] < self.svc.clock():
            return None
        return pending

    def start(self, account, owner: str, *, rebuild: bool = False) -> dict:
        """The pending secret for this page; ``rebuild`` replaces it with a new version."""
        pending = None if rebuild else self.current(account.id, owner)
        if pending is None:
            pending = {
                "secret": self.svc.box.seal(pyotp.random_base32(), account.id),
                "version": self._next_version(account.id),
                "exp": self.svc.clock() + PENDING_SECONDS,
            }
            self.svc.store.set(self._key(account.id, owner), pending, PENDING_SECONDS + 60)
        return pending

    def _next_version(self, account_id: str) -> int:
        with self.svc.db.session() as session:
            account = session.get(Account, account_id, with_for_update=True)
            account.otp_version += 1
            return account.otp_version

    def page(self, account, pending: dict) -> dict:
        secret = self.svc.box.open(pending["secret"], account.id)
        link = uri(secret, account.username, self.svc.settings.otp_issuer, pending["version"])
        grouped = " ".join(secret[i:i + 4] for i in range(0, len(secret), 4))
        return {"qr": qr_svg(link), "secret": grouped, "version": pending["version"]}

    def confirm(self, account_id: str, owner: str, code: str) -> str | None:
        """Bind ``owner``'s pending secret if ``code`` is right now; returns an error key or None."""
        pending = self.current(account_id, owner)
        if pending is None:
            return "otp.qr_expired"
        error, step = binding_code(self.svc, self.svc.box.open(pending["secret"], account_id), code, "otp.wrong_binding")
        if error:
            return error
        if self.svc.store.take(self._key(account_id, owner)) is None:
            return "otp.qr_expired"  # confirmed meanwhile by another request
        try:
            with self.svc.db.session() as session:
                # The old secret stops working. Of two pages' QR codes confirmed at once, the second
                # waits for the account's row, then its DELETE (one statement, not a read and a
                # delete: SQLite has no row locks) removes the first one's binding.
                session.get(Account, account_id, with_for_update=True)
                session.execute(delete(Binding).where(Binding.account_id == account_id, Binding.factor == TOTP.name))
                session.add(Binding(account_id=account_id, factor=TOTP.name, label=f"v{pending['version']}",
                                    data={"secret": pending["secret"], "version": pending["version"], "last_step": step}))
        except Exception:  # not bound (the database away): the QR already scanned still binds once it is back
            self.svc.store.set(self._key(account_id, owner), pending, int(pending["exp"] - self.svc.clock()) + 60)
            raise
        self.svc.store.set(f"otp-used:{account_id}:{step}", {}, STEP * (2 * WINDOW + 2))
        return None


def binding_code(svc, secret: str, code: str, wrong: str) -> tuple[str | None, int | None]:
    """A code typed to prove a new binding's secret (an OTP app's, a push app's):
    (error key, None), ``wrong`` when it does not match, or (None, its TOTP step)."""
    code = plain(code)
    if not CODE.fullmatch(code):
        return "otp.malformed", None
    now = svc.clock()
    offset = match(secret, code, now, svc.settings.otp_drift_minutes)
    if offset is None:
        return wrong, None
    if abs(offset) > WINDOW:
        return "otp.drift_binding", None
    return None, int(now // STEP) + offset


TOTP = TotpFactor()
