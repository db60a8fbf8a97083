"""Getting back into an account by email (SPEC A1): email confirmation and
forgot-password.

Email confirmation. ``send_verification(svc, account, locale, seen)`` mails a
single-use link ``/email/confirm?token=...`` (24 hours); opening it marks the
address verified, if it is still the account's address. A verified address
is the precondition for forgot-password and for the emergency code (M5).

Forgot password. ``/password/forgot`` takes an email address and an image
captcha and always answers with the same page, whether or not an account has
that address: only an account whose address is verified (not disabled, with
password login on) gets a mail, with a single-use link ``/password/reset``
valid 30 minutes; a newer link replaces the older one; at most one mail per
address a minute. The mail is sent after the response, so its timing says
nothing either.

Tokens are random 256-bit values; the store keeps only their SHA-256
digests, each record with its own expiry checked against ``svc.clock``.
Pages follow the login's POST-redirect-GET style: a POST does its one step
and redirects; errors are kept in the store and shown once, with the input.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import re
import secrets
from urllib.parse import urlencode

from sqlalchemy import func, select
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from idp import bridge, captcha
from idp.accounts import is_current_password, set_password
from idp.mail import MailError
from idp.protocol.tokens import not_before_mark
from idp.storage.models import Account
from idp.web.forms import BadRequest, read_form
from idp.web.pages import (CSRF_COOKIE, captcha_png, csrf_ok, csrf_token, error_page, get_cookie, locale_of, render,
                            set_cookie, who)

log = logging.getLogger("idp.recovery")

VERIFY_SECONDS = 24 * 3600  # an email confirmation link
RESET_SECONDS = 30 * 60  # a password reset link
RESEND_SECONDS = 60  # at most one reset mail per address in this time
FLASH_SECONDS = 300
MAX_TOKEN = 100  # characters; ours have 43
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")

_VERIFY = "email-verify:"  # + digest -> {account, email, exp}
_FORM = "recovery-form:"  # + form id -> {browser, exp, captcha, flash?, email?}
_RATE = "recovery-rate:reset:"  # + digest of the address -> {next}
_RESET = "pw-reset:"  # + digest -> {account, email, exp, tx}
_NEWEST = "pw-reset-newest:"  # + account id -> {digest}: only the newest link works
_RESET_FLASH = "pw-reset-flash:"  # + digest -> the error to show once on the reset form


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _now(svc) -> dt.datetime:
    return dt.datetime.fromtimestamp(svc.clock(), dt.timezone.utc)


def _same_address(a: str | None, b: str | None) -> bool:
    return bool(a and b) and a.strip().lower() == b.strip().lower()


def _link(svc, path: str, **params) -> str:
    return f"{svc.settings.issuer}{path}?{urlencode(params)}"


def _browser(request: Request) -> str:
    return get_cookie(request, CSRF_COOKIE) or ""


def _same_browser(request: Request, value: str | None) -> bool:
    mine = _browser(request)
    return bool(mine and value) and hmac.compare_digest(mine.encode(), value.encode())


async def _login_tx(request: Request, tx_id: str | None) -> dict | None:
    """The login transaction to go back to: only a live one of this browser."""
    if not tx_id or len(tx_id) > MAX_TOKEN:
        return None
    tx = await bridge.run(request.app.state.svc.transactions.get, tx_id)
    return tx if tx is not None and _same_browser(request, tx.get("browser")) else None


def _notice(request: Request, title: str, detail: str, *, ok: bool = False, status: int = 200, links=(), tx=None,
            ui_locales: str | None = None, **params):
    """A page that says what happened and where to go from here, in the login's language
    (``tx``) or the one given."""
    return render(request, "recovery_notice.html", status=status, title_key=title, detail_key=detail, params=params,
                  ok=ok, links=list(links), ui_locales=tx.get("ui_locales") if tx else ui_locales)


# -- email confirmation ------------------------------------------------------------------
def send_verification(svc, account, locale: str, seen: dict | None = None) -> None:
    """Mail ``account`` a single-use link that confirms its current email address
    (24 hours); ``seen``: who asked (``who``), for the audit log. Blocks while the mail is sent: call it from a thread, or
    ``await send_verification_async``. Raises ``MailError`` when SMTP fails and
    ``ValueError`` when the account has no address."""
    if not account.email:
        raise ValueError("the account has no email address")
    token = secrets.token_urlsafe(32)
    record = {"account": account.id, "email": account.email, "exp": svc.clock() + VERIFY_SECONDS}
    svc.store.set(_VERIFY + _digest(token), record, VERIFY_SECONDS + 60)
    svc.mailer.send(account.email, "email_verify", locale, name=account.name or account.username,
                    username=account.username, email=account.email, hours=VERIFY_SECONDS // 3600,
                    link=_link(svc, "/email/confirm", token=token))
    svc.audit.record("email.verification_sent", account_id=account.id, username=account.username, method="email",
                     **(seen or {}))


async def send_verification_async(svc, account, locale: str, seen: dict) -> None:
    await run_in_threadpool(send_verification, svc, account, locale, seen)


async def email_confirm(request: Request) -> Response:
    svc = request.app.state.svc
    token = request.query_params.get("token") or ""
    record = await bridge.run(svc.store.take, _VERIFY + _digest(token)) if 0 < len(token) <= MAX_TOKEN else None
    if record is None or record["exp"] < svc.clock():
        return _notice(request, "recovery.email.invalid.title", "recovery.email.invalid.detail", status=400)
    username, problem = await run_in_threadpool(_mark_verified, svc, record)
    if problem == "disabled":
        return _notice(request, "recovery.email.invalid.title", "recovery.email.invalid.detail", status=400)
    if problem:
        return _notice(request, "recovery.email.changed.title", "recovery.email.changed.detail", status=409)
    await svc.db.call(svc.audit.record, "email.verified", account_id=record["account"], username=username,
                      **who(request), method="email")
    return _notice(request, "recovery.email.confirmed.title", "recovery.email.confirmed.detail", ok=True,
                   email=record["email"])


def _mark_verified(svc, record) -> tuple[str | None, str | None]:
    """(the account's username, None) once its address is confirmed, or (None, why not):
    ``changed`` (it is no longer the account's address) or ``disabled`` (as its other links)."""
    with svc.db.session() as session:
        account = session.get(Account, record["account"])
        if account is None or not _same_address(account.email, record["email"]):
            return None, "changed"
        if account.disabled:
            return None, "disabled"
        account.email_verified = True
        return account.username, None


# -- forgot password: the request form ---------------------------------------------------
async def forgot(request: Request) -> Response:
    if request.method == "POST":
        return await forgot_submit(request)
    svc = request.app.state.svc
    tx = await _login_tx(request, request.query_params.get("tx"))
    form_id = request.query_params.get("form") or ""
    record = await bridge.run(svc.store.get, _FORM + form_id) if 0 < len(form_id) <= MAX_TOKEN else None
    if record is None or record["exp"] < svc.clock() or not _same_browser(request, record.get("browser")):
        form_id = secrets.token_urlsafe(24)
        record = {"browser": csrf_token(request), "exp": svc.clock() + svc.settings.login_timeout_seconds}
    flash = record.pop("flash", None) or {}
    email = record.pop("email", "")
    record["captcha"] = captcha.new_answer()  # a new image on every view
    await bridge.run(_save_form, svc, form_id, record)
    return render(request, "recovery_forgot.html", form_id=form_id, email=email, flash=flash, tx=tx,
                  ui_locales=tx.get("ui_locales") if tx else None)


def _save_form(svc, form_id: str, record: dict) -> None:
    svc.store.set(_FORM + form_id, record, max(1, int(record["exp"] - svc.clock())) + 60)


async def _forgot_again(request: Request, tx: dict | None, email: str, error: str) -> Response:
    """Back to the form, showing ``error`` once and keeping what was typed."""
    svc = request.app.state.svc
    form_id = secrets.token_urlsafe(24)
    browser = csrf_token(request)  # a browser without the cookie gets one, so the message reaches it
    record = {"browser": browser, "exp": svc.clock() + svc.settings.login_timeout_seconds,
              "flash": {"error": error, "params": {}}, "email": email}
    await bridge.run(_save_form, svc, form_id, record)
    query = {"form": form_id, **({"tx": tx["id"]} if tx else {})}
    response = RedirectResponse("/password/forgot?" + urlencode(query), status_code=303)
    if getattr(request.state, "new_csrf", None):
        set_cookie(request, response, CSRF_COOKIE, browser)
    return response


async def forgot_submit(request: Request) -> Response:
    svc = request.app.state.svc
    try:
        form = dict(await read_form(request))
    except BadRequest as e:
        return error_page(request, "error.bad_request.title", "error.bad_request.detail", status=e.status)
    tx = await _login_tx(request, form.get("tx"))
    email = (form.get("email") or "").strip()[:320]
    form_id = form.get("form") or ""
    # Taken: one answer per image.
    record = await bridge.run(svc.store.take, _FORM + form_id) if 0 < len(form_id) <= MAX_TOKEN else None
    if (record is None or record["exp"] < svc.clock() or not csrf_ok(request, form)
            or not _same_browser(request, record.get("browser"))):
        return await _forgot_again(request, tx, email, "recovery.forgot.form_expired")
    if not email:
        return await _forgot_again(request, tx, email, "recovery.forgot.missing_email")
    if not EMAIL.match(email):
        return await _forgot_again(request, tx, email, "recovery.forgot.bad_email")
    if not captcha.check(record, form.get("captcha")):
        return await _forgot_again(request, tx, email, "captcha.wrong")
    background = None
    if await bridge.run(claim_send, svc, _RATE + _digest(email.lower())):
        locale = locale_of(request, tx.get("ui_locales") if tx else None)
        background = BackgroundTask(_send_reset_links, svc, email, locale, tx["id"] if tx else None, who(request))
    # The same answer whether the address is known, verified, rate-limited or not.
    target = "/password/forgot/sent" + (f"?{urlencode({'tx': tx['id']})}" if tx else "")
    return RedirectResponse(target, status_code=303, background=background)


def claim_send(svc, key: str) -> bool:
    """True for the one caller that may send now; at most one per ``RESEND_SECONDS``.
    The record's own time is what counts (the store's TTL only collects it)."""
    now = svc.clock()
    for _ in range(2):
        if svc.store.set(key, {"next": now + RESEND_SECONDS}, RESEND_SECONDS + 60, only_new=True):
            return True
        current = svc.store.get(key)
        if current is not None and current["next"] > now:
            return False
        taken = svc.store.take(key)  # stale: whoever takes it may claim anew
        if taken is not None and taken["next"] > now:  # another claim got in between: put it back
            svc.store.set(key, taken, RESEND_SECONDS + 60, only_new=True)
            return False
    return False


def _send_reset_links(svc, email: str, locale: str, tx_id: str | None, seen: dict) -> None:
    """After the response: a link for each account this address may recover."""
    try:
        accounts = _recoverable(svc, email)
    except Exception:
        log.exception("password reset: could not look up the accounts of an address")
        return
    for account in accounts:
        token, older = _issue_reset(svc, account, tx_id, locale)
        try:
            svc.mailer.send(account["email"], "password_reset", locale, name=account["name"] or account["username"],
                            username=account["username"], minutes=RESET_SECONDS // 60,
                            link=_link(svc, "/password/reset", token=token))
        except Exception as error:
            if not isinstance(error, MailError):  # the mailer logged why a MailError happened
                log.exception("password reset mail for %s failed", account["username"])
            _withdraw_reset(svc, account["id"], token, older)  # the link the user holds keeps working
            continue  # the user may ask again
        if older:
            svc.store.delete(_RESET + older["digest"])
        svc.audit.record("password.reset_requested", account_id=account["id"], username=account["username"],
                         **seen, method="email")


def _recoverable(svc, email: str) -> list[dict]:
    with svc.db.session() as session:
        rows = session.execute(
            select(Account).where(func.lower(Account.email) == email.lower(), Account.email_verified.is_(True),
                                  Account.disabled.is_(False), Account.password_login_disabled.is_(False))
        ).scalars()
        return [{"id": a.id, "username": a.username, "name": a.name, "email": a.email, "changed": _changed(a)}
                for a in rows]


def _changed(account: Account) -> str | None:
    """When the password last changed: a reset link is good only while it has not since (``_unchanged``)."""
    return account.password_changed_at.isoformat() if account.password_changed_at else None


def _unchanged(record: dict, account: Account) -> bool:
    """Whether the password is still the one the link was mailed to replace. Compared as instants:
    PostgreSQL gives a time in the TimeZone of the connection that read it, which may differ
    between the process that mailed the link and the one that opens it."""
    kept = record.get("changed")
    return (dt.datetime.fromisoformat(kept) if kept else None) == account.password_changed_at


def _issue_reset(svc, account: dict, tx_id: str | None, locale: str) -> tuple[str, dict | None]:
    """A new link, now the account's newest, and the newest it replaced (None if none), whose
    record the caller deletes once the mail has gone, or makes the newest again if it has not
    (``_withdraw_reset``). The link's record keeps the language of the request: its pages speak
    it, in whatever browser the mail is opened."""
    token = secrets.token_urlsafe(32)
    digest = _digest(token)
    record = {"account": account["id"], "email": account["email"], "changed": account["changed"],
              "exp": svc.clock() + RESET_SECONDS, "tx": tx_id, "locale": locale}
    svc.store.set(_RESET + digest, record, RESET_SECONDS + 60)
    older = svc.store.get(_NEWEST + account["id"])
    svc.store.set(_NEWEST + account["id"], {"digest": digest}, RESET_SECONDS + 60)
    return token, older


def _withdraw_reset(svc, account_id: str, token: str, older: dict | None) -> None:
    """Undo ``_issue_reset`` for a link whose mail never left: the newest before it is again."""
    svc.store.delete(_RESET + _digest(token))
    if older:
        svc.store.set(_NEWEST + account_id, older, RESET_SECONDS + 60)
    else:
        svc.store.delete(_NEWEST + account_id)


async def forgot_captcha(request: Request) -> Response:
    svc = request.app.state.svc
    form_id = request.query_params.get("form") or ""
    record = await bridge.run(svc.store.get, _FORM + form_id) if 0 < len(form_id) <= MAX_TOKEN else None
    if record is None or not record.get("captcha") or not _same_browser(request, record.get("browser")):
        return Response(status_code=404)
    return await captcha_png(record["captcha"])


async def forgot_sent(request: Request) -> Response:
    tx = await _login_tx(request, request.query_params.get("tx"))
    links = [(f"/login?{urlencode({'tx': tx['id']})}", "recovery.back_to_login")] if tx else []
    return _notice(request, "recovery.sent.title", "recovery.sent.detail", ok=True, links=links, tx=tx,
                   minutes=RESET_SECONDS // 60)


# -- forgot password: the link from the mail ---------------------------------------------
def _reset_record(svc, token: str) -> dict | None:
    """The live, newest reset record of ``token`` (not yet used), or None."""
    if not token or len(token) > MAX_TOKEN:
        return None
    digest = _digest(token)
    record = svc.store.get(_RESET + digest)
    if record is None or record["exp"] < svc.clock():
        return None
    newest, ended = svc.store.get_many([_NEWEST + record["account"], not_before_mark(record["account"])])
    if newest is None or not hmac.compare_digest(newest["digest"], digest):
        return None
    if ended and ended["time"] > record["exp"] - RESET_SECONDS:
        # Every session of the account was ended since it was mailed (it was disabled, or
        # logged out everywhere): a link kept from before does not outlive that either.
        return None
    return {**record, "digest": digest}


def _may_recover(account: Account | None, record: dict) -> bool:
    """The link still fits the account: usable, the address it went to is still its verified
    one, and the password is the one it was sent to replace (a link kept by someone who once
    read the mailbox does not undo a change the owner made since)."""
    return (account is not None and not account.disabled and not account.password_login_disabled
            and account.email_verified and _same_address(account.email, record["email"])
            and _unchanged(record, account))


def _recoverable_account(svc, record) -> dict | None:
    with svc.db.session() as session:
        account = session.get(Account, record["account"])
        return {"id": account.id, "username": account.username} if _may_recover(account, record) else None


def _invalid_link(request: Request, record: dict | None) -> Response:
    return _notice(request, "recovery.reset.invalid.title", "recovery.reset.invalid.detail", status=400,
                   links=[("/password/forgot", "recovery.reset.ask_again")], ui_locales=record and record.get("locale"))


async def reset(request: Request) -> Response:
    if request.method == "POST":
        return await reset_submit(request)
    svc = request.app.state.svc
    token = request.query_params.get("token") or ""
    record = await bridge.run(_reset_record, svc, token)
    account = record and await run_in_threadpool(_recoverable_account, svc, record)
    if not account:
        return _invalid_link(request, record)
    flash = await bridge.run(svc.store.take, _RESET_FLASH + record["digest"]) or {}
    return render(request, "recovery_reset.html", token=token, username=account["username"], flash=flash,
                  ui_locales=record.get("locale"))


async def _reset_again(svc, token: str, digest: str, flash: dict) -> Response:
    await bridge.run(svc.store.set, _RESET_FLASH + digest, flash, FLASH_SECONDS)
    return RedirectResponse("/password/reset?" + urlencode({"token": token}), status_code=303)


async def reset_submit(request: Request) -> Response:
    svc = request.app.state.svc
    try:
        form = dict(await read_form(request))
    except BadRequest as e:
        return error_page(request, "error.bad_request.title", "error.bad_request.detail", status=e.status)
    token = form.get("token") or ""
    record = await bridge.run(_reset_record, svc, token)
    account = record and await run_in_threadpool(_recoverable_account, svc, record)
    if not account:
        return _invalid_link(request, record)
    digest = record["digest"]
    if not csrf_ok(request, form):
        return await _reset_again(svc, token, digest, {"error": "recovery.reset.retry", "params": {}})
    new, again = form.get("new_password") or "", form.get("new_password_again") or ""
    if not hmac.compare_digest(new.encode(), again.encode()):
        return await _reset_again(svc, token, digest, {"error": "password.mismatch", "params": {}})
    problems = svc.passwords.problems(new, account["username"])
    if problems:
        return await _reset_again(svc, token, digest, {"error": "password.weak", "params": {}, "rules": problems})
    if await run_in_threadpool(_is_current, svc, account["id"], new):  # an expired one made fresh again (A1)
        return await _reset_again(svc, token, digest, {"error": "password.same", "params": {}})
    if await bridge.run(svc.store.take, _RESET + digest) is None:  # used meanwhile (another tab, a double click)
        return _invalid_link(request, record)
    await bridge.run(svc.store.delete, _NEWEST + account["id"])
    try:
        username = await run_in_threadpool(_set_new_password, svc, record, new)
    except Exception:  # not saved (the database away): the link is not used up, it works once it is back
        await bridge.run(_give_back, svc, record)
        raise
    if username is None:
        return _invalid_link(request, record)
    await bridge.run(svc.lockout.clear, username)
    await bridge.run(svc.sessions.end_all, account["id"], svc.tokens)  # a thief's session ends with the old password
    await svc.db.call(svc.audit.record, "password.reset", account_id=account["id"], username=username, **who(request),
                      method="email")
    done = {"tx": record.get("tx"), "ui_locales": record.get("locale")}
    return RedirectResponse("/password/reset/done?" + urlencode({k: v for k, v in done.items() if v}), status_code=303)


def _is_current(svc, account_id: str, password: str) -> bool:
    with svc.db.session() as session:
        return is_current_password(session.get(Account, account_id), svc.passwords, password)


def _give_back(svc, record: dict) -> None:
    """Put back the link ``reset_submit`` took, for the rest of its time, and as the account's
    newest unless a newer one was mailed meanwhile."""
    digest = record["digest"]
    ttl = int(record["exp"] - svc.clock()) + 60
    svc.store.set(_RESET + digest, {k: v for k, v in record.items() if k != "digest"}, ttl)
    svc.store.set(_NEWEST + record["account"], {"digest": digest}, ttl, only_new=True)


def _set_new_password(svc, record, new: str) -> str | None:
    with svc.db.session() as session:
        account = session.get(Account, record["account"])
        if not _may_recover(account, record):
            return None
        set_password(account, svc.passwords, new, now=_now(svc))  # also renews password_changed_at
        return account.username


async def reset_done(request: Request) -> Response:
    tx = await _login_tx(request, request.query_params.get("tx"))
    if tx:
        return _notice(request, "recovery.done.title", "recovery.done.detail_login", ok=True, tx=tx,
                       links=[(f"/login?{urlencode({'tx': tx['id']})}", "recovery.back_to_login")])
    return _notice(request, "recovery.done.title", "recovery.done.detail_portal", ok=True,
                   ui_locales=request.query_params.get("ui_locales"))


routes = [
    Route("/password/forgot", forgot, methods=["GET", "POST"]),
    Route("/password/forgot/captcha", forgot_captcha),
    Route("/password/forgot/sent", forgot_sent),
    Route("/password/reset", reset, methods=["GET", "POST"]),
    Route("/password/reset/done", reset_done),
    Route("/email/confirm", email_confirm),
]
