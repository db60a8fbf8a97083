"""The two portals (SPEC C1–C3, P5, P6) in one real browser: single sign-on from the
school portal to the commerce portal, a sensitive action that steps the login up to
certificate level, logout at one portal ending the session at both (back-channel),
and weaker logins refused with a page that says why.

One set of servers for the module, all over real HTTP on ``localhost``: the provider
(SQLite and the in-process store, two factors for everyone), the mobile-ID service
simulator (``deploy/dev/mobileid_sim.py``, whose page stands in for the citizen's
phone: the browser presses its approve button), and both portals, each with its own
registration and back-channel logout URI. The certificate level comes from the mobile
natural-person certificate (``hwk``, ``idp/acr.py``): a smart card needs the HiPKI
component, which a test browser does not have. panva's ``openid-client``
(``tests/e2e/rp.mjs``), handed the browser's provider cookies, checks the stepped-up ID
token and, after the logout, that ``prompt=none`` gets ``login_required``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from clients import portal as portals
from clients.commerce_portal import create_app as create_commerce
from clients.school_portal import create_app as create_school
from deploy.dev.mobileid_sim import MobileIdSimulator
from idp.factors import FACTORS
from idp.settings import Settings
from idp.web.app import create_app
from tests import live
from tests.harness import PASSWORD
from tests.test_e2e import RP_REDIRECT, LiveProvider, run_rp
from tests.test_journeys import bound_otp, otp

try:
    from playwright.sync_api import expect
except ImportError:  # reported by the chromium fixture
    expect = None

LOA2, LOA3 = portals.LOA2, portals.LOA3
SP_ID, KEY = "idp-portals-test", os.urandom(32)
CITIZEN = "A123456789"
SLOW = 30_000  # ms: the mobile-ID page polls every 4 s or more


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The provider, the simulator and both portals; ``world["rp"]`` is openid-client's registration."""
    tmp = tmp_path_factory.mktemp("portals")
    sim = MobileIdSimulator({SP_ID: KEY}, names={CITIZEN: "王小明"})
    trust = sim.pki.write_trust(tmp / "mobileid-trust")  # the simulator's CA as a trust directory
    with contextlib.ExitStack() as stack:
        sock, sim_url = stack.enter_context(live.reserve("localhost"))
        sim.pki.crl_url = sim_url + "/sim/moica.crl"  # its certificates name its CRL (IDP_REVOCATION)
        stack.enter_context(live.serve(sim.app(), sock, sim_url, health="/sim/ca.pem"))
        sock, url = stack.enter_context(live.reserve("localhost"))
        app = create_app(Settings.from_env(
            {}, issuer=url, database_url=f"sqlite:///{tmp}/idp.sqlite3", redis_url="", keys_dir=str(tmp / "keys"),
            captcha="off", mfa=True, mobileid_url=sim_url + "/moise/sp/", mobileid_sp_service_id=SP_ID,
            mobileid_key=KEY.hex(), mobileid_trust=str(trust), crl_cache_dir=str(tmp / "crl")))
        stack.callback(app.state.svc.db.engine.dispose)
        provider = LiveProvider(app, stack.enter_context(live.serve(app, sock, url)))
        world = {"provider": provider, "sim": sim_url}
        for name, create, policy in (
            ("school", create_school, {"minimum_acr": LOA2}),
            # The commerce portal takes no Google login (its own registration's policy).
            ("commerce", create_commerce, {"minimum_acr": LOA2,
                                           "allowed_factors": [name for name in FACTORS if name != "google"]}),
        ):
            sock, portal_url = stack.enter_context(live.reserve("localhost"))
            client_id, secret = provider.client(
                client_name=name, redirect_uris=[portal_url + "/callback"],
                post_logout_redirect_uris=[portal_url + "/"],
                backchannel_logout_uri=portal_url + "/backchannel-logout", backchannel_logout_session_required=True,
                **policy)
            portal_app = create(provider.issuer, client_id, secret, portal_url, secrets.token_urlsafe(32))
            stack.enter_context(live.serve(portal_app, sock, portal_url, health="/"))
            world[name] = portal_url
        world["rp"] = provider.client(redirect_uris=[RP_REDIRECT])
        yield world


def person(world, username: str, **fields) -> str:
    """An account with OTP bound on an earlier day; returns the authenticator's secret."""
    provider = world["provider"]
    return bound_otp(provider, provider.account(username, name=fields.pop("name", username), **fields))


@pytest.fixture
def page(chromium, request, tmp_path):
    context = chromium.new_context(locale="zh-TW")
    context.set_default_timeout(10_000)
    page = context.new_page()
    failed = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed:
        for i, open_page in enumerate(context.pages):
            open_page.screenshot(path=tmp_path / f"failure-{i}.png", full_page=True)
            print(f"screenshot of {open_page.url}: {tmp_path}/failure-{i}.png")
    context.close()


def log_in(page, world, username: str, secret: str) -> None:
    """At the provider's login page: the password, then the authenticator's code."""
    form = page.locator("form[data-step=password]")
    form.get_by_label("帳號", exact=True).fill(username)
    form.get_by_label("密碼", exact=True).fill(PASSWORD)
    form.locator("button[type=submit]").click()
    otp_form = page.locator("form[data-step=otp]")
    otp_form.get_by_label("請輸入 APP 產生的密碼").fill(otp(world["provider"], secret))
    otp_form.locator("button[type=submit]").click()


def expect_home(page, portal: str, name: str, acr: str) -> None:
    page.wait_for_url(portal + "/")
    main = page.locator("main")
    expect(main).to_contain_text(f"歡迎，{name}")
    expect(main).to_contain_text(acr)


def provider_cookies(page, world) -> dict:
    host = urlsplit(world["provider"].issuer).hostname
    return {c["name"]: c["value"] for c in page.context.cookies() if c["domain"] == host and c["name"].startswith("idp_")}


def test_a_logout_of_every_session_of_a_subject_outlasts_the_next_logout_token():
    """A logout token with a sub and no sid (Back-Channel Logout 2.4: every session of the
    user) stays in force for the portal session's lifetime, whatever other tokens come."""
    from clients.backchannel import Ended

    now = [1_000_000.0]
    ended = Ended(clock=lambda: now[0])
    ended.end(None, "alice-sub", iat=now[0])
    alice = {"user": {"sub": "alice-sub"}, "logged_in_at": now[0] - 60}
    now[0] += 10
    assert ended.use_jti("bob-logout") and ended.has_ended(alice)  # another user's token came meanwhile
    now[0] += 8 * 3600
    assert ended.has_ended(alice)  # and its login is too old by then anyway


class StandIn:
    """A provider over HTTP for what the real one never sends: its token endpoint answers
    with an ID token of ``claims`` (and iss, iat, exp, the nonce asked for) signed by
    ``key``, and its /jwks publishes ``published``, which a test may change, or answers
    ``jwks_down`` (a proxy's 502 page, say) when it is set; ``jwks_asked`` counts its requests."""

    def __init__(self, **claims):
        self.key = ECKey.generate_key("P-256", parameters={"kid": "k1"})
        self.published = [self.key]
        self.jwks_down = None
        self.jwks_asked = 0
        self.claims = {"sub": "alice", "aud": "school", **claims}
        self.nonce = ""

    def app(self) -> Starlette:
        async def discovery(request):
            base = str(request.base_url).rstrip("/")
            return JSONResponse({"issuer": base, "authorization_endpoint": base + "/authorize",
                                 "token_endpoint": base + "/token", "jwks_uri": base + "/jwks",
                                 "id_token_signing_alg_values_supported": ["ES256"]})

        async def jwks(request):
            self.jwks_asked += 1
            if self.jwks_down:
                return self.jwks_down
            return JSONResponse({"keys": [key.as_dict(private=False) for key in self.published]})

        async def token(request):
            now = int(time.time())
            claims = {"iss": str(request.base_url).rstrip("/"), "iat": now, "exp": now + 300, "nonce": self.nonce,
                      **self.claims}
            return JSONResponse({"access_token": "at", "token_type": "Bearer",
                                 "id_token": jwt.encode({"alg": "ES256", "kid": self.key.kid}, claims, self.key)})

        return Starlette(routes=[Route("/.well-known/openid-configuration", discovery), Route("/jwks", jwks),
                                 Route("/token", token, methods=["POST"])])

    @contextlib.contextmanager
    def school_portal(self):
        """The school portal (client ``school``) of this provider, and a browser at it."""
        with live.reserve() as (sock, url), live.serve(self.app(), sock, url, health="/jwks"):
            portal = create_school(issuer=url, client_id="school", client_secret="s",
                                   portal_url="https://school.example.tw", session_secret="x" * 32)
            with TestClient(portal, base_url="https://school.example.tw") as browser:
                yield portal, browser

    def log_in(self, browser):
        """登入 at the portal: its /callback's answer, given the token endpoint's ID token."""
        query = dict(parse_qsl(urlsplit(browser.get("/login", follow_redirects=False).headers["location"]).query))
        self.nonce = query["nonce"]
        return browser.get("/callback", params={"code": "c", "state": query["state"]}, follow_redirects=False)


def test_a_portal_refuses_an_id_token_made_for_another_client():
    """OIDC Core 3.1.3.7: an ID token whose aud is not the portal is refused, azp or not."""
    provider = StandIn(aud="commerce", azp="school")
    with provider.school_portal() as (_, browser):
        answer = provider.log_in(browser)
        assert answer.status_code == 400 and "aud" in answer.text
        assert "alice" not in browser.get("/").text


def test_a_portal_refuses_an_id_token_also_made_for_another_client():
    """OIDC Core 3.1.3.7 step 3: an ID token with audiences the portal does not trust (it
    trusts none but itself) is refused, though the portal is among them and is its azp."""
    provider = StandIn(aud=["school", "commerce"], azp="school")
    with provider.school_portal() as (_, browser):
        answer = provider.log_in(browser)
        assert answer.status_code == 400 and "aud" in answer.text
        assert "alice" not in browser.get("/").text
    provider = StandIn(aud=["school"])  # the portal alone, as a list: fine
    with provider.school_portal() as (_, browser):
        assert provider.log_in(browser).status_code == 303 and "alice" in browser.get("/").text


def test_a_key_the_provider_withdrew_no_longer_signs_id_tokens():
    """A key leaves the provider's JWKS (after a compromise, say): once the portal's copy is
    older than the provider lets it keep one (5 minutes: this /jwks says nothing), an ID
    token signed with the withdrawn key is refused."""
    provider = StandIn()
    with provider.school_portal() as (portal, browser):
        assert provider.log_in(browser).status_code == 303  # the portal holds a copy with k1 now
        provider.published = [ECKey.generate_key("P-256", parameters={"kid": "k2"})]
        portal.state.ended.clock = lambda: time.time() + 301  # the portal's clock: its copy is stale
        answer = provider.log_in(browser)
        assert answer.status_code == 400, "an ID token signed with a withdrawn key was taken"


def test_an_unreachable_provider_is_not_asked_for_its_keys_at_every_request():
    """The portal's copy of the provider's JWKS is stale and /jwks answers a proxy's 502:
    logins go on with the stale copy, which is asked for again a minute later, not at each
    request. A logout token naming a key the copy lacks still makes it ask at once, but once
    a minute at most, and gets 503 (the sender tries again) while the provider cannot say
    whether the key is its own."""
    provider = StandIn()
    with provider.school_portal() as (portal, browser):
        assert provider.log_in(browser).status_code == 303  # the portal holds a copy with k1 now
        provider.jwks_down = HTMLResponse("<h1>502 Bad Gateway</h1>", 502)
        later = time.time() + 301
        portal.state.ended.clock = lambda: later  # the portal's clock: its copy is stale
        asked = provider.jwks_asked
        for _ in range(3):
            assert provider.log_in(browser).status_code == 303 and "alice" in browser.get("/").text
        assert provider.jwks_asked - asked == 1

        rotated = ECKey.generate_key("P-256", parameters={"kid": "k2"})  # a key the copy lacks

        def logout(jti: str) -> int:
            claims = {"iss": portal.state.issuer, "aud": "school", "iat": int(later), "exp": int(later) + 120,
                      "sub": "alice", "jti": jti, "events": {"http://schemas.openid.net/event/backchannel-logout": {}}}
            token = jwt.encode({"alg": "ES256", "kid": "k2", "typ": "logout+jwt"}, claims, rotated)
            return browser.post("/backchannel-logout", data={"logout_token": token}).status_code

        assert [logout("1"), logout("2"), logout("3")] == [503, 503, 503] and provider.jwks_asked - asked == 2
        assert "alice" in browser.get("/").text

        later += 60  # a minute on, the provider is back with its new key
        provider.jwks_down, provider.published = None, [provider.key, rotated]
        assert provider.log_in(browser).status_code == 303 and provider.jwks_asked - asked == 3
        assert logout("4") == 200  # its new key checks the token now


def test_sso_step_up_and_logout_everywhere(world, page):
    provider, school, commerce = world["provider"], world["school"], world["commerce"]
    secret = person(world, "alice", name="王小明", national_id=CITIZEN)
    visited = []
    page.on("framenavigated", lambda frame: visited.append(frame.url) if frame == page.main_frame else None)

    # Password and OTP at the school portal.
    page.goto(school + "/")
    page.get_by_role("link", name="登入", exact=True).click()
    log_in(page, world, "alice", secret)
    expect_home(page, school, "王小明", LOA2)

    # The commerce portal: single sign-on, no page of the provider's on the way.
    mark = len(visited)
    page.goto(commerce + "/")
    expect(page.locator(".topbar")).to_contain_text("商工行政服務入口網")
    page.get_by_role("link", name="登入", exact=True).click()
    expect_home(page, commerce, "王小明", LOA2)
    assert not [u for u in visited[mark:] if u.startswith(provider.issuer + "/login")], visited[mark:]

    # 公司變更登記 needs a certificate-level login: the provider asks only for what is missing.
    page.get_by_role("link", name="公司變更登記").click()
    page.wait_for_url(provider.issuer + "/**")
    expect(page.locator("form[data-step=mobileid]")).to_be_visible()
    expect(page.locator("form[data-step=password]")).to_have_count(0)
    expect(page.locator("form[data-step=otp]")).to_have_count(0)
    form = page.locator("form[data-step=mobileid]")
    tx = form.locator("input[name=tx]").input_value()
    form.get_by_label("身分證字號", exact=True).fill(CITIZEN)
    form.get_by_label("驗證碼", exact=True).fill(provider.svc.transactions.get(tx)["captcha"])
    form.locator("button[type=submit]").click()
    expect(page.locator("#mobileid-countdown")).to_be_visible()

    phone = page.context.new_page()  # the simulator's page stands in for the citizen's phone
    phone.goto(world["sim"] + "/sim/")
    phone.locator("tr", has_text="推播").get_by_role("button", name="確認 Approve").click()
    # The simulator's answer (its page again, saying what it did) before the phone is put
    # away: closing a page while its form post is under way hung Chromium twice in ~10 runs.
    expect(phone.locator("p > b")).to_be_visible()
    phone.close()

    page.wait_for_url(commerce + "/actions/company-change", timeout=SLOW)
    action = page.locator("[data-action=company-change]")
    expect(action).to_contain_text(LOA3)
    action.get_by_label("公司統一編號").fill("12345675")
    action.get_by_label("變更事項").fill("董事改選")
    action.get_by_role("button", name="送出").click()
    expect(action.locator(".ok")).to_contain_text("已送出「公司變更登記」")
    expect(action).to_contain_text("董事改選")

    # The session is at certificate level now: openid-client validates the ID token
    # (signature, nonce, auth_time within max_age) of a login within it.
    cookies = provider_cookies(page, world)
    client_id, client_secret = world["rp"]
    result = run_rp(provider, client_id=client_id, client_secret=client_secret, cookies=cookies,
                    extra_params={"acr_values": LOA3, "max_age": 300})
    assert result["ok"], result
    assert result["claims"]["acr"] == LOA3 and "hwk" in result["claims"]["amr"], result["claims"]

    # The school portal's own sensitive action is satisfied by the same fresh proof: no prompt.
    page.goto(school + "/actions/student-record")
    expect(page.locator("[data-action=student-record]")).to_contain_text(LOA3)

    # Logout at the school portal; the commerce portal hears it over the back channel.
    page.goto(school + "/")
    page.get_by_role("button", name="登出").click()
    page.wait_for_url(school + "/")
    expect(page.get_by_role("link", name="登入", exact=True)).to_be_visible()
    provider.svc.backchannel.wait()
    page.goto(commerce + "/")
    expect(page.get_by_role("link", name="登入", exact=True)).to_be_visible()
    expect(page.locator("main")).not_to_contain_text("王小明")

    # No session at the provider any more: a silent login is refused.
    result = run_rp(provider, client_id=client_id, client_secret=client_secret, cookies=cookies,
                    extra_params={"prompt": "none"})
    assert not result["ok"] and result["oauth_error"] == "login_required", result


def test_weaker_login_is_refused_with_a_clear_page(world, page):
    commerce = world["commerce"]
    secret = person(world, "bob", name="林大同")  # password and OTP, no certificate of any kind
    page.goto(commerce + "/")
    page.get_by_role("link", name="登入", exact=True).click()
    log_in(page, world, "bob", secret)
    expect_home(page, commerce, "林大同", LOA2)

    # Someone strips acr_values and max_age off the step-up request: the provider
    # answers at once with the session's two factors, and the portal refuses to act.
    def stripped(route):  # the portal's redirect to the provider, without those two
        response = route.fetch(max_redirects=0)
        parts = urlsplit(response.headers["location"])
        query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("acr_values", "max_age")]
        assert len(query) < len(parse_qsl(parts.query)), parts.query
        route.fulfill(status=302, headers={"location": urlunsplit(parts._replace(query=urlencode(query)))})

    page.route(commerce + "/actions/company-change", stripped)
    page.get_by_role("link", name="公司變更登記").click()
    page.wait_for_url(commerce + "/callback?**")
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("登入的等級不足")
    expect(page.locator("main")).to_contain_text(f"需要 {LOA3}，這次登入為 {LOA2}")
    expect(page.locator("form[action='/actions/company-change']")).to_have_count(0)
    page.unroute(commerce + "/actions/company-change")

    # Asked properly, the provider cannot reach the level with what bob holds, and says so.
    page.goto(commerce + "/actions/company-change")
    page.wait_for_url(commerce + "/callback?**")
    expect(page.get_by_role("alert")).to_contain_text("沒有本系統要求等級的登入方式")
    expect(page.locator("main")).to_contain_text("unmet_authentication_requirements")
    expect(page.locator("form[action='/actions/company-change']")).to_have_count(0)
