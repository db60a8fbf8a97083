"""Login factors. Each module exposes one object with the same small interface:

- ``name``: its URL segment and binding name;
- ``amr``: the RFC 8176 method values a success adds;
- ``first``: whether it can start a login (it finds the account itself);
- ``possession``: whether it proves something the user has (a second factor,
  what forced binding, SPEC M1, asks for);
- ``template``: the page that asks for it;
- ``enabled(svc)``: whether the settings switch it on (mobile ID needs a service);
- ``bound(account)``: whether this account can use it;
- ``context(svc, tx, account)``: what its page shows (run inside ``idp.bridge.run``: the
  challenges it keeps in the store are awaited, not blocking the event loop); what it adds
  to ``tx`` is saved with the page;
- ``verify(request, svc, tx, form, account) -> Outcome`` (async): check the answer;
  ``account`` is the one proven so far, with its bindings (None before the first factor).

``idp.flow`` decides which of them a login still needs; adding a factor is
adding a module here and listing it in ``FACTORS``.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from dataclasses import dataclass, field

from idp.storage.kv import Batch

TAIPEI = dt.timezone(dt.timedelta(hours=8))


def plain(value: str | None) -> str:
    """A code or number as the user typed it, made plain: a zh-TW input method in full-width
    mode types "１２３", which NFKC makes "123"; spaces and the dashes a mail reader may add
    are dropped. Codes are then matched as ASCII digits alone ([0-9], never \\d)."""
    return re.sub(r"[\s-]", "", unicodedata.normalize("NFKC", value or ""))


@dataclass
class Outcome:
    account_id: str | None = None
    error: str | None = None  # message key shown to the user
    params: dict = field(default_factory=dict)
    keep: dict = field(default_factory=dict)  # form values to show again
    amr: list | None = None  # when this success proves other methods than the factor's ``amr``
    account: object | None = None  # the proven account with its bindings, when the factor read it (saves a read)
    writes: Batch | None = None  # store writes the login sends with its own next ones (the lockout's clearing)

    @property
    def ok(self) -> bool:
        return self.error is None and self.account_id is not None

    @classmethod
    def locked(cls, until: float, **keep) -> "Outcome":
        """The lockout message, with the time it ends in Taiwan time."""
        return cls(error="login.locked", params={"until": lock_ends(until).strftime("%H:%M")}, keep=keep)


def lock_ends(until: float) -> dt.datetime:
    """When a lock ends, in Taiwan time, rounded up to its minute: shown to the minute, a time
    rounded down would send the user back while the lock still holds."""
    return dt.datetime.fromtimestamp(-(-until // 60) * 60, TAIPEI)


def locked_out(svc, until: float, account_id: str | None, username: str, seen: dict, keep: dict | None = None) -> Outcome:
    """The answer to a login refused while its account is locked: audited as ``login.locked``
    (``seen``: the client, the address, the method), with the time the lock ends (and the
    form's values ``keep``)."""
    svc.audit.record("login.locked", account_id=account_id, username=username, **seen)
    return Outcome.locked(until, **(keep or {}))


def while_locked(svc, account_id: str, username: str, seen: dict, keep: dict | None = None) -> Outcome | None:
    """``locked_out``'s answer while the account is locked, else None: every factor asks before
    it sends anything to the user's phone and before it lets a login through, whichever factor
    made the wrong answers that locked it."""
    if until := svc.lockout.locked_until(username):
        return locked_out(svc, until, account_id, username, seen, keep)
    return None


class Fatigue:
    """Requests sent to a person's phone that nobody approved, in a row (push fatigue): past
    ``limit`` of them, more are refused until ``lockout_seconds`` after the first; only an
    approval starts the count again. A denial counts like no answer, or someone pushing for
    ever would only need the user to keep saying no."""

    def __init__(self, name: str):
        self.unanswered = name + "-unanswered:"  # account -> requests in a row nobody approved
        self.paused = name + "-paused:"          # account -> until when requests are refused

    def refuses(self, svc, account_id: str, limit: int) -> bool:
        """Count this request; whether too many in a row went unapproved (by the injected clock,
        like every expiry that matters)."""
        now, seconds = svc.clock(), svc.settings.lockout_seconds
        paused = svc.store.get(self.paused + account_id)
        if paused is not None and paused["until"] > now:
            return True
        if paused is not None:  # the pause is over: count again from zero
            svc.store.delete(self.paused + account_id, self.unanswered + account_id)
        if svc.store.incr(self.unanswered + account_id, seconds) <= limit:
            return False
        svc.store.set(self.paused + account_id, {"until": now + seconds}, seconds + 60, only_new=True)
        return True

    def give_back(self, svc, account_id: str) -> None:
        """Uncount a request that never reached the phone (the service was down)."""
        svc.store.incr(self.unanswered + account_id, svc.settings.lockout_seconds, by=-1)

    def approved(self, svc, account_id: str) -> None:
        svc.store.delete(self.unanswered + account_id, self.paused + account_id)


def methods(account) -> list[dict]:
    """The binding table of the seeds (method, bound ✓/✗, since when)."""
    bound = {b.factor: b for b in account.bindings}
    rows = []
    for key, factor, offered in (("method.otp", "otp", True), ("method.push", "push", True),
                                 ("method.certificate", "certificate", True),
                                 ("method.google", "google", True), ("method.passkey", "passkey", True)):
        binding = bound.get(factor)
        rows.append({"key": key, "factor": factor, "bound": binding is not None, "offered": offered,
                     "since": binding.created_at if binding else None})
    rows.append({"key": "method.password_login_disabled", "factor": "password_login_disabled",
                 "bound": account.password_login_disabled, "offered": False, "since": None})
    return rows


from idp.factors.password import PASSWORD  # noqa: E402
from idp.factors.totp import TOTP  # noqa: E402
from idp.factors.one_day import ONE_DAY  # noqa: E402
from idp.factors.mobileid import MOBILEID  # noqa: E402
from idp.factors.certificate import CERTIFICATE  # noqa: E402
from idp.factors.federation import GOOGLE  # noqa: E402
from idp.factors.push import PUSH  # noqa: E402
from idp.factors.passkey import PASSKEY  # noqa: E402
from idp.factors.tls_certificate import TLS_CERTIFICATE  # noqa: E402

# The order is the order of preference: a bound passkey is offered before OTP.
FACTORS = {f.name: f for f in (PASSWORD, PASSKEY, TOTP, PUSH, ONE_DAY, CERTIFICATE, TLS_CERTIFICATE, MOBILEID, GOOGLE)}
