"""End to end: the provider served over real HTTP (uvicorn on a loopback port,
``tests/live.py``), driven by relying-party libraries nobody here wrote:

- panva's ``openid-client`` (Node, ``tests/e2e/rp.mjs``): discovery, code + PKCE
  through the HTML login, strict ID-token validation, userinfo, refresh;
- authlib's Starlette client, inside the demo school portal
  (``clients/school_portal``), itself served over HTTP: login, SSO, logout;
- a real browser (Debian's Chromium via Playwright) clicking through the portal.

Every test runs on both back ends (``settings_for``), except the Chromium one.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest

from clients.school_portal import create_app as create_portal
from idp.web.app import create_app
from tests import live
from tests.harness import PASSWORD, Provider, forms

try:  # the project depends on httpx2; plain httpx has the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

ROOT = Path(__file__).resolve().parent.parent
RP = "tests/e2e/rp.mjs"
RP_REDIRECT = "http://127.0.0.1:9/cb"  # never fetched: rp.mjs stops at the redirect to it
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
NAME = "王小明"
LOA1 = "urn:idp:loa:1"
INSTALL_HINT = "Run `make test`, which installs it (scripts/bootstrap.sh --test)."


# -- live servers --------------------------------------------------------------------------------
class LiveProvider(Provider):
    """The provider on a real port: ``svc``, ``issuer`` (== ``url``), ``account()``, ``client()``
    (from ``tests.harness.Provider``, on the app's real clock)."""

    def __init__(self, app, server: live.LiveServer):
        super().__init__(app, app.state.svc.clock)
        self.server, self.url = server, server.url


@pytest.fixture
def make_live_provider(settings_for):
    """``make(host="127.0.0.1", **settings)`` -> a started LiveProvider, stopped after the test."""
    with contextlib.ExitStack() as stack:
        def make(host: str = "127.0.0.1", **overrides) -> LiveProvider:
            sock, url = stack.enter_context(live.reserve(host))
            app = create_app(settings_for(issuer=url, **overrides))
            stack.callback(app.state.svc.db.engine.dispose)  # runs after the server has stopped
            return LiveProvider(app, stack.enter_context(live.serve(app, sock, url, health="/healthz")))

        yield make


@pytest.fixture
def live_provider(make_live_provider) -> LiveProvider:
    """A provider at ``http://127.0.0.1:PORT`` with the test settings (captcha off)."""
    return make_live_provider()


@pytest.fixture
def make_portal():
    """``make(provider, host)`` -> the school portal's URL, served on its own port and
    registered at ``provider`` (redirect ``PORTAL/callback``, post-logout ``PORTAL/``)."""
    with contextlib.ExitStack() as stack:
        def make(provider: LiveProvider, host: str = "127.0.0.1") -> str:
            sock, url = stack.enter_context(live.reserve(host))
            client_id, secret = provider.client(client_name="校務行政系統 2.0", redirect_uris=[url + "/callback"],
                                                post_logout_redirect_uris=[url + "/"])
            app = create_portal(provider.issuer, client_id, secret, url, secrets.token_urlsafe(32))
            stack.enter_context(live.serve(app, sock, url, health="/"))
            return url

        yield make


# -- openid-client (Node) ------------------------------------------------------------------------
def run_rp(provider: LiveProvider, **config) -> dict:
    """Run tests/e2e/rp.mjs against ``provider``; its one JSON line, parsed."""
    if shutil.which("node") is None or not (ROOT / "tests/e2e/node_modules/openid-client").is_dir():
        pytest.fail(f"node or tests/e2e/node_modules is missing. {INSTALL_HINT}", pytrace=False)
    config = {"issuer": provider.issuer, "redirect_uri": RP_REDIRECT, "username": "alice", "password": PASSWORD, **config}
    proc = subprocess.run(["node", RP], input=json.dumps(config), capture_output=True, text=True, cwd=ROOT, timeout=60)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"rp.mjs printed no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def _assert_logged_in(result: dict, provider: LiveProvider, client_id: str) -> dict:
    assert result["ok"], result
    claims = result["claims"]
    assert claims["iss"] == provider.issuer
    assert claims["aud"] == client_id or claims["aud"] == [client_id]
    assert claims["acr"] == LOA1 and claims["amr"] == ["pwd"]
    assert claims["name"] == NAME
    assert result["userinfo"]["sub"] == claims["sub"]
    assert result["userinfo"]["email"] == "alice@example.tw"
    return claims


def test_openid_client_confidential_client_code_pkce_and_refresh(live_provider):
    live_provider.account("alice", name=NAME)
    client_id, secret = live_provider.client(redirect_uris=[RP_REDIRECT], token_endpoint_auth_method="client_secret_basic",
                                             grant_types=["authorization_code", "refresh_token"])
    result = run_rp(live_provider, client_id=client_id, client_secret=secret)
    _assert_logged_in(result, live_provider, client_id)
    assert result["callback_via"] == "redirect"
    assert result["token_type"].lower() == "bearer" and result["has_refresh_token"]
    assert result["refresh"] and result["refresh"]["ok"], result


def test_openid_client_public_client_with_pkce(live_provider):
    live_provider.account("alice", name=NAME)
    client_id, secret = live_provider.client(redirect_uris=[RP_REDIRECT], token_endpoint_auth_method="none")
    assert secret is None
    result = run_rp(live_provider, client_id=client_id)  # no secret: openid-client authenticates with "none"
    _assert_logged_in(result, live_provider, client_id)
    if result["has_refresh_token"]:
        assert result["refresh"]["ok"], result


def test_openid_client_form_post_response_mode(live_provider):
    live_provider.account("alice", name=NAME)
    client_id, secret = live_provider.client(redirect_uris=[RP_REDIRECT])
    result = run_rp(live_provider, client_id=client_id, client_secret=secret,
                    extra_params={"response_mode": "form_post"})
    _assert_logged_in(result, live_provider, client_id)
    assert result["callback_via"] == "form_post", result


def test_openid_client_wrong_password_is_rejected(live_provider):
    live_provider.account("alice", name=NAME)
    client_id, secret = live_provider.client(redirect_uris=[RP_REDIRECT])
    result = run_rp(live_provider, client_id=client_id, client_secret=secret, password="Wrong-Horse-9!")
    assert not result["ok"], result
    assert result["error"] == "login_rejected" and result["step"] == "login", result
    assert result["url"].startswith(live_provider.issuer + "/login"), result


# -- authlib's client, in the school portal ------------------------------------------------------
class Agent:
    """A user agent over real HTTP: one cookie jar for every host, redirects followed by
    hand across origins, and every URL it visited kept in ``visited``."""

    def __init__(self):
        self.http = httpx.Client(follow_redirects=False, timeout=10.0)
        self.visited: list[str] = []

    def go(self, url: str, method: str = "GET", data: dict | None = None):
        response = self.http.request(method, url, data=data)
        self.visited.append(f"{method} {url}")
        for _ in range(10):
            if response.status_code not in (301, 302, 303, 307, 308):
                return response
            url = urljoin(str(response.url), response.headers["location"])
            response = self.http.get(url)
            self.visited.append(f"GET {url}")
        raise AssertionError(f"redirect loop: {self.visited[-10:]}")

    def submit(self, page, action: str, **fields):
        form = next((f for f in forms(page.text) if f["method"] == "post" and action in f["action"]), None)
        assert form is not None, f"no form posting to {action} on {page.url}: {page.text[:1000]}"
        return self.go(urljoin(str(page.url), form["action"]), "POST", {**form["fields"], **fields})

    def close(self):
        self.http.close()


def _path(response) -> str:
    parts = urlsplit(str(response.url))
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _is_login_page(response, provider) -> bool:
    return (response.status_code == 200 and _path(response).startswith(provider.issuer + "/")
            and any("/login/factor/password" in f["action"] for f in forms(response.text)))


def test_school_portal_login_sso_and_logout(live_provider, make_portal):
    live_provider.account("alice", name=NAME)
    portal = make_portal(live_provider)
    agent = Agent()
    try:
        home = agent.go(portal + "/")
        assert home.status_code == 200 and 'href="/login"' in home.text and NAME not in home.text

        # /login -> the provider's login page; the password form -> /callback -> home
        page = agent.go(portal + "/login")
        assert _is_login_page(page, live_provider), (page.status_code, page.url, page.text[:500])
        mark = len(agent.visited)
        home = agent.submit(page, "/login/factor/password", username="alice", password=PASSWORD)
        assert home.status_code == 200 and _path(home) == portal + "/", (home.status_code, home.url, home.text[:1000])
        assert any(v.startswith(f"GET {portal}/callback?") for v in agent.visited[mark:]), agent.visited
        assert NAME in home.text and LOA1 in home.text, home.text

        # single sign-on: the portal logs in again without a login page
        again = agent.go(portal + "/login")
        assert _path(again) == portal + "/" and NAME in again.text, (again.url, agent.visited[-5:])

        # 登出: the portal's csrf form -> the provider's end_session -> back to the portal, logged out
        mark = len(agent.visited)
        out = agent.submit(again, "/logout")
        assert out.status_code == 200 and _path(out) == portal + "/", (out.status_code, out.url, out.text[:1000])
        assert any(v.startswith(f"GET {live_provider.issuer}/logout?") for v in agent.visited[mark:]), agent.visited
        assert NAME not in out.text and 'href="/login"' in out.text

        # the SSO session ended at the provider: a new login asks for the password again
        page = agent.go(portal + "/login")
        assert _is_login_page(page, live_provider), (page.status_code, page.url, page.text[:500])
    finally:
        agent.close()


# -- a real browser ------------------------------------------------------------------------------
# Chromium runs on one back end only, to keep the suite fast: the protocol itself is covered on
# both back ends by the tests above.
@pytest.mark.parametrize("backend", ["sqlite+memory"])
def test_school_portal_in_chromium(backend, make_live_provider, make_portal):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing. {INSTALL_HINT}", pytrace=False)
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail(f"the Python package playwright is missing. {INSTALL_HINT}", pytrace=False)

    # localhost, not 127.0.0.1, as a person would type it (and as WebAuthn will need)
    provider = make_live_provider(host="localhost")
    provider.account("alice", name=NAME)
    portal = make_portal(provider, host="localhost")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(locale="zh-TW")
            page.set_default_timeout(10_000)
            page.goto(portal + "/")
            page.get_by_role("link", name="登入", exact=True).click()
            page.wait_for_url(provider.issuer + "/**")
            page.locator("#username").press_sequentially("alice")
            page.locator("#password").press_sequentially(PASSWORD)
            page.locator("form[data-step=password] button[type=submit]").click()
            page.wait_for_url(portal + "/")
            expect(page.locator("main")).to_contain_text(f"歡迎，{NAME}")
            expect(page.locator("main")).to_contain_text(LOA1)
        finally:
            browser.close()
