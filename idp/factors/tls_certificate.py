"""TLS client-certificate login for managed desktops (issue 4; SPEC A3's alternative).

The desktop's browser presents the card's certificate in the TLS handshake to a
terminating proxy (nginx, ``deploy/nginx/client-cert.conf``), whose handshake
proves the browser holds the key, and which forwards the certificate as
URL-escaped PEM in the header named by ``IDP_CLIENT_CERT_HEADER``, whatever its
own chain check found (a refused one would get nginx's bare 400, not this
login's message). The provider believes that header only
from a socket peer in ``IDP_TRUSTED_PROXIES`` (anyone else's is ignored and
logged), then applies exactly the card login's rules: the path to a pinned
issuing CA, key usage and revocation (``idp.pki.verify_certificate``), and the
certificate binding, lockout and account-kind rules (``CertificateFactor.login``).
It binds nothing of its own: a card bound at ``/account/certificate`` logs in
either way.

Decisions:

- **amr** ``["sc", "pin"]`` (RFC 8176), as the card login. What the provider
  learns is that the TLS handshake was signed with the certificate's key; the
  anchor sets pin CAs that issue keys only on smart cards (MOICA, XCA/GCA), so
  the key is the card's (``sc``), and the card signs only after its PIN was
  verified (``pin``). The PIN is typed to the desktop's card middleware, which
  may keep the card unlocked for a while: on a managed desktop that is the
  operator's policy. A trust directory used for this mode must therefore pin
  card-only CAs: a CA that issues software keys would make ``sc`` a lie.
- **acr** ``urn:idp:loa:3`` (``sc`` is a certificate method in ``idp.acr``),
  and ``mfa``: two methods, as the card login.
- The form's button is a POST with the CSRF token, so a page elsewhere cannot
  log a desktop in by making its browser fetch a URL.
"""

from __future__ import annotations

import logging
from urllib.parse import unquote

from idp.factors import Outcome
from idp.factors.certificate import CERTIFICATE, ERRORS, CertificateFactor, now_of
from idp.pki import PKIError, verify_certificate
from idp.web.pages import who
from idp.web.proxies import from_trusted_proxy, peer

log = logging.getLogger("idp.pki")

MAX_PEM_CHARS = 16 * 1024


def presented(request, svc) -> str | None:
    """The PEM the trusted proxy forwarded, or None (no certificate, or not from a proxy)."""
    header = svc.settings.client_cert_header
    value = request.headers.get(header) if header else None
    if not value:
        return None
    if not from_trusted_proxy(request):
        log.warning("%s header from %s ignored: not in IDP_TRUSTED_PROXIES", header, peer(request))
        return None
    return unquote(value[:MAX_PEM_CHARS])


class TlsCertificateFactor(CertificateFactor):
    name = "tls_certificate"
    amr = ["sc", "pin"]
    first = True
    possession = True
    template = "factor_tls_certificate.html"

    def enabled(self, svc) -> bool:
        return bool(svc.settings.client_cert_header)

    def bound(self, account) -> bool:
        return CERTIFICATE.bound(account)

    def context(self, svc, tx, account) -> dict:
        return {}

    async def verify(self, request, svc, tx, form, account) -> Outcome:
        pem = presented(request, svc)
        if pem is None:
            await svc.db.call(svc.audit.record, "login.failure", account_id=tx.get("account"),
                              username=tx.get("username") or None, **who(request), client_id=tx["client_id"],
                              method=self.name, reason="no_certificate")
            return Outcome(error="tls_certificate.none")

        async def check(kind):
            try:
                return await verify_certificate(pem, trust=svc.pki_trust, revocation=svc.revocation,
                                                now=now_of(svc), kind=kind), None
            except PKIError as exc:
                log.info("TLS client certificate refused (%s): %s", exc.code, exc)
                return None, (exc.code, ERRORS.get(exc.code, "certificate.error.bad_format"))

        return await self.login(request, svc, tx, check)


TLS_CERTIFICATE = TlsCertificateFactor()
