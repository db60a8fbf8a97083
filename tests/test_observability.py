"""What an operator watches (SPEC O3): /metrics after real requests, and the
structured log lines with their request ids."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from idp.logs import configure
from tests.harness import callback, pkce, redeem


def _samples(provider) -> dict:
    text = provider.http().get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_logins_token_requests_lockouts_and_latency(provider):
    provider.account("alice")
    provider.account("bob")
    client_id, secret = provider.client()
    browser = provider.browser()
    verifier, challenge = pkce()
    page = browser.authorize(client_id, code_challenge=challenge, code_challenge_method="S256")
    page = browser.password(page, password="wrong-password")
    code = callback(browser.password(page))["code"]
    http = provider.http()
    tokens = redeem(http, client_id, secret, code, verifier).json()
    http.post("/token", data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
              auth=(client_id, secret))
    assert redeem(http, client_id, secret, code, verifier).status_code == 400  # a replayed code
    http.post("/token", data={"grant_type": "password", "username": "alice"}, auth=(client_id, secret))

    other = provider.browser()
    page = other.authorize(client_id)
    for _ in range(4):  # three wrong answers lock; the fourth try meets the lock
        page = other.password(page, username="bob", password="wrong-password")

    callback(browser.authorize(client_id))  # alice again, by single sign-on

    m = _samples(provider)
    assert m[("idp_logins_total", (("method", "password"), ("outcome", "success")))] == 1
    assert m[("idp_logins_total", (("method", "sso"), ("outcome", "success")))] == 1
    assert m[("idp_logins_total", (("method", "password"), ("outcome", "failure")))] == 4  # alice once, bob 3 times
    # Refused as locked: the answer that locked, and the try after it; but one account locked once.
    assert m[("idp_logins_total", (("method", "password"), ("outcome", "locked")))] == 2
    assert m[("idp_lockouts_total", ())] == 1
    assert m[("idp_token_requests_total", (("grant_type", "authorization_code"), ("outcome", "issued")))] == 1
    assert m[("idp_token_requests_total", (("grant_type", "authorization_code"), ("outcome", "invalid_grant")))] == 1
    assert m[("idp_token_requests_total", (("grant_type", "refresh_token"), ("outcome", "issued")))] == 1
    assert m[("idp_token_requests_total", (("grant_type", "other"), ("outcome", "unsupported_grant_type")))] == 1
    assert m[("idp_http_request_seconds_count", (("method", "POST"), ("route", "/token"), ("status", "200")))] >= 1
    assert ("idp_http_request_seconds_bucket", (("le", "0.1"), ("method", "POST"), ("route", "/token"),
                                                 ("status", "200"))) in m
    # Methods nobody serves are one label, however many a client makes up: no new series each.
    for method in ("PROPFIND", "MKCOL", "BREW"):
        http.request(method, "/token")
    methods = {dict(labels)["method"] for name, labels in _samples(provider) if name == "idp_http_request_seconds_count"}
    assert methods == {"GET", "POST", "other"}


def test_a_typed_username_cannot_begin_a_log_line_of_its_own(make_provider, capsys):
    provider = make_provider()
    client_id, _ = provider.client()
    configure("text", "INFO")  # the default IDP_LOG_FORMAT
    capsys.readouterr()
    browser = provider.browser()
    forged = "x\n2026-01-01 00:00:00,000 INFO idp.audit [a] logout user=root"
    browser.password(browser.authorize(client_id), username=forged, password="wrong-password")
    err = capsys.readouterr().err
    assert "user=x\\n2026-01-01" in err and not any(line.startswith("2026-01-01") for line in err.splitlines())


def test_log_lines_are_json_with_the_request_id(make_provider, capsys):
    provider = make_provider(access_log=True)
    configure("json", "INFO")
    try:
        http = provider.http()
        answer = http.get("/healthz?code=secret-looking", headers={"X-Request-Id": "abcdef0123456789"})
        assert answer.headers["x-request-id"] == "abcdef0123456789"
        made_up = http.get("/healthz", headers={"X-Request-Id": "x\"; drop"}).headers["x-request-id"]
        assert made_up != "x\"; drop" and len(made_up) == 32
        err = capsys.readouterr().err
    finally:
        configure("text", "INFO")
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    [first] = [entry for entry in lines if entry["request_id"] == "abcdef0123456789"]
    assert first["logger"] == "idp.access" and first["path"] == "/healthz" and first["status"] == 200
    assert first["level"] == "INFO" and first["time"].endswith("+00:00") and "ms" in first
    assert "secret-looking" not in err  # the query (codes, tokens) is never logged
    assert any(entry["request_id"] == made_up for entry in lines)
