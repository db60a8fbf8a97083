"""One phone of the push-approval app (SPEC A5; PROTOCOLS.md section 4).

The phone keeps, in one JSON file (mode 0600): its ECDSA P-256 device key
(private JWK), the device id the provider gave it (the key's RFC 7638
thumbprint), the TOTP secret of its 6-digit codes and the provider's
endpoints. Every call to the provider is one compact JWS (ES256) signed by
the device key, posted as ``{"jws": "..."}``; its payload names the endpoint
(``aud``), the phone's time (``iat``) and a fresh ``jti``, so a captured
message cannot be used again or elsewhere. No cookies, no bearer secret.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import pyotp
from joserfc import jws
from joserfc.jwk import ECKey

try:  # the project depends on httpx2; plain httpx has the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

from .messages import say

LONG_POLL = 25  # seconds the provider holds a poll at most
LOOPBACK = ("localhost", "127.0.0.1", "::1")  # a provider on this computer may be plain http


def _origin(parts) -> tuple:
    return parts.scheme, parts.hostname, parts.port or {"http": 80, "https": 443}.get(parts.scheme)


def _under(issuer, urls: list) -> bool:
    """Whether ``issuer`` is an absolute https URL (http only on this computer) and every one
    of ``urls`` has its origin (scheme, host, port) and a path under its path. A prefix of the
    text is no test: "https:" begins every https URL."""
    if not isinstance(issuer, str) or not all(isinstance(url, str) for url in urls):
        return False
    try:
        base = urlsplit(issuer)
        secure = base.scheme == "https" or (base.scheme == "http" and base.hostname in LOOPBACK)
        if not secure or not base.hostname or base.query or base.fragment:
            return False
        path = base.path.rstrip("/") + "/"
        return all(_origin(parts) == _origin(base) and parts.path.startswith(path)
                   for parts in map(urlsplit, urls))
    except ValueError:  # a port out of range or not a number, a broken IPv6 address
        return False


class AppError(Exception):
    """The provider refused a call: ``code`` (e.g. ``registration_expired``) and its ``message``."""

    def __init__(self, code: str, message: str, status: int):
        super().__init__(f"{message} ({code}, HTTP {status})")
        self.code, self.message, self.status = code, message, status


class Authenticator:
    def __init__(self, path: str | Path | None = None, *, http=None, clock=time.time, lang: str = "zh-TW"):
        """``path``: the phone's state file (read if it exists); ``http``: an httpx client
        (tests pass the provider's in-process one); ``clock``: the phone's clock; ``lang``:
        the language of its messages and of the provider's (``zh-TW`` or ``en``)."""
        self.path = Path(path) if path else None
        self.http = http or httpx.Client(timeout=LONG_POLL + 10)
        self.clock = clock
        self.lang = lang
        self.state = json.loads(self.path.read_text()) if self.path and self.path.exists() else {}

    # -- what the phone stores ----------------------------------------------------------------
    @property
    def registered(self) -> bool:
        return "device" in self.state

    def _save(self) -> None:
        if self.path:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)  # the mode above is for a new file only: tighten an existing one
            with os.fdopen(fd, "w") as f:
                json.dump(self.state, f, ensure_ascii=False, indent=1)

    # -- signed calls ---------------------------------------------------------------------------
    def sign(self, url: str, claims: dict, key: ECKey | None = None) -> str:
        """A message for the endpoint ``url``; with ``key``, a new key introducing itself."""
        header = {"alg": "ES256", "typ": "push+jws"}
        if key is None:
            key = ECKey.import_key(self.state["key"])
            header["kid"] = self.state["device"]
        else:
            header["jwk"] = key.as_dict(private=False)
        payload = {"aud": url, "iat": int(self.clock()), "jti": secrets.token_urlsafe(18), **claims}
        return jws.serialize_compact(header, json.dumps(payload).encode(), key)

    def post(self, url: str, token: str) -> dict:
        """Send one signed message; the provider's JSON answer, or AppError."""
        try:
            response = self.http.post(url, json={"jws": token}, headers={"Accept-Language": self.lang})
        except httpx.TransportError as exc:  # no connection, a time-out: the network, not the provider
            raise AppError("unreachable", say(self.lang, "unreachable", host=urlsplit(url).netloc), 0) from exc
        try:
            body = response.json()
        except ValueError:  # not the provider speaking: a proxy's or gateway's error page, say
            body = None
        if not isinstance(body, dict):
            raise AppError("invalid_response", say(self.lang, "not_json", status=response.status_code),
                           response.status_code)
        if response.status_code >= 400:
            raise AppError(body.get("error", "error"), body.get("message", ""), response.status_code)
        return body

    # -- what the user does on the phone -----------------------------------------------------------
    def register(self, url: str, channel: str = "poll") -> dict:
        """Scan the settings page's QR code (its one-time URL): make the device key, send it."""
        parts = urlsplit(url)
        code = (parse_qs(parts.query).get("code") or [""])[0]
        endpoint = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        key = ECKey.generate_key("P-256", private=True)
        answer = self.post(endpoint, self.sign(endpoint, {"code": code, "channel": channel}, key))
        # The provider the QR code named is the one the phone talks to and names, whatever the
        # reply says: its issuer is where the code came from, its endpoints under that issuer.
        urls = [endpoint, *(answer.get("endpoints") or {}).values()]
        if len(urls) != 3 or not _under(answer.get("issuer"), urls):
            raise AppError("foreign_provider", say(self.lang, "foreign_provider"), 200)
        self.state = {"key": key.as_dict(private=True), "device": answer["device"], "issuer": answer["issuer"],
                      "issuer_name": answer["issuer_name"], "otp": answer["otp"], "endpoints": answer["endpoints"]}
        self._save()
        return answer

    def otp(self) -> str:
        """The 6 digits the app shows now."""
        return pyotp.TOTP(self.state["otp"]["secret"]).at(self.clock())

    def pending(self, wait: float = 0) -> list[dict]:
        """The login request waiting for this phone (application, account, time, three
        numbers to choose from), waiting up to ``wait`` seconds for one to arrive."""
        url = self.state["endpoints"]["poll"]
        return self.post(url, self.sign(url, {"wait": min(wait, LONG_POLL)}))["requests"]

    def answer_message(self, request: dict, approve: bool, number: int | None = None) -> str:
        """The signed answer to ``request``: over the request as shown and the number picked."""
        shown = {k: request[k] for k in ("id", "application", "account", "time")}
        url = self.state["endpoints"]["answer"]
        return self.sign(url, {"request": shown, "decision": "approve" if approve else "deny", "number": number})

    def approve(self, request: dict, number: int) -> str:
        """Tap ``number`` (one of ``request["choices"]``): ``approved`` or ``wrong_number``."""
        return self.post(self.state["endpoints"]["answer"], self.answer_message(request, True, number))["result"]

    def deny(self, request: dict) -> str:
        return self.post(self.state["endpoints"]["answer"], self.answer_message(request, False))["result"]
