"""Outages: Redis and PostgreSQL stopped and started again during and between the steps of a
login and of token requests, on servers of each test's own (``tests.outage_helpers``)."""

from __future__ import annotations

import pytest

from tests.harness import PASSWORD, redeem
from tests.outage_helpers import database_goes_away, outage_provider, pg_start, pg_stop


@pytest.fixture
def outage(tmp_path, request):
    """``outage_provider``, with the settings a test gives through ``indirect`` parametrization."""
    provider = outage_provider(tmp_path, **getattr(request, "param", {}))
    try:
        yield provider
    finally:
        provider.rd.stop()
        provider.pg.stop()


def _tokens(provider):
    provider.account()
    client_id, secret = provider.client()
    browser = provider.browser()
    callback = browser.login(client_id)
    tokens = redeem(browser.http, client_id, secret, callback["code"]).json()
    return browser, client_id, secret, tokens


@pytest.mark.parametrize("endpoint", ["token", "userinfo", "introspect", "revoke"])
def test_protocol_endpoints_answer_json_503_while_redis_is_down(outage, endpoint):
    """RFC 6749 5.2, RFC 6750, RFC 7662, RFC 7009: a relying party's back end reads a JSON
    error from these endpoints, and may retry on a 503 with Retry-After."""
    browser, client_id, secret, tokens = _tokens(outage)
    outage.rd.stop()
    _assert_retry_later(_ask(browser.http, endpoint, client_id, secret, tokens))


def test_userinfo_answers_json_503_while_the_database_is_down(outage):
    """OIDC Core 5.3.3: the relying party's back end reads UserInfo's error as JSON and may
    retry, whichever of the provider's servers is away."""
    browser, client_id, secret, tokens = _tokens(outage)
    pg_stop(outage.pg)
    _assert_retry_later(_ask(browser.http, "userinfo", client_id, secret, tokens))


def _ask(http, endpoint, client_id, secret, tokens):
    if endpoint == "token":
        return http.post("/token", data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
                         auth=(client_id, secret))
    if endpoint == "userinfo":
        return http.get("/userinfo", headers={"Authorization": "Bearer " + tokens["access_token"]})
    if endpoint == "introspect":
        return http.post("/introspect", data={"token": tokens["access_token"]}, auth=(client_id, secret))
    return http.post("/revoke", data={"token": tokens["refresh_token"]}, auth=(client_id, secret))


def _assert_retry_later(r):
    assert r.status_code == 503, (r.status_code, r.text[:200])
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"] == "temporarily_unavailable"
    assert int(r.headers["retry-after"]) > 0


def test_a_login_page_keeps_its_error_page_while_redis_is_down(outage):
    outage.account()
    client_id, _ = outage.client()
    browser = outage.browser()
    outage.rd.stop()
    page = browser.authorize(client_id)
    assert page.status_code == 500 and page.headers["content-type"].startswith("text/html")
    assert "系統錯誤" in page.text


def test_a_database_outage_does_not_count_the_right_password_toward_the_lockout(outage):
    """A1 (3 wrong passwords lock the account): a user who typed the right password three times
    while PostgreSQL was away got three error pages, the provider's failure, not three wrong
    guesses: once the database is back the right password logs in, no "locked" page."""
    outage.account()
    client_id, _ = outage.client()
    browser = outage.browser()
    page = browser.authorize(client_id)
    assert "/login/factor/password" in page.text
    pg_stop(outage.pg)
    for _ in range(3):
        assert browser.password(page).status_code == 500
    pg_start(outage.pg)

    fresh = outage.browser()
    done = fresh.password(fresh.authorize(client_id), password=PASSWORD)
    assert "帳號已暫時停用" not in done.text
    assert done.status_code == 302


def test_a_reset_link_still_works_after_its_new_password_could_not_be_saved(tmp_path, smtp_server):
    """A1 (forgot password by a link, single use): PostgreSQL went away as the new password was
    saved. The user got an error page and the password was not changed; the same link still
    sets it once the database is back, rather than saying it is invalid."""
    from tests.test_mail_and_recovery import NEW, ask_reset, reset_link

    provider = outage_provider(tmp_path, **smtp_server.settings())
    try:
        provider.account("alice", email_verified=True)
        client_id, _ = provider.client()
        browser = provider.browser()
        ask_reset(provider, browser, "alice@example.tw")
        link = reset_link(smtp_server.next_message())
        page = browser.go(link)
        with database_goes_away(provider, "UPDATE ACCOUNTS"):
            assert browser.submit(page, "/password/reset", new_password=NEW, new_password_again=NEW).status_code == 500

        page = browser.go(link)
        assert page.status_code == 200 and "new_password" in page.text
        done = browser.submit(page, "/password/reset", new_password=NEW, new_password_again=NEW)
        assert done.status_code == 200 and "/password/reset/done" in str(done.url)
        assert provider.browser().login(client_id, password=NEW)["code"]
    finally:
        provider.rd.stop()
        provider.pg.stop()


def test_the_first_login_after_a_postgresql_restart_is_served(outage):
    """O3: PostgreSQL restarted (a minor upgrade, a failover) and is back. The next user who
    types the right password logs in, rather than getting the error page from a connection
    that ended with the old server."""
    outage.account()
    client_id, _ = outage.client()
    assert outage.browser().login(client_id)["code"]  # the pools hold connections now
    pg_stop(outage.pg)
    pg_start(outage.pg)

    browser = outage.browser()
    assert browser.login(client_id)["code"]


@pytest.mark.parametrize("outage", [{"mfa": True}], indirect=True)
def test_an_otp_binding_that_could_not_be_saved_keeps_its_qr(outage):
    """A2 (the user proves one code before the binding counts): PostgreSQL went away as the
    binding was written. The user got an error page; once the database is back the QR code
    already scanned into the app still binds, rather than "此 QR Code 已失效", which would
    leave the app's entry useless and a new version to scan."""
    import pyotp

    from tests.test_totp import _secret

    outage.account()
    client_id, _ = outage.client()
    browser = outage.browser()
    page = browser.password(browser.authorize(client_id))
    secret = _secret(page)
    with database_goes_away(outage, "DELETE FROM BINDINGS"):
        failed = browser.submit(page, "/login/bind/otp", otp=pyotp.TOTP(secret).at(outage.clock()))
        assert failed.status_code == 500

    outage.clock.advance(30)
    bound = browser.submit(page, "/login/bind/otp", otp=pyotp.TOTP(secret).at(outage.clock()))
    assert "OTP 驗證綁定完成" in bound.text


def test_an_otp_code_whose_login_could_not_be_recorded_works_once_the_database_is_back(outage, monkeypatch):
    """A1, A2 (each code once; wrong codes count toward the lock): PostgreSQL went away as the
    right OTP code's step was recorded. The user got an error page; once the database is back
    the same code logs in, rather than "already used", and the failure counted as no guess."""
    import pyotp

    from idp.acr import LOA2
    from tests.harness import callback
    from tests.test_login import _alice_with_otp

    _, secret = _alice_with_otp(outage)
    client_id, _ = outage.client()
    browser = outage.browser()
    page = browser.password(browser.authorize(client_id, acr_values=LOA2))
    code = pyotp.TOTP(secret).at(outage.clock())
    query, fired = outage.svc.db._query, []

    def goes_away(sql, params, fetch):  # the driver's path, which the binding's step is written on
        if not fired and "UPDATE BINDINGS" in sql.upper():
            fired.append(True)
            pg_stop(outage.pg)
        return query(sql, params, fetch)

    monkeypatch.setattr(outage.svc.db, "_query", goes_away)
    assert browser.submit(page, "/login/factor/otp", otp=code).status_code == 500
    assert fired
    pg_start(outage.pg)
    near = {pyotp.TOTP(secret).at(outage.clock() + 30 * k) for k in range(-300, 301)}  # within any drift
    wrong = next(c for c in ("000000", "111111", "222222", "333333") if c not in near)
    for _ in range(2):  # two wrong codes: with the failure counted, the second would lock
        page = browser.submit(page, "/login/factor/otp", otp=wrong)
        assert page.status_code == 200 and "帳號已暫時停用" not in page.text
    assert "code" in callback(browser.submit(page, "/login/factor/otp", otp=code))
