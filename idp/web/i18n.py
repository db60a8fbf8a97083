"""Translations: JSON catalogs in ``i18n/<locale>/<area>.json``, keyed by message
id; each area of the provider keeps its own file, merged at start.

Language choice, first match wins: the login's ``ui_locales``, the ``lang``
switch (remembered in a cookie), the browser's Accept-Language, the default
(Traditional Chinese).
"""

from __future__ import annotations

import json
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


def negotiate(ui_locales: str | None, cookie: str | None, accept_language: str | None, default: str) -> str:
    for tag in (ui_locales or "").split():
        if found := _match(tag):
            return found
    if cookie in LOCALES:
        return cookie
    for part in (accept_language or "").split(","):
        if found := _match(part.split(";")[0]):
            return found
    return default


def translate(locale: str, key: str, **params) -> str:
    text = CATALOGS[locale].get(key) or CATALOGS["en"].get(key) or key
    return text.format(**params) if params else text
