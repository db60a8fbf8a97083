"""校務行政系統 2.0 — a demo relying party for the OpenID Connect provider."""

from .app import create_app

__all__ = ["create_app"]
