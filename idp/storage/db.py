"""The SQL database: engine, sessions and migrations run safely at start."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import select
import uuid
from functools import partial
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
import psycopg
from psycopg.types.json import Json
from sqlalchemy import String, create_engine, event, make_url, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, DisconnectionError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.orm import sessionmaker
from starlette.concurrency import run_in_threadpool

from idp import bridge
from idp.settings import SettingsError

log = logging.getLogger("idp")

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
# Any constants work; they name the PostgreSQL advisory locks that serialise migrations and
# that the one server process with an in-process store holds (``claim_sole_server``).
_MIGRATION_LOCK_ID = 0x1D9_0001
_SOLE_SERVER_LOCK_ID = 0x1D9_0002
# A peer that vanished (a NAT's idle timeout, a failover, a host powered off) is noticed in about
# a minute, not after TCP's two idle hours: by libpq on this side, and by the server on its side,
# which until then keeps the vanished process's advisory locks (the migration's: every other
# process's start waits on it) and its connection.
_KEEPALIVE = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
              "tcp_user_timeout": 60000}
_SERVER_KEEPALIVE = ("-c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3 "
                     "-c tcp_user_timeout=60000")


class Database:
    def __init__(self, url: str, pool: int = 20, statement_timeout: int = 30):
        self.url = url
        try:
            parsed = make_url(url)
        except ArgumentError:  # SQLAlchemy's message names no setting; the URL may hold a password
            raise SettingsError("IDP_DATABASE_URL is not a database URL: write postgresql+psycopg://user@host/db "
                                "or sqlite:///path") from None
        if url.startswith("sqlite"):
            path = parsed.database
            if not path or path == ":memory:":  # each pooled connection (thread) would get its own, empty one
                raise SettingsError("IDP_DATABASE_URL must name a SQLite file (sqlite:///var/idp.db), not an in-memory database")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            # hide_parameters: a failed statement's text (logged with its traceback) never
            # carries its values, a new password's hash or a national ID.
            self.engine: Engine = create_engine(url, hide_parameters=True,
                                                connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            if parsed.drivername != "postgresql+psycopg":  # the hot reads talk to psycopg itself (``_driver``)
                raise SettingsError(f"IDP_DATABASE_URL must be postgresql+psycopg://... or sqlite:///..., not {parsed.drivername}://...")
            # A server that does not answer fails a connection in 10 s, not libpq's never
            # (``?connect_timeout=`` in the URL says otherwise).
            timeout = {"connect_timeout": 10} if "connect_timeout=" not in url else {}
            # The server cancels a statement that runs (or waits for a lock) too long; options the
            # URL gives come after, so a statement_timeout of its own wins.
            given = parsed.query.get("options", "")
            given = " ".join(given) if isinstance(given, tuple) else given  # ?options=...&options=...
            limit = f"-c statement_timeout={statement_timeout * 1000}" if statement_timeout else ""
            options = {"options": " ".join(filter(None, (_SERVER_KEEPALIVE, limit, given)))}
            # libpq's side of it, where the URL does not set its own (connect_args would override it).
            alive = {name: value for name, value in _KEEPALIVE.items() if name not in parsed.query}
            # Twice ``pool`` at most: by default as many as Starlette's thread pool (40 threads)
            # uses, so connections are reused rather than opened per request; no pre-ping round
            # trip per checkout: one the server ended while it was idle is replaced as it is
            # checked out (``_ended``); pool_recycle retires idle ones first.
            self.engine = create_engine(url, pool_size=pool, max_overflow=pool, pool_recycle=300, hide_parameters=True,
                                        connect_args={**alive, **timeout, **options})
            event.listen(self.engine, "checkout", _replace_ended)
            # From the parsed URL, not its rendering, which would turn a space into "+".
            _, connect = self.engine.dialect.create_connect_args(parsed)
            connect.pop("context", None)  # SQLAlchemy's type adapters, not a libpq option
            self._conninfo = psycopg.conninfo.make_conninfo("", **{**alive, **timeout, **connect, **options})
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._sole_server = None  # ``claim_sole_server``'s lock, held while this lives
        self._claimant = f"idp sole server {uuid.uuid4().hex}"  # its connection's application_name
        self._compiled: dict = {}  # (statement, parameter names) -> its SQL (``_sql``)
        # Each event loop's PostgreSQL connections, for the queries inside ``idp.bridge.run``.
        self._loops = bridge.LoopLocal(lambda: _LoopConnections(self._conninfo, min(4, self.engine.pool.size())),
                                       _LoopConnections.close)

    @contextlib.contextmanager
    def session(self):
        """A unit of work: committed when the block ends, rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    async def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, which reaches the database through ``rows``, ``write`` and
        ``scalar`` only (Redis through the store): on PostgreSQL on the event loop, with its
        queries awaited (``idp.bridge``), rather than handed to a thread (~60 µs of CPU a query
        against ~130 for the thread hop and the blocking query); on SQLite, whose queries
        block, in the thread pool."""
        if self.engine.dialect.name == "sqlite":
            return await run_in_threadpool(fn, *args, **kwargs)
        return await bridge.run(partial(fn, *args, **kwargs))

    def scalar(self, query: str, *params):
        """The first column of the first row of a read-only ``query`` (``%s`` placeholders),
        or None, sent as ``rows``. For the read made on every token request, where
        SQLAlchemy's layers cost three times the query."""
        if self.engine.dialect.name == "sqlite":
            with self._driver() as conn:
                row = conn.execute(query.replace("%s", "?"), params).fetchone()
        else:
            row = next(iter(self._query(query, params, fetch=True)[1]), None)
        return None if row is None else row[0]

    def rows(self, statement, **params) -> list[dict]:
        """The rows of a read-only Core ``statement``, as dicts by column label. On PostgreSQL
        it is compiled once (``_sql``) and sent, prepared, by the driver itself (``_query``):
        a quarter of the CPU of the same query through SQLAlchemy, for the reads every login
        step makes. SQLite goes through SQLAlchemy, whose types turn its text back into dates."""
        if self.engine.dialect.name == "sqlite":
            with self.engine.connect() as conn:
                return [dict(row._mapping) for row in conn.execute(statement, params)]
        names, rows = self._query(self._sql(statement, params), params, fetch=True)
        return [dict(zip(names, row)) for row in rows]

    def write(self, statement, **params) -> None:
        """One INSERT or UPDATE on its own, in autocommit: one round trip, with no BEGIN and
        COMMIT around it and no ORM unit of work; on PostgreSQL through the driver as ``rows``
        (a fifth of the CPU of ``session``). For the audit log's row per event and the OTP
        binding's last step."""
        if self.engine.dialect.name == "sqlite":
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(statement, params)
            return
        values = {key: Json(value) if isinstance(value, (dict, list)) else value for key, value in params.items()}
        self._query(self._sql(statement, params), values, fetch=False)

    def _query(self, sql: str, params, fetch: bool):
        """(column names, rows) of ``sql`` on PostgreSQL, prepared, in autocommit: awaited on the
        event loop's own connections inside ``idp.bridge.run``, else blocking on a pooled one."""
        if bridge.inside():
            return bridge.wait(self._loops.get().query(sql, params, fetch))
        with self._driver() as conn:
            cursor = conn.execute(sql, params, prepare=True)
            return _names(cursor), cursor.fetchall() if fetch else []

    async def aclose(self) -> None:
        """Close the running loop's own connections (at the app's shutdown)."""
        connections = self._loops.pop()
        if connections is not None:
            connections.close()

    def _sql(self, statement, params: dict) -> str:
        """``statement`` compiled for PostgreSQL (an INSERT's columns: the keys of ``params``).
        Statements are built once, at import, with ``bindparam`` for their values, so each is
        compiled once and kept. Every value must come in ``params``: the driver applies no
        column default and no value fixed in the statement, as SQLAlchemy would."""
        key = (statement, tuple(params))
        sql = self._compiled.get(key)
        if sql is None:
            compiled = statement.compile(dialect=self.engine.dialect, column_keys=list(params))
            if missing := set(compiled.params) - set(params):
                raise ValueError(f"values missing for {sorted(missing)}: give them all, as bindparam()s")
            if len(self._compiled) >= 256:  # statements built per call would otherwise pile up
                self._compiled.clear()
            sql = self._compiled[key] = str(compiled)
        return sql

    @contextlib.contextmanager
    def _driver(self):
        """A pooled connection's driver connection, in autocommit: each query is one round
        trip, with no BEGIN, and nothing to roll back when it goes back to the pool."""
        with contextlib.closing(self.engine.raw_connection()) as pooled:
            conn = pooled.driver_connection
            if self.engine.dialect.name == "sqlite":  # a SELECT opens no transaction there
                yield conn
                return
            conn.autocommit = True
            try:
                yield conn
            except psycopg.OperationalError as error:
                if conn.broken:  # the server went away (a restart, a failover): so did the pool's other connections
                    pooled.invalidate(error)
                    self.engine.pool.dispose()
                raise
            finally:
                if not conn.broken:
                    conn.autocommit = False

    def migrate(self) -> None:
        """Bring the schema up to date. Safe when several processes start together:
        one migrates while the others wait on a lock, then find nothing to do."""
        postgresql = self.engine.dialect.name == "postgresql"
        with self.engine.connect() as conn:
            if postgresql:  # no time limit: a migration, or waiting for another process's, may be long
                conn.execute(text("SET statement_timeout = 0"))
            else:
                # A migration rebuilds a SQLite table as copy, DROP, rename: with foreign keys on,
                # the DROP would delete every row that references it ON DELETE CASCADE (each
                # binding and consent of accounts). Checked once the migration is done instead.
                conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()
            try:
                with self._migration_lock(conn):
                    cfg = Config()
                    cfg.set_main_option("script_location", str(MIGRATIONS))
                    cfg.attributes["connection"] = conn
                    if ahead := _unknown_revisions(cfg, conn):
                        # A newer release migrated it (a rolling update, a rollback): its migrations
                        # only add (deploy/README.md, Kubernetes), so this release runs on it as it is.
                        log.warning("database is at revision %s, newer than this release knows: not migrated",
                                    ", ".join(ahead))
                    else:
                        before = MigrationContext.configure(conn).get_current_heads()
                        command.upgrade(cfg, "head")
                        migrated = MigrationContext.configure(conn).get_current_heads() != before
                        if migrated and not postgresql:
                            if broken := conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall():
                                raise RuntimeError(f"the migration left rows whose references are gone: {broken[:5]}")
                    conn.commit()
            finally:
                conn.rollback()
                conn.execute(text("RESET statement_timeout") if postgresql else text("PRAGMA foreign_keys=ON"))
                conn.commit()  # back as the pool's connections are

    @contextlib.contextmanager
    def _migration_lock(self, conn):
        if self.engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _MIGRATION_LOCK_ID})
                conn.commit()
        else:
            with open(make_url(self.url).database + ".migrate-lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def claim_sole_server(self) -> bool:
        """Claim, for a server process that keeps login state in its own memory (no Redis),
        to be the only one on this database; False when another process holds the claim.
        Held until the process ends, however it ends: a PostgreSQL session's advisory lock,
        or a lock on a file beside the SQLite one."""
        if self.engine.dialect.name == "postgresql":
            # Its own connection, never the pool's. Lost with it (a database restart), when
            # another process could claim it too: ``keep_sole_server`` claims it again.
            conn = psycopg.connect(self._conninfo, autocommit=True, application_name=self._claimant)
            if not conn.execute("SELECT pg_try_advisory_lock(%s)", (_SOLE_SERVER_LOCK_ID,)).fetchone()[0]:
                conn.close()
                return False
            self._sole_server = conn
            return True
        lock = open(make_url(self.url).database + ".serve-lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            return False
        self._sole_server = lock
        return True

    @property
    def claimed_sole_server(self) -> bool:
        return self._sole_server is not None

    def keep_sole_server(self) -> bool:
        """Whether this process still holds its ``claim_sole_server`` claim: claimed again when
        a database restart or a break in the network ended the connection that held it; False
        when another process claimed it meanwhile. While the database is away nobody can
        claim it: True."""
        conn = self._sole_server
        if not isinstance(conn, psycopg.Connection):
            return True  # a lock on a file: held while the process lives
        try:
            conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            conn.close()
        try:
            self._sole_server = None
            return self.claim_sole_server() or (self._end_own_ghost() and self.claim_sole_server())
        except psycopg.OperationalError:
            self._sole_server = conn  # closed: the next turn tries to connect again
            return True

    def _end_own_ghost(self) -> bool:
        """After a break in the network the database may still hold the claim for this process's
        lost connection, which it has not noticed is gone: end that one (whether any). Another
        process's claim stays."""
        with psycopg.connect(self._conninfo, autocommit=True) as conn:
            ghosts = conn.execute(
                "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory'"
                " AND l.granted AND l.classid = 0 AND l.objid = %s AND a.application_name = %s"
                " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                (_SOLE_SERVER_LOCK_ID, self._claimant)).fetchall()
            for (pid,) in ghosts:
                conn.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))  # waits for it to end
        return bool(ghosts)

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False


class _LoopConnections:
    """One event loop's PostgreSQL connections (psycopg's ``AsyncConnection``, autocommit),
    for the queries awaited inside ``idp.bridge.run``: at most ``size`` open; a query takes
    an idle one, or opens one, or waits for one."""

    def __init__(self, conninfo: str, size: int):
        self.conninfo = conninfo
        self.idle: list[psycopg.AsyncConnection] = []
        self.slots = asyncio.Semaphore(size)

    async def query(self, sql: str, params, fetch: bool):
        async with self.slots:
            conn = self.idle.pop() if self.idle else None
            if conn is not None and _ended(conn):  # while idle (a restart, a failover): so were the others
                conn.pgconn.finish()
                self.close()
                conn = None
            conn = conn or await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
            try:
                cursor = await conn.execute(sql, params, prepare=True)
                result = _names(cursor), await cursor.fetchall() if fetch else []
            except psycopg.Error:
                if conn.broken:  # the server went away (a restart, a failover): so did the idle ones
                    conn.pgconn.finish()
                    self.close()
                else:  # the statement failed; the connection is fine
                    self.idle.append(conn)
                raise
            except BaseException:  # cancelled half-way: the connection is out of step, never reused
                conn.pgconn.finish()
                raise
            self.idle.append(conn)
            return result

    def close(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.pgconn.finish()


def _ended(conn) -> bool:
    """Whether the server ended an idle connection (a restart, a failover, an administrator's
    pg_terminate_backend): it sent its goodbye or closed, so the socket has something to read
    (else only a reported setting a reload changed, rare: that one is replaced for nothing).
    A poll with no wait, where pool_pre_ping would add a round trip to every checkout: the
    first request after a restart is served on a new connection rather than failed."""
    if conn.closed:
        return True
    poller = select.poll()  # not select.select: a busy process's descriptors pass its limit of 1024
    try:
        poller.register(conn.pgconn.socket, select.POLLIN)
    except (OSError, psycopg.Error):
        return True
    return bool(poller.poll(0))


def _replace_ended(dbapi_conn, record, proxy) -> None:
    """The pool's checkout: an ended connection is discarded, and the pool opens a new one."""
    if _ended(dbapi_conn):
        raise DisconnectionError("the database server ended the connection while it was idle")


def _names(cursor) -> list[str]:
    """The result's column names, read off the result itself: ``cursor.description`` builds
    an object per column (with its type looked up), a third of the CPU of an account's read
    with its bindings (25 columns)."""
    result = cursor.pgresult
    return [result.fname(i).decode() for i in range(result.nfields)] if result else []


def _unknown_revisions(cfg: Config, conn) -> list[str]:
    """The database's revisions that none of this release's migrations names."""
    known = {script.revision for script in ScriptDirectory.from_config(cfg).walk_revisions()}
    return [rev for rev in MigrationContext.configure(conn).get_current_heads() if rev not in known]


class unicode_lower(FunctionElement):
    """``lower()`` of every letter (É, full-width Ａ), as PostgreSQL's in a UTF-8 locale: SQLite's
    own lowers A-Z only, so there it is Python's ``str.lower``, registered on each connection."""

    type = String()
    inherit_cache = True


@compiles(unicode_lower)
def _lower(element, compiler, **kw):
    return f"lower({compiler.process(element.clauses, **kw)})"


@compiles(unicode_lower, "sqlite")
def _lower_in_python(element, compiler, **kw):
    return f"unicode_lower({compiler.process(element.clauses, **kw)})"


def _str_lower(value):
    return value.lower() if isinstance(value, str) else value


def _sqlite_pragmas(dbapi_conn, _record):
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.close()
    dbapi_conn.create_function("unicode_lower", 1, _str_lower, deterministic=True)
