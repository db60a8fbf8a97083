"""The push-approval app (SPEC A5) over HTTP, on both back ends: registration by the
QR code's one-time URL, login by the app's OTP and by push with number matching,
and what the device API refuses. The phone is the reference app
(``clients/authenticator``) talking to the provider in-process, on its clock.
The same journeys run in Chromium in ``tests/test_push_journeys.py``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from clients.authenticator import AppError, Authenticator
from idp.factors import push
from idp.storage.models import AuditEvent, Binding
from idp.factors.totp import STEP
from tests import live
from tests.harness import callback, forms, language_link, redeem, takes
from tests.test_observability import _samples
from tests.test_totp import as_typed

LOA2 = "urn:idp:loa:2"
ISSUER = "https://idp.test"  # the app takes a provider on plain http only on this computer


@pytest.fixture
def provider(make_provider):
    provider = make_provider(issuer=ISSUER)  # mfa off: the account area lets a password-only account in
    provider.account("alice")
    return provider


def _error(page) -> str:
    found = re.search(r'<div class="error" role="alert">\s*<p>(.*?)</p>', page.text, re.S)
    return found.group(1) if found else ""


def phone(provider) -> Authenticator:
    return Authenticator(http=provider.http(), clock=provider.clock)


def register(provider, browser, name="我的手機", number="0912345678") -> Authenticator:
    """Settings -> 增加 -> scan the QR code with a new phone -> name, number and the app's code -> 儲存."""
    page = browser.go("/account/push")
    if "/login/factor/password" in page.text:
        page = browser.password(page)
    page = browser.submit(page, "/account/push/add")
    url = re.search(r"<code class=\"secret\" data-registration-url>(.*?)</code>", page.text).group(1)
    app = phone(provider)
    app.register(url.replace("&amp;", "&"))
    page = browser.submit(page, "/account/push/save", name=name, phone=number, otp=app.otp())
    assert "手機設定完成" in page.text, page.text
    provider.clock.advance(STEP)  # the code typed at 儲存 is spent: logins use the app's next one
    return app


def _new_registration_url(provider) -> str:
    """A QR code of another account's settings page (as its 增加 button makes it)."""
    bob = provider.account("bob")
    return push.registration_url(provider.svc, push.start_registration(provider.svc, bob)["code"])


def _claims(browser, client_id, client_secret, params) -> dict:
    token = redeem(browser.http, client_id, client_secret, params["code"]).json()
    return jwt.decode(token["id_token"], KeySet.import_key_set(browser.http.get("/jwks").json())).claims


def _push_page(provider, client_id):
    """A new login up to the push page (password done, two factors asked for)."""
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id, acr_values=LOA2))
    assert 'data-step="push"' in page.text, page.text
    return browser, page


def _devices(page) -> list[str]:
    return re.findall(r'<option value="([^"]+)"', page.text)


def press_push(browser, page, device: str | None = None):
    form = next(f for f in forms(page.text) if f["action"] == "/login/factor/push")
    return browser.go("/login/push/start", "POST", {**form["fields"], "device": device or _devices(page)[0]})


def shown_number(page) -> int:
    return int(re.search(r"data-number[^>]*>(\d+)<", page.text).group(1))


@pytest.mark.parametrize("qr, issuer, endpoints", [
    ("https://idp.example.tw", "https://idp.moe.gov.tw", "https://collector.evil.example"),
    ("https://idp.example.tw", "https://idp.example.tw", "https://collector.evil.example"),
    ("https://idp.example.tw", "https:", "https://collector.evil.example"),  # the start of every https URL
    ("https://idp.example.tw", "https://idp.example.tw/a", "https://idp.example.tw/b"),
    ("http://idp.example.tw", "http://idp.example.tw", "http://idp.example.tw"),  # plain http, not on this computer
])
def test_the_app_talks_only_to_the_provider_whose_qr_code_it_scanned(qr, issuer, endpoints):
    """A QR code aimed at a phishing server cannot send the phone's later signed traffic to
    a third host, nor have the app show another provider's name."""
    from tests.live import httpx

    calls = []

    def server(request):
        calls.append(str(request.url))
        return httpx.Response(200, json={
            "device": "dev1", "issuer": issuer, "issuer_name": "教育部 身分認證服務",
            "otp": {"secret": "JBSWY3DPEHPK3PXP"},
            "endpoints": {"poll": endpoints + "/poll", "answer": endpoints + "/answer"}})

    app = Authenticator(http=httpx.Client(transport=httpx.MockTransport(server)))
    with pytest.raises(AppError) as refused:
        app.register(qr + "/push/register?code=abc")
    assert refused.value.code == "foreign_provider" and not app.state
    assert calls == [qr + "/push/register"]


ROOT = Path(__file__).resolve().parent.parent


def app_cli(state, *args, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    """The app's command line (``python -m clients.authenticator``) in an environment of no
    language but ``env``'s."""
    base = {k: v for k, v in os.environ.items() if k not in ("LC_ALL", "LC_MESSAGES", "LANG")}
    return subprocess.run([sys.executable, "-m", "clients.authenticator", "--state", str(state), *args],
                          input=stdin, capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**base, "PYTHONPATH": str(ROOT), **(env or {})})


class DeviceApi:
    """A provider's device API over HTTP, as far as a phone sees it: registration, one login
    request waiting, its answer; ``down`` makes every call a proxy's HTML 502 page."""

    def __init__(self):
        self.down = False
        self.languages = []  # the Accept-Language of each call

    def app(self) -> Starlette:
        def endpoint(answer):
            async def handle(request):
                self.languages.append(request.headers.get("accept-language"))
                if self.down:
                    return HTMLResponse("<html><body><h1>502 Bad Gateway</h1></body></html>", 502)
                return JSONResponse(answer(str(request.base_url).rstrip("/")))
            return handle

        def registered(base):
            return {"device": "dev1", "issuer": base, "issuer_name": "教育部 身分認證服務",
                    "otp": {"secret": "JBSWY3DPEHPK3PXP"},
                    "endpoints": {"poll": base + "/push/device/poll", "answer": base + "/push/device/answer"}}

        def pending(base):
            return {"requests": [{"id": "r1", "application": "學術研發服務網", "account": "bob",
                                  "time": "2026-12-04 10:00:00", "choices": [12, 34, 56], "expires_in": 120}]}

        return Starlette(routes=[Route(path, endpoint(answer), methods=["POST"]) for path, answer in (
            ("/push/register", registered), ("/push/device/poll", pending),
            ("/push/device/answer", lambda _: {"result": "approved"}))])


def test_the_app_speaks_the_users_language_and_says_in_one_line_when_a_proxy_answers(tmp_path):
    """The command line speaks the language of the environment (LC_ALL before LANG) or of
    --lang, and asks the provider for its messages in it. A proxy's HTML error page is
    one line naming the status, not a traceback."""
    api = DeviceApi()
    state = tmp_path / "phone.json"
    with live.reserve() as (sock, url), live.serve(api.app(), sock, url, health=None):
        done = app_cli(state, "register", url + "/push/register?code=abc", env={"LANG": "en_US.UTF-8"})
        assert done.returncode == 0 and done.stdout.startswith("Registered: 教育部 身分認證服務")
        done = app_cli(state, "watch", "--once", stdin="34\n", env={"LC_ALL": "C.UTF-8", "LANG": "zh_TW.UTF-8"})
        assert done.returncode == 0 and "Login request" in done.stdout and "Approved" in done.stdout
        assert "登入請求" not in done.stdout and "已核准" not in done.stdout
        assert set(api.languages) == {"en"}
        done = app_cli(state, "--lang", "zh-TW", "watch", "--once", stdin="34\n", env={"LANG": "en_US.UTF-8"})
        assert "登入請求" in done.stdout and "已核准" in done.stdout and "Approved" not in done.stdout
        assert api.languages[-1] == "zh-TW"

        api.down = True
        for env, said in (({"LANG": "zh_TW.UTF-8"}, "身分認證服務的回應（HTTP 502）"), ({}, "The provider's reply (HTTP 502)")):
            done = app_cli(state, "watch", "--once", env=env)
            assert done.returncode == 2 and done.stdout == "" and said in done.stderr, done.stderr
            assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    # The provider gone (its port closed): one line too, in the user's language.
    done = app_cli(state, "watch", "--once", env={"LANG": "zh_TW.UTF-8"})
    assert done.returncode == 2 and done.stderr.startswith("無法連線到身分認證服務") and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1


def test_registration_url_is_one_time_and_number_is_validated(provider):
    browser = provider.browser()
    page = browser.password(browser.go("/account/push"))
    page = browser.submit(page, "/account/push/add")
    assert "<svg" in page.text
    url = re.search(r"data-registration-url>(.*?)</code>", page.text).group(1).replace("&amp;", "&")
    # 儲存 before the phone scanned: told to scan first.
    refused = browser.submit(page, "/account/push/save", name="公務手機", phone="0912345678")
    assert refused.status_code == 400 and "請先以手機上 IDExpert APP 掃描" in _error(refused)
    first = phone(provider)
    first.register(url)
    assert len(first.otp()) == 6
    with pytest.raises(AppError) as second:
        phone(provider).register(url)
    assert second.value.status == 410 and second.value.message == "註冊已超過有效時間或此帳號已被註冊"
    for wrong in ("0812345678", "091234567", "886912345678x", "886812345678"):
        refused = browser.submit(page, "/account/push/save", name="公務手機", phone=wrong, otp=first.otp())
        assert refused.status_code == 400 and "手機號碼格式錯誤" in _error(refused), wrong
    page = browser.submit(refused, "/account/push/save", name="公務手機", phone="886912345678", otp=first.otp())
    assert "手機設定完成" in page.text and "8869*****678" in page.text
    # An expired QR code: the app gets the seed's message too.
    page = browser.submit(page, "/account/push/add")
    url = re.search(r"data-registration-url>(.*?)</code>", page.text).group(1).replace("&amp;", "&")
    provider.clock.advance(provider.svc.settings.push_registration_seconds + 1)
    with pytest.raises(AppError) as late:
        phone(provider).register(url)
    assert late.value.code == "registration_expired"


@pytest.mark.parametrize("meanwhile", [push.cancel_registration, push.start_registration])
def test_a_scan_that_ends_after_the_page_moved_on_brings_nothing_back(provider, meanwhile):
    """The user presses 取消 (or 增加 again) while the app's registration is under way: when
    the app's request ends, the older registration stays gone; it cannot be saved."""
    browser = provider.browser()
    page = browser.password(browser.go("/account/push"))
    added = browser.submit(page, "/account/push/add")
    url = re.search(r"data-registration-url>(.*?)</code>", added.text).group(1).replace("&amp;", "&")
    store = provider.svc.store

    class UserClicks:
        """The store, but the page's click lands just after the app's request read the registration."""
        def __getattr__(self, name):
            return getattr(store, name)

        def get(self, key):
            value = store.get(key)
            if key.startswith(push.PENDING):
                provider.svc.store = store
                meanwhile(provider.svc, key.removeprefix(push.PENDING))
            return value

    provider.svc.store = UserClicks()
    app = phone(provider)
    app.register(url)  # the app scanned in time
    assert provider.svc.store is store
    if meanwhile is push.cancel_registration:
        page = browser.go("/account/push/add")
        assert "註冊已超過有效時間" in _error(page), page.text
    else:  # the new QR code waits for its own scan
        assert browser.go("/account/push/add/status").json() == {"state": "waiting"}
        assert re.search(r"data-registration-url>(.*?)</code>", browser.go("/account/push/add").text).group(1) != url
    # 儲存 on the page as it was before the click (another tab), with the app's code.
    refused = browser.submit(added, "/account/push/save", name="公務手機", phone="0912345678", otp=app.otp())
    with provider.svc.db.session() as session:
        assert session.query(Binding).filter_by(factor="push").count() == 0, refused.text


def test_saving_needs_the_code_of_the_app_that_scanned(provider):
    """Whoever reaches the one-time URL first does not get bound: 儲存 asks for the code the
    scanning app shows; another app's code binds nothing and the user can try again."""
    browser = provider.browser()
    page = browser.password(browser.go("/account/push"))
    page = browser.submit(page, "/account/push/add")
    url = re.search(r"data-registration-url>(.*?)</code>", page.text).group(1).replace("&amp;", "&")
    app = phone(provider)
    app.register(url)
    another = phone(provider)
    another.register(_new_registration_url(provider))
    refused = browser.submit(page, "/account/push/save", name="公務手機", phone="0912345678", otp=another.otp())
    assert refused.status_code == 400 and "數字不正確" in _error(refused)
    assert language_link(refused, "en") == "/account/push/add?lang=en"
    with provider.svc.db.session() as session:
        assert session.query(Binding).filter_by(factor="push").count() == 0
    typed = as_typed(app.otp())
    assert takes(refused, "otp", typed)
    page = browser.submit(refused, "/account/push/save", name="公務手機", phone="0912345678", otp=typed)
    assert "手機設定完成" in page.text
    # The code typed at 儲存 is spent: it does not log in as well.
    client_id, _ = provider.client()
    login, page = _push_page(provider, client_id)
    spent = login.submit(page, "/login/factor/push", device=_devices(page)[0], otp=app.otp())
    assert "此 OTP 驗證碼已使用過" in _error(spent)


def test_login_with_the_apps_otp_then_by_push_with_number_matching(provider):
    client_id, client_secret = provider.client()
    settings = provider.browser()
    app = register(provider, settings)
    second = register(provider, settings, name="備用手機", number="0987654321")

    browser, page = _push_page(provider, client_id)
    assert "0912***678" in page.text and "0987***321" in page.text
    assert "/login/reset?tx=" in page.text  # seed 000: 無法使用二因子驗證登入，請按下方【重新設定】
    wrong = browser.submit(page, "/login/factor/push", device=_devices(page)[0], otp="000000")
    assert "驗證碼不正確" in _error(wrong)
    # A code counts only for the phone whose app made it.
    assert "驗證碼不正確" in _error(browser.submit(page, "/login/factor/push", device=_devices(page)[1], otp=app.otp()))
    typed = as_typed(app.otp())
    assert takes(wrong, "otp", typed)
    params = callback(browser.submit(wrong, "/login/factor/push", device=_devices(page)[0], otp=typed))
    assert _claims(browser, client_id, client_secret, params)["amr"] == ["pwd", "swk", "otp", "mfa"]

    browser, page = _push_page(provider, client_id)
    page = press_push(browser, page, _devices(page)[1])
    number = shown_number(page)
    assert app.pending() == []  # pushed to the other phone
    [request] = second.pending()
    assert request["application"] == "Portal" and request["account"] == "alice"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", request["time"]) and number in request["choices"]
    assert second.approve(request, number) == "approved"
    with pytest.raises(AppError) as twice:
        second.approve(request, number)
    assert twice.value.code == "already_answered"
    params = callback(browser.submit(page, "/login/factor/push"))
    claims = _claims(browser, client_id, client_secret, params)
    assert claims["amr"] == ["pwd", "swk", "mfa"] and claims["acr"] == LOA2


def test_wrong_number_denied_expired_and_replayed_answers_fail(make_provider):
    provider = make_provider(issuer=ISSUER, push_max_unanswered=4)  # the three failed pushes in a row below do not pause the fourth
    provider.account("alice")
    client_id, _ = provider.client()
    settings = provider.browser()
    app = register(provider, settings)

    browser, page = _push_page(provider, client_id)
    page = press_push(browser, page)
    [request] = app.pending()
    other = next(n for n in request["choices"] if n != shown_number(page))
    assert app.approve(request, other) == "wrong_number"
    page = browser.submit(page, "/login/factor/push")
    assert "數字與登入頁面顯示的不同" in _error(page) and 'data-step="push"' in page.text

    page = press_push(browser, page)
    [request] = app.pending()
    assert app.deny(request) == "denied"
    page = browser.submit(page, "/login/factor/push")
    assert "被拒絕" in _error(page)

    page = press_push(browser, page)
    [request] = app.pending()
    provider.clock.advance(provider.svc.settings.push_request_seconds + 1)
    assert app.pending() == []
    with pytest.raises(AppError) as late:
        app.approve(request, shown_number(page))
    assert late.value.code == "request_expired"
    page = browser.submit(page, "/login/factor/push")
    assert "逾時" in _error(page)

    # A captured approval of one request approves nothing else, not even sent again.
    page = press_push(browser, page)
    [request] = app.pending()
    message = app.answer_message(request, True, shown_number(page))
    assert app.post(app.state["endpoints"]["answer"], message)["result"] == "approved"
    with pytest.raises(AppError) as replay:
        app.post(app.state["endpoints"]["answer"], message)
    assert replay.value.code == "replayed"
    callback(browser.submit(page, "/login/factor/push"))
    browser, page = _push_page(provider, client_id)
    page = press_push(browser, page)
    with pytest.raises(AppError) as again:
        app.post(app.state["endpoints"]["answer"], message)
    assert again.value.code == "replayed"
    assert len(app.pending()) == 1
    # The user can see on the settings' activity log what the phone answered.
    activity = settings.go("/account/activity").text
    assert all(event in activity for event in ("推播數字不符", "推播拒絕", "推播核准", "綁定"))


def _phone_and_push_page(provider):
    """A portal, a phone registered for alice, and her login at the portal on its push page:
    (client_id, app, browser, page)."""
    client_id, _ = provider.client()
    app = register(provider, provider.browser())
    return (client_id, app, *_push_page(provider, client_id))


def test_unanswered_pushes_in_a_row_are_rate_limited(provider):
    client_id, app, browser, page = _phone_and_push_page(provider)
    limit = provider.svc.settings.push_max_unanswered
    for _ in range(limit):
        page = press_push(browser, page)
        assert "data-number" in page.text
        page = browser.submit(page, "/login/push/stop")
    refused = press_push(browser, page)
    assert f"已連續 {limit} 次推播通知未回應" in _error(refused) and "data-number" not in refused.text
    # The app's code still works; after the pause pushes work again.
    callback(browser.submit(refused, "/login/factor/push", device=_devices(refused)[0], otp=app.otp()))
    provider.clock.advance(provider.svc.settings.lockout_seconds + 1)
    # Denials count like no answer: whoever has the password cannot push for ever while the user says no.
    browser, page = _push_page(provider, client_id)
    for _ in range(limit):
        page = press_push(browser, page)
        [request] = app.pending()
        assert app.deny(request) == "denied"
        page = browser.submit(page, "/login/factor/push")
    refused = press_push(browser, page)
    assert f"已連續 {limit} 次推播通知未回應" in _error(refused) and "data-number" not in refused.text
    # Only an approval counts afresh.
    provider.clock.advance(provider.svc.settings.lockout_seconds + 1)
    browser, page = _push_page(provider, client_id)
    for _ in range(limit - 1):
        page = browser.submit(press_push(browser, page), "/login/push/stop")
    page = press_push(browser, page)
    [request] = app.pending()
    assert app.approve(request, shown_number(page)) == "approved"
    callback(browser.submit(page, "/login/factor/push"))
    browser, page = _push_page(provider, client_id)
    for _ in range(limit):
        page = press_push(browser, page)
        assert "data-number" in page.text
        page = browser.submit(page, "/login/push/stop")


def test_pushes_denied_and_paused_are_counted_in_the_login_metric(provider):
    """An operator watching idp_logins_total for push fatigue saw the denials as failures but
    not the pushes then refused by the pause (login.push_refused): counted nowhere."""
    client_id, app, browser, page = _phone_and_push_page(provider)
    limit = provider.svc.settings.push_max_unanswered
    for _ in range(limit):
        page = press_push(browser, page)
        [request] = app.pending()
        assert app.deny(request) == "denied"
        page = browser.submit(page, "/login/factor/push")
    for _ in range(2):
        assert "data-number" not in press_push(browser, page).text
    logins = _samples(provider)
    assert logins[("idp_logins_total", (("method", "push"), ("outcome", "failure")))] == limit
    assert logins[("idp_logins_total", (("method", "push"), ("outcome", "paused")))] == 2


def test_device_api_refuses_unsigned_foreign_and_removed_devices(provider):
    browser = provider.browser()
    app = register(provider, browser)
    url = app.state["endpoints"]["poll"]
    http = provider.http()
    assert http.post(url, json={"jws": "not.a.jws"}).json()["error"] == "invalid_message"
    # Not even JSON: refused in the phone's language as well.
    form = http.post(url, data={"jws": "x"}, headers={"Accept-Language": "zh-TW"})
    assert form.status_code == 400 and form.json() == {"error": "invalid_message", "message": "請求格式錯誤"}
    # Signed by another key under this phone's id: refused.
    stranger = phone(provider)
    stranger.register(_new_registration_url(provider))
    forged = app.sign(url, {}).split(".")[:2] + [stranger.sign(url, {}).split(".")[2]]
    assert http.post(url, json={"jws": ".".join(forged)}).json()["error"] == "invalid_signature"
    # Signed for another endpoint: refused.
    assert http.post(url, json={"jws": app.sign(app.state["endpoints"]["answer"], {})}).status_code == 400
    # Removed in the settings: the phone is unknown from then on.
    listed = browser.go("/account/push")
    page = browser.submit(listed, "/account/push/remove")
    assert "已移除手機" in page.text
    stale = browser.submit(listed, "/account/push/remove")  # from the page as it was: nothing to remove
    assert "找不到這支手機" in _error(stale) and "已移除手機" not in stale.text
    with provider.svc.db.session() as session:
        assert session.query(Binding).filter_by(factor="push").count() == 0  # bob's stranger never saved
    with pytest.raises(AppError) as gone:
        app.pending()
    assert gone.value.status == 401 and gone.value.code == "unknown_device"


def test_the_phone_shows_the_clients_name_as_registered(provider):
    """The approval prompt is the user's one clue to who asks: a client registered (RFC 7591:
    by anyone with a registration token) as one of the provider's message keys is shown by
    that name, not as the provider's own account console (帳號設定)."""
    client_id, _ = provider.client(client_name="account.console")
    app = register(provider, provider.browser())
    browser, page = _push_page(provider, client_id)
    press_push(browser, page, _devices(page)[0])
    [request] = app.pending()
    assert request["application"] == "account.console"


def test_client_policy_knows_the_push_app(provider):
    """A portal's ``allowed_factors`` may name ``push``, or leave it out."""
    with_push, _ = provider.client(allowed_factors=["password", "push"])
    without, _ = provider.client(allowed_factors=["password", "otp"])
    register(provider, provider.browser())
    _push_page(provider, with_push)
    browser = provider.browser()
    page = browser.password(browser.authorize(without, acr_values=LOA2))
    # Not push, which this portal leaves out, nor binding OTP with the password alone: the
    # account has a second factor, and OTP is added in the account area after a login with it.
    assert 'data-step="push"' not in page.text and "/login/bind/otp" not in page.text
    assert callback(page)["error"] == "unmet_authentication_requirements"


def test_a_cancelled_login_takes_its_push_with_it(provider):
    """Cancelled at the login page (or ended another way, or expired), the login's request
    leaves the phone, and an approval of it is refused: it neither shows in the activity log
    as an approved login nor starts the fatigue count again."""
    client_id, _ = provider.client()
    app = register(provider, provider.browser())
    browser, page = _push_page(provider, client_id)
    waiting = press_push(browser, page)
    [request] = app.pending()
    assert "access_denied" in browser.submit(waiting, "/login/cancel").headers["location"]
    assert app.pending() == []
    with pytest.raises(AppError) as refused:
        app.approve(request, shown_number(waiting))
    assert refused.value.code == "request_expired"
    with provider.svc.db.session() as session:
        assert session.query(AuditEvent).filter_by(event="push.approved").count() == 0


def test_a_login_passed_with_the_apps_code_takes_its_push_with_it(provider):
    """The push step passed with the app's OTP (the form as it was before 推播通知, from the
    back button or another tab): the push sent before is decided, and leaves the phone."""
    third, _ = provider.client(first_party=False, client_name="研究計畫系統")  # a consent step follows
    app = register(provider, provider.browser())
    browser, page = _push_page(provider, third)
    number = shown_number(press_push(browser, page))
    [request] = app.pending()
    page = browser.submit(page, "/login/factor/push", device=_devices(page)[0], otp=app.otp())
    assert "/login/consent" in page.text
    assert app.pending() == []
    with pytest.raises(AppError) as refused:
        app.approve(request, number)
    assert refused.value.code == "request_expired"


def test_a_locked_account_gets_no_push_and_no_login_by_an_approval(provider):
    """Three wrong answers lock the account (A1) whichever factor they came from: the push
    button then sends nothing, and a push approved after the lock logs nobody in."""
    client_id, _ = provider.client()
    app = register(provider, provider.browser())
    browser, page = _push_page(provider, client_id)
    waiting = press_push(browser, page)
    [request] = app.pending()
    guesser = provider.browser()
    for _ in range(3):
        guesser.password(guesser.authorize(client_id, acr_values=LOA2), password="wrong-password")
    assert app.approve(request, shown_number(waiting)) == "approved"
    refused = browser.submit(waiting, "/login/factor/push")
    assert "帳號已暫時停用" in _error(refused)
    assert "帳號已暫時停用" in _error(press_push(browser, refused)) and app.pending() == []
