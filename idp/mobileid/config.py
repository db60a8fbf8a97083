"""Settings of the mobile-ID connector.

``from_env`` reads these (``idp/settings.py`` has the same names, and
``IDP_MOBILEID_TRUST`` for the anchors the holder's certificate must chain to)::

    IDP_MOBILEID_URL            service base URL, path prefix included, e.g.
                                https://fidoapi-test.moi.gov.tw/moise/sp/
    IDP_MOBILEID_SP_SERVICE_ID  this provider's sp_service_id
    IDP_MOBILEID_KEY            the SP's AES-256 key: 64 hex digits or base64
    IDP_MOBILEID_TIME_LIMIT     seconds a request lives, 30..600 (default 180: the
                                seed's 3-minute countdown)
    IDP_MOBILEID_HINT           text the app shows with the request
    IDP_MOBILEID_POLL_INTERVAL  seconds between result polls, never below 4
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from idp.mobileid import checksum

MIN_POLL_INTERVAL = 4.0  # the service's rule
TIME_LIMIT_RANGE = (30, 600)


@dataclass(frozen=True)
class MobileIdConfig:
    service_url: str
    sp_service_id: str
    key: bytes = field(repr=False)
    time_limit: int = 180
    hint: str = "登入驗證 / Login"
    device_user_def_desc: str = ""
    poll_interval: float = MIN_POLL_INTERVAL
    timeout: float = 10.0

    def __post_init__(self):
        if len(self.key) != checksum.KEY_BYTES:
            raise ValueError("the mobile-ID key must be 32 bytes")
        low, high = TIME_LIMIT_RANGE
        if not low <= self.time_limit <= high:
            raise ValueError(f"time_limit must be {low} to {high} seconds")
        if self.poll_interval < MIN_POLL_INTERVAL:
            raise ValueError(f"the service must not be polled more often than every {MIN_POLL_INTERVAL:g} s")
        if not self.service_url.endswith("/"):
            object.__setattr__(self, "service_url", self.service_url + "/")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "MobileIdConfig":
        env = os.environ if env is None else env
        return cls(
            service_url=env["IDP_MOBILEID_URL"],
            sp_service_id=env["IDP_MOBILEID_SP_SERVICE_ID"],
            key=checksum.parse_key(env["IDP_MOBILEID_KEY"]),
            time_limit=int(env.get("IDP_MOBILEID_TIME_LIMIT", "180")),
            hint=env.get("IDP_MOBILEID_HINT", cls.hint),
            poll_interval=float(env.get("IDP_MOBILEID_POLL_INTERVAL", MIN_POLL_INTERVAL)),
        )
