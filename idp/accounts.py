"""Accounts: password hashing, the complexity policy, expiry, lockout and disabling."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Callable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import LABEL_STYLE_TABLENAME_PLUS_COL, bindparam, delete, func, select, update
from sqlalchemy.exc import IntegrityError

from idp.mobileid import national_id as national_ids
from idp.storage.kv import Batch
from idp.storage.models import Account, Binding

KINDS = ("personal", "aa")
USERNAME = re.compile(r"^[A-Za-z0-9._@-]{3,64}$")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
LIMITS = {"name": 200, "email": 320, "org": 200}  # the columns' lengths


class AccountError(ValueError):
    """Bad account input; ``key`` names the translated message, ``params`` fill it."""

    def __init__(self, key: str, **params):
        super().__init__(key)
        self.key, self.params = key, params


class Passwords:
    """Argon2id. The default cost (t=2, 19 MiB, p=1) is OWASP's 2024 minimum:
    about 18 ms per verify on one core here, while an offline guess costs the
    same. Hashes made with other parameters are upgraded at the next successful
    login.

    At most ``hash_threads`` hashes run at once in a process. Argon2 is
    memory-hard: more hashes than cores evict each other's memory from the
    caches (4 at once on 2 cores cost 22 ms each instead of 18), and a flood of
    logins would otherwise hold 19 MiB per request thread. Logins wait in
    ``check``'s queue without holding a request thread; ``metrics`` sees how long
    each waited there and how long its hash took."""

    def __init__(self, settings, metrics=None):
        self.hasher = PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
        )
        self.min_length = settings.password_min_length
        self._slots = threading.BoundedSemaphore(settings.hash_threads)
        self._pool = ThreadPoolExecutor(settings.hash_threads, thread_name_prefix="argon2")
        self._metrics = metrics
        self._dummy = self.hasher.hash("not a password of anyone")

    @contextlib.contextmanager
    def _slot(self, queued: float | None = None):
        """One of the ``hash_threads`` slots, timed from ``queued`` (default: now)."""
        queued = queued or time.perf_counter()
        with self._slots:
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                yield
            finally:
                if self._metrics is not None:
                    self._metrics.password_hash(started - queued, time.perf_counter() - started, time.thread_time() - cpu)

    def hash(self, password: str) -> str:
        with self._slot():
            return self.hasher.hash(password)

    def verify(self, stored: str | None, password: str, queued: float | None = None) -> tuple[bool, bool]:
        """(correct, needs rehash). Unknown accounts cost the same as known ones."""
        try:
            with self._slot(queued):
                self.hasher.verify(stored or self._dummy, password)
        except (VerificationError, InvalidHashError):
            return False, False
        if stored is None:
            return False, False
        return True, self.hasher.check_needs_rehash(stored)

    async def check(self, read: Callable, password: str) -> tuple[object, bool, bool]:
        """(account, correct, needs rehash): the account ``read()`` returns (or None), its
        password verified, awaited on the hashing threads (the login's password step). The
        read is made there too: a trip to a thread and back costs ~70 µs of CPU."""
        def read_and_verify(queued):
            before = time.perf_counter()
            account = read()
            queued += time.perf_counter() - before  # reading is not waiting for a hashing thread
            return (account, *self.verify(account.password_hash if account else None, password, queued))

        return await asyncio.get_running_loop().run_in_executor(self._pool, read_and_verify, time.perf_counter())

    def problems(self, password: str, username: str = "") -> list[str]:
        """What the password lacks, as message keys; empty when it passes."""
        missing = []
        if len(password) < self.min_length:
            missing.append("password.rule.length")
        if not re.search(r"[a-z]", password):
            missing.append("password.rule.lower")
        if not re.search(r"[A-Z]", password):
            missing.append("password.rule.upper")
        if not re.search(r"[0-9]", password):
            missing.append("password.rule.digit")
        if not re.search(r"[^A-Za-z0-9]", password):
            missing.append("password.rule.symbol")
        if username and username.lower() in password.lower():
            missing.append("password.rule.username")
        return missing


class Lockout:
    """N wrong answers (passwords and OTPs alike) lock an account for a while.

    Counted per username, existing or not, so a lockout says nothing about
    whether an account exists. An attempt is reserved *before* the password is
    checked, so parallel guesses cannot slip past the threshold."""

    def __init__(self, store, clock, threshold: int, seconds: int, metrics=None):
        self.store, self.clock, self.threshold, self.seconds = store, clock, threshold, seconds
        self.metrics = metrics

    @staticmethod
    def _key(username: str) -> str:
        return username.strip().lower()

    def locked_until(self, username: str) -> float | None:
        lock = self.store.get("lock:" + self._key(username))
        if lock is None:
            return None
        if lock["until"] <= self.clock():
            self.store.delete("lock:" + self._key(username), "fail:" + self._key(username))
            return None
        return lock["until"]

    def attempt(self, username: str) -> tuple[float | None, int]:
        """Before an answer is checked: (until, 0) while the account is locked, which this
        attempt may just have done (the one over the threshold); else (None, its number).
        The lock is looked up and the attempt counted in one round trip."""
        batch = Batch()
        self.count(username, batch)
        return self.counted(username, *self.store.write(batch))

    def count(self, username: str, batch: Batch) -> None:
        """``attempt``'s look-up and count, added to the caller's ``batch``: its first read and
        first increment, whose results ``counted`` takes."""
        batch.read("lock:" + self._key(username))
        batch.incr("fail:" + self._key(username), self.seconds)

    def counted(self, username: str, lock: dict | None, attempt: int) -> tuple[float | None, int]:
        """What ``attempt`` answers, from what ``count`` found."""
        key = self._key(username)
        if lock is not None:
            if lock["until"] > self.clock():
                # Counted with the look-up, and left: no decrement that could outlive the
                # count's key and go below zero. The lock's record outlives any count made
                # under it (``lock``), and the first try after the lock clears both.
                return lock["until"], 0
            self.store.delete("lock:" + key, "fail:" + key)  # the lock is over: counting starts again
            attempt = self.reserve(username)
        attempt = self._owed(key, attempt)
        if attempt > self.threshold:
            return self.lock(username), 0
        return None, attempt

    def reserve(self, username: str) -> int:
        """Count an attempt; returns its number (the caller locks past the threshold)."""
        key = self._key(username)
        return self._owed(key, self.store.incr("fail:" + key, self.seconds))

    def _owed(self, key: str, attempt: int) -> int:
        """``attempt``, unless a give-back (``release``) came after its count's window had ended
        and left the new count below one: then that count starts again at one, no try for free."""
        return attempt if attempt >= 1 else self.store.incr("fail:" + key, self.seconds, by=1 - attempt)

    def release(self, username: str, batch: Batch | None = None) -> None:
        """Give back a reserved attempt that turned out not to be a guess (now, or with ``batch``).
        A right answer only gives back its own: the count is cleared when a login ends (``clear``),
        or a right password would wipe the wrong OTPs before it, and with them their limit."""
        (batch or self.store).incr("fail:" + self._key(username), self.seconds, by=-1)

    def lock(self, username: str) -> float:
        """Lock the account, unless it is already; when the lock ends."""
        until = self.clock() + self.seconds
        # Kept a lock's length past its end: a count made in its last moment (``counted``)
        # lives that long, and must find it to be cleared with it.
        if self.store.set("lock:" + self._key(username), {"until": until}, 2 * self.seconds + 60, only_new=True):
            if self.metrics:
                self.metrics.lockouts.inc()  # a new lock, not a retry against one
        return self.locked_until(username) or until

    def clear(self, username: str, batch: Batch | None = None) -> None:
        """Forget the count and any lock (now, or with ``batch``, when the caller writes it)."""
        (batch or self.store).delete("fail:" + self._key(username), "lock:" + self._key(username))


def password_expired(account: Account, max_age_days: int, now: dt.datetime) -> bool:
    if not max_age_days or account.password_login_disabled or account.password_changed_at is None:
        return False
    return now - account.password_changed_at > dt.timedelta(days=max_age_days)


def by_username(session, username: str) -> Account | None:
    query = select(Account).where(func.lower(Account.username) == username.strip().lower())
    return session.execute(query).scalar_one_or_none()


class Snapshot(SimpleNamespace):
    """A read-only copy of a row, with the model's attribute names; nothing saves changes to it."""


# The login pages and the account area read an account with its bindings on every step: one
# query (``Database.rows``), not ORM objects, whose loading cost four times the query.
_ACCOUNTS, _BINDINGS = Account.__table__, Binding.__table__
_WITH_BINDINGS = (select(_ACCOUNTS, _BINDINGS).outerjoin(_BINDINGS, _BINDINGS.c.account_id == _ACCOUNTS.c.id)
                  .order_by(_BINDINGS.c.created_at).set_label_style(LABEL_STYLE_TABLENAME_PLUS_COL))
_BY_ID = _WITH_BINDINGS.where(_ACCOUNTS.c.id == bindparam("key"))
_BY_USERNAME = _WITH_BINDINGS.where(func.lower(_ACCOUNTS.c.username) == bindparam("key"))


def with_bindings(svc, *, account_id: str | None = None, username: str | None = None) -> Snapshot | None:
    """The account (by id, or by username in any case) with its ``bindings``, as a ``Snapshot``
    to read (write through ``svc.db.session``)."""
    query, key = (_BY_ID, account_id) if account_id is not None else (_BY_USERNAME, username.strip().lower())
    rows = svc.db.rows(query, key=key)
    if not rows:
        return None
    account = _columns(rows[0], _ACCOUNTS)
    account.bindings = [_columns(row, _BINDINGS) for row in rows if row["bindings_id"] is not None]
    return account


def _columns(row: dict, table) -> Snapshot:
    return Snapshot(**{column.key: row[f"{table.name}_{column.name}"] for column in table.columns})


def create_account(session, passwords: Passwords, username: str, password: str | None, *, now: dt.datetime, **fields) -> Account:
    if not USERNAME.match(username):
        raise AccountError("account.bad_username")
    if fields.get("kind", "personal") not in KINDS:
        raise AccountError("account.bad_kind")
    for key, limit in LIMITS.items():
        if len(fields.get(key) or "") > limit:
            raise AccountError("admin.error.too_long", field=key, limit=limit)
    if fields.get("email") and not EMAIL.match(fields["email"]):
        raise AccountError("admin.error.email")
    if fields.get("kind") == "aa" and not fields.get("org"):
        raise AccountError("admin.error.org_required")  # it would administer nothing
    if by_username(session, username) is not None:
        raise AccountError("account.exists", username=username)
    national_id = fields.get("national_id")
    if national_id:
        try:  # as the mobile-ID login will look for it: upper case, its check digit right
            national_id = fields["national_id"] = national_ids.validate(national_id, allow_resident=True)
        except national_ids.InvalidNationalId:
            raise AccountError("account.bad_national_id") from None
    if national_id and session.scalar(select(Account.id).where(Account.national_id == national_id)) is not None:
        raise AccountError("account.national_id_exists")
    account = Account(username=username, **fields)
    if password is not None:
        set_password(account, passwords, password, now=now)
    session.add(account)
    try:
        session.flush()
    except IntegrityError as e:  # created meanwhile by another request: the unique index decided
        raise AccountError("account.national_id_exists" if "national_id" in str(e.orig) else "account.exists",
                           username=username) from None
    return account


def set_password(account: Account, passwords: Passwords, password: str, *, now: dt.datetime) -> None:
    problems = passwords.problems(password, account.username)
    if problems:
        raise AccountError("password.weak", rules=problems)
    account.password_hash = passwords.hash(password)
    account.password_changed_at = now


def change_password(account: Account, passwords: Passwords, password: str, *, now: dt.datetime) -> None:
    """A new password in place of the current one, never the current one again: a password
    that expired (A1), or was switched off because it leaked (M4), does not come back."""
    if is_current_password(account, passwords, password):
        raise AccountError("password.same")
    set_password(account, passwords, password, now=now)


def is_current_password(account: Account, passwords: Passwords, password: str) -> bool:
    return bool(account.password_hash) and passwords.verify(account.password_hash, password)[0]


# -- disabling ---------------------------------------------------------------------------------
# ``accounts.disabled`` is the truth; the store holds a mark per disabled account that mirrors
# it, so that with a shared store (Redis) the token endpoint checks an account with one GET next
# to the token's own reads instead of a database query (``idp.protocol.server.account_active``).
_DISABLED_MARK = "acct-disabled:"
# The mark must last as long as the account stays disabled; enabling deletes it. The store wants
# a TTL, and none shorter is safe: a client's ``refresh_token_lifetime`` has no upper bound and can
# be raised after the disable, and a code issued just before the disable still mints tokens.
# Ten years outlives them all; every process writes the marks again every minute anyway.
DISABLED_MARK_SECONDS = 10 * 365 * 86400


def disabled_mark(account_id: str) -> str:
    return _DISABLED_MARK + account_id


def set_disabled(svc, account_id: str, disabled: bool,
                 allowed: Callable[[Account], bool] = lambda account: True) -> Account | None:
    """Disable or enable an account, in the database and in its store mark; the account
    (detached), or None when there is none or ``allowed`` refuses it (nothing changes).

    The mark changes while the account's row is locked, so a disable and an enable at once
    leave it as they leave the flag. Failures end on the safe side: a disable whose commit
    fails leaves a mark (the account is refused until the disable is repeated or undone), and
    an enable whose commit fails writes its mark back. A disable then ends the account's
    sessions, which tells its portals (back-channel logout) to end theirs: the flag already
    refuses its tokens and new logins, but not a portal's own session."""
    try:
        with svc.db.session() as session:
            account = session.get(Account, account_id, with_for_update=True)
            if account is None or not allowed(account):
                return None
            account.disabled = disabled
            session.flush()
            if disabled:
                svc.store.set(disabled_mark(account.id), {"disabled": True}, DISABLED_MARK_SECONDS)
            else:
                svc.store.delete(disabled_mark(account.id))
            session.expunge(account)
    except Exception:
        if not disabled:
            svc.store.set(disabled_mark(account_id), {"disabled": True}, DISABLED_MARK_SECONDS)
        raise
    if disabled:
        svc.sessions.end_all(account_id, svc.tokens)
    return account


def mark_disabled_accounts(svc) -> int:
    """Write the mark of every account the database says is disabled (at the app's start and
    every ``disabled_marks_seconds``), so that accounts disabled before the marks existed, or
    whose marks were lost with Redis data, stay refused. How many there are.

    Their rows are share-locked until the marks are written: an administrator enabling one of
    them meanwhile waits, then deletes the mark and commits, so no mark outlives its account's
    enabling. (SQLite ignores the lock; there a mark could survive such a race, refusing an
    enabled account until it is enabled again: the safe side.)"""
    if not svc.store.shared:
        return 0  # account_active reads the database itself: the marks would not be read
    with svc.db.session() as session:
        query = select(Account.id).where(Account.disabled).with_for_update(read=True)
        ids = session.execute(query).scalars().all()
        svc.store.set_many([(disabled_mark(i), {"disabled": True}, DISABLED_MARK_SECONDS) for i in ids])
    return len(ids)


def reset_bindings(svc, account_id: str) -> tuple[int, bool]:
    """Delete every binding (M5, M7), and end the account's sessions: the next login binds
    anew (M1), and nobody stays logged in on the strength of the old ones. Password login is
    turned back on, or an account that had it off would have no way in left; but not with
    the password it had then, which its owner may have turned off because it leaked (turning
    it back on forces a new password, M4): that one is forgotten, and the owner sets a new
    one through forgot-password. (How many bindings, whether the password was forgotten.)"""
    with svc.db.session() as session:
        count = session.execute(delete(Binding).where(Binding.account_id == account_id)).rowcount
        forgotten = session.execute(
            update(Account).where(Account.id == account_id, Account.password_login_disabled.is_(True))
            .values(password_login_disabled=False, password_hash=None)).rowcount > 0
    svc.sessions.end_all(account_id, svc.tokens)
    return count, forgotten
