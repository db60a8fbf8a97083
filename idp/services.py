"""The provider's parts, built once from the settings and shared by every request."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from idp.accounts import Lockout, Passwords
from idp.audit import Audit
from idp.clock import Clock
from idp.flow import Transactions
from idp.mail import Mailer
from idp.metrics import Metrics
from idp.protocol.keys import KeyRing
from idp.protocol.logout import BackChannel
from idp.secretbox import SecretBox
from idp.protocol.server import Server
from idp.protocol.tokens import Tokens
from idp.sessions import Sessions
from idp.settings import Settings, SettingsError
from idp.storage.db import Database
from idp.storage.kv import open_store


class Services:
    def __init__(self, settings: Settings, clock: Clock | None = None):
        self.settings = settings
        self.clock = clock or Clock()
        self.db = Database(settings.database_url, settings.database_pool, settings.database_statement_timeout)
        self.store = open_store(settings.redis_url)
        self.keys = KeyRing(settings.keys_dir, settings.key_refresh_seconds, self.clock)
        self.tokens = Tokens(self.store, self.clock)
        self.sessions = Sessions(self.store, self.clock, settings.session_seconds, settings.code_seconds)
        self.transactions = Transactions(self.store, self.clock, settings.login_timeout_seconds)
        self.metrics = Metrics()
        self.passwords = Passwords(settings, self.metrics)
        self.lockout = Lockout(self.store, self.clock, settings.lockout_threshold, settings.lockout_seconds,
                               self.metrics)
        self.audit = Audit(self.db, self.clock, self.metrics)
        self.mailer = Mailer(settings, self.clock)
        self.server = Server(self)
        self.backchannel = BackChannel(self)
        self.sessions.listeners.append(self.backchannel.session_ended)
        self.pairwise_salt = b""
        self.box: SecretBox | None = None
        self._pki_trust = None
        self._revocation = None

    @property
    def pki_trust(self):
        """The certificate-login trust anchors (``IDP_TRUST_DIR``), read at first use."""
        if self._pki_trust is None:
            self.load_trust()
        return self._pki_trust

    def load_trust(self) -> None:
        """Read the trust anchors now: the web app does at start, so that a missing or empty
        trust directory stops it with a clear error rather than failing the first card login."""
        self._pki_trust = self.trust_of("trust_dir")

    def trust_of(self, setting: str):
        """The trust anchors of the directory the setting names; an error names the setting."""
        from idp.pki import load_trust

        try:
            return load_trust(getattr(self.settings, setting))
        except ValueError as exc:
            raise SettingsError(f"IDP_{setting.upper()}: {exc}") from None

    @property
    def revocation(self):
        """One revocation checker per process: it holds the CRL cache (``IDP_REVOCATION``)."""
        if self._revocation is None:
            from idp.pki import RevocationChecker, RevocationPolicy
            from idp.pki.revocation import httpx

            # No kept-alive connections: a pooled connection belongs to one event loop.
            http = httpx.AsyncClient(follow_redirects=False, limits=httpx.Limits(max_keepalive_connections=0))
            self._revocation = RevocationChecker(RevocationPolicy(mode=self.settings.revocation), http,
                                                 self.settings.crl_cache_dir or None)
        return self._revocation

    @property
    def mobileid(self):
        """The mobile-ID connector (SPEC A4), built at first use; None when ``IDP_MOBILEID_URL`` is empty."""
        if "_mobileid" not in self.__dict__:
            from idp.factors.mobileid import build_connector

            self._mobileid = build_connector(self)
        return self._mobileid

    def start(self) -> None:
        """Migrate the database and make sure keys and instance secrets exist
        (idempotent; safe when several processes start at once)."""
        self.db.migrate()
        self.keys.ensure()
        self.pairwise_salt = instance_secret(Path(self.settings.keys_dir) / "pairwise.secret")
        self.box = SecretBox(instance_secret(Path(self.settings.keys_dir) / "data.secret"))
        self.code_key = instance_secret(Path(self.settings.keys_dir) / "codes.secret")


def instance_secret(path: Path) -> bytes:
    """A random secret created once and shared by every process reading ``path``."""
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    value = secrets.token_bytes(32)
    # A name of its own: processes in containers sharing the directory may all be PID 1.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value.hex())
    try:
        os.link(tmp, path)  # atomic: the first process to start wins
    except FileExistsError:
        value = bytes.fromhex(path.read_text().strip())
    finally:
        tmp.unlink()
    return value
