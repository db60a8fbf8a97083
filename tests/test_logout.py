"""RP-initiated logout (SPEC P6, OpenID Connect RP-Initiated Logout 1.0) as a
relying party and a user see it: a logout the provider can vouch for ends the
session and every token issued under it; anything it cannot vouch for changes
nothing and never redirects."""

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from idp.storage.models import Account, AuditEvent
from tests.harness import REDIRECT, callback, forms, redeem

HOME = "https://portal.example.tw/"


def _logged_in(provider, username="alice"):
    """A browser logged in to a client that registered HOME for after logout."""
    provider.account(username)
    client_id, secret = provider.client(post_logout_redirect_uris=[HOME])
    browser = provider.browser()
    code = browser.login(client_id, username=username)["code"]
    token = redeem(browser.http, client_id, secret, code).json()
    return browser, client_id, secret, token


def _logout(browser, **params):
    return browser.http.get("/logout", params=params, follow_redirects=False)


def _has_session(browser, client_id) -> bool:
    """What a portal learns from prompt=none: a code while the session lives."""
    params = callback(browser.authorize(client_id, prompt="none"))
    assert "code" in params or params["error"] == "login_required", params
    return "code" in params


def _tokens_alive(browser, client_id, secret, token) -> tuple[int, str | None]:
    """(UserInfo status, refresh error) for the tokens issued under the session."""
    info = browser.http.get("/userinfo", headers={"Authorization": f"Bearer {token['access_token']}"})
    refresh = browser.http.post("/token", data={"grant_type": "refresh_token", "refresh_token": token["refresh_token"]},
                                auth=(client_id, secret))
    return info.status_code, refresh.json().get("error")


def _tamper(id_token: str) -> str:
    """Flip one character in the middle of the signature (the last one may only
    carry padding bits, so changing it could leave the signature intact)."""
    head, payload, sig = id_token.split(".")
    i = len(sig) // 2
    sig = sig[:i] + ("A" if sig[i] != "A" else "B") + sig[i + 1:]
    return f"{head}.{payload}.{sig}"


def _refused(response):
    assert response.status_code == 400, (response.status_code, response.text[:300])
    assert "location" not in response.headers
    assert response.headers["content-type"].startswith("text/html")


def test_valid_hint_logs_out_at_once_and_returns_with_state(provider):
    browser, client_id, secret, token = _logged_in(provider)
    stolen_cookie = browser.http.cookies["idp_session"]
    response = _logout(browser, id_token_hint=token["id_token"], post_logout_redirect_uri=HOME, state="bye")
    assert response.status_code == 303
    assert response.headers["location"] == HOME + "?state=bye"
    params = callback(browser.authorize(client_id, prompt="none", state="after"))
    assert params["error"] == "login_required" and params["state"] == "after"
    assert _tokens_alive(browser, client_id, secret, token) == (401, "invalid_grant")
    # The session ended at the provider, not only in this browser's cookie jar.
    replay = provider.browser()
    replay.http.cookies.set("idp_session", stolen_cookie, domain="idp.test")
    assert not _has_session(replay, client_id)
    with provider.svc.db.session() as session:  # in alice's activity log, named
        logout = session.query(AuditEvent).filter_by(event="logout").one()
    assert (logout.username, logout.method) == ("alice", "rp-initiated")


def test_offline_access_outlives_the_logout_but_not_a_reset(provider):
    """Back-Channel Logout 2.7, OIDC Core 11: a refresh token asked for with offline_access is
    for when the user is not logged in, and a logout leaves it; one without is revoked with
    the session. Ending every session of the account (a password reset) ends it too."""
    browser, client_id, secret, token = _logged_in(provider)
    code = browser.login(client_id, scope="openid offline_access")["code"]
    offline = redeem(browser.http, client_id, secret, code).json()
    assert "offline_access" in offline["scope"].split()
    assert _logout(browser, id_token_hint=token["id_token"], post_logout_redirect_uri=HOME).status_code == 303
    assert _tokens_alive(browser, client_id, secret, token) == (401, "invalid_grant")
    refreshed = browser.http.post("/token", data={"grant_type": "refresh_token", "refresh_token": offline["refresh_token"]},
                                  auth=(client_id, secret))
    assert refreshed.status_code == 200, refreshed.text
    provider.clock.advance(1)
    with provider.svc.db.session() as session:
        account_id = session.query(Account).filter_by(username="alice").one().id
    provider.svc.sessions.end_all(account_id, provider.svc.tokens)
    assert _tokens_alive(browser, client_id, secret, refreshed.json()) == (401, "invalid_grant")


def test_logout_ends_the_session_for_every_client(provider):
    browser, client_id, secret, token = _logged_in(provider)
    other, other_secret = provider.client(redirect_uris=["https://other.example.tw/cb"])
    code = callback(browser.authorize(other, "https://other.example.tw/cb"), "https://other.example.tw/cb")["code"]
    other_token = redeem(browser.http, other, other_secret, code, redirect_uri="https://other.example.tw/cb").json()
    assert _logout(browser, id_token_hint=token["id_token"], post_logout_redirect_uri=HOME).status_code == 303
    assert _tokens_alive(browser, other, other_secret, other_token) == (401, "invalid_grant")


def test_a_code_from_before_the_logout_gets_no_tokens_after_it(provider):
    """A code still unredeemed when the session ends (a portal slow to call back) is refused:
    tokens from it would belong to an ended session, which no logout would reach again."""
    browser, client_id, secret, token = _logged_in(provider)
    late = callback(browser.authorize(client_id))["code"]
    assert _logout(browser, id_token_hint=token["id_token"], post_logout_redirect_uri=HOME).status_code == 303
    answer = redeem(browser.http, client_id, secret, late)
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"


def test_a_logout_during_the_code_exchange_ends_its_tokens_too(provider):
    """The logout lands while the exchange writes its grant: between the grant's addition to
    the session's list and the exchange's look at the session. Whichever comes first, the
    tokens do not outlive the session. (The in-process store runs a batch step by step, so
    the logout can be placed there; Redis runs the same order in one pipeline.)"""
    if provider.svc.store.shared:
        pytest.skip("places the logout between two steps of the in-process store's batch")
    browser, client_id, secret, token = _logged_in(provider)
    late = callback(browser.authorize(client_id))["code"]
    store, add = provider.svc.store, provider.svc.store.add

    def logout_first(key, member, ttl):
        if key.startswith("sess-grants:"):
            del store.add
            provider.svc.sessions.end(key.removeprefix("sess-grants:"), provider.svc.tokens)
        return add(key, member, ttl)

    store.add = logout_first
    answer = redeem(browser.http, client_id, secret, late)
    assert "add" not in vars(store)  # the logout did land in the exchange
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"


def test_a_logout_during_the_code_exchange_ends_its_tokens_on_a_redis_cluster_too(provider):
    """On a Redis Cluster the session and its grant list may sit on two nodes: the exchange's
    look at the session can run before its grant is added. Here the store runs the reads
    first, as such a Cluster may, and the logout lands between: the mark the logout leaves in
    the grant list, the exchange's own key, tells the exchange."""
    from idp.storage.kv import Batch

    browser, client_id, secret, token = _logged_in(provider)
    late = callback(browser.authorize(client_id))["code"]
    svc = provider.svc
    store = svc.store  # the sessions and the tokens keep using it directly

    class ReadsFirst:
        def __getattr__(self, name):
            return getattr(store, name)

        def write(self, batch):
            sessions = [key for key in batch.reads if key.startswith("sess:")]
            if not sessions:
                return store.write(batch)
            svc.store = store
            early = Batch()
            early.reads = batch.reads
            read = store.write(early)
            svc.sessions.end(sessions[0].removeprefix("sess:"), svc.tokens)  # the logout lands here
            batch.reads = []
            rest = store.write(batch)
            return rest[:len(batch.takes)] + read + rest[len(batch.takes):]

    svc.store = ReadsFirst()
    answer = redeem(browser.http, client_id, secret, late)
    assert svc.store is store  # the logout did land in the exchange
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"


def test_pairwise_clients_get_a_sid_of_their_own_and_their_hint_still_logs_out(provider):
    """Pairwise subjects keep two portals from linking a user (OIDC Core 8.1): a sid shared by
    both would link them at once. Each pairwise sector sees its own sid; its hint still ends
    the session without asking."""
    provider.account("alice")
    school, school_secret = provider.client(subject_type="pairwise", redirect_uris=["https://school.example.tw/cb"],
                                            post_logout_redirect_uris=[HOME])
    shop, shop_secret = provider.client(subject_type="pairwise", redirect_uris=["https://shop.example.tw/cb"])
    browser = provider.browser()
    tokens = {}
    for client_id, secret, uri in ((school, school_secret, "https://school.example.tw/cb"),
                                    (shop, shop_secret, "https://shop.example.tw/cb")):
        code = browser.login(client_id, uri)["code"]
        tokens[client_id] = redeem(browser.http, client_id, secret, code, redirect_uri=uri).json()
    a, b = (jwt.decode(tokens[c]["id_token"], KeySet.import_key_set(browser.http.get("/jwks").json())).claims
            for c in (school, shop))
    assert a["sub"] != b["sub"] and a["sid"] != b["sid"]
    response = _logout(browser, id_token_hint=tokens[school]["id_token"], post_logout_redirect_uri=HOME)
    assert response.status_code == 303 and response.headers["location"] == HOME
    after = browser.authorize(shop, "https://shop.example.tw/cb", prompt="none")
    assert callback(after, "https://shop.example.tw/cb")["error"] == "login_required"


def test_tampered_hint_is_an_error_page_and_changes_nothing(provider):
    browser, client_id, secret, token = _logged_in(provider)
    _refused(_logout(browser, id_token_hint=_tamper(token["id_token"]), post_logout_redirect_uri=HOME, state="x"))
    _refused(_logout(browser, id_token_hint="not-a-jwt", post_logout_redirect_uri=HOME))
    assert _has_session(browser, client_id)
    assert _tokens_alive(browser, client_id, secret, token) == (200, None)


def test_unregistered_post_logout_redirect_is_never_followed(provider):
    browser, client_id, secret, token = _logged_in(provider)
    for target in ("https://evil.example.com/", HOME + "extra", REDIRECT):
        # REDIRECT is a registered redirect_uri, which is not a logout URI.
        _refused(_logout(browser, id_token_hint=token["id_token"], post_logout_redirect_uri=target, state="x"))
    # Without a hint or client_id nothing says which client's list to check.
    _refused(_logout(browser, post_logout_redirect_uri=HOME))
    assert _has_session(browser, client_id)


def test_client_id_must_match_the_hint(provider):
    browser, client_id, secret, token = _logged_in(provider)
    other, _ = provider.client(post_logout_redirect_uris=[HOME])
    _refused(_logout(browser, id_token_hint=token["id_token"], client_id=other, post_logout_redirect_uri=HOME))
    assert _has_session(browser, client_id)
    response = _logout(browser, id_token_hint=token["id_token"], client_id=client_id, post_logout_redirect_uri=HOME)
    assert response.status_code == 303 and response.headers["location"] == HOME


def test_logout_without_hint_asks_first(provider):
    browser, client_id, secret, token = _logged_in(provider)
    page = _logout(browser, client_id=client_id, post_logout_redirect_uri=HOME, state="s1")
    assert page.status_code == 200 and "location" not in page.headers
    form = next(f for f in forms(page.text) if f["action"] == "/logout")
    assert form["method"] == "post" and form["fields"]["csrf"]
    assert form["fields"]["csrf"] == browser.http.cookies["idp_csrf"]
    # Only asking logged nobody out.
    assert _has_session(browser, client_id)
    done = browser.submit(page, "/logout")
    assert done.status_code == 303 and done.headers["location"] == HOME + "?state=s1"
    assert not _has_session(browser, client_id)
    assert _tokens_alive(browser, client_id, secret, token) == (401, "invalid_grant")


def test_logout_without_hint_or_redirect_shows_logged_out_page(provider):
    browser, client_id, _, _ = _logged_in(provider)
    page = _logout(browser)
    assert page.status_code == 200
    done = browser.submit(page, "/logout")
    assert done.status_code == 200 and "location" not in done.headers
    assert 'action="/logout"' not in done.text
    assert not _has_session(browser, client_id)



def test_logout_speaks_the_language_the_portal_asked_for(provider):
    """RP-Initiated Logout 1.0 2: ui_locales, for the question, the page after it and an error."""
    browser, client_id, _, _ = _logged_in(provider)
    page = _logout(browser, client_id=client_id, ui_locales="en")
    assert '<html lang="en">' in page.text and "Log out" in page.text
    done = browser.submit(page, "/logout")
    assert '<html lang="en">' in done.text
    assert '<html lang="en">' in _logout(browser, client_id=client_id, ui_locales="en", post_logout_redirect_uri="https://evil.example/").text


def test_a_login_left_half_done_in_another_tab_does_not_outlive_the_logout(provider):
    """A shared computer: alice typed her password for a third-party portal in one tab and left
    it at the consent page; in another tab she logged in at a portal and out again. The next
    person cannot finish her login from the first tab."""
    provider.account("alice")
    research, _ = provider.client(first_party=False, client_name="Research Grants")
    school, secret = provider.client(post_logout_redirect_uris=[HOME])
    browser = provider.browser()
    consent = browser.password(browser.authorize(research))
    assert 'value="allow"' in consent.text
    token = redeem(browser.http, school, secret, browser.login(school)["code"]).json()
    assert _logout(browser, id_token_hint=token["id_token"], post_logout_redirect_uri=HOME).status_code == 303
    answer = browser.submit(consent, "/login/consent", button=("decision", "allow"))
    assert "location" not in answer.headers and "已逾時" in answer.text


def test_a_session_another_users_login_replaces_logs_out_its_front_channel_portals(provider):
    """A shared PC: bob logs in where alice's session was; her front-channel portal loads its
    logout URI before bob's portal gets its code, as at a logout."""
    provider.account("alice")
    provider.account("bob")
    school, secret = provider.client(frontchannel_logout_uri="https://portal.example.tw/fc-logout")
    commerce, _ = provider.client(redirect_uris=["https://shop.example.tw/cb"])
    browser = provider.browser()
    redeem(browser.http, school, secret, browser.login(school)["code"])
    page = browser.password(browser.authorize(commerce, "https://shop.example.tw/cb", prompt="login"), username="bob")
    assert page.status_code == 200 and "https://portal.example.tw/fc-logout" in page.text
    assert "https://shop.example.tw/cb?code=" in page.text  # where the page then goes
    # Answered by form_post too: the frames load before the form goes.
    browser = provider.browser()
    redeem(browser.http, school, secret, browser.login(school)["code"])
    page = browser.password(browser.authorize(commerce, "https://shop.example.tw/cb", prompt="login",
                                              response_mode="form_post"), username="bob")
    assert "https://portal.example.tw/fc-logout" in page.text and 'action="https://shop.example.tw/cb"' in page.text
    assert "frame-src https://portal.example.tw" in page.headers["content-security-policy"]


def test_confirmation_needs_the_csrf_token(provider):
    browser, client_id, secret, token = _logged_in(provider)
    page = _logout(browser, client_id=client_id, post_logout_redirect_uri=HOME)
    fields = next(f for f in forms(page.text) if f["action"] == "/logout")["fields"]
    forged = {k: v for k, v in fields.items() if k != "csrf"}
    for data in (forged, {**forged, "csrf": "guess"}):
        response = browser.http.post("/logout", data=data, follow_redirects=False)
        # Asked again, not logged out, not redirected.
        assert response.status_code == 200 and "location" not in response.headers
    # A confirmation may not arrive by GET either (it would leak the token into logs).
    response = _logout(browser, **fields)
    assert response.status_code == 200 and "location" not in response.headers
    assert _has_session(browser, client_id)
    assert _tokens_alive(browser, client_id, secret, token)[0] == 200


def test_over_https_a_sibling_subdomain_cannot_plant_the_csrf_token(make_provider):
    """Served over https the cookies are __Host- ones, which only this host can set: a page on a
    sibling subdomain (another agency's, under the same site) that sets idp_csrf for the whole
    site, to a value it then posts, does not pass the check."""
    provider = make_provider(issuer="https://login.example.tw")
    browser, client_id, secret, token = _logged_in(provider)
    assert {"__Host-idp_session", "__Host-idp_csrf"} <= set(browser.http.cookies.keys())
    page = _logout(browser, client_id=client_id, post_logout_redirect_uri=HOME)
    fields = next(f for f in forms(page.text) if f["action"] == "/logout")["fields"]
    browser.http.cookies.set("idp_csrf", "planted", domain=".example.tw")
    response = browser.http.post("/logout", data={**fields, "csrf": "planted"}, follow_redirects=False)
    assert response.status_code == 200 and "location" not in response.headers  # asked again
    assert _has_session(browser, client_id)


def test_hint_from_another_session_does_not_log_this_one_out(provider):
    """A logout link carrying someone else's ID token cannot end my session silently."""
    _, client_id, _, mallory_token = _logged_in(provider, "mallory")
    provider.account("alice")
    victim = provider.browser()
    victim.login(client_id)
    page = _logout(victim, id_token_hint=mallory_token["id_token"], post_logout_redirect_uri=HOME)
    assert page.status_code == 200 and "location" not in page.headers
    assert any(f["action"] == "/logout" for f in forms(page.text))
    assert _has_session(victim, client_id)


def test_logout_without_session_just_redirects(provider):
    client_id, _ = provider.client(post_logout_redirect_uris=[HOME])
    response = _logout(provider.browser(), client_id=client_id, post_logout_redirect_uri=HOME, state="s2")
    assert response.status_code == 303 and response.headers["location"] == HOME + "?state=s2"


def test_logout_again_with_the_same_hint_just_redirects(provider):
    browser, client_id, _, token = _logged_in(provider)
    assert _logout(browser, id_token_hint=token["id_token"], post_logout_redirect_uri=HOME).status_code == 303
    # The RP retries (or the user presses back): the hint is still ours, so it is honoured.
    again = _logout(browser, id_token_hint=token["id_token"], post_logout_redirect_uri=HOME, state="s3")
    assert again.status_code == 303 and again.headers["location"] == HOME + "?state=s3"


def test_expired_hint_is_still_accepted(provider):
    """RP-Initiated Logout 1.0 section 2: an expired ID token is a valid hint."""
    browser, client_id, _, token = _logged_in(provider)
    provider.clock.advance(3600)  # past the ID token's exp, within the session
    assert _has_session(browser, client_id)
    response = _logout(browser, id_token_hint=token["id_token"], post_logout_redirect_uri=HOME)
    assert response.status_code == 303
    assert not _has_session(browser, client_id)
