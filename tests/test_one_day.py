"""The one-day password (SPEC A7, seed 004) as the commerce portal's users meet
it: an administrator enables it, the check code arrives by real SMTP, and that
day the user logs in with account, password, check code and captcha; on both
back ends, with an injected clock for midnight in Taiwan."""

import datetime as dt
import hashlib
import re

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet
from sqlalchemy import select

from idp.factors import TAIPEI, one_day
from idp.mail import MailError
from idp.storage.models import Account, AuditEvent
from tests.harness import PASSWORD, callback, forms, redeem
from tests.test_admin import _cli_events, _idp, account_id, events, load, notice, sign_in
from tests.test_journeys import bound_otp
from tests.test_totp import _code, _error

CODE = re.compile(r"\b(\d{8})\b")
RESTARTED = "先前完成的驗證已失效"


@pytest.fixture
def shop(make_provider, smtp_server):
    """Two-factor login (with the captcha setting off: this form has one anyway),
    mail through a real SMTP server, alice without any binding, a portal."""
    provider = make_provider(mfa=True, captcha="off", **smtp_server.settings())
    provider.account("alice", name="王小明")
    client_id, secret = provider.client()
    return provider, client_id, secret


def mailed_code(smtp_server, to="alice@example.tw") -> str:
    mail = smtp_server.next_message()
    assert mail["To"] == to
    codes = set(CODE.findall(mail.get_content()))
    assert len(codes) == 1, mail.get_content()  # the same code in both languages
    return codes.pop()


def enable(provider, smtp_server, username="alice") -> str:
    one_day.enable(provider.svc, account_id(provider, username))
    return mailed_code(smtp_server, f"{username}@example.tw")


def one_day_form(browser, client_id):
    """The portal's login, then the login page's "一日密碼登入" link."""
    page = browser.authorize(client_id)
    tx = forms(page.text)[0]["fields"]["tx"]
    assert f'href="/login?tx={tx}&amp;factor=one_day"' in page.text and "一日密碼登入" in page.text
    return browser.go(f"/login?tx={tx}&factor=one_day")


def submit(provider, browser, page, code, username="alice", password=PASSWORD, captcha=None):
    tx = next(f for f in forms(page.text) if f["action"] == "/login/factor/one_day")["fields"]["tx"]
    answer = provider.svc.transactions.get(tx)["captcha"] if captcha is None else captcha  # what the image shows
    return browser.submit(page, "/login/factor/one_day", username=username, password=password, code=code, captcha=answer)


def login(provider, client_id, code, **kwargs):
    browser = provider.browser()
    return browser, submit(provider, browser, one_day_form(browser, client_id), code, **kwargs)


def seconds_to_midnight(now: float) -> float:
    local = dt.datetime.fromtimestamp(now, TAIPEI)
    midnight = (local + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight.timestamp() - now


# -- the journey -------------------------------------------------------------------------------
def test_admin_enables_it_and_the_user_logs_in_that_day_only(shop, smtp_server):
    provider, client_id, client_secret = shop
    provider.account("root", admin=True)
    admin, _, _ = sign_in(provider, "root")
    alice = account_id(provider, "alice")
    page = admin.go(f"/admin/accounts/{alice}")
    assert "未開通" in page.text
    page = admin.submit(page, f"/admin/accounts/{alice}/one-day-password")
    today = one_day.today(provider.clock()).isoformat()
    assert "檢查碼已寄至 a***@example.tw" in notice(page) and f"{today} 當天有效" in page.text

    mail = smtp_server.next_message()
    body = mail.get_content()
    assert "一日密碼檢查碼通知" in mail["Subject"] and "one-day password check code" in mail["Subject"]
    assert body.index("王小明 您好") < body.index("Dear 王小明") and today in body
    code = set(CODE.findall(body)).pop()
    stored = load(provider, "alice")
    assert stored.one_day_code_hash == one_day.digest(provider.svc, alice, code) and code not in stored.one_day_code_hash
    assert stored.one_day_code_hash != hashlib.sha256(code.encode()).hexdigest()  # keyed: a dump alone cannot test codes
    event = events(provider, "one_day.enabled")[-1]
    assert event.account_id == alice and event.detail == {"by": account_id(provider, "root"), "day": today}
    assert code not in str(event.detail)

    browser = provider.browser()
    page = one_day_form(browser, client_id)
    assert page.status_code == 200 and 'name="code"' in page.text and 'name="captcha"' in page.text
    assert "Email 檢查碼" in page.text and 'for="code"' in page.text
    tx = forms(page.text)[0]["fields"]["tx"]
    image = browser.http.get(f"/login/captcha?tx={tx}")
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    params = callback(submit(provider, browser, page, code))  # no OTP bound, and no forced binding today
    token = redeem(browser.http, client_id, client_secret, params["code"]).json()
    claims = jwt.decode(token["id_token"], KeySet.import_key_set(browser.http.get("/jwks").json())).claims
    assert claims["amr"] == ["pwd", "otp", "mfa"] and claims["acr"] == "urn:idp:loa:2"
    success = events(provider, "login.success")[-1]
    assert success.account_id == alice and "one_day" in success.method

    # The same code works again later that day (a day pass, not single-use): an hour later, or
    # as late as the day goes, when the test runs in Taipei's last hour ...
    provider.clock.advance(max(0, min(3600, seconds_to_midnight(provider.clock()) - 1)))
    assert "code" in callback(login(provider, client_id, code)[1])
    # ... and no longer the next day.
    provider.clock.advance(seconds_to_midnight(provider.clock()) + 60)
    _, page = login(provider, client_id, code)
    assert f"只在 {today} 當天有效" in _error(page) and "再錯 2 次" in _error(page)


def test_the_code_ends_at_midnight_taiwan_time(shop, smtp_server):
    provider, client_id, _ = shop
    code = enable(provider, smtp_server)
    provider.clock.advance(seconds_to_midnight(provider.clock()) - 1)  # 23:59:59 in Taipei
    browser, page = login(provider, client_id, code)
    assert "code" in callback(page)
    provider.clock.advance(1)  # 00:00:00
    _, page = login(provider, client_id, code)
    assert "當天有效" in _error(page)
    # The login it made that day is over too: its SSO session gives the portal no code.
    page = browser.authorize(client_id)
    assert page.status_code == 200 and "/login/factor/password" in page.text
    with provider.svc.db.session() as session:
        reasons = [e.detail.get("reason") for e in session.execute(
            select(AuditEvent).where(AuditEvent.event == "login.failure")).scalars()]
    assert reasons == ["expired"]


def _refresh(browser, client_id, secret, token):
    return browser.http.post("/token", data={"grant_type": "refresh_token", "refresh_token": token["refresh_token"]},
                             auth=(client_id, secret))


def test_its_refresh_tokens_end_at_midnight_as_its_login_does(shop, smtp_server):
    """A portal cannot keep refreshing for a month on a login that rested on a code good for a
    day: its tokens, and those of the portals it reached by single sign-on, end at midnight in
    Taiwan; a login by password and OTP that day keeps the usual 30 days."""
    provider, client_id, secret = shop
    other_id, other_secret = provider.client(client_name="Records")
    provider.clock.advance(seconds_to_midnight(provider.clock()) + 22 * 3600)  # 22:00 in Taipei
    code = enable(provider, smtp_server)
    browser, page = login(provider, client_id, code)
    one_day_token = redeem(browser.http, client_id, secret, callback(page)["code"]).json()
    sso_token = redeem(browser.http, other_id, other_secret, callback(browser.authorize(other_id))["code"]).json()
    provider.account("bob")
    otp_secret = bound_otp(provider, account_id(provider, "bob"))
    bob = provider.browser()
    page = bob.password(bob.authorize(client_id), username="bob")
    page = bob.submit(page, "/login/factor/otp", otp=_code(provider, otp_secret))
    bob_token = redeem(bob.http, client_id, secret, callback(page)["code"]).json()

    provider.clock.advance(7200 - 60)  # 23:59
    refreshed = _refresh(browser, client_id, secret, one_day_token)
    assert refreshed.status_code == 200 and refreshed.json()["expires_in"] <= 60  # nothing of it outlives the day
    one_day_token = refreshed.json()
    provider.clock.advance(61)  # 00:00:01
    for token, (client, client_secret) in ((one_day_token, (client_id, secret)), (sso_token, (other_id, other_secret))):
        response = _refresh(browser, client, client_secret, token)
        assert response.status_code == 400 and response.json()["error"] == "invalid_grant", response.text
    assert _refresh(bob, client_id, secret, bob_token).status_code == 200


# -- wrong answers --------------------------------------------------------------------------------
def test_wrong_codes_count_towards_the_lockout(shop, smtp_server):
    provider, client_id, _ = shop
    code = enable(provider, smtp_server)
    wrong = "11111111" if code != "11111111" else "22222222"
    browser = provider.browser()
    page = one_day_form(browser, client_id)
    for left in (2, 1):
        page = submit(provider, browser, page, wrong)
        assert "Email 檢查碼錯誤" in _error(page) and f"再錯 {left} 次" in _error(page)
        assert 'value="alice"' in page.text and wrong not in page.text  # the account kept, never the code
    page = submit(provider, browser, page, wrong)
    assert "帳號已暫時停用" in _error(page)
    page = submit(provider, browser, page, code)
    assert "帳號已暫時停用" in _error(page)
    # One lockout for every form, as the seeds say.
    other = provider.browser()
    assert "帳號已暫時停用" in _error(other.password(other.authorize(client_id)))
    with provider.svc.db.session() as session:  # each try while locked in the owner's activity log too
        locked = session.execute(select(AuditEvent).where(AuditEvent.event == "login.locked")).scalars().all()
    assert len(locked) == 3 and all(event.account_id for event in locked)


def test_password_and_code_failures_share_the_counter(shop, smtp_server):
    provider, client_id, _ = shop
    code = enable(provider, smtp_server)
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id), password="wrong-password")
    assert "再錯 2 次" in _error(page)
    page = submit(provider, browser, browser.go(f"/login?tx={forms(page.text)[0]['fields']['tx']}&factor=one_day"), code,
                  password="still-wrong")
    # A wrong password: the message does not say whether the code was right.
    assert "帳號、密碼或檢查碼錯誤" in _error(page) and "再錯 1 次" in _error(page)
    page = submit(provider, browser, page, code)
    assert "code" in callback(page)


def test_without_a_code_today_the_form_says_so_and_counts(shop):
    provider, client_id, _ = shop
    _, page = login(provider, client_id, "12345678")
    assert "今天" in _error(page) and "沒有開通一日密碼" in _error(page) and "再錯 2 次" in _error(page)
    _, page = login(provider, client_id, "12345678", username="nobody")
    assert "帳號、密碼或檢查碼錯誤" in _error(page)  # an unknown account learns nothing


def test_captcha_is_always_asked_and_bad_input_is_not_counted(shop, smtp_server):
    provider, client_id, _ = shop
    code = enable(provider, smtp_server)
    browser = provider.browser()
    page = one_day_form(browser, client_id)
    page = submit(provider, browser, page, code, captcha="00000")
    assert "驗證碼錯誤" in _error(page)
    page = submit(provider, browser, page, code, captcha="")
    assert "驗證碼錯誤" in _error(page)
    for bad in ("1234", "12ab5678", "123456789"):
        page = submit(provider, browser, page, bad)
        assert "8 位數字" in _error(page)
    page = submit(provider, browser, page, "")
    assert "請輸入帳號、密碼與 Email 檢查碼" in _error(page)
    # None of these counted: with spaces and a dash, as a mail reader may copy it, the code works.
    page = submit(provider, browser, page, f"{code[:4]} {code[4:6]}-{code[6:]}")
    assert "code" in callback(page)


def test_enabling_again_replaces_the_code(shop, smtp_server):
    provider, client_id, _ = shop
    first = enable(provider, smtp_server)
    second = enable(provider, smtp_server)
    if first != second:
        assert "Email 檢查碼錯誤" in _error(login(provider, client_id, first)[1])
    assert "code" in callback(login(provider, client_id, second)[1])


def test_an_expired_password_must_still_be_changed(shop, smtp_server):
    provider, client_id, _ = shop
    with provider.svc.db.session() as session:
        account = session.execute(select(Account).where(Account.username == "alice")).scalar_one()
        account.password_changed_at = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
    code = enable(provider, smtp_server)
    browser, page = login(provider, client_id, code)
    assert "/login/password-change" in page.text
    new = "Brand-New-Pass-7?"
    assert "code" in callback(browser.submit(page, "/login/password-change", new_password=new, new_password_again=new))


def test_a_disabled_account_cannot_use_its_code(shop, smtp_server):
    provider, client_id, _ = shop
    code = enable(provider, smtp_server)
    with provider.svc.db.session() as session:
        session.execute(select(Account).where(Account.username == "alice")).scalar_one().disabled = True
    assert "此帳號已停用" in _error(login(provider, client_id, code)[1])
    with pytest.raises(one_day.OneDayError) as refused:
        one_day.enable(provider.svc, account_id(provider, "alice"))
    assert refused.value.reason == "disabled"


def test_it_is_not_a_bound_second_factor(shop, smtp_server):
    """A password login is not offered the one-day code as its second step: forced binding stays."""
    provider, client_id, _ = shop
    enable(provider, smtp_server)
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id))
    assert "/login/bind/otp" in page.text and 'name="code"' not in page.text


# -- enabling it -------------------------------------------------------------------------------------
def test_no_email_no_one_day_password(shop, smtp_server):
    provider, _, _ = shop
    provider.account("root", admin=True)
    provider.account("carol", email=None)
    carol = account_id(provider, "carol")
    admin, _, _ = sign_in(provider, "root")
    page = admin.go(f"/admin/accounts/{carol}")
    assert "沒有設定 E-Mail" in page.text and "/one-day-password" not in page.text
    page = admin.go(f"/admin/accounts/{carol}/one-day-password", "POST", {"csrf": admin.http.cookies.get("idp_csrf")})
    assert "沒有設定 E-Mail" in _error(page) and load(provider, "carol").one_day_code_hash is None
    assert smtp_server.unread() == 0 and events(provider, "one_day.enabled") == []


def test_when_the_mail_fails_nothing_is_enabled(shop, smtp_server, monkeypatch):
    provider, _, _ = shop
    provider.account("root", admin=True)
    admin, _, _ = sign_in(provider, "root")
    alice = account_id(provider, "alice")
    page = admin.go(f"/admin/accounts/{alice}")

    def refuse(*args, **kwargs):
        raise MailError("the mail server 127.0.0.1:1 did not take the mail (ConnectionRefusedError)")

    monkeypatch.setattr(provider.svc.mailer, "send", refuse)
    page = admin.submit(page, f"/admin/accounts/{alice}/one-day-password")
    assert "寄送失敗" in _error(page) and "未開通" in page.text
    assert load(provider, "alice").one_day_code_hash is None and events(provider, "one_day.enabled") == []


def test_cli_mails_the_code_and_prints_no_secret(tmp_path, smtp_server):
    env = {"IDP_SMTP_HOST": smtp_server.host, "IDP_SMTP_PORT": str(smtp_server.port), "IDP_SMTP_STARTTLS": "false",
           "IDP_MAIL_FROM": "no-reply@idp.test"}
    assert _idp(tmp_path, "users", "add", "alice", "--email", "alice@example.tw", "--password-stdin",
                stdin=PASSWORD + "\n").returncode == 0
    assert _idp(tmp_path, "users", "add", "bob", "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    out = _idp(tmp_path, "users", "one-day-password", "alice", **env)
    assert out.returncode == 0, out.stderr
    code = mailed_code(smtp_server)
    assert code not in out.stdout + out.stderr and "mailed to a***@example.tw" in out.stdout
    assert [e[:2] for e in _cli_events(tmp_path, "one_day.enabled")] == [("alice", "cli")]
    refused = _idp(tmp_path, "users", "one-day-password", "bob", **env)
    assert refused.returncode == 2 and "no email address" in refused.stderr and smtp_server.unread() == 0
    assert _idp(tmp_path, "users", "one-day-password", "nobody", **env).returncode == 2


def test_a_login_of_the_last_moments_before_midnight_gets_no_tokens_after_it(shop, smtp_server):
    """A7: a one-day login finished seconds before midnight in Taiwan. Its code redeemed after
    midnight gets invalid_grant, not tokens of the next day; its consent page, allowed after
    midnight, starts the login over rather than issuing a code."""
    provider, client_id, secret = shop
    third, _ = provider.client(first_party=False, client_name="Grants")
    provider.clock.advance(seconds_to_midnight(provider.clock()) - 10)  # 23:59:50 in Taipei
    code = enable(provider, smtp_server)
    browser, page = login(provider, client_id, code)
    issued = callback(page)["code"]
    consent = browser.authorize(third)
    assert "/login/consent" in consent.text
    provider.clock.advance(20)  # 00:00:10
    response = redeem(browser.http, client_id, secret, issued)
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"
    after = browser.submit(consent, "/login/consent", button=("decision", "allow"))
    assert after.status_code == 200 and "/login/factor/password" in after.text and RESTARTED in after.text
