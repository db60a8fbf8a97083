"""``make run``: the provider on :8000, the school-records portal on :8001 and the
mobile-ID service simulator on :8010 (``deploy/dev/mobileid_sim.py``; not started
when ``IDP_MOBILEID_URL`` is set, even to nothing).

Creates (once) a demo account and the portal's client registration under
``var/``, then serves both from one process. Settings still come from
``IDP_*`` variables; only their defaults are the demo's.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
import secrets
from pathlib import Path

import uvicorn
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from clients.school_portal import create_app as create_portal
from idp.accounts import by_username, create_account
from idp.protocol.clients import create_client, find
from idp.settings import Settings
from idp.web.app import create_app
from idp.web.pages import render

PROVIDER, PORTAL = "http://localhost:8000", "http://localhost:8001"
DEMO_USER, DEMO_PASSWORD = "demo", "Taipei-101-School!"
VAR = Path("var")
MOBILEID_SIM, DEMO_NATIONAL_ID = "http://localhost:8010", "A123456789"
PORTAL_LOGOUT = {"backchannel_logout_uri": f"{PORTAL}/backchannel-logout", "backchannel_logout_session_required": True}


def _prepare(app) -> dict:
    svc = app.state.svc
    saved = VAR / "demo-portal.json"
    with svc.db.session() as session:
        if by_username(session, DEMO_USER) is None:
            import datetime as dt

            create_account(session, svc.passwords, DEMO_USER, DEMO_PASSWORD, now=dt.datetime.now(dt.timezone.utc),
                           name="王小明", email="demo@example.tw", email_verified=True, org="臺北市立示範國民中學")
        if svc.settings.mobileid_url:  # the demo account logs in with the mobile certificate too (SPEC A4)
            from sqlalchemy import select

            from idp.storage.models import Account

            demo = by_username(session, DEMO_USER)
            taken = session.execute(select(Account).where(Account.national_id == DEMO_NATIONAL_ID)).first()
            if demo.national_id is None and taken is None:
                demo.national_id = DEMO_NATIONAL_ID
        portal = json.loads(saved.read_text()) if saved.exists() else None
        row = find(session, portal["client_id"]) if portal else None
        if row is not None and "backchannel_logout_uri" not in row.metadata_:
            # A registration from before back-channel logout (SPEC P6): add the portal's URI.
            row.metadata_ = {**row.metadata_, **PORTAL_LOGOUT}
        if row is None:
            row, secret, _ = create_client(session, {
                "client_name": "校務行政系統 2.0",
                "redirect_uris": [f"{PORTAL}/callback"],
                "post_logout_redirect_uris": [f"{PORTAL}/"],
                **PORTAL_LOGOUT,
            }, first_party=True)
            portal = {"client_id": row.client_id, "client_secret": secret}
            fd = os.open(saved, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(portal, f)
    return portal


async def outbox(request: Request) -> Response:
    """The demo's mailbox: what the provider would have sent, newest first."""
    folder = Path(request.app.state.svc.settings.outbox_dir)
    mails = []
    for path in sorted(folder.glob("*.eml"), key=lambda p: p.stat().st_mtime, reverse=True)[:20]:
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        mails.append({"subject": message["subject"], "to": message["to"], "date": message["date"],
                      "body": message.get_content()})
    return render(request, "demo_outbox.html", mails=mails)


def _mobileid_simulator():
    """The mobile-ID service simulator on :8010 (SPEC A4), unless ``IDP_MOBILEID_URL`` names a service."""
    if os.environ.get("IDP_MOBILEID_URL") is not None:
        return None
    from deploy.dev.mobileid_sim import DEV_KEY, DEV_SP_SERVICE_ID, MobileIdSimulator, Pki
    from idp.mobileid import checksum

    state = VAR / "mobileid-sim"  # its CA and citizens survive restarts
    sim = MobileIdSimulator({DEV_SP_SERVICE_ID: checksum.parse_key(DEV_KEY)},
                            pki=Pki(state, names={DEMO_NATIONAL_ID: "王小明"}))
    os.environ.update(IDP_MOBILEID_URL=f"{MOBILEID_SIM}/moise/sp/", IDP_MOBILEID_SP_SERVICE_ID=DEV_SP_SERVICE_ID,
                      IDP_MOBILEID_KEY=DEV_KEY, IDP_MOBILEID_TRUST=str(state / "ca.pem"))
    return sim


async def _serve(*servers: uvicorn.Server) -> None:
    await asyncio.gather(*(s.serve() for s in servers))


def main() -> None:
    VAR.mkdir(exist_ok=True)
    os.environ.setdefault("IDP_ISSUER", PROVIDER)
    os.environ.setdefault("IDP_DATABASE_URL", f"sqlite:///{VAR}/idp.sqlite3")
    os.environ.setdefault("IDP_KEYS_DIR", str(VAR / "keys"))
    sim = _mobileid_simulator()
    app = create_app(Settings.from_env())
    if not app.state.svc.settings.smtp_host:
        app.router.routes.insert(0, Route("/demo/outbox", outbox))
    portal = _prepare(app)
    portal_app = create_portal(PROVIDER, portal["client_id"], portal["client_secret"], PORTAL, secrets.token_urlsafe(32))
    print(f"""
  Provider:  {PROVIDER}   (discovery: {PROVIDER}/.well-known/openid-configuration)
  Portal:    {PORTAL}     ← open this and press 登入
  Mails:     {PROVIDER}/demo/outbox   (no SMTP server configured: mails stay here)
  Account:   {DEMO_USER}
  Password:  {DEMO_PASSWORD}
  Stop with Ctrl-C.
""", flush=True)
    if sim is not None:
        print(f"  Mobile ID: national ID {DEMO_NATIONAL_ID}; approve on the simulated phone at {MOBILEID_SIM}/sim/\n",
              flush=True)
    servers = [
        uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=8000, log_level="warning")),
        uvicorn.Server(uvicorn.Config(portal_app, host="127.0.0.1", port=8001, log_level="warning")),
    ]
    if sim is not None:
        servers.append(uvicorn.Server(uvicorn.Config(sim.app(), host="127.0.0.1", port=8010, log_level="warning")))
    asyncio.run(_serve(*servers))


if __name__ == "__main__":
    main()
