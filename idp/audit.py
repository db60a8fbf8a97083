"""The audit log (SPEC M6, O3): every login, failure, lockout and logout, with
time, address, client and method. Never a secret: no passwords, codes or tokens."""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import delete, select

from idp.storage.models import AuditEvent

log = logging.getLogger("idp.audit")
_INSERT = AuditEvent.__table__.insert().inline()  # no RETURNING of the id nobody reads


class Audit:
    def __init__(self, db, clock, metrics):
        self.db, self.clock, self.metrics = db, clock, metrics

    def record(self, event: str, *, account_id=None, username=None, client_id=None, ip=None, method=None,
               user_agent=None, **detail):
        when = dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc)
        # Cut to the columns' lengths: what a request or an upstream sends (a browser's name, a
        # Google login's long address) must not make PostgreSQL refuse the row, and the login.
        self.db.write(_INSERT, **{
            "time": when, "event": event, "account_id": account_id, "username": _cut(username, 64),
            "client_id": _cut(client_id, 64), "ip": _cut(ip, 64), "method": _cut(method, 64),
            "user_agent": _cut(user_agent, 300), "detail": detail,
        })
        self.metrics.audited(event, method)
        log.info("%s account=%s user=%s client=%s ip=%s method=%s %s", event, account_id, username, client_id, ip, method, detail or "")

    def prune(self, retention_days: int, batch: int = 10_000) -> int:
        """Delete the events older than ``retention_days``, ``batch`` to a transaction, so no
        lock is held long; returns how many. Several processes at once only find less to do."""
        before = dt.datetime.fromtimestamp(self.clock() - retention_days * 86400, dt.timezone.utc)
        oldest = select(AuditEvent.id).where(AuditEvent.time < before).order_by(AuditEvent.id).limit(batch)
        deleted = 0
        while True:
            with self.db.session() as session:
                count = session.execute(delete(AuditEvent).where(AuditEvent.id.in_(oldest.scalar_subquery()))).rowcount
            deleted += count
            if count < batch:
                return deleted


def _cut(value: str | None, length: int) -> str | None:
    return (value or None) and value[:length]
