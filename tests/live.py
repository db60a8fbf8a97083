"""Real HTTP servers for end-to-end tests: an ASGI app served by uvicorn in a
background thread, on a free loopback port.

The port is taken *before* the app is built, because the provider's issuer
(and the portal's own URL) must name it. To leave no gap in which another
process could take the port, the listening socket is bound first and handed
to uvicorn as is::

    with reserve("127.0.0.1") as (sock, url):      # url: http://127.0.0.1:PORT
        app = create_app(settings_for(issuer=url))
        with serve(app, sock, health="/healthz") as server:
            ...                                    # server.url == url

No pytest here; ``tests/test_e2e.py`` wraps it in fixtures.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from idp.web.corked import CorkedHttpToolsProtocol

try:  # the project depends on httpx2; plain httpx has the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

BIND = "127.0.0.1"  # "localhost" URLs are served here too (see MACHINE-NOTES: use localhost for browsers)
START_TIMEOUT = 10.0  # seconds; a start normally takes well under one


class LiveServer:
    """One uvicorn server running ``app`` in a daemon thread on ``sock``."""

    def __init__(self, app, sock: socket.socket, url: str, health: str | None = "/healthz"):
        self.app, self.sock, self.url, self.health = app, sock, url, health
        # The provider's HTTP protocol (idp serve's), for every app: Chromium and httpx read its responses.
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", http=CorkedHttpToolsProtocol))
        self.thread = threading.Thread(target=self._run, name=f"uvicorn {url}", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self.error = exc

    def start(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server.started:
            if self.error is not None or not self.thread.is_alive():
                raise RuntimeError(f"uvicorn for {self.url} did not start: {self.error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"uvicorn for {self.url} did not start within {START_TIMEOUT} s")
            time.sleep(0.005)
        if self.health:
            self._wait_healthy(deadline)
        return self

    def _wait_healthy(self, deadline: float) -> None:
        last = None
        with httpx.Client(timeout=2.0) as http:
            while time.monotonic() < deadline:
                try:
                    response = http.get(self.url + self.health)
                    if response.status_code == 200:
                        return
                    last = f"{response.status_code} {response.text[:200]}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"{self.url}{self.health} did not answer 200 within {START_TIMEOUT} s: {last}")

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=START_TIMEOUT)
        if self.thread.is_alive():  # a request hanging on: stop waiting for it
            self.server.force_exit = True
            self.thread.join(timeout=START_TIMEOUT)
        self.sock.close()


@contextlib.contextmanager
def reserve(host: str = "127.0.0.1") -> Iterator[tuple[socket.socket, str]]:
    """A listening socket on a free loopback port, and the URL naming it with ``host``
    ("127.0.0.1" or "localhost"). Closed on exit unless a server took it over."""
    if host not in ("127.0.0.1", "localhost"):
        raise ValueError(f"live servers listen on loopback only, not {host!r}")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((BIND, 0))
        sock.listen(128)
        sock.set_inheritable(True)
        yield sock, f"http://{host}:{sock.getsockname()[1]}"
    finally:
        sock.close()


@contextlib.contextmanager
def serve(app, sock: socket.socket, url: str, health: str | None = "/healthz") -> Iterator[LiveServer]:
    """Serve ``app`` on ``sock`` until the block ends; ready (``health`` answers 200) on entry."""
    server = LiveServer(app, sock, url, health).start()
    try:
        yield server
    finally:
        server.stop()
