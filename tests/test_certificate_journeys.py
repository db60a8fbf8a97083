"""Certificate login (SPEC A3) in a real browser, with a real card reader on the desk.

The card is a SoftHSM2 token holding a test citizen's key and certificate (the
test PKI has the real MOICA profile; ``tests/hipki_cards.py``), the HiPKI
component is ``clients/hipki_signer`` in its own process on loopback, the
provider runs under uvicorn with the test PKI's anchors and its local OCSP and
CRL responders, and the school portal is the relying party. The page's own
script finds the component, reader and card through ``p11Image.bmp``, and signs
through the component's popup; a person types the PIN and clicks.

One set of servers and one Chromium for the module; each journey opens its own
browser contexts and puts its own card in the reader. SQLite and the in-process
store only: the same flows run on both back ends without a browser in
tests/test_certificate.py.
"""

from __future__ import annotations

import base64
import contextlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, urlencode

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from clients.school_portal import create_app as create_portal
from idp.settings import Settings
from idp.web.app import create_app
from tests import live, pki_fixtures  # noqa: F401 (a type)
from tests.hipki_cards import PIN, CardReader, desk, signer
from tests.test_e2e import NAME, LiveProvider
from tests.test_journeys import bound_otp, expect, otp, start_at_portal, type_otp, type_password

LOA3 = "urn:idp:loa:3"
INVALID = "憑證無效，請至內政部憑證管理中心網站查詢憑證狀態"
CARDS = ("citizen", "revoked_ocsp", "revoked_crl", "forged")


@dataclass
class World:
    provider: LiveProvider
    portal: str
    reader: CardReader
    pki: "pki_fixtures.TestPKI"


def expired_card(pki, directory) -> tuple[bytes, object]:
    """A citizen card whose certificate ran out yesterday: (certificate DER, key PEM path)."""
    template = pki.cert("citizen")
    ca_cert, ca_key = pki.ca("moica")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.now(timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(template.subject).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(days=5 * 365)).not_valid_after(now - timedelta(days=1)))
    for ext in template.extensions:
        if ext.oid != x509.oid.ExtensionOID.SUBJECT_KEY_IDENTIFIER:
            builder = builder.add_extension(ext.value, ext.critical)
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    cert = builder.sign(ca_key, hashes.SHA256())
    path = directory / "expired.key.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return cert.public_bytes(serialization.Encoding.DER), path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("certificate-journeys")
    with contextlib.ExitStack() as stack:
        pki, reader = stack.enter_context(desk(root))
        for name in CARDS:
            reader.make_leaf(pki, name)
        reader.make_leaf(pki, "citizen", "spare")  # the lock journey's
        reader.make("expired", *expired_card(pki, root))

        sock, url = stack.enter_context(live.reserve("localhost"))
        component = stack.enter_context(signer(reader, allow_origin=url))
        settings = Settings.from_env(
            {}, issuer=url, database_url=f"sqlite:///{root}/idp.sqlite3", redis_url="", keys_dir=str(root / "keys"),
            captcha="always", mfa=True, trust_dir=str(pki.dir / "trust"), hipki_url=component,
            crl_cache_dir=str(root / "crl"))
        app = create_app(settings)
        stack.callback(app.state.svc.db.engine.dispose)
        provider = LiveProvider(app, stack.enter_context(live.serve(app, sock, url)))

        portal_sock, portal_url = stack.enter_context(live.reserve("localhost"))
        client_id, secret = provider.client(client_name="校務行政系統 2.0", redirect_uris=[portal_url + "/callback"],
                                            post_logout_redirect_uris=[portal_url + "/"])
        portal = create_portal(provider.issuer, client_id, secret, portal_url, secrets.token_urlsafe(32))
        stack.enter_context(live.serve(portal, portal_sock, portal_url, health="/"))
        yield World(provider, portal_url, reader, pki)


# -- what the person sees and does ---------------------------------------------------------------
def expect_checks_pass(page) -> None:
    """The seed's check table: component found, a card in the reader, the PIN asked for."""
    checks = page.locator("table.checks")
    expect(checks.locator("tr[data-check=component] [data-status]")).to_have_text(re.compile(r"^已安裝，版本 \d"))
    expect(checks.locator("tr[data-check=card] [data-status]")).to_have_text(re.compile(r"^卡號 [0-9a-f]{16}$"))
    expect(checks.locator("tr[data-check=pin] [data-status]")).to_have_text("請輸入 PIN 碼")


def type_pin(page, pin: str = PIN) -> None:
    page.get_by_label("PIN 碼", exact=True).fill(pin)
    page.get_by_role("button", name="驗證", exact=True).click()


def card_login_page(page, world: World) -> None:
    """At the portal: 登入, then the login page's way to the card."""
    start_at_portal(page, world.provider, world.portal)
    page.get_by_role("link", name="改用自然人憑證登入").click()
    expect(page.get_by_role("heading", name="自然人憑證登入")).to_be_visible()
    expect_checks_pass(page)


def expect_refused(page, text: str) -> None:
    """The provider refused the card: the login page again, its message, and the checks ready for another try."""
    expect(page.locator(".error").first).to_contain_text(text)
    expect(page.get_by_role("heading", name="自然人憑證登入")).to_be_visible()
    expect_checks_pass(page)


# -- the journeys ----------------------------------------------------------------------------------
def test_bind_the_card_log_out_and_log_in_with_it(world, people):
    provider = world.provider
    account_id = provider.account("alice", name=NAME, email="alice@example.tw", national_id="A123456789")
    secret = bound_otp(provider, account_id)
    world.reader.remove()

    # The login settings ask who it is (password, then the bound OTP), then the card's page.
    page = people.page()
    page.goto(provider.issuer + "/account")
    type_password(page, provider)
    type_otp(page, otp(provider, secret))
    page.wait_for_url(provider.issuer + "/account")
    page.locator("tr[data-method=certificate]").get_by_role("link").first.click()
    expect(page.get_by_role("heading", name="綁定自然人憑證")).to_be_visible()
    people.shot(page, "bind-no-card")

    # No card yet: the card line says so; put it in and check again.
    checks = page.locator("table.checks")
    expect(checks.locator("tr[data-check=component] [data-status]")).to_have_text(re.compile(r"^已安裝"))
    expect(checks.locator("tr[data-check=card] [data-status]")).to_have_text(re.compile("偵測不到卡片"))
    expect(page.get_by_label("PIN 碼", exact=True)).to_be_disabled()
    world.reader.insert("citizen")
    checks.locator("tr[data-check=card]").get_by_role("button", name="重新檢查").click()
    expect_checks_pass(page)
    people.shot(page, "bind")
    type_pin(page)
    expect(page.locator(".notice")).to_contain_text("自然人憑證已綁定")
    expect(page.locator("tr[data-method=certificate]")).to_contain_text("✓")

    # Log out everywhere, then log in at the portal with the card alone.
    page.goto(provider.issuer + "/logout")
    page.get_by_role("button", name="登出", exact=True).click()
    card_login_page(page, world)
    people.shot(page, "login")
    type_pin(page)
    page.wait_for_url(world.portal + "/")
    main = page.locator("main")
    expect(main).to_contain_text(f"歡迎，{NAME}")
    expect(main).to_contain_text(LOA3)
    expect(main.locator(".tag code")).to_have_text(["sc", "pin", "mfa"])  # RFC 8176, as the portal got them
    people.shot(page, "portal")


def test_wrong_pins_warn_then_the_card_locks(world, people):
    world.reader.insert("spare")
    page = people.page()
    card_login_page(page, world)
    for _ in range(2):
        type_pin(page, "000000")
        error = page.locator("[data-hipki-error]")
        expect(error).to_contain_text("PIN 碼錯誤")
        expect(error).to_contain_text("連續輸入錯誤 3 次，卡片將被鎖住")
        expect(page.get_by_label("PIN 碼", exact=True)).to_be_enabled()
    people.shot(page, "wrong-pin")
    type_pin(page, "000000")
    expect(page.locator("[data-hipki-error]")).to_contain_text("卡片已鎖住")
    expect(page.locator("tr[data-check=pin] [data-status]")).to_contain_text("卡片已鎖住")
    expect(page.get_by_label("PIN 碼", exact=True)).to_be_disabled()
    people.shot(page, "locked")

    # Locked is locked: after checking again, even the right PIN is refused by the card.
    page.locator("tr[data-check=card]").get_by_role("button", name="重新檢查").click()
    expect_checks_pass(page)
    type_pin(page, PIN)
    expect(page.locator("[data-hipki-error]")).to_contain_text("卡片已鎖住")
    assert page.url.startswith(world.provider.issuer + "/login")


def test_a_card_taken_out_before_signing(world, people):
    world.reader.insert("citizen")
    page = people.page()
    card_login_page(page, world)
    world.reader.remove()
    type_pin(page)
    expect(page.locator("[data-hipki-error]")).to_contain_text("偵測不到卡片，請將憑證 IC 卡插入讀卡機")
    world.reader.insert("citizen")
    page.locator("tr[data-check=card]").get_by_role("button", name="重新檢查").click()
    expect_checks_pass(page)


def test_a_site_the_component_does_not_trust(world, people):
    """The component trusts the provider as http://localhost:PORT; the same pages reached as
    http://127.0.0.1:PORT are another site to it."""
    world.reader.insert("citizen")
    page = people.page()
    start_at_portal(page, world.provider, world.portal)
    page.goto(page.url.replace("//localhost:", "//127.0.0.1:", 1))
    page.get_by_role("link", name="改用自然人憑證登入").click()
    checks = page.locator("table.checks")
    expect(checks.locator("tr[data-check=component] [data-status]")).to_have_text(re.compile(r"^已安裝"))
    expect(checks.locator("tr[data-check=card] [data-status]")).to_contain_text("尚未授權本網站")
    expect(page.get_by_label("PIN 碼", exact=True)).to_be_disabled()


@pytest.mark.parametrize(("card", "asked"), [("revoked_ocsp", "/ocsp/moica"), ("revoked_crl", "/crl/moica.crl")])
def test_a_revoked_card_is_refused(world, people, card, asked):
    world.reader.insert(card)
    before = world.pki.server.hits[asked]
    page = people.page()
    card_login_page(page, world)
    type_pin(page)
    expect_refused(page, INVALID)
    assert world.pki.server.hits[asked] > before  # the answer came from that source
    people.shot(page, card)


def test_an_expired_card_is_refused(world, people):
    world.reader.insert("expired")
    page = people.page()
    card_login_page(page, world)
    type_pin(page)
    expect_refused(page, INVALID)


def test_a_card_from_an_untrusted_ca_is_refused(world, people):
    world.reader.insert("forged")
    page = people.page()
    card_login_page(page, world)
    type_pin(page)
    expect_refused(page, "不是本服務接受的憑證機構")


# -- what an attacker between the page and the provider could try ------------------------------
def rewrite_signature(page, issuer: str, change) -> list[str]:
    """Route the page's post of the card's answer through ``change(signature) -> signature``;
    returns the signatures the page sent."""
    sent: list[str] = []

    def handle(route):
        fields = parse_qs(route.request.post_data or "", keep_blank_values=True)
        sent.append(fields["signature"][0])
        fields["signature"] = [change(fields["signature"][0])]
        route.continue_(post_data=urlencode({k: v[0] for k, v in fields.items()}))

    page.route(issuer + "/login/factor/certificate", handle)
    return sent


def test_a_signature_over_another_challenge_is_refused(world, people):
    world.reader.insert("citizen")
    first = people.page()
    card_login_page(first, world)
    captured = rewrite_signature(first, world.provider.issuer, lambda s: s)
    with first.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/login/factor/certificate")):
        type_pin(first)
    assert captured, "the page posted no signature"

    # Another login: the card signs this page's challenge, the old signature is sent instead.
    again = people.page()
    card_login_page(again, world)
    rewrite_signature(again, world.provider.issuer, lambda s: captured[0])
    type_pin(again)
    expect_refused(again, "此驗證請求已使用過或已逾時")


def test_a_tampered_signature_is_refused(world, people):
    world.reader.insert("citizen")
    page = people.page()
    card_login_page(page, world)

    def flip_last_byte(signature: str) -> str:  # the end of the CMS is the RSA signature value
        der = bytearray(base64.b64decode(signature))
        der[-1] ^= 0x01
        return base64.b64encode(bytes(der)).decode()

    rewrite_signature(page, world.provider.issuer, flip_last_byte)
    type_pin(page)
    expect_refused(page, "簽章驗證失敗")
