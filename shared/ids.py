"""User ids on NATS subjects and Redis keys.

Ids are 1-128 characters of letters, digits and `._:@+-` (phone numbers and
emails are common). A NATS subject token cannot hold `.`, so it is written as
`%2E`; `%` is not allowed in ids, which keeps the encoding reversible.
"""

from __future__ import annotations

import re

ID_PATTERN = r"^[A-Za-z0-9._:@+\-]{1,128}$"
_ID_RE = re.compile(ID_PATTERN)


def is_valid_id(value: str) -> bool:
    return bool(_ID_RE.match(value))


def to_token(user_id: str) -> str:
    """The subject token for a user id (`a.b@x.io` -> `a%2Eb@x%2Eio`)."""
    return user_id.replace(".", "%2E")


def from_token(token: str) -> str:
    return token.replace("%2E", ".")
