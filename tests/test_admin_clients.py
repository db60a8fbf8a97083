"""The registered clients and their policy in the administration area (SPEC P7, M7),
on both back ends, through the provider's own pages."""

from __future__ import annotations

import re
from html import unescape

from tests.harness import callback, forms, language_link
from tests.test_admin import events, sign_in
from tests.test_totp import _code

LOA2, LOA3 = "urn:idp:loa:2", "urn:idp:loa:3"


def row(page, client_id: str, policy: str) -> str:
    table = re.search(rf'<table class="methods" data-client="{re.escape(client_id)}">(.*?)</table>', page.text, re.S)
    assert table, page.text[:2000]
    found = re.search(rf'<tr data-policy="{policy}">.*?<td>(.*?)</td>', table.group(1), re.S)
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", found.group(1)))).strip()


def error(page) -> str:
    found = re.search(r'<div class="error" role="alert">\s*<p>(.*?)</p>', page.text, re.S)
    return unescape(found.group(1)) if found else ""


def ticked(page, client_id: str) -> tuple[list[str], str]:
    """The factors ticked and the minimum level chosen in a client's policy form."""
    form = re.search(rf'<form [^>]*data-for="{re.escape(client_id)}">(.*?)</form>', page.text, re.S).group(1)
    return (re.findall(r'name="factor" value="([^"]+)" checked', form),
            re.search(r'<option value="([^"]*)" selected>', form).group(1))


def test_an_admin_reads_each_clients_policy_and_uris(site):
    commerce, _ = site.client(client_name="商工行政服務入口網", minimum_acr=LOA3,
                              allowed_factors=["password", "otp", "mobileid"],
                              redirect_uris=["https://commerce.example.tw/callback"],
                              post_logout_redirect_uris=["https://commerce.example.tw/"],
                              backchannel_logout_uri="https://commerce.example.tw/backchannel-logout")
    open_client, _ = site.client(client_name="研究計畫系統", redirect_uris=["https://grants.example.tw/cb"])
    browser, page, _ = sign_in(site, "root")
    page = browser.go("/admin")
    assert 'href="/admin/clients"' in page.text
    page = browser.go("/admin/clients")
    assert page.status_code == 200
    assert "商工行政服務入口網" in page.text and "研究計畫系統" in page.text

    assert row(page, commerce, "allowed_factors") == "password otp mobileid"
    assert row(page, commerce, "minimum_acr") == LOA3
    assert row(page, commerce, "redirect_uris") == "https://commerce.example.tw/callback"
    assert row(page, commerce, "post_logout_redirect_uris") == "https://commerce.example.tw/"
    assert row(page, commerce, "backchannel_logout_uri") == "https://commerce.example.tw/backchannel-logout"
    assert row(page, commerce, "frontchannel_logout_uri") == "（無）"

    assert "（未限制：全部驗證方式）" in row(page, open_client, "allowed_factors")
    assert row(page, open_client, "minimum_acr") == "（無）"
    assert row(page, open_client, "mfa") == "是"  # this site asks every login for two factors


def test_an_aa_account_does_not_see_the_clients(site):
    browser, page, _ = sign_in(site, "school-aa")
    assert 'href="/admin/clients"' not in browser.go("/admin").text
    page = browser.go("/admin/clients")
    assert page.status_code == 403 and "只有系統管理者" in page.text


def test_an_admin_changes_a_clients_policy_with_the_csrf_token(site):
    client_id, _ = site.client(client_name="商工行政服務入口網")
    browser, page, _ = sign_in(site, "root")
    page = browser.go("/admin/clients")
    form = f"/admin/clients/{client_id}/policy"
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)

    # Without the CSRF token nothing changes.
    refused = browser.go(form, "POST", {"factor": ["password", "otp"], "minimum_acr": LOA3})
    assert refused.status_code == 400
    assert site.svc.server.query_client(client_id).minimum_acr is None

    page = browser.go(form, "POST", {"csrf": csrf, "factor": ["password", "otp", "mobileid"], "minimum_acr": LOA3})
    assert "已儲存登入政策" in page.text
    assert row(page, client_id, "allowed_factors") == "password otp mobileid"
    assert row(page, client_id, "minimum_acr") == LOA3
    client = site.svc.server.query_client(client_id)  # in force at once
    assert client.minimum_acr == LOA3 and client.allows("mobileid") and not client.allows("google")
    [event] = [e for e in events(site, "client.policy_changed")]
    assert event.client_id == client_id and event.detail["minimum_acr"] == LOA3

    # No factor at all is refused, and the policy stays; so is a policy no login can meet: no way
    # to begin one, or a level the factors allowed cannot reach. The message names the client and
    # why; the form shows what the administrator ticked, to mend rather than tick again.
    begin = "未儲存「商工行政服務入口網」的登入政策：勾選的驗證方式都無法開始登入。請至少勾選下列一種：password, "
    level = f"未儲存「商工行政服務入口網」的登入政策：勾選的驗證方式最高只能達到 {LOA2}，未達最低驗證等級 {LOA3}。"
    for policy, said in (({}, begin), ({"factor": ["otp", "push"]}, begin), ({"factor": ["password", "otp"]}, level)):
        page = browser.go(form, "POST", {"csrf": csrf, "minimum_acr": LOA3 if policy else LOA2, **policy})
        assert page.status_code == 400
        assert error(page).startswith(said), error(page)
        assert row(page, client_id, "minimum_acr") == LOA3 and row(page, client_id, "allowed_factors") == "password otp mobileid"
        assert ticked(page, client_id) == (policy.get("factor", []), LOA3 if policy else LOA2)
    # A factor the form does not offer was not ticked there: refused, as no factor the provider has.
    page = browser.go(form, "POST", {"csrf": csrf, "factor": ["password", "sms"], "minimum_acr": ""})
    assert page.status_code == 400 and "「商工行政服務入口網」的登入政策：其中有本服務沒有的驗證方式" in error(page)
    page = browser.go(language_link(page, "en"))
    page = browser.go(form, "POST", {"csrf": csrf, "factor": ["otp"], "minimum_acr": ""})
    assert error(page).startswith("Not saved: at “商工行政服務入口網”, none of the factors ticked can begin a login.")


def test_an_admin_tightens_the_policy_of_a_client_stored_with_a_sector_identifier_uri(site):
    """A client stored before sector_identifier_uri was refused keeps working (and its sector);
    the policy form checks the policy alone, so such a client can still be tightened."""
    from idp.storage.models import Client

    client_id, _ = site.client(client_name="研究計畫系統", subject_type="pairwise",
                               redirect_uris=["https://grants.example.tw/cb"])
    with site.svc.db.session() as session:
        row_ = session.get(Client, client_id)
        row_.metadata_ = {**row_.metadata_, "sector_identifier_uri": "https://grants.example.tw/sector.json"}
    browser, page, _ = sign_in(site, "root")
    page = browser.go("/admin/clients")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    page = browser.go(f"/admin/clients/{client_id}/policy", "POST",
                      {"csrf": csrf, "factor": ["password", "otp", "certificate"], "minimum_acr": LOA3})
    assert "已儲存登入政策" in page.text
    client = site.svc.server.query_client(client_id)
    assert client.minimum_acr == LOA3 and client.metadata["sector_identifier_uri"].endswith("/sector.json")


def _change_policy(site, client_id: str, factors: list[str], minimum: str = "") -> None:
    """An administrator saves ``client_id``'s policy on the clients page."""
    browser, page, _ = sign_in(site, "root", "/admin/clients")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    page = browser.go(f"/admin/clients/{client_id}/policy", "POST",
                      {"csrf": csrf, "factor": factors, "minimum_acr": minimum})
    assert "已儲存登入政策" in page.text


def test_a_minimum_raised_mid_login_holds_for_that_login(site):
    """SPEC P5: the level an administrator raises a portal to while a user is at its OTP step
    is the level that login must reach: no LOA2 code at a portal that now asks for the card."""
    client_id, _ = site.client(client_name="商工行政服務入口網")
    _, _, secret = sign_in(site, "alice")  # alice binds OTP, no card
    site.clock.advance(30)
    browser = site.browser()
    page = browser.password(browser.authorize(client_id), username="alice")
    assert 'name="otp"' in page.text
    _change_policy(site, client_id, ["password", "otp", "certificate"], LOA3)
    page = browser.submit(page, "/login/factor/otp", otp=_code(site, secret))
    assert callback(page)["error"] == "unmet_authentication_requirements"


def test_a_factor_taken_out_of_a_policy_mid_login_proves_nothing_more(site):
    """SPEC P7: a password typed before the administrator took the password out of a portal's
    policy does not count towards that login: the OTP ends no login, which asks for the card."""
    client_id, _ = site.client(client_name="商工行政服務入口網")
    _, _, secret = sign_in(site, "alice")
    site.clock.advance(30)
    browser = site.browser()
    page = browser.password(browser.authorize(client_id), username="alice")
    tx = forms(page.text)[0]["fields"]["tx"]
    _change_policy(site, client_id, ["certificate", "otp"])
    page = browser.submit(page, "/login/factor/otp", otp=_code(site, secret))
    assert "code=" not in page.headers.get("location", "")
    page = browser.go(f"/login?tx={tx}")
    assert "/login/factor/certificate" in page.text and 'name="otp"' not in page.text


def test_a_factor_form_sent_after_the_policy_dropped_the_login_s_proofs_goes_on_with_the_login(site):
    """P7: the OTP form of a login whose password an administrator's policy change made void
    brings the user to where the login is now (its first step, the card), saying why in the
    user's language; it was the "login expired" page of a login that was still alive."""
    client_id, _ = site.client(client_name="商工行政服務入口網")
    _, _, secret = sign_in(site, "alice")
    site.clock.advance(30)
    browser = site.browser()
    page = browser.password(browser.authorize(client_id, ui_locales="en"), username="alice")
    _change_policy(site, client_id, ["certificate", "otp"])
    page = browser.submit(page, "/login/factor/otp", otp=_code(site, secret))
    assert page.status_code == 200 and "/login/factor/certificate" in page.text and 'name="otp"' not in page.text
    assert "no longer counts" in page.text and "Login expired" not in page.text
