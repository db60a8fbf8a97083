"""Google federation (SPEC A6) against a real OpenID provider nobody here wrote: panva's
oidc-provider (tests/e2e/node_modules), started on loopback as the stand-in for Google,
with a client for us and its development login pages (any login name becomes the `sub`)."""

from __future__ import annotations

import base64
import copy
import json
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest

from idp.factors import FACTORS
from idp.factors.federation import STATE, Upstream
from idp.storage.models import Account, AuditEvent, Binding
from tests.harness import callback, forms, redeem
from tests.servers import free_port
from tests.test_totp import _bind, _code, _error

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests/e2e/upstream_op.mjs"
ISSUER = "http://idp.test"


@pytest.fixture
def backend():
    return "sqlite+memory"  # the node-driven tests need one back end only


@pytest.fixture(scope="module")
def upstream():
    if shutil.which("node") is None or not (ROOT / "tests/e2e/node_modules/oidc-provider").is_dir():
        pytest.fail("node or tests/e2e/node_modules/oidc-provider is missing (cd tests/e2e && npm ci)", pytrace=False)
    port, client_id, secret = free_port(), "idp-" + secrets.token_hex(4), secrets.token_urlsafe(24)
    proc = subprocess.Popen(["node", str(SCRIPT), str(port), client_id, secret, ISSUER + "/login/google/callback",
                             ISSUER + "/account/google/callback"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    issuer = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(issuer + "/.well-known/openid-configuration", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("oidc-provider did not start: " + proc.stderr.read()[-2000:], pytrace=False)
        time.sleep(0.1)
    yield {"upstream_issuer": issuer, "upstream_client_id": client_id, "upstream_client_secret": secret}
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def site(make_provider, upstream):
    """A provider federating with the upstream; alice with OTP bound.
    Returns (provider, client_id, client_secret, alice's OTP secret)."""
    provider = make_provider(mfa=True, issuer=ISSUER, **upstream)
    provider.account("alice")
    client_id, client_secret = provider.client()
    _, otp = _bind(provider, provider.browser(), client_id)
    provider.clock.advance(30)
    return provider, client_id, client_secret, otp


def at_google(browser, response, login: str, *, before_callback=None):
    """Follow a redirect to the upstream, log in there as ``login`` (and consent), and come
    back to the provider's callback in ``browser``; the provider's page after it."""
    assert response.status_code == 302, (response.status_code, response.text[:300])
    location = response.headers["location"]
    if before_callback:
        before_callback(location)
    with httpx.Client(follow_redirects=False, timeout=10) as google:
        page = google.get(location)
        for _ in range(12):
            if page.status_code in (302, 303):
                location = urljoin(str(page.url), page.headers["location"])
                if location.startswith(ISSUER):
                    return browser.go(location)
                page = google.get(location)
                continue
            assert page.status_code == 200, (page.status_code, page.text[:500])
            form = next(f for f in forms(page.text) if f["method"] == "post")
            data = dict(form["fields"])
            if "login" in data or 'name="login"' in page.text:
                data.update(login=login, password="anything")
            page = google.post(urljoin(str(page.url), form["action"]), data=data)
    raise AssertionError("the upstream never sent the browser back")


def _google_link(page) -> str:
    found = re.search(r'href="(/login/google\?tx=[^"]+)"', page.text)
    assert found, "no Google login link on the login page"
    return found.group(1)


def _signed_in(provider, client_id, otp, username="alice"):
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id), username=username)
    callback(browser.submit(page, "/login/factor/otp", otp=_code(provider, otp)))
    provider.clock.advance(30)
    return browser


def _bind_google(provider, browser, login: str):
    return at_google(browser, browser.submit(browser.go("/account"), "/account/google"), login)


def _notice(page) -> str:
    found = re.search(r'<div class="notice" role="status">\s*<p>(.*?)</p>', page.text, re.S)
    return found.group(1) if found else ""


def _claims(id_token: str) -> dict:
    payload = id_token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def test_bind_then_log_in_with_google_and_otp(site):
    provider, client_id, client_secret, otp = site
    browser = _signed_in(provider, client_id, otp)
    page = browser.go("/account")
    assert 'action="/account/google"' in page.text
    assert browser.go("/account/google").status_code == 405  # a link from elsewhere binds nothing
    page = _bind_google(provider, browser, "alice.g")
    assert page.status_code == 200 and "綁定成功" in _notice(page)
    assert re.search(r'<tr data-method="google">.*?✓', page.text, re.S)
    with provider.svc.db.session() as session:
        binding = session.query(Binding).filter_by(factor="google").one()
        assert binding.external_id == provider.svc.settings.upstream_issuer + "|alice.g"

    fresh = provider.browser()
    page = fresh.authorize(client_id)
    assert "使用 Google 帳號登入" in page.text
    page = at_google(fresh, fresh.go(_google_link(page)), "alice.g")
    assert page.status_code == 200 and 'name="otp"' in page.text and 'name="password"' not in page.text
    # The lost-phone reset, as after the password (seed 001: "輸入【帳號密碼】或點選【Google 帳號登入】").
    tx = forms(page.text)[0]["fields"]["tx"]
    assert f"/login/reset?tx={tx}" in page.text and "/login/reset/send" in fresh.go(f"/login/reset?tx={tx}").text
    provider.clock.advance(30)
    params = callback(fresh.submit(page, "/login/factor/otp", otp=_code(provider, otp)))
    tokens = redeem(provider.http(), client_id, client_secret, params["code"]).json()
    claims = _claims(tokens["id_token"])
    assert {"fed", "otp", "mfa"} <= set(claims["amr"]) and "pwd" not in claims["amr"]
    assert claims["acr"] == "urn:idp:loa:2"
    # A portal that does not take Google starts this session's login over, with the password.
    no_google, _ = provider.client(allowed_factors=[name for name in FACTORS if name != "google"])
    page = fresh.authorize(no_google)
    assert 'name="password"' in page.text and 'name="otp"' not in page.text



def test_google_and_the_password_of_one_session_are_not_two_factors(site):
    """SPEC A6: Google is always followed by something the user holds. A session that proved
    the password, OTP and Google gives a portal taking only the password and Google no LOA2
    (amr pwd fed mfa) by single sign-on: it answers unmet_authentication_requirements."""
    provider, client_id, _, otp = site
    browser = _signed_in(provider, client_id, otp)
    _bind_google(provider, browser, "alice.g")
    page = at_google(browser, browser.go(_google_link(browser.authorize(client_id, prompt="login"))), "alice.g")
    provider.clock.advance(30)
    assert "code" in callback(browser.submit(page, "/login/factor/otp", otp=_code(provider, otp)))
    no_otp, _ = provider.client(allowed_factors=["password", "google"])
    provider.clock.advance(5)
    assert callback(browser.authorize(no_otp))["error"] == "unmet_authentication_requirements"

@pytest.mark.parametrize("backend", ["postgres+redis"])  # where the audit row's columns have their lengths
def test_unbound_google_account_is_refused_with_the_seeds_message(site):
    provider, client_id, _, _ = site
    browser = provider.browser()
    page = browser.authorize(client_id)
    page = at_google(browser, browser.go(_google_link(page)), "nobody.here")
    assert page.status_code == 200 and "從未綁定於本系統" in _error(page)
    assert 'name="password"' in page.text  # back on the login page, another way in still open
    # A department's long address, kept masked in the audit row (a***@domain): still that message.
    page = at_google(browser, browser.go(_google_link(page)),
                     "someone@graduate-institute-of-biomedical-informatics.college-of-medicine.example.edu.tw")
    assert page.status_code == 200 and "從未綁定於本系統" in _error(page)


def test_a_google_account_binds_to_one_local_account_only(site):
    provider, client_id, _, otp = site
    _bind_google(provider, _signed_in(provider, client_id, otp), "shared.g")
    provider.account("bob")
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id), username="bob")
    bob_otp = re.sub(r"<[^>]+>|\s", "", re.search(r'<code class="secret" data-secret>(.*?)</code>', page.text).group(1))
    browser.submit(page, "/login/bind/otp", otp=_code(provider, bob_otp))
    provider.clock.advance(30)
    bob = _signed_in(provider, client_id, bob_otp, username="bob")
    page = _bind_google(provider, bob, "shared.g")
    assert "已綁定在另一組帳號上" in _error(page)
    with provider.svc.db.session() as session:
        bindings = session.query(Binding).filter_by(factor="google").all()
        assert [session.get(Account, b.account_id).username for b in bindings] == ["alice"]


def test_binding_needs_otp_or_a_certificate(make_provider, upstream):
    provider = make_provider(mfa=False, issuer=ISSUER, **upstream)
    provider.account("carol")
    client_id, _ = provider.client()
    browser = provider.browser()
    callback(browser.password(browser.authorize(client_id), username="carol"))
    page = browser.go("/account")
    assert "請先綁定OTP驗證" in page.text and 'action="/account/google"' not in page.text
    page = browser.go("/account/google", "POST", {"csrf": re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)})
    assert "須先綁定 OTP 驗證或自然人憑證" in _error(page)


def test_upstream_error_is_a_clear_message(site):
    provider, client_id, _, _ = site
    browser = provider.browser()
    response = browser.go(_google_link(browser.authorize(client_id)))
    state = parse_qs(urlsplit(response.headers["location"]).query)["state"][0]
    page = browser.go(f"/login/google/callback?error=access_denied&state={state}")
    assert page.status_code == 200 and "取消" in _error(page)


def test_an_id_token_with_the_wrong_nonce_is_refused(site):
    provider, client_id, _, otp = site
    _bind_google(provider, _signed_in(provider, client_id, otp), "alice.g")
    browser = provider.browser()

    def tamper(location):
        state = parse_qs(urlsplit(location).query)["state"][0]
        pending = provider.svc.store.get(STATE + state)
        pending["nonce"] = "not-the-nonce-sent"
        provider.svc.store.set(STATE + state, pending, 600)

    page = at_google(browser, browser.go(_google_link(browser.authorize(client_id))), "alice.g", before_callback=tamper)
    assert "未通過驗證" in _error(page) and 'name="otp"' not in page.text


def test_an_id_token_for_another_audience_is_refused(site, monkeypatch):
    provider, client_id, _, otp = site
    _bind_google(provider, _signed_in(provider, client_id, otp), "alice.g")
    real = Upstream.validate

    async def as_another_client(self, id_token, nonce, now):  # the token names our client id, not this one
        return await real(_with(self, "someone-else"), id_token, nonce, now)

    monkeypatch.setattr(Upstream, "validate", as_another_client)
    browser = provider.browser()
    page = at_google(browser, browser.go(_google_link(browser.authorize(client_id))), "alice.g")
    assert "未通過驗證" in _error(page) and 'name="otp"' not in page.text


def _with(upstream, client_id):
    other = copy.copy(upstream)
    other.client_id = client_id
    return other


def test_a_callback_in_another_browser_or_replayed_is_refused(site):
    provider, client_id, _, otp = site
    _bind_google(provider, _signed_in(provider, client_id, otp), "alice.g")
    browser = provider.browser()
    seen = {}
    page = at_google(browser, browser.go(_google_link(browser.authorize(client_id))), "alice.g",
                     before_callback=lambda location: seen.update(location=location))
    assert 'name="otp"' in page.text
    state = parse_qs(urlsplit(seen["location"]).query)["state"][0]
    again = browser.go(f"/login/google/callback?code=x&state={state}")  # the state is used up
    assert again.status_code == 400 and "登入已逾時" in again.text
    other = provider.browser()
    response = other.go(_google_link(other.authorize(client_id)))
    state = parse_qs(urlsplit(response.headers["location"]).query)["state"][0]
    stolen = provider.browser().go(f"/login/google/callback?code=x&state={state}")
    assert stolen.status_code == 400 and "登入已逾時" in stolen.text


def test_a_callback_after_its_state_expired_is_refused(site):
    """The upstream redirect's state is good for STATE_SECONDS on the provider's clock, not for
    as long as the store happens to keep it."""
    from idp.factors.federation import STATE_SECONDS

    provider, client_id, _, otp = site
    _bind_google(provider, _signed_in(provider, client_id, otp), "alice.g")
    browser = provider.browser()
    page = at_google(browser, browser.go(_google_link(browser.authorize(client_id))), "alice.g",
                     before_callback=lambda location: provider.clock.advance(STATE_SECONDS + 1))
    assert page.status_code == 400 and "登入已逾時" in page.text


def test_google_is_followed_by_otp_even_when_the_client_asks_for_two_factors(site):
    provider, client_id, _, otp = site
    _bind_google(provider, _signed_in(provider, client_id, otp), "alice.g")
    browser = provider.browser()
    page = browser.authorize(client_id, acr_values="urn:idp:loa:2")
    page = at_google(browser, browser.go(_google_link(page)), "alice.g")
    assert 'name="otp"' in page.text and 'name="password"' not in page.text



def test_a_client_that_takes_google_alone_shows_its_button_and_no_password_form(site):
    provider, client_id, _, otp = site
    _bind_google(provider, _signed_in(provider, client_id, otp), "alice.g")
    google_only, _ = provider.client(allowed_factors=["google", "otp"])
    browser = provider.browser()
    page = browser.authorize(google_only)
    assert 'name="password"' not in page.text and "/password/forgot" not in page.text
    page = at_google(browser, browser.go(_google_link(page)), "alice.g")
    assert 'name="otp"' in page.text

def test_google_is_followed_by_otp_without_the_two_factor_policy(make_provider, upstream):
    provider = make_provider(mfa=False, issuer=ISSUER, **upstream)
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    callback(browser.password(browser.authorize(client_id)))
    page = browser.go("/account/otp")
    secret = re.sub(r"<[^>]+>|\s", "", re.search(r'<code class="secret" data-secret>(.*?)</code>', page.text).group(1))
    assert "綁定" in browser.submit(page, "/account/otp", otp=_code(provider, secret)).text
    provider.clock.advance(30)
    assert "綁定成功" in _notice(_bind_google(provider, browser, "alice.g"))
    fresh = provider.browser()
    page = at_google(fresh, fresh.go(_google_link(fresh.authorize(client_id))), "alice.g")
    assert 'name="otp"' in page.text
    assert "code" in callback(fresh.submit(page, "/login/factor/otp", otp=_code(provider, secret)))
    # Nor through single sign-on: a portal that takes Google but not OTP gets no Google-alone
    # login out of this Google+OTP session, as it gets none from a fresh Google login.
    google_only, _ = provider.client(allowed_factors=["password", "google"])
    assert callback(fresh.authorize(google_only))["error"] == "unmet_authentication_requirements"


def test_a_disabled_accounts_google_login_is_in_its_activity_log(site):
    provider, client_id, _, otp = site
    _bind_google(provider, _signed_in(provider, client_id, otp), "alice.g")
    with provider.svc.db.session() as session:
        alice = session.query(Account).filter_by(username="alice").one()
        alice.disabled = True
    browser = provider.browser()
    page = at_google(browser, browser.go(_google_link(browser.authorize(client_id))), "alice.g")
    assert page.status_code == 403
    with provider.svc.db.session() as session:
        event = session.query(AuditEvent).filter_by(event="login.disabled").one()
    assert (event.account_id, event.client_id, event.method) == (alice.id, client_id, "google")


def test_upstream_down_is_a_clear_message(make_provider, upstream):
    down = {**upstream, "upstream_issuer": f"http://127.0.0.1:{free_port()}"}
    provider = make_provider(mfa=True, issuer=ISSUER, **down)
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.go(_google_link(browser.authorize(client_id)))
    assert page.status_code == 200 and "無法連線至 Google" in _error(page)


def test_switched_off_without_an_issuer(make_provider):
    provider = make_provider(mfa=True)
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    assert "/login/google" not in browser.authorize(client_id).text


def test_the_factor_has_no_form_of_its_own(site):
    provider, client_id, _, _ = site
    browser = provider.browser()
    page = browser.authorize(client_id)
    tx = re.search(r"tx=([\w-]+)", _google_link(page)).group(1)
    page = browser.go(f"/login?tx={tx}&factor=google")
    assert page.status_code == 200 and _google_link(page)
    page = browser.go("/login/factor/google", "POST", {"tx": tx, "csrf": browser.http.cookies.get("idp_csrf")})
    assert page.status_code == 200 and "使用 Google 帳號登入" in _error(page)
