"""Settings of the mobile-ID connector. The provider makes them from its ``IDP_MOBILEID_*``
settings (``idp.factors.mobileid.build_connector``); the text the app shows (``hint``) and the
polling interval (never below the service's 4 s) keep their defaults there."""

from __future__ import annotations

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
