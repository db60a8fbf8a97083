"""Encryption of secrets at rest (OTP seeds): AES-256-GCM under an instance key
kept beside the signing keys, so a database dump alone reveals no seed."""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class SecretBox:
    def __init__(self, key: bytes):
        self._aead = AESGCM(key)

    def seal(self, plaintext: str, context: str) -> str:
        """Encrypt; ``context`` (say, the account id) binds the ciphertext to its owner."""
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), context.encode())
        return base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, token: str, context: str) -> str:
        raw = base64.urlsafe_b64decode(token)
        return self._aead.decrypt(raw[:12], raw[12:], context.encode()).decode()
