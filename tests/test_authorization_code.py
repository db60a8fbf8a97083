"""The authorization code flow (SPEC P2, P3, P4) as a relying party sees it."""

import html
import re

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.harness import REDIRECT, callback, forms, pkce, redeem


def _id_token(provider, token: str) -> dict:
    keys = KeySet.import_key_set(provider.http().get("/jwks").json())
    return jwt.decode(token, keys).claims


def test_discovery_points_at_working_endpoints(provider):
    http = provider.http()
    doc = http.get("/.well-known/openid-configuration").json()
    assert doc["issuer"] == provider.issuer
    assert doc["code_challenge_methods_supported"] == ["S256"]
    for endpoint in ("token", "revocation", "introspection"):  # RFC 8414 2: named wherever private_key_jwt is
        assert "private_key_jwt" in doc[f"{endpoint}_endpoint_auth_methods_supported"]
        assert doc[f"{endpoint}_endpoint_auth_signing_alg_values_supported"] == ["ES256", "RS256"]
    assert "ES256" in doc["id_token_signing_alg_values_supported"]
    keys = http.get("/jwks").json()["keys"]
    assert {k["alg"] for k in keys} == {"ES256", "RS256"}
    assert all("d" not in k for k in keys), "private key material must never be published"
    # RFC 8414 3: an OAuth client reads the same metadata at its own well-known URL.
    assert http.get("/.well-known/oauth-authorization-server").json() == doc


def test_password_login_issues_verified_tokens(provider):
    provider.account("alice")
    client_id, secret = provider.client()
    verifier, challenge = pkce()
    browser = provider.browser()
    params = browser.login(client_id, code_challenge=challenge, code_challenge_method="S256", state="s1", nonce="n1")
    assert params["state"] == "s1" and params["iss"] == provider.issuer
    response = redeem(browser.http, client_id, secret, params["code"], verifier)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    token = response.json()
    claims = _id_token(provider, token["id_token"])
    assert claims["iss"] == provider.issuer and claims["aud"] == client_id and claims["nonce"] == "n1"
    assert claims["acr"] == "urn:idp:loa:1" and claims["amr"] == ["pwd"]
    assert claims["name"] == "Alice" and claims["account_kind"] == "personal"
    assert claims["sid"] and claims["auth_time"] == int(provider.clock())
    supported = browser.http.get("/.well-known/openid-configuration").json()["claims_supported"]
    assert set(claims) <= set(supported), set(claims) - set(supported)
    info = browser.http.get("/userinfo", headers={"Authorization": f"Bearer {token['access_token']}"}).json()
    assert info["sub"] == claims["sub"] and info["email"] == "alice@example.tw"


def test_rs256_client_gets_rs256_id_token(provider):
    provider.account("alice")
    client_id, secret = provider.client(id_token_signed_response_alg="RS256")
    browser = provider.browser()
    code = browser.login(client_id)["code"]
    token = redeem(browser.http, client_id, secret, code).json()
    header = jwt.decode(token["id_token"], KeySet.import_key_set(browser.http.get("/jwks").json())).header
    assert header["alg"] == "RS256"


def test_single_sign_on_across_clients(provider):
    provider.account("alice")
    school, _ = provider.client(client_name="School")
    commerce, _ = provider.client(client_name="Commerce", redirect_uris=["https://commerce.example.tw/cb"])
    browser = provider.browser()
    browser.login(school)
    # The second portal gets a code straight away: no login page.
    response = browser.authorize(commerce, "https://commerce.example.tw/cb")
    assert "code" in callback(response, "https://commerce.example.tw/cb")


def test_form_post_response_mode(provider):
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.authorize(client_id, response_mode="form_post", state="fp")
    page = browser.password(page)
    assert page.status_code == 200
    form = forms(page.text)[0]
    assert form["action"] == REDIRECT and form["fields"]["state"] == "fp" and form["fields"]["code"]


def test_pairwise_subjects_differ_per_sector(provider):
    provider.account("alice")
    a, sa = provider.client(subject_type="pairwise")
    b, sb = provider.client(subject_type="pairwise", redirect_uris=["https://other.example.tw/cb"])
    browser = provider.browser()
    sub_a = _id_token(provider, redeem(browser.http, a, sa, browser.login(a)["code"]).json()["id_token"])["sub"]
    code_b = browser.login(b, "https://other.example.tw/cb")["code"]
    sub_b = _id_token(provider, redeem(browser.http, b, sb, code_b, redirect_uri="https://other.example.tw/cb").json()["id_token"])["sub"]
    assert sub_a != sub_b


def test_third_party_client_asks_consent_once(provider):
    provider.account("alice")
    client_id, _ = provider.client(first_party=False, client_name="Research Grants")
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id))
    assert "Research Grants" in page.text and 'value="allow"' in page.text
    params = callback(browser.submit(page, "/login/consent", button=("decision", "allow")))
    assert params["code"]
    assert "code" in callback(browser.authorize(client_id))  # remembered


def test_a_request_without_scope_is_asked_consent_for_the_registered_scope(provider):
    """A request that names no scope gets the client's registered one: that is what the consent
    page shows and what an earlier, narrower consent does not cover."""
    provider.account("alice")
    client_id, secret = provider.client(first_party=False, scope="openid profile email phone")
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id, scope="openid"))
    callback(browser.submit(page, "/login/consent", button=("decision", "allow")))
    assert callback(browser.authorize(client_id, scope=None, prompt="none"))["error"] == "consent_required"
    page = browser.authorize(client_id, scope=None)
    assert "電子郵件地址" in page.text and "電話號碼" in page.text
    code = callback(browser.submit(page, "/login/consent", button=("decision", "allow")))["code"]
    assert redeem(browser.http, client_id, secret, code).json()["scope"] == "openid profile email phone"


def test_consent_denied_returns_access_denied(provider):
    provider.account("alice")
    client_id, _ = provider.client(first_party=False)
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id))
    assert callback(browser.submit(page, "/login/consent", button=("decision", "deny")))["error"] == "access_denied"


def test_english_by_ui_locales(provider):
    client_id, _ = provider.client()
    page = provider.browser().authorize(client_id, ui_locales="en")
    assert "Password" in page.text and 'lang="en"' in page.text
    page = provider.browser().authorize(client_id)
    assert "密碼" in page.text


def test_the_language_the_user_picks_holds_over_the_portals_hint(provider):
    """The portal asked for English; the user pressed 繁體中文: the rest of the login (here the
    page after a wrong password) stays in the user's choice."""
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.authorize(client_id, ui_locales="en")
    chinese = browser.go(html.unescape(re.search(r'<a href="([^"]+)" lang="zh-TW">', page.text)[1]))
    again = browser.password(chinese, password="wrong-password")
    assert '<html lang="zh-TW">' in again.text and "密碼" in again.text



def test_an_error_the_provider_shows_itself_speaks_the_portals_language(provider):
    """OIDC Core 3.1.2.1: ui_locales holds for a redirect_uri that may not be answered too."""
    client_id, _ = provider.client()
    page = provider.browser().authorize(client_id, redirect_uri="https://elsewhere.example/cb", ui_locales="en")
    assert page.status_code == 400 and '<html lang="en">' in page.text


def test_a_client_name_is_shown_in_the_pages_language(provider):
    """RFC 7591 2.2: client_name#<language>; the untagged name where the language has none."""
    tagged, _ = provider.client(**{"client_name": None, "client_name#en": "School Records", "client_name#zh-TW": "學籍系統"})
    assert "學籍系統" in provider.browser().authorize(tagged).text
    assert "School Records" in provider.browser().authorize(tagged, ui_locales="en").text
    plain, _ = provider.client(**{"client_name": "校務系統", "client_name#en-US": "School Affairs"})
    assert "校務系統" in provider.browser().authorize(plain).text
    assert "School Affairs" in provider.browser().authorize(plain, ui_locales="en").text

@pytest.mark.parametrize("header", ["en;q=0, zh-TW", "en;q=0.1, zh-TW;q=0.9", "fr, en;q=0.5, zh-TW;q=0.8"])
def test_accept_language_is_read_by_weight(provider, header):
    """RFC 9110 12.5.4: the most wanted language we have; q=0 means not that one."""
    client_id, _ = provider.client()
    browser = provider.browser()
    browser.http.headers["Accept-Language"] = header
    assert '<html lang="zh-TW">' in browser.authorize(client_id).text
