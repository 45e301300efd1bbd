"""Errors that cross the wire, and nothing else.

Every failure a caller can see maps to one of these, each with the stable
HTTP-like code of the public contract. The endpoint wrapper turns them into
`Nats-Service-Error` / `Nats-Service-Error-Code` headers plus the JSON body
`{"error": {"code": ..., "message": ...}}`; `shared.service.Runtime.request`
turns such a reply back into the same exception, so an error raised three
tiers down reaches the caller with its code intact.

    TierError
    ├── BadRequest        400  malformed JSON, wrong types, bad ids, bad values
    ├── NotFound          404  no such thing (an admin lookup of an entry id)
    ├── PayloadTooLarge   413  text over the configured size limit
    ├── Unavailable       503  no tier (or dependency) able to answer right now
    ├── UpstreamTimeout   504  a tier below did not answer in time
    └── StorageFull       507  the durable log is full: nothing stored until an operator acts
"""

from __future__ import annotations


class TierError(Exception):
    """Base of every error with a public code."""

    code: int = 500

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code}, {self.message!r})"


class BadRequest(TierError):
    code = 400


class NotFound(TierError):
    code = 404


class PayloadTooLarge(TierError):
    code = 413


class Unavailable(TierError):
    code = 503


class UpstreamTimeout(TierError):
    code = 504


class StorageFull(TierError):
    """Unlike a 503, waiting does not help unless retention frees room: an operator must."""

    code = 507


def from_code(code: int, message: str) -> TierError:
    """Rebuild the exception a remote tier raised, keeping its code."""
    for cls in (BadRequest, NotFound, PayloadTooLarge, Unavailable, UpstreamTimeout, StorageFull):
        if cls.code == code:
            return cls(message)
    return TierError(message, code)
