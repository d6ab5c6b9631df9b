"""The error of the data plane."""

from __future__ import annotations

from vmipc.errors import VmipcError


class BulkError(VmipcError):
    """A data-plane operation failed in a way the client should hear about: ``code`` is the
    stable error code (``bad-stream``, ``bad-snapshot``, ``bad-state``, ...) the control
    server answers with, the message one line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
