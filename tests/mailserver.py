"""A real SMTP server for tests (aiosmtpd) on a free loopback port.

It keeps every message it accepts, parsed as ``email.message.EmailMessage``,
and refuses every recipient at ``refused.test``, as a server refuses an
unknown mailbox.
``next_message`` waits for the next one to be delivered: the provider may
send after its response, so this polls with a short timeout; it waits for
delivery and is never a timed assertion."""

from __future__ import annotations

import email
import email.policy
import threading
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.servers import free_port

REFUSED_DOMAIN = "refused.test"


class MailServer:
    def __init__(self, username: str | None = None, password: str | None = None):
        self.host = "127.0.0.1"
        self.port = free_port()
        self.messages: list[email.message.EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []  # (MAIL FROM, RCPT TO) of each message
        self._read = 0
        self._arrived = threading.Condition()
        self._credentials = (username, password) if username else None
        kwargs = {}
        if self._credentials:
            kwargs = {"authenticator": self._authenticate, "auth_required": True, "auth_require_tls": False}
        self._controller = Controller(self, hostname=self.host, port=self.port, **kwargs)

    def start(self) -> "MailServer":
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def settings(self) -> dict:
        """Provider settings that send through this server (it has no TLS)."""
        return {"smtp_host": self.host, "smtp_port": self.port, "smtp_starttls": False, "mail_from": "no-reply@idp.test"}

    # -- aiosmtpd handler -----------------------------------------------------------------
    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        ok = (isinstance(auth_data, LoginPassword)
              and (auth_data.login.decode(), auth_data.password.decode()) == self._credentials)
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535 itself

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.endswith("@" + REFUSED_DOMAIN):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.original_content or envelope.content, policy=email.policy.default)
        with self._arrived:
            self.messages.append(message)
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
            self._arrived.notify_all()
        return "250 Message accepted for delivery"

    # -- for the tests --------------------------------------------------------------------
    def next_message(self, timeout: float = 10.0) -> email.message.EmailMessage:
        """The next message not yet read, waiting for its delivery if need be."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.messages) <= self._read:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no mail arrived within {timeout} s ({len(self.messages)} read so far)")
                self._arrived.wait(min(left, 0.05))
            message = self.messages[self._read]
            self._read += 1
            return message

    def unread(self) -> int:
        with self._arrived:
            return len(self.messages) - self._read
