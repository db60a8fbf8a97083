"""Durable records: accounts, their bindings (factors), clients, consents and
the audit log. Schema changes go through Alembic (``idp/migrations``)."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import JSON, Boolean, Date, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy import false, func, text
from sqlalchemy.types import TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def _uuid() -> str:
    return str(uuid.uuid4())


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator):
    """A moment, read back with its zone: SQLite keeps none, and a time without one is taken for
    the machine's local time (``.timestamp()``, comparisons with aware times fail)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=dt.timezone.utc) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: UTCDateTime(), dict: JSON, list: JSON}


class Account(Base):
    __tablename__ = "accounts"
    # The disabled accounts alone: their store marks are rewritten every minute.
    __table_args__ = (Index("ix_accounts_disabled", "id", postgresql_where=text("disabled"), sqlite_where=text("disabled")),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_uuid)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    email: Mapped[str | None] = mapped_column(String(320))
    email_verified: Mapped[bool] = mapped_column(Boolean, default=False)
    phone: Mapped[str | None] = mapped_column(String(32))
    # "personal" or "aa" (an organisation's administrator account, seed 002).
    kind: Mapped[str] = mapped_column(String(16), default="personal")
    org: Mapped[str | None] = mapped_column(String(200))
    national_id: Mapped[str | None] = mapped_column(String(10), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    password_changed_at: Mapped[dt.datetime | None] = mapped_column()
    password_login_disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    # The provider's own administrators (the admin area); AA accounts administer
    # their organisation's personal accounts by their kind, not by this flag.
    admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # One-day password (SPEC A7): SHA-256 of the emailed check code, and the day it is good for.
    one_day_code_hash: Mapped[str | None] = mapped_column(String(64))
    one_day_valid_on: Mapped[dt.date | None] = mapped_column(Date)
    # The last OTP QR version shown to this account; survives a reset of its bindings,
    # so a new QR never repeats an old version's label in the user's app.
    otp_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    bindings: Mapped[list["Binding"]] = relationship(back_populates="account", cascade="all, delete-orphan")


# Logins find an account by its username in any case (``accounts.with_bindings``): one
# account per username, whatever its case; a forgotten password, by its email (migration 0005).
Index("ix_accounts_username_lower", func.lower(Account.username), unique=True)
Index("ix_accounts_email_lower", func.lower(Account.email))


class Binding(Base):
    """A factor bound to an account: an OTP secret, a certificate, a phone, ..."""

    __tablename__ = "bindings"
    __table_args__ = (UniqueConstraint("factor", "external_id", name="uq_binding_external"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_uuid)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    factor: Mapped[str] = mapped_column(String(32))
    # What identifies the bound thing outside (certificate issuer+serial, upstream iss+sub): unique per factor.
    external_id: Mapped[str | None] = mapped_column(String(512))
    label: Mapped[str] = mapped_column(String(200), default="")
    data: Mapped[dict] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    account: Mapped[Account] = relationship(back_populates="bindings")


class Client(Base):
    """A relying party. ``metadata_`` holds the RFC 7591 metadata as registered."""

    __tablename__ = "clients"

    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # SHA-256 of a random 256-bit secret: a slow hash would cap the token endpoint.
    secret_hash: Mapped[str | None] = mapped_column(String(64))
    registration_token_hash: Mapped[str | None] = mapped_column(String(64))
    metadata_: Mapped[dict] = mapped_column("metadata", default=dict)
    # First-party portals skip the consent screen.
    first_party: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Consent(Base):
    __tablename__ = "consents"

    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    client_id: Mapped[str] = mapped_column(ForeignKey("clients.client_id", ondelete="CASCADE"), primary_key=True)
    scope: Mapped[str] = mapped_column(Text, default="")
    granted_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_account_time", "account_id", "time"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    time: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(64))
    account_id: Mapped[str | None] = mapped_column(String(36))
    username: Mapped[str | None] = mapped_column(String(64))
    client_id: Mapped[str | None] = mapped_column(String(64))
    ip: Mapped[str | None] = mapped_column(String(64))
    method: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(300))
    detail: Mapped[dict] = mapped_column(default=dict)


class InitialAccessToken(Base):
    """RFC 7591 initial access token (``idp clients token``): one registration each."""

    __tablename__ = "initial_access_tokens"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column()
