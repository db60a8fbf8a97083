"""A lean client for one Redis server: RESP over a socket, parsed by hiredis.

The store's hot paths are round trips of a few commands: a login makes about
35 of them, a token request one or two. redis-py spends ~60 µs of CPU on a
blocking command and ~120 µs on an awaited pipeline (connection pool, retry
and observability wrappers, a Task per pipeline); here a round trip is one
write of the packed commands and one parse of their replies: ~15 µs
blocking, ~40 µs awaited. It does only what ``RedisStore`` needs of one
server (``redis://``, ``rediss://``, ``unix://``). Sentinel and Cluster,
which need discovery and redirects, stay with redis-py.

Nothing is retried: a command may have run when its connection broke, and
the store's commands (GETDEL of a code, INCR of a counter) are not safe to
repeat. The caller gets ``ConnectionError`` or ``TimeoutError`` (redis-py's,
so one ``except redis.RedisError`` covers both clients), and the next call
connects afresh.
"""

from __future__ import annotations

import asyncio
import collections
import os
import select
import socket
import ssl
from dataclasses import dataclass, field

import hiredis
from redis.connection import parse_url
from redis.exceptions import ConnectionError, ResponseError, TimeoutError

_OPTIONS = {"db", "socket_timeout", "socket_connect_timeout",
            "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"}
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


@dataclass(frozen=True)
class Address:
    """Where the server is and how to open a connection to it, from ``IDP_REDIS_URL``."""

    host: str | None
    port: int
    path: str | None  # a unix socket
    handshake: tuple[tuple, ...] = field(repr=False)  # AUTH (the password) and SELECT, sent first on every connection
    tls: ssl.SSLContext | None
    timeout: float  # for a reply; a server that stalls longer costs its connection
    connect_timeout: float

    @classmethod
    def from_url(cls, url: str) -> Address:
        options = parse_url(url)
        unknown = set(options) - _OPTIONS - {"host", "port", "path", "username", "password", "connection_class"}
        if unknown:
            raise ValueError(f"unsupported option {', '.join(sorted(unknown))}")
        handshake = []
        if options.get("password") is not None:
            user = options.get("username")
            handshake.append(("AUTH", user, options["password"]) if user else ("AUTH", options["password"]))
        if options.get("db"):
            handshake.append(("SELECT", options["db"]))
        return cls(
            host=options.get("host", "localhost") if "path" not in options else None,
            port=int(options.get("port") or 6379),
            path=options.get("path"),
            handshake=tuple(handshake),
            tls=_tls(options) if url.startswith("rediss://") else None,
            timeout=float(options.get("socket_timeout") or 10),
            connect_timeout=float(options.get("socket_connect_timeout") or 5),
        )

    def connect(self) -> socket.socket:
        sock = None
        try:
            if self.path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.connect_timeout)
                sock.connect(self.path)
            else:
                sock = socket.create_connection((self.host, self.port), self.connect_timeout)
                _tcp_options(sock)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        except OSError as e:
            if sock is not None:
                sock.close()
            raise ConnectionError(f"cannot connect to Redis at {self._where()}: {e}") from None
        sock.settimeout(self.timeout)
        return sock

    async def open(self, protocol_factory) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.path:
                    _, protocol = await loop.create_unix_connection(protocol_factory, self.path)
                else:
                    _, protocol = await loop.create_connection(
                        protocol_factory, self.host, self.port, ssl=self.tls,
                        server_hostname=self.host if self.tls else None)
        except (OSError, asyncio.TimeoutError) as e:
            raise ConnectionError(f"cannot connect to Redis at {self._where()}: {str(e) or 'timed out'}") from None
        if not self.path:
            _tcp_options(protocol.transport.get_extra_info("socket"))
        return protocol

    def _where(self) -> str:
        return self.path or f"{self.host}:{self.port}"


def _tcp_options(sock) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A connection a NAT or firewall dropped while idle is found out, not waited on.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def _tls(options: dict) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    reqs = options.get("ssl_cert_reqs", "required")
    if reqs not in _CERT_REQS:
        raise ValueError(f"ssl_cert_reqs is one of {', '.join(_CERT_REQS)}")
    if reqs == "none" or options.get("ssl_check_hostname") is False:  # parse_url reads the boolean
        context.check_hostname = False
    context.verify_mode = _CERT_REQS[reqs]
    return context


def _pack(commands: list[tuple], transaction: bool) -> tuple[bytes, int]:
    if transaction:
        commands = [("MULTI",), *commands, ("EXEC",)]
    return b"".join(map(hiredis.pack_command, commands)), len(commands)


def _result(replies: list, transaction: bool) -> list:
    """The commands' replies; an error reply is raised (after all were read, so the
    connection stays in step)."""
    for reply in replies:
        if isinstance(reply, ResponseError):
            raise reply
    if transaction:
        replies = replies[-1]  # EXEC's: the commands' own replies
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
    return replies


def _reader() -> hiredis.Reader:
    return hiredis.Reader(replyError=ResponseError)


class _Connection:
    """One blocking socket and the parser of its replies."""

    def __init__(self, address: Address):
        self.sock = address.connect()
        self.reader = _reader()
        self._readable = select.poll()
        self._readable.register(self.sock, select.POLLIN)
        if address.handshake:
            try:
                _result(self.round_trip(*_pack(list(address.handshake), False)), False)
            except BaseException:
                self.sock.close()
                raise

    def stale(self) -> bool:
        """Closed by the server while it was idle (a restart, an idle timeout): an idle
        connection has nothing to read but that."""
        return bool(self._readable.poll(0))

    def round_trip(self, payload: bytes, count: int) -> list:
        try:
            self.sock.sendall(payload)
            replies = []
            while len(replies) < count:
                reply = self.reader.gets()
                if reply is False:  # not all of it has arrived
                    data = self.sock.recv(65536)
                    if not data:
                        raise ConnectionError("Redis closed the connection")
                    self.reader.feed(data)
                else:
                    replies.append(reply)
            return replies
        except socket.timeout:
            raise TimeoutError("Redis did not answer in time") from None
        except OSError as e:
            raise ConnectionError(f"lost the connection to Redis: {e}") from None
        except hiredis.ProtocolError as e:
            raise ConnectionError(f"Redis sent what is not RESP: {e}") from None

    def idle(self) -> bool:
        """Nothing left over from the last round trip: safe to hand to the next one."""
        pending = self.sock.pending() if isinstance(self.sock, ssl.SSLSocket) else 0
        return not pending and not self.reader.has_data()


class Client:
    """Blocking round trips, from any thread: each takes an idle connection (or opens
    one) and gives it back when its replies are in; a broken one is dropped."""

    def __init__(self, address: Address):
        self._address = address
        self._idle: collections.deque[_Connection] = collections.deque()
        self._pid = os.getpid()

    def execute(self, commands: list[tuple], transaction: bool = False) -> list:
        """The replies to ``commands``, sent in one write (inside MULTI/EXEC with ``transaction``)."""
        if not commands:
            return []
        if self._pid != os.getpid():  # a forked child must not share its parent's sockets
            self._idle, self._pid = collections.deque(), os.getpid()
        conn = self._idle_connection() or _Connection(self._address)
        try:
            replies = conn.round_trip(*_pack(commands, transaction))
        except BaseException:
            conn.sock.close()
            raise
        if conn.idle():
            self._idle.append(conn)
        else:  # more than was asked for: out of step, never to be used again
            conn.sock.close()
        return _result(replies, transaction)

    def _idle_connection(self) -> _Connection | None:
        while self._idle:
            try:
                conn = self._idle.pop()
            except IndexError:  # another thread took the last one
                return None
            if not conn.stale():
                return conn
            conn.sock.close()
        return None


class _Protocol(asyncio.Protocol):
    """One connection shared by every request of an event loop: Redis answers in the
    order it was asked, so each round trip waits for the next ``count`` replies.

    A server that stalls fails the connection: the replies still owed on it could not be
    told from those of later round trips. One watchdog timer per connection looks at the
    oldest round trip (replies come in order, so it is the first to be late) rather than
    a timer per round trip, which cost ~5 µs each."""

    def __init__(self, timeout: float):
        self.reader = _reader()
        self.timeout = timeout
        # (future, reply count, replies so far, deadline)
        self.waiting: collections.deque[tuple[asyncio.Future, int, list, float]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.broken: Exception | None = None
        self.watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.reader.feed(data)
        try:
            while self.waiting:
                future, count, replies, _ = self.waiting[0]
                while len(replies) < count:
                    reply = self.reader.gets()
                    if reply is False:
                        return
                    replies.append(reply)
                self.waiting.popleft()
                if not future.done():  # its request may have been cancelled
                    future.set_result(replies)
        except hiredis.ProtocolError as e:
            self.break_off(ConnectionError(f"Redis sent what is not RESP: {e}"))
            return
        if self.reader.has_data():  # a reply nobody asked for: out of step, never to be used again
            self.break_off(ConnectionError("Redis answered more than it was asked"))

    def connection_lost(self, exc):
        self.break_off(self.broken or ConnectionError(f"lost the connection to Redis: {exc or 'closed'}"))

    def break_off(self, error: Exception) -> None:
        """Fail every waiting round trip with ``error``; the connection is not used again."""
        self.broken = self.broken or error
        if self.watchdog is not None:
            self.watchdog.cancel()
        while self.waiting:
            future = self.waiting.popleft()[0]
            if not future.done():
                future.set_exception(self.broken)
        if self.transport is not None:
            self.transport.abort()

    def check_time(self) -> None:
        """The watchdog: fail the connection if the oldest round trip is late, else look again
        when it would be."""
        self.watchdog = None
        if self.waiting and not self.broken:
            loop = asyncio.get_running_loop()
            late = self.waiting[0][3] - loop.time()
            if late <= 0:
                self.break_off(TimeoutError("Redis did not answer in time"))
            else:
                self.watchdog = loop.call_later(late, self.check_time)

    def send(self, payload: bytes, count: int) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting.append((future, count, [], loop.time() + self.timeout))
        if self.watchdog is None:
            self.watchdog = loop.call_later(self.timeout, self.check_time)
        try:
            self.transport.write(payload)
        except BaseException as e:  # a waiter with no request behind it would shift every reply
            self.waiting.pop()
            self.break_off(ConnectionError(f"lost the connection to Redis: {e}"))
            raise self.broken from None
        return future


class AsyncClient:
    """Awaited round trips on one event loop (a client serves the loop that opened it)."""

    def __init__(self, address: Address):
        self._address = address
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def execute(self, commands: list[tuple], transaction: bool = False) -> list:
        if not commands:
            return []  # a waiter for no reply would wait for someone else's
        protocol = self._protocol
        if protocol is None or protocol.broken:
            protocol = await self._connect()
        replies = await protocol.send(*_pack(commands, transaction))
        return _result(replies, transaction)

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # one connection, however many requests found none
            if self._protocol is None or self._protocol.broken:
                protocol = await self._address.open(lambda: _Protocol(self._address.timeout))
                if self._address.handshake:  # a stall fails it as any round trip (the watchdog)
                    try:
                        _result(await protocol.send(*_pack(list(self._address.handshake), False)), False)
                    except BaseException as e:
                        protocol.break_off(ConnectionError(f"the handshake failed: {e}"))
                        raise
                self._protocol = protocol
        return self._protocol  # nothing awaited since it was set: still the live one

    async def aclose(self) -> None:
        if self._protocol is not None:
            self._protocol.break_off(ConnectionError("the client was closed"))
            self._protocol = None
