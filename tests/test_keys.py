"""Signing keys (SPEC P1): rotation never breaks a token already issued, the
next key is published before it signs, and a retired key leaves /jwks only
after the tokens it signed have expired."""

import fcntl
import stat
from pathlib import Path

import pytest
from joserfc import jws, jwt
from joserfc.errors import InvalidKeyIdError
from joserfc.jwk import KeySet

from tests.harness import redeem


@pytest.fixture
def provider(make_provider):
    # Look at the key directory on every request (the default caches for 30 s).
    return make_provider(key_refresh_seconds=0)


def _id_token(provider, client_id, secret) -> str:
    browser = provider.browser()
    code = browser.login(client_id)["code"]
    response = redeem(browser.http, client_id, secret, code)
    assert response.status_code == 200, response.text
    return response.json()["id_token"]


def _jwks(provider) -> dict:
    response = provider.http().get("/jwks")
    assert response.status_code == 200
    return response.json()


def _kids(jwks: dict) -> set[str]:
    return {k["kid"] for k in jwks["keys"]}


def _kid(token: str) -> str:
    return jws.extract_compact(token.encode()).headers()["kid"]


def _verify(token: str, jwks: dict) -> dict:
    return jwt.decode(token, KeySet.import_key_set(jwks)).claims


def _clients(provider):
    """One client per signing algorithm."""
    provider.account("alice")
    return [provider.client(), provider.client(id_token_signed_response_alg="RS256")]


def test_token_issued_before_rotation_still_verifies(provider):
    clients = _clients(provider)
    before = [_id_token(provider, *c) for c in clients]
    provider.svc.keys.rotate(keep_retired_seconds=3600)
    jwks = _jwks(provider)  # what a relying party fetches after the rotation
    for (client_id, _), token in zip(clients, before):
        assert _verify(token, jwks)["aud"] == client_id
    after = [_id_token(provider, *c) for c in clients]
    assert {_kid(t) for t in after}.isdisjoint({_kid(t) for t in before})
    for (client_id, _), token in zip(clients, after):
        assert _verify(token, jwks)["aud"] == client_id


def test_the_next_key_is_published_before_it_signs(provider):
    clients = _clients(provider)
    published = _jwks(provider)  # a relying party's cached copy
    signing = {_kid(_id_token(provider, *c)) for c in clients}
    provider.svc.keys.rotate(keep_retired_seconds=3600)
    for client_id, secret in clients:
        token = _id_token(provider, client_id, secret)
        assert _kid(token) not in signing
        # Verifies with the copy from before the rotation: no refetch needed.
        assert _verify(token, published)["aud"] == client_id
    # And a new next key is already out for the rotation after this one.
    assert len(_kids(_jwks(provider)) - _kids(published)) == 2


def test_key_files_are_private(provider):
    keys_dir = Path(provider.svc.settings.keys_dir)
    provider.svc.keys.rotate(keep_retired_seconds=3600)
    files = list(keys_dir.glob("*.json"))
    assert len(files) == 6  # retired, current and next for ES256 and RS256
    for path in [*files, keys_dir / "pairwise.secret"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    # The private halves stay on disk; /jwks publishes none of them.
    assert all("d" not in k and "p" not in k for k in _jwks(provider)["keys"])


def test_retired_key_stays_until_its_time_then_goes(provider):
    clients = _clients(provider)
    oldest = [_id_token(provider, *c) for c in clients]
    provider.svc.keys.rotate(keep_retired_seconds=3600)
    middle = [_id_token(provider, *c) for c in clients]
    # A second rotation before retire_at keeps the retired keys published.
    provider.clock.advance(1800)
    provider.svc.keys.rotate(keep_retired_seconds=3600)
    jwks = _jwks(provider)
    assert all(_verify(t, jwks) for t in oldest + middle)
    # Past retire_at, the next rotation removes the oldest keys, and only those.
    provider.clock.advance(1801)
    provider.svc.keys.rotate(keep_retired_seconds=3600)
    jwks = _jwks(provider)
    assert {_kid(t) for t in oldest}.isdisjoint(_kids(jwks))
    assert {_kid(t) for t in middle} <= _kids(jwks)
    assert all(_verify(t, jwks) for t in middle)
    with pytest.raises(InvalidKeyIdError):
        _verify(oldest[0], jwks)
    assert len(list(Path(provider.svc.settings.keys_dir).glob("*.json"))) == 8  # per algorithm: two retired, current, next


def test_a_retired_key_leaves_the_jwks_at_its_time_without_another_rotation(provider):
    clients = _clients(provider)
    old = [_id_token(provider, *c) for c in clients]
    provider.svc.keys.rotate(keep_retired_seconds=3600)
    assert {_kid(t) for t in old} <= _kids(_jwks(provider))
    provider.clock.advance(3601)
    assert {_kid(t) for t in old}.isdisjoint(_kids(_jwks(provider)))
    assert all(_verify(_id_token(provider, *c), _jwks(provider)) for c in clients)


def test_another_process_sharing_the_key_directory_follows_the_rotation(provider, make_provider):
    other = make_provider(key_refresh_seconds=0)  # same keys_dir, its own database and store
    assert _kids(_jwks(other)) == _kids(_jwks(provider))
    provider.svc.keys.rotate(keep_retired_seconds=3600)
    assert _kids(_jwks(other)) == _kids(_jwks(provider))
    other.account("alice")
    client_id, secret = other.client()
    token = _id_token(other, client_id, secret)
    # The other process signs with the key this one promoted.
    promoted = provider.svc.keys.signing_key("ES256").kid
    assert _kid(token) == promoted
    assert _verify(token, _jwks(provider))["aud"] == client_id


def test_a_rotation_makes_its_new_keys_before_it_locks_the_directory(provider, monkeypatch):
    """Every serving process that reloads waits on the directory's lock; generating an
    RSA key takes up to a second, so none is generated while the lock is held."""
    from idp.protocol import keys

    generate, held = keys._generate, []

    def watched(alg, status):
        with open(provider.svc.keys.dir / ".lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)  # what a reloading process takes
            except BlockingIOError:
                held.append(alg)
        return generate(alg, status)

    monkeypatch.setattr(keys, "_generate", watched)
    before = _kids(_jwks(provider))
    provider.svc.keys.rotate(keep_retired_seconds=3600)
    assert _kids(_jwks(provider)) != before
    assert held == []


def test_two_processes_making_an_instance_secret_at_once_agree_on_it(tmp_path, monkeypatch):
    """Two providers start together on an empty key directory (compose: both are PID 1 in
    their containers): the second makes the secret while the first is between writing its
    copy and linking it. Both end with the one secret on disk."""
    import os

    from idp.services import instance_secret

    path, link, values = tmp_path / "data.secret", os.link, []

    def second_starts_meanwhile(src, dst):
        monkeypatch.setattr(os, "link", link)
        monkeypatch.setattr(os, "getpid", lambda: 1)
        values.append(instance_secret(path))  # the other process, all the way through
        return link(src, dst)

    monkeypatch.setattr(os, "getpid", lambda: 1)
    monkeypatch.setattr(os, "link", second_starts_meanwhile)
    values.append(instance_secret(path))
    assert values[0] == values[1] == bytes.fromhex(path.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["data.secret"]
