"""A simulator of the Ministry of the Interior's mobile-ID service (PROTOCOLS.md section 3).

    python -m deploy.dev.mobileid_sim --port 8010 [--state-dir var/mobileid-sim]   # prints the IDP_MOBILEID_* to set

Endpoints, fields, checksums, expiry and error codes as the real service
(``/moise/sp/getSpTicket``, ``/moise/sp/requestAthOrSignPush``,
``/moise/sp/getAthOrSignResult``). In place of the phone:

- ``GET /sim/`` a small page for a person at the demo: pending requests with
  "approve" / "deny", and a box to paste a scanned QR ticket;
- ``POST /sim/answer`` (JSON or form) ``{"sp_ticket_id" | "sp_ticket" |
  "transaction_id": ..., "decision": "approve" | "deny"}`` for tests;
- ``GET /sim/ca.pem`` the test CA; ``Pki.write_trust(DIR)`` writes it with an
  ``anchors.toml`` as a trust directory for ``IDP_MOBILEID_TRUST``;
- ``GET /sim/moica.crl`` the CA's CRL, which every citizen certificate names
  (the provider checks revocation as for a card); ``POST /sim/revoke``
  ``{"id_num": ...}`` revokes a citizen's certificate (the phone still uses it);
- ``POST /sim/faults`` ``{"tamper_idp_checksum", "rogue_certificate",
  "bad_signature", "crl_unavailable": bool}`` to misbehave for tests.

Every valid ID number is a simulated citizen with a MOICA-profile certificate
(``C=TW, CN=<name>, serialNumber=<card serial>``, the ID's last four digits
under 2.16.886.1.100.2.51) and an RSA-2048 key, issued by a self-made CA with
MOICA's DN; with ``--state-dir`` the CA and citizens survive restarts. The CRL's
URL is set (``Pki.crl_url``) once the simulator knows where it is served, before
the first citizen is issued.

Codes named ``SIM_...`` and the ``SP-API-ATH-01-INV_...`` codes other than
``INV_SP_CHECKSUM`` are the simulator's own: the real service's are unknown.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as dt
import hashlib
import html
import json
import os
import uuid
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from idp.clock import Clock
from idp.mobileid import checksum, national_id

DEV_SP_SERVICE_ID = "idp-dev"
DEV_KEY = "6d6f62696c6569642d73696d756c61746f722d6465762d6b65792d3332627974"  # dev only, never deployed
CA_SUBJECT = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "TW"),
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "行政院"),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "內政部憑證管理中心")])
ID_LAST_FOUR_OID = "2.16.886.1.100.2.51"
PENDING_PUSH, PENDING_SCAN = "20002", "SPTKTID_TXNLOG_NF"


# -- a MOICA-profile test PKI ---------------------------------------------------------------
def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    size = (n.bit_length() + 7) // 8
    length = bytes([n]) if n < 0x80 else bytes([0x80 | size]) + n.to_bytes(size, "big")
    return bytes([tag]) + length + content


def _der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytes([arcs[0] * 40 + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            chunk.append(0x80 | (arc & 0x7F))
        body += bytes(reversed(chunk))
    return _der(0x06, body)


def subject_directory_attributes(last_four: str) -> x509.UnrecognizedExtension:
    """SEQUENCE { Attribute { 2.16.886.1.100.2.51, SET { PrintableString } } }"""
    attribute = _der(0x30, _der_oid(ID_LAST_FOUR_OID) + _der(0x31, _der(0x13, last_four.encode())))
    return x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.9"), _der(0x30, attribute))


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make_ca(now: dt.datetime) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """A self-signed CA with MOICA's DN (a different key: signatures tell them apart)."""
    key = _new_key()
    cert = (x509.CertificateBuilder().subject_name(CA_SUBJECT).issuer_name(CA_SUBJECT)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue_citizen(ca_key, ca_cert: x509.Certificate, id_num: str, name: str, now: dt.datetime, crl_url: str | None):
    key = _new_key()
    serial = "SM" + str(int(hashlib.sha256(id_num.encode()).hexdigest(), 16))[:14]
    subject = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "TW"), x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=730))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(True, True, False, False, False, False, False, False, False), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
               .add_extension(subject_directory_attributes(id_num[-4:]), critical=False))
    if crl_url:
        builder = builder.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
            [x509.UniformResourceIdentifier(crl_url)], None, None, None)]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def crl_url_of(cert: x509.Certificate) -> str | None:
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return None
    return next((name.value for p in points for name in p.full_name or []), None)


@dataclasses.dataclass
class Citizen:
    national_id: str
    name: str
    key: rsa.RSAPrivateKey
    cert: x509.Certificate


class Pki:
    """The CA and one citizen per ID, kept in ``state_dir`` when given."""

    def __init__(self, state_dir: str | Path | None = None, names: dict[str, str] | None = None,
                 crl_url: str | None = None):
        self.dir = Path(state_dir) if state_dir else None
        self.names = names or {}
        self.crl_url = crl_url
        self.citizens: dict[str, Citizen] = {}
        self.revoked: dict[int, dt.datetime] = {}  # certificate serial -> when
        self._rogue: tuple | None = None
        now = dt.datetime.now(dt.timezone.utc)
        loaded = self._load("ca")
        self.ca_key, self.ca_cert = loaded or make_ca(now)
        if not loaded:
            self._save("ca", self.ca_key, self.ca_cert)

    def citizen(self, id_num: str) -> Citizen:
        if id_num not in self.citizens:
            name = self.names.get(id_num, "測試市民")
            loaded = self._load(id_num)
            if loaded is None or crl_url_of(loaded[1]) != self.crl_url:  # none yet, or it names an old CRL
                loaded = issue_citizen(self.ca_key, self.ca_cert, id_num, name, dt.datetime.now(dt.timezone.utc),
                                       self.crl_url)
            key, cert = loaded
            self._save(id_num, key, cert)
            self.citizens[id_num] = Citizen(id_num, name, key, cert)
        return self.citizens[id_num]

    def rogue(self, id_num: str) -> Citizen:
        """The same citizen issued by a CA that merely copies the DN (for tests)."""
        now = dt.datetime.now(dt.timezone.utc)
        self._rogue = self._rogue or make_ca(now)
        key, cert = issue_citizen(*self._rogue, id_num, self.citizen(id_num).name, now, self.crl_url)
        return Citizen(id_num, "rogue", key, cert)

    def revoke(self, id_num: str, now: dt.datetime) -> None:
        """List the citizen's certificate on the CRL; the phone goes on answering with it."""
        self.revoked[self.citizen(id_num).cert.serial_number] = now

    def crl(self, now: dt.datetime) -> bytes:
        """The CA's current CRL (DER), good for a day."""
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.ca_cert.subject)
                   .last_update(now - dt.timedelta(minutes=1)).next_update(now + dt.timedelta(days=1))
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                                  critical=False))
        for serial, when in self.revoked.items():
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
        return builder.sign(self.ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    def ca_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)

    def write_trust(self, directory: str | Path) -> Path:
        """A trust directory (``IDP_MOBILEID_TRUST``) in which this CA issues personal certificates."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "ca.pem").write_bytes(self.ca_pem())
        (directory / "anchors.toml").write_text(
            '# The mobile-ID simulator\'s CA (deploy/dev/mobileid_sim.py): a test CA, never in production.\n'
            '[[anchor_set]]\nname = "mobileid-simulator"\nkinds = ["personal"]\n'
            'roots = ["ca.pem"]\nissuers = ["ca.pem"]\n', "utf-8")
        return directory

    def _load(self, stem: str):
        if not self.dir or not (self.dir / f"{stem}.pem").exists():
            return None
        key = serialization.load_pem_private_key((self.dir / f"{stem}.key").read_bytes(), None)
        return key, x509.load_pem_x509_certificate((self.dir / f"{stem}.pem").read_bytes())

    def _save(self, stem: str, key, cert) -> None:
        if not self.dir:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        key_file = self.dir / f"{stem}.key"
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_file.chmod(0o600)
        (self.dir / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# -- the service ------------------------------------------------------------------------------
@dataclasses.dataclass
class SimTicket:
    sp_ticket_id: str
    sp_ticket: str
    transaction_id: str
    sp_service_id: str
    id_num: str
    op_code: str
    op_mode: str            # "PUSH" for a push
    hint: str
    sign_info: dict
    expires_at: float
    state: str = "pending"  # approved, denied, redeemed


class ServiceError(Exception):
    def __init__(self, code: str, message: str):
        self.code, self.message = code, message


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hash_id(id_num: str) -> str:
    return hashlib.sha256(id_num.encode()).hexdigest()


class MobileIdSimulator:
    def __init__(self, sps: dict[str, bytes] | None = None, *, clock=None, pki: Pki | None = None,
                 names: dict[str, str] | None = None):
        self.sps = sps or {DEV_SP_SERVICE_ID: checksum.parse_key(DEV_KEY)}
        self.clock = clock or Clock()
        self.pki = pki or Pki(names=names)
        self.tickets: dict[str, SimTicket] = {}
        self.faults: set[str] = set()
        self.calls: list[tuple[str, dict]] = []  # every service call, for tests

    # The three service calls: a result (error_code "0"), (code, result), or ServiceError.
    def get_sp_ticket(self, body: dict) -> dict:
        op_mode = self._field(body, "op_mode")
        if op_mode not in ("I-SCAN", "APP2APP", "MWEB2APP"):
            raise ServiceError("SP-API-ATH-01-INV_OP_MODE", "op_mode is I-SCAN, APP2APP or MWEB2APP")
        fields = ["transaction_id", "sp_service_id", "id_num", "op_code", "op_mode", "hint"]
        return self._issue(body, op_mode, [self._field(body, f) for f in fields])

    def request_push(self, body: dict) -> dict:
        fields = ["transaction_id", "sp_service_id", "id_num", "device_user_def_desc", "op_code", "hint"]
        return self._issue(body, "PUSH", [self._field(body, f) for f in fields])

    def get_result(self, body: dict) -> tuple[str, dict]:
        fields = [self._field(body, f) for f in ("transaction_id", "sp_service_id", "sp_ticket_id")]
        key = self._check_sp(body, fields)
        ticket = self.tickets.get(body["sp_ticket_id"])
        if ticket is None or ticket.transaction_id != body["transaction_id"] \
                or ticket.sp_service_id != body["sp_service_id"]:
            raise ServiceError("SIM_SPTKT_NF", "no such ticket")
        if ticket.state == "redeemed":
            raise ServiceError("SPTKTID_SPTKT_RDM", "the ticket has been used")
        if ticket.state == "denied":
            raise ServiceError("APP_USER_CANCEL", "the user cancelled")
        if ticket.state == "pending":
            if self.clock() > ticket.expires_at:
                raise ServiceError("SPTKT_OVD", "the ticket has expired")
            return (PENDING_PUSH if ticket.op_mode == "PUSH" else PENDING_SCAN), {}
        ticket.state = "redeemed"
        citizen = self.pki.rogue(ticket.id_num) if "rogue_certificate" in self.faults else self.pki.citizen(ticket.id_num)
        data = self._signed_bytes(ticket.sign_info)
        if "bad_signature" in self.faults:
            data = b"something else" + data
        signed = base64.b64encode(citizen.key.sign(data, padding.PKCS1v15(), hashes.SHA256())).decode()
        hashed = hash_id(ticket.id_num)
        result = {"hashed_id_num": hashed, "signed_response": signed,
                  "cert": base64.b64encode(citizen.cert.public_bytes(serialization.Encoding.DER)).decode(),
                  "idp_checksum": self._idp_checksum(key, ticket.transaction_id, "0", hashed, signed)}
        return "0", result

    def answer(self, ticket: SimTicket, approve: bool) -> str:
        """The phone's answer. Returns the new state, or raises ValueError (expired, answered)."""
        if ticket.state != "pending":
            raise ValueError("already answered")
        if self.clock() > ticket.expires_at:
            raise ValueError("expired")
        ticket.state = "approved" if approve else "denied"
        return ticket.state

    def find(self, key: str) -> SimTicket | None:
        for ticket in self.tickets.values():
            if key in (ticket.sp_ticket_id, ticket.sp_ticket, ticket.transaction_id):
                return ticket
        return None

    # -- helpers -------------------------------------------------------------------------------
    def _issue(self, body: dict, op_mode: str, fields: list[str]) -> dict:
        sign_info = body.get("sign_info")
        if not isinstance(sign_info, dict) or not isinstance(sign_info.get("sign_data"), str):
            raise ServiceError("SP-API-ATH-01-INV_SIGN_INFO", "sign_info.sign_data is required")
        key = self._check_sp(body, fields + [sign_info["sign_data"]])
        if body["op_code"] not in ("ATH", "SIGN"):
            raise ServiceError("SP-API-ATH-01-INV_OP_CODE", "op_code is ATH or SIGN")
        if sign_info.get("sign_type", "PKCS#1") not in ("PKCS#1", "RAW"):
            raise ServiceError("SP-API-ATH-01-INV_SIGN_TYPE", "the simulator signs PKCS#1 and RAW only")
        try:
            time_limit = int(body.get("time_limit", "180"))
        except (TypeError, ValueError):
            time_limit = -1
        if not 30 <= time_limit <= 600:
            raise ServiceError("SP-API-ATH-01-INV_TIME_LIMIT", "time_limit is 30 to 600 seconds")
        if not national_id.is_valid(body["id_num"]):
            raise ServiceError("SP-API-ATH-01-INV_ID_NUM", "id_num is not a valid national ID number")
        if any(t.transaction_id == body["transaction_id"] for t in self.tickets.values()):
            raise ServiceError("SP-API-ATH-01-DUP_TXN_ID", "transaction_id has been used")
        self.pki.citizen(body["id_num"])  # the citizen and their certificate exist from now on
        expires_at = self.clock() + time_limit
        ticket_id = uuid.uuid4().hex
        inner = {"sp_ticket_id": ticket_id, "transaction_id": body["transaction_id"], "op_code": body["op_code"],
                 "op_mode": op_mode, "expiration_time": int(expires_at * 1000), "hashed_id_num": hash_id(body["id_num"])}
        head = b64url(json.dumps(inner, separators=(",", ":")).encode())
        sp_ticket = head + "." + b64url(hashlib.sha256(head.encode()).digest())
        self.tickets[ticket_id] = SimTicket(ticket_id, sp_ticket, body["transaction_id"], body["sp_service_id"],
                                            body["id_num"], body["op_code"], op_mode, body["hint"], sign_info, expires_at)
        return {"sp_ticket": sp_ticket,
                "idp_checksum": self._idp_checksum(key, body["transaction_id"], "0", sp_ticket)}

    def _field(self, body: dict, name: str) -> str:
        value = body.get(name, "" if name in ("hint", "device_user_def_desc") else None)
        if not isinstance(value, str):
            raise ServiceError("SP-API-ATH-01-INV_PARAM", f"{name} is required")
        return value

    def _check_sp(self, body: dict, fields: list[str]) -> bytes:
        key = self.sps.get(body.get("sp_service_id", ""))
        if key is None:
            raise ServiceError("SP-API-ATH-01-INV_SP_SERVICE_ID", "unknown sp_service_id")
        if not checksum.verify(key, body.get("sp_checksum", ""), *fields):
            raise ServiceError("SP-API-ATH-01-INV_SP_CHECKSUM", "sp_checksum does not match")
        return key

    def _idp_checksum(self, key: bytes, *fields: str) -> str:
        value = checksum.make(key, *fields, iv=bytes(12))  # as the real service: an all-zero IV
        if "tamper_idp_checksum" in self.faults:
            value = value[:-1] + ("0" if value[-1] != "0" else "1")
        return value

    @staticmethod
    def _signed_bytes(sign_info: dict) -> bytes:
        if str(sign_info.get("tbs_encoding", "")).lower() == "base64":
            return base64.b64decode(sign_info["sign_data"])
        return sign_info["sign_data"].encode()

    # -- HTTP ----------------------------------------------------------------------------------
    def app(self) -> Starlette:
        async def service(request: Request) -> Response:
            name = request.path_params["name"]
            handler = {"getSpTicket": self.get_sp_ticket, "requestAthOrSignPush": self.request_push,
                       "getAthOrSignResult": self.get_result}.get(name)
            if handler is None:
                return JSONResponse({"error_code": "SIM_NF", "error_message": "no such API"}, 404)
            try:
                body = await request.json()
                if not isinstance(body, dict):
                    raise ValueError
            except ValueError:
                return JSONResponse({"error_code": "SP-API-ATH-01-INV_PARAM", "error_message": "JSON body"}, 400)
            self.calls.append((name, body))
            try:
                answer = handler(body)
            except ServiceError as exc:
                return JSONResponse({"error_code": exc.code, "error_message": exc.message, "result": None})
            code, result = answer if isinstance(answer, tuple) else ("0", answer)
            return JSONResponse({"error_code": code, "error_message": "" if code == "0" else "waiting",
                                 "result": result or None})

        async def answer(request: Request) -> Response:
            is_form = not request.headers.get("content-type", "").startswith("application/json")
            data = dict(await request.form()) if is_form else await request.json()
            key = data.get("sp_ticket_id") or data.get("sp_ticket") or data.get("transaction_id") or ""
            ticket = self.find(str(key).strip())
            status, outcome = 404, "no such request"
            if ticket is not None:
                try:
                    outcome, status = self.answer(ticket, data.get("decision") == "approve"), 200
                except ValueError as exc:
                    outcome, status = str(exc), 409
            if is_form:
                return RedirectResponse(f"/sim/?said={outcome.replace(' ', '+')}", 303)
            return JSONResponse({"state": outcome} if status == 200 else {"error": outcome}, status)

        async def faults(request: Request) -> Response:
            for name, on in (await request.json()).items():
                (self.faults.add if on else self.faults.discard)(name)
            return JSONResponse(sorted(self.faults))

        async def revoke(request: Request) -> Response:
            id_num = str((await request.json()).get("id_num", ""))
            if not national_id.is_valid(id_num):
                return JSONResponse({"error": "id_num is not a valid national ID number"}, 400)
            self.pki.revoke(id_num, dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc))
            return JSONResponse({"revoked": id_num})

        async def crl(request: Request) -> Response:
            if "crl_unavailable" in self.faults:
                return PlainTextResponse("CRL server down", 503)
            now = dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc)
            return Response(self.pki.crl(now), media_type="application/pkix-crl")

        async def page(request: Request) -> Response:
            return HTMLResponse(self._page(request.query_params.get("said", "")))

        return Starlette(routes=[
            Route("/moise/sp/{name}", service, methods=["POST"]),
            Route("/sim/", page), Route("/sim/answer", answer, methods=["POST"]),
            Route("/sim/faults", faults, methods=["POST"]),
            Route("/sim/ca.pem", lambda r: Response(self.pki.ca_pem(), media_type="application/x-pem-file")),
            Route("/sim/moica.crl", crl), Route("/sim/revoke", revoke, methods=["POST"]),
            Route("/healthz", lambda r: PlainTextResponse("ok")),
        ])

    def _page(self, said: str) -> str:
        now, rows = self.clock(), []
        for t in sorted(self.tickets.values(), key=lambda t: -t.expires_at):
            if t.state != "pending" or now > t.expires_at:
                continue
            buttons = "".join(
                f'<button name="decision" value="{d}">{label}</button>' for d, label in
                (("approve", "確認 Approve"), ("deny", "拒絕 Deny")))
            rows.append(f"<tr><td>{html.escape(t.id_num[:3])}****{html.escape(t.id_num[-3:])}</td>"
                        f"<td>{'推播 push' if t.op_mode == 'PUSH' else 'QR ' + html.escape(t.op_mode)}</td>"
                        f"<td>{html.escape(t.hint)}</td><td>{int(t.expires_at - now)} s</td>"
                        f'<td><form method="post" action="/sim/answer"><input type="hidden" name="sp_ticket_id" '
                        f'value="{t.sp_ticket_id}">{buttons}</form></td></tr>')
        table = "".join(rows) or '<tr><td colspan="5">沒有待確認的請求 / nothing pending</td></tr>'
        note = f"<p><b>{html.escape(said)}</b></p>" if said else ""
        return f"""<!doctype html><html lang="zh-Hant"><meta charset="utf-8">
<meta http-equiv="refresh" content="5; url=/sim/"><title>行動自然人憑證模擬器</title>
<h1>行動自然人憑證 模擬器 / mobile ID simulator</h1>{note}
<p>This page stands in for the citizen's phone. 此頁代替民眾的手機。</p>
<table border="1" cellpadding="4"><tr><th>身分證 ID</th><th>方式 mode</th><th>提示 hint</th>
<th>剩餘 left</th><th></th></tr>{table}</table>
<h2>掃描驗證 / scan a QR code</h2>
<form method="post" action="/sim/answer"><p>Paste the QR code's text (the sp_ticket):</p>
<textarea name="sp_ticket" rows="3" cols="80"></textarea><br>
<button name="decision" value="approve">確認 Approve</button>
<button name="decision" value="deny">拒絕 Deny</button></form></html>"""


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8010)
    parser.add_argument("--sp-service-id", default=os.environ.get("IDP_MOBILEID_SP_SERVICE_ID", DEV_SP_SERVICE_ID))
    parser.add_argument("--key", default=os.environ.get("IDP_MOBILEID_KEY", DEV_KEY), help="64 hex digits or base64")
    parser.add_argument("--state-dir", default="var/mobileid-sim", help="the CA, citizens and trust directory")
    args = parser.parse_args(argv)
    base = f"http://{args.host}:{args.port}"
    pki = Pki(args.state_dir, crl_url=f"{base}/sim/moica.crl")
    trust = pki.write_trust(Path(args.state_dir) / "trust")
    sim = MobileIdSimulator({args.sp_service_id: checksum.parse_key(args.key)}, pki=pki)
    print(f"mobile-ID simulator on {base}/moise/sp/  (the phone: {base}/sim/)\n"
          f"  IDP_MOBILEID_URL={base}/moise/sp/\n  IDP_MOBILEID_SP_SERVICE_ID={args.sp_service_id}\n"
          f"  IDP_MOBILEID_KEY={args.key if args.key == DEV_KEY else '<the --key>'}\n"
          f"  IDP_MOBILEID_TRUST={trust}", flush=True)
    uvicorn.run(sim.app(), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
