"""The store on one Redis server through its own client (``idp.storage.resp``): the
ways ``IDP_REDIS_URL`` reaches a server (TLS with an ACL user and a database, a unix
socket with a password), blocking and awaited the way the token endpoint awaits it,
and what happens when the server drops connections, stalls or answers an error.

One real redis-server for the module, with a TLS port, a unix socket and no plain TCP.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from types import SimpleNamespace

import pytest
import redis

from idp import bridge
from idp.storage import resp
from idp.storage.kv import MemoryStore, RedisStore
from tests import servers

USER, USER_PASSWORD, DEFAULT_PASSWORD = "idp", "s3cret-user", "s3cret-default"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("redis-tls")
    cert, key = servers.server_certificate(tmp)
    sock, port = tmp / "redis.sock", servers.free_port()
    proc = subprocess.Popen(
        [servers.find_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
         "--tls-auth-clients", "no", "--unixsocket", str(sock), "--unixsocketperm", "700",
         "--requirepass", DEFAULT_PASSWORD, "--user", USER, "on", f">{USER_PASSWORD}", "~*", "&*", "+@all",
         "--save", "", "--appendonly", "no", "--dir", str(tmp)],
        stdout=open(tmp / "log", "wb"), stderr=subprocess.STDOUT)
    admin = redis.Redis(unix_socket_path=str(sock), password=DEFAULT_PASSWORD, socket_timeout=5)
    deadline = time.monotonic() + 15
    while True:
        try:
            admin.ping()
            break
        except redis.RedisError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("redis-server did not start:\n" + (tmp / "log").read_text()[-2000:])
            time.sleep(0.05)
    yield {"tls": f"rediss://{USER}:{USER_PASSWORD}@localhost:{port}/2?ssl_ca_certs={cert}",
           "unix": f"unix://:{DEFAULT_PASSWORD}@{sock}?db=3", "admin": admin}
    proc.terminate()
    proc.wait(30)


def awaited(fn, *args, **kwargs):
    """``fn`` as the token endpoint runs it: on an event loop, its round trips awaited."""
    async def main():
        try:
            return await bridge.run(lambda: fn(*args, **kwargs))
        finally:
            await fn.__self__.aclose()  # the RedisStore whose method fn is
    return asyncio.run(main())


def _operations(call, store: RedisStore) -> None:
    """Every operation of the store, through ``call`` (direct or awaited)."""
    assert call(store.set, "k", {"a": 1}, 60) is True
    assert call(store.set, "k", {"a": 2}, 60, only_new=True) is False
    assert call(store.get, "k") == {"a": 1}
    assert call(store.get_many, ["k", "missing"]) == [{"a": 1}, None]
    assert call(store.take, "k") == {"a": 1} and call(store.get, "k") is None
    assert call(store.incr, "n", 60) == 1 and call(store.incr, "n", 60, by=5) == 6
    call(store.add, "s", "x", 60)
    call(store.add, "s", "y", 60)
    assert call(store.members, "s") == {"x", "y"}
    call(store.set_many, [("m1", {"v": 1}, 60), ("m2", {"v": 2}, 60)])
    from idp.storage.kv import Batch
    batch = Batch()
    batch.take("m1")
    batch.read("m2")  # after the batch's writes: it sees the replacement below
    batch.incr("n", 60, by=-1)
    batch.claim("c", 60)
    batch.claim("m2", 60)  # taken already
    batch.set("m3", {"v": 3}, 60)
    batch.replace("m2", {"v": 22}, 60)
    batch.replace("m1", {"v": 11}, 60)  # taken above: stays gone
    batch.add("s2", "z", 60)
    batch.delete("k", "s")
    assert call(store.write, batch) == [{"v": 1}, {"v": 22}, 5, True, False]
    assert call(store.get_many, ["m1", "m2", "m3", "c"]) == [None, {"v": 22}, {"v": 3}, {}]
    assert call(store.members, "s2") == {"z"} and call(store.members, "s") == set()
    call(store.delete, "m2", "m3", "s2", "n", "c")
    assert call(store.get_many, ["m2", "m3"]) == [None, None] and call(store.members, "s") == set()


def _direct(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def test_the_in_process_store_answers_every_operation_as_redis_does():
    _operations(_direct, MemoryStore())


def test_the_in_process_store_lets_go_of_what_expired_though_nobody_reads_it(monkeypatch):
    """As Redis does: a login page opened and left, a form never sent, leave their keys behind,
    which no request reads again; the process's memory must not keep them."""
    from idp.storage import kv

    store, now = MemoryStore(), [1000.0]
    monkeypatch.setattr(kv, "time", SimpleNamespace(monotonic=lambda: now[0]))  # this module's clock alone
    store._next_sweep = now[0] + store.SWEEP_SECONDS
    for i in range(100):
        store.set(f"tx:{i}", {"n": i}, 900)
        store.add(f"acct-sess:{i}", "s", 900)
    store.set("kept", {"n": 1}, 86400 * 2)
    now[0] += 86400
    store.set("tx:new", {"n": 0}, 900)  # any write in the next minute
    assert set(store._data) == {"kept", "tx:new"} and not store._sets


@pytest.mark.parametrize("way", ["tls", "unix"])
@pytest.mark.parametrize("call", [_direct, awaited], ids=["blocking", "awaited"])
def test_every_operation_reaches_the_database_the_url_names(server, way, call):
    store = RedisStore(server[way])
    _operations(call, store)
    call(store.set, "here", {"ok": True}, 60)
    db = 2 if way == "tls" else 3
    admin = server["admin"]
    admin.execute_command("SELECT", db)
    try:
        assert admin.get("idp:here") == b'{"ok":true}' and 0 < admin.ttl("idp:here") <= 60
    finally:
        admin.execute_command("SELECT", 0)
    assert store.ping()


def test_a_wrong_password_or_an_untrusted_certificate_is_refused(server, tmp_path):
    wrong = RedisStore(server["unix"].replace(DEFAULT_PASSWORD, "wrong"))
    with pytest.raises(redis.ResponseError, match="WRONGPASS|invalid"):
        wrong.get("k")
    assert not wrong.ping()
    untrusted = RedisStore(server["tls"].split("?")[0])  # the system's CAs do not know the test server
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        untrusted.get("k")
    with pytest.raises(ValueError, match="unsupported option health_check_interval"):
        RedisStore(server["unix"] + "&health_check_interval=5")


@pytest.mark.parametrize("call", [_direct, awaited], ids=["blocking", "awaited"])
def test_connections_the_server_dropped_are_replaced_without_an_error(server, call):
    store = RedisStore(server["unix"])

    async def kill_then(fn):
        # Within one event loop, as a server's requests are: the drop happens between two of them.
        await bridge.run(store.set, "k", {"a": 1}, 60)
        server["admin"].execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        await asyncio.sleep(0.1)
        try:
            return await bridge.run(fn)
        finally:
            await store.aclose()

    if call is awaited:
        assert asyncio.run(kill_then(lambda: store.get("k"))) == {"a": 1}
    else:
        store.set("k", {"a": 1}, 60)
        server["admin"].execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        time.sleep(0.1)
        assert store.get("k") == {"a": 1}


@pytest.mark.parametrize("call", [_direct, awaited], ids=["blocking", "awaited"])
def test_a_stalled_server_times_out_and_the_next_round_trip_works(server, call):
    store = RedisStore(server["unix"] + "&socket_timeout=0.3")
    call(store.set, "k", {"a": 1}, 60)
    server["admin"].execute_command("CLIENT", "PAUSE", "1000", "ALL")
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        call(store.get, "k")
    assert time.monotonic() - started < 0.9
    time.sleep(1.0)  # the pause is over
    assert call(store.get, "k") == {"a": 1}


def test_on_a_busy_connection_each_round_trip_gets_its_whole_timeout(server):
    """One watchdog per connection: a round trip sent late in an earlier one's time is
    neither cut short at the earlier one's deadline nor left waiting past its own."""
    store = RedisStore(server["unix"] + "&socket_timeout=0.4")

    async def main():
        try:
            await bridge.run(store.set, "k", {"a": 1}, 60)  # arms the watchdog at t=0
            await asyncio.sleep(0.25)
            server["admin"].execute_command("CLIENT", "PAUSE", "1500", "ALL")
            started = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                await bridge.run(store.get, "k")
            return time.monotonic() - started
        finally:
            await store.aclose()

    waited = asyncio.run(main())
    assert 0.35 <= waited < 1.0
    time.sleep(1.5)  # the pause is over
    assert store.get("k") == {"a": 1}


@pytest.mark.parametrize("call", [_direct, awaited], ids=["blocking", "awaited"])
def test_an_error_reply_is_raised_and_the_connection_stays_in_step(server, call):
    store = RedisStore(server["unix"])
    call(store.set, "word", {"not": "a number"}, 60)
    with pytest.raises(redis.ResponseError, match="not an integer"):
        call(store.incr, "word", 60)
    call(store.set, "after", {"ok": True}, 60)
    assert call(store.get, "after") == {"ok": True}


def test_many_requests_of_one_event_loop_share_one_connection_in_order(server):
    store = RedisStore(server["unix"])
    opened = lambda: server["admin"].info("stats")["total_connections_received"]  # noqa: E731
    opened_before = opened()

    async def main():
        try:
            await asyncio.gather(*(bridge.run(store.set, f"c{i}", {"i": i}, 60) for i in range(200)))
            got = await asyncio.gather(*(bridge.run(store.get, f"c{i}") for i in range(200)))
            return got, opened() - opened_before
        finally:
            await store.aclose()

    got, connections = asyncio.run(main())
    assert got == [{"i": i} for i in range(200)]
    assert connections == 1


@pytest.mark.parametrize("call", [_direct, awaited], ids=["blocking", "awaited"])
def test_an_empty_round_trip_asks_nothing_and_the_next_one_is_answered(server, call):
    store = RedisStore(server["unix"])
    assert call(store.get_many, []) == [] and call(store.set_many, []) is None
    call(store.set, "k", {"a": 1}, 60)
    assert call(store.get, "k") == {"a": 1}


def test_a_cancelled_request_leaves_the_replies_in_step(server):
    store = RedisStore(server["unix"])

    async def main():
        try:
            await bridge.run(store.set, "x", {"v": "x"}, 60)
            await bridge.run(store.set, "y", {"v": "y"}, 60)
            first = asyncio.ensure_future(bridge.run(store.get, "x"))
            await asyncio.sleep(0)  # sent, its reply not yet read
            first.cancel()
            return await bridge.run(store.get, "y")
        finally:
            await store.aclose()

    assert asyncio.run(main()) == {"v": "y"}


def test_the_url_gives_the_address_the_credentials_and_the_database():
    address = resp.Address.from_url("redis://u:p%40ss@cache.example:6380/4?socket_timeout=2")
    assert (address.host, address.port, address.timeout) == ("cache.example", 6380, 2.0)
    assert address.handshake == (("AUTH", "u", "p@ss"), ("SELECT", 4))
    assert "p@ss" not in repr(address)  # an address in a log line shows no password
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        resp.Address.from_url("rediss://cache.example?ssl_cert_reqs=maybe")
    assert resp.Address.from_url("rediss://cache.example").tls.check_hostname
    assert not resp.Address.from_url("rediss://cache.example?ssl_check_hostname=false").tls.check_hostname
