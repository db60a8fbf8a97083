"""The assurance ladder: which ``acr`` a set of factors (``amr``) earns.

====================  =====================================================
``urn:idp:loa:1``     one factor: password, or a Google account alone
``urn:idp:loa:2``     two factors: password + OTP, password + push app,
                      Google + OTP, password + passkey, or a passkey alone
                      (amr ``pop`` + ``user``: a key proven with the
                      authenticator's user verification; never ``hwk``, as
                      without attestation we cannot tell hardware from a
                      synced passkey, see ``idp.factors.passkey``); after
                      Google, the other must be one the user holds
                      (``POSSESSION_AMR``), never the password (SPEC A6)
``urn:idp:loa:3``     a certificate proven with its private key: the MOICA
                      natural-person card or an organisation (XCA/GCA) card
                      with its PIN (through the HiPKI component, or in the TLS
                      handshake to a terminating proxy: amr ``sc pin`` either
                      way), or the mobile natural-person certificate
====================  =====================================================

A client asks for a level with ``acr_values`` (several, in its order of preference: the
login aims at the first one the account can reach) or sets ``minimum_acr`` in its
registration; the login flow keeps asking for factors until the level is reached
(step-up), and the ID token's ``acr`` says which level was.
"""

from __future__ import annotations

LOA1, LOA2, LOA3 = "urn:idp:loa:1", "urn:idp:loa:2", "urn:idp:loa:3"
LADDER = (LOA1, LOA2, LOA3)
# RFC 8176 method values that prove possession of a certificate's key.
CERTIFICATE_AMR = {"sc", "hwk"}
# RFC 8176 method values that prove something the user holds: what must follow Google.
POSSESSION_AMR = {"otp", "swk", "hwk", "sc", "pop"}


def rank(acr: str | None) -> int:
    return LADDER.index(acr) + 1 if acr in LADDER else 0


def earned(amr: list[str]) -> str:
    methods = set(amr)
    if methods & CERTIFICATE_AMR:
        return LOA3
    if "mfa" in methods:
        return LOA2
    return LOA1


def requested(acr_values: str | None, minimum: str | None) -> list[str]:
    """The levels a login may reach, in the client's order of preference (OIDC Core
    3.1.2.1): the known values the request lists, each raised to the client's minimum.
    The login aims at the first and falls back to the next where the account cannot
    reach it (``idp.flow.next_step``); with none listed, the minimum alone."""
    listed = [max((v, minimum), key=rank) for v in (acr_values or "").split() if v in LADDER]
    return list(dict.fromkeys(listed)) or [max((LOA1, minimum), key=rank)]


def with_mfa(amr: list[str]) -> list[str]:
    """Add RFC 8176 ``mfa`` once two different factors are in; with a federated login
    (``fed``), once one of them is held: Google and the password are not two factors (SPEC A6),
    at a login, by single sign-on or at a step-up alike."""
    methods = [m for m in amr if m != "mfa"]
    two = len(set(methods)) >= 2 and ("fed" not in methods or bool(POSSESSION_AMR & set(methods)))
    return methods + ["mfa"] if two else methods
