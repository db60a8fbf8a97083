"""The registered clients in the administration area (SPEC P7, M7 "manage
clients"): each client's policy — allowed factors, minimum ``acr``, whether a
login there needs two factors — and its redirect and logout URIs, read-only.
Registering and changing clients stays with the CLI (``idp clients``) and RFC
7591/7592. Only an admin account sees this: an AA account administers people
of its organisation, not the portals.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from idp import acr
from idp.factors import FACTORS
from idp.storage.models import Client
from idp.web.admin import _admin
from idp.web.pages import error_page, render


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


async def clients(request: Request) -> Response:
    role = await _admin(request)
    if isinstance(role, Response):
        return role
    if not role.everything:
        return error_page(request, "admin.forbidden.title", "admin_clients.forbidden", status=403)
    rows = await run_in_threadpool(_clients, request.app.state.svc)
    return render(request, "admin_clients.html", role=role, account=role.account, clients=rows, flash={"params": {}})


routes = [Route("/admin/clients", clients)]
