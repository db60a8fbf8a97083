"""The ASGI application: routes, security headers, health and readiness."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
from functools import partial
from pathlib import Path

import psycopg
from redis.exceptions import ConnectionError as StoreDown, TimeoutError as StoreSlow
from sqlalchemy.exc import OperationalError as DatabaseDown
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from idp import logs
from idp.accounts import mark_disabled_accounts
from idp.clock import Clock
from idp.metrics import CONTENT_TYPE, RequestMetrics
from idp.services import Services
from idp.settings import Settings
from idp.web import account, admin, admin_clients, login, oidc, recovery, reset
from idp.web import federation as federation_pages
from idp.web import mobileid as mobileid_pages
from idp.web import passkeys as passkey_pages
from idp.web import push as push_pages
from idp.web import proxies
from idp.web.forms import RefuseNul
from idp.web.pages import error_page

log = logging.getLogger("idp")
SOLE_SERVER_CHECK_SECONDS = 10  # how soon a server without Redis notices that its claim on the database was lost


class SecurityHeaders:
    """Headers every response carries; pages add their own CSP (``pages.render``)."""

    def __init__(self, app, hsts: bool):
        self.app = app
        self.headers = [
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            (b"x-frame-options", b"DENY"),
        ]
        if hsts:
            self.headers.append((b"strict-transport-security", b"max-age=31536000; includeSubDomains"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + self.headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def healthz(request: Request):
    return PlainTextResponse("ok")


async def _every(seconds: int, job, what: str, *, now: bool = False) -> None:
    """Run ``job`` in the thread pool every ``seconds`` (``now``: first at once) while the app
    runs; a failure is logged (``what`` failed) and the next turn tries again."""
    if not now:
        await asyncio.sleep(seconds)
    while True:
        try:
            await run_in_threadpool(job)
        except Exception:
            log.exception("could not %s", what)
        await asyncio.sleep(seconds)


def _prune_audit(svc) -> None:
    """Delete the audit events past ``audit_retention_days``."""
    if deleted := svc.audit.prune(svc.settings.audit_retention_days):
        log.info("deleted %d audit events older than %d days", deleted, svc.settings.audit_retention_days)


def _keep_sole_server(svc) -> None:
    """Stop this server if another one claimed its database while this one's claim was lost
    (a PostgreSQL restart, a break in the network): the two would keep split login state."""
    if not svc.db.keep_sole_server():
        log.error("another provider process now serves this database without IDP_REDIS_URL (it claimed the "
                  "database while this one's claim was lost): stopping, so that one process keeps the login state")
        os.kill(os.getpid(), signal.SIGTERM)


def _ready(svc) -> dict:
    return {"database": svc.db.ping(), "store": svc.store.ping()}


async def readyz(request: Request):
    # Off the event loop: a database or Redis that does not answer holds a ping until its
    # connect timeout, and probes come every few seconds.
    checks = await run_in_threadpool(_ready, request.app.state.svc)
    return JSONResponse(checks, status_code=200 if all(checks.values()) else 503)


async def metrics(request: Request):
    svc = request.app.state.svc
    token = svc.settings.metrics_token
    sent = request.headers.get("authorization", "")
    if token and not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        return PlainTextResponse("metrics need the bearer token (IDP_METRICS_TOKEN)", status_code=401)
    return Response(svc.metrics.exposition(), media_type=CONTENT_TYPE)


async def not_found(request: Request, exc):
    return error_page(request, "error.not_found.title", "error.not_found.detail", status=404)


async def method_not_allowed(request: Request, exc):
    """A form's address opened from the address bar, a bookmark or the history."""
    response = error_page(request, "error.method.title", "error.method.detail", status=405)
    response.headers.update(exc.headers or {})  # Allow
    return response


async def server_error(request: Request, exc):
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    response = error_page(request, "error.server.title", "error.server.detail", status=500)
    request.scope[logs.LOGGED] = True  # not again by the server (``logs.RequestId``)
    return response


async def unavailable(request: Request, exc):
    """Redis or the database did not answer (down, a failover, a statement timed out): a
    protocol endpoint's client gets its JSON 503 to retry on; a page, the error page."""
    response = oidc.unavailable(request)
    if response is None:
        return await server_error(request, exc)
    log.error("%s unavailable on %s %s: %s", "Redis" if isinstance(exc, (StoreDown, StoreSlow)) else "database",
              request.method, request.url.path, exc)
    return response


class Provider(Starlette):
    """Starlette, with ``outermost`` outside its error handler, which Starlette puts first:
    the request id and the security headers reach a 500's page and its log line too."""

    def __init__(self, *args, outermost: list[Middleware], **kwargs):
        self.outermost = outermost
        super().__init__(*args, **kwargs)

    def build_middleware_stack(self):
        app = super().build_middleware_stack()
        for cls, args, kwargs in reversed(self.outermost):
            app = cls(app, *args, **kwargs)
        return app


def create_app(settings: Settings | None = None, clock: Clock | None = None, services: Services | None = None) -> Starlette:
    svc = services or Services(settings or Settings.from_env(), clock)
    logs.configure(svc.settings.log_format, svc.settings.log_level)
    svc.start()
    svc.load_trust()
    svc.mobileid  # built now, so that a mobile-ID setting that cannot work stops the start, not the first login
    try:  # before serving: accounts disabled before their marks existed
        mark_disabled_accounts(svc)
    except Exception:  # Redis down: /readyz says so, and the lifespan's loop writes them later
        log.exception("could not write the disabled accounts' marks; trying again in %d s",
                      svc.settings.disabled_marks_seconds)
    # Starlette tries the routes in this order: the ones every login uses come first.
    routes = [
        Route("/token", oidc.token, methods=["POST"]),
        Route("/authorize", oidc.authorize, methods=["GET", "POST"]),
        Route("/login/factor/{factor}", login.factor_submit, methods=["POST"]),
        Route("/login", login.login_page),
        Route("/.well-known/openid-configuration", oidc.discovery),
        # RFC 8414 3 for OAuth clients that look there (where the issuer has a path, a proxy
        # maps /.well-known/oauth-authorization-server/PATH here).
        Route("/.well-known/oauth-authorization-server", oidc.discovery),
        Route("/jwks", oidc.jwks),
        Route("/par", oidc.pushed_authorization, methods=["POST"]),
        Route("/userinfo", oidc.userinfo, methods=["GET", "POST"]),
        Route("/revoke", oidc.revoke, methods=["POST"]),
        Route("/introspect", oidc.introspect, methods=["POST"]),
        Route("/logout", oidc.logout, methods=["GET", "POST"]),
        Route("/register", oidc.register, methods=["POST"]),
        Route("/register/{client_id}", oidc.manage_client, methods=["GET", "PUT", "DELETE"]),
        Route("/login/captcha", login.captcha_image),
        Route("/login/password-change", login.password_change, methods=["POST"]),
        Route("/login/consent", login.consent, methods=["POST"]),
        Route("/login/cancel", login.cancel, methods=["POST"]),
        *mobileid_pages.routes,
        *federation_pages.routes,
        *push_pages.routes,
        *recovery.routes,
        Route("/login/bind/otp", login.bind_otp, methods=["POST"]),
        Route("/login/bind/otp/rebuild", login.rebuild_otp, methods=["POST"]),
        Route("/login/bind/certificate", login.bind_certificate, methods=["POST"]),
        *account.routes,
        *passkey_pages.routes,
        *admin.routes,
        *admin_clients.routes,
        *reset.routes,
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static"),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        # Back-channel logout jobs another process left unfinished are swept up from the start.
        svc.backchannel.start()
        tasks = []
        if svc.store.shared:
            # Marks lost with Redis data (a failover to a replica that lagged) come back within this time.
            marks = _every(svc.settings.disabled_marks_seconds, partial(mark_disabled_accounts, svc),
                           "write the disabled accounts' marks")
            tasks.append(asyncio.create_task(marks))
        if svc.db.claimed_sole_server:
            tasks.append(asyncio.create_task(_every(SOLE_SERVER_CHECK_SECONDS, partial(_keep_sole_server, svc),
                                                    "check the claim on the database")))
        if svc.settings.audit_retention_days:
            tasks.append(asyncio.create_task(_every(3600, partial(_prune_audit, svc), "delete the old audit events",
                                                    now=True)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            svc.backchannel.stop()
            await svc.store.aclose()
            await svc.db.aclose()

    app = Provider(routes=routes, exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error,
                                                      StoreDown: unavailable, StoreSlow: unavailable,
                                                      DatabaseDown: unavailable, psycopg.OperationalError: unavailable},
                   lifespan=lifespan, middleware=proxies.middleware(svc.settings.trusted_proxies),
                   outermost=[Middleware(logs.RequestId, access=svc.settings.access_log),  # every line carries the id
                              Middleware(SecurityHeaders, hsts=svc.settings.issuer.startswith("https://"))])
    app.state.svc = svc
    app.add_middleware(RefuseNul)
    app.add_middleware(RequestMetrics, metrics=svc.metrics)
    return app
