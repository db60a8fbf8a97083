"""Named errors of the mobile-ID connector, each with a stable ``code``.

The service's own ``error_code`` (when there is one) is kept in
``service_code``; ``from_service`` maps it to one of these classes.
"""

from __future__ import annotations


class MobileIdError(Exception):
    code = "mobileid.error"
    message = "The mobile ID service could not complete the request."

    def __init__(self, detail: str | None = None, *, service_code: str | None = None):
        self.detail = detail or self.message
        self.service_code = service_code
        super().__init__(f"{self.code}: {self.detail}" + (f" [{service_code}]" if service_code else ""))


class ServiceUnavailable(MobileIdError):
    code = "mobileid.unavailable"
    message = "The mobile ID service did not answer."


class ServiceError(MobileIdError):
    """A service error code this connector has no name for."""
    code = "mobileid.service_error"


class InvalidRequest(MobileIdError):
    code = "mobileid.invalid_request"
    message = "The request to the mobile ID service was not valid."


class SpChecksumRejected(MobileIdError):
    """The service refused our sp_checksum: wrong key or service id in the settings."""
    code = "mobileid.sp_checksum_rejected"
    message = "The mobile ID service refused this provider's checksum (check the key)."


class Expired(MobileIdError):
    code = "mobileid.expired"
    message = "The time to confirm on the phone has run out."


class AlreadyUsed(MobileIdError):
    code = "mobileid.already_used"
    message = "This request has already been answered."


class Denied(MobileIdError):
    code = "mobileid.denied"
    message = "The request was declined on the phone."


class IdpChecksumInvalid(MobileIdError):
    """The service's answer is not authenticated by its idp_checksum."""
    code = "mobileid.idp_checksum_invalid"
    message = "The answer of the mobile ID service failed its integrity check."


class BadSignature(MobileIdError):
    code = "mobileid.bad_signature"
    message = "The signature from the phone does not verify."


class UntrustedCertificate(MobileIdError):
    code = "mobileid.untrusted_certificate"
    message = "The certificate from the phone is not issued by a trusted authority."


class CertificateInvalid(MobileIdError):
    """Expired, not yet valid or revoked: the card login's "certificate invalid"."""
    code = "mobileid.certificate_invalid"
    message = "The certificate from the phone is expired or revoked."


class RevocationUnavailable(MobileIdError):
    """No trustworthy revocation answer and ``IDP_REVOCATION`` is hard-fail."""
    code = "mobileid.revocation_unavailable"
    message = "Whether the certificate from the phone is revoked cannot be checked now."


class IdentityMismatch(MobileIdError):
    code = "mobileid.identity_mismatch"
    message = "The answer is for a different person than the one asked."


# The service's codes (PROTOCOLS.md section 3). "Not yet" codes are not errors.
PENDING_CODES = frozenset({"20002", "20003", "SPTKTID_TXNLOG_NF"})
SERVICE_CODES: dict[str, type[MobileIdError]] = {
    "SPTKT_OVD": Expired,
    "SPTKTID_SPTKT_RDM": AlreadyUsed,
    "APP_USER_CANCEL": Denied,
}


def from_service(error_code: str, error_message: str | None) -> MobileIdError:
    if error_code.endswith("INV_SP_CHECKSUM"):  # SP-API-ATH-01-INV_SP_CHECKSUM and its siblings
        cls = SpChecksumRejected
    elif "-INV_" in error_code:
        cls = InvalidRequest
    else:
        cls = SERVICE_CODES.get(error_code, ServiceError)
    return cls(error_message or None, service_code=error_code)
