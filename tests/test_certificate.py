"""Certificate login and binding (SPEC A3) through the provider's pages.

The HiPKI component is simulated in Python: what its MakeSignature would
return (tests/pki_fixtures.py) is posted the way the page's script posts it.
The test PKI's OCSP and CRL responders run on loopback, so revocation takes
the real network path.
"""

from __future__ import annotations

import re

import pytest
from cryptography.x509.oid import NameOID
from joserfc import jwt
from joserfc.jwk import KeySet
from sqlalchemy import select

from idp.storage.models import AuditEvent, Binding
from tests.harness import callback, forms, redeem
from tests.test_account import _notice, _signed_in
from tests.test_totp import _bind, _code, _error

INVALID = "憑證無效，請至內政部憑證管理中心網站查詢憑證狀態"
LOA3 = "urn:idp:loa:3"


@pytest.fixture
def make(make_provider, tpki):
    def build(**overrides):
        overrides.setdefault("mfa", True)
        return make_provider(trust_dir=str(tpki.dir / "trust"), **overrides)
    return build


def external_id(tpki, name: str) -> str:
    cert = tpki.cert(name)
    serial = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value
    return f"{cert.issuer.rfc4514_string()}|{serial}"


def bind(provider, tpki, account_id: str, name: str = "citizen") -> None:
    with provider.svc.db.session() as session:
        session.add(Binding(account_id=account_id, factor="certificate", external_id=external_id(tpki, name), label=name))


def challenge(page) -> str:
    return re.search(r'name="challenge" value="([^"]+)"', page.text).group(1)


def cert_page(browser, page):
    """From the password page (the default first factor) to the certificate page, by its link."""
    link = re.search(r'href="(/login\?tx=[^"]+factor=certificate)"', page.text).group(1).replace("&amp;", "&")
    page = browser.go(link)
    assert page.status_code == 200 and 'action="/login/factor/certificate"' in page.text
    return page


def sign(tpki, browser, page, name="citizen", *, over: str | None = None, **fields):
    """What the page's script posts after the component's MakeSignature (PKCS7)."""
    tbs = over if over is not None else challenge(page)
    return browser.submit(page, "/login/factor/certificate", signature=tpki.make_signature(name, tbs.encode()), **fields)


def id_token(browser, client_id, client_secret, response) -> dict:
    params = callback(response)
    token = redeem(browser.http, client_id, client_secret, params["code"]).json()
    return jwt.decode(token["id_token"], KeySet.import_key_set(browser.http.get("/jwks").json())).claims


# -- login -------------------------------------------------------------------------------
def test_login_with_a_bound_certificate_reaches_the_certificate_level(make, tpki):
    provider = make()
    bind(provider, tpki, provider.account("alice"))
    client_id, client_secret = provider.client()
    browser = provider.browser()
    page = cert_page(browser, browser.authorize(client_id))
    # The page reads the local component's p11Image.bmp: on this page only, the CSP lets it.
    csp = page.headers["content-security-policy"]
    assert "img-src 'self' data: http://localhost:61161 http://127.0.0.1:61161;" in csp
    assert "connect-src 'self';" in csp  # signing goes through the component's popup, not fetch
    nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
    assert f'<script nonce="{nonce}">' in page.text and "/p11Image.bmp" in page.text and "MakeSignature" in page.text
    assert 'name="pin"' not in page.text  # the PIN goes to the component only
    claims = id_token(browser, client_id, client_secret, sign(tpki, browser, page))  # mfa on: no OTP asked
    assert claims["amr"] == ["sc", "pin", "mfa"] and claims["acr"] == LOA3
    with provider.svc.db.session() as session:
        events = [e.event for e in session.execute(select(AuditEvent)).scalars()]
    assert "login.success" in events
    assert "factor=certificate" in provider.browser().authorize(client_id).text  # the login page offers it


def test_pkcs1_form_with_the_certificate_alongside(make, tpki):
    provider = make(mfa=False)
    bind(provider, tpki, provider.account("alice"))
    client_id, _ = provider.client()
    browser = provider.browser()
    page = cert_page(browser, browser.authorize(client_id))
    response = browser.submit(page, "/login/factor/certificate", signature=tpki.make_pkcs1("citizen", challenge(page).encode()),
                              certb64=tpki.certb64("citizen"))
    assert "code" in callback(response)


def test_an_unbound_certificate_says_how_to_bind_it(make, tpki):
    provider = make()
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    page = sign(tpki, browser, cert_page(browser, browser.authorize(client_id)))
    assert page.status_code == 200 and "尚未綁定" in _error(page) and "登入設定" in _error(page)
    assert 'action="/login/factor/certificate"' in page.text  # a fresh challenge to try again


@pytest.mark.parametrize("name", ["revoked_ocsp", "revoked_crl"])
def test_a_revoked_card_gets_the_moica_message(make, tpki, name):
    provider = make()
    bind(provider, tpki, provider.account("alice"), name)
    client_id, _ = provider.client()
    browser = provider.browser()
    page = sign(tpki, browser, cert_page(browser, browser.authorize(client_id)), name)
    assert INVALID in _error(page)


def test_an_expired_card_gets_the_moica_message(make, tpki):
    provider = make()
    bind(provider, tpki, provider.account("alice"))
    provider.clock.now = tpki.cert("citizen").not_valid_after_utc.timestamp() + 86400
    client_id, _ = provider.client()
    browser = provider.browser()
    page = sign(tpki, browser, cert_page(browser, browser.authorize(client_id)))
    assert INVALID in _error(page)


def test_an_untrusted_ca_and_an_encryption_certificate_are_refused(make, tpki):
    provider = make()
    client_id, _ = provider.client()
    browser = provider.browser()
    page = sign(tpki, browser, cert_page(browser, browser.authorize(client_id)), "forged")
    assert "不是本服務接受的憑證機構" in _error(page)
    page = sign(tpki, browser, page, "citizen_enc")
    assert "加密憑證" in _error(page)


def test_a_card_with_a_weak_key_is_refused_in_the_users_language(make, tpki):
    """A bound certificate of a trusted CA whose key is RSA-1024 does not log in (PROTOCOLS 2)."""
    provider = make()
    bind(provider, tpki, provider.account("alice"), "weak_rsa")
    client_id, _ = provider.client()
    browser = provider.browser()
    page = sign(tpki, browser, cert_page(browser, browser.authorize(client_id)), "weak_rsa")
    assert "金鑰強度不足" in _error(page) and "2048" in _error(page)
    english = provider.browser()
    page = sign(tpki, english, cert_page(english, english.authorize(client_id, ui_locales="en")), "weak_rsa")
    assert "too weak" in _error(page)


def test_a_replayed_signature_is_refused(make, tpki):
    provider = make()
    bind(provider, tpki, provider.account("alice"))
    client_id, _ = provider.client()
    browser = provider.browser()
    page = cert_page(browser, browser.authorize(client_id))
    used = challenge(page)
    signature = tpki.make_signature("citizen", used.encode())
    callback(browser.submit(page, "/login/factor/certificate", signature=signature))
    # Another login in the same browser: the old signature, with its challenge or the new one.
    page = cert_page(browser, browser.authorize(client_id, prompt="login"))
    again = browser.submit(page, "/login/factor/certificate", signature=signature, challenge=used)
    assert "已使用過或已逾時" in _error(again)
    again = browser.submit(again, "/login/factor/certificate", signature=signature)
    assert "已使用過或已逾時" in _error(again)
    callback(sign(tpki, browser, again))  # a signature over this page's challenge still works


def test_a_challenge_from_another_transaction_is_refused(make, tpki):
    provider = make()
    bind(provider, tpki, provider.account("alice"))
    client_id, _ = provider.client()
    browser = provider.browser()
    first = cert_page(browser, browser.authorize(client_id))
    second = cert_page(browser, browser.authorize(client_id))
    page = sign(tpki, browser, second, over=challenge(first), challenge=challenge(first))
    assert "已使用過或已逾時" in _error(page)
    callback(sign(tpki, browser, page))


def test_a_failure_counts_towards_the_lockout_only_for_a_known_account(make, tpki):
    provider = make(mfa=False)
    alice = provider.account("alice")
    bind(provider, tpki, alice)
    client_id, _ = provider.client()
    browser = provider.browser()
    page = cert_page(browser, browser.authorize(client_id))
    for _ in range(4):  # unknown account (the signature is not even over this challenge): no lockout
        page = sign(tpki, browser, page, over="idp-login:someone-elses")
        assert "已使用過或已逾時" in _error(page) or "簽章" in _error(page)
    assert provider.svc.lockout.locked_until("alice") is None
    callback(sign(tpki, browser, page))



def test_the_owners_expired_card_does_not_lock_the_account(make, tpki):
    """Tried again and again after 憑證無效, as users do: no guess, and it can never succeed.
    Three tries locked the account out of password and OTP too."""
    provider = make(mfa=False)
    provider.clock.now = tpki.cert("citizen").not_valid_after_utc.timestamp() + 86400
    bind(provider, tpki, provider.account("alice"))
    client_id, _ = provider.client()
    browser = provider.browser()
    callback(browser.password(browser.authorize(client_id)))  # the account known: a portal's step-up
    page = browser.authorize(client_id, acr_values="urn:idp:loa:3")
    for _ in range(3):
        page = sign(tpki, browser, page)
        assert INVALID in _error(page)
    assert provider.svc.lockout.locked_until("alice") is None

# -- step-up -------------------------------------------------------------------------------
def test_step_up_from_password_and_otp_asks_only_for_the_certificate(make, tpki):
    provider = make()
    alice = provider.account("alice")
    client_id, client_secret = provider.client()
    browser = provider.browser()
    _, secret = _bind(provider, browser, client_id)
    provider.clock.advance(30)
    page = browser.password(browser.authorize(client_id))
    claims = id_token(browser, client_id, client_secret, browser.submit(page, "/login/factor/otp", otp=_code(provider, secret)))
    assert claims["acr"] == "urn:idp:loa:2"
    bind(provider, tpki, alice)
    page = browser.authorize(client_id, acr_values=LOA3)
    assert page.status_code == 200 and 'action="/login/factor/certificate"' in page.text
    assert 'name="password"' not in page.text and 'name="otp"' not in page.text
    assert not [f for f in forms(page.text) if "/login/factor/" in f["action"] and "certificate" not in f["action"]]
    claims = id_token(browser, client_id, client_secret, sign(tpki, browser, page))
    assert claims["acr"] == LOA3 and "sc" in claims["amr"]


def test_step_up_with_someone_elses_certificate_is_refused_and_counts(make, tpki):
    provider = make(mfa=False)
    bind(provider, tpki, provider.account("alice"))
    bind(provider, tpki, provider.account("bob"), "citizen_ec")
    client_id, _ = provider.client()
    browser = provider.browser()
    callback(browser.password(browser.authorize(client_id)))
    page = browser.authorize(client_id, acr_values=LOA3)
    for _ in range(2):
        page = sign(tpki, browser, page, "citizen_ec")
        assert "綁定的不是這個帳號" in _error(page)
    page = sign(tpki, browser, page, "citizen_ec")  # the third failure of a known account locks it
    assert provider.svc.lockout.locked_until("alice") is not None
    assert "暫時停用" in _error(page)


def test_step_up_without_a_bound_certificate_is_unmet(make, tpki):
    provider = make(mfa=False)
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    callback(browser.password(browser.authorize(client_id)))
    page = browser.authorize(client_id, acr_values=LOA3)
    assert "error=unmet_authentication_requirements" in page.headers.get("location", "")


# -- binding in the account area -------------------------------------------------------------
@pytest.fixture
def user(make):
    """alice (ID number ending 6789, as the test citizen's) with password + OTP; (provider, client_id, secret)."""
    provider = make()
    provider.account("alice", national_id="A123456789")
    client_id, _ = provider.client()
    _, secret = _bind(provider, provider.browser(), client_id)
    provider.clock.advance(30)
    return provider, client_id, secret



def test_forced_binding_offers_the_card_to_a_personal_account_then_logs_in_again_with_it(make, tpki):
    """M1, seed 001 (系統將強制擇一方式進行綁定): OTP or the card; an AA account binds OTP only."""
    provider = make()
    provider.account("alice")
    provider.account("admin", kind="aa", org="臺北市立測試國民小學")
    client_id, client_secret = provider.client()
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id))
    assert 'action="/login/bind/otp"' in page.text and 'action="/login/bind/certificate"' in page.text
    assert "http://localhost:61161" in page.headers["content-security-policy"]  # the component's image
    page = browser.submit(page, "/login/bind/certificate", signature=tpki.make_signature("citizen", challenge(page).encode()))
    assert "自然人憑證綁定完成" in page.text and 'action="/login/factor/password"' in page.text
    page = browser.password(page)
    claims = id_token(browser, client_id, client_secret, sign(tpki, browser, page))
    assert claims["acr"] == LOA3
    aa = provider.browser()
    page = aa.password(aa.authorize(client_id), username="admin")
    assert 'action="/login/bind/otp"' in page.text and "/login/bind/certificate" not in page.text

def bind_page(browser):
    page = browser.go("/account/certificate")
    assert page.status_code == 200 and 'action="/account/certificate"' in page.text
    assert "http://localhost:61161" in page.headers["content-security-policy"]
    return page


def bind_with(tpki, browser, page, name="citizen"):
    return browser.submit(page, "/account/certificate", signature=tpki.make_signature(name, challenge(page).encode()))


def test_bind_from_the_settings_then_log_in_with_the_card(user, tpki):
    provider, client_id, secret = user
    browser = _signed_in(provider, client_id, secret)
    settings = browser.go("/account")
    row = re.search(r'<tr data-method="certificate">(.*?)</tr>', settings.text, re.S).group(1)
    assert 'href="/account/certificate"' in row and "✗" in row
    page = bind_with(tpki, browser, bind_page(browser))
    assert "自然人憑證已綁定" in _notice(page)
    row = re.search(r'<tr data-method="certificate">(.*?)</tr>', page.text, re.S).group(1)
    assert "✓" in row
    with provider.svc.db.session() as session:
        assert session.execute(select(AuditEvent).where(AuditEvent.event == "binding.created")).scalars().all()
    # A new browser logs in with the card alone.
    fresh = provider.browser()
    assert "code" in callback(sign(tpki, fresh, cert_page(fresh, fresh.authorize(client_id))))


def test_binding_checks_the_last_four_id_digits(user, tpki):
    provider, client_id, secret = user
    browser = _signed_in(provider, client_id, secret)
    page = bind_with(tpki, browser, bind_page(browser), "citizen_ec")  # ID ending 6780
    assert "末四碼" in _error(page)
    with provider.svc.db.session() as session:
        assert not session.execute(select(Binding).where(Binding.factor == "certificate")).scalars().all()


def test_a_certificate_bound_elsewhere_is_refused(user, tpki):
    provider, client_id, secret = user
    bind(provider, tpki, provider.account("bob"))
    browser = _signed_in(provider, client_id, secret)
    page = bind_with(tpki, browser, bind_page(browser))
    assert "已綁定其他帳號" in _error(page)


def test_an_organisation_certificate_cannot_bind_a_personal_account(user, tpki):
    provider, client_id, secret = user
    browser = _signed_in(provider, client_id, secret)
    page = bind_with(tpki, browser, bind_page(browser), "org")
    assert "個人帳號請使用自然人憑證" in _error(page)


def test_an_aa_account_binds_and_logs_in_with_its_organisation_certificate(make, tpki):
    provider = make()
    provider.account("alice", kind="aa", org="臺北市立測試國民小學")
    client_id, _ = provider.client()
    _, secret = _bind(provider, provider.browser(), client_id)
    provider.clock.advance(30)
    browser = _signed_in(provider, client_id, secret)
    assert "個人帳號請使用自然人憑證" in _error(bind_with(tpki, browser, bind_page(browser), "citizen"))
    assert "自然人憑證已綁定" in _notice(bind_with(tpki, browser, bind_page(browser), "org"))
    fresh = provider.browser()
    assert "code" in callback(sign(tpki, fresh, cert_page(fresh, fresh.authorize(client_id)), "org"))


def test_another_card_of_the_same_organisation_does_not_log_in_the_aa_account(make, tpki):
    """Every card of a school carries its organisation id: the one the AA account bound logs in,
    another of the school's cards (another holder, another office) does not, and can be bound
    by a second AA account of the school."""
    provider = make()
    for username in ("alice", "bob"):
        provider.account(username, kind="aa", org="臺北市立測試國民小學")
    client_id, _ = provider.client()
    secrets_ = {}
    for username in ("alice", "bob"):
        _, secrets_[username] = _bind(provider, provider.browser(), client_id, username=username)
    provider.clock.advance(30)
    alice = _signed_in(provider, client_id, secrets_["alice"])
    assert "自然人憑證已綁定" in _notice(bind_with(tpki, alice, bind_page(alice), "org"))
    stranger = provider.browser()
    page = sign(tpki, stranger, cert_page(stranger, stranger.authorize(client_id)), "org_other")
    assert page.status_code == 200 and "尚未綁定" in _error(page)
    bob = _signed_in(provider, client_id, secrets_["bob"], username="bob")
    assert "自然人憑證已綁定" in _notice(bind_with(tpki, bob, bind_page(bob), "org_other"))


def test_rebinding_a_replaced_card_makes_the_old_one_useless(make, tpki):
    provider = make()
    provider.account("alice")  # no ID number on file: any citizen card may bind
    client_id, _ = provider.client()
    _, secret = _bind(provider, provider.browser(), client_id)
    provider.clock.advance(30)
    browser = _signed_in(provider, client_id, secret)
    bind_with(tpki, browser, bind_page(browser))
    page = bind_page(browser)
    assert "data-current" in page.text
    assert "自然人憑證已綁定" in _notice(bind_with(tpki, browser, page, "citizen_ec"))
    with provider.svc.db.session() as session:
        rows = session.execute(select(Binding).where(Binding.factor == "certificate")).scalars().all()
        assert [b.external_id for b in rows] == [external_id(tpki, "citizen_ec")]
        assert session.execute(select(AuditEvent).where(AuditEvent.event == "binding.replaced")).scalars().all()
    fresh = provider.browser()
    page = sign(tpki, fresh, cert_page(fresh, fresh.authorize(client_id)), "citizen")
    assert "尚未綁定" in _error(page)
    assert "code" in callback(sign(tpki, fresh, page, "citizen_ec"))


def test_a_binding_challenge_is_single_use(user, tpki):
    provider, client_id, secret = user
    browser = _signed_in(provider, client_id, secret)
    page = bind_page(browser)
    signature = tpki.make_signature("citizen", challenge(page).encode())
    browser.submit(page, "/account/certificate", signature=signature)
    again = browser.submit(page, "/account/certificate", signature=signature)
    assert "已使用過或已逾時" in _error(again)


def test_the_page_texts_exist_in_english(make, tpki):
    provider = make()
    client_id, _ = provider.client()
    browser = provider.browser()
    page = cert_page(browser, browser.authorize(client_id, ui_locales="en"))
    assert "HiPKI" in page.text and "Check again" in page.text and "3 wrong PINs" in page.text
