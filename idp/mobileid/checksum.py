"""The mobile-ID service's ``sp_checksum`` / ``idp_checksum``.

hex(IV || AES-256-GCM(key, IV, lower-case hex SHA-256 of the concatenated
fields) || tag), with a 12-byte IV and a 32-byte key (PROTOCOLS.md section 3).
Most clients send an all-zero IV; the service accepts a random one, and with
GCM a repeated IV under one key leaks the authentication key, so ours is
random. Verification accepts any IV.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

IV_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32


def parse_key(text: str | bytes) -> bytes:
    """A 32-byte key from 64 hex digits or base64 (how it is written in settings)."""
    if isinstance(text, bytes) and len(text) == KEY_BYTES:
        return text
    text = text.decode() if isinstance(text, bytes) else text
    text = text.strip()
    for decode in (bytes.fromhex, lambda t: base64.b64decode(t, validate=True)):
        try:
            key = decode(text)
        except (ValueError, binascii.Error):
            continue
        if len(key) == KEY_BYTES:
            return key
    raise ValueError("the mobile-ID key must be 32 bytes, written as 64 hex digits or base64")


def digest(*fields: str) -> bytes:
    """What is encrypted: the lower-case hex SHA-256 of the fields, concatenated."""
    return hashlib.sha256("".join(fields).encode("utf-8")).hexdigest().encode("ascii")


def make(key: bytes, *fields: str, iv: bytes | None = None) -> str:
    iv = os.urandom(IV_BYTES) if iv is None else iv
    if len(iv) != IV_BYTES:
        raise ValueError("the IV is 12 bytes")
    return (iv + AESGCM(key).encrypt(iv, digest(*fields), None)).hex()


def verify(key: bytes, checksum: str, *fields: str) -> bool:
    """True when ``checksum`` authenticates exactly these fields (constant-time compare)."""
    try:
        raw = bytes.fromhex(checksum or "")
    except (ValueError, TypeError):
        return False
    if len(raw) < IV_BYTES + TAG_BYTES:
        return False
    try:
        plain = AESGCM(key).decrypt(raw[:IV_BYTES], raw[IV_BYTES:], None)
    except InvalidTag:
        return False
    return hmac.compare_digest(plain, digest(*fields))
