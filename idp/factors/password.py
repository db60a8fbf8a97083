"""Account and password (SPEC A1), with the image captcha and lockout."""

from __future__ import annotations

import hmac
from functools import partial

from starlette.concurrency import run_in_threadpool

from idp import bridge, captcha
from idp.accounts import with_bindings
from idp.factors import Outcome, locked_out
from idp.storage.kv import Batch
from idp.storage.models import Account
from idp.web.pages import who


class PasswordFactor:
    name = "password"
    amr = ["pwd"]
    first = True
    possession = False
    template = "factor_password.html"

    def enabled(self, svc) -> bool:
        return True

    def bound(self, account) -> bool:
        return bool(account.password_hash) and not account.password_login_disabled

    def context(self, svc, tx, account) -> dict:
        return {"username": account.username if account else tx.get("username", ""), "captcha": captcha.wanted(svc, tx)}

    async def verify(self, request, svc, tx, form, account) -> Outcome:
        username = (form.get("username") or "").strip()[:64]
        password = form.get("password") or ""
        if tx.get("account"):  # stepping up: the account is known
            username = tx["username"]
        keep = {"username": username}
        if not username or not password:
            return Outcome(error="login.missing", keep=keep)
        if captcha.wanted(svc, tx) and not await bridge.run(captcha.take, svc, tx, form.get("captcha")):
            return Outcome(error="captcha.wrong", keep=keep)
        seen = {**who(request), "client_id": tx["client_id"], "method": self.name}
        lockout = svc.lockout

        # The store and audit writes of a refusal are awaited (``svc.db.call``), never made on the
        # event loop: a flood of wrong passwords must not stall every other request.
        def failed(account_id, attempt):
            svc.audit.record("login.failure", account_id=account_id, username=username, **seen)
            if attempt >= lockout.threshold:
                return locked_out(svc, lockout.lock(username), account_id, username, seen, keep)
            return Outcome(error="login.failed", params={"left": lockout.threshold - attempt}, keep=keep)

        until, attempt = await svc.db.call(lockout.attempt, username)
        if until:
            return await svc.db.call(self._locked, svc, until, tx.get("account"), username, seen, keep)
        if attempt > 1 and svc.settings.captcha == "after-failure" and not captcha.wanted(svc, tx):
            # The username's last answers failed (in another login, another browser perhaps): a
            # new login is not the way around the captcha. Not a guess: the attempt is given back.
            await bridge.run(lockout.release, username)
            return Outcome(error="captcha.needed", keep=keep)

        try:
            account, correct, rehash = await svc.passwords.check(partial(with_bindings, svc, username=username), password)
            if correct and rehash:  # made with older parameters: upgraded now that the password is known
                await run_in_threadpool(self._rehash, svc, account.id, password)
        except Exception:  # the provider's failure (its database away), not a guess: the attempt is given back
            await bridge.run(lockout.release, username)
            raise
        if not correct:
            return await svc.db.call(failed, account.id if account else None, attempt)  # the owner sees it in their activity log
        writes = Batch()  # sent with the login's next write
        lockout.release(username, writes)
        if tx.get("account") and not hmac.compare_digest(tx["account"], account.id):
            return Outcome(error="login.failed", params={"left": lockout.threshold}, keep=keep, writes=writes)
        if account.disabled:
            await svc.db.call(svc.audit.record, "login.disabled", account_id=account.id, username=username, **seen)
            return Outcome(error="login.disabled", keep=keep, writes=writes)
        if account.password_login_disabled:
            return Outcome(error="login.password_disabled", keep=keep, writes=writes)
        return Outcome(account_id=account.id, account=account, writes=writes)

    @staticmethod
    def _locked(svc, until, account_id, username, seen, keep):
        """Refused while locked; in the owner's activity log too (one indexed read, no hash), where
        an attack that goes on past the lock shows."""
        if account_id is None:
            account = with_bindings(svc, username=username)
            account_id = account.id if account else None
        return locked_out(svc, until, account_id, username, seen, keep)

    @classmethod
    def _verify(cls, svc, username, password):
        """(account or None, password correct), for callers already off the event loop
        (the one-day code's form); ``verify`` awaits the hash instead."""
        account = with_bindings(svc, username=username)
        correct, rehash = svc.passwords.verify(account.password_hash if account else None, password)
        if correct and rehash:
            cls._rehash(svc, account.id, password)
        return account, correct

    @staticmethod
    def _rehash(svc, account_id, password):
        hashed = svc.passwords.hash(password)  # before the transaction, not holding it open
        with svc.db.session() as session:
            session.get(Account, account_id).password_hash = hashed


PASSWORD = PasswordFactor()
