"""Errors over the control socket: a `LazyociError` travels as its class name, message and
fields (`LazyociError.fields`), and the client raises the same class with the same fields,
so a caller of the service sees the error the service met (an `IntegrityError` still names
the digest it expected), not a generic service failure."""

from __future__ import annotations

from typing import Any

from lazyoci import errors
from lazyoci.errors import LazyociError, ServiceError

__all__ = ["error_from_reply", "error_reply"]


def error_reply(error: LazyociError) -> dict[str, Any]:
    """The daemon's answer to a request that failed with `error`."""
    return {"ok": False, "error": str(error), "type": type(error).__name__, "fields": error.fields()}


def error_from_reply(reply: dict[str, Any]) -> LazyociError:
    """The error a failed reply describes: its own class when errors.py has it, else ServiceError."""
    message = str(reply.get("error", "unknown error"))
    cls = getattr(errors, str(reply.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, LazyociError)):
        return ServiceError(message)
    fields = reply.get("fields") or {}
    if not isinstance(fields, dict) or not all(isinstance(k, str) and (v is None or isinstance(v, (str, int)))
                                               for k, v in fields.items()):
        return ServiceError(f"the lazyoci service sent a malformed error: {message}")
    try:
        return cls(message, **fields)
    except TypeError:   # fields this class does not take: a service of another version
        return cls(message)
