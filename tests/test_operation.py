"""Running the provider (SPEC O1, O3): health, readiness, metrics, migrations."""

import asyncio
import gc
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from sqlalchemy import create_engine, text

from idp.protocol.logout import httpx  # httpx2, which the project depends on, or httpx
from idp.web.app import create_app
from tests import live
from tests.harness import callback


def test_health_and_readiness(provider):
    http = provider.http()
    assert http.get("/healthz").text == "ok"
    assert http.get("/readyz").json() == {"database": True, "store": True}


def test_metrics_count_logins_by_outcome(provider):
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id), password="wrong-password")
    callback(browser.password(page))
    text_ = provider.http().get("/metrics").text
    assert 'idp_audit_events_total{event="login.failure"} 1.0' in text_
    assert 'idp_audit_events_total{event="login.success"} 1.0' in text_
    assert 'route="/authorize"' in text_ and "tx=" not in text_
    # Three hashes, each after its wait for a hashing thread (IDP_HASH_THREADS): alice's
    # password when her account was made, then the two checks.
    assert "idp_password_hash_wait_seconds_count 3.0" in text_ and "idp_password_hash_seconds_count 3.0" in text_
    cpu = float(re.search(r"^idp_password_hash_cpu_seconds_total (\S+)$", text_, re.M).group(1))
    assert 0 < cpu < 3  # three argon2 runs' own CPU time


def test_metrics_token(make_provider):
    provider = make_provider(metrics_token="s3cret")
    http = provider.http()
    assert http.get("/metrics").status_code == 401
    assert http.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_processes_starting_together_migrate_once(settings_for, tmp_path):
    settings = settings_for()
    env_db = settings.database_url

    def start(_):
        return subprocess.run(
            [sys.executable, "-m", "idp.cli", "migrate"], capture_output=True, text=True, cwd=tmp_path,
            env={"IDP_DATABASE_URL": env_db, "IDP_KEYS_DIR": str(tmp_path / "keys"), "PATH": "/usr/bin:/bin"},
        )

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(start, range(4)))
    assert all(r.returncode == 0 for r in results), [r.stderr[-800:] for r in results]
    with create_engine(env_db).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    keys = list((tmp_path / "keys").glob("*.json"))
    assert len(keys) == 4  # current + next for ES256 and RS256, not one set per process



@pytest.mark.filterwarnings("ignore:.*expression-based index")  # SQLite's are compared on PostgreSQL
def test_the_migrations_build_the_schema_the_models_describe(settings_for):
    """A model changed without its migration (a column, an index, a type) shows here."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from idp.storage.db import Database
    from idp.storage.models import Base

    db = Database(settings_for().database_url)
    db.migrate()
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata) == []

def test_migrating_a_database_of_the_first_release_keeps_its_bindings_and_consents(settings_for):
    """Migration 0002 rebuilds the accounts table on SQLite (copy, DROP, rename): the DROP must
    not take every binding and consent with it (ON DELETE CASCADE)."""
    from alembic import command
    from alembic.config import Config

    from idp.storage.db import MIGRATIONS, Database

    db = Database(settings_for().database_url)
    with db.engine.connect() as conn:  # the first release's schema, and what it kept
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.commit()
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO accounts (id, username, name, email_verified, kind, password_login_disabled,"
                          " disabled, created_at) VALUES ('a1', 'alice', 'Alice', false, 'personal', false, false,"
                          " CURRENT_TIMESTAMP)"))
        conn.execute(text("INSERT INTO clients (client_id, metadata, first_party, created_at)"
                          " VALUES ('c1', '{}', false, CURRENT_TIMESTAMP)"))
        conn.execute(text("INSERT INTO bindings (id, account_id, factor, external_id, label, data, created_at)"
                          " VALUES ('b1', 'a1', 'totp', NULL, 'phone', '{}', CURRENT_TIMESTAMP)"))
        conn.execute(text("INSERT INTO consents (account_id, client_id, scope, granted_at)"
                          " VALUES ('a1', 'c1', 'openid', CURRENT_TIMESTAMP)"))
    db.migrate()
    with db.engine.connect() as conn:
        assert [conn.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in ("accounts", "bindings", "consents")] == [1, 1, 1]
        if db.engine.dialect.name == "sqlite":  # the pool's connections keep their foreign keys
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_a_process_starts_on_a_database_a_newer_release_migrated(settings_for, caplog):
    """A rolling update (or a rollback): the new release migrated, and a process of this one
    (re)starts beside it; it runs on the database as it is, and says so."""
    from idp.storage.db import Database

    settings = settings_for()
    Database(settings.database_url).migrate()
    with Database(settings.database_url).engine.begin() as conn:  # what a next release's 0099 leaves
        conn.execute(text("ALTER TABLE accounts ADD COLUMN locale VARCHAR(16)"))
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    app = create_app(settings)
    assert "revision 0099, newer than this release knows" in caplog.text
    assert app.state.svc.db.scalar("SELECT count(*) FROM accounts") == 0


@pytest.mark.parametrize("backend", ["postgres+redis"])
def test_a_store_that_does_not_answer_fails_readiness_while_other_requests_are_served(settings_for, redis_server):
    """A readiness probe waits on a stalled Redis off the event loop: the process goes
    on answering, and the probe then says which dependency failed."""
    settings = settings_for(redis_url=redis_server.url + "?socket_timeout=3")
    app = create_app(settings)
    admin = redis.Redis.from_url(redis_server.url)
    with live.reserve() as (sock, url), live.serve(app, sock, url):
        admin.execute_command("CLIENT", "PAUSE", "4000", "ALL")
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            ready = pool.submit(httpx.get, url + "/readyz", timeout=30)
            time.sleep(0.2)  # the probe is waiting on the store
            assert httpx.get(url + "/healthz", timeout=10).text == "ok"
            # Answered long before the probe's 3 s are up (a probe on the loop would hold it that long).
            assert time.monotonic() - started < 2
            answer = ready.result()
    assert answer.status_code == 503 and answer.json() == {"database": True, "store": False}


@pytest.mark.parametrize("backend", ["postgres+redis"])
def test_a_database_pool_of_no_connections_stops_the_start(settings_for):
    from idp.settings import SettingsError

    with pytest.raises(SettingsError, match="IDP_DATABASE_POOL must be at least 1"):
        create_app(settings_for(database_pool=0))


def test_an_in_memory_sqlite_database_stops_the_start(settings_for):
    """Each pooled connection would open a database of its own, without the tables."""
    from idp.settings import SettingsError

    for url in ("sqlite:///:memory:", "sqlite://"):
        with pytest.raises(SettingsError, match="must name a SQLite file"):
            create_app(settings_for(database_url=url))


@pytest.mark.parametrize("backend", ["postgres+redis"])
def test_a_postgresql_url_without_psycopg_stops_the_start(settings_for):
    from idp.settings import SettingsError

    good = settings_for()
    other = good.database_url.replace("postgresql+psycopg://", "postgresql+psycopg2://")
    with pytest.raises(SettingsError, match="must be postgresql\\+psycopg://"):
        create_app(settings_for(database_url=other))


@pytest.mark.parametrize("backend", ["postgres+redis"])
def test_url_options_with_spaces_reach_the_event_loops_connections_too(settings_for):
    """The login steps' queries use connections of the loop's own, made from the same URL; every
    ``options`` the URL gives applies, beside IDP_DATABASE_STATEMENT_TIMEOUT's."""
    from sqlalchemy import text

    base = settings_for().database_url
    url = base + ("&" if "?" in base else "?") + "options=-c%20search_path%3Dnowhere%2Cpublic&options=-c%20work_mem%3D5MB"
    db = create_app(settings_for(database_url=url, database_statement_timeout=7)).state.svc.db
    shown = ["search_path", "work_mem", "statement_timeout"]

    async def main():
        try:
            return [await db.call(db.scalar, f"SHOW {name}") for name in shown]
        finally:
            await db.aclose()

    assert asyncio.run(main()) == ["nowhere,public", "5MB", "7s"]
    with db.engine.connect() as conn:
        assert [conn.execute(text(f"SHOW {name}")).scalar() for name in shown] == ["nowhere,public", "5MB", "7s"]


@pytest.mark.parametrize("backend", ["postgres+redis"])
def test_a_vanished_migrator_holds_the_migration_lock_a_minute_not_two_hours(settings_for):
    """The migration's advisory lock is its connection's until the server sees that connection
    gone: with TCP's defaults (2 idle hours before the first probe) a migrating host that
    vanished kept every other process's start waiting that long, and one waiting on the lock
    would not have noticed a vanished server either. Both ends now probe after 30 s; what the
    URL sets wins."""
    from idp.storage.db import Database

    server = ["tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count", "tcp_user_timeout"]
    client = ["keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout"]

    def probes(url):
        with Database(url).engine.connect() as conn:  # the kind of connection migrate() locks on
            sides = [conn.execute(text(f"SHOW {name}")).scalar() for name in server]
            given = conn.connection.dbapi_connection.info.get_parameters()
            return sides, [given.get(name) for name in client]

    base = settings_for().database_url
    assert probes(base) == (["30", "10", "3", "60000"], ["1", "30", "10", "3", "60000"])
    own = base + ("&" if "?" in base else "?") + "keepalives_idle=5&options=-c%20tcp_keepalives_idle%3D7"
    assert probes(own) == (["7", "10", "3", "60000"], ["1", "5", "10", "3", "60000"])


@pytest.mark.parametrize("backend", ["postgres+redis"])
def test_event_loops_that_have_ended_leave_no_connections_open(settings_for):
    """Each test-client request (and each anyio portal) runs its own event loop: the
    connections such a loop opened to PostgreSQL and Redis are closed once it has ended,
    not kept for the app's life (which ran the test server out of connections)."""
    settings = settings_for()
    svc = create_app(settings).state.svc
    admin = redis.Redis.from_url(settings.redis_url)

    def open_connections() -> tuple[int, int]:
        with svc.db.engine.connect() as conn:  # its own pooled connection counts, the same each time
            postgres = conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")).scalar()
        return postgres, len(admin.client_list())

    def one_request(i):
        svc.store.set(f"k{i}", {"i": i}, 60)
        return svc.db.scalar("SELECT 1")

    assert asyncio.run(svc.db.call(one_request, 0)) == 1
    gc.collect()  # a Redis client of an ended loop is closed when it is collected (earlier tests' too)
    before = open_connections()
    for i in range(1, 8):
        asyncio.run(svc.db.call(one_request, i))
    gc.collect()
    after = open_connections()
    assert after[0] <= before[0] and after[1] <= before[1], (before, after)


def test_a_login_reads_no_database_on_the_event_loop(make_provider):
    """Even with no client cache (every request misses it), the login's database work runs
    in the thread pool: a slow database never holds up the process's other requests."""
    provider = make_provider(client_cache_seconds=0)
    provider.account("alice")
    client_id, _ = provider.client()
    sessions = provider.svc.db.session

    def off_the_loop():
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return sessions()
        raise AssertionError("a database session opened on the event loop")

    provider.svc.db.session = off_the_loop
    assert "code" in provider.browser().login(client_id)


@pytest.mark.parametrize("backend", ["postgres+redis"])
def test_driver_statements_must_carry_every_value(settings_for):
    """Database.rows and write send compiled SQL to psycopg, which applies no value fixed in
    the statement: such a statement is refused, not sent with a hole in it."""
    from sqlalchemy import bindparam, select

    from idp.storage.models import Account

    db = create_app(settings_for()).state.svc.db
    assert db.rows(select(Account.id).where(Account.username == bindparam("name")), name="nobody") == []
    with pytest.raises(ValueError, match="values missing"):
        db.rows(select(Account.id).where(Account.username == "nobody"))


def test_usernames_are_one_whatever_their_case_and_found_by_index(settings_for, backend):
    """Logins find an account by ``lower(username)``, a forgotten password by ``lower(email)``:
    through an index, not by reading every account; and never two accounts for one name."""
    import sqlalchemy.exc
    from sqlalchemy import insert

    from idp.accounts import _BY_USERNAME
    from idp.storage.models import Account

    db = create_app(settings_for()).state.svc.db
    with db.engine.begin() as conn:
        conn.execute(insert(Account), [{"id": f"id-{i}", "username": f"user{i}", "email": f"user{i}@example.tw"}
                                       for i in range(2000)])
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        with db.engine.begin() as conn:
            conn.execute(insert(Account).values(id="id-x", username="USER7"))
    if backend == "postgres+redis":
        with db.engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE accounts")
            plan = "\n".join(row[0] for row in conn.exec_driver_sql(
                "EXPLAIN " + db._sql(_BY_USERNAME, {"key": "user7"}), {"key": "user7"}))
            by_email = "\n".join(row[0] for row in conn.exec_driver_sql(
                "EXPLAIN SELECT id FROM accounts WHERE lower(email) = 'user7@example.tw' AND email_verified"))
        assert "ix_accounts_username_lower" in plan, plan
        assert "ix_accounts_email_lower" in by_email, by_email


def _end_connections(db) -> None:
    """End every connection to ``db``'s database but this one, as a restart or a failover does,
    and wait until they have ended."""
    import psycopg

    with psycopg.connect(db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False),
                         autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")


@pytest.mark.parametrize("backend", ["postgres+redis"])
def test_a_database_restart_fails_no_query_on_the_pools_idle_connections(settings_for):
    """The connections the server ended while they sat in the pool are replaced as they are
    checked out: the first requests after a restart are served, not answered with an error page."""
    from sqlalchemy import bindparam, select, text

    from idp.storage.models import Account

    db = create_app(settings_for()).state.svc.db
    query = select(Account.id).where(Account.username == bindparam("name"))
    held = [db.engine.raw_connection() for _ in range(3)]  # three connections idle in the pool
    for pooled in held:
        pooled.close()
    _end_connections(db)
    assert db.rows(query, name="nobody") == []  # the driver's own reads
    with db.session() as session:  # and the ORM's units of work
        assert session.execute(text("SELECT 1")).scalar() == 1


@pytest.mark.parametrize("backend", ["postgres+redis"])
def test_the_event_loops_own_connections_too_fail_no_query_after_a_restart(settings_for):
    """The login steps' queries are awaited on the event loop (``Database.call``), on
    connections of its own: those the server ended while idle are dropped, and the query
    goes on a new one."""
    from sqlalchemy import bindparam, select

    from idp.storage.models import Account

    db = create_app(settings_for()).state.svc.db
    query = select(Account.id).where(Account.username == bindparam("name"))

    async def main():
        try:
            # three at once: three connections of the loop's, idle afterwards
            await asyncio.gather(*(db.call(db.rows, query, name="nobody") for _ in range(3)))
            opened = len(db._loops.get().idle)
            await asyncio.to_thread(_end_connections, db)
            return opened, await db.call(db.rows, query, name="nobody"), len(db._loops.get().idle)
        finally:
            await db.aclose()

    assert asyncio.run(main()) == (3, [], 1)


@pytest.mark.parametrize("backend", ["postgres+redis"])
def test_a_statement_stuck_on_a_lock_fails_its_request_within_the_timeout(make_provider, caplog):
    """IDP_DATABASE_STATEMENT_TIMEOUT: PostgreSQL cancels a statement that waits too long (here
    the audit row of a wrong password, its table locked by another connection), so the login
    step ends with the error page instead of holding the request and a connection for ever."""
    from starlette.testclient import TestClient

    provider = make_provider(database_statement_timeout=1)
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    browser.http = TestClient(provider.app, base_url=provider.issuer, raise_server_exceptions=False)
    page = browser.authorize(client_id)
    with create_engine(provider.svc.settings.database_url).connect() as locker:
        locker.execute(text("LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE"))
        started = time.monotonic()
        refused = browser.password(page, password="wrong-password")
        waited = time.monotonic() - started
        locker.rollback()
    assert refused.status_code == 500 and "系統錯誤" in refused.text
    assert waited < 10
    # The error page carries the request's id and the headers every response has; so does the
    # traceback's log line, which support finds by that id.
    rid = refused.headers["x-request-id"]
    assert refused.headers["x-frame-options"] == "DENY"
    assert [r.request_id for r in caplog.records if r.exc_info] == [rid]
    assert "再錯" in browser.password(browser.authorize(client_id), password="wrong-password").text  # the table free again



@pytest.mark.parametrize("backend", ["postgres+redis"])
def test_a_failed_statement_is_logged_without_its_values(make_provider, caplog):
    """The error's log line names the statement, never its values: here a new password's hash
    (the accounts table locked past the statement timeout, as by a long migration)."""
    from starlette.testclient import TestClient

    provider = make_provider(database_statement_timeout=1)
    provider.account("alice")
    client_id, _ = provider.client()
    provider.clock.advance(91 * 86400)  # the password expired: the change form
    browser = provider.browser()
    browser.http = TestClient(provider.app, base_url=provider.issuer, raise_server_exceptions=False)
    page = browser.password(browser.authorize(client_id))
    with create_engine(provider.svc.settings.database_url).connect() as locker:
        locker.execute(text("LOCK TABLE accounts IN EXCLUSIVE MODE"))  # reads go on, writes wait
        refused = browser.submit(page, "/login/password-change", new_password="New-Password-2!",
                                 new_password_again="New-Password-2!")
        locker.rollback()
    assert refused.status_code == 500 and "UPDATE accounts" in caplog.text
    assert "$argon2" not in caplog.text

def test_audit_events_past_the_retention_are_gone_once_the_provider_has_started(make_provider):
    provider = make_provider(audit_retention_days=180, password_max_age_days=0)
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    callback(browser.password(browser.password(browser.authorize(client_id), password="wrong-password")))
    provider.clock.advance(181 * 86400)
    browser = provider.browser()
    callback(browser.password(browser.authorize(client_id)))
    before = browser.go("/account/activity").text
    assert before.count("登入成功") == 2 and "登入失敗" in before
    with live.reserve() as (sock, url), live.serve(provider.app, sock, url):  # the app's lifespan runs
        deadline = time.monotonic() + 30
        while "登入失敗" in browser.go("/account/activity").text and time.monotonic() < deadline:
            time.sleep(0.05)
    after = browser.go("/account/activity").text
    assert after.count("登入成功") == 1 and "登入失敗" not in after  # the 181-day-old two are gone


def test_audit_pruning_goes_batch_by_batch_to_the_end(make_provider):
    provider = make_provider()
    for _ in range(5):
        provider.svc.audit.record("login.failure", username="alice")
    provider.clock.advance(11 * 86400)
    provider.svc.audit.record("login.failure", username="bob")
    assert provider.svc.audit.prune(10, batch=2) == 5  # three transactions: 2, 2 and the last 1
    assert provider.svc.audit.prune(10, batch=2) == 0
    with provider.svc.db.session() as session:
        assert session.execute(text("SELECT username FROM audit_events")).scalars().all() == ["bob"]


@pytest.mark.parametrize("backend", ["postgres+redis"])
def test_a_lost_claim_connection_the_database_still_holds_is_ended_and_claimed_again(settings_for):
    """A break in the network loses the sole server's claim connection (``idp serve`` without
    Redis), but the database may hold its lock for a long while yet: the server ends that
    connection of its own and claims again, rather than stop as if another server had the
    database. Another server's claim is left alone."""
    import psycopg

    db = create_app(settings_for()).state.svc.db
    url = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    assert db.claim_sole_server()
    lost, db._sole_server = db._sole_server, None
    lost.pgconn.finish()  # gone on this side; the lock goes with it, as on a restart
    ghost = psycopg.connect(url, autocommit=True, application_name=db._claimant)  # as the database still has it
    assert ghost.execute("SELECT pg_try_advisory_lock(%s)", (0x1D9_0002,)).fetchone()[0]
    db._sole_server = lost
    assert db.keep_sole_server() and ghost.closed is False  # this side does not know yet
    with pytest.raises(psycopg.OperationalError):
        ghost.execute("SELECT 1")  # ended by the server's claim
    db._sole_server.close()
    other = psycopg.connect(url, autocommit=True, application_name="idp sole server another")
    assert other.execute("SELECT pg_try_advisory_lock(%s)", (0x1D9_0002,)).fetchone()[0]
    assert not db.keep_sole_server()
    other.close()
