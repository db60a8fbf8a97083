"""Back-channel logout deliveries survive the process that started them (SPEC P6):
each is a job in the shared store, leased to the process working on it, and any
other process takes over a job whose lease ran out, carrying on from the attempts
already made. Two provider instances on one real PostgreSQL and one real Redis
stand for two processes; one of them "dies" (its background loop stops) while it
waits to retry. Time is the injected clock: the leases run out without sleeping.
"""

from __future__ import annotations

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from idp.clock import FrozenClock
from idp.protocol import logout as bcl
from idp.web.app import create_app
from tests.harness import Provider
from tests.test_backchannel import EVENT, _events, _wait

# Two processes share state only through Redis: the in-process store cannot stand for that.
pytestmark = pytest.mark.parametrize("backend", ["postgres+redis"])


def test_a_delivery_left_by_a_dead_process_is_finished_by_another(backend, settings_for, receiver):
    settings, clock = settings_for(), FrozenClock()
    first = Provider(create_app(settings, clock), clock)
    second = Provider(create_app(settings, clock), clock)
    try:
        account_id = first.account("alice")
        client_id, _ = first.client(redirect_uris=[receiver.url + "/cb"], backchannel_logout_uri=receiver.url + "/bc")
        session = first.svc.sessions.create(account_id, "alice", ["pwd"], "urn:idp:loa:1", clock())
        first.svc.sessions.add_grant(session["sid"], client_id, "grant-1")

        # The first process tries once (the client answers 503) and waits a minute to retry...
        first.svc.backchannel.delays = (60.0,)
        receiver.fail = 1
        first.svc.sessions.end(session["sid"], first.svc.tokens)
        [jti] = second.svc.store.members(bcl.QUEUE + str(int(clock() // bcl.BUCKET_SECONDS)))  # the queue is shared
        job = bcl.JOB + jti
        assert _wait(lambda: (second.svc.store.get(job) or {}).get("attempts") == 1), second.svc.store.get(job)
        assert receiver.attempts == 1 and not receiver.tokens
        # ...and dies while it waits.
        first.svc.backchannel.stop()

        # Its lease still holds: nobody else touches the job.
        assert second.svc.backchannel.sweep() == 0
        # The lease runs out: the second process takes the job over and delivers it.
        clock.advance(60 + second.svc.backchannel.timeout + bcl.LEASE_MARGIN + 1)
        assert second.svc.backchannel.sweep() == 1
        second.svc.backchannel.wait()
        assert receiver.attempts == 2 and len(receiver.tokens) == 1
        keys = KeySet.import_key_set(second.http().get("/jwks").json())
        claims = jwt.decode(receiver.tokens[0], keys).claims
        assert claims["aud"] == client_id and claims["sub"] == account_id and EVENT in claims["events"]
        assert claims["jti"] == jti
        [(audited_client, detail)] = _events(second, "logout.backchannel")
        assert audited_client == client_id and detail["attempts"] == 2  # one here, one in the dead process

        # Done: the job is gone, and no sweep delivers it again.
        assert second.svc.store.get(job) is None
        assert second.svc.backchannel.sweep() == 0
    finally:
        second.svc.backchannel.stop()
        for provider in (first, second):
            provider.svc.db.engine.dispose()
