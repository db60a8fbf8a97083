"""A Redis and a PostgreSQL that a test can stop and start again on the same port, for the
outage tests (``tests/test_outages.py``)."""

from __future__ import annotations

import atexit
import contextlib
import subprocess
import tempfile
import time
from pathlib import Path

from sqlalchemy import event

from idp.clock import FrozenClock
from idp.settings import Settings
from idp.web.app import create_app
from tests import servers
from tests.harness import Provider


class RestartableRedis:
    """A redis-server without persistence: started again, it is empty, as after a failover
    to a replica that lagged."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="outage-redis-"))
        self.port = servers.free_port()
        self.start()
        atexit.register(self.stop)  # never left running by a crashed test

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0?socket_timeout=2&socket_connect_timeout=1"

    def start(self):
        subprocess.run([servers.find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--daemonize", "yes", "--pidfile", str(self.dir / "r.pid"),
                        "--logfile", str(self.dir / "r.log"), "--dir", str(self.dir)], check=True)
        for _ in range(300):
            try:
                if servers._redis_command(self.port, "PING").startswith(b"+PONG"):
                    return
            except OSError:
                pass
            time.sleep(0.01)
        raise RuntimeError("redis did not start")

    def stop(self):
        try:
            pid = int((self.dir / "r.pid").read_text())
        except (OSError, ValueError):
            return
        servers._kill(pid)
        (self.dir / "r.pid").unlink(missing_ok=True)


def pg_stop(pg):
    """Stop ``pg`` (``servers.start_postgres``), keeping its data for ``pg_start``."""
    pg._pg(str(pg.bindir / "pg_ctl"), "-D", str(pg.datadir), "-m", "fast", "-w", "stop")


def pg_start(pg):
    """Start ``pg`` again on its port, as after a restart or a failover."""
    opts = f"-p {pg.port} -k {pg.base} -c listen_addresses=127.0.0.1 -c fsync=off"
    started = pg._pg(str(pg.bindir / "pg_ctl"), "-D", str(pg.datadir), "-l", str(pg.logfile), "-w", "-o", opts, "start")
    assert started.returncode == 0, started.stderr


def outage_provider(tmp_path, **extra):
    """A provider on its own PostgreSQL and Redis, both of which a test may stop and start
    again on the same port."""
    pg = servers.start_postgres()
    rd = RestartableRedis()
    values = dict(database_url=pg.url, redis_url=rd.url, keys_dir=str(tmp_path / "keys"), captcha="off",
                  issuer="http://idp.test", mfa=False, crl_cache_dir=str(tmp_path / "crl"))
    values.update(extra)
    clock = FrozenClock()
    provider = Provider(create_app(Settings.from_env({}, **values), clock), clock)
    provider.pg, provider.rd = pg, rd
    return provider


@contextlib.contextmanager
def database_goes_away(provider, statement: str):
    """PostgreSQL stops as the first statement that contains ``statement`` (upper case) is sent
    through SQLAlchemy, and starts again when the block ends."""
    fired = []

    def stop(conn, cursor, sql, *_):
        if not fired and statement in sql.upper():
            fired.append(True)
            pg_stop(provider.pg)

    event.listen(provider.svc.db.engine, "before_cursor_execute", stop)
    try:
        yield
    finally:
        event.remove(provider.svc.db.engine, "before_cursor_execute", stop)
        assert fired, f"no {statement} was sent"
        pg_start(provider.pg)
