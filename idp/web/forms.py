"""Reading request bodies safely: a size cap, one encoding, clear errors."""

from __future__ import annotations

from urllib.parse import parse_qsl

import orjson
from starlette.requests import Request
from starlette.responses import PlainTextResponse

MAX_VALUE = 8192  # characters in one parameter; nothing legitimate comes near it
# PostgreSQL's text refuses it: wherever such a value reached the database, a 500.
NUL = "a parameter holds a NUL character"


class BadRequest(Exception):
    def __init__(self, description: str, status: int = 400):
        super().__init__(description)
        self.description, self.status = description, status


async def _body(request: Request) -> bytes:
    limit = request.app.state.svc.settings.max_form_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise BadRequest("request body too large", 413)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest("request body too large", 413)
    return body


def _check(pairs):
    for key, value in pairs:
        if len(key) > 128 or len(value) > MAX_VALUE:
            raise BadRequest(f"parameter {key[:40]!r} is too long")
        if "\x00" in key or "\x00" in value:
            raise BadRequest(NUL)
    return pairs


async def read_form(request: Request) -> list[tuple[str, str]]:
    """The application/x-www-form-urlencoded body as ordered pairs."""
    if request.method != "POST":
        return []
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise BadRequest("the body must be application/x-www-form-urlencoded")
    try:
        text = (await _body(request)).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the body is not valid UTF-8") from None
    return _check(parse_qsl(text, keep_blank_values=True))


class RefuseNul:
    """ASGI middleware: a path or query string with a NUL character is refused before any
    route reads it (path parameters and the query reach the database in several)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and ("\x00" in scope["path"] or b"%00" in scope["query_string"]):
            return await PlainTextResponse(NUL, 400)(scope, receive, send)
        return await self.app(scope, receive, send)


def read_query(request: Request) -> list[tuple[str, str]]:
    return _check(list(request.query_params.multi_items()))


async def read_json(request: Request) -> dict:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise BadRequest("the body must be application/json")
    try:
        data = orjson.loads(await _body(request))
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    _check_json(data)
    return data


MAX_JSON_DEPTH = 32  # no body the provider reads nests deeper; orjson allows 1024, recursion does not


def _check_json(data: dict) -> None:
    """No NUL in any key or string, and no nesting past ``MAX_JSON_DEPTH`` (walked with a
    stack of its own: a body nested hundreds deep must not recurse)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                raise BadRequest(NUL)
            continue
        if depth > MAX_JSON_DEPTH:
            raise BadRequest("the body is nested too deep")
        if isinstance(value, dict):
            stack += [(k, depth) for k in value] + [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value]
