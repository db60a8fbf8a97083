"""The administration area (SPEC M7): find accounts, see their state, bindings
and activity (M6), create and disable them, unlock them, reset their bindings
and enable one-day passwords (A7).

Who administers whom:

- an account with ``admin`` (``idp users admin USERNAME``) administers every account;
- an AA account (``kind == "aa"``) administers the personal accounts of its own
  organisation (``org``): never another organisation's, never an AA or an
  admin account; an AA account without an organisation administers nothing;
- anyone else gets 403.

An account outside one's scope is "not found" (404) on every page and action,
so an AA account cannot even learn that it exists.

Every page goes through ``require_account``: the session and a second factor
proven within ``reverify_seconds`` (M2). Actions are POST forms carrying the
CSRF token and redirect back (POST-redirect-GET); each writes an audit event
whose ``account_id`` is the target account and whose detail names the
administrator (``by``), with the address and browser of the request.

Creating an account: the administrator types an initial password that must
pass the policy; it is stored as already expired (``password_changed_at`` at
the epoch), so the user's first password login asks for a new one before
anything else (``idp.flow``; as long as ``IDP_PASSWORD_MAX_AGE_DAYS`` is not
0). The administrator never sees the password the user will use.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import func, or_, select
from sqlalchemy.orm import selectinload
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from idp import accounts, bridge
from idp.accounts import AccountError, create_account, password_expired, set_disabled
from idp.factors import lock_ends, methods, one_day
from idp.mail import MailError, masked
from idp.storage.db import unicode_lower
from idp.storage.models import Account
from idp.web.account import activity, require_account
from idp.web.forms import BadRequest, read_form
from idp.web.i18n import translate
from idp.web.pages import csrf_ok, error_page, locale_of, render, who

PAGE_SIZE = 20
MAX_QUERY = 100
# An administrator's initial password is stored as changed at the epoch: expired, so it must be changed.
EXPIRED = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


@dataclass
class Role:
    """What an administrator may see and do."""

    account: Account
    everything: bool  # an admin account
    org: str | None  # an AA account's organisation

    @property
    def kinds(self) -> tuple[str, ...]:
        """What it may create: an AA account creates personal accounts only."""
        return ("personal", "aa", "admin") if self.everything else ("personal",)

    def scope(self, query):
        if self.everything:
            return query
        return query.where(Account.kind == "personal", Account.admin.is_(False), Account.org == self.org)

    def manages(self, target: Account) -> bool:
        if self.everything:
            return True
        return target.kind == "personal" and not target.admin and target.org == self.org


def role_of(account: Account) -> Role | None:
    if account.admin:
        return Role(account, True, None)
    if account.kind == "aa" and account.org:
        return Role(account, False, account.org)
    return None


async def _admin(request: Request):
    """The administrator's ``Role``, or the Response to send instead (sign in, or 403)."""
    account = await require_account(request)
    if isinstance(account, Response):
        return account
    role = role_of(account)
    if role is None:
        return error_page(request, "admin.forbidden.title", "admin.forbidden.detail", status=403)
    return role


async def _posted(request: Request):
    """(role, form) of an admin POST, or the Response to send instead: a malformed
    body or a wrong CSRF token changes nothing."""
    role = await _admin(request)
    if isinstance(role, Response):
        return role
    try:
        form = dict(await read_form(request))
    except BadRequest as e:
        return error_page(request, "error.bad_request.title", "error.bad_request.detail", status=e.status)
    if not csrf_ok(request, form):
        return error_page(request, "admin.csrf.title", "admin.csrf.detail", status=400)
    return role, form


def _page(request: Request) -> int:
    page = request.query_params.get("page", "1")
    return int(page) if page.isascii() and page.isdigit() and 0 < int(page) < 100_000 else 1


def _not_found(request: Request) -> Response:
    return error_page(request, "admin.not_found.title", "admin.not_found.detail", status=404)


async def _audit(request: Request, role: Role, event: str, account_id: str, username: str, **detail) -> None:
    """The event of an administrator's action: about the target account, ``by`` the administrator."""
    svc = request.app.state.svc
    await svc.db.call(svc.audit.record, event, account_id=account_id, username=username, method="admin",
                      by=role.account.id, **who(request), **detail)


def _load(svc, role: Role, account_id: str) -> Account | None:
    """The account, with its bindings, if ``role`` administers it."""
    if not account_id or len(account_id) > 36:
        return None
    with svc.db.session() as session:
        account = session.get(Account, account_id, options=[selectinload(Account.bindings)])
        if account is None or not role.manages(account):
            return None
        session.expunge(account)
        return account


async def _target(request: Request, role: Role) -> Account | None:
    return await run_in_threadpool(_load, request.app.state.svc, role, request.path_params["account_id"])


async def _posted_about(request: Request):
    """(role, target account) of an admin POST about one account, or the Response to send
    instead (``_posted``'s, or not found: no such account, or not one this role administers)."""
    posted = await _posted(request)
    if isinstance(posted, Response):
        return posted
    role, _ = posted
    target = await _target(request, role)
    return (role, target) if target is not None else _not_found(request)


def _taipei_time(until: float | None) -> str | None:
    return lock_ends(until).strftime("%Y-%m-%d %H:%M") if until else None


# -- the account list ----------------------------------------------------------------------
def _search(svc, role: Role, q: str, page: int) -> tuple[list[Account], int, int]:
    query = role.scope(select(Account))
    if q:
        needle = q.lower()
        query = query.where(or_(*(unicode_lower(column).contains(needle, autoescape=True)
                                  for column in (Account.username, Account.name, Account.email))))
    with svc.db.session() as session:
        total = session.execute(select(func.count()).select_from(query.subquery())).scalar_one()
        rows = session.execute(query.order_by(Account.username).offset((page - 1) * PAGE_SIZE).limit(PAGE_SIZE)).scalars().all()
        session.expunge_all()
    return rows, total, max(1, -(-total // PAGE_SIZE))


async def index(request: Request) -> Response:
    role = await _admin(request)
    if isinstance(role, Response):
        return role
    svc = request.app.state.svc
    q = request.query_params.get("q", "").strip()[:MAX_QUERY]
    page = _page(request)
    rows, total, pages = await run_in_threadpool(_search, svc, role, q, page)
    locked = await bridge.run(_locks, svc, rows)
    return render(request, "admin.html", role=role, account=role.account, rows=rows, locked=locked, q=q, page=page,
                  pages=pages, total=total, flash={"params": {}})


# -- one account -------------------------------------------------------------------------------
NOTICES = {"created", "disabled", "enabled", "unlocked", "bindings_reset", "bindings_reset_new_password", "one_day_sent"}
ERRORS = {"self", "mail_failed", "no_email", "disabled", "no_password"}


def _locks(svc, rows) -> dict[str, str | None]:
    """When each listed account's lockout ends (Taiwan time), or None."""
    return {a.id: _taipei_time(svc.lockout.locked_until(a.username)) for a in rows}


def _back(target_id: str, notice: str | None = None, error: str | None = None) -> RedirectResponse:
    query = f"?notice={notice}" if notice else f"?error={error}" if error else ""
    return RedirectResponse(f"/admin/accounts/{target_id}{query}", status_code=303)


async def account_page(request: Request) -> Response:
    role = await _admin(request)
    if isinstance(role, Response):
        return role
    svc = request.app.state.svc
    target = await _target(request, role)
    if target is None:
        return _not_found(request)
    page = _page(request)
    found = await run_in_threadpool(activity, svc, target.id, page)
    now = svc.clock()
    flash = {"params": {}}
    notice, error = request.query_params.get("notice"), request.query_params.get("error")
    if notice in NOTICES:
        flash["notice"] = f"admin.notice.{notice}"
        if notice == "one_day_sent":
            flash["params"] = {"email": masked(target.email or ""), "day": str(target.one_day_valid_on or "")}
    if error in ERRORS:
        flash["error"] = f"admin.error.{error}"
    expired = bool(target.password_hash) and password_expired(
        target, svc.settings.password_max_age_days, dt.datetime.fromtimestamp(now, dt.timezone.utc))
    locked_until = await bridge.run(svc.lockout.locked_until, target.username)
    return render(
        request, "admin_account.html", role=role, account=role.account, target=target, methods=methods(target),
        locked_until=_taipei_time(locked_until), password_expired=expired,
        one_day_today=one_day.usable_today(target, now), page=page, flash=flash, **found,
    )


async def _disable(request: Request, value: bool) -> Response:
    posted = await _posted_about(request)
    if isinstance(posted, Response):
        return posted
    role, target = posted
    svc = request.app.state.svc
    if value and target.id == role.account.id:
        return _back(target.id, error="self")
    target = await run_in_threadpool(set_disabled, svc, target.id, value, role.manages)
    if target is None:
        return _not_found(request)
    # A disabled account's session no longer opens anything: the account area, a new login
    # at a portal and the token endpoint all check the flag (or its mark in the store).
    await _audit(request, role, "account.disabled" if value else "account.enabled", target.id, target.username)
    return _back(target.id, notice="disabled" if value else "enabled")


async def disable(request: Request) -> Response:
    return await _disable(request, True)


async def enable(request: Request) -> Response:
    return await _disable(request, False)


async def unlock(request: Request) -> Response:
    posted = await _posted_about(request)
    if isinstance(posted, Response):
        return posted
    role, target = posted
    await bridge.run(request.app.state.svc.lockout.clear, target.username)
    await _audit(request, role, "account.unlocked", target.id, target.username)
    return _back(target.id, notice="unlocked")


async def reset_bindings(request: Request) -> Response:
    """Delete every binding: the user's next login goes through forced binding (M1)."""
    posted = await _posted_about(request)
    if isinstance(posted, Response):
        return posted
    role, target = posted
    count, forgotten = await run_in_threadpool(accounts.reset_bindings, request.app.state.svc, target.id)
    await _audit(request, role, "bindings.reset", target.id, target.username, deleted=count, password_forgotten=forgotten)
    return _back(target.id, notice="bindings_reset_new_password" if forgotten else "bindings_reset")


async def one_day_password(request: Request) -> Response:
    """Mail the account a check code for today (SPEC A7)."""
    posted = await _posted_about(request)
    if isinstance(posted, Response):
        return posted
    role, target = posted
    svc = request.app.state.svc
    try:
        info = await run_in_threadpool(one_day.enable, svc, target.id)
    except one_day.OneDayError as e:
        return _not_found(request) if e.reason == "no_account" else _back(target.id, error=e.reason)
    except MailError:
        return _back(target.id, error="mail_failed")
    await _audit(request, role, "one_day.enabled", target.id, target.username, day=info["day"].isoformat())
    return _back(target.id, notice="one_day_sent")


# -- creating an account -------------------------------------------------------------------------
def _new_page(request: Request, role: Role, values: dict | None = None, flash: dict | None = None, status: int = 200):
    values = {"username": "", "name": "", "email": "", "kind": "personal", "org": "", **(values or {})}
    return render(request, "admin_new.html", status=status, role=role, account=role.account, values=values,
                  flash=flash or {"params": {}}, here=URL("/admin/new"))


async def new_page(request: Request) -> Response:
    role = await _admin(request)
    if isinstance(role, Response):
        return role
    return _new_page(request, role)


def _create(svc, role: Role, values: dict, password: str) -> str:
    kind = values["kind"]
    with svc.db.session() as session:
        account = create_account(
            session, svc.passwords, values["username"], password, now=EXPIRED,
            name=values["name"] or values["username"], email=values["email"] or None, email_verified=False,
            kind="aa" if kind == "aa" else "personal", admin=kind == "admin", org=values["org"] or None,
        )
        return account.id


async def create(request: Request) -> Response:
    posted = await _posted(request)
    if isinstance(posted, Response):
        return posted
    role, form = posted
    svc = request.app.state.svc
    values = {key: (form.get(key) or "").strip() for key in ("username", "name", "email", "kind", "org")}
    if not role.everything:
        values["org"] = role.org  # an AA account creates accounts of its own organisation only

    def again(error: str, status: int = 400, rules=(), **params):
        return _new_page(request, role, values, {"error": error, "params": params, "rules": list(rules)}, status)

    if values["kind"] not in role.kinds:
        return again("admin.error.kind")
    password, repeated = form.get("password") or "", form.get("password_again") or ""
    if password != repeated:
        return again("password.mismatch")
    try:
        account_id = await run_in_threadpool(_create, svc, role, values, password)
    except AccountError as e:
        params = {k: v for k, v in e.params.items() if k != "rules"}
        if "field" in params:  # the form's own name for it
            params["field"] = translate(locale_of(request), "admin.col." + params["field"])
        return again(e.key, rules=e.params.get("rules", ()), **params)
    await _audit(request, role, "account.created", account_id, values["username"], kind=values["kind"], org=values["org"] or None)
    return _back(account_id, notice="created")


routes = [
    Route("/admin", index),
    Route("/admin/new", new_page),
    Route("/admin/new", create, methods=["POST"]),
    Route("/admin/accounts/{account_id}", account_page),
    Route("/admin/accounts/{account_id}/disable", disable, methods=["POST"]),
    Route("/admin/accounts/{account_id}/enable", enable, methods=["POST"]),
    Route("/admin/accounts/{account_id}/unlock", unlock, methods=["POST"]),
    Route("/admin/accounts/{account_id}/reset-bindings", reset_bindings, methods=["POST"]),
    Route("/admin/accounts/{account_id}/one-day-password", one_day_password, methods=["POST"]),
]
