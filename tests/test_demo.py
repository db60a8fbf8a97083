"""The demo `make run` sets up (idp/demo.py), as README.md describes it."""

from pathlib import Path

import pytest

from idp import demo
from idp.protocol.clients import find


@pytest.fixture
def demo_provider(make_provider, tmp_path, monkeypatch):
    """A provider with the demo's account and portals (demo._prepare, as each `make run`)."""
    provider = make_provider(mfa=True, trust_dir=str(Path("keys/trust").resolve()), mobileid_sp_service_id="demo",
                             mobileid_url="http://127.0.0.1:9/moise/sp/", mobileid_key="00" * 32)
    monkeypatch.chdir(tmp_path)  # demo.VAR is var/ under the working directory
    (tmp_path / "var").mkdir()
    return provider, demo._prepare(provider.app)


def test_a_restart_keeps_the_policy_an_administrator_changed(demo_provider):
    provider, registered = demo_provider
    commerce = registered[demo.COMMERCE]["client_id"]
    with provider.svc.db.session() as session:  # as /admin/clients stores "every factor, level 3"
        row = find(session, commerce)
        row.metadata_ = {**{k: v for k, v in row.metadata_.items() if k != "allowed_factors"},
                         "minimum_acr": "urn:idp:loa:3"}
    assert demo._prepare(provider.app) == registered  # the next `make run`: the same clients
    with provider.svc.db.session() as session:
        meta = find(session, commerce).metadata_
    assert meta["minimum_acr"] == "urn:idp:loa:3" and "allowed_factors" not in meta
    assert meta["redirect_uris"] == [demo.COMMERCE + "/callback"]


def test_the_demo_login_asks_for_the_mobile_certificate_as_the_readme_says(demo_provider):
    provider, registered = demo_provider
    browser = provider.browser()
    page = browser.authorize(registered[demo.SCHOOL]["client_id"], redirect_uri=demo.SCHOOL + "/callback")
    page = browser.password(page, demo.DEMO_USER, demo.DEMO_PASSWORD)
    assert 'data-step="mobileid"' in page.text
