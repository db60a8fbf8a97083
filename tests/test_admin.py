"""The admin area and the admin CLI (SPEC M7, M6) as administrators use them:
an administrator and an organisation's AA account sign in with password + OTP,
find accounts, create, disable, unlock and reset them, and read their activity;
on both back ends. The one-day password (A7) has its own file."""

import datetime as dt
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import select

from idp.accounts import AccountError, by_username, create_account
from idp.storage.models import Account, AuditEvent, Binding
from idp.storage.db import Database
from tests.harness import PASSWORD, callback, language_link, redeem
from tests.test_mail_and_recovery import ask_reset, reset_link
from tests.test_token_endpoints import _introspect, _refresh, _user_tokens
from tests.test_totp import _code, _error, _secret

SCHOOL = "臺北市立示範國中"
OTHER = "新北市立範例高中"
NEW = "Fresh-Start-55!"


@pytest.fixture
def site(make_provider, smtp_server):
    """A provider with two-factor login that mails through a real SMTP server;
    an administrator, an AA account of the school, and personal accounts of the
    school and of another school."""
    provider = make_provider(mfa=True, **smtp_server.settings())
    provider.account("root", admin=True, name="系統管理者")
    provider.account("school-aa", kind="aa", org=SCHOOL, name="示範國中 AA")
    provider.account("alice", org=SCHOOL, name="王小明")
    provider.account("bob", org=OTHER, name="李大華")
    return provider


def sign_in(provider, username, url="/admin"):
    """Open ``url`` without a session and sign in as the seeds' first login goes:
    password, forced OTP binding, then password + OTP again. Returns (browser, page, secret)."""
    browser = provider.browser()
    page = browser.password(browser.go(url), username=username)
    secret = _secret(page)
    page = browser.submit(page, "/login/bind/otp", otp=_code(provider, secret))
    provider.clock.advance(30)
    page = browser.password(page, username=username)
    page = browser.submit(page, "/login/factor/otp", otp=_code(provider, secret))
    return browser, page, secret


def account_id(provider, username) -> str:
    with provider.svc.db.session() as session:
        return by_username(session, username).id


def load(provider, username) -> Account:
    with provider.svc.db.session() as session:
        account = by_username(session, username)
        session.expunge(account)
        return account


def notice(page) -> str:
    found = re.search(r'<div class="notice" role="status">\s*<p>(.*?)</p>', page.text, re.S)
    return found.group(1) if found else ""


def listed(page) -> list[str]:
    return re.findall(r'<tr data-username="([^"]+)">', page.text)


def events(provider, event) -> list[AuditEvent]:
    with provider.svc.db.session() as session:
        rows = session.execute(select(AuditEvent).where(AuditEvent.event == event).order_by(AuditEvent.id)).scalars().all()
        session.expunge_all()
        return rows


def logs_in(provider, client_id, username, password=PASSWORD):
    """A fresh browser's password login; returns the page after the password."""
    browser = provider.browser()
    return browser, browser.password(browser.authorize(client_id), username=username, password=password)


# -- who may enter ----------------------------------------------------------------------------
def test_the_admin_area_needs_a_fresh_second_factor(site):
    provider = site
    browser, page, secret = sign_in(provider, "root")
    assert page.status_code == 200 and "帳號管理" in page.text and "系統管理者（可管理所有帳號）" in page.text
    provider.clock.advance(601)  # M2: the OTP of the login is now too old
    page = browser.go("/admin")
    assert 'name="otp"' in page.text and "帳號列表" not in page.text
    page = browser.submit(page, "/login/factor/otp", otp=_code(provider, secret))
    assert "帳號列表" in page.text
    # A form sent with a stale verification changes nothing: the OTP is asked for again, then
    # the form's page says so, to send it again.
    alice = account_id(provider, "alice")
    page = browser.go(f"/admin/accounts/{alice}")
    provider.clock.advance(601)
    stale = browser.submit(page, f"/admin/accounts/{alice}/disable")
    assert 'name="otp"' in stale.text and not load(provider, "alice").disabled
    page = browser.submit(stale, "/login/factor/otp", otp=_code(provider, secret))
    assert page.url.path == f"/admin/accounts/{alice}" and "尚未變更任何資料" in notice(page)
    assert not load(provider, "alice").disabled


def test_a_form_sent_just_after_the_reverification_window_comes_back_to_its_page(site):
    """M2's 10 minutes count from the login, not from when a form was opened: the new-account
    form opened at 9 minutes and sent at 11 creates nothing, asks for the OTP again and comes
    back to the form, which says to send it again. It was the login's dead end, "登入已逾時 ...
    請回到原系統重新點選登入" (there is no 原系統 here)."""
    browser, _, secret = sign_in(site, "root")
    site.clock.advance(9 * 60)
    form = browser.go("/admin/new")
    site.clock.advance(2 * 60)
    typed = {"username": "chen-teacher", "name": "陳老師", "kind": "personal", "org": SCHOOL, "password": NEW,
             "password_again": NEW}
    page = browser.submit(form, "/admin/new", **typed)
    assert 'name="otp"' in page.text and "原系統" not in page.text
    page = browser.submit(page, "/login/factor/otp", otp=_code(site, secret))
    assert page.url.path == "/admin/new" and "尚未變更任何資料" in notice(page)
    with site.svc.db.session() as session:
        assert by_username(session, "chen-teacher") is None
    page = browser.submit(page, "/admin/new", **typed)
    assert "帳號已建立" in notice(page)


def test_a_personal_account_gets_403(site):
    provider = site
    browser, page, _ = sign_in(provider, "alice")
    assert page.status_code == 403 and "沒有帳號管理權限" in _error(page)
    alice = account_id(provider, "alice")
    assert browser.go(f"/admin/accounts/{alice}").status_code == 403
    assert browser.go("/admin/new").status_code == 403
    csrf = browser.http.cookies.get("idp_csrf")
    response = browser.go(f"/admin/accounts/{alice}/reset-bindings", "POST", {"csrf": csrf})
    assert response.status_code == 403
    with provider.svc.db.session() as session:
        assert session.query(Binding).filter_by(account_id=alice).count() == 1


# -- the list ---------------------------------------------------------------------------------
def test_list_search_and_pagination(site):
    provider = site
    for i in range(22):
        provider.account(f"student{i:02d}", name=f"學生{i:02d}", email=f"s{i:02d}@school.example.tw", org=SCHOOL)
    browser, page, _ = sign_in(provider, "root")
    assert "共 26 筆，第 1 頁，共 2 頁" in page.text and len(listed(page)) == 20
    second = browser.go("/admin?page=2")
    assert "第 2 頁，共 2 頁" in second.text and len(listed(second)) == 6
    assert set(listed(page)) | set(listed(second)) == {"root", "school-aa", "alice", "bob"} | {f"student{i:02d}" for i in range(22)}

    assert listed(browser.go("/admin?q=ALI")) == ["alice"]  # the username, any case
    assert listed(browser.go("/admin?q=李大")) == ["bob"]  # the name
    assert listed(browser.go("/admin?q=s07@school")) == ["student07"]  # the email
    found = browser.go("/admin?q=student1")
    assert "「student1」的搜尋結果：共 10 筆" in found.text and len(listed(found)) == 10
    assert listed(browser.go("/admin?q=%25")) == []  # a LIKE wildcard is a character, not "anything"
    nothing = browser.go("/admin?q=nobody-here")
    assert "沒有符合的帳號" in nothing.text
    assert browser.go("/admin?page=abc").status_code == 200  # a bad page number is page 1


def test_search_folds_the_case_of_any_letter_on_either_database(site):
    """Names and emails are not only ASCII: SQLite's own lower() folds A-Z alone, PostgreSQL's
    every letter; an administrator finds the same accounts on both."""
    site.account("elodie", name="Élodie Dupont", email="ÉLODIE@example.fr", org=SCHOOL)
    site.account("wide", name="ＡＢＣ 全形", org=SCHOOL)
    browser, _, _ = sign_in(site, "root")
    assert listed(browser.go("/admin?q=élodie d")) == ["elodie"]  # the name, in another case
    assert listed(browser.go("/admin?q=ÉLODIE DUPONT")) == ["elodie"]
    assert listed(browser.go("/admin?q=élodie@")) == ["elodie"]  # the email
    assert listed(browser.go("/admin?q=ａｂｃ")) == ["wide"]  # full-width Latin letters


# -- creating an account -------------------------------------------------------------------------
def test_one_username_created_twice_at_once_is_one_account_and_a_clear_error(site):
    """The second creation checks the name before the first commits: the database's unique
    index decides, and the second is told the account exists (not a server error)."""
    svc = site.svc
    flushed = threading.Event()
    outcomes = {}

    def create(username, hold):
        try:
            with svc.db.session() as session:
                create_account(session, svc.passwords, username, PASSWORD, now=dt.datetime.now(dt.timezone.utc))
                if hold:
                    flushed.set()
                    time.sleep(0.5)  # the other checks and inserts meanwhile, and waits on this one
            outcomes[username] = "created"
        except AccountError as e:
            outcomes[username] = e.key

    first = threading.Thread(target=create, args=("carol", True))
    first.start()
    assert flushed.wait(10)
    create("Carol", False)
    first.join()
    # By name: the second learns of the first's commit before the first thread goes on.
    assert outcomes == {"carol": "created", "Carol": "account.exists"}
    with svc.db.session() as session:
        assert by_username(session, "CAROL").username == "carol"


def test_created_account_must_change_its_initial_password_at_first_login(site, smtp_server):
    provider = site
    client_id, _ = provider.client()
    browser, _, _ = sign_in(provider, "root")
    form = browser.go("/admin/new")
    assert 'name="kind"' in form.text and 'value="aa"' in form.text and 'value="admin"' in form.text
    weak = browser.submit(form, "/admin/new", username="carol", name="陳小華", email="carol@example.tw", kind="personal",
                          org=SCHOOL, password="short", password_again="short")
    assert weak.status_code == 400 and "不符合規則" in _error(weak) and "大寫英文字母" in weak.text
    assert 'value="carol"' in weak.text and 'value="short"' not in weak.text  # input kept, never the password
    assert language_link(weak, "en") == "/admin/new?lang=en"  # the form's page, where the answer to a POST had none
    mismatch = browser.submit(weak, "/admin/new", username="carol", kind="personal", password=PASSWORD, password_again=NEW)
    assert "不一致" in _error(mismatch)
    taken = browser.submit(weak, "/admin/new", username="alice", kind="personal", password=PASSWORD, password_again=PASSWORD)
    assert "帳號 alice 已存在" in _error(taken)
    bad_mail = browser.submit(weak, "/admin/new", username="carol", email="not-an-address", kind="personal",
                              password=PASSWORD, password_again=PASSWORD)
    assert "E-Mail 格式不正確" in _error(bad_mail)
    page = browser.submit(weak, "/admin/new", username="carol", name="陳小華", email="carol@example.tw", kind="personal",
                          org=SCHOOL, password=PASSWORD, password_again=PASSWORD)
    assert "帳號已建立" in notice(page) and "帳號管理：carol" in page.text and "已過期" in page.text
    carol = load(provider, "carol")
    assert (carol.kind, carol.org, carol.admin, carol.email_verified) == ("personal", SCHOOL, False, False)
    created = events(provider, "account.created")[-1]
    root = account_id(provider, "root")
    assert created.account_id == carol.id and created.detail["by"] == root and created.method == "admin"
    assert created.ip == "testclient" and created.user_agent == "testclient"

    # carol's first login: binding (M1), then the password the administrator typed must be replaced.
    user = provider.browser()
    page = user.password(user.authorize(client_id), username="carol")
    secret = _secret(page)
    page = user.submit(page, "/login/bind/otp", otp=_code(provider, secret))
    provider.clock.advance(30)
    page = user.submit(user.password(page, username="carol"), "/login/factor/otp", otp=_code(provider, secret))
    assert "/login/password-change" in page.text and "code=" not in page.headers.get("location", "")
    same = user.submit(page, "/login/password-change", new_password=PASSWORD, new_password_again=PASSWORD)
    assert "不可與目前的密碼相同" in _error(same)
    assert "code" in callback(user.submit(same, "/login/password-change", new_password=NEW, new_password_again=NEW))


def test_admins_create_aa_and_admin_accounts(site):
    provider = site
    browser, _, _ = sign_in(provider, "root")
    form = browser.go("/admin/new")
    no_org = browser.submit(form, "/admin/new", username="other-aa", kind="aa", org="", password=PASSWORD, password_again=PASSWORD)
    assert "必須填寫機關" in _error(no_org)
    browser.submit(form, "/admin/new", username="other-aa", kind="aa", org=OTHER, password=PASSWORD, password_again=PASSWORD)
    browser.submit(form, "/admin/new", username="helper", kind="admin", password=PASSWORD, password_again=PASSWORD)
    bad = browser.submit(form, "/admin/new", username="weird", kind="superuser", password=PASSWORD, password_again=PASSWORD)
    assert "不能建立這種類型" in _error(bad)
    aa, helper = load(provider, "other-aa"), load(provider, "helper")
    assert (aa.kind, aa.org, aa.admin) == ("aa", OTHER, False)
    assert (helper.kind, helper.admin) == ("personal", True)


# -- disabling, unlocking, resetting -----------------------------------------------------------
def test_disable_and_enable(site):
    provider = site
    client_id, client_secret = provider.client()
    # alice has a session at the portal already, and the portal her tokens.
    user, page, secret = sign_in(provider, "alice", url="/account")
    tokens = redeem(user.http, client_id, client_secret, callback(user.authorize(client_id))["code"]).json()
    browser, _, _ = sign_in(provider, "root")
    alice = account_id(provider, "alice")
    page = browser.go(f"/admin/accounts/{alice}")
    page = browser.submit(page, f"/admin/accounts/{alice}/disable")
    assert "帳號已停用" in notice(page) and "重新啟用帳號" in page.text
    assert load(provider, "alice").disabled
    assert events(provider, "account.disabled")[-1].detail["by"] == account_id(provider, "root")
    # Her session is over (and her portals told): neither the account area nor a portal opens.
    assert 'name="password"' in user.go("/account").text
    again = user.authorize(client_id)
    assert 'name="password"' in again.text
    assert "此帳號已停用" in _error(user.password(again))
    assert "已停用" in browser.go("/admin?q=alice").text
    # Nor do her tokens: the portal can no longer refresh them, and introspection calls them dead.
    refused = _refresh(user.http, client_id, client_secret, tokens["refresh_token"])
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"
    assert _introspect(user.http, client_id, client_secret, tokens["access_token"]).json() == {"active": False}

    page = browser.submit(page, f"/admin/accounts/{alice}/enable")
    assert "帳號已重新啟用" in notice(page)
    again, page = logs_in(provider, client_id, "alice")
    assert 'name="otp"' in page.text
    provider.clock.advance(30)  # a fresh OTP: the one of her first login is spent
    code = callback(again.submit(page, "/login/factor/otp", otp=_code(provider, secret)))["code"]
    fresh = redeem(again.http, client_id, client_secret, code).json()
    assert _refresh(again.http, client_id, client_secret, fresh["refresh_token"]).status_code == 200


def test_an_admin_cannot_disable_itself(site):
    provider = site
    browser, _, _ = sign_in(provider, "root")
    root = account_id(provider, "root")
    page = browser.go(f"/admin/accounts/{root}")
    page = browser.submit(page, f"/admin/accounts/{root}/disable")
    assert "不能停用自己" in _error(page) and not load(provider, "root").disabled


def test_unlock_a_locked_account(site):
    provider = site
    client_id, _ = provider.client()
    user, page = logs_in(provider, client_id, "alice", password="wrong-1")
    for wrong in ("wrong-2", "wrong-3"):
        page = user.password(page, username="alice", password=wrong)
    assert "帳號已暫時停用" in _error(page)
    browser, _, _ = sign_in(provider, "root")
    assert "鎖定中" in browser.go("/admin?q=alice").text
    alice = account_id(provider, "alice")
    page = browser.go(f"/admin/accounts/{alice}")
    assert "鎖定中" in page.text and "/unlock" in page.text and "此帳號因驗證連續失敗" in page.text
    page = browser.submit(page, f"/admin/accounts/{alice}/unlock")
    assert "已解除帳號鎖定" in notice(page) and "/unlock" not in page.text
    assert events(provider, "account.unlocked")[-1].account_id == alice
    _, page = logs_in(provider, client_id, "alice")
    assert "帳號已暫時停用" not in _error(page) and "/login/bind/otp" in page.text


def test_a_reset_of_the_bindings_turns_password_login_back_on_with_a_new_password(site, smtp_server):
    """An account that had password login off (passkeys only) would have no way in at all
    once its bindings are gone: the reset turns password login on. Not with the old password,
    which the owner may have turned off because it leaked (M4: turning it back on forces a new
    one): the owner sets a new one through forgot-password, and the next login binds."""
    provider = site
    client_id, _ = provider.client()
    alice = account_id(provider, "alice")
    with provider.svc.db.session() as session:
        account = session.get(Account, alice)
        account.password_login_disabled, account.email_verified = True, True
    browser, _, _ = sign_in(provider, "root")
    page = browser.go(f"/admin/accounts/{alice}")
    page = browser.submit(page, f"/admin/accounts/{alice}/reset-bindings")
    assert "舊密碼已一併作廢" in notice(page) and "忘記密碼" in notice(page)
    assert events(provider, "bindings.reset")[-1].detail["password_forgotten"] is True

    _, page = logs_in(provider, client_id, "alice")  # whoever knew the old password
    assert page.status_code == 200 and "帳號或密碼錯誤" in _error(page)
    owner = provider.browser()
    ask_reset(provider, owner, "alice@example.tw")
    form = owner.go(reset_link(smtp_server.next_message()))
    assert "密碼已重設" in owner.submit(form, "/password/reset", new_password=NEW, new_password_again=NEW).text
    _, page = logs_in(provider, client_id, "alice", password=NEW)
    assert "/login/bind/otp" in page.text


def test_reset_bindings_sends_the_user_to_forced_binding(site):
    provider = site
    client_id, _ = provider.client()
    alices, _, _ = sign_in(provider, "alice", url="/account")  # alice binds OTP
    alice = account_id(provider, "alice")
    browser, _, _ = sign_in(provider, "root")
    page = browser.go(f"/admin/accounts/{alice}")
    row = re.search(r'<tr data-method="otp">(.*?)</tr>', page.text, re.S).group(1)
    assert "✓" in row
    page = browser.submit(page, f"/admin/accounts/{alice}/reset-bindings")
    assert "已刪除此帳號所有的登入綁定" in notice(page)
    row = re.search(r'<tr data-method="otp">(.*?)</tr>', page.text, re.S).group(1)
    assert "✗" in row
    with provider.svc.db.session() as session:
        assert session.query(Binding).filter_by(account_id=alice).count() == 0
    event = events(provider, "bindings.reset")[-1]
    assert event.account_id == alice and event.detail == {"by": account_id(provider, "root"), "deleted": 1,
                                                     "password_forgotten": False}
    _, page = logs_in(provider, client_id, "alice")
    assert "/login/bind/otp" in page.text and "<svg" in page.text
    assert "/login/factor/password" in alices.go("/account").text  # her session ended with the bindings


def test_actions_without_the_csrf_token_change_nothing(site):
    provider = site
    browser, _, _ = sign_in(provider, "root")
    sign_in(provider, "alice", url="/account")
    alice = account_id(provider, "alice")
    for action in ("disable", "reset-bindings", "one-day-password"):
        for data in ({"confirm": "yes"}, {"csrf": "forged"}):
            response = browser.go(f"/admin/accounts/{alice}/{action}", "POST", data)
            assert response.status_code == 400 and "未做任何變更" in _error(response)
    created = browser.go("/admin/new", "POST", {"username": "mallory", "kind": "admin", "password": PASSWORD,
                                                "password_again": PASSWORD})
    assert created.status_code == 400
    account = load(provider, "alice")
    assert not account.disabled and account.one_day_code_hash is None
    with provider.svc.db.session() as session:
        assert session.query(Binding).filter_by(account_id=alice).count() == 1
        assert by_username(session, "mallory") is None


def test_unknown_accounts_are_not_found(site):
    provider = site
    browser, _, _ = sign_in(provider, "root")
    assert browser.go("/admin/accounts/no-such-id").status_code == 404
    assert browser.go("/admin/accounts/" + "x" * 300).status_code == 404
    csrf = browser.http.cookies.get("idp_csrf")
    assert browser.go("/admin/accounts/no-such-id/disable", "POST", {"csrf": csrf}).status_code == 404


# -- the AA account: its own organisation's personal accounts only ----------------------------------
def test_aa_account_manages_its_organisations_personal_accounts_only(site):
    provider = site
    provider.account("carol", org=SCHOOL)
    provider.account("school-aa2", kind="aa", org=SCHOOL)
    provider.account("school-admin", org=SCHOOL, admin=True)
    browser, page, _ = sign_in(provider, "school-aa")
    assert "機關 AA 帳號（可管理「臺北市立示範國中」的個人帳號）" in page.text
    assert sorted(listed(page)) == ["alice", "carol"]
    assert listed(browser.go("/admin?q=bob")) == []
    csrf = browser.http.cookies.get("idp_csrf")
    for other in ("bob", "school-aa2", "school-admin", "root", "school-aa"):
        target = account_id(provider, other)
        assert browser.go(f"/admin/accounts/{target}").status_code == 404, other
        for action in ("disable", "unlock", "reset-bindings", "one-day-password"):
            assert browser.go(f"/admin/accounts/{target}/{action}", "POST", {"csrf": csrf}).status_code == 404
        assert not load(provider, other).disabled and load(provider, other).one_day_code_hash is None

    alice = account_id(provider, "alice")
    page = browser.go(f"/admin/accounts/{alice}")
    assert page.status_code == 200
    page = browser.submit(page, f"/admin/accounts/{alice}/disable")
    assert "帳號已停用" in notice(page) and load(provider, "alice").disabled
    assert events(provider, "account.disabled")[-1].detail["by"] == account_id(provider, "school-aa")

    # It creates personal accounts of its own organisation, whatever the form says.
    form = browser.go("/admin/new")
    assert 'value="aa"' not in form.text and 'value="admin"' not in form.text and "臺北市立示範國中" in form.text
    for kind in ("aa", "admin"):
        refused = browser.submit(form, "/admin/new", username="sneaky", kind=kind, password=PASSWORD, password_again=PASSWORD)
        assert refused.status_code == 400 and "不能建立這種類型" in _error(refused)
    page = browser.submit(form, "/admin/new", username="dave", kind="personal", org=OTHER, password=PASSWORD,
                          password_again=PASSWORD)
    assert "帳號已建立" in notice(page)
    dave = load(provider, "dave")
    assert (dave.kind, dave.org, dave.admin) == ("personal", SCHOOL, False)
    with provider.svc.db.session() as session:
        assert by_username(session, "sneaky") is None


def test_an_aa_account_without_an_organisation_administers_nothing(site):
    provider = site
    lost = provider.account("lost-aa", kind="aa", org="臺北市立測試國民小學")
    with provider.svc.db.session() as session:
        session.get(Account, lost).org = None  # made before an organisation was required
    _, page, _ = sign_in(provider, "lost-aa")
    assert page.status_code == 403


# -- activity (M6) ----------------------------------------------------------------------------------
def test_admin_reads_an_accounts_activity_with_pages(site):
    provider = site
    client_id, _ = provider.client()
    logs_in(provider, client_id, "alice", password="wrong-password")
    sign_in(provider, "alice", url="/account")
    alice = account_id(provider, "alice")
    browser, _, _ = sign_in(provider, "root")
    page = browser.go(f"/admin/accounts/{alice}")
    assert "登入失敗" in page.text and "登入成功" in page.text and "綁定" in page.text and "testclient" in page.text
    assert "第 1 頁，共 1 頁" in page.text
    for _ in range(25):
        provider.svc.audit.record("login.failure", account_id=alice, username="alice")
    page = browser.go(f"/admin/accounts/{alice}")
    assert "第 1 頁，共 2 頁" in page.text and 'href="?page=2"' in page.text
    page = browser.go(f"/admin/accounts/{alice}?page=2")
    assert "第 2 頁，共 2 頁" in page.text and 'href="?page=1"' in page.text
    assert "第 1 頁，共 2 頁" in browser.go(f"/admin/accounts/{alice}?page=%C2%B2").text  # ², a digit to str.isdigit


def test_pages_in_english(site):
    provider = site
    browser, _, _ = sign_in(provider, "root")
    page = browser.go("/admin?lang=en")
    assert "Account administration" in page.text and "Accounts: 4 in all, page 1 of 1" in page.text
    alice = account_id(provider, "alice")
    page = browser.go(f"/admin/accounts/{alice}")
    assert "Reset login bindings" in page.text and "One-day password" in page.text


# -- the CLI ------------------------------------------------------------------------------------------
def _idp(tmp_path, *args, stdin="", **env):
    env = {**os.environ, "IDP_DATABASE_URL": f"sqlite:///{tmp_path}/cli.sqlite3", "IDP_KEYS_DIR": str(tmp_path / "keys"),
           "IDP_OUTBOX_DIR": str(tmp_path / "outbox"), **env}
    return subprocess.run([sys.executable, "-m", "idp.cli", *args], input=stdin, capture_output=True, text=True, env=env,
                          cwd=tmp_path)


def _cli_events(tmp_path, event) -> list:
    db = Database(f"sqlite:///{tmp_path}/cli.sqlite3")
    with db.session() as session:
        return [(e.username, e.method, e.detail) for e in session.execute(select(AuditEvent).where(AuditEvent.event == event)).scalars()]


def test_cli_grants_and_revokes_the_admin_role(tmp_path):
    assert _idp(tmp_path, "users", "add", "root", "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    granted = _idp(tmp_path, "users", "admin", "root")
    assert granted.returncode == 0 and "administrator" in granted.stdout
    db = Database(f"sqlite:///{tmp_path}/cli.sqlite3")
    with db.session() as session:
        assert by_username(session, "root").admin
    assert _idp(tmp_path, "users", "admin", "root", "--revoke").returncode == 0
    with db.session() as session:
        assert not by_username(session, "root").admin
    assert [e[:2] for e in _cli_events(tmp_path, "admin.granted")] == [("root", "cli")]
    assert [e[:2] for e in _cli_events(tmp_path, "admin.revoked")] == [("root", "cli")]
    missing = _idp(tmp_path, "users", "admin", "nobody")
    assert missing.returncode == 2 and "no account nobody" in missing.stderr


def test_cli_resets_bindings(tmp_path):
    assert _idp(tmp_path, "users", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    db = Database(f"sqlite:///{tmp_path}/cli.sqlite3")
    with db.session() as session:
        alice = by_username(session, "alice")
        session.add(Binding(account_id=alice.id, factor="otp", data={"secret": "x", "version": 1}))
        session.add(Binding(account_id=alice.id, factor="certificate", external_id="MOICA|1", data={}))
    out = _idp(tmp_path, "users", "reset-bindings", "alice")
    assert out.returncode == 0 and "deleted 2 binding(s)" in out.stdout
    with db.session() as session:
        assert session.query(Binding).count() == 0
    assert _cli_events(tmp_path, "bindings.reset") == [("alice", "cli", {"deleted": 2, "password_forgotten": False})]
    assert _idp(tmp_path, "users", "reset-bindings", "nobody").returncode == 2


def test_cli_reset_bindings_ends_the_running_providers_sessions_or_refuses(provider, tmp_path):
    """`idp users reset-bindings` (and `disable`) ends the account's sessions and tokens on the running
    provider through Redis. With the in-process store they live in the provider's memory, out
    of the command's reach: while a provider serves the database, the command refuses and
    changes nothing, rather than delete the bindings and leave the sessions open."""
    alice = provider.account("alice")
    with provider.svc.db.session() as session:
        session.add(Binding(account_id=alice, factor="otp", data={"secret": "x", "version": 1}))
    client_id, secret = provider.client()
    settings = provider.svc.settings
    same = {"IDP_DATABASE_URL": settings.database_url, "IDP_REDIS_URL": settings.redis_url,
            "IDP_KEYS_DIR": settings.keys_dir}
    http = provider.http()
    tokens = _user_tokens(provider, client_id, secret)
    if not provider.svc.store.shared:
        assert provider.svc.db.claim_sole_server()  # as `idp serve` does
    out = _idp(tmp_path, "users", "reset-bindings", "alice", **same)
    refreshed = _refresh(http, client_id, secret, tokens["refresh_token"])
    with provider.svc.db.session() as session:
        kept = session.query(Binding).count()
    if provider.svc.store.shared:
        assert out.returncode == 0 and "deleted 1 binding(s)" in out.stdout
        assert refreshed.status_code == 400 and refreshed.json()["error"] == "invalid_grant"
        assert kept == 0
    else:
        assert out.returncode == 2 and "admin page (/admin)" in out.stderr
        assert refreshed.status_code == 200 and kept == 1
        # Nor is the account disabled there, its sessions and tokens left to come back with `enable`.
        out = _idp(tmp_path, "users", "disable", "alice", **same)
        assert out.returncode == 2 and "admin page (/admin)" in out.stderr
        assert _refresh(http, client_id, secret, refreshed.json()["refresh_token"]).status_code == 200


@pytest.mark.parametrize("backend", ["postgres+redis"])  # the in-process store's case: the test above
def test_cli_disable_and_enable_reach_the_running_provider(provider, tmp_path):
    """`idp users disable` runs in a process of its own, yet the running provider refuses the
    account's tokens at once, through the mark the command writes in Redis. `enable` lets a
    fresh login's tokens refresh."""
    provider.account("alice")
    client_id, secret = provider.client()
    settings = provider.svc.settings
    same = {"IDP_DATABASE_URL": settings.database_url, "IDP_REDIS_URL": settings.redis_url,
            "IDP_KEYS_DIR": settings.keys_dir}
    http = provider.http()
    tokens = _refresh(http, client_id, secret, _user_tokens(provider, client_id, secret)["refresh_token"])
    assert tokens.status_code == 200, tokens.text

    assert _idp(tmp_path, "users", "disable", "alice", **same).returncode == 0
    refused = _refresh(http, client_id, secret, tokens.json()["refresh_token"])
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"
    assert _introspect(http, client_id, secret, tokens.json()["access_token"]).json() == {"active": False}
    assert _introspect(http, client_id, secret, tokens.json()["refresh_token"]).json() == {"active": False}

    assert _idp(tmp_path, "users", "enable", "alice", **same).returncode == 0
    # The disable ended the account's sessions as of the command's clock, the real one, which
    # the provider's frozen clock has not reached yet: a login from before then is refused.
    provider.clock.advance(60)
    fresh = _user_tokens(provider, client_id, secret)
    assert _refresh(http, client_id, secret, fresh["refresh_token"]).status_code == 200
    missing = _idp(tmp_path, "users", "disable", "nobody", **same)
    assert missing.returncode == 2 and "no account nobody" in missing.stderr


def test_cli_help_lists_the_new_commands(tmp_path):
    out = _idp(tmp_path, "users", "--help")
    assert all(name in out.stdout for name in ("one-day-password", "reset-bindings", "admin"))


@pytest.mark.parametrize("backend", ["postgres+redis"])  # the CLI unlocks where the counters are shared
def test_cli_unlock_is_in_the_accounts_activity_and_knows_its_accounts(provider, tmp_path):
    alice = provider.account("alice")
    settings = provider.svc.settings
    same = {"IDP_DATABASE_URL": settings.database_url, "IDP_REDIS_URL": settings.redis_url, "IDP_KEYS_DIR": settings.keys_dir}
    assert _idp(tmp_path, "users", "unlock", "alice", **same).returncode == 0
    assert [e.account_id for e in events(provider, "account.unlocked")] == [alice]
    nobody = _idp(tmp_path, "users", "unlock", "nobody", **same)
    assert nobody.returncode == 2 and "no account nobody" in nobody.stderr
    assert len(events(provider, "account.unlocked")) == 1
