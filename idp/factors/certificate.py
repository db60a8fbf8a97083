"""Certificate login (SPEC A3): the MOICA citizen card, or an organisation card
(XCA/GCA) for AA accounts, signing through the HiPKI local component.

- The page gets a fresh challenge (``context``), single-use and bound to this
  login transaction, kept in the store with an expiry. The browser asks the
  component to sign it (``MakeSignature``, PKCS7, SHA256) with the card and
  its PIN, and posts the result here.
- ``verify`` takes the challenge atomically (a replayed signature finds it
  gone), verifies the signature, chain, validity, key usage and revocation
  (``idp.pki``), and finds the account bound to the certificate
  (issuer DN | subject serialNumber). A certificate is the first factor (it
  finds the account) or a further one (the account is already known).
- The amr is ``sc`` + ``pin``: two factors, so the flow adds ``mfa``; ``sc``
  earns the certificate level (``idp.acr``).
- A failure counts towards the account's lockout only when the account is
  known (the transaction has one, or the certificate is bound to one).
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from idp import bridge
from idp.factors import Outcome, locked_out, while_locked
from idp.pki import PKIError, verify_signature
from idp.storage.models import Account, Binding
from idp.web.pages import who

log = logging.getLogger("idp.pki")

CHALLENGE_SECONDS = 300
CHALLENGE_PREFIX = "idp-login:"
MAX_SIGNATURE_CHARS = 32 * 1024

# PKIError.code -> message key (certificate.json).
ERRORS = {
    "bad_format": "certificate.error.bad_format",
    "challenge_mismatch": "certificate.error.challenge",
    "signature_invalid": "certificate.error.signature",
    "untrusted": "certificate.error.untrusted",
    "expired": "certificate.error.invalid",
    "not_yet_valid": "certificate.error.invalid",
    "revoked": "certificate.error.invalid",
    "key_usage": "certificate.error.key_usage",
    "weak_key": "certificate.error.weak_key",
    "revocation_unavailable": "certificate.error.revocation_unavailable",
}
# What counts towards the lockout: a card shown for another account, an answer that does not sign
# this login's challenge (someone trying). An expired, revoked or untrusted card can never
# succeed: its owner trying it again must not lock the account out of its other factors.
COUNTED = {"other_account", "signature_invalid", "challenge_mismatch"}


def binding_id(identity) -> str:
    """What a certificate binding stores in ``external_id``: issuer DN | subject serialNumber
    (the MOICA card's). An organisation certificate without one binds by the certificate's
    own serial number: not by its organisation id, which every card of the organisation
    shares, so that any of them would log in to the account that bound one. A renewed card
    is bound again (M3), after a login with the account's OTP."""
    issuer, serial = identity.binding_key
    if serial:
        return f"{issuer}|{serial}"
    return f"{issuer}|cert:{identity.cert_serial:x}"


def component(svc) -> dict:
    """What the page needs to reach the HiPKI component on the user's PC (``IDP_HIPKI_URL``):
    its URL, the origins its popup may answer from (a loopback component is reached as
    ``localhost`` or ``127.0.0.1``), and those origins for the page's ``img-src``."""
    url = svc.settings.hipki_url.rstrip("/")
    origins = [url]
    for a, b in (("//localhost:", "//127.0.0.1:"), ("//127.0.0.1:", "//localhost:")):
        if a in url:
            origins.append(url.replace(a, b))
    return {"component": url, "component_origins": origins, "img_src": " ".join(origins)}


def account_kind(account) -> str:
    return "aa" if account.kind == "aa" else "personal"


# -- challenges ------------------------------------------------------------------------
def issue_challenge(svc, owner: str) -> str:
    """A fresh challenge for one page (``owner``: the login transaction or an account-area binding)."""
    challenge = CHALLENGE_PREFIX + secrets.token_urlsafe(24)
    svc.store.set("cert-challenge:" + challenge, {"owner": owner, "exp": svc.clock() + CHALLENGE_SECONDS},
                  CHALLENGE_SECONDS + 60)
    return challenge


def take_challenge(svc, challenge: str, owner: str) -> bool:
    """Use a challenge up: true once, for its owner, before it expires."""
    if not challenge.startswith(CHALLENGE_PREFIX) or len(challenge) > 100:
        return False
    record = svc.store.take("cert-challenge:" + challenge)
    return (record is not None and record["exp"] >= svc.clock()
            and hmac.compare_digest(record["owner"].encode(), owner.encode()))


def now_of(svc) -> dt.datetime:
    return dt.datetime.fromtimestamp(svc.clock(), dt.timezone.utc)


async def check_signature(svc, form, owner: str, kind: str | None):
    """(identity, None) or (None, (error code, message key)) for a posted MakeSignature result."""
    signature = (form.get("signature") or "").strip()
    challenge = form.get("challenge") or ""
    certb64 = (form.get("certb64") or "").strip() or None
    if not signature or len(signature) > MAX_SIGNATURE_CHARS or (certb64 and len(certb64) > MAX_SIGNATURE_CHARS):
        return None, ("bad_format", "certificate.error.missing")
    if not await bridge.run(take_challenge, svc, challenge, owner):
        return None, ("challenge_expired", "certificate.error.challenge")
    try:
        identity = await verify_signature(signature, challenge.encode(), certificate=certb64, trust=svc.pki_trust,
                                          revocation=svc.revocation, now=now_of(svc), kind=kind)
    except PKIError as exc:
        log.info("certificate refused (%s): %s", exc.code, exc)
        return None, (exc.code, ERRORS.get(exc.code, "certificate.error.signature"))
    return identity, None


class CertificateFactor:
    name = "certificate"
    amr = ["sc", "pin"]
    first = True
    possession = True
    template = "factor_certificate.html"

    def enabled(self, svc) -> bool:
        return True

    def bound(self, account) -> bool:
        return any(b.factor == self.name for b in account.bindings)

    def context(self, svc, tx, account) -> dict:
        return {"challenge": issue_challenge(svc, "tx:" + tx["id"]), **component(svc)}

    async def verify(self, request, svc, tx, form, account) -> Outcome:
        return await self.login(request, svc, tx, lambda kind: check_signature(svc, form, "tx:" + tx["id"], kind))

    async def login(self, request, svc, tx, check) -> Outcome:
        """The account a proven certificate is bound to: lockout, binding and kind rules.
        ``check(kind)`` -> (identity, error) proves it (here a card's signature; the TLS
        client-certificate mode: a proxy's handshake)."""
        seen = {**who(request), "client_id": tx["client_id"], "method": self.name}
        known = tx.get("account")
        if known:
            if (locked := await svc.db.call(while_locked, svc, known, tx["username"], seen)) is not None:
                return locked
            kind = await run_in_threadpool(_kind_of, svc, known)
        else:
            kind = None
        identity, error = await check(kind)
        if error is not None:
            return await svc.db.call(self._failed, svc, known, tx.get("username"), error, seen)
        account = await run_in_threadpool(_bound_account, svc, binding_id(identity))
        if account is None:
            await svc.db.call(svc.audit.record, "login.failure", account_id=known, username=tx.get("username") or None,
                              **seen, reason="unbound", certificate=binding_id(identity))
            return Outcome(error="certificate.error.unbound")
        if known and not hmac.compare_digest(known, account.id):
            return await svc.db.call(self._failed, svc, known, tx["username"],
                                     ("other_account", "certificate.error.other_account"), seen)
        if (locked := await svc.db.call(while_locked, svc, account.id, account.username, seen)) is not None:
            return locked
        if account_kind(account) not in identity.kinds:
            return await svc.db.call(self._failed, svc, account.id, account.username,
                                     ("wrong_kind", "certificate.error.wrong_kind"), seen)
        if account.disabled:
            await svc.db.call(svc.audit.record, "login.disabled", account_id=account.id, username=account.username, **seen)
            return Outcome(error="login.disabled")
        return Outcome(account_id=account.id)  # nothing counted (a refusal only); the login's end clears the count

    # The lockout's store and the audit log are reached through ``svc.db.call``, never on the
    # event loop itself: a stream of refused certificates must not stall other requests.
    @staticmethod
    def _failed(svc, account_id, username, error, seen) -> Outcome:
        code, key = error
        svc.audit.record("login.failure", account_id=account_id, username=username or None, **seen,
                         reason=code)
        if not account_id or code not in COUNTED:
            return Outcome(error=key)
        lockout = svc.lockout
        attempt = lockout.reserve(username)
        if attempt >= lockout.threshold:
            return locked_out(svc, lockout.lock(username), account_id, username, seen)
        return Outcome(error=key)


def _kind_of(svc, account_id) -> str | None:
    with svc.db.session() as session:
        account = session.get(Account, account_id)
        return account_kind(account) if account else None


def _bound_account(svc, external_id: str) -> Account | None:
    with svc.db.session() as session:
        binding = session.execute(
            select(Binding).where(Binding.factor == CertificateFactor.name, Binding.external_id == external_id)
        ).scalar_one_or_none()
        if binding is None:
            return None
        account = session.get(Account, binding.account_id)
        session.expunge(account)
        return account


CERTIFICATE = CertificateFactor()


# -- binding (M1 at login, M3 in the settings) ------------------------------------------------
async def bind_card(svc, form, owner: str, account):
    """Bind the card that signed ``owner``'s challenge (``form``: the posted MakeSignature
    result) to ``account``: (identity, error or None, whether an older card was replaced)."""
    identity, error = await check_signature(svc, form, owner, None)
    if error is None and account_kind(account) not in identity.kinds:
        error = ("wrong_kind", "certificate.error.wrong_kind")
    if error is not None:
        return identity, error, False
    error, replaced = await run_in_threadpool(bind, svc, account.id, identity)
    return identity, error, replaced


def bind(svc, account_id: str, identity):
    """(error or None, whether an older certificate was replaced)."""
    external_id = binding_id(identity)
    elsewhere = ("bound_elsewhere", "certificate.bind.elsewhere")
    try:
        with svc.db.session() as session:
            account = session.get(Account, account_id, with_for_update=True)  # one rebind at a time (as Google's)
            owner = session.execute(select(Binding.account_id).where(
                Binding.factor == CERTIFICATE.name, Binding.external_id == external_id)).scalar_one_or_none()
            if owner is not None and owner != account_id:
                return elsewhere, False
            if account.national_id and identity.id_last4 and account.national_id[-4:] != identity.id_last4:
                return ("id_mismatch", "certificate.bind.id_mismatch"), False
            old = session.execute(select(Binding).where(
                Binding.account_id == account_id, Binding.factor == CERTIFICATE.name)).scalars().all()
            for binding in old:
                session.delete(binding)  # the old card stops working (rebind after a card is replaced)
            session.flush()
            session.add(Binding(
                account_id=account_id, factor=CERTIFICATE.name, external_id=external_id,
                label=f"{identity.subject_cn or ''} {identity.subject_serial_number}".strip(),
                data={"issuer": identity.issuer_dn, "serial_number": identity.subject_serial_number,
                      "cert_serial": str(identity.cert_serial), "fingerprint": identity.fingerprint_sha256,
                      "not_after": identity.not_after.isoformat(), "anchor_set": identity.anchor_set},
            ))
            return None, bool(old)
    except IntegrityError:  # bound elsewhere meanwhile (uq_binding_external)
        return elsewhere, False
