"""校務行政系統 2.0 (first cut): a relying party that only redirects to the
provider and shows what comes back. It never sees a password or a factor."""

import hmac
import json
import logging
import secrets
from datetime import datetime, timedelta, timezone
from pathlib import Path

from authlib.common.errors import AuthlibBaseError
from authlib.common.urls import add_params_to_uri
from authlib.integrations.starlette_client import OAuth
from joserfc.errors import JoseError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.responses import RedirectResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from .backchannel import Ended, EndedSessions, backchannel_logout

try:  # authlib uses httpx2 when installed, else httpx; catch whichever it raises
    import httpx2 as httpx
except ImportError:
    import httpx

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")

# Everything talking to the provider can raise: unreachable or broken provider
# (httpx, bad JSON, missing metadata), OAuth errors, a bad ID token.
PROVIDER_ERRORS = (AuthlibBaseError, JoseError, httpx.HTTPError, ValueError, RuntimeError)

TAIPEI = timezone(timedelta(hours=8))  # Taiwan has no daylight saving time
TIME_CLAIMS = {"auth_time", "iat", "exp", "nbf", "updated_at"}

AMR_LABELS = {  # RFC 8176
    "pwd": "密碼", "pin": "PIN 碼", "otp": "一次性密碼", "sms": "簡訊驗證",
    "sc": "智慧卡", "hwk": "硬體金鑰", "swk": "軟體金鑰", "fed": "聯合登入",
    "mfa": "多因子驗證", "mca": "多管道驗證", "user": "使用者確認",
    "face": "臉部辨識", "fpt": "指紋", "geo": "地理位置",
}

MESSAGES = {
    "access_denied": "您已取消登入，或身分認證服務拒絕了這次登入。",
    "mismatching_state": "登入請求已逾時或無效（可能重複送出，或瀏覽器封鎖了 Cookie），請重新登入。",
    "provider_unreachable": "目前無法連線至身分認證服務，請稍後再試。",
    "csrf": "表單已失效，請回到首頁後再操作一次。",
    "logout_incomplete": "您已登出本系統，但無法連線至身分認證服務，其他系統的登入狀態可能仍有效。",
}


def roc_time(value):
    """Seconds since the epoch -> 民國 date and time in Taipei."""
    try:
        dt = datetime.fromtimestamp(int(value), TAIPEI)
    except (TypeError, ValueError, OverflowError, OSError):
        return str(value)
    return f"民國 {dt.year - 1911} 年 {dt.month} 月 {dt.day} 日 {dt:%H:%M:%S}"


def claim_value(value):
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


templates.env.filters.update(roc_time=roc_time, claim_value=claim_value)
templates.env.globals.update(AMR_LABELS=AMR_LABELS, TIME_CLAIMS=TIME_CLAIMS)


def render(request, name, status_code=200, **context):
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
    return render(request, "error.html", status_code,
                  message=message, error=error, description=description)


def provider_error(request, exc):
    log.warning("provider error: %r", exc)
    if isinstance(exc, httpx.HTTPError):
        return error_page(request, 502, "provider_unreachable", str(exc))
    error = getattr(exc, "error", None) or type(exc).__name__
    description = getattr(exc, "description", None) or str(exc)
    return error_page(request, 400, error, description)


async def home(request):
    user = request.session.get("user")
    # Login settings live at the provider: the portal never handles a factor.
    return render(request, "home.html", user=user, csrf=request.session.get("csrf"),
                  settings_url=request.app.state.issuer + "/account")


async def login(request):
    portal_url = request.app.state.portal_url
    try:
        return await request.app.state.oauth.idp.authorize_redirect(
            request, redirect_uri=portal_url + "/callback")
    except PROVIDER_ERRORS as exc:
        return provider_error(request, exc)


async def callback(request):
    try:
        token = await request.app.state.oauth.idp.authorize_access_token(request)
    except PROVIDER_ERRORS as exc:
        return provider_error(request, exc)
    if not token.get("userinfo"):
        return error_page(request, 400, "missing_id_token", "身分認證服務未回傳 ID token。")
    request.session.clear()  # a fresh session for the new login
    request.session.update(
        user=dict(token["userinfo"]),  # its sid is what a back-channel logout names
        id_token=token["id_token"],
        csrf=secrets.token_urlsafe(32),
        logged_in_at=request.app.state.ended.clock(),
    )
    return RedirectResponse("/", status_code=303)


async def logout(request):
    async with request.form() as form:
        sent = str(form.get("csrf", ""))
    expected = request.session.get("csrf", "")
    if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        return error_page(request, 403, "csrf")

    id_token = request.session.get("id_token")
    request.session.clear()
    state = request.app.state
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


def create_app(issuer: str, client_id: str, client_secret: str,
               portal_url: str, session_secret: str) -> Starlette:
    issuer, portal_url = issuer.rstrip("/"), portal_url.rstrip("/")
    ended = Ended()  # provider sessions ended by back-channel logout
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
            Route("/backchannel-logout", backchannel_logout, methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        middleware=[
            Middleware(
                SessionMiddleware,
                secret_key=session_secret,
                session_cookie="school_portal_session",
                same_site="lax",
                https_only=portal_url.startswith("https://"),
                max_age=8 * 3600,
            ),
            Middleware(EndedSessions, ended=ended),
        ],
    )
    app.state.oauth = oauth
    app.state.client_id = client_id
    app.state.portal_url = portal_url
    app.state.issuer = issuer
    app.state.ended = ended
    return app
