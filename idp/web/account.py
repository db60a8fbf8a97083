"""The account area ("login settings", SPEC M2-M6): the user's own bindings,
password login, and activity log.

Every page needs the SSO session and a second factor proven within
``reverify_seconds`` (M2): otherwise the user is sent through a login that
asks for a bound factor again, and comes back here.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib

from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Match, Route

from idp import bridge, captcha
from idp.accounts import AccountError, change_password, with_bindings
from idp.factors import FACTORS, methods, passkey
from idp.factors.totp import Enrolment
from idp.mail import MailError
from idp.protocol.clients import OAuthClient
from idp.storage.kv import Batch
from idp.storage.models import Account, AuditEvent, Client
from idp.web import i18n, recovery
from idp.web.forms import BadRequest, read_form
from idp.web.login import SESSION_COOKIE
from idp.web.pages import (CSRF_COOKIE, csrf_ok, csrf_token, error_page, get_cookie, locale_of, render, set_cookie,
                            who)

PAGE_SIZE = 20
# Bindings that let an account log in without its password (M4's precondition).
PASSWORDLESS = ("certificate", "google", "passkey")


def passwordless(svc, bindings) -> bool:
    """Whether these bindings let the account in without its password: through a factor the
    settings switch on (a Google binding is no way in while Google login is off), and not a
    passkey suspended as cloned (it is refused until removed)."""
    return any(b.factor in PASSWORDLESS and FACTORS[b.factor].enabled(svc)
               and (b.factor != passkey.PASSKEY.name or passkey.usable(b)) for b in bindings)


async def require_account(request: Request, *, verified: bool = True, interactive: bool = True):
    """The signed-in user's account, or the response that signs them in.

    With ``verified``, a bound second factor must have been proven within
    ``reverify_seconds``; otherwise the login asks for it again (M2). Only an
    ``interactive`` request starts that login; a script's poll just gets the expired page.
    A form's POST does nothing then: the login comes back to the form's page (GET), which
    says so (``?unsent=1``), to send it again."""
    svc = request.app.state.svc
    session = await bridge.run(svc.sessions.get, get_cookie(request, SESSION_COOKIE))
    account = await run_in_threadpool(with_bindings, svc, account_id=session["account"]) if session else None
    if account is not None and account.disabled:
        return error_page(request, "error.disabled.title", "error.disabled.detail", status=403)
    fresh = session is not None and svc.clock() - session.get("verified_at", 0) <= svc.settings.reverify_seconds
    if account is not None and (fresh or not verified):
        return account
    if not interactive:
        return error_page(request, "error.tx_expired.title", "error.tx_expired.detail")
    return_to = request.url.path if request.method == "GET" else _form_page(request) + "?unsent=1"
    tx = svc.transactions.create(
        params=[], client_id=None, browser=csrf_token(request), fresh=account is None, target_acr=None,
        session=session if account else None, return_to=return_to, reverify=account is not None,
    )
    await bridge.run(svc.transactions.save, tx)
    response = RedirectResponse(f"/login?tx={tx['id']}", status_code=303)
    if getattr(request.state, "new_csrf", None):  # a browser new to us: the login is bound to this cookie
        set_cookie(request, response, CSRF_COOKIE, request.state.new_csrf)
    return response


def _form_page(request: Request) -> str:
    """The page a form posted here is on, as routing tells it: this path, or the nearest one
    above it that the provider shows ("/admin/clients" for "/admin/clients/{id}/policy").
    Cut from the path our own routes matched, so always one of our pages."""
    path = request.url.path
    while path.count("/") > 1 and not _shown(request.app, path):
        path = path.rpartition("/")[0]
    return path


def _shown(app, path: str) -> bool:
    scope = {"type": "http", "path": path, "method": "GET"}
    return any(route.matches(scope)[0] == Match.FULL for route in app.routes)


def session_owner(request: Request, account) -> str:
    """Whose a pending registration is (a passkey's challenge, an OTP QR's secret): this
    account in this browser session, so that a session since ended, or another one, never
    gets it. The session id is hashed: it is stored as part of a key or a record."""
    sid = request.app.state.svc.sessions.sid_of(get_cookie(request, SESSION_COOKIE))
    return f"account:{account.id}:{hashlib.sha256(sid.encode()).hexdigest()}"


def account_post(handler):
    """A POST handler of the account area, called as ``handler(request, account, form)``
    with the signed-in account and the CSRF-checked form; otherwise the response that
    signs the user in again, or the expired page (a malformed body, a wrong CSRF token)."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        account = await require_account(request)
        if isinstance(account, Response):
            return account
        try:
            form = dict(await read_form(request))
        except BadRequest:
            return _expired(request)
        if not csrf_ok(request, form):
            return _expired(request)
        return await handler(request, account, form)

    return endpoint


def _back(notice: str | None = None, error: str | None = None) -> RedirectResponse:
    query = f"?notice={notice}" if notice else f"?error={error}" if error else ""
    return RedirectResponse("/account" + query, status_code=303)


# -- the settings page -------------------------------------------------------------------
NOTICES = {"others_ended", "otp_bound", "otp_rebound", "certificate_bound", "password_login_disabled", "password_login_enabled", "verification_sent",
           "google_bound"}
ERRORS = {"needs_passwordless", "email_missing", "verification_wait", "verification_failed", "google_needs_otp", "google_elsewhere",
          "google_expired", "google_denied", "google_error", "google_invalid", "google_unavailable"}


async def settings_page(request: Request) -> Response:
    account = await require_account(request)
    if isinstance(account, Response):
        return account
    notice = request.query_params.get("notice")
    error = request.query_params.get("error")
    flash = {"params": {}}
    if notice in NOTICES:
        flash["notice"] = f"account.notice.{notice}"
    if error in ERRORS:
        flash["error"] = f"account.error.{error}"
    svc = request.app.state.svc
    can_disable = passwordless(svc, account.bindings)
    sessions = await bridge.run(svc.sessions.of_account, account.id)
    current = svc.sessions.sid_of(get_cookie(request, SESSION_COOKIE))
    from idp.factors.federation import GOOGLE

    return render(request, "account.html", account=account, methods=methods(account), flash=flash,
                  google_enabled=GOOGLE.enabled(svc), can_disable=can_disable, tab="settings", sessions=sessions, current_sid=current)


@account_post
async def end_other_sessions(request: Request, account, form) -> Response:
    """Log out every other browser of this account (its clients are told, back-channel)."""
    svc = request.app.state.svc
    current = await bridge.run(svc.sessions.get, get_cookie(request, SESSION_COOKIE))
    ended = await bridge.run(svc.sessions.end_all, account.id, svc.tokens, current["sid"] if current else None)
    await svc.db.call(svc.audit.record, "sessions.ended_others", account_id=account.id, username=account.username,
                      count=ended, **who(request))
    response = _back(notice="others_ended")
    if current:  # a new secret too: a copy of this browser's cookie is one of the others
        svc.sessions.renew(current)
        writes = Batch()
        svc.sessions.save(current, writes)
        await bridge.run(svc.store.write, writes)
        set_cookie(request, response, SESSION_COOKIE, svc.sessions.cookie(current))
    return response


def error_key(request: Request, prefix: str) -> str | None:
    """The message key a page was sent back with (``?error=``): one of ours under ``prefix``
    that needs no parameters, never text a crafted link makes up (an unknown key would be
    shown as it is)."""
    key = request.query_params.get("error", "")
    text = i18n.CATALOGS["en"].get(key) if key.startswith(prefix) else None
    return key if text and "{" not in text else None


# -- rebinding OTP (M3) -----------------------------------------------------------------------
async def otp_page(request: Request) -> Response:
    account = await require_account(request)
    if isinstance(account, Response):
        return account
    svc = request.app.state.svc
    flash = {"params": {}, "error": error_key(request, "otp.")}
    enrolment, owner = Enrolment(svc), session_owner(request, account)
    otp = await run_in_threadpool(lambda: enrolment.page(account, enrolment.start(account, owner)))
    return render(request, "account_otp.html", account=account, otp=otp, flash=flash, tab="settings",
                  rebinding=any(b.factor == "otp" for b in account.bindings),
                  enrol_action="/account/otp", rebuild_action="/account/otp/rebuild")


@account_post
async def otp_confirm(request: Request, account, form) -> Response:
    svc = request.app.state.svc
    owner = session_owner(request, account)
    error = await run_in_threadpool(Enrolment(svc).confirm, account.id, owner, form.get("otp"))
    if error:
        return RedirectResponse(f"/account/otp?error={error}", status_code=303)
    rebound = any(b.factor == "otp" for b in account.bindings)
    await svc.db.call(svc.audit.record, "binding.replaced" if rebound else "binding.created",
                      account_id=account.id, username=account.username, method="otp", **who(request))
    return _back(notice="otp_rebound" if rebound else "otp_bound")


@account_post
async def otp_rebuild(request: Request, account, form) -> Response:
    # The version's row is locked: off the event loop, as at forced binding.
    await run_in_threadpool(Enrolment(request.app.state.svc).start, account, session_owner(request, account), rebuild=True)
    return RedirectResponse("/account/otp", status_code=303)


def _expired(request: Request) -> Response:
    return error_page(request, "error.tx_expired.title", "error.tx_expired.detail")


# -- binding a certificate (SPEC A3) ------------------------------------------------------------
async def certificate_page(request: Request) -> Response:
    """The component checks and a challenge to sign with the card to bind."""
    account = await require_account(request)
    if isinstance(account, Response):
        return account
    from idp.factors import certificate as cert

    svc = request.app.state.svc
    flash = {"params": {}, "error": error_key(request, "certificate.")}
    current = next((b for b in account.bindings if b.factor == cert.CERTIFICATE.name), None)
    challenge = await bridge.run(cert.issue_challenge, svc, "account:" + account.id)
    return render(request, "account_certificate.html", account=account, flash=flash, tab="settings", current=current,
                  challenge=challenge, **cert.component(svc))


@account_post
async def certificate_bind(request: Request, account, form) -> Response:
    from idp.factors import certificate as cert

    svc = request.app.state.svc
    identity, error, replaced = await cert.bind_card(svc, form, "account:" + account.id, account)
    seen = {**who(request), "method": cert.CERTIFICATE.name}
    if error is not None:
        code, key = error
        await svc.db.call(svc.audit.record, "binding.refused", account_id=account.id, username=account.username,
                          **seen, reason=code)
        return RedirectResponse(f"/account/certificate?error={key}", status_code=303)
    await svc.db.call(svc.audit.record, "binding.replaced" if replaced else "binding.created", account_id=account.id,
                      username=account.username, **seen, certificate=cert.binding_id(identity),
                      fingerprint=identity.fingerprint_sha256)
    return _back(notice="certificate_bound")


# -- disabling password login (M4) --------------------------------------------------------------
async def password_login_page(request: Request) -> Response:
    """The confirmation: what turning password login off means, and what remains."""
    account = await require_account(request)
    if isinstance(account, Response):
        return account
    if account.password_login_disabled:
        return await _enable_page(request, account)
    svc = request.app.state.svc
    if not passwordless(svc, account.bindings):
        return _back(error="needs_passwordless")
    remaining = [row for row in methods(account)
                 if row["bound"] and row["factor"] in PASSWORDLESS and FACTORS[row["factor"]].enabled(svc)]
    return render(request, "account_password_login.html", account=account, remaining=remaining, tab="settings",
                  flash={"params": {}})


@account_post
async def password_login_disable(request: Request, account, form) -> Response:
    svc = request.app.state.svc
    if not await run_in_threadpool(_disable, svc, account.id):
        return _back(error="needs_passwordless")
    await svc.db.call(svc.audit.record, "password_login.disabled", account_id=account.id, username=account.username,
                      **who(request))
    return _back(notice="password_login_disabled")


def _disable(svc, account_id) -> bool:
    """Turn password login off while a passwordless way in remains; whether it was."""
    with svc.db.session() as session:
        # Locked, as a passkey's removal locks it: between them they cannot leave no way in.
        account = session.execute(select(Account).where(Account.id == account_id).with_for_update()).scalar_one()
        if not passwordless(svc, account.bindings):
            return False
        account.password_login_disabled = True
        return True


def _enable(svc, account_id, new_password: str) -> bool:
    """Turn password login back on with a new password; whether it was off. While it is on,
    this form is no way to change the password without the old one."""
    with svc.db.session() as session:
        account = session.get(Account, account_id, with_for_update=True)
        if not account.password_login_disabled:
            return False
        change_password(account, svc.passwords, new_password, now=dt.datetime.fromtimestamp(svc.clock(), dt.timezone.utc))
        account.password_login_disabled = False
        return True


async def _enable_page(request: Request, account, flash=None, status: int = 200) -> Response:
    """Turning password login back on needs a new password, typed twice, and the captcha."""
    svc = request.app.state.svc
    form_id = await bridge.run(captcha.new_form, svc)
    return render(request, "account_password_enable.html", account=account, form_id=form_id, tab="settings",
                  flash=flash or {"params": {}}, status=status, here=URL("/account/password-login"))


@account_post
async def password_login_enable(request: Request, account, form) -> Response:
    svc = request.app.state.svc
    if not await bridge.run(captcha.check_form, svc, form.get("form"), form.get("captcha")):
        return await _enable_page(request, account, {"error": "captcha.wrong", "params": {}}, 400)
    new, again = form.get("new_password") or "", form.get("new_password_again") or ""
    if new != again:
        return await _enable_page(request, account, {"error": "password.mismatch", "params": {}}, 400)
    try:
        if not await run_in_threadpool(_enable, svc, account.id, new):
            return _back()
    except AccountError as e:
        return await _enable_page(request, account, {"error": e.key, "params": {}, "rules": e.params.get("rules", [])}, 400)
    await bridge.run(svc.lockout.clear, account.username)
    await svc.db.call(svc.audit.record, "password_login.enabled", account_id=account.id, username=account.username,
                      **who(request))
    return _back(notice="password_login_enabled")


# -- email confirmation ----------------------------------------------------------------------------
@account_post
async def email_verify(request: Request, account, form) -> Response:
    svc = request.app.state.svc
    if not account.email:
        return _back(error="email_missing")
    claim = "verify-sent:" + account.id
    if not await bridge.run(recovery.claim_send, svc, claim):  # a mail a minute at most
        return _back(error="verification_wait")
    try:
        await recovery.send_verification_async(svc, account, locale_of(request), who(request))
    except MailError:
        await bridge.run(svc.store.delete, claim)  # no mail went: the user may try again at once
        return _back(error="verification_failed")
    return _back(notice="verification_sent")


# -- activity log (M6) -------------------------------------------------------------------------------
def activity(svc, account_id: str, page: int) -> dict:
    """One page of an account's audit events, newest first (``rows``), the page count
    (``pages``), and the clients they name, by client_id (``clients``: a deleted one is missing)."""
    with svc.db.session() as session:
        total = session.execute(select(func.count()).select_from(AuditEvent).where(AuditEvent.account_id == account_id)).scalar_one()
        rows = session.execute(
            select(AuditEvent).where(AuditEvent.account_id == account_id)
            .order_by(AuditEvent.time.desc(), AuditEvent.id.desc()).offset((page - 1) * PAGE_SIZE).limit(PAGE_SIZE)
        ).scalars().all()
        named = {row.client_id for row in rows if row.client_id}
        clients = {c.client_id: OAuthClient(c) for c in session.scalars(select(Client).where(Client.client_id.in_(named)))}
        session.expunge_all()
    return {"rows": rows, "pages": max(1, -(-total // PAGE_SIZE)), "clients": clients}


async def activity_page(request: Request) -> Response:
    account = await require_account(request)
    if isinstance(account, Response):
        return account
    svc = request.app.state.svc
    page = request.query_params.get("page", "1")
    page = int(page) if page.isascii() and page.isdigit() and 0 < int(page) < 100_000 else 1
    found = await run_in_threadpool(activity, svc, account.id, page)
    return render(request, "account_activity.html", account=account, page=page, tab="activity", flash={"params": {}},
                  **found)


routes = [
    Route("/account", settings_page),
    Route("/account/otp", otp_page),
    Route("/account/otp", otp_confirm, methods=["POST"]),
    Route("/account/otp/rebuild", otp_rebuild, methods=["POST"]),
    Route("/account/certificate", certificate_page),
    Route("/account/certificate", certificate_bind, methods=["POST"]),
    Route("/account/password-login", password_login_page),
    Route("/account/password-login/disable", password_login_disable, methods=["POST"]),
    Route("/account/password-login/enable", password_login_enable, methods=["POST"]),
    Route("/account/email/verify", email_verify, methods=["POST"]),
    Route("/account/activity", activity_page),
    Route("/account/sessions/end-others", end_other_sessions, methods=["POST"]),
]
