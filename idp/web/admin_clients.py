"""The registered clients in the administration area (SPEC P7, M7 "manage
clients"): each client's policy — allowed factors, minimum ``acr``, whether a
login there needs two factors — and its redirect and logout URIs. The policy
(allowed factors, minimum acr) can be changed here: a POST form with the CSRF
token, checked by the same ``check_policy`` as the CLI and RFC 7591, then
back to the list (POST-redirect-GET), audited as ``client.policy_changed``.
Registering clients and changing their URIs stays with the CLI
(``idp clients``) and RFC 7591/7592. Only an admin account sees this: an AA
account administers people of its organisation, not the portals.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from idp import acr
from idp.factors import FACTORS
from idp.protocol.clients import ClientError, check_policy, find
from idp.storage.models import Client
from idp.web.admin import _admin
from idp.web.forms import BadRequest, read_form
from idp.web.pages import csrf_ok, error_page, render, who


@dataclass
class Policy:
    """One client as an administrator reads it."""

    client_id: str
    name: str
    first_party: bool
    factors: list[str]  # the factor names a login there may use
    all_factors: bool  # no allowed_factors: every factor
    minimum_acr: str | None
    mfa: bool  # two factors needed: the provider-wide policy, or a minimum acr of two factors or more
    auth_method: str
    grant_types: list[str]
    redirect_uris: list[str]
    post_logout_redirect_uris: list[str]
    backchannel_logout_uri: str | None
    frontchannel_logout_uri: str | None


def policy(row: Client, mfa_everywhere: bool) -> Policy:
    meta = row.metadata_
    allowed = meta.get("allowed_factors")
    return Policy(
        client_id=row.client_id,
        name=meta.get("client_name") or row.client_id,
        first_party=row.first_party,
        factors=[name for name in FACTORS if allowed is None or name in allowed],
        all_factors=allowed is None,
        minimum_acr=meta.get("minimum_acr"),
        mfa=mfa_everywhere or acr.rank(meta.get("minimum_acr")) >= acr.rank(acr.LOA2),
        auth_method=meta.get("token_endpoint_auth_method", ""),
        grant_types=meta.get("grant_types", []),
        redirect_uris=meta.get("redirect_uris", []),
        post_logout_redirect_uris=meta.get("post_logout_redirect_uris", []),
        backchannel_logout_uri=meta.get("backchannel_logout_uri"),
        frontchannel_logout_uri=meta.get("frontchannel_logout_uri"),
    )


def _clients(svc) -> list[Policy]:
    with svc.db.session() as session:
        rows = session.execute(select(Client).order_by(Client.created_at, Client.client_id)).scalars().all()
        return [policy(row, svc.settings.mfa) for row in rows]


async def _administrator(request: Request):
    """An admin account's ``Role``, or the Response to send instead (sign in, or 403)."""
    role = await _admin(request)
    if isinstance(role, Response) or role.everything:
        return role
    return error_page(request, "admin.forbidden.title", "admin_clients.forbidden", status=403)


async def clients(request: Request) -> Response:
    role = await _administrator(request)
    if isinstance(role, Response):
        return role
    flash = {"params": {}}
    if request.query_params.get("notice") == "saved":
        flash["notice"] = "admin_clients.saved"
    return await _page(request, role, flash)


async def _page(request: Request, role, flash: dict, status: int = 200, tried: dict | None = None) -> Response:
    """``tried``: a refused policy, which its client's form shows again as it was ticked, and
    whose client the message names (``{name}``)."""
    rows = await run_in_threadpool(_clients, request.app.state.svc)
    if tried:
        name = next((c.name for c in rows if c.client_id == tried["client_id"]), tried["client_id"])
        flash = {**flash, "params": {**flash["params"], "name": name}}
    return render(request, "admin_clients.html", status=status, role=role, account=role.account, clients=rows,
                  flash=flash, factors=list(FACTORS), ladder=acr.LADDER, tried=tried, here=URL("/admin/clients"))


def _set_policy(svc, client_id: str, factors: list[str], minimum: str) -> dict | None:
    """The new policy (None: no such client); raises ``ClientError`` for a bad one."""
    with svc.db.session() as session:
        row = find(session, client_id)
        if row is None:
            return None
        policy = {}
        # Every factor ticked is no restriction at all: a factor added later is then allowed too.
        if set(factors) != set(FACTORS):
            policy["allowed_factors"] = factors
        if minimum:
            policy["minimum_acr"] = minimum
        check_policy(policy)
        # Only the policy is checked: metadata a client was stored with before a rule refused
        # it (a sector_identifier_uri) must not stop the administrator from tightening it.
        meta = {k: v for k, v in row.metadata_.items() if k not in ("allowed_factors", "minimum_acr")}
        row.metadata_ = {**meta, **policy}
        return {k: row.metadata_.get(k) for k in ("allowed_factors", "minimum_acr")}


async def set_policy(request: Request) -> Response:
    role = await _administrator(request)
    if isinstance(role, Response):
        return role
    try:  # the checkboxes repeat one name: the ordered pairs, not a dict
        form = await read_form(request)
    except BadRequest as e:
        return error_page(request, "error.bad_request.title", "error.bad_request.detail", status=e.status)
    if not csrf_ok(request, dict(form)):
        return error_page(request, "admin.csrf.title", "admin.csrf.detail", status=400)
    svc, client_id = request.app.state.svc, request.path_params["client_id"]
    factors = [value for key, value in form if key == "factor"]
    minimum = dict(form).get("minimum_acr", "")
    try:
        policy_now = await run_in_threadpool(_set_policy, svc, client_id, factors, minimum)
    except ClientError as e:
        # Why no login could meet it; a reason the form cannot make (a factor or level it does not
        # offer) was crafted, and gets the plain refusal.
        flash = {"params": e.params, "error": f"admin_clients.refused.{e.reason}" if e.reason else "admin_clients.invalid"}
        tried = {"client_id": client_id, "factors": factors, "minimum_acr": minimum}
        return await _page(request, role, flash, status=400, tried=tried)
    if policy_now is None:
        return error_page(request, "admin.not_found.title", "admin_clients.not_found", status=404)
    svc.server.forget_client(client_id)
    await svc.db.call(svc.audit.record, "client.policy_changed", client_id=client_id, account_id=role.account.id,
                      method="admin", **who(request), **policy_now)
    return RedirectResponse("/admin/clients?notice=saved", status_code=303)


routes = [
    Route("/admin/clients", clients),
    Route("/admin/clients/{client_id}/policy", set_policy, methods=["POST"]),
]
