"""Pushed Authorization Requests (RFC 9126).

A client posts its authorization request to ``/par`` with its own
authentication and gets a one-time ``request_uri`` for the browser: the
parameters never travel through the browser, and a confidential client is
known to have sent them. The pushed parameters live in the store (any process
may serve the authorization request) and are taken on first use.
"""

from __future__ import annotations

import secrets

REQUEST_URI_PREFIX = "urn:ietf:params:oauth:request_uri:"
_KEY = "par:"  # + client_id:reference -> {client_id, params, exp}


def push(svc, client_id: str, params: list[tuple[str, str]]) -> tuple[str, int]:
    """Keep ``params`` for one authorization request; returns (request_uri, expires_in)."""
    lifetime = svc.settings.par_seconds
    reference = secrets.token_urlsafe(32)
    record = {"client_id": client_id, "params": params, "exp": svc.clock() + lifetime}
    svc.store.set(f"{_KEY}{client_id}:{reference}", record, lifetime + 60)
    return REQUEST_URI_PREFIX + reference, lifetime


def pull(svc, client_id: str | None, request_uri: str | None) -> list[tuple[str, str]] | None:
    """The pushed parameters of ``request_uri``, once, if ``client_id`` pushed them
    and they have not expired (section 4: only those parameters count)."""
    if not client_id or not request_uri or not request_uri.startswith(REQUEST_URI_PREFIX):
        return None
    reference = request_uri[len(REQUEST_URI_PREFIX):]
    if not 0 < len(reference) <= 64:
        return None
    # Under the client's own key: another client_id finds nothing, and so cannot burn it.
    record = svc.store.take(f"{_KEY}{client_id}:{reference}")
    if record is None or record["exp"] < svc.clock():
        return None
    return [tuple(pair) for pair in record["params"]]


def required(svc, client) -> bool:
    """Section 6: the server, or this client's registration, may refuse any other way."""
    return svc.settings.par_required or bool(client.metadata.get("require_pushed_authorization_requests"))
