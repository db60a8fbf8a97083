"""The admin CLI as an operator uses it, and the docs that must match the code."""

import argparse
import dataclasses
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from idp.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent


def _idp(tmp_path, *args, stdin="", **settings):
    # PYTHONPATH: this checkout's code, whichever one the environment has installed.
    env = {**os.environ, "IDP_DATABASE_URL": f"sqlite:///{tmp_path}/cli.sqlite3", "IDP_KEYS_DIR": str(tmp_path / "keys"),
           "PYTHONPATH": str(ROOT), **settings}
    return subprocess.run([sys.executable, "-m", "idp.cli", *args], input=stdin, capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)


def test_configuration_reference_matches_settings():
    assert Settings.markdown_table() in (ROOT / "docs/configuration.md").read_text()


def _options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        yield from action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _options(sub)


def test_the_code_names_only_settings_and_options_that_exist():
    """idp/mobileid/config.py named IDP_MOBILEID_HINT and IDP_MOBILEID_POLL_INTERVAL, which
    nothing read, and settings.py `idp settings --markdown`, a flag the command does not have."""
    from idp.cli import parser

    settings = {"IDP_" + f.name.upper() for f in dataclasses.fields(Settings)}
    options = set(_options(parser()))
    for path in (ROOT / "idp").rglob("*.py"):
        text = path.read_text()
        assert set(re.findall(r"\bIDP_[A-Z0-9_]*[A-Z0-9]\b", text)) <= settings, path
        for command in re.findall(r"`idp ([^`]+)`", text):
            assert set(re.findall(r"--[a-z-]+", command)) <= options, (path, command)


def test_a_negative_number_in_the_settings_stops_the_start():
    """A retention of -1 days put the prune's cut-off in the future, deleting the whole audit
    log within the hour; a password age of -1 expired every password."""
    for name in ("IDP_AUDIT_RETENTION_DAYS", "IDP_PASSWORD_MAX_AGE_DAYS", "IDP_DATABASE_STATEMENT_TIMEOUT"):
        with pytest.raises(SettingsError, match=f"{name} must be at least 0, not -1"):
            Settings.from_env({name: "-1"})
        assert Settings.from_env({name: "0"})  # documented: keep them all, never, no limit


@pytest.mark.parametrize("name", ["IDP_SESSION_SECONDS", "IDP_MAX_FORM_BYTES", "IDP_LOCKOUT_THRESHOLD",
                                  "IDP_DISABLED_MARKS_SECONDS", "IDP_SMTP_TIMEOUT_SECONDS", "IDP_CODE_SECONDS",
                                  "IDP_HASH_THREADS", "IDP_ARGON2_TIME_COST", "IDP_ARGON2_PARALLELISM"])
def test_a_zero_that_means_nothing_stops_the_start(name):
    """Zero started, and broke what it sized: a session of 0 s ended before the code exchange
    (with Redis the password step was a 500), IDP_MAX_FORM_BYTES=0 refused every form, a
    threshold of 0 locked the account at its first right password, IDP_DISABLED_MARKS_SECONDS=0
    rewrote the marks in a busy loop, IDP_SMTP_TIMEOUT_SECONDS=0 sent no mail, and the hasher
    refused an Argon2 cost of 0 with a message that named no variable."""
    with pytest.raises(SettingsError, match=f"{name} must be at least 1, not 0"):
        Settings.from_env({name: "0"})


@pytest.mark.parametrize("name", ["IDP_KEYS_DIR", "IDP_TRUST_DIR", "IDP_OUTBOX_DIR"])
def test_an_empty_directory_setting_stops_the_start(name):
    """`IDP_KEYS_DIR=` (a line of an env file left empty) started, and wrote the private signing
    keys and instance secrets into the working directory; two processes started in different
    directories then signed with different keys."""
    for empty in ("", " "):
        with pytest.raises(SettingsError, match=f"{name} must name a directory, not be empty"):
            Settings.from_env({name: empty})
    assert Settings.from_env({"IDP_CRL_CACHE_DIR": "", "IDP_MOBILEID_TRUST": ""})  # documented: in memory, IDP_TRUST_DIR


def test_argon2_memory_below_what_its_lanes_need_stops_the_start():
    for memory, lanes in (("7", "1"), ("15", "2")):
        with pytest.raises(SettingsError, match=f"IDP_ARGON2_MEMORY_KIB must be at least 8 × IDP_ARGON2_PARALLELISM "
                                                f"\\({8 * int(lanes)}\\), not {memory}"):
            Settings.from_env({"IDP_ARGON2_MEMORY_KIB": memory, "IDP_ARGON2_PARALLELISM": lanes})
    assert Settings.from_env({"IDP_ARGON2_MEMORY_KIB": "16", "IDP_ARGON2_PARALLELISM": "2"})


@pytest.mark.parametrize("issuer, says", [
    ("https://login.example.tw/", "must not end in a slash"), ("", "http:// or https:// URL with a host"),
    ("login.example.tw", "with a host"), ("ftp://login.example.tw", "with a host"),
    ("https://login.example.tw?tenant=1", "no query or fragment"), ("https://login.example.tw#top", "no query")])
def test_an_issuer_no_endpoint_could_be_built_on_stops_the_start(issuer, says):
    """The issuer is the `iss` of every token and the base of every endpoint URL: a trailing
    slash advertised https://login.example.tw//authorize (a 404), a query or fragment no
    relying party may accept (OpenID Connect Discovery 1.0 section 3)."""
    with pytest.raises(SettingsError, match="IDP_ISSUER") as refused:
        Settings.from_env({"IDP_ISSUER": issuer})
    assert says in str(refused.value)
    assert Settings.from_env({"IDP_ISSUER": "https://login.example.tw/idp"}).issuer == "https://login.example.tw/idp"


def test_clients_add_prints_json_with_secret_once(tmp_path):
    out = _idp(tmp_path, "clients", "add", "--name", "校務", "--redirect-uri", "https://school.example.tw/cb", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["client_name"] == "校務" and len(info["client_secret"]) >= 43
    shown = json.loads(_idp(tmp_path, "clients", "show", info["client_id"]).stdout)
    assert "client_secret" not in shown and shown["redirect_uris"] == ["https://school.example.tw/cb"]
    assert info["client_id"] in _idp(tmp_path, "clients", "list").stdout
    assert _idp(tmp_path, "clients", "remove", info["client_id"]).returncode == 0
    assert info["client_id"] not in _idp(tmp_path, "clients", "list").stdout


def test_clients_add_takes_a_jwks_uri_for_a_private_key_jwt_client(tmp_path):
    """OIDC Registration 1.0 2: an administrator may name the client's keys by URL, as /register may."""
    out = _idp(tmp_path, "clients", "add", "--name", "x", "--grant-type", "client_credentials", "--auth-method",
               "private_key_jwt", "--jwks-uri", "https://a.example.tw/jwks.json", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["jwks_uri"] == "https://a.example.tw/jwks.json" and "client_secret" not in info


def test_clients_add_rejects_bad_redirect(tmp_path):
    out = _idp(tmp_path, "clients", "add", "--name", "x", "--redirect-uri", "http://evil.example.com/cb")
    assert out.returncode == 2 and "https" in out.stderr


def test_users_add_enforces_the_password_policy(tmp_path):
    weak = _idp(tmp_path, "users", "add", "bob", "--password-stdin", stdin="short\n")
    assert weak.returncode == 2 and "at least 10 characters" in weak.stderr and "symbol" in weak.stderr
    ok = _idp(tmp_path, "users", "add", "bob", "--email", "b@example.tw", "--password-stdin", stdin="Correct-Horse-9!\n")
    assert ok.returncode == 0, ok.stderr
    assert "bob\tpersonal" in _idp(tmp_path, "users", "list").stdout
    again = _idp(tmp_path, "users", "add", "bob", "--password-stdin", stdin="Correct-Horse-9!\n")
    assert again.returncode == 2 and "already exists" in again.stderr
    carol = _idp(tmp_path, "users", "add", "carol", "--national-id", "A123456789")
    assert carol.returncode == 0, carol.stderr
    same_person = _idp(tmp_path, "users", "add", "dave", "--national-id", "a123456789")
    assert same_person.returncode == 2 and "already has this national ID" in same_person.stderr
    mistyped = _idp(tmp_path, "users", "add", "erin", "--national-id", "A123456788")
    assert mistyped.returncode == 2 and "check digit" in mistyped.stderr


def test_the_case_insensitive_username_migration_names_the_accounts_it_cannot_tell_apart(tmp_path):
    """A database from before migration 0005 with "bob" and "BOB": the migration stops and
    says which accounts to rename; once renamed, it runs."""
    for username in ("bob", "carol"):
        assert _idp(tmp_path, "users", "add", username).returncode == 0
    db = sqlite3.connect(tmp_path / "cli.sqlite3")
    db.executescript("DROP INDEX ix_accounts_username_lower; DROP INDEX ix_accounts_email_lower;"
                     "UPDATE alembic_version SET version_num = '0004';"
                     "UPDATE accounts SET username = 'BOB' WHERE username = 'carol';")
    stopped = _idp(tmp_path, "migrate")
    assert stopped.returncode != 0 and "differ only in case: BOB / bob. Rename" in stopped.stderr
    db.execute("UPDATE accounts SET username = 'carol' WHERE username = 'BOB'")
    db.commit()
    assert _idp(tmp_path, "migrate").returncode == 0
    assert _idp(tmp_path, "users", "add", "CAROL").returncode == 2


def test_migration_0006_forgets_organisation_bindings_and_upper_cases_national_ids(tmp_path):
    """A binding by organisation id would let any of the organisation's cards in: gone, to be
    bound again by card. A national ID kept as typed becomes the one mobile-ID looks for."""
    assert _idp(tmp_path, "users", "add", "school-aa", "--kind", "aa", "--org", "臺北市立測試國民小學").returncode == 0
    assert _idp(tmp_path, "users", "add", "carol", "--national-id", "A123456789").returncode == 0
    db = sqlite3.connect(tmp_path / "cli.sqlite3")
    db.executescript(
        "UPDATE alembic_version SET version_num = '0005';"
        "UPDATE accounts SET national_id = 'a123456789' WHERE username = 'carol';"
        "INSERT INTO bindings (id, account_id, factor, external_id, label, data, created_at) SELECT 'b1', id, 'certificate', "
        "'CN=XCA|org:379123456', '', '{}', CURRENT_TIMESTAMP FROM accounts WHERE username = 'school-aa';"
        "INSERT INTO bindings (id, account_id, factor, external_id, label, data, created_at) SELECT 'b2', id, 'certificate', "
        "'CN=MOICA|TP03000000000001', '', '{}', CURRENT_TIMESTAMP FROM accounts WHERE username = 'carol';")
    assert _idp(tmp_path, "migrate").returncode == 0
    assert db.execute("SELECT external_id FROM bindings").fetchall() == [("CN=MOICA|TP03000000000001",)]
    assert db.execute("SELECT national_id FROM accounts WHERE username = 'carol'").fetchone() == ("A123456789",)


def test_keys_rotate_promotes_the_published_next_key(tmp_path):
    _idp(tmp_path, "migrate")
    before = dict(line.split("\t")[::2] for line in _idp(tmp_path, "keys", "list").stdout.splitlines())
    # Published seconds ago: relying parties may not have the next keys cached yet.
    early = _idp(tmp_path, "keys", "rotate")
    assert early.returncode == 2 and "--now" in early.stderr
    assert dict(line.split("\t")[::2] for line in _idp(tmp_path, "keys", "list").stdout.splitlines()) == before
    after_rotate = _idp(tmp_path, "keys", "rotate", "--now").stdout
    after = dict(line.split("\t")[::2] for line in _idp(tmp_path, "keys", "list").stdout.splitlines())
    for kid, status in before.items():
        if status == "next":
            assert kid in after_rotate and after[kid] == "current"
        if status == "current":
            assert after[kid] == "retired"


def test_bad_input_to_the_cli_is_a_clear_error_and_creates_nothing(tmp_path):
    """As the admin form would say it: no traceback, nothing half made."""
    missing = _idp(tmp_path, "clients", "add", "--name", "x", "--redirect-uri", "https://a.example.tw/cb",
                   "--auth-method", "private_key_jwt", "--jwks", str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{bad")
    bad = _idp(tmp_path, "clients", "add", "--name", "x", "--redirect-uri", "https://a.example.tw/cb",
               "--auth-method", "private_key_jwt", "--jwks", str(tmp_path / "bad.json"))
    aa = _idp(tmp_path, "users", "add", "school-aa", "--kind", "aa")  # an AA account of no organisation
    address = _idp(tmp_path, "users", "add", "erin", "--email", "not-an-address")
    long_name = _idp(tmp_path, "users", "add", "frank", "--name", "x" * 201)
    for out, says in ((missing, "nope.json"), (bad, "bad.json"), (aa, "organisation"), (address, "email"),
                      (long_name, "at most 200")):
        assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr, out.stderr[-300:]
    assert _idp(tmp_path, "users", "list").stdout == ""
    expired = _idp(tmp_path, "clients", "token", "--expires-in", "-100")  # a token dead on arrival
    assert expired.returncode == 2 and "above zero" in expired.stderr and "Traceback" not in expired.stderr


def test_a_port_no_socket_can_have_stops_the_start(tmp_path):
    """`idp serve --port 70000` started and went on as if serving ("Uvicorn running on
    http://127.0.0.1:70000"), on no port anyone would reach; IDP_SMTP_PORT=70000 started and
    failed every mail."""
    out = _idp(tmp_path, "serve", "--port", "70000", IDP_TRUST_DIR=str(ROOT / "keys/trust"))
    assert out.returncode == 2 and "argument --port: '70000' is not a port (1 to 65535)" in out.stderr, out.stderr[-300:]
    assert "Traceback" not in out.stderr
    assert Settings.from_env({"IDP_SMTP_PORT": "65535"}).smtp_port == 65535


@pytest.mark.parametrize("command, settings, says", [
    (["migrate"], {"IDP_CAPTCHA": "sometimes"}, "IDP_CAPTCHA must be one of always, after-failure, off, not 'sometimes'"),
    (["users", "list"], {"IDP_LOCKOUT_THRESHOLD": "0"}, "IDP_LOCKOUT_THRESHOLD must be at least 1, not 0"),
    (["users", "list"], {"IDP_SMTP_PORT": "65536"}, "IDP_SMTP_PORT must be at most 65535, not 65536"),
    (["migrate"], {"IDP_DATABASE_URL": "postgres//idp:secret@db/idp"}, "IDP_DATABASE_URL is not a database URL"),
    (["migrate"], {"IDP_REDIS_URL": "redis//cache:6379"}, "IDP_REDIS_URL: Redis URL must specify one of"),
    (["serve", "--port", "1"], {"IDP_TRUSTED_PROXIES": "10.0.0.0/33", "IDP_TRUST_DIR": str(ROOT / "keys/trust")},
     "IDP_TRUSTED_PROXIES: '10.0.0.0/33' is not an address or CIDR network"),
    (["serve", "--port", "1"], {}, "IDP_TRUST_DIR: trust directory"),  # the working directory has no keys/trust
])
def test_a_setting_that_cannot_work_is_one_line_from_the_cli(tmp_path, command, settings, says):
    """As bad arguments are: `idp: ...` naming the variable, exit status 2, no traceback; a
    database URL's password is not repeated."""
    out = _idp(tmp_path, *command, **settings)
    assert out.returncode == 2 and out.stderr == f"idp: {says}" + out.stderr[len(says) + 5:], out.stderr[-600:]
    assert "Traceback" not in out.stderr and "secret" not in out.stderr and out.stderr.count("\n") == 1
