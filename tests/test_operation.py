"""Running the provider (SPEC O1, O3): health, readiness, metrics, migrations."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import create_engine, text

from tests.harness import callback


def test_health_and_readiness(provider):
    http = provider.http()
    assert http.get("/healthz").text == "ok"
    assert http.get("/readyz").json() == {"database": True, "store": True}


def test_metrics_count_logins_by_outcome(provider):
    provider.account("alice")
    client_id, _ = provider.client()
    browser = provider.browser()
    page = browser.password(browser.authorize(client_id), password="wrong-password")
    callback(browser.password(page))
    text_ = provider.http().get("/metrics").text
    assert 'idp_audit_events_total{event="login.failure"} 1.0' in text_
    assert 'idp_audit_events_total{event="login.success"} 1.0' in text_
    assert 'route="/authorize"' in text_ and "tx=" not in text_


def test_metrics_token(make_provider):
    provider = make_provider(metrics_token="s3cret")
    http = provider.http()
    assert http.get("/metrics").status_code == 401
    assert http.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_processes_starting_together_migrate_once(settings_for, tmp_path):
    settings = settings_for()
    env_db = settings.database_url

    def start(_):
        return subprocess.run(
            [sys.executable, "-m", "idp.cli", "migrate"], capture_output=True, text=True, cwd=tmp_path,
            env={"IDP_DATABASE_URL": env_db, "IDP_KEYS_DIR": str(tmp_path / "keys"), "PATH": "/usr/bin:/bin"},
        )

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(start, range(4)))
    assert all(r.returncode == 0 for r in results), [r.stderr[-800:] for r in results]
    with create_engine(env_db).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    keys = list((tmp_path / "keys").glob("*.json"))
    assert len(keys) == 4  # current + next for ES256 and RS256, not one set per process
