"""Reverse proxies the provider believes (``IDP_TRUSTED_PROXIES``).

Behind a proxy, some facts about a request come in headers the proxy sets:
the client's address (``X-Forwarded-For``), the scheme, and in the TLS
client-certificate mode the certificate the proxy verified. Anyone can send
those headers, so they are believed only when the request's *socket peer* is
a listed proxy. uvicorn's own proxy-header handling would replace the peer
with the forwarded address before the app sees it, so the provider does it
itself: ``idp serve`` turns uvicorn's off, and the app keeps the peer
(``scope["idp.peer"]``) before applying ``X-Forwarded-*`` from the same list.
"""

from __future__ import annotations

import ipaddress
import re

from starlette.middleware import Middleware
from starlette.requests import Request
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from idp.settings import SettingsError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(setting: str) -> tuple[Network, ...]:
    """The parsed ``IDP_TRUSTED_PROXIES``; a clear error for a malformed entry."""
    out = []
    for entry in filter(None, re.split(r"[,\s]+", setting)):
        try:
            out.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise SettingsError(f"IDP_TRUSTED_PROXIES: {entry!r} is not an address or CIDR network") from None
    return tuple(out)


class KeepPeer:
    """ASGI middleware: remember the socket peer before X-Forwarded-For replaces ``client``,
    with the trusted proxies (parsed once) that ``from_trusted_proxy`` compares it to."""

    def __init__(self, app, trusted: tuple[Network, ...]):
        self.app, self.trusted = app, trusted

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            client = scope.get("client")
            scope["idp.peer"] = client[0] if client else None
            scope["idp.trusted_proxies"] = self.trusted
        await self.app(scope, receive, send)


def middleware(setting: str) -> list[Middleware]:
    """Outermost first: keep the peer, then take X-Forwarded-* from trusted proxies only."""
    trusted = networks(setting)
    return [Middleware(KeepPeer, trusted=trusted),
            Middleware(ProxyHeadersMiddleware, trusted_hosts=[str(n) for n in trusted])]


def from_trusted_proxy(request: Request) -> bool:
    """Whether the request's socket peer is one of IDP_TRUSTED_PROXIES."""
    trusted = request.scope.get("idp.trusted_proxies", ())
    peer = request.scope.get("idp.peer")
    try:
        address = ipaddress.ip_address(peer)
    except (TypeError, ValueError):  # no peer, or a unix socket
        return False
    return any(address in network for network in trusted)


def peer(request: Request) -> str | None:
    return request.scope.get("idp.peer")
