"""The Avro contracts in schemas/ and the single-object codec in shared/avro.py."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import itertools
import json
import random
import re
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.schema import fingerprint as fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form

from shared.avro import (
    MAGIC,
    AvroCodec,
    BadMagicError,
    CodecError,
    DatumValidationError,
    MalformedBodyError,
    SchemaLoadError,
    SchemaRegistry,
    SchemaResolutionError,
    SchemaVersion,
    TruncatedRecordError,
    UnexpectedRecordError,
    UnknownFingerprintError,
    UnknownRecordError,
    crc64_avro,
    default_schema_dir,
    fingerprint64,
    normalise_schema,
    parsing_canonical_form,
)

REGISTRY = SchemaRegistry()
ALL_VERSIONS = list(REGISTRY)
VERSION_IDS = [f"{sv.name}-v{sv.version}" for sv in ALL_VERSIONS]
NOW = dt.datetime(2025, 6, 1, 12, 30, 15, 250_000, tzinfo=dt.UTC)

# Fingerprint (wire identity) and a digest of the whole schema JSON (docs and defaults included) of
# every published schema file. Published files are immutable: editing one must fail here. A new
# version is a new file, pinned by adding a line. Fingerprints are hex in wire order (the 8 bytes after
# C3 01, little-endian), the same string fastavro.schema.fingerprint(..., "CRC-64-AVRO") returns.
PUBLISHED: dict[tuple[str, int], tuple[str, str]] = {
    ("AgentResponse", 1): ("7f113bf85dac19f3", "661793c71411fb55"),
    ("AgentResponseDelta", 1): ("f432f351a3ad997d", "5a596bf93598787a"),
    ("CancelRequested", 1): ("8c7deb4a7b62e40b", "4e1083b0b88ce89b"),
    ("DeadLetter", 1): ("47b82dd957ea999a", "6f9e1f25bfc348c5"),
    ("SessionEvent", 1): ("f6cca37fa43d81de", "456da285df682c3c"),
    ("ToolCall", 1): ("3baebf1b95d752db", "5beeedcaccfe7c27"),
    ("ToolResult", 1): ("fb2b7853eabffbc1", "4106a9ef664eb22a"),
    ("TurnRequested", 1): ("704b3ddb00204bea", "57e44323577ff561"),
    ("TurnRequested", 2): ("156623d0a4b3fafa", "8ae86753ab7cca54"),
    ("UserMessage", 1): ("22c4d9e6338db067", "fe8308262efe3886"),
    ("UserMessage", 2): ("cd5b7ca47bf5b20f", "08803fadc54daa1c"),
}


def schema_digest(schema: dict[str, Any]) -> str:
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def user_message(**overrides: Any) -> dict[str, Any]:
    datum: dict[str, Any] = {
        "tenant_id": "acme",
        "session_id": "s-1",
        "message_id": "m-1",
        "text": "What's the weather in Berlin?",
        "sent_at": NOW,
    }
    datum.update(overrides)
    return datum


# ------------------------------------------------------------------ fingerprints


# share/test/data/schema-tests.txt of apache/avro: canonical form -> CRC-64-AVRO as a signed long.
SPEC_VECTORS = [
    ('"null"', 7195948357588979594),
    ('"boolean"', -6970731678124411036),
    ('"int"', 8247732601305521295),
    ('"long"', -3434872931120570953),
    ('"string"', -8142146995180207161),
    ('{"name":"foo","type":"record","fields":[]}', -4824392279771201922),
]


@pytest.mark.parametrize(("canonical", "signed"), SPEC_VECTORS)
def test_crc64_avro_matches_the_spec_test_vectors(canonical: str, signed: int) -> None:
    assert crc64_avro(canonical.encode()) == signed & 0xFFFF_FFFF_FFFF_FFFF


def test_single_object_header_of_int_is_little_endian() -> None:
    # Avro's Ruby test suite (test_single_object_encoding_header): the fingerprint 0x7275d51a3f395c8f
    # is written least significant byte first.
    assert MAGIC + fingerprint64('"int"') == bytes.fromhex("c3018f5c393f1ad57572")
    # fastavro's "CRC-64-AVRO" hex string is those wire bytes, i.e. the byte-reversed integer.
    assert fastavro_fingerprint('"int"', "CRC-64-AVRO") == "8f5c393f1ad57572"
    assert crc64_avro(b'"int"') == 0x7275D51A3F395C8F


def test_canonical_form_follows_the_spec_rules() -> None:
    schema = {
        "type": "record",
        "name": "Outer",
        "namespace": "ns.one",
        "doc": "stripped",
        "aliases": ["Old"],
        "fields": [
            {"name": "a", "type": {"type": "int"}, "default": 0, "doc": "stripped"},
            {"name": "b", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "c", "type": {"type": "enum", "name": "E", "symbols": ["X", "Y"], "default": "X"}},
            {"name": "d", "type": ["null", "E"]},
            {"name": "e", "type": {"type": "fixed", "name": "other.F", "size": 16}},
            {"name": "f", "type": {"type": "array", "items": "other.F"}},
            {
                "name": "g",
                "type": {"type": "map", "values": {"type": "string", "avro.java.string": "String"}},
            },
        ],
    }
    assert parsing_canonical_form(schema) == (
        '{"name":"ns.one.Outer","type":"record","fields":['
        '{"name":"a","type":"int"},'
        '{"name":"b","type":"long"},'
        '{"name":"c","type":{"name":"ns.one.E","type":"enum","symbols":["X","Y"]}},'
        '{"name":"d","type":["null","ns.one.E"]},'
        '{"name":"e","type":{"name":"other.F","type":"fixed","size":16}},'
        '{"name":"f","type":{"type":"array","items":"other.F"}},'
        '{"name":"g","type":{"type":"map","values":"string"}}]}'
    )
    assert parsing_canonical_form(schema) == to_parsing_canonical_form(schema)


def test_normalise_resolves_namespaces_and_references() -> None:
    schema = {
        "type": "record",
        "name": "R",
        "namespace": "a",
        "aliases": ["Old", "x.Older"],
        "fields": [
            {"name": "inner", "type": {"type": "record", "name": "b.Inner", "fields": [
                {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A"]}},
            ]}},
            {"name": "again", "type": "b.E"},
            {"name": "self", "type": ["null", "R"]},
        ],
    }  # fmt: skip
    out = normalise_schema(schema)
    assert isinstance(out, dict)
    assert out["name"] == "a.R" and "namespace" not in out
    assert out["aliases"] == ["a.Old", "x.Older"]
    assert out["fields"][0]["type"]["fields"][0]["type"]["name"] == "b.E"
    assert out["fields"][1]["type"] == "b.E"
    assert out["fields"][2]["type"] == ["null", "a.R"]
    with pytest.raises(SchemaLoadError, match="unknown type"):
        normalise_schema({"type": "record", "name": "R", "fields": [{"name": "x", "type": "Nope"}]})


@pytest.mark.parametrize("sv", ALL_VERSIONS, ids=VERSION_IDS)
def test_fingerprint_and_canonical_form_agree_with_fastavro(sv: SchemaVersion) -> None:
    canonical = to_parsing_canonical_form(sv.schema)
    assert sv.canonical_form == canonical
    assert sv.fingerprint_hex == fastavro_fingerprint(canonical, "CRC-64-AVRO")
    assert sv.fingerprint == crc64_avro(canonical.encode()).to_bytes(8, "little")


def test_published_schemas_are_pinned() -> None:
    found = {(sv.name, sv.version) for sv in ALL_VERSIONS}
    assert found == set(PUBLISHED), "a schema file was added or removed: pin (or restore) it in PUBLISHED"


@pytest.mark.parametrize("sv", ALL_VERSIONS, ids=VERSION_IDS)
def test_published_schema_is_unchanged(sv: SchemaVersion) -> None:
    fingerprint, digest = PUBLISHED[(sv.name, sv.version)]
    assert sv.fingerprint_hex == fingerprint, (
        f"{sv.path} changed its wire schema: publish a new version instead"
    )
    assert schema_digest(sv.schema) == digest, (
        f"{sv.path} was edited (docs or defaults): published files are immutable"
    )


# ----------------------------------------------------------------- schema lint


def _walk_named(node: Any) -> list[dict[str, Any]]:
    """Every named type defined in a normalised schema."""
    out: list[dict[str, Any]] = []
    if isinstance(node, list):
        for branch in node:
            out += _walk_named(branch)
    elif isinstance(node, dict):
        if node["type"] in ("record", "enum", "fixed"):
            out.append(node)
        for fld in node.get("fields", []):
            out += _walk_named(fld["type"])
        for key in ("items", "values"):
            if key in node:
                out += _walk_named(node[key])
    return out


@pytest.mark.parametrize("sv", ALL_VERSIONS, ids=VERSION_IDS)
def test_schema_conventions(sv: SchemaVersion) -> None:
    assert sv.full_name == f"agentbus.{sv.name}"
    named = _walk_named(normalise_schema(sv.schema))
    for node in named:
        assert node["name"].startswith("agentbus."), node["name"]
        assert node.get("doc"), f"{node['name']} has no doc"
        if node["type"] == "enum":
            assert node.get("default") in node["symbols"], f"enum {node['name']} needs a default symbol"
        for fld in node.get("fields", []):
            where = f"{node['name']}.{fld['name']}"
            assert fld.get("doc"), f"{where} has no doc"
            ftype = fld["type"]
            if fld["name"].endswith("_at") or fld["name"] == "deadline":
                assert ftype == {"type": "long", "logicalType": "timestamp-millis"}, where
            if isinstance(ftype, list) and "null" in ftype:
                assert ftype[0] == "null" and fld.get("default", "missing") is None, (
                    f"{where}: nullable fields are [null, T] with default null"
                )
    fields = [f["name"] for f in sv.schema["fields"]]
    if sv.name != "DeadLetter":  # every record but the DLQ's is session-scoped
        assert fields[:2] == ["tenant_id", "session_id"]
        assert [f["type"] for f in sv.schema["fields"][:2]] == ["string", "string"]


def test_session_event_payload_has_one_branch_per_event_type() -> None:
    sv = REGISTRY.latest("SessionEvent")
    fields = {f["name"]: f["type"] for f in sv.schema["fields"]}
    symbols = [s for s in fields["event_type"]["symbols"] if s != "UNKNOWN"]
    branches = [b["name"] for b in fields["payload"]]
    to_symbol = {"UserMessageAccepted": "USER_MESSAGE_ACCEPTED", "ModelDecided": "MODEL_DECIDED",
                 "ToolCalled": "TOOL_CALLED", "ToolResultReceived": "TOOL_RESULT_RECEIVED",
                 "ResponseSent": "RESPONSE_SENT", "TurnCancelled": "TURN_CANCELLED",
                 "ContextSummarised": "CONTEXT_SUMMARISED"}  # fmt: skip
    assert [to_symbol[b] for b in branches] == symbols


# ------------------------------------------------------------------- round trips


@pytest.mark.parametrize("sv", ALL_VERSIONS, ids=VERSION_IDS)
def test_round_trip_every_version(sv: SchemaVersion, codec: AvroCodec, make_samples: Any) -> None:
    samples, gen = make_samples(sv, count=56)
    latest = REGISTRY.latest(sv.name)
    new_fields = {f["name"] for f in latest.schema["fields"]} - {f["name"] for f in sv.schema["fields"]}
    for datum in samples:
        data = codec.encode(sv.name, datum, version=sv.version)
        assert data[:10] == sv.header
        same = codec.decode(data, reader_version=sv.version)
        assert (same.name, same.writer_version, same.reader_version) == (sv.name, sv.version, sv.version)
        assert same.datum == datum
        current = codec.decode(data)
        assert current.reader_version == latest.version
        assert {k: v for k, v in current.datum.items() if k not in new_fields} == datum
    # every branch of every union was exercised
    for loc, hits in gen.union_hits.items():
        assert hits == set(range(gen.union_sizes[loc])), f"{sv.name} union at {loc} only hit {hits}"


def test_samples_cover_every_session_event_payload(make_samples: Any, codec: AvroCodec) -> None:
    sv = REGISTRY.latest("SessionEvent")
    samples, gen = make_samples(sv, count=14)
    assert gen.union_hits["/payload"] == set(range(7))
    types = set()
    for datum in samples:
        data = codec.encode("SessionEvent", datum)
        types.add(codec.decode(data).datum["event_type"])
        # the writer picked the payload branch the event type names (fastavro chooses by best match)
        raw = fastavro.schemaless_reader(io.BytesIO(data[10:]), sv.parsed, None, return_record_name=True)
        branch = raw["payload"][0].removeprefix("agentbus.")
        assert re.sub(r"(?<!^)(?=[A-Z])", "_", branch).upper() == datum["event_type"]
    assert len(types) == 7 and "UNKNOWN" not in types


@pytest.mark.parametrize(
    ("name", "writer", "reader"),
    [
        (name, a.version, b.version)
        for name in REGISTRY.names()
        for a, b in itertools.permutations(REGISTRY.versions(name), 2)
    ],
)
def test_every_version_reads_every_other(
    name: str, writer: int, reader: int, codec: AvroCodec, make_samples: Any
) -> None:
    samples, _ = make_samples(REGISTRY.get(name, writer), count=20, seed=7)
    reader_fields = {f["name"]: f for f in REGISTRY.get(name, reader).schema["fields"]}
    for datum in samples:
        got = codec.decode(codec.encode(name, datum, version=writer), reader_version=reader).datum
        assert got.keys() == reader_fields.keys()
        for key, value in got.items():
            assert value == (datum[key] if key in datum else reader_fields[key]["default"])


def test_user_message_v1_read_by_v2_gets_defaults(codec: AvroCodec) -> None:
    data = codec.encode("UserMessage", user_message(), version=1)
    decoded = codec.decode(data, expected="UserMessage")
    assert (decoded.writer_version, decoded.reader_version) == (1, 2)
    assert decoded.datum == {**user_message(), "concurrency_policy": None, "metadata": {}}


def test_user_message_v2_read_by_v1_drops_new_fields(codec: AvroCodec) -> None:
    datum = user_message(concurrency_policy="INTERRUPT", metadata={"client": "cli"})
    data = codec.encode("UserMessage", datum)
    assert data[:10] == REGISTRY.get("UserMessage", 2).header
    decoded = codec.decode(data, reader_version=1)
    assert (decoded.writer_version, decoded.reader_version) == (2, 1)
    assert decoded.datum == user_message()


def test_encode_fills_defaults_and_accepts_epoch_millis(codec: AvroCodec) -> None:
    millis = int(NOW.timestamp() * 1000)
    decoded = codec.decode(codec.encode("UserMessage", user_message(sent_at=millis)))
    assert decoded.datum["sent_at"] == NOW
    assert decoded.datum["metadata"] == {}


def test_union_branch_can_be_named_explicitly(codec: AvroCodec) -> None:
    event = {
        "tenant_id": "acme", "session_id": "s-1", "seq": 3, "turn_id": "t-1",
        "event_type": "TURN_CANCELLED", "payload": ("agentbus.TurnCancelled", {"reason": "interrupted"}),
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "occurred_at": NOW,
    }  # fmt: skip
    decoded = codec.decode(codec.encode("SessionEvent", event), expected=["SessionEvent"])
    assert decoded.datum["payload"] == {"reason": "interrupted"}


def test_decode_accepts_any_bytes_like(codec: AvroCodec) -> None:
    data = codec.encode("UserMessage", user_message())
    for buf in (data, bytearray(data), memoryview(data)):
        assert codec.decode(buf).datum == {**user_message(), "concurrency_policy": None, "metadata": {}}


def test_encoding_is_deterministic(codec: AvroCodec) -> None:
    assert codec.encode("UserMessage", user_message()) == codec.encode("UserMessage", dict(user_message()))


# ------------------------------------------------------------- expected records


def test_expected_accepts_names_full_names_and_collections(codec: AvroCodec) -> None:
    data = codec.encode("UserMessage", user_message())
    assert codec.decode(data, "agentbus.UserMessage").name == "UserMessage"
    assert codec.decode(data, {"TurnRequested", "UserMessage"}).name == "UserMessage"
    with pytest.raises(UnexpectedRecordError) as info:
        codec.decode(data, ("TurnRequested", "ToolResult", "CancelRequested"))
    assert info.value.reason_code == "unexpected_record"
    assert info.value.name == "UserMessage"


def test_unknown_record_names_are_programming_errors(codec: AvroCodec) -> None:
    data = codec.encode("UserMessage", user_message())
    with pytest.raises(UnknownRecordError):
        codec.decode(data, "UserMesage")
    with pytest.raises(UnknownRecordError):
        codec.encode("NoSuchRecord", {})
    with pytest.raises(UnknownRecordError):
        codec.encode("UserMessage", user_message(), version=99)
    with pytest.raises(UnknownRecordError):
        codec.decode(data, reader_version=99)
    assert not issubclass(UnknownRecordError, CodecError)


# ---------------------------------------------------------------- garbage in


def test_reason_codes_are_stable() -> None:
    codes = {
        cls.__name__: cls.reason_code
        for cls in (
            BadMagicError, UnknownFingerprintError, TruncatedRecordError, MalformedBodyError,
            UnexpectedRecordError, DatumValidationError, SchemaResolutionError,
        )
    }  # fmt: skip
    assert codes == {
        "BadMagicError": "bad_magic",
        "UnknownFingerprintError": "unknown_fingerprint",
        "TruncatedRecordError": "truncated",
        "MalformedBodyError": "malformed_body",
        "UnexpectedRecordError": "unexpected_record",
        "DatumValidationError": "invalid_datum",
        "SchemaResolutionError": "schema_resolution",
    }
    assert issubclass(CodecError, ValueError)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", TruncatedRecordError),
        (None, TruncatedRecordError),
        (b"\xc3", TruncatedRecordError),
        (b"\xc3\x01\x22\xc4", TruncatedRecordError),
        (b"\x00", BadMagicError),
        (b"{}", BadMagicError),
        (b'{"tenant_id": "acme", "text": "json is not avro"}', BadMagicError),
        (b"\xc3\x02" + bytes(8), BadMagicError),
        (b"\x01\xc3" + bytes(8), BadMagicError),
        (b"\xc3\x01" + bytes(8), UnknownFingerprintError),
        (b"\xc3\x01" + bytes.fromhex("0123456789abcdef") + b"\x02a", UnknownFingerprintError),
    ],
)
def test_garbage_headers_raise_typed_errors(
    data: bytes | None, error: type[CodecError], codec: AvroCodec
) -> None:
    with pytest.raises(error):
        codec.decode(data)


def test_unknown_fingerprint_names_it(codec: AvroCodec) -> None:
    with pytest.raises(UnknownFingerprintError) as info:
        codec.decode(b"\xc3\x01" + bytes.fromhex("0123456789abcdef"))
    assert info.value.fingerprint_hex == "0123456789abcdef"
    assert "0123456789abcdef" in str(info.value)


@pytest.mark.parametrize("sv", ALL_VERSIONS, ids=VERSION_IDS)
def test_truncated_body_raises_truncated(sv: SchemaVersion, codec: AvroCodec, make_samples: Any) -> None:
    samples, _ = make_samples(sv, count=6, seed=11)
    for datum in samples:
        data = codec.encode(sv.name, datum, version=sv.version)
        for cut in range(len(data)):
            with pytest.raises(TruncatedRecordError):
                codec.decode(data[:cut])


def test_trailing_bytes_are_malformed(codec: AvroCodec) -> None:
    data = codec.encode("UserMessage", user_message())
    for tail in (b"\x00", b"garbage", data[10:]):
        with pytest.raises(MalformedBodyError, match="trailing"):
            codec.decode(data + tail)


def test_malformed_bodies_raise_malformed(codec: AvroCodec) -> None:
    header = REGISTRY.get("CancelRequested").header
    tenant, session, message = b"\x02a", b"\x02b", b"\x02c"
    bad_union_index = header + tenant + session + message + b"\x08" + b"\x02r" + b"\x02"
    with pytest.raises(MalformedBodyError):
        codec.decode(bad_union_index)
    bad_utf8 = header + b"\x04\xff\xfe" + session + message + b"\x00" + b"\x02r" + b"\x02"
    with pytest.raises(MalformedBodyError):
        codec.decode(bad_utf8)
    turn = REGISTRY.get("TurnRequested").header + tenant + session + message + b"\x02t" + b"\x02x"
    with pytest.raises(MalformedBodyError):
        codec.decode(turn + b"\x0a" + b"\x02" + b"\x00")  # concurrency_policy enum index 5 of 3
    negative_length = header + b"\x03" + session + message + b"\x00" + b"\x02r" + b"\x02"
    with pytest.raises(MalformedBodyError):
        codec.decode(negative_length)


PLAUSIBLE = b"\x00\x01\x02\x03\x04\x06\x08\x0a\x7f\x80\xffab\xc3"


@pytest.mark.parametrize("sv", ALL_VERSIONS, ids=VERSION_IDS)
def test_random_bodies_never_escape_as_other_exceptions(sv: SchemaVersion, codec: AvroCodec) -> None:
    rng = random.Random(f"random-body-{sv.name}-{sv.version}")
    outcomes: dict[str, int] = {}
    for _ in range(1500):
        size = rng.choice([1, 2, 5, 10, 30, 100, 400])
        if rng.random() < 0.5:
            body = rng.randbytes(size)
        else:  # small varints, short strings, valid-looking union indexes: gets deeper into the record
            body = bytes(rng.choice(PLAUSIBLE) for _ in range(size))
        try:
            codec.decode(sv.header + body)
            outcome = "ok"
        except CodecError as exc:
            outcome = exc.reason_code
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert set(outcomes) <= {"ok", "truncated", "malformed_body"}, outcomes
    assert outcomes.get("truncated", 0) + outcomes.get("malformed_body", 0) > 0


@pytest.mark.parametrize("sv", ALL_VERSIONS, ids=VERSION_IDS)
def test_mutated_records_never_escape_as_other_exceptions(
    sv: SchemaVersion, codec: AvroCodec, make_samples: Any
) -> None:
    rng = random.Random(f"mutate-{sv.name}-{sv.version}")
    samples, _ = make_samples(sv, count=10, seed=3)
    for datum in samples:
        data = bytearray(codec.encode(sv.name, datum, version=sv.version))
        for _ in range(150):
            mutated = bytearray(data)
            for _ in range(rng.randint(1, 4)):  # overwrite body bytes; the header stays valid
                mutated[rng.randrange(10, len(mutated))] = rng.randrange(256)
            if rng.random() < 0.3:
                mutated += rng.randbytes(rng.randint(1, 5))
            try:
                decoded = codec.decode(bytes(mutated))
            except CodecError:
                continue
            assert decoded.name == sv.name


def test_schema_resolution_failure_is_typed(tmp_path: Path) -> None:
    def status(symbols: list[str]) -> dict[str, Any]:
        return {"type": "record", "name": "Job", "namespace": "agentbus", "fields": [
            {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": symbols}},
        ]}  # fmt: skip

    write_schema(tmp_path, "Job", 1, status(["DONE", "FAILED", "LOST"]))
    write_schema(tmp_path, "Job", 2, status(["DONE", "FAILED"]))
    codec = AvroCodec(SchemaRegistry(tmp_path))
    assert codec.decode(codec.encode("Job", {"status": "DONE"}, version=1)).datum == {"status": "DONE"}
    with pytest.raises(SchemaResolutionError) as info:
        codec.decode(codec.encode("Job", {"status": "LOST"}, version=1))
    assert info.value.reason_code == "schema_resolution"


# ------------------------------------------------------------- invalid datums


@pytest.mark.parametrize(
    ("datum", "field"),
    [
        ({k: v for k, v in user_message().items() if k != "text"}, "agentbus.UserMessage.text"),
        (user_message(text=42), "agentbus.UserMessage.text"),
        (user_message(sent_at="yesterday"), "agentbus.UserMessage.sent_at"),
        (user_message(concurrency_policy="SOMETIMES"), "agentbus.UserMessage.concurrency_policy"),
        (user_message(metadata={"k": 1}), "agentbus.UserMessage.metadata"),
        (user_message(tenant_id=None), "agentbus.UserMessage.tenant_id"),
        (user_message(sent_at=2**63), "agentbus.UserMessage.sent_at"),
        (user_message(surprise="extra field"), "surprise"),
    ],
)
def test_invalid_datum_is_rejected_naming_the_field(
    datum: dict[str, Any], field: str, codec: AvroCodec
) -> None:
    with pytest.raises(DatumValidationError) as info:
        codec.encode("UserMessage", datum)
    assert info.value.field == field
    assert info.value.reason_code == "invalid_datum"
    assert "UserMessage" in str(info.value)


def test_other_invalid_datums(codec: AvroCodec) -> None:
    with pytest.raises(DatumValidationError):
        codec.encode("UserMessage", ["not", "a", "mapping"])  # type: ignore[arg-type]
    with pytest.raises(DatumValidationError, match=r"concurrency_policy|metadata"):
        codec.encode("UserMessage", user_message(metadata={"a": "b"}), version=1)  # a v2 field in v1
    result = {
        "tenant_id": "acme", "session_id": "s", "turn_id": "t", "call_id": "c", "step": 2**31,
        "tool": "calc", "idempotency_key": "k", "status": "OK", "attempts": 1,
        "started_at": NOW, "finished_at": NOW,
    }  # fmt: skip
    with pytest.raises(DatumValidationError) as info:
        codec.encode("ToolResult", result)
    assert info.value.field == "agentbus.ToolResult.step"
    result["step"] = 1
    result["artifact"] = {"artifact_id": "a", "content_type": "text/plain", "size_bytes": 3}
    with pytest.raises(DatumValidationError):
        codec.encode("ToolResult", result)


# ------------------------------------------------------------------- registry


def write_schema(root: Path, folder: str, version: int, schema: dict[str, Any] | str) -> Path:
    path = root / folder / f"v{version}.avsc"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(schema if isinstance(schema, str) else json.dumps(schema))
    return path


def simple(name: str = "Thing", doc: str = "a thing", fields: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "record", "name": name, "namespace": "agentbus", "doc": doc,
        "fields": [{"name": f, "type": "string"} for f in (fields or ["a"])],
    }  # fmt: skip


def test_registry_indexes_versions(registry: SchemaRegistry) -> None:
    assert "UserMessage" in registry.names() and "SessionEvent" in registry.names()
    assert [sv.version for sv in registry.versions("UserMessage")] == [1, 2]
    assert registry.latest("agentbus.UserMessage").version == 2
    assert registry.get("UserMessage", 1).fingerprint_hex == PUBLISHED[("UserMessage", 1)][0]
    for sv in registry:
        assert registry.by_fingerprint(sv.fingerprint) is sv
    assert registry.by_fingerprint(bytes(8)) is None
    assert len(registry) == len(PUBLISHED)


def test_registry_rejects_duplicate_fingerprints(tmp_path: Path) -> None:
    write_schema(tmp_path, "Thing", 1, simple())
    write_schema(tmp_path, "Thing", 2, simple(doc="only the doc changed"))
    with pytest.raises(SchemaLoadError, match="same fingerprint"):
        SchemaRegistry(tmp_path)


def test_registry_rejects_name_mismatch(tmp_path: Path) -> None:
    write_schema(tmp_path, "Thing", 1, simple(name="Other"))
    with pytest.raises(SchemaLoadError, match="folder"):
        SchemaRegistry(tmp_path)


@pytest.mark.parametrize(
    ("filename", "content", "match"),
    [
        ("latest.avsc", simple(), "v<N>.avsc"),
        ("v0.avsc", simple(), "v<N>.avsc"),
        ("v1.avsc", "{not json", "cannot read"),
        ("v1.avsc", '"string"', "record"),
        (
            "v1.avsc",
            {"type": "record", "name": "Thing", "fields": [{"name": "x", "type": "nope"}]},
            "unknown type",
        ),
    ],
)
def test_registry_rejects_bad_files(tmp_path: Path, filename: str, content: Any, match: str) -> None:
    path = tmp_path / "Thing" / filename
    path.parent.mkdir()
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(SchemaLoadError, match=match):
        SchemaRegistry(tmp_path)


def test_registry_rejects_missing_or_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(SchemaLoadError):
        SchemaRegistry(tmp_path / "missing")
    with pytest.raises(SchemaLoadError):
        SchemaRegistry(tmp_path)


def test_schema_dir_defaults_to_repo_and_env_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTBUS_SCHEMA_DIR", raising=False)
    assert default_schema_dir() == Path(__file__).resolve().parents[2] / "schemas"
    write_schema(tmp_path, "Thing", 1, simple())
    monkeypatch.setenv("AGENTBUS_SCHEMA_DIR", str(tmp_path))
    assert default_schema_dir() == tmp_path
    assert SchemaRegistry().names() == ["Thing"]


def test_a_reader_without_the_writer_version_rejects_it(tmp_path: Path) -> None:
    write_schema(tmp_path, "Thing", 1, simple())
    old = AvroCodec(SchemaRegistry(tmp_path))
    write_schema(tmp_path, "Thing", 2, simple(fields=["a", "b"]))
    new = AvroCodec(SchemaRegistry(tmp_path))
    data = new.encode("Thing", {"a": "x", "b": "y"})
    with pytest.raises(UnknownFingerprintError):
        old.decode(data)
    assert new.decode(old.encode("Thing", {"a": "x"}), reader_version=1).datum == {"a": "x"}
