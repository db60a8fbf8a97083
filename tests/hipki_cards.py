"""Smart cards and the local signer for browser tests of certificate login (SPEC A3).

A card is a SoftHSM2 token holding a citizen's key pair and certificate from the
test PKI (``tests/pki_fixtures.py``), made with the tools a person would use
(``softhsm2-util --import``, ``pkcs11-tool --write-object``). Each card is made in
a token directory of its own, its drawer; the reader is the token directory the
signer's SoftHSM2 reads, and putting a card in the reader moves its token there
(the signer re-reads the reader at each request, as the HiPKI component notices a
card put in). The signer (``clients/hipki_signer``) runs as its own process, as
the component does on a PC::

    reader = CardReader(tmp / "cards")
    reader.make_leaf(pki, "citizen")                 # or make(label, cert DER, key PEM path)
    with signer(reader, allow_origin="http://localhost:8000") as url:   # http://localhost:PORT
        reader.insert("citizen")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

ROOT = Path(__file__).resolve().parent.parent
SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "123456"
SO_PIN = "87654321"
INSTALL_HINT = "Run `make test`, which installs SoftHSM2 and OpenSC (scripts/bootstrap.sh --test)."
START_TIMEOUT = 30.0


def _conf(directory: Path) -> Path:
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    return conf


class CardReader:
    def __init__(self, root: Path):
        if not Path(SOFTHSM).exists() or shutil.which("pkcs11-tool") is None:
            raise RuntimeError(f"SoftHSM2 or pkcs11-tool is missing. {INSTALL_HINT}")
        self.root = root
        self.conf = _conf(root / "reader")
        self.slot = root / "reader" / "tokens"
        self.drawers: dict[str, Path] = {}
        self.inserted: str | None = None

    def _run(self, conf: Path, *args: str) -> None:
        subprocess.run(args, env={**os.environ, "SOFTHSM2_CONF": str(conf)}, check=True, capture_output=True,
                       timeout=60)

    def make(self, name: str, cert_der: bytes, key_pem: Path, pin: str = PIN) -> None:
        """A card labelled ``name`` with one signing key pair and its certificate (CKA_ID 01)."""
        drawer = self.root / "drawers" / name
        conf = _conf(drawer)
        cert = drawer / "cert.der"
        cert.write_bytes(cert_der)
        self._run(conf, "softhsm2-util", "--init-token", "--free", "--label", name, "--pin", pin, "--so-pin", SO_PIN)
        self._run(conf, "softhsm2-util", "--import", str(key_pem), "--token", name, "--label", "sign", "--id", "01",
                  "--pin", pin)
        self._run(conf, "pkcs11-tool", "--module", SOFTHSM, "--token-label", name, "--login", "--pin", pin,
                  "--write-object", str(cert), "--type", "cert", "--id", "01", "--label", "sign")
        self.drawers[name] = drawer / "tokens"

    def make_leaf(self, pki, leaf: str, label: str | None = None) -> None:
        """A card with the test PKI's ``leaf`` (tests/pki_fixtures.py) on it."""
        self.make(label or leaf, pki.cert(leaf).public_bytes(Encoding.DER), pki.dir / "leaves" / f"{leaf}.key.pem")

    def remove(self) -> None:
        if self.inserted is not None:
            for token in list(self.slot.iterdir()):
                token.rename(self.drawers[self.inserted] / token.name)
            self.inserted = None

    def insert(self, name: str) -> None:
        """Take out whatever card is in the reader, put ``name`` in."""
        self.remove()
        for token in list(self.drawers[name].iterdir()):
            token.rename(self.slot / token.name)
        self.inserted = name


@contextlib.contextmanager
def desk(root: Path):
    """(test PKI with its OCSP/CRL responders running, an empty card reader) under ``root``."""
    from tests.pki_fixtures import start_test_pki

    pki = start_test_pki(root / "pki")
    try:
        yield pki, CardReader(root / "cards")
    finally:
        pki.server.stop()


@contextlib.contextmanager
def signer(reader: CardReader, allow_origin: str):
    """``python -m clients.hipki_signer`` on a free loopback port over ``reader``; yields its URL
    as pages name it (``http://localhost:PORT``)."""
    env = {**os.environ, "SOFTHSM2_CONF": str(reader.conf), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "clients.hipki_signer", "--module", SOFTHSM, "--port", "0",
         "--allow-origin", allow_origin],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = _first_line(proc)
        if "listening on http://127.0.0.1:" not in line:
            raise RuntimeError(f"the signer did not start: {line}{proc.stdout.read() if proc.poll() is not None else ''}")
        port = line.rsplit(":", 1)[1].strip()
        # Keep reading its log so that a full pipe never blocks it.
        threading.Thread(target=lambda: [None for _ in proc.stdout], name="signer log", daemon=True).start()
        yield f"http://localhost:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _first_line(proc: subprocess.Popen) -> str:
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(START_TIMEOUT)
    if not out:
        raise RuntimeError(f"the signer printed nothing within {START_TIMEOUT} s")
    return out[0]
