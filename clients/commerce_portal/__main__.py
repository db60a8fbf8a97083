"""Run the portal: ``python -m clients.commerce_portal`` (settings from PORTAL_* env vars)."""

from clients.portal import main

from . import PORTAL

if __name__ == "__main__":
    main(PORTAL, 8002)
