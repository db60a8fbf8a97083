"""What the demo portals share: a small Starlette relying party on authlib's
client that only redirects to the provider and shows what comes back (it never
sees a password or a factor), the back-channel logout receiver, and sensitive
actions that need a stronger, recent login (step-up, SPEC C3).

A portal is a ``Portal``: its name, its folder (its own look:
``templates/base.html``, which fills the brand and footer of the shared
``layout.html``, ``templates/welcome.html``, the logged-out home page's card, and
``static/look.css``, the colours), its cookie and its ``Action``s. ``create_app(portal, ...)`` builds the app; ``main(portal, port)``
runs it from ``PORTAL_*`` environment variables.

Step-up: ``GET /actions/<slug>`` shows the action's form only when the ID token
of the portal's session says the login reached the action's ``acr`` within its
``max_age``; otherwise it sends the browser to the provider with ``acr_values``
and ``max_age`` (the provider asks only for what is missing), and the callback
checks the returned ``acr`` and ``auth_time`` before going on: a weaker login
is refused with a page that says so. ``POST`` checks them again before acting.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import secrets
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jinja2
from authlib.common.urls import add_params_to_uri
from authlib.integrations.starlette_client import OAuth
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.responses import RedirectResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from .backchannel import SESSION_SECONDS, Ended, EndedSessions, backchannel_logout, for_this_portal
from .jwks import PROVIDER_ERRORS, ProviderKeys

try:  # authlib uses httpx2 when installed, else httpx; catch whichever it raises
    import httpx2 as httpx
except ImportError:
    import httpx

log = logging.getLogger(__name__)
HERE = Path(__file__).parent

# The provider's published assurance levels (its discovery's acr_values_supported), weakest first.
LOA1, LOA2, LOA3 = "urn:idp:loa:1", "urn:idp:loa:2", "urn:idp:loa:3"
LADDER = (LOA1, LOA2, LOA3)
ACR_LABELS = {LOA1: "單一因子", LOA2: "雙因子", LOA3: "憑證等級（自然人憑證、行動自然人憑證）"}

TAIPEI = timezone(timedelta(hours=8))  # Taiwan has no daylight saving time
TIME_CLAIMS = {"auth_time", "iat", "exp", "nbf", "updated_at"}

AMR_LABELS = {  # RFC 8176
    "pwd": "密碼", "pin": "PIN 碼", "otp": "一次性密碼", "sms": "簡訊驗證",
    "sc": "智慧卡", "hwk": "硬體金鑰", "swk": "軟體金鑰", "fed": "聯合登入",
    "mfa": "多因子驗證", "mca": "多管道驗證", "user": "使用者確認",
    "face": "臉部辨識", "fpt": "指紋", "geo": "地理位置", "pop": "持有金鑰證明",
}

MESSAGES = {
    "access_denied": "您已取消登入，或身分認證服務拒絕了這次登入。",
    "mismatching_state": "登入請求已逾時或無效（可能重複送出，或瀏覽器封鎖了 Cookie），請重新登入。",
    "provider_unreachable": "目前無法連線至身分認證服務，請稍後再試。",
    "csrf": "表單已失效，請回到首頁後再操作一次。",
    "logout_incomplete": "您已登出本系統，但無法連線至身分認證服務，其他系統的登入狀態可能仍有效。",
    "login_required": "您尚未登入身分認證服務，請重新登入。",
    "unmet_authentication_requirements":
        "您的帳號沒有本系統要求等級的登入方式（例如自然人憑證或行動自然人憑證），身分認證服務無法完成這次登入。"
        "請先至登入設定綁定，或洽系統管理員。",
    "acr_too_low": "此項作業需要憑證等級（自然人憑證或行動自然人憑證）的登入，這次登入的等級不足，本系統未執行此作業。",
    "login_too_old": "此項作業需要剛完成的身分驗證，這次登入的時間已超過時限，本系統未執行此作業。",
}


@dataclass(frozen=True)
class Action:
    """A sensitive action: its form at ``/actions/<slug>`` (``fields``: name, label)
    needs a login of at least ``acr`` proven within ``max_age`` seconds."""

    slug: str
    title: str
    fields: tuple[tuple[str, str], ...]
    acr: str = LOA3
    max_age: int = 300


@dataclass(frozen=True)
class Portal:
    name: str
    folder: Path  # templates/ (base.html, welcome.html) and static/ (look.css)
    cookie: str
    actions: tuple[Action, ...] = ()


def rank(value) -> int:
    return LADDER.index(value) + 1 if value in LADDER else 0


def assurance_problem(user: dict, action: Action, now: float) -> str | None:
    """Why a login (its ID-token claims) is not enough for ``action``, or None."""
    if rank(user.get("acr")) < rank(action.acr):
        return "acr_too_low"
    auth_time = user.get("auth_time")
    if not isinstance(auth_time, (int, float)) or now - auth_time > action.max_age:
        return "login_too_old"
    return None


def roc_time(value):
    """Seconds since the epoch -> 民國 date and time in Taipei."""
    try:
        dt = datetime.fromtimestamp(int(value), TAIPEI)
    except (TypeError, ValueError, OverflowError, OSError):
        return str(value)
    return f"民國 {dt.year - 1911} 年 {dt.month} 月 {dt.day} 日 {dt:%H:%M:%S}"


def claim_value(value):
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _templates(portal: Portal) -> Jinja2Templates:
    # The portal's own templates first; the shared pages (home, action, error) extend its base.html.
    loader = jinja2.ChoiceLoader([jinja2.FileSystemLoader(portal.folder / "templates"),
                                  jinja2.FileSystemLoader(HERE / "templates")])
    templates = Jinja2Templates(env=jinja2.Environment(loader=loader, autoescape=True))
    templates.env.filters.update(roc_time=roc_time, claim_value=claim_value)
    templates.env.globals.update(AMR_LABELS=AMR_LABELS, TIME_CLAIMS=TIME_CLAIMS, ACR_LABELS=ACR_LABELS,
                                 portal=portal)
    return templates


def render(request, name, status_code=200, **context):
    templates = request.app.state.templates
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'self'; base-uri 'none'; frame-ancestors 'none'"
    )
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def error_page(request, status_code, error, description=""):
    message = MESSAGES.get(error, "登入未完成，請重新登入。")
    return render(request, "error.html", status_code, message=message, error=error, description=description,
                  user=request.session.get("user"))


def provider_error(request, exc):
    log.warning("provider error: %r", exc)
    if isinstance(exc, httpx.HTTPError):
        return error_page(request, 502, "provider_unreachable", str(exc))
    error = getattr(exc, "error", None) or type(exc).__name__
    if "error" in request.query_params:
        # An error response: its text comes in the callback's URL, which anyone can write and
        # send, and would read as the portal's own words. A code as OAuth spells one, alone.
        return error_page(request, 400, error if re.fullmatch("[a-z_]{1,64}", error) else "invalid_response")
    description = getattr(exc, "description", None) or str(exc)
    return error_page(request, 400, error, description)


def _csrf_ok(request, form) -> bool:
    sent = str(form.get("csrf", ""))
    expected = request.session.get("csrf", "")
    return bool(expected) and hmac.compare_digest(sent.encode(), expected.encode())


async def home(request):
    # Login settings live at the provider: the portal never handles a factor.
    return render(request, "home.html", user=request.session.get("user"), csrf=request.session.get("csrf"),
                  settings_url=request.app.state.issuer + "/account")


async def _authorize(request, **params):
    try:
        return await request.app.state.oauth.idp.authorize_redirect(
            request, redirect_uri=request.app.state.portal_url + "/callback", **params)
    except PROVIDER_ERRORS as exc:
        return provider_error(request, exc)


async def login(request):
    request.session.pop("pending_action", None)
    return await _authorize(request)


async def callback(request):
    pending = request.app.state.actions.get(request.session.pop("pending_action", None))
    idp = request.app.state.oauth.idp
    try:
        # authlib checks the ID token with the copy of the provider's keys this keeps fresh.
        await request.app.state.provider_keys.get(request.app.state.ended.clock())
        # authlib checks aud only when told to (OIDC Core 3.1.3.7: it must be this portal), and
        # takes a list holding it: the portal must be the only audience too (step 3).
        issuer = (await idp.load_server_metadata())["issuer"]
        token = await idp.authorize_access_token(request, claims_options={
            "iss": {"values": [issuer]},
            "aud": {"essential": True, "validate": lambda _, aud: for_this_portal(aud, idp.client_id)}})
    except PROVIDER_ERRORS as exc:
        return provider_error(request, exc)
    if not token.get("userinfo"):
        return error_page(request, 400, "missing_id_token", "身分認證服務未回傳 ID token。")
    user = dict(token["userinfo"])
    request.session.clear()  # a fresh session for the new login
    request.session.update(
        id=secrets.token_urlsafe(16),  # what the portal's own logout names
        user=user,  # its sid is what a back-channel logout names
        id_token=token["id_token"],
        csrf=secrets.token_urlsafe(32),
        logged_in_at=request.app.state.ended.clock(),
    )
    if pending is None:
        return RedirectResponse("/", status_code=303)
    # The provider may not have honoured acr_values and max_age (or someone took them off the
    # request): the ID token is what counts.
    problem = assurance_problem(user, pending, request.app.state.ended.clock())
    if problem:
        log.warning("step-up for %s refused: %s (acr %s)", pending.slug, problem, user.get("acr"))
        return _refused(request, pending, problem)
    return RedirectResponse(f"/actions/{pending.slug}", status_code=303)


def _refused(request, action: Action, problem: str):
    user = request.session.get("user") or {}
    description = f"{action.title}：需要 {action.acr}，這次登入為 {user.get('acr') or '（未提供）'}"
    return error_page(request, 403, problem, description)


async def _step_up(request, action: Action):
    request.session["pending_action"] = action.slug
    return await _authorize(request, acr_values=action.acr, max_age=str(action.max_age))


async def action_page(request):
    action = request.app.state.actions.get(request.path_params["slug"])
    if action is None:
        return error_page(request, 404, "not_found", "沒有這項作業。")
    user = request.session.get("user")
    if not user or assurance_problem(user, action, request.app.state.ended.clock()):
        return await _step_up(request, action)
    if request.method == "GET":
        return render(request, "action.html", action=action, user=user, csrf=request.session["csrf"])
    async with request.form() as form:
        if not _csrf_ok(request, form):
            return error_page(request, 403, "csrf")
        values = {name: str(form.get(name, ""))[:200] for name, _ in action.fields}
    receipt = secrets.token_hex(4).upper()
    log.info("%s done for sub=%s (acr %s), receipt %s", action.slug, user.get("sub"), user.get("acr"), receipt)
    return render(request, "action.html", action=action, user=user, values=values, receipt=receipt)


async def logout(request):
    async with request.form() as form:
        if not _csrf_ok(request, form):
            return error_page(request, 403, "csrf")
    id_token, session_id = request.session.get("id_token"), request.session.get("id")
    request.session.clear()
    state = request.app.state
    if session_id:  # a copy of the cookie is logged out too, whatever happens at the provider
        state.ended.log_out(session_id)
    try:
        metadata = await state.oauth.idp.load_server_metadata()
    except PROVIDER_ERRORS as exc:
        log.warning("logout: provider unavailable: %r", exc)
        return error_page(request, 502, "logout_incomplete", str(exc))
    endpoint = metadata.get("end_session_endpoint")
    if not endpoint:
        return RedirectResponse("/", status_code=303)
    params = {"post_logout_redirect_uri": state.portal_url + "/", "client_id": state.client_id}
    if id_token:
        params["id_token_hint"] = id_token
    return RedirectResponse(add_params_to_uri(endpoint, params), status_code=303)


def create_app(portal: Portal, issuer: str, client_id: str, client_secret: str,
               portal_url: str, session_secret: str) -> Starlette:
    issuer, portal_url = issuer.rstrip("/"), portal_url.rstrip("/")
    ended = Ended()  # sessions logged out here or ended by back-channel logout
    oauth = OAuth()
    oauth.register(
        "idp",
        client_id=client_id,
        client_secret=client_secret,
        server_metadata_url=issuer + "/.well-known/openid-configuration",
        client_kwargs={
            "scope": "openid profile email",
            "code_challenge_method": "S256",
            "token_endpoint_auth_method": "client_secret_basic",
        },
    )
    app = Starlette(
        routes=[
            Route("/", home),
            Route("/login", login),
            Route("/callback", callback),
            Route("/logout", logout, methods=["POST"]),
            Route("/actions/{slug}", action_page, methods=["GET", "POST"]),
            Route("/backchannel-logout", backchannel_logout, methods=["POST"]),
            Mount("/common", StaticFiles(directory=HERE / "static"), name="common"),
            Mount("/static", StaticFiles(directory=portal.folder / "static"), name="static"),
        ],
        middleware=[
            Middleware(
                SessionMiddleware,
                secret_key=session_secret,
                session_cookie=portal.cookie,
                same_site="lax",
                https_only=portal_url.startswith("https://"),
                max_age=SESSION_SECONDS,
            ),
            Middleware(EndedSessions, ended=ended),
        ],
    )
    app.state.oauth = oauth
    app.state.client_id = client_id
    app.state.portal_url = portal_url
    app.state.issuer = issuer
    app.state.ended = ended
    app.state.provider_keys = ProviderKeys(oauth.idp)
    app.state.templates = _templates(portal)
    app.state.actions = {a.slug: a for a in portal.actions}
    return app


def main(portal: Portal, port: int) -> None:
    """Run ``portal`` with settings from ``PORTAL_*`` environment variables."""
    import uvicorn

    env = os.environ.get
    client_id, client_secret = env("PORTAL_CLIENT_ID"), env("PORTAL_CLIENT_SECRET")
    if not client_id or not client_secret:
        sys.exit("請設定 PORTAL_CLIENT_ID 與 PORTAL_CLIENT_SECRET"
                 " (set PORTAL_CLIENT_ID and PORTAL_CLIENT_SECRET).")
    portal_url = env("PORTAL_URL", f"http://localhost:{port}")
    app = create_app(
        portal,
        issuer=env("PORTAL_ISSUER", "http://localhost:8000"),
        client_id=client_id,
        client_secret=client_secret,
        portal_url=portal_url,
        # A random secret logs everyone out at each restart; fine for a demo.
        session_secret=env("PORTAL_SESSION_SECRET") or secrets.token_urlsafe(32),
    )
    uvicorn.run(app, host=env("PORTAL_HOST", "127.0.0.1"), port=int(env("PORTAL_PORT", str(port))))
