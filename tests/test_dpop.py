"""DPoP-bound tokens (RFC 9449, SPEC P9) as a relying party sees them."""

import base64
import hashlib
import secrets

from joserfc import jwt
from joserfc.jwk import ECKey, OctKey, RSAKey

from tests.harness import pkce, redeem


def _proof(provider, key, htm, path, *, access_token=None, jti=None, iat=None, typ="dpop+jwt", public=True, alg="ES256"):
    header = {"typ": typ, "alg": alg, "jwk": key.as_dict(private=not public)}
    claims = {"htm": htm, "htu": provider.issuer + path, "iat": int(provider.clock() if iat is None else iat),
              "jti": jti or secrets.token_urlsafe(12)}
    if access_token:
        # RFC 9449 4.2, computed here rather than with the provider's own helper
        claims["ath"] = base64.urlsafe_b64encode(hashlib.sha256(access_token.encode()).digest()).rstrip(b"=").decode()
    return jwt.encode(header, claims, key, algorithms=[alg])


def _signed(provider, key, **claims):
    """A /token proof with these claims replacing the usual ones."""
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": key.as_dict(private=False)}
    return jwt.encode(header, {"htm": "POST", "htu": provider.issuer + "/token", "jti": secrets.token_urlsafe(12),
                               **claims}, key)


def _tokens(provider, key, client_id=None, secret=None, **client_meta):
    """Log in and redeem the code with a proof of ``key``."""
    if client_id is None:
        client_id, secret = provider.client(**client_meta)
    verifier, challenge = pkce()
    browser = provider.browser()
    code = browser.login(client_id, code_challenge=challenge, code_challenge_method="S256")["code"]
    headers = {"DPoP": _proof(provider, key, "POST", "/token")} if key else {}
    browser.http.headers.update(headers)
    response = redeem(browser.http, client_id, secret, code, verifier)
    browser.http.headers.pop("DPoP", None)
    return client_id, secret, response


def _userinfo(provider, token, scheme="DPoP", proof=None):
    headers = {"Authorization": f"{scheme} {token}"}
    if proof:
        headers["DPoP"] = proof
    return provider.http().get("/userinfo", headers=headers)


def test_a_dpop_bound_access_token_works_only_with_a_proof_of_its_key(provider):
    provider.account("alice")
    key = ECKey.generate_key("P-256")
    assert "ES256" in provider.http().get("/.well-known/openid-configuration").json()["dpop_signing_alg_values_supported"]
    client_id, secret, response = _tokens(provider, key)
    assert response.status_code == 200, response.text
    token = response.json()
    assert token["token_type"] == "DPoP"
    at = token["access_token"]
    ok = _userinfo(provider, at, proof=_proof(provider, key, "GET", "/userinfo", access_token=at))
    assert ok.status_code == 200 and ok.json()["email"] == "alice@example.tw"
    # Stolen: as a bearer token, with another key's proof, with a replayed or misdirected proof.
    assert _userinfo(provider, at, "Bearer").status_code == 401
    other = ECKey.generate_key("P-256")
    assert _userinfo(provider, at, proof=_proof(provider, other, "GET", "/userinfo", access_token=at)).status_code == 401
    replayed = _proof(provider, key, "GET", "/userinfo", access_token=at)
    assert _userinfo(provider, at, proof=replayed).status_code == 200
    refused = _userinfo(provider, at, proof=replayed)
    assert refused.status_code == 401 and "invalid_dpop_proof" in refused.headers["www-authenticate"]
    assert _userinfo(provider, at, proof=_proof(provider, key, "GET", "/token", access_token=at)).status_code == 401
    assert _userinfo(provider, at, proof=_proof(provider, key, "GET", "/userinfo")).status_code == 401  # no ath
    # The client's resource servers learn the binding by introspection.
    seen = provider.http().post("/introspect", data={"token": at}, auth=(client_id, secret)).json()
    assert seen["active"] and seen["token_type"] == "DPoP" and seen["cnf"] == {"jkt": key.thumbprint()}


def test_rsa_proofs_are_taken_as_discovery_promises(provider):
    """RS256 and PS256 are advertised: an RSA key's JWK in the proof's header (some 400 bytes
    for 2048 bits, 750 for 4096) was past joserfc's default header limit, refused every time."""
    provider.account("alice")
    client_id, secret = provider.client()
    assert {"RS256", "PS256"} <= set(provider.http().get("/.well-known/openid-configuration").json()["dpop_signing_alg_values_supported"])
    for alg, bits in (("RS256", 2048), ("PS256", 4096)):
        key = RSAKey.generate_key(bits)
        verifier, challenge = pkce()
        browser = provider.browser()
        code = browser.login(client_id, code_challenge=challenge, code_challenge_method="S256")["code"]
        browser.http.headers["DPoP"] = _proof(provider, key, "POST", "/token", alg=alg)
        response = redeem(browser.http, client_id, secret, code, verifier)
        assert response.status_code == 200 and response.json()["token_type"] == "DPoP", (alg, response.text)


def test_a_token_without_openid_is_refused_at_userinfo_in_its_own_scheme(provider):
    """RFC 9449 7.1: the challenge names the scheme the token is presented with."""
    provider.account("alice")
    key = ECKey.generate_key("P-256")
    client_id, secret = provider.client()
    verifier, challenge = pkce()
    browser = provider.browser()
    code = browser.login(client_id, scope="profile", code_challenge=challenge, code_challenge_method="S256")["code"]
    browser.http.headers["DPoP"] = _proof(provider, key, "POST", "/token")
    at = redeem(browser.http, client_id, secret, code, verifier).json()["access_token"]
    refused = _userinfo(provider, at, proof=_proof(provider, key, "GET", "/userinfo", access_token=at))
    assert refused.status_code == 403 and refused.headers["www-authenticate"].startswith('DPoP error="insufficient_scope"')


def test_a_bearer_token_stays_a_bearer_token(provider):
    provider.account("alice")
    _, _, response = _tokens(provider, None)
    token = response.json()
    assert token["token_type"] == "Bearer"
    assert _userinfo(provider, token["access_token"], "Bearer").status_code == 200
    assert _userinfo(provider, token["access_token"], "DPoP").status_code == 401


def test_a_public_clients_refresh_token_is_bound_to_its_key(provider):
    provider.account("alice")
    key = ECKey.generate_key("P-256")
    client_id, _, response = _tokens(provider, key, token_endpoint_auth_method="none")
    refresh = response.json()["refresh_token"]
    http = provider.http()
    data = {"grant_type": "refresh_token", "refresh_token": refresh, "client_id": client_id}
    thief = ECKey.generate_key("P-256")
    stolen = http.post("/token", data=data, headers={"DPoP": _proof(provider, thief, "POST", "/token")})
    assert stolen.status_code == 400 and stolen.json()["error"] == "invalid_grant"
    assert http.post("/token", data=data).json()["error"] == "invalid_grant"
    renewed = http.post("/token", data=data, headers={"DPoP": _proof(provider, key, "POST", "/token")})
    assert renewed.status_code == 200 and renewed.json()["token_type"] == "DPoP"


def test_bad_proofs_are_refused_at_the_token_endpoint(provider):
    provider.account("alice")
    key = ECKey.generate_key("P-256")
    client_id, secret = provider.client()
    bad = {
        "wrong type": _proof(provider, key, "POST", "/token", typ="JWT"),
        "private key in the header": _proof(provider, key, "POST", "/token", public=False),
        "too old": _proof(provider, key, "POST", "/token", iat=provider.clock() - 300),
        "from the future": _proof(provider, key, "POST", "/token", iat=provider.clock() + 300),
        "another method": _proof(provider, key, "GET", "/token"),
        "another endpoint": _proof(provider, key, "POST", "/userinfo"),
        "symmetric": jwt.encode({"typ": "dpop+jwt", "alg": "HS256", "jwk": {"kty": "oct", "k": "c2VjcmV0"}},
                                {"htm": "POST", "htu": provider.issuer + "/token", "iat": int(provider.clock()), "jti": "x"},
                                OctKey.import_key("a-shared-secret-of-enough-bytes")),
        "garbage": "not.a.jwt",
        # Python's JSON reader takes these; NaN would compare as never too old.
        "iat NaN": _signed(provider, key, iat=float("nan")),
        "iat too large for a number": _signed(provider, key, iat=10**400),
        "header not an object": "W10." + _proof(provider, key, "POST", "/token").split(".", 1)[1],
    }
    for why, proof in bad.items():
        verifier, challenge = pkce()
        browser = provider.browser()
        code = browser.login(client_id, code_challenge=challenge, code_challenge_method="S256")["code"]
        browser.http.headers["DPoP"] = proof
        response = redeem(browser.http, client_id, secret, code, verifier)
        assert response.status_code == 400 and response.json()["error"] == "invalid_dpop_proof", why


def test_htu_is_compared_as_a_uri(provider):
    """RFC 9449 4.3 with RFC 3986 6.2.2-6.2.3: scheme and host in any case, the default port
    or none, a query or fragment left out; another scheme, port or path is another target."""
    provider.account("alice")
    key = ECKey.generate_key("P-256")
    client_id, secret = provider.client()
    for htu, taken in (("HTTP://IDP.Test:80/token", True), ("http://idp.test/token?x=1#f", True),
                       ("https://idp.test/token", False), ("http://idp.test:8080/token", False),
                       ("http://idp.test/Token", False)):
        verifier, challenge = pkce()
        browser = provider.browser()
        code = browser.login(client_id, code_challenge=challenge, code_challenge_method="S256")["code"]
        browser.http.headers["DPoP"] = _signed(provider, key, iat=int(provider.clock()), htu=htu)
        response = redeem(browser.http, client_id, secret, code, verifier)
        assert (response.status_code == 200) is taken, (htu, response.text)


def test_a_client_registered_for_dpop_must_send_a_proof(provider):
    provider.account("alice")
    _, _, response = _tokens(provider, None, dpop_bound_access_tokens=True)
    assert response.status_code == 400 and response.json()["error"] == "invalid_dpop_proof"
    # The refusal did not spend the code: sent again with a proof, it is redeemed.
    client_id, secret = provider.client(dpop_bound_access_tokens=True)
    verifier, challenge = pkce()
    browser = provider.browser()
    code = browser.login(client_id, code_challenge=challenge, code_challenge_method="S256")["code"]
    assert redeem(browser.http, client_id, secret, code, verifier).json()["error"] == "invalid_dpop_proof"
    browser.http.headers["DPoP"] = _proof(provider, ECKey.generate_key("P-256"), "POST", "/token")
    assert redeem(browser.http, client_id, secret, code, verifier).json()["token_type"] == "DPoP"


# -- the code bound to the client's key (RFC 9449 10) -----------------------------------------
def _bound_code(provider, client_id, secret, *, proof_key=None, dpop_jkt=None, pushed=True):
    """Log alice in through an authorization request bound to a key (a proof at /par, or
    ``dpop_jkt`` pushed or in the front-channel request); returns (code, verifier)."""
    from tests.harness import PASSWORD, REDIRECT, callback

    verifier, challenge = pkce()
    params = {"response_type": "code", "redirect_uri": REDIRECT, "scope": "openid", "state": "st", "nonce": "n",
              "code_challenge": challenge, "code_challenge_method": "S256", "client_id": client_id}
    if dpop_jkt:
        params["dpop_jkt"] = dpop_jkt
    browser = provider.browser()
    if pushed:
        headers = {"DPoP": _proof(provider, proof_key, "POST", "/par")} if proof_key else {}
        answer = provider.http().post("/par", data=params, auth=(client_id, secret), headers=headers)
        assert answer.status_code == 201, answer.text
        page = browser.go(f"/authorize?client_id={client_id}&request_uri={answer.json()['request_uri']}")
    else:
        page = browser.authorize(**params)
    return callback(browser.password(page, "alice", PASSWORD))["code"], verifier


def _redeem_with(provider, client_id, secret, code, verifier, key):
    http = provider.http()
    http.headers["DPoP"] = _proof(provider, key, "POST", "/token")
    return redeem(http, client_id, secret, code, verifier)


def test_a_code_requested_for_a_key_is_redeemed_with_that_key_only(provider):
    """RFC 9449 10 and 10.1: a DPoP proof at /par, or dpop_jkt (pushed or sent through the browser),
    binds the code: another key, or none, cannot redeem it; the key it names gets DPoP tokens."""
    provider.account("alice")
    client_id, secret = provider.client()
    mine, other = ECKey.generate_key("P-256"), ECKey.generate_key("P-256")
    for binding in ({"proof_key": mine}, {"dpop_jkt": mine.thumbprint()}, {"dpop_jkt": mine.thumbprint(), "pushed": False}):
        code, verifier = _bound_code(provider, client_id, secret, **binding)
        refused = _redeem_with(provider, client_id, secret, code, verifier, other)
        assert refused.status_code == 400 and refused.json()["error"] == "invalid_dpop_proof", binding
        code, verifier = _bound_code(provider, client_id, secret, **binding)
        assert redeem(provider.http(), client_id, secret, code, verifier).json()["error"] == "invalid_dpop_proof"
        code, verifier = _bound_code(provider, client_id, secret, **binding)
        token = _redeem_with(provider, client_id, secret, code, verifier, mine)
        assert token.status_code == 200 and token.json()["token_type"] == "DPoP", binding


def test_a_pushed_proof_and_dpop_jkt_must_name_one_key(provider):
    from tests.harness import REDIRECT

    client_id, secret = provider.client()
    mine, other = ECKey.generate_key("P-256"), ECKey.generate_key("P-256")
    data = {"response_type": "code", "redirect_uri": REDIRECT, "scope": "openid",
            "code_challenge": pkce()[1], "code_challenge_method": "S256", "dpop_jkt": other.thumbprint()}
    answer = provider.http().post("/par", data=data, auth=(client_id, secret),
                                  headers={"DPoP": _proof(provider, mine, "POST", "/par")})
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_dpop_proof"
    answer = provider.http().post("/par", data={**data, "dpop_jkt": "not-a-thumbprint"}, auth=(client_id, secret))
    assert answer.status_code == 400 and "dpop_jkt" in answer.json()["error_description"]
    assert provider.http().post("/par", data={**data, "dpop_jkt": mine.thumbprint()}, auth=(client_id, secret),
                                headers={"DPoP": _proof(provider, mine, "POST", "/par")}).status_code == 201
