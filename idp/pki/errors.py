"""Why a certificate login was refused, as exceptions with a stable ``code``.

The web layer maps ``exc.code`` to the seed's messages; the text of the
exception is for logs only (it may name certificates, never shown to users).
"""

from __future__ import annotations


class PKIError(Exception):
    code = "pki_error"


class BadFormat(PKIError):
    """Not a CMS SignedData / PKCS#1 signature we understand, or a bad certificate."""

    code = "bad_format"


class ChallengeMismatch(PKIError):
    """The signed content is not this login's challenge (replay, another tab)."""

    code = "challenge_mismatch"


class SignatureInvalid(PKIError):
    """messageDigest or the signature itself does not check out (tampered)."""

    code = "signature_invalid"


class Untrusted(PKIError):
    """No valid path to an anchor set that serves this kind of account."""

    code = "untrusted"


class Expired(PKIError):
    """The certificate (or a CA in its path) has expired at ``now``."""

    code = "expired"


class NotYetValid(PKIError):
    code = "not_yet_valid"


class KeyUsage(PKIError):
    """The key is not a signing key (e.g. the card's encryption certificate)."""

    code = "key_usage"


class WeakKey(PKIError):
    """The key is too weak, or of a kind no CA the provider trusts issues (RSA under 2048 bits)."""

    code = "weak_key"


class Revoked(PKIError):
    code = "revoked"


class RevocationUnavailable(PKIError):
    """No trustworthy revocation answer and the policy is hard-fail."""

    code = "revocation_unavailable"
