"""校務行政系統 2.0 — a demo relying party for the OpenID Connect provider
(``clients/portal.py`` is the app; this is its look and its sensitive action)."""

from functools import partial
from pathlib import Path

from clients import portal

PORTAL = portal.Portal(
    name="校務行政系統 2.0",
    folder=Path(__file__).parent,
    cookie="school_portal_session",
    actions=(portal.Action("student-record", "修改學生學籍資料",
                           (("student_no", "學號"), ("change", "異動內容"))),),
)

# create_app(issuer, client_id, client_secret, portal_url, session_secret) -> the Starlette app
create_app = partial(portal.create_app, PORTAL)


__all__ = ["PORTAL", "create_app"]
