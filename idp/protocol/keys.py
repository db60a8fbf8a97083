"""Signing keys: generated on first start, rotated without breaking tokens.

Each key is one JSON file in ``keys_dir`` (mode 0600) with a status:

- ``next``: published in the JWKS but not yet signing, so relying parties
  have it cached before the first token signed with it arrives;
- ``current``: signs (one per algorithm);
- ``retired``: still published until ``retire_at``, so tokens it signed
  still verify, then deleted.

``idp keys rotate`` promotes next to current and current to retired. All
processes sharing the directory pick the change up within
``key_refresh_seconds``; keys are parsed once per change, never per request.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import threading
import time
from pathlib import Path

import orjson
from joserfc.jwk import ECKey, KeySet, RSAKey

ALGORITHMS = ("ES256", "RS256")


def _generate(alg: str, status: str) -> dict:
    kid = f"{alg.lower()}-{time.strftime('%Y%m%d')}-{secrets.token_hex(4)}"
    params = {"kid": kid, "alg": alg, "use": "sig"}
    if alg == "ES256":
        key = ECKey.generate_key("P-256", parameters=params, private=True)
    else:
        key = RSAKey.generate_key(2048, parameters=params, private=True)
    return {"kid": kid, "alg": alg, "status": status, "created_at": int(time.time()), "jwk": key.as_dict(private=True)}


def _import(jwk: dict):
    return ECKey.import_key(jwk) if jwk["kty"] == "EC" else RSAKey.import_key(jwk)


class TooSoon(Exception):
    """The next keys have not been published for long enough; ``ready_at``: when they will."""

    def __init__(self, ready_at: float):
        super().__init__(ready_at)
        self.ready_at = ready_at


class KeyRing:
    def __init__(self, keys_dir: str, refresh_seconds: int = 1, clock=time.time):
        self.dir = Path(keys_dir)
        self._refresh_seconds = refresh_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._checked_at = 0.0
        self._stamp = None
        self._stale_at = float("inf")  # the first retire_at among the loaded keys
        self._signing: dict[str, object] = {}
        self._verify = KeySet([])
        self._jwks: dict = {"keys": []}

    # -- files ------------------------------------------------------------
    def _records(self) -> list[dict]:
        return [orjson.loads(p.read_bytes()) for p in sorted(self.dir.glob("*.json"))]

    def _write(self, record: dict) -> None:
        path = self.dir / f"{record['kid']}.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(record))
        os.replace(tmp, path)

    @contextlib.contextmanager
    def _exclusive(self):
        """One process at a time changes the key files."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        with open(self.dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    @contextlib.contextmanager
    def _shared(self):
        """Readers wait for a rotation to finish: half-way through one, an algorithm
        has no current key, and a process that loaded then could not sign."""
        try:
            lock = open(self.dir / ".lock", "a")
        except OSError:  # a read-only directory (a Kubernetes Secret): nobody rotates in it
            yield
            return
        with lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            yield

    def ensure(self) -> None:
        """Create a current and a next key for each algorithm that lacks them, and load
        them: parsing an RSA private key takes tens of milliseconds, better spent at
        start than in the first token request."""
        # With nothing to write, a read-only directory (a Kubernetes Secret) is fine.
        if not self.dir.is_dir() or self._missing():
            with self._exclusive():
                for alg, status in self._missing():
                    self._write(_generate(alg, status))
                self._touch()
        self._load_if_changed()

    def _missing(self) -> list[tuple[str, str]]:
        records = self._records()
        have = {(r["alg"], r["status"]) for r in records}
        return [(alg, status) for alg in ALGORITHMS for status in ("current", "next") if (alg, status) not in have]

    def rotate(self, keep_retired_seconds: int, published_for: int = 0) -> list[str]:
        """Promote next to current, retire current; returns the new current kids. With
        ``published_for``, only next keys published at least that long ago are promoted
        (``TooSoon`` otherwise): relying parties have had the time to cache them."""
        self._published(published_for)  # before the keys are made: a refusal costs nothing
        # The new next keys are made before the lock: every serving process that reloads
        # waits on it, and an RSA key takes up to a second to generate.
        fresh = {alg: _generate(alg, "next") for alg in ALGORITHMS}
        with self._exclusive():
            self._published(published_for)  # and again under it: another rotation may have run
            return self._rotate(keep_retired_seconds, fresh)

    def _published(self, seconds: int) -> None:
        """Raise ``TooSoon`` unless the next keys were published ``seconds`` ago (wall clock,
        as their ``created_at``)."""
        if seconds:
            ready_at = max((r["created_at"] for r in self._records() if r["status"] == "next"), default=0) + seconds
            if ready_at > time.time():
                raise TooSoon(ready_at)

    def _rotate(self, keep_retired_seconds: int, fresh: dict[str, dict]) -> list[str]:
        now = int(self._clock())
        promoted = []
        records = self._records()
        for alg in ALGORITHMS:
            mine = {r["status"]: r for r in records if r["alg"] == alg and r["status"] != "retired"}
            if "current" in mine:
                mine["current"].update(status="retired", retire_at=now + keep_retired_seconds)
                self._write(mine["current"])
            nxt = mine.get("next") or _generate(alg, "next")  # only if its file was removed by hand
            nxt["status"] = "current"
            self._write(nxt)
            promoted.append(nxt["kid"])
            self._write(fresh[alg])
        for r in records:
            if r["status"] == "retired" and r.get("retire_at", 0) <= now:
                (self.dir / f"{r['kid']}.json").unlink(missing_ok=True)
        self._touch()
        return promoted

    def _touch(self) -> None:
        os.utime(self.dir)
        self._checked_at = 0.0

    # -- use ----------------------------------------------------------------
    def _load_if_changed(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < self._refresh_seconds and self._stamp is not None:
            return
        with self._lock:
            self._checked_at = now
            stamp = self.dir.stat().st_mtime_ns
            wall = self._clock()
            if stamp == self._stamp and wall < self._stale_at:
                return
            signing, public, stale_at = {}, [], float("inf")
            with self._shared():
                records = self._records()
            for r in records:
                if r["status"] == "retired":
                    if r.get("retire_at", 0) <= wall:
                        continue  # unpublished at its time; its file goes at the next rotation
                    stale_at = min(stale_at, r["retire_at"])
                key = _import(r["jwk"])
                public.append(key)
                if r["status"] == "current":
                    signing[r["alg"]] = key
            self._signing = signing
            self._verify = KeySet(public)
            self._jwks = {"keys": [k.as_dict(private=False) for k in public]}
            self._stamp, self._stale_at = stamp, stale_at

    def signing_key(self, alg: str):
        self._load_if_changed()
        return self._signing[alg]

    def verification_keys(self) -> KeySet:
        self._load_if_changed()
        return self._verify

    def jwks(self) -> dict:
        self._load_if_changed()
        return self._jwks
