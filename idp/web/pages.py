"""Rendering HTML pages: language, CSRF token, security headers."""

from __future__ import annotations

import datetime as dt
import hmac
import secrets
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from idp import captcha
from idp.web.i18n import LOCALES, negotiate, translate

CSRF_COOKIE = "idp_csrf"
LANG_COOKIE = "idp_lang"

env = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
    auto_reload=False,  # templates ship with the package: no stat of each one per page
)


def _taipei(value) -> str:
    """Times are stored in UTC and shown in Taiwan time."""
    if value is None:
        return ""
    return value.astimezone(TAIPEI).strftime("%Y-%m-%d %H:%M:%S")


env.filters["taipei"] = _taipei
env.filters["taipei_epoch"] = lambda seconds: _taipei(dt.datetime.fromtimestamp(seconds, dt.timezone.utc)) if seconds else ""


def with_lang(url: URL, lang: str) -> str:
    """A language link: ``url`` (the page's own address) with ``lang`` set, as a path: the
    host a request names (its Host header) is the sender's to choose, not a link's."""
    path = "/" + url.path.lstrip("/")  # "//host/x" would be another host's address
    if "lang" in url.query:
        return f"{path}?{url.include_query_params(lang=lang).query}"
    return f"{path}?{url.query + '&' if url.query else ''}lang={lang}"  # on every page: the cheap way


env.globals["with_lang"] = with_lang


def compile_templates() -> None:
    """Compile every template now (a server's start), not in its first users' requests."""
    for name in env.list_templates():
        env.get_template(name)


TAIPEI = dt.timezone(dt.timedelta(hours=8))


def locale_of(request: Request, ui_locales: str | None = None) -> str:
    svc = request.app.state.svc
    lang = request.query_params.get("lang")
    if lang in LOCALES:
        return lang
    return negotiate(ui_locales, get_cookie(request, LANG_COOKIE), request.headers.get("accept-language"), svc.settings.default_locale)


def csrf_token(request: Request) -> str:
    """The browser's CSRF token (double-submit: a cookie and the same value in each form)."""
    token = get_cookie(request, CSRF_COOKIE) or getattr(request.state, "new_csrf", None)
    if not token:
        token = request.state.new_csrf = secrets.token_urlsafe(24)
    return token


def csrf_ok(request: Request, form) -> bool:
    cookie = get_cookie(request, CSRF_COOKIE)
    sent = form.get("csrf")
    return bool(cookie and isinstance(sent, str) and hmac.compare_digest(cookie.encode(), sent.encode()))


def render(request: Request, template: str, status: int = 200, ui_locales: str | None = None, connect_src: str = "",
           img_src: str = "", **context) -> HTMLResponse:
    """``connect_src``: origins this page's scripts may call besides our own; ``img_src``:
    origins of images it may load (the certificate page reads the local HiPKI
    component's ``p11Image.bmp``)."""
    svc = request.app.state.svc
    locale = locale_of(request, ui_locales)
    nonce = secrets.token_urlsafe(16)
    # What the lockout messages say: the configured limits, not the defaults' "3" and "15".
    lockout = {"lock_threshold": svc.settings.lockout_threshold, "lock_minutes": -(-svc.settings.lockout_seconds // 60)}

    def _(key, **params):
        return translate(locale, key, **lockout, **params)

    html = env.get_template(template).render(
        _=_, locale=locale, csrf=csrf_token(request), nonce=nonce, request=request,
        issuer=svc.settings.issuer, min_length=svc.settings.password_min_length, **context,
    )
    response = HTMLResponse(html, status_code=status)
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; style-src 'self'; img-src 'self' data:{' ' + img_src if img_src else ''}; script-src 'nonce-{nonce}'; "
        f"connect-src 'self'{' ' + connect_src if connect_src else ''}; frame-ancestors 'none'; base-uri 'none'"
    )
    response.headers["Cache-Control"] = "no-store"
    new = getattr(request.state, "new_csrf", None)
    if new:
        set_cookie(request, response, CSRF_COOKIE, new)
    if request.query_params.get("lang") in LOCALES:
        set_cookie(request, response, LANG_COOKIE, request.query_params["lang"], max_age=365 * 86400)
    return response


def cookie_name(request: Request, name: str) -> str:
    """``name``, as a ``__Host-`` cookie where cookies are Secure: a cookie only this host can
    set, never a sibling subdomain (which could plant a CSRF token it knows, or a session)."""
    return "__Host-" + name if request.app.state.svc.settings.cookies_secure else name


def get_cookie(request: Request, name: str) -> str | None:
    return request.cookies.get(cookie_name(request, name))


def set_cookie(request: Request, response, name: str, value: str, max_age: int | None = None) -> None:
    response.set_cookie(cookie_name(request, name), value, max_age=max_age, httponly=True, samesite="lax",
                        secure=request.app.state.svc.settings.cookies_secure, path="/")


def delete_cookie(request: Request, response, name: str) -> None:
    response.delete_cookie(cookie_name(request, name), path="/", httponly=True, samesite="lax",
                           secure=request.app.state.svc.settings.cookies_secure)


def error_page(request: Request, title_key: str, detail_key: str, status: int = 400, ui_locales: str | None = None,
               **params):
    return render(request, "error.html", status=status, ui_locales=ui_locales, title_key=title_key,
                  detail_key=detail_key, params=params)


def who(request: Request) -> dict:
    """Where a request came from, for the audit log."""
    return {"ip": request.client.host if request.client else None, "user_agent": request.headers.get("user-agent")}


async def captcha_png(answer: str) -> Response:
    """A captcha's image as the page's <img> loads it; 503 in a flood, to load again soon."""
    try:
        return Response(await captcha.png(answer), media_type="image/png", headers={"Cache-Control": "no-store"})
    except captcha.Busy:
        return Response(status_code=503, headers={"Retry-After": "1", "Cache-Control": "no-store"})
