"""Authorization codes, access tokens and refresh tokens in the short-lived store.

Every token belongs to a *grant*: the family of tokens that came from one
authorization code (or one client_credentials request). The grant id is the
token's prefix, so checking a token is one round trip for the token and its
grant together; revoking the grant revokes the whole family at once. That is
what a replayed code or a reused refresh token does (RFC 9700 4.5, 4.14).

Only SHA-256 digests of codes and tokens are stored, so a copy of the store
holds no usable credential. It does hold personal data: the claims released
with a code or grant (name, email, phone) are kept in its record, so that
neither the code exchange nor a refresh reads the account. Each record
carries its own ``exp`` checked against the clock; the store's TTL only
cleans up.
"""

from __future__ import annotations

import base64
import hashlib
import secrets

USED_MARKER_SECONDS = 86400
# A code's second use marks its grant for the first use's issuance, which checks it after writing
# (``Tokens.claim_code``): seconds at most between the two, kept far longer.
REPLAYED, REPLAYED_SECONDS = "grant-replayed:", 600
# An account's not-before mark (``Tokens.end_account``) must outlive every refresh token opened
# before it, and a client's refresh_token_lifetime has no upper bound: as the disabled marks.
NOT_BEFORE_SECONDS = 10 * 365 * 86400


def _h(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def not_before_mark(account_id: str) -> str:
    return "acct-not-before:" + account_id


def ended_by_account(mark: dict | None, since: float, sid: str | None) -> bool:
    """Whether the account's sessions were ended (``Tokens.end_account``, its ``mark``) after
    ``since`` (a grant's opening, a login's first proof), other than the session that was
    kept; ``sid``: the session the grant or login belongs to."""
    return mark is not None and since < mark["time"] and not (sid and sid == mark.get("but"))


def grant_ended(grant: dict, mark: dict | None) -> bool:
    """``ended_by_account`` for a grant (or a token's record with its grant's fields); grants
    from before grants kept their time count as older."""
    return ended_by_account(mark, grant.get("created", 0), (grant.get("auth") or {}).get("sid"))


def _expired(grant: dict | None, now: float) -> bool:
    """Gone, or past its end (which the store's TTL only cleans up after)."""
    return grant is None or grant.get("exp", now) < now


def code_grant(code: str) -> str:
    """The id of the grant a code opens: its tokens' visible prefix, which says nothing of the code."""
    return base64.urlsafe_b64encode(hashlib.sha256(b"grant:" + code.encode()).digest()[:12]).decode()


def _grant_of(token: str) -> str | None:
    gid, dot, _ = token.partition(".")
    return gid if dot and gid else None


class Tokens:
    def __init__(self, store, clock):
        self.store = store
        self.clock = clock

    # -- authorization codes ---------------------------------------------
    def save_code(self, record: dict, lifetime: int, batch=None) -> str:
        """A new authorization code for ``record``; stored at once, or with ``batch``."""
        code = secrets.token_urlsafe(32)
        (batch or self.store).set("code:" + _h(code), {**record, "exp": self.clock() + lifetime}, lifetime + 60)
        return code

    def claim_code(self, code: str) -> dict | None:
        """Take a code exactly once. A second use revokes what the first issued.

        The code's record is swapped for a used marker in one atomic step, so a second use
        finds the marker from the first moment on, even while the first use is still
        writing its tokens (it marks the grant ``REPLAYED``, which that use's issuance reads). The grant's id is the code's
        digest: the marker needs nothing of the first use to name it."""
        gid = code_grant(code)
        # "exp" 0: a process of the release before, in a rolling update, takes it for expired.
        record = self.store.swap("code:" + _h(code), {"used": True, "exp": 0}, USED_MARKER_SECONDS)
        if record is None:
            # That release's marker of a code it redeemed (kept a day): until then, read it too.
            if (used := self.store.get("code-used:" + _h(code))) is not None:
                self.revoke_grant(used["grant"])
            return None
        if record.get("used"):
            # First the mark that an issuance still writing the grant reads after its writes,
            # then the grant (a Cluster keeps no order between two keys' nodes in one round trip).
            self.store.set(REPLAYED + gid, {}, REPLAYED_SECONDS)
            self.revoke_grant(gid)
            return None
        if record["exp"] < self.clock():
            return None
        record["grant"] = gid
        return record

    # -- grants ------------------------------------------------------------
    def open_grant(self, record: dict, lifetime: int, gid: str | None = None, batch=None) -> str:
        """A grant that ends ``lifetime`` seconds from now, with every token of it: rotating
        its refresh token does not make it last longer."""
        gid = gid or secrets.token_urlsafe(12)
        now = self.clock()
        self._write(batch, "grant:" + gid, {**record, "created": now, "exp": now + lifetime}, lifetime)
        return gid

    def end_account(self, account_id: str, but_sid: str | None = None) -> None:
        """Every grant of the account opened until now is over, but those of session ``but_sid``:
        refresh tokens outlive the session they came from, which its end no longer reaches."""
        self.store.set(not_before_mark(account_id), {"time": self.clock(), "but": but_sid}, NOT_BEFORE_SECONDS)

    def revoke_grant(self, gid: str) -> None:
        self.store.delete("grant:" + gid)

    def ended(self, record: dict) -> bool:
        """``grant_ended`` for a token's record (as ``lookup`` gives it)."""
        return grant_ended(record, self.store.get(not_before_mark(record["account"])))

    # -- access and refresh tokens ---------------------------------------------
    def issue(self, kind: str, gid: str, record: dict, lifetime: int, batch=None) -> str:
        """A token of grant ``gid``. Its record holds only what differs from the grant's
        (the scope, the expiry): a login leaves several tokens of one grant in the store.
        ``lifetime`` no longer than the grant has ``left``."""
        token = f"{gid}.{secrets.token_urlsafe(32)}"
        self._write(batch, f"{kind}:{_h(token)}", {**record, "exp": self.clock() + lifetime}, lifetime)
        return token

    def left(self, grant: dict) -> float:
        """Seconds until ``grant`` ends (unbounded for grants from before they kept their end)."""
        return grant.get("exp", float("inf")) - self.clock()

    def _write(self, batch, key: str, value: dict, ttl: int) -> None:
        """Write now, or add to ``batch`` (``idp.storage.kv.Batch``) for the caller to send."""
        if batch is None:
            self.store.set(key, value, ttl)
        else:
            batch.set(key, value, ttl)

    def lookup(self, kind: str, token: str) -> dict | None:
        """The live record of an access (``at``) or refresh (``rt``) token, with its
        grant's fields (client, account, login) and ``grant``; or None."""
        gid = _grant_of(token)
        if gid is None:
            return None
        record, grant = self.store.get_many([f"{kind}:{_h(token)}", "grant:" + gid])
        if record is None or _expired(grant, self.clock()) or record["exp"] < self.clock():
            return None
        return {**grant, **record, "grant": gid}

    def find_refresh(self, token: str) -> tuple[dict | None, dict | None]:
        """A live refresh token's record (as ``lookup`` gives it) and its grant, in one round trip; (None, None)
        if either is gone or expired. A token already rotated away revokes its family."""
        gid = _grant_of(token)
        if gid is None:
            return None, None
        key = _h(token)
        record, grant, used = self.store.get_many(["rt:" + key, "grant:" + gid, "rt-used:" + key])
        if record is None:
            if used:
                self.revoke_grant(used["grant"])
            return None, None
        if _expired(grant, self.clock()) or record["exp"] < self.clock():
            return None, None
        return {**grant, **record, "grant": gid}, grant

    def rotate_refresh(self, token: str, record: dict, batch) -> None:
        """Claim a refresh token ``find_refresh`` found, in ``batch`` with the tokens that
        replace it; the batch's first result says whether the claim was ours."""
        key = _h(token)
        ttl = max(1, int(record["exp"] - self.clock())) + 60
        batch.take("rt:" + key)
        batch.set("rt-used:" + key, {"grant": record["grant"]}, ttl)

    def revoke(self, kind: str, token: str, record: dict) -> None:
        """RFC 7009: revoking a refresh token ends its family; an access token, itself.
        ``record`` is the token's, as ``lookup`` found it."""
        if kind == "rt":
            self.revoke_grant(record["grant"])
        else:
            self.store.delete(f"at:{_h(token)}")
