"""Logging (SPEC O3): every line of the ``idp`` loggers on stderr, as text or as
one JSON object per line (``IDP_LOG_FORMAT``), each with the id of the request
it belongs to, so one request's lines can be found across a log collector.

The request id is the proxy's ``X-Request-Id`` (nginx's ``$request_id``) when it
is a plain token, else a new one; it goes back in the response's
``X-Request-Id``. With ``IDP_ACCESS_LOG`` one line per request names the path,
never the query (which carries codes and tokens).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import re
import secrets
import sys
import time

import orjson

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
LOGGED = "idp.error_logged"  # in a request's scope: its unhandled error is logged, with its id
access = logging.getLogger("idp.access")

_ACCEPTED_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")
# Attributes every LogRecord has; anything else came from ``extra=`` and is logged as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "request_id",
                                                                          "color_message"}  # uvicorn's, for a terminal


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (a test runner swaps it per test)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


class _WithRequestId(logging.Filter):
    def filter(self, record):
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record):
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


TEXT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


class TextFormatter(logging.Formatter):
    """``TEXT``, its control characters escaped (``\\n``): a value from a request, a typed
    username say, cannot begin a log line of its own. A traceback keeps its lines."""

    def __init__(self):
        super().__init__(TEXT)

    def formatMessage(self, record):
        return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), super().formatMessage(record))


def configure(log_format: str, level: str) -> None:
    """Give the ``idp`` loggers, and the server's (``uvicorn``), one stderr handler in
    ``log_format`` (idempotent): every line a log collector reads is of one kind."""
    handler = _Stderr()
    handler.addFilter(_WithRequestId())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    for name in ("idp", "uvicorn"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, _Stderr)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)


class RequestId:
    """ASGI middleware: sets the request id for the request's log lines, returns it
    in ``X-Request-Id``, and with ``access`` logs one line per request."""

    def __init__(self, app, access: bool = False):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = sent if _ACCEPTED_ID.fullmatch(sent) else secrets.token_hex(16)
        token = request_id.set(rid)
        start, status = time.perf_counter(), [500]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Starlette raises a handled error again for the server to log: it is logged already,
            # with this id, so not twice (once more without it, in the server's own format).
            if not scope.get(LOGGED):
                raise
        finally:
            if self.access:
                self._log(scope, rid, status[0], start)
            request_id.reset(token)

    @staticmethod
    def _log(scope, rid, status, start):
        client = scope.get("client") or ("-",)
        access.info("%s %s %s", scope["method"], scope["path"], status,
                    extra={"request_id": rid, "method": scope["method"], "path": scope["path"], "status": status,
                           "ms": round((time.perf_counter() - start) * 1000, 1), "ip": client[0]})
