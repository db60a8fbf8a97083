"""The login pages: one login transaction, one step at a time (see ``idp.flow``).

Every POST does its one step and asks ``next_step`` what comes next. A factor
that succeeded answers with what follows in the same response: the next
step's page, or, when nothing is left, the redirect to the client; posting it
again (a reload) shows the login where it is and proves nothing twice. Failed
factors and the account actions (binding, a new password, consent) redirect
(303) to ``GET /login`` instead, which shows the next page; an error kept in
the transaction is shown there once, with the user's input kept, so a reload
repeats no guess.
"""

from __future__ import annotations

import datetime as dt
import hmac
from urllib.parse import urlencode, urlsplit

from authlib.oauth2.rfc6749.errors import OAuth2Error
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from idp import acr, bridge, captcha, flow
from idp.accounts import AccountError, change_password, with_bindings
from idp.factors import FACTORS, certificate, methods
from idp.factors.totp import TOTP, Enrolment
from idp.protocol import claims, logout as logout_
from idp.protocol.server import Request as OAuthRequest
from idp.protocol.tokens import ended_by_account, not_before_mark
from idp.storage.kv import Batch
from idp.storage.models import Account, Consent
from idp.web.forms import BadRequest, read_form
from idp.web.i18n import translate
from idp.web.pages import CSRF_COOKIE, captcha_png, csrf_ok, error_page, get_cookie, render, set_cookie, who

SESSION_COOKIE = "idp_session"


def _tx_url(tx: dict, **extra) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"tx": tx["id"], **extra}.items())
    return f"/login?{query}"


def _again(tx: dict) -> RedirectResponse:
    return RedirectResponse(_tx_url(tx), status_code=303)


class Console:
    """The "client" of a login for the provider's own pages (the account area)."""

    client_id = None
    name = "account.console"
    first_party = True
    minimum_acr = None

    def allows(self, factor: str) -> bool:
        return True

    def shown_name(self, locale: str) -> str:
        return translate(locale, self.name)

    def shown_page(self, field: str, locale: str) -> None:
        return None  # the provider's own pages: no client's policy, terms or logo to show

    def logo_origins(self) -> list[str]:
        return []


async def load(svc, tx: dict):
    """The client, the transaction's account (None before the first factor) and the next
    step (None when the client is gone)."""
    client = await svc.server.client(tx["client_id"]) if tx["client_id"] else Console()
    account = await svc.db.call(with_bindings, svc, account_id=tx["account"]) if tx["account"] else None
    step = await flow.next_step(svc, tx, account, client) if client else None
    return client, account, step


def _browser_matches(request: Request, tx: dict) -> bool:
    cookie = get_cookie(request, CSRF_COOKIE) or ""
    return hmac.compare_digest(cookie.encode(), tx["browser"].encode())


async def _transaction(request: Request, tx_id: str | None):
    svc = request.app.state.svc
    tx = await bridge.run(svc.transactions.get, tx_id)
    if tx is None or not _browser_matches(request, tx):
        return None
    return tx


async def _posted(request: Request, *, need_account: bool = True):
    """(form, tx) of a POST to a login page; (None, None) when the body is malformed,
    the CSRF token wrong, or the transaction gone or another browser's."""
    try:
        form = dict(await read_form(request))
    except BadRequest:
        return None, None
    tx = await _transaction(request, form.get("tx"))
    if tx is None or (need_account and not tx.get("account")) or not csrf_ok(request, form):
        return None, None
    return form, tx


async def _posted_at(request: Request, kind: str, action: str | None = None):
    """(form, tx, client, account) of a POST to the step ``kind`` (``action``: which one), only
    while the login is at that step; else the response: the login's current step, or the
    expiry page. No step is taken before those it follows: a password alone neither changes
    the password nor consents for the account."""
    form, tx = await _posted(request)
    if tx is None:
        return _expired(request)
    svc = request.app.state.svc
    client, account, step = await load(svc, tx)
    if step is None:
        return _expired(request)
    if step.kind != kind or step.action != action:
        return await _elsewhere(svc, tx, account)
    return form, tx, client, account


async def _elsewhere(svc, tx: dict, account) -> Response:
    """The answer to a form of a step the login is no longer at: the login is alive where it
    is now. One whose proofs were dropped (``flow.within_policy``, ``without_password``,
    ``within_day``) started over, and says so."""
    if account is not None and tx["account"] is None:
        tx["flash"] = {"notice": "login.restarted", "params": {}}
        await bridge.run(svc.transactions.save, tx)
    return _again(tx)


def _expired(request: Request):
    return error_page(request, "error.tx_expired.title", "error.tx_expired.detail")


async def login_page(request: Request) -> Response:
    tx = await _transaction(request, request.query_params.get("tx"))
    if tx is None:
        return _expired(request)
    return await advance(request, tx)


async def advance(request: Request, tx: dict, *, interactive: bool = True) -> Response:
    """Show the page of the next step, or finish the login."""
    client, account, step = await load(request.app.state.svc, tx)
    if client is None:
        return _expired(request)
    return await show(request, tx, client, account, step, interactive=interactive)


async def show(request: Request, tx: dict, client, account, step, *, interactive: bool = True,
               writes: Batch | None = None) -> Response:
    """The page of ``step``, or the end of the login when it is done. ``writes``: what the
    step before left to write, sent with this page's own writes (the transaction's)."""
    svc = request.app.state.svc
    writes = writes or Batch()
    if step.kind == "done":
        return await finish(request, tx, account, client, writes)
    if step.kind in ("unmet", "disabled") or not interactive:
        await bridge.run(svc.store.write, writes)  # the login ends without a write of its own to join
    if step.kind == "unmet":  # with prompt=none too: no interaction could meet it (RFC 9470 3)
        return await respond_error(request, tx, "unmet_authentication_requirements",
                                   "The account has no factor that reaches the required assurance.")
    if not interactive:
        error = {"consent": "consent_required", "factor": "login_required" if tx["account"] is None else "interaction_required"}
        return await respond_error(request, tx, error.get(step.kind, "interaction_required"))
    if step.kind == "disabled":
        # A factor proven for an account disabled since (Google's callback, another tab): in its
        # activity log (M6), as the factors that refuse it themselves record it.
        await svc.db.call(svc.audit.record, "login.disabled", account_id=account.id, username=account.username,
                          client_id=tx["client_id"], method="+".join(tx["done"]) or None, **who(request))
        await bridge.run(svc.transactions.drop, tx)
        return error_page(request, "error.disabled.title", "error.disabled.detail", status=403)

    flash = tx.pop("flash", None) or {}
    # ``here``: where this page is again, for a reload in another language (this may answer a POST).
    context = {"tx": tx, "client": client, "account": account, "flash": flash, "ui_locales": tx.get("ui_locales"),
               "here": URL(_tx_url(tx))}
    if step.kind == "factor":
        wanted = request.query_params.get("factor")
        factor = next((f for f in step.factors if f.name == wanted), step.factors[0])
        context["here"] = URL(_tx_url(tx, factor=factor.name))
        if captcha.wanted(svc, tx):
            tx["captcha"] = captcha.new_answer()
        shown = await bridge.run(factor.context, svc, tx, account)  # before the save: it may add to tx
        svc.transactions.save(tx, writes)
        await bridge.run(svc.store.write, writes)
        page = {**context, **shown, **flash.get("keep", {})}
        page["img_src"] = " ".join([page.get("img_src", ""), *client.logo_origins()]).strip()  # its logo
        return render(request, factor.template, factor=factor, factors=step.factors,
                      offered={f.name for f in step.factors}, lost_phone=flow.lost_phone(tx, account), **page)
    svc.transactions.save(tx, writes)
    await bridge.run(svc.store.write, writes)
    if step.kind == "action":
        extra = await run_in_threadpool(_bind_page, svc, tx, account, client) if step.action == "bind" else {}
        return render(request, f"action_{step.action}.html", **context, **extra)
    return render(request, "consent.html", scopes=sorted(flow.requested_scope(tx, client)), **context)


async def factor_submit(request: Request) -> Response:
    svc = request.app.state.svc
    factor = FACTORS.get(request.path_params["factor"])
    form, tx = await _posted(request, need_account=False)
    if tx is None or factor is None:
        return _expired(request)
    client, account, step = await load(svc, tx)
    if step is None:
        return _expired(request)
    if factor.name in tx["done"]:  # posted again: a factor never counts twice
        return await show(request, tx, client, account, step)
    if step.kind != "factor" or factor not in step.factors:  # only a factor this step offers
        return await _elsewhere(svc, tx, account)
    outcome = await factor.verify(request, svc, tx, form, account)
    writes = outcome.writes or Batch()
    if not outcome.ok:
        tx["failures"] = tx.get("failures", 0) + 1
        tx["flash"] = {"error": outcome.error, "params": outcome.params, "keep": outcome.keep}
        svc.transactions.save(tx, writes)
        await bridge.run(svc.store.write, writes)
        return RedirectResponse(_tx_url(tx, factor=factor.name), status_code=303)
    if account is None or account.id != outcome.account_id:  # a first factor: who it proved
        account = outcome.account or await svc.db.call(with_bindings, svc, account_id=outcome.account_id)
    flow.record_factor(tx, factor, account, svc.clock(), outcome.amr)
    return await proceed(request, tx, account, client, writes)


async def proceed(request: Request, tx: dict, account: Account, client, writes: Batch | None = None) -> Response:
    """After a step that succeeded: the next step's page, or the end of the login, in this
    response (no round trip through ``GET /login``)."""
    svc = request.app.state.svc
    step = await flow.next_step(svc, tx, account, client)
    return await show(request, tx, client, account, step, writes=writes)


# -- forced binding (SPEC M1) -------------------------------------------------------------
def _bind_page(svc, tx, account, client) -> dict:
    """The bindings this client takes (``flow.bindings``)."""
    offered, page = flow.bindings(account, client), {"methods": methods(account)}
    if TOTP.name in offered:
        enrolment = Enrolment(svc)
        page["otp"] = enrolment.page(account, enrolment.start(account, _qr_owner(tx)))
    if certificate.CERTIFICATE.name in offered:
        page.update(challenge=certificate.issue_challenge(svc, "tx:" + tx["id"]), **certificate.component(svc))
    return page


def _qr_owner(tx: dict) -> str:
    """The owner of the binding QR's pending secret: this login, not the account (SPEC A2)."""
    return "tx:" + tx["id"]


async def bind_otp(request: Request) -> Response:
    """Confirm the QR's secret with one code; then, as the seeds show, log in again with it."""
    svc = request.app.state.svc
    posted = await _posted_at(request, "action", "bind")
    if isinstance(posted, Response):
        return posted
    form, tx, client, account = posted
    if TOTP.name not in flow.bindings(account, client):
        return _again(tx)
    error = await run_in_threadpool(Enrolment(svc).confirm, tx["account"], _qr_owner(tx), form.get("otp"))
    if error:
        tx["flash"] = {"error": error, "params": {}}
        await bridge.run(svc.transactions.save, tx)
        return _again(tx)
    await svc.db.call(svc.audit.record, "binding.created", account_id=tx["account"], username=tx["username"],
                      client_id=tx["client_id"], method="otp", **who(request))
    tx.update(account=None, amr=[], proofs={}, done=[], sid=None, auth_time=None,
              flash={"notice": "otp.bound_relogin", "params": {}})
    await bridge.run(svc.transactions.save, tx)
    return _again(tx)


async def bind_certificate(request: Request) -> Response:
    """Bind the card that signed this page's challenge instead of OTP; then, as after OTP, log
    in again with it."""
    svc = request.app.state.svc
    posted = await _posted_at(request, "action", "bind")
    if isinstance(posted, Response):
        return posted
    form, tx, client, account = posted
    if certificate.CERTIFICATE.name not in flow.bindings(account, client):
        return _again(tx)
    identity, error, _ = await certificate.bind_card(svc, form, "tx:" + tx["id"], account)
    seen = {**who(request), "client_id": tx["client_id"], "method": certificate.CERTIFICATE.name}
    if error is not None:
        await svc.db.call(svc.audit.record, "binding.refused", account_id=account.id, username=account.username,
                          **seen, reason=error[0])
        tx["flash"] = {"error": error[1], "params": {}}
        await bridge.run(svc.transactions.save, tx)
        return _again(tx)
    await svc.db.call(svc.audit.record, "binding.created", account_id=account.id, username=account.username, **seen,
                      certificate=certificate.binding_id(identity), fingerprint=identity.fingerprint_sha256)
    tx.update(account=None, amr=[], proofs={}, done=[], sid=None, auth_time=None,
              flash={"notice": "certificate.bound_relogin", "params": {}})
    await bridge.run(svc.transactions.save, tx)
    return _again(tx)


async def rebuild_otp(request: Request) -> Response:
    """A new QR code: a new version; the previous pending secret stops working."""
    svc = request.app.state.svc
    posted = await _posted_at(request, "action", "bind")
    if isinstance(posted, Response):
        return posted
    _, tx, _, account = posted
    # The version's row is locked: off the event loop.
    await run_in_threadpool(Enrolment(svc).start, account, _qr_owner(tx), rebuild=True)
    return _again(tx)


async def password_change(request: Request) -> Response:
    """The expired-password step: a new password that meets the policy, typed twice."""
    svc = request.app.state.svc
    posted = await _posted_at(request, "action", "password_change")
    if isinstance(posted, Response):
        return posted
    form, tx, _, _ = posted
    new, again = form.get("new_password") or "", form.get("new_password_again") or ""
    error = None
    if not hmac.compare_digest(new.encode(), again.encode()):
        error = {"error": "password.mismatch", "params": {}}
    else:
        try:
            await run_in_threadpool(_change_password, svc, tx["account"], new)
        except AccountError as e:
            error = {"error": e.key, "params": {}, "rules": e.params.get("rules", [])}
    if error:
        tx["flash"] = error
        await bridge.run(svc.transactions.save, tx)
        return _again(tx)
    await svc.db.call(svc.audit.record, "password.changed", account_id=tx["account"], username=tx["username"],
                      client_id=tx["client_id"], **who(request), method="expired")
    return _again(tx)


def _change_password(svc, account_id, new):
    with svc.db.session() as session:
        account = session.get(Account, account_id)
        change_password(account, svc.passwords, new, now=dt.datetime.fromtimestamp(svc.clock(), dt.timezone.utc))


async def consent(request: Request) -> Response:
    svc = request.app.state.svc
    posted = await _posted_at(request, "consent")
    if isinstance(posted, Response):
        return posted
    form, tx, client, _ = posted
    if form.get("decision") != "allow":
        return await respond_error(request, tx, "access_denied", "The user declined.")
    # Kept at the login's end (``finish``), with the code: a login that does not end well
    # (its session ended meanwhile) leaves no consent behind either.
    tx["consented"] = {"scope": " ".join(sorted(flow.requested_scope(tx, client)))}
    await bridge.run(svc.transactions.save, tx)
    return _again(tx)


def _save_consent(svc, account_id, client_id, scope):
    for retry in (False, True):
        try:
            with svc.db.session() as session:
                row = session.get(Consent, (account_id, client_id), with_for_update=True)
                if row is None:
                    session.add(Consent(account_id=account_id, client_id=client_id, scope=scope))
                else:
                    row.scope = " ".join(sorted(set(row.scope.split()) | set(scope.split())))
            return
        except IntegrityError:  # another login (a second tab) added it meanwhile: add to that one
            if retry:
                raise


async def cancel(request: Request) -> Response:
    form, tx = await _posted(request, need_account=False)
    if tx is None:
        return _expired(request)
    return await respond_error(request, tx, "access_denied", "The user cancelled the login.")


async def captcha_image(request: Request) -> Response:
    """The image of a login transaction's captcha (``tx``) or of a form's (``form``)."""
    svc = request.app.state.svc
    if "form" in request.query_params:
        answer = await bridge.run(captcha.form_answer, svc, request.query_params["form"])
    else:
        tx = await _transaction(request, request.query_params.get("tx"))
        answer = tx.get("captcha") if tx else None
    if not answer:
        return Response(status_code=404)
    return await captcha_png(answer)


# -- ending the login ----------------------------------------------------------------
def _authorization_request(svc, tx: dict) -> OAuthRequest:
    return OAuthRequest("GET", svc.settings.issuer + "/authorize", {}, tx["params"], [])


async def finish(request: Request, tx: dict, account: Account, client, earlier: Batch) -> Response:
    """Set the SSO session and send an authorization code back to the client: the session,
    the code and the transaction's end are written in one round trip (with ``earlier``, what
    the step before left), once the code's request has passed its checks again. A stored
    transaction is claimed in that round trip: of two requests ending one login (a double
    submit), one answers with the code, the other as for a login that is over. So is the
    account's not-before mark read there: a login whose first proof is older than the end of
    the account's sessions (a reset, log out other browsers) is undone, and proves nothing."""
    svc = request.app.state.svc
    if tx.get("hint_sub") and claims.subject(account.id, client, svc.pairwise_salt) != tx["hint_sub"]:
        # The client named its user (id_token_hint) and someone else logged in: no code for
        # them, whom the client would take for the one it named (OIDC Core 3.1.2.1).
        await bridge.run(svc.store.write, earlier)
        return await respond_error(request, tx, "login_required",
                                   "The user who logged in is not the one id_token_hint names.")
    writes = Batch()
    # What the account area asks to be recent (M2): a bound second factor, or any factor
    # from an account that has none to offer (else it could never get in).
    verified = bool(tx["done"]) and (any(FACTORS[name].possession for name in tx["done"])
                                     or not flow.holds_possession(svc, account))
    session = await bridge.run(svc.sessions.get, get_cookie(request, SESSION_COOKIE))
    built_on = tx.get("sid")
    if built_on and (session is None or session["sid"] != built_on):
        # The session this login built on has ended (a logout): it proves nothing now.
        svc.transactions.drop(tx, earlier)
        await bridge.run(svc.store.write, earlier)
        return _expired(request)
    frames = []  # the front-channel logout URIs of a session this login replaces
    if session and session["account"] != account.id:
        # Another account logs in in this browser: the first one's session ends (its portals
        # are told), in its activity log as a logout (M6).
        ended = await bridge.run(svc.sessions.end, session["sid"], svc.tokens)
        await svc.db.call(svc.audit.record, "logout", account_id=session["account"], username=session["username"],
                          client_id=tx["client_id"], method="replaced", **who(request))
        frames = await run_in_threadpool(logout_.frontchannel_urls, svc, ended) if ended else []
        session = None
    new_session = session is None
    if new_session:
        session = svc.sessions.create(account.id, account.username, tx["amr"], acr.earned(tx["amr"]), tx["auth_time"],
                                      seen=who(request), verified_at=svc.clock() if verified else 0, batch=writes,
                                      proofs=tx.get("proofs"))
    elif tx["done"]:
        # New proof for the same person (step-up or a forced re-login), added to what the
        # session proved before, to other clients too (a client's login sees only its own).
        proofs = {**(session.get("proofs") or {}), **tx.get("proofs", {})}
        amr = flow.amr_of(proofs) if proofs else tx["amr"]
        session.update(amr=amr, proofs=proofs, acr=acr.earned(amr), auth_time=int(tx["auth_time"]))
        if verified:
            session["verified_at"] = svc.clock()
        svc.sessions.renew(session)  # a new cookie: the one before proved less
        svc.sessions.save(session, writes)
    # What the transaction holds: the session's proofs that this client accepts, and the new ones.
    auth = {"sid": session["sid"], "auth_time": int(tx["auth_time"]), "acr": acr.earned(tx["amr"]), "amr": tx["amr"]}
    if (ends := flow.login_ends(tx.get("proofs") or {})) is not None:
        auth["ends"] = ends  # its grant ends then too (``AuthorizationCodeGrant.create_token_response``)
    if verified:
        # Counting starts again only after a login the count's guesses could not have made:
        # one that proved a bound second factor. A password-only login (a client at LOA1)
        # wiping earlier wrong OTPs would let the OTP be guessed two codes at a time.
        svc.lockout.clear(account.username, writes)
    if tx["client_id"] is None:
        response = (frontchannel_page(request, frames, tx["return_to"], client, tx.get("ui_locales")) if frames
                    else RedirectResponse(tx["return_to"], status_code=303))
    else:
        try:  # the replaced session's front-channel portals (``frames``) load their logout first
            response = await _issue_code(request, svc, tx, account, auth, writes, frames)
        except OAuth2Error:  # the client or its redirect URI went away meanwhile: no session, no code
            svc.transactions.drop(tx, earlier)
            await bridge.run(svc.store.write, earlier)
            return _expired(request)
    writes.extend(earlier)
    claim = svc.transactions.claim(tx, writes)
    mark = writes.read(not_before_mark(account.id))
    found = await bridge.run(svc.store.write, writes)
    if found[claim] is None and tx.get("stored"):
        # Another request ended this login first. This one's code was never handed out (it
        # lapses within the minute); a session it made would show in the account's list.
        await _undo(svc, session, new_session)
        return _expired(request)
    seen = {"account_id": account.id, "username": account.username, "client_id": client.client_id, **who(request)}
    if ended_by_account(found[len(writes.takes) + mark], flow.proven_since(tx), session["sid"]):
        await svc.db.call(svc.audit.record, "login.failure", **seen, method="+".join(tx["done"]),
                          reason="sessions.ended")
        await _undo(svc, session, new_session)
        return _expired(request)
    try:  # the login stands: in the activity log, and its consent kept, or nothing of it stays
        # Each portal a login reaches is in the activity log (M6), by single sign-on too.
        event, method = ("login.success", "+".join(tx["done"])) if tx["done"] else ("login.sso", "sso")
        await svc.db.call(svc.audit.record, event, **seen, method=method, acr=auth["acr"])
        if isinstance(tx.get("consented"), dict):  # (True: saved already, by a provider before this one)
            await run_in_threadpool(_save_consent, svc, account.id, client.client_id, tx["consented"]["scope"])
    except Exception:
        await _undo(svc, session, new_session)
        raise
    set_cookie(request, response, SESSION_COOKIE, svc.sessions.cookie(session))
    return response


async def _undo(svc, session: dict, new: bool) -> None:
    """End the session ``finish`` made, if it made one; its code is never handed out, and lapses."""
    if new:
        await bridge.run(svc.sessions.end, session["sid"], svc.tokens)


async def _issue_code(request, svc, tx, account, auth, writes: Batch, frames: list[str]):
    oauth_request = _authorization_request(svc, tx)
    grant = await svc.server.consent_grant(oauth_request, account)  # validated again: the client may have changed
    data = oauth_request.payload.data
    record = {
        "client_id": tx["client_id"],
        "account": account.id,
        "redirect_uri": data.get("redirect_uri"),
        "scope": oauth_request.scope,
        "nonce": data.get("nonce"),
        "code_challenge": data.get("code_challenge"),
        "code_challenge_method": data.get("code_challenge_method"),
        "dpop_jkt": data.get("dpop_jkt"),  # RFC 9449 10: redeemed only with a proof by this key
        "auth": auth,
        # What the ID token says about the account, so the code exchange reads no database.
        "claims": claims.profile(account, oauth_request.scope or ""),
    }
    code = svc.tokens.save_code(record, svc.settings.code_seconds, writes)
    return to_client(request, grant.redirect_uri, [("code", code)], data, frames)


async def respond_error(request: Request, tx: dict, error: str, description: str | None = None) -> Response:
    svc = request.app.state.svc
    await bridge.run(svc.transactions.drop, tx)
    if tx["client_id"] is None:
        return error_page(request, "error.cancelled.title", "error.cancelled.detail")
    oauth_request = _authorization_request(svc, tx)
    try:
        grant = await svc.server.consent_grant(oauth_request)
    except OAuth2Error:  # the client or its redirect URI went away meanwhile
        return _expired(request)
    params = [("error", error)] + ([("error_description", description)] if description else [])
    return to_client(request, grant.redirect_uri, params, oauth_request.payload.data)


def frontchannel_page(request: Request, frames: list[str], target: str | None, client, ui_locales: str | None) -> Response:
    """Front-Channel Logout 1.0: the logged-out page loads each client's logout
    URI in an invisible iframe, then (with a post-logout target) moves on once
    they have loaded, or after a few seconds, or when the user follows the link.
    Only this page may frame those origins."""
    response = render(request, "logged_out.html", ui_locales=ui_locales, client=client, frames=frames, target=target or "")
    return _framing(response, frames)


def _framing(response: Response, frames: list[str]) -> Response:
    """Let ``response``, and only it, frame the origins of ``frames`` (if any)."""
    if frames:
        origins = sorted({"{0.scheme}://{0.netloc}".format(urlsplit(uri)) for uri in frames})
        response.headers["Content-Security-Policy"] += "; frame-src " + " ".join(origins)
    return response


def to_client(request: Request, redirect_uri: str, params: list, data, frames: list[str] = ()) -> Response:
    """The authorization response (RFC 6749 4.1.2), in the requested response mode,
    with ``state`` and ``iss`` (RFC 9207) so the client can tell which server answered;
    after the front-channel logout ``frames`` have loaded, where there are any."""
    svc = request.app.state.svc
    params = list(params)
    if data.get("state"):
        params.append(("state", data["state"]))
    params.append(("iss", svc.settings.issuer))
    if data.get("response_mode") == "form_post":
        return _framing(render(request, "form_post.html", action=redirect_uri, fields=params, frames=frames), frames)
    url = redirect_uri + ("&" if "?" in redirect_uri else "?") + urlencode(params)
    if frames:
        return frontchannel_page(request, frames, url, None, data.get("ui_locales"))
    return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})
