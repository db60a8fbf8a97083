"""商工行政服務入口網 — the commerce portal, a demo relying party for the OpenID
Connect provider (``clients/portal.py`` is the app; this is its look and its
sensitive action, 公司變更登記, which needs a certificate-level login)."""

from functools import partial
from pathlib import Path

from clients import portal

PORTAL = portal.Portal(
    name="商工行政服務入口網",
    folder=Path(__file__).parent,
    cookie="commerce_portal_session",
    actions=(portal.Action("company-change", "公司變更登記",
                           (("ban", "公司統一編號"), ("change", "變更事項"))),),
)

# create_app(issuer, client_id, client_secret, portal_url, session_secret) -> the Starlette app
create_app = partial(portal.create_app, PORTAL)


__all__ = ["PORTAL", "create_app"]
