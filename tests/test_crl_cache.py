"""Revocation data that outlives a restart, and trust anchors checked at start (issue 4).

A "restart" is a new RevocationChecker on the same CRL directory whose HTTP client
goes through a proxy nobody listens on: under hard-fail, a login that needed the
network would be refused."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import pytest
from asn1crypto import x509 as ax509
from cryptography.hazmat.primitives import serialization

from deploy.dev import testpki
from idp.pki import RevocationChecker, RevocationPolicy, RevocationUnavailable, Revoked, load_trust
from idp.pki.revocation import httpx
from idp.settings import Settings
from idp.web.app import create_app

POLICY = RevocationPolicy("hard-fail", prefer_ocsp=False)  # the CRL, not OCSP


def _asn1(tpki, name):
    return ax509.Certificate.load(tpki.cert(name).public_bytes(serialization.Encoding.DER))


def _check(tpki, crl_dir, name, *, online: bool):
    async def main():
        http = httpx.AsyncClient() if online else httpx.AsyncClient(proxy="http://127.0.0.1:9")
        checker = RevocationChecker(POLICY, http, crl_dir)
        try:
            return await checker.check(_asn1(tpki, name), load_trust(tpki.dir / "trust").get("moica").issuers[0],
                                       dt.datetime.now(dt.timezone.utc))
        finally:
            await checker.aclose()
    return asyncio.run(main())


def test_a_downloaded_crl_serves_the_next_process_without_the_network(tpki, tmp_path):
    assert _check(tpki, tmp_path, "citizen", online=True).source == "crl"
    assert len(list(tmp_path.glob("*.crl"))) == 1
    assert _check(tpki, tmp_path, "citizen", online=False).status == "good"  # restarted, offline
    with pytest.raises(Revoked):  # the kept list still says who is revoked
        _check(tpki, tmp_path, "revoked_crl", online=False)


def test_a_kept_crl_is_believed_only_with_the_cas_signature(tpki, tmp_path):
    _check(tpki, tmp_path, "citizen", online=True)
    kept = next(tmp_path.glob("*.crl"))
    forger, forger_key = tpki.ca("fake-moica")  # same DN as the test MOICA, another key
    kept.write_bytes(testpki.big_crl(forger, forger_key, 3, now=dt.datetime.now(dt.timezone.utc)))
    with pytest.raises(RevocationUnavailable):
        _check(tpki, tmp_path, "citizen", online=False)


def test_a_crl_without_next_update_is_believed_for_a_day(tpki, tmp_path):
    """RFC 5280 requires nextUpdate in every CRL; one without it is believed as long as an
    OCSP answer without one (24 h from its thisUpdate), not for ever."""
    _check(tpki, tmp_path, "citizen", online=True)
    kept = next(tmp_path.glob("*.crl"))
    moica, key = tpki.ca("moica")
    now = dt.datetime.now(dt.timezone.utc)
    kept.write_bytes(testpki.big_crl(moica, key, 3, now=now, issued_ago=dt.timedelta(hours=1), valid_for=None))
    assert _check(tpki, tmp_path, "citizen", online=False).status == "good"
    kept.write_bytes(testpki.big_crl(moica, key, 3, now=now, issued_ago=dt.timedelta(days=2), valid_for=None))
    with pytest.raises(RevocationUnavailable):  # too old: needs the network, which this restart lacks
        _check(tpki, tmp_path, "citizen", online=False)


def test_without_a_directory_nothing_is_kept(tpki, tmp_path):
    _check(tpki, None, "citizen", online=True)
    with pytest.raises(RevocationUnavailable):
        _check(tpki, None, "citizen", online=False)


@pytest.mark.parametrize("anchors, said", [
    (None, "has no anchors.toml"),
    ("# nothing yet\n", "defines no [[anchor_set]]"),
    ('[[anchor_set]]\nname = "moica"\nkinds = ["personal"]\nroots = []\nissuers = []\n', "at least one root"),
])
def test_the_provider_does_not_start_without_trust_anchors(tmp_path, anchors, said):
    trust = tmp_path / "trust"
    trust.mkdir()
    if anchors is not None:
        (trust / "anchors.toml").write_text(anchors)
    settings = Settings.from_env({}, database_url=f"sqlite:///{tmp_path}/idp.sqlite3", keys_dir=str(tmp_path / "keys"),
                                 trust_dir=str(trust))
    with pytest.raises(ValueError, match="trust directory") as caught:
        create_app(settings)
    assert said in str(caught.value)


def test_the_certificate_bench_runs_offline_and_writes_its_results(tmp_path):
    from bench import certificate as bench

    bench.main(["--logins", "4", "--crl-entries", "2000", "--out", str(tmp_path)])  # 0 or 1: timings are not tested
    result = json.loads(next(tmp_path.glob("*-certificate.json")).read_text())
    assert {row["entries"] for row in result["crl_lookup"]} == {1000, 2000}
    assert result["logins"]["returning_card"]["n"] == 2 and result["logins"]["new_card"]["n"] == 2
    assert "a card's first login" in next(tmp_path.glob("*-certificate.md")).read_text()
