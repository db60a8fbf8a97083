"""The SQL database: engine, sessions and migrations run safely at start."""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path

from alembic import command
from alembic.config import Config
import psycopg
from psycopg.types.json import Json
from sqlalchemy import create_engine, event, make_url, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from idp.settings import SettingsError

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
# Any constant works; it names the PostgreSQL advisory lock that serialises migrations.
_MIGRATION_LOCK_ID = 0x1D9_0001


class Database:
    def __init__(self, url: str, pool: int = 20):
        self.url = url
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            if pool < 1:
                raise SettingsError(f"IDP_DATABASE_POOL must be at least 1, not {pool}")
            if make_url(url).drivername != "postgresql+psycopg":  # the hot reads talk to psycopg itself (``_driver``)
                raise SettingsError(f"IDP_DATABASE_URL must be postgresql+psycopg://... or sqlite:///..., not {make_url(url).drivername}://...")
            # A server that does not answer fails a connection in 10 s, not libpq's never
            # (``?connect_timeout=`` in the URL says otherwise).
            timeout = {"connect_timeout": 10} if "connect_timeout=" not in url else {}
            # Twice ``pool`` at most: by default as many as Starlette's thread pool (40 threads)
            # uses, so connections are reused rather than opened per request; no pre-ping round
            # trip per checkout (a dead connection fails one request and is replaced;
            # pool_recycle retires idle ones first).
            self.engine = create_engine(url, pool_size=pool, max_overflow=pool, pool_recycle=300, connect_args=timeout)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._compiled: dict = {}  # (statement, parameter names) -> its SQL (``_sql``)

    @contextlib.contextmanager
    def session(self):
        """A unit of work: committed when the block ends, rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def scalar(self, query: str, *params):
        """The first column of the first row of a read-only ``query`` (``%s`` placeholders),
        or None, sent on the driver's own connection (see ``_driver``). For the read made on
        every token request, where SQLAlchemy's layers cost three times the query. It blocks,
        on the event loop too inside ``idp.bridge.run`` (the token endpoint): only a single
        process with the in-process store reads the database there (``account_active``)."""
        with self._driver() as conn:
            if self.engine.dialect.name == "sqlite":
                row = conn.execute(query.replace("%s", "?"), params).fetchone()
            else:
                row = conn.execute(query, params, prepare=True).fetchone()
        return None if row is None else row[0]

    def rows(self, statement, **params) -> list[dict]:
        """The rows of a read-only Core ``statement``, as dicts by column label. On PostgreSQL
        it is compiled once (``_sql``) and sent, prepared, on the driver's own connection
        (``_driver``): a quarter of the CPU of the same query through SQLAlchemy, for the
        reads every login step makes. SQLite goes through SQLAlchemy, whose types turn its
        text back into dates."""
        if self.engine.dialect.name == "sqlite":
            with self.engine.connect() as conn:
                return [dict(row._mapping) for row in conn.execute(statement, params)]
        with self._driver() as conn:
            cursor = conn.execute(self._sql(statement, params), params, prepare=True)
            names = [column.name for column in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

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
        with self._driver() as conn:
            conn.execute(self._sql(statement, params), values, prepare=True)

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
        with self.engine.connect() as conn, self._migration_lock(conn):
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            conn.commit()

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
            path = self.url.split("///", 1)[-1]
            lock_path = (path if path and path != ":memory:" else "/tmp/idp-sqlite") + ".migrate-lock"
            with open(lock_path, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False


def _sqlite_pragmas(dbapi_conn, _record):
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.close()
