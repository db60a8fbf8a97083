"""The token endpoint beyond the code flow, and the endpoints a client's back end
calls (SPEC P3, P8): client_credentials, private_key_jwt, revocation (RFC 7009)
and introspection (RFC 7662), each with the exact error a client gets."""

import base64
import contextlib
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, OctKey, RSAKey

from idp.protocol.clients import ClientError
from idp.storage import kv
from tests.harness import pkce, redeem

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def _service(provider, **meta):
    """A confidential back-end client that only uses client_credentials."""
    meta = {"grant_types": ["client_credentials"], "redirect_uris": [], **meta}
    return provider.client(**meta)


def _client_credentials(http, client_id, secret, **extra):
    return http.post("/token", data={"grant_type": "client_credentials", **extra}, auth=(client_id, secret))


def _user_tokens(provider, client_id, secret, browser=None):
    browser = browser or provider.browser()
    code = browser.login(client_id)["code"]
    response = redeem(browser.http, client_id, secret, code)
    assert response.status_code == 200, response.text
    return response.json()


def _userinfo(http, access_token) -> int:
    return http.get("/userinfo", headers={"Authorization": f"Bearer {access_token}"}).status_code


def _refresh(http, client_id, secret, refresh_token):
    return http.post("/token", data={"grant_type": "refresh_token", "refresh_token": refresh_token}, auth=(client_id, secret))


def _introspect(http, client_id, secret, token, **extra):
    return http.post("/introspect", data={"token": token, **extra}, auth=(client_id, secret))


def _revoke(http, client_id, secret, token, **extra):
    return http.post("/revoke", data={"token": token, **extra}, auth=(client_id, secret))


def _error(response, status: int, error: str):
    assert response.status_code == status, (response.status_code, response.text)
    assert response.json()["error"] == error, response.json()


# -- client_credentials ------------------------------------------------------------------
def test_client_credentials_gives_an_access_token_only(provider):
    client_id, secret = _service(provider)
    http = provider.http()
    response = _client_credentials(http, client_id, secret)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    token = response.json()
    assert token["token_type"] == "Bearer" and token["expires_in"] == 600 and token["access_token"]
    assert "refresh_token" not in token and "id_token" not in token
    assert "scope" not in token  # none asked, none registered: no empty scope (RFC 6749 3.3)
    # A machine's token names no user: it is live, but there is no UserInfo for it.
    info = _introspect(http, client_id, secret, token["access_token"]).json()
    assert info["active"] is True and info["client_id"] == client_id and "sub" not in info
    assert _userinfo(http, token["access_token"]) == 401


def test_client_credentials_never_gets_a_refresh_token_or_openid(provider):
    client_id, secret = _service(provider, grant_types=["client_credentials", "refresh_token"])
    token = _client_credentials(provider.http(), client_id, secret, scope="openid profile").json()
    assert "refresh_token" not in token and "id_token" not in token
    assert "openid" not in token["scope"].split()


def test_public_client_cannot_register_for_client_credentials(provider):
    with pytest.raises(ClientError) as raised:
        _service(provider, token_endpoint_auth_method="none")
    assert raised.value.error == "invalid_client_metadata"


def test_client_without_the_grant_type_is_unauthorized_client(provider):
    client_id, secret = provider.client()  # authorization_code and refresh_token only
    _error(_client_credentials(provider.http(), client_id, secret), 400, "unauthorized_client")


def test_public_client_cannot_use_client_credentials(provider):
    client_id, _ = provider.client(token_endpoint_auth_method="none")
    response = provider.http().post("/token", data={"grant_type": "client_credentials", "client_id": client_id})
    _error(response, 401, "invalid_client")


def test_client_credentials_with_wrong_secret_is_invalid_client(provider):
    client_id, _ = _service(provider)
    _error(_client_credentials(provider.http(), client_id, "wrong"), 401, "invalid_client")



@pytest.mark.parametrize("path", ["/token", "/revoke", "/introspect", "/par"])
def test_unreadable_client_credentials_are_invalid_client(provider, path):
    """Basic credentials that are no UTF-8 text, or name a client id with a NUL (which
    PostgreSQL refuses), and an assertion naming one: invalid_client, not a server error."""
    http, data = provider.http(), {"grant_type": "client_credentials", "token": "x", "response_type": "code"}
    for credentials in (b"\xff\xfe:secret", b"%00:secret", b"a\x00b:secret"):
        response = http.post(path, data=data, headers={"Authorization": "Basic " + base64.b64encode(credentials).decode()})
        assert response.status_code == 401 and response.json()["error"] == "invalid_client"
        assert response.headers["www-authenticate"].startswith("Basic")
    response = http.post(path, data=data, headers={"Authorization": b"Basic \xe9t\xe9"})  # a byte past ASCII
    assert response.status_code == 401 and response.json()["error"] == "invalid_client"
    nul = ".".join(base64.urlsafe_b64encode(part).decode().rstrip("=")
                   for part in (b'{"alg":"ES256"}', b'{"iss":"a\\u0000b","sub":"a\\u0000b"}', b"x" * 64))
    response = http.post(path, data={**data, "client_assertion_type": ASSERTION_TYPE, "client_assertion": nul})
    assert response.status_code in (400, 401) and response.json()["error"] == "invalid_client"

# -- private_key_jwt (RFC 7523 client authentication) ------------------------------------
def _key(kid="k1"):
    return ECKey.generate_key("P-256", parameters={"kid": kid}, private=True)


def _key_client(provider, key):
    client_id, secret = _service(provider, token_endpoint_auth_method="private_key_jwt",
                                 jwks={"keys": [key.as_dict(private=False)]})
    assert secret is None  # nothing shared: the client proves itself with its key
    return client_id


def _assertion(provider, key, client_id, alg="ES256", **claims):
    # authlib checks the assertion's exp against the wall clock, not the provider's.
    now = int(time.time())
    body = {"iss": client_id, "sub": client_id, "aud": provider.issuer + "/token", "iat": now, "exp": now + 120,
            "jti": secrets.token_urlsafe(16), **claims}
    return jwt.encode({"alg": alg, "kid": key.kid}, body, key, algorithms=[alg])


def _with_assertion(http, assertion, **data):
    """A token request authenticated by the assertion alone. A refused assertion
    is 400 invalid_client: RFC 6749 5.2 demands 401 only when the client used
    the Authorization header."""
    return http.post("/token", data={"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
                                     "client_assertion": assertion, **data})


def test_private_key_jwt_client_gets_a_token(provider):
    key = _key()
    client_id = _key_client(provider, key)
    response = _with_assertion(provider.http(), _assertion(provider, key, client_id))
    assert response.status_code == 200, response.text
    assert response.json()["access_token"] and "refresh_token" not in response.json()
    # The issuer itself is an audience RFC 7523 allows too.
    response = _with_assertion(provider.http(), _assertion(provider, key, client_id, aud=provider.issuer))
    assert response.status_code == 200, response.text
    # So is the endpoint a client calls, as client libraries sign for it.
    token = response.json()["access_token"]
    seen = provider.http().post("/introspect", data={"token": token, "client_assertion_type": ASSERTION_TYPE,
                                                     "client_assertion": _assertion(provider, key, client_id, aud=provider.issuer + "/introspect")})
    assert seen.status_code == 200 and seen.json()["active"], seen.text


def test_replayed_client_assertion_is_invalid_client(provider):
    key = _key()
    client_id = _key_client(provider, key)
    assertion = _assertion(provider, key, client_id)
    http = provider.http()
    assert _with_assertion(http, assertion).status_code == 200
    _error(_with_assertion(http, assertion), 400, "invalid_client")


def test_client_assertion_signed_with_another_key_is_invalid_client(provider):
    key = _key()
    client_id = _key_client(provider, key)
    http = provider.http()
    _error(_with_assertion(http, _assertion(provider, _key("k1"), client_id)), 400, "invalid_client")
    _error(_with_assertion(http, _assertion(provider, _key("other"), client_id)), 400, "invalid_client")
    # A rejected forgery did not burn the jti for the real client.
    jti = secrets.token_urlsafe(16)
    _error(_with_assertion(http, _assertion(provider, _key("k1"), client_id, jti=jti)), 400, "invalid_client")
    assert _with_assertion(http, _assertion(provider, key, client_id, jti=jti)).status_code == 200


def test_bad_client_assertions_are_invalid_client(provider):
    key = _key()
    client_id = _key_client(provider, key)
    other_id = _key_client(provider, _key())
    http = provider.http()
    now = int(time.time())
    for claims in (
        {"aud": "https://elsewhere.example.com/token"},
        {"exp": now - 3600},
        {"exp": now + 2 * 365 * 86400},  # would outlive its jti's record: replayable a year on
        {"sub": other_id},  # iss and sub must both be the client
        {"iss": other_id, "sub": other_id},  # another client's id, signed with my key
    ):
        _error(_with_assertion(http, _assertion(provider, key, client_id, **claims)), 400, "invalid_client")
    _error(_with_assertion(http, "not.a.jwt"), 400, "invalid_client")


def test_client_assertions_are_signed_with_the_registered_algorithm(provider):
    """OIDC Core 9: a client that registered token_endpoint_auth_signing_alg is refused
    assertions signed otherwise; one that did not may use discovery's ES256 or RS256."""
    ec, rsa = _key("ec"), RSAKey.generate_key(2048, parameters={"kid": "rsa"}, private=True)
    client_id, _ = _service(provider, token_endpoint_auth_method="private_key_jwt", token_endpoint_auth_signing_alg="ES256",
                            jwks={"keys": [ec.as_dict(private=False), rsa.as_dict(private=False)]})
    http = provider.http()
    _error(_with_assertion(http, _assertion(provider, rsa, client_id, alg="RS256")), 400, "invalid_client")
    assert _with_assertion(http, _assertion(provider, ec, client_id)).status_code == 200
    client_id, _ = _service(provider, token_endpoint_auth_method="private_key_jwt",
                            jwks={"keys": [rsa.as_dict(private=False)]})
    _error(_with_assertion(http, _assertion(provider, rsa, client_id, alg="PS256")), 400, "invalid_client")
    assert _with_assertion(http, _assertion(provider, rsa, client_id, alg="RS256")).status_code == 200


def test_private_key_jwt_needs_a_public_asymmetric_jwks(provider):
    """A symmetric or private key in the metadata would be a secret anyone reading
    the registration can see; a malformed one would break /token."""
    shared = OctKey.generate_key(256, parameters={"kid": "s"})
    for bad in (
        {"jwks": {"keys": [shared.as_dict(private=True)]}},
        {"jwks": {"keys": [_key().as_dict(private=True)]}},
        {"jwks": {"keys": [{"kty": "EC"}]}},
        {"jwks": "not-a-jwks"},
        {"jwks_uri": "http://service.example.tw/jwks"},  # fetched: over https only (but on this computer)
    ):
        with pytest.raises(ClientError) as raised:
            _service(provider, token_endpoint_auth_method="private_key_jwt", **bad)
        assert raised.value.error == "invalid_client_metadata"


def test_private_key_jwt_client_cannot_fall_back_to_a_secret(provider):
    client_id = _key_client(provider, _key())
    _error(_client_credentials(provider.http(), client_id, ""), 401, "invalid_client")


# -- revocation (RFC 7009) ---------------------------------------------------------------
def test_revoking_an_access_token_kills_it(provider):
    provider.account("alice")
    client_id, secret = provider.client()
    token = _user_tokens(provider, client_id, secret)
    http = provider.http()
    assert _userinfo(http, token["access_token"]) == 200
    response = _revoke(http, client_id, secret, token["access_token"], token_type_hint="access_token")
    assert response.status_code == 200 and response.json() == {}
    assert _userinfo(http, token["access_token"]) == 401
    assert _introspect(http, client_id, secret, token["access_token"]).json() == {"active": False}


def test_revoking_a_refresh_token_kills_its_access_tokens(provider):
    provider.account("alice")
    client_id, secret = provider.client()
    token = _user_tokens(provider, client_id, secret)
    http = provider.http()
    assert _revoke(http, client_id, secret, token["refresh_token"], token_type_hint="refresh_token").status_code == 200
    _error(_refresh(http, client_id, secret, token["refresh_token"]), 400, "invalid_grant")
    assert _userinfo(http, token["access_token"]) == 401
    assert _introspect(http, client_id, secret, token["refresh_token"]).json() == {"active": False}


def test_refresh_tokens_end_with_their_grant_however_often_they_rotate(provider):
    """The refresh token lifetime counts from the login's code exchange: a rotated token says
    when it really ends (introspection), and no refresh makes the grant last longer."""
    provider.account("alice")
    client_id, secret = provider.client(refresh_token_lifetime=3600, access_token_lifetime=900)
    http = provider.http()
    start = provider.clock()
    token = _user_tokens(provider, client_id, secret)
    provider.clock.advance(3000)
    token = _refresh(http, client_id, secret, token["refresh_token"]).json()
    assert token["expires_in"] == 600  # the access token too ends with the grant
    for kind in ("refresh_token", "access_token"):
        assert _introspect(http, client_id, secret, token[kind]).json()["exp"] == int(start + 3600)
    provider.clock.advance(601)
    _error(_refresh(http, client_id, secret, token["refresh_token"]), 400, "invalid_grant")
    assert _introspect(http, client_id, secret, token["refresh_token"]).json() == {"active": False}


def test_a_wrong_type_hint_does_not_stop_revocation(provider):
    """RFC 7009 2.1: a server that cannot find the token by its hint searches further."""
    provider.account("alice")
    client_id, secret = provider.client()
    token = _user_tokens(provider, client_id, secret)
    http = provider.http()
    assert _revoke(http, client_id, secret, token["access_token"], token_type_hint="refresh_token").status_code == 200
    assert _userinfo(http, token["access_token"]) == 401


def test_revoking_an_unknown_token_is_200(provider):
    client_id, secret = provider.client()
    http = provider.http()
    for unknown in ("nothing-like-a-token", "abc.def"):
        response = _revoke(http, client_id, secret, unknown)
        assert response.status_code == 200 and response.json() == {}


def test_revocation_needs_client_authentication(provider):
    provider.account("alice")
    client_id, secret = provider.client()
    token = _user_tokens(provider, client_id, secret)
    http = provider.http()
    _error(_revoke(http, client_id, "wrong", token["access_token"]), 401, "invalid_client")
    _error(http.post("/revoke", data={"token": token["access_token"]}), 401, "invalid_client")
    assert _userinfo(http, token["access_token"]) == 200


def test_revoking_another_clients_token_is_refused_and_it_stays_valid(provider):
    provider.account("alice")
    owner, owner_secret = provider.client()
    other, other_secret = provider.client()
    token = _user_tokens(provider, owner, owner_secret)
    http = provider.http()
    # authlib refuses with invalid_grant ("issued to another client", RFC 6749 5.2).
    _error(_revoke(http, other, other_secret, token["access_token"]), 400, "invalid_grant")
    _error(_revoke(http, other, other_secret, token["refresh_token"]), 400, "invalid_grant")
    assert _userinfo(http, token["access_token"]) == 200
    assert _refresh(http, owner, owner_secret, token["refresh_token"]).status_code == 200


def test_public_client_revokes_its_own_refresh_token(provider):
    """Public clients (apps) must be able to log out their tokens too (RFC 7009 2.1)."""
    provider.account("alice")
    client_id, _ = provider.client(token_endpoint_auth_method="none")
    verifier, challenge = pkce()
    browser = provider.browser()
    code = browser.login(client_id, code_challenge=challenge, code_challenge_method="S256")["code"]
    token = redeem(browser.http, client_id, None, code, verifier).json()
    response = browser.http.post("/revoke", data={"token": token["refresh_token"], "client_id": client_id})
    assert response.status_code == 200
    assert _userinfo(browser.http, token["access_token"]) == 401


# -- introspection (RFC 7662) ------------------------------------------------------------
def test_introspection_describes_an_active_token(provider):
    provider.account("alice")
    client_id, secret = provider.client()
    token = _user_tokens(provider, client_id, secret)
    http = provider.http()
    response = _introspect(http, client_id, secret, token["access_token"])
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    info = response.json()
    sub = jwt.decode(token["id_token"], KeySet.import_key_set(http.get("/jwks").json())).claims["sub"]
    assert info["active"] is True
    assert info["client_id"] == client_id and info["sub"] == sub
    assert info["scope"] == "openid profile email"
    assert info["exp"] == int(provider.clock()) + 600
    assert info["token_type"] == "Bearer" and info["iss"] == provider.issuer
    refresh = _introspect(http, client_id, secret, token["refresh_token"], token_type_hint="refresh_token").json()
    assert refresh["active"] is True and refresh["sub"] == sub
    assert "token_type" not in refresh  # RFC 7662 2.2: an access token's type; a refresh token has none
    # RFC 7662 2.1: a hint the provider does not know widens the search, it is no error.
    other = _introspect(http, client_id, secret, token["refresh_token"], token_type_hint="urn:example:other").json()
    assert other["active"] is True and other["sub"] == sub


def test_a_disabled_accounts_tokens_introspect_inactive_and_cannot_refresh(provider):
    from idp.accounts import set_disabled

    account_id = provider.account("alice")
    client_id, secret = provider.client()
    token = _user_tokens(provider, client_id, secret)
    set_disabled(provider.svc, account_id, True)  # what the admin area and `idp users disable` do
    assert _introspect(provider.http(), client_id, secret, token["access_token"]).json() == {"active": False}
    _error(_refresh(provider.http(), client_id, secret, token["refresh_token"]), 400, "invalid_grant")


def test_a_code_issued_just_before_its_account_was_disabled_gets_no_tokens(provider):
    from idp.accounts import set_disabled

    account_id = provider.account("alice")
    client_id, secret = provider.client()
    browser = provider.browser()
    code = browser.login(client_id)["code"]
    set_disabled(provider.svc, account_id, True)
    _error(redeem(browser.http, client_id, secret, code), 400, "invalid_grant")
    set_disabled(provider.svc, account_id, False)
    _error(redeem(browser.http, client_id, secret, code), 400, "invalid_grant")  # spent all the same


@pytest.mark.parametrize("backend", ["postgres+redis"])
def test_an_account_disabled_before_its_mark_existed_is_refused_once_the_app_starts(settings_for):
    from idp.clock import FrozenClock
    from idp.storage.models import Account
    from idp.web.app import create_app
    from tests.harness import Provider

    settings, clock = settings_for(), FrozenClock()
    provider = Provider(create_app(settings, clock), clock)
    account_id = provider.account("alice")
    client_id, secret = provider.client()
    token = _user_tokens(provider, client_id, secret)
    # As an upgrade from a version without the marks leaves it: the flag in the database, no mark.
    with provider.svc.db.session() as session:
        session.get(Account, account_id).disabled = True
    assert _introspect(provider.http(), client_id, secret, token["access_token"]).json()["active"] is True

    restarted = Provider(create_app(settings, clock), clock)
    http = restarted.http()
    assert _introspect(http, client_id, secret, token["access_token"]).json() == {"active": False}
    _error(_refresh(http, client_id, secret, token["refresh_token"]), 400, "invalid_grant")


@pytest.mark.parametrize("backend", ["postgres+redis"])
def test_a_mark_lost_with_the_redis_data_is_written_again_while_the_app_runs(make_provider):
    from idp.accounts import disabled_mark
    from idp.storage.models import Account
    from tests import live

    provider = make_provider(disabled_marks_seconds=1)
    account_id = provider.account("alice")
    client_id, secret = provider.client()
    token = _user_tokens(provider, client_id, secret)
    # Disabled, and the mark lost, as a failover to a replica that lagged loses it (with the
    # end of the account's sessions, which would revoke this token on its own).
    with provider.svc.db.session() as session:
        session.get(Account, account_id).disabled = True
    assert _introspect(provider.http(), client_id, secret, token["access_token"]).json()["active"] is True
    with live.reserve() as (sock, url), live.serve(provider.app, sock, url):  # the app's lifespan runs
        deadline = time.monotonic() + 30
        while provider.svc.store.get(disabled_mark(account_id)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
    _error(_refresh(provider.http(), client_id, secret, token["refresh_token"]), 400, "invalid_grant")


@pytest.mark.parametrize("backend", ["sqlite+memory"])  # one SQLite file for both starts
def test_the_app_starts_while_redis_is_down_and_says_it_is_not_ready(settings_for):
    from idp.accounts import set_disabled
    from idp.clock import FrozenClock
    from idp.web.app import create_app
    from tests.harness import Provider
    from tests.servers import free_port

    clock = FrozenClock()
    first = Provider(create_app(settings_for(), clock), clock)
    set_disabled(first.svc, first.account("alice"), True)  # a mark to write at the next start
    down = settings_for(redis_url=f"redis://127.0.0.1:{free_port()}/0?socket_connect_timeout=1")
    http = Provider(create_app(down, clock), clock).http()
    answer = http.get("/readyz")
    assert answer.status_code == 503 and answer.json() == {"database": True, "store": False}


@contextlib.contextmanager
def _held(store, method: str):
    """Calls of ``store.method`` wait at its start until the block ends; yields the event
    set when the first one got there."""
    reached, resume, original = threading.Event(), threading.Event(), getattr(store, method)

    def held(*args):
        reached.set()
        resume.wait(10)
        return original(*args)

    setattr(store, method, held)
    try:
        yield reached
    finally:
        resume.set()


@pytest.mark.parametrize("backend", ["postgres+redis"])
def test_an_account_enabled_while_the_app_starts_keeps_no_mark(provider):
    from idp.accounts import disabled_mark, mark_disabled_accounts, set_disabled

    svc = provider.svc
    account_id = provider.account("alice")
    set_disabled(svc, account_id, True)
    with ThreadPoolExecutor(2) as pool:
        with _held(svc.store, "set_many") as writing:  # the start-up marking, between its read and its write
            marking = pool.submit(mark_disabled_accounts, svc)
            assert writing.wait(10)
            enabling = pool.submit(set_disabled, svc, account_id, False)
            time.sleep(0.3)
            assert not enabling.done()  # the enable waits for the marks to be written...
        assert marking.result() == 1 and enabling.result() is not None
    assert svc.store.get(disabled_mark(account_id)) is None  # ...and then deletes alice's


@pytest.mark.parametrize("backend", ["postgres+redis"])
def test_a_disable_racing_an_enable_leaves_the_mark_as_it_leaves_the_flag(provider):
    from idp.accounts import disabled_mark, set_disabled
    from idp.storage.models import Account

    svc = provider.svc
    account_id = provider.account("alice")
    set_disabled(svc, account_id, True)
    with ThreadPoolExecutor(2) as pool:
        with _held(svc.store, "delete") as deleting:  # the enable, caught as it removes the mark
            enabling = pool.submit(set_disabled, svc, account_id, False)
            assert deleting.wait(10)
            disabling = pool.submit(set_disabled, svc, account_id, True)
            time.sleep(0.3)  # the disable waits for the account's row...
        assert enabling.result() is not None and disabling.result() is not None
    with svc.db.session() as session:
        assert session.get(Account, account_id).disabled
    assert svc.store.get(disabled_mark(account_id)) is not None  # ...and its mark stands


def test_a_narrower_refresh_releases_only_its_scopes_claims(provider):
    provider.account("alice")
    client_id, secret = provider.client()
    http = provider.http()
    token = _user_tokens(provider, client_id, secret)  # openid profile email
    response = _refresh(http, client_id, secret, token["refresh_token"])
    keys = KeySet.import_key_set(http.get("/jwks").json())
    claims = jwt.decode(response.json()["id_token"], keys).claims
    assert claims["name"] == "Alice" and claims["email"] == "alice@example.tw"
    narrower = http.post("/token", data={"grant_type": "refresh_token", "refresh_token": response.json()["refresh_token"],
                                         "scope": "openid profile"}, auth=(client_id, secret))
    claims = jwt.decode(narrower.json()["id_token"], keys).claims
    assert narrower.json()["scope"] == "openid profile"
    assert claims["name"] == "Alice" and "email" not in claims and "email_verified" not in claims
    # The new refresh token keeps the scope of the one presented (RFC 6749 section 6).
    wider = _refresh(http, client_id, secret, narrower.json()["refresh_token"])
    assert wider.json()["scope"] == "openid profile email", wider.text


def test_another_client_learns_nothing_about_a_token(provider):
    provider.account("alice")
    owner, owner_secret = provider.client()
    other, other_secret = provider.client()
    token = _user_tokens(provider, owner, owner_secret)
    http = provider.http()
    for value in (token["access_token"], token["refresh_token"]):
        response = _introspect(http, other, other_secret, value)
        assert response.status_code == 200 and response.json() == {"active": False}


def test_expired_access_token_is_inactive(provider):
    provider.account("alice")
    client_id, secret = provider.client()
    token = _user_tokens(provider, client_id, secret)
    http = provider.http()
    provider.clock.advance(599)
    assert _introspect(http, client_id, secret, token["access_token"]).json()["active"] is True
    provider.clock.advance(2)  # beyond access_token_seconds = 600
    assert _introspect(http, client_id, secret, token["access_token"]).json() == {"active": False}
    assert _userinfo(http, token["access_token"]) == 401


def test_unknown_token_is_inactive(provider):
    client_id, secret = provider.client()
    response = _introspect(provider.http(), client_id, secret, "no-such-token")
    assert response.status_code == 200 and response.json() == {"active": False}


def test_public_client_cannot_introspect(provider):
    provider.account("alice")
    owner, owner_secret = provider.client()
    token = _user_tokens(provider, owner, owner_secret)
    public, _ = provider.client(token_endpoint_auth_method="none")
    http = provider.http()
    response = http.post("/introspect", data={"token": token["access_token"], "client_id": public})
    _error(response, 401, "invalid_client")
    _error(http.post("/introspect", data={"token": token["access_token"]}), 401, "invalid_client")


def test_introspection_request_without_token_is_invalid_request(provider):
    client_id, secret = provider.client()
    _error(provider.http().post("/introspect", data={}, auth=(client_id, secret)), 400, "invalid_request")
    _error(provider.http().post("/revoke", data={}, auth=(client_id, secret)), 400, "invalid_request")


@pytest.mark.parametrize("lives, later", [
    (3600, 20 * 60),  # a long-lived assertion, replayed once the store's default TTLs have run out
    (2, 61.5),  # 1.x s left: joserfc takes whole seconds, so it is good until exp + leeway + 1 s
])
def test_a_used_jti_is_remembered_as_long_as_its_assertion_is_good(provider, monkeypatch, lives, later):
    """RFC 7523 3 (7): a used jti is remembered for as long as its assertion is valid."""
    if provider.svc.settings.redis_url:
        pytest.skip("moves the in-process store's time; Redis keeps its own (the TTL logic is the same)")
    key = _key()
    client_id = _key_client(provider, key)
    assertion = _assertion(provider, key, client_id, exp=int(time.time()) + lives)
    http = provider.http()
    assert _with_assertion(http, assertion).status_code == 200
    real = time.monotonic
    monkeypatch.setattr(kv, "time", SimpleNamespace(monotonic=lambda: real() + later))  # the store's time moves on
    _error(_with_assertion(http, assertion), 400, "invalid_client")
