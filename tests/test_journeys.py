"""The two-factor account lifecycle (issue 3; SPEC A2, M1, M2, M4, M5) walked in a real
browser, the way a person clicks and types:

1. first login -> forced binding with the QR's secret -> log in again with the OTP;
2. lost phone -> emergency code from a real mail -> binding again;
3. disable password login -> a password login is refused -> re-enable with a new password.

Debian's Chromium driven by Playwright, against a live provider (``mfa=True``,
``captcha="always"``, mailing through the aiosmtpd server of ``smtp_server``) and the
school portal, both served over HTTP on ``localhost`` (``tests/test_e2e.py``). The
captcha answers are read from the provider's store, the mail from the SMTP server,
and OTP codes are computed with pyotp from the secret the binding page shows, on the
provider's real clock: a journey that needs two codes uses the current step, then
the next one (one step of drift is accepted), and never waits for time to pass.

These run on the SQLite+memory back end only: browser tests are the slow ones, and the
same flows run on both back ends, over HTTP without a browser, in tests/test_totp.py
and tests/test_account.py.

``IDP_JOURNEY_SHOTS=/some/dir`` saves a screenshot of every page on the way; a failing
journey always leaves screenshots of its open pages in the test's ``tmp_path``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyotp
import pytest
from sqlalchemy.orm import selectinload

from idp.factors.totp import Enrolment
from idp.storage.models import Account, Binding
from tests.harness import PASSWORD
from tests.test_e2e import CHROMIUM, CHROMIUM_ARGS, INSTALL_HINT, NAME

try:
    from playwright.sync_api import expect
except ImportError:  # reported by the chromium fixture
    expect = None

# Chromium on one back end only (see the module's docstring).
pytestmark = pytest.mark.parametrize("backend", ["sqlite+memory"])

LOA2 = "urn:idp:loa:2"
EMAIL = "alice@example.tw"
NEW_PASSWORD = "Fresh-Start-55!"
SHOTS = os.environ.get("IDP_JOURNEY_SHOTS")


# -- the browser ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chromium():
    """One headless Chromium for the module; each journey opens its own contexts."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing. {INSTALL_HINT}", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"the Python package playwright is missing. {INSTALL_HINT}", pytrace=False)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class People:
    """Browser contexts for one journey: ``page()`` is a new person (or device), with
    cookies of its own, in Traditional Chinese."""

    def __init__(self, browser, name: str):
        self.browser, self.name, self.contexts, self.shots = browser, name, [], 0

    def page(self):
        context = self.browser.new_context(locale="zh-TW")
        context.set_default_timeout(10_000)
        self.contexts.append(context)
        return context.new_page()

    def shot(self, page, what: str) -> None:
        """A screenshot of this step, when IDP_JOURNEY_SHOTS names a folder."""
        if SHOTS:
            self.shots += 1
            page.screenshot(path=Path(SHOTS) / f"{self.name}-{self.shots:02d}-{what}.png", full_page=True)


@pytest.fixture
def people(chromium, request, tmp_path):
    opened = People(chromium, request.node.originalname.removeprefix("test_"))
    failures = request.session.testsfailed
    yield opened
    # The call's report is logged before teardown: a higher count means this journey failed.
    if request.session.testsfailed > failures:
        for i, context in enumerate(opened.contexts):
            for j, page in enumerate(context.pages):
                path = tmp_path / f"failure-{i}-{j}.png"
                try:
                    page.screenshot(path=path, full_page=True)
                    print(f"screenshot of {page.url}: {path}")
                except Exception as exc:  # noqa: BLE001 - a screenshot must not hide the failure
                    print(f"no screenshot of {page.url}: {exc!r}")
    for context in opened.contexts:
        context.close()


@pytest.fixture
def live(make_live_provider, make_portal, smtp_server):
    """(provider, portal URL): mfa on, the captcha always, mail through ``smtp_server``."""
    provider = make_live_provider(host="localhost", mfa=True, captcha="always", **smtp_server.settings())
    return provider, make_portal(provider, host="localhost")


# -- what the person types -----------------------------------------------------------------------
def otp(provider, secret: str, steps: int = 0) -> str:
    """What the authenticator app shows now (``steps=1``: what it will show next)."""
    return pyotp.TOTP(secret).at(provider.clock() + 30 * steps)


def login_captcha(provider, page) -> str:
    """The login form's captcha: its answer is kept in the login transaction."""
    tx_id = page.locator("form[data-step=password] input[name=tx]").input_value()
    return provider.svc.transactions.get(tx_id)["captcha"]


def form_captcha(provider, form) -> str:
    """The captcha of any other form: a record of its own, named by the hidden ``form``."""
    form_id = form.locator("input[name=form]").input_value()
    return provider.svc.store.get("captcha:" + form_id)["captcha"]


def type_password(page, provider, password: str = PASSWORD, username: str = "alice") -> None:
    form = page.locator("form[data-step=password]")
    form.get_by_label("帳號", exact=True).fill(username)
    form.get_by_label("密碼", exact=True).fill(password)
    form.get_by_label("驗證碼", exact=True).fill(login_captcha(provider, page))
    form.locator("button[type=submit]").click()


def type_otp(page, code: str) -> None:
    form = page.locator("form[data-step=otp]")
    form.get_by_label("請輸入 APP 產生的密碼").fill(code)
    form.locator("button[type=submit]").click()


def bind_with_the_qr(page, provider) -> str:
    """On a binding page: read the secret shown for manual entry, type the app's code, press 綁定."""
    expect(page.locator("figure.qr svg")).to_be_visible()
    secret = page.locator("code.secret[data-secret]").inner_text().replace(" ", "")
    form = page.locator("form[data-step=bind-otp]")
    form.get_by_label("請輸入 APP 產生的密碼").fill(otp(provider, secret))
    form.get_by_role("button", name="綁定", exact=True).click()
    return secret


def start_at_portal(page, provider, portal: str) -> None:
    page.goto(portal + "/")
    page.get_by_role("link", name="登入", exact=True).click()
    page.wait_for_url(provider.issuer + "/**")


def expect_portal_home(page, portal: str) -> None:
    page.wait_for_url(portal + "/")
    main = page.locator("main")
    expect(main).to_contain_text(f"歡迎，{NAME}")
    expect(main).to_contain_text(LOA2)


# -- accounts as earlier days left them ----------------------------------------------------------
def alice(provider, *, email_verified: bool = False) -> str:
    account_id = provider.account("alice", name=NAME, email=EMAIL)
    if email_verified:  # as the confirm link of the verification mail would (SPEC M5's precondition)
        with provider.svc.db.session() as session:
            session.get(Account, account_id).email_verified = True
    return account_id


def bound_otp(provider, account_id: str) -> str:
    """OTP bound on an earlier day, through the binding page's own code path; returns the secret.

    Confirmed with the previous step's code, so that this step and the next are both
    left for the journey."""
    svc = provider.svc
    with svc.db.session() as session:
        account = session.get(Account, account_id, options=[selectinload(Account.bindings)])
        session.expunge(account)
    enrolment, owner = Enrolment(svc), "journey"  # the page's owner: none here, one made up
    secret = svc.box.open(enrolment.start(account, owner)["secret"], account_id)
    for _ in range(2):  # a second try only if a step began between the code and its check
        if (error := enrolment.confirm(account_id, owner, otp(provider, secret, steps=-1))) is None:
            return secret
    raise AssertionError(error)


# -- the journeys ----------------------------------------------------------------------------------
def test_first_login_forces_binding_then_otp_login(live, people):
    provider, portal = live
    alice(provider)
    page = people.page()

    start_at_portal(page, provider, portal)
    people.shot(page, "login")
    type_password(page, provider)

    # M1: nowhere to go but the binding page; the seed's table says nothing is bound yet.
    expect(page.get_by_role("heading", name="綁定雙因子認證")).to_be_visible()
    methods = page.get_by_role("table", name="授權方式")
    expect(methods.locator("tr[data-method=otp]")).to_contain_text("✗")
    expect(methods).not_to_contain_text("✓")
    people.shot(page, "bind")
    secret = bind_with_the_qr(page, provider)

    # Bound: log in again, now with the password and then the app's code.
    expect(page.locator(".notice")).to_contain_text("重新登入")
    expect(page.locator("form[data-step=password]")).to_be_visible()
    people.shot(page, "relogin")
    type_password(page, provider)
    expect(page.get_by_role("heading", name="OTP 驗證")).to_be_visible()
    people.shot(page, "otp")
    type_otp(page, otp(provider, secret, steps=1))  # the binding used this step's code

    expect_portal_home(page, portal)
    expect(page.locator("main")).to_contain_text("一次性密碼")  # amr otp, as the portal labels it
    # The portal's way to the provider's login settings (M2).
    expect(page.get_by_role("link", name=re.compile("登入設定"))).to_have_attribute("href", provider.issuer + "/account")
    people.shot(page, "portal")


def test_lost_phone_emergency_code_and_binding_again(live, people, smtp_server):
    provider, portal = live
    account_id = alice(provider, email_verified=True)
    old = bound_otp(provider, account_id)
    page = people.page()

    start_at_portal(page, provider, portal)
    type_password(page, provider)
    expect(page.locator("form[data-step=otp]")).to_be_visible()
    people.shot(page, "otp")
    page.get_by_role("link", name=re.compile("遺失或已更換手機")).click()

    # M5: the verified email and the captcha; the page shows the code's two-letter prefix.
    expect(page.get_by_role("heading", name="重設登入綁定")).to_be_visible()
    people.shot(page, "reset")
    send = page.locator("form[data-step=reset-send]")
    send.get_by_label("E-Mail", exact=True).fill(EMAIL)
    send.get_by_label("驗證碼", exact=True).fill(form_captcha(provider, send))
    send.locator("button[type=submit]").click()
    prefix = page.locator("[data-prefix]")
    expect(prefix).to_have_text(re.compile(r"^[A-Z]{2}-$"))
    people.shot(page, "reset-sent")

    mail = smtp_server.next_message()
    assert mail["To"] == EMAIL and "緊急驗證" in mail["Subject"]
    code = re.search(r"\b([A-Z]{2})-(\d{6})\b", mail.get_content())
    assert code, mail.get_content()
    assert prefix.inner_text() == code.group(1) + "-", "the page's prefix names another mail"
    page.get_by_label("緊急驗證碼").fill(code.group(2))  # the prefix stands before the box already
    page.locator("form[data-step=reset-verify] button[type=submit]").click()

    # Every binding deleted: forced binding (M1) with a new QR.
    expect(page.get_by_role("heading", name="綁定雙因子認證")).to_be_visible()
    expect(page.locator(".notice")).to_contain_text("已刪除所有登入綁定")
    expect(page.locator("table.methods tr[data-method=otp]")).to_contain_text("✗")
    people.shot(page, "bind-again")
    new = bind_with_the_qr(page, provider)
    assert new != old

    expect(page.locator(".notice")).to_contain_text("重新登入")
    type_password(page, provider)
    type_otp(page, otp(provider, new, steps=1))
    expect_portal_home(page, portal)


def test_disable_and_re_enable_password_login(live, people):
    provider, portal = live
    account_id = alice(provider)
    secret = bound_otp(provider, account_id)
    with provider.svc.db.session() as session:  # a certificate, bound as the MOICA login would
        session.add(Binding(account_id=account_id, factor="certificate", external_id="MOICA|TEST0001", data={}))

    # The login settings ask who it is: password, then the bound OTP (M2).
    me = people.page()
    me.goto(provider.issuer + "/account")
    type_password(me, provider)
    expect(me.locator("form[data-step=otp]")).to_be_visible()
    type_otp(me, otp(provider, secret))
    me.wait_for_url(provider.issuer + "/account")
    people.shot(me, "settings")

    # M4: turn password login off, after the confirmation page.
    me.locator("tr[data-method=password_login_disabled]").get_by_role("link", name="停用帳號密碼登入").click()
    expect(me.get_by_role("heading", name="停用帳號密碼登入")).to_be_visible()
    expect(me.locator("main")).to_contain_text("自然人憑證")
    people.shot(me, "disable-confirm")
    me.get_by_role("button", name="確定停用帳號密碼登入").click()
    expect(me.locator(".notice")).to_contain_text("已停用帳號密碼登入")
    expect(me.locator("tr[data-method=password_login_disabled]")).to_contain_text("✓")
    people.shot(me, "disabled")

    # Elsewhere, the password is refused, with the reason.
    other = people.page()
    start_at_portal(other, provider, portal)
    type_password(other, provider)
    expect(other.locator(".error")).to_contain_text("已停用帳號密碼登入")
    expect(other.locator("form[data-step=otp]")).to_have_count(0)
    people.shot(other, "refused")

    # Back on: a new password typed twice, and the captcha; a weak one is told what it lacks.
    me.locator("tr[data-method=password_login_disabled]").get_by_role("link", name="恢復帳號密碼登入").click()
    expect(me.get_by_role("heading", name="恢復帳號密碼登入")).to_be_visible()
    people.shot(me, "enable")

    def set_password(password: str) -> None:
        form = me.locator("form[data-step=enable-password]")
        form.get_by_label("新密碼", exact=True).fill(password)
        form.get_by_label("再次輸入新密碼", exact=True).fill(password)
        form.get_by_label("驗證碼", exact=True).fill(form_captcha(provider, form))
        form.locator("button[type=submit]").click()

    set_password("short")
    error = me.locator(".error")
    expect(error).to_contain_text("不符合規則")
    for missing in ("大寫英文字母", "數字", "符號"):
        expect(error.locator("li", has_text=missing)).to_have_count(1)
    people.shot(me, "weak")
    set_password(NEW_PASSWORD)
    expect(me.locator(".notice")).to_contain_text("已恢復帳號密碼登入")
    expect(me.locator("tr[data-method=password_login_disabled]")).to_contain_text("✗")
    people.shot(me, "enabled")

    # A new browser logs in with the new password and the OTP.
    again = people.page()
    start_at_portal(again, provider, portal)
    type_password(again, provider, password=NEW_PASSWORD)
    type_otp(again, otp(provider, secret, steps=1))  # the settings login used this step's code
    expect_portal_home(again, portal)
