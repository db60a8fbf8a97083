"""One-day password (SPEC A7, seed 004: the commerce portal's 一日密碼登入).

An administrator enables it for an account (the admin page, or ``idp users
one-day-password USERNAME``): ``enable`` mails a random 8-digit check code to
the account's address; the account keeps only the code's SHA-256 and the day
it is good for, in Taiwan time. That day the login page's "一日密碼登入" form
takes the account, the password, the check code and an image captcha.

Decisions:

- **Good all that day, not once.** The seed names it a one-day password: the
  user may log in several times that day (another portal, a session that
  ended). It ends at 24:00 Taiwan time (``day_ends``), and so do the single
  sign-on of the sessions it made (``flow.within_day``) and the grants of the
  logins it is part of, refresh tokens included (``flow.login_ends``): a
  portal cannot keep refreshing for a month on a credential good for a day.
  It is never useful alone: the
  password, the captcha and the lockout stand in front of it. Enabling it
  again mails a new code and the old one stops working.
- **amr** ``["pwd", "otp"]`` (RFC 8176: a password and a one-time password);
  the flow adds ``mfa``, so the login earns ``urn:idp:loa:2`` and satisfies
  the two-factor policy for that login (no forced binding that day).
- **possession = False.** The code proves access to a mailbox, not
  possession of a bound device (NIST SP 800-63B 5.1.3.1 rules email out as
  an out-of-band authenticator). So it is not a "bound second factor": it is
  never offered as the step after a password or for a step-up (it is a form
  of its own that proves the password too: ``bound`` is always False), it does
  not exempt a password login from forced binding (M1), and it does not count
  as the re-verification the account and admin areas ask for (M2).
- **Password and lockout** as the password factor: the same per-username
  counter, an attempt reserved before the password is checked, the password
  checked by ``PasswordFactor._verify`` (argon2 off the event loop, old hashes
  upgraded). A wrong, expired or missing code is a wrong answer and counts
  towards the same lockout. What is wrong with the code is said only once
  the password is right, so the form tells nothing more than the password
  form does.
- **Captcha always**, whatever ``IDP_CAPTCHA`` says (the seed's form has one):
  the page sets the login transaction's answer itself when the login page
  did not.
- The form proves the password, so it records the password step too: an
  expired password (or an administrator's initial password) must still be
  changed after a one-day login.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets

from starlette.concurrency import run_in_threadpool

from idp import bridge, captcha
from idp.factors import TAIPEI, Outcome, locked_out, plain
from idp.factors.password import PASSWORD
from idp.mail import MailError
from idp.storage.kv import Batch
from idp.storage.models import Account
from idp.web.pages import who

DIGITS = 8
CODE = re.compile(rf"[0-9]{{{DIGITS}}}")
_NO_CODE = "0" * 64  # compared against when the account has no code, so the timing is the same


def today(now: float) -> dt.date:
    """The date in Taiwan: a code is good until midnight there."""
    return dt.datetime.fromtimestamp(now, TAIPEI).date()


def day_ends(proven: float) -> float:
    """When a one-day password proven at ``proven`` stops proving anything: the next midnight in Taiwan."""
    return dt.datetime.combine(today(proven) + dt.timedelta(days=1), dt.time(), TAIPEI).timestamp()


def digest(svc, account_id: str, code: str) -> str:
    """Keyed with an instance secret and the account: an 8-digit code's plain hash could be
    brute-forced from a database dump alone."""
    return hmac.new(svc.code_key, f"{account_id}:{code}".encode(), hashlib.sha256).hexdigest()


def usable_today(account: Account, now: float) -> bool:
    return bool(account.one_day_code_hash) and account.one_day_valid_on == today(now)


class OneDayError(ValueError):
    """The account cannot get a one-day password: ``reason`` is ``no_account``,
    ``no_email``, ``disabled`` or ``no_password`` (messages ``admin.error.<reason>``)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def enable(svc, account_id: str, locale: str | None = None) -> dict:
    """Give the account a new check code for today (Taiwan time) and mail it.

    Blocks while the mail is sent (call it from a thread). Returns the
    account's ``username``, ``email`` and the ``day``; never the code. Raises
    ``OneDayError`` when the account cannot use it (no email, disabled, no
    password login) and ``idp.mail.MailError`` when the mail was not taken,
    in which case the account keeps the code it had."""
    code = f"{secrets.randbelow(10 ** DIGITS):0{DIGITS}d}"
    day = today(svc.clock())
    with svc.db.session() as session:
        account = session.get(Account, account_id)
        if account is None:
            raise OneDayError("no_account")
        if not account.email:
            raise OneDayError("no_email")
        if account.disabled:
            raise OneDayError("disabled")
        if not account.password_hash or account.password_login_disabled:
            raise OneDayError("no_password")
        previous = (account.one_day_code_hash, account.one_day_valid_on)
        account.one_day_code_hash, account.one_day_valid_on = digest(svc, account_id, code), day
        info = {"username": account.username, "email": account.email, "name": account.name or account.username, "day": day}
    try:
        svc.mailer.send(info["email"], "one_day_code", locale or svc.settings.default_locale, name=info["name"],
                        username=info["username"], code=code, day=day.isoformat(), digits=DIGITS)
    except MailError:
        with svc.db.session() as session:
            account = session.get(Account, account_id)
            if account is not None and account.one_day_code_hash == digest(svc, account_id, code):  # not replaced meanwhile
                account.one_day_code_hash, account.one_day_valid_on = previous
        raise
    return info


class OneDayFactor:
    name = "one_day"
    amr = ["pwd", "otp"]
    first = True
    possession = False
    template = "factor_one_day.html"

    def enabled(self, svc) -> bool:
        return True

    def bound(self, account) -> bool:
        """Never: it is a login of its own that starts a login (``first``) and proves the
        password too, not a binding a later step asks for. So step-up and re-verification
        never offer it, and a code from an earlier day cannot stand in the way of forced
        binding (whether a code is good today takes the provider's clock: ``verify``)."""
        return False

    def context(self, svc, tx, account) -> dict:
        if not captcha.wanted(svc, tx):
            # The login page made no captcha (IDP_CAPTCHA off, or no failure yet): this form always has one.
            tx["captcha"] = captcha.new_answer()
            svc.transactions.save(tx)
        return {"username": account.username if account else tx.get("username", ""), "digits": DIGITS}

    async def verify(self, request, svc, tx, form, account) -> Outcome:
        username = (form.get("username") or "").strip()[:64]
        password = form.get("password") or ""
        code = plain(form.get("code"))
        if tx.get("account"):  # stepping up: the account is known
            username = tx["username"]
        keep = {"username": username}
        if not username or not password or not code:
            return Outcome(error="one_day.missing", keep=keep)
        if not await bridge.run(captcha.take, svc, tx, form.get("captcha")):
            return Outcome(error="captcha.wrong", keep=keep)
        if not CODE.fullmatch(code):  # says nothing about the account: not counted
            return Outcome(error="one_day.malformed", params={"digits": DIGITS}, keep=keep)
        seen = {**who(request), "client_id": tx["client_id"], "method": self.name}
        return await run_in_threadpool(self._verify, svc, tx, username, password, code, seen, keep)

    def _verify(self, svc, tx, username, password, code, seen, keep) -> Outcome:
        lockout = svc.lockout
        until, attempt = lockout.attempt(username)
        if until:
            return PASSWORD._locked(svc, until, None, username, seen, keep)

        account, correct = PASSWORD._verify(svc, username, password)
        now = svc.clock()
        expected = (account.one_day_code_hash if account else None) or _NO_CODE
        same = hmac.compare_digest(digest(svc, account.id if account else "", code), expected)
        if not correct:
            problem = "password"
        elif not account.one_day_code_hash:
            problem = "none"
        elif account.one_day_valid_on != today(now):
            problem = "expired" if account.one_day_valid_on and account.one_day_valid_on < today(now) else "none"
        else:
            problem = None if same else "wrong"
        if problem:
            account_id = account.id if account else None  # so the owner sees it in their activity log
            svc.audit.record("login.failure", account_id=account_id, username=username, reason=problem, **seen)
            if attempt >= lockout.threshold:
                return locked_out(svc, lockout.lock(username), account_id, username, seen, keep)
            params = {"left": lockout.threshold - attempt}
            if problem == "expired":
                params["day"] = account.one_day_valid_on.isoformat()
            if problem == "none":
                params["day"] = today(now).isoformat()
            error = {"password": "one_day.failed", "none": "one_day.none", "expired": "one_day.expired",
                     "wrong": "one_day.wrong"}[problem]
            return Outcome(error=error, params=params, keep=keep)
        writes = Batch()  # sent with the login's next write
        lockout.release(username, writes)
        if tx.get("account") and not hmac.compare_digest(tx["account"], account.id):
            return Outcome(error="one_day.failed", params={"left": lockout.threshold}, keep=keep, writes=writes)
        if account.disabled:
            svc.audit.record("login.disabled", account_id=account.id, username=username, **seen)
            return Outcome(error="login.disabled", keep=keep, writes=writes)
        if account.password_login_disabled:
            return Outcome(error="login.password_disabled", keep=keep, writes=writes)
        # This form proved the password as well: record that step too, so the flow still asks
        # for an expired password to be changed (it looks for "password" among the steps done).
        # ``flow.record_factor`` keeps the steps of the transaction's own account.
        if tx.get("account") != account.id:
            tx.update(account=account.id, username=account.username, amr=[], done=[])
        if PASSWORD.name not in tx["done"]:
            tx["done"].append(PASSWORD.name)
        return Outcome(account_id=account.id, writes=writes)


ONE_DAY = OneDayFactor()
