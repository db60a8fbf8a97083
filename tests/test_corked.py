"""The provider's HTTP protocol (idp.web.corked): a response leaves in one write, whole,
on kept-alive connections and on those that close after it."""

from __future__ import annotations

import asyncio
import socket

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from idp.web.corked import _Corked
from tests.live import reserve, serve

BODY = "x" * 5000


def _app():
    return Starlette(routes=[Route("/", lambda request: PlainTextResponse(BODY))])


def _exchange(url: str, requests: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(requests)
        received = b""
        while chunk := conn.recv(65536):  # until the server closes
            received += chunk
    return received


def test_responses_arrive_whole_kept_alive_and_before_a_close():
    with reserve() as (sock, url), serve(_app(), sock, url, health="/") as server:
        one = b"GET / HTTP/1.1\r\nHost: idp\r\n\r\n"
        last = b"GET / HTTP/1.1\r\nHost: idp\r\nConnection: close\r\n\r\n"
        received = _exchange(server.url, one + one + last)
    responses = received.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert len(responses) == 3
    for response in responses:
        assert response.endswith(b"\r\n\r\n" + BODY.encode())
    assert b"connection: close" in responses[-1]


class _Recording:
    def __init__(self):
        self.writes, self.closed = [], False

    def write(self, data):
        self.writes.append(data)

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default


def test_one_turns_writes_are_one_write_and_nothing_goes_to_a_peer_that_left():
    async def main():
        loop = asyncio.get_running_loop()
        transport = _Recording()
        corked = _Corked(transport, loop)
        corked.write(b"HTTP/1.1 200 OK\r\n\r\n")
        corked.write(b"")
        corked.write(b"body")
        assert transport.writes == []  # not before the turn ends
        await asyncio.sleep(0)
        assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        assert corked.get_extra_info("peername") == ("127.0.0.1", 1)  # the rest is the transport's
        corked.write(b"late")
        transport.closed = True  # the peer left before the turn ended
        await asyncio.sleep(0)
        assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]

    asyncio.run(main())

