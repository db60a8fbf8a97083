"""``make run``: the provider on :8000, the school-records portal on :8001, the
commerce portal on :8002, the mobile-ID service simulator on :8010
(``deploy/dev/mobileid_sim.py``) and panva's oidc-provider on :8020 as the
stand-in for Google (``tests/e2e/upstream_op.mjs``, npm packages from
``tests/e2e``). The simulator is not started when ``IDP_MOBILEID_URL`` is set,
the upstream not when ``IDP_UPSTREAM_ISSUER`` is (even to nothing).

Creates (once) a demo account and the portals' client registrations under
``var/``, then serves the Python parts from one process. Settings still come
from ``IDP_*`` variables; only their defaults are the demo's.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import uvicorn
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from clients import commerce_portal, school_portal
from clients.portal import LOA2
from idp.accounts import by_username, create_account
from idp.factors import FACTORS
from idp.protocol.clients import create_client, find
from idp.settings import Settings
from idp.web.app import create_app
from idp.web.corked import UVICORN
from idp.web.pages import render

PROVIDER, SCHOOL, COMMERCE = "http://localhost:8000", "http://localhost:8001", "http://localhost:8002"
DEMO_USER, DEMO_PASSWORD = "demo", "Taipei-101-School!"
VAR = Path("var")
MOBILEID_SIM, DEMO_NATIONAL_ID = "http://localhost:8010", "A123456789"
UPSTREAM_PORT = 8020
UPSTREAM_SCRIPT = Path(__file__).resolve().parent.parent / "tests/e2e/upstream_op.mjs"

# Each portal: its app, the file under var/ keeping its client id and secret, its URL, its
# registration's policy. The school portal's file keeps the name it had when it was the only portal.
PORTALS = (
    (school_portal, "demo-portal.json", SCHOOL, {"client_name": "校務行政系統 2.0", "minimum_acr": LOA2}),
    # Per-client policy (SPEC P7): two factors, and no Google login at the commerce portal.
    (commerce_portal, "demo-commerce.json", COMMERCE, {
        "client_name": "商工行政服務入口網", "minimum_acr": LOA2,
        "allowed_factors": [name for name in FACTORS if name != "google"]}),
)


def _registration(url: str, policy: dict) -> dict:
    return {
        **policy,
        "redirect_uris": [f"{url}/callback"],
        "post_logout_redirect_uris": [f"{url}/"],
        "backchannel_logout_uri": f"{url}/backchannel-logout",
        "backchannel_logout_session_required": True,
    }


def _register(session, saved: Path, url: str, policy: dict) -> dict:
    """The portal's client id and secret: registered once, kept in ``saved``."""
    portal = json.loads(saved.read_text()) if saved.exists() else None
    row = find(session, portal["client_id"]) if portal else None
    if row is not None:
        # A registration from an older demo: its addresses brought up to date. Its policy is left as
        # it is: an administrator's change at /admin/clients outlives a restart.
        row.metadata_ = {**row.metadata_, **_registration(url, {})}
        return portal
    row, secret, _ = create_client(session, _registration(url, policy), first_party=True)
    portal = {"client_id": row.client_id, "client_secret": secret}
    fd = os.open(saved, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(portal, f)
    return portal


def _prepare(app) -> dict:
    svc = app.state.svc
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
        return {url: _register(session, VAR / saved, url, policy) for _, saved, url, policy in PORTALS}


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
    pki = Pki(state, names={DEMO_NATIONAL_ID: "王小明"}, crl_url=f"{MOBILEID_SIM}/sim/moica.crl")
    sim = MobileIdSimulator({DEV_SP_SERVICE_ID: checksum.parse_key(DEV_KEY)}, pki=pki)
    os.environ.update(IDP_MOBILEID_URL=f"{MOBILEID_SIM}/moise/sp/", IDP_MOBILEID_SP_SERVICE_ID=DEV_SP_SERVICE_ID,
                      IDP_MOBILEID_KEY=DEV_KEY, IDP_MOBILEID_TRUST=str(pki.write_trust(state / "trust")))
    return sim


def _die_with_parent() -> None:
    """In the child: SIGTERM when the demo ends, however it ends (uvicorn re-raises the
    signal that stopped it, so no exit handler of ours would run)."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)


def _upstream():
    """panva's oidc-provider on :8020 as the stand-in for Google (SPEC A6), unless
    ``IDP_UPSTREAM_ISSUER`` is set; None (and why) when Node or its packages are missing."""
    if os.environ.get("IDP_UPSTREAM_ISSUER") is not None:
        return None, ""
    if shutil.which("node") is None or not (UPSTREAM_SCRIPT.parent / "node_modules/oidc-provider").is_dir():
        return None, "node or tests/e2e/node_modules is missing (scripts/bootstrap.sh installs them)"
    client_id, secret = "idp-demo", secrets.token_urlsafe(24)
    proc = subprocess.Popen(["node", str(UPSTREAM_SCRIPT), str(UPSTREAM_PORT), client_id, secret,
                             f"{PROVIDER}/login/google/callback", f"{PROVIDER}/account/google/callback"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    issuer = f"http://127.0.0.1:{UPSTREAM_PORT}"
    os.environ.update(IDP_UPSTREAM_ISSUER=issuer, IDP_UPSTREAM_CLIENT_ID=client_id, IDP_UPSTREAM_CLIENT_SECRET=secret,
                      IDP_UPSTREAM_LABEL="Google 帳號（示範）")
    deadline = time.monotonic() + 20  # the provider reads its discovery document at the first Google login
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(issuer + "/.well-known/openid-configuration", timeout=1):
                return proc, issuer
        except OSError:
            time.sleep(0.2)
    return None, f"oidc-provider did not start (exit {proc.poll()})"


async def _serve(*servers: uvicorn.Server) -> None:
    await asyncio.gather(*(s.serve() for s in servers))


def main() -> None:
    VAR.mkdir(exist_ok=True)
    os.environ.setdefault("IDP_ISSUER", PROVIDER)
    os.environ.setdefault("IDP_DATABASE_URL", f"sqlite:///{VAR}/idp.sqlite3")
    os.environ.setdefault("IDP_KEYS_DIR", str(VAR / "keys"))
    sim = _mobileid_simulator()
    upstream, upstream_said = _upstream()
    app = create_app(Settings.from_env())
    if not app.state.svc.settings.smtp_host:
        app.router.routes.insert(0, Route("/demo/outbox", outbox))
    registered = _prepare(app)
    portals = {url: package.create_app(PROVIDER, **registered[url], portal_url=url, session_secret=secrets.token_urlsafe(32))
               for package, _, url, _ in PORTALS}
    print(f"""
  Provider:  {PROVIDER}   (discovery: {PROVIDER}/.well-known/openid-configuration)
  Portals:   {SCHOOL}     校務行政系統 2.0 ← open this and press 登入
             {COMMERCE}     商工行政服務入口網: single sign-on from the school portal;
                                   公司變更登記 asks for the mobile certificate (step-up)
  Mails:     {PROVIDER}/demo/outbox   (no SMTP server configured: mails stay here)
  Account:   {DEMO_USER}
  Password:  {DEMO_PASSWORD}   (then {"the mobile certificate below; OTP can be bound at /account"
                                   if sim else "bind OTP with an authenticator app, as the page asks"})
  Stop with Ctrl-C.
""", flush=True)
    if sim is not None:
        print(f"  Mobile ID: national ID {DEMO_NATIONAL_ID}; approve on the simulated phone at {MOBILEID_SIM}/sim/\n",
              flush=True)
    if upstream is not None:
        print(f"  Google:    the stand-in at {upstream_said} takes any name and password. Bind it first at\n"
              f"             {PROVIDER}/account (Google 帳號), then use the Google button at the school portal.\n",
              flush=True)
    elif upstream_said:
        print(f"  Google:    off: {upstream_said}\n", flush=True)
    servers = [uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=8000, log_level="warning", **UVICORN))]
    # No log_config: uvicorn's own would replace the provider's log handler (``idp.logs``).
    servers += [uvicorn.Server(uvicorn.Config(portal_app, host="127.0.0.1", port=int(url.rsplit(":", 1)[1]),
                                              log_level="warning", log_config=None)) for url, portal_app in portals.items()]
    if sim is not None:
        servers.append(uvicorn.Server(uvicorn.Config(sim.app(), host="127.0.0.1", port=8010, log_level="warning",
                                                     log_config=None)))
    asyncio.run(_serve(*servers))


if __name__ == "__main__":
    main()
