"""What the HiPKI component answers (PROTOCOLS 1): its error codes, its JSON, and the
``p11Image.bmp`` that carries ``pkcs11info`` in its pixels.

The codes are the component's own: ``ret_code`` for the operation, and for a failed
card login ``last_error`` says why (wrong PIN, locked). Pages map them to messages.
"""

from __future__ import annotations

import json
import struct

OK = 0
NO_CARD = 0x76000006
LOGIN_FAILED = 0x76100006
CANCELLED = 0x76000999
NOT_AUTHORISED = 0x76000031
# Not listed in PROTOCOLS 1 (a bad package, a card without a signing certificate):
# one generic code; pages show it in hexadecimal.
FAILED = 0x76000001
PIN_WRONG = 0xA0
PIN_LOCKED = 0xA4

VERSION = "1.3.4.103327"  # the version this signer's answers follow
BMP_WIDTH = 2000  # pages read a 2000x1 canvas, three characters a pixel


class HiPKIError(Exception):
    def __init__(self, code: int, message: str, last_error: int = 0):
        super().__init__(message)
        self.code, self.last_error = code, last_error


def answer(func: str, ret_code: int = OK, message: str = "", last_error: int = 0, **fields) -> dict:
    return {"func": func, "ret_code": ret_code, "last_error": last_error, "message": message, **fields}


def failure(func: str, exc: HiPKIError) -> dict:
    return answer(func, exc.code, str(exc), exc.last_error)


def bmp(payload: dict) -> bytes:
    """A 24-bit BMP, BMP_WIDTH x 1, whose pixel bytes are the JSON text, zero-padded.

    A BMP stores a pixel as blue, green, red: pages read a canvas pixel's blue, green
    and red values as three characters and stop at a zero blue value."""
    text = json.dumps(payload, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    size = BMP_WIDTH * 3
    if len(text) >= size:
        raise ValueError(f"pkcs11info too long for the image ({len(text)} bytes)")
    pixels = text + b"\0" * (size - len(text))  # 6000 bytes: a multiple of 4, no row padding
    header = struct.pack("<2sIHHI", b"BM", 54 + size, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, BMP_WIDTH, 1, 1, 24, 0, size, 2835, 2835, 0, 0)
    return header + info + pixels
