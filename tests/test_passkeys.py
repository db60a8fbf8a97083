"""Passkeys (issue 5, SPEC A8) in a real browser with a real authenticator's protocol.

Debian's Chromium (Playwright) with Chromium's virtual authenticator over CDP
(``WebAuthn.addVirtualAuthenticator``: CTAP2, internal transport, resident keys, user
verification), against a live provider whose issuer is ``http://localhost:PORT`` (an IP
address cannot be a WebAuthn RP ID) and the school portal, whose page shows the ID
token's ``acr`` and ``amr`` as the relying party received them.

One provider, one portal and one Chromium for the module (two factors for everyone,
``mfa=True``, the captcha always); each test has its own account and its own browser
contexts, each page its own authenticator. SQLite and the in-process store only: the
browser tests are the slow ones. The tests at the end run the same ceremonies over HTTP
on both back ends, and answers no honest browser would send.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import re
import secrets
import threading
from urllib.parse import parse_qs, urlencode

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt
from joserfc.jwk import KeySet
from webauthn.helpers import bytes_to_base64url as b64

from clients.school_portal import create_app as create_portal
from idp.settings import Settings
from idp.storage.models import Account, AuditEvent, Binding
from idp.web.app import create_app
from tests import live
from tests.harness import callback, forms, redeem
from tests.test_e2e import NAME, LiveProvider
from tests.test_journeys import People, bound_otp, otp, type_otp, type_password

try:
    from playwright.sync_api import expect
except ImportError:  # reported by the chromium fixture
    expect = None

LOA2 = "urn:idp:loa:2"
AUTHENTICATOR = {"protocol": "ctap2", "transport": "internal", "hasResidentKey": True, "hasUserVerification": True,
                 "isUserVerified": True, "automaticPresenceSimulation": True}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(provider, portal URL), both on localhost, for the whole module."""
    folder = tmp_path_factory.mktemp("passkeys")
    with contextlib.ExitStack() as stack:
        sock, url = stack.enter_context(live.reserve("localhost"))
        settings = Settings.from_env({}, database_url=f"sqlite:///{folder}/idp.sqlite3", redis_url="",
                                     keys_dir=str(folder / "keys"), captcha="always", issuer=url, mfa=True)
        app = create_app(settings)
        stack.callback(app.state.svc.db.engine.dispose)
        provider = LiveProvider(app, stack.enter_context(live.serve(app, sock, url)))
        sock, portal = stack.enter_context(live.reserve("localhost"))
        client_id, secret = provider.client(client_name="校務行政系統 2.0", redirect_uris=[portal + "/callback"],
                                            post_logout_redirect_uris=[portal + "/"])
        stack.enter_context(live.serve(create_portal(url, client_id, secret, portal, secrets.token_urlsafe(32)),
                                       sock, portal, health="/"))
        yield provider, portal


@pytest.fixture
def people(chromium, request):
    opened = People(chromium, request.node.name)
    yield opened
    for context in opened.contexts:
        context.close()


def person(people, servers):
    """A new account with OTP bound, and a browser page with an authenticator of its own."""
    provider, _ = servers
    username = "u" + secrets.token_hex(4)
    account_id = provider.account(username, name=NAME)
    secret = bound_otp(provider, account_id)
    page = people.page()
    return username, account_id, secret, page, Authenticator(page)


class Authenticator:
    """Chromium's virtual authenticator on one page (a phone's or laptop's built-in one)."""

    def __init__(self, page, credential: dict | None = None):
        self.cdp = page.context.new_cdp_session(page)
        self.cdp.send("WebAuthn.enable", {"enableUI": False})
        self.id = self.cdp.send("WebAuthn.addVirtualAuthenticator", {"options": AUTHENTICATOR})["authenticatorId"]
        if credential:
            self.cdp.send("WebAuthn.addCredential", {"authenticatorId": self.id, "credential": credential})

    def credentials(self) -> list[dict]:
        return self.cdp.send("WebAuthn.getCredentials", {"authenticatorId": self.id})["credentials"]


# -- what the person does ----------------------------------------------------------------------
def register(page, provider, username: str, secret: str, label: str) -> None:
    """Open the passkey settings (which ask for password and OTP again), register one."""
    page.goto(provider.issuer + "/account/passkeys")
    type_password(page, provider, username=username)
    type_otp(page, otp(provider, secret))
    page.wait_for_url(provider.issuer + "/account/passkeys")
    add(page, label)
    expect(page.locator(".notice")).to_contain_text("已登記通行金鑰")


def add(page, label: str) -> None:
    form = page.locator("form[data-step=passkey-add]")
    form.get_by_label("名稱").fill(label)
    form.get_by_role("button", name="登記這個裝置的通行金鑰").click()


def passwordless(page) -> None:
    """From the login page: no account typed, the passkey instead."""
    page.get_by_role("link", name="以通行金鑰（Passkey）登入").click()
    use_passkey(page)


def use_passkey(page) -> None:
    expect(page.get_by_role("heading", name="通行金鑰登入")).to_be_visible()
    page.locator("form[data-step=passkey]").get_by_role("button", name="使用通行金鑰").click()


def at_portal(page, provider, portal: str) -> None:
    page.context.clear_cookies()  # logged out everywhere: a new login
    page.goto(portal + "/")
    page.get_by_role("link", name="登入", exact=True).click()
    page.wait_for_url(provider.issuer + "/**")


def portal_sees(page, portal: str) -> tuple[str, list[str]]:
    """The ID token's acr and amr, as the portal shows them."""
    page.wait_for_url(portal + "/")
    expect(page.locator("main")).to_contain_text(f"歡迎，{NAME}")
    info = page.locator("table.info")
    acr = info.locator("tr", has_text="acr").locator("code").inner_text()
    amr = info.locator("tr", has_text="amr").locator("code").all_inner_texts()
    return acr, amr


def events(provider, account_id: str, event: str) -> list[AuditEvent]:
    with provider.svc.db.session() as session:
        rows = session.query(AuditEvent).filter_by(account_id=account_id, event=event).all()
        session.expunge_all()
        return rows


# -- the tests --------------------------------------------------------------------------------------
def test_register_list_and_remove_after_reverification(servers, people):
    provider, portal = servers
    username, account_id, secret, page, authenticator = person(people, servers)

    register(page, provider, username, secret, "辦公室筆電")
    row = page.locator("tr[data-passkey-row='辦公室筆電']")
    expect(row).to_contain_text("可使用")
    expect(row).to_contain_text("尚未使用")
    [credential] = authenticator.credentials()
    assert credential["isResidentCredential"] and credential["rpId"] == "localhost"

    # The same authenticator cannot hold two passkeys of one account (excludeCredentials).
    add(page, "重複")
    expect(page.locator("[data-passkey-status]")).to_contain_text("已登記過")
    expect(page.locator("tr[data-passkey-row]")).to_have_count(1)

    # Listed on the settings page's table of methods too.
    page.goto(provider.issuer + "/account")
    expect(page.locator("tr[data-method=passkey]")).to_contain_text("✓")
    page.locator("tr[data-method=passkey]").get_by_role("link", name="管理通行金鑰").click()

    row.get_by_role("button", name="移除").click()
    expect(page.locator(".notice")).to_contain_text("已移除通行金鑰")
    expect(page.locator("tr[data-passkey-row]")).to_have_count(0)
    assert [e.detail["passkey"] for e in events(provider, account_id, "binding.removed")] == ["辦公室筆電"]

    # The authenticator still offers the removed passkey: refused as unknown, nobody logged in.
    at_portal(page, provider, portal)
    passwordless(page)
    expect(page.locator(".error")).to_contain_text("未在本服務登記")
    assert page.url.startswith(provider.issuer + "/login")
    # It names no account now: counted in the metrics, not audited.
    assert not [e for e in events(provider, None, "login.failure") if e.method == "passkey"]


def test_second_factor_and_passwordless_login(servers, people):
    provider, portal = servers
    username, account_id, secret, page, authenticator = person(people, servers)
    register(page, provider, username, secret, "手機")

    # Password, then the passkey (offered before OTP once bound).
    at_portal(page, provider, portal)
    type_password(page, provider, username=username)
    expect(page.locator("p.for")).to_contain_text(username)
    use_passkey(page)
    acr, amr = portal_sees(page, portal)
    assert acr == LOA2 and amr == ["pwd", "pop", "user", "mfa"]

    # Passwordless: no account typed; the discoverable credential names it. Two factors.
    at_portal(page, provider, portal)
    page.get_by_role("link", name="以通行金鑰（Passkey）登入").click()
    with page.expect_request(lambda r: r.url.endswith("/login/factor/passkey")) as posted:
        use_passkey(page)
    acr, amr = portal_sees(page, portal)
    assert acr == LOA2 and amr == ["pop", "user", "mfa"]

    # The same answer replayed into a new login: refused (its challenge was the old login's, and used up).
    at_portal(page, provider, portal)
    form = page.locator("form[data-step=password]")
    replay = page.request.post(provider.issuer + "/login/factor/passkey", form={
        "tx": form.locator("input[name=tx]").input_value(), "csrf": form.locator("input[name=csrf]").input_value(),
        "credential": parse_qs(posted.value.post_data)["credential"][0]})
    assert "這次驗證已逾時或已使用過" in replay.text()

    successes = events(provider, account_id, "login.success")
    assert [e.method for e in successes][-2:] == ["password+passkey", "passkey"]
    assert authenticator.credentials()[0]["signCount"] >= 2


def test_cloned_passkey_is_refused_suspended_and_recorded(servers, people):
    provider, portal = servers
    username, account_id, secret, page, authenticator = person(people, servers)
    register(page, provider, username, secret, "隨身碟金鑰")
    at_portal(page, provider, portal)
    passwordless(page)
    portal_sees(page, portal)

    # Someone copied the key before it was used: the copy's counter is behind the original's.
    [original] = authenticator.credentials()
    assert original["signCount"] > 0, "the authenticator must count for clones to show"
    copy = {k: original[k] for k in ("credentialId", "isResidentCredential", "rpId", "privateKey", "userHandle")}
    thief = people.page()
    Authenticator(thief, {**copy, "signCount": 0})
    at_portal(thief, provider, portal)
    passwordless(thief)
    expect(thief.locator(".error")).to_contain_text("可能遭複製")
    [cloned] = events(provider, account_id, "passkey.cloned")
    assert cloned.detail["passkey"] == "隨身碟金鑰" and cloned.detail["stored_count"] == original["signCount"]

    # Suspended for the original too, until removed; OTP still gets the owner in.
    at_portal(page, provider, portal)
    passwordless(page)
    expect(page.locator(".error")).to_contain_text("疑似遭複製已停用")
    at_portal(page, provider, portal)
    type_password(page, provider, username=username)
    expect(page.locator("form[data-step=otp]")).to_be_visible()  # the suspended passkey is not offered
    type_otp(page, otp(provider, secret, steps=1))
    assert portal_sees(page, portal)[1] == ["pwd", "otp", "mfa"]
    page.goto(provider.issuer + "/account/passkeys")
    expect(page.locator("tr[data-passkey-row='隨身碟金鑰']")).to_contain_text("疑似遭複製")


# -- over HTTP, on both back ends -------------------------------------------------------------------
# The same ceremonies without a browser, so that PostgreSQL + Redis (the counter's row lock,
# the challenge's GETDEL) run them too, and so that answers no honest browser sends can be
# tried. The authenticator is a few lines of P-256 in the WebAuthn formats ("none"
# attestation, user present and verified); the provider under test is unchanged.
ISSUER = "http://localhost:8000"  # a secure context, so the factor is on


class SoftAuthenticator:
    def __init__(self, rp_id: str = "localhost", origin: str = ISSUER):
        self.rp_id, self.origin = rp_id, origin
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.id, self.count, self.handle = secrets.token_bytes(16), 0, None

    def _answer(self, kind: str, options: dict, auth_data: bytes, response: dict) -> str:
        client_data = json.dumps({"type": kind, "challenge": options["challenge"], "origin": self.origin}).encode()
        response = {"clientDataJSON": b64(client_data), **response}
        if kind == "webauthn.get":
            signed = self.key.sign(auth_data + hashlib.sha256(client_data).digest(), ec.ECDSA(hashes.SHA256()))
            response.update(authenticatorData=b64(auth_data), signature=b64(signed), userHandle=self.handle)
        return json.dumps({"id": b64(self.id), "rawId": b64(self.id), "type": "public-key", "response": response,
                           "clientExtensionResults": {}})

    def _auth_data(self, flags: int, rest: bytes = b"") -> bytes:
        return hashlib.sha256(self.rp_id.encode()).digest() + bytes([flags]) + self.count.to_bytes(4, "big") + rest

    def cose_key(self) -> dict:
        public = self.key.public_key().public_numbers()
        return {1: 2, 3: -7, -1: 1, -2: public.x.to_bytes(32, "big"), -3: public.y.to_bytes(32, "big")}

    def create(self, options: dict) -> str:
        self.handle = options["user"]["id"]
        cose = cbor2.dumps(self.cose_key())
        auth_data = self._auth_data(0x45, bytes(16) + len(self.id).to_bytes(2, "big") + self.id + cose)  # UP UV AT
        attestation = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data})
        return self._answer("webauthn.create", options, auth_data, {"attestationObject": b64(attestation)})

    def get(self, options: dict, count: int | None = None) -> str:
        self.count = self.count + 1 if count is None else count
        return self._answer("webauthn.get", options, self._auth_data(0x05), {})  # UP UV


def page_options(page) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="passkey-options"[^>]*>(.*?)</script>',
                                page.text, re.S).group(1))


def error_shown(page) -> str:
    found = re.search(r'<div class="error" role="alert">\s*<p>(.*?)</p>', page.text, re.S)
    return html.unescape(found.group(1)) if found else ""


def registered(provider) -> tuple:
    """(account id, its browser, the authenticator) with one passkey registered at the settings page."""
    account_id = provider.account("alice")
    browser = provider.browser()
    page = browser.password(browser.go("/account/passkeys"))  # the settings ask who it is first
    authenticator = SoftAuthenticator()
    page = browser.submit(page, "/account/passkeys", label="Laptop", credential=authenticator.create(page_options(page)))
    assert "?notice=passkey.added" in str(page.url), error_shown(page)
    return account_id, browser, authenticator


def passkey_page(provider, client_id: str):
    browser = provider.browser()
    page = browser.authorize(client_id)
    tx = forms(page.text)[0]["fields"]["tx"]
    return browser, browser.go(f"/login?tx={tx}&factor=passkey")


def test_passwordless_id_token_and_a_cloned_counter(make_provider):
    provider = make_provider(issuer=ISSUER)
    account_id, _, authenticator = registered(provider)
    client_id, secret = provider.client()

    browser, page = passkey_page(provider, client_id)
    params = callback(browser.submit(page, "/login/factor/passkey", credential=authenticator.get(page_options(page))))
    token = redeem(browser.http, client_id, secret, params["code"]).json()
    keys = KeySet.import_key_set(provider.http().get("/jwks").json())
    claims = jwt.decode(token["id_token"], keys).claims
    assert claims["acr"] == LOA2 and claims["amr"] == ["pop", "user", "mfa"]

    # A copy of the key answers with a counter that is not ahead of the one last seen.
    browser, page = passkey_page(provider, client_id)
    page = browser.submit(page, "/login/factor/passkey", credential=authenticator.get(page_options(page), count=1))
    assert page.status_code == 200 and "可能遭複製" in error_shown(page)
    with provider.svc.db.session() as session:
        [event] = session.query(AuditEvent).filter_by(account_id=account_id, event="passkey.cloned").all()
        assert (event.detail["stored_count"], event.detail["sent_count"]) == (1, 1)
    # Suspended: even a counter far ahead is refused now.
    browser, page = passkey_page(provider, client_id)
    page = browser.submit(page, "/login/factor/passkey", credential=authenticator.get(page_options(page), count=99))
    assert "疑似遭複製已停用" in error_shown(page)


def test_forged_answers_are_refused_and_a_challenge_is_used_once(make_provider):
    provider = make_provider(issuer=ISSUER)
    _, _, authenticator = registered(provider)
    client_id, _ = provider.client()
    browser, page = passkey_page(provider, client_id)
    options = page_options(page)

    honest = authenticator.get(options)
    forged = json.loads(honest)
    forged["response"]["signature"] = b64(b"\x30\x06\x02\x01\x01\x02\x01\x01")
    page = browser.submit(page, "/login/factor/passkey", credential=json.dumps(forged))
    assert "無法驗證" in error_shown(page)
    page = browser.submit(page, "/login/factor/passkey", credential=honest)  # its challenge went with the forgery
    assert "已逾時或已使用過" in error_shown(page)

    other_user = json.loads(authenticator.get(page_options(page)))
    other_user["response"]["userHandle"] = b64(secrets.token_bytes(32))
    page = browser.submit(page, "/login/factor/passkey", credential=json.dumps(other_user))
    assert "使用者識別與登記時不符" in error_shown(page)

    stranger = SoftAuthenticator()
    stranger.handle = b64(secrets.token_bytes(32))
    page = browser.submit(page, "/login/factor/passkey", credential=stranger.get(page_options(page)))
    assert "未在本服務登記" in error_shown(page)

    elsewhere = SoftAuthenticator(rp_id="evil.example", origin="https://evil.example")
    elsewhere.id, elsewhere.key, elsewhere.handle = authenticator.id, authenticator.key, authenticator.handle
    page = browser.submit(page, "/login/factor/passkey", credential=elsewhere.get(page_options(page)))
    assert "無法驗證" in error_shown(page)



def test_answers_naming_no_account_are_counted_not_audited(make_provider):
    """Anyone may post at the passwordless page, without a captcha: an answer that names no
    account (unreadable, on no challenge of the login, or a credential nobody registered)
    writes no audit row, which would be kept for ever, and is counted in the metrics. One
    that names an account is in its activity log."""
    provider = make_provider(issuer=ISSUER)
    account_id, _, authenticator = registered(provider)
    client_id, _ = provider.client()
    stranger = SoftAuthenticator()
    stranger.handle = b64(secrets.token_bytes(32))
    browser, page = passkey_page(provider, client_id)
    page = browser.submit(page, "/login/factor/passkey", credential="{}")
    unknown = stranger.get(page_options(page))
    page = browser.submit(page, "/login/factor/passkey", credential=unknown)
    assert "未在本服務登記" in error_shown(page)
    page = browser.submit(page, "/login/factor/passkey", credential=unknown)  # its challenge is used
    assert "已逾時或已使用過" in error_shown(page)
    metrics = provider.http().get("/metrics").text
    assert 'idp_logins_total{method="passkey",outcome="failure"} 3.0' in metrics

    forged = json.loads(authenticator.get(page_options(page)))
    forged["response"]["signature"] = b64(b"\x30\x06\x02\x01\x01\x02\x01\x01")
    page = browser.submit(page, "/login/factor/passkey", credential=json.dumps(forged))
    assert "無法驗證" in error_shown(page)
    with provider.svc.db.session() as session:
        failures = session.query(AuditEvent).filter_by(event="login.failure", method="passkey").all()
        assert [(e.account_id, e.detail["reason"]) for e in failures] == [(account_id, "invalid")]


def test_deeply_nested_answers_get_the_pages_error(make_provider):
    """JSON nested thousands deep, within the size limit: a clear error, at login (where anyone
    may post) and at registration, not a server error."""
    provider = make_provider(issuer=ISSUER)
    registered(provider)
    provider.account("bob")
    browser = provider.browser()
    settings = browser.password(browser.go("/account/passkeys"), username="bob")
    answer = json.loads(SoftAuthenticator().create(page_options(settings)))
    answer["response"]["clientDataJSON"] = b64(("[" * 2500 + "]" * 2500).encode())
    page = browser.submit(settings, "/account/passkeys", label="Phone", credential=json.dumps(answer))
    assert "error=passkey.error.invalid" in str(page.url)
    client_id, _ = provider.client()
    stranger, page = passkey_page(provider, client_id)
    page = stranger.submit(page, "/login/factor/passkey", credential="[" * 4000 + "]" * 4000)
    assert page.status_code == 200 and error_shown(page)


def test_a_public_key_no_signature_can_match_is_not_registered(make_provider):
    """An authenticator's key that is no point on its curve would never verify, yet count as a
    way in without the password (M4)."""
    class Broken(SoftAuthenticator):
        def cose_key(self):
            return {**super().cose_key(), -2: bytes(32), -3: bytes(32)}  # the point (0, 0)

    provider = make_provider(issuer=ISSUER)
    provider.account("alice")
    browser = provider.browser()
    page = browser.password(browser.go("/account/passkeys"))
    page = browser.submit(page, "/account/passkeys", label="辦公室 筆電", credential=Broken().create(page_options(page)))
    assert "error=passkey.error.invalid" in str(page.url)
    add = next(f for f in forms(page.text) if f["action"] == "/account/passkeys")
    assert add["fields"]["label"] == "辦公室 筆電"  # kept, to try again
    with provider.svc.db.session() as session:
        assert session.query(Binding).filter_by(factor="passkey").count() == 0


def test_a_refused_passkey_holds_one_database_connection_at_a_time(make_provider):
    """A refusal is audited after its session gave its connection back. Holding one while asking
    the pool for another, as many refusals at once as the pool's connections waited for each
    other until the pool's timeout (30 s): anyone may post them at a login page."""
    from sqlalchemy import event

    provider = make_provider(issuer=ISSUER)
    _, _, authenticator = registered(provider)
    client_id, _ = provider.client()
    held, most = {}, []

    def checkout(*_):
        me = threading.get_ident()
        held[me] = held.get(me, 0) + 1
        most.append(held[me])

    def checkin(*_):
        held[threading.get_ident()] -= 1

    event.listen(provider.svc.db.engine, "checkout", checkout)
    event.listen(provider.svc.db.engine, "checkin", checkin)
    browser, page = passkey_page(provider, client_id)
    page = browser.submit(page, "/login/factor/passkey", credential=SoftAuthenticator().get(page_options(page)))
    assert "未在本服務登記" in error_shown(page)
    with provider.svc.db.session() as session:
        binding = session.query(Binding).filter_by(factor="passkey").one()
        binding.data = {**binding.data, "sign_count": 10}
    page = browser.submit(page, "/login/factor/passkey", credential=authenticator.get(page_options(page), count=3))
    assert error_shown(page)  # its counter went back: refused as cloned
    assert most and max(most) == 1

def test_a_client_that_does_not_allow_passkeys_never_gets_one(make_provider):
    provider = make_provider(issuer=ISSUER)
    _, _, authenticator = registered(provider)
    client_id, _ = provider.client(allowed_factors=["password", "otp"])
    browser, page = passkey_page(provider, client_id)
    assert "/login/factor/passkey" not in page.text and "/login/factor/password" in page.text
    tx = forms(page.text)[0]["fields"]
    page = browser.go("/login/factor/passkey", "POST", {**tx, "credential": "{}"})
    # Nothing proven: the login stays where it is, at the password.
    assert page.status_code == 200 and "/login/factor/passkey" not in page.text and 'name="password"' in page.text


def test_the_last_passkey_stays_while_password_login_is_off(make_provider):
    provider = make_provider(issuer=ISSUER)
    account_id, browser, authenticator = registered(provider)
    page = browser.go("/account/password-login")
    assert "通行金鑰" in page.text  # what remains once password login is off
    page = browser.submit(page, "/account/password-login/disable")
    assert "?notice=password_login_disabled" in str(page.url)

    # Recovery refuses such an account: without its passkey it would have no way in at all.
    page = browser.go("/account/passkeys")
    page = browser.submit(page, "/account/passkeys/remove")
    assert "?error=passkey.error.last_passwordless" in str(page.url) and "無法移除" in error_shown(page)
    assert page.text.count("data-passkey-row=") == 1
    client_id, _ = provider.client()
    other, page = passkey_page(provider, client_id)
    assert "code" in callback(other.submit(page, "/login/factor/passkey", credential=authenticator.get(page_options(page))))

    # Another way in (a second passkey): then the first one can go.
    with provider.svc.db.session() as session:
        [laptop] = session.query(Binding).filter_by(account_id=account_id, factor="passkey").all()
        session.add(Binding(account_id=account_id, factor="passkey", external_id="phone", label="Phone",
                            data={**laptop.data, "credential_id": b64(b"phone")}))
    page = browser.go("/account/passkeys")
    page = browser.submit(page, "/account/passkeys/remove", id=laptop.id)
    assert "?notice=passkey.removed" in str(page.url), error_shown(page)


def test_a_suspended_passkey_does_not_allow_turning_password_login_off(make_provider):
    provider = make_provider(issuer=ISSUER)
    account_id, browser, _ = registered(provider)
    confirm = browser.go("/account/password-login")
    assert "/account/password-login/disable" in confirm.text

    with provider.svc.db.session() as session:  # what a cloned counter does (test above)
        [binding] = session.query(Binding).filter_by(account_id=account_id, factor="passkey").all()
        binding.data = {**binding.data, "cloned_at": provider.clock()}
    page = browser.go("/account")
    assert "/account/password-login\"" not in page.text  # no link to turn it off
    page = browser.go("/account/password-login")
    assert "?error=needs_passwordless" in str(page.url)
    page = browser.submit(confirm, "/account/password-login/disable")  # the page opened before
    assert "?error=needs_passwordless" in str(page.url) and "未停用的通行金鑰" in error_shown(page)
    with provider.svc.db.session() as session:
        assert not session.get(Account, account_id).password_login_disabled


def test_only_known_error_keys_are_shown(make_provider):
    provider = make_provider(issuer=ISSUER)
    _, browser, _ = registered(provider)
    page = browser.go("/account/passkeys?error=passkey.error.registered")
    assert "已經登記過了" in error_shown(page)
    crafted = "passkey.error.Your account is locked: call +886 2 1234 5678"
    page = browser.go("/account/passkeys?" + urlencode({"error": crafted}))
    assert page.status_code == 200 and error_shown(page) == "" and "1234 5678" not in page.text
