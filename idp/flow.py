"""The login flow: the one place that decides what a login still needs.

An authorization request becomes a *login transaction* in the short-lived
store. Each time the browser comes back, ``next_step`` looks at what the
transaction has proven so far (``amr``), what the client and the request
demand (``acr``), and the account, and answers with exactly one step:

1. a factor: the first one (which finds the account), or one more to reach
   the required assurance (step-up);
2. an account action the account must do before going on (an expired
   password; later issues add forced binding here);
3. consent, for a third-party client the user has not approved yet;
4. done: the session is set and a code goes back to the client.

Pages never decide this themselves; they do their one step and ask here.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass

from sqlalchemy import bindparam, select
from starlette.concurrency import run_in_threadpool

from idp import acr
from idp.accounts import password_expired
from idp.factors import CERTIFICATE, FACTORS, TOTP, certificate, one_day
from idp.storage.kv import Batch
from idp.storage.models import Account, Consent


@dataclass
class Step:
    kind: str  # "factor" | "action" | "consent" | "done" | "unmet" | "disabled"
    factors: tuple = ()
    action: str | None = None


class Transactions:
    def __init__(self, store, clock, lifetime: int):
        self.store, self.clock, self.lifetime = store, clock, lifetime

    def create(self, *, params, client_id, browser, fresh, target_acr, session, locale_hint=None,
               return_to: str | None = None, reverify: bool = False, fallback_acr=()) -> dict:
        """A login for a client's authorization request, or (``client_id`` None) for the
        provider's own pages, which then ``return_to`` a local path. It aims at ``target_acr``,
        or the first of ``fallback_acr`` the account can reach (``next_step``). ``reverify`` asks
        for a bound second factor again even within a session (SPEC M2). Not saved yet:
        what shows its first page saves it (``save``), or nothing if it ends at once."""
        now = self.clock()
        tx = {
            "id": secrets.token_urlsafe(24),
            "browser": browser,
            "params": params,
            "client_id": client_id,
            "created": now,
            "exp": now + self.lifetime,
            "target_acr": target_acr,
            "fallback_acr": list(fallback_acr),
            "ui_locales": locale_hint,
            "account": None,
            "username": "",
            "amr": [],
            "proofs": {},  # factor name -> {amr it proved, time}, which a session keeps (``within_policy``)
            "sid": None,  # the SSO session this login builds on, which must still be there at its end
            "done": [],
            "auth_time": None,
            "failures": 0,
            "return_to": return_to,
            "reverify": reverify,
        }
        if session and not fresh:
            # Build on the session: step-up asks only for what is missing.
            tx.update(account=session["account"], username=session["username"], amr=list(session["amr"]),
                      proofs=dict(session.get("proofs") or {}), auth_time=session["auth_time"], sid=session["sid"])
        return tx

    def get(self, tx_id: str | None) -> dict | None:
        if not tx_id:
            return None
        tx = self.store.get("tx:" + tx_id)
        if tx is None or tx["exp"] < self.clock():
            return None
        return tx

    def save(self, tx: dict, batch: Batch | None = None) -> None:
        """Store the transaction (in ``batch``, or now). Once stored, only replace it: a
        request that read it before another ended the login must not bring it back."""
        writes = batch or Batch()
        ttl = max(1, int(tx["exp"] - self.clock())) + 60
        if tx.get("stored"):
            writes.replace("tx:" + tx["id"], tx, ttl)
        else:
            tx["stored"] = True  # what ends the login claims it (``finish``)
            writes.set("tx:" + tx["id"], tx, ttl)
        if batch is None:
            self.store.write(writes)

    def drop(self, tx: dict, batch=None) -> None:
        (batch or self.store).delete("tx:" + tx["id"])

    def claim(self, tx: dict, batch) -> int:
        """Take the transaction in ``batch``; where what it took comes in ``Store.write``'s
        answer. Of two requests ending one stored login, one finds it there."""
        batch.take("tx:" + tx["id"])
        return len(batch.takes) - 1


def record_factor(tx: dict, factor, account: Account, now: float, amr: list | None = None) -> None:
    """A factor succeeded: remember who and how (``amr``: when not the factor's own), and when."""
    if tx["account"] != account.id:
        tx.update(amr=[], proofs={}, done=[], sid=None)
    tx["account"], tx["username"] = account.id, account.username
    tx.setdefault("proofs", {})[factor.name] = {"amr": amr or factor.amr, "time": now}  # (logins begun before proofs)
    tx["amr"] = acr.with_mfa(tx["amr"] + [m for m in amr or factor.amr if m not in tx["amr"]])
    tx["done"].append(factor.name)
    tx["auth_time"] = now


def within_policy(session: dict, client) -> dict | None:
    """The SSO session as far as ``client`` may build on it: the proofs of the factors its
    policy allows (``allowed_factors``), or None when none of them found the account (a first
    factor), and the login starts over. A password given at another portal proves nothing to
    a client that accepts only the certificate; after Google and OTP, a client that does not
    take Google asks for the password, then OTP again."""
    proofs = session.get("proofs")
    if all(client.allows(name) for name in (FACTORS if proofs is None else proofs)):
        return session
    return _kept(session, {name: proof for name, proof in (proofs or {}).items() if client.allows(name)})


def within_age(session: dict, max_age: int, now: float) -> dict | None:
    """The SSO session as far as a request's ``max_age`` lets a login build on it: the proofs
    made in its last ``max_age`` seconds, or None when none of them found the account, and the
    login starts over. What the login earns is theirs alone: a card proven hours ago is not a
    recent LOA3 because a password and OTP were typed since; step-up asks for it again."""
    # Whole seconds, as auth_time in the ID token: a relying party checking now - auth_time
    # <= max_age on what it gets (Core 3.1.2.1) then finds it holds.
    proofs = session.get("proofs")
    if proofs is None:  # a session from before proofs: its last login as a whole
        return session if now - int(session["auth_time"]) <= max_age else None
    return _kept(session, {name: proof for name, proof in proofs.items() if now - int(proof["time"]) <= max_age})


def within_day(session: dict, now: float) -> dict | None:
    """The SSO session without a one-day password proven on an earlier day: the code is good
    on its day alone (SPEC A7), so after midnight in Taiwan the login it made is over, and a
    session it alone found the account for starts the login over."""
    ends = login_ends(session.get("proofs") or {})
    if ends is None or now < ends:
        return session
    return _kept(session, {name: proof for name, proof in session["proofs"].items() if name != one_day.ONE_DAY.name})


def login_ends(proofs: dict) -> float | None:
    """When a login with these proofs is over, whatever the session's or a grant's own lifetime:
    a one-day password's at the end of its day (SPEC A7); None: it has no end of its own."""
    proof = proofs.get(one_day.ONE_DAY.name)
    return None if proof is None else one_day.day_ends(proof["time"])


def without_password(session: dict, account: Account) -> dict | None:
    """The SSO session without its password proofs (the password, a one-day password) once the
    account has turned password login off (SPEC M4): a login the account can no longer make
    proves nothing more; None when they alone found the account, and the login starts over."""
    proofs = session.get("proofs") or {}
    if not account.password_login_disabled or not set(_PASSWORDS) & set(proofs):
        return session
    return _kept(session, {name: proof for name, proof in proofs.items() if name not in _PASSWORDS})


_PASSWORDS = ("password", one_day.ONE_DAY.name)


def _kept(session: dict, kept: dict) -> dict | None:
    """``session`` with only the proofs ``kept``; None when none of them is a first factor."""
    if not any(FACTORS[name].first for name in kept if name in FACTORS):
        return None
    # Its auth_time too is theirs (max_age): a step-up elsewhere does not make them recent.
    return {**session, "proofs": kept, "amr": amr_of(kept),
            "auth_time": int(max(proof["time"] for proof in kept.values()))}


def amr_of(proofs: dict) -> list[str]:
    """The ``amr`` that these proofs make together."""
    return acr.with_mfa(list(dict.fromkeys(m for proof in proofs.values() for m in proof["amr"])))


def proven_since(tx: dict) -> float:
    """When the login's oldest proof was made (those it took over from its session's too)."""
    return min((proof["time"] for proof in tx.get("proofs", {}).values()), default=tx["auth_time"] or 0)


def _earned_with(factor, amr: list[str]) -> str:
    return acr.earned(acr.with_mfa(amr + factor.amr))


def _raises(factor, amr: list[str]) -> bool:
    return acr.rank(_earned_with(factor, amr)) > acr.rank(acr.earned(amr))


async def next_step(svc, tx: dict, account: Account | None, client) -> Step:
    """The account must come with its bindings loaded; the only database read here is the
    consent of a third-party client (in the thread pool)."""
    # The client's policy may narrow the factors (``allowed_factors`` in its registration).
    factors = tuple(f for f in FACTORS.values() if client.allows(f.name) and f.enabled(svc))
    if account is None:
        first = tuple(f for f in factors if f.first)
        return Step("factor", factors=first) if first else Step("unmet")
    if account.disabled:
        return Step("disabled")
    # What the client's policy takes as it is now (an administrator may change it mid-login, P5,
    # P7), no password once the account turned password login off (M4, in another tab too),
    # and no one-day password after its day (A7: a consent page left open past midnight).
    kept = within_policy(tx, client)
    kept = kept and without_password(kept, account)
    if not _narrow(tx, kept and within_day(kept, svc.clock())):
        return await next_step(svc, tx, None, client)
    for target in _levels(tx, client):
        if acr.rank(acr.earned(tx["amr"])) >= acr.rank(target):
            break
        if not _reaches(svc, tx, account, client, factors, target):
            continue  # out of this account's reach: the next level the client listed (acr_values)
        # (After a federated login only a factor the user holds raises it: ``acr.with_mfa``.)
        raising = tuple(f for f in factors if f.name not in tx["done"] and f.bound(account) and _raises(f, tx["amr"]))
        # Where some get there on their own, only those: an OTP on the way to the card's level
        # would be asked for nothing.
        options = tuple(f for f in raising if acr.rank(_earned_with(f, tx["amr"])) >= acr.rank(target)) or raising
        if options:
            return Step("factor", factors=options)
        if _can_bind(svc, account, client, target):
            return Step("action", action="bind")
    else:
        # No level asked for is within reach: said at once, before asking for a factor that
        # could never get there (RFC 9470 3).
        return Step("unmet")
    if svc.settings.mfa and "mfa" not in tx["amr"]:
        # Two factors for everyone (seed 001): a second one if bound, else bind one first (M1),
        # one this client takes, or the login could never go on.
        if not holds_possession(svc, account):
            return Step("action", action="bind") if bindings(account, client) else Step("unmet")
        options = tuple(f for f in factors if f.possession and f.bound(account) and f.name not in tx["done"])
        return Step("factor", factors=options) if options else Step("unmet")
    if tx["reverify"] and not any(FACTORS[name].possession for name in tx["done"]):
        # M2: prove a bound second factor again; an account without one re-enters its password.
        again = tuple(f for f in FACTORS.values() if f.possession and f.bound(account) and f.enabled(svc))
        if not again and "password" not in tx["done"]:
            again = (FACTORS["password"],)
        if again:
            return Step("factor", factors=again)
    now = dt.datetime.fromtimestamp(svc.clock(), dt.timezone.utc)
    if "password" in tx["done"] and password_expired(account, svc.settings.password_max_age_days, now):
        return Step("action", action="password_change")
    if await needs_consent(svc, tx, account, client):
        return Step("consent")
    return Step("done")


def _levels(tx: dict, client) -> list[str]:
    """The levels the login may end at, in the client's order of preference (its acr_values),
    each raised to the client's minimum_acr as it is now, and after Google to loa:2 at least:
    Google is always followed by OTP (seed 001), whatever IDP_MFA or the client asks, and
    however the proof came (from the upstream just now, or from the SSO session)."""
    floor = max((client.minimum_acr, acr.LOA2 if "fed" in tx["amr"] else acr.LOA1), key=acr.rank)
    return [max((level, floor), key=acr.rank) for level in (tx["target_acr"], *tx.get("fallback_acr", ()))]


def _reaches(svc, tx: dict, account: Account, client, factors: tuple, level: str) -> bool:
    """Whether the login can get to ``level`` at ``client``: with the factors the account has
    bound that the client takes (``factors``), or by binding a second factor first (M1)."""
    amr = tx["amr"] + [m for f in factors if f.bound(account) for m in f.amr]
    return acr.rank(acr.earned(acr.with_mfa(amr))) >= acr.rank(level) or _can_bind(svc, account, client, level)


def _can_bind(svc, account: Account, client, level: str) -> bool:
    """Two factors asked for and none bound: binding one the client takes (M1) is the way there."""
    return acr.rank(level) <= acr.rank(acr.LOA2) and not holds_possession(svc, account) and bool(bindings(account, client))


def _narrow(tx: dict, kept: dict | None) -> bool:
    """Keep to the login only the proofs ``kept`` (``within_policy``); False when none of them
    found the account, and the login starts over (``record_factor`` then forgets the rest)."""
    if kept is None:
        tx["account"] = None
        return False
    if kept is not tx:
        tx.update(proofs=kept["proofs"], amr=kept["amr"], auth_time=kept["auth_time"],
                  done=[name for name in tx["done"] if name in kept["proofs"]])
    return True


def holds_possession(svc, account: Account) -> bool:
    """Whether the account has a second factor bound, whichever clients allow it: binding one
    at login (M1) is for an account that has none, or a password alone, through a client that
    allows fewer factors, could add the attacker's own."""
    return any(f.possession and f.enabled(svc) and f.bound(account) for f in FACTORS.values())


def bindings(account: Account, client) -> tuple[str, ...]:
    """What forced binding (M1) offers at ``client``: OTP, or the card to a personal account (an
    AA account binds OTP only; seed 001: 強制擇一方式進行綁定), each only where the client's policy
    takes it: a binding it refuses would bring the login no further."""
    offered = (TOTP.name,) + ((CERTIFICATE.name,) if certificate.account_kind(account) == "personal" else ())
    return tuple(name for name in offered if client.allows(name))


def requested_scope(tx: dict, client) -> set[str]:
    """The scope the code will carry, which consent is asked and checked for: what the request
    names within the client's registration, or the registration's own where it names none
    (authlib's ``get_allowed_scope``, which decides the code's)."""
    return set((client.get_allowed_scope(dict(tx["params"]).get("scope", "")) or "").split())


async def needs_consent(svc, tx: dict, account: Account, client) -> bool:
    if client.first_party:  # also the provider's own pages
        return False
    if "consent" in dict(tx["params"]).get("prompt", "").split():
        return not tx.get("consented")
    if tx.get("consented"):
        return False
    scope = await run_in_threadpool(_consented_scope, svc, account.id, client.client_id)
    return scope is None or not requested_scope(tx, client) <= set(scope.split())


_CONSENTED = select(Consent.scope).where(Consent.account_id == bindparam("account"),
                                         Consent.client_id == bindparam("client"))


def _consented_scope(svc, account_id: str, client_id: str) -> str | None:
    rows = svc.db.rows(_CONSENTED, account=account_id, client=client_id)
    return rows[0]["scope"] if rows else None


def lost_phone(tx: dict, account) -> str | None:
    """What the OTP and push pages offer a user whose phone is lost (M5): ``"reset"``, the
    emergency code, once this login's first factor (the password, or Google as seed 001 shows)
    proved who it is; ``"helpdesk"`` to an account that cannot use password login; else
    nothing (the settings' re-verification, where no first factor was asked)."""
    if account is None:
        return None
    if account.password_login_disabled or not account.password_hash:
        return "helpdesk"
    return "reset" if {"password", "google"} & set(tx["done"]) else None
