"""Shared pytest fixtures.

The server fixtures are session-scoped, and with pytest-xdist (`make test`
runs `pytest -n 2`) every worker is its own session: each worker starts its
own PostgreSQL and Redis on its own free ports. That is intended — workers
never share a database or a Redis.
"""

import pytest

from tests import servers

# Fixtures that several modules share, defined beside the helpers they go with: loaded here
# as plugins, so a module uses them by name without importing them.
pytest_plugins = ["tests.pki_fixtures", "tests.test_e2e", "tests.test_journeys", "tests.test_admin",
                  "tests.test_backchannel"]


def _start(start, tmp_path_factory, name):
    try:
        return start(tmp_path_factory.mktemp(name))
    except servers.MissingBinary as exc:
        missing = str(exc)
    pytest.fail(f"{missing}. Run `make test`, which installs it (scripts/bootstrap.sh --test).", pytrace=False)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A PostgreSQL server: `.url` (database idp_test), `.fresh_database(name)` -> URL."""
    server = _start(servers.start_postgres, tmp_path_factory, "postgres")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A Redis server: `.url`, `.flush()`."""
    server = _start(servers.start_redis, tmp_path_factory, "redis")
    try:
        yield server
    finally:
        server.stop()


# -- the provider under test -------------------------------------------------------------
BACKENDS = ["sqlite+memory", "postgres+redis"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def settings_for(backend, request, tmp_path):
    """Build test settings on the chosen back ends: SQLite and the in-process store,
    or a fresh PostgreSQL database and a flushed real Redis."""
    from idp.settings import Settings

    def make(**overrides):
        if backend == "sqlite+memory":
            db, kv = f"sqlite:///{tmp_path}/idp.sqlite3", ""
        else:
            pg = request.getfixturevalue("postgres_server")
            rd = request.getfixturevalue("redis_server")
            rd.flush()
            db, kv = pg.fresh_database(), rd.url
        # Protocol tests log in with the password alone; the two-factor policy
        # (mfa, SPEC M1) is switched on by the tests of that policy.
        values = dict(database_url=db, redis_url=kv, keys_dir=str(tmp_path / "keys"), captcha="off",
                      issuer="http://idp.test", mfa=False, crl_cache_dir=str(tmp_path / "crl"))
        values.update(overrides)
        return Settings.from_env({}, **values)

    return make


@pytest.fixture
def make_provider(settings_for):
    from idp.clock import FrozenClock
    from idp.web.app import create_app

    from tests.harness import Provider

    def make(**overrides):
        clock = FrozenClock()
        return Provider(create_app(settings_for(**overrides), clock), clock)

    return make


@pytest.fixture
def provider(make_provider):
    return make_provider()


@pytest.fixture
def smtp_server():
    """A real SMTP server (aiosmtpd) on a free loopback port; ``.settings()`` points a provider at it."""
    from tests.mailserver import MailServer

    server = MailServer().start()
    try:
        yield server
    finally:
        server.stop()
