"""Translations: JSON catalogs in ``i18n/<locale>/<area>.json``, keyed by message
id; each area of the provider keeps its own file, merged at start.

Language choice, first match wins: the ``lang`` switch the user pressed
(remembered in a cookie), the login's ``ui_locales`` (the portal's hint), the
browser's Accept-Language by weight, the default (Traditional Chinese). The
user's own choice comes first, as in Keycloak: a portal that asked for English
must not undo the switch at the next page of the same login.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

LOCALES = ("zh-TW", "en")
_DIR = Path(__file__).parent / "i18n"


def _catalog(locale: str) -> dict:
    merged = {}
    for path in sorted((_DIR / locale).glob("*.json")):
        merged.update(json.loads(path.read_text(encoding="utf-8")))
    return merged


CATALOGS = {loc: _catalog(loc) for loc in LOCALES}


def _match(tag: str) -> str | None:
    tag = tag.strip().lower()
    if tag.startswith("zh"):
        return "zh-TW"
    if tag.startswith("en"):
        return "en"
    return None


# RFC 9110 12.5.4: a language range, then its weight (three decimals at most).
_RANGE = re.compile(r"\s*([A-Za-z*][A-Za-z0-9-]*)\s*(?:;\s*q\s*=\s*(0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?))?\s*$", re.I)


def _by_weight(accept_language: str) -> list[str]:
    """The header's ranges, most wanted first (equal weights in the header's order); ``q=0``
    means "not this one", and a range we cannot read is left out."""
    weighted = []
    for part in accept_language.split(","):
        if (found := _RANGE.match(part)) and (weight := float(found[2] or 1)) > 0:
            weighted.append((weight, found[1]))
    return [tag for _, tag in sorted(weighted, key=lambda item: -item[0])]


def negotiate(ui_locales: str | None, cookie: str | None, accept_language: str | None, default: str) -> str:
    if cookie in LOCALES:
        return cookie
    for tag in (ui_locales or "").split() + _by_weight(accept_language or ""):
        if found := _match(tag):
            return found
    return default


def translate(locale: str, key: str, **params) -> str:
    text = CATALOGS[locale].get(key) or CATALOGS["en"].get(key) or key
    return text.format(**params) if params else text
