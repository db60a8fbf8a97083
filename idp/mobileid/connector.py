"""Connector for the Ministry of the Interior's mobile-ID service (TW FidO).

Shape from PROTOCOLS.md section 3. One login is one ``Ticket``:

    ticket = await connector.request_push(national_id)     # push to the bound phone
    ticket = await connector.get_sp_ticket(national_id)    # or a QR code (I-SCAN)
    result = await connector.get_result(ticket)            # Pending or Verified

The connector keeps no state of its own: ``Ticket`` (``to_dict``/``from_dict``)
carries what a later poll needs, including when it last polled, so the login
flow stores it with its transaction and any process can poll. Polls closer than
``poll_interval`` (>= 4 s) answer ``Pending`` without calling the service.
A result is returned only when its idp_checksum, the holder's signature over
our sign_data, the certificate (path to a pinned MOICA issuer, key usage and
revocation: ``idp.pki``, the card login's own validator) and the identity all
check out, and the ticket has not expired; anything else raises a named
``MobileIdError``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hmac
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from idp import pki
from idp.clock import Clock
from idp.mobileid import checksum
from idp.mobileid import errors as e
from idp.mobileid.config import TIME_LIMIT_RANGE, MobileIdConfig

try:  # the project depends on httpx2; plain httpx has the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

GET_SP_TICKET = "getSpTicket"
REQUEST_PUSH = "requestAthOrSignPush"
GET_RESULT = "getAthOrSignResult"
OP_MODES = ("I-SCAN", "APP2APP", "MWEB2APP")


@dataclass
class Ticket:
    transaction_id: str
    sp_ticket: str          # what the QR code encodes
    sp_ticket_id: str
    op_code: str
    op_mode: str            # "PUSH" for requestAthOrSignPush
    expires_at: float       # epoch seconds: the earlier of the service's and ours
    hashed_id_num: str
    national_id: str
    sign_data: str
    tbs_encoding: str = "base64"
    last_polled_at: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Ticket":
        return cls(**data)


@dataclass(frozen=True)
class Pending:
    retry_after: float      # seconds until the next poll reaches the service
    service_code: str | None = None


@dataclass(frozen=True)
class Verified:
    national_id: str
    transaction_id: str
    hashed_id_num: str
    identity: pki.CertificateIdentity = field(repr=False)  # the holder's certificate, verified
    signed_response: str = field(repr=False, default="")

    @property
    def name(self) -> str | None:
        return self.identity.subject_cn

    @property
    def card_serial(self) -> str | None:
        return self.identity.subject_serial_number


def new_sign_data() -> str:
    """A fresh challenge: 32 random bytes, base64 (tbs_encoding "base64")."""
    return base64.b64encode(os.urandom(32)).decode()


def signed_bytes(sign_data: str, tbs_encoding: str) -> bytes:
    if tbs_encoding.lower() == "base64":
        return base64.b64decode(sign_data)
    return sign_data.encode("utf-8")


def decode_ticket(sp_ticket: str) -> dict:
    """The JSON inside ``B64URL(json).B64URL(SHA256(first part))``."""
    head = sp_ticket.split(".", 1)[0]
    try:
        return json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error) as exc:
        raise e.ServiceError(f"unreadable sp_ticket: {exc}") from None


# idp.pki refusals -> this package's errors (the signature is over our sign_data: PKCS#1).
PKI_ERRORS: dict[str, type[e.MobileIdError]] = {
    "bad_format": e.BadSignature, "signature_invalid": e.BadSignature, "challenge_mismatch": e.BadSignature,
    "untrusted": e.UntrustedCertificate, "key_usage": e.UntrustedCertificate, "weak_key": e.UntrustedCertificate,
    "expired": e.CertificateInvalid, "not_yet_valid": e.CertificateInvalid, "revoked": e.CertificateInvalid,
    "revocation_unavailable": e.RevocationUnavailable,
}


class MobileIdConnector:
    """``trust`` and ``revocation``: the ``idp.pki`` anchor sets (a set serving personal
    accounts must pin the holder's issuer, MOICA) and revocation checker (CRL cache, policy)."""

    def __init__(self, config: MobileIdConfig, *, trust: pki.TrustStore, revocation: pki.RevocationChecker,
                 http: httpx.AsyncClient | None = None, clock: Callable[[], float] | None = None):
        self.config = config
        self.clock = clock or Clock()
        self.http = http or httpx.AsyncClient(timeout=config.timeout)
        self._own_http = http is None
        self.trust, self.revocation = trust, revocation

    async def aclose(self) -> None:
        if self._own_http:
            await self.http.aclose()

    # -- starting a request ---------------------------------------------------------------
    async def get_sp_ticket(self, national_id: str, sign_data: str | None = None, *, op_mode: str = "I-SCAN",
                            op_code: str = "ATH", hint: str | None = None, time_limit: int | None = None) -> Ticket:
        """A ticket for the QR code (I-SCAN) or an app link (APP2APP, MWEB2APP)."""
        if op_mode not in OP_MODES:
            raise ValueError(f"op_mode is one of {OP_MODES}")
        body = self._start_body(national_id, sign_data, op_code, hint, time_limit)
        body["op_mode"] = op_mode
        body["sp_checksum"] = self._checksum(body["transaction_id"], body["sp_service_id"], body["id_num"],
                                             op_code, op_mode, body["hint"], body["sign_info"]["sign_data"])
        return await self._start(GET_SP_TICKET, body, op_mode)

    async def request_push(self, national_id: str, sign_data: str | None = None, *, op_code: str = "ATH",
                           hint: str | None = None, time_limit: int | None = None,
                           device_user_def_desc: str | None = None) -> Ticket:
        """Ask the service to push the request to the phone bound to ``national_id``."""
        body = self._start_body(national_id, sign_data, op_code, hint, time_limit)
        body["device_user_def_desc"] = self.config.device_user_def_desc if device_user_def_desc is None \
            else device_user_def_desc
        body["sp_checksum"] = self._checksum(body["transaction_id"], body["sp_service_id"], body["id_num"],
                                             body["device_user_def_desc"], op_code, body["hint"],
                                             body["sign_info"]["sign_data"])
        return await self._start(REQUEST_PUSH, body, "PUSH")

    def _start_body(self, national_id, sign_data, op_code, hint, time_limit) -> dict:
        if op_code not in ("ATH", "SIGN"):
            raise ValueError("op_code is ATH or SIGN")
        time_limit = self.config.time_limit if time_limit is None else time_limit
        low, high = TIME_LIMIT_RANGE
        if not low <= time_limit <= high:
            raise ValueError(f"time_limit must be {low} to {high} seconds")
        return {
            "transaction_id": str(uuid.uuid4()),
            "sp_service_id": self.config.sp_service_id,
            "id_num": national_id,
            "op_code": op_code,
            "hint": self.config.hint if hint is None else hint,
            "time_limit": str(time_limit),
            "sign_info": {"sign_type": "PKCS#1", "sign_data": sign_data or new_sign_data(),
                          "tbs_encoding": "base64", "hash_algorithm": "SHA256"},
        }

    async def _start(self, endpoint: str, body: dict, op_mode: str) -> Ticket:
        started = self.clock()
        code, answer = await self._call(endpoint, body)
        if code != "0":
            raise e.from_service(code, answer.get("error_message"))
        result = answer.get("result") or {}
        sp_ticket = str(result.get("sp_ticket", ""))
        if not checksum.verify(self.config.key, str(result.get("idp_checksum", "")),
                               body["transaction_id"], code, sp_ticket):
            raise e.IdpChecksumInvalid()
        inner = decode_ticket(sp_ticket)
        if inner.get("transaction_id") != body["transaction_id"]:
            raise e.IdpChecksumInvalid("the ticket belongs to another transaction")
        service_expiry = int(inner.get("expiration_time", 0)) / 1000
        return Ticket(
            transaction_id=body["transaction_id"], sp_ticket=sp_ticket,
            sp_ticket_id=str(inner.get("sp_ticket_id", "")), op_code=body["op_code"], op_mode=op_mode,
            expires_at=min(service_expiry, started + int(body["time_limit"])),
            hashed_id_num=str(inner.get("hashed_id_num", "")), national_id=body["id_num"],
            sign_data=body["sign_info"]["sign_data"], tbs_encoding=body["sign_info"]["tbs_encoding"],
        )

    # -- the result ----------------------------------------------------------------------
    async def get_result(self, ticket: Ticket) -> Pending | Verified:
        """Poll once (or not, if the last poll was under ``poll_interval`` ago).

        Updates ``ticket.last_polled_at``: store the ticket again after calling."""
        now = self.clock()
        if now > ticket.expires_at:
            raise e.Expired()
        if ticket.last_polled_at is not None:
            wait = ticket.last_polled_at + self.config.poll_interval - now
            if wait > 0:
                return Pending(retry_after=wait)
        ticket.last_polled_at = now
        body = {"transaction_id": ticket.transaction_id, "sp_service_id": self.config.sp_service_id,
                "sp_ticket_id": ticket.sp_ticket_id}
        body["sp_checksum"] = self._checksum(ticket.transaction_id, self.config.sp_service_id, ticket.sp_ticket_id)
        code, answer = await self._call(GET_RESULT, body)
        if code in e.PENDING_CODES:
            return Pending(retry_after=self.config.poll_interval, service_code=code)
        if code != "0":
            raise e.from_service(code, answer.get("error_message"))
        return await self._verify(ticket, code, answer.get("result") or {})

    async def _verify(self, ticket: Ticket, code: str, result: dict) -> Verified:
        hashed, signed = str(result.get("hashed_id_num", "")), str(result.get("signed_response", ""))
        if not checksum.verify(self.config.key, str(result.get("idp_checksum", "")),
                               ticket.transaction_id, code, hashed, signed):
            raise e.IdpChecksumInvalid()
        now = self.clock()
        if now > ticket.expires_at:  # an answer that arrives after the deadline is refused
            raise e.Expired()
        if ticket.hashed_id_num and not _same(hashed, ticket.hashed_id_num):
            raise e.IdentityMismatch("hashed_id_num differs from the ticket's")
        try:
            signature = base64.b64decode(signed, validate=True)
        except (ValueError, binascii.Error):
            raise e.BadSignature("signed_response is not base64") from None
        try:
            identity = await pki.verify_signature(
                signature, signed_bytes(ticket.sign_data, ticket.tbs_encoding), certificate=str(result.get("cert", "")),
                trust=self.trust, revocation=self.revocation, now=dt.datetime.fromtimestamp(now, dt.timezone.utc),
                kind="personal")
        except pki.PKIError as exc:
            raise PKI_ERRORS.get(exc.code, e.UntrustedCertificate)(f"{exc.code}: {exc}") from None
        if identity.id_last4 is not None and not _same(identity.id_last4, ticket.national_id[-4:]):
            raise e.IdentityMismatch("the certificate's ID digits differ from the ID asked")
        return Verified(national_id=ticket.national_id, transaction_id=ticket.transaction_id,
                        hashed_id_num=hashed, identity=identity, signed_response=signed)

    # -- plumbing --------------------------------------------------------------------------
    def _checksum(self, *fields: str) -> str:
        return checksum.make(self.config.key, *fields)

    async def _call(self, endpoint: str, body: dict) -> tuple[str, dict]:
        try:
            response = await self.http.post(self.config.service_url + endpoint, json=body)
            answer = response.json()
        except httpx.HTTPError as exc:
            raise e.ServiceUnavailable(f"{endpoint}: {exc!r}") from None
        except ValueError:
            raise e.ServiceUnavailable(f"{endpoint}: HTTP {response.status_code}, not JSON") from None
        if not isinstance(answer, dict) or "error_code" not in answer:
            raise e.ServiceUnavailable(f"{endpoint}: HTTP {response.status_code}, no error_code")
        return str(answer["error_code"]), answer


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
