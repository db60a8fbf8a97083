"""Outgoing mail: password-reset links, email confirmation, codes.

A mail is a Jinja2 plain-text template per language,
``idp/web/templates/mail/<template>.<locale>.txt``, whose first line is
``Subject: ...``. Every mail is bilingual, as Taiwan's public-sector mails
are: the user's page language first, then the same message in the other
language below a separator (so the default reads Chinese first, English
below).

Transport: SMTP when ``IDP_SMTP_HOST`` is set (STARTTLS unless
``IDP_SMTP_STARTTLS=false``, TLS from the first byte on port 465, login when
``IDP_SMTP_USERNAME`` is set); otherwise each mail is written as an ``.eml``
file to ``IDP_OUTBOX_DIR`` for the single-machine default. ``send`` blocks
(it talks to a server): call it from a thread, or ``await send_async`` from
a request handler. Logs say what went where, never a link, a code or a
password.
"""

from __future__ import annotations

import logging
import os
import secrets
import smtplib
import ssl
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.concurrency import run_in_threadpool

from idp.web.i18n import LOCALES, translate

log = logging.getLogger("idp.mail")

TEMPLATES = Path(__file__).parent / "web" / "templates" / "mail"
SEPARATOR = "-" * 60

_env = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=False,  # plain text, never HTML
    undefined=StrictUndefined,  # a missing value is a bug, not an empty line in a mail
    trim_blocks=True,
    lstrip_blocks=True,
)


class MailError(Exception):
    """The mail could not be delivered (the message says why, without its content)."""


def other_locale(locale: str) -> str:
    return "en" if locale == "zh-TW" else "zh-TW"


def masked(address: str) -> str:
    """``a***@example.tw``: enough to tell mails apart in a log, not a mailing list."""
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}" if domain else "***"


def _reason(error: Exception) -> str:
    """What went wrong, for the log. A refused recipient's text quotes the full address:
    only its reply codes are kept."""
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        return "replied " + ", ".join(str(code) for code, _ in error.recipients.values())
    return str(error)[:200]


class Mailer:
    def __init__(self, settings, clock=None):
        self.settings = settings
        self.clock = clock or time.time

    # -- composing ------------------------------------------------------------------------
    def render(self, template: str, locale: str, **context) -> tuple[str, str]:
        """(subject, body) of one language's version of a mail."""
        text = _env.get_template(f"{template}.{locale}.txt").render(
            app_name=translate(locale, "app.name"), issuer=self.settings.issuer, locale=locale, **context,
        )
        first, _, body = text.partition("\n")
        if not first.startswith("Subject:"):
            raise ValueError(f"mail template {template}.{locale}.txt must start with a 'Subject:' line")
        return first[len("Subject:"):].strip(), body.strip("\n").rstrip() + "\n"

    def compose(self, to: str, template: str, locale: str, **context) -> EmailMessage:
        locale = locale if locale in LOCALES else self.settings.default_locale
        other = other_locale(locale)
        subject, body = self.render(template, locale, **context)
        other_subject, other_body = self.render(template, other, **context)
        text = "\n".join([
            translate(other, "mail.other_language_below"), "",
            body.rstrip(), "", SEPARATOR, "",
            other_body.rstrip(), "",
        ])
        msg = EmailMessage()
        msg["From"] = self.settings.mail_from
        msg["To"] = to  # the header policy refuses CR/LF, so no header injection
        msg["Subject"] = f"{subject} / {other_subject}" if other_subject != subject else subject
        msg["Date"] = formatdate(self.clock(), usegmt=True)
        msg["Message-ID"] = make_msgid(domain=self.settings.mail_from.rpartition("@")[2] or "localhost")
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(text, charset="utf-8")
        msg["Content-Language"] = f"{locale}, {other}"  # after set_content, which drops Content-* headers
        return msg

    # -- sending --------------------------------------------------------------------------
    def send(self, to: str, template: str, locale: str, **context) -> None:
        """Compose and deliver one mail; blocks. Raises ``MailError`` when SMTP fails."""
        msg = self.compose(to, template, locale, **context)
        if self.settings.smtp_host:
            self._smtp(msg, template, to)
        else:
            self._outbox(msg, template, to)

    async def send_async(self, to: str, template: str, locale: str, **context) -> None:
        """``send`` off the event loop, for request handlers."""
        await run_in_threadpool(self.send, to, template, locale, **context)

    def _smtp(self, msg: EmailMessage, template: str, to: str) -> None:
        s = self.settings
        where = f"{s.smtp_host}:{s.smtp_port}"
        context = ssl.create_default_context()
        try:
            if s.smtp_port == 465:
                smtp = smtplib.SMTP_SSL(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout_seconds, context=context)
            else:
                smtp = smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout_seconds)
            with smtp:
                if s.smtp_starttls and s.smtp_port != 465:
                    smtp.starttls(context=context)  # refuses a server without STARTTLS: no mail in clear
                if s.smtp_username:
                    smtp.login(s.smtp_username, s.smtp_password)
                smtp.send_message(msg)
        except (smtplib.SMTPException, OSError) as e:
            reason = f"{type(e).__name__}: {_reason(e)}"
            log.warning("mail %s to %s not sent via %s (%s)", template, masked(to), where, reason)
            raise MailError(f"the mail server {where} did not take the mail ({type(e).__name__})") from e
        log.info("mail %s to %s sent via %s", template, masked(to), where)

    def _outbox(self, msg: EmailMessage, template: str, to: str) -> None:
        outbox = Path(self.settings.outbox_dir)
        outbox.mkdir(parents=True, exist_ok=True, mode=0o700)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.clock()))
        path = outbox / f"{stamp}-{template}-{secrets.token_hex(4)}.eml"
        tmp = path.with_name("." + path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it holds links: owner only
        with os.fdopen(fd, "wb") as f:
            f.write(msg.as_bytes())
        os.replace(tmp, path)  # a reader never sees half a mail
        log.info("mail %s to %s written to %s (no SMTP host set)", template, masked(to), path)
