"""Password login as a user meets it (SPEC A1, O2, O4): captcha, lockout,
expiry, and messages that say what to do."""

import asyncio
import re
import threading
from urllib.parse import parse_qs, urlsplit

import pyotp
from joserfc import jwt
from joserfc.jwk import KeySet

try:  # the project depends on httpx2; plain httpx has the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

from idp import captcha
from idp.acr import LOA1, LOA2, LOA3
from idp.factors import FACTORS
from idp.storage.models import Binding
from tests.harness import PASSWORD, both_reach, callback, forms, language_link, redeem, takes
from tests.test_totp import FULL_WIDTH


def _tx(page) -> str:
    return forms(page.text)[0]["fields"]["tx"]


def _error(page) -> str:
    found = re.search(r'<div class="error" role="alert">\s*<p>(.*?)</p>', page.text, re.S)
    return found.group(1) if found else ""


def test_three_wrong_passwords_lock_for_fifteen_minutes(provider):
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.authorize(client_id)
    page = browser.password(page, password="wrong-1")
    assert "再錯 2 次" in _error(page)
    page = browser.password(page, password="wrong-2")
    assert "再錯 1 次" in _error(page)
    page = browser.password(page, password="wrong-3")
    assert "帳號已暫時停用" in _error(page)
    page = browser.password(page)  # the right password, but locked
    assert "帳號已暫時停用" in _error(page) and page.status_code == 200
    provider.clock.advance(14 * 60)
    assert "帳號已暫時停用" in _error(browser.password(page))
    provider.clock.advance(61)
    # The login page itself has timed out by now. In a new one the count starts again (the
    # tries against the lock were not counted), and the right password works.
    page = browser.password(browser.authorize(client_id), password="wrong-4")
    assert "再錯 2 次" in _error(page)
    assert "code" in callback(browser.password(page))


def test_a_give_back_after_the_count_lapsed_is_no_free_try(provider):
    """An answer's attempt is given back once it proves right; when the count's window ended
    while it was checked, the give-back left the next count at -1: one more guess."""
    lockout = provider.svc.lockout
    lockout.reserve("alice")
    provider.svc.store.delete("fail:alice")  # the window ends while the answer is checked
    lockout.release("alice")
    attempts = [lockout.attempt("alice") for _ in range(lockout.threshold + 1)]
    assert [n for _, n in attempts[:-1]] == list(range(1, lockout.threshold + 1))
    assert attempts[-1][0] is not None  # the one past the threshold locks


def test_lockout_does_not_reveal_whether_an_account_exists(provider):
    provider.account("alice")
    client_id, _ = provider.client()
    messages = {}
    for username in ("alice", "nobody"):
        browser = provider.browser()
        page = browser.authorize(client_id)
        seen = []
        for _ in range(4):
            page = browser.password(page, username=username, password="wrong-password")
            seen.append(_error(page))
        messages[username] = seen
    assert messages["alice"] == messages["nobody"]


def test_parallel_guesses_cannot_pass_the_counter(provider):
    provider.account("alice")
    client_id, _ = provider.client()
    pages = []
    for _ in range(8):
        browser = provider.browser()
        pages.append((browser, browser.authorize(client_id)))
    results = []

    def guess(browser, page):
        results.append(_error(browser.password(page, password="wrong-password")))

    threads = [threading.Thread(target=guess, args=pair) for pair in pages]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum("再錯" in r for r in results) == 2, results
    assert sum("帳號已暫時停用" in r for r in results) == 6, results


def test_every_attempt_is_in_the_audit_log(provider):
    from sqlalchemy import select

    from idp.storage.models import AuditEvent

    alice = provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.authorize(client_id)
    for _ in range(4):  # the last one while the account is locked
        page = browser.password(page, password="wrong-password")
    provider.clock.advance(901)
    callback(browser.password(browser.authorize(client_id)))
    with provider.svc.db.session() as session:
        events = [(e.event, e.username, e.client_id, e.account_id)
                  for e in session.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars()]
    kinds = [e for e, user, client, _ in events if user == "alice" and client == client_id]
    assert kinds == ["login.failure"] * 3 + ["login.locked"] * 2 + ["login.success"]
    # Each in the owner's activity log, the tries while locked too: an attack that goes on shows.
    assert all(account == alice for _, user, _, account in events if user == "alice")


def test_captcha_always(make_provider):
    provider = make_provider(captcha="always")
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.authorize(client_id)
    tx = _tx(page)
    image = browser.http.get(f"/login/captcha?tx={tx}")
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    page = browser.password(page, captcha="00000")
    assert "驗證碼錯誤" in _error(page)
    assert 'value="alice"' in page.text  # what the user typed is kept
    answer = provider.svc.transactions.get(tx)["captcha"]
    typed = answer.translate(FULL_WIDTH)  # as a zh-TW input method in full-width mode types it
    assert takes(page, "captcha", typed)
    params = callback(browser.password(page, captcha=typed))
    assert params["code"]


def test_captcha_images_are_drawn_off_the_event_loop(make_provider, monkeypatch):
    """A flood of captcha images (anyone may ask for them) neither stalls the process's other
    requests nor takes more than the captcha threads: the next ones wait their turn, and past
    those the rest are refused at once (503, Retry-After) rather than queued without end."""
    provider = make_provider(captcha="always")
    client_id, _ = provider.client()
    browser = provider.browser()
    tx = _tx(browser.authorize(client_id))
    drawing, release, most = [], threading.Event(), [0]
    lock, draw = threading.Lock(), captcha._draw

    def held(answer):  # an image that takes as long as the test wants
        with lock:
            drawing.append(answer)
            most[0] = max(most[0], len(drawing))
        if not release.wait(20):  # on the event loop, nothing else runs: give up, and let the rest through
            release.set()
        with lock:
            drawing.remove(answer)
        return draw(answer)

    monkeypatch.setattr(captcha, "_draw", held)
    monkeypatch.setattr(captcha, "QUEUED", 2)

    async def flood():
        transport = httpx.ASGITransport(app=provider.app)
        async with httpx.AsyncClient(transport=transport, base_url=provider.issuer, cookies=browser.http.cookies) as http:
            images = [asyncio.create_task(http.get(f"/login/captcha?tx={tx}")) for _ in range(captcha.RENDER_THREADS + 3)]
            while len(drawing) < captcha.RENDER_THREADS and not release.is_set():
                await asyncio.sleep(0.01)
            health = await http.get("/healthz")
            answered_while_drawing = not release.is_set() and len(drawing) == captcha.RENDER_THREADS
            release.set()
            return health, answered_while_drawing, await asyncio.gather(*images)

    health, answered_while_drawing, images = asyncio.run(flood())
    assert health.text == "ok" and answered_while_drawing
    drawn = [image for image in images if image.status_code == 200 and image.content.startswith(b"\x89PNG")]
    refused = [image for image in images if image.status_code == 503 and image.headers["retry-after"] == "1"]
    assert len(drawn) == captcha.RENDER_THREADS + 2 and len(refused) == 1
    assert most[0] == captcha.RENDER_THREADS


def _captcha_login(make_provider):
    """A browser at alice's password page with a captcha: (browser, the form's fields, the
    store, the login's key there, the login as stored)."""
    provider = make_provider(captcha="always")
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    fields = next(f for f in forms(browser.authorize(client_id).text) if "/login/factor/password" in f["action"])["fields"]
    store, key = provider.svc.store, "tx:" + fields["tx"]
    return browser, fields, store, key, store.get(key)


def test_one_solved_captcha_is_one_try_replayed_or_sent_at_once(make_provider):
    """An answer read off the image once is good for one try: posted again without the page
    that draws a new image, or sent twice at once, the second is refused as a wrong answer."""
    browser, fields, store, key, as_read = _captcha_login(make_provider)

    def post(password) -> str:
        """The error the login will show (its page is not fetched: that would draw a new image)."""
        sent = {**fields, "username": "alice", "password": password, "captcha": as_read["captcha"]}
        answer = browser.http.post("/login/factor/password", data=sent, follow_redirects=False)
        assert answer.status_code == 303 and "code=" not in answer.headers["location"], answer.headers.get("location")
        return store.get(key)["flash"]["error"]

    assert post("wrong-password") == "login.failed"  # the answer was right: the password was checked
    assert post(PASSWORD) == "captcha.wrong"  # replayed
    store.set(key, as_read, 600)  # as a second request that read the login before the first one's write
    assert post(PASSWORD) == "captcha.wrong"


def test_guesses_at_one_image_sent_at_once_are_one_try(make_provider):
    """Wrong answers posted together, each request holding the login as it was before the
    others saved it, are one guess between them: the right one after them is refused."""
    browser, fields, store, key, as_read = _captcha_login(make_provider)
    for guess in ("00000", "11111", as_read["captcha"]):
        store.set(key, as_read, 600)
        sent = {**fields, "username": "alice", "password": PASSWORD, "captcha": guess}
        answer = browser.http.post("/login/factor/password", data=sent, follow_redirects=False)
        assert "code=" not in answer.headers["location"] and store.get(key)["flash"]["error"] == "captcha.wrong"


def test_wrong_captcha_does_not_count_towards_lockout(make_provider):
    provider = make_provider(captcha="always")
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.authorize(client_id)
    for _ in range(5):
        page = browser.password(page, captcha="00000")
    answer = provider.svc.transactions.get(_tx(page))["captcha"]
    assert "code" in callback(browser.password(page, captcha=answer))


def test_captcha_after_failure(make_provider):
    provider = make_provider(captcha="after-failure")
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.authorize(client_id)
    assert 'name="captcha"' not in page.text
    page = browser.password(page, password="wrong-password")
    assert 'name="captcha"' in page.text
    # A new login (here another browser) is not the way around it: the username's last answer
    # failed, so its password is taken only with the captcha, and the refusal is no guess.
    other = provider.browser()
    page = other.authorize(client_id)
    assert 'name="captcha"' not in page.text
    page = other.password(page)
    assert "請輸入圖中的驗證碼" in page.text and 'name="captcha"' in page.text and 'value="alice"' in page.text
    answer = provider.svc.transactions.get(_tx(page))["captcha"]
    assert "code" in callback(other.password(page, captcha=answer))


def test_single_sign_on_counts_only_the_factors_the_client_allows(provider):
    """A client's policy (``allowed_factors``) holds for single sign-on too: a password given
    at another portal does not log in at one that takes only the certificate or the mobile
    ID, which asks for one of those; a portal that takes the password signs in at once."""
    provider.account("alice")
    open_client, _ = provider.client()
    strict, _ = provider.client(allowed_factors=["mobileid", "certificate"])
    with_password, _ = provider.client(allowed_factors=["password", "otp"])
    browser = provider.browser()
    browser.login(open_client)
    page = browser.authorize(strict)
    assert page.status_code == 200 and "/login/factor/certificate" in page.text
    assert "/login/factor/password" not in page.text
    assert callback(browser.authorize(strict, prompt="none"))["error"] == "login_required"
    assert "code" in callback(browser.authorize(with_password))


def test_after_google_and_otp_a_client_that_does_not_take_google_starts_with_the_password(make_provider):
    """What is left of the session for such a client (the OTP) finds nobody: the login starts
    over with a factor that does, not at a second factor for an account it never proved."""
    provider = make_provider(mfa=True)
    account_id = provider.account("alice")
    client_id, _ = provider.client(allowed_factors=[name for name in FACTORS if name != "google"])
    session = provider.svc.sessions.create(account_id, "alice", ["fed", "otp", "mfa"], LOA2, provider.clock(),
                                           proofs={"google": {"amr": ["fed"], "time": provider.clock()},
                                                   "otp": {"amr": ["otp"], "time": provider.clock()}})
    browser = provider.browser()
    browser.http.cookies.set("idp_session", provider.svc.sessions.cookie(session))
    page = browser.authorize(client_id)
    assert "/login/factor/password" in page.text and "/login/factor/otp" not in page.text


def _alice_with_otp(provider) -> tuple[str, str]:
    """alice, with an OTP secret bound: (her account id, the secret)."""
    account_id = provider.account("alice")
    secret = pyotp.random_base32()
    with provider.svc.db.session() as session:
        session.add(Binding(account_id=account_id, factor="otp", label="v1",
                            data={"secret": provider.svc.box.seal(secret, account_id), "version": 1}))
    return account_id, secret


def test_max_age_counts_the_age_of_the_factors_the_client_accepts(provider):
    """A step-up elsewhere with a factor a client does not take makes nothing it takes recent:
    a password client asking max_age=60 an hour after the password asks for it again."""
    account_id, secret = _alice_with_otp(provider)
    open_client, _ = provider.client()
    strict, _ = provider.client(allowed_factors=["password"])
    browser = provider.browser()
    browser.login(open_client)
    provider.clock.advance(3600)
    page = browser.authorize(open_client, acr_values=LOA2)  # an hour later, OTP elsewhere
    assert "code" in callback(browser.submit(page, "/login/factor/otp", otp=pyotp.TOTP(secret).at(provider.clock())))
    provider.clock.advance(10)
    assert "/login/factor/password" in browser.authorize(strict, max_age="60").text


def _otp_an_hour_ago(provider):
    """alice's session: her password and OTP an hour ago, her password alone 10 s ago (LOA1).
    (browser, client_id, client_secret, her OTP secret)."""
    _, secret = _alice_with_otp(provider)
    client_id, client_secret = provider.client()
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id, acr_values=LOA2))
    assert "code" in callback(browser.submit(page, "/login/factor/otp", otp=pyotp.TOTP(secret).at(provider.clock())))
    provider.clock.advance(3600)
    assert "code" in callback(browser.password(browser.authorize(client_id, prompt="login")))
    provider.clock.advance(10)
    return browser, client_id, client_secret, secret


def test_max_age_counts_the_age_of_each_factor_the_login_builds_on(provider):
    """A password typed since (at LOA1) does not make an OTP proven an hour ago recent: asked
    for LOA2 within max_age, the login asks for the OTP again, and prompt=none cannot."""
    browser, client_id, client_secret, secret = _otp_an_hour_ago(provider)
    assert callback(browser.authorize(client_id, acr_values=LOA2, max_age="300", prompt="none"))["error"]
    page = browser.authorize(client_id, acr_values=LOA2, max_age="300")
    assert 'name="otp"' in page.text and 'name="password"' not in page.text  # the password is recent
    params = callback(browser.submit(page, "/login/factor/otp", otp=pyotp.TOTP(secret).at(provider.clock())))
    token = redeem(browser.http, client_id, client_secret, params["code"]).json()
    claims = jwt.decode(token["id_token"], KeySet.import_key_set(browser.http.get("/jwks").json())).claims
    assert claims["acr"] == LOA2 and claims["auth_time"] == int(provider.clock())


def test_a_step_up_at_a_client_with_a_policy_keeps_the_sessions_other_proofs(provider):
    """The session is narrowed for the client's login only: a card proven for one portal still
    counts there after OTP was added at a portal that does not take cards."""
    account_id, secret = _alice_with_otp(provider)
    commerce, _ = provider.client()
    research, _ = provider.client(allowed_factors=["password", "otp"])
    now = provider.clock()
    card = provider.svc.sessions.create(account_id, "alice", ["pwd", "sc", "pin", "mfa"], LOA3, now,
                                        proofs={"password": {"amr": ["pwd"], "time": now},
                                                "certificate": {"amr": ["sc", "pin"], "time": now}})
    browser = provider.browser()
    browser.http.cookies.set("idp_session", provider.svc.sessions.cookie(card))
    provider.clock.advance(60)
    page = browser.authorize(research, acr_values=LOA2)
    assert "code" in callback(browser.submit(page, "/login/factor/otp", otp=pyotp.TOTP(secret).at(provider.clock())))
    assert "code" in callback(browser.authorize(commerce, acr_values=LOA3, prompt="none"))


def test_acr_values_in_order_of_preference_fall_back_to_what_the_account_can_reach(provider):
    """OIDC Core 3.1.2.1: "loa:3 loa:2" asks for the card where one is bound (it alone leads to
    loa:3: no OTP on the way), and otherwise for the OTP (not unmet_authentication_requirements);
    the ID token says which was reached."""
    account_id, secret = _alice_with_otp(provider)
    client_id, client_secret = provider.client()
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id, acr_values=f"{LOA3} {LOA2}"))
    params = callback(browser.submit(page, "/login/factor/otp", otp=pyotp.TOTP(secret).at(provider.clock())))
    token = redeem(browser.http, client_id, client_secret, params["code"]).json()
    claims = jwt.decode(token["id_token"], KeySet.import_key_set(browser.http.get("/jwks").json())).claims
    assert claims["acr"] == LOA2
    with provider.svc.db.session() as session:
        session.add(Binding(account_id=account_id, factor="certificate", external_id="MOICA|TEST0001", data={}))
    other = provider.browser()
    page = other.password(other.authorize(client_id, acr_values=f"{LOA3} {LOA2}"))
    assert "/login/factor/certificate" in page.text and 'name="otp"' not in page.text  # not a code at LOA2


def test_acr_values_fall_back_without_asking_for_what_only_an_unreachable_level_needs(provider):
    """P5, OIDC Core 5.5.1.1: "loa:3 loa:1" for an account without a card ends at loa:1 after
    the password; the OTP (loa:2, which neither level asks for) is not asked on the way."""
    _alice_with_otp(provider)
    client_id, client_secret = provider.client()
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id, acr_values=f"{LOA3} {LOA1}"))
    assert 'name="otp"' not in page.text
    token = redeem(browser.http, client_id, client_secret, callback(page)["code"]).json()
    claims = jwt.decode(token["id_token"], KeySet.import_key_set(browser.http.get("/jwks").json())).claims
    assert claims["acr"] == LOA1 and claims["amr"] == ["pwd"]


def test_a_step_up_to_a_level_out_of_reach_asks_for_nothing(provider):
    """P5, RFC 9470 3: a session at loa:2 (a password typed just now, the OTP an hour ago) and
    a portal asking loa:3 within max_age from an account without a card: the answer is
    unmet_authentication_requirements at once, not an OTP page that could never lead there."""
    browser, client_id, _, _ = _otp_an_hour_ago(provider)
    page = browser.authorize(client_id, acr_values=LOA3, max_age="300")
    assert callback(page)["error"] == "unmet_authentication_requirements"


def test_allow_ends_the_login_though_nothing_asked_for_is_registered(provider):
    """Consent to a request whose scope the client may not have at all (it gets openid
    alone) is given once: allow does not show the consent page again."""
    provider.account("alice")
    third, _ = provider.client(first_party=False, client_name="Research Grants", scope="openid profile")
    browser = provider.browser()
    page = browser.password(browser.authorize(third, scope="phone"))
    assert "/login/consent" in page.text
    assert "code" in callback(browser.submit(page, "/login/consent", button=("decision", "allow")))


def test_a_login_paused_on_an_ended_session_proves_nothing(provider):
    """A login that took over an SSO session (a consent page left open) ends with it: at a shared
    computer, the next person pressing allow after the user logged out gets no code and no
    session. Nor does a login whose factors were proven before the owner ended every session
    (an intruder who knew the password, paused at consent while the owner reset it)."""
    account_id = provider.account("alice")
    portal, _ = provider.client()
    third, _ = provider.client(first_party=False, client_name="Research Grants")
    browser = provider.browser()
    browser.login(portal)
    paused = browser.authorize(third, prompt="consent")
    browser.submit(browser.go("/logout"), "/logout")
    after = browser.submit(paused, "/login/consent", button=("decision", "allow"))
    assert "登入已逾時" in after.text and "location" not in after.headers
    assert callback(browser.authorize(portal, prompt="none"))["error"] == "login_required"

    intruder = provider.browser()
    paused = intruder.password(intruder.authorize(third))
    assert "/login/consent" in paused.text, paused.headers.get("location")
    provider.clock.advance(1)
    provider.svc.sessions.end_all(account_id, provider.svc.tokens)  # as a reset does
    after = intruder.submit(paused, "/login/consent", button=("decision", "allow"))
    assert "登入已逾時" in after.text and "location" not in after.headers
    assert "code" in provider.browser().login(portal)  # a login after it is a new start


def test_a_client_is_shown_by_its_registered_name_never_as_the_providers_text(provider):
    """A client named after one of the provider's messages does not pass as the provider's
    own pages ("return to account settings"); those keep their name."""
    client_id, _ = provider.client(client_name="account.console")
    page = provider.browser().authorize(client_id)
    assert "登入後將返回「account.console」" in page.text and "帳號設定" not in page.text
    assert "登入後將返回「帳號設定」" in provider.browser().go("/account").text


def test_expired_password_must_be_changed(provider):
    provider.account("alice")
    client_id, _ = provider.client()
    provider.clock.advance(91 * 86400)
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id))
    assert "/login/password-change" in page.text and "90" in page.text
    change = "/login/password-change"
    page = browser.submit(page, change, new_password="New-Password-2!", new_password_again="New-Password-3!")
    assert "不一致" in _error(page)
    page = browser.submit(page, change, new_password="short", new_password_again="short")
    assert "不符合規則" in _error(page) and "大寫英文字母" in page.text and "符號" in page.text
    page = browser.submit(page, change, new_password=PASSWORD, new_password_again=PASSWORD)
    assert "不可與目前的密碼相同" in _error(page)
    params = callback(browser.submit(page, change, new_password="New-Password-2!", new_password_again="New-Password-2!"))
    assert params["code"]
    fresh = provider.browser()
    assert "code" in fresh.login(client_id, password="New-Password-2!")


def test_disabled_account_cannot_log_in(provider):
    from idp.storage.models import Account

    account_id = provider.account("alice")
    with provider.svc.db.session() as session:
        session.get(Account, account_id).disabled = True
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id))
    assert "停用" in _error(page)


def test_a_password_hashed_with_older_parameters_is_upgraded_at_login(provider):
    from argon2 import PasswordHasher

    from idp.storage.models import Account

    account_id = provider.account("alice")
    with provider.svc.db.session() as session:  # as an earlier release, with a cheaper cost, stored it
        session.get(Account, account_id).password_hash = PasswordHasher(time_cost=1, memory_cost=1024).hash(PASSWORD)
    client_id, _ = provider.client()
    assert "code" in provider.browser().login(client_id)
    with provider.svc.db.session() as session:
        upgraded = session.get(Account, account_id).password_hash
    assert not provider.svc.passwords.hasher.check_needs_rehash(upgraded)
    assert "code" in provider.browser().login(client_id)  # and the password still works


def test_cancel_returns_access_denied(provider):
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.authorize(client_id, state="c1")
    params = callback(browser.submit(page, "/login/cancel"))
    assert params == {"error": "access_denied", "error_description": "The user cancelled the login.", "state": "c1", "iss": provider.issuer}


def test_login_form_needs_the_csrf_token_of_this_browser(provider):
    provider.account("alice")
    client_id, _ = provider.client()
    victim = provider.browser()
    page = victim.authorize(client_id)
    attacker = provider.browser()
    stolen = forms(page.text)[0]["fields"]
    response = attacker.go("/login/factor/password", "POST", {**stolen, "username": "alice", "password": PASSWORD})
    assert response.status_code == 400 and "location" not in response.headers


def test_pages_carry_security_headers(provider):
    client_id, _ = provider.client()
    page = provider.browser().authorize(client_id)
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-frame-options"] == "DENY"
    cookie = page.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie


def test_language_switch_is_remembered(provider):
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.authorize(client_id)
    english = browser.go(f"/login?tx={_tx(page)}&lang=en")
    assert "Password" in english.text
    assert "Password" in browser.go(f"/login?tx={_tx(page)}").text
    # Each page links to itself in the other language: its own address, ``lang`` set once.
    assert _language_link(page, "en") == {"tx": [_tx(page)], "factor": ["password"], "lang": ["en"]}
    assert _language_link(english, "zh-TW") == {"tx": [_tx(page)], "factor": ["password"], "lang": ["zh-TW"]}
    # A path: another Host header (a proxy that passes any) puts no other host in the page.
    spoofed = browser.http.get("/authorize?client_id=nobody", headers={"Host": "evil.example"})
    assert spoofed.status_code == 400 and "evil.example" not in spoofed.text
    assert '<a href="/authorize?client_id=nobody&amp;lang=zh-TW" lang="zh-TW">' in spoofed.text
    # A path of "//host/..." (the 404 page) links to that path here, not to that host.
    page = browser.http.get(provider.issuer + "//evil.example/phish")
    assert page.status_code == 404 and '<a href="/evil.example/phish?lang=zh-TW" lang="zh-TW">' in page.text



def test_a_form_address_opened_from_the_address_bar_gets_a_page_in_the_users_language(provider):
    page = provider.browser().http.get("/login/consent?lang=en")
    assert page.status_code == 405 and page.headers["allow"] == "POST"
    assert '<html lang="en">' in page.text and "cannot be opened directly" in page.text

def _language_link(page, lang: str) -> dict:
    return parse_qs(urlsplit(language_link(page, lang)).query)


def test_each_login_page_links_every_other_way_in_by_name(make_provider):
    """A first step that offers every factor: the certificate, passkey and TLS-certificate
    pages each link to all the others, each link named in the user's language (a missing
    message would show its key)."""
    provider = make_provider(issuer="http://localhost", client_cert_header="X-SSL-Client-Cert",
                             mobileid_url="http://127.0.0.1:9/moise/sp/", mobileid_sp_service_id="sp",
                             mobileid_key="00" * 32, upstream_issuer="http://127.0.0.1:9")
    client_id, _ = provider.client()
    browser = provider.browser()
    tx = _tx(browser.authorize(client_id))
    ways = {"password", "certificate", "passkey", "tls_certificate", "mobileid", "google", "one_day"}
    for here in ("certificate", "passkey", "tls_certificate"):
        page = browser.go(f"/login?tx={tx}&factor={here}")
        other = re.search(r'<ul class="other">(.*?)</ul>', page.text, re.S).group(1)
        found = re.findall(r'<a href="/login(?:\?tx=[^"&]+&amp;factor=(\w+)|/google\?tx=[^"]+)"[^>]*>([^<]+)</a>', other)
        links = {name or "google": label for name, label in found}  # Google's link goes to /login/google
        assert set(links) == ways - {here}, here
        assert not [label for label in links.values() if re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", label)], links
        assert links["password"] == "改用帳號密碼登入" and links["google"] == "使用 Google 帳號登入"


# -- the activity log (M6) and id_token_hint --------------------------------------------------
def _activity(provider, account_id) -> list[tuple[str, str | None, str | None]]:
    from sqlalchemy import select

    from idp.storage.models import AuditEvent

    with provider.svc.db.session() as session:
        rows = session.execute(select(AuditEvent).where(AuditEvent.account_id == account_id)
                               .order_by(AuditEvent.id)).scalars().all()
        return [(e.event, e.client_id, e.method) for e in rows]


def test_each_portal_a_login_reaches_is_in_the_activity_log_single_sign_on_too(provider):
    alice = provider.account("alice")
    school, _ = provider.client(client_name="School")
    shop, _ = provider.client(client_name="Shop")
    browser = provider.browser()
    assert "code" in browser.login(school)
    assert "code" in callback(browser.authorize(shop))  # single sign-on: no page
    assert _activity(provider, alice) == [("login.success", school, "password"), ("login.sso", shop, "sso")]


def test_a_session_ended_by_another_accounts_login_is_in_its_activity_log(provider):
    alice = provider.account("alice")
    provider.account("bob")
    client_id, _ = provider.client()
    browser = provider.browser()
    assert "code" in browser.login(client_id)
    assert "code" in callback(browser.password(browser.authorize(client_id, prompt="login"), username="bob"))
    assert provider.svc.sessions.of_account(alice) == []
    assert _activity(provider, alice)[-1] == ("logout", client_id, "replaced")


def test_id_token_hint_names_the_only_user_whose_login_answers(provider):
    """OIDC Core 3.1.2.1: a portal re-authenticating bob (his ID token as the hint) gets no code
    for whoever else logs in in that browser."""
    provider.account("alice")
    provider.account("bob")
    client_id, secret = provider.client()
    other = provider.browser()
    hint = redeem(other.http, client_id, secret, other.login(client_id, username="bob")["code"]).json()["id_token"]
    browser = provider.browser()
    page = browser.authorize(client_id, id_token_hint=hint)
    assert callback(browser.password(page, username="alice"))["error"] == "login_required"
    page = browser.authorize(client_id, id_token_hint=hint)
    assert "code" in callback(browser.password(page, username="bob"))


def test_a_cookie_learnt_before_a_step_up_is_not_worth_the_stepped_up_session(provider):
    """Session fixation: whoever learnt the session cookie while it proved a password alone
    (a shared computer) does not hold the two-factor session it became. The portals keep
    knowing the session by its sid."""
    alice = provider.account("alice")
    secret = pyotp.random_base32()
    with provider.svc.db.session() as session:
        session.add(Binding(account_id=alice, factor="otp", label="v1",
                            data={"secret": provider.svc.box.seal(secret, alice), "version": 1}))
    client_id, client_secret = provider.client()
    browser = provider.browser()
    first = redeem(browser.http, client_id, client_secret, browser.login(client_id)["code"]).json()  # LOA1
    learnt = browser.http.cookies["idp_session"]
    page = browser.authorize(client_id, acr_values=LOA2)
    code = callback(browser.submit(page, "/login/factor/otp", otp=pyotp.TOTP(secret).at(provider.clock())))["code"]
    assert browser.http.cookies["idp_session"] != learnt
    thief = provider.browser()
    thief.http.cookies.set("idp_session", learnt)
    assert callback(thief.authorize(client_id, prompt="none"))["error"] == "login_required"
    # Nor is a made-up secret, whatever its characters: no session, not an error.
    forged = (learnt.partition(".")[0] + ".\xe9t\xe9").encode("latin-1")
    assert 'name="password"' in thief.http.get("/account", headers={"Cookie": b"idp_session=" + forged}).text
    second = redeem(browser.http, client_id, client_secret, code).json()
    keys = KeySet.import_key_set(browser.http.get("/jwks").json())
    sids = {jwt.decode(t["id_token"], keys).claims["sid"] for t in (first, second)}
    assert len(sids) == 1  # one session to the portal, before and after


def test_two_tabs_consenting_at_once_both_log_in(provider):
    """Each login read "no consent yet" and added one; the second broke the key: a server error,
    and that login's new session ended."""
    from concurrent.futures import ThreadPoolExecutor

    provider.account("alice")
    client_id, _ = provider.client(first_party=False, client_name="Research Grants")
    pages = []
    for browser in (provider.browser(), provider.browser()):
        page = browser.password(browser.authorize(client_id))
        pages.append((browser, page))
    with both_reach(provider.svc.db.engine, "INSERT INTO CONSENTS"), ThreadPoolExecutor(2) as pool:
        answers = [pool.submit(b.submit, p, "/login/consent", button=("decision", "allow")) for b, p in pages]
        assert all("code" in callback(answer.result(timeout=60)) for answer in answers)


def test_the_lockout_messages_say_the_configured_limits(make_provider):
    provider = make_provider(lockout_threshold=5, lockout_seconds=3600)
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.authorize(client_id)
    assert "密碼輸入錯誤達 5 次，將導致帳號鎖定 60 分鐘" in page.text
    assert "再錯 4 次，帳號將鎖定 60 分鐘" in browser.password(page, password="wrong-password").text


def test_the_lockout_ends_at_the_minute_the_page_gives(provider):
    """A1: "請於 {until} 後再登入", to the minute: locked at 23:50:40 (Taiwan) for 15 minutes, the
    page says 00:06, not 00:05, when the lock would still hold."""
    import datetime as dt

    taipei = dt.timezone(dt.timedelta(hours=8))
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    provider.clock.now = dt.datetime(2024, 12, 31, 23, 50, 40, tzinfo=taipei).timestamp()
    page = browser.authorize(client_id)
    for n in range(3):
        page = browser.password(page, password=f"wrong-{n}")
    assert "請於 00:06 後再登入" in _error(page)
    provider.clock.now = dt.datetime(2025, 1, 1, 0, 6, tzinfo=taipei).timestamp()
    assert callback(browser.password(browser.authorize(client_id)))["code"]
