"""Passkeys (issue 5, SPEC A8) in a real browser with a real authenticator's protocol.

Debian's Chromium (Playwright) with Chromium's virtual authenticator over CDP
(``WebAuthn.addVirtualAuthenticator``: CTAP2, internal transport, resident keys, user
verification), against a live provider whose issuer is ``http://localhost:PORT`` (an IP
address cannot be a WebAuthn RP ID) and the school portal, whose page shows the ID
token's ``acr`` and ``amr`` as the relying party received them.

One provider, one portal and one Chromium for the module (two factors for everyone,
``mfa=True``, the captcha always); each test has its own account and its own browser contexts, each page
its own authenticator. SQLite and the in-process store only: the browser tests are the
slow ones.
"""

from __future__ import annotations

import contextlib
import secrets
from urllib.parse import parse_qs

import pytest

from clients.school_portal import create_app as create_portal
from idp.settings import Settings
from idp.storage.models import AuditEvent
from idp.web.app import create_app
from tests import live
from tests.test_e2e import NAME, LiveProvider
from tests.test_journeys import People, bound_otp, chromium, otp, type_otp, type_password  # noqa: F401 (fixture)

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
    assert [e.detail["reason"] for e in events(provider, None, "login.failure") if e.method == "passkey"][-1:] == ["unknown"]


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
