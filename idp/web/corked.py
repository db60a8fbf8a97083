"""uvicorn's HTTP protocol, each response sent in one write.

uvicorn writes a response's head and its body to the socket separately: two
send() system calls, two TCP segments, two wake-ups of the reader, for what is
one message. A system call is a large part of a small request's cost (on a
VM, about a tenth of a token request's CPU). Here the writes made in one turn
of the event loop are joined and sent at the end of it, as TCP_CORK would, but
without the kernel's 200 ms hold: a response is written by one ASGI task
without a pause between its head and its body, so it leaves whole, at once.

``idp serve`` runs every worker with it (``UVICORN``); the browser tests'
servers too (tests/live.py).
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _Corked:
    """A transport whose writes of one loop turn go out as one; everything else is the
    transport's own."""

    def __init__(self, transport, loop):
        self._transport, self._loop, self._pending = transport, loop, []

    def write(self, data) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():  # the peer left meanwhile: nobody to send it to
            self._transport.write(data)

    def close(self) -> None:
        self._flush()  # a response ends with a close when it is not kept alive: it goes first
        self._transport.close()

    def __getattr__(self, name):
        return getattr(self._transport, name)


class CorkedHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport) -> None:
        super().connection_made(_Corked(transport, self.loop))


# The uvicorn options of every provider process: X-Forwarded-* are the app's to apply
# (IDP_TRUSTED_PROXIES, idp.web.proxies), so it must see the socket peer; its own
# access log is RequestId's; no log_config: its lines go through the provider's handler
# (``idp.logs.configure``), in IDP_LOG_FORMAT.
UVICORN = {"http": CorkedHttpToolsProtocol, "proxy_headers": False, "access_log": False, "log_config": None}
