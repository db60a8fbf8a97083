"""Documents a client's registration names by URL: its public keys (``jwks_uri``, OpenID
Connect Registration 1.0 2) and its sector's redirect URIs (``sector_identifier_uri``, 5).

The URL was checked at registration as the client's other URIs are (https; http only on this
computer). A fetch follows no redirect and has a time limit on the whole request and a size
limit on the answer: a slow or endless answer cannot hold the request that needs it.
"""

from __future__ import annotations

import asyncio
import json
import logging

try:  # the project depends on httpx2; plain httpx has the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

from idp import bridge

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 5.0
MAX_BYTES = 64 * 1024  # a JWK set of a few RSA keys is some kilobytes
KEYS_SECONDS = 600  # how long fetched keys are used before they are fetched again
# An assertion naming a kid the keys lack fetches them again (the client rotated), at most this
# often per URL: assertions with made-up kids must not turn the provider against the client's host.
REFETCH_SECONDS = 10
CACHE_SIZE = 1000


class FetchError(Exception):
    pass


async def _fetch(uri: str):
    async with httpx.AsyncClient(timeout=TIMEOUT_SECONDS, follow_redirects=False) as http:
        # The whole fetch within the limit (httpx's applies to each of connect and read).
        async with asyncio.timeout(TIMEOUT_SECONDS):
            async with http.stream("GET", uri, headers={"Accept": "application/json"}) as response:
                if response.status_code != 200:
                    raise FetchError(f"HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_BYTES:
                        raise FetchError(f"more than {MAX_BYTES} bytes")
    return json.loads(body)


def fetch_json(uri: str):
    """The JSON document at ``uri``; raises ``FetchError``. Awaited on the event loop inside
    ``idp.bridge.run``, else (the thread pool, the CLI) on a loop of its own."""
    try:
        return bridge.wait(_fetch(uri)) if bridge.inside() else asyncio.run(_fetch(uri))
    except (httpx.HTTPError, TimeoutError) as exc:
        raise FetchError(type(exc).__name__) from None
    except ValueError:
        raise FetchError("not JSON") from None


class ClientKeys:
    """The JWK sets of clients registered with a ``jwks_uri``, kept for ``KEYS_SECONDS``
    (per process: keys are no login state, and each process may fetch them itself)."""

    def __init__(self, clock, check):
        self.clock = clock
        self.check = check  # raises ValueError for a document that is no usable JWK set
        self._cache: dict[str, tuple[float, dict]] = {}  # uri -> (fetched at, JWK set)

    def get(self, uri: str, kid: str | None) -> dict:
        """The JWK set at ``uri``, from the cache while it is fresh and knows ``kid``."""
        now = self.clock()
        fetched, jwks = self._cache.get(uri, (None, None))
        if fetched is not None and now < fetched + KEYS_SECONDS and (
                kid is None or kid in {key.get("kid") for key in jwks["keys"]} or now < fetched + REFETCH_SECONDS):
            return jwks
        jwks = fetch_json(uri)
        self.check(jwks)
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[uri] = (now, jwks)
        return jwks
