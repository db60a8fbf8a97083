"""The passkeys section of the login settings (SPEC A8): list, register, remove.

Behind the settings pages' re-verification (``account.require_account``, M2).
The registration options are rendered into the page with a challenge owned by
this account *and* this browser session; ``/static/passkey.js`` asks the
browser to create the credential and posts it back with the page's form.
Logging in with a passkey is the factor's own page (``factor_passkey.html``),
posted to ``/login/factor/passkey`` like every factor.
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from idp import bridge
from idp.factors import passkey
from idp.web.account import account_post, error_key, passwordless, require_account, session_owner
from idp.web.i18n import translate
from idp.web.pages import locale_of, render, who

PAGE = "/account/passkeys"
NOTICES = {"passkey.added", "passkey.removed"}
MAX_LABEL = 60


def _back(key: str, param: str = "notice", label: str = "") -> RedirectResponse:
    """Back to the page; ``label``: the name typed for a passkey refused, to try again with."""
    query = {param: key, **({"label": label} if label else {})}
    return RedirectResponse(f"{PAGE}?{urlencode(query)}", status_code=303)


async def page(request: Request) -> Response:
    account = await require_account(request)
    if isinstance(account, Response):
        return account
    svc = request.app.state.svc
    flash = {"params": {}, "error": error_key(request, "passkey.error.")}
    if (notice := request.query_params.get("notice")) in NOTICES:
        flash["notice"] = notice
    enabled = passkey.PASSKEY.enabled(svc)
    options = None
    if enabled:
        rp_name = translate(locale_of(request), "app.name")
        options = json.loads(await bridge.run(passkey.registration_options, svc, account,
                                              session_owner(request, account), rp_name))
    listed = sorted(passkey.passkeys(account), key=lambda b: b.created_at)
    return render(request, "account_passkeys.html", account=account, passkeys=listed, options=options,
                  enabled=enabled, flash=flash, tab="settings", label=request.query_params.get("label", "")[:MAX_LABEL])


@account_post
async def add(request: Request, account, form) -> Response:
    svc = request.app.state.svc
    label = " ".join((form.get("label") or "").split())[:MAX_LABEL]
    if not label:
        return _back("passkey.error.label", "error")
    error, binding = await run_in_threadpool(passkey.register, svc, account.id, session_owner(request, account),
                                             form.get("credential") or "", label)
    seen = {**who(request), "method": passkey.PASSKEY.name}
    if error:
        await svc.db.call(svc.audit.record, "binding.refused", account_id=account.id, username=account.username,
                          **seen, reason=error.rsplit(".", 1)[-1])
        return _back(error, "error", label)
    await svc.db.call(svc.audit.record, "binding.created", account_id=account.id, username=account.username, **seen,
                      passkey=label, aaguid=binding.data["aaguid"])
    return _back("passkey.added")


@account_post
async def remove(request: Request, account, form) -> Response:
    svc = request.app.state.svc
    error, removed = await run_in_threadpool(passkey.remove, svc, account.id, form.get("id") or "", passwordless)
    if error:
        return _back(error, "error")
    await svc.db.call(svc.audit.record, "binding.removed", account_id=account.id, username=account.username,
                      **who(request), method=passkey.PASSKEY.name, passkey=removed.label)
    return _back("passkey.removed")


routes = [
    Route(PAGE, page),
    Route(PAGE, add, methods=["POST"]),
    Route(PAGE + "/remove", remove, methods=["POST"]),
]
