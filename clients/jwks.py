"""The provider's keys (its JWKS) as a portal trusts them, for ID tokens and logout tokens.

authlib keeps the JWKS it fetched first for good (``server_metadata["jwks"]``, fetched
again only for a key it lacks), so a key the provider withdrew (after a compromise, say)
would go on verifying tokens until the portal restarts. Here the copy lasts as long as
the provider's ``Cache-Control: max-age`` says (5 minutes if it says nothing) and is then
fetched again, whole, before the next token is checked with it. A provider that cannot
be reached then leaves the portal its stale copy, asked again a minute later, not at every
request (each would wait on the connect timeout); a token naming a key that copy lacks
cannot be checked meanwhile.
"""

from __future__ import annotations

import logging
import re

from authlib.common.errors import AuthlibBaseError
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

try:  # authlib uses httpx2 when installed, else httpx; catch whichever it raises
    import httpx2 as httpx
except ImportError:
    import httpx

log = logging.getLogger(__name__)

# Everything talking to the provider can raise: unreachable or broken provider
# (httpx, bad JSON, missing metadata), OAuth errors, a bad ID token.
PROVIDER_ERRORS = (AuthlibBaseError, JoseError, httpx.HTTPError, ValueError, RuntimeError)

DEFAULT_MAX_AGE = 300  # the copy's life when /jwks does not say
# The least a copy lasts; the least between two fetches for keys tokens name and it lacks; how long a
# stale copy serves after a failed fetch.
REFETCH_SECONDS = 60


def max_age(cache_control: str) -> int:
    found = re.search(r"(?:^|,)\s*max-age=(\d+)", cache_control)
    return int(found.group(1)) if found else DEFAULT_MAX_AGE


class ProviderKeys:
    """The portal's copy of the provider's JWKS. It is kept in authlib's
    ``server_metadata["jwks"]``, which is where authlib checks ID tokens."""

    def __init__(self, idp):
        self.idp = idp
        self.until = float("-inf")  # the copy is trusted until then
        self.refetched = float("-inf")  # when a token naming a key the copy lacks last made it fetch
        self.unconfirmed = False  # the last fetch failed: a key the copy lacks may be the provider's

    async def get(self, now: float, kid: str | None = None) -> KeySet:
        """The keys to check a token with at ``now``; ``kid``, the key the token names."""
        if now >= self.until:
            await self._refresh(now)
        elif kid is not None and kid not in self._kids() and now - self.refetched >= REFETCH_SECONDS:
            # Perhaps a key the provider rotated in since: its JWKS once more. At most once a
            # minute, whatever tokens come: anyone may post a logout token, and it would be the
            # portal hammering the provider. Unreachable, it raises: the token cannot be checked
            # now (a logout token's sender tries again on a 503).
            self.refetched = now
            await self._fetch(now)
        if kid is not None and self.unconfirmed and kid not in self._kids():
            # The provider may have rotated it in: the token cannot be checked now, which is no
            # proof it is forged (a logout token's sender tries again on a 503, not on a 400).
            raise RuntimeError("the token names a key the stale copy of the provider's JWKS lacks")
        return KeySet.import_key_set(self.idp.server_metadata["jwks"])

    def _kids(self) -> set:
        return {key.get("kid") for key in self.idp.server_metadata["jwks"].get("keys", [])}

    async def _refresh(self, now: float) -> None:
        """Fetch a stale copy again; the provider unreachable, keep it a minute more."""
        try:
            await self._fetch(now)
        except PROVIDER_ERRORS as exc:
            if "jwks" not in self.idp.server_metadata:  # no copy at all: nothing to check tokens with
                raise
            log.warning("provider's JWKS unavailable, its copy kept %d s more: %r", REFETCH_SECONDS, exc)
            self.until = now + REFETCH_SECONDS
            self.unconfirmed = True

    async def _fetch(self, now: float) -> None:
        uri = (await self.idp.load_server_metadata()).get("jwks_uri")
        if not uri:
            raise RuntimeError('Missing "jwks_uri" in metadata')
        response = await self.idp.get(uri, withhold_token=True)
        response.raise_for_status()
        self.idp.server_metadata["jwks"] = response.json()
        self.unconfirmed = False
        # Not sooner than a minute: "max-age=0" would be a fetch for every token.
        self.until = now + max(REFETCH_SECONDS, max_age(response.headers.get("cache-control", "")))
