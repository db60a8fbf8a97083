"""Mobile natural-person certificate (SPEC A4): the mobile-ID service connector."""

from idp.mobileid.config import MobileIdConfig
from idp.mobileid.connector import MobileIdConnector, Pending, Ticket, Verified
from idp.mobileid.errors import MobileIdError

__all__ = ["MobileIdConfig", "MobileIdConnector", "MobileIdError", "Pending", "Ticket", "Verified"]
