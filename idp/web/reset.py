"""Resetting the bindings when the phone is lost (SPEC M5, seed 001 section 8).

From the OTP page of a login (the password is already proven), the user asks
for an emergency code at their verified email. The page and the mail show the
same two-letter prefix (``KX-125770``) so the user can tell which mail is the
current one; the code lives 5 minutes, only the newest works, a resend waits
a minute, and five wrong tries burn it. The right code deletes every binding
and the login goes on to forced binding (M1).

Offered only to a login that proved the password: where the account cannot
log in with it, the OTP page tells the user to contact the helpdesk instead,
as the seed says.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import string

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from idp import bridge, captcha, flow
from idp.accounts import reset_bindings, with_bindings
from idp.factors import locked_out, plain
from idp.mail import MailError, masked
from idp.storage.kv import Batch
from idp.web.login import _expired, _posted, _transaction
from idp.web.pages import locale_of, render, who
from idp.web.recovery import claim_send

CODE_SECONDS = 300
RESEND_SECONDS = 60
MAX_TRIES = 5
PREFIX_LETTERS = "".join(c for c in string.ascii_uppercase if c not in "IO")  # no 1/I, 0/O confusion


def _key(account_id: str) -> str:
    return "emergency:" + account_id


def _sent(account_id: str) -> str:
    return "emergency-sent:" + account_id


def _tries(account_id: str) -> str:
    return "emergency-tries:" + account_id


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


async def _context(request: Request):
    """((svc, tx, account), form) for a login that may reset its bindings (``flow.lost_phone``),
    or (None, form). An account disabled since its first factor ends its login here as anywhere else."""
    svc = request.app.state.svc
    if request.method == "POST":
        form, tx = await _posted(request)
    else:
        form, tx = {}, await _transaction(request, request.query_params.get("tx"))
    if tx is None or not tx.get("account"):
        return None, form or {}
    account = await run_in_threadpool(with_bindings, svc, account_id=tx["account"])
    if account is None or account.disabled:
        await bridge.run(svc.transactions.drop, tx)
        return None, form
    if flow.lost_phone(tx, account) != "reset":
        return None, form
    return (svc, tx, account), form


async def page(request: Request) -> Response:
    found, _ = await _context(request)
    if found is None:
        return _expired(request)
    return await _render(request, *found)


async def _render(request, svc, tx, account, flash=None, email="", status=200) -> Response:
    record = await bridge.run(svc.store.get, _key(account.id))
    now = svc.clock()
    if record and (record["exp"] < now or record.get("burnt")):
        record = None  # nothing to type a code into (a burnt one still holds back the next: ``send``)
    form_id = await bridge.run(captcha.new_form, svc)
    context = {"tx": tx, "flash": flash or {"params": {}}, "email": email, "form_id": form_id}
    if record:
        context.update(prefix=record["prefix"], sent_to=masked(record["email"]),
                       expires_in=int(record["exp"] - now), resend_in=max(0, math.ceil(record["next"] - now)))
    return render(request, "reset.html", **context, status=status, ui_locales=tx.get("ui_locales"),
                  here=URL(f"/login/reset?tx={tx['id']}"))


async def send(request: Request) -> Response:
    found, form = await _context(request)
    if found is None:
        return _expired(request)
    svc, tx, account = found
    email = (form.get("email") or "").strip()[:320]

    async def again(error, **params):
        return await _render(request, svc, tx, account, {"error": error, "params": params}, email=email, status=400)

    if not await bridge.run(captcha.check_form, svc, form.get("form"), form.get("captcha")):
        return await again("captcha.wrong")
    if not (account.email and account.email_verified and hmac.compare_digest(account.email.lower().encode(), email.lower().encode())):
        return await again("reset.email_mismatch")
    now = svc.clock()
    previous = await bridge.run(svc.store.get, _key(account.id))
    if previous and previous["next"] > now:
        return await again("reset.wait", seconds=math.ceil(previous["next"] - now))  # never "0 seconds"
    if not await bridge.run(claim_send, svc, _sent(account.id)):  # two tabs sent at once: one mail
        return await again("reset.wait", seconds=RESEND_SECONDS)
    prefix = "".join(secrets.choice(PREFIX_LETTERS) for _ in range(2))
    code = f"{secrets.randbelow(10**6):06d}"
    record = {"prefix": prefix, "digest": _digest(code), "exp": now + CODE_SECONDS, "next": now + RESEND_SECONDS,
              "email": account.email}
    # Replacing the record is what makes only the newest code work; its tries start again.
    batch = Batch()
    batch.set(_key(account.id), record, CODE_SECONDS + 60)
    batch.delete(_tries(account.id))
    await bridge.run(svc.store.write, batch)
    try:
        await svc.mailer.send_async(account.email, "emergency_code", locale_of(request, tx.get("ui_locales")),
                                    name=account.name or account.username, username=account.username,
                                    code=f"{prefix}-{code}", prefix=prefix, minutes=CODE_SECONDS // 60)
    except MailError:
        await bridge.run(svc.store.delete, _key(account.id), _sent(account.id))
        return await again("reset.mail_failed")
    await svc.db.call(svc.audit.record, "bindings.reset_requested", account_id=account.id, username=account.username,
                      client_id=tx["client_id"], method="email", **who(request))
    return RedirectResponse(f"/login/reset?tx={tx['id']}", status_code=303)


async def verify(request: Request) -> Response:
    found, form = await _context(request)
    if found is None:
        return _expired(request)
    svc, tx, account = found
    record = await bridge.run(svc.store.get, _key(account.id))
    if record is None or record["exp"] < svc.clock() or record.get("burnt"):
        return await _render(request, svc, tx, account, {"error": "reset.code_expired", "params": {}}, status=400)
    typed = plain(form.get("code")).upper().removeprefix(record["prefix"])
    # A try is counted before the code is compared, so parallel guesses cannot exceed MAX_TRIES;
    # and it is an answer like a password or an OTP, counted by the account's lockout too, or
    # someone with the password could guess on, a new code whenever one burns.
    seen = {**who(request), "client_id": tx["client_id"], "method": "emergency_code"}

    async def refused(outcome):
        return await _render(request, svc, tx, account, {"error": outcome.error, "params": outcome.params}, status=400)

    until, attempt = await svc.db.call(svc.lockout.attempt, account.username)
    if until:
        return await refused(await svc.db.call(locked_out, svc, until, account.id, account.username, seen))
    tries = await bridge.run(svc.store.incr, _tries(account.id), CODE_SECONDS + 60)
    right = re.fullmatch("[0-9]{6}", typed) is not None and hmac.compare_digest(_digest(typed), record["digest"])
    if tries > MAX_TRIES or not right:
        await svc.db.call(svc.audit.record, "login.failure", account_id=account.id, username=account.username,
                          reason="emergency_code", **seen)  # in the owner's activity log, as a wrong OTP is
        if attempt >= svc.lockout.threshold:
            until = await bridge.run(svc.lockout.lock, account.username)
            return await refused(await svc.db.call(locked_out, svc, until, account.id, account.username, seen))
        if tries >= MAX_TRIES:
            # Kept, burnt, until it would have expired: the wait before another is sent still holds.
            ttl = max(1, int(record["exp"] - svc.clock())) + 60
            await bridge.run(svc.store.set, _key(account.id), {**record, "burnt": True}, ttl)
            return await _render(request, svc, tx, account, {"error": "reset.code_burnt", "params": {}}, status=400)
        left = min(MAX_TRIES - tries, svc.lockout.threshold - attempt)
        return await _render(request, svc, tx, account, {"error": "reset.code_wrong", "params": {"left": left}}, status=400)
    batch = Batch()  # the code taken (used once), its tries forgotten, its attempt given back: one round trip
    batch.take(_key(account.id))
    batch.delete(_tries(account.id))
    svc.lockout.release(account.username, batch)
    taken = (await bridge.run(svc.store.write, batch))[0]
    if taken is None or not hmac.compare_digest(taken["digest"], record["digest"]):
        # Used meanwhile, or a newer code sent meanwhile, which alone works (M5): it is put back.
        if taken is not None:
            await bridge.run(svc.store.set, _key(account.id), taken, max(1, int(taken["exp"] - svc.clock())) + 60)
        return await _render(request, svc, tx, account, {"error": "reset.code_expired", "params": {}}, status=400)
    await run_in_threadpool(reset_bindings, svc, account.id)
    await svc.db.call(svc.audit.record, "bindings.reset", account_id=account.id, username=account.username, **seen)
    tx["flash"] = {"notice": "reset.done", "params": {}}
    await bridge.run(svc.transactions.save, tx)
    return RedirectResponse(f"/login?tx={tx['id']}", status_code=303)


routes = [
    Route("/login/reset", page),
    Route("/login/reset/send", send, methods=["POST"]),
    Route("/login/reset/verify", verify, methods=["POST"]),
]
