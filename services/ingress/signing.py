"""Tenant signatures of ingress records: hex HMAC-SHA256 of the record's value bytes.

A client (or ``agentctl``) signs the exact bytes it produces and sends the signature in
the ``x-agentbus-signature`` header; ingress recomputes it with the tenant's secret.
The secret is used as its UTF-8 bytes.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "x-agentbus-signature"


def sign(secret: str, value: bytes) -> str:
    """The hex HMAC-SHA256 of ``value`` under ``secret``: the ``x-agentbus-signature`` header."""
    return hmac.new(secret.encode(), value, hashlib.sha256).hexdigest()


def signature_matches(secret: str, value: bytes, signature: bytes | str) -> bool:
    """True when ``signature`` is ``sign(secret, value)`` (hex, any case), compared in constant time."""
    given = signature.encode() if isinstance(signature, str) else bytes(signature)
    return hmac.compare_digest(sign(secret, value).encode(), given.strip().lower())
