"""The mobile natural-person certificate login's own routes (SPEC A4; the factor is
``idp.factors.mobileid``):

- ``POST /login/mobileid/start``: the form (national ID number, captcha) sends the
  push and makes the QR ticket, then back to the factor's page, now waiting;
- ``GET /login/mobileid/status?tx=...``: what the waiting page polls (every 4 s
  or more; the connector asks the service at most once per ticket per 4 s):
  ``{"state": "pending" | "done" | "failed", ...}``. On ``done`` the page posts
  ``/login/factor/mobileid`` (``login.factor_submit``), which records the factor.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from idp import bridge
from idp.factors.mobileid import DONE, MOBILEID, NONE, PENDING, seconds_left
from idp.storage.kv import Batch
from idp.web import login
from idp.web.i18n import translate
from idp.web.pages import locale_of


def _page(tx: dict) -> str:
    return f"/login?tx={tx['id']}&factor={MOBILEID.name}"


async def _offered(svc, tx) -> bool:
    _, _, step = await login.load(svc, tx)
    return step is not None and step.kind == "factor" and MOBILEID in step.factors


async def start(request: Request) -> Response:
    svc = request.app.state.svc
    form, tx = await login._posted(request, need_account=False)
    if tx is None or not await _offered(svc, tx):
        return login._expired(request)
    outcome = await MOBILEID.start(request, svc, tx, form)
    if outcome.error:
        tx["flash"] = {"error": outcome.error, "params": outcome.params, "keep": outcome.keep}
    await bridge.run(svc.transactions.save, tx)
    return RedirectResponse(_page(tx), status_code=303)


async def status(request: Request) -> Response:
    svc = request.app.state.svc
    tx = await login._transaction(request, request.query_params.get("tx"))
    headers = {"Cache-Control": "no-store"}
    if tx is None:
        return JSONResponse({"state": "failed", "error": "error.tx_expired.title", "next": None,
                             "message": translate(locale_of(request), "error.tx_expired.detail")}, 404, headers)
    state = await MOBILEID.poll(svc, tx)
    if state in (PENDING, DONE):  # the tickets are kept apart from the transaction: nothing to save
        remaining = seconds_left(svc, tx["mobileid"])
        return JSONResponse({"state": state, "remaining": remaining,
                             "retry_after": svc.mobileid.config.poll_interval}, headers=headers)
    message = translate(locale_of(request, tx.get("ui_locales")), "mobileid.no_request" if state == NONE else state)
    if state == NONE:
        return JSONResponse({"state": "failed", "error": "mobileid.no_request", "message": message, "next": _page(tx)},
                            headers=headers)
    writes = Batch()
    MOBILEID.give_up(tx, state, writes)
    svc.transactions.save(tx, writes)
    await bridge.run(svc.store.write, writes)
    return JSONResponse({"state": "failed", "error": state, "message": message, "next": _page(tx)}, headers=headers)


routes = [
    Route("/login/mobileid/start", start, methods=["POST"]),
    Route("/login/mobileid/status", status),
]
