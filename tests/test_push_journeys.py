"""The push-approval app (SPEC A5, seed 000) walked in Chromium, with the reference
app (``clients/authenticator``) as the phone, over real HTTP:

register a phone from the settings page's QR code -> log in with the app's OTP ->
log in by push with number matching -> a wrong number -> an expired request -> a
replayed signature; and the pause after unanswered pushes in a row, with the app's
command line (register, ``watch --once`` answering as typed, ``otp``) as Bob's phone.

One provider (``mfa=True``, captcha always) and the portal for the module, both on
``localhost``; the provider's clock is the real one plus an offset the journeys can
move forward (``ShiftedClock``), so a request expires without waiting for it. The
same behaviour runs on both back ends over HTTP in ``tests/test_push.py``.
"""

from __future__ import annotations

import contextlib
import re
import secrets

import pytest

from clients.authenticator import AppError, Authenticator
from clients.school_portal import create_app as create_portal
from idp.clock import ShiftedClock
from idp.factors.totp import STEP
from idp.factors import push
from idp.settings import Settings
from idp.web.app import create_app
from tests import live
from tests.test_e2e import LiveProvider
from tests.test_journeys import (alice, bound_otp, expect, expect_portal_home, otp, start_at_portal, type_otp,
                                 type_password)
from tests.test_push import app_cli

try:  # the project depends on httpx2; plain httpx has the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

PORTAL_NAME = "學術研發服務網"
ANSWERED = 20_000  # ms: the waiting page looks every 2 s; generous for a busy machine


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(provider, portal URL) for the module."""
    tmp = tmp_path_factory.mktemp("push")
    with contextlib.ExitStack() as stack:
        sock, url = stack.enter_context(live.reserve("localhost"))
        settings = Settings.from_env({}, database_url=f"sqlite:///{tmp}/idp.sqlite3", redis_url="",
                                     keys_dir=str(tmp / "keys"), issuer=url, mfa=True, captcha="always")
        app = create_app(settings, ShiftedClock())
        stack.callback(app.state.svc.db.engine.dispose)  # after the server has stopped
        provider = LiveProvider(app, stack.enter_context(live.serve(app, sock, url)))
        portal_sock, portal = stack.enter_context(live.reserve("localhost"))
        client_id, secret = provider.client(client_name=PORTAL_NAME, redirect_uris=[portal + "/callback"],
                                            post_logout_redirect_uris=[portal + "/"])
        stack.enter_context(live.serve(create_portal(provider.issuer, client_id, secret, portal,
                                                     secrets.token_urlsafe(32)), portal_sock, portal, health="/"))
        yield provider, portal


@pytest.fixture(scope="module")
def http():
    with httpx.Client(timeout=60) as client:
        yield client


def phone(provider, http) -> Authenticator:
    return Authenticator(http=http, clock=provider.clock)


def to_push_page(page, provider, portal, username="alice") -> None:
    """Portal -> 登入 -> account and password -> the IDExpert page (from the OTP page if
    the account has an authenticator app too)."""
    start_at_portal(page, provider, portal)
    type_password(page, provider, username=username)
    if page.locator("form[data-step=otp]").count():
        page.get_by_role("link", name="改用 IDExpert APP（OTP 或推播通知）").click()
    expect(page.locator("form[data-step=push]")).to_be_visible()


def press_push(page) -> int:
    """【推播通知】; the number the login page then shows."""
    page.get_by_role("button", name="推播通知", exact=True).click()
    number = page.locator("[data-number]")
    expect(number).to_be_visible()
    return int(number.inner_text())


def expect_error(page, text: str) -> None:
    expect(page.locator("[role=alert]")).to_contain_text(text, timeout=ANSWERED)


def test_register_then_log_in_by_otp_and_by_push(site, http, people):
    provider, portal = site
    alice_id = alice(provider)
    secret = bound_otp(provider, alice_id)  # the authenticator app of an earlier day

    # -- the settings page: 增加 -> the registration QR code -> the phone scans it -> name, number, its code, 儲存
    page = people.page()
    start_at_portal(page, provider, portal)
    type_password(page, provider)
    type_otp(page, otp(provider, secret))
    expect_portal_home(page, portal)
    page.goto(provider.issuer + "/account")
    page.locator("tr[data-method=push]").get_by_role("link").click()
    page.get_by_role("button", name="增加", exact=True).click()
    expect(page.locator("figure.qr svg")).to_be_visible()
    url = page.locator("[data-registration-url]").inner_text()
    app = phone(provider, http)
    app.register(url)
    expect(page.locator("#push-scanned")).to_contain_text("註冊成功", timeout=ANSWERED)
    people.shot(page, "registration-qr")
    with pytest.raises(AppError) as again:  # the same QR code once more: the seed's message
        phone(provider, http).register(url)
    assert again.value.message == "註冊已超過有效時間或此帳號已被註冊"
    form = page.locator("form[data-step=push-save]")
    form.get_by_label("姓名").fill("王小明的手機")
    form.get_by_label("手機號碼").fill("0912-345")
    form.get_by_label("APP 上顯示的 6 個數字").fill(app.otp())
    form.get_by_role("button", name="儲存").click()
    expect_error(page, "手機號碼格式錯誤")
    form.get_by_label("手機號碼").fill("0912345678")
    form.get_by_label("APP 上顯示的 6 個數字").fill(app.otp())
    form.get_by_role("button", name="儲存").click()
    expect(page.locator("[role=status]")).to_contain_text("手機設定完成")
    expect(page.locator("tr[data-device='王小明的手機']")).to_contain_text("0912***678")
    people.shot(page, "phones")

    # -- login with the app's OTP: its next one (the code typed at 儲存 is spent)
    page = people.page()
    to_push_page(page, provider, portal)
    expect(page.get_by_label("請選擇手機號碼")).to_contain_text("王小明的手機 0912***678")
    people.shot(page, "choose-phone")
    provider.clock.advance(STEP)
    try:
        page.get_by_label("請輸入 IDExpert APP 上動態產生的 6 個數字").fill(app.otp())
        page.get_by_role("button", name="OTP 登入").click()
        expect_portal_home(page, portal)
    finally:  # the site is shared by this module's journeys
        provider.clock.advance(-STEP)
    expect(page.locator("main")).to_contain_text("swk")
    expect(page.locator("main")).to_contain_text("otp")

    # -- login by push: the phone shows the request; the user taps the page's number
    page = people.page()
    to_push_page(page, provider, portal)
    number = press_push(page)
    people.shot(page, "number-to-match")
    [request] = app.pending(wait=10)
    assert (request["application"], request["account"]) == (PORTAL_NAME, "alice")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", request["time"]) and number in request["choices"]
    assert app.approve(request, number) == "approved"
    page.wait_for_url(portal + "/", timeout=ANSWERED)
    expect_portal_home(page, portal)
    expect(page.locator("main")).to_contain_text("swk")
    expect(page.locator("main")).not_to_contain_text("otp")

    # -- a wrong number: the request is void and the page says why
    page = people.page()
    to_push_page(page, provider, portal)
    number = press_push(page)
    [request] = app.pending(wait=10)
    assert app.approve(request, next(n for n in request["choices"] if n != number)) == "wrong_number"
    expect_error(page, "手機上點選的數字與登入頁面顯示的不同")
    people.shot(page, "wrong-number")

    # -- a replayed signature: an approval captured once logs nobody in again
    number = press_push(page)
    [request] = app.pending(wait=10)
    captured = app.answer_message(request, True, number)
    assert app.post(app.state["endpoints"]["answer"], captured) == {"result": "approved"}
    page.wait_for_url(portal + "/", timeout=ANSWERED)
    page = people.page()
    to_push_page(page, provider, portal)
    press_push(page)
    with pytest.raises(AppError) as replay:
        app.post(app.state["endpoints"]["answer"], captured)
    assert replay.value.code == "replayed"
    [request] = app.pending(wait=10)  # the new request still waits for a real answer
    assert app.deny(request) == "denied"
    expect_error(page, "登入請求已在手機上被拒絕")

    # -- an expired request: the phone can no longer answer it, the page says so
    number = press_push(page)
    [request] = app.pending(wait=10)
    waited = provider.svc.settings.push_request_seconds + 1
    provider.clock.advance(waited)
    try:
        with pytest.raises(AppError) as late:
            app.approve(request, number)
        assert late.value.code == "request_expired"
        expect_error(page, "登入請求已逾時")
    finally:  # back to real time: the portal checks ID tokens against its own clock
        provider.clock.advance(-waited)


def cli(state, *args, stdin: str = "") -> str:
    """The app's command line (``python -m clients.authenticator``) on a phone set to Chinese; what it printed."""
    done = app_cli(state, *args, stdin=stdin, env={"LANG": "zh_TW.UTF-8"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_unanswered_pushes_in_a_row_pause_pushes(site, people, tmp_path):
    """Bob's phone is the command-line app: it registers, answers one push as typed, shows codes."""
    provider, portal = site
    bob_id = provider.account("bob", name="李大同")
    state = tmp_path / "phone.json"
    # Scanned on an earlier day: the settings page's code path, then 儲存 with the code the app shows.
    cli(state, "register", push.registration_url(provider.svc, push.start_registration(provider.svc, bob_id)["code"]))
    provider.clock.advance(-STEP)  # saved a while ago, with the code the app showed then (it is spent)
    try:
        code = Authenticator(state, http=httpx.Client(), clock=provider.clock).otp()
        assert push.save_registration(provider.svc, bob_id, "大同的手機", "886912345678", code) is None
    finally:
        provider.clock.advance(STEP)

    page = people.page()
    to_push_page(page, provider, portal, username="bob")
    shown = cli(state, "watch", "--once", stdin=f"{press_push(page)}\n")
    assert PORTAL_NAME in shown and "bob" in shown and "已核准" in shown
    page.wait_for_url(portal + "/", timeout=ANSWERED)

    page = people.page()
    to_push_page(page, provider, portal, username="bob")
    limit = provider.svc.settings.push_max_unanswered
    for _ in range(limit):
        press_push(page)
        page.get_by_role("button", name="取消推播，改輸入 OTP 或選擇其他手機").click()
    page.get_by_role("button", name="推播通知", exact=True).click()
    expect_error(page, f"已連續 {limit} 次推播通知未回應")
    assert Authenticator(state, http=httpx.Client()).pending() == []
    # The app's code still logs in.
    page.get_by_label("請輸入 IDExpert APP 上動態產生的 6 個數字").fill(cli(state, "otp").strip())
    page.get_by_role("button", name="OTP 登入").click()
    page.wait_for_url(portal + "/")
    expect(page.locator("main")).to_contain_text("歡迎，李大同")

