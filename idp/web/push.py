"""The push-approval app's routes (SPEC A5; the factor is ``idp.factors.push``).

The login page (cookies and CSRF like every page):

- ``POST /login/push/start``: the 【推播通知】 button: a request to the chosen phone;
- ``GET /login/push/status?tx=...``: what the waiting page polls; once the request
  is answered or expired it posts ``/login/factor/push``, which decides;
- ``POST /login/push/stop``: back to the form (choose another phone, type the code).

The app (no cookies: each call is one JWS signed by the device key, posted as
``{"jws": "..."}``; ``clients/authenticator`` is the reference app):

- ``POST /push/register``: the QR code's one-time URL; the header carries the new key;
- ``POST /push/device/poll``: long-poll (``wait`` up to ``MAX_WAIT`` seconds) for
  the request waiting for this phone;
- ``POST /push/device/answer``: approve (with the picked number) or deny.

The settings page (after re-verification, as the other bindings): ``/account/push``
lists the phones (each removable) and adds one with a registration QR code.
"""

from __future__ import annotations

import asyncio
import time

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from idp import bridge
from idp.factors import push
from idp.factors.push import PUSH
from idp.factors.totp import qr_svg
from idp.web import login
from idp.web.account import account_post, require_account
from idp.web.forms import BadRequest, read_json
from idp.web.i18n import translate
from idp.web.pages import locale_of, render, who

MAX_WAIT = 25  # seconds a long-poll is held: below common proxy and mobile-network idle timeouts
POLL_EVERY = 0.5  # seconds between looks at the store while holding one
NO_STORE = {"Cache-Control": "no-store"}


def _page(tx: dict) -> RedirectResponse:
    return RedirectResponse(f"/login?tx={tx['id']}&factor={PUSH.name}", status_code=303)


# -- the login page ------------------------------------------------------------------------------
async def _offered(request: Request):
    """(tx, client, account) of a POST from the push page while the login offers the factor."""
    svc = request.app.state.svc
    form, tx = await login._posted(request)
    if tx is None:
        return None, None, None, None
    client, account, step = await login.load(svc, tx)
    if step is None or step.kind != "factor" or PUSH not in step.factors:
        return None, None, None, None
    return form, tx, client, account


async def start(request: Request) -> Response:
    svc = request.app.state.svc
    form, tx, client, account = await _offered(request)
    if tx is None:
        return login._expired(request)
    locale = locale_of(request, tx.get("ui_locales"))
    application = client.shown_name(locale)
    outcome = await bridge.run(PUSH.start, request, svc, tx, account, form, application)
    if outcome.error:
        tx["flash"] = {"error": outcome.error, "params": outcome.params, "keep": outcome.keep}
    await bridge.run(svc.transactions.save, tx)
    return _page(tx)


async def stop(request: Request) -> Response:
    svc = request.app.state.svc
    form, tx, _, _ = await _offered(request)
    if tx is None:
        return login._expired(request)
    chosen = (tx.get("push") or {}).get("device")
    await bridge.run(PUSH.drop, svc, tx)
    tx["flash"] = {"params": {}, "keep": {"chosen": chosen}}
    await bridge.run(svc.transactions.save, tx)
    return _page(tx)


async def status(request: Request) -> Response:
    svc = request.app.state.svc
    tx = await login._transaction(request, request.query_params.get("tx"))
    if tx is None:
        return JSONResponse({"state": "gone"}, 404, NO_STORE)
    state = await bridge.run(PUSH.status, svc, tx)
    body = {"state": "pending" if state == "pending" else "none" if state == "none" else "answered"}
    if "push" in tx:
        body["remaining"] = max(0, int(tx["push"]["exp"] - svc.clock()))
    return JSONResponse(body, headers=NO_STORE)


# -- the app ---------------------------------------------------------------------------------------
async def _device_call(request: Request, path: str, handle) -> Response:
    """Verify the signed message, run ``handle(payload, jwk, device)``, answer in JSON."""
    svc = request.app.state.svc
    try:
        try:
            body = await read_json(request)
        except BadRequest as exc:  # in the phone's language too, as every other refusal
            raise push.DeviceError("invalid_message", exc.status) from None
        token = body.get("jws")
        if not isinstance(token, str):
            raise push.DeviceError("invalid_message")
        payload, jwk, device = await run_in_threadpool(push.read_message, svc, token, path)
        status, answer = await handle(svc, payload, jwk, device)
    except push.DeviceError as exc:
        message = translate(locale_of(request), "push.device." + exc.code)
        return JSONResponse({"error": exc.code, "message": message}, exc.status, NO_STORE)
    return JSONResponse(answer, status, NO_STORE)


async def _register(svc, payload, jwk, device):
    return 201, await run_in_threadpool(push.register, svc, payload, jwk)


async def _poll(svc, payload, jwk, device):
    wait = payload.get("wait", 0)
    deadline = time.monotonic() + (min(max(wait, 0), MAX_WAIT) if isinstance(wait, (int, float)) else 0)
    # Through the bridge: called directly, each Redis round trip would stall every other request.
    while (found := await bridge.run(push.pending_request, svc, device.external_id)) is None and time.monotonic() < deadline:
        await asyncio.sleep(POLL_EVERY)
    return 200, {"requests": [found] if found else []}


async def _answer(svc, payload, jwk, device):
    return 200, {"result": await run_in_threadpool(push.answer, svc, device, payload)}


async def register(request: Request) -> Response:
    return await _device_call(request, push.REGISTER_PATH, _register)


async def device_poll(request: Request) -> Response:
    return await _device_call(request, push.POLL_PATH, _poll)


async def device_answer(request: Request) -> Response:
    return await _device_call(request, push.ANSWER_PATH, _answer)


# -- the settings page -----------------------------------------------------------------------------
NOTICES = {"bound", "removed"}
ERRORS = {"registration_expired", "not_found"}


async def devices_page(request: Request) -> Response:
    account = await require_account(request)
    if isinstance(account, Response):
        return account
    flash = {"params": {}}
    if (notice := request.query_params.get("notice")) in NOTICES:
        flash["notice"] = "push.notice." + notice
    if (error := request.query_params.get("error")) in ERRORS:
        flash["error"] = "push.error." + error
    devices = [{"id": b.id, "label": b.label, "phone": push.mask(b.data["phone"]), "since": b.created_at}
               for b in push.devices_of(account)]
    return render(request, "account_push.html", account=account, devices=devices, flash=flash, tab="settings")


@account_post
async def add(request: Request, account, form) -> Response:
    await bridge.run(push.start_registration, request.app.state.svc, account.id)
    return RedirectResponse("/account/push/add", status_code=303)


async def _add_page(request: Request, account, flash=None, keep=None, status: int = 200) -> Response:
    svc = request.app.state.svc
    pending = await bridge.run(push.current_registration, svc, account.id)
    if pending is None:
        return RedirectResponse("/account/push?error=registration_expired", status_code=303)
    url = push.registration_url(svc, pending["code"])
    return render(request, "account_push_add.html", account=account, tab="settings", flash=flash or {"params": {}},
                  qr=qr_svg(url), url=url, scanned=bool(pending["device"]), keep=keep or {}, status=status,
                  remaining=max(0, int(pending["exp"] - svc.clock())), here=URL("/account/push/add"))


async def add_page(request: Request) -> Response:
    account = await require_account(request)
    if isinstance(account, Response):
        return account
    return await _add_page(request, account)


async def add_status(request: Request) -> Response:
    """What the registration page polls: whether the app has scanned its QR code."""
    account = await require_account(request, interactive=False)
    if isinstance(account, Response):
        return JSONResponse({"state": "gone"}, 401, NO_STORE)
    pending = await bridge.run(push.current_registration, request.app.state.svc, account.id)
    state = "expired" if pending is None else "scanned" if pending["device"] else "waiting"
    return JSONResponse({"state": state}, headers=NO_STORE)


@account_post
async def save(request: Request, account, form) -> Response:
    svc = request.app.state.svc
    name, phone = form.get("name") or "", form.get("phone") or ""
    error = await run_in_threadpool(push.save_registration, svc, account.id, name, phone, form.get("otp") or "")
    if error == "push.error.registration_expired":
        return RedirectResponse("/account/push?error=registration_expired", status_code=303)
    if error:
        return await _add_page(request, account, {"error": error, "params": {}}, {"name": name, "phone": phone}, 400)
    await svc.db.call(svc.audit.record, "binding.created", account_id=account.id, username=account.username,
                      method=PUSH.name, device=name.strip(), **who(request))
    return RedirectResponse("/account/push?notice=bound", status_code=303)


@account_post
async def cancel(request: Request, account, form) -> Response:
    await bridge.run(push.cancel_registration, request.app.state.svc, account.id)
    return RedirectResponse("/account/push", status_code=303)


@account_post
async def remove(request: Request, account, form) -> Response:
    svc = request.app.state.svc
    removed = await run_in_threadpool(push.remove, svc, account.id, str(form.get("device") or ""))
    if removed is None:  # a stale page, or not this account's phone
        return RedirectResponse("/account/push?error=not_found", status_code=303)
    await svc.db.call(svc.audit.record, "binding.removed", account_id=account.id, username=account.username,
                      method=PUSH.name, device=removed, **who(request))
    return RedirectResponse("/account/push?notice=removed", status_code=303)


routes = [
    Route("/login/push/start", start, methods=["POST"]),
    Route("/login/push/stop", stop, methods=["POST"]),
    Route("/login/push/status", status),
    Route(push.REGISTER_PATH, register, methods=["POST"]),
    Route(push.POLL_PATH, device_poll, methods=["POST"]),
    Route(push.ANSWER_PATH, device_answer, methods=["POST"]),
    Route("/account/push", devices_page),
    Route("/account/push/add", add_page),
    Route("/account/push/add", add, methods=["POST"]),
    Route("/account/push/add/status", add_status),
    Route("/account/push/save", save, methods=["POST"]),
    Route("/account/push/cancel", cancel, methods=["POST"]),
    Route("/account/push/remove", remove, methods=["POST"]),
]
