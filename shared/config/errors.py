"""The errors vlmq reports to callers.

Every error a caller can cause is a ``VlmqError`` with a stable ``code`` and the
HTTP status the APIs answer with; the message names the problem. Workers store
``code`` and ``message`` on a failed job, so the same text reaches the client.
"""

from __future__ import annotations


class VlmqError(Exception):
    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


class InvalidInput(VlmqError):
    """The caller sent something unusable (bad image, bad prompt, bad sampling values)."""

    code = "invalid_input"
    status = 400


class ContainerFormatError(InvalidInput):
    """A container blob that cannot be decoded: wrong version, dtype, shape or size."""

    code = "invalid_container"


class NotFound(VlmqError):
    code = "not_found"
    status = 404


class Forbidden(VlmqError):
    """The object exists but belongs to another tenant (API key)."""

    code = "forbidden"
    status = 403


class TooLarge(InvalidInput):
    code = "too_large"
    status = 413


class Unauthorized(VlmqError):
    code = "unauthorized"
    status = 401


class ModelMismatch(InvalidInput):
    """A container made by another model (or of another hidden size) than the one asked."""

    code = "model_mismatch"
    status = 409


class CheckpointError(VlmqError):
    """A checkpoint folder vlmq cannot load: unknown architecture, missing or unexpected tensors."""

    code = "checkpoint_error"


class StoreUnavailable(VlmqError):
    code = "store_unavailable"
    status = 503


def status_for_code(code: str) -> int:
    """The HTTP status of an error code recorded on a failed job (500 for codes of no caller mistake)."""
    pending = [VlmqError]
    while pending:
        cls = pending.pop()
        if cls.code == code:
            return cls.status
        pending.extend(cls.__subclasses__())
    return 500


class ClientGone(VlmqError):
    """The client closed its connection while its request waited; no one reads the answer (nginx's 499)."""

    code = "client_closed_request"
    status = 499
