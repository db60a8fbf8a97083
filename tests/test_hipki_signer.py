"""The local signer (clients/hipki_signer) as a page or a script sees it over HTTP:
the component's JSON, image and error codes, and signatures the provider's own
verification (idp.pki) accepts. The browser side is tests/test_certificate_journeys.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from datetime import datetime, timezone

import pytest
from asn1crypto import cms, core
from cryptography.hazmat.primitives import serialization

from clients.hipki_signer.protocol import CANCELLED, FAILED, NO_CARD, NOT_AUTHORISED
from idp.pki import RevocationChecker, RevocationPolicy, load_trust, verify_signature
from tests.hipki_cards import PIN, desk, signer
from tests.live import httpx

SITE = "https://idp.example.tw"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    with contextlib.ExitStack() as stack:
        pki, reader = stack.enter_context(desk(tmp_path_factory.mktemp("hipki-signer")))
        reader.make_leaf(pki, "citizen")
        reader.insert("citizen")
        url = stack.enter_context(signer(reader, allow_origin=SITE))
        http = stack.enter_context(httpx.Client(base_url=url, timeout=30.0))
        yield http, pki, reader


def sign(http, origin: str | None = SITE, headers: dict | None = None, **package):
    package = {"tbs": "idp-login:test", "tbsEncoding": "NONE", "hashAlgorithm": "SHA256", "withCardSN": "true",
               "pin": PIN, "func": "MakeSignature", "signatureType": "PKCS7", **package}
    headers = {**({"Origin": origin} if origin else {}), **(headers or {})}
    response = http.post("/sign", data={"tbsPackage": json.dumps(package)}, headers=headers)
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    return response.json()


def verify(pki, result: dict, challenge: bytes):
    checker = RevocationChecker(RevocationPolicy(mode="hard-fail"))
    return asyncio.run(verify_signature(result["signature"], challenge, certificate=result.get("certb64"),
                                        trust=load_trust(pki.dir / "trust"), revocation=checker,
                                        now=datetime.now(timezone.utc)))


def test_pkcs11info_lists_the_card_and_its_certificate(setup):
    http, pki, _ = setup
    info = http.get("/pkcs11info?withcert=true", headers={"Origin": SITE})
    assert "access-control-allow-origin" not in info.headers  # pages on other sites use the popup
    body = info.json()
    assert body["ret_code"] == 0 and body["func"] == "pkcs11info" and body["version"]
    token = next(s["token"] for s in body["slots"] if isinstance(s["token"], dict))
    assert len(token["serialNumber"]) == 16 and token["label"] == "citizen"
    cert = token["certs"][0]
    assert base64.b64decode(cert["certb64"]) == pki.cert("citizen").public_bytes(serialization.Encoding.DER)
    assert cert["subjectCN"] == "王小明" and "digitalSignature" in cert["usage"]
    assert "certb64" not in http.get("/pkcs11info", headers={"Origin": SITE}).json()["slots"][0]["token"]["certs"][0]


def test_the_image_carries_pkcs11info_for_any_page(setup):
    http, _, _ = setup
    image = http.get("/p11Image.bmp", headers={"Origin": SITE})
    assert image.headers["content-type"] == "image/bmp" and image.headers["access-control-allow-origin"] == "*"
    pixels = image.content[54:]  # after the BMP headers: blue, green, red per pixel = the JSON's bytes
    body = json.loads(pixels.split(b"\0", 1)[0])
    assert body == http.get("/pkcs11info", headers={"Origin": SITE}).json()


@pytest.mark.parametrize("origin", [None, "https://evil.example", "http://localhost", "http://localhost:99999"])
def test_an_unauthorised_site_gets_the_components_code(setup, origin):
    http, _, _ = setup
    headers = {"Origin": origin} if origin else {}
    assert http.get("/pkcs11info", headers=headers).json()["ret_code"] == NOT_AUTHORISED
    image = json.loads(http.get("/p11Image.bmp", headers=headers).content[54:].split(b"\0", 1)[0])
    assert image["ret_code"] == NOT_AUTHORISED and "slots" not in image
    assert sign(http, origin)["ret_code"] == NOT_AUTHORISED
    if origin:  # only the popup's own requests may name the page it works for
        assert sign(http, origin, headers={"X-HiPKI-Opener": SITE})["ret_code"] == NOT_AUTHORISED


def test_a_site_is_refused_before_its_body_is_read_and_no_body_is_read_past_its_limit():
    """Any page can post to the component on the user's PC: one that may not is answered from
    its headers, without reading what it sends; one that may is refused past MAX_BODY."""
    from clients.hipki_signer.app import MAX_BODY, create_app

    app = create_app(reader=None, allowed_origins=[SITE])  # no card is reached either way

    def post(origin, size):
        chunks, read, sent = [b"tbsPackage=" + b"x" * size], [0], []

        async def receive():
            body = chunks.pop() if chunks else b""
            read[0] += len(body)
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/sign", "raw_path": b"/sign", "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 61161), "headers": [(b"host", b"localhost:61161"), (b"origin", origin.encode()),
                                                              (b"content-type", b"application/x-www-form-urlencoded")]}
        asyncio.run(app(scope, receive, send))
        body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
        return sent[0]["status"], body["ret_code"], read[0]

    assert post("https://evil.example", 4 * MAX_BODY) == (200, NOT_AUTHORISED, 0)
    status, code, _ = post(SITE, MAX_BODY + 1)
    assert (status, code) == (413, FAILED)


def test_a_site_rebinding_its_name_to_loopback_is_refused(setup):
    http, _, _ = setup
    port = http.base_url.port
    for headers in ({"X-HiPKI-Opener": SITE}, {"Origin": SITE}):
        headers["Host"] = f"rebound.example:{port}"
        assert http.get("/pkcs11info", headers=headers).json()["ret_code"] == NOT_AUTHORISED


def test_the_popup_speaks_for_its_opener(setup):
    http, _, _ = setup
    page = http.get("/popupForm")
    assert page.status_code == 200 and '{func: "getTbs"}' in page.text and "X-HiPKI-Opener" in page.text
    own = str(http.base_url).rstrip("/")
    assert sign(http, own, headers={"X-HiPKI-Opener": SITE})["ret_code"] == 0  # its POSTs carry its own Origin


def test_pkcs7_is_what_the_provider_verifies(setup):
    http, pki, _ = setup
    result = sign(http, tbs="idp-login:abc", nonce="n0nce")
    assert result["ret_code"] == 0 and result["func"] == "sign" and len(result["cardSN"]) == 16
    who = verify(pki, {"signature": result["signature"]}, b"idp-login:abc")  # the CMS names its own signer
    assert who.form == "cms" and who.subject_cn == "王小明" and who.revocation.status == "good"
    signed = cms.ContentInfo.load(base64.b64decode(result["signature"]))["content"]
    assert [c.chosen.dump() for c in signed["certificates"]] == [base64.b64decode(result["certb64"])]
    attrs = {a["type"].dotted: a["values"][0] for a in signed["signer_infos"][0]["signed_attrs"]}
    assert set(attrs) == {"1.2.840.113549.1.9.3", "1.2.840.113549.1.9.5", "1.2.840.113549.1.9.4",
                          "1.2.840.113549.1.9.25.3", "2.16.886.1.100.2.204"}
    assert core.OctetString.load(attrs["1.2.840.113549.1.9.25.3"].dump()).native == b"n0nce"
    assert core.PrintableString.load(attrs["2.16.886.1.100.2.204"].dump()).native == result["cardSN"]


def test_pkcs1_and_base64_tbs(setup):
    http, pki, _ = setup
    raw = "挑戰 bytes".encode()
    result = sign(http, tbs=base64.b64encode(raw).decode(), tbsEncoding="base64", signatureType="PKCS1",
                  withCardSN="false")
    assert result["ret_code"] == 0 and "cardSN" not in result
    assert verify(pki, result, raw).form == "pkcs1"


def test_errors_are_the_components_codes(setup):
    http, _, reader = setup
    assert sign(http, pin="")["ret_code"] == CANCELLED
    assert sign(http, signatureType="XML")["ret_code"] == FAILED
    assert sign(http, hashAlgorithm="SHA1")["ret_code"] == FAILED
    reader.remove()
    try:
        assert sign(http)["ret_code"] == NO_CARD
        assert http.get("/pkcs11info", headers={"Origin": SITE}).json()["slots"][0]["token"] == "unknown token"
    finally:
        reader.insert("citizen")
    assert sign(http)["ret_code"] == 0
