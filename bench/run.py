"""Benchmark the provider against panva's oidc-provider and Keycloak's sizing figures.

    .venv/bin/python bench/run.py [--quick] [--no-profile] [--no-theirs]

What it does, in one run (see bench/README.md):

1. Starts a throwaway PostgreSQL and Redis on free loopback ports (tests/servers.py).
2. Migrates and seeds the provider through its own code (``idp.services.Services``):
   a first-party confidential client (client_secret_basic; client_credentials,
   authorization_code, refresh_token) and ``--accounts`` accounts with one password
   and each its own bound TOTP secret (Enrolment.start/confirm, pyotp computing the code).
3. For N = 1 and 2 worker processes runs ``idp serve --workers N`` with production
   settings (PostgreSQL, Redis, IDP_MFA=true, IDP_CAPTCHA=off) and measures with wrk
   (Lua script bench/wrk/bench.lua): discovery, JWKS, client_credentials grants,
   authorization-code exchanges (codes minted ahead with ``svc.tokens.save_code`` into the
   same Redis, with a PKCE challenge, each a real SSO session), refresh grants (refresh
   tokens minted ahead with ``svc.tokens.open_grant``/``issue``: single use, rotated), and
   full password+TOTP logins with an async httpx driver (authorize, login form, password,
   OTP, code, token). Logins are measured again at Keycloak's argon2 parameters.
4. Runs the provider on its single-process store (bench/serve_memory.py), one worker, and
   measures the token endpoint again: the like-for-like row against oidc-provider's Map.
5. Starts oidc-provider (tests/e2e/node_modules, bench/oidc_provider.mjs) with the
   equivalent configuration, on Redis (bench/node_modules' ioredis) and again in memory,
   and measures discovery, JWKS, client_credentials, code exchange and refresh the same
   way; prints our/theirs ratios (Redis against Redis, in-process against in memory).
   Then runs our 1 worker and oidc-provider on Redis side by side and measures their
   three grants in turns (``head_to_head``): the ratio that a drifting VM cannot skew.
6. Prints the tables (rates; and each server's CPU time per request, which the load
   generator sharing the cores does not skew) and writes them to
   bench/results/<date>-<cores>cores.{md,json} (``-2``, ``-3``... for a day's later runs).

The load generator runs on the same cores as the servers: compare the ratios of one run,
not absolute numbers across machines or runs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from idp.protocol.logout import httpx  # noqa: E402  (httpx2, which the project depends on, or httpx)
from tests.servers import free_port, start_postgres, start_redis  # noqa: E402

BENCH = ROOT / "bench"
LUA = BENCH / "wrk" / "bench.lua"
VENV_BIN = Path(sys.executable).parent
PASSWORD = "Bench-Passw0rd!"
REDIRECT = "http://127.0.0.1:9/callback"  # never contacted: the driver reads the code off the Location
VERIFIER = "bench-verifier-" + "x" * 40  # one PKCE pair for every pre-minted code
CHALLENGE = base64.urlsafe_b64encode(hashlib.sha256(VERIFIER.encode()).digest()).rstrip(b"=").decode()
OWASP = {"time_cost": 2, "memory_kib": 19456}
KEYCLOAK_ARGON2 = {"time_cost": 5, "memory_kib": 7168}
LIGHT_ARGON2 = {"time_cost": 1, "memory_kib": 64}  # a hash of no cost: what a login costs besides it
# Keycloak 26 "Concepts for sizing CPU and memory resources" (per vCPU, argon2 t=5 m=7 MiB).
KEYCLOAK = {"login": 15, "client_credentials": 120, "refresh": 120}
WRK_THREADS = 2
WRK_CONNECTIONS = 32
OTP_STEP = 30
METRICS_TOKEN = secrets.token_urlsafe(16)  # the server's /metrics, for its argon2 time

CORES = os.cpu_count() or 1


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- seeding


class PipelineStore:
    """The provider's RedisStore ``set`` semantics, queued on a Redis pipeline, so that
    tens of thousands of codes and tokens can be minted through ``idp.protocol.tokens.Tokens``
    (the provider's own key and record format) without one round trip each."""

    def __init__(self, redis_client, prefix: str = "idp:"):
        import orjson

        self._dumps = orjson.dumps
        self.pipe = redis_client.pipeline(transaction=False)
        self.prefix = prefix

    def set(self, key, value, ttl, *, only_new=False):
        self.pipe.set(self.prefix + key, self._dumps(value), ex=ttl, nx=only_new)
        return True

    def add(self, key, member, ttl):
        self.pipe.sadd(self.prefix + key, member)
        self.pipe.expire(self.prefix + key, ttl)

    def write(self, batch):
        if batch.takes or batch.reads:
            raise ValueError("minting only writes: a batch that reads needs the real store")
        for key, value, ttl in batch.sets:
            self.set(key, value, ttl)
        for key, member, ttl in batch.adds:
            self.add(key, member, ttl)
        for key in batch.deletes:
            self.pipe.delete(self.prefix + key)
        return []

    def flush(self):
        self.pipe.execute()


def flush(store) -> None:
    if isinstance(store, PipelineStore):
        store.flush()


class Seed:
    """Seeds and mints through the provider's own code, in this process."""

    def __init__(self, env: dict, accounts: int):
        os.environ.update(env)
        from idp.services import Services
        from idp.settings import Settings

        self.svc = Services(Settings.from_env())
        self.svc.start()  # migrates
        url = self.svc.settings.redis_url  # a client of its own, for pipelined minting and scans
        self.redis = redis.Redis.from_url(url) if url else None
        self.n_accounts = accounts
        self.account_ids: list[str] = []
        self.usernames: list[str] = []
        self.secrets: dict[str, str] = {}

    def now(self):
        return dt.datetime.fromtimestamp(self.svc.clock(), dt.timezone.utc)

    def client(self) -> tuple[str, str]:
        from idp.protocol.clients import client_info, create_client

        meta = {
            "client_name": "bench",
            "redirect_uris": [REDIRECT],
            "grant_types": ["authorization_code", "refresh_token", "client_credentials"],
            "token_endpoint_auth_method": "client_secret_basic",
        }
        with self.svc.db.session() as session:
            row, secret, _ = create_client(session, meta, first_party=True)
            info = client_info(row, secret)
        return info["client_id"], info["client_secret"]

    def accounts(self) -> None:
        """Accounts bench0000.. with one password (hashed once: the same argon2 string for
        all, at the server's parameters) and each its own TOTP secret, bound the way a user
        binds it: Enrolment.start, then confirm with the code of the previous step (so the
        current and the next step are left for logins)."""
        import pyotp
        from idp.accounts import create_account
        from idp.factors.totp import Enrolment
        from idp.storage.models import Account

        hashed = self.svc.passwords.hash(PASSWORD)

        class OneHash:  # create_account's policy check, with the hash computed once
            def problems(_, password, username=""):
                return self.svc.passwords.problems(password, username)

            def hash(_, password):
                return hashed

        enrol = Enrolment(self.svc)
        for i in range(self.n_accounts):
            username = f"bench{i:04d}"
            with self.svc.db.session() as session:
                account = create_account(session, OneHash(), username, PASSWORD, now=self.now(), name=username,
                                         email=f"{username}@bench.example", email_verified=True)
                account_id = account.id
            with self.svc.db.session() as session:
                account = session.get(Account, account_id)
                pending = enrol.start(account, "bench")  # the page's owner: none here, one made up
            secret = self.svc.box.open(pending["secret"], account_id)
            step = int(self.svc.clock() // OTP_STEP) - 1
            error = enrol.confirm(account_id, "bench", pyotp.TOTP(secret).at(step * OTP_STEP))
            if error:  # the previous step's code equals the current one's: bind with today's
                error = enrol.confirm(account_id, "bench", pyotp.TOTP(secret).now())
            if error:
                raise RuntimeError(f"binding OTP for {username} failed: {error}")
            self.account_ids.append(account_id)
            self.usernames.append(username)
            self.secrets[username] = secret

    def population(self, n: int) -> None:
        """``n`` more accounts (pop000000..), each with a password and an OTP binding, that
        never log in here: the logins' look-ups run against a user base of a portal's size,
        not against the ``--accounts`` that log in. Inserted in bulk, all with one password hash."""
        import uuid

        from sqlalchemy import insert

        from idp.storage.models import Account, Binding

        hashed = self.svc.passwords.hash(PASSWORD)
        for start in range(0, n, 20000):
            ids = [str(uuid.uuid4()) for _ in range(start, min(n, start + 20000))]
            with self.svc.db.engine.begin() as conn:
                conn.execute(insert(Account), [
                    {"id": account_id, "username": f"pop{start + i:06d}", "name": "", "password_hash": hashed,
                     "email": f"pop{start + i:06d}@bench.example", "email_verified": True, "kind": "personal"}
                    for i, account_id in enumerate(ids)])
                conn.execute(insert(Binding), [
                    {"id": str(uuid.uuid4()), "account_id": account_id, "factor": "otp", "label": "",
                     "data": {"secret": "-", "version": 1}} for account_id in ids])
        with self.svc.db.engine.begin() as conn:  # the planner sees the tables' real size
            conn.exec_driver_sql("ANALYZE")

    def load_accounts(self) -> None:
        """The bench accounts another process seeded (for minting; their TOTP secrets stay there)."""
        from sqlalchemy import select
        from idp.storage.models import Account

        with self.svc.db.session() as session:
            rows = session.execute(select(Account.id, Account.username).where(Account.username.like("bench%"))
                                   .order_by(Account.username)).all()
        self.account_ids = [r.id for r in rows]
        self.usernames = [r.username for r in rows]

    def set_password_params(self, time_cost: int, memory_kib: int) -> None:
        """Re-hash every bench account's password at other argon2 parameters (one hash,
        shared), so the server started with the same parameters does no upgrade re-hash."""
        from argon2 import PasswordHasher
        from sqlalchemy import update
        from idp.storage.models import Account

        hashed = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=1).hash(PASSWORD)
        with self.svc.db.session() as session:
            session.execute(update(Account).where(Account.username.like("bench%")).values(password_hash=hashed))

    def reset_otp(self) -> None:
        """Forget which TOTP steps were used (bindings' last_step, the used-step markers), so
        every account can log in again; done between login measurements only."""
        from sqlalchemy import select
        from idp.storage.models import Binding

        with self.svc.db.session() as session:
            for b in session.execute(select(Binding).where(Binding.factor == "otp")).scalars():
                b.data = {**b.data, "last_step": -1}
        r = self.redis
        keys = list(r.scan_iter("idp:otp-used:*", count=1000)) + list(r.scan_iter("idp:fail:*", count=1000))
        for i in range(0, len(keys), 1000):
            r.delete(*keys[i:i + 1000])

    def _auth(self, i: int) -> tuple[str, dict]:
        """An SSO session like a login's, for the i-th pre-minted code or token."""
        account_id = self.account_ids[i % len(self.account_ids)]
        return account_id, {"acr": "urn:idp:loa:2", "amr": ["pwd", "otp", "mfa"]}

    def mint_codes(self, client_id: str, n: int, store=None) -> list[str]:
        """Authorization codes written with ``svc.tokens.save_code`` (the record
        ``idp.web.login._issue_code`` writes), each under its own session
        (``svc.sessions.create``), with the bench PKCE challenge; into ``store``, or
        pipelined into the Redis the server uses."""
        from idp.protocol.tokens import Tokens
        from idp.sessions import Sessions

        store = store or PipelineStore(self.redis)
        tokens, sessions = Tokens(store, self.svc.clock), Sessions(store, self.svc.clock, self.svc.settings.session_seconds)
        codes = []
        for i in range(n):
            account_id, a = self._auth(i)
            sess = sessions.create(account_id, self.usernames[i % len(self.usernames)], a["amr"], a["acr"], self.svc.clock())
            auth = {"sid": sess["sid"], "auth_time": sess["auth_time"], "acr": a["acr"], "amr": a["amr"]}
            record = {"client_id": client_id, "account": account_id, "redirect_uri": REDIRECT, "scope": "openid",
                      "nonce": secrets.token_urlsafe(8), "code_challenge": CHALLENGE, "code_challenge_method": "S256",
                      "auth": auth, "claims": {}}  # scope openid releases no profile claims
            codes.append(tokens.save_code(record, 600))  # lifetime 600 s here: minted before the run starts
            if i % 2000 == 1999:
                flush(store)
        flush(store)
        return codes

    def mint_refresh(self, client_id: str, n: int, store=None) -> list[str]:
        """Refresh tokens as a code exchange leaves them (``Tokens.open_grant`` + ``issue``,
        the record ``idp.protocol.server._issue`` writes), one grant each, scope openid;
        into ``store`` or the server's Redis, as ``mint_codes``."""
        from idp.protocol.tokens import Tokens
        from idp.sessions import Sessions

        store = store or PipelineStore(self.redis)
        tokens, sessions = Tokens(store, self.svc.clock), Sessions(store, self.svc.clock, self.svc.settings.session_seconds)
        lifetime = self.svc.settings.refresh_token_seconds
        out = []
        for i in range(n):
            account_id, a = self._auth(i)
            sess = sessions.create(account_id, self.usernames[i % len(self.usernames)], a["amr"], a["acr"], self.svc.clock())
            auth = {"sid": sess["sid"], "auth_time": sess["auth_time"], "acr": a["acr"], "amr": a["amr"]}
            gid = tokens.open_grant({"client_id": client_id, "account": account_id, "auth": auth, "claims": {}}, lifetime)
            out.append(tokens.issue("rt", gid, {"scope": "openid"}, lifetime))
            if i % 2000 == 1999:
                flush(store)
        flush(store)
        return out


# --------------------------------------------------------------------------- servers


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200:
                return
            last = r.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout}s ({last})")


class Proc:
    def __init__(self, argv, env, url, health, logfile: Path):
        self.logfile = logfile
        self.fh = open(logfile, "wb")
        self.p = subprocess.Popen(argv, env=env, stdout=self.fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                  start_new_session=True)
        self.url = url
        try:
            wait_http(url + health, self.p)
        except BaseException:
            self.stop()
            print(logfile.read_text()[-3000:], file=sys.stderr)
            raise

    def pids(self) -> list[int]:
        """The server process and its worker children."""
        out = subprocess.run(["pgrep", "-P", str(self.p.pid)], capture_output=True, text=True).stdout.split()
        return [self.p.pid] + [int(x) for x in out]

    def stop(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)  # the group is ours alone (start_new_session)
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
            except ProcessLookupError:
                pass
        self.fh.close()


# --------------------------------------------------------------------------- load: wrk


def _cpu(stat: Path) -> float:
    """User + system CPU seconds in a /proc ``stat`` file (a process's: all its threads; a task's: one)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15 of proc(5))


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time so far of these processes (all their threads)."""
    total = 0.0
    for pid in pids:
        try:
            total += _cpu(Path(f"/proc/{pid}/stat"))
        except FileNotFoundError:
            continue
    return total


def loop_thread(pid: int) -> tuple[float, int]:
    """(CPU seconds, times it went to sleep) so far of the process's main thread: a worker's
    event loop, apart from its hashing threads."""
    task = Path(f"/proc/{pid}/task/{pid}")
    sleeps = re.search(r"^voluntary_ctxt_switches:\s*(\d+)", (task / "status").read_text(), re.M).group(1)
    return _cpu(task / "stat"), int(sleeps)


def wrk(url: str, seconds: float, *, method="GET", body="", auth="", items: list[str] | None = None,
        tmp: Path, pids: list[int] | None = None) -> dict:
    """wrk's rate and latencies; with ``pids`` (the server's processes) also the server's
    CPU time per successful request, which the load generator sharing the cores does not skew."""
    env = {**os.environ, "BENCH_METHOD": method, "BENCH_BODY": body, "BENCH_AUTH": auth,
           "BENCH_THREADS": str(WRK_THREADS), "BENCH_ITEMS": ""}
    if items is not None:
        f = tmp / f"items-{secrets.token_hex(4)}.txt"
        f.write_text("\n".join(items) + "\n")
        env["BENCH_ITEMS"] = str(f)
    argv = ["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
            "-s", str(LUA), url]
    cpu0 = cpu_seconds(pids or [])
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60)
    cpu = cpu_seconds(pids or []) - cpu0
    m = re.search(r"^BENCHJSON (.*)$", out.stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk gave no result: {out.stdout}\n{out.stderr}")
    r = json.loads(m.group(1))
    ok = r["requests"] - r["status_errors"]
    secs = r["duration_us"] / 1e6
    return {"rate": ok / secs, "ok": ok, "errors": r["status_errors"] + r["socket_errors"], "exhausted": r["exhausted"],
            "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000, "seconds": secs, "tool": "wrk",
            **({"cpu_us": cpu / ok * 1e6} if pids and ok else {})}


def token_endpoint(base: str, auth: str, seconds: float, pids: list[int], codes, refresh) -> dict:
    """Discovery, JWKS and the three token-endpoint grants of one server, with its CPU per
    request. ``codes()`` and ``refresh()`` mint the single-use credentials, each just before
    its measurement: codes live a minute (ours and oidc-provider's alike)."""
    tmp = Path(tempfile.mkdtemp(prefix="idp-bench-wrk-"))
    out = {
        "discovery": wrk(base + "/.well-known/openid-configuration", seconds, tmp=tmp, pids=pids),
        "jwks": wrk(base + "/jwks", seconds, tmp=tmp, pids=pids),
        "client_credentials": wrk(base + "/token", seconds, method="POST", auth=auth,
                                  body="grant_type=client_credentials", tmp=tmp, pids=pids),
    }
    out["code_exchange"] = wrk(base + "/token", seconds, method="POST", auth=auth, items=codes(), tmp=tmp, pids=pids,
                               body=f"grant_type=authorization_code&redirect_uri={REDIRECT}&code_verifier={VERIFIER}&code=")
    out["refresh"] = wrk(base + "/token", seconds, method="POST", auth=auth, items=refresh(), tmp=tmp, pids=pids,
                         body="grant_type=refresh_token&refresh_token=")
    return out


def warm_up(base: str, auth: str, tmp: Path) -> None:
    """One untimed second each of discovery and client_credentials: connection pools
    filled, caches and (for node) the JIT warm before anything is measured."""
    wrk(base + "/.well-known/openid-configuration", 1, tmp=tmp)
    wrk(base + "/token", 1, method="POST", auth=auth, body="grant_type=client_credentials", tmp=tmp)


def basic(client_id: str, secret: str) -> str:
    from urllib.parse import quote

    raw = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
    return "Basic " + base64.b64encode(raw).decode()


# --------------------------------------------------------------------------- load: logins


class OtpSlots:
    """Which TOTP step each account may use next. The provider takes a code one step
    either side of now, never a step twice or older than the last used one; we use the
    current or the next step, so an account logs in at most twice per 30 s window."""

    def __init__(self, usernames: list[str]):
        self.last = {u: -1 for u in usernames}
        self.order = list(usernames)
        self.i = 0
        self.waits = 0

    async def take(self) -> tuple[str, int]:
        while True:
            cur = int(time.time() // OTP_STEP)
            for _ in range(len(self.order)):
                u = self.order[self.i]
                self.i = (self.i + 1) % len(self.order)
                step = max(self.last[u] + 1, cur)
                if step <= cur + 1:
                    self.last[u] = step
                    return u, step
            self.waits += 1
            await asyncio.sleep(0.1)


FIELD = re.compile(r'name="(tx|csrf)" value="([^"]*)"')


async def one_login(http, base: str, client_id: str, auth: str, username: str, secret: str, step: int) -> None:
    import pyotp

    http.cookies.clear()
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state = secrets.token_urlsafe(8)
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "scope": "openid",
              "state": state, "nonce": secrets.token_urlsafe(8), "code_challenge": challenge,
              "code_challenge_method": "S256"}

    async def follow(r):
        while r.status_code in (302, 303) and r.headers["location"].startswith(("/", base)):
            loc = r.headers["location"]
            r = await http.get(loc if loc.startswith("http") else base + loc)
        return r

    def form(r):
        fields = dict(FIELD.findall(r.text))
        if "tx" not in fields:
            raise RuntimeError(f"no login form at {r.url} ({r.status_code}): {r.text[:300]}")
        return fields

    r = await follow(await http.get(base + "/authorize", params=params))
    f = form(r)
    r = await follow(await http.post(base + "/login/factor/password",
                                     data={**f, "username": username, "password": PASSWORD}))
    f = form(r)
    code_now = pyotp.TOTP(secret).at(step * OTP_STEP)
    r = await follow(await http.post(base + "/login/factor/otp", data={**f, "otp": code_now}))
    loc = r.headers.get("location", "")
    if r.status_code != 302 or not loc.startswith(REDIRECT):
        raise RuntimeError(f"login of {username} did not end at the client ({r.status_code}): {r.text[:300]}")
    from urllib.parse import parse_qs, urlsplit

    q = parse_qs(urlsplit(loc).query)
    r = await http.post(base + "/token", headers={"Authorization": auth},
                        data={"grant_type": "authorization_code", "code": q["code"][0], "redirect_uri": REDIRECT,
                              "code_verifier": verifier})
    if r.status_code != 200 or "id_token" not in r.json():
        raise RuntimeError(f"token after login failed ({r.status_code}): {r.text[:300]}")


def hash_seconds(base: str) -> tuple[float, int]:
    """(CPU seconds, count) of the argon2 hashes and checks the server made so far, from
    its /metrics (one process's: ask a single worker). CPU, not the hashes' wall time:
    that also counts the time the hashing thread waited for a core."""
    text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10).text
    cpu = re.search(r"^idp_password_hash_cpu_seconds_total (\S+)$", text, re.M).group(1)
    count = re.search(r"^idp_password_hash_seconds_count (\S+)$", text, re.M).group(1)
    return float(cpu), int(float(count))


async def logins(base: str, seconds: float, client_id: str, secret: str, seed: Seed, concurrency: int,
                 pids: list[int] | None = None, one_worker: bool = False) -> dict:
    """Full logins per second in the measured window; with ``pids``, the server's CPU time per
    login over every login of the run (the warm-up's too); with ``one_worker``, also the mean
    CPU time of an argon2 verify inside the server over the same logins (``hash_ms``), and its
    event loop's CPU time and sleeps per login (``loop_ms``, ``loop_sleeps``)."""
    auth = basic(client_id, secret)
    completed = 0
    slots = OtpSlots(seed.usernames)
    latencies: list[float] = []
    errors: list[str] = []
    # A login takes long under load (seconds at high concurrency): let the pipeline fill
    # first, then count the logins that end inside the measured window.
    warm = 2.0
    t_start = time.monotonic()
    count_from, stop_at = t_start + warm, t_start + warm + seconds

    async def user():
        async with httpx.AsyncClient(timeout=30) as http:
            while time.monotonic() < stop_at:
                username, step = await slots.take()
                t0 = time.perf_counter()
                try:
                    await one_login(http, base, client_id, auth, username, seed.secrets[username], step)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    errors.append(repr(exc)[:300])
                    continue
                nonlocal completed
                completed += 1
                if count_from <= time.monotonic() <= stop_at:
                    latencies.append(time.perf_counter() - t0)

    hashed0 = hash_seconds(base) if one_worker else None
    loop0 = loop_thread(pids[-1]) if one_worker and pids else None
    cpu0 = cpu_seconds(pids or [])
    await asyncio.gather(*(user() for _ in range(concurrency)))
    cpu = cpu_seconds(pids or []) - cpu0
    inside = {}  # measured inside the server
    if hashed0:
        took, count = (now - before for now, before in zip(hash_seconds(base), hashed0))
        inside = {"hash_ms": took / count * 1000} if count else {}
    if loop0 and completed:
        loop_cpu, sleeps = (now - before for now, before in zip(loop_thread(pids[-1]), loop0))
        inside |= {"loop_ms": loop_cpu / completed * 1000, "loop_sleeps": sleeps / completed}
    elapsed = seconds
    latencies.sort()

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000 if latencies else float("nan")

    if errors:
        log(f"  {len(errors)} failed logins, first: {errors[0]}")
    return {"rate": len(latencies) / seconds, "ok": len(latencies), "errors": len(errors), "exhausted": 0,
            "p50_ms": pct(50), "p99_ms": pct(99), "seconds": elapsed, "tool": f"httpx async x{concurrency}",
            "otp_waits": slots.waits, **({"cpu_us": cpu / completed * 1e6} if pids and completed else {}),
            **inside}


# --------------------------------------------------------------------------- memory


def _sample(r, pattern: str, keep, limit: int = 300) -> list[tuple[bytes, dict]]:
    """Up to ``limit`` (key, record) of the keys matching ``pattern`` whose record ``keep`` accepts."""
    import orjson

    out = []
    for key in r.scan_iter(pattern, count=1000):
        raw = r.get(key)
        if raw is None:
            continue
        record = orjson.loads(raw)
        if keep(record):
            out.append((key, record))
            if len(out) >= limit:
                break
    return out


def redis_memory(r) -> dict:
    """Bytes per key (Redis ``MEMORY USAGE``, key and overhead included) of what real logins,
    code exchanges and refreshes left in the store, and what one SSO session with one
    client login costs in all: its session record, its grant list, its share of the
    account's session set, and that login's grant, access and refresh token and code marker."""
    def usage(keys):
        sizes = [r.memory_usage(k, samples=0) or 0 for k in keys]
        return (sum(sizes) / len(sizes), len(sizes)) if sizes else (0.0, 0)

    real = _sample(r, "idp:sess:*", lambda rec: "user_agent" in rec)  # from the HTTP logins, not minted
    gids = set()
    for _, rec in real:
        gids |= {m.decode().split(" ")[1] for m in r.smembers("idp:sess-grants:" + rec["sid"])}
    families = {
        "session (sess:)": usage([k for k, _ in real]),
        "session's grant list (sess-grants:, 1 grant)": usage([f"idp:sess-grants:{rec['sid']}" for _, rec in real
                                                               if r.scard(f"idp:sess-grants:{rec['sid']}") == 1]),
        "grant (grant:)": usage([f"idp:grant:{g}" for g in list(gids)[:300] if r.exists(f"idp:grant:{g}")]),
        # Token records hold scope and expiry only (the account is the grant's): a user's has openid.
        "access token, user (at:)": usage([k for k, _ in _sample(r, "idp:at:*", lambda rec: "openid" in rec["scope"].split())]),
        "refresh token (rt:)": usage([k for k, _ in _sample(r, "idp:rt:*", lambda rec: True)]),
        "access token, client_credentials (at:)": usage([k for k, _ in _sample(r, "idp:at:*", lambda rec: "openid" not in rec["scope"].split())]),
        "used-code marker, 24 h (code:, used)": usage([k for k, _ in _sample(r, "idp:code:*", lambda rec: rec.get("used"))]),
        "rotated-refresh marker (rt-used:)": usage([k for k, _ in _sample(r, "idp:rt-used:*", lambda rec: True)]),
    }
    # An account's session set with one member (one session per account: the worst case per session).
    probe = "idp:bench-probe-acct-sess"
    r.sadd(probe, real[0][1]["sid"] if real else "x" * 32)
    families["account's session set (acct-sess:, 1 member)"] = (float(r.memory_usage(probe, samples=0) or 0), 1)
    r.delete(probe)
    per_session = sum(families[k][0] for k in ("session (sess:)", "session's grant list (sess-grants:, 1 grant)",
                                                "account's session set (acct-sess:, 1 member)"))
    per_login = sum(families[k][0] for k in ("grant (grant:)", "access token, user (at:)", "refresh token (rt:)",
                                             "used-code marker, 24 h (code:, used)"))
    return {"families": {k: {"bytes": round(v[0]), "sampled": v[1]} for k, v in families.items()},
            "per_session": round(per_session), "per_login": round(per_login),
            "million_sessions_gib": (per_session + per_login) * 1e6 / 2**30}


# --------------------------------------------------------------------------- argon2


def argon2_references(blocks: int = 5, per_block: int = 8) -> dict:
    """CPU time of one verify (median, ms) at our and at Keycloak's parameters, back to back
    and with cold caches. Back to back, argon2's memory stays in the CPU's caches from one
    verify to the next; ``cold``: 64 MiB of other memory is written before each verify, as a
    server's other work does between two logins. The four kinds take turns in ``blocks``, so
    that a VM's slow minute weighs on all of them alike."""
    from argon2 import PasswordHasher

    hashers = {}
    for name, params in (("owasp", OWASP), ("keycloak", KEYCLOAK_ARGON2)):
        ph = PasswordHasher(time_cost=params["time_cost"], memory_cost=params["memory_kib"], parallelism=1)
        hashers[name] = (ph, ph.hash(PASSWORD))
        ph.verify(hashers[name][1], PASSWORD)
    other, fill = bytearray(64 << 20), bytes(range(256)) * (256 << 10)
    times: dict[str, list[float]] = {}
    for _ in range(blocks):
        for name, (ph, hashed) in hashers.items():
            for cold in (False, True):
                for _ in range(per_block):
                    if cold:
                        other[:] = fill
                    t0 = time.thread_time()
                    ph.verify(hashed, PASSWORD)
                    times.setdefault(f"{name}{'_cold' if cold else ''}_ms", []).append(time.thread_time() - t0)
    return {key: statistics.median(values) * 1000 for key, values in times.items()}


def small_argon2(verify_ms: float) -> dict:
    """LIGHT_ARGON2 with as many passes as make a verify take about ``verify_ms`` of CPU: a
    login beside it waits for its hash as long as beside a default one, but its caches are
    not swept. Calibrated here, on a verify of 100 passes."""
    from argon2 import PasswordHasher

    ph = PasswordHasher(time_cost=100, memory_cost=LIGHT_ARGON2["memory_kib"], parallelism=1)
    hashed = ph.hash(PASSWORD)
    took = []
    for _ in range(9):
        t0 = time.thread_time()
        ph.verify(hashed, PASSWORD)
        took.append(time.thread_time() - t0)
    per_pass_ms = statistics.median(took) * 1000 / 100
    return {**LIGHT_ARGON2, "time_cost": max(1, round(verify_ms / per_pass_ms))}


# --------------------------------------------------------------------------- profile


def profile(pid: int, seconds: float, out: Path) -> list[str]:
    """py-spy record (raw collapsed stacks) of one worker; returns a short summary:
    the top functions by own samples and the top frames by inclusive samples."""
    spy = shutil.which("py-spy") or str(VENV_BIN / "py-spy")
    if not os.access(spy, os.X_OK):
        return ["(py-spy not installed: .venv/bin/pip install py-spy)"]
    # --gil: only the thread holding the GIL is sampled, i.e. where the Python CPU time goes
    res = subprocess.run([spy, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", "200", "--gil",
                          "-f", "raw", "-o", str(out), "--nonblocking"], capture_output=True, text=True)
    if not out.exists():
        return [f"(py-spy failed: {res.stderr.strip()[-300:]})"]
    return summarize(out, pid, gil=True)


def summarize(out: Path, pid: int, gil: bool = False) -> list[str]:
    if not out.exists():
        return ["(no py-spy output)"]
    own, incl, total = {}, {}, 0
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = stack.split(";")
        leaf = frames[-1]
        own[leaf] = own.get(leaf, 0) + n
        seen = set()
        for fr in frames:
            key = re.sub(r":\d+\)$", ")", fr)  # inclusive: by function, not line
            if key not in seen:
                seen.add(key)
                incl[key] = incl.get(key, 0) + n
    if not total:
        return ["(no samples)"]
    lines = [f"{total} samples of one worker (pid {pid}) at 200 Hz, all its threads"
             + (" holding the GIL (Python CPU time; argon2 releases the GIL)" if gil else
                " (includes threads waiting on PostgreSQL/Redis sockets and the pool)")]
    lines.append("own time (leaf frames):")
    for fr, n in sorted(own.items(), key=lambda kv: -kv[1])[:15]:
        lines.append(f"  {100 * n / total:5.1f}%  {fr}")
    lines.append("inclusive time (idp/authlib/starlette/redis/sqlalchemy/joserfc functions):")
    interesting = [(fr, n) for fr, n in incl.items()
                   if re.search(r"(idp/|authlib|starlette|redis|sqlalchemy|joserfc|psycopg|orjson|cryptography|uvicorn)", fr)]
    for fr, n in sorted(interesting, key=lambda kv: -kv[1])[:30]:
        lines.append(f"  {100 * n / total:5.1f}%  {fr}")
    return lines


# --------------------------------------------------------------------------- run


def fmt_rate(r):
    if not r:
        return "—"
    s = f"{r['rate']:,.0f}/s"
    if r["rate"] < 100:
        s = f"{r['rate']:,.1f}/s"
    s += f" ({r['p50_ms']:.1f} / {r['p99_ms']:.1f} ms)"
    if r.get("errors"):
        s += f" [{r['errors']} errors]"
    if r.get("exhausted"):
        s += " [ran out of pre-minted values]"
    if r.get("otp_waits"):
        s += " [waited for TOTP steps: more --accounts]"
    return s


def core_rate(r):
    """Requests one core serves at the measured CPU time per request."""
    return {"rate": 1e6 / r["cpu_us"]} if r and r.get("cpu_us") else None


def per_core(r):
    if not r or not r.get("cpu_us"):
        return "—"
    us = r["cpu_us"]
    cost = f"{us / 1000:.1f} ms" if us >= 10_000 else f"{us:,.0f} µs"
    split = f" (argon2 {r['hash_ms']:.1f} ms of it, the rest {us / 1000 - r['hash_ms']:.1f} ms)" if r.get("hash_ms") else ""
    return f"{cost} → {1e6 / us:,.0f}/s{split}"


def ratio(a, b):
    if not a or not b or not b["rate"]:
        return "—"
    return f"{a['rate'] / b['rate']:.2f}"


def start_theirs(node: str, procs: list, tmp: Path, redis_url: str = ""):
    """oidc-provider (on its Map, or on ``redis_url``), warmed up: (its Proc, base URL,
    Basic auth, ``mint(kind, n)`` of codes or refresh tokens through its models)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    client_id, secret = "bench-client", secrets.token_urlsafe(32)
    p = Proc([node, str(BENCH / "oidc_provider.mjs"), str(port), client_id, secret, REDIRECT, redis_url],
             os.environ.copy(), base, "/.well-known/openid-configuration", tmp / f"oidc-provider-{port}.log")
    procs.append(p)
    auth = basic(client_id, secret)
    warm_up(base, auth, tmp)

    def mint(kind, n):
        r = httpx.post(f"{base}/__bench/mint", params={"kind": kind, "n": n, "challenge": CHALLENGE}, timeout=300)
        r.raise_for_status()
        return r.text.split()

    return p, base, auth, mint


def measure_theirs(node: str, seconds: float, mint_rate: int, procs: list, tmp: Path, redis_url: str = "") -> dict:
    """Start oidc-provider (on its Map, or on ``redis_url``) and measure its token endpoint."""
    log(f"panva's oidc-provider (1 node process), {'Redis adapter' if redis_url else 'in-memory adapter'}")
    p, base, auth, mint = start_theirs(node, procs, tmp, redis_url)
    res = token_endpoint(base, auth, seconds, p.pids(), lambda: mint("code", int(mint_rate * seconds)),
                         lambda: mint("refresh", int(mint_rate * seconds)))
    for k, v in res.items():
        log(f"  {k:20s} {fmt_rate(v)}")
    p.stop()
    procs.remove(p)
    return res


GRANTS = ("client_credentials", "code_exchange", "refresh")
H2H_ROUNDS = 3


def head_to_head(sides: dict, seconds: float, rounds: int, mint_rate: int, tmp: Path) -> dict:
    """The three grants of our provider and oidc-provider, both running on one Redis,
    measured in turns (the order swapped each round), so both meet the same machine:
    on a shared VM a minute can be 15 % slower than the next. ``sides``: name ->
    (pids, base, auth, mint(kind, n)). Each side's median CPU per request, and each
    round's ours/theirs speed ratio."""
    per: dict = {name: {g: [] for g in GRANTS} for name in sides}
    n = int(mint_rate * seconds)
    for i in range(rounds):
        order = list(sides) if i % 2 == 0 else list(reversed(sides))
        for grant in GRANTS:
            for name in order:
                pids, base, auth, mint = sides[name]
                if grant == "client_credentials":
                    r = wrk(base + "/token", seconds, method="POST", auth=auth, body="grant_type=client_credentials",
                            tmp=tmp, pids=pids)
                elif grant == "code_exchange":
                    r = wrk(base + "/token", seconds, method="POST", auth=auth, items=mint("code", n), tmp=tmp, pids=pids,
                            body=f"grant_type=authorization_code&redirect_uri={REDIRECT}&code_verifier={VERIFIER}&code=")
                else:
                    r = wrk(base + "/token", seconds, method="POST", auth=auth, items=mint("refresh", n), tmp=tmp,
                            pids=pids, body="grant_type=refresh_token&refresh_token=")
                if r.get("errors") or r.get("exhausted"):
                    raise RuntimeError(f"head to head: {name} {grant} failed requests: {r}")
                per[name][grant].append(r["cpu_us"])
    ours, theirs = list(sides)
    out = {}
    for grant in GRANTS:
        a, b = per[ours][grant], per[theirs][grant]
        out[grant] = {"ours_us": statistics.median(a), "theirs_us": statistics.median(b),
                      "ratio": statistics.median(b) / statistics.median(a),
                      "rounds": [round(y / x, 2) for x, y in zip(a, b)]}
        log(f"  {grant:20s} ours {out[grant]['ours_us']:,.0f} µs, theirs {out[grant]['theirs_us']:,.0f} µs: "
            f"{out[grant]['ratio']:.2f} (rounds {out[grant]['rounds']})")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="~3 s per measurement instead of ~10 s")
    ap.add_argument("--seconds", type=float, help="seconds per measurement (overrides --quick)")
    ap.add_argument("--workers", default="1,2", help="worker counts to measure (default 1,2)")
    # A TOTP step logs an account in once, and the driver uses the current and the next: at most
    # 2 x accounts logins in a 30 s window (the trivial-hash run does ~250/s on 2 cores).
    ap.add_argument("--accounts", type=int, default=2000, help="seeded accounts, each with its own TOTP secret")
    ap.add_argument("--population", type=int, default=100_000,
                    help="more accounts that never log in: the user base the logins' look-ups run against")
    ap.add_argument("--login-concurrency", type=int, default=4, help="concurrent login clients per worker")
    ap.add_argument("--no-theirs", action="store_true", help="skip oidc-provider")
    ap.add_argument("--no-profile", action="store_true", help="skip the py-spy profile of client_credentials")
    ap.add_argument("--out", default=str(BENCH / "results"))
    args = ap.parse_args()
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    workers = [int(x) for x in args.workers.split(",")]
    login_seconds = max(seconds, 6.0)  # logins are few per second: a longer window (after 2 s of warm-up)
    if not shutil.which("wrk"):
        print("bench: wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="idp-bench-"))
    procs: list[Proc] = []
    results: dict = {"ours": {}, "ours_memory": {}, "theirs": {}, "theirs_redis": {}, "logins_keycloak_argon2": {},
                     "logins_light_argon2": {}, "logins_small_argon2": {}, "head_to_head": {}}
    memory: dict = {}
    notes: list[str] = []
    profile_lines: list[str] = []
    login_profile_lines: list[str] = []
    try:
        log("starting PostgreSQL and Redis")
        pg = start_postgres(tmp)
        rd = start_redis(tmp)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {
            "IDP_ISSUER": base,
            "IDP_DATABASE_URL": pg.url,
            "IDP_REDIS_URL": rd.url,
            "IDP_KEYS_DIR": str(tmp / "keys"),
            "IDP_OUTBOX_DIR": str(tmp / "outbox"),
            "IDP_CAPTCHA": "off",
            "IDP_MFA": "true",
            "IDP_ARGON2_TIME_COST": str(OWASP["time_cost"]),
            "IDP_ARGON2_MEMORY_KIB": str(OWASP["memory_kib"]),
            "IDP_METRICS_TOKEN": METRICS_TOKEN,
        }
        (tmp / "keys").mkdir()
        log(f"seeding: 1 client, {args.accounts} accounts with password + own TOTP secret, "
            f"{args.population:,} more that do not log in")
        t0 = time.monotonic()
        seed = Seed(env, args.accounts)
        client_id, client_secret = seed.client()
        seed.accounts()
        seed.population(args.population)
        log(f"  seeded in {time.monotonic() - t0:.1f} s")
        auth = basic(client_id, client_secret)
        argon = argon2_references()
        log(f"argon2id verify on one core: {argon['owasp_ms']:.1f} ms at t=2/19 MiB, {argon['keycloak_ms']:.1f} ms at t=5/7 MiB"
            f" ({argon['owasp_cold_ms']:.1f} and {argon['keycloak_cold_ms']:.1f} ms with cold caches)")
        # Generous pre-mint, per second and worker (and for oidc-provider's process): one grant
        # runs at up to ~4,000/s on the fastest machine measured so far.
        mint_rate = 6000

        def serve(n: int, extra: dict | None = None) -> Proc:
            # PYTHONPATH: the server runs this checkout's idp, not whichever one the venv installed.
            e = {**os.environ, **env, **(extra or {}), "PYTHONPATH": str(ROOT)}
            p = Proc([str(VENV_BIN / "idp"), "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(n)],
                     e, base, "/readyz", tmp / f"idp-{n}.log")
            procs.append(p)
            # /readyz answered by one worker; give the others a moment to finish starting
            time.sleep(1.0 if n > 1 else 0.2)
            warm_up(base, auth, tmp)
            return p

        def logins_at(n: int, argon2: dict) -> dict:
            """Logins with every bench account's password hashed at ``argon2``, against a server
            started with the same parameters (so it makes no upgrade re-hash)."""
            seed.set_password_params(**argon2)
            seed.reset_otp()
            p = serve(n, {"IDP_ARGON2_TIME_COST": str(argon2["time_cost"]), "IDP_ARGON2_MEMORY_KIB": str(argon2["memory_kib"])})
            try:
                return asyncio.run(logins(base, login_seconds, client_id, client_secret, seed, args.login_concurrency * n,
                                          p.pids(), one_worker=n == 1))
            finally:
                p.stop()
                procs.remove(p)

        for n in workers:
            log(f"our provider, {n} worker(s)")
            seed.set_password_params(**OWASP)
            seed.reset_otp()
            p = serve(n)
            pids = p.pids()
            res = token_endpoint(base, auth, seconds, pids,
                                 lambda: seed.mint_codes(client_id, int(mint_rate * seconds * n)),
                                 lambda: seed.mint_refresh(client_id, int(mint_rate * seconds * n)))
            res["login"] = asyncio.run(logins(base, login_seconds, client_id, client_secret, seed,
                                              args.login_concurrency * n, pids, one_worker=n == 1))
            if n == workers[0]:
                memory = redis_memory(seed.redis)
            for k, v in res.items():
                log(f"  {k:20s} {fmt_rate(v)}")
            if n == 1 and not args.no_profile:
                log("  profiling one worker under client_credentials load (py-spy, not part of the numbers)")
                job = subprocess.Popen(["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{round(seconds) + 2}s",
                                        "-s", str(LUA), base + "/token"],
                                       env={**os.environ, "BENCH_METHOD": "POST", "BENCH_AUTH": auth,
                                            "BENCH_BODY": "grant_type=client_credentials", "BENCH_THREADS": str(WRK_THREADS)},
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)
                profile_lines = profile(p.pids()[-1], seconds, tmp / "profile.txt")
                job.wait()
                log("  profiling one worker under login load (py-spy, not part of the numbers)")
                seed.reset_otp()
                spy = shutil.which("py-spy") or str(VENV_BIN / "py-spy")
                if os.access(spy, os.X_OK):
                    job = subprocess.Popen([spy, "record", "-p", str(p.pids()[-1]), "-d", str(round(seconds) + 2), "-r", "200",
                                            "-f", "raw", "-o", str(tmp / "profile-login.txt"), "--nonblocking"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    asyncio.run(logins(base, seconds, client_id, client_secret, seed, args.login_concurrency))
                    job.wait()
                    login_profile_lines = summarize(tmp / "profile-login.txt", p.pids()[-1])
            p.stop()
            procs.remove(p)
            results["ours"][n] = res

            log(f"  logins at Keycloak's argon2 (t=5, 7 MiB), {n} worker(s)")
            results["logins_keycloak_argon2"][n] = r = logins_at(n, KEYCLOAK_ARGON2)
            log(f"  {'login (t=5, 7 MiB)':20s} {fmt_rate(r)}")
            if n == 1:
                log("  logins with a trivial argon2 (t=1, 64 KiB), 1 worker: the provider's own work")
                results["logins_light_argon2"] = r = logins_at(1, LIGHT_ARGON2)
                log(f"  {'login (t=1, 64 KiB)':20s} {fmt_rate(r)}")
                small = small_argon2(argon["owasp_ms"])
                log(f"  logins with a hash as long as the default in {small['memory_kib']} KiB (t={small['time_cost']}), "
                    "1 worker: the wait without the cache sweep")
                results["logins_small_argon2"] = r = {**small, **logins_at(1, small)}
                log(f"  {'login (small, long)':20s} {fmt_rate(r)}")

        log("our provider on its single-process store (no Redis), 1 worker: like oidc-provider's in-memory adapter")
        n_items = int(mint_rate * seconds)
        p = Proc([sys.executable, str(BENCH / "serve_memory.py"), str(port), client_id, str(n_items), str(n_items), str(tmp)],
                 {**os.environ, **env, "IDP_REDIS_URL": "", "PYTHONPATH": str(ROOT)}, base, "/readyz", tmp / "idp-memory.log")
        procs.append(p)
        warm_up(base, auth, tmp)
        # minted inside the serving process as it started (its store is its own memory)
        results["ours_memory"] = token_endpoint(base, auth, seconds, p.pids(), lambda: (tmp / "codes.txt").read_text().split(),
                                                lambda: (tmp / "refresh.txt").read_text().split())
        p.stop()
        procs.remove(p)

        if not args.no_theirs:
            node = shutil.which("node")
            if not node or not (ROOT / "tests/e2e/node_modules/oidc-provider").exists():
                notes.append("oidc-provider not measured: node or tests/e2e/node_modules missing (make test installs them)")
            else:
                results["theirs"] = measure_theirs(node, seconds, mint_rate, procs, tmp)
                if (BENCH / "node_modules/ioredis").exists():
                    results["theirs_redis"] = measure_theirs(node, seconds, mint_rate, procs, tmp, rd.url)
                    turn = max(3.0, seconds / 2)
                    log(f"head to head on Redis: our 1 worker and oidc-provider's process in turns, "
                        f"{H2H_ROUNDS} rounds of {turn:.0f} s")
                    ours_p = serve(1)
                    theirs_p, their_base, their_auth, their_mint = start_theirs(node, procs, tmp, rd.url)

                    def our_mint(kind, n):
                        return seed.mint_codes(client_id, n) if kind == "code" else seed.mint_refresh(client_id, n)

                    sides = {"ours": (ours_p.pids(), base, auth, our_mint),
                             "theirs": (theirs_p.pids(), their_base, their_auth, their_mint)}
                    results["head_to_head"] = head_to_head(sides, turn, H2H_ROUNDS, mint_rate, tmp)
                    results["head_to_head_seconds"] = turn
                    for proc in (ours_p, theirs_p):
                        proc.stop()
                        procs.remove(proc)
                else:
                    notes.append("oidc-provider on Redis not measured: bench/node_modules missing (make bench installs it)")
    finally:
        for p in procs:
            p.stop()

    # ------------------------------------------------------------------ the table
    ours, memory_store, theirs, theirs_redis = results["ours"], results["ours_memory"], results["theirs"], results["theirs_redis"]
    kc_login = results["logins_keycloak_argon2"]
    ns = sorted(ours)
    metrics = [("discovery", "discovery (GET)"), ("jwks", "JWKS (GET)"), ("client_credentials", "client_credentials grant"),
               ("code_exchange", "authorization-code exchange"), ("refresh", "refresh grant (rotating)"),
               ("login", "password+TOTP login, argon2 t=2 19 MiB (full flow + code exchange)")]
    head = ["measurement"] + [f"ours, {n} worker{'s' if n > 1 else ''}" for n in ns]
    head += ["ours, in-process store, 1 worker", "oidc-provider 9.13 on Redis (1 process)", "oidc-provider 9.13 in memory"]
    head += [f"ours {n}w / theirs on Redis" for n in ns] + ["in-process / theirs in memory", "Keycloak 26 per vCPU (published)"]
    rows = []
    for key, label in metrics:
        row = [label] + [fmt_rate(ours[n].get(key)) for n in ns]
        row += [fmt_rate(memory_store.get(key)), fmt_rate(theirs_redis.get(key)), fmt_rate(theirs.get(key))]
        row += [ratio(ours[n].get(key), theirs_redis.get(key)) for n in ns] + [ratio(memory_store.get(key), theirs.get(key))]
        row += [f"{KEYCLOAK[key]}/s" if key in KEYCLOAK and key != "login" else ("—" if key != "login" else "15/s (t=5, 7 MiB)")]
        rows.append(row)
    rows.append(["password+TOTP login, argon2 t=5 7 MiB (Keycloak's)"] + [fmt_rate(kc_login.get(n)) for n in ns]
                + ["—", "—", "—"] + ["—" for _ in ns] + ["—", "15/s"])
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    ceiling = {"owasp": 1000 / argon["owasp_ms"], "keycloak": 1000 / argon["keycloak_ms"]}
    one = ours.get(1, {})
    def login_target(warm_ms, cold_ms, measured):
        inside = f"; {800 / measured['hash_ms']:,.0f}/s at the server's own verify" if measured and measured.get("hash_ms") else ""
        return f"{800 / warm_ms:,.0f}/s ({800 / cold_ms:,.0f}/s with cold caches{inside})"

    targets = {"client_credentials": "2,000/s", "code_exchange": "1,000/s", "refresh": "1,000/s",
               "login": login_target(argon["owasp_ms"], argon["owasp_cold_ms"], one.get("login"))}
    cpu_head = ["measurement", "ours, Redis", "ours, in-process store", "oidc-provider, Redis", "oidc-provider, in memory",
                "Redis / theirs on Redis", "in-process / theirs in memory", "Redis / theirs in memory", "target per worker"]
    cpu_md = ["| " + " | ".join(cpu_head) + " |", "|" + "---|" * len(cpu_head)]
    for key, label in metrics:
        cells = [per_core(r.get(key)) for r in (one, memory_store, theirs_redis, theirs)]
        pairs = [(one, theirs_redis), (memory_store, theirs), (one, theirs)]
        cpu_md.append("| " + " | ".join([label, *cells, *[ratio(core_rate(a.get(key)), core_rate(b.get(key))) for a, b in pairs],
                                         targets.get(key, "—")]) + " |")
    kc = kc_login.get(1)
    cpu_md.append("| " + " | ".join(["password+TOTP login, argon2 t=5 7 MiB (Keycloak's)", per_core(kc), *["—"] * 6,
                                     login_target(argon["keycloak_ms"], argon["keycloak_cold_ms"], kc)]) + " |")
    light, small, limits = results["logins_light_argon2"], results["logins_small_argon2"], []
    if light.get("cpu_us"):
        cpu_md.append("| " + " | ".join(["password+TOTP login, argon2 t=1 64 KiB (next to nothing: the provider's own work)",
                                         per_core(light), *["—"] * 7]) + " |")
    if small.get("cpu_us"):
        cpu_md.append("| " + " | ".join([f"password+TOTP login, argon2 t={small['time_cost']} {small['memory_kib']} KiB (as long as a "
                                         "default verify, without its memory)", per_core(small), *["—"] * 7]) + " |")
    default = one.get("login") or {}
    if light.get("cpu_us") and small.get("hash_ms") and default.get("hash_ms"):
        own, waited, rest = (r["cpu_us"] / 1000 - r.get("hash_ms", 0) for r in (light, small, default))
        loop = [f"{r['loop_ms']:.1f} ms and {r['loop_sleeps']:.0f} sleeps" for r in (light, small, default) if "loop_ms" in r]
        limits = [f"- **What limits logins.** A login's own work (its four requests, their round trips to Redis "
                  f"and PostgreSQL, an ES256 signature) takes {own:.1f} ms of CPU beside a hash of no cost, "
                  f"{own / argon['owasp_ms'] * 100:.0f} % of a default verify. Beside a hash as long as the default "
                  f"one but in {small['memory_kib']} KiB it takes {waited:.1f} ms: the same work costs the event loop "
                  "more CPU while a hash runs, the loop asleep between requests and woken for each (its figures "
                  "below; bench/README says what did not reduce it). Beside the default hash it takes "
                  + (f"{rest:.1f} ms: the rest is each verify sweeping 19 MiB through the caches of the core it runs "
                     "on, so the loop's next turns find their code and data gone (huge pages for the hash's memory did "
                     "not change it)." if rest > waited else
                     f"{rest:.1f} ms, no more in this run: the VM's drift between the two measurements hid the "
                     "share of the verify's 19 MiB sweep through the caches.")
                  + (f" The event loop's thread alone, per login, beside the three hashes: {', '.join(loop)}."
                     if len(loop) == 3 else "")]
    h2h, h2h_md = results["head_to_head"], []
    if h2h:
        h2h_md = [f"**Head to head on Redis.** The single runs above are a few minutes apart, and on a shared VM one "
                  "minute can be 15 % slower than the next; so our 1 worker and oidc-provider's process also run side by "
                  f"side on the same Redis and take turns, {H2H_ROUNDS} rounds of {results['head_to_head_seconds']:.0f} s "
                  "per grant, the order swapped each round. CPU per request, median of the rounds:", "",
                  "| grant | ours | oidc-provider | ours / theirs (speed) | each round |", "|---|---|---|---|---|"]
        h2h_md += [f"| {label} | {r['ours_us']:,.0f} µs | {r['theirs_us']:,.0f} µs | {r['ratio']:.2f} | "
                   f"{', '.join(f'{x:.2f}' for x in r['rounds'])} |"
                   for key, label in metrics if (r := h2h.get(key))]
        h2h_md.append("")
    cpu = ""
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except Exception:  # noqa: BLE001
        pass
    date = dt.date.today().isoformat()
    text = [
        f"# Benchmark {date}, {CORES} cores",
        "",
        f"Machine: {CORES} cores ({cpu}), {platform.platform()}, Python {platform.python_version()}.",
        f"Mode: {'quick' if seconds < 10 else 'full'}, {seconds:.0f} s per measurement; run took {time.monotonic() - started:.0f} s.",
        "",
        "Each cell: successful requests (or logins) per second (p50 / p99 latency).",
        "",
        *md,
        "",
        "**Per core.** wrk and the login driver share the cores with the servers, so the rates above are what a worker "
        "got of a contended machine. The server's own CPU time per successful request (user + system of its processes, "
        "from /proc, over the same window; logins include their warm-up) gives what one core of it serves, the "
        "measure the per-worker targets are about. 1 worker each:",
        "",
        *cpu_md,
        "",
        *h2h_md,
        "- **Shared cores.** The load generator (wrk, 2 threads, 32 connections; the Python login driver) runs on "
        f"the same {CORES} cores as the servers, PostgreSQL and Redis: compare ratios within one run, not absolute numbers across runs.",
        "- **Ours:** `idp serve --workers N` (uvicorn), PostgreSQL 15 + Redis 7 on loopback, IDP_MFA=true, IDP_CAPTCHA=off, "
        "ES256 ID tokens, opaque access/refresh tokens. Theirs: one node process, rotateRefreshToken=true, ES256, PKCE "
        "required, run twice: on the same Redis (ioredis, the key layout of oidc-provider's example Redis adapter, "
        "one MULTI per save) to compare with our 1-worker columns, and on an in-memory adapter (a plain Map: its "
        "default LRU of 1,000 would evict pre-minted codes) to compare like for like with our in-process store "
        "(`bench/serve_memory.py`: the provider's single-process store, PostgreSQL for accounts and clients as above). "
        "Neither side's CPU counts Redis's own.",
        "- **Codes and refresh tokens are minted ahead**, just before their measurement (codes live a minute), through the provider's own code (`svc.tokens.save_code`, "
        "`open_grant`/`issue`, each under its own SSO session from `svc.sessions.create`) into the Redis the server uses "
        f"(pipelined); {mint_rate}/s × seconds × workers of them, so a run does not run out (a cell says so if it did). "
        "oidc-provider's are minted through its models (`AuthorizationCode`, `RefreshToken`, `Grant`). "
        "Code exchange and refresh issue an ID token (scope openid).",
        f"- **Logins:** {args.accounts:,} accounts, each its own TOTP secret bound via `Enrolment.start/confirm`, "
        f"among {args.accounts + args.population:,} (the others, with a password and an OTP binding each, never log in); "
        f"{args.login_concurrency} concurrent httpx clients per worker, each doing authorize → password → OTP → code → token with a "
        f"fresh cookie jar and PKCE, measured over {login_seconds:.0f} s after 2 s of warm-up. A TOTP step is usable once per account, so the driver hands out (account, step) "
        "slots; the used-step markers are reset between login measurements.",
        f"- **argon2id** (argon2-cffi, p=1): default t=2, 19 MiB: {argon['owasp_ms']:.1f} ms per verify on one core "
        f"(ceiling {ceiling['owasp']:.0f} logins/s per core); Keycloak's t=5, 7 MiB: {argon['keycloak_ms']:.1f} ms "
        f"(ceiling {ceiling['keycloak']:.0f}/s per core). Target: logins ≥ 80 % of the ceiling per worker. "
        "Those are back-to-back verifies, whose memory stays in the CPU's caches; in a server other work runs "
        f"between two logins, and a verify after 64 MiB of other memory traffic takes {argon['owasp_cold_ms']:.1f} ms "
        f"(t=2, 19 MiB; ceiling {1000 / argon['owasp_cold_ms']:.0f}/s) and {argon['keycloak_cold_ms']:.1f} ms "
        f"(t=5, 7 MiB; ceiling {1000 / argon['keycloak_cold_ms']:.0f}/s).",
        "- **Keycloak 26** figures are its published sizing guide (per vCPU: 15 password logins/s, 120 "
        "client-credentials grants/s, 120 refresh grants/s; argon2 t=5, 7 MiB), not measured here.",
        *limits,
        *[f"- {n}" for n in notes],
    ]
    if memory:
        text += ["", "## Memory in Redis", "",
                 "`MEMORY USAGE` (key, value and Redis's overhead; mean of the sampled keys) of what the measured "
                 "logins (scope openid), code exchanges and refreshes left in the store:", "",
                 "| key | bytes | keys sampled |", "|---|---|---|"]
        text += [f"| {k} | {v['bytes']:,} | {v['sampled']} |" for k, v in memory["families"].items()]
        text += ["", f"One SSO session costs {memory['per_session']:,} bytes (its record, its grant list, an account "
                 f"session set of its own); each client login under it {memory['per_login']:,} more (grant, access and "
                 f"refresh token, the used-code marker kept 24 h). **1 million sessions with one client login each: "
                 f"{memory['million_sessions_gib']:.2f} GiB** of Redis memory (before Redis's own allocator slack and "
                 "replication buffers; each refresh also leaves a rotated-token marker of the size above, kept as long "
                 "as the token would have lived)."]
    if profile_lines:
        text += ["", "## Where the time goes: client_credentials, 1 worker (py-spy)", "", "```", *profile_lines, "```"]
    if login_profile_lines:
        text += ["", "## Where the time goes: password+TOTP logins, 1 worker (py-spy)", "", "```", *login_profile_lines, "```"]
    report = "\n".join(text) + "\n"
    print()
    print(report)
    # Our rows measure only what was answered right: one that failed requests is no result.
    measured = [(f"{n} worker(s)", r) for n, r in ours.items()] + [("in-process store", memory_store)]
    measured += [(f"{n} worker(s), Keycloak's argon2", {"login": r}) for n, r in kc_login.items()]
    measured += [("1 worker, trivial argon2", {"login": light})]
    failed = [f"{where}: {key}" for where, row in measured for key, r in row.items()
              if r and (r.get("errors") or r.get("exhausted"))]
    if failed:
        log("not written: our provider failed requests in " + "; ".join(failed) + " (see the logs above)")
        return 1
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    stem = outdir / f"{date}-{CORES}cores"
    runs = 1
    while stem.with_suffix(".md").exists():  # a second run that day is kept beside the first
        runs += 1
        stem = outdir / f"{date}-{CORES}cores-{runs}"
    stem.with_suffix(".md").write_text(report)
    stem.with_suffix(".json").write_text(json.dumps({
        "date": date, "cores": CORES, "cpu": cpu, "seconds_per_measurement": seconds,
        "argon2": {"default": {**OWASP, "parallelism": 1, "verify_ms": argon["owasp_ms"],
                               "verify_ms_cold_caches": argon["owasp_cold_ms"]},
                   "keycloak": {**KEYCLOAK_ARGON2, "parallelism": 1, "verify_ms": argon["keycloak_ms"],
                                "verify_ms_cold_caches": argon["keycloak_cold_ms"]}},
        "keycloak_published_per_vcpu": KEYCLOAK,
        "ours": {str(k): v for k, v in ours.items()}, "ours_memory": memory_store, "theirs": theirs,
        "theirs_redis": theirs_redis, "head_to_head": h2h,
        "logins_keycloak_argon2": {str(k): v for k, v in kc_login.items()},
        "logins_light_argon2": {**LIGHT_ARGON2, **light},
        "logins_small_argon2": small,
        "load": {"wrk_threads": WRK_THREADS, "wrk_connections": WRK_CONNECTIONS,
                 "login_concurrency": args.login_concurrency, "accounts": args.accounts,
                 "population": args.population},
        "notes": notes, "redis_memory": memory, "profile_client_credentials": profile_lines, "profile_login": login_profile_lines,
    }, indent=2, default=str) + "\n")
    log(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
