"""The image captcha of the login form (``IDP_CAPTCHA``: always, after-failure, off).

The answer lives in the login transaction, is replaced every time the form is
shown, and is compared in constant time."""

from __future__ import annotations

import hmac
import secrets

from captcha.image import ImageCaptcha

_image = ImageCaptcha(width=160, height=60)
DIGITS = "23456789"  # no 0/1: too easily read as O/l


def wanted(svc, tx) -> bool:
    mode = svc.settings.captcha
    return mode == "always" or (mode == "after-failure" and tx.get("failures", 0) > 0)


def new_answer() -> str:
    return "".join(secrets.choice(DIGITS) for _ in range(5))


def check(tx, answer) -> bool:
    expected = tx.get("captcha")
    return bool(expected and isinstance(answer, str) and hmac.compare_digest(expected.encode(), answer.strip().encode()))


def png(answer: str) -> bytes:
    return _image.generate(answer).getvalue()
