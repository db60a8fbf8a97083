"""The card reader: PKCS#11 slots, the card's certificates, and signing with its PIN.

The module is re-initialised for every operation, as the HiPKI component
notices a card put in or taken out between two clicks (SoftHSM2, too, only
reads its token directory at ``C_Initialize``). One operation at a time: a
card is a single-user device.

SoftHSM2 has no PIN-retry counter, and a card's counter lives on the card, so
this reader keeps its own per card serial number: three wrong PINs lock the
card until the signer restarts (a real card stays locked until the household
registration office unlocks it; the card's own CKR_PIN_LOCKED is honoured too).
"""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass

import pkcs11
from asn1crypto import x509
from pkcs11 import Attribute, Mechanism, ObjectClass
from pkcs11 import exceptions as p11

from .protocol import CANCELLED, FAILED, LOGIN_FAILED, NO_CARD, PIN_LOCKED, PIN_WRONG, HiPKIError

MAX_PIN_TRIES = 3
SIGNING_USAGES = {"digital_signature", "non_repudiation"}


@dataclass(frozen=True)
class CardCert:
    der: bytes
    id: bytes  # CKA_ID: the private key of the same pair has the same one

    @property
    def cert(self) -> x509.Certificate:
        return x509.Certificate.load(self.der)

    def for_signing(self) -> bool:
        usage = self.cert.key_usage_value
        return usage is None or bool(set(usage.native) & SIGNING_USAGES)


class Reader:
    """``Reader("/usr/lib/softhsm/libsofthsm2.so")``; on a desktop the card's PKCS#11
    library (HiCOS: ``/usr/local/lib/libHicos_p11v1.so``)."""

    def __init__(self, module: str, max_tries: int = MAX_PIN_TRIES):
        self.lib = pkcs11.lib(module)
        self.max_tries = max_tries
        self.wrong: dict[str, int] = {}  # card serial -> wrong PINs in a row
        self._lock = threading.Lock()

    def _slots(self):
        self.lib.reinitialize()
        return self.lib.get_slots(token_present=False)

    @staticmethod
    def _token(slot):
        """The card in ``slot``, or None (empty reader, or a blank token)."""
        try:
            token = slot.get_token()
        except (p11.TokenNotPresent, p11.TokenNotRecognised):
            return None
        return token if token.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED else None

    @staticmethod
    def _certs(session) -> list[CardCert]:
        return [CardCert(bytes(o[Attribute.VALUE]), bytes(o[Attribute.ID]))
                for o in session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE})]

    def info(self, with_cert: bool) -> list[dict]:
        """The ``slots`` of a ``pkcs11info`` answer."""
        with self._lock:
            out = []
            for slot in self._slots():
                entry = {"slotDescription": slot.slot_description.strip(), "slotID": slot.slot_id}
                token = self._token(slot)
                if token is None:
                    entry["token"] = "unknown token"
                else:
                    with token.open() as session:  # certificates are public objects: no PIN needed
                        certs = self._certs(session)
                    entry["token"] = {"serialNumber": _serial(token), "label": token.label.strip(),
                                      "certs": [describe(c, with_cert) for c in certs]}
                out.append(entry)
            return out

    def sign(self, data: bytes, pin: str, slot_description: str | None, sign_der) -> tuple[bytes, bytes, str]:
        """(signature, leaf certificate DER, card serial). ``sign_der(raw_sign, cert_der, card)``
        makes the answer's signature from a function that signs bytes with the card."""
        if not pin:
            raise HiPKIError(CANCELLED, "no PIN")
        with self._lock:
            token = next((t for s in self._slots()
                          if (slot_description is None or s.slot_description.strip() == slot_description)
                          and (t := self._token(s)) is not None), None)
            if token is None:
                raise HiPKIError(NO_CARD, "no card in the reader")
            serial = _serial(token)
            if self.wrong.get(serial, 0) >= self.max_tries:
                raise HiPKIError(LOGIN_FAILED, "card locked", last_error=PIN_LOCKED)
            try:
                session = token.open(user_pin=pin)
            except p11.PinLocked:
                self.wrong[serial] = self.max_tries
                raise HiPKIError(LOGIN_FAILED, "card locked", last_error=PIN_LOCKED) from None
            except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange):
                self.wrong[serial] = tries = self.wrong.get(serial, 0) + 1
                last = PIN_LOCKED if tries >= self.max_tries else PIN_WRONG
                raise HiPKIError(LOGIN_FAILED, f"wrong PIN ({tries}/{self.max_tries})", last_error=last) from None
            self.wrong.pop(serial, None)
            with session:
                cert = next((c for c in self._certs(session) if c.for_signing()), None)
                if cert is None:
                    raise HiPKIError(FAILED, "no signing certificate on the card")
                key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=cert.id)

                def raw_sign(tbs: bytes) -> bytes:
                    return key.sign(tbs, mechanism=Mechanism.SHA256_RSA_PKCS)

                return sign_der(raw_sign, cert.der, serial), cert.der, serial


def _serial(token) -> str:
    serial = token.serial
    return (serial.decode("ascii", "replace") if isinstance(serial, bytes) else str(serial)).strip()


def describe(card_cert: CardCert, with_cert: bool) -> dict:
    """One ``certs[]`` entry of ``pkcs11info``."""
    c = card_cert.cert
    usage = c.key_usage_value.native if c.key_usage_value else []
    out = {
        "subjectDN": c.subject.human_friendly, "issuerDN": c.issuer.human_friendly,
        "subjectCN": c.subject.native.get("common_name", ""), "sn": format(c.serial_number, "x"),
        "notBefore": c.not_valid_before.strftime("%Y%m%d%H%M%S"), "notAfter": c.not_valid_after.strftime("%Y%m%d%H%M%S"),
        "usage": "|".join(_USAGE_NAMES.get(u, u) for u in usage),
    }
    if with_cert:
        out["certb64"] = base64.b64encode(card_cert.der).decode()
    return out


_USAGE_NAMES = {"digital_signature": "digitalSignature", "non_repudiation": "nonRepudiation",
                "key_encipherment": "keyEncipherment", "data_encipherment": "dataEncipherment"}
