"""The short-lived state store: login transactions, codes, sessions, tokens,
counters and nonces.

One small interface, two implementations: ``RedisStore`` for any number of
provider processes, ``MemoryStore`` for the single-process default. Every
value is a JSON object. TTLs only collect garbage: anything whose expiry
matters to security also carries its own timestamp, checked against the
injectable clock, so tests can move time without sleeping.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import orjson


class Store(Protocol):
    def get(self, key: str) -> dict | None: ...
    def get_many(self, keys: list[str]) -> list[dict | None]: ...
    def set(self, key: str, value: dict, ttl: int, *, only_new: bool = False) -> bool:
        """Store ``value``; with ``only_new`` only when the key is absent (and say so)."""
    def take(self, key: str) -> dict | None:
        """Get and delete in one atomic step: whoever takes a key gets it alone."""
    def set_many(self, items: list[tuple[str, dict, int]]) -> None:
        """Store several (key, value, ttl) in one round trip."""
    def delete(self, *keys: str) -> None: ...
    def incr(self, key: str, ttl: int, by: int = 1) -> int:
        """Atomically add ``by``; the first increment starts the TTL."""
    def add(self, key: str, member: str, ttl: int) -> None:
        """Add ``member`` to the set at ``key`` (atomic; no read-modify-write)."""
    def members(self, key: str) -> set[str]: ...
    def ping(self) -> bool: ...


class MemoryStore:
    def __init__(self):
        self._data: dict[str, tuple[float, bytes]] = {}
        self._sets: dict[str, tuple[float, set[str]]] = {}
        self._lock = threading.Lock()

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

    def set_many(self, items):
        for key, value, ttl in items:
            self.set(key, value, ttl)

    def delete(self, *keys):
        with self._lock:
            for key in keys:
                self._data.pop(key, None)
                self._sets.pop(key, None)

    def add(self, key, member, ttl):
        with self._lock:
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
            item = self._live(key)
            count = by if item is None else orjson.loads(item[1]) + by
            expires = time.monotonic() + ttl if item is None else item[0]
            self._data[key] = (expires, orjson.dumps(count))
            return count

    def ping(self):
        return True


class RedisStore:
    def __init__(self, url: str, prefix: str = "idp:"):
        import redis

        self._redis = redis.Redis.from_url(url)
        self._prefix = prefix

    def _k(self, key):
        return self._prefix + key

    @staticmethod
    def _load(raw):
        return None if raw is None else orjson.loads(raw)

    def get(self, key):
        return self._load(self._redis.get(self._k(key)))

    def get_many(self, keys):
        if not keys:
            return []
        return [self._load(raw) for raw in self._redis.mget([self._k(k) for k in keys])]

    def set(self, key, value, ttl, *, only_new=False):
        return bool(self._redis.set(self._k(key), orjson.dumps(value), ex=ttl, nx=only_new))

    def take(self, key):
        return self._load(self._redis.getdel(self._k(key)))

    def set_many(self, items):
        pipe = self._redis.pipeline(transaction=False)
        for key, value, ttl in items:
            pipe.set(self._k(key), orjson.dumps(value), ex=ttl)
        pipe.execute()

    def delete(self, *keys):
        if keys:
            self._redis.delete(*[self._k(k) for k in keys])

    def add(self, key, member, ttl):
        pipe = self._redis.pipeline(transaction=False)
        pipe.sadd(self._k(key), member)
        pipe.expire(self._k(key), ttl)
        pipe.execute()

    def members(self, key):
        return {m.decode() for m in self._redis.smembers(self._k(key))}

    def incr(self, key, ttl, by=1):
        pipe = self._redis.pipeline()
        pipe.incr(self._k(key), by)
        pipe.expire(self._k(key), ttl, nx=True)
        count, _ = pipe.execute()
        return count

    def ping(self):
        try:
            return bool(self._redis.ping())
        except Exception:
            return False


def open_store(redis_url: str) -> Store:
    return RedisStore(redis_url) if redis_url else MemoryStore()
