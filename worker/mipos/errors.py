"""The error types of a call to mipos: what to do next is the ``error_class``."""

from __future__ import annotations

from enum import StrEnum


class ErrorClass(StrEnum):
    TRANSIENT = "transient"  # back off and retry
    AUTH = "auth"  # get a fresh token, then send again at once
    PERMANENT = "permanent"  # stop; dead-letter


class MiposError(Exception):
    """A call to mipos did not succeed; ``error_class`` says what to do next."""

    error_class: ErrorClass = ErrorClass.TRANSIENT

    def __init__(self, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status


class TransientError(MiposError):
    error_class = ErrorClass.TRANSIENT


class AuthError(MiposError):
    """The token was refused, or a token could not be had (credentials, token call)."""

    error_class = ErrorClass.AUTH


class PermanentError(MiposError):
    error_class = ErrorClass.PERMANENT
