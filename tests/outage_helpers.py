"""A Redis and a PostgreSQL that a test can stop and start again on the same port, for the
outage tests (``tests/test_outages.py``)."""

from __future__ import annotations

import atexit
import subprocess
import tempfile
import time
from pathlib import Path

from tests import servers


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
