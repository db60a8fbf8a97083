"""Taiwanese national ID numbers (國民身分證統一編號): format and check digit.

A citizen's number is one letter (the place of first registration) then nine
digits: the first is 1 (male) or 2 (female), the last is a check digit. The
letter becomes two digits by the table below; with the nine digits they are
weighted 1, 9, 8, 7, 6, 5, 4, 3, 2, 1, 1 and the sum must be a multiple of 10.

Residents' new-style numbers (since 2021, second digit 8 or 9) use the same
check digit; they are accepted only when asked for (``allow_resident=True``),
since the mobile natural-person certificate is issued to citizens.
"""

from __future__ import annotations

import re
import unicodedata

LETTER_CODES = {
    "A": 10, "B": 11, "C": 12, "D": 13, "E": 14, "F": 15, "G": 16, "H": 17, "I": 34,
    "J": 18, "K": 19, "L": 20, "M": 21, "N": 22, "O": 35, "P": 23, "Q": 24, "R": 25,
    "S": 26, "T": 27, "U": 28, "V": 29, "W": 32, "X": 30, "Y": 31, "Z": 33,
}
WEIGHTS = (8, 7, 6, 5, 4, 3, 2, 1, 1)  # for the nine digits after the letter


class InvalidNationalId(ValueError):
    """``reason`` is stable (for messages and tests): empty, length, letter,
    gender_digit, digits, checksum."""

    MESSAGES = {
        "empty": "Enter the national ID number.",
        "length": "A national ID number has 10 characters: one letter and nine digits.",
        "letter": "A national ID number starts with a letter A-Z.",
        "gender_digit": "The second character of a national ID number is 1 or 2.",
        "digits": "After the letter, a national ID number has nine digits.",
        "checksum": "This national ID number is not valid (its check digit does not match).",
    }

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(self.MESSAGES[reason])


def normalize(raw: str) -> str:
    # NFKC: a zh-TW input method in full-width mode types "Ａ１２３４５６７８９".
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", raw or "")).upper()


def validate(raw: str, *, allow_resident: bool = False) -> str:
    """The normalized number (half width, upper case, no spaces), or InvalidNationalId."""
    value = normalize(raw)
    if not value:
        raise InvalidNationalId("empty")
    if len(value) != 10:
        raise InvalidNationalId("length")
    if value[0] not in LETTER_CODES:
        raise InvalidNationalId("letter")
    if not value[1:].isascii() or not value[1:].isdigit():
        raise InvalidNationalId("digits")
    if value[1] not in ("12" + ("89" if allow_resident else "")):
        raise InvalidNationalId("gender_digit")
    if checksum_total(value) % 10:
        raise InvalidNationalId("checksum")
    return value


def is_valid(raw: str, *, allow_resident: bool = False) -> bool:
    try:
        validate(raw, allow_resident=allow_resident)
    except InvalidNationalId:
        return False
    return True


def checksum_total(value: str) -> int:
    code = LETTER_CODES[value[0]]
    return code // 10 + (code % 10) * 9 + sum(int(d) * w for d, w in zip(value[1:], WEIGHTS))


def with_check_digit(prefix: str) -> str:
    """Complete a letter + eight digits with its check digit (test and demo data)."""
    prefix = normalize(prefix)
    partial = checksum_total(prefix + "0")
    return prefix + str((10 - partial % 10) % 10)
