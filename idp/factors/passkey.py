"""Passkeys (SPEC A8): WebAuthn credentials, checked with py_webauthn.

- **Registered** on the login-settings pages (``idp.web.passkeys``), after the
  re-verification every settings page asks for (M2). Each passkey is a
  ``Binding`` (factor ``passkey``): several per account. ``external_id`` is the
  SHA-256 of the credential ID (IDs may be up to 1023 bytes, longer than the
  column); ``data`` keeps the ID, the COSE public key, the sign counter and the
  account's WebAuthn user handle (random, the same for all of an account's
  passkeys, never the account ID).
- **Second factor** after the password: the page asks for one of the
  account's own credentials (``allowCredentials``).
- **Passwordless** (``first``): the page asks for a discoverable credential
  (empty ``allowCredentials``); the credential names its account, and the
  user handle it returns must be the one registered with it.
- **User verification is required** both ways (the authenticator's PIN or
  biometric), so a passkey alone is two factors: something held and
  something known or been.
- **amr** ``["pop", "user"]`` (RFC 8176): ``pop`` is proof of possession of
  a key "unspecified whether hardware- or software-secured" — we ask for no
  attestation and synced passkeys live in a cloud keychain, so ``hwk`` would
  claim what we cannot know (and ``hwk`` earns the certificate level,
  ``idp.acr``); ``user`` is the authenticator's user check. The flow adds
  ``mfa``: a passkey login earns ``urn:idp:loa:2``, alone or after the
  password (``["pwd", "pop", "user", "mfa"]``), never ``loa:3``.
- **Challenges** are single-use and expire: kept in the store under the
  challenge itself with their owner (the login transaction, or the account
  session that registers) and taken atomically when the answer comes.
- **Sign counter and clones**: the signature is verified first; then a
  counter that does not go up (when either side counts) means two copies of
  the key exist. That passkey is suspended (refused until removed), and the
  event is audited (``passkey.cloned``).
- ``rp_id`` is the issuer's host; the expected origin is the issuer's origin.
  WebAuthn needs a secure context, so the factor is enabled only for an
  ``https`` issuer or one on ``localhost``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import secrets
from functools import partial
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool
from webauthn import (generate_authentication_options, generate_registration_options, options_to_json,
                      verify_authentication_response, verify_registration_response)
from webauthn.helpers import (bytes_to_base64url, base64url_to_bytes, decode_credential_public_key,
                              decoded_public_key_to_cryptography, parse_authentication_credential_json,
                              parse_client_data_json, parse_registration_credential_json)
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (AuthenticatorSelectionCriteria, PublicKeyCredentialDescriptor,
                                      ResidentKeyRequirement, UserVerificationRequirement)

from idp.factors import Outcome, locked_out
from idp.storage.models import Account, Binding
from idp.web.pages import who

CHALLENGE_SECONDS = 300
CHALLENGE_KEY = "passkey-challenge:"
MAX_CREDENTIAL_CHARS = 16 * 1024
TIMEOUT_MS = CHALLENGE_SECONDS * 1000
# What a malformed answer raises; py_webauthn reads JSON with ``json``, which deep nesting
# ("[[[[…") overflows into a RecursionError.
NOT_JSON = (WebAuthnException, ValueError, TypeError, KeyError, AttributeError, RecursionError)


def b64(data: bytes) -> str:
    return bytes_to_base64url(data)


def external_id(credential_id: bytes) -> str:
    return b64(hashlib.sha256(credential_id).digest())


def rp_id(svc) -> str:
    return urlsplit(svc.settings.issuer).hostname


def origin(svc) -> str:
    parts = urlsplit(svc.settings.issuer)
    return f"{parts.scheme}://{parts.netloc}"


def passkeys(account) -> list:
    return [b for b in account.bindings if b.factor == PASSKEY.name]


def usable(binding) -> bool:
    return not binding.data.get("cloned_at")


# -- challenges ------------------------------------------------------------------------
def issue_challenge(svc, owner: str, **extra) -> bytes:
    challenge = secrets.token_bytes(32)
    svc.store.set(CHALLENGE_KEY + b64(challenge), {"owner": owner, "exp": svc.clock() + CHALLENGE_SECONDS, **extra},
                  CHALLENGE_SECONDS + 60)
    return challenge


def take_challenge(svc, client_data_json: bytes, owner: str) -> tuple[bytes, dict] | None:
    """The challenge the browser signed and its record, once, for its owner, before it expires."""
    challenge = parse_client_data_json(client_data_json).challenge
    record = svc.store.take(CHALLENGE_KEY + b64(challenge))
    if record is None or record["exp"] < svc.clock() or not hmac.compare_digest(record["owner"].encode(), owner.encode()):
        return None
    return challenge, record


# -- registration (the settings page) ----------------------------------------------------
def user_handle(account) -> str:
    """The account's WebAuthn user handle: its passkeys' one, else a new random one."""
    return next((b.data["user_handle"] for b in passkeys(account)), None) or b64(secrets.token_bytes(32))


def registration_options(svc, account, owner: str, rp_name: str) -> str:
    handle = user_handle(account)
    options = generate_registration_options(
        rp_id=rp_id(svc), rp_name=rp_name, user_name=account.username, user_id=base64url_to_bytes(handle),
        user_display_name=account.name or account.username,
        challenge=issue_challenge(svc, owner, user_handle=handle), timeout=TIMEOUT_MS,
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.REQUIRED, user_verification=UserVerificationRequirement.REQUIRED),
        # One passkey per authenticator: the browser refuses to make a second one on it.
        exclude_credentials=[PublicKeyCredentialDescriptor(id=base64url_to_bytes(b.data["credential_id"]))
                             for b in passkeys(account)],
    )
    return options_to_json(options)


def register(svc, account_id: str, owner: str, credential: str, label: str) -> tuple[str | None, Binding | None]:
    """(error message key, None) or (None, the new binding) for a posted ``create()`` result."""
    if not credential or len(credential) > MAX_CREDENTIAL_CHARS:
        return "passkey.error.missing", None
    try:
        parsed = parse_registration_credential_json(credential)
        taken = take_challenge(svc, parsed.response.client_data_json, owner)
        if taken is None:
            return "passkey.error.challenge", None
        challenge, record = taken
        verified = verify_registration_response(credential=parsed, expected_challenge=challenge, expected_rp_id=rp_id(svc),
                                                expected_origin=origin(svc), require_user_verification=True)
        # With attestation "none" nothing has read the key yet: one no signature can match (a point
        # off the curve, an RSA modulus of 0) would count as a way in (M4) and never let anyone in.
        decoded_public_key_to_cryptography(decode_credential_public_key(verified.credential_public_key))
    except NOT_JSON:
        return "passkey.error.invalid", None
    now = dt.datetime.fromtimestamp(svc.clock(), dt.timezone.utc)
    try:
        with svc.db.session() as session:
            if session.execute(select(Binding.id).where(Binding.factor == PASSKEY.name,
                                                        Binding.external_id == external_id(verified.credential_id))).first():
                return "passkey.error.registered", None
            binding = Binding(account_id=account_id, factor=PASSKEY.name, external_id=external_id(verified.credential_id),
                              label=label, created_at=now, data={
                                  "credential_id": b64(verified.credential_id),
                                  "public_key": b64(verified.credential_public_key),
                                  "sign_count": verified.sign_count, "user_handle": record["user_handle"],
                                  "aaguid": verified.aaguid, "backed_up": verified.credential_backed_up,
                                  "transports": [t.value for t in parsed.response.transports or []],
                                  "last_used": None,
                              })
            session.add(binding)
            session.flush()
            session.expunge(binding)
    except IntegrityError:  # the same credential registered meanwhile (uq_binding_external)
        return "passkey.error.registered", None
    return None, binding


def remove(svc, account_id: str, binding_id: str, passwordless) -> tuple[str | None, Binding | None]:
    """(error message key, None) or (None, the removed binding) for one of the account's passkeys.

    ``passwordless(svc, bindings)`` says whether bindings let the account in without its
    password: with password login off, the passkey that is its last such way in stays
    (recovery refuses such accounts, so nothing else would let the owner back in)."""
    with svc.db.session() as session:
        # Locked, so that two removals (or a removal and turning password login off) see each other.
        account = session.execute(select(Account).where(Account.id == account_id).with_for_update()).scalar_one()
        binding = next((b for b in account.bindings if b.id == binding_id and b.factor == PASSKEY.name), None)
        if binding is None:
            return "passkey.error.not_found", None
        others = [b for b in account.bindings if b is not binding]
        if account.password_login_disabled and passwordless(svc, account.bindings) and not passwordless(svc, others):
            return "passkey.error.last_passwordless", None
        session.delete(binding)
        session.flush()
        session.expunge(binding)
        return None, binding


# -- login ---------------------------------------------------------------------------------
class PasskeyFactor:
    name = "passkey"
    amr = ["pop", "user"]
    first = True
    possession = True
    template = "factor_passkey.html"

    def enabled(self, svc) -> bool:
        parts = urlsplit(svc.settings.issuer)
        return parts.scheme == "https" or parts.hostname == "localhost"

    def bound(self, account) -> bool:
        return any(usable(b) for b in passkeys(account))

    def context(self, svc, tx, account) -> dict:
        allowed = [PublicKeyCredentialDescriptor(id=base64url_to_bytes(b.data["credential_id"]))
                   for b in passkeys(account) if usable(b)] if account else []
        options = generate_authentication_options(
            rp_id=rp_id(svc), challenge=issue_challenge(svc, "tx:" + tx["id"]), timeout=TIMEOUT_MS,
            allow_credentials=allowed, user_verification=UserVerificationRequirement.REQUIRED)
        return {"options": json.loads(options_to_json(options))}

    async def verify(self, request, svc, tx, form, account) -> Outcome:
        seen = {**who(request), "client_id": tx["client_id"], "method": self.name}
        credential = form.get("credential") or ""
        if not credential or len(credential) > MAX_CREDENTIAL_CHARS:
            return Outcome(error="passkey.error.missing")
        return await run_in_threadpool(self._check, svc, tx, credential, seen)

    def _check(self, svc, tx, credential: str, seen: dict) -> Outcome:
        known = tx.get("account")
        try:
            parsed = parse_authentication_credential_json(credential)
            taken = take_challenge(svc, parsed.response.client_data_json, "tx:" + tx["id"])
        except NOT_JSON:
            return self._failed(svc, known, tx.get("username"), "invalid", seen)
        if taken is None:
            return self._failed(svc, known, tx.get("username"), "challenge", seen)
        with svc.db.session() as session:  # the binding's row locked until its counter is written
            answer = self._judge(svc, session, tx, parsed, taken[0], seen)
        return answer()  # audited once the session's connection is back: never two from the pool at once

    def _judge(self, svc, session, tx, parsed, challenge: bytes, seen: dict):
        """The answer to give once the session has ended, as a function that audits it."""
        known = tx.get("account")
        binding = session.execute(
            select(Binding).where(Binding.factor == self.name, Binding.external_id == external_id(parsed.raw_id))
            .with_for_update()).scalar_one_or_none()
        if binding is None:
            return partial(self._failed, svc, known, tx.get("username"), "unknown", seen)
        account = session.get(Account, binding.account_id)
        if known and not hmac.compare_digest(known, account.id):
            return partial(self._failed, svc, known, tx["username"], "other_account", seen)
        failed = partial(self._failed, svc, account.id, account.username)
        # A discoverable credential names its user: it must be the handle registered with it.
        returned = parsed.response.user_handle
        if not known and (not returned or not hmac.compare_digest(b64(returned), binding.data["user_handle"])):
            return partial(failed, "user_handle", seen)
        if not usable(binding):
            return partial(failed, "suspended", seen)
        try:
            # The counter is compared below, after the signature is known to be good.
            verified = verify_authentication_response(
                credential=parsed, expected_challenge=challenge, expected_rp_id=rp_id(svc),
                expected_origin=origin(svc), credential_public_key=base64url_to_bytes(binding.data["public_key"]),
                credential_current_sign_count=0, require_user_verification=True)
        except NOT_JSON:
            return partial(failed, "invalid", seen)
        stored, now = binding.data.get("sign_count", 0), svc.clock()
        if (stored or verified.new_sign_count) and verified.new_sign_count <= stored:
            binding.data = {**binding.data, "cloned_at": now}

            def cloned():
                svc.audit.record("passkey.cloned", account_id=account.id, username=account.username, **seen,
                                 passkey=binding.label, stored_count=stored, sent_count=verified.new_sign_count)
                return failed("cloned", seen)
            return cloned
        binding.data = {**binding.data, "sign_count": verified.new_sign_count, "last_used": now}
        if until := svc.lockout.locked_until(account.username):
            return partial(locked_out, svc, until, account.id, account.username, seen)
        if account.disabled:
            def disabled():
                svc.audit.record("login.disabled", account_id=account.id, username=account.username, **seen)
                return Outcome(error="login.disabled")
            return disabled
        return partial(Outcome, account_id=account.id)

    def _failed(self, svc, account_id, username, reason: str, seen: dict) -> Outcome:
        """Audited when it concerns an account (the login's so far, or the credential's); one
        that names none is only counted (``idp_logins``): anyone may post those, with no
        captcha, and each audit row would be kept. Not counted towards the lockout: a
        signature cannot be guessed."""
        if account_id:
            svc.audit.record("login.failure", account_id=account_id, username=username or None, **seen, reason=reason)
        else:
            svc.metrics.login(self.name, "failure")
        return Outcome(error="passkey.error." + reason)


PASSKEY = PasskeyFactor()
