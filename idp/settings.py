"""All configuration, in one typed object.

Every setting is read from an ``IDP_<NAME>`` environment variable. The
table in ``docs/configuration.md`` is generated from this file
(``idp settings``), so the documentation cannot drift from it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal, get_args, get_type_hints
from urllib.parse import urlsplit

PORT_MAX = 65535  # a TCP port is 16 bits


def _doc(text: str, default, *, secret: bool = False, minimum: int = 1, maximum: int | None = None,
         required: bool = False):
    # A secret stays out of repr(settings), so a logged settings object shows no password.
    # ``minimum`` is a whole number's least: 0 only where the text gives 0 a meaning.
    # ``maximum``: its most, where the text names one and more can only be a mistake.
    # ``required``: a directory that must not be empty, which would be the working directory.
    return field(default=default, metadata={"doc": text, "minimum": minimum, "maximum": maximum,
                                            "required": required}, repr=not secret)


@dataclass(frozen=True)
class Settings:
    issuer: str = _doc(
        "Public URL of the provider, with no query, fragment or trailing slash; every endpoint URL and the `iss` "
        "claim derive from it.",
        "http://localhost:8000",
    )
    database_url: str = _doc(
        "SQLAlchemy URL. SQLite by default; `postgresql+psycopg://user@host/db` for production "
        "(PostgreSQL through psycopg 3 only: the login's reads and writes use it directly; a connection "
        "attempt gives up after 10 s unless `?connect_timeout=` says otherwise).",
        "sqlite:///var/idp.sqlite3",
    )
    database_pool: int = _doc(
        "PostgreSQL connections each provider process keeps open for its blocking queries; as many again "
        "are opened in a burst and closed after. The login steps' queries, awaited on the event loop, use up "
        "to 4 more of their own (fewer if this is smaller). Size the server's `max_connections` above "
        "(2 × this + 4) × the processes.", 20
    )
    database_statement_timeout: int = _doc(
        "Seconds a PostgreSQL statement may run, or wait for a lock, before the server cancels it and the "
        "request fails with an error page; without it a stuck query would hold one of the process's few "
        "connections, and its request, for ever. 0: no limit. Migrations run without one.", 30, minimum=0
    )
    redis_url: str = _doc(
        "Redis for short-lived state (login transactions, codes, sessions, tokens, counters). "
        "Empty: an in-process store, for one process only (`idp serve` stops at start while another serves "
        "the same database without Redis). One server: `redis://[[user]:password@]host:6379/0` "
        "(`rediss://` for TLS, `unix:///path?db=0`; options `socket_timeout` (10 s), `socket_connect_timeout` (5 s), "
        "for TLS `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs`). Sentinel: `redis+sentinel://[:password@]sentinel1:26379,sentinel2:26379/MASTER[/db]` "
        "(add `?sentinel_password=` if the Sentinels have their own). Cluster: "
        "`redis+cluster://[:password@]node1:6379,node2:6379` (any nodes; the rest are discovered).",
        "", secret=True,
    )
    keys_dir: str = _doc(
        "Directory of the signing keys (private, mode 0600) and other generated secrets.",
        "keys/signing", required=True,
    )
    captcha: Literal["always", "after-failure", "off"] = _doc(
        "When the login form shows an image captcha: `after-failure` after a wrong answer in the same login, "
        "and at the password of a username whose last answers failed (in any login).", "always"
    )
    default_locale: Literal["zh-TW", "en"] = _doc("UI language when the browser asks for none.", "zh-TW")
    lockout_threshold: int = _doc("Wrong answers (passwords, OTPs, ...) before the account locks, counted from the first "
                                    "for IDP_LOCKOUT_SECONDS, or until a login with a bound second factor succeeds (any "
                                    "login, for an account that has none).", 3)
    lockout_seconds: int = _doc("How long a locked account stays locked, and how long its wrong answers are counted.", 900)
    mfa: bool = _doc(
        "Every login needs a second factor; an account without one must bind one first (SPEC M1).", True
    )
    otp_issuer: str = _doc("The name authenticator apps show beside the account.", "單一登入服務")
    otp_drift_minutes: int = _doc(
        "A code right this far from now is refused with the fix-your-phone's-clock message.", 10
    )
    reverify_seconds: int = _doc(
        "The login-settings pages ask for a bound second factor again when the last one is older (SPEC M2).", 600
    )
    password_max_age_days: int = _doc("A password older than this must be changed at next login (0: never).", 90,
                                      minimum=0)
    password_min_length: int = _doc("Minimum password length of the complexity policy.", 10)
    argon2_time_cost: int = _doc("Argon2id iterations (OWASP 2024: 2 with 19 MiB).", 2)
    argon2_memory_kib: int = _doc("Argon2id memory in KiB, at least 8 a lane.", 19456)
    argon2_parallelism: int = _doc("Argon2id lanes.", 1)
    hash_threads: int = _doc(
        "Password hashes run at once per process; more wait their turn. One per core the process has to itself "
        "(the deploy files run one worker per core): more hashes than cores slow each other down.", 1)
    login_timeout_seconds: int = _doc("Lifetime of a login transaction (the time to finish the login pages).", 900)
    session_seconds: int = _doc("Lifetime of the single sign-on session.", 8 * 3600)
    code_seconds: int = _doc("Lifetime of an authorization code.", 60)
    par_seconds: int = _doc("Lifetime of a pushed authorization request's `request_uri` (RFC 9126).", 60)
    par_required: bool = _doc(
        "Every authorization request must be pushed to `/par` first (RFC 9126 section 6); a client can also "
        "ask for this alone with `require_pushed_authorization_requests` in its registration.", False
    )
    access_token_seconds: int = _doc("Default access token lifetime (a client may set its own).", 600)
    id_token_seconds: int = _doc("ID token lifetime.", 600)
    refresh_token_seconds: int = _doc("Default refresh token lifetime (a client may set its own), counted from the login's "
                                     "code exchange: rotating the refresh token does not extend it.", 30 * 86400)
    signing_alg: Literal["ES256", "RS256"] = _doc(
        "Default ID token signing algorithm; a client may ask for the other.", "ES256"
    )
    key_refresh_seconds: int = _doc(
        "How often a process looks for rotated keys on disk (one `stat` of `IDP_KEYS_DIR`; the keys are "
        "read again only when it changed). 0: at every request.", 1, minimum=0
    )
    client_cache_seconds: int = _doc(
        "How long a process keeps a client registration in memory; changes made by other processes "
        "(the CLI, other workers) take effect within this time. 0: not kept, read at every request.", 5, minimum=0
    )
    disabled_marks_seconds: int = _doc(
        "With Redis: how often each process writes the store marks of the disabled accounts again "
        "(the token endpoint reads those marks), so a mark lost with Redis data comes back.", 60
    )
    secure_cookies: bool | None = _doc(
        "Mark cookies Secure. Default: when the issuer is https.", None
    )
    log_format: Literal["text", "json"] = _doc(
        "Log lines on stderr as text, or one JSON object per line (for a log collector); "
        "each carries its request's id (`X-Request-Id`).", "text"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _doc(
        "Least severe log level written; `INFO` includes the audit events.", "INFO"
    )
    access_log: bool = _doc(
        "One log line per request (method, path without the query, status, time). Off by default: the proxy "
        "logs requests, with the same `X-Request-Id` (deploy/nginx/nginx.conf).", False
    )
    audit_retention_days: int = _doc(
        "Days the audit log (`audit_events`: the activity pages, SPEC M6) keeps an event; each process deletes "
        "older ones at its start and then hourly, a batch at a time. 0: keeps them all. Check how long your "
        "regulations ask you to keep them.", 0, minimum=0
    )
    metrics_token: str = _doc("Bearer token required by /metrics; empty: open (block it at the proxy).", "")
    max_form_bytes: int = _doc("Largest request body accepted by any form or JSON endpoint.", 64 * 1024)
    smtp_host: str = _doc(
        "SMTP server for outgoing mail (password reset, email confirmation, codes). "
        "Empty: mails are written as .eml files to `IDP_OUTBOX_DIR` instead.",
        "",
    )
    smtp_port: int = _doc("SMTP port, 1 to 65535: 587 for submission with STARTTLS; 465 for TLS from the first byte.",
                          587, maximum=PORT_MAX)
    smtp_username: str = _doc("SMTP login name; empty: no SMTP authentication.", "")
    smtp_password: str = _doc("SMTP password (used only with `IDP_SMTP_USERNAME`).", "", secret=True)
    smtp_starttls: bool = _doc(
        "Upgrade the SMTP connection with STARTTLS (certificate verified) before sending; "
        "a server that cannot is not used.",
        True,
    )
    smtp_timeout_seconds: int = _doc("How long to wait for the SMTP server before giving up on a mail.", 20)
    mail_from: str = _doc("Sender address of the provider's mails.", "no-reply@localhost")
    outbox_dir: str = _doc(
        "Where mails go as .eml files when no SMTP host is set (the single-machine default).", "var/outbox",
        required=True,
    )
    trust_dir: str = _doc(
        "Directory of the certificate-login trust anchors (`anchors.toml` and its PEMs; SPEC A3). "
        "The default holds the real GRCA/MOICA G2 and G3 certificates.",
        "keys/trust", required=True,
    )
    hipki_url: str = _doc(
        "Where the certificate pages find the HiPKI local signing component on the user's PC (MOICA's "
        "cross-platform web component, or `clients/hipki_signer`): its origin, no path.",
        "http://localhost:61161",
    )
    crl_cache_dir: str = _doc(
        "Where downloaded CRLs are kept, so that a restart does not download MOICA's 100k-entry CRL again "
        "(a kept CRL is believed only after its signature verifies, and while fresh). Processes may share it. "
        "Empty: in memory only.",
        "var/crl",
    )
    revocation: Literal["hard-fail", "soft-fail"] = _doc(
        "Certificate login when no trustworthy OCSP/CRL answer can be had: refuse it (`hard-fail`) or "
        "let it through with a warning in the log (`soft-fail`). A revoked certificate is always refused, and so "
        "is one whose issuing CA its root's CRL lists (GRCA's CRL of the CAs it issued, checked by CRL only).",
        "hard-fail",
    )
    trusted_proxies: str = _doc(
        "Addresses or CIDR networks of the reverse proxies in front of the provider, separated by commas. "
        "A request whose socket peer is one of them has its client address and scheme taken from "
        "`X-Forwarded-For`/`X-Forwarded-Proto`, and its `IDP_CLIENT_CERT_HEADER` believed. Empty: no proxy.",
        "127.0.0.1",
    )
    client_cert_header: str = _doc(
        "TLS client-certificate login for managed desktops (SPEC A3): the request header in which the "
        "terminating proxy forwards the client certificate of the TLS handshake, as URL-escaped PEM (nginx: "
        "`$ssl_client_escaped_cert`, see `deploy/nginx/client-cert.conf`), e.g. `X-SSL-Client-Cert`. Believed "
        "only from `IDP_TRUSTED_PROXIES`; its chain, validity and revocation are checked here, as a card "
        "login's. Empty: that login is switched off.",
        "",
    )

    mobileid_url: str = _doc(
        "Base URL of the mobile natural-person certificate service (行動自然人憑證, SPEC A4), path prefix "
        "included, e.g. `https://fidoapi-test.moi.gov.tw/moise/sp/`: https, or http on this computer only "
        "(`localhost`, `127.0.0.1`, `[::1]`: the demo's simulator). Empty: that login is switched off.",
        "",
    )
    mobileid_sp_service_id: str = _doc("This provider's `sp_service_id` at the mobile-ID service.", "")
    mobileid_key: str = _doc(
        "This provider's AES-256 key at the mobile-ID service (64 hex digits or base64).", "", secret=True
    )
    mobileid_max_unanswered: int = _doc(
        "Mobile-ID requests in a row an account may leave unanswered or deny (only a login by mobile ID resets "
        "the count); then requests to its phone pause for `IDP_LOCKOUT_SECONDS` (push fatigue).", 3
    )
    mobileid_time_limit: int = _doc(
        "Seconds a mobile-ID request lives, 30 to 600 (the login page's countdown).", 180
    )
    mobileid_trust: str = _doc(
        "Trust directory (`anchors.toml` and its PEMs, as `IDP_TRUST_DIR`) for the holder's certificate of a "
        "mobile-ID login; an anchor set for `personal` accounts must pin its issuer (MOICA G3). Checked like a "
        "card login's, revocation (`IDP_REVOCATION`) included. Empty: `IDP_TRUST_DIR`.",
        "",
    )

    push_registration_seconds: int = _doc(
        "How long the push app's registration QR code (a one-time URL) can be scanned (SPEC A5).", 300
    )
    push_request_seconds: int = _doc("How long a push login request waits for the app's answer.", 120)
    push_max_unanswered: int = _doc(
        "Push requests in a row an account may leave unanswered or deny (only an approval resets the count); "
        "then pushes to it pause for `IDP_LOCKOUT_SECONDS` (push fatigue; the app's OTP still works).", 3
    )

    upstream_issuer: str = _doc(
        "Issuer URL of the upstream OpenID provider of the federated login (SPEC A6), e.g. "
        "`https://accounts.google.com`. Empty: that login is switched off.",
        "",
    )
    upstream_client_id: str = _doc("This provider's client id at the upstream OpenID provider.", "")
    upstream_client_secret: str = _doc("This provider's client secret at the upstream OpenID provider.", "", secret=True)
    upstream_scopes: str = _doc("Scopes asked of the upstream OpenID provider.", "openid email profile")
    upstream_label: str = _doc("The label of the upstream login button and binding row.", "Google 帳號")

    def __post_init__(self):
        _check_issuer(self.issuer)
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            # Below its least a number turns a rule upside down: a retention of -1 days deletes the
            # whole audit log, a session of 0 s ends before the code exchange, an interval of 0 s
            # is a busy loop, a lockout threshold of 0 locks at the first right password.
            value = getattr(self, f.name)
            if hints[f.name] is int and value < f.metadata["minimum"]:
                raise SettingsError(f"IDP_{f.name.upper()} must be at least {f.metadata['minimum']}, not {value}")
            if hints[f.name] is int and f.metadata["maximum"] is not None and value > f.metadata["maximum"]:
                raise SettingsError(f"IDP_{f.name.upper()} must be at most {f.metadata['maximum']}, not {value}")
            if f.metadata["required"] and not value.strip():
                raise SettingsError(f"IDP_{f.name.upper()} must name a directory, not be empty")
        if self.argon2_memory_kib < 8 * self.argon2_parallelism:  # Argon2's own least, which argon2-cffi refuses
            raise SettingsError(f"IDP_ARGON2_MEMORY_KIB must be at least 8 × IDP_ARGON2_PARALLELISM "
                                f"({8 * self.argon2_parallelism}), not {self.argon2_memory_kib}")

    @property
    def cookies_secure(self) -> bool:
        if self.secure_cookies is None:
            return self.issuer.startswith("https://")
        return self.secure_cookies

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> "Settings":
        environ = os.environ if environ is None else environ
        hints = get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get("IDP_" + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f.name, hints[f.name], raw)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def markdown_table(cls) -> str:
        rows = ["| variable | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = "" if f.default in ("", None) else f"`{f.default}`"
            rows.append(f"| `IDP_{f.name.upper()}` | {default} | {f.metadata['doc']} |")
        return "\n".join(rows)


class SettingsError(ValueError):
    pass


def _check_issuer(issuer: str) -> None:
    # Every endpoint URL is the issuer plus a path, and it is the `iss` relying parties compare
    # exactly (OpenID Connect Discovery 1.0 section 3): a trailing slash made them `//token`.
    try:
        url = urlsplit(issuer)
    except ValueError:
        url = None
    if not url or url.scheme not in ("http", "https") or not url.hostname:
        raise SettingsError(f"IDP_ISSUER must be an http:// or https:// URL with a host, not {issuer!r}")
    if "?" in issuer or "#" in issuer:
        raise SettingsError(f"IDP_ISSUER must have no query or fragment, not {issuer!r}")
    if issuer.endswith("/"):
        raise SettingsError(f"IDP_ISSUER must not end in a slash (the endpoints' paths are added to it): "
                            f"{issuer.rstrip('/')!r}, not {issuer!r}")


def _parse(name: str, hint, raw: str):
    options = get_args(hint)
    if hint is int:
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"IDP_{name.upper()} must be a whole number, not {raw!r}") from None
    if hint is bool or bool in options:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        if raw == "" and type(None) in options:
            return None
        raise SettingsError(f"IDP_{name.upper()} must be true or false, not {raw!r}")
    if options and all(isinstance(o, str) for o in options):
        if raw not in options:
            raise SettingsError(f"IDP_{name.upper()} must be one of {', '.join(options)}, not {raw!r}")
    return raw
