"""Google federation's routes (SPEC A6; the connector and factor are ``idp.factors.federation``):

- ``GET /login/google?tx=...``: the login page's "使用 Google 帳號登入" link: off to
  the upstream with state, nonce and PKCE (kept in the store under the state);
- ``GET /login/google/callback``: validates the answer, finds the account bound to
  the upstream's ``issuer|sub``, records the factor (amr ``fed``) and goes back to
  ``/login?tx=...``, where the flow asks for the OTP step;
- ``GET /account/google``: binding from the settings page (after re-verification),
  only once OTP or a certificate is bound; ``GET /account/google/callback`` binds
  the upstream account to the signed-in one (replacing an older Google binding),
  refused when that upstream account is bound to another local account.
"""

from __future__ import annotations

import hmac
import logging

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import selectinload
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from idp import bridge, flow
from idp.factors.federation import GOOGLE, STATE, STATE_SECONDS, UpstreamError, external_id
from idp.mail import masked
from idp.storage.models import Account, Binding
from idp.web import login
from idp.web.account import account_post, require_account
from idp.web.pages import CSRF_COOKIE, error_page, get_cookie, who

log = logging.getLogger("idp.federation")
LOGIN_CALLBACK, BIND_CALLBACK = "/login/google/callback", "/account/google/callback"
BIND_NEEDS = ("otp", "certificate")


def _login_page(tx: dict, error: str | None = None) -> RedirectResponse:
    if error:
        tx["flash"] = {"error": error, "params": {}}
    return RedirectResponse(f"/login?tx={tx['id']}", status_code=303)


async def _offered(svc, tx) -> bool:
    _, _, step = await login.load(svc, tx)
    return step is not None and step.kind == "factor" and GOOGLE in step.factors


async def _redirect(request: Request, callback_path: str, pending: dict) -> Response:
    svc = request.app.state.svc
    url, secrets_ = await GOOGLE.upstream(svc).authorization_url(svc.settings.issuer + callback_path)
    pending.update(secrets_, browser=get_cookie(request, CSRF_COOKIE) or "", exp=svc.clock() + STATE_SECONDS)
    await bridge.run(svc.store.set, STATE + secrets_["state"], pending, STATE_SECONDS)
    return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})


async def _pending(request: Request, mode: str) -> dict | None:
    """The stored redirect this callback answers (once), if it was this browser's."""
    svc = request.app.state.svc
    state = request.query_params.get("state") or ""
    pending = await bridge.run(svc.store.take, STATE + state) if state else None
    # Its own expiry, on the provider's clock: the store's TTL only collects garbage.
    if pending is None or pending.get("mode") != mode or pending.get("exp", 0) < svc.clock():
        return None
    cookie = get_cookie(request, CSRF_COOKIE) or ""
    if not pending.get("browser") or not hmac.compare_digest(cookie.encode(), pending["browser"].encode()):
        return None
    return pending


# -- login -----------------------------------------------------------------------------------
async def login_start(request: Request) -> Response:
    svc = request.app.state.svc
    tx = await login._transaction(request, request.query_params.get("tx"))
    if tx is None or not GOOGLE.enabled(svc) or not await _offered(svc, tx):
        return login._expired(request)
    try:
        response = await _redirect(request, LOGIN_CALLBACK, {"mode": "login", "tx": tx["id"]})
    except UpstreamError as exc:
        log.warning("upstream login could not start: %s", exc)
        response = _login_page(tx, exc.key)
    await bridge.run(svc.transactions.save, tx)
    return response


async def login_callback(request: Request) -> Response:
    svc = request.app.state.svc
    pending = await _pending(request, "login")
    tx = await login._transaction(request, pending["tx"]) if pending else None
    if tx is None or not await _offered(svc, tx):
        return login._expired(request)
    seen = {**who(request), "client_id": tx["client_id"], "method": GOOGLE.name}
    upstream = GOOGLE.upstream(svc)
    try:
        claims = await upstream.finish(request.query_params, pending, svc.clock())
    except UpstreamError as exc:
        log.warning("upstream login failed: %s", exc)
        await svc.db.call(svc.audit.record, "login.failure", reason=exc.key, **seen)
        response = _login_page(tx, exc.key)
        await bridge.run(svc.transactions.save, tx)
        return response
    account = await run_in_threadpool(_bound_account, svc, external_id(upstream.issuer, claims["sub"]))
    if account is None:
        # Nobody's account: the address only masked, as the mail log shows addresses.
        await svc.db.call(svc.audit.record, "login.failure", username=masked(claims["email"]) if claims.get("email")
                          else claims["sub"], reason="google.unbound", **seen)
        response = _login_page(tx, "google.unbound")
    elif tx.get("account") and tx["account"] != account.id:
        response = _login_page(tx, "google.other_person")
    else:
        flow.record_factor(tx, GOOGLE, account, svc.clock())
        # Always followed by the OTP step (``flow.next_step``): the page shows the bound
        # possession factor first (the login page would otherwise open with another form).
        _, _, step = await login.load(svc, tx)
        second = next((f for f in step.factors if f.possession), None) if step and step.kind == "factor" else None
        response = _login_page(tx)
        if second is not None:
            response = RedirectResponse(f"/login?tx={tx['id']}&factor={second.name}", status_code=303)
    await bridge.run(svc.transactions.save, tx)
    return response


def _bound_account(svc, external: str) -> Account | None:
    with svc.db.session() as session:
        account = session.execute(select(Account).join(Binding).where(
            Binding.factor == GOOGLE.name, Binding.external_id == external)).scalar_one_or_none()
        if account is not None:
            session.expunge(account)
        return account


# -- binding from the settings page --------------------------------------------------------------
def _settings(error: str | None = None, notice: str | None = None) -> RedirectResponse:
    return RedirectResponse(f"/account?error={error}" if error else f"/account?notice={notice}", status_code=303)


@account_post  # a POST with the CSRF token: a link from elsewhere binds nothing
async def bind_start(request: Request, account, form) -> Response:
    svc = request.app.state.svc
    if not GOOGLE.enabled(svc):
        return error_page(request, "error.not_found.title", "error.not_found.detail", status=404)
    if not any(b.factor in BIND_NEEDS for b in account.bindings):
        return _settings(error="google_needs_otp")
    try:
        return await _redirect(request, BIND_CALLBACK, {"mode": "bind", "account": account.id})
    except UpstreamError as exc:
        log.warning("upstream binding could not start: %s", exc)
        return _settings(error=exc.key.replace(".", "_"))


async def bind_callback(request: Request) -> Response:
    account = await require_account(request)
    if isinstance(account, Response):
        return account
    svc = request.app.state.svc
    pending = await _pending(request, "bind")
    if pending is None or pending["account"] != account.id:
        return _settings(error="google_expired")
    seen = {**who(request), "method": GOOGLE.name}
    upstream = GOOGLE.upstream(svc)
    try:
        claims = await upstream.finish(request.query_params, pending, svc.clock())
    except UpstreamError as exc:
        log.warning("upstream binding failed: %s", exc)
        await svc.db.call(svc.audit.record, "binding.refused", account_id=account.id, username=account.username,
                          reason=exc.key, **seen)
        return _settings(error=exc.key.replace(".", "_"))
    external = external_id(upstream.issuer, claims["sub"])
    error, replaced = await run_in_threadpool(_bind, svc, account.id, external, claims)
    if error:
        await svc.db.call(svc.audit.record, "binding.refused", account_id=account.id, username=account.username,
                          reason=error, **seen)
        return _settings(error=error)
    await svc.db.call(svc.audit.record, "binding.replaced" if replaced else "binding.created", account_id=account.id,
                      username=account.username, upstream=external, **seen)
    return _settings(notice="google_bound")


def _bind(svc, account_id: str, external: str, claims: dict):
    """(error or None, whether an older Google binding was replaced)."""
    try:
        with svc.db.session() as session:
            # Locked: of two rebinds at once (two tabs), the second sees the first's binding and
            # replaces it, where both would otherwise delete the same old one and add their own.
            account = session.get(Account, account_id, options=[selectinload(Account.bindings)], with_for_update=True)
            owner = session.execute(select(Binding.account_id).where(
                Binding.factor == GOOGLE.name, Binding.external_id == external)).scalar_one_or_none()
            if owner is not None and owner != account_id:
                return "google_elsewhere", False
            old = [b for b in account.bindings if b.factor == GOOGLE.name]
            for binding in old:
                session.delete(binding)  # rebinding replaces (M3: another Google account)
            session.flush()
            label = str(claims.get("email") or claims.get("name") or claims["sub"])[:200]
            session.add(Binding(account_id=account_id, factor=GOOGLE.name, external_id=external, label=label,
                                data={"issuer": external.rsplit("|", 1)[0], "sub": claims["sub"],
                                      "email": claims.get("email")}))
            return None, bool(old)
    except IntegrityError:  # bound elsewhere meanwhile (uq_binding_external)
        return "google_elsewhere", False


routes = [
    Route("/login/google", login_start),
    Route(LOGIN_CALLBACK, login_callback),
    Route("/account/google", bind_start, methods=["POST"]),
    Route(BIND_CALLBACK, bind_callback),
]
