"""Start and stop real PostgreSQL and Redis servers on free loopback ports.

Plain functions, no pytest here: ``tests/conftest.py`` wraps them in
fixtures, and a script can use them directly::

    pg = start_postgres(tmpdir)     # pg.url, pg.fresh_database("x"), pg.stop()
    rd = start_redis(tmpdir)        # rd.url, rd.flush(), rd.stop()

Every handle is also stopped at interpreter exit, so a crashed script or test
session does not leave servers behind (``stop()`` is idempotent).

PostgreSQL refuses to run as root, so when we are root its binaries run as
the ``postgres`` user via ``runuser`` in a private directory under the system
temp dir (pytest's own tmp dirs are mode 0700 and not reachable by
``postgres``). Its log is copied into ``tmpdir`` when it stops.
"""

from __future__ import annotations

import atexit
import datetime as dt
import glob
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

HOST = "127.0.0.1"
START_ATTEMPTS = 3  # a new free port each time, in case another process took ours
LOG_TAIL_LINES = 40


class ServerError(RuntimeError):
    """A server could not be started or stopped."""


class MissingBinary(ServerError):
    """The server's program is not installed on this machine."""


# --------------------------------------------------------------------------- helpers


_LOWEST_PORT = 10_000
_handed_out: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and stays free for the server about to bind it.

    A port the kernel picks (a bind to port 0) comes from the range it also gives every
    outgoing connection: between this check and the server's bind another test's client
    could take it (seen as a server that would not start, or a test that reached the wrong
    one). So the port is drawn from below that range, which only a bind by number takes,
    from a slice of its own for each pytest-xdist worker, and never twice in one process."""
    top = _ephemeral_start()
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0) % workers
    size = (top - _LOWEST_PORT) // workers
    if size < 100:  # an unusual ephemeral range: take what the kernel gives
        with socket.socket() as s:
            s.bind((HOST, 0))
            return s.getsockname()[1]
    start = _LOWEST_PORT + worker * size
    for _ in range(500):
        port = random.randrange(start, start + size)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise ServerError(f"no free port in {start}-{start + size - 1}")


def _tail(path: Path | str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _version_key(path: str) -> tuple:
    # /usr/lib/postgresql/15/bin/initdb -> (15,); tolerate odd names like "9.6"
    ver = Path(path).parent.parent.name
    return tuple(int(p) if p.isdigit() else -1 for p in ver.split("."))


def find_pg_bindir() -> Path:
    """Directory holding initdb and pg_ctl: $IDP_TEST_PG_BINDIR, else the highest
    /usr/lib/postgresql/*/bin, else wherever initdb is on PATH."""
    candidates = []
    if os.environ.get("IDP_TEST_PG_BINDIR"):
        candidates.append(Path(os.environ["IDP_TEST_PG_BINDIR"]))
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key, reverse=True)
    candidates += [Path(p).parent for p in found]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for bindir in candidates:
        if os.access(bindir / "initdb", os.X_OK) and os.access(bindir / "pg_ctl", os.X_OK):
            return bindir
    raise MissingBinary(
        "PostgreSQL server binaries (initdb, pg_ctl) not found under "
        "/usr/lib/postgresql/*/bin or on PATH"
    )


def find_redis_server() -> str:
    path = os.environ.get("IDP_TEST_REDIS_SERVER")
    if path and not os.access(path, os.X_OK):
        raise MissingBinary(f"IDP_TEST_REDIS_SERVER={path} is not an executable")
    path = path or shutil.which("redis-server")
    if not path:
        for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server"):
            if os.access(p, os.X_OK):
                path = p
                break
    if not path:
        raise MissingBinary("redis-server not found on PATH")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie nobody reaped yet counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.02)
    return not _pid_alive(pid)


def _kill(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if _wait_gone(pid, timeout):
            return


# --------------------------------------------------------------------------- PostgreSQL


class PostgresServer:
    """A running PostgreSQL cluster. ``url`` points at the database ``idp_test``."""

    def __init__(self, bindir: Path, base: Path, port: int, run_as: list[str], log_dest: Path | None):
        self.bindir = bindir
        self.base = base  # private dir, removed on stop
        self.datadir = base / "data"
        self.logfile = base / "postgres.log"
        self.host = HOST
        self.port = port
        self.user = "postgres"
        self.dbname = "idp_test"
        self._run_as = run_as
        self._log_dest = log_dest
        self._stopped = False

    # URLs -------------------------------------------------------------------
    def url_for(self, dbname: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver) for a database on this server."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{dbname}"

    @property
    def url(self) -> str:
        return self.url_for(self.dbname)

    def conninfo(self, dbname: str | None = None) -> str:
        """libpq connection string, for psycopg.connect()."""
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname or self.dbname}"

    # databases --------------------------------------------------------------
    def _admin(self):
        return psycopg.connect(self.conninfo("postgres"), autocommit=True, connect_timeout=10)

    def create_database(self, name: str) -> str:
        with self._admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'").format(sql.Identifier(name)))
        return self.url_for(name)

    def fresh_database(self, name: str | None = None) -> str:
        """Create a new, empty database (dropping any old one of that name,
        disconnecting its users) and return its SQLAlchemy URL.
        Without a name, a unique one is made up."""
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name):
            raise ValueError(f"unsuitable database name: {name!r}")
        with self._admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'").format(sql.Identifier(name)))
        return self.url_for(name)

    # lifecycle --------------------------------------------------------------
    def _pg(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self._run_as, *args],
            cwd=self.base,  # a dir `postgres` can enter, to avoid chdir warnings
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def log_heading(self) -> str:
        where = f"full log kept at {self._log_dest}" if self._log_dest else "log removed on stop"
        return f"--- tail of the PostgreSQL log ({where}) ---"

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.datadir.exists():
                pid = self._postmaster_pid()
                try:
                    res = self._pg(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "-t", "30", "stop")
                    ok = res.returncode == 0
                except subprocess.TimeoutExpired:
                    ok = False
                if not ok and pid and _pid_alive(pid):
                    _kill(pid)
            if self._log_dest is not None and self.logfile.exists():
                try:
                    shutil.copyfile(self.logfile, self._log_dest)
                except OSError:
                    pass
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self) -> str:
        return f"<PostgresServer {self.url}>"


def start_postgres(tmpdir: os.PathLike | str | None = None) -> PostgresServer:
    """initdb a new cluster, start it on a free port on 127.0.0.1 (socket in the
    cluster's own dir), create database ``idp_test`` and return its handle.

    ``tmpdir`` (optional) receives ``postgres.log`` when the server stops.
    Raises MissingBinary if PostgreSQL is not installed, ServerError (with the
    log tail) if it does not start.
    """
    bindir = find_pg_bindir()
    as_root = os.geteuid() == 0
    run_as: list[str] = []
    if as_root:
        if shutil.which("runuser") is None:
            raise MissingBinary("runuser not found (util-linux); needed to run PostgreSQL as user postgres")
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise MissingBinary("no `postgres` user on this machine (installing the postgresql package creates it)") from None
        run_as = ["runuser", "-u", "postgres", "--"]

    log_dest = Path(tmpdir) / "postgres.log" if tmpdir is not None else None
    # Short path under /tmp: the Unix socket path must stay under ~107 bytes.
    base = Path(tempfile.mkdtemp(prefix="idp-pg-"))
    if as_root:
        os.chown(base, pw.pw_uid, pw.pw_gid)
    os.chmod(base, 0o700)

    server = PostgresServer(bindir, base, 0, run_as, log_dest)
    try:
        res = server._pg(
            str(bindir / "initdb"), "-D", str(server.datadir), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--locale=C.UTF-8", "-N",
        )
        if res.returncode != 0:
            raise ServerError(f"initdb failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}")

        for attempt in range(1, START_ATTEMPTS + 1):
            server.port = free_port()
            opts = (
                f"-p {server.port} -k {base} -c listen_addresses={HOST} "
                # a throwaway cluster: durability off for speed
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            try:
                res = server._pg(
                    str(bindir / "pg_ctl"), "-D", str(server.datadir), "-l", str(server.logfile),
                    "-w", "-t", "30", "-o", opts, "start",
                )
                if res.returncode == 0:
                    break
                why = (res.stdout + res.stderr).strip()
            except subprocess.TimeoutExpired:
                why = "pg_ctl start timed out"
            pid = server._postmaster_pid()
            if pid and _pid_alive(pid):
                _kill(pid)
            log = _tail(server.logfile)
            port_clash = "already in use" in log or "could not bind" in log
            if not port_clash or attempt == START_ATTEMPTS:
                raise ServerError(
                    f"PostgreSQL did not start on {HOST}:{server.port}: {why}\n"
                    f"{server.log_heading()}\n{log}"
                )
            server.logfile.write_text("")  # so the next attempt's tail is its own

        try:
            server.create_database(server.dbname)
        except psycopg.Error as exc:
            raise ServerError(
                f"PostgreSQL started on port {server.port} but creating {server.dbname} failed: {exc}\n"
                f"{server.log_heading()}\n{_tail(server.logfile)}"
            ) from exc
    except BaseException:
        server.stop()
        raise
    atexit.register(server.stop)
    return server


# --------------------------------------------------------------------------- Redis


def server_certificate(directory: Path, *names: str, cert_file: str = "server.pem") -> tuple[Path, Path]:
    """A self-signed certificate for a test server on ``names`` (default localhost; its
    clients trust exactly it), written as ``cert_file`` and ``server.key`` in ``directory``."""
    names = names or ("localhost",)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name) for name in names]), critical=False)
            .sign(key, hashes.SHA256()))
    pem, private = directory / cert_file, directory / "server.key"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    private.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return pem, private


def _redis_command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """Send one command over RESP and return the raw first reply (small replies only)."""
    payload = f"*{len(args)}\r\n".encode()
    for a in args:
        b = a.encode()
        payload += b"$%d\r\n%s\r\n" % (len(b), b)
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(payload)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.startswith(b"$"):  # bulk string: wait for the whole body
                head, _, rest = data.partition(b"\r\n")
                n = int(head[1:])
                if n < 0 or len(rest) >= n + 2:
                    break
            elif data.endswith(b"\r\n"):
                break
    return data


class RedisServer:
    """A running redis-server. ``url`` is database 0."""

    def __init__(self, binary: str, workdir: Path, port: int, own_workdir: bool):
        self.binary = binary
        self.workdir = workdir
        self.pidfile = workdir / f"redis-{port}.pid"
        self.logfile = workdir / f"redis-{port}.log"
        self.host = HOST
        self.port = port
        self.pid: int | None = None
        self._own_workdir = own_workdir
        self._stopped = False

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self, *args: str) -> bytes:
        return _redis_command(self.port, *args)

    def ping(self) -> bool:
        try:
            return self.command("PING").startswith(b"+PONG")
        except OSError:
            return False

    def flush(self) -> None:
        """FLUSHALL: empty every database."""
        reply = self.command("FLUSHALL")
        if not reply.startswith(b"+OK"):
            raise ServerError(f"FLUSHALL on {self.url} answered {reply!r}")

    def _read_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        pid = self.pid or self._read_pid()
        if pid and _pid_alive(pid):
            _kill(pid)  # SIGTERM; with --save '' nothing is written
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisServer {self.url}>"


def start_redis(tmpdir: os.PathLike | str | None = None, timeout: float = 10.0) -> RedisServer:
    """Start redis-server (no persistence) on a free port on 127.0.0.1 and wait
    until it answers PING. Its pidfile and log go in ``tmpdir`` (a private temp
    dir, removed on stop, if None)."""
    binary = find_redis_server()
    own = tmpdir is None
    workdir = Path(tempfile.mkdtemp(prefix="idp-redis-")) if own else Path(tmpdir)
    workdir.mkdir(parents=True, exist_ok=True)

    last_error = ""
    for _ in range(START_ATTEMPTS):
        server = RedisServer(binary, workdir, free_port(), own_workdir=False)
        cmd = [
            binary, "--port", str(server.port), "--bind", HOST,
            "--save", "", "--appendonly", "no",
            "--daemonize", "yes", "--pidfile", str(server.pidfile),
            "--logfile", str(server.logfile), "--dir", str(workdir),
        ]
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            last_error = f"redis-server exited {res.returncode}: {res.stdout}{res.stderr}"
        else:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                pid = server._read_pid()
                if pid and server.ping():
                    # make sure the server answering is ours, not someone else's on a reused port
                    info = server.command("INFO", "server").decode(errors="replace")
                    m = re.search(r"process_id:(\d+)", info)
                    if m and int(m.group(1)) == pid:
                        server.pid = pid
                        server._own_workdir = own
                        atexit.register(server.stop)
                        return server
                    last_error = f"port {server.port} is answered by another Redis (pid {m and m.group(1)})"
                    break
                if pid and not _pid_alive(pid):
                    last_error = "redis-server exited"
                    break
                if not pid and "already in use" in _tail(server.logfile, 5):
                    last_error = "port already in use"  # the daemon exits before writing its pidfile
                    break
                time.sleep(0.01)
            else:
                last_error = f"no PING answer within {timeout}s"
        log = _tail(server.logfile)
        server.stop()
        if "Address already in use" not in log and "another Redis" not in last_error:
            break
    where = "removed" if own else f"kept at {server.logfile}"
    msg = f"Redis did not start on {HOST}:{server.port}: {last_error}\n--- tail of its log ({where}) ---\n{log}"
    if own:
        shutil.rmtree(workdir, ignore_errors=True)
    raise ServerError(msg)
