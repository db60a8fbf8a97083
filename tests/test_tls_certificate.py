"""TLS client-certificate login for managed desktops (issue 4): the provider on uvicorn
behind Debian's nginx, which runs ``deploy/nginx/client-cert.conf`` as shipped
(``ssl_verify_client optional`` against the test PKI's CAs) with the header lines its
comments give for the http block, and reaches the provider from 127.0.0.2, the one
address in ``IDP_TRUSTED_PROXIES``. The client is httpx
presenting the test PKI's citizen certificate in the TLS handshake.

One PKI, one nginx and one provider for the module (SQLite, the in-process store).
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from joserfc import jwt
from joserfc.jwk import KeySet

from idp.settings import Settings
from idp.storage.models import AuditEvent
from idp.web.app import create_app
from tests import live, servers
from tests.harness import PASSWORD, REDIRECT, callback, forms, redeem
from tests.test_e2e import INSTALL_HINT, LiveProvider

try:  # the project depends on httpx2; plain httpx has the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

ROOT = Path(__file__).resolve().parent.parent
INCLUDE = ROOT / "deploy" / "nginx" / "client-cert.conf"
NGINX = "/usr/sbin/nginx"
PROXY = "127.0.0.2"  # nginx's source address towards the provider
HEADER = "X-SSL-Client-Cert"
LOA3 = "urn:idp:loa:3"


NGINX_CONF = """\
daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    map $ssl_client_verify $idp_client_cert {{
        NONE "";
        default $ssl_client_escaped_cert;
    }}
    proxy_set_header X-SSL-Client-Cert $idp_client_cert;
    proxy_set_header Host $http_host;
    proxy_set_header X-Forwarded-For $remote_addr;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate server.pem;
        ssl_certificate_key server.key;
        include {include};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_bind {proxy};
        }}
        location @idp {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_bind {proxy};
        }}
    }}
}}
"""


@pytest.fixture(scope="module")
def site(tpki, tmp_path_factory):
    """(provider, nginx URL): the provider trusts only nginx's address for the header."""
    if not Path(NGINX).exists():
        pytest.fail(f"{NGINX} is missing. {INSTALL_HINT}", pytrace=False)
    conf = tmp_path_factory.mktemp("nginx")
    servers.server_certificate(conf)  # server.pem, server.key
    trust = tpki.dir / "trust"
    (conf / "client-ca.pem").write_bytes(b"".join((trust / f).read_bytes() for f in ("root.pem", "moica.pem", "xca.pem")))
    port = servers.free_port()
    url = f"https://localhost:{port}"
    with live.reserve() as (sock, upstream):
        (conf / "nginx.conf").write_text(NGINX_CONF.format(
            dir=conf, port=port, include=INCLUDE, upstream=upstream.rsplit(":", 1)[1], proxy=PROXY))
        settings = Settings.from_env(
            {}, issuer=url, database_url=f"sqlite:///{conf}/idp.sqlite3", redis_url="", keys_dir=str(conf / "keys"), crl_cache_dir=str(conf / "crl"),
            captcha="off", mfa=False, trust_dir=str(trust), client_cert_header=HEADER,
            trusted_proxies=f"{PROXY}/32", secure_cookies=False)  # the forged requests come over plain HTTP
        app = create_app(settings)
        with live.serve(app, sock, upstream) as server:
            nginx = subprocess.Popen([NGINX, "-c", str(conf / "nginx.conf"), "-p", str(conf)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                _wait_for(port, nginx, conf)
                provider = LiveProvider(app, server)
                provider.upstream = upstream
                provider.account("alice", national_id="A123456789")  # the test citizen's last four digits
                yield provider, url
            finally:
                nginx.terminate()
                nginx.wait(timeout=10)
        app.state.svc.db.engine.dispose()


def _wait_for(port: int, nginx: subprocess.Popen, conf: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if nginx.poll() is not None:
            log = (conf / "error.log").read_text() if (conf / "error.log").exists() else ""
            pytest.fail(f"nginx exited: {nginx.stdout.read().decode()}\n{log}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail("nginx did not listen within 15 s")


class Desktop:
    """A browser on a managed desktop: cookies of its own, talking TLS to nginx,
    presenting ``card``'s certificate from the test PKI (or none)."""

    def __init__(self, tpki, url: str, card: str | None, conf_dir: Path | None = None):
        context = ssl.create_default_context(cafile=str(Path(conf_dir) / "server.pem")) if conf_dir else None
        if card:
            leaves = tpki.dir / "leaves"
            context.load_cert_chain(leaves / f"{card}.pem", leaves / f"{card}.key.pem")
        self.http = httpx.Client(base_url=url, verify=context if context else False, timeout=30)
        self.url = url

    def go(self, path: str, method: str = "GET", data=None, headers=None):
        response = self.http.request(method, path, data=data, headers=headers)
        while response.status_code in (302, 303) and response.headers["location"].startswith(("/", self.url)):
            response = self.http.get(response.headers["location"], headers=headers)
        return response

    def submit(self, page, action: str, headers=None, **fields):
        form = next(f for f in forms(page.text) if f["method"] == "post" and action in f["action"])
        return self.go(form["action"], "POST", {**form["fields"], **fields}, headers)

    def authorize(self, client_id: str, headers=None):
        params = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT,
                  "scope": "openid profile", "state": "s", "nonce": "n"}
        return self.go(str(self.http.build_request("GET", "/authorize", params=params).url), headers=headers)


@pytest.fixture(scope="module")
def desktop(tpki, site):
    provider, url = site
    conf = Path(provider.svc.settings.keys_dir).parent
    return lambda card="citizen", via=url: Desktop(tpki, via, card, conf if via.startswith("https") else None)


def _error(page) -> str:
    found = re.search(r'<div class="error" role="alert">\s*<p>(.*?)</p>', page.text, re.S)
    return found.group(1) if found else ""


def _tls_page(person, client_id, headers=None):
    page = person.authorize(client_id, headers)
    assert page.status_code == 200 and "factor=tls_certificate" in page.text  # the link on the login page
    tx = re.search(r'name="tx" value="([^"]+)"', page.text).group(1)
    page = person.go(f"/login?tx={tx}&factor=tls_certificate", headers=headers)
    assert 'action="/login/factor/tls_certificate"' in page.text
    return page


def _bind_the_card(tpki, person) -> None:
    """Log in with the password and bind the card at /account/certificate (HiPKI signature)."""
    page = person.go("/account")
    page = person.submit(page, "/login/factor/password", username="alice", password=PASSWORD)
    page = person.go("/account/certificate")
    challenge = re.search(r'name="challenge" value="([^"]+)"', page.text).group(1)
    page = person.submit(page, "/account/certificate", signature=tpki.make_signature("citizen", challenge.encode()))
    assert re.search(r'<tr data-method="certificate">.*?✓', page.text, re.S), page.text[:2000]


def test_a_bound_card_logs_in_through_nginx_with_its_tls_certificate(site, tpki, desktop):
    provider, url = site
    client_id, secret = provider.client()
    _bind_the_card(tpki, desktop(card=None))

    person = desktop("citizen")
    page = person.submit(_tls_page(person, client_id), "/login/factor/tls_certificate")
    code = callback(page)["code"]
    token = redeem(person.http, client_id, secret, code).json()
    claims = jwt.decode(token["id_token"], KeySet.import_key_set(person.http.get("/jwks").json())).claims
    assert claims["acr"] == LOA3 and claims["amr"] == ["sc", "pin", "mfa"]
    with provider.svc.db.session() as session:
        success = session.query(AuditEvent).filter_by(event="login.success").order_by(AuditEvent.id.desc()).first()
        # The desktop's address (X-Forwarded-For from the trusted proxy), not nginx's 127.0.0.2.
        assert success.method == "tls_certificate" and success.ip == "127.0.0.1"


def test_the_header_from_an_address_that_is_no_proxy_is_ignored_and_logged(site, tpki, desktop, caplog):
    provider, _ = site
    client_id, _ = provider.client()
    forged = {HEADER: quote(tpki.cert("citizen").public_bytes(serialization.Encoding.PEM).decode(), safe="")}
    person = desktop(card=None, via=provider.upstream)  # straight to uvicorn, from 127.0.0.1
    with caplog.at_level(logging.WARNING, logger="idp.pki"):
        page = person.submit(_tls_page(person, client_id, forged), "/login/factor/tls_certificate", forged)
    assert page.status_code == 200 and "未出示憑證" in _error(page)
    assert any(HEADER in r.getMessage() and "127.0.0.1" in r.getMessage() for r in caplog.records)


def test_a_header_sent_by_the_browser_itself_never_passes_nginx(site, tpki, desktop):
    provider, _ = site
    client_id, _ = provider.client()
    forged = {HEADER: quote(tpki.cert("citizen").public_bytes(serialization.Encoding.PEM).decode(), safe="")}
    person = desktop(card=None)  # through nginx, but no certificate in the handshake
    page = person.submit(_tls_page(person, client_id, forged), "/login/factor/tls_certificate", forged)
    assert page.status_code == 200 and "未出示憑證" in _error(page)


def test_a_revoked_card_gets_the_certificate_invalid_message(site, desktop):
    provider, _ = site
    client_id, _ = provider.client()
    person = desktop("revoked_crl")  # nginx accepts the chain; the provider's CRL check refuses it
    page = person.submit(_tls_page(person, client_id), "/login/factor/tls_certificate")
    assert page.status_code == 200 and "憑證無效" in _error(page)


def test_a_card_whose_chain_nginx_refuses_still_gets_the_provider_and_its_message(site, tpki, desktop):
    """A forged card (MOICA's name, another key): nginx's own answer would be a bare 400 on
    every page while the browser keeps choosing it; the provider's pages come instead, its
    password login works, and the certificate step says why the card is refused."""
    provider, _ = site
    client_id, _ = provider.client()
    person = desktop("forged")
    page = person.submit(_tls_page(person, client_id), "/login/factor/tls_certificate")
    assert page.status_code == 200 and "不是本服務接受的憑證機構" in _error(page)
    page = person.authorize(client_id)
    page = person.submit(page, "/login/factor/password", username="alice", password=PASSWORD)
    assert "code" in callback(page)


def test_a_malformed_trusted_proxy_list_stops_the_start(tmp_path):
    settings = Settings.from_env({}, database_url=f"sqlite:///{tmp_path}/idp.sqlite3", keys_dir=str(tmp_path / "keys"),
                                 trusted_proxies="127.0.0.2/32, nginx.internal")
    with pytest.raises(ValueError, match="IDP_TRUSTED_PROXIES: 'nginx.internal' is not an address or CIDR network"):
        create_app(settings)


def test_the_shipped_client_ca_bundle_is_the_trust_directory():
    """deploy/nginx/client-ca.pem asks browsers for the certificates the provider trusts."""
    trust = ROOT / "keys" / "trust"
    bundle = x509.load_pem_x509_certificates((INCLUDE.parent / "client-ca.pem").read_bytes())
    anchors = [c for f in sorted(trust.glob("*.pem")) for c in x509.load_pem_x509_certificates(f.read_bytes())]
    assert {c.fingerprint(hashes.SHA256()) for c in bundle} == {c.fingerprint(hashes.SHA256()) for c in anchors}
