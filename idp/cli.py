"""The ``idp`` command: serve, and administer accounts, clients and keys."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

from sqlalchemy import select

from idp import logs
from idp.settings import PORT_MAX, Settings, SettingsError


def _services():
    from idp.services import Services

    svc = Services(Settings.from_env())
    svc.start()
    return svc


def _now(svc) -> dt.datetime:
    return dt.datetime.fromtimestamp(svc.clock(), dt.timezone.utc)


def _seconds(text: str) -> int:
    """A count of seconds for argparse: a whole number above zero."""
    if not (text.isascii() and text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above zero")
    return int(text)


def _port(text: str) -> int:
    """A TCP port for argparse: more than 65535 got as far as the bind, and a traceback."""
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= PORT_MAX):
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1 to {PORT_MAX})")
    return int(text)


def _fail(message: str) -> int:
    print(f"idp: {message}", file=sys.stderr)
    return 2


# -- serve ---------------------------------------------------------------------------
def cmd_serve(args) -> int:
    import os
    import tempfile

    import uvicorn

    from idp.web.corked import UVICORN

    if args.workers > 1:
        settings = Settings.from_env()
        logs.configure(settings.log_format, settings.log_level)  # the supervising process's lines too
        if not settings.redis_url:
            return _fail(f"--workers {args.workers} needs IDP_REDIS_URL: without it each worker keeps its own "
                         "login state, and a login's next step, answered by another worker, would find none")
        # Each worker migrates on start; the migration lock makes that safe. The workers count their
        # metrics in one directory, so that /metrics, whichever of them answers, gives the sum.
        with tempfile.TemporaryDirectory(prefix="idp-metrics-") as metrics_dir:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            uvicorn.run("idp.cli:served_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                        **UVICORN)
    else:
        app = served_app()
        if not app.state.svc.store.shared and not app.state.svc.db.claim_sole_server():
            return _fail("another provider process serves this database without IDP_REDIS_URL: each would keep "
                         "its own login state, and a login's next step, answered by the other, would find none. "
                         "Give every process the same IDP_REDIS_URL, or run one")
        uvicorn.run(app, host=args.host, port=args.port, **UVICORN)
    return 0


def served_app(services=None):
    """The app ``idp serve`` runs (in each worker process), tuned for the cyclic garbage
    collector. What start-up built is frozen out of its reach: a full collection walked
    those ~160,000 objects (modules, templates, the services) for nothing, 70-90 ms with
    the event loop stalled, about once a second under load. And it runs less often: a
    request's objects die by reference count, but at the default threshold (700) the
    requests in flight crossed it thousands of times a second, ~10 µs of CPU a request.
    The templates are compiled first, so they are frozen too."""
    import gc

    from idp.web.app import create_app
    from idp.web.pages import compile_templates

    app = create_app(services=services)
    compile_templates()
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000)
    return app


def cmd_migrate(args) -> int:
    _services()
    print("database is up to date")
    return 0


def cmd_settings(args) -> int:
    print(Settings.markdown_table())
    return 0


# -- keys ----------------------------------------------------------------------------
PUBLISHED_AHEAD = 86400  # how long relying parties commonly keep a JWKS they fetched


def cmd_keys_rotate(args) -> int:
    from idp.protocol.keys import TooSoon

    svc = _services()
    keep = max(svc.settings.id_token_seconds, svc.settings.access_token_seconds) + 86400
    try:
        kids = svc.keys.rotate(keep, published_for=0 if args.now else PUBLISHED_AHEAD)
    except TooSoon as e:
        when = dt.datetime.fromtimestamp(e.ready_at, dt.timezone.utc).isoformat(timespec="minutes")
        return _fail(f"the next keys have been published for less than a day, and relying parties may not have them "
                     f"yet: rotate after {when}, or at once with --now (a key that leaked)")
    for kid in kids:
        print(f"now signing with {kid}")
    return 0


def cmd_keys_list(args) -> int:
    svc = _services()
    for record in svc.keys._records():
        print(f"{record['kid']}\t{record['alg']}\t{record['status']}")
    return 0


# -- users ---------------------------------------------------------------------------
def cmd_users_add(args) -> int:
    from idp.accounts import AccountError, create_account
    from idp.web.i18n import translate

    svc = _services()
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
    try:
        with svc.db.session() as session:
            account = create_account(
                session, svc.passwords, args.username, password, now=_now(svc),
                email=args.email, name=args.name or args.username, kind=args.kind, org=args.org,
                email_verified=bool(args.email), national_id=args.national_id,
            )
            account_id = account.id
    except AccountError as e:
        rules = "; ".join(translate("en", r, n=svc.settings.password_min_length) for r in e.params.get("rules", []))
        return _fail(translate("en", e.key, **{k: v for k, v in e.params.items() if k != "rules"}) + (f" {rules}" if rules else ""))
    svc.audit.record("account.created", account_id=account_id, username=args.username, method="cli")
    print(account_id)
    return 0


def _with_account(username, change):
    from idp.accounts import by_username

    svc = _services()
    with svc.db.session() as session:
        account = by_username(session, username)
        if account is None:
            return svc, None
        change(account)
        return svc, account.id


def cmd_users_list(args) -> int:
    from idp.storage.models import Account

    svc = _services()
    with svc.db.session() as session:
        for a in session.execute(select(Account).order_by(Account.username)).scalars():
            state = "disabled" if a.disabled else "active"
            print(f"{a.username}\t{a.kind}\t{a.name}\t{a.email or ''}\t{state}")
    return 0


def cmd_users_disable(args, disabled=True) -> int:
    from idp.accounts import set_disabled

    svc = _services()
    account_id, _ = _account_id(svc, args.username)
    if account_id is None:
        return _fail(f"no account {args.username}")
    if disabled and not _sessions_reachable(svc):
        return _fail("without IDP_REDIS_URL the account's sessions and tokens live inside the running provider, which "
                     "this command cannot end (nor tell the portals): disable the account on its admin page (/admin)")
    if set_disabled(svc, account_id, disabled) is None:
        return _fail(f"no account {args.username}")
    svc.audit.record("account.disabled" if disabled else "account.enabled", account_id=account_id, username=args.username, method="cli")
    return 0


def cmd_users_unlock(args) -> int:
    svc = _services()
    if not svc.settings.redis_url:
        return _fail("without IDP_REDIS_URL the lockout counters live inside the running provider: unlock the "
                     "account on its admin page (/admin), or wait IDP_LOCKOUT_SECONDS")
    account_id, _ = _account_id(svc, args.username)
    if account_id is None:
        return _fail(f"no account {args.username}")
    svc.lockout.clear(args.username)
    svc.audit.record("account.unlocked", account_id=account_id, username=args.username, method="cli")  # in its activity log
    return 0


def _sessions_reachable(svc) -> bool:
    """Whether this process can end an account's sessions: they are in Redis, or no provider
    serves this database on its in-process store (where they would live in its memory; with
    none running, there are none)."""
    return svc.store.shared or svc.db.claim_sole_server()


def _account_id(svc, username):
    from idp.accounts import by_username

    with svc.db.session() as session:
        account = by_username(session, username)
        return (account.id, account.username) if account else (None, username)


def cmd_users_one_day_password(args) -> int:
    """SPEC A7: mail the account a check code for today. The code goes only by mail."""
    from idp.factors import one_day
    from idp.mail import MailError, masked
    from idp.web.i18n import translate

    svc = _services()
    account_id, username = _account_id(svc, args.username)
    if account_id is None:
        return _fail(f"no account {args.username}")
    try:
        info = one_day.enable(svc, account_id)
    except one_day.OneDayError as e:
        return _fail(translate("en", f"admin.error.{e.reason}"))
    except MailError as e:
        return _fail(f"{e}; the one-day password is not enabled")
    svc.audit.record("one_day.enabled", account_id=account_id, username=username, method="cli", day=info["day"].isoformat())
    print(f"one-day password of {username}: check code mailed to {masked(info['email'])}, "
          f"good on {info['day'].isoformat()} until midnight Taiwan time")
    return 0


def cmd_users_reset_bindings(args) -> int:
    """Delete every binding (OTP, certificate, Google) and end the account's sessions: the next
    login goes through forced binding (M1)."""
    from idp.accounts import reset_bindings

    svc = _services()
    account_id, username = _account_id(svc, args.username)
    if account_id is None:
        return _fail(f"no account {args.username}")
    if not _sessions_reachable(svc):
        return _fail("without IDP_REDIS_URL the account's sessions live inside the running provider, which this "
                     "command cannot end: reset the bindings on its admin page (/admin)")
    count, forgotten = reset_bindings(svc, account_id)
    svc.audit.record("bindings.reset", account_id=account_id, username=username, method="cli", deleted=count,
                     password_forgotten=forgotten)
    print(f"deleted {count} binding(s) of {username}; the next login asks to bind again")
    if forgotten:
        print("password login was off: its old password is void; the user sets a new one through forgot-password")
    return 0


def cmd_users_admin(args) -> int:
    """Grant (or ``--revoke``) the administrator role: the admin area at /admin, every account."""
    grant = not args.revoke
    svc, account_id = _with_account(args.username, lambda a: setattr(a, "admin", grant))
    if account_id is None:
        return _fail(f"no account {args.username}")
    svc.audit.record("admin.granted" if grant else "admin.revoked", account_id=account_id, username=args.username, method="cli")
    print(f"{args.username} {'is now an administrator' if grant else 'is no longer an administrator'}")
    return 0


# -- clients -------------------------------------------------------------------------
def cmd_clients_add(args) -> int:
    from idp.protocol.clients import ClientError, client_info, create_client

    svc = _services()
    meta = {
        "client_name": args.name,
        "redirect_uris": args.redirect_uri or [],
        "post_logout_redirect_uris": args.post_logout_redirect_uri or [],
        "grant_types": args.grant_type or (["client_credentials"] if not args.redirect_uri else ["authorization_code", "refresh_token"]),
        "token_endpoint_auth_method": "none" if args.public else args.auth_method,
        "subject_type": args.subject_type,
        "minimum_acr": args.minimum_acr,
        "allowed_factors": args.allowed_factor,
        "id_token_signed_response_alg": args.alg,
        "jwks_uri": args.jwks_uri,
    }
    # Back-Channel / Front-Channel Logout 1.0 (SPEC P6); this provider always sends iss and sid.
    if args.backchannel_logout_uri:
        meta.update(backchannel_logout_uri=args.backchannel_logout_uri, backchannel_logout_session_required=True)
    if args.frontchannel_logout_uri:
        meta.update(frontchannel_logout_uri=args.frontchannel_logout_uri, frontchannel_logout_session_required=True)
    if args.jwks:
        try:
            with open(args.jwks) as f:
                meta["jwks"] = json.load(f)
        except (OSError, ValueError) as e:
            return _fail(f"--jwks {args.jwks}: {e}")
    try:
        with svc.db.session() as session:
            row, secret, _ = create_client(session, meta, first_party=args.first_party)
            info = client_info(row, secret)
    except ClientError as e:
        return _fail(f"{e.error}: {e.description}")
    svc.audit.record("client.registered", client_id=info["client_id"], method="cli")
    if args.json:
        print(json.dumps(info, ensure_ascii=False))
    else:
        print(f"client_id: {info['client_id']}")
        if "client_secret" in info:
            print(f"client_secret: {info['client_secret']}  (shown once; store it now)")
    return 0


def cmd_clients_list(args) -> int:
    from idp.storage.models import Client

    svc = _services()
    with svc.db.session() as session:
        for c in session.execute(select(Client).order_by(Client.created_at)).scalars():
            print(f"{c.client_id}\t{c.metadata_.get('client_name', '')}\t{' '.join(c.metadata_.get('redirect_uris', []))}")
    return 0


def cmd_clients_show(args) -> int:
    from idp.protocol.clients import client_info, find

    svc = _services()
    with svc.db.session() as session:
        row = find(session, args.client_id)
        if row is None:
            return _fail(f"no client {args.client_id}")
        print(json.dumps(client_info(row), ensure_ascii=False, indent=2))
    return 0


def cmd_clients_remove(args) -> int:
    from idp.protocol.clients import find

    svc = _services()
    with svc.db.session() as session:
        row = find(session, args.client_id)
        if row is None:
            return _fail(f"no client {args.client_id}")
        session.delete(row)
    svc.audit.record("client.deleted", client_id=args.client_id, method="cli")
    return 0


def cmd_clients_token(args) -> int:
    from idp.protocol.clients import new_initial_access_token

    svc = _services()
    with svc.db.session() as session:
        token = new_initial_access_token(session, args.expires_in, _now(svc))
    print(token)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="idp", description="OpenID Connect provider. Settings: IDP_* variables (idp settings).")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the provider (migrates the database first)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_port, default=8000)
    s.add_argument("--workers", type=int, default=1,
                   help="processes on one port (needs IDP_REDIS_URL); /metrics gives their sum")
    s.set_defaults(func=cmd_serve)
    sub.add_parser("migrate", help="bring the database schema up to date").set_defaults(func=cmd_migrate)
    sub.add_parser("settings", help="print the settings table (Markdown)").set_defaults(func=cmd_settings)

    keys = sub.add_parser("keys", help="signing keys").add_subparsers(dest="keys_command", required=True)
    rotate = keys.add_parser("rotate", help="publish-ahead rotation of the signing keys (the next keys published a day)")
    rotate.add_argument("--now", action="store_true", help="rotate however recently the next keys were published")
    rotate.set_defaults(func=cmd_keys_rotate)
    keys.add_parser("list").set_defaults(func=cmd_keys_list)

    users = sub.add_parser("users", help="accounts").add_subparsers(dest="users_command", required=True)
    u = users.add_parser("add", help="create an account")
    u.add_argument("username")
    u.add_argument("--email")
    u.add_argument("--name")
    u.add_argument("--kind", choices=["personal", "aa"], default="personal")
    u.add_argument("--org")
    u.add_argument("--national-id")
    u.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    u.set_defaults(func=cmd_users_add)
    users.add_parser("list").set_defaults(func=cmd_users_list)
    for name, func in (("disable", cmd_users_disable), ("enable", lambda a: cmd_users_disable(a, False)), ("unlock", cmd_users_unlock)):
        c = users.add_parser(name)
        c.add_argument("username")
        c.set_defaults(func=func)
    c = users.add_parser("one-day-password", help="mail the account a one-day password check code for today (SPEC A7)")
    c.add_argument("username")
    c.set_defaults(func=cmd_users_one_day_password)
    c = users.add_parser("reset-bindings", help="delete every binding: the next login binds again (SPEC M1)")
    c.add_argument("username")
    c.set_defaults(func=cmd_users_reset_bindings)
    c = users.add_parser("admin", help="grant the administrator role (the admin area, every account)")
    c.add_argument("username")
    c.add_argument("--revoke", action="store_true", help="take the role away instead")
    c.set_defaults(func=cmd_users_admin)

    clients = sub.add_parser("clients", help="relying parties").add_subparsers(dest="clients_command", required=True)
    c = clients.add_parser("add", help="register a client")
    c.add_argument("--name", required=True)
    c.add_argument("--redirect-uri", action="append")
    c.add_argument("--post-logout-redirect-uri", action="append")
    c.add_argument("--backchannel-logout-uri", help="where logout tokens are POSTed when a session ends")
    c.add_argument("--frontchannel-logout-uri", help="loaded in an iframe on the logged-out page")
    c.add_argument("--grant-type", action="append", choices=["authorization_code", "refresh_token", "client_credentials"])
    c.add_argument("--public", action="store_true", help="a public client (no secret; PKCE required)")
    c.add_argument("--auth-method", default="client_secret_basic",
                   choices=["client_secret_basic", "client_secret_post", "private_key_jwt"])
    c.add_argument("--jwks", help="file with the client's public JWKS (private_key_jwt)")
    c.add_argument("--jwks-uri", help="https URL of the client's public JWKS, fetched when it authenticates "
                   "(private_key_jwt, instead of --jwks)")
    c.add_argument("--first-party", action="store_true", help="a portal of ours: no consent screen")
    c.add_argument("--subject-type", choices=["public", "pairwise"], default="public")
    c.add_argument("--minimum-acr", help="the lowest acr this client accepts (urn:idp:loa:1..3; loa:2 = MFA required)")
    c.add_argument("--allowed-factor", action="append", help="a factor this client accepts (repeat; default: all)")
    c.add_argument("--alg", choices=["ES256", "RS256"], help="ID token signing algorithm")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_clients_add)
    clients.add_parser("list").set_defaults(func=cmd_clients_list)
    for name, func in (("show", cmd_clients_show), ("remove", cmd_clients_remove)):
        c = clients.add_parser(name)
        c.add_argument("client_id")
        c.set_defaults(func=func)
    t = clients.add_parser("token", help="issue an RFC 7591 initial access token")
    t.add_argument("--expires-in", type=_seconds, default=86400, help="seconds the token is good for")
    t.set_defaults(func=cmd_clients_token)
    return p


def main(argv: list[str] | None = None) -> int:
    from sqlalchemy.exc import StatementError

    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except SettingsError as e:  # a setting that cannot work: what to change, not a traceback
        return _fail(str(e))
    except StatementError as e:
        # The database's own reason, not SQLAlchemy's message, which names every parameter of
        # the statement: a password's hash, a national ID.
        return _fail(f"the database refused it: {e.orig}")


if __name__ == "__main__":
    sys.exit(main())
