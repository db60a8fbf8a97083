"""Trust anchor sets: which CAs may issue login certificates, for which accounts.

A directory (``keys/trust/`` by default) holds PEM certificates and an
``anchors.toml`` that groups them::

    [[anchor_set]]
    name = "moica"                      # reported back as CertificateIdentity.anchor_set
    kinds = ["personal"]                # account kinds this set may log in
    roots = ["GRCA-G3.pem", "GRCA-G2.pem"]        # self-signed trust anchors
    issuers = ["MOICA-G3.pem", "MOICA-G2.pem"]    # CAs allowed to issue the leaf
    # org_id_oid = "2.16.886.1.100.2.102"  # where the organisation id sits (XCA/GCA)

Why two lists: GRCA is the root of MOICA (citizens) and of GCA/XCA
(organisations) alike, so trusting GRCA alone would let an organisation
certificate log in a personal account. A set therefore pins the *issuing* CA
as well, and a path only counts for the set whose issuer signed the leaf.
No certificate is ever fetched from the network (no AIA chasing): the path
is built only from these files.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from asn1crypto import pem, x509

KINDS = frozenset({"personal", "aa"})
MAX_REMEMBERED = 50_000  # validated paths kept per process (a few MB)


@functools.lru_cache(maxsize=4096)
def _name_key(der: bytes) -> str:
    return x509.Name.load(der).hashable


def same_name(a: x509.Name, b: x509.Name) -> bool:
    """RFC 5280 name equality, fast. asn1crypto's ``==`` string-preps every value
    (about a millisecond for a Chinese DN) on each call; the names a login compares
    are a few CA names, so: the same bytes, or the prepared form cached per encoding."""
    da, db = a.dump(), b.dump()
    return da == db or _name_key(da) == _name_key(db)


@dataclass(frozen=True)
class AnchorSet:
    name: str
    kinds: frozenset[str]
    roots: tuple[x509.Certificate, ...]
    issuers: tuple[x509.Certificate, ...]
    org_id_oid: str | None = None

    def issuer_of(self, leaf: x509.Certificate) -> x509.Certificate | None:
        """The pinned CA whose name and key identifier match the leaf's issuer.

        MOICA G2 and G3 share one DN: the key identifier tells them apart."""
        return _signer(leaf, self.issuers)

    def root_of(self, ca: x509.Certificate) -> x509.Certificate | None:
        """The root that issued pinned CA ``ca`` (GRCA G2 or G3 for MOICA G2 or G3)."""
        return _signer(ca, self.roots)


def _signer(cert: x509.Certificate, among) -> x509.Certificate | None:
    aki = cert.authority_key_identifier
    for ca in among:
        if same_name(ca.subject, cert.issuer) and (aki is None or ca.key_identifier is None or ca.key_identifier == aki):
            return ca
    return None


@dataclass(frozen=True)
class TrustStore:
    sets: tuple[AnchorSet, ...]
    directory: Path | None = None
    # (leaf SHA-256, set name) -> (from, until): a path validated once holds while every
    # certificate on it is within its dates (the rest of the check does not depend on time),
    # so a returning card costs a lookup here instead of a path validation.
    validated: dict = field(default_factory=dict, compare=False, repr=False)

    def remember(self, leaf_sha256: bytes, set_name: str, start: datetime, end: datetime) -> None:
        if len(self.validated) >= MAX_REMEMBERED:
            self.validated.clear()
        self.validated[(leaf_sha256, set_name)] = (start, end)

    def candidates(self, leaf: x509.Certificate, kind: str | None = None) -> list[tuple[AnchorSet, x509.Certificate]]:
        """Anchor sets (serving ``kind``, if given) that pin the leaf's issuer."""
        out = []
        for s in self.sets:
            if kind is not None and kind not in s.kinds:
                continue
            ca = s.issuer_of(leaf)
            if ca is not None:
                out.append((s, ca))
        return out

    def get(self, name: str) -> AnchorSet:
        for s in self.sets:
            if s.name == name:
                return s
        raise KeyError(name)


def read_certificates(path: Path) -> list[x509.Certificate]:
    """Every certificate in a PEM (possibly several) or DER file."""
    data = path.read_bytes()
    if not pem.detect(data):
        return [x509.Certificate.load(data)]
    return [x509.Certificate.load(der) for kind, _, der in pem.unarmor(data, multiple=True) if kind == "CERTIFICATE"]


def load_trust(directory: str | Path) -> TrustStore:
    """Read ``anchors.toml`` and the PEMs it names; refuse anything inconsistent."""
    directory = Path(directory)
    where = f"trust directory {directory.resolve()}"
    try:
        config = tomllib.loads((directory / "anchors.toml").read_text("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{where} has no anchors.toml (the repository's keys/trust holds the real GRCA/MOICA "
                         "set)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{where}: anchors.toml: {exc}") from None
    if not config.get("anchor_set"):
        raise ValueError(f"{where}: anchors.toml defines no [[anchor_set]]: no certificate could log in")
    sets = []
    for entry in config.get("anchor_set", []):
        name = entry["name"]
        kinds = frozenset(entry.get("kinds", []))
        if not kinds or not kinds <= KINDS:
            raise ValueError(f"anchor set {name}: kinds must be a non-empty subset of {sorted(KINDS)}")
        try:
            roots = tuple(c for f in entry["roots"] for c in read_certificates(directory / f))
            issuers = tuple(c for f in entry["issuers"] for c in read_certificates(directory / f))
        except (KeyError, OSError) as exc:
            raise ValueError(f"{where}: anchor set {name}: {exc}") from None
        if not roots or not issuers:
            raise ValueError(f"{where}: anchor set {name} needs at least one root and one issuer")
        for c in roots:
            if c.self_signed == "no":
                raise ValueError(f"anchor set {name}: root {c.subject.human_friendly} is not self-signed")
        for c in issuers:
            if not c.ca:
                raise ValueError(f"anchor set {name}: issuer {c.subject.human_friendly} is not a CA")
        sets.append(AnchorSet(name, kinds, roots, issuers, entry.get("org_id_oid")))
    if len({s.name for s in sets}) != len(sets):
        raise ValueError("anchor set names must be unique")
    return TrustStore(tuple(sets), directory)


async def check_issuers(trust: TrustStore, now: datetime) -> dict[str, list[str]]:
    """Validate every pinned issuing CA up to its set's roots at ``now``.

    The ``openssl verify -CAfile ROOT CA.pem`` of the whole configuration: run
    it at start-up or in a health check so a wrong file fails loudly, not at
    the first card login. Returns {set name: [problems]} (empty lists: all good)."""
    from pyhanko_certvalidator import CertificateValidator, ValidationContext

    report: dict[str, list[str]] = {}
    for s in trust.sets:
        problems = []
        for ca in s.issuers:
            ctx = ValidationContext(trust_roots=list(s.roots), moment=now, allow_fetching=False)
            try:
                await CertificateValidator(ca, validation_context=ctx).async_validate_usage({"key_cert_sign"})
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                problems.append(f"{ca.subject.human_friendly}: {exc}")
        report[s.name] = problems
    return report
