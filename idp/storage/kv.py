"""The short-lived state store: login transactions, codes, sessions, tokens,
counters and nonces.

One small interface, two implementations: ``RedisStore`` for any number of
provider processes, ``MemoryStore`` for the single-process default. Every
value is a JSON object. TTLs only collect garbage: anything whose expiry
matters to security also carries its own timestamp, checked against the
injectable clock, so tests can move time without sleeping.

``IDP_REDIS_URL`` names one Redis server, a Sentinel-managed master or a
Cluster (see ``connect``). On a Cluster every key lives in the slot its name
hashes to. Every command names one key, so a round trip of several
(``get_many``, ``delete``, ``write``) is split by slot by the client
(non-atomic across keys, which no caller relies on), and each MULTI
transaction touches one key. Its nodes run their commands in no order across
nodes, so a batch with writes and reads (``Batch``: reads after writes) is two
round trips there: the reads are sent once the writes are answered. A new
operation that must be atomic over several keys (a transaction or a Lua
script) must put them in one slot with a shared hash tag, the part of the
name in braces, e.g. ``grant:{GID}`` and ``grant-tokens:{GID}``: Redis hashes
only that part. The ``idp:`` prefix has no braces, so tags pass through.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import orjson

from idp import bridge
from idp.settings import SettingsError
from idp.storage import resp


class Batch:
    """Writes gathered while handling one request, sent in one round trip by
    ``Store.write`` (the token endpoint's writes: markers, grant, tokens, the
    session's grant list; the end of a login: session, code, the transaction's
    deletion). Its ``take``s, ``incr``s and ``claim``s go first, its ``read``s and
    ``has`` questions after its writes, and ``write`` returns what they found
    (counted, claimed), so a request can claim a key, or check one, and write what
    that allows in the same round trip (and undo it if not). A check runs after what
    it guards: a revocation that reads what this batch wrote after its reads (a logout
    reading a session's grant list, after taking the session) cannot miss it."""

    def __init__(self):
        self.takes: list[str] = []
        self.reads: list[str] = []
        self.incrs: list[tuple[str, int, int]] = []
        self.claims: list[tuple[str, int]] = []
        self.sets: list[tuple[str, dict, int]] = []
        self.replaces: list[tuple[str, dict, int]] = []
        self.adds: list[tuple[str, str, int]] = []
        self.has_members: list[tuple[str, str]] = []
        self.deletes: list[str] = []

    def take(self, key: str) -> None:
        self.takes.append(key)

    def read(self, key: str) -> int:
        """Read ``key`` in the round trip; where it comes among the reads' results."""
        self.reads.append(key)
        return len(self.reads) - 1

    def incr(self, key: str, ttl: int, by: int = 1) -> None:
        """As ``Store.incr``; ``write`` returns the count."""
        self.incrs.append((key, ttl, by))

    def claim(self, key: str, ttl: int) -> None:
        """Set an empty marker unless one is there (``Store.set`` with ``only_new``); ``write``
        returns whether this batch set it: of two requests claiming one key, one wins."""
        self.claims.append((key, ttl))

    def set(self, key: str, value: dict, ttl: int) -> None:
        self.sets.append((key, value, ttl))

    def replace(self, key: str, value: dict, ttl: int) -> None:
        """Set only where the key is still there: a record another request may have taken
        since this one read it stays gone."""
        self.replaces.append((key, value, ttl))

    def add(self, key: str, member: str, ttl: int) -> None:
        self.adds.append((key, member, ttl))

    def has(self, key: str, member: str) -> int:
        """Whether ``member`` is in the set at ``key``, asked with the reads; where the answer
        comes among the answers of its kind (``write`` gives them last)."""
        self.has_members.append((key, member))
        return len(self.has_members) - 1

    def delete(self, *keys: str) -> None:
        self.deletes.extend(keys)

    def extend(self, other: Batch) -> None:
        """Join ``other``'s operations to this batch's (its results after this one's)."""
        for mine, theirs in ((self.takes, other.takes), (self.reads, other.reads), (self.incrs, other.incrs),
                             (self.claims, other.claims), (self.sets, other.sets),
                             (self.replaces, other.replaces), (self.adds, other.adds),
                             (self.has_members, other.has_members), (self.deletes, other.deletes)):
            mine.extend(theirs)


class Store(Protocol):
    shared: bool  # other processes read and write the same data (Redis), not this process's own memory

    def get(self, key: str) -> dict | None: ...
    def get_many(self, keys: list[str]) -> list[dict | None]: ...
    def set(self, key: str, value: dict, ttl: int, *, only_new: bool = False) -> bool:
        """Store ``value``; with ``only_new`` only when the key is absent (and say so)."""
    def take(self, key: str) -> dict | None:
        """Get and delete in one atomic step: whoever takes a key gets it alone."""
    def swap(self, key: str, value: dict, ttl: int) -> dict | None:
        """Get and replace in one atomic step, where the key is there (an absent one stays
        absent): whoever swaps first gets the old value, later ones get ``value``."""
    def set_many(self, items: list[tuple[str, dict, int]]) -> None:
        """Store several (key, value, ttl) in one round trip."""
    def write(self, batch: Batch) -> list[dict | None]:
        """Apply a ``Batch`` in one round trip: its takes (each atomic, as ``take``), its
        increments, its claims, its sets and replaces, its set additions, its reads and
        membership questions, its deletions. Returns what the takes took, what the reads read,
        the increments' counts, whether each claim was won, then each membership's answer,
        in order."""
    def delete(self, *keys: str) -> None: ...
    def incr(self, key: str, ttl: int, by: int = 1) -> int:
        """Atomically add ``by``; the first increment starts the TTL."""
    def add(self, key: str, member: str, ttl: int) -> None:
        """Add ``member`` to the set at ``key`` (atomic; no read-modify-write)."""
    def members(self, key: str) -> set[str]: ...
    def ping(self) -> bool: ...
    async def aclose(self) -> None:
        """Release what the running event loop opened (at the app's shutdown)."""


class MemoryStore:
    """Expired keys go when read, and every ``SWEEP_SECONDS`` all at once: most are never read
    again (a login page opened and left), and this process's memory is all there is."""

    shared = False
    SWEEP_SECONDS = 60

    def __init__(self):
        self._data: dict[str, tuple[float, bytes]] = {}
        self._sets: dict[str, tuple[float, set[str]]] = {}
        self._lock = threading.Lock()
        self._next_sweep = time.monotonic() + self.SWEEP_SECONDS

    def _sweep(self):
        """Drop what has expired, at most once in ``SWEEP_SECONDS`` (called holding the lock)."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.SWEEP_SECONDS
        for table in (self._data, self._sets):
            for key in [key for key, (expires, _) in table.items() if expires <= now]:
                del table[key]

    def _live(self, key):
        item = self._data.get(key)
        if item is None:
            return None
        if item[0] <= time.monotonic():
            del self._data[key]
            return None
        return item

    def get(self, key):
        with self._lock:
            item = self._live(key)
        return None if item is None else orjson.loads(item[1])

    def get_many(self, keys):
        return [self.get(k) for k in keys]

    def set(self, key, value, ttl, *, only_new=False):
        with self._lock:
            self._sweep()
            if only_new and self._live(key) is not None:
                return False
            self._data[key] = (time.monotonic() + ttl, orjson.dumps(value))
            return True

    def take(self, key):
        with self._lock:
            item = self._live(key)
            if item is None:
                return None
            del self._data[key]
        return orjson.loads(item[1])

    def swap(self, key, value, ttl):
        with self._lock:
            item = self._live(key)
            if item is None:
                return None
            self._data[key] = (time.monotonic() + ttl, orjson.dumps(value))
        return orjson.loads(item[1])

    def set_many(self, items):
        batch = Batch()
        batch.sets = list(items)
        self.write(batch)

    def write(self, batch):
        taken = [self.take(key) for key in batch.takes]
        counted = [self.incr(key, ttl, by) for key, ttl, by in batch.incrs]
        claimed = [self.set(key, {}, ttl, only_new=True) for key, ttl in batch.claims]
        for key, value, ttl in batch.sets:
            self.set(key, value, ttl)
        for key, value, ttl in batch.replaces:
            with self._lock:
                if self._live(key) is not None:
                    self._data[key] = (time.monotonic() + ttl, orjson.dumps(value))
        for key, member, ttl in batch.adds:
            self.add(key, member, ttl)
        read = [self.get(key) for key in batch.reads]
        held = [member in self.members(key) for key, member in batch.has_members]
        self.delete(*batch.deletes)
        return taken + read + counted + claimed + held

    def delete(self, *keys):
        with self._lock:
            for key in keys:
                self._data.pop(key, None)
                self._sets.pop(key, None)

    def add(self, key, member, ttl):
        with self._lock:
            self._sweep()
            expires, members = self._sets.get(key, (0, set()))
            if expires <= time.monotonic():
                members = set()
            members.add(member)
            self._sets[key] = (time.monotonic() + ttl, members)

    def members(self, key):
        with self._lock:
            expires, members = self._sets.get(key, (0, set()))
            return set(members) if expires > time.monotonic() else set()

    def incr(self, key, ttl, by=1):
        with self._lock:
            self._sweep()
            item = self._live(key)
            count = by if item is None else orjson.loads(item[1]) + by
            expires = time.monotonic() + ttl if item is None else item[0]
            self._data[key] = (expires, orjson.dumps(count))
            return count

    def ping(self):
        return True

    async def aclose(self) -> None:
        pass


_SWAP = "return redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2], 'XX', 'GET')"


class RedisStore:
    """Each operation is one round trip of commands (``execute``). Blocking, except inside
    ``idp.bridge.run`` (the token endpoint), where it is awaited on the event loop through
    an asyncio client of the same URL."""

    shared = True

    def __init__(self, url: str, prefix: str = "idp:"):
        self._url = url
        self._sync = connect(url)
        self._async = bridge.LoopLocal(lambda: connect(self._url, asynchronous=True))  # a client serves one loop
        self._prefix = prefix
        self._cluster = getattr(self._sync, "cluster", False)

    def _execute(self, commands: list[tuple], transaction: bool = False) -> list:
        if not bridge.inside():
            return self._sync.execute(commands, transaction)
        client = self._async.get()
        return bridge.wait(client.execute(commands, transaction))

    async def aclose(self) -> None:
        """Close the running loop's asyncio client (at the app's shutdown)."""
        client = self._async.pop()
        if client is not None:
            await client.aclose()

    def _k(self, key):
        return self._prefix + key

    @staticmethod
    def _load(raw):
        return None if raw is None else orjson.loads(raw)

    def get(self, key):
        return self._load(self._execute([("GET", self._k(key))])[0])

    def get_many(self, keys):
        # One GET each rather than an MGET: a Cluster splits them by slot.
        return [self._load(raw) for raw in self._execute([("GET", self._k(k)) for k in keys])] if keys else []

    def set(self, key, value, ttl, *, only_new=False):
        command = ("SET", self._k(key), orjson.dumps(value), "EX", ttl) + (("NX",) if only_new else ())
        return bool(self._execute([command])[0])

    def take(self, key):
        return self._load(self._execute([("GETDEL", self._k(key))])[0])

    def swap(self, key, value, ttl):
        # ``SET ... XX GET`` in one command, but as a script: redis-py turns SET's reply into a bool.
        return self._load(self._execute([("EVAL", _SWAP, 1, self._k(key), orjson.dumps(value), ttl)])[0])

    def set_many(self, items):
        batch = Batch()
        batch.sets = list(items)
        self.write(batch)

    def write(self, batch):
        commands = [("GETDEL", self._k(key)) for key in batch.takes]
        for key, ttl, by in batch.incrs:  # as ``incr``, without its MULTI: sent in one write, both run
            commands += [("INCRBY", self._k(key), by), ("EXPIRE", self._k(key), ttl, "NX")]
        commands += [("SET", self._k(key), b"{}", "EX", ttl, "NX") for key, ttl in batch.claims]
        commands += [("SET", self._k(key), orjson.dumps(value), "EX", ttl) for key, value, ttl in batch.sets]
        commands += [("SET", self._k(key), orjson.dumps(value), "EX", ttl, "XX") for key, value, ttl in batch.replaces]
        for key, member, ttl in batch.adds:
            commands += [("SADD", self._k(key), member), ("EXPIRE", self._k(key), ttl)]
        written = len(commands)
        after = [("GET", self._k(key)) for key in batch.reads]
        after += [("SISMEMBER", self._k(key), member) for key, member in batch.has_members]
        checked = len(after)
        after += [("DEL", self._k(key)) for key in batch.deletes]
        if self._cluster and written and checked:
            # A Cluster's nodes run their commands in no order across nodes: a check on one
            # could run before a write on another. It waits for the writes' replies instead.
            replies = self._execute(commands) + self._execute(after)
        else:
            replies = self._execute(commands + after)
        takes, counted = len(batch.takes), 2 * len(batch.incrs)
        claimed = replies[takes + counted:takes + counted + len(batch.claims)]
        held = replies[written + len(batch.reads):written + checked]
        return ([self._load(raw) for raw in replies[:takes] + replies[written:written + len(batch.reads)]]
                + replies[takes:takes + counted:2] + [bool(r) for r in claimed] + [bool(r) for r in held])

    def delete(self, *keys):
        if keys:
            self._execute([("DEL", self._k(k)) for k in keys])  # one each, as get_many

    def add(self, key, member, ttl):
        self._execute([("SADD", self._k(key), member), ("EXPIRE", self._k(key), ttl)])

    def members(self, key):
        return {m.decode() for m in self._execute([("SMEMBERS", self._k(key))])[0]}

    def incr(self, key, ttl, by=1):
        count, _ = self._execute([("INCRBY", self._k(key), by), ("EXPIRE", self._k(key), ttl, "NX")], transaction=True)
        return count

    def ping(self):
        try:
            return bool(self._sync.execute([("PING",)])[0])
        except Exception:
            return False


class _RedisPy:
    """redis-py's client for a Sentinel-managed master or a Cluster, with the lean
    client's ``execute``: a pipeline of the commands (awaitable for its asyncio client).
    redis-py turns some replies into Python values (SET's into True, SMEMBERS' into a
    set); the store reads both forms alike."""

    def __init__(self, client, cluster: bool = False):
        self._client = client
        self.cluster = cluster  # each node runs its slots' commands, in no order across nodes

    def execute(self, commands: list[tuple], transaction: bool = False):
        pipe = self._client.pipeline(transaction=transaction)
        for command in commands:
            pipe.execute_command(*command)
        return pipe.execute()

    async def aclose(self) -> None:
        await self._client.aclose()


def connect(url: str, asynchronous: bool = False):
    """The client for the Redis ``url`` names, with ``execute(commands, transaction)``:

    - ``redis://[[user]:password@]host:port/db`` (``rediss://`` for TLS, ``unix://path``): one server,
      through ``idp.storage.resp``. Options in the query: ``socket_timeout`` (for a reply, 10 s by
      default), ``socket_connect_timeout`` (5 s), ``db``, and for TLS ``ssl_ca_certs``, ``ssl_certfile``,
      ``ssl_keyfile``, ``ssl_cert_reqs`` (``required`` by default) and ``ssl_check_hostname``;
    - ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/MASTER[/db]`` (``rediss+sentinel``,
      port 26379 by default): the master the Sentinels name MASTER, followed through failovers. The
      user and password are the master's; add ``?sentinel_password=`` if the Sentinels want their own;
    - ``redis+cluster://[[user]:password@]host[:port][,host[:port]...]`` (``rediss+cluster``, port 6379
      by default): a Cluster, discovered from any of those nodes.
    """
    scheme, _, rest = url.partition("://")
    base, _, mode = scheme.partition("+")
    if not mode:
        address = resp.Address.from_url(url)
        return resp.AsyncClient(address) if asynchronous else resp.Client(address)
    if asynchronous:
        from redis.asyncio.cluster import ClusterNode, RedisCluster
        from redis.asyncio.sentinel import Sentinel
    else:
        from redis.cluster import ClusterNode, RedisCluster
        from redis.sentinel import Sentinel

    if base not in ("redis", "rediss") or mode not in ("sentinel", "cluster"):
        raise ValueError(f"unknown scheme {scheme}://")
    parts = urlsplit(f"{base}://{rest}")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    auth = {"username": unquote(user) or None, "password": unquote(password) or None, "ssl": base == "rediss"}
    nodes = [_address(h, 26379 if mode == "sentinel" else 6379) for h in hostlist.split(",")]
    path = [unquote(p) for p in parts.path.split("/") if p]
    if mode == "sentinel":
        if not path:
            raise ValueError("a redis+sentinel:// URL names the master: .../MASTER[/db]")
        own = parse_qs(parts.query).get("sentinel_password", [""])[0]
        sentinel_auth = {"ssl": auth["ssl"], **({"password": own} if own else {})}
        db = int(path[1]) if len(path) > 1 else 0
        return _RedisPy(Sentinel(nodes, sentinel_kwargs=sentinel_auth, db=db, **auth).master_for(path[0]))
    return _RedisPy(RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in nodes], **auth), cluster=True)


def _address(text: str, default_port: int) -> tuple[str, int]:
    host, colon, port = text.strip().rpartition(":")
    if not colon:
        return text.strip(), default_port
    if not port.isdigit():
        raise ValueError(f"{text!r} is not host:port")
    return host, int(port)


def open_store(redis_url: str) -> Store:
    if not redis_url:
        return MemoryStore()
    try:
        return RedisStore(redis_url)
    except ValueError as exc:  # a URL that does not parse; the client's message names no setting
        raise SettingsError(f"IDP_REDIS_URL: {exc}") from None
