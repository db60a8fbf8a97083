"""The provider on its single-process store, for the like-for-like row against
oidc-provider (whose bench adapter is an in-process Map).

    python bench/serve_memory.py PORT CLIENT_ID N_CODES N_REFRESH OUT_DIR

Settings come from the environment as for ``idp serve``, without IDP_REDIS_URL.
Codes and refresh tokens can only be minted ahead inside the process that keeps
them, so this mints N of each through the provider's own code (``Seed``, as
bench/run.py does for Redis), writes them to OUT_DIR/codes.txt and
OUT_DIR/refresh.txt, and then serves on 127.0.0.1:PORT (one uvicorn worker, as
``idp serve`` runs it: ``idp.cli.served_app``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402  (bench/run.py: Seed)


def main() -> int:
    port, client_id, n_codes, n_refresh, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
    import uvicorn

    from idp.cli import served_app
    from idp.web.corked import UVICORN

    seed = run.Seed({"IDP_REDIS_URL": ""}, 0)
    seed.load_accounts()
    (out / "codes.txt").write_text("\n".join(seed.mint_codes(client_id, n_codes, seed.svc.store)) + "\n")
    (out / "refresh.txt").write_text("\n".join(seed.mint_refresh(client_id, n_refresh, seed.svc.store)) + "\n")
    uvicorn.run(served_app(services=seed.svc), host="127.0.0.1", port=int(port), **UVICORN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
