"""Mobile natural-person certificate login (SPEC A4) as the user meets it, against the
simulator over real HTTP. The simulator reads the provider's FrozenClock, so expiry
and the 4-second polling rule are tested without sleeping. The same journeys in Chromium,
where the page's own script polls and continues: tests/test_mobileid_journeys.py."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from deploy.dev.mobileid_sim import MobileIdSimulator
from idp.clock import FrozenClock
from idp.factors.totp import qr_svg
from idp.mobileid import national_id
from idp.settings import SettingsError
from tests import live, servers
from tests.harness import callback, forms, redeem

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

SP_ID = "idp-login-test"
KEY = os.urandom(32)
CITIZEN = "A123456789"
STRANGER = national_id.with_check_digit("B12345678")  # valid, bound to no account


class SharedClock:
    """The simulator's clock: whichever provider the current test made."""

    def __init__(self):
        self.target = FrozenClock()

    def __call__(self) -> float:
        return self.target()


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    simulator = MobileIdSimulator({SP_ID: KEY}, clock=SharedClock(), names={CITIZEN: "王小明"})
    simulator.trust = str(simulator.pki.write_trust(tmp_path_factory.mktemp("mobileid-login") / "trust"))
    with live.reserve() as (sock, url):
        simulator.pki.crl_url = url + "/sim/moica.crl"  # checked at each login: IDP_REVOCATION is hard-fail
        with live.serve(simulator.app(), sock, url, health="/sim/ca.pem") as server:
            simulator.url = server.url
            yield simulator


@pytest.fixture
def provider(make_provider, sim):
    provider = make_provider(mfa=True, mobileid_url=sim.url + "/moise/sp/", mobileid_sp_service_id=SP_ID,
                             mobileid_key=KEY.hex(), mobileid_trust=sim.trust)
    sim.clock.target = provider.clock
    provider.account("alice", national_id=CITIZEN)
    return provider


def _error(page) -> str:
    found = re.search(r'<div class="error" role="alert">\s*<p>(.*?)</p>', page.text, re.S)
    return found.group(1) if found else ""


def _tx(page) -> str:
    return next(f["fields"]["tx"] for f in forms(page.text) if "tx" in f["fields"])


def _calls(sim, name="getAthOrSignResult") -> int:
    return sum(1 for called, _ in sim.calls if called == name)


def start(provider, browser, client_id, nid=CITIZEN, captcha=None):
    """From the password page to the mobile ID form, then submit it: the waiting page."""
    page = browser.authorize(client_id)
    assert "factor=mobileid" in page.text  # the "行動自然人憑證" link on the login page
    tx = _tx(page)
    page = browser.go(f"/login?tx={tx}&factor=mobileid")
    assert 'name="national_id"' in page.text and 'name="captcha"' in page.text  # captcha even with IDP_CAPTCHA=off
    answer = provider.svc.transactions.get(tx)["captcha"] if captcha is None else captcha
    return browser.submit(page, "/login/mobileid/start", national_id=nid, captcha=answer), tx


def tickets(provider, tx) -> dict:
    attempt = provider.svc.transactions.get(tx)["mobileid"]["attempt"]
    return provider.svc.store.get("mobileid:" + attempt)["tickets"]


def phone(sim, decision, **which) -> httpx.Response:
    return httpx.post(sim.url + "/sim/answer", json={**which, "decision": decision})


def status(browser, tx) -> dict:
    response = browser.http.get(f"/login/mobileid/status?tx={tx}")
    assert response.headers["cache-control"] == "no-store"
    return response.json()


def claims(browser, client_id, client_secret, page) -> dict:
    params = callback(page)
    token = redeem(browser.http, client_id, client_secret, params["code"]).json()
    return jwt.decode(token["id_token"], KeySet.import_key_set(browser.http.get("/jwks").json())).claims


def test_push_approved_logs_in_at_loa3(provider, sim):
    client_id, client_secret = provider.client()
    browser = provider.browser()
    page, tx = start(provider, browser, client_id, nid=" a123456789 ")
    assert 'id="mobileid-countdown"' in page.text and "3:00" in page.text and "A12****789" in page.text
    assert "/login/mobileid/status?tx=" in page.text and '<script nonce="' in page.text
    assert "script-src 'nonce-" in page.headers["content-security-policy"]
    push = tickets(provider, tx)["push"]
    assert status(browser, tx)["state"] == "pending"
    assert phone(sim, "approve", sp_ticket_id=push["sp_ticket_id"]).status_code == 200
    provider.clock.advance(4)
    answer = status(browser, tx)
    assert answer["state"] == "done" and answer["remaining"] == 176
    page = browser.submit(browser.go(f"/login?tx={tx}&factor=mobileid"), "/login/factor/mobileid")
    token = claims(browser, client_id, client_secret, page)
    assert token["acr"] == "urn:idp:loa:3" and token["amr"] == ["hwk", "user", "mfa"]


def test_qr_scan_logs_in(provider, sim):
    client_id, client_secret = provider.client()
    browser = provider.browser()
    page, tx = start(provider, browser, client_id)
    qr = tickets(provider, tx)["qr"]
    assert qr_svg(qr["sp_ticket"]) in page.text  # the "no push? scan instead" QR is this ticket
    assert phone(sim, "approve", sp_ticket=qr["sp_ticket"]).status_code == 200  # scanned and confirmed
    assert status(browser, tx)["state"] == "done"
    token = claims(browser, client_id, client_secret, browser.submit(page, "/login/factor/mobileid"))
    assert token["acr"] == "urn:idp:loa:3"


def test_denied_on_the_phone_says_so_and_offers_a_retry(provider, sim):
    client_id, _ = provider.client()
    browser = provider.browser()
    page, tx = start(provider, browser, client_id)
    phone(sim, "deny", sp_ticket_id=tickets(provider, tx)["push"]["sp_ticket_id"])
    answer = status(browser, tx)
    assert answer["state"] == "failed" and answer["error"] == "mobileid.denied" and "拒絕" in answer["message"]
    page = browser.go(answer["next"])
    assert "拒絕" in _error(page) and 'value="A123456789"' in page.text  # the number kept for the retry
    page = browser.submit(page, "/login/mobileid/start", captcha=provider.svc.transactions.get(tx)["captcha"])
    assert 'id="mobileid-countdown"' in page.text  # a new request went out



def test_approved_by_qr_the_late_push_dismissed_still_logs_in(provider, sim):
    """The approval came first; the push that arrived late was then dismissed on the phone."""
    client_id, _ = provider.client()
    browser = provider.browser()
    page, tx = start(provider, browser, client_id)
    both = tickets(provider, tx)
    assert phone(sim, "approve", sp_ticket=both["qr"]["sp_ticket"]).status_code == 200
    assert phone(sim, "deny", sp_ticket_id=both["push"]["sp_ticket_id"]).status_code == 200
    assert status(browser, tx)["state"] == "done"


def test_a_poll_the_service_does_not_answer_loses_no_approval(provider, sim, monkeypatch):
    """A network failure while the tickets still live is asked again, not a failed attempt."""
    from idp.mobileid.connector import httpx as connector_httpx

    client_id, _ = provider.client()
    browser = provider.browser()
    page, tx = start(provider, browser, client_id)
    assert phone(sim, "approve", sp_ticket_id=tickets(provider, tx)["push"]["sp_ticket_id"]).status_code == 200
    http, lost = provider.svc.mobileid.http, []
    post = http.post

    async def once_lost(url, **kwargs):
        if url.endswith("getAthOrSignResult") and not lost:
            lost.append(url)
            raise connector_httpx.ConnectTimeout("a lost packet")
        return await post(url, **kwargs)

    monkeypatch.setattr(http, "post", once_lost)
    first = status(browser, tx)
    provider.clock.advance(4)
    assert lost and first["state"] == "pending" and status(browser, tx)["state"] == "done"


def test_a_service_that_never_answers_is_named_at_the_deadline_not_the_users_slowness(provider, sim, monkeypatch):
    from idp.mobileid.connector import httpx as connector_httpx

    client_id, _ = provider.client()
    browser = provider.browser()
    page, tx = start(provider, browser, client_id)

    async def down(url, **kwargs):
        raise connector_httpx.ConnectError("connection refused")

    monkeypatch.setattr(provider.svc.mobileid.http, "post", down)
    assert status(browser, tx)["state"] == "pending"
    provider.clock.advance(181)
    answer = status(browser, tx)
    assert answer["state"] == "failed" and answer["error"] == "mobileid.unavailable"

def test_expired_request_is_refused_even_if_approved_later(provider, sim):
    client_id, _ = provider.client()
    browser = provider.browser()
    page, tx = start(provider, browser, client_id)
    push = tickets(provider, tx)["push"]
    provider.clock.advance(181)
    assert phone(sim, "approve", sp_ticket_id=push["sp_ticket_id"]).status_code == 409
    answer = status(browser, tx)
    assert answer["state"] == "failed" and answer["error"] == "mobileid.expired"
    assert "有效時間已過" in _error(browser.go(answer["next"]))
    page = browser.submit(page, "/login/factor/mobileid")  # the "continue" button, too late: nothing pending
    assert page.status_code == 200 and "尚未發出" in _error(page) and 'name="national_id"' in page.text


def test_a_revoked_mobile_certificate_gets_the_certificate_invalid_message(provider, sim):
    revoked = national_id.with_check_digit("E22345678")
    provider.account("bob", national_id=revoked)
    client_id, _ = provider.client()
    browser = provider.browser()
    page, tx = start(provider, browser, client_id, nid=revoked)
    assert httpx.post(sim.url + "/sim/revoke", json={"id_num": revoked}).status_code == 200  # on the CA's CRL
    phone(sim, "approve", sp_ticket_id=tickets(provider, tx)["push"]["sp_ticket_id"])
    answer = status(browser, tx)
    assert answer["state"] == "failed" and answer["error"] == "mobileid.certificate_invalid"
    assert "已廢止" in _error(browser.go(answer["next"]))


def test_an_answer_polled_after_expiry_is_refused(provider, sim):
    client_id, _ = provider.client()
    browser = provider.browser()
    page, tx = start(provider, browser, client_id)
    phone(sim, "approve", sp_ticket_id=tickets(provider, tx)["push"]["sp_ticket_id"])  # in time
    provider.clock.advance(181)  # but nobody asked until now
    before = _calls(sim)
    page = browser.submit(page, "/login/factor/mobileid")
    assert "有效時間已過" in _error(page) and _calls(sim) == before
    assert 'name="national_id"' in page.text


def test_push_and_qr_both_approved_log_in_once_and_no_later_logout(provider, sim):
    client_id, client_secret = provider.client()
    browser = provider.browser()
    page, tx = start(provider, browser, client_id)
    both = tickets(provider, tx)
    phone(sim, "approve", sp_ticket_id=both["push"]["sp_ticket_id"])
    phone(sim, "approve", sp_ticket=both["qr"]["sp_ticket"])
    assert status(browser, tx)["state"] == "done"
    polled = [b["sp_ticket_id"] for name, b in sim.calls if name == "getAthOrSignResult"]
    assert both["push"]["sp_ticket_id"] in polled and both["qr"]["sp_ticket_id"] not in polled  # dropped
    assert status(browser, tx)["state"] == "done"
    token = claims(browser, client_id, client_secret, browser.submit(page, "/login/factor/mobileid"))
    assert token["amr"] == ["hwk", "user", "mfa"]
    again = browser.submit(page, "/login/factor/mobileid")  # the continue form posted twice
    assert again.status_code == 400 and "code=" not in again.headers.get("location", "")
    with provider.svc.db.session() as session:
        from idp.storage.models import AuditEvent
        assert session.query(AuditEvent).filter_by(event="login.success").count() == 1
    # The seed's bug: logged out when the other request's time ran out. Not here.
    provider.clock.advance(200)
    assert [n for n, b in sim.calls if b.get("sp_ticket_id") == both["qr"]["sp_ticket_id"]] == []
    assert "code" in callback(browser.authorize(client_id, prompt="none"))


def test_unbound_id_is_told_clearly_and_sends_nothing(provider, sim):
    client_id, _ = provider.client()
    browser = provider.browser()
    calls = len(sim.calls)
    page, _ = start(provider, browser, client_id, nid=STRANGER)
    assert "尚未綁定" in _error(page) and 'name="national_id"' in page.text
    assert len(sim.calls) == calls


def test_an_aa_account_is_sent_no_request(make_provider, sim):
    """AA accounts log in with their organisation's card (A3), never with a personal certificate."""
    provider = make_provider(mfa=True, mobileid_url=sim.url + "/moise/sp/", mobileid_sp_service_id=SP_ID,
                             mobileid_key=KEY.hex(), mobileid_trust=sim.trust)
    sim.clock.target = provider.clock
    provider.account("school-aa", kind="aa", org="臺北市立測試國民小學", national_id=CITIZEN)
    client_id, _ = provider.client()
    calls = len(sim.calls)
    page, _ = start(provider, provider.browser(), client_id)
    assert "AA" in _error(page) and "mobileid-countdown" not in page.text and len(sim.calls) == calls


def test_a_national_id_kept_as_typed_in_lower_case_is_found(make_provider, sim):
    """An account created with ``--national-id a123456789`` is stored as the login looks for it."""
    provider = make_provider(mfa=True, mobileid_url=sim.url + "/moise/sp/", mobileid_sp_service_id=SP_ID,
                             mobileid_key=KEY.hex(), mobileid_trust=sim.trust)
    sim.clock.target = provider.clock
    provider.account("alice", national_id=CITIZEN.lower())
    client_id, _ = provider.client()
    page, _ = start(provider, provider.browser(), client_id, nid=CITIZEN.lower())
    assert "mobileid-countdown" in page.text, _error(page)


def test_a_national_id_typed_in_full_width_is_found(provider, sim):
    """A zh-TW input method in full-width mode types "Ａ１２３４５６７８９": the number, as the
    provider reads every code (it was refused: "the first character must be a letter")."""
    client_id, _ = provider.client()
    typed = "".join(chr(ord(c) + 0xFEE0) for c in CITIZEN)  # the full-width forms of ASCII
    page, _ = start(provider, provider.browser(), client_id, nid=typed)
    assert "mobileid-countdown" in page.text and "A12****789" in page.text, _error(page)


@pytest.mark.parametrize("raw, said", [("A123456788", "檢查碼不符"), ("A12345", "10 碼"), ("A323456789", "第 2 碼"),
                                       ("1123456789", "英文字母")])
def test_malformed_id_says_why(provider, sim, raw, said):
    client_id, _ = provider.client()
    calls = len(sim.calls)
    page, _ = start(provider, provider.browser(), client_id, nid=raw)
    assert said in _error(page) and len(sim.calls) == calls


def test_wrong_captcha_sends_nothing(provider, sim):
    client_id, _ = provider.client()
    calls = len(sim.calls)
    page, _ = start(provider, provider.browser(), client_id, captcha="00000")
    assert "驗證碼錯誤" in _error(page) and len(sim.calls) == calls


def test_polling_too_fast_is_throttled(provider, sim):
    client_id, _ = provider.client()
    browser = provider.browser()
    _, tx = start(provider, browser, client_id)
    status(browser, tx)
    asked = _calls(sim)
    for _ in range(3):
        assert status(browser, tx)["state"] == "pending"
    provider.clock.advance(3.9)
    assert status(browser, tx)["retry_after"] >= 4
    assert _calls(sim) == asked  # the service was not asked again
    provider.clock.advance(0.1)
    status(browser, tx)
    assert _calls(sim) == asked + 2  # push and QR, once each


def test_another_browser_cannot_poll_or_continue(provider, sim):
    client_id, _ = provider.client()
    page, tx = start(provider, provider.browser(), client_id)
    other = provider.browser()
    answer = other.http.get(f"/login/mobileid/status?tx={tx}", headers={"Accept-Language": "en"})
    assert answer.status_code == 404 and answer.json()["state"] == "failed"
    assert "no longer valid" in answer.json()["message"]  # what the waiting page shows


def test_switched_off_without_a_service_url(make_provider):
    provider = make_provider(mfa=True)
    provider.account("alice", national_id=CITIZEN)
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.authorize(client_id)
    assert "factor=mobileid" not in page.text
    tx = _tx(page)
    assert "/login/factor/password" in browser.go(f"/login?tx={tx}&factor=mobileid").text
    fields = next(f for f in forms(page.text) if f["action"] == "/login/factor/password")["fields"]
    assert browser.go("/login/mobileid/start", "POST", {**fields, "national_id": CITIZEN}).status_code == 400
    # A bound national ID does not make it a second factor either: the password leads to OTP binding.
    assert "/login/bind/otp" in browser.password(page).text


@pytest.mark.parametrize("backend", ["sqlite+memory"])
@pytest.mark.parametrize("bad, says", [
    ({"mobileid_key": ""}, "IDP_MOBILEID_KEY: the mobile-ID key must be 32 bytes"),
    ({"mobileid_key": "abcd"}, "IDP_MOBILEID_KEY: the mobile-ID key must be 32 bytes"),
    ({"mobileid_sp_service_id": ""}, "IDP_MOBILEID_SP_SERVICE_ID must be set"),
    ({"mobileid_url": "fidoapi-test.moi.gov.tw/moise/sp/"}, "IDP_MOBILEID_URL must be an https:// URL with a host"),
    ({"mobileid_url": "https:///moise/sp/"}, "IDP_MOBILEID_URL must be an https:// URL with a host"),
    ({"mobileid_url": "https://fidoapi-test.moi.gov.tw:99999/moise/sp/"}, "IDP_MOBILEID_URL must be an https://"),
    ({"mobileid_url": "http://fidoapi-test.moi.gov.tw/moise/sp/"}, "(http:// only on this computer"),
    ({"mobileid_url": "http://10.0.0.8:8010/moise/sp/"}, "(http:// only on this computer"),
    ({"mobileid_time_limit": 29}, "IDP_MOBILEID_TIME_LIMIT must be 30 to 600 seconds, not 29"),
    ({"mobileid_time_limit": 601}, "IDP_MOBILEID_TIME_LIMIT must be 30 to 600 seconds, not 601"),
    ({"mobileid_trust": "/nonexistent/trust"}, "IDP_MOBILEID_TRUST: trust directory /nonexistent/trust has no anchors.toml"),
])
def test_a_setting_that_cannot_work_stops_the_start_not_the_first_login(make_provider, sim, bad, says):
    """The connector was built at the first mobile-ID login: the provider started, and every
    user who chose 行動自然人憑證 got the error page."""
    settings = dict(mfa=True, mobileid_url=sim.url + "/moise/sp/", mobileid_sp_service_id=SP_ID,
                    mobileid_key=KEY.hex(), mobileid_trust=sim.trust)
    with pytest.raises(SettingsError) as refused:
        make_provider(**{**settings, **bad})
    assert says in str(refused.value)


def test_a_locked_account_is_sent_no_request(provider, sim):
    """Three wrong passwords lock the account (A1): mobile ID sends nothing to its phone until
    the lock ends."""
    client_id, _ = provider.client()
    guesser = provider.browser()
    page = guesser.authorize(client_id)
    for _ in range(3):
        page = guesser.password(page, password="wrong-Passw0rd!")
    calls = len(sim.calls)
    page, _ = start(provider, provider.browser(), client_id)
    assert "帳號已暫時停用" in _error(page) and len(sim.calls) == calls


def test_requests_nobody_approves_pause_after_three(provider, sim):
    """Starting needs only a person's ID number and a captcha (push fatigue): after three
    requests in a row denied or left unanswered, the fourth sends nothing to the phone and
    says why, until the lockout time has passed; a login by mobile ID counts again from zero."""
    client_id, client_secret = provider.client()
    for i in range(3):
        stranger = provider.browser()  # nothing but the ID number, a new browser each time
        page, tx = start(provider, stranger, client_id)
        if i == 0:
            phone(sim, "deny", sp_ticket_id=tickets(provider, tx)["push"]["sp_ticket_id"])
    sent = _calls(sim, "requestAthOrSignPush")
    page, _ = start(provider, provider.browser(), client_id)
    assert "暫停傳送至手機" in _error(page) and _calls(sim, "requestAthOrSignPush") == sent
    provider.clock.advance(provider.svc.settings.lockout_seconds + 1)
    browser = provider.browser()
    page, tx = start(provider, browser, client_id)
    phone(sim, "approve", sp_ticket_id=tickets(provider, tx)["push"]["sp_ticket_id"])
    assert status(browser, tx)["state"] == "done"
    assert claims(browser, client_id, client_secret, browser.submit(page, "/login/factor/mobileid"))["acr"] == "urn:idp:loa:3"
    for _ in range(3):  # approved: three more before a pause
        page, _ = start(provider, provider.browser(), client_id)
        assert 'id="mobileid-countdown"' in page.text


def test_requests_the_service_never_sent_do_not_count(provider, sim):
    """Three starts while the mobile-ID service is down reached no phone: the fourth, once it
    is back, goes out."""
    client_id, _ = provider.client()
    connector = provider.svc.mobileid
    working = connector.config
    # The service's address with nothing listening there: every start is refused a connection.
    connector.config = dataclasses.replace(working, service_url=f"http://127.0.0.1:{servers.free_port()}/moise/sp/")
    browser = provider.browser()
    for _ in range(3):
        page, _ = start(provider, browser, client_id)
        assert 'id="mobileid-countdown"' not in page.text
    connector.config = working
    page, _ = start(provider, browser, client_id)
    assert 'id="mobileid-countdown"' in page.text


def test_with_otp_bound_too_each_page_offers_the_other(provider):
    """An account with an authenticator app and a mobile certificate: the OTP page leads to the
    mobile certificate (a user without the phone's app at hand), and back."""
    import pyotp

    from idp.storage.models import Account, Binding

    svc = provider.svc
    with svc.db.session() as session:
        account = session.query(Account).filter_by(username="alice").one()
        session.add(Binding(account_id=account.id, factor="otp", label="v1",
                            data={"secret": svc.box.seal(pyotp.random_base32(), account.id), "version": 1}))
    client_id, _ = provider.client()
    browser = provider.browser()
    tx = _tx(browser.password(browser.authorize(client_id)))
    assert f"/login?tx={tx}&amp;factor=mobileid" in browser.go(f"/login?tx={tx}&factor=otp").text
    assert f"/login?tx={tx}&amp;factor=otp" in browser.go(f"/login?tx={tx}&factor=mobileid").text


def test_an_approval_outlives_a_database_failure_as_the_page_continues(tmp_path, sim):
    """A4: the user approved on the phone; as the page continued, PostgreSQL went away for a
    moment and the user got an error page. Once it is back, "continue" logs in with that
    approval, within its 3 minutes, rather than saying it expired and asking for another."""
    from tests.outage_helpers import database_goes_away, outage_provider

    provider = outage_provider(tmp_path, mfa=True, mobileid_url=sim.url + "/moise/sp/", mobileid_sp_service_id=SP_ID,
                               mobileid_key=KEY.hex(), mobileid_trust=sim.trust)
    try:
        sim.clock.target = provider.clock
        provider.account("alice", national_id=CITIZEN)
        client_id, _ = provider.client()
        browser = provider.browser()
        page, tx = start(provider, browser, client_id)
        assert phone(sim, "approve", sp_ticket_id=tickets(provider, tx)["push"]["sp_ticket_id"]).status_code == 200
        provider.clock.advance(4)
        assert status(browser, tx)["state"] == "done"
        waiting = browser.go(f"/login?tx={tx}&factor=mobileid")
        with database_goes_away(provider, "WHERE ACCOUNTS.NATIONAL_ID"):
            assert browser.submit(waiting, "/login/factor/mobileid").status_code == 500

        provider.clock.advance(4)
        done = browser.submit(browser.go(f"/login?tx={tx}&factor=mobileid"), "/login/factor/mobileid")
        assert callback(done)["code"]
    finally:
        provider.rd.stop()
        provider.pg.stop()
