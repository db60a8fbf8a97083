"""Test helpers: a provider with its own database and store, and a browser that
fills the provider's HTML forms the way a person would."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import html
import re
import secrets
import threading
from urllib.parse import parse_qs, urljoin, urlsplit

from sqlalchemy import event
from starlette.testclient import TestClient

from idp.accounts import create_account
from idp.protocol.clients import create_client

PASSWORD = "Correct-Horse-9!"
REDIRECT = "https://portal.example.tw/callback"


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


class Provider:
    def __init__(self, app, clock):
        self.app, self.svc, self.clock = app, app.state.svc, clock
        self.issuer = self.svc.settings.issuer

    def account(self, username="alice", password=PASSWORD, **fields) -> str:
        fields.setdefault("name", username.title())
        fields.setdefault("email", f"{username}@example.tw")
        with self.svc.db.session() as session:
            account = create_account(session, self.svc.passwords, username, password,
                                     now=dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc), **fields)
            return account.id

    def client(self, first_party=True, **meta) -> tuple[str, str | None]:
        meta.setdefault("client_name", "Portal")
        meta.setdefault("redirect_uris", [REDIRECT])
        with self.svc.db.session() as session:
            row, secret, _ = create_client(session, meta, first_party=first_party)
            return row.client_id, secret

    def browser(self) -> "Browser":
        return Browser(self)

    def http(self) -> TestClient:
        return TestClient(self.app, base_url=self.issuer)


_FORM = re.compile(r"<form\b([^>]*)>(.*?)</form>", re.S | re.I)
_ATTR = re.compile(r'([\w-]+)="([^"]*)"')
_INPUT = re.compile(r"<(input|button)\b([^>]*)>", re.I)


def forms(page: str) -> list[dict]:
    """Every form on a page: its action, method and named fields (buttons apart)."""
    found = []
    for attrs, body in _FORM.findall(page):
        a = {k: html.unescape(v) for k, v in _ATTR.findall(attrs)}
        fields, buttons = {}, []
        for tag, inner in _INPUT.findall(body):
            i = {k: html.unescape(v) for k, v in _ATTR.findall(inner)}
            if "name" not in i:
                continue
            if tag.lower() == "button":
                buttons.append((i["name"], i.get("value", "")))
            else:
                fields[i["name"]] = i.get("value", "")
        found.append({"action": a.get("action", ""), "method": a.get("method", "get").lower(), "fields": fields, "buttons": buttons})
    return found


def takes(page, name: str, typed: str) -> bool:
    """Whether a browser sends ``typed`` in the page's input ``name`` as it was typed: the
    input's maxlength leaves room for all of it, and its pattern, if any, matches it."""
    for tag in re.findall(r"<input\b[^>]*>", page.text):
        attrs = {k: html.unescape(v) for k, v in _ATTR.findall(tag)}
        if attrs.get("name") == name:
            fits = len(typed) <= int(attrs.get("maxlength", len(typed)))
            return fits and re.fullmatch(attrs.get("pattern", ".*"), typed) is not None
    raise AssertionError(f"the page has no input {name}")


def language_link(page, lang: str) -> str | None:
    """Where the page's switch to ``lang`` leads, or None: the page has none."""
    found = re.search(rf'<a href="([^"]+)" lang="{lang}">', page.text)
    return html.unescape(found.group(1)) if found else None


class Browser:
    """One user agent: its own cookies, following the provider's redirects."""

    def __init__(self, provider: Provider):
        self.provider = provider
        self.http = provider.http()

    def go(self, url: str, method="GET", data=None):
        response = self.http.request(method, url, data=data, follow_redirects=False)
        while response.status_code in (302, 303) and self._ours(response.headers["location"]):
            response = self.http.get(urljoin(str(response.url), response.headers["location"]), follow_redirects=False)
        return response

    def _ours(self, location: str) -> bool:
        return location.startswith("/") or location.startswith(self.provider.issuer)

    def submit(self, page, match: str | None = None, button: tuple | None = None, **fields):
        """Fill and post the first form whose action contains ``match``."""
        form = next(f for f in forms(page.text) if f["method"] == "post" and (match is None or match in f["action"]))
        data = {**form["fields"], **fields}
        if button:
            data[button[0]] = button[1]
        return self.go(urljoin(str(page.url), form["action"]), "POST", data)

    def authorize(self, client_id, redirect_uri=REDIRECT, **params):
        params = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri, "scope": "openid profile email",
                  "state": secrets.token_urlsafe(8), "nonce": secrets.token_urlsafe(8), **params}
        params = {k: v for k, v in params.items() if v is not None}
        query = "&".join(f"{k}={v}" for k, v in self.http.build_request("GET", "/", params=params).url.params.multi_items())
        return self.go("/authorize?" + query)

    def password(self, page, username="alice", password=PASSWORD, **extra):
        return self.submit(page, "/login/factor/password", username=username, password=password, **extra)

    def login(self, client_id, redirect_uri=REDIRECT, username="alice", password=PASSWORD, **params) -> dict:
        """Authorize, log in with the password, and return the callback's parameters."""
        page = self.authorize(client_id, redirect_uri, **params)
        if page.status_code == 200 and "/login/factor/password" in page.text:
            page = self.password(page, username, password)
        return callback(page, redirect_uri)


def callback(response, redirect_uri=REDIRECT) -> dict:
    """The parameters an authorization response carries back to the client."""
    assert response.status_code == 302, (response.status_code, response.text[:500])
    location = response.headers["location"]
    assert location.startswith(redirect_uri + "?"), location
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def redeem(http, client_id, secret, code, verifier=None, redirect_uri=REDIRECT, **extra):
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri, **extra}
    if verifier:
        data["code_verifier"] = verifier
    auth = (client_id, secret) if secret else None
    if not secret:
        data["client_id"] = client_id
    return http.post("/token", data=data, auth=auth)


@contextlib.contextmanager
def both_reach(engine, statement: str, timeout: float = 3):
    """Two threads' statements that begin with ``statement`` (upper case) wait for each other
    before they run, or ``timeout`` seconds when one of them waits for the other (a lock): two
    requests that have both read before either writes."""
    both = threading.Barrier(2, timeout=timeout)

    def hold(conn, cursor, sql, *_):
        if sql.lstrip().upper().startswith(statement):
            try:
                both.wait()
            except threading.BrokenBarrierError:
                pass

    event.listen(engine, "before_cursor_execute", hold)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", hold)
