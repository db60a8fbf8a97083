"""The audit log (SPEC M6, O3): every login, failure, lockout and logout, with
time, address, client and method. Never a secret: no passwords, codes or tokens."""

from __future__ import annotations

import datetime as dt
import logging

from idp.storage.models import AuditEvent

log = logging.getLogger("idp.audit")
_INSERT = AuditEvent.__table__.insert().inline()  # no RETURNING of the id nobody reads


class Audit:
    def __init__(self, db, clock, metrics):
        self.db, self.clock, self.metrics = db, clock, metrics

    def record(self, event: str, *, account_id=None, username=None, client_id=None, ip=None, method=None,
               user_agent=None, **detail):
        when = dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc)
        self.db.write(_INSERT, **{
            "time": when, "event": event, "account_id": account_id, "username": username,
            "client_id": client_id, "ip": ip, "method": method,
            "user_agent": (user_agent or None) and user_agent[:300], "detail": detail,
        })
        self.metrics.audited(event, method)
        log.info("%s account=%s user=%s client=%s ip=%s method=%s %s", event, account_id, username, client_id, ip, method, detail or "")
