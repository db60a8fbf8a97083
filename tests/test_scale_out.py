"""More machines (SPEC O1): two real provider processes on one PostgreSQL and one
Redis, as ``deploy/`` runs them behind a load balancer.

Each process is its own Python interpreter serving ``idp.cli:served_app``
with uvicorn (what ``idp serve`` runs), on a socket this test bound first. Both
share the issuer URL, the database, the Redis and the signing-key directory, and
nothing else: whatever one process knows the other can only learn through them.
A relying party talks to both through the real protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
import redis
from joserfc import jwt
from joserfc.jwk import KeySet

from idp import bridge
from idp.settings import Settings
from idp.web.app import create_app
from idp.storage.kv import Batch, open_store
from tests import live, servers
from tests.harness import PASSWORD, Provider, pkce, redeem
from tests.test_backchannel import serving_receiver
from tests.test_e2e import NAME, Agent, _path

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 180.0  # seconds for a process to import, migrate and answer /readyz (~2 on an idle machine)
# uvicorn on the inherited listening socket: no gap in which another program could take the port.
SERVE = ("import socket, sys, uvicorn; uvicorn.Server(uvicorn.Config('idp.cli:served_app', factory=True, "
         "http='idp.web.corked:CorkedHttpToolsProtocol', proxy_headers=True, access_log=False, log_level='warning'))"
         ".run(sockets=[socket.socket(fileno=int(sys.argv[1]))])")

# Every CREATE TABLE in the database, with the server process that ran it: proof of who migrated.
DDL_LOG = """
CREATE TABLE ddl_log (object text, pid int);
CREATE FUNCTION log_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
  FOR r IN SELECT * FROM pg_event_trigger_ddl_commands() WHERE object_type = 'table' AND command_tag = 'CREATE TABLE' LOOP
    INSERT INTO ddl_log VALUES (r.object_identity, pg_backend_pid());
  END LOOP;
END $$;
CREATE EVENT TRIGGER log_ddl ON ddl_command_end WHEN TAG IN ('CREATE TABLE') EXECUTE FUNCTION log_ddl();
"""


def _wait(predicate, seconds: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {seconds} s")


class Cluster:
    """Two provider processes ``a`` and ``b`` (URLs), ``env`` (their IDP_* settings), and ``admin``
    (a Provider object in this process on the same database, for accounts and clients)."""

    def __init__(self, env: dict[str, str], a: str, b: str, admin: Provider):
        self.env, self.a, self.b, self.admin = env, a, b, admin
        self.issuer = env["IDP_ISSUER"]

    def idp(self, *args: str) -> subprocess.CompletedProcess:
        """Run the ``idp`` command with the cluster's settings."""
        return subprocess.run([sys.executable, "-m", "idp.cli", *args], env=self.env, capture_output=True, text=True,
                              timeout=60, cwd=self.env["IDP_OUTBOX_DIR"])


def _start(env: dict, sock, tmp: Path, name: str) -> subprocess.Popen:
    log = open(tmp / f"{name}.log", "wb")
    return subprocess.Popen([sys.executable, "-c", SERVE, str(sock.fileno())], env=env, cwd=tmp,
                            pass_fds=[sock.fileno()], stdout=log, stderr=subprocess.STDOUT)


def _ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    def answered():
        if proc.poll() is not None:
            raise AssertionError(f"{url} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(url + "/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    _wait(answered, START_TIMEOUT, f"{url}/readyz")


@pytest.fixture(scope="module")
def cluster(postgres_server, redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale-out")
    database = postgres_server.fresh_database()
    with psycopg.connect(database.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
        conn.execute(DDL_LOG)
    redis_server.flush()
    with contextlib.ExitStack() as stack:
        (sock_a, url_a), (sock_b, url_b) = stack.enter_context(live.reserve()), stack.enter_context(live.reserve())
        # One issuer for both, as behind a load balancer; each process is reached at its own port.
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "IDP_ISSUER": url_a,
               "IDP_DATABASE_URL": database, "IDP_REDIS_URL": redis_server.url, "IDP_KEYS_DIR": str(tmp / "keys"),
               "IDP_CAPTCHA": "off", "IDP_MFA": "false", "IDP_OUTBOX_DIR": str(tmp),
               "IDP_TRUST_DIR": str(ROOT / "keys/trust"), "IDP_CRL_CACHE_DIR": str(tmp / "crl")}
        # Started together on an empty database: both migrate at start.
        procs = [_start(env, sock_a, tmp, "a"), _start(env, sock_b, tmp, "b")]
        for proc in procs:
            stack.callback(proc.wait, 30)
            stack.callback(proc.terminate)
        _ready(url_a, procs[0], tmp / "a.log")
        _ready(url_b, procs[1], tmp / "b.log")
        app = create_app(Settings.from_env(env))
        stack.callback(app.state.svc.db.engine.dispose)
        admin = Provider(app, app.state.svc.clock)
        admin.account("alice", name=NAME)
        yield Cluster(env, url_a, url_b, admin)


@pytest.fixture(scope="module")
def receiver():
    """The relying party's own endpoints: redirect URI ``/cb``, back-channel logout ``/bc``."""
    with serving_receiver() as r:
        yield r


def _client(cluster, receiver) -> tuple[str, str]:
    return cluster.admin.client(client_name="校務行政系統", redirect_uris=[receiver.url + "/cb"],
                                post_logout_redirect_uris=[receiver.url + "/"],
                                backchannel_logout_uri=receiver.url + "/bc", backchannel_logout_session_required=True)


def _authorize(agent, base, client_id, redirect_uri, **extra):
    nonce = secrets.token_urlsafe(8)
    q = httpx.QueryParams({"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
                           "scope": "openid profile", "state": "s", "nonce": nonce, **extra})
    return agent.go(f"{base}/authorize?{q}"), nonce


def _code(agent, base, client_id, redirect_uri) -> tuple[str, str]:
    """Log in through the process at ``base``; the authorization code and the nonce sent."""
    page, nonce = _authorize(agent, base, client_id, redirect_uri)
    if page.status_code == 200 and "/login/factor/password" in page.text:
        page = agent.submit(page, "/login/factor/password", username="alice", password=PASSWORD)
    assert _path(page) == redirect_uri, (page.url, page.text[:500])
    return parse_qs(urlsplit(str(page.url)).query)["code"][0], nonce


def _fresh_code(base, client_id, redirect_uri) -> str:
    """The code of a new login through the process at ``base``."""
    agent = Agent()
    try:
        return _code(agent, base, client_id, redirect_uri)[0]
    finally:
        agent.close()


def _all_at_once(cluster, bases, attempt) -> list:
    """``attempt(base)`` for each of ``bases`` at once, made to race: Redis holds every write
    while reads go on, so a request at each process has read what it wants to claim and waits
    to claim it when the writes resume together. (A process's requests share one connection:
    the others queue behind its first.)"""
    r = redis.Redis.from_url(cluster.env["IDP_REDIS_URL"])
    r.execute_command("CLIENT", "PAUSE", "20000", "WRITE")
    try:
        with ThreadPoolExecutor(len(bases)) as pool:
            pending = [pool.submit(attempt, base) for base in bases]
            _wait(lambda: r.info("clients")["blocked_clients"] == len(set(bases)), 15, "each process waiting to claim")
            r.execute_command("CLIENT", "UNPAUSE")
            return [f.result() for f in pending]
    finally:
        r.execute_command("CLIENT", "UNPAUSE")


def _one_answered(answers) -> dict:
    """The one token response among ``answers``; every other one is invalid_grant."""
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] + [400] * (len(answers) - 1), [r.text for r in answers]
    assert all(r.json()["error"] == "invalid_grant" for r in answers if r.status_code == 400)
    return next(r.json() for r in answers if r.status_code == 200)


def _verify(base: str, token: str):
    keys = KeySet.import_key_set(httpx.get(base + "/jwks").json())
    return jwt.decode(token, keys, algorithms=["ES256", "RS256"])


# -- the tests -----------------------------------------------------------------------------------
def test_processes_started_together_migrated_the_database_once(cluster):
    with psycopg.connect(cluster.env["IDP_DATABASE_URL"].replace("postgresql+psycopg", "postgresql")) as conn:
        created = conn.execute("SELECT object, pid FROM ddl_log").fetchall()
        versions = conn.execute("SELECT count(*) FROM alembic_version").fetchone()[0]
    tables = [obj for obj, _ in created]
    assert "public.alembic_version" in tables and len(tables) > 5
    assert len(tables) == len(set(tables)), "a table was created twice"
    assert len({pid for _, pid in created}) == 1, "more than one process ran migrations"
    assert versions == 1


def test_login_at_one_process_code_refresh_and_logout_at_the_other(cluster, receiver):
    client_id, secret = _client(cluster, receiver)
    cb = receiver.url + "/cb"
    agent = Agent()
    try:
        code, nonce = _code(agent, cluster.a, client_id, cb)
        with httpx.Client(base_url=cluster.b, timeout=10) as b:
            tokens = redeem(b, client_id, secret, code, redirect_uri=cb)
            assert tokens.status_code == 200, tokens.text
            tokens = tokens.json()
            id_token = _verify(cluster.b, tokens["id_token"]).claims
            assert id_token["iss"] == cluster.issuer and id_token["aud"] == client_id
            assert id_token["nonce"] == nonce and id_token["name"] == NAME
            assert b.get("/userinfo", headers={"Authorization": f"Bearer {tokens['access_token']}"}).json()["sub"] \
                == id_token["sub"]

            refreshed = b.post("/token", data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
                               auth=(client_id, secret))
            assert refreshed.status_code == 200, refreshed.text
            refreshed = refreshed.json()
            assert _verify(cluster.a, refreshed["id_token"]).claims["sub"] == id_token["sub"]

            # Single sign-on through process B: the session made at A is known there.
            page, _ = _authorize(agent, cluster.b, client_id, cb, prompt="none")
            assert _path(page) == cb and "code" in parse_qs(urlsplit(str(page.url)).query)

            out = agent.go(f"{cluster.b}/logout?" + str(httpx.QueryParams(
                {"id_token_hint": refreshed["id_token"], "post_logout_redirect_uri": receiver.url + "/"})))
            assert _path(out) == receiver.url + "/"
            # The receiver is shared by the module's tests: this session's token, whatever came before.
            mine = _wait(lambda: [c for c in (_verify(cluster.a, t).claims for t in receiver.tokens)
                                  if c["sid"] == id_token["sid"]], what="the back-channel logout token")
            assert len(mine) == 1 and mine[0]["aud"] == client_id

            # Logged out everywhere: the refresh token is dead, and A knows the session is gone.
            again = b.post("/token", data={"grant_type": "refresh_token", "refresh_token": refreshed["refresh_token"]},
                           auth=(client_id, secret))
            assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
        page, _ = _authorize(agent, cluster.a, client_id, cb, prompt="none")
        assert parse_qs(urlsplit(str(page.url)).query)["error"] == ["login_required"]
    finally:
        agent.close()


def test_one_code_redeemed_concurrently_at_both_processes_succeeds_once(cluster, receiver):
    client_id, secret = _client(cluster, receiver)
    cb = receiver.url + "/cb"
    code = _fresh_code(cluster.a, client_id, cb)
    bases = [cluster.a, cluster.b] * 4

    def attempt(base):
        with httpx.Client(base_url=base, timeout=30) as http:
            return redeem(http, client_id, secret, code, redirect_uri=cb)

    _one_answered(_all_at_once(cluster, bases, attempt))


def test_one_refresh_token_raced_at_both_processes_rotates_once_and_ends_the_family(cluster, receiver):
    client_id, secret = _client(cluster, receiver)
    cb = receiver.url + "/cb"
    code = _fresh_code(cluster.a, client_id, cb)
    with httpx.Client(base_url=cluster.a, timeout=10) as a:
        refresh_token = redeem(a, client_id, secret, code, redirect_uri=cb).json()["refresh_token"]
    bases = [cluster.a, cluster.b] * 4

    def attempt(base):
        with httpx.Client(base_url=base, timeout=30) as http:
            return http.post("/token", data={"grant_type": "refresh_token", "refresh_token": refresh_token},
                             auth=(client_id, secret))

    winner = _one_answered(_all_at_once(cluster, bases, attempt))
    # The others reused a rotated token (RFC 9700 4.14): what the winner got is revoked too.
    with httpx.Client(base_url=cluster.b, timeout=10) as b:
        again = b.post("/token", data={"grant_type": "refresh_token", "refresh_token": winner["refresh_token"]},
                       auth=(client_id, secret))
        assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
        assert b.get("/userinfo", headers={"Authorization": f"Bearer {winner['access_token']}"}).status_code == 401


def test_key_rotation_reaches_every_process_without_a_restart(cluster, receiver):
    client_id, secret = _client(cluster, receiver)
    cb = receiver.url + "/cb"
    rotated = cluster.idp("keys", "rotate", "--now")  # the next keys are minutes old here
    assert rotated.returncode == 0, rotated.stderr
    new_kids = {line.split()[-1] for line in rotated.stdout.splitlines() if line.startswith("now signing with")}
    [es256] = [kid for kid in new_kids if kid.startswith("es256-")]

    def signs_with_new_key(base):
        code = _fresh_code(base, client_id, cb)
        with httpx.Client(base_url=base, timeout=10) as http:
            token = redeem(http, client_id, secret, code, redirect_uri=cb).json()["id_token"]
        return _verify(base, token).header["kid"] == es256

    for base in (cluster.a, cluster.b):
        _wait(lambda: signs_with_new_key(base), 180, what=f"{base} signing with {es256}")
        assert es256 in {k["kid"] for k in httpx.get(base + "/jwks").json()["keys"]}



# -- idp serve --workers N: several processes on one port ------------------------------------------
def test_idp_serve_workers_answer_metrics_with_the_sum_of_all_of_them(cluster, tmp_path):
    port = servers.free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**cluster.env, "TMPDIR": str(tmp_path), "IDP_LOG_FORMAT": "json"}
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "idp.cli", "serve", "--port", str(port), "--workers", "2"],
                            env=env, cwd=tmp_path, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        _ready(base, proc, log)
        for _ in range(40):  # each on a new connection, so the kernel hands them to both workers
            assert httpx.get(base + "/.well-known/openid-configuration").status_code == 200
        served = 'idp_http_request_seconds_count{method="GET",route="/.well-known/openid-configuration",status="200"}'
        for _ in range(8):  # whichever worker answers
            counts = [line.split()[-1] for line in httpx.get(base + "/metrics").text.splitlines()
                      if line.startswith(served)]
            assert counts == ["40.0"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert list(tmp_path.glob("idp-metrics-*")) == []  # the workers' counts go with them
    # IDP_LOG_FORMAT=json: every line is one JSON object, the server's (uvicorn's) own included.
    lines = log.read_text().splitlines()
    assert lines and all(json.loads(line)["level"] and "color_message" not in json.loads(line) for line in lines)
    assert any(json.loads(line)["logger"].startswith("uvicorn") for line in lines)


def test_idp_serve_workers_without_redis_stops_with_the_reason(cluster):
    env = {**cluster.env, "IDP_REDIS_URL": ""}
    started = subprocess.run([sys.executable, "-m", "idp.cli", "serve", "--workers", "2"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert started.returncode == 2
    assert "--workers 2 needs IDP_REDIS_URL" in started.stderr


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_second_server_without_redis_on_one_database_stops_and_the_first_serves_on(database, cluster, tmp_path,
                                                                                     postgres_server):
    url = f"sqlite:///{tmp_path}/idp.sqlite3" if database == "sqlite" else postgres_server.fresh_database()
    env = {**cluster.env, "IDP_DATABASE_URL": url, "IDP_REDIS_URL": ""}

    def serve(name: str) -> tuple[str, subprocess.Popen]:
        port = servers.free_port()
        proc = subprocess.Popen([sys.executable, "-m", "idp.cli", "serve", "--port", str(port)], env=env, cwd=tmp_path,
                                stdout=open(tmp_path / name, "wb"), stderr=subprocess.STDOUT)
        return f"http://127.0.0.1:{port}", proc

    first, proc = serve("first.log")
    try:
        _ready(first, proc, tmp_path / "first.log")
        _, refused = serve("second.log")
        try:
            assert refused.wait(60) == 2  # it starts as far as the claim (~2 s), then stops
        finally:
            refused.kill()
        assert "another provider process serves this database without IDP_REDIS_URL" in (tmp_path / "second.log").read_text()
        assert httpx.get(first + "/readyz").status_code == 200
    finally:
        proc.kill()  # however the first ends, its claim ends with it
        proc.wait(30)
    third, proc = serve("third.log")
    try:
        _ready(third, proc, tmp_path / "third.log")
    finally:
        proc.terminate()
        proc.wait(30)

def test_a_server_without_redis_claims_its_database_again_after_postgresql_lost_the_claim(cluster, tmp_path,
                                                                                        postgres_server):
    """A PostgreSQL restart ends the connection that holds the claim: the server claims it
    again, so a second server started after that is still refused; and a server whose claim
    another process took meanwhile stops rather than serve split login state."""
    url = postgres_server.fresh_database()
    env = {**cluster.env, "IDP_DATABASE_URL": url, "IDP_REDIS_URL": ""}
    holder = ("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = 0 AND objid = %s"
              " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
    port = servers.free_port()
    log = tmp_path / "first.log"
    proc = subprocess.Popen([sys.executable, "-m", "idp.cli", "serve", "--port", str(port)], env=env, cwd=tmp_path,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as db:
        try:
            _ready(f"http://127.0.0.1:{port}", proc, log)
            lock = 0x1D9_0002
            first = db.execute(holder, (lock,)).fetchone()[0]
            db.execute("SELECT pg_terminate_backend(%s)", (first,))  # as a restart does to it
            again = _wait(lambda: (row := db.execute(holder, (lock,)).fetchone()) and row[0] != first and row[0],
                          30, "the server claiming its database again")
            refused = subprocess.run([sys.executable, "-m", "idp.cli", "serve", "--port", str(servers.free_port())],
                                     env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
            assert refused.returncode == 2

            db.execute("SELECT pg_terminate_backend(%s)", (again,))
            _wait(lambda: db.execute("SELECT pg_try_advisory_lock(%s)", (lock,)).fetchone()[0], 10,
                  "another server's claim")  # before the server's next look
            assert proc.wait(30) == -signal.SIGTERM  # stopped as by `kill`, after its requests
            assert "another provider process now serves this database" in log.read_text()
        finally:
            proc.kill()
            proc.wait(30)


# -- Redis Sentinel and Cluster (IDP_REDIS_URL redis+sentinel:// and redis+cluster://) -----------
def _redis_process(stack, tmp: Path, name: str, *args: str) -> tuple[int, subprocess.Popen]:
    """A redis-server in the foreground with ``args`` on a free port, stopped when ``stack`` closes."""
    port = servers.free_port()
    workdir = tmp / name
    workdir.mkdir()
    proc = subprocess.Popen([servers.find_redis_server(), *args, "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                            stdout=open(workdir / "log", "wb"), stderr=subprocess.STDOUT)
    stack.callback(proc.wait, 30)
    stack.callback(proc.terminate)

    def answers():
        if proc.poll() is not None:
            raise AssertionError(f"redis-server {name} exited:\n{(workdir / 'log').read_text()[-2000:]}")
        try:
            return redis.Redis(port=port, socket_timeout=2).ping()
        except redis.ConnectionError:
            return False

    _wait(answers, what=f"redis-server {name} answering PING")
    return port, proc


def _store_works(store):
    """What the provider does with its store, over keys that hash to many slots."""
    keys = [f"sess:{secrets.token_hex(8)}" for _ in range(20)]
    store.set_many([(k, {"n": i}, 60) for i, k in enumerate(keys)])
    assert store.get_many(keys + ["sess:absent"]) == [{"n": i} for i in range(20)] + [None]
    assert store.set("code:x", {"v": 1}, 60, only_new=True) and not store.set("code:x", {"v": 2}, 60, only_new=True)
    assert store.take("code:x") == {"v": 1} and store.take("code:x") is None
    assert store.swap("code:x", {"used": True}, 60) is None and store.get("code:x") is None  # absent stays absent
    store.set("code:x", {"v": 1}, 60)
    assert store.swap("code:x", {"used": True}, 60) == {"v": 1} and store.swap("code:x", {"used": True}, 60) == {"used": True}
    store.delete("code:x")
    assert [store.incr("fail:alice", 60) for _ in range(3)] == [1, 2, 3]
    store.add("acct-sess:alice", "s1", 60)
    store.add("acct-sess:alice", "s2", 60)
    assert store.members("acct-sess:alice") == {"s1", "s2"}
    store.delete(*keys, "fail:alice", "acct-sess:alice")
    assert store.get_many(keys) == [None] * 20 and store.members("acct-sess:alice") == set()
    assert store.ping()


def _full_login(tmp: Path, redis_url: str):
    """Log in, redeem, refresh and log out through the provider's real endpoints, on ``redis_url``."""
    from idp.clock import FrozenClock

    clock = FrozenClock()
    provider = Provider(create_app(Settings.from_env(
        {}, database_url=f"sqlite:///{tmp}/idp.sqlite3", redis_url=redis_url, keys_dir=str(tmp / "keys"),
        captcha="off", issuer="http://idp.test", mfa=False), clock), clock)
    provider.account("alice", name=NAME)
    client_id, secret = provider.client()
    browser = provider.browser()
    verifier, challenge = pkce()
    code = browser.login(client_id, code_challenge=challenge, code_challenge_method="S256")["code"]
    http = provider.http()
    tokens = redeem(http, client_id, secret, code, verifier).json()
    refreshed = http.post("/token", data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
                          auth=(client_id, secret))
    assert refreshed.status_code == 200, refreshed.text
    browser.go("/logout?" + str(httpx.QueryParams({"id_token_hint": refreshed.json()["id_token"]})))
    assert http.post("/token", data={"grant_type": "refresh_token", "refresh_token": refreshed.json()["refresh_token"]},
                     auth=(client_id, secret)).status_code == 400


def test_redis_sentinel_is_followed_through_a_failover(tmp_path):
    with contextlib.ExitStack() as stack:
        primary, primary_proc = _redis_process(stack, tmp_path, "primary")
        replica, _ = _redis_process(stack, tmp_path, "replica", "--replicaof", "127.0.0.1", str(primary))
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"sentinel monitor main 127.0.0.1 {primary} 1\n"
                        f"sentinel known-replica main 127.0.0.1 {replica}\n"  # else learnt from INFO, every 10 s
                        "sentinel down-after-milliseconds main 500\nsentinel failover-timeout main 10000\n")
        sentinel, _ = _redis_process(stack, tmp_path, "sentinel", str(conf), "--sentinel")
        url = f"redis+sentinel://127.0.0.1:{sentinel}/main"
        store = open_store(url)
        _store_works(store)
        _full_login(tmp_path, url)
        # The token endpoint's calls go through the store's asyncio client (idp.bridge): it must
        # follow the failover too, on the loop it was opened on.
        loop = asyncio.new_event_loop()
        stack.callback(loop.close)

        def awaited(method, *args):
            return loop.run_until_complete(bridge.run(method, *args))

        awaited(store.set, "async-before", {"ok": True}, 600)

        store.set("survives", {"ok": True}, 600)
        _wait(lambda: redis.Redis(port=replica).get("idp:survives"), what="replication to the replica")
        primary_proc.terminate()  # the master's machine goes away
        primary_proc.wait(30)
        admin = redis.Redis(port=sentinel, decode_responses=True)
        _wait(lambda: admin.sentinel_get_master_addr_by_name("main") == ("127.0.0.1", replica),
              what="the Sentinel promoting the replica")
        # The same store, not rebuilt: it asks the Sentinel again and writes to the new master.
        _wait(lambda: _try(lambda: store.set("after", {"ok": True}, 60)), what="a write after the failover")
        assert store.get("survives") == {"ok": True}
        assert redis.Redis(port=replica).get("idp:after") is not None
        _wait(lambda: _try(lambda: awaited(store.set, "async-after", {"ok": True}, 60)),
              what="a write through the asyncio client after the failover")
        assert awaited(store.get, "async-before") == {"ok": True}
        assert redis.Redis(port=replica).get("idp:async-after") is not None


def _try(action):
    try:
        return action()
    except redis.RedisError:
        return False


def test_redis_cluster_of_three_masters(tmp_path):
    with contextlib.ExitStack() as stack:
        ports = []
        for i in range(3):
            bus = servers.free_port()  # the default (port + 10000) may be past 65535
            ports.append(_redis_process(stack, tmp_path, f"node{i}", "--cluster-enabled", "yes",
                                        "--cluster-port", str(bus), "--cluster-config-file", str(tmp_path / f"nodes{i}.conf"))[0])
        created = subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                                  "--cluster-yes"], capture_output=True, text=True, timeout=60)
        assert created.returncode == 0, created.stdout + created.stderr
        _wait(lambda: all(redis.Redis(port=p, decode_responses=True).cluster("INFO")["cluster_state"] == "ok"
                          for p in ports), what="the cluster state ok on every node")
        url = f"redis+cluster://127.0.0.1:{ports[0]}"
        store = open_store(url)
        _store_works(store)
        # Keys of one multi-key call really are spread over the three masters.
        store.set_many([(f"spread:{i}", {"n": i}, 60) for i in range(20)])
        assert all(redis.Redis(port=p).dbsize() > 0 for p in ports)
        assert store.get_many([f"spread:{i}" for i in range(20)]) == [{"n": i} for i in range(20)]
        _reads_after_writes(store, ports)
        _full_login(tmp_path, url)


def _reads_after_writes(store, ports) -> None:
    """A batch's read comes after its write though the two keys live on two nodes (a login's
    session list and the mark a password reset leaves): the written key's node slow to write
    (CLIENT PAUSE), a mark set meanwhile on the other is what the batch reads."""
    from redis.cluster import RedisCluster

    cluster = RedisCluster(host="127.0.0.1", port=ports[0])
    node = lambda key: cluster.get_node_from_key("idp:" + key).port  # noqa: E731
    written = "acct-sess:order"
    mark = next(f"acct-not-before:order{i}" for i in range(100) if node(f"acct-not-before:order{i}") != node(written))
    redis.Redis(port=node(written)).execute_command("CLIENT", "PAUSE", 1000, "WRITE")
    reset = threading.Timer(0.3, store.set, (mark, {"time": 1}, 60))
    reset.start()
    batch = Batch()
    batch.add(written, "sid", 60)
    found = batch.read(mark)
    assert store.write(batch)[found] == {"time": 1}
    reset.join()
