"""What a relying party sees when something is wrong (SPEC P2, P3, P5, P6, O4):
each case gets the exact error the specifications name, and never a redirect
to an address the provider cannot vouch for."""

import re
import threading
from urllib.parse import urlencode

from tests.harness import REDIRECT, callback, pkce, redeem


def _tokens(provider, client_id, secret, verifier=None, **params):
    browser = provider.browser()
    code = browser.login(client_id, **params)["code"]
    response = redeem(browser.http, client_id, secret, code, verifier)
    assert response.status_code == 200, response.text
    return browser, code, response.json()


def test_unknown_client_gets_an_error_page_not_a_redirect(provider):
    response = provider.browser().authorize("no-such-client")
    assert response.status_code == 400 and "location" not in response.headers
    assert "invalid_client" in response.text


def test_unregistered_redirect_uri_is_never_followed(provider):
    client_id, _ = provider.client()
    response = provider.browser().authorize(client_id, "https://evil.example.com/callback")
    assert response.status_code == 400 and "location" not in response.headers
    assert "evil.example.com" not in response.headers.get("content-location", "")


def test_redirect_uri_must_match_exactly(provider):
    client_id, _ = provider.client()
    response = provider.browser().authorize(client_id, REDIRECT + "/extra")
    assert response.status_code == 400 and "location" not in response.headers


def test_a_native_apps_loopback_redirect_uri_matches_on_any_port(provider):
    """RFC 8252 7.3: a native app gets its loopback port from the system at the time of the
    request. The port may differ from the registered one; the address, scheme and path may not."""
    provider.account("alice")
    registered = "http://127.0.0.1/callback"
    client_id, _ = provider.client(token_endpoint_auth_method="none", redirect_uris=[registered, "http://[::1]:8080/cb"])
    verifier, challenge = pkce()
    browser = provider.browser()
    code = browser.login(client_id, "http://127.0.0.1:51004/callback", code_challenge=challenge,
                         code_challenge_method="S256")["code"]
    response = redeem(browser.http, client_id, None, code, verifier, redirect_uri="http://127.0.0.1:51004/callback")
    assert response.status_code == 200, response.text
    again = browser.authorize(client_id, "http://[::1]:49152/cb", code_challenge=challenge, code_challenge_method="S256")
    assert callback(again, "http://[::1]:49152/cb")["code"]  # the session's single sign-on
    for wrong in ("http://127.0.0.1:51004/other", "https://127.0.0.1:51004/callback", "http://localhost:51004/callback",
                  "http://127.0.0.2:51004/callback", "http://u@127.0.0.1:51004/callback", "http://[::1]:49152/cb/"):
        page = browser.authorize(client_id, wrong, code_challenge=challenge, code_challenge_method="S256")
        assert page.status_code == 400 and "location" not in page.headers, wrong


def test_parameters_the_provider_does_not_read_are_not_kept_with_the_login(provider):
    """RFC 6749 3.1: unknown parameters are ignored, so an anonymous request cannot park its own
    bytes in the store for the login's 15 minutes; a parameter past 4,096 characters is refused."""
    client_id, _ = provider.client()
    http = provider.http()
    form = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "scope": "openid",
            "state": "s", "nonce": "n"}
    page = http.post("/authorize", data={**form, **{f"x{i}": "A" * 8000 for i in range(7)}, "x0": ["1", "2"]})
    assert page.status_code == 200 and "/login/factor/password" in page.text  # a repeated unknown one too
    tx = provider.svc.store.get("tx:" + re.search(r'name="tx" value="([^"]+)"', page.text).group(1))
    assert sorted(k for k, _ in tx["params"]) == sorted(form)
    refused = callback(http.post("/authorize", data={**form, "state": "s" * 4097}, follow_redirects=False))
    assert refused["error"] == "invalid_request" and "state" in refused["error_description"]


def test_public_client_without_pkce_is_refused(provider):
    client_id, _ = provider.client(token_endpoint_auth_method="none")
    params = callback(provider.browser().authorize(client_id))
    assert params["error"] == "invalid_request" and "PKCE" in params["error_description"]


def test_plain_pkce_is_refused(provider):
    client_id, _ = provider.client(token_endpoint_auth_method="none")
    params = callback(provider.browser().authorize(client_id, code_challenge="x" * 43, code_challenge_method="plain"))
    assert params["error"] == "invalid_request"


def test_pkce_without_its_method_is_refused(provider):
    """Without code_challenge_method the method is plain (RFC 7636 4.3): refused at once, not
    taken for S256 and then failing at the token endpoint."""
    client_id, _ = provider.client(token_endpoint_auth_method="none")
    _, challenge = pkce()
    params = callback(provider.browser().authorize(client_id, code_challenge=challenge))
    assert params["error"] == "invalid_request" and "code_challenge_method" in params["error_description"]


def test_an_openid_request_needs_its_redirect_uri(provider):
    """OpenID Connect requires redirect_uri (Core 3.1.2.1). Taken from the client's only
    registration instead, the code would be bound to none and redeemed with any."""
    provider.account("alice")
    client_id, _ = provider.client()
    params = callback(provider.browser().authorize(client_id, redirect_uri=None))  # to the one registered
    assert params["error"] == "invalid_request" and "redirect_uri" in params["error_description"]


def test_public_client_with_pkce_logs_in(provider):
    provider.account("alice")
    client_id, _ = provider.client(token_endpoint_auth_method="none")
    verifier, challenge = pkce()
    _, _, token = _tokens(provider, client_id, None, verifier, code_challenge=challenge, code_challenge_method="S256")
    assert token["id_token"]


def test_wrong_code_verifier_is_invalid_grant(provider):
    provider.account("alice")
    client_id, secret = provider.client()
    _, challenge = pkce()
    browser = provider.browser()
    code = browser.login(client_id, code_challenge=challenge, code_challenge_method="S256")["code"]
    wrong, _ = pkce()
    response = redeem(browser.http, client_id, secret, code, wrong)
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"


def test_replayed_code_is_refused_and_revokes_its_tokens(provider):
    provider.account("alice")
    client_id, secret = provider.client()
    browser, code, token = _tokens(provider, client_id, secret)
    again = redeem(browser.http, client_id, secret, code)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    userinfo = browser.http.get("/userinfo", headers={"Authorization": f"Bearer {token['access_token']}"})
    assert userinfo.status_code == 401
    refresh = browser.http.post("/token", data={"grant_type": "refresh_token", "refresh_token": token["refresh_token"]}, auth=(client_id, secret))
    assert refresh.json()["error"] == "invalid_grant"


def test_a_code_is_redeemed_once_under_concurrency(provider):
    provider.account("alice")
    client_id, secret = provider.client()
    browser = provider.browser()
    code = browser.login(client_id)["code"]
    results = []

    def redeem_once():
        results.append(redeem(provider.http(), client_id, secret, code).status_code)

    threads = [threading.Thread(target=redeem_once) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] + [400] * 7


def _hold_first_write_with(store, marker: str):
    """Calls of ``store.write`` whose batch sets a key starting with ``marker`` wait, the first
    one, until released; returns (reached, release, restore)."""
    reached, release, original = threading.Event(), threading.Event(), store.write
    first = []

    def held(batch):
        if not first and any(key.startswith(marker) for key, _, _ in batch.sets):
            first.append(True)
            reached.set()
            release.wait(10)
        return original(batch)

    store.write = held
    return reached, release, lambda: setattr(store, "write", original)


def test_a_code_replayed_while_its_first_redemption_is_in_flight_revokes_what_that_issued(provider):
    """RFC 6749 4.1.2 / SPEC P3: a replayed code revokes what it issued. A thief who redeems a
    stolen code a few milliseconds before (or after) the client does is the case this is for: the
    second redemption must end the family whichever of the two is answered first."""
    provider.account("alice")
    client_id, secret = provider.client()
    code = provider.browser().login(client_id)["code"]
    reached, release, restore = _hold_first_write_with(provider.svc.store, "grant:")
    results = {}
    try:
        first = threading.Thread(target=lambda: results.setdefault(
            "first", redeem(provider.http(), client_id, secret, code)))
        first.start()
        assert reached.wait(10)  # the first redemption took the code; its tokens are not written yet
        results["replay"] = redeem(provider.http(), client_id, secret, code)
        release.set()
        first.join(10)
    finally:
        release.set()
        restore()
    assert results["replay"].status_code == 400 and results["replay"].json()["error"] == "invalid_grant"
    token = results["first"].json()
    assert results["first"].status_code == 200, results["first"].text
    http = provider.http()
    # The code was used twice: what its first use issued must not stand.
    assert http.get("/userinfo", headers={"Authorization": f"Bearer {token['access_token']}"}).status_code == 401
    refresh = http.post("/token", data={"grant_type": "refresh_token", "refresh_token": token["refresh_token"]},
                        auth=(client_id, secret))
    assert refresh.status_code == 400


def test_a_code_the_release_before_redeemed_revokes_its_tokens_when_replayed(provider):
    """A rolling update: the release before took a redeemed code and named its grant in a
    ``code-used:`` marker, kept a day; its replay at this release revokes that grant too."""
    from idp.protocol.tokens import USED_MARKER_SECONDS, _h, code_grant

    provider.account("alice")
    client_id, secret = provider.client()
    browser, code, token = _tokens(provider, client_id, secret)
    store = provider.svc.store  # as that release left it
    store.delete("code:" + _h(code))
    store.set("code-used:" + _h(code), {"grant": code_grant(code)}, USED_MARKER_SECONDS)
    assert redeem(browser.http, client_id, secret, code).status_code == 400
    refresh = browser.http.post("/token", data={"grant_type": "refresh_token", "refresh_token": token["refresh_token"]},
                                auth=(client_id, secret))
    assert refresh.json()["error"] == "invalid_grant"


def test_expired_code_is_invalid_grant(provider):
    provider.account("alice")
    client_id, secret = provider.client()
    browser = provider.browser()
    code = browser.login(client_id)["code"]
    provider.clock.advance(61)
    response = redeem(browser.http, client_id, secret, code)
    assert response.json()["error"] == "invalid_grant"


def test_code_of_another_client_is_invalid_grant(provider):
    provider.account("alice")
    a, _ = provider.client()
    b, secret_b = provider.client()
    browser = provider.browser()
    code = browser.login(a)["code"]
    assert redeem(browser.http, b, secret_b, code).json()["error"] == "invalid_grant"


def test_wrong_client_secret_is_invalid_client(provider):
    client_id, _ = provider.client()
    response = provider.http().post("/token", data={"grant_type": "authorization_code", "code": "x"}, auth=(client_id, "wrong"))
    assert response.status_code == 401 and response.json()["error"] == "invalid_client"


def test_refresh_rotates_and_reuse_revokes_the_family(provider):
    provider.account("alice")
    client_id, secret = provider.client()
    browser, _, token = _tokens(provider, client_id, secret)
    http = browser.http

    def refresh(rt):
        return http.post("/token", data={"grant_type": "refresh_token", "refresh_token": rt}, auth=(client_id, secret))

    first = refresh(token["refresh_token"])
    assert first.status_code == 200 and first.json()["refresh_token"] != token["refresh_token"]
    assert first.json()["id_token"]
    reuse = refresh(token["refresh_token"])
    assert reuse.json()["error"] == "invalid_grant"
    # The reuse looked like theft: the newest refresh token of the family is dead too.
    assert refresh(first.json()["refresh_token"]).json()["error"] == "invalid_grant"


def test_refresh_token_of_another_client_is_refused_and_kept(provider):
    provider.account("alice")
    owner, owner_secret = provider.client()
    thief, thief_secret = provider.client()
    browser, _, token = _tokens(provider, owner, owner_secret)
    stolen = browser.http.post("/token", data={"grant_type": "refresh_token", "refresh_token": token["refresh_token"]}, auth=(thief, thief_secret))
    assert stolen.status_code == 400 and stolen.json()["error"] == "invalid_grant"
    mine = browser.http.post("/token", data={"grant_type": "refresh_token", "refresh_token": token["refresh_token"]}, auth=(owner, owner_secret))
    assert mine.status_code == 200


def test_prompt_none_without_session_is_login_required(provider):
    client_id, _ = provider.client()
    params = callback(provider.browser().authorize(client_id, prompt="none", state="pn"))
    assert params["error"] == "login_required" and params["state"] == "pn"


def test_prompt_none_with_session_returns_a_code(provider):
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    browser.login(client_id)
    assert "code" in callback(browser.authorize(client_id, prompt="none"))


def test_prompt_login_and_max_age_zero_force_a_new_login(provider):
    provider.account("alice")
    client_id, secret = provider.client()
    browser = provider.browser()
    first = redeem(browser.http, client_id, secret, browser.login(client_id)["code"]).json()
    provider.clock.advance(120)
    for params in ({"max_age": "0"}, {"prompt": "login"}):
        page = browser.authorize(client_id, **params)
        assert page.status_code == 200 and "/login/factor/password" in page.text
    provider.clock.advance(5)
    second = redeem(browser.http, client_id, secret, browser.login(client_id, max_age="0")["code"]).json()
    from joserfc import jwt
    from joserfc.jwk import KeySet

    keys = KeySet.import_key_set(browser.http.get("/jwks").json())
    before, after = (jwt.decode(t["id_token"], keys).claims["auth_time"] for t in (first, second))
    assert after - before == 125


def test_max_age_within_limit_keeps_the_session(provider):
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    browser.login(client_id)
    provider.clock.advance(30)
    assert "code" in callback(browser.authorize(client_id, max_age="300"))


def test_unmet_acr_is_reported_to_the_client(provider):
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id, acr_values="urn:idp:loa:3"))
    assert callback(page)["error"] == "unmet_authentication_requirements"


def test_unmet_acr_is_reported_without_interaction_too(provider):
    """RFC 9470 3: with prompt=none, a level the account cannot reach at all is
    unmet_authentication_requirements, not interaction_required (a login that can only fail)."""
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    browser.login(client_id)
    page = browser.authorize(client_id, acr_values="urn:idp:loa:3", prompt="none")
    assert callback(page)["error"] == "unmet_authentication_requirements"


def test_bad_authorization_parameters(provider):
    client_id, _ = provider.client()
    browser = provider.browser()
    assert callback(browser.authorize(client_id, response_type="token"))["error"] == "unsupported_response_type"
    assert callback(browser.authorize(client_id, prompt="none login"))["error"] == "invalid_request"
    assert callback(browser.authorize(client_id, max_age="-1"))["error"] == "invalid_request"
    assert callback(browser.authorize(client_id, max_age="%C2%B2"))["error"] == "invalid_request"  # ², a digit to str.isdigit
    assert callback(browser.authorize(client_id, request="eyJ"))["error"] == "request_not_supported"


def test_scope_values_the_provider_does_not_know_are_ignored(provider):
    """OIDC Core 3.1.2.1: an unknown scope value (address, admin) is ignored, at /authorize and
    /par alike; what is granted leaves it out, and a scope the client is not registered for
    stays out too."""
    provider.account("alice")
    client_id, secret = provider.client(scope="openid profile email")
    browser = provider.browser()
    code = browser.login(client_id, scope="openid profile address admin phone")["code"]
    assert redeem(browser.http, client_id, secret, code).json()["scope"] == "openid profile"
    pushed = provider.http().post("/par", auth=(client_id, secret), data={
        "response_type": "code", "redirect_uri": REDIRECT, "scope": "openid email address"})
    assert pushed.status_code == 201, pushed.text


def test_a_nul_character_is_a_bad_request_on_every_back_end(provider):
    """PostgreSQL's text refuses NUL: wherever such a value reached the database (a username, a
    client_id, a registration) it was a 500 there; it is refused up front everywhere."""
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id), username="al\x00ice")
    assert page.status_code == 400
    http = provider.http()
    for url in (f"/authorize?response_type=code&client_id=a%00b&redirect_uri={REDIRECT}&scope=openid",
                "/logout?client_id=a%00b", "/register/a%00b", "/admin/accounts/a%00b"):
        assert http.get(url).status_code == 400, url
    token = http.post("/token", data={"grant_type": "client_credentials", "client_id": "a\x00b", "client_secret": "x"})
    assert token.status_code == 400 and token.json()["error"] == "invalid_request"


def test_a_parameter_without_a_value_is_as_if_omitted(provider):
    """RFC 6749 3.1: max_age= or response_mode= with nothing after it is no invalid request."""
    provider.account("alice")
    client_id, _ = provider.client()
    for param in ("max_age", "response_mode", "prompt", "acr_values"):
        page = provider.browser().authorize(client_id, **{param: ""})
        assert page.status_code == 200 and "/login/factor/password" in page.text, (param, page.headers.get("location"))


def test_userinfo_without_credentials_has_no_error_code(provider):
    """RFC 6750 3.1: a request with no authentication gets the challenge alone."""
    response = provider.http().get("/userinfo")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


def test_userinfo_by_post_with_the_token_in_the_header(provider):
    """OIDC Core 5.3.1: GET or POST; with the token in the header the body may be empty, or
    anything else (a JSON content type)."""
    provider.account("alice")
    client_id, secret = provider.client()
    token = _tokens(provider, client_id, secret)[2]["access_token"]
    http = provider.http()
    for extra in ({}, {"Content-Type": "application/json"}):
        response = http.post("/userinfo", headers={"Authorization": f"Bearer {token}", **extra})
        assert response.status_code == 200 and response.json()["preferred_username"] == "alice"
    assert http.post("/userinfo", data={"access_token": token}).status_code == 200  # or in the form (RFC 6750 2.2)


def test_a_repeated_parameter_is_refused(provider):
    """RFC 6749 3.1: a second prompt or max_age is no way to ask one part of the provider for
    a fresh login while another reads the session's."""
    provider.account("alice")
    client_id, secret = provider.client()
    browser = provider.browser()
    browser.login(client_id)
    base = f"/authorize?response_type=code&client_id={client_id}&redirect_uri={REDIRECT}&scope=openid&state=r"
    for repeated in ("&prompt=none&prompt=login", "&max_age=0&max_age=3600", "&nonce=a&nonce=b"):
        params = callback(browser.go(base + repeated))
        assert params["error"] == "invalid_request" and "repeated" in params["error_description"], params
        assert params["state"] == "r"
    code = callback(browser.go(base + "&prompt=none"))["code"]
    # RFC 6749 3.2: the token endpoint too, before it looks at the code.
    twice = [("grant_type", "authorization_code"), ("code", "x"), ("code", code), ("redirect_uri", REDIRECT)]
    refused = browser.http.post("/token", content=urlencode(twice), auth=(client_id, secret),
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_request", refused.text
    assert redeem(browser.http, client_id, secret, code).status_code == 200  # refused before the code was looked at


def test_unknown_grant_type(provider):
    client_id, secret = provider.client()
    response = provider.http().post("/token", data={"grant_type": "password", "username": "a"}, auth=(client_id, secret))
    assert response.status_code == 400 and response.json()["error"] == "unsupported_grant_type"


def test_malformed_and_oversized_bodies_get_errors_not_500s(provider):
    client_id, secret = provider.client()
    http = provider.http()
    bad_utf8 = http.post("/token", content=b"grant_type=\xff\xfe", headers={"content-type": "application/x-www-form-urlencoded"})
    assert bad_utf8.status_code == 400 and bad_utf8.json()["error"] == "invalid_request"
    json_body = http.post("/token", json={"grant_type": "client_credentials"})
    assert json_body.status_code == 400 and json_body.json()["error"] == "invalid_request"
    huge = http.post("/token", data={"grant_type": "client_credentials", "scope": "x" * 100_000}, auth=(client_id, secret))
    assert huge.status_code == 413 and huge.json()["error"] == "invalid_request"
    long_param = provider.browser().authorize(client_id, state="s" * 10_000)
    assert long_param.status_code == 400
    assert http.get("/login?tx=nope").status_code == 400


def test_a_login_by_max_age_carries_an_auth_time_within_it(provider):
    """The ID token says auth_time in whole seconds: a login 300.75 s ago is past max_age=300
    for a relying party reading auth_time, so the provider asks for it again, and a login the
    provider lets through is within max_age by the token's own auth_time (Core 3.1.2.1)."""
    provider.account("alice")
    client_id, secret = provider.client()
    browser = provider.browser()
    provider.clock.now = int(provider.clock.now) + 0.75
    browser.login(client_id)
    provider.clock.advance(299)
    code = callback(browser.authorize(client_id, max_age="300"))["code"]
    token = redeem(browser.http, client_id, secret, code).json()
    from joserfc import jwt
    from joserfc.jwk import KeySet

    claims = jwt.decode(token["id_token"], KeySet.import_key_set(browser.http.get("/jwks").json())).claims
    assert provider.clock() - claims["auth_time"] <= 300
    provider.clock.advance(1)
    page = browser.authorize(client_id, max_age="300")
    assert page.status_code == 200 and "/login/factor/password" in page.text
