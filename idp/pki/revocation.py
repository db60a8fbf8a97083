"""Is this certificate revoked? OCSP when the certificate names a responder, else its CRL.

Policy (``RevocationPolicy.mode``):

* ``hard-fail``: no trustworthy answer (responder down, bad signature, stale
  CRL) refuses the login with ``RevocationUnavailable``.
* ``soft-fail``: the same case lets the login through and logs a WARNING on
  the ``idp.pki`` logger naming the certificate and what failed. A
  *revoked* answer is always refused, whatever the mode.
* ``off``: no check (development only).

CRLs are downloaded once per ``nextUpdate`` and indexed by serial number:
MOICA's complete CRL lists over 100k certificates, so the entries are walked
once with a minimal DER reader (asn1crypto would build 100k objects) into a
dict, and a login costs one dict lookup. With a ``directory``, each downloaded
CRL is also kept on disk (one file per URL), so a restarted process reads it
back instead of downloading it again; a file is believed only as a download
is: after its signature verifies against the issuing CA, and while fresh. Responses (CRLs and OCSP) are only
believed after their signature verifies against the issuing CA, or for OCSP
a responder certificate that CA delegated with id-kp-OCSPSigning; an OCSP answer
must also echo the request's nonce. A CRL clears a certificate only when its
scope covers it (IssuingDistributionPoint, RFC 5280 6.3.3): the one of the
certificate's distribution point, for all reasons. A CRL with a critical
extension, or a critical entry extension, this checker does not process (RFC
5280 5.2, 5.3) is not used at all: as an unreachable one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from asn1crypto import algos, crl, ocsp, x509

from . import sig
from .errors import Revoked, RevocationUnavailable
from .trust import same_name

try:  # the project depends on httpx2; plain httpx has the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

log = logging.getLogger("idp.pki")


@dataclass(frozen=True)
class RevocationPolicy:
    mode: str = "hard-fail"  # "hard-fail" | "soft-fail" | "off"
    prefer_ocsp: bool = True  # OCSP first when the certificate's AIA names a responder
    timeout: float = 5.0  # seconds per HTTP request
    skew: timedelta = timedelta(minutes=5)  # tolerated clock difference with responders
    max_age: timedelta = timedelta(hours=24)  # for OCSP answers and CRLs without nextUpdate
    retry_after: timedelta = timedelta(seconds=60)  # don't re-download a CRL that just failed

    def __post_init__(self):
        if self.mode not in ("hard-fail", "soft-fail", "off"):
            raise ValueError(f"revocation mode {self.mode!r}")


@dataclass(frozen=True)
class RevocationStatus:
    status: str  # "good" | "unavailable" (soft-failed) | "not_checked"
    source: str | None = None  # "ocsp" | "crl"
    detail: str = ""


class _Unavailable(Exception):
    """This source gave no trustworthy answer; try the next one."""


# -- CRL -------------------------------------------------------------------

def _der_header(buf: bytes, i: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the DER element at ``i``."""
    tag = buf[i]
    n = buf[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(buf[i:i + k], "big")
        i += k
    return tag, i, i + n


# The CRL entry extensions a lookup processes: a listed certificate is revoked, whatever its reason
# or dates. A critical one of any other kind (RFC 5280 5.3) makes the whole CRL unusable.
ENTRY_UNDERSTOOD = frozenset({"crl_reason", "invalidity_date"})


def _flags_critical(buf: bytes, i: int, end: int) -> bool:
    """Whether the crlEntryExtensions in ``buf[i:end]`` (if any) mark one critical: each is
    SEQUENCE {extnID, critical BOOLEAN DEFAULT FALSE, extnValue}."""
    if i >= end:
        return False
    _, j, stop = _der_header(buf, i)
    while j < stop:
        _, k, following = _der_header(buf, j)
        flag = _der_header(buf, k)[2]  # after extnID
        if buf[flag] == 0x01 and buf[flag + 2] != 0:
            return True
        j = following
    return False


def index_revoked(contents: bytes) -> dict[int, tuple[int, int]]:
    """Serial -> (start, end) of its entry in the revokedCertificates contents.

    Only the serial is decoded here; the rest of an entry (date, reason) is
    parsed on a hit, which happens once per revoked login, not per entry. An
    entry that flags an extension critical is parsed whole, to refuse a CRL
    with a critical entry extension this checker does not process."""
    index = {}
    i, end = 0, len(contents)
    while i < end:
        tag, start, stop = _der_header(contents, i)
        if tag != 0x30:
            raise ValueError("bad CRL entry")
        itag, vstart, vstop = _der_header(contents, start)
        if itag != 0x02:
            raise ValueError("bad CRL entry serial")
        if _flags_critical(contents, _der_header(contents, vstop)[2], stop):  # what follows revocationDate
            critical = crl.RevokedCertificate.load(contents[i:stop]).critical_extensions
            if unknown := critical - ENTRY_UNDERSTOOD:
                raise ValueError(f"CRL entry has critical extensions this checker does not process: "
                                 f"{', '.join(sorted(unknown))}")
        index[int.from_bytes(contents[vstart:vstop], "big", signed=True)] = (i, stop)
        i = stop
    return index


@dataclass
class IndexedCRL:
    url: str
    issuer: x509.Name
    this_update: datetime
    next_update: datetime | None
    scope: crl.IssuingDistributionPoint | None  # None: a complete CRL
    entries: bytes = field(repr=False)
    index: dict[int, tuple[int, int]] = field(repr=False)

    def lookup(self, serial: int) -> crl.RevokedCertificate | None:
        hit = self.index.get(serial)
        if hit is None:
            return None
        return crl.RevokedCertificate.load(self.entries[hit[0]:hit[1]])

    def __len__(self):
        return len(self.index)


# The CRL extensions ``parse_crl`` processes (a critical one of any other kind makes it unusable).
UNDERSTOOD = frozenset({"authority_key_identifier", "crl_number", "issuing_distribution_point"})


def parse_crl(der: bytes, issuer: x509.Certificate, url: str = "") -> IndexedCRL:
    """Verify a CRL's signature against ``issuer`` and index it (CPU-bound: run in a thread)."""
    cl = crl.CertificateList.load(der)
    tbs = cl["tbs_cert_list"]
    if not same_name(tbs["issuer"], issuer.subject):
        raise ValueError("CRL issuer is not the certificate's issuer")
    aki = cl.authority_key_identifier
    if aki is not None and issuer.key_identifier is not None and aki != issuer.key_identifier:
        raise ValueError("CRL signed by another key of that CA")
    if cl.delta_crl_indicator_value is not None:
        raise ValueError("delta CRLs are not supported")
    if unknown := cl.critical_extensions - UNDERSTOOD:  # RFC 5280 5.2: it may narrow what the CRL covers
        raise ValueError(f"CRL has critical extensions this checker does not process: {', '.join(sorted(unknown))}")
    idp = cl.issuing_distribution_point_value
    if idp is not None and idp["indirect_crl"].native:
        raise ValueError("indirect CRLs are not supported")
    if not sig.check(issuer.public_key, cl["signature_algorithm"], cl["signature"].native, tbs.dump()):
        raise ValueError("CRL signature invalid")
    revoked = tbs["revoked_certificates"]
    entries = revoked.contents if revoked.contents is not None else b""
    next_update = tbs["next_update"].native if tbs["next_update"] else None
    return IndexedCRL(url, tbs["issuer"], tbs["this_update"].native, next_update, idp, entries,
                      index_revoked(entries))


ALL_REASONS = frozenset({"key_compromise", "ca_compromise", "affiliation_changed", "superseded",
                         "cessation_of_operation", "certificate_hold", "privilege_withdrawn", "aa_compromise"})


def _reasons(flags: x509.ReasonFlags) -> set[str]:
    """The reasons an optional ReasonFlags field names; absent, it names them all."""
    return set(ALL_REASONS if flags.native is None else flags.native)


def _names(point: x509.DistributionPointName) -> set[bytes]:
    """The names of a distribution point, as DER. A name relative to the CRL issuer is none of the
    URLs a CRL is fetched from, so it matches nothing here."""
    return {n.dump() for n in point.chosen} if point.name == "full_name" else set()


def out_of_scope(c: IndexedCRL, cert: x509.Certificate, dp: x509.DistributionPoint) -> str | None:
    """Why ``c``, fetched for ``cert``'s distribution point ``dp``, does not cover ``cert`` (RFC 5280
    6.3.3 (b)(2) and (d)), or None. A certificate missing from a CRL that leaves it out (another
    partition, the CA's ARL, a list for some reasons) is not thereby good."""
    reasons = _reasons(dp["reasons"])
    idp = c.scope
    if idp is not None:
        if idp["distribution_point"].native is not None and not (
                _names(idp["distribution_point"]) & _names(dp["distribution_point"])):
            return "it is the CRL of another distribution point"
        if idp["only_contains_attribute_certs"].native:
            return "it lists attribute certificates only"
        if idp["only_contains_ca_certs"].native and not cert.ca:
            return "it lists CA certificates only"
        if idp["only_contains_user_certs"].native and cert.ca:
            return "it lists end-entity certificates only"
        reasons &= _reasons(idp["only_some_reasons"])
    if reasons != ALL_REASONS:  # one CRL per check: it must cover every reason alone
        return f"it covers only the reasons {', '.join(sorted(reasons)) or 'none'}"
    return None


class CRLCache:
    """Downloaded, verified, indexed CRLs by URL, refreshed after their nextUpdate."""

    def __init__(self, http: httpx.AsyncClient, policy: RevocationPolicy, directory: str | Path | None = None):
        self.http = http
        self.policy = policy
        self.directory = Path(directory) if directory else None
        self._crls: dict[str, IndexedCRL] = {}
        self._failed: dict[str, datetime] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _fresh(self, c: IndexedCRL | None, now: datetime) -> bool:
        if c is None:
            return False
        if c.next_update is None:  # RFC 5280 requires it; without it, believed no longer than an OCSP answer
            return now <= c.this_update + self.policy.max_age
        return now <= c.next_update + self.policy.skew

    async def get(self, url: str, issuer: x509.Certificate, now: datetime) -> IndexedCRL:
        c = self._crls.get(url)
        if self._fresh(c, now) and same_name(c.issuer, issuer.subject):
            return c
        async with self._locks.setdefault(url, asyncio.Lock()):
            c = self._crls.get(url)
            if self._fresh(c, now) and same_name(c.issuer, issuer.subject):
                return c
            if self.directory is not None:  # kept by an earlier run, or a newer one by another process
                c = await asyncio.to_thread(self._read, url, issuer, now)
                if c is not None:
                    self._crls[url] = c
                    log.info("CRL %s read from %s: %d entries, next update %s", url, self.directory, len(c),
                             c.next_update)
                    return c
            failed = self._failed.get(url)
            if failed is not None and now - failed < self.policy.retry_after:
                raise _Unavailable(f"CRL {url} failed recently")
            try:
                resp = await self.http.get(url, timeout=self.policy.timeout)
                resp.raise_for_status()
                c = await asyncio.to_thread(parse_crl, resp.content, issuer, url)
                # The same list again would not help: wait as after a failed download.
                if c.this_update > now + self.policy.skew:
                    raise ValueError(f"not valid yet (thisUpdate {c.this_update})")
                if not self._fresh(c, now):
                    raise ValueError(f"stale (thisUpdate {c.this_update}, nextUpdate {c.next_update})")
            except Exception as exc:  # network, HTTP status, parse, signature, dates
                self._failed[url] = now
                raise _Unavailable(f"CRL {url}: {exc}") from exc
            self._failed.pop(url, None)
            self._crls[url] = c
            log.info("CRL %s loaded: %d entries, next update %s", url, len(c), c.next_update)
            if self.directory is not None:
                await asyncio.to_thread(self.keep, url, resp.content)
            return c

    def drop(self, url: str, now: datetime) -> None:
        """Forget the CRL of ``url`` as after a failed download (fetched again after ``retry_after``):
        one an attacker served once is not kept in place of the right one until its nextUpdate."""
        self._crls.pop(url, None)
        self._failed[url] = now
        if self.directory is not None:
            try:
                self._file(url).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("CRL %s not removed from %s: %s", url, self.directory, exc)

    def _file(self, url: str) -> Path:
        return self.directory / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".crl")

    def _read(self, url: str, issuer: x509.Certificate, now: datetime) -> IndexedCRL | None:
        """The kept CRL of ``url``, if it verifies and is fresh (else None: download)."""
        path = self._file(url)
        try:
            c = parse_crl(path.read_bytes(), issuer, url)
        except FileNotFoundError:
            return None
        except Exception as exc:  # a CA re-keyed, a truncated file: download instead
            log.warning("kept CRL %s for %s not used: %s", path, url, exc)
            return None
        return c if self._fresh(c, now) and c.this_update <= now + self.policy.skew else None

    def keep(self, url: str, der: bytes) -> None:
        """Keep a CRL for ``url`` on disk (a verified download, or one an operator fetched: it is
        verified when read). Written aside and renamed, as processes share the directory."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self._file(url)
            part = path.with_name(f".{path.name}.{os.getpid()}")
            part.write_bytes(der)
            part.replace(path)
        except OSError as exc:  # the cache is an optimisation: the login goes on
            log.warning("CRL %s not kept in %s: %s", url, self.directory, exc)


# -- OCSP ------------------------------------------------------------------

def cert_id(cert: x509.Certificate, issuer: x509.Certificate) -> ocsp.CertId:
    """SHA-1 CertID (RFC 6960: an identifier, not a signature; what responders expect)."""
    return ocsp.CertId({
        "hash_algorithm": algos.DigestAlgorithm({"algorithm": "sha1"}),
        "issuer_name_hash": hashlib.sha1(cert.issuer.dump()).digest(),
        "issuer_key_hash": issuer.public_key.sha1,
        "serial_number": cert.serial_number,
    })


def build_ocsp_request(cert: x509.Certificate, issuer: x509.Certificate, nonce: bytes | None) -> bytes:
    tbs = {"request_list": [{"req_cert": cert_id(cert, issuer)}]}
    if nonce is not None:
        tbs["request_extensions"] = [{"extn_id": "nonce", "critical": False, "extn_value": nonce}]
    return ocsp.OCSPRequest({"tbs_request": tbs}).dump()


def _valid_at(cert: x509.Certificate, now: datetime) -> bool:
    v = cert["tbs_certificate"]["validity"]
    return v["not_before"].native <= now <= v["not_after"].native


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        return sig.check(issuer.public_key, cert["signature_algorithm"], cert["signature_value"].native,
                         cert["tbs_certificate"].dump())
    except ValueError:
        return False


def _responder_key(basic: ocsp.BasicOCSPResponse, issuer: x509.Certificate, now: datetime):
    """The key that may sign this response: the CA itself, or a delegate it certified."""
    rid = basic["tbs_response_data"]["responder_id"]

    def named(c: x509.Certificate) -> bool:
        if rid.name == "by_key":
            return rid.chosen.native == c.public_key.sha1
        return same_name(rid.chosen, c.subject)

    if named(issuer):
        return issuer.public_key
    for c in basic["certs"] or []:
        if not named(c):
            continue
        if not same_name(c.issuer, issuer.subject) or not _signed_by(c, issuer):
            raise ValueError("OCSP responder certificate not issued by the certificate's CA")
        if "ocsp_signing" not in (c.extended_key_usage_value.native if c.extended_key_usage_value else []):
            raise ValueError("OCSP responder certificate lacks id-kp-OCSPSigning")
        if not _valid_at(c, now):
            raise ValueError("OCSP responder certificate expired")
        return c.public_key
    raise ValueError("OCSP response signed by an unknown responder")


def check_ocsp_response(der: bytes, cert: x509.Certificate, issuer: x509.Certificate, now: datetime,
                        policy: RevocationPolicy, nonce: bytes | None):
    """('good'|'revoked', SingleResponse) from a verified response, else ValueError.
    ``nonce``: the one the request sent, which the response must echo."""
    resp = ocsp.OCSPResponse.load(der)
    status = resp["response_status"].native
    if status != "successful":
        raise ValueError(f"OCSP responder says {status}")
    if resp["response_bytes"]["response_type"].native != "basic_ocsp_response":
        raise ValueError("not a basic OCSP response")
    basic = resp["response_bytes"]["response"].parsed
    tbs = basic["tbs_response_data"]
    key = _responder_key(basic, issuer, now)
    if not sig.check(key, basic["signature_algorithm"], basic["signature"].native, tbs.dump()):
        raise ValueError("OCSP response signature invalid")
    if nonce is not None:  # without it, a signed answer from before a revocation could be replayed
        echoed = [ext["extn_value"].parsed.native for ext in tbs["response_extensions"] or []
                  if ext["extn_id"].native == "nonce"]
        if not echoed:
            raise ValueError("OCSP response carries no nonce (replayed, or the responder does not echo it)")
        if echoed != [nonce]:
            raise ValueError("OCSP nonce mismatch (replayed response)")
    for single in tbs["responses"]:
        cid = single["cert_id"]
        if cid["serial_number"].native != cert.serial_number:
            continue
        algo = cid["hash_algorithm"]["algorithm"].native
        h = getattr(hashlib, algo)
        if (cid["issuer_name_hash"].native != h(cert.issuer.dump()).digest()
                or cid["issuer_key_hash"].native != h(bytes(issuer.public_key["public_key"])).digest()):
            continue
        this_update = single["this_update"].native
        next_update = single["next_update"].native
        if this_update > now + policy.skew:
            raise ValueError("OCSP response from the future")
        if next_update is not None and next_update < now - policy.skew:
            raise ValueError("OCSP response expired")
        if next_update is None and now - this_update > policy.max_age:
            raise ValueError("OCSP response too old")
        state = single["cert_status"].name
        if state == "unknown":
            raise ValueError("OCSP responder does not know this certificate")
        return state, single
    raise ValueError("OCSP response does not cover this certificate")


# -- the checker -----------------------------------------------------------

class RevocationChecker:
    """Checks a leaf against its issuing CA under one policy; holds the CRL cache."""

    def __init__(self, policy: RevocationPolicy | None = None, http: httpx.AsyncClient | None = None,
                 crl_dir: str | Path | None = None):
        self.policy = policy or RevocationPolicy()
        self.http = http or httpx.AsyncClient(follow_redirects=False)
        self.crls = CRLCache(self.http, self.policy, crl_dir)

    async def aclose(self):
        await self.http.aclose()

    async def _ocsp(self, url: str, cert, issuer, now):
        nonce = os.urandom(16)
        try:
            resp = await self.http.post(url, content=build_ocsp_request(cert, issuer, nonce),
                                        headers={"Content-Type": "application/ocsp-request"},
                                        timeout=self.policy.timeout)
            resp.raise_for_status()
            state, single = check_ocsp_response(resp.content, cert, issuer, now, self.policy, nonce)
        except Exception as exc:
            raise _Unavailable(f"OCSP {url}: {exc}") from exc
        if state == "revoked":
            # Whatever its time: a revocation the CA's clock puts a little ahead of ours is
            # still a revocation, and a login is always checked as of now.
            info = single["cert_status"].chosen
            when = info["revocation_time"].native
            reason = info["revocation_reason"].native if info["revocation_reason"] else "unspecified"
            raise Revoked(f"revoked {when:%Y-%m-%d} ({reason}), says OCSP {url}")
        return "ocsp"

    async def _crl(self, dp: x509.DistributionPoint, cert, issuer, now):
        url = dp.url
        c = await self.crls.get(url, issuer, now)
        why = out_of_scope(c, cert, dp)
        if why is not None:
            self.crls.drop(url, now)
            raise _Unavailable(f"CRL {url} out of scope: {why}")
        entry = c.lookup(cert.serial_number)
        if entry is not None:  # listed is revoked, whatever the date (as OCSP above)
            raise Revoked(f"revoked {entry['revocation_date'].native:%Y-%m-%d}, listed in CRL {url}")
        return "crl"

    async def check(self, cert: x509.Certificate, issuer: x509.Certificate, now: datetime,
                    ocsp: bool = True) -> RevocationStatus:
        """Good, or soft-failed; raises ``Revoked`` / ``RevocationUnavailable``. Without
        ``ocsp``, by the CRLs alone."""
        if self.policy.mode == "off":
            return RevocationStatus("not_checked")
        ocsp_sources = [(self._ocsp, u) for u in cert.ocsp_urls if u.startswith("http")] if ocsp else []
        crl_sources = [(self._crl, dp) for dp in cert.crl_distribution_points if dp.url and dp.url.startswith("http")]
        sources = ocsp_sources + crl_sources if self.policy.prefer_ocsp else crl_sources + ocsp_sources
        failures = []
        for method, where in sources:
            try:
                return RevocationStatus("good", await method(where, cert, issuer, now))
            except _Unavailable as exc:
                failures.append(str(exc))
        detail = "; ".join(failures) or "certificate names no OCSP responder or CRL"
        who = f"serial {cert.serial_number:x} of {cert.issuer.human_friendly}"
        if self.policy.mode == "hard-fail":
            log.error("revocation unknown for %s, refused (hard-fail): %s", who, detail)
            raise RevocationUnavailable(detail)
        log.warning("revocation unknown for %s, ACCEPTED under soft-fail: %s", who, detail)
        return RevocationStatus("unavailable", None, detail)
