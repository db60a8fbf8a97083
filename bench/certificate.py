"""What a certificate login costs the provider, without the network (issue 4).

    .venv/bin/python bench/certificate.py [--logins 300] [--crl-entries 100000]

1. Makes the test PKI (``deploy/dev/testpki.py``: the real MOICA profile, RSA-2048)
   and a CRL of the test MOICA with ``--crl-entries`` revoked serials, MOICA's size.
2. Keeps that CRL, and the root's CRL of its CAs, where ``IDP_CRL_CACHE_DIR`` would
   (``CRLCache.keep``), and starts a revocation checker on that directory whose HTTP
   client goes through a proxy nobody listens on: any download would fail the login
   (hard-fail), so none happens.
3. Times ``idp.pki.verify_signature`` of a HiPKI-shaped CMS signature over a fresh
   challenge, as a card login does: signature, path to the pinned MOICA, key usage,
   and the CRL lookups (the card's, and MOICA's on the root's). The first login after
   a restart also reads, verifies and indexes the kept CRLs: timed apart. Target:
   under 5 ms per login.
4. Times ``IndexedCRL.lookup`` (a hit and a miss) on CRLs of 1k, 10k and
   ``--crl-entries`` entries: constant time, whatever the size.

Writes ``bench/results/<date>-certificate.{json,md}``. One core, one process: the
figures are CPU time of this machine, to compare with each other, not with others.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asn1crypto import x509 as ax509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from deploy.dev import testpki  # noqa: E402
from idp.pki import RevocationChecker, RevocationPolicy, load_trust, verify_signature  # noqa: E402
from idp.pki.revocation import httpx, parse_crl  # noqa: E402
from tests.pki_fixtures import TestPKI  # noqa: E402

TARGET_MS = 5.0
OFFLINE = "http://127.0.0.1:9"  # a proxy nobody listens on: the bench must not need the network


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"n": len(samples), "median_ms": ms(statistics.median(ordered)),
            "p95_ms": ms(ordered[math.ceil(len(ordered) * 0.95) - 1]), "max_ms": ms(ordered[-1])}


async def logins(pki: TestPKI, crl_dir: Path, crl_url: str, count: int, now: dt.datetime) -> dict:
    trust = load_trust(pki.dir / "trust")
    checker = RevocationChecker(RevocationPolicy("hard-fail", prefer_ocsp=False),
                                httpx.AsyncClient(proxy=OFFLINE), crl_dir)
    # Signatures made ahead: the card's work is not the provider's.
    challenges = [f"idp-login:{secrets.token_urlsafe(24)}".encode() for _ in range(count + 1)]
    signed = [pki.make_signature("citizen", c) for c in challenges]
    try:
        start = time.perf_counter()
        first = await verify_signature(signed[0], challenges[0], trust=trust, revocation=checker, now=now)
        restart = time.perf_counter() - start
        assert first.revocation.source == "crl", first.revocation
        samples = {"returning": [], "new": []}
        for i, (sig, challenge) in enumerate(zip(signed[1:], challenges[1:])):
            kind = "new" if i % 2 else "returning"
            if kind == "new":
                trust.validated.clear()  # as if this card had never logged in here: a full path validation
            start = time.perf_counter()
            who = await verify_signature(sig, challenge, trust=trust, revocation=checker, now=now)
            samples[kind].append(time.perf_counter() - start)
            assert who.revocation.status == "good"
    finally:
        await checker.aclose()
    return {"first_after_restart_ms": ms(restart), "crl_url": crl_url,
            "returning_card": summary(samples["returning"]), "new_card": summary(samples["new"])}


def lookups(moica, moica_key, sizes: list[int], now: dt.datetime, rounds: int = 20000) -> list[dict]:
    out = []
    for size in sizes:
        present = 0x10_0000_0000 + (size // 2) * 7919  # one of big_crl's serials
        der = testpki.big_crl(moica, moica_key, size, now=now)
        start = time.perf_counter()
        indexed = parse_crl(der, ax509.Certificate.load(moica.public_bytes(serialization.Encoding.DER)))
        parsed = time.perf_counter() - start
        assert len(indexed) == size and indexed.lookup(present) is not None and indexed.lookup(7) is None
        timings = {}
        for name, serial in (("hit", present), ("miss", 7)):
            start = time.perf_counter()
            for _ in range(rounds):
                indexed.lookup(serial)
            timings[f"{name}_us"] = round((time.perf_counter() - start) / rounds * 1e6, 3)
        out.append({"entries": size, "crl_bytes": len(der), "parse_and_verify_ms": ms(parsed), **timings})
    return out


def markdown(result: dict) -> str:
    login = result["logins"]
    lines = [
        f"# Certificate verification, {result['date']} ({result['machine']})", "",
        f"Load average (1 min) at the start and the end: {result['load'][0]} and {result['load'][1]}: "
        "other work on the machine inflates every figure.", "",
        "No network: the CRL is kept on disk, the HTTP client can reach nothing (bench/certificate.py).", "",
        "Each login: the CMS signature over a fresh challenge, the path to the pinned MOICA, key usage",
        "and the CRL lookup. A card seen before reuses its validated path while every certificate on",
        "it is in date (`TrustStore.validated`); a new card gets a full path validation (pyhanko).", "",
        "| per card login (verify_signature) | logins | median | p95 | max | under 5 ms (median) |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in (("returning_card", "a card seen before"), ("new_card", "a card's first login")):
        row = login[key]
        lines.append(f"| {label} | {row['n']} | {row['median_ms']} ms | {row['p95_ms']} ms | {row['max_ms']} ms "
                     f"| {'yes' if row['median_ms'] < TARGET_MS else 'NO'} |")
    lines += [
        "", f"First login after a restart (reads, verifies and indexes the kept "
        f"{result['crl_entries']}-entry CRL): {login['first_after_restart_ms']} ms.", "",
        "| CRL entries | size | parse + verify (once per nextUpdate) | lookup hit | lookup miss |", "|---|---|---|---|---|",
    ]
    for row in result["crl_lookup"]:
        lines.append(f"| {row['entries']} | {row['crl_bytes'] // 1024} KiB | {row['parse_and_verify_ms']} ms "
                     f"| {row['hit_us']} µs | {row['miss_us']} µs |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logins", type=int, default=300)
    parser.add_argument("--crl-entries", type=int, default=100_000)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    now = dt.datetime.now(dt.timezone.utc)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = testpki.generate(tmp / "pki", OFFLINE)
        pki = TestPKI(tmp / "pki", manifest, server=None)
        moica, moica_key = pki.ca("moica")
        leaf = ax509.Certificate.load(pki.cert("citizen").public_bytes(serialization.Encoding.DER))
        crl_url = next(dp.url for dp in leaf.crl_distribution_points)
        from idp.pki.revocation import CRLCache

        cache = CRLCache(None, RevocationPolicy(), tmp / "crl")
        cache.keep(crl_url, testpki.big_crl(moica, moica_key, args.crl_entries, now=now))
        # The root's CRL of the CAs it issued (a login checks MOICA itself on it): MOICA not listed.
        root, root_key = pki.ca("root")
        ca = ax509.Certificate.load(moica.public_bytes(serialization.Encoding.DER))
        cache.keep(next(dp.url for dp in ca.crl_distribution_points), testpki.big_crl(root, root_key, 1, now=now))
        login = asyncio.run(logins(pki, tmp / "crl", crl_url, args.logins, now))
        sizes = sorted({n for n in (1000, 10_000) if n < args.crl_entries} | {args.crl_entries})
        crl = lookups(moica, moica_key, sizes, now)
    result = {
        "date": now.date().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}", "crl_entries": args.crl_entries, "logins": login, "crl_lookup": crl,
        "load": [round(load_before, 2), round(os.getloadavg()[0], 2)], "target_ms": TARGET_MS,
        "target_met": all(login[k]["median_ms"] < TARGET_MS for k in ("returning_card", "new_card")),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{result['date']}-certificate"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"written: {stem}.json, {stem}.md")
    return 0 if result["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
