"""Run the portal: ``python -m clients.school_portal`` (settings from PORTAL_* env vars)."""

import os
import secrets
import sys

import uvicorn

from .app import create_app


def main() -> None:
    env = os.environ.get
    client_id, client_secret = env("PORTAL_CLIENT_ID"), env("PORTAL_CLIENT_SECRET")
    if not client_id or not client_secret:
        sys.exit("請設定 PORTAL_CLIENT_ID 與 PORTAL_CLIENT_SECRET"
                 " (set PORTAL_CLIENT_ID and PORTAL_CLIENT_SECRET).")
    app = create_app(
        issuer=env("PORTAL_ISSUER", "http://localhost:8000"),
        client_id=client_id,
        client_secret=client_secret,
        portal_url=env("PORTAL_URL", "http://localhost:8001"),
        # A random secret logs everyone out at each restart; fine for a demo.
        session_secret=env("PORTAL_SESSION_SECRET") or secrets.token_urlsafe(32),
    )
    uvicorn.run(app, host=env("PORTAL_HOST", "127.0.0.1"), port=int(env("PORTAL_PORT", "8001")))


if __name__ == "__main__":
    main()
