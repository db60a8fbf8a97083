"""Authorization codes, access tokens and refresh tokens in the short-lived store.

Every token belongs to a *grant*: the family of tokens that came from one
authorization code (or one client_credentials request). The grant id is the
token's prefix, so checking a token is one round trip for the token and its
grant together; revoking the grant revokes the whole family at once. That is
what a replayed code or a reused refresh token does (RFC 9700 4.5, 4.14).

Only SHA-256 digests of codes and tokens are stored, so a copy of the store
holds nothing usable. Each record carries its own ``exp`` checked against the
clock; the store's TTL only cleans up.
"""

from __future__ import annotations

import hashlib
import secrets

USED_MARKER_SECONDS = 86400


def _h(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _grant_of(token: str) -> str | None:
    gid, dot, _ = token.partition(".")
    return gid if dot and gid else None


class Tokens:
    def __init__(self, store, clock):
        self.store = store
        self.clock = clock

    # -- authorization codes ---------------------------------------------
    def save_code(self, record: dict, lifetime: int) -> str:
        code = secrets.token_urlsafe(32)
        self.store.set("code:" + _h(code), {**record, "exp": self.clock() + lifetime}, lifetime + 60)
        return code

    def claim_code(self, code: str) -> dict | None:
        """Take a code exactly once. A second use revokes what the first issued."""
        key = _h(code)
        record = self.store.take("code:" + key)
        if record is None:
            used = self.store.get("code-used:" + key)
            if used:
                self.revoke_grant(used["grant"])
            return None
        gid = secrets.token_urlsafe(12)
        self.store.set("code-used:" + key, {"grant": gid}, USED_MARKER_SECONDS)
        if record["exp"] < self.clock():
            return None
        record["grant"] = gid
        return record

    # -- grants ------------------------------------------------------------
    def open_grant(self, record: dict, lifetime: int, gid: str | None = None, writes: list | None = None) -> str:
        gid = gid or secrets.token_urlsafe(12)
        self._write(writes, "grant:" + gid, record, lifetime)
        return gid

    def revoke_grant(self, gid: str) -> None:
        self.store.delete("grant:" + gid)

    # -- access and refresh tokens ---------------------------------------------
    def issue(self, kind: str, gid: str, record: dict, lifetime: int, writes: list | None = None) -> str:
        token = f"{gid}.{secrets.token_urlsafe(32)}"
        self._write(writes, f"{kind}:{_h(token)}", {**record, "grant": gid, "exp": self.clock() + lifetime}, lifetime)
        return token

    def _write(self, writes: list | None, key: str, value: dict, ttl: int) -> None:
        """Write now, or add to ``writes`` for one pipelined ``set_many`` by the caller."""
        if writes is None:
            self.store.set(key, value, ttl)
        else:
            writes.append((key, value, ttl))

    def lookup(self, kind: str, token: str) -> dict | None:
        """The live record of an access (``at``) or refresh (``rt``) token, or None."""
        gid = _grant_of(token)
        if gid is None:
            return None
        record, grant = self.store.get_many([f"{kind}:{_h(token)}", "grant:" + gid])
        if record is None or grant is None or record["exp"] < self.clock():
            return None
        return record

    def rotate_refresh(self, token: str) -> dict | None:
        """Claim a refresh token for rotation; reuse of a rotated one revokes its family."""
        key = _h(token)
        record = self.store.take("rt:" + key)
        if record is None:
            used = self.store.get("rt-used:" + key)
            if used:
                self.revoke_grant(used["grant"])
            return None
        self.store.set("rt-used:" + key, {"grant": record["grant"]}, max(1, int(record["exp"] - self.clock())) + 60)
        # The grant was found alive by ``lookup`` just before; a revocation in between
        # is caught when the new tokens are next looked up (they share the grant).
        return None if record["exp"] < self.clock() else record

    def revoke(self, kind: str, token: str) -> bool:
        """RFC 7009: revoking a refresh token ends its family; an access token, itself."""
        record = self.lookup(kind, token)
        if record is None:
            return False
        if kind == "rt":
            self.revoke_grant(record["grant"])
        else:
            self.store.delete(f"at:{_h(token)}")
        return True
