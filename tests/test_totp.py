"""Password + OTP and forced binding (SPEC A2, M1) as the user meets them."""

import html
import re
import threading

import pyotp
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from idp.acr import LOA2
from idp.factors.totp import match
from tests.harness import PASSWORD, both_reach, callback, forms, redeem, takes
from tests.test_journeys import bound_otp


@pytest.fixture
def mfa_provider(make_provider):
    provider = make_provider(mfa=True)
    provider.account("alice")
    return provider


def _error(page) -> str:
    found = re.search(r'<div class="error" role="alert">\s*<p>(.*?)</p>', page.text, re.S)
    return found.group(1) if found else ""


def _secret(page) -> str:
    shown = re.search(r'<code class="secret" data-secret>(.*?)</code>', page.text).group(1)
    return re.sub(r"<[^>]+>|\s", "", shown)


def _code(provider, secret, steps=0) -> str:
    return pyotp.TOTP(secret).at(provider.clock() + 30 * steps)


def _bind(provider, browser, client_id, username="alice"):
    """First login: password, then the binding page; returns (page after binding, secret)."""
    page = browser.password(browser.authorize(client_id), username=username)
    assert "<svg" in page.text and "/login/bind/otp" in page.text
    secret = _secret(page)
    page = browser.submit(page, "/login/bind/otp", otp=_code(provider, secret))
    return page, secret


def test_first_login_binds_otp_then_logs_in_with_it(mfa_provider):
    provider = mfa_provider
    client_id, client_secret = provider.client()
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id))
    # The seed's table: which methods exist, none bound yet; nowhere else to go.
    assert "授權狀態" in page.text and page.text.count("✗") == 5
    assert "code=" not in page.headers.get("location", "")
    wrong = browser.submit(page, "/login/bind/otp", otp="000000")
    assert "驗證碼不正確" in _error(wrong)
    secret = _secret(wrong)
    page = browser.submit(wrong, "/login/bind/otp", otp=_code(provider, secret))
    assert "重新登入" in page.text and "/login/factor/password" in page.text
    provider.clock.advance(30)
    page = browser.password(page)
    assert "/login/factor/otp" in page.text and 'name="otp"' in page.text and "v1" in page.text
    params = callback(browser.submit(page, "/login/factor/otp", otp=_code(provider, secret)))
    token = redeem(browser.http, client_id, client_secret, params["code"]).json()
    claims = jwt.decode(token["id_token"], KeySet.import_key_set(browser.http.get("/jwks").json())).claims
    assert claims["amr"] == ["pwd", "otp", "mfa"] and claims["acr"] == "urn:idp:loa:2"


def _otp_page(provider, client_id):
    browser = provider.browser()
    _, secret = _bind(provider, browser, client_id)
    provider.clock.advance(30)
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id))
    assert 'name="otp"' in page.text
    return browser, page, secret


def test_a_code_is_accepted_once(mfa_provider):
    provider = mfa_provider
    client_id, _ = provider.client()
    browser, page, secret = _otp_page(provider, client_id)
    code = _code(provider, secret)
    assert "code" in callback(browser.submit(page, "/login/factor/otp", otp=code))
    other = provider.browser()
    page = other.password(other.authorize(client_id, prompt="login"))
    assert "已使用過" in _error(other.submit(page, "/login/factor/otp", otp=code))


def test_the_last_factor_answers_with_the_code_for_the_client_itself(mfa_provider):
    """Nothing is left after the OTP: its POST redirects to the client, not through /login."""
    provider = mfa_provider
    client_id, _ = provider.client()
    browser, page, secret = _otp_page(provider, client_id)
    form = next(f for f in forms(page.text) if "/login/factor/otp" in f["action"])
    answer = browser.http.post(form["action"], data={**form["fields"], "otp": _code(provider, secret)},
                               follow_redirects=False)
    assert "code" in callback(answer)


def test_the_password_answers_with_the_otp_page_and_a_reload_checks_nothing_again(mfa_provider):
    """The password's POST shows the OTP page itself; posting it again (a reload) shows the
    login where it is: the password is not checked or counted twice."""
    provider = mfa_provider
    client_id, _ = provider.client()
    _, _, secret = _otp_page(provider, client_id)
    provider.clock.advance(30)
    browser = provider.browser()
    page = browser.authorize(client_id)
    form = next(f for f in forms(page.text) if "/login/factor/password" in f["action"])
    data = {**form["fields"], "username": "alice", "password": PASSWORD}
    answer = browser.http.post(form["action"], data=data, follow_redirects=False)
    assert answer.status_code == 200 and 'name="otp"' in answer.text
    # Its language link reloads the login where it is, not the POST's address.
    english = re.search(r'<a href="([^"]+)" lang="en">', answer.text).group(1)
    assert english.startswith("/login?tx=")
    english = browser.go(html.unescape(english)).text
    assert '<html lang="en">' in english and 'name="otp"' in english
    for _ in range(4):  # more than the lockout allows, were they guesses
        again = browser.http.post(form["action"], data={**data, "password": "wrong"}, follow_redirects=False)
        assert again.status_code == 200 and 'name="otp"' in again.text and not _error(again)
    assert "code" in callback(browser.submit(again, "/login/factor/otp", otp=_code(provider, secret)))


def test_one_step_of_drift_either_side_is_fine(mfa_provider):
    provider = mfa_provider
    client_id, _ = provider.client()
    browser, page, secret = _otp_page(provider, client_id)
    assert "code" in callback(browser.submit(page, "/login/factor/otp", otp=_code(provider, secret, steps=1)))
    provider.clock.advance(90)
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id))
    assert "code" in callback(browser.submit(page, "/login/factor/otp", otp=_code(provider, secret, steps=-1)))


def test_a_drifted_phone_is_told_how_to_fix_its_clock(mfa_provider):
    provider = mfa_provider
    client_id, _ = provider.client()
    browser, page, secret = _otp_page(provider, client_id)
    page = browser.submit(page, "/login/factor/otp", otp=_code(provider, secret, steps=10))  # 5 minutes fast
    assert "快了約 5 分鐘" in _error(page) and "自動設定" in page.text and "驗證碼時間修正" in page.text
    page = browser.submit(page, "/login/factor/otp", otp=_code(provider, secret, steps=-6))
    assert "慢了約 3 分鐘" in _error(page)
    # Neither counted as a guess: three more chances remain.
    page = browser.submit(page, "/login/factor/otp", otp="000000")
    assert "再錯 2 次" in _error(page)
    far = browser.submit(page, "/login/factor/otp", otp=_code(provider, secret, steps=40))  # 20 minutes: just wrong
    assert "不正確" in _error(far)


def _two_wrong_codes(browser, page):
    """Two wrong codes, each told how many tries are left; the page after them."""
    for left in (2, 1):
        page = browser.submit(page, "/login/factor/otp", otp="000000")
        assert f"再錯 {left} 次" in _error(page)
    return page


def test_three_wrong_codes_lock_the_account(mfa_provider):
    provider = mfa_provider
    client_id, _ = provider.client()
    browser, page, secret = _otp_page(provider, client_id)
    page = _two_wrong_codes(browser, page)
    page = browser.submit(page, "/login/factor/otp", otp="000000")
    # Whichever factor locked it: the message blames no password that may have been right.
    assert "驗證連續失敗，帳號已暫時停用" in _error(page) and "密碼" not in _error(page)
    page = browser.submit(page, "/login/factor/otp", otp=_code(provider, secret))
    assert "帳號已暫時停用" in _error(page)
    # The password is refused too: one lockout for both, as the seeds say.
    other = provider.browser()
    assert "帳號已暫時停用" in _error(other.password(other.authorize(client_id)))


def test_a_right_code_starts_the_count_again(mfa_provider):
    provider = mfa_provider
    client_id, _ = provider.client()
    browser, page, secret = _otp_page(provider, client_id)
    other = provider.browser()  # the same person's second login, waiting at its OTP page
    waiting = other.password(other.authorize(client_id))
    page = _two_wrong_codes(browser, page)
    assert "code" in callback(browser.submit(page, "/login/factor/otp", otp=_code(provider, secret)))
    assert "再錯 2 次" in _error(other.submit(waiting, "/login/factor/otp", otp="000000"))


def test_two_right_codes_at_once_end_the_login_once(mfa_provider):
    """A double submit with the code changing in between: both codes are right, but the
    login ends once, with one code for the client (and one session)."""
    provider = mfa_provider
    client_id, _ = provider.client()
    browser, page, secret = _otp_page(provider, client_id)
    answers = []

    def submit(code):
        answers.append(browser.submit(page, "/login/factor/otp", otp=code))

    threads = [threading.Thread(target=submit, args=(_code(provider, secret, steps=s),)) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ended = [a for a in answers if a.status_code == 302]
    assert len(ended) == 1 and "code" in callback(ended[0]), [a.status_code for a in answers]


def test_a_wrong_code_answered_after_the_login_ended_does_not_bring_it_back(mfa_provider):
    """A wrong code's request read the login before a right code ended it and saves its
    failure count after: the login stays ended, no second code comes of it."""
    provider = mfa_provider
    client_id, _ = provider.client()
    browser, page, secret = _otp_page(provider, client_id)
    tx_id = re.search(r'name="tx" value="([^"]+)"', page.text).group(1)
    stale = provider.svc.transactions.get(tx_id)
    assert "code" in callback(browser.submit(page, "/login/factor/otp", otp=_code(provider, secret)))
    stale["failures"] += 1
    provider.svc.transactions.save(stale)
    again = browser.submit(page, "/login/factor/otp", otp=_code(provider, secret, steps=1))
    assert again.status_code == 400 and "登入已逾時" in again.text


def test_malformed_code_is_explained_and_not_counted(mfa_provider):
    provider = mfa_provider
    client_id, _ = provider.client()
    browser, page, secret = _otp_page(provider, client_id)
    for bad in ("12ab56", "12345", "1234567", "", "١٢٣٤٥٦"):  # Arabic-Indic digits are \\d, not our digits
        page = browser.submit(page, "/login/factor/otp", otp=bad)
        assert "6 位數字" in _error(page)
    assert "code" in callback(browser.submit(page, "/login/factor/otp", otp=_code(provider, secret)))


FULL_WIDTH = str.maketrans("0123456789", "０１２３４５６７８９")  # what a zh-TW input method in full-width mode types


def as_typed(code: str) -> str:
    """A code as a zh-TW input method in full-width mode types it, spaced as the apps show it."""
    return f"{code[:3]} {code[3:]}".translate(FULL_WIDTH)


def test_a_code_typed_in_full_width_digits_is_the_code(mfa_provider):
    """At forced binding and at login alike (a 500 before: \\d took them, the comparison did not);
    and the browser sends it (a pattern="[0-9]{6}" and maxlength="6" stopped it before)."""
    provider = mfa_provider
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id))
    secret = _secret(page)
    typed = as_typed(_code(provider, secret))
    assert takes(page, "otp", typed)
    page = browser.submit(page, "/login/bind/otp", otp=typed)
    assert "重新登入" in page.text
    provider.clock.advance(30)
    page = browser.password(page)
    typed = as_typed(_code(provider, secret))
    assert takes(page, "otp", typed)
    assert "code" in callback(browser.submit(page, "/login/factor/otp", otp=typed))


def test_rebuilt_qr_is_a_new_version_and_the_old_one_stops_working(mfa_provider):
    provider = mfa_provider
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id))
    old = _secret(page)
    assert "QR Code 版本 v1" in page.text
    page = browser.submit(page, "/login/bind/otp/rebuild")
    assert "QR Code 版本 v2" in page.text and _secret(page) != old
    page = browser.submit(page, "/login/bind/otp", otp=_code(provider, old))
    assert "驗證碼不正確" in _error(page)
    page = browser.submit(page, "/login/bind/otp", otp=_code(provider, _secret(page)))
    assert "重新登入" in page.text


def test_each_login_at_forced_binding_has_its_own_qr(mfa_provider):
    """The binding QR belongs to its login (SPEC A2, M1): another login of the account, in
    another browser, gets another secret, and neither binds the other's."""
    provider = mfa_provider
    client_id, _ = provider.client()
    first, second = provider.browser(), provider.browser()
    page = first.password(first.authorize(client_id))
    mine = _secret(page)
    tx = forms(page.text)[0]["fields"]["tx"]
    assert _secret(first.go(f"/login?tx={tx}")) == mine  # a reload of the page shows the same QR
    theirs = second.password(second.authorize(client_id))
    assert _secret(theirs) != mine
    page = first.submit(page, "/login/bind/otp", otp=_code(provider, _secret(theirs)))
    assert "驗證碼不正確" in _error(page)
    page = first.submit(page, "/login/bind/otp", otp=_code(provider, mine))
    assert "重新登入" in page.text


def test_binding_qr_expires_with_its_page(mfa_provider):
    provider = mfa_provider
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id))
    secret = _secret(page)
    provider.clock.advance(601)  # the QR lived 10 minutes; the login 15
    page = browser.submit(page, "/login/bind/otp", otp=_code(provider, secret))
    assert "已失效" in _error(page) and _secret(page) != secret


def test_aa_accounts_are_told_they_must_bind_otp(make_provider):
    provider = make_provider(mfa=True)
    provider.account("school-aa", kind="aa", org="臺北市立示範國中")
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id), username="school-aa")
    assert "AA 帳號僅能綁定 OTP" in page.text


def test_the_otp_secret_is_not_stored_in_clear(mfa_provider):
    from idp.storage.models import Binding

    provider = mfa_provider
    client_id, _ = provider.client()
    _, secret = _bind(provider, provider.browser(), client_id)
    with provider.svc.db.session() as session:
        stored = session.query(Binding).one().data["secret"]
    assert secret not in stored


@pytest.mark.parametrize("offset,found", [(0, 0), (1, 1), (-1, -1), (4, 4), (-20, -20), (21, None)])
def test_match_finds_the_offset(offset, found):
    secret = pyotp.random_base32()
    now = 1_800_000_000
    code = pyotp.TOTP(secret).at(now + 30 * offset)
    assert match(secret, code, now, drift_minutes=10) == found


def test_a_tampered_binding_form_changes_nothing(mfa_provider):
    from idp.storage.models import Binding

    provider = mfa_provider
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id))
    fields = next(f for f in forms(page.text) if f["action"] == "/login/bind/otp")["fields"]
    code = _code(provider, _secret(page))
    for tampered in ({**fields, "tx": "forged"}, {**fields, "csrf": "forged"}, {"otp": code}):
        response = browser.go("/login/bind/otp", "POST", {**tampered, "otp": code})
        assert response.status_code == 400 and "location" not in response.headers
    with provider.svc.db.session() as session:
        assert session.query(Binding).count() == 0


def test_client_policy_minimum_acr_and_allowed_factors(mfa_provider):
    provider = mfa_provider
    strict, strict_secret = provider.client(minimum_acr="urn:idp:loa:2")
    browser = provider.browser()
    _, secret = _bind(provider, browser, strict)
    provider.clock.advance(30)
    page = browser.password(browser.authorize(strict))
    params = callback(browser.submit(page, "/login/factor/otp", otp=_code(provider, secret)))
    token = redeem(browser.http, strict, strict_secret, params["code"]).json()
    claims = jwt.decode(token["id_token"], KeySet.import_key_set(browser.http.get("/jwks").json())).claims
    assert claims["acr"] == "urn:idp:loa:2"
    # A client that would only accept OTP after a password it does not list: nothing could start
    # its logins, so it is not registered.
    from idp.protocol.clients import ClientError

    with pytest.raises(ClientError, match="a way to begin a login"):
        provider.client(allowed_factors=["otp"])


def test_allowed_factors_are_validated(mfa_provider):
    from idp.protocol.clients import ClientError

    with pytest.raises(ClientError):
        mfa_provider.client(allowed_factors=["carrier-pigeon"])


def test_a_client_that_leaves_out_the_bound_factor_cannot_have_another_bound(mfa_provider):
    """Binding at login (M1) is for an account with no second factor at all: through a client
    whose allowed_factors leave out the bound one, a password alone must not add its own."""
    provider = mfa_provider
    portal, _ = provider.client()
    _bind(provider, provider.browser(), portal)
    narrow, _ = provider.client(allowed_factors=["password", "push"])
    browser = provider.browser()
    page = browser.password(browser.authorize(narrow))
    assert "/login/bind/otp" not in page.text
    assert callback(page)["error"] == "unmet_authentication_requirements"


def test_forced_binding_offers_only_what_the_client_takes(mfa_provider):
    """M1: a portal taking the password and the card offers the card alone to bind, not OTP,
    after which its login could only be unmet; one taking neither answers unmet at once."""
    provider = mfa_provider
    cards, _ = provider.client(allowed_factors=["password", "certificate"])
    browser = provider.browser()
    page = browser.password(browser.authorize(cards))
    assert "/login/bind/certificate" in page.text and "/login/bind/otp" not in page.text
    neither, _ = provider.client(allowed_factors=["password", "push"])
    other = provider.browser()
    assert callback(other.password(other.authorize(neither)))["error"] == "unmet_authentication_requirements"


def test_the_steps_after_the_second_factor_refuse_a_login_that_has_only_the_password(mfa_provider):
    provider = mfa_provider
    portal, _ = provider.client()
    _, secret = _bind(provider, provider.browser(), portal)
    provider.clock.advance(30)
    other, _ = provider.client(first_party=False, client_name="研究計畫系統")
    browser = provider.browser()
    page = browser.password(browser.authorize(other, scope="openid email"))
    fields = next(f for f in forms(page.text) if "/login/factor/otp" in f["action"])["fields"]
    new = "Another-Passw0rd!"
    for path, data in [("/login/password-change", {"new_password": new, "new_password_again": new}),
                       ("/login/consent", {"decision": "allow"}), ("/login/bind/otp", {"otp": _code(provider, secret)}),
                       ("/login/bind/otp/rebuild", {})]:
        answer = browser.go(path, "POST", {"tx": fields["tx"], "csrf": fields["csrf"], **data})
        assert answer.status_code == 200 and 'name="otp"' in answer.text, path  # back at the login's OTP step
    # Nothing changed: the password is the old one, and the login goes on from its OTP to its consent.
    assert 'name="otp"' in (second := provider.browser()).password(second.authorize(portal)).text
    page = browser.submit(page, "/login/factor/otp", otp=_code(provider, secret))
    assert "/login/consent" in page.text


def test_the_right_password_again_does_not_give_wrong_codes_back(mfa_provider):
    """The lockout counts the wrong answers until a login ends: someone who has the password
    cannot log in with it again and again for three more OTP guesses each time."""
    provider = mfa_provider
    client_id, _ = provider.client()
    browser, page, _ = _otp_page(provider, client_id)
    page = _two_wrong_codes(browser, page)
    again = provider.browser()
    page = again.password(again.authorize(client_id))
    assert 'name="otp"' in page.text
    assert "帳號已暫時停用" in _error(again.submit(page, "/login/factor/otp", otp="000000"))


def test_a_login_with_the_password_alone_does_not_give_wrong_codes_back(make_provider):
    """Where a client lets the password alone in (two factors not required, LOA1), such a
    login does not end the count of the wrong codes before it: else whoever has the password
    could guess the OTP two codes at a time, with a password-only login between."""
    provider = make_provider(mfa=False)
    bound_otp(provider, provider.account("alice"))
    client_id, _ = provider.client()
    browser = provider.browser()
    page = _two_wrong_codes(browser, browser.password(browser.authorize(client_id, acr_values=LOA2)))
    assert "code" in callback(browser.password(browser.authorize(client_id, prompt="login")))
    page = browser.password(browser.authorize(client_id, acr_values=LOA2, prompt="login"))
    assert "帳號已暫時停用" in _error(browser.submit(page, "/login/factor/otp", otp="000000"))


def test_a_code_from_a_fast_phone_is_spent_and_not_taken_when_its_time_comes(mfa_provider):
    """The drift answer says a code matched a step still to come: sent again when that step
    comes (a guess that hit it, read off the answer), it is refused as used."""
    provider = mfa_provider
    client_id, _ = provider.client()
    browser, page, secret = _otp_page(provider, client_id)
    ahead = _code(provider, secret, steps=8)
    assert "快了約 4 分鐘" in _error(browser.submit(page, "/login/factor/otp", otp=ahead))
    provider.clock.advance(8 * 30)
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id))
    assert "已使用過" in _error(browser.submit(page, "/login/factor/otp", otp=ahead))


def test_two_qr_codes_confirmed_at_once_leave_one_secret(provider):
    """Two pages (a laptop's and a phone's browser) confirm their QR codes at the same moment:
    each deleted the bindings it had read (none) and added its own, leaving two secrets."""
    from concurrent.futures import ThreadPoolExecutor

    from idp.factors.totp import Enrolment
    from idp.storage.models import Account, Binding

    svc = provider.svc
    account_id = provider.account("alice")
    with svc.db.session() as session:
        account = session.get(Account, account_id)
    enrolment = Enrolment(svc)
    secrets = {owner: svc.box.open(enrolment.start(account, owner)["secret"], account_id) for owner in ("laptop", "phone")}
    with both_reach(svc.db.engine, "INSERT INTO BINDINGS"), ThreadPoolExecutor(2) as pool:
        confirms = [pool.submit(enrolment.confirm, account_id, owner, pyotp.TOTP(secret).at(svc.clock()))
                    for owner, secret in secrets.items()]
        assert [c.result(timeout=60) for c in confirms] == [None, None]
    with svc.db.session() as session:
        assert session.query(Binding).filter_by(account_id=account_id, factor="otp").count() == 1
