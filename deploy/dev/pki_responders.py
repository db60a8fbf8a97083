"""Local CRL endpoint and OCSP responder for the test PKI (deploy/dev/testpki.py).

``python -m deploy.dev.pki_responders OUTDIR [--port 8089]`` serves, on loopback:

* ``GET  /crl/<ca>.crl``  a CRL freshly signed by that CA's key (nextUpdate +1 day)
* ``POST /ocsp/<ca>``     OCSP (RFC 6960, application/ocsp-request), signed by the
  CA's delegated responder when the manifest names one, else by the CA; the
  request's nonce is echoed
* ``GET  /certs/<ca>.crt`` the CA certificate (AIA caIssuers)

Everything is signed per request from ``pki.json``, so the provider's
revocation code runs exactly as against MOICA. ``ResponderServer.hits``
counts requests by path (tests assert which source was asked);
``ResponderServer.down`` makes it answer 503 (responder outage).
"""

from __future__ import annotations

import argparse
import json
import threading
from collections import Counter
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

REASONS = {r.name: r for r in x509.ReasonFlags}


class PKIState:
    def __init__(self, outdir: str | Path, clock=lambda: datetime.now(timezone.utc)):
        self.dir = Path(outdir)
        self.clock = clock
        self.manifest = json.loads((self.dir / "pki.json").read_text("utf-8"))

    def cert(self, name: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.dir / "ca" / f"{name}.pem").read_bytes())

    def key(self, name: str):
        return serialization.load_pem_private_key((self.dir / "ca" / f"{name}.key.pem").read_bytes(), None)

    def revoked(self, ca: str) -> dict[int, dict]:
        return {r["serial"]: r for r in self.manifest["revoked"].get(ca, [])}

    def issued(self, ca: str) -> set[int]:
        return {leaf["serial"] for leaf in self.manifest["leaves"].values() if leaf["ca"] == ca}

    def crl(self, ca: str) -> bytes:
        now = self.clock()
        b = (x509.CertificateRevocationListBuilder().issuer_name(self.cert(ca).subject)
             .last_update(now - timedelta(minutes=1)).next_update(now + timedelta(days=1))
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key(ca).public_key()), False)
             .add_extension(x509.CRLNumber(int(now.timestamp())), False))
        for serial, r in self.revoked(ca).items():
            entry = (x509.RevokedCertificateBuilder().serial_number(serial)
                     .revocation_date(datetime.fromisoformat(r["date"]))
                     .add_extension(x509.CRLReason(REASONS[r["reason"]]), False))
            if "critical_extension" in r:  # an OID no checker knows, to test RFC 5280 5.3
                entry = entry.add_extension(x509.UnrecognizedExtension(
                    x509.ObjectIdentifier(r["critical_extension"]), b"\x05\x00"), True)
            b = b.add_revoked_certificate(entry.build())
        return b.sign(self.key(ca), hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    def ocsp(self, ca: str, request_der: bytes) -> bytes:
        try:
            req = ocsp.load_der_ocsp_request(request_der)
        except ValueError:
            return ocsp.OCSPResponseBuilder.build_unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST).public_bytes(
                serialization.Encoding.DER)
        now = self.clock()

        revoked = self.revoked(ca)
        if req.serial_number in revoked:
            r = revoked[req.serial_number]
            status, when, reason = ocsp.OCSPCertStatus.REVOKED, datetime.fromisoformat(r["date"]), REASONS[r["reason"]]
        elif req.serial_number in self.issued(ca):
            status, when, reason = ocsp.OCSPCertStatus.GOOD, None, None
        else:
            status, when, reason = ocsp.OCSPCertStatus.UNKNOWN, None, None
        signer_name = self.manifest["cas"][ca]["ocsp_signer"] or ca
        signer_cert, signer_key = self.cert(signer_name), self.key(signer_name)
        b = ocsp.OCSPResponseBuilder().add_response_by_hash(
            req.issuer_name_hash, req.issuer_key_hash, req.serial_number, req.hash_algorithm, status,
            now - timedelta(minutes=1), now + timedelta(hours=4), when, reason,
        ).responder_id(ocsp.OCSPResponderEncoding.HASH, signer_cert)
        if signer_name != ca:
            b = b.certificates([signer_cert])
        for ext in req.extensions:
            if isinstance(ext.value, x509.OCSPNonce):
                b = b.add_extension(ext.value, critical=False)
        return b.sign(signer_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


class _Handler(BaseHTTPRequestHandler):
    server: "ResponderServer"

    def log_message(self, *args):  # quiet: tests read .hits instead
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/octet-stream"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.server.hits[self.path] += 1
        if self.server.down:
            return self._send(503)
        parts = self.path.strip("/").split("/")
        try:
            if len(parts) == 2 and parts[0] == "crl" and parts[1].endswith(".crl"):
                return self._send(200, self.server.state.crl(parts[1][:-4]), "application/pkix-crl")
            if len(parts) == 2 and parts[0] == "certs" and parts[1].endswith(".crt"):
                cert = self.server.state.cert(parts[1][:-4])
                return self._send(200, cert.public_bytes(serialization.Encoding.DER), "application/pkix-cert")
        except (FileNotFoundError, KeyError):
            pass
        self._send(404)

    def do_POST(self):
        self.server.hits[self.path] += 1
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.server.down:
            return self._send(503)
        parts = self.path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "ocsp" and parts[1] in self.server.state.manifest["cas"]:
            return self._send(200, self.server.state.ocsp(parts[1], body), "application/ocsp-response")
        self._send(404)


class ResponderServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), _Handler)
        self.state: PKIState | None = None
        self.hits: Counter[str] = Counter()
        self.down = False
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def load(self, outdir, clock=None) -> "ResponderServer":
        """Serve the PKI in ``outdir`` (generated after binding, so its URLs name our port)."""
        self.state = PKIState(outdir, clock) if clock else PKIState(outdir)
        return self

    def start(self) -> "ResponderServer":
        self._thread = threading.Thread(target=self.serve_forever, name="pki-responders", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self.shutdown()
        self.server_close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("outdir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8089)
    a = p.parse_args(argv)
    server = ResponderServer(a.host, a.port).load(a.outdir)
    print(f"CRL and OCSP for {a.outdir} on {server.url}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
