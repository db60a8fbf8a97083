"""Logout at every client of a session (SPEC P6): OpenID Connect Back-Channel
Logout 1.0 (logout tokens POSTed to the clients, in the background, with
retries) and Front-Channel Logout 1.0 (iframes on the logged-out page).

The provider runs over real HTTP (``tests/live.py``), on both back ends; the
clients' back-channel endpoints are a small recording receiver and the school
portal itself. Logout tokens are checked with joserfc against ``/jwks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from html import unescape
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from clients.school_portal import create_app as create_portal
from idp.protocol import logout as bcl
from idp.storage.models import AuditEvent
from tests import live
from tests.harness import PASSWORD, forms, redeem
from tests.test_e2e import NAME, Agent, _is_login_page, _path

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

EVENT = "http://schemas.openid.net/event/backchannel-logout"
FAST = (0.05, 0.1, 0.2)  # retry delays for tests (the provider's are seconds)


# -- a client's back-channel endpoint that records what it gets --------------------------------
class Receiver:
    """``/bc`` records each logout token; it fails with 503 ``fail`` times first,
    or takes ``hang`` seconds to answer. ``/cb`` is a redirect URI that says ok."""

    def __init__(self):
        self.tokens: list[str] = []
        self.attempts = 0
        self.fail = 0
        self.hang = 0.0
        self.url = ""

    async def bc(self, request):
        self.attempts += 1
        if self.hang:
            await asyncio.sleep(self.hang)
        async with request.form() as form:
            token = form.get("logout_token")
        if request.headers.get("content-type", "").split(";")[0] != "application/x-www-form-urlencoded":
            return PlainTextResponse("bad content type", 400)
        if self.fail > 0:
            self.fail -= 1
            return PlainTextResponse("try later", 503)
        self.tokens.append(token)
        return PlainTextResponse("")

    def app(self):
        ok = lambda request: PlainTextResponse("ok")  # noqa: E731
        return Starlette(routes=[Route("/bc", self.bc, methods=["POST"]), Route("/cb", ok), Route("/", ok),
                                 Route("/healthz", ok)])


@contextlib.contextmanager
def serving_receiver():
    """A ``Receiver`` listening on a free loopback port (its ``url``)."""
    r = Receiver()
    with live.reserve() as (sock, url):
        r.url = url
        with live.serve(r.app(), sock, url):
            yield r


@pytest.fixture
def receiver():
    with serving_receiver() as r:
        yield r


def _wait(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# -- a user agent logging in to clients over HTTP ------------------------------------------------
def _authorize_url(provider, client_id, redirect_uri):
    q = httpx.QueryParams({"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
                           "scope": "openid profile", "state": "s", "nonce": secrets.token_urlsafe(8)})
    return f"{provider.issuer}/authorize?{q}"


def _login(agent, provider, client_id, secret, redirect_uri) -> dict:
    """Authorize at ``client_id`` (logging in if asked) and redeem the code; the token response."""
    page = agent.go(_authorize_url(provider, client_id, redirect_uri))
    if _is_login_page(page, provider):
        page = agent.submit(page, "/login/factor/password", username="alice", password=PASSWORD)
    assert _path(page) == redirect_uri, (page.url, page.text[:300])
    code = parse_qs(urlsplit(str(page.url)).query)["code"][0]
    with httpx.Client(base_url=provider.issuer) as http:
        response = redeem(http, client_id, secret, code, redirect_uri=redirect_uri)
    assert response.status_code == 200, response.text
    return response.json()


def _claims(provider, token, **decode):
    keys = KeySet.import_key_set(httpx.get(provider.issuer + "/jwks").json())
    return jwt.decode(token, keys, algorithms=["ES256", "RS256"])


def _two_clients(provider, receiver, **bc_meta):
    """Client A with a back-channel URI at the receiver, client B without one."""
    cb = receiver.url + "/cb"
    a = provider.client(client_name="A", redirect_uris=[cb], backchannel_logout_uri=receiver.url + "/bc",
                        backchannel_logout_session_required=True, **bc_meta)
    b = provider.client(client_name="B", redirect_uris=[cb], post_logout_redirect_uris=[receiver.url + "/"])
    return a, b, cb


def _events(provider, name):
    with provider.svc.db.session() as session:
        return [(e.client_id, e.detail) for e in session.query(AuditEvent).filter_by(event=name)]


# -- the tests -----------------------------------------------------------------------------------
def test_discovery_says_both_logouts_are_supported(live_provider):
    doc = httpx.get(live_provider.issuer + "/.well-known/openid-configuration").json()
    for name in ("backchannel_logout_supported", "backchannel_logout_session_supported",
                 "frontchannel_logout_supported", "frontchannel_logout_session_supported"):
        assert doc[name] is True, name


def test_logout_uris_are_validated(live_provider):
    from idp.protocol.clients import ClientError, validate_metadata

    base = {"redirect_uris": ["https://a.example.tw/cb"]}
    for bad in ({"backchannel_logout_uri": "http://a.example.tw/bc"}, {"backchannel_logout_uri": "https://a.example.tw/bc#x"},
                {"frontchannel_logout_uri": "javascript:alert(1)"}, {"backchannel_logout_uri": ["https://a.example.tw/"]},
                {"backchannel_logout_session_required": "yes"}):
        with pytest.raises(ClientError):
            validate_metadata({**base, **bad})
    good = validate_metadata({**base, "backchannel_logout_uri": "https://a.example.tw/bc?x=1",
                              "frontchannel_logout_uri": "https://a.example.tw/fc", "frontchannel_logout_session_required": True})
    assert good["backchannel_logout_uri"] == "https://a.example.tw/bc?x=1"


def test_rp_initiated_logout_sends_a_valid_logout_token(live_provider, receiver):
    provider = live_provider
    provider.account("alice", name=NAME)
    (a, a_secret), (b, b_secret), cb = _two_clients(provider, receiver)
    agent = Agent()
    try:
        a_tokens = _login(agent, provider, a, a_secret, cb)
        b_tokens = _login(agent, provider, b, b_secret, cb)  # single sign-on: same session
        a_id = _claims(provider, a_tokens["id_token"]).claims
        assert _claims(provider, b_tokens["id_token"]).claims["sid"] == a_id["sid"]
        # The sid RPs see is not the session cookie (which would let an RP take the session over).
        assert a_id["sid"] != agent.http.cookies.get("idp_session")

        out = agent.go(f"{provider.issuer}/logout?" + str(httpx.QueryParams(
            {"id_token_hint": b_tokens["id_token"], "post_logout_redirect_uri": receiver.url + "/"})))
        assert _path(out) == receiver.url + "/"
        assert _wait(lambda: receiver.tokens), "no logout token arrived"
        provider.svc.backchannel.wait()
    finally:
        agent.close()

    assert len(receiver.tokens) == 1  # A only: B registered no back-channel URI
    token = _claims(provider, receiver.tokens[0])
    assert token.header["typ"] == "logout+jwt" and token.header["alg"] == "ES256" and token.header["kid"]
    c = token.claims
    assert c["iss"] == provider.issuer and c["aud"] == a
    assert c["sid"] == a_id["sid"] and c["sub"] == a_id["sub"]
    assert c["events"] == {EVENT: {}}
    assert "nonce" not in c and c["jti"]
    assert 0 < c["exp"] - c["iat"] <= 300 and abs(c["iat"] - time.time()) < 30
    assert _wait(lambda: _events(provider, "logout.backchannel"))
    [(client_id, detail)] = _events(provider, "logout.backchannel")
    assert client_id == a and detail["attempts"] == 1
    assert receiver.tokens[0] not in str(detail)


def test_a_failing_receiver_gets_the_token_on_retry(live_provider, receiver):
    provider = live_provider
    provider.svc.backchannel.delays = FAST
    provider.account("alice", name=NAME)
    receiver.fail = 2
    (a, a_secret), (b, b_secret), cb = _two_clients(provider, receiver, id_token_signed_response_alg="RS256")
    agent = Agent()
    try:
        a_tokens = _login(agent, provider, a, a_secret, cb)
        agent.go(f"{provider.issuer}/logout?" + str(httpx.QueryParams({"id_token_hint": a_tokens["id_token"]})))
        assert _wait(lambda: receiver.tokens)
    finally:
        agent.close()
    assert receiver.attempts == 3
    token = _claims(provider, receiver.tokens[0])
    assert token.header["alg"] == "RS256" and token.claims["aud"] == a  # the client's algorithm
    assert _wait(lambda: _events(provider, "logout.backchannel"))
    assert _events(provider, "logout.backchannel")[0][1]["attempts"] == 3


def test_a_receiver_that_never_answers_does_not_delay_the_logout_page(live_provider, receiver):
    provider = live_provider
    provider.svc.backchannel.delays = (0.05,)
    provider.svc.backchannel.timeout = 0.3
    provider.account("alice", name=NAME)
    receiver.hang = 2.0
    (a, a_secret), (b, b_secret), cb = _two_clients(provider, receiver)
    agent = Agent()
    try:
        a_tokens = _login(agent, provider, a, a_secret, cb)
        started = time.monotonic()
        out = agent.http.get(f"{provider.issuer}/logout", params={"id_token_hint": a_tokens["id_token"]})
        elapsed = time.monotonic() - started
    finally:
        agent.close()
    assert out.status_code == 200 and elapsed < 1.0, elapsed
    # Given up after two attempts, audited as a failure, without the token in the record.
    assert _wait(lambda: _events(provider, "logout.backchannel_failed"), 10)
    [(client_id, detail)] = _events(provider, "logout.backchannel_failed")
    assert client_id == a and detail["attempts"] == 2 and "Timeout" in detail["outcome"]
    assert not receiver.tokens


def test_a_session_ended_by_a_new_login_is_sent_too(live_provider, receiver):
    """Any end of a session notifies: here another user logs in in the same browser."""
    provider = live_provider
    provider.account("alice", name=NAME)
    provider.account("bob")
    (a, a_secret), _, cb = _two_clients(provider, receiver)
    agent = Agent()
    try:
        alice = _claims(provider, _login(agent, provider, a, a_secret, cb)["id_token"]).claims
        page = agent.go(_authorize_url(provider, a, cb) + "&prompt=login")
        agent.submit(page, "/login/factor/password", username="bob", password=PASSWORD)
        assert _wait(lambda: receiver.tokens)
    finally:
        agent.close()
    assert _claims(provider, receiver.tokens[0]).claims["sid"] == alice["sid"]


def test_disabling_an_account_logs_it_out_of_its_portals(live_provider, receiver):
    """The flag refuses the account's tokens and logins at once; its portals, which keep
    sessions of their own, are told too."""
    from idp.accounts import set_disabled

    provider = live_provider
    alice_id = provider.account("alice", name=NAME)
    (a, a_secret), _, cb = _two_clients(provider, receiver)
    agent = Agent()
    try:
        alice = _claims(provider, _login(agent, provider, a, a_secret, cb)["id_token"]).claims
    finally:
        agent.close()
    set_disabled(provider.svc, alice_id, True)  # as the admin page and the CLI do
    assert _wait(lambda: receiver.tokens)
    assert _claims(provider, receiver.tokens[0]).claims["sid"] == alice["sid"]


def test_front_channel_page_frames_each_client_with_iss_and_sid(live_provider, receiver):
    provider = live_provider
    provider.account("alice", name=NAME)
    cb = receiver.url + "/cb"
    home = receiver.url + "/"
    # Each front-channel URI on the origin of one of its client's redirect URIs (Front-Channel Logout 2).
    a = provider.client(client_name="A", redirect_uris=[cb, "http://localhost:9/cb"], post_logout_redirect_uris=[home],
                        frontchannel_logout_uri="http://localhost:9/fc?x=1", frontchannel_logout_session_required=True)
    b = provider.client(client_name="B", redirect_uris=[cb, "http://127.0.0.1:9/cb"],
                        frontchannel_logout_uri="http://127.0.0.1:9/plain")
    c = provider.client(client_name="C", redirect_uris=[cb])
    agent = Agent()
    try:
        tokens = _login(agent, provider, *a, cb)
        _login(agent, provider, *b, cb)
        _login(agent, provider, *c, cb)
        sid = _claims(provider, tokens["id_token"]).claims["sid"]
        page = agent.http.get(f"{provider.issuer}/logout", params={
            "id_token_hint": tokens["id_token"], "post_logout_redirect_uri": home, "state": "st"})
    finally:
        agent.close()
    assert page.status_code == 200
    frames = sorted(unescape(src) for src in re.findall(r'<iframe src="([^"]+)"', page.text))
    query = urlencode({"x": "1", "iss": provider.issuer, "sid": sid})
    assert frames == ["http://127.0.0.1:9/plain", f"http://localhost:9/fc?{query}"]
    assert f'href="{home}?state=st"' in page.text  # the continue link, and the script's target
    assert re.search(r'<script nonce="[^"]+">', page.text)
    csp = page.headers["content-security-policy"]
    assert "frame-src http://127.0.0.1:9 http://localhost:9" in csp and "frame-ancestors 'none'" in csp
    # Other pages may not frame anything.
    assert "frame-src" not in httpx.get(provider.issuer + "/logout").headers["content-security-policy"]


# -- the school portal: the receiving end --------------------------------------------------------
@pytest.fixture
def make_bc_portal():
    """``make(provider)`` -> (url, app): the school portal registered with its back-channel URI."""
    with contextlib.ExitStack() as stack:
        def make(provider, host="127.0.0.1"):
            sock, url = stack.enter_context(live.reserve(host))
            client_id, secret = provider.client(client_name="校務行政系統 2.0", redirect_uris=[url + "/callback"],
                                                post_logout_redirect_uris=[url + "/"],
                                                backchannel_logout_uri=url + "/backchannel-logout",
                                                backchannel_logout_session_required=True)
            app = create_portal(provider.issuer, client_id, secret, url, secrets.token_urlsafe(32))
            stack.enter_context(live.serve(app, sock, url, health="/"))
            return url, app

        yield make


def test_log_out_once_and_you_are_out_of_both_portals(live_provider, make_bc_portal):
    """C2: logged in at two portals with one login; logging out at the second ends the first."""
    provider = live_provider
    provider.account("alice", name=NAME)
    first, _ = make_bc_portal(provider)
    # Another host: cookies ignore ports, and both portals name their cookie alike.
    second, _ = make_bc_portal(provider, "localhost")
    agent = Agent()
    try:
        page = agent.go(first + "/login")
        home = agent.submit(page, "/login/factor/password", username="alice", password=PASSWORD)
        assert _path(home) == first + "/" and NAME in home.text
        other = agent.go(second + "/login")  # single sign-on, no login page
        assert _path(other) == second + "/" and NAME in other.text

        assert NAME in agent.go(first + "/").text  # still logged in at the first
        out = agent.submit(other, "/logout")
        assert _path(out) == second + "/" and NAME not in out.text
        # The first portal learns it through the back channel: its own cookie is still there.
        assert _wait(lambda: NAME not in agent.go(first + "/").text), "the first portal is still logged in"
        assert 'href="/login"' in agent.go(first + "/").text
        page = agent.go(first + "/login")
        assert _is_login_page(page, provider)  # and the provider asks for the password again
    finally:
        agent.close()


def test_a_logout_at_the_portal_ends_its_session_for_every_copy_of_its_cookie(make_live_provider, make_bc_portal):
    """The portal's own 登出 ends its session, not just this browser's cookie: a copy taken
    before (a shared PC, malware, a proxy log) is no login after it, though no logout token
    comes. Here the provider's session has lapsed (it does not slide; the portal's does), so
    the provider has nothing to end."""
    provider = make_live_provider(session_seconds=2)
    provider.account("alice", name=NAME)
    url, app = make_bc_portal(provider)
    agent = Agent()
    try:
        page = agent.go(url + "/login")
        assert NAME in agent.submit(page, "/login/factor/password", username="alice", password=PASSWORD).text
        copy = dict(agent.http.cookies.items())
        time.sleep(3)  # the provider's session lapses; the portal's goes on
        assert NAME in agent.go(url + "/").text
        out = agent.submit(agent.go(url + "/"), "/logout")
        assert _path(out) == url + "/" and NAME not in out.text
        assert NAME not in httpx.get(url + "/", cookies=copy).text, "a copy of the cookie is still logged in"
    finally:
        agent.close()


def test_a_portal_login_lasts_eight_hours_and_logging_out_leaves_single_sign_on_alone(live_provider, make_bc_portal):
    """The cookie slides, the login does not: 8 hours after it, however used since. A user
    who logs out at the portal but never reaches the provider's logout (closed the tab) is
    still signed in there: logging in again at the portal is single sign-on, and holds."""
    provider = live_provider
    provider.account("alice", name=NAME)
    url, app = make_bc_portal(provider)
    agent = Agent()
    try:
        page = agent.go(url + "/login")
        home = agent.submit(page, "/login/factor/password", username="alice", password=PASSWORD)
        assert NAME in home.text
        csrf = next(f for f in forms(home.text) if f["action"] == "/logout")["fields"]["csrf"]
        out = agent.http.post(url + "/logout", data={"csrf": csrf})  # not followed to the provider
        assert out.headers["location"].startswith(provider.issuer + "/")
        again = agent.go(url + "/login")
        assert _path(again) == url + "/" and NAME in again.text  # no login page: single sign-on
        assert NAME in agent.go(url + "/").text

        app.state.ended.clock = lambda: time.time() + 8 * 3600 + 1  # the portal's clock
        assert NAME not in agent.go(url + "/").text
    finally:
        agent.close()


def test_a_key_the_provider_withdrew_no_longer_signs_logout_tokens(live_provider, make_bc_portal):
    """SPEC P1: a retired key leaves /jwks at its time (say after a compromise), and /jwks
    says ``max-age=300``. Once the portal's copy is older, a logout token signed with the
    withdrawn key ends no session (anyone may post one)."""
    provider, svc = live_provider, live_provider.svc
    provider.account("alice", name=NAME)
    url, app = make_bc_portal(provider)
    agent = Agent()
    try:
        page = agent.go(url + "/login")
        assert NAME in agent.submit(page, "/login/factor/password", username="alice", password=PASSWORD).text
        session = svc.sessions.get(agent.http.cookies.get("idp_session"))
        token, _ = bcl.logout_token(svc, svc.server.query_client(app.state.client_id), session["account"],
                                    session["sid"])
        claims = jwt.decode(token, svc.keys.verification_keys()).claims
        withdrawn = svc.keys.signing_key("ES256")  # the key that signed alice's ID token
        svc.keys.rotate(keep_retired_seconds=0)  # ... withdrawn at once
        published = httpx.get(provider.issuer + "/jwks")
        assert withdrawn.kid not in {k["kid"] for k in published.json()["keys"]}
        assert "max-age=300" in published.headers["cache-control"]

        later = time.time() + 301
        app.state.ended.clock = lambda: time.time() + 301  # the portal's clock: its copy is stale
        claims.update(iat=int(later), exp=int(later) + 120, jti="signed-with-a-withdrawn-key")
        forged = jwt.encode({"alg": "ES256", "kid": withdrawn.kid, "typ": "logout+jwt"}, claims, withdrawn)
        answer = httpx.post(url + "/backchannel-logout", data={"logout_token": forged})
        assert answer.status_code == 400, "a logout token signed with a withdrawn key was taken"
        assert NAME in agent.go(url + "/").text
    finally:
        agent.close()


def test_the_portal_checks_the_logout_token(live_provider, make_bc_portal):
    provider = live_provider
    svc = provider.svc
    provider.account("alice", name=NAME)
    url, app = make_bc_portal(provider)
    agent = Agent()
    try:
        page = agent.go(url + "/login")
        home = agent.submit(page, "/login/factor/password", username="alice", password=PASSWORD)
        assert NAME in home.text
        session = svc.sessions.get(agent.http.cookies.get("idp_session"))
        account, sid = session["account"], session["sid"]
        client = svc.server.query_client(app.state.client_id)
        other = svc.server.query_client(provider.client(redirect_uris=[url + "/x"])[0])

        def post(token):
            return httpx.post(url + "/backchannel-logout", data={"logout_token": token})

        def signed(body_change=None, header_typ="logout+jwt", for_client=client):
            token, _ = bcl.logout_token(svc, for_client, account, sid)
            body = jwt.decode(token, svc.keys.verification_keys()).claims
            body.update(body_change or {})
            body = {k: v for k, v in body.items() if v is not None}
            from idp.protocol.claims import sign
            return sign(svc.keys, "ES256", body, typ=header_typ)

        now = int(time.time())
        refused = [
            post("not-a-jwt"),
            post(signed(for_client=other)),  # another client's token (aud)
            post(signed({"aud": [client.client_id, other.client_id]})),  # for others too (2.6, as ID tokens)
            post(signed({"iss": "https://evil.example"})),
            post(signed(header_typ="JWT")),  # an ID token is not a logout token
            post(signed({"events": None})),
            post(signed({"events": {EVENT: {}}, "nonce": "n"})),
            post(signed({"sid": None, "sub": None})),
            post(signed({"iat": now - 3600, "exp": now + 60})),
            post(signed({"exp": None})),  # required (section 2.4)
            post(signed({"jti": None})),
        ]
        assert [r.status_code for r in refused] == [400] * len(refused)
        assert NAME in agent.go(url + "/").text  # none of those logged anyone out
        # An error response's description is the sender's text: the portal shows the code alone.
        lure = "帳號異常，請立即撥打客服專線"
        page = httpx.get(url + "/callback", params={"error": "access_denied", "error_description": lure})
        assert page.status_code == 400 and "access_denied" in page.text and lure not in page.text
        page = httpx.get(url + "/callback", params={"error": lure})
        assert page.status_code == 400 and "invalid_response" in page.text and lure not in page.text

        # Tokens naming a key the portal lacks make it fetch the provider's JWKS once, not
        # once each (anyone may post here); garbage makes it fetch nothing.
        def jwks_fetches():
            return svc.metrics.registry.get_sample_value(
                "idp_http_request_seconds_count", {"route": "/jwks", "method": "GET", "status": "200"}) or 0

        before = jwks_fetches()
        stranger = ECKey.generate_key("P-256", parameters={"kid": "stranger"}, private=True)
        forged = jwt.encode({"alg": "ES256", "kid": "stranger", "typ": "logout+jwt"},
                            jwt.decode(signed(), svc.keys.verification_keys()).claims, stranger)
        assert [post(forged).status_code for _ in range(5)] + [post("x.y.z").status_code] == [400] * 6
        assert jwks_fetches() - before == 1

        good = signed()
        ok = post(good)
        assert ok.status_code == 200 and ok.headers["cache-control"] == "no-store"
        assert post(good).status_code == 400  # replayed jti
        assert NAME not in agent.go(url + "/").text
    finally:
        agent.close()
