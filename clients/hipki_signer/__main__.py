"""Run the signer: ``python -m clients.hipki_signer --module LIB --allow-origin URL [--port 61161]``."""

from __future__ import annotations

import argparse
import logging
import socket

import uvicorn

from .app import create_app
from .card import Reader

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m clients.hipki_signer",
                                description="A HiPKI-compatible local signing component over a PKCS#11 card.")
    p.add_argument("--module", default=SOFTHSM, help=f"the card's PKCS#11 library (default {SOFTHSM})")
    p.add_argument("--host", default="127.0.0.1", help="listen address; keep it on loopback")
    p.add_argument("--port", type=int, default=61161, help="61161 is the component's; 0 picks a free port")
    p.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                   help="a site allowed to use the card, e.g. https://idp.example.tw (repeat for more)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    reader = Reader(a.module)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((a.host, a.port))
    sock.listen(128)
    # One line a script (or a test) can read to learn the port.
    print(f"hipki_signer listening on http://{a.host}:{sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(reader, a.allow_origin), log_level="warning"))
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
