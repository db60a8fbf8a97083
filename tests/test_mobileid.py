"""The mobile-ID connector (SPEC A4) against the simulator over real HTTP, plus the
national ID and checksum helpers. Time is a FrozenClock shared by the simulator
and the connector; nothing sleeps."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path

import pytest

from deploy.dev.mobileid_sim import MobileIdSimulator
from idp.clock import FrozenClock
from idp.mobileid import MobileIdConfig, MobileIdConnector, Pending, Ticket, Verified, checksum, national_id
from idp.mobileid import errors as e
from idp.mobileid.connector import decode_ticket
from idp.pki import RevocationChecker, RevocationPolicy, load_trust
from tests import live

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

SP_ID = "idp-test"
KEY = os.urandom(32)
CITIZEN = "A123456789"
REAL_TRUST = Path(__file__).resolve().parent.parent / "keys" / "trust"  # the real MOICA/GRCA anchors


@pytest.fixture(scope="module")
def clock():
    return FrozenClock()


@pytest.fixture(scope="module")
def sim(clock, tmp_path_factory):
    simulator = MobileIdSimulator({SP_ID: KEY}, clock=clock, names={CITIZEN: "王小明"})
    simulator.trust = simulator.pki.write_trust(tmp_path_factory.mktemp("mobileid") / "trust")
    with live.reserve() as (sock, url):
        simulator.pki.crl_url = url + "/sim/moica.crl"  # before any citizen is issued
        with live.serve(simulator.app(), sock, url, health="/healthz") as server:
            simulator.url = server.url
            yield simulator


@pytest.fixture(autouse=True)
def no_faults(request):
    yield
    if "sim" in request.fixturenames:
        request.getfixturevalue("sim").faults.clear()


def config(sim, **overrides) -> MobileIdConfig:
    values = dict(service_url=sim.url + "/moise/sp/", sp_service_id=SP_ID, key=KEY)
    values.update(overrides)
    return MobileIdConfig(**values)


def run(sim, clock, scenario, trust=None, **overrides):
    """Run ``scenario(connector)`` on a fresh event loop with a fresh connector, which checks
    the holder's certificate with idp.pki: ``trust`` (the simulator's CA by default), the
    revocation policy hard-fail (the simulator's CRL, fetched over HTTP)."""
    async def main():
        revocation = RevocationChecker(RevocationPolicy("hard-fail"))
        connector = MobileIdConnector(config(sim, **overrides), trust=load_trust(trust or sim.trust),
                                      revocation=revocation, clock=clock)
        try:
            return await scenario(connector)
        finally:
            await connector.aclose()
            await revocation.aclose()
    return asyncio.run(main())


def phone(sim, key: str, decision: str) -> httpx.Response:
    """The test's hand on the simulated phone."""
    return httpx.post(sim.url + "/sim/answer", json={"sp_ticket_id": key, "decision": decision})


# -- national ID numbers ------------------------------------------------------------------------
@pytest.mark.parametrize("raw", ["A123456789", "a123456789", " F 131104093 ", national_id.with_check_digit("Z20000000")])
def test_valid_national_ids(raw):
    assert national_id.validate(raw) == national_id.normalize(raw)


@pytest.mark.parametrize("raw, reason", [
    ("", "empty"), ("A12345678", "length"), ("A1234567890", "length"), ("1123456789", "letter"),
    ("A12345678X", "digits"), ("AB23456789", "digits"), ("A323456789", "gender_digit"),
    ("A123456788", "checksum"), ("B123456789", "checksum"),
])
def test_bad_national_ids_say_why(raw, reason):
    with pytest.raises(national_id.InvalidNationalId) as caught:
        national_id.validate(raw)
    assert caught.value.reason == reason
    assert str(caught.value) == national_id.InvalidNationalId.MESSAGES[reason]


def test_resident_numbers_only_when_asked():
    resident = national_id.with_check_digit("A80000001")
    with pytest.raises(national_id.InvalidNationalId):
        national_id.validate(resident)
    assert national_id.validate(resident, allow_resident=True) == resident


# -- checksums ------------------------------------------------------------------------------------
def test_checksum_round_trip_and_refusals():
    value = checksum.make(KEY, "txn", "sp", "ticket")
    assert len(bytes.fromhex(value)) == 12 + 64 + 16
    assert checksum.verify(KEY, value, "txn", "sp", "ticket")
    assert checksum.verify(KEY, value.upper(), "txn", "sp", "ticket")
    assert not checksum.verify(KEY, value, "txn", "sp", "ticket2")
    assert not checksum.verify(os.urandom(32), value, "txn", "sp", "ticket")
    assert not checksum.verify(KEY, value[:-2] + f"{int(value[-2:], 16) ^ 1:02x}", "txn", "sp", "ticket")
    assert not checksum.verify(KEY, "zz", "txn") and not checksum.verify(KEY, "", "txn")
    assert checksum.verify(KEY, checksum.make(KEY, "a", iv=bytes(12)), "a")  # the usual all-zero IV


def test_parse_key():
    assert checksum.parse_key(KEY.hex()) == KEY == checksum.parse_key(base64.b64encode(KEY).decode())
    with pytest.raises(ValueError):
        checksum.parse_key("00" * 16)


def test_config_refuses_fast_polling_and_bad_time_limits():
    with pytest.raises(ValueError):
        MobileIdConfig("http://x/", SP_ID, KEY, poll_interval=3.9)
    with pytest.raises(ValueError):
        MobileIdConfig("http://x/", SP_ID, KEY, time_limit=601)
    assert MobileIdConfig("http://x/moise/sp", SP_ID, KEY).service_url == "http://x/moise/sp/"


# -- the connector against the simulator -----------------------------------------------------------
def test_push_approved_gives_a_verified_identity(sim, clock):
    async def scenario(connector):
        ticket = await connector.request_push(CITIZEN)
        assert ticket.op_mode == "PUSH" and ticket.expires_at == pytest.approx(clock() + 180)
        first = await connector.get_result(ticket)
        assert isinstance(first, Pending) and first.service_code == "20002"
        assert phone(sim, ticket.sp_ticket_id, "approve").json() == {"state": "approved"}
        clock.advance(4)
        return ticket, await connector.get_result(ticket)

    ticket, result = run(sim, clock, scenario)
    assert isinstance(result, Verified)
    assert (result.national_id, result.name, result.transaction_id) == (CITIZEN, "王小明", ticket.transaction_id)
    assert len(result.card_serial) == 16
    identity = result.identity  # checked by idp.pki, as a card's: path, key usage, the CRL
    assert identity.anchor_set == "mobileid-simulator" and identity.kinds == {"personal"}
    assert identity.id_last4 == CITIZEN[-4:] and identity.form == "pkcs1"
    assert (identity.revocation.status, identity.revocation.source) == ("good", "crl")
    sent = [body for name, body in sim.calls if body.get("transaction_id") == ticket.transaction_id]
    assert sent[0]["sign_info"]["sign_data"] == ticket.sign_data and sent[0]["time_limit"] == "180"


def test_push_denied(sim, clock):
    async def scenario(connector):
        ticket = await connector.request_push(CITIZEN)
        phone(sim, ticket.sp_ticket_id, "deny")
        await connector.get_result(ticket)

    with pytest.raises(e.Denied) as caught:
        run(sim, clock, scenario)
    assert (caught.value.code, caught.value.service_code) == ("mobileid.denied", "APP_USER_CANCEL")


def test_expired_request_is_refused_even_if_approved_afterwards(sim, clock):
    lagging = FrozenClock(clock())  # the connector's clock, held back to reach the service

    async def scenario(connector):
        ticket = await connector.request_push(CITIZEN, time_limit=30)
        clock.advance(31)
        assert phone(sim, ticket.sp_ticket_id, "approve").status_code == 409  # too late on the phone
        with pytest.raises(e.Expired) as by_service:
            await connector.get_result(ticket)
        lagging.advance(31)
        with pytest.raises(e.Expired) as by_connector:  # and the connector knows the deadline itself
            await connector.get_result(ticket)
        return by_service.value, by_connector.value

    by_service, by_connector = run(sim, lagging, scenario)
    assert by_service.service_code == "SPTKT_OVD" and by_connector.service_code is None


def test_an_answer_that_arrives_after_expiry_is_refused(sim, clock):
    async def scenario(connector):
        ticket = await connector.request_push(CITIZEN, time_limit=30)
        phone(sim, ticket.sp_ticket_id, "approve")  # approved in time, the poll leaves in time,
        connector.clock = _ticking(FrozenClock(clock()), [0, 31])  # and the answer lands 31 s later
        await connector.get_result(ticket)

    with pytest.raises(e.Expired):
        run(sim, clock, scenario)


def _ticking(clock, steps):
    """A clock that moves by the next step each time it is read."""
    steps = list(steps)

    def read():
        if steps:
            clock.advance(steps.pop(0))
        return clock()
    return read


def test_qr_ticket_flow(sim, clock):
    async def scenario(connector):
        ticket = await connector.get_sp_ticket(CITIZEN)
        inner = decode_ticket(ticket.sp_ticket)
        assert inner["op_mode"] == "I-SCAN" and inner["transaction_id"] == ticket.transaction_id
        assert inner["expiration_time"] == int(ticket.expires_at * 1000)
        assert (await connector.get_result(ticket)).service_code == "SPTKTID_TXNLOG_NF"
        scanned = httpx.post(sim.url + "/sim/answer", json={"sp_ticket": ticket.sp_ticket, "decision": "approve"})
        assert scanned.status_code == 200
        clock.advance(4)
        stored = json.loads(json.dumps(ticket.to_dict()))  # as the login flow would keep it
        result = await connector.get_result(Ticket.from_dict(stored))
        again = Ticket.from_dict(stored)
        clock.advance(4)
        with pytest.raises(e.AlreadyUsed) as used:
            await connector.get_result(again)
        return result, used.value

    result, used = run(sim, clock, scenario)
    assert isinstance(result, Verified) and used.service_code == "SPTKTID_SPTKT_RDM"


def test_polling_faster_than_4_seconds_is_throttled(sim, clock):
    async def scenario(connector):
        ticket = await connector.request_push(CITIZEN)
        calls = lambda: sum(1 for _, b in sim.calls if b.get("transaction_id") == ticket.transaction_id)  # noqa: E731
        await connector.get_result(ticket)
        assert calls() == 2
        clock.advance(3.9)
        held = await connector.get_result(ticket)
        assert isinstance(held, Pending) and held.retry_after == pytest.approx(0.1) and held.service_code is None
        assert calls() == 2  # the service was not asked
        clock.advance(0.1)
        await connector.get_result(ticket)
        assert calls() == 3

    run(sim, clock, scenario)


def test_tampered_idp_checksum_is_refused(sim, clock):
    async def scenario(connector):
        ticket = await connector.request_push(CITIZEN)
        phone(sim, ticket.sp_ticket_id, "approve")
        sim.faults.add("tamper_idp_checksum")
        with pytest.raises(e.IdpChecksumInvalid):
            await connector.get_result(ticket)
        with pytest.raises(e.IdpChecksumInvalid):  # a ticket's answer too
            await connector.request_push(CITIZEN)

    run(sim, clock, scenario)


@pytest.mark.parametrize("fault, error", [("rogue_certificate", e.UntrustedCertificate),
                                          ("bad_signature", e.BadSignature)])
def test_signature_must_verify_with_a_trusted_certificate(sim, clock, fault, error):
    async def scenario(connector):
        ticket = await connector.request_push(CITIZEN)
        phone(sim, ticket.sp_ticket_id, "approve")
        sim.faults.add(fault)  # rogue: a CA with MOICA's DN but another key
        await connector.get_result(ticket)

    with pytest.raises(error):
        run(sim, clock, scenario)


def test_the_real_moica_anchors_do_not_trust_the_simulator(sim, clock):
    async def scenario(connector):
        ticket = await connector.request_push(CITIZEN)
        phone(sim, ticket.sp_ticket_id, "approve")
        await connector.get_result(ticket)

    with pytest.raises(e.UntrustedCertificate):
        run(sim, clock, scenario, trust=REAL_TRUST)


def test_a_revoked_certificate_is_refused(sim, clock):
    other = national_id.with_check_digit("C12345678")

    async def scenario(connector):
        ticket = await connector.request_push(other)
        phone(sim, ticket.sp_ticket_id, "approve")
        assert httpx.post(sim.url + "/sim/revoke", json={"id_num": other}).status_code == 200
        await connector.get_result(ticket)

    with pytest.raises(e.CertificateInvalid) as caught:
        run(sim, clock, scenario)
    assert "revoked" in str(caught.value)


def test_revocation_unknown_is_refused_under_hard_fail(sim, clock):
    async def scenario(connector):
        ticket = await connector.request_push(CITIZEN)
        phone(sim, ticket.sp_ticket_id, "approve")
        sim.faults.add("crl_unavailable")  # the CA's CRL server answers 503
        await connector.get_result(ticket)

    with pytest.raises(e.RevocationUnavailable):
        run(sim, clock, scenario)


def test_an_answer_for_another_person_is_refused(sim, clock):
    async def scenario(connector):
        ticket = await connector.request_push(CITIZEN)
        phone(sim, ticket.sp_ticket_id, "approve")
        ticket.hashed_id_num = "0" * 64
        await connector.get_result(ticket)

    with pytest.raises(e.IdentityMismatch):
        run(sim, clock, scenario)


# -- error codes ----------------------------------------------------------------------------------
def test_service_error_codes_surface_as_named_errors(sim, clock):
    async def wrong_key(connector):
        await connector.request_push(CITIZEN)

    with pytest.raises(e.SpChecksumRejected) as caught:
        run(sim, clock, wrong_key, key=os.urandom(32))
    assert caught.value.service_code == "SP-API-ATH-01-INV_SP_CHECKSUM"

    with pytest.raises(e.InvalidRequest) as caught:
        run(sim, clock, wrong_key, sp_service_id="someone-else")
    assert caught.value.code == "mobileid.invalid_request"

    async def bad_id(connector):
        await connector.get_sp_ticket("A123456788")

    with pytest.raises(e.InvalidRequest):
        run(sim, clock, bad_id)


def test_simulator_checks_time_limit(sim):
    body = {"transaction_id": "t-1", "sp_service_id": SP_ID, "id_num": CITIZEN, "op_code": "ATH",
            "hint": "", "device_user_def_desc": "", "time_limit": "20",
            "sign_info": {"sign_type": "PKCS#1", "sign_data": "QQ==", "tbs_encoding": "base64"}}
    body["sp_checksum"] = checksum.make(KEY, "t-1", SP_ID, CITIZEN, "", "ATH", "", "QQ==")
    answer = httpx.post(sim.url + "/moise/sp/requestAthOrSignPush", json=body).json()
    assert answer["error_code"] == "SP-API-ATH-01-INV_TIME_LIMIT"


@pytest.mark.parametrize("code, cls", [
    ("SPTKT_OVD", e.Expired), ("SPTKTID_SPTKT_RDM", e.AlreadyUsed), ("APP_USER_CANCEL", e.Denied),
    ("SP-API-ATH-01-INV_SP_CHECKSUM", e.SpChecksumRejected), ("SP-API-ATH-01-INV_PARAM", e.InvalidRequest),
    ("SOMETHING_NEW", e.ServiceError),
])
def test_error_code_mapping(code, cls):
    error = e.from_service(code, "message")
    assert type(error) is cls and error.service_code == code and error.code.startswith("mobileid.")


def test_service_down_is_unavailable(clock):
    with live.reserve() as (_, url):
        pass  # closed again: nobody serves this port
    cfg = MobileIdConfig(url + "/moise/sp/", SP_ID, KEY)

    async def scenario():
        connector = MobileIdConnector(cfg, trust=load_trust(REAL_TRUST), revocation=RevocationChecker(), clock=clock)
        try:
            await connector.request_push(CITIZEN)
        finally:
            await connector.aclose()
            await connector.revocation.aclose()

    with pytest.raises(e.ServiceUnavailable):
        asyncio.run(scenario())


def test_demo_page_lists_pending_requests_and_answers_by_form(sim, clock):
    async def scenario(connector):
        return await connector.request_push(CITIZEN, hint="校務系統登入")

    ticket = run(sim, clock, scenario)
    page = httpx.get(sim.url + "/sim/")
    assert "校務系統登入" in page.text and ticket.sp_ticket_id in page.text
    answered = httpx.post(sim.url + "/sim/answer", data={"sp_ticket_id": ticket.sp_ticket_id, "decision": "deny"})
    assert answered.status_code == 303 and sim.tickets[ticket.sp_ticket_id].state == "denied"
