"""Single sign-on sessions in the short-lived store.

A session is what the ``idp_session`` cookie names: who logged in, when, with
which factors (``amr``) and at which level (``acr``), and the grants issued to
each client under it, so that logging out can end them.

The cookie is the session's id (``sid``) and a secret of the moment
(``SID.SECRET``, ``cookie``): the secret changes whenever the session proves
more (``renew``), so a cookie value learnt while the session was at a lower
level (a shared computer, a sibling site) is not worth the higher one. The sid
stays: the portals know the session by it (``claims.public_sid``), and its
grants hang on it.
"""

from __future__ import annotations

import hmac
import logging
import secrets

from idp.storage.kv import Batch

log = logging.getLogger("idp.sessions")


ENDED = "ended"  # in a session's grant list once the session has ended


class Sessions:
    def __init__(self, store, clock, lifetime: int, code_seconds: int = 60):
        self.store, self.clock, self.lifetime = store, clock, lifetime
        self.ended_seconds = code_seconds + 60  # while a code of an ended session can still be redeemed
        # Called with the ended record after ``end`` (back-channel logout, SPEC P6).
        self.listeners: list = []

    def create(self, account_id: str, username: str, amr: list[str], acr: str, auth_time: float,
               seen: dict | None = None, verified_at: float = 0, batch: Batch | None = None,
               proofs: dict | None = None) -> dict:
        """A new session; ``proofs``: which factor proved which ``amr`` (``flow.within_policy``);
        ``seen`` (address, user agent) lets its owner recognise it in their list;
        ``verified_at``: when a bound second factor was last proven (SPEC M2). Written at once,
        or with ``batch``, when the caller writes it."""
        now = self.clock()
        record = {
            "sid": secrets.token_urlsafe(24),
            "account": account_id,
            "username": username,
            "amr": amr,
            "proofs": proofs,
            "acr": acr,
            "auth_time": int(auth_time),
            "exp": now + self.lifetime,
            "created": now,
            "clients": {},
            "verified_at": verified_at,
            "secret": secrets.token_urlsafe(16),
            **(seen or {}),
        }
        writes = batch or Batch()
        writes.set("sess:" + record["sid"], record, self.lifetime)
        writes.add("acct-sess:" + account_id, record["sid"], self.lifetime)
        if batch is None:
            self.store.write(writes)
        return record

    def of_account(self, account_id: str) -> list[dict]:
        """The account's live sessions, newest first (the "log out other sessions" list)."""
        sids = sorted(self.store.members("acct-sess:" + account_id))
        records = self.store.get_many(["sess:" + sid for sid in sids])
        live = [r for r in records if r is not None and r["exp"] >= self.clock()]
        return sorted(live, key=lambda r: r.get("created", 0), reverse=True)

    def end_all(self, account_id: str, tokens, but: str | None = None) -> int:
        """End the account's sessions (``but`` one), their grants revoked, those of sessions that
        have lapsed too; how many ended. After a password reset or a reset of the bindings
        nobody stays logged in with the old ones, a refresh token included."""
        tokens.end_account(account_id, but)
        return sum(1 for record in self.of_account(account_id)
                   if record["sid"] != but and self.end(record["sid"], tokens))

    def get(self, cookie: str | None) -> dict | None:
        """The live session a cookie value names, if its secret is the session's current one
        (sessions from before secrets take their sid alone)."""
        if not cookie:
            return None
        sid, _, secret = cookie.partition(".")
        record = self.live(self.store.get(self.key(sid)))
        if record is None or "secret" not in record:
            return record
        # Bytes: a cookie may hold any character, which a comparison of str refuses.
        return record if hmac.compare_digest(secret.encode(), record["secret"].encode()) else None

    @staticmethod
    def cookie(record: dict) -> str:
        """The cookie value of session ``record``."""
        return f"{record['sid']}.{record['secret']}" if "secret" in record else record["sid"]

    @staticmethod
    def sid_of(cookie: str | None) -> str:
        """The session id in a cookie value (unchecked: to tell sessions apart, not to trust one)."""
        return (cookie or "").partition(".")[0]

    @staticmethod
    def renew(record: dict) -> None:
        """A new secret: the session proves more now, and the cookie it had is no longer it."""
        record["secret"] = secrets.token_urlsafe(16)

    def key(self, sid: str) -> str:
        """Where session ``sid`` is stored, for a caller that reads it with other keys at once."""
        return "sess:" + sid

    def live(self, record: dict | None) -> dict | None:
        return None if record is None or record["exp"] < self.clock() else record

    def save(self, record: dict, batch: Batch) -> None:
        """Write back a session read before, with ``batch``: only where it is still there, so one
        ended meanwhile (a logout, a reset) stays ended."""
        batch.replace(self.key(record["sid"]), record, max(1, int(record["exp"] - self.clock())))

    def add_grant(self, sid: str, client_id: str, gid: str, batch=None, offline: bool = False) -> None:
        """Remember a grant issued under the session: one atomic set addition, no
        read-modify-write of the session (two clients redeeming at once lose nothing);
        with ``batch`` (``idp.storage.kv.Batch``), sent with the caller's other writes.
        An ``offline`` grant (scope offline_access) outlives the session's end."""
        member = f"{client_id} {gid}" + (" offline" if offline else "")
        (batch or self.store).add("sess-grants:" + sid, member, self.lifetime)

    def ended_mark(self, sid: str, batch) -> int:
        """Ask in ``batch``, after its ``add_grant``, whether the session's end marked the grant
        list (``end``); where the answer comes among the batch's ``has`` answers. One key for
        both, so the order holds on a Redis Cluster too, where the session's key may sit in
        another slot and be read before the addition is made."""
        return batch.has("sess-grants:" + sid, ENDED)

    def end(self, sid: str, tokens) -> dict | None:
        """End a session, revoke the grants issued under it and tell the listeners (which
        notify the session's clients). Taking the record is atomic, so of two concurrent
        ends only one notifies. Offline grants stay (Back-Channel Logout 2.7, OIDC Core 11:
        offline access is for when the user is not logged in); what must end every grant of
        the account (a password reset, a disabled account) marks the account instead."""
        record = self.store.take("sess:" + sid) if sid else None
        if record is None:
            return None
        # Marked first: a code exchange that adds its grant after this sees the mark and revokes
        # it itself; one that added it before is in the list read next. The list stays, with
        # the mark, while a code of the session could still be redeemed.
        self.store.add("sess-grants:" + sid, ENDED, self.ended_seconds)
        for member in self.store.members("sess-grants:" + sid) - {ENDED}:
            client_id, gid, *offline = member.split(" ")
            record["clients"].setdefault(client_id, []).append(gid)
            if not offline:
                tokens.revoke_grant(gid)
        for listener in self.listeners:
            try:
                listener(record)
            except Exception:  # noqa: BLE001 - the session has ended whatever a listener does
                log.exception("session end listener %r failed", listener)
        return record
