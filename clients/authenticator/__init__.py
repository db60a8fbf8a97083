"""The reference push-approval app (SPEC A5): what a phone does, as a library and a CLI."""

from .app import AppError, Authenticator

__all__ = ["AppError", "Authenticator"]
