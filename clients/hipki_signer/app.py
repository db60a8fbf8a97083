"""The HTTP side of the signer: the HiPKI component's endpoints (PROTOCOLS 1).

- ``GET /p11Image.bmp``: ``pkcs11info`` (no certificates) in an image's pixels,
  readable by any page (``Access-Control-Allow-Origin: *``): how pages check the
  component, reader and card without a click.
- ``GET /pkcs11info[?withcert=true]`` and ``POST /sign`` (form field ``tbsPackage``):
  JSON, without CORS headers, as the component's: a page on another origin cannot
  read them and goes through the popup.
- ``GET /popupForm``: the popup that runs one request for its opener by postMessage.

Only authorised sites may use the card (``allowed_origins``, the component's
trusted-site list): the origin is the request's ``Origin``, or for the popup's own
requests the opener's origin as the browser reported it to the popup.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from . import cms
from .card import Reader
from .protocol import FAILED, NOT_AUTHORISED, VERSION, HiPKIError, answer, bmp, failure

log = logging.getLogger("hipki_signer")
LOOPBACK = ("localhost", "127.0.0.1")
OPENER_HEADER = "x-hipki-opener"  # set by popupForm: the origin of the page it works for
SIGNATURE_TYPES = {"PKCS7": cms.pkcs7, "PKCS1": cms.pkcs1}
POPUP = (Path(__file__).parent / "popup.html").read_text("utf-8")
MAX_BODY = 256 * 1024  # a tbsPackage: a challenge, a PIN and a few fields (a document to sign is far less)


def create_app(reader: Reader, allowed_origins: list[str]) -> Starlette:
    allowed = {o.rstrip("/") for o in allowed_origins}

    def site(request: Request) -> str | None:
        if request.url.hostname not in LOOPBACK:  # a name rebound to 127.0.0.1 by another site's DNS
            return None
        origin = request.headers.get("origin")
        try:
            parts = urlsplit(origin or "")
            own = parts.hostname in LOOPBACK and parts.port == request.url.port
        except ValueError:  # not an origin at all (a port past 65535, say): no site's
            return None
        if origin is None or own:
            return request.headers.get(OPENER_HEADER)  # the popup's own request
        return origin

    def authorised(request: Request) -> bool:
        return site(request) in allowed

    def pkcs11info(request: Request, with_cert: bool) -> dict:
        if not authorised(request):
            return answer("pkcs11info", NOT_AUTHORISED, "site not authorised")
        return answer("pkcs11info", version=VERSION, slots=reader.info(with_cert))

    def info_json(request: Request) -> Response:
        return JSONResponse(pkcs11info(request, request.query_params.get("withcert") == "true"))

    def info_image(request: Request) -> Response:
        return Response(bmp(pkcs11info(request, False)), media_type="image/bmp",
                        headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "no-store"})

    async def sign(request: Request) -> Response:
        # Who asks is known from the headers: a site that may not is refused before its body
        # is read, and no body is read past MAX_BODY (any page can post here).
        if not authorised(request):
            return JSONResponse(answer("sign", NOT_AUTHORISED, "site not authorised"))
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return JSONResponse(answer("sign", FAILED, "request too large"), status_code=413)
        form = dict(parse_qsl(body.decode("utf-8", "replace")))
        try:
            result = await _run_sign(reader, form.get("tbsPackage") or "")
        except HiPKIError as exc:
            log.info("sign refused: %s (0x%x)", exc, exc.code)  # never the PIN or the tbs
            return JSONResponse(failure("sign", exc))
        return JSONResponse(result)

    def popup(request: Request) -> Response:
        return HTMLResponse(POPUP, headers={"Cache-Control": "no-store"})

    return Starlette(routes=[
        Route("/p11Image.bmp", info_image),
        Route("/pkcs11info", info_json, methods=["GET", "POST"]),
        Route("/sign", sign, methods=["POST"]),
        Route("/popupForm", popup),
    ])


async def _run_sign(reader: Reader, raw: str) -> dict:
    try:
        pkg = json.loads(raw)
        make = SIGNATURE_TYPES[pkg.get("signatureType", "PKCS7")]
        if pkg.get("hashAlgorithm", "SHA256") != "SHA256":
            raise ValueError("only SHA256")
        tbs = pkg["tbs"]
        data = base64.b64decode(tbs, validate=True) if pkg.get("tbsEncoding") == "base64" else tbs.encode("utf-8")
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise HiPKIError(FAILED, f"bad tbsPackage: {exc.__class__.__name__}") from None

    def sign_der(raw_sign, cert_der, card):
        return make(raw_sign, cert_der, data, nonce=str(pkg.get("nonce") or ""), card=card)

    signature, cert_der, card = await run_in_threadpool(
        reader.sign, data, str(pkg.get("pin") or ""), pkg.get("slotDescription"), sign_der)
    result = answer("sign", signature=base64.b64encode(signature).decode(), certb64=base64.b64encode(cert_der).decode())
    if str(pkg.get("withCardSN", "")).lower() == "true":
        result["cardSN"] = card
    return result
