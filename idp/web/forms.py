"""Reading request bodies safely: a size cap, one encoding, clear errors."""

from __future__ import annotations

from urllib.parse import parse_qsl

import orjson
from starlette.requests import Request

MAX_VALUE = 8192  # characters in one parameter; nothing legitimate comes near it


class BadRequest(Exception):
    def __init__(self, description: str, status: int = 400):
        super().__init__(description)
        self.description, self.status = description, status


async def _body(request: Request) -> bytes:
    limit = request.app.state.svc.settings.max_form_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
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
    return data
