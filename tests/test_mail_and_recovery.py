"""Email and forgot-password as a user meets them (SPEC A1, O2, O4): a real SMTP
server receives the mails, the test reads the link from the message and
follows it in the browser, on both back ends."""

import dataclasses
import datetime as dt
import email
import email.policy
import logging
import re

import pytest
from sqlalchemy import select

from idp.accounts import set_password
from idp.mail import SEPARATOR, MailError
from idp.storage.models import Account, AuditEvent
from idp.web.app import create_app
from idp.web.recovery import send_verification
from tests.harness import PASSWORD, Provider, callback, forms, redeem
from tests.mailserver import MailServer

NEW = "Brand-New-Pass-7?"
RESET_LINK = re.compile(r"http://idp\.test/password/reset\?token=[A-Za-z0-9_-]+")
CONFIRM_LINK = re.compile(r"http://idp\.test/email/confirm\?token=[A-Za-z0-9_-]+")


@pytest.fixture
def mailing(make_provider, smtp_server):
    """A provider that mails through the test SMTP server."""
    return make_provider(**smtp_server.settings())


def _error(page) -> str:
    found = re.search(r'<div class="error" role="alert">\s*<p>(.*?)</p>', page.text, re.S)
    return found.group(1) if found else ""


def _form(page, action) -> dict:
    return next(f for f in forms(page.text) if f["action"] == action)["fields"]


def _captcha(provider, page) -> str:
    """What the captcha image of this page shows (a person reads it)."""
    return provider.svc.store.get("recovery-form:" + _form(page, "/password/forgot")["form"])["captcha"]


def ask_reset(provider, browser, address, page=None, captcha=None):
    page = page or browser.go("/password/forgot")
    return browser.submit(page, "/password/forgot", email=address, captcha=captcha or _captcha(provider, page))


def reset_link(message) -> str:
    links = set(RESET_LINK.findall(message.get_content()))
    assert len(links) == 1, message.get_content()  # the same link in both languages
    return links.pop()


def _account(provider, username="alice") -> Account:
    with provider.svc.db.session() as session:
        account = session.execute(select(Account).where(Account.username == username)).scalar_one()
        session.expunge(account)
        return account


def _events(provider, kind) -> list:
    with provider.svc.db.session() as session:
        return [(e.username, e.method, e.ip) for e in session.execute(select(AuditEvent).where(AuditEvent.event == kind)).scalars()]


def _logs_in(provider, client_id, password) -> bool:
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id), password=password)
    if page.status_code == 302:
        return "code" in callback(page)
    assert "帳號或密碼錯誤" in _error(page), page.text[:500]
    return False


# -- the whole journey -----------------------------------------------------------------------
def test_forgot_password_journey_from_the_login_page(mailing, smtp_server):
    provider = mailing
    provider.account("alice", name="王小明", email_verified=True)
    client_id, _ = provider.client()
    browser = provider.browser()
    login = browser.authorize(client_id)
    tx = _form(login, "/login/factor/password")["tx"]
    assert f'href="/password/forgot?tx={tx}"' in login.text and "忘記密碼？" in login.text

    page = browser.go(f"/password/forgot?tx={tx}")
    assert page.status_code == 200 and "忘記密碼" in page.text
    image = browser.http.get(f"/password/forgot/captcha?form={_form(page, '/password/forgot')['form']}")
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    sent = ask_reset(provider, browser, "alice@example.tw", page)
    assert sent.status_code == 200 and "如果這個地址屬於一個電子郵件已確認的帳號" in sent.text
    assert f'href="/login?tx={tx}"' in sent.text

    mail = smtp_server.next_message()
    assert mail["To"] == "alice@example.tw" and mail["From"] == "no-reply@idp.test"
    assert mail["Subject"] == "重設密碼 / Reset your password" and mail["Content-Language"] == "zh-TW, en"
    body = mail.get_content()
    chinese, english = body.index("王小明 您好"), body.index("Dear 王小明")
    assert chinese < body.index(SEPARATOR) < english  # zh-TW first, English below
    assert body.splitlines()[0] == "(English version below)"
    assert "30 分鐘" in body and "30 minutes" in body and "alice" in body
    link = reset_link(mail)

    form = browser.go(link)
    assert form.status_code == 200 and "請為帳號 alice 設定新密碼" in form.text
    done = browser.submit(form, "/password/reset", new_password=NEW, new_password_again=NEW)
    assert done.status_code == 200 and "密碼已重設" in done.text
    assert f'href="/login?tx={tx}"' in done.text  # back to the login this started from
    again = browser.go(f"/login?tx={tx}")
    assert "code" in callback(browser.password(again, password=NEW))

    assert _events(provider, "password.reset") == [("alice", "email", "testclient")]
    assert [e[0] for e in _events(provider, "password.reset_requested")] == ["alice"]
    assert smtp_server.unread() == 0


def test_after_a_reset_the_old_password_fails_and_the_new_one_works(mailing, smtp_server):
    provider = mailing
    account_id = provider.account("alice", email_verified=True)
    client_id, _ = provider.client()
    before = _account(provider).password_changed_at
    provider.clock.advance(3600)
    # Locked out by wrong guesses: the reset unlocks the account too.
    for _ in range(3):
        provider.svc.lockout.reserve("alice")
    provider.svc.lockout.lock("alice")

    browser = provider.browser()
    ask_reset(provider, browser, "alice@example.tw")
    page = browser.go(reset_link(smtp_server.next_message()))
    done = browser.submit(page, "/password/reset", new_password=NEW, new_password_again=NEW)
    assert "密碼已重設" in done.text and "請回到原本的系統" in done.text  # no login to go back to

    assert not _logs_in(provider, client_id, PASSWORD)
    assert "code" in provider.browser().login(client_id, password=NEW)
    after = _account(provider)
    assert after.id == account_id and after.password_changed_at != before


def test_a_reset_ends_every_session_of_the_account(mailing, smtp_server):
    """Someone logged in with the old password (a stolen cookie, a shared computer) is logged
    out when the owner resets it: the portals ask them to log in again."""
    provider = mailing
    provider.account("alice", email_verified=True)
    client_id, _ = provider.client()
    thief = provider.browser()
    assert "code" in thief.login(client_id)
    owner = provider.browser()
    ask_reset(provider, owner, "alice@example.tw")
    page = owner.go(reset_link(smtp_server.next_message()))
    assert "密碼已重設" in owner.submit(page, "/password/reset", new_password=NEW, new_password_again=NEW).text
    assert callback(thief.authorize(client_id, prompt="none"))["error"] == "login_required"


def test_a_reset_ends_the_refresh_tokens_of_sessions_that_had_lapsed(mailing, smtp_server):
    """A refresh token outlives the SSO session it came from (8 hours against 30 days): one
    kept from a session that has lapsed ends with the reset too, at the token endpoint, at
    introspection and at UserInfo."""
    provider = mailing
    provider.account("alice", email_verified=True)
    client_id, secret = provider.client()
    thief = provider.browser()
    tokens = redeem(thief.http, client_id, secret, thief.login(client_id)["code"]).json()
    provider.clock.advance(provider.svc.settings.session_seconds + 60)
    http = provider.http()

    def refresh(token):
        return http.post("/token", data={"grant_type": "refresh_token", "refresh_token": token}, auth=(client_id, secret))

    tokens = refresh(tokens["refresh_token"]).json()  # its session lapsed, it did not end: still good
    owner = provider.browser()
    ask_reset(provider, owner, "alice@example.tw")
    page = owner.go(reset_link(smtp_server.next_message()))
    assert "密碼已重設" in owner.submit(page, "/password/reset", new_password=NEW, new_password_again=NEW).text
    assert refresh(tokens["refresh_token"]).json()["error"] == "invalid_grant"
    for token in (tokens["refresh_token"], tokens["access_token"]):
        assert http.post("/introspect", data={"token": token}, auth=(client_id, secret)).json() == {"active": False}
    assert http.get("/userinfo", headers={"Authorization": f"Bearer {tokens['access_token']}"}).status_code == 401
    # Logging in after the reset is a new start.
    assert "code" in provider.browser().login(client_id, password=NEW)


def test_a_link_is_void_once_the_password_has_changed_since(mailing, smtp_server):
    """A link kept by someone who once read the mailbox does not undo a change the owner made since."""
    provider = mailing
    provider.account("alice", email_verified=True)
    ask_reset(provider, provider.browser(), "alice@example.tw")
    kept = reset_link(smtp_server.next_message())
    provider.clock.advance(60)
    with provider.svc.db.session() as session:  # the owner changes it (the account area, or an expired password)
        account = session.execute(select(Account).where(Account.username == "alice")).scalar_one()
        set_password(account, provider.svc.passwords, "Owner-Chose-This-5#",
                     now=dt.datetime.fromtimestamp(provider.clock(), dt.timezone.utc))
    assert provider.browser().go(kept).status_code == 400


def _process_in(provider, zone: str) -> Provider:
    """Another process of the deployment, on the same PostgreSQL and Redis, whose database
    connections have the TimeZone ``zone`` (its URL's options here; PGTZ or its role's setting alike)."""
    url = f"{provider.svc.settings.database_url}?options=-c%20TimeZone%3D{zone}"
    return Provider(create_app(dataclasses.replace(provider.svc.settings, database_url=url), provider.clock), provider.clock)


@pytest.mark.parametrize("backend", ["postgres+redis"])
def test_a_link_holds_whatever_time_zone_the_database_connections_speak(mailing, smtp_server):
    """The link keeps when the password last changed and is good while it has not since: the
    same instant, though the process that opens it reads it in Taipei time and the one that
    mailed it in UTC; a change since still voids it there."""
    utc, taipei = _process_in(mailing, "UTC"), _process_in(mailing, "Asia/Taipei")
    utc.account("alice", email_verified=True)
    ask_reset(utc, utc.browser(), "alice@example.tw")
    browser = taipei.browser()
    page = browser.go(reset_link(smtp_server.next_message()))
    assert page.status_code == 200, _error(page)
    done = browser.submit(page, "/password/reset", new_password=NEW, new_password_again=NEW)
    assert "密碼已重設" in done.text
    client_id, _ = utc.client()
    assert _logs_in(utc, client_id, NEW)

    utc.clock.advance(60)  # one mail an address a minute
    ask_reset(utc, utc.browser(), "alice@example.tw")
    kept = reset_link(smtp_server.next_message())
    utc.clock.advance(60)
    with utc.svc.db.session() as session:  # the owner changes it meanwhile
        account = session.execute(select(Account).where(Account.username == "alice")).scalar_one()
        set_password(account, utc.svc.passwords, "Owner-Chose-This-5#",
                     now=dt.datetime.fromtimestamp(utc.clock(), dt.timezone.utc))
    assert taipei.browser().go(kept).status_code == 400


def test_a_link_mailed_before_the_account_was_disabled_is_void_once_it_is_enabled(mailing, smtp_server):
    """Disabling an account ends its sessions and tokens, and the reset links mailed before."""
    from idp.accounts import set_disabled

    provider = mailing
    alice = provider.account("alice", email_verified=True)
    ask_reset(provider, provider.browser(), "alice@example.tw")
    kept = reset_link(smtp_server.next_message())
    provider.clock.advance(60)
    set_disabled(provider.svc, alice, True)
    provider.clock.advance(60)
    set_disabled(provider.svc, alice, False)
    assert provider.browser().go(kept).status_code == 400
    # A link asked for after it is enabled works.
    ask_reset(provider, provider.browser(), "alice@example.tw")
    assert provider.browser().go(reset_link(smtp_server.next_message())).status_code == 200


def test_english_page_gets_the_mail_in_english_first(mailing, smtp_server):
    provider = mailing
    provider.account("alice", email_verified=True)
    browser = provider.browser()
    page = browser.go("/password/forgot?lang=en")
    assert "Forgot password" in page.text
    sent = ask_reset(provider, browser, "alice@example.tw", page)
    assert "If this address belongs to an account with a confirmed email address" in sent.text
    body = smtp_server.next_message().get_content()
    assert body.splitlines()[0] == "（中文版本在下方）"
    assert body.index("Dear") < body.index(SEPARATOR) < body.index("您好")
    english = browser.go(reset_link_from(body))
    assert "Choose a new password for the account alice" in english.text


def test_a_link_asked_for_in_an_english_login_speaks_english_in_any_browser(mailing, smtp_server):
    """The portal asked for English (ui_locales); the mail may be opened in a browser that
    prefers Chinese: the reset form and its answers stay in English."""
    provider = mailing
    provider.account("alice", email_verified=True)
    client_id, _ = provider.client()
    browser = provider.browser()
    login = browser.authorize(client_id, ui_locales="en")
    page = browser.go(f"/password/forgot?tx={_form(login, '/login/factor/password')['tx']}")
    assert "Forgot password" in page.text
    ask_reset(provider, browser, "alice@example.tw", page)
    link = reset_link(smtp_server.next_message())

    elsewhere = provider.browser()
    elsewhere.http.headers["Accept-Language"] = "zh-TW,zh;q=0.9"
    form = elsewhere.go(link)
    assert "Choose a new password for the account alice" in form.text
    done = elsewhere.submit(form, "/password/reset", new_password=NEW, new_password_again=NEW)
    assert "Your new password is in effect" in done.text


def reset_link_from(body) -> str:
    return RESET_LINK.search(body).group(0)


# -- never says whether an account exists ------------------------------------------------------
def test_unknown_unverified_and_unusable_addresses_get_the_same_page_and_no_mail(mailing, smtp_server):
    provider = mailing
    provider.account("alice", email_verified=True)
    provider.account("bob")  # email not verified
    provider.account("carol", email_verified=True, disabled=True)
    provider.account("dave", email_verified=True, password_login_disabled=True)
    pages = {}
    for address in ("nobody@example.tw", "bob@example.tw", "carol@example.tw", "dave@example.tw", "alice@example.tw"):
        pages[address] = ask_reset(provider, provider.browser(), address)
    assert {p.status_code for p in pages.values()} == {200}
    assert len({p.text for p in pages.values()}) == 1, "the answer must not depend on the address"
    assert smtp_server.next_message()["To"] == "alice@example.tw"
    assert smtp_server.unread() == 0 and len(smtp_server.messages) == 1


def test_the_same_verified_address_on_two_accounts_gets_a_link_for_each(mailing, smtp_server):
    provider = mailing
    provider.account("alice", email="family@example.tw", email_verified=True)
    provider.account("alice2", email="Family@Example.tw", email_verified=True)
    ask_reset(provider, provider.browser(), "FAMILY@example.tw")
    bodies = [smtp_server.next_message().get_content() for _ in range(2)]
    assert sorted("alice2" in b for b in bodies) == [False, True]
    assert len({reset_link_from(b) for b in bodies}) == 2


# -- the link ----------------------------------------------------------------------------------
def test_the_link_works_once(mailing, smtp_server):
    provider = mailing
    provider.account("alice", email_verified=True)
    client_id, _ = provider.client()
    browser = provider.browser()
    ask_reset(provider, browser, "alice@example.tw")
    link = reset_link(smtp_server.next_message())
    form = browser.go(link)
    browser.submit(form, "/password/reset", new_password=NEW, new_password_again=NEW)
    again = browser.go(link)
    assert again.status_code == 400 and "已經使用過" in _error(again)
    assert 'href="/password/forgot"' in again.text
    # Posting the old form again changes nothing either.
    replay = browser.submit(form, "/password/reset", new_password="Other-Pass-word-8!", new_password_again="Other-Pass-word-8!")
    assert replay.status_code == 400 and "沒有變更" in _error(replay)
    assert _logs_in(provider, client_id, NEW)


def test_an_expired_link_is_refused_and_changes_nothing(mailing, smtp_server):
    provider = mailing
    provider.account("alice", email_verified=True)
    client_id, _ = provider.client()
    browser = provider.browser()
    ask_reset(provider, browser, "alice@example.tw")
    link = reset_link(smtp_server.next_message())
    form = browser.go(link)  # opened in time...
    provider.clock.advance(31 * 60)  # ...but sent too late
    late = browser.submit(form, "/password/reset", new_password=NEW, new_password_again=NEW)
    assert late.status_code == 400 and "超過 30 分鐘" in _error(late)
    assert browser.go(link).status_code == 400
    assert _logs_in(provider, client_id, PASSWORD)
    assert _events(provider, "password.reset") == []


def test_a_new_request_makes_the_older_link_useless(mailing, smtp_server):
    provider = mailing
    provider.account("alice", email_verified=True)
    client_id, _ = provider.client()
    browser = provider.browser()
    ask_reset(provider, browser, "alice@example.tw")
    first = reset_link(smtp_server.next_message())
    provider.clock.advance(61)
    ask_reset(provider, browser, "alice@example.tw")
    second = reset_link(smtp_server.next_message())
    assert first != second
    old = browser.go(first)
    assert old.status_code == 400 and "較新的連結取代" in _error(old)
    done = browser.submit(browser.go(second), "/password/reset", new_password=NEW, new_password_again=NEW)
    assert "密碼已重設" in done.text
    assert _logs_in(provider, client_id, NEW)


def test_mails_to_one_address_are_rate_limited(mailing, smtp_server):
    provider = mailing
    provider.account("alice", email_verified=True)
    browser = provider.browser()
    first = ask_reset(provider, browser, "alice@example.tw")
    second = ask_reset(provider, browser, "ALICE@example.tw")  # the same address
    assert first.text == second.text  # the same neutral page, limited or not
    smtp_server.next_message()
    assert smtp_server.unread() == 0
    provider.clock.advance(59)
    ask_reset(provider, browser, "alice@example.tw")
    assert smtp_server.unread() == 0
    provider.clock.advance(2)
    ask_reset(provider, browser, "alice@example.tw")
    assert smtp_server.next_message()["To"] == "alice@example.tw"


# -- bad input: a clear message, nothing lost, nothing changed --------------------------------
def test_a_weak_or_mistyped_new_password_shows_what_is_wrong_and_changes_nothing(mailing, smtp_server):
    provider = mailing
    provider.account("alice", email_verified=True)
    client_id, _ = provider.client()
    browser = provider.browser()
    ask_reset(provider, browser, "alice@example.tw")
    page = browser.go(reset_link(smtp_server.next_message()))
    assert "至少 10 個字元" in page.text  # the policy, before anything goes wrong
    page = browser.submit(page, "/password/reset", new_password="short", new_password_again="short")
    assert page.status_code == 200 and "不符合規則" in _error(page)
    assert "大寫英文字母" in page.text and "符號" in page.text and "至少 10 個字元" in page.text
    page = browser.submit(page, "/password/reset", new_password="alice-Pass-word-1", new_password_again="alice-Pass-word-1")
    assert "不可包含帳號" in page.text
    page = browser.submit(page, "/password/reset", new_password=NEW, new_password_again=NEW + "x")
    assert "不一致" in _error(page)
    # The current password again would make one that expired fresh (A1) without a change.
    page = browser.submit(page, "/password/reset", new_password=PASSWORD, new_password_again=PASSWORD)
    assert "不可與目前的密碼相同" in _error(page)
    assert _logs_in(provider, client_id, PASSWORD)
    # The link still works after the mistakes.
    done = browser.submit(page, "/password/reset", new_password=NEW, new_password_again=NEW)
    assert "密碼已重設" in done.text


def test_a_wrong_captcha_keeps_the_address_and_sends_nothing(mailing, smtp_server):
    provider = mailing
    provider.account("alice", email_verified=True)
    browser = provider.browser()
    page = browser.go("/password/forgot")
    again = ask_reset(provider, browser, "alice@example.tw", page, captcha="00000")
    assert again.status_code == 200 and "驗證碼錯誤" in _error(again)
    assert _form(again, "/password/forgot")["email"] == "alice@example.tw"
    assert _form(again, "/password/forgot")["form"] != _form(page, "/password/forgot")["form"]  # a new image
    # The old image is used up: one try per image.
    assert provider.svc.store.get("recovery-form:" + _form(page, "/password/forgot")["form"]) is None
    stale = browser.submit(page, "/password/forgot", email="alice@example.tw", captcha="22222")
    assert "已逾時" in _error(stale) and _form(stale, "/password/forgot")["email"] == "alice@example.tw"
    assert smtp_server.messages == []
    ask_reset(provider, browser, "alice@example.tw", again)
    assert smtp_server.next_message()["To"] == "alice@example.tw"


def test_a_malformed_address_is_named_and_kept(mailing, smtp_server):
    provider = mailing
    browser = provider.browser()
    page = ask_reset(provider, browser, "not an address")
    assert "格式不正確" in _error(page) and _form(page, "/password/forgot")["email"] == "not an address"
    page = ask_reset(provider, browser, "", page)
    assert "請輸入電子郵件地址" in _error(page)
    assert smtp_server.messages == []


def test_the_form_needs_this_browsers_csrf_token_and_captcha(mailing, smtp_server):
    provider = mailing
    provider.account("alice", email_verified=True)
    victim = provider.browser()
    page = victim.go("/password/forgot")
    fields = _form(page, "/password/forgot")
    attacker = provider.browser()
    assert attacker.http.get(f"/password/forgot/captcha?form={fields['form']}").status_code == 404
    response = attacker.go("/password/forgot", "POST",
                           {**fields, "email": "alice@example.tw", "captcha": _captcha(provider, page)})
    assert "已逾時" in _error(response)
    assert smtp_server.messages == []


def test_a_stale_or_foreign_login_transaction_is_not_linked(mailing, smtp_server):
    provider = mailing
    client_id, _ = provider.client()
    tx = _form(provider.browser().authorize(client_id), "/login/factor/password")["tx"]
    other = provider.browser()
    page = other.go(f"/password/forgot?tx={tx}")
    assert "/login?tx=" not in page.text and 'name="tx"' not in page.text


# -- email confirmation ------------------------------------------------------------------------
def test_the_confirmation_link_verifies_the_address_once(mailing, smtp_server):
    provider = mailing
    provider.account("alice", name="王小明")
    send_verification(provider.svc, _account(provider), "zh-TW")
    mail = smtp_server.next_message()
    assert mail["To"] == "alice@example.tw" and mail["Subject"] == "確認您的電子郵件地址 / Confirm your email address"
    body = mail.get_content()
    assert body.index("24 小時") < body.index(SEPARATOR) < body.index("24 hours")
    links = set(CONFIRM_LINK.findall(body))
    assert len(links) == 1
    link = links.pop()

    # Not verified yet: no reset mail.
    ask_reset(provider, provider.browser(), "alice@example.tw")
    assert smtp_server.unread() == 0

    browser = provider.browser()
    page = browser.go(link)
    assert page.status_code == 200 and "電子郵件地址已確認" in page.text and "alice@example.tw" in page.text
    assert _account(provider).email_verified
    assert _events(provider, "email.verified") == [("alice", "email", "testclient")]
    again = browser.go(link)
    assert again.status_code == 400 and "已經使用過" in _error(again)

    provider.clock.advance(61)
    ask_reset(provider, provider.browser(), "alice@example.tw")
    assert RESET_LINK.search(smtp_server.next_message().get_content())


def test_a_confirmation_link_for_an_old_address_or_too_late_confirms_nothing(mailing, smtp_server):
    provider = mailing
    provider.account("alice")
    send_verification(provider.svc, _account(provider), "en")
    body = smtp_server.next_message().get_content()
    assert body.index("Dear") < body.index(SEPARATOR) < body.index("您好")
    changed_link = CONFIRM_LINK.search(body).group(0)
    with provider.svc.db.session() as session:
        session.execute(select(Account)).scalar_one().email = "alice.new@example.tw"
    page = provider.browser().go(changed_link)
    assert page.status_code == 409 and "已不是帳號目前的電子郵件地址" in _error(page)
    assert not _account(provider).email_verified

    send_verification(provider.svc, _account(provider), "zh-TW")
    late_link = CONFIRM_LINK.search(smtp_server.next_message().get_content()).group(0)
    provider.clock.advance(24 * 3600 + 1)
    late = provider.browser().go(late_link)
    assert late.status_code == 400 and "超過 24 小時" in _error(late)
    assert not _account(provider).email_verified
    assert provider.browser().go("/email/confirm?token=made-up").status_code == 400
    assert provider.browser().go("/email/confirm").status_code == 400

    # An account disabled since the link was mailed: it confirms nothing, as its other links.
    send_verification(provider.svc, _account(provider), "zh-TW")
    disabled_link = CONFIRM_LINK.search(smtp_server.next_message().get_content()).group(0)
    with provider.svc.db.session() as session:
        session.execute(select(Account)).scalar_one().disabled = True
    assert provider.browser().go(disabled_link).status_code == 400
    assert not _account(provider).email_verified


# -- transports --------------------------------------------------------------------------------
def test_without_smtp_mails_go_to_the_outbox(make_provider, tmp_path, caplog):
    outbox = tmp_path / "outbox"
    provider = make_provider(outbox_dir=str(outbox), mail_from="idp@example.tw")
    provider.account("alice", email_verified=True)
    caplog.set_level(logging.INFO, logger="idp.mail")
    ask_reset(provider, provider.browser(), "alice@example.tw")
    files = list(outbox.glob("*.eml"))
    assert len(files) == 1 and (files[0].stat().st_mode & 0o077) == 0
    mail = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    assert mail["To"] == "alice@example.tw" and mail["From"] == "idp@example.tw"
    link = reset_link(mail)
    token = link.rsplit("=", 1)[1]
    lines = [r.getMessage() for r in caplog.records if r.name == "idp.mail"]
    assert len(lines) == 1 and str(files[0]) in lines[0]
    assert token not in caplog.text and "a***@example.tw" in lines[0]
    browser = provider.browser()
    done = browser.submit(browser.go(link), "/password/reset", new_password=NEW, new_password_again=NEW)
    assert "密碼已重設" in done.text


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_smtp_login_and_no_secret_in_the_logs(make_provider, caplog):
    server = MailServer(username="idp", password="s3cret-smtp").start()
    try:
        good = make_provider(**server.settings(), smtp_username="idp", smtp_password="s3cret-smtp")
        good.account("alice")
        send_verification(good.svc, _account(good), "zh-TW")
        assert server.next_message()["To"] == "alice@example.tw"
        assert "s3cret-smtp" not in repr(good.svc.settings)

        caplog.set_level(logging.INFO, logger="idp.mail")
        good.svc.mailer.settings = dataclasses.replace(good.svc.settings, smtp_password="wrong-pw")
        with pytest.raises(MailError):
            send_verification(good.svc, _account(good), "zh-TW")
        assert "wrong-pw" not in caplog.text and "token=" not in caplog.text
        assert server.unread() == 0
    finally:
        server.stop()


def test_starttls_is_required_unless_turned_off(make_provider, smtp_server):
    provider = make_provider(**{**smtp_server.settings(), "smtp_starttls": True})
    provider.account("alice")
    with pytest.raises(MailError):  # the test server offers no STARTTLS: nothing goes out in clear
        send_verification(provider.svc, _account(provider), "zh-TW")
    assert smtp_server.messages == []


def test_a_mail_server_that_is_down_still_shows_the_neutral_page(make_provider, caplog):
    from tests.servers import free_port

    provider = make_provider(smtp_host="127.0.0.1", smtp_port=free_port(), smtp_starttls=False, smtp_timeout_seconds=5)
    provider.account("alice", email_verified=True)
    caplog.set_level(logging.INFO, logger="idp.mail")
    page = ask_reset(provider, provider.browser(), "alice@example.tw")
    assert page.status_code == 200 and "如果這個地址屬於" in page.text
    assert "not sent" in caplog.text and "token=" not in caplog.text
    assert _events(provider, "password.reset_requested") == []


def test_a_reset_mail_that_never_left_leaves_the_delivered_link_working(make_provider):
    """A1 (forgot password): the user holds a link and asks again while the mail server is down.
    The page says "sent" as always, nothing arrives, and the link the user holds still works
    (it was no longer the newest, so it said the link was invalid)."""
    from tests.mailserver import MailServer

    server = MailServer().start()  # stopped below, as a mail server goes down
    try:
        provider = make_provider(**server.settings())
        provider.account("alice", email_verified=True)
        browser = provider.browser()
        ask_reset(provider, browser, "alice@example.tw")
        delivered = reset_link(server.next_message())
    finally:
        server.stop()
    provider.clock.advance(120)  # past the one mail a minute
    assert ask_reset(provider, browser, "alice@example.tw").status_code == 200
    assert server.messages[1:] == []

    page = browser.go(delivered)
    assert page.status_code == 200 and "new_password" in page.text
    done = browser.submit(page, "/password/reset", new_password=NEW, new_password_again=NEW)
    assert "/password/reset/done" in str(done.url)


def test_mail_dates_follow_the_injected_clock(mailing, smtp_server):
    provider = mailing
    provider.account("alice")
    provider.clock.now = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc).timestamp()
    send_verification(provider.svc, _account(provider), "zh-TW")
    assert smtp_server.next_message()["Date"].datetime == dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
