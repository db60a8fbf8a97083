"""The login-settings pages and the lost-phone reset (SPEC M2-M6) as a user meets them."""

import datetime as dt
import logging
import re
import threading
import time
from types import SimpleNamespace
from urllib.parse import urlencode

import pyotp
import pytest
from sqlalchemy import text

from idp.accounts import reset_bindings
from idp.factors import certificate
from idp.storage.models import Account, AuditEvent, Binding
from idp.web import federation, reset
from tests.harness import PASSWORD, callback, forms, language_link, redeem, takes
from tests.mailserver import REFUSED_DOMAIN
from tests.test_totp import _bind, _code, _error, _secret, as_typed


@pytest.fixture
def user(make_provider, smtp_server):
    """A provider mailing through a real SMTP server, and alice with OTP bound;
    returns (provider, client_id, secret)."""
    return _with_alice(make_provider(mfa=True, **smtp_server.settings()))


def _with_alice(provider):
    account_id = provider.account("alice")
    with provider.svc.db.session() as session:
        session.get(Account, account_id).email_verified = True
    client_id, _ = provider.client()
    _, secret = _bind(provider, provider.browser(), client_id)
    provider.clock.advance(30)
    return provider, client_id, secret


def _signed_in(provider, client_id, secret, username="alice"):
    """A browser with an SSO session from password + OTP."""
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id), username=username)
    callback(browser.submit(page, "/login/factor/otp", otp=_code(provider, secret)))
    provider.clock.advance(30)
    return browser


def _notice(page) -> str:
    found = re.search(r'<div class="notice" role="status">\s*<p>(.*?)</p>', page.text, re.S)
    return found.group(1) if found else ""


def test_entering_settings_asks_for_the_bound_factor_again(user):
    provider, client_id, secret = user
    browser = _signed_in(provider, client_id, secret)
    provider.clock.advance(600)  # the OTP of the login is now too old for the settings (M2)
    page = browser.go("/account")
    assert 'name="otp"' in page.text and 'name="password"' not in page.text
    assert "/login/reset" not in page.text and "無法使用帳號密碼登入" not in page.text  # nothing to reset from here
    page = browser.submit(page, "/login/factor/otp", otp=_code(provider, secret))
    assert page.status_code == 200 and "登入設定" in page.text
    row = re.search(r'<tr data-method="otp">(.*?)</tr>', page.text, re.S).group(1)
    assert "✓" in row and "重新綁定" in row



def test_a_settings_form_sent_after_the_reverification_window_comes_back_to_its_page(user):
    """M2's 10 minutes count from the login: a form opened just before they end and sent just
    after changes nothing, asks for the factor again and comes back to its page, which says to
    send it again (it was the login's "登入已逾時…請回到原系統重新點選登入", a dead end)."""
    provider, client_id, secret = user
    laptop = _signed_in(provider, client_id, secret)
    phone = _signed_in(provider, client_id, secret)
    provider.clock.advance(540)
    page = phone.go("/account")
    provider.clock.advance(120)
    page = phone.submit(page, "/account/sessions/end-others")
    assert 'name="otp"' in page.text and "原系統" not in page.text
    page = phone.submit(page, "/login/factor/otp", otp=_code(provider, secret))
    assert page.url.path == "/account" and "尚未變更任何資料" in _notice(page)
    assert "code" in callback(laptop.authorize(client_id, prompt="none"))  # still logged in
    page = phone.submit(page, "/account/sessions/end-others")
    assert "已登出其他所有裝置" in _notice(page)


def test_binding_dates_are_taiwan_dates(user):
    """Bound at 01:30 in Taipei (17:30 the day before in UTC): that is the date shown."""
    provider, client_id, secret = user
    with provider.svc.db.session() as session:
        session.query(Binding).filter_by(factor="otp").one().created_at = dt.datetime(2026, 12, 3, 17, 30, tzinfo=dt.timezone.utc)
    page = _signed_in(provider, client_id, secret).go("/account")
    row = re.search(r'<tr data-method="otp">(.*?)</tr>', page.text, re.S).group(1)
    assert "2026-12-04" in row and "2026-12-03" not in row

def test_settings_without_a_session_starts_a_login(user):
    provider, _, secret = user
    browser = provider.browser()
    page = browser.password(browser.go("/account"))
    page = browser.submit(page, "/login/factor/otp", otp=_code(provider, secret))
    assert "帳號活動紀錄" in page.text


def test_rebinding_otp_makes_the_old_phone_useless(user):
    provider, client_id, old = user
    browser = _signed_in(provider, client_id, old)
    page = browser.go("/account/otp")
    assert "v2" in page.text
    new = _secret(page)
    page = browser.submit(page, "/account/otp", otp=_code(provider, new))
    assert "舊的 OTP 已失效" in _notice(page)
    provider.clock.advance(30)
    other = provider.browser()
    page = other.password(other.authorize(client_id))
    assert "v2" in page.text
    assert "不正確" in _error(other.submit(page, "/login/factor/otp", otp=_code(provider, old)))
    assert "code" in callback(other.submit(page, "/login/factor/otp", otp=_code(provider, new)))



def test_a_first_otp_binding_in_the_settings_is_not_called_a_rebinding(provider):
    """No old phone to warn about (an account that logs in with the password alone, no MFA)."""
    provider.account("alice")
    browser = provider.browser()
    page = browser.password(browser.go("/account/otp"))
    assert "<h1>OTP 驗證綁定</h1>" in page.text and "重新綁定" not in page.text and "舊手機" not in page.text
    page = browser.submit(page, "/account/otp", otp=_code(provider, _secret(page)))
    assert "OTP 驗證已綁定" in _notice(page)

def test_a_stale_qr_version_is_refused(user):
    provider, client_id, secret = user
    browser = _signed_in(provider, client_id, secret)
    page = browser.go("/account/otp")
    stale = _secret(page)
    page = browser.submit(page, "/account/otp/rebuild")
    assert "v3" in page.text
    page = browser.submit(page, "/account/otp", otp=_code(provider, stale))
    assert "驗證碼不正確" in _error(page)


def test_disabling_password_login_needs_a_passwordless_binding(user):
    provider, client_id, secret = user
    browser = _signed_in(provider, client_id, secret)
    page = browser.go("/account/password-login")
    assert "須先綁定自然人憑證或 Google 帳號" in _error(page)


def test_a_google_binding_is_no_way_in_while_google_login_is_off(user):
    """Turning password login off on the strength of a Google binding, with Google login
    switched off, would leave the account no way in."""
    provider, client_id, secret = user
    assert not provider.svc.settings.upstream_issuer
    with provider.svc.db.session() as session:
        account = session.query(Account).one()
        session.add(Binding(account_id=account.id, factor="google", external_id="https://accounts.google.com|alice.g", data={}))
    browser = _signed_in(provider, client_id, secret)
    page = browser.go("/account/password-login")
    assert "須先綁定自然人憑證或 Google 帳號" in _error(page)
    # A hand-made POST (the page offers no such form) with the settings page's CSRF token.
    token = next(f["fields"] for f in forms(browser.go("/account").text) if f["method"] == "post")
    page = browser.go("/account/password-login/disable", "POST", token)
    assert "須先綁定自然人憑證或 Google 帳號" in _error(page)
    with provider.svc.db.session() as session:
        assert not session.query(Account).one().password_login_disabled


def test_disable_and_re_enable_password_login(user):
    provider, client_id, secret = user
    with provider.svc.db.session() as session:
        account = session.query(Account).one()
        session.add(Binding(account_id=account.id, factor="certificate", external_id="MOICA|TEST0001", data={}))
    browser = _signed_in(provider, client_id, secret)
    page = browser.go("/account/password-login")
    assert "自然人憑證" in page.text and "90 天" in page.text
    page = browser.submit(page, "/account/password-login/disable")
    assert "已停用帳號密碼登入" in _notice(page)
    other = provider.browser()
    assert "已停用帳號密碼登入" in _error(other.password(other.authorize(client_id)))

    page = browser.go("/account/password-login")
    answer = provider.svc.store.get("captcha:" + forms(page.text)[0]["fields"]["form"])["captcha"]
    # M4: a new password; the one switched off (perhaps because it leaked) does not come back.
    page = browser.submit(page, "/password-login/enable", new_password=PASSWORD, new_password_again=PASSWORD, captcha=answer)
    assert "不可與目前的密碼相同" in _error(page)
    answer = provider.svc.store.get("captcha:" + forms(page.text)[0]["fields"]["form"])["captcha"]
    weak = browser.submit(page, "/password-login/enable", new_password="short", new_password_again="short", captcha=answer)
    assert "不符合規則" in _error(weak) and "大寫英文字母" in weak.text
    wrong = browser.submit(weak, "/password-login/enable", new_password="Fresh-Start-55!", new_password_again="Fresh-Start-55!",
                           captcha="00000")
    assert "驗證碼錯誤" in _error(wrong) and language_link(wrong, "en") == "/account/password-login?lang=en"
    answer = provider.svc.store.get("captcha:" + forms(wrong.text)[0]["fields"]["form"])["captcha"]
    page = browser.submit(wrong, "/password-login/enable", new_password="Fresh-Start-55!", new_password_again="Fresh-Start-55!",
                          captcha=answer)
    assert "已恢復帳號密碼登入" in _notice(page)
    provider.clock.advance(30)
    again = provider.browser()
    page = again.password(again.authorize(client_id), password="Fresh-Start-55!")
    assert "code" in callback(again.submit(page, "/login/factor/otp", otp=_code(provider, secret)))


def _with_card_and_password_login_off(provider, client_id, secret):
    """alice with a card bound turns password login off in her settings; her browser."""
    with provider.svc.db.session() as session:
        account = session.query(Account).one()
        session.add(Binding(account_id=account.id, factor="certificate", external_id="MOICA|TEST0001", data={}))
    browser = _signed_in(provider, client_id, secret)
    assert "已停用帳號密碼登入" in _notice(browser.submit(browser.go("/account/password-login"),
                                                         "/account/password-login/disable"))
    return browser


def test_password_login_turned_off_ends_the_single_sign_on_the_password_made(user):
    """M4: the session's password proves nothing once password login is off: single sign-on
    on it (password + OTP) asks for a way in the account still has, and prompt=none cannot."""
    provider, client_id, secret = user
    browser = _with_card_and_password_login_off(provider, client_id, secret)
    provider.clock.advance(5)
    assert callback(browser.authorize(client_id, prompt="none"))["error"] == "login_required"
    page = browser.authorize(client_id)
    assert "factor=certificate" in page.text and 'name="otp"' not in page.text  # a login from the start


def test_password_login_turned_off_mid_login_ends_that_password_login(user):
    """M4 (seed 001: then no 帳號密碼+OTP login): a password typed before password login was
    turned off in another tab does not count: the OTP after it ends no login."""
    provider, client_id, secret = user
    other = provider.browser()
    page = other.password(other.authorize(client_id))
    tx = forms(page.text)[0]["fields"]["tx"]
    _with_card_and_password_login_off(provider, client_id, secret)
    page = other.submit(page, "/login/factor/otp", otp=_code(provider, secret))
    assert "code=" not in page.headers.get("location", "")
    page = other.go(f"/login?tx={tx}")
    assert "factor=certificate" in page.text and 'name="otp"' not in page.text  # a login from the start


def test_an_otp_sent_after_password_login_was_turned_off_goes_on_with_the_login(user):
    """M4: the OTP form of a login whose password was turned off in another tab brings the user
    to the login's first step again, saying why; it was the "login expired" page (登入已逾時)
    of a login still alive at /login?tx=."""
    provider, client_id, secret = user
    other = provider.browser()
    page = other.password(other.authorize(client_id))
    _with_card_and_password_login_off(provider, client_id, secret)
    page = other.submit(page, "/login/factor/otp", otp=_code(provider, secret))
    assert page.status_code == 200 and "factor=certificate" in page.text and 'name="otp"' not in page.text
    assert "先前完成的驗證已失效" in _notice(page) and "登入已逾時" not in page.text


def test_the_enable_form_changes_no_password_while_password_login_is_on(user):
    """A hand-made POST (the form is not shown while password login is on) is no way to set a
    new password without the old one."""
    from idp import captcha

    provider, client_id, secret = user
    browser = _signed_in(provider, client_id, secret)
    csrf = forms(browser.go("/account").text)[0]["fields"]["csrf"]
    form_id = captcha.new_form(provider.svc)
    answer = provider.svc.store.get("captcha:" + form_id)["captcha"]
    browser.go("/account/password-login/enable", "POST", {"csrf": csrf, "form": form_id, "captcha": answer,
                                                          "new_password": "Fresh-Start-55!",
                                                          "new_password_again": "Fresh-Start-55!"})
    other = provider.browser()
    assert "帳號或密碼錯誤" in _error(other.password(other.authorize(client_id), password="Fresh-Start-55!"))


def _reset_page(provider, client_id):
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id))
    assert "遺失或已更換手機" in page.text
    return browser, browser.go(f"/login/reset?tx={forms(page.text)[0]['fields']['tx']}")


def _send(provider, browser, page, email="alice@example.tw", captcha=None):
    form = next(f for f in forms(page.text) if f["action"] == "/login/reset/send")["fields"]
    answer = captcha or provider.svc.store.get("captcha:" + form["form"])["captcha"]
    return browser.submit(page, "/login/reset/send", email=email, captcha=answer)


def test_lost_phone_reset_with_the_emergency_code(user, smtp_server):
    provider, client_id, _ = user
    browser, page = _reset_page(provider, client_id)
    assert "所有的綁定刪除" in page.text
    page = _send(provider, browser, page, email="someone@else.tw")
    assert "不符" in _error(page) and smtp_server.unread() == 0
    page = _send(provider, browser, page, captcha="00000")
    assert "驗證碼錯誤" in _error(page) and 'value="alice@example.tw"' in page.text
    page = _send(provider, browser, page)
    assert "alice@example.tw" not in page.text  # masked: the password alone does not show the address
    mail = smtp_server.next_message()
    code = re.search(r"\b([A-Z]{2})-(\d{6})\b", mail.get_content())
    prefix = re.search(r"data-prefix>([A-Z]{2})-<", page.text).group(1)
    assert code.group(1) == prefix and "緊急驗證" in mail["subject"]
    wrong = browser.submit(page, "/login/reset/verify", code="000000")
    assert "還可再試 2 次" in _error(wrong)  # an answer like a password: the account's lockout counts it
    assert language_link(wrong, "en") == f"/login/reset?tx={forms(wrong.text)[0]['fields']['tx']}&lang=en"
    again = _send(provider, browser, wrong)
    assert "秒後再重新發送" in _error(again) and smtp_server.unread() == 0
    typed = f"{code.group(1)}-{as_typed(code.group(2))}"
    assert takes(wrong, "code", typed)  # maxlength="9" cut its last digit
    page = browser.submit(wrong, "/login/reset/verify", code=typed)
    # Every binding is gone: the user is at forced binding (M1).
    assert "已刪除所有登入綁定" in _notice(page) and "/login/bind/otp" in page.text
    assert "QR Code 版本 v2" in page.text  # never v1 again: the app would hold two "v1" entries
    with provider.svc.db.session() as session:
        assert session.query(Binding).count() == 0


def test_the_emergency_code_page_speaks_the_logins_language(user, smtp_server):
    provider, client_id, _ = user
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id, ui_locales="en"))
    page = browser.go(f"/login/reset?tx={forms(page.text)[0]['fields']['tx']}")
    assert "Reset login bindings" in page.text
    page = _send(provider, browser, page, email="someone@else.tw")
    assert "verified email address, or it is not verified yet" in _error(page)


def test_an_account_disabled_during_its_login_gets_no_emergency_code(user, smtp_server):
    provider, client_id, _ = user
    browser, page = _reset_page(provider, client_id)
    with provider.svc.db.session() as session:
        session.query(Account).filter_by(username="alice").one().disabled = True
    page = _send(provider, browser, page)
    assert page.status_code == 400 and "已逾時" in page.text and smtp_server.unread() == 0


def test_only_the_newest_emergency_code_works_and_it_expires(user, smtp_server):
    provider, client_id, _ = user
    browser, page = _reset_page(provider, client_id)
    page = _send(provider, browser, page)
    first = re.search(r"\b[A-Z]{2}-(\d{6})\b", smtp_server.next_message().get_content()).group(1)
    provider.clock.advance(61)
    page = _send(provider, browser, page)
    second = re.search(r"\b[A-Z]{2}-(\d{6})\b", smtp_server.next_message().get_content()).group(1)
    if first != second:
        assert "錯誤" in _error(browser.submit(page, "/login/reset/verify", code=first))
    provider.clock.advance(301)
    assert "已失效" in _error(browser.submit(page, "/login/reset/verify", code=second))


def test_two_tabs_sending_an_emergency_code_at_once_send_one_mail(user, smtp_server, monkeypatch):
    """M5: a resend waits its minute, for two tabs whose sends both read the last code before
    either writes the new one too: one mail, and the other tab is told to wait."""
    provider, client_id, _ = user
    svc = provider.svc
    browser, page = _reset_page(provider, client_id)
    tabs = []
    for _ in range(2):  # a captcha each
        shown = browser.go(str(page.url))
        fields = next(f for f in forms(shown.text) if f["action"] == "/login/reset/send")["fields"]
        tabs.append({**fields, "email": "alice@example.tw", "captcha": svc.store.get("captcha:" + fields["form"])["captcha"]})
    account_id = _account_id(provider)
    both, get = threading.Barrier(2, timeout=10), svc.store.get

    def held(key):
        found = get(key)
        if key == reset._key(account_id):
            try:
                both.wait()  # both have read the last code before either writes
            except threading.BrokenBarrierError:
                pass
        return found

    monkeypatch.setattr(svc.store, "get", held)
    statuses = []

    def send(fields):
        http = provider.http()
        http.cookies = dict(browser.http.cookies)
        statuses.append(http.post("/login/reset/send", data=fields, follow_redirects=False).status_code)

    threads = [threading.Thread(target=send, args=(fields,)) for fields in tabs]
    [t.start() for t in threads]
    [t.join() for t in threads]
    monkeypatch.undo()
    assert sorted(statuses) == [303, 400] and smtp_server.unread() == 1


def test_the_resend_countdown_never_ends_before_a_resend_is_taken(user, smtp_server):
    """M5: with half a second of the minute left the page still counts down, and a resend then
    is told to wait 1 second, never "0 seconds"."""
    provider, client_id, _ = user
    browser, page = _reset_page(provider, client_id)
    page = _send(provider, browser, page)
    smtp_server.next_message()
    provider.clock.advance(59.5)
    page = browser.go(str(page.url))
    assert "disabled data-wait" in page.text
    assert "請於 1 秒後再重新發送" in _error(_send(provider, browser, page))


def test_a_code_superseded_while_it_is_checked_resets_nothing(user, smtp_server, monkeypatch):
    """A new code sent (another tab) while the older one is being checked: the older one does
    nothing (M5: only the newest works), and the newest still does."""
    provider, client_id, _ = user
    svc = provider.svc
    browser, page = _reset_page(provider, client_id)
    page = _send(provider, browser, page)
    first = re.search(r"\b[A-Z]{2}-(\d{6})\b", smtp_server.next_message().get_content()).group(1)
    account_id = _account_id(provider)
    newest = "000000" if first != "000000" else "111111"
    count = svc.store.incr

    def incr(key, ttl, by=1):  # the check's count of tries: after its read of the code, before its take
        if key == reset._tries(account_id):  # as reset.send writes a new code
            svc.store.set(reset._key(account_id), {**svc.store.get(reset._key(account_id)), "digest": reset._digest(newest)}, 360)
        return count(key, ttl, by)

    monkeypatch.setattr(svc.store, "incr", incr)
    page = browser.submit(page, "/login/reset/verify", code=first)
    monkeypatch.undo()
    assert "已失效" in _error(page)
    with svc.db.session() as session:
        assert session.query(Binding).count() > 0
    page = browser.submit(page, "/login/reset/verify", code=newest)
    assert "已刪除所有登入綁定" in _notice(page)


def test_wrong_emergency_codes_lock_the_account_as_wrong_passwords_do(user, smtp_server):
    """Someone with the password cannot guess on, a new code whenever one burns."""
    provider, client_id, _ = user
    browser, page = _reset_page(provider, client_id)
    page = _send(provider, browser, page)
    code = re.search(r"\b[A-Z]{2}-(\d{6})\b", smtp_server.next_message().get_content()).group(1)
    wrong = "111111" if code != "111111" else "222222"
    for left in (2, 1):
        page = browser.submit(page, "/login/reset/verify", code=wrong)
        assert f"還可再試 {left} 次" in _error(page)
    assert "帳號已暫時停用" in _error(browser.submit(page, "/login/reset/verify", code=wrong))
    assert "帳號已暫時停用" in _error(browser.submit(page, "/login/reset/verify", code=code))
    with provider.svc.db.session() as session:  # in the owner's activity log, as wrong OTPs are
        events = [(e.event, e.method) for e in session.query(AuditEvent).order_by(AuditEvent.id) if e.method == "emergency_code"]
    assert events == [("login.failure", "emergency_code")] * 3 + [("login.locked", "emergency_code")] * 2


def test_five_wrong_emergency_codes_burn_it_and_another_waits_its_minute(make_provider, smtp_server):
    provider, client_id, _ = _with_alice(make_provider(mfa=True, lockout_threshold=10, **smtp_server.settings()))
    browser, page = _reset_page(provider, client_id)
    page = _send(provider, browser, page)
    code = re.search(r"\b[A-Z]{2}-(\d{6})\b", smtp_server.next_message().get_content()).group(1)
    wrong = "111111" if code != "111111" else "222222"
    for _ in range(5):
        page = browser.submit(page, "/login/reset/verify", code=wrong)
    assert "次數過多" in _error(page) and "/login/reset/verify" not in page.text
    fields = forms(page.text)[0]["fields"]
    late = browser.go("/login/reset/verify", "POST", {"tx": fields["tx"], "csrf": fields["csrf"], "code": code})
    assert "已失效" in _error(late)
    assert "秒後再重新發送" in _error(_send(provider, browser, late)) and smtp_server.unread() == 0


def test_activity_log_shows_logins_with_address_and_browser(user):
    provider, client_id, secret = user
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id), password="wrong-password")
    page = browser.password(page)
    callback(browser.submit(page, "/login/factor/otp", otp=_code(provider, secret)))
    page = browser.go("/account/activity")
    assert "登入成功" in page.text and "登入失敗" in page.text and "綁定" in page.text
    assert "testclient" in page.text  # the user agent
    # The portal by its name and the factors in words, not a client_id and "password+otp".
    assert "<td>帳號密碼 + OTP 驗證</td>" in page.text and "<td>Portal</td>" in page.text and client_id not in page.text
    account_id = _account_id(provider)
    for _ in range(25):
        provider.svc.audit.record("login.failure", account_id=account_id, username="alice")
    assert "第 1 頁，共 2 頁" in browser.go("/account/activity").text
    assert "第 2 頁，共 2 頁" in browser.go("/account/activity?page=2").text
    assert "第 1 頁，共 2 頁" in browser.go("/account/activity?page=%C2%B2").text  # ², a digit to str.isdigit


def _account_id(provider) -> str:
    with provider.svc.db.session() as session:
        return session.query(Account).one().id


def test_settings_forms_need_csrf(user):
    provider, client_id, secret = user
    browser = _signed_in(provider, client_id, secret)
    page = browser.go("/account/otp")
    new = _secret(page)
    response = browser.go("/account/otp", "POST", {"otp": pyotp.TOTP(new).at(provider.clock())})
    assert response.status_code == 400
    with provider.svc.db.session() as session:
        assert session.query(Binding).one().data["version"] == 1


def test_log_out_other_sessions(user):
    provider, client_id, secret = user
    laptop = _signed_in(provider, client_id, secret)
    phone = _signed_in(provider, client_id, secret)
    provider.clock.advance(30)
    page = phone.go("/account")
    assert "登入中的裝置" in page.text and page.text.count("pwd + otp + mfa") == 2
    assert laptop.http.cookies["idp_session"] not in page.text  # never another browser's session id
    copied = phone.http.cookies["idp_session"]  # this browser's cookie, copied (the others were logged out)
    page = phone.submit(page, "/account/sessions/end-others")
    assert "已登出其他所有裝置" in _notice(page) and page.text.count("pwd + otp + mfa") == 1
    # The laptop's session is gone: a silent login there needs a new login.
    assert callback(laptop.authorize(client_id, prompt="none"))["error"] == "login_required"
    assert "code" in callback(phone.authorize(client_id, prompt="none"))
    # So is a copy of this browser's cookie: it was given a new secret.
    laptop.http.cookies.set("idp_session", copied, domain="idp.test")
    assert callback(laptop.authorize(client_id, prompt="none"))["error"] == "login_required"


def test_logging_out_the_other_sessions_ends_their_refresh_tokens_not_this_ones(user):
    """A portal's refresh token outlives the SSO session it came from: one from a session that
    has lapsed ends too when the owner logs out the other sessions; this browser's stays."""
    provider, _, otp_secret = user
    client_id, client_secret = provider.client()

    def tokens_of(browser) -> dict:
        page = browser.password(browser.authorize(client_id))
        code = callback(browser.submit(page, "/login/factor/otp", otp=_code(provider, otp_secret)))["code"]
        provider.clock.advance(30)
        return redeem(browser.http, client_id, client_secret, code).json()

    def refresh(tokens):
        return provider.http().post("/token", data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
                                    auth=(client_id, client_secret))

    kept_elsewhere = tokens_of(provider.browser())
    provider.clock.advance(provider.svc.settings.session_seconds + 60)  # that session lapses
    laptop = tokens_of(provider.browser())
    phone = provider.browser()
    mine = tokens_of(phone)
    phone.submit(phone.go("/account"), "/account/sessions/end-others")
    assert refresh(kept_elsewhere).json()["error"] == refresh(laptop).json()["error"] == "invalid_grant"
    assert refresh(mine).status_code == 200


def test_a_qr_secret_seen_by_a_session_since_logged_out_is_not_the_owners_next(user):
    """The QR of /account/otp belongs to its session (SPEC A2): a browser that read it, e.g.
    a session left open on a shared computer, does not know the secret the owner binds after
    logging that browser out."""
    provider, client_id, secret = user
    intruder = _signed_in(provider, client_id, secret)
    seen = _secret(intruder.go("/account/otp"))  # read, not bound
    owner = _signed_in(provider, client_id, secret)
    page = owner.go("/account/otp")
    new = _secret(page)
    assert new != seen and _secret(owner.go("/account/otp")) == new  # a reload shows the same one
    owner.submit(owner.go("/account"), "/account/sessions/end-others")
    assert callback(intruder.authorize(client_id, prompt="none"))["error"] == "login_required"
    page = owner.submit(owner.go("/account/otp"), "/account/otp", otp=_code(provider, new))
    assert "舊的 OTP 已失效" in _notice(page)


def test_a_qr_secret_seen_before_a_reset_of_the_bindings_is_not_shown_at_forced_binding(user):
    provider, client_id, secret = user
    intruder = _signed_in(provider, client_id, secret)
    seen = _secret(intruder.go("/account/otp"))
    reset_bindings(provider.svc, _account_id(provider))  # an administrator's or the emergency code's reset
    owner = provider.browser()
    page = owner.password(owner.authorize(client_id))
    assert "/login/bind/otp" in page.text and _secret(page) != seen


def test_the_otp_and_certificate_pages_show_only_their_own_error_messages(user):
    provider, client_id, secret = user
    browser = _signed_in(provider, client_id, secret)
    page = browser.go("/account/otp?error=otp.qr_expired")
    assert "QR" in _error(page)
    for path, prefix in (("/account/otp", "otp."), ("/account/certificate", "certificate.")):
        crafted = prefix + "Your account is locked: call +886 2 1234 5678"
        page = browser.go(path + "?" + urlencode({"error": crafted}))
        assert page.status_code == 200 and _error(page) == "" and "1234 5678" not in page.text


def test_the_confirmation_mail_goes_once_a_minute(user, smtp_server):
    """Asking again and again does not flood the address (nor the provider's mail relay)."""
    provider, client_id, secret = user
    with provider.svc.db.session() as session:
        session.query(Account).filter_by(username="alice").one().email_verified = False
    browser = _signed_in(provider, client_id, secret)
    while smtp_server.unread():
        smtp_server.next_message()
    page = browser.submit(browser.go("/account"), "/account/email/verify")
    assert "驗證信已寄出" in _notice(page)
    # In the activity log, named, with the address and browser that asked (M6).
    row = re.search(r"<tr>(?:(?!</tr>).)*寄出 E-Mail 驗證信.*?</tr>", browser.go("/account/activity").text, re.S).group(0)
    assert "testclient" in row
    for _ in range(5):
        page = browser.submit(page, "/account/email/verify")
        assert "請稍候一分鐘" in _error(page)
    assert smtp_server.unread() == 1
    provider.clock.advance(61)
    browser.submit(browser.go("/account"), "/account/email/verify")
    assert smtp_server.unread() == 2


def test_a_confirmation_mail_the_server_refuses_says_so_and_can_be_asked_again(user, smtp_server, caplog):
    """The mail server refuses the address: the page says the mail was not sent (not an
    error page), the minute's allowance is not used up by a mail that never went, and the
    log names the address only masked."""
    provider, client_id, secret = user
    with provider.svc.db.session() as session:
        alice = session.query(Account).filter_by(username="alice").one()
        alice.email, alice.email_verified = "alice.wang@" + REFUSED_DOMAIN, False
    browser = _signed_in(provider, client_id, secret)
    caplog.set_level(logging.INFO, logger="idp.mail")
    for _ in range(2):
        page = browser.submit(browser.go("/account"), "/account/email/verify")
        assert page.status_code == 200 and "驗證信寄送失敗" in _error(page)
    assert "a***@" + REFUSED_DOMAIN in caplog.text and "alice.wang" not in caplog.text and "550" in caplog.text
    assert smtp_server.unread() == 0


@pytest.mark.parametrize("backend", ["postgres+redis"])
def test_two_rebinds_at_once_leave_one_binding(provider):
    """Two rebinds of one account at once (two tabs, each back from Google or from the card):
    the second waits for the first and replaces its binding (M3), on PostgreSQL, where both
    used to delete the same old one and each add their own."""
    svc = provider.svc
    account_id = provider.account("alice")

    def card(serial):
        return SimpleNamespace(binding_key=("CN=Test CA", serial), cert_serial=int(serial, 16), id_last4=None,
                               subject_cn="alice", subject_serial_number=serial, issuer_dn="CN=Test CA",
                               fingerprint_sha256="00", not_after=dt.datetime(2030, 1, 1), anchor_set="moica")

    for factor, bind in (("google", lambda n: federation._bind(svc, account_id, f"https://upstream|{n}", {"sub": n})),
                         ("certificate", lambda n: certificate.bind(svc, account_id, card(n)))):
        with svc.db.session() as session:
            session.add(Binding(account_id=account_id, factor=factor, external_id=f"{factor}|old", data={}))
        with svc.db.engine.connect() as holder, holder.begin():
            # Holding the old binding's row, until both rebinds wait: to delete it, or for the
            # account the other one holds.
            holder.execute(text("SELECT 1 FROM bindings WHERE external_id = :e FOR UPDATE"), {"e": f"{factor}|old"})
            threads = [threading.Thread(target=bind, args=(n,)) for n in ("A1", "B2")]
            for thread in threads:
                thread.start()
            with svc.db.engine.connect() as watcher:
                for _ in range(200):
                    # Each poll in a transaction of its own: pg_stat_activity is read once per one.
                    waiting = watcher.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                                   "AND datname = current_database()")).scalar()
                    watcher.rollback()
                    if waiting == 2:
                        break
                    time.sleep(0.05)
            assert waiting == 2
        for thread in threads:
            thread.join()
        with svc.db.session() as session:
            bound = session.query(Binding).filter_by(account_id=account_id, factor=factor).all()
        assert len(bound) == 1, [b.external_id for b in bound]
