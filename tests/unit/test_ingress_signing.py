"""Tenant signatures: hex HMAC-SHA256 of the value bytes, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac

from services.ingress.signing import sign, signature_matches


def test_sign_is_hex_hmac_sha256_of_the_value() -> None:
    value = b"\xc3\x01some avro bytes"
    assert sign("s3cret", value) == hmac.new(b"s3cret", value, hashlib.sha256).hexdigest()
    assert len(sign("s3cret", value)) == 64


def test_signature_matches_only_the_same_secret_and_bytes() -> None:
    value = b"payload"
    signature = sign("s3cret", value)
    assert signature_matches("s3cret", value, signature)
    assert signature_matches("s3cret", value, signature.encode())  # as a Kafka header value
    assert signature_matches("s3cret", value, signature.upper())
    assert not signature_matches("other", value, signature)
    assert not signature_matches("s3cret", value + b"x", signature)
    assert not signature_matches("s3cret", value, signature[:-1])
    assert not signature_matches("s3cret", value, b"\xff\xfe not hex")
    assert not signature_matches("s3cret", value, "")
