"""Pushed Authorization Requests (RFC 9126, SPEC P9) as a relying party sees them."""

from joserfc import jwt
from joserfc.jwk import KeySet

from tests.harness import PASSWORD, REDIRECT, callback, pkce, redeem


def _push(http, client_id, secret=None, **params):
    data = {"response_type": "code", "redirect_uri": REDIRECT, "scope": "openid profile", "state": "st",
            "nonce": "n-par", **params}
    auth = (client_id, secret) if secret else None
    if not secret:
        data["client_id"] = client_id
    return http.post("/par", data={k: v for k, v in data.items() if v is not None}, auth=auth)


def _login_with(browser, client_id, request_uri) -> dict:
    page = browser.go(f"/authorize?client_id={client_id}&request_uri={request_uri}")
    if page.status_code == 200 and "/login/factor/password" in page.text:
        page = browser.password(page, "alice", PASSWORD)
    return callback(page)


def test_pushed_request_logs_in_with_the_pushed_parameters(provider):
    provider.account("alice")
    client_id, secret = provider.client()
    http = provider.http()
    doc = http.get("/.well-known/openid-configuration").json()
    assert doc["pushed_authorization_request_endpoint"] == f"{provider.issuer}/par"
    verifier, challenge = pkce()
    pushed = _push(http, client_id, secret, code_challenge=challenge, code_challenge_method="S256")
    assert pushed.status_code == 201 and pushed.headers["cache-control"] == "no-store"
    body = pushed.json()
    assert body["request_uri"].startswith("urn:ietf:params:oauth:request_uri:") and body["expires_in"] == 60
    browser = provider.browser()
    params = _login_with(browser, client_id, body["request_uri"])
    assert params["state"] == "st"
    token = redeem(browser.http, client_id, secret, params["code"], verifier).json()
    claims = jwt.decode(token["id_token"], KeySet.import_key_set(http.get("/jwks").json())).claims
    assert claims["nonce"] == "n-par" and claims["aud"] == client_id
    # One use: the same request_uri again is refused, on a page, never a redirect.
    again = browser.go(f"/authorize?client_id={client_id}&request_uri={body['request_uri']}")
    assert again.status_code == 400 and "location" not in again.headers and "invalid_request_uri" in again.text


def test_only_the_pushed_parameters_count(provider):
    """Section 4: parameters added in the browser are ignored, so nobody on the
    way can swap the redirect URI, scope or state of a pushed request."""
    provider.account("alice")
    client_id, secret = provider.client(redirect_uris=[REDIRECT, "https://portal.example.tw/other"])
    request_uri = _push(provider.http(), client_id, secret).json()["request_uri"]
    browser = provider.browser()
    page = browser.go(f"/authorize?client_id={client_id}&request_uri={request_uri}"
                      "&redirect_uri=https://portal.example.tw/other&state=evil")
    page = browser.password(page, "alice", PASSWORD)
    assert callback(page, REDIRECT)["state"] == "st"


def test_push_needs_the_clients_authentication(provider):
    client_id, secret = provider.client()
    http = provider.http()
    refused = _push(http, client_id, "wrong")  # in the Authorization header: 401 and its challenge (RFC 6749 5.2)
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic error=\"invalid_client\"")
    assert _push(http, client_id).status_code == 401  # a confidential client without its secret
    assert _push(http, "nobody", "x").json()["error"] == "invalid_client"


def test_a_bad_pushed_request_is_refused_at_once(provider):
    client_id, secret = provider.client()
    http = provider.http()
    bad_uri = _push(http, client_id, secret, redirect_uri="https://evil.example.com/cb")
    assert bad_uri.status_code == 400 and bad_uri.json()["error"] == "invalid_request"
    other, _ = provider.client()
    mismatch = http.post("/par", data={"client_id": other, "response_type": "code", "redirect_uri": REDIRECT},
                         auth=(client_id, secret))
    assert mismatch.status_code == 400 and mismatch.json()["error"] == "invalid_request"
    nested = _push(http, client_id, secret, request_uri="urn:ietf:params:oauth:request_uri:x")
    assert nested.json()["error"] == "invalid_request"
    assert _push(http, client_id, secret, prompt="bogus").json()["error"] == "invalid_request"


def test_a_request_uri_works_only_for_its_client_and_only_in_time(provider):
    provider.account("alice")
    client_id, secret = provider.client()
    other, _ = provider.client()
    http = provider.http()
    request_uri = _push(http, client_id, secret).json()["request_uri"]
    stolen = provider.browser().go(f"/authorize?client_id={other}&request_uri={request_uri}")
    assert stolen.status_code == 400 and "location" not in stolen.headers
    # ...and the other client's try did not spend it for its owner.
    owner = provider.browser().go(f"/authorize?client_id={client_id}&request_uri={request_uri}")
    assert owner.status_code == 200 and "/login/factor/password" in owner.text
    late = _push(http, client_id, secret).json()["request_uri"]
    provider.clock.advance(61)
    expired = provider.browser().go(f"/authorize?client_id={client_id}&request_uri={late}")
    assert expired.status_code == 400 and "invalid_request_uri" in expired.text


def test_a_spent_request_uri_says_so_in_both_languages(provider):
    """A reload or the back button after the login: the page says the request expired or was
    used and to log in again at the portal, not that the portal is unregistered."""
    client_id, secret = provider.client()
    for lang, says in (("zh-TW", "請回到原系統重新點選登入"), ("en", "Go back to the portal and log in again")):
        page = provider.browser().go(f"/authorize?client_id={client_id}&ui_locales={lang}"
                                     "&request_uri=urn:ietf:params:oauth:request_uri:spent")
        assert page.status_code == 400 and "location" not in page.headers and says in page.text
        assert "invalid_request_uri" in page.text and "not registered" not in page.text and "未註冊" not in page.text
    unknown = provider.browser().go(f"/authorize?client_id=nobody&request_uri={_push(provider.http(), client_id, secret).json()['request_uri']}")
    assert unknown.status_code == 400 and "invalid_client" in unknown.text


def test_a_request_uri_not_from_par_is_not_supported(provider):
    """OIDC Core 6.2, 3.1.2.6 (discovery: request_uri_parameter_supported false): answered to the
    client's redirect_uri with request_uri_not_supported, once the client and that URI are known."""
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.authorize(client_id, request_uri="https://portal.example.tw/request.jwt")
    assert callback(page)["error"] == "request_uri_not_supported"
    elsewhere = browser.authorize(client_id, "https://evil.example.com/cb", request_uri="https://portal.example.tw/r")
    assert elsewhere.status_code == 400 and "location" not in elsewhere.headers


def test_public_client_pushes_with_its_client_id(provider):
    provider.account("alice")
    client_id, _ = provider.client(token_endpoint_auth_method="none")
    verifier, challenge = pkce()
    request_uri = _push(provider.http(), client_id, code_challenge=challenge, code_challenge_method="S256").json()["request_uri"]
    browser = provider.browser()
    code = _login_with(browser, client_id, request_uri)["code"]
    assert redeem(browser.http, client_id, None, code, verifier).status_code == 200


def test_a_client_that_requires_par_cannot_skip_it(provider):
    provider.account("alice")
    client_id, secret = provider.client(require_pushed_authorization_requests=True)
    browser = provider.browser()
    refused = callback(browser.authorize(client_id))
    assert refused["error"] == "invalid_request" and "PAR" in refused["error_description"]
    request_uri = _push(provider.http(), client_id, secret).json()["request_uri"]
    assert _login_with(browser, client_id, request_uri)["code"]
