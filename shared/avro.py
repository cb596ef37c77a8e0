"""Avro records on the wire: schema registry and single-object codec.

Every value on an agentbus topic is Avro *single-object encoding*
(https://avro.apache.org/docs/current/specification/#single-object-encoding)::

    C3 01 | CRC-64-AVRO fingerprint of the writer schema (8 bytes, little-endian) | binary body

The fingerprint is taken over the writer schema's Parsing Canonical Form, so a
reader that has every published version of a record in ``schemas/`` can
resolve any writer version without a registry server. ``schemas/`` holds one
folder per record and one file per published version:
``schemas/<RecordName>/v<N>.avsc``. A published file is never edited.

Decoding resolves the writer version to the newest version of the record the
reader knows (Avro schema resolution: defaults filled in, unknown fields
dropped). Every way a value can be bad raises a subclass of
:class:`CodecError` whose ``reason_code`` is the dead-letter reason.

Timestamps (``timestamp-millis``) decode to timezone-aware UTC
:class:`datetime.datetime`; encode accepts an aware datetime or epoch millis.
A union of records may be written with fastavro's tuple notation
``("agentbus.ToolCalled", {...})`` to pick the branch explicitly.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias, cast

import fastavro
import fastavro.read
import fastavro.validation
from fastavro.schema import parse_schema

__all__ = [
    "MAGIC",
    "AvroCodec",
    "BadMagicError",
    "CodecError",
    "DatumValidationError",
    "Decoded",
    "MalformedBodyError",
    "SchemaLoadError",
    "SchemaRegistry",
    "SchemaResolutionError",
    "SchemaVersion",
    "TruncatedRecordError",
    "UnexpectedRecordError",
    "UnknownFingerprintError",
    "UnknownRecordError",
    "crc64_avro",
    "default_codec",
    "default_registry",
    "default_schema_dir",
    "fingerprint64",
    "normalise_schema",
    "parsing_canonical_form",
]

JsonSchema: TypeAlias = str | list[Any] | dict[str, Any]
"""A schema as JSON: a type name, a union (list) or a complex type (dict)."""

MAGIC = b"\xc3\x01"
FINGERPRINT_SIZE = 8
HEADER_SIZE = len(MAGIC) + FINGERPRINT_SIZE

SCHEMA_DIR_ENV = "AGENTBUS_SCHEMA_DIR"

PRIMITIVE_TYPES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
NAMED_TYPES = frozenset({"record", "error", "enum", "fixed"})

_VERSION_FILE = re.compile(r"^v([1-9][0-9]*)\.avsc$")


# --------------------------------------------------------------------------- errors


class CodecError(ValueError):
    """A value could not be encoded or decoded. ``reason_code`` is stable: it is the DLQ reason."""

    reason_code = "codec_error"


class BadMagicError(CodecError):
    """The value does not start with the single-object marker ``C3 01``."""

    reason_code = "bad_magic"


class UnknownFingerprintError(CodecError):
    """The writer schema's fingerprint is not one of the published versions this reader knows."""

    reason_code = "unknown_fingerprint"

    def __init__(self, fingerprint: bytes) -> None:
        self.fingerprint = fingerprint
        self.fingerprint_hex = fingerprint.hex()
        super().__init__(f"unknown writer schema fingerprint {self.fingerprint_hex}")


class TruncatedRecordError(CodecError):
    """The value is shorter than the header, or its body ends before the record does."""

    reason_code = "truncated"


class MalformedBodyError(CodecError):
    """The body is not a valid encoding of the writer schema (or has trailing bytes)."""

    reason_code = "malformed_body"


class UnexpectedRecordError(CodecError):
    """The value is a valid record, but not one of the records the caller accepts."""

    reason_code = "unexpected_record"

    def __init__(self, name: str, expected: Collection[str]) -> None:
        self.name = name
        self.expected = tuple(sorted(expected))
        super().__init__(f"record {name} is not one of {', '.join(self.expected)}")


class DatumValidationError(CodecError):
    """A datum to encode does not match its schema. ``field`` names the offending field when known."""

    reason_code = "invalid_datum"

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        super().__init__(message)


class SchemaResolutionError(CodecError):
    """The writer's data cannot be read with the reader schema (e.g. an enum symbol the reader lacks)."""

    reason_code = "schema_resolution"


class UnknownRecordError(LookupError):
    """A record name or version that is not in the registry: a programming error, not bad data."""


class SchemaLoadError(Exception):
    """The schema directory is inconsistent (bad file, duplicate fingerprint, name mismatch)."""


# ----------------------------------------------------------- canonical form & fingerprint

_CRC64_EMPTY = 0xC15D213AA4D7A795


def _crc64_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_CRC64_EMPTY & -(fp & 1))
        table.append(fp)
    return tuple(table)


_CRC64_TABLE = _crc64_table()


def crc64_avro(data: bytes) -> int:
    """The CRC-64-AVRO (Rabin) fingerprint of ``data`` as an unsigned 64-bit integer (Avro spec algorithm)."""
    fp = _CRC64_EMPTY
    table = _CRC64_TABLE
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def fingerprint64(canonical_form: str) -> bytes:
    """The 8 fingerprint bytes on the wire: CRC-64-AVRO of the canonical form, little-endian."""
    return crc64_avro(canonical_form.encode("utf-8")).to_bytes(FINGERPRINT_SIZE, "little")


def _qualify(name: str, namespace: str) -> str:
    if "." in name or not namespace:
        return name
    return f"{namespace}.{name}"


def _namespace_of(fullname: str) -> str:
    return fullname.rpartition(".")[0]


def normalise_schema(schema: JsonSchema) -> JsonSchema:
    """Return a copy of ``schema`` with every name made a full name and namespaces resolved.

    Named types get their full name in ``name`` and no ``namespace``; their
    ``aliases`` are qualified too; references to named types become full-name
    strings; a primitive written as ``{"type": "int"}`` becomes ``"int"`` unless
    it carries other attributes (e.g. ``logicalType``), which are kept.

    Raises:
        SchemaLoadError: the schema is not valid JSON Avro (unknown type, missing name, ...).
    """
    defined: set[str] = set()

    def walk(node: JsonSchema, namespace: str) -> JsonSchema:
        if isinstance(node, str):
            if node in PRIMITIVE_TYPES:
                return node
            for candidate in (_qualify(node, namespace), node):
                if candidate in defined:
                    return candidate
            raise SchemaLoadError(f"unknown type {node!r}")
        if isinstance(node, list):
            return [walk(branch, namespace) for branch in node]
        if not isinstance(node, dict) or "type" not in node:
            raise SchemaLoadError(f"not a schema: {node!r}")
        kind = node["type"]
        if isinstance(kind, list | dict):
            # {"type": {...}} or {"type": [...]}: a wrapped schema.
            return walk(cast(JsonSchema, kind), namespace)
        if not isinstance(kind, str):
            raise SchemaLoadError(f"not a schema type: {kind!r}")
        out = {k: v for k, v in node.items() if k != "namespace"}
        if kind in PRIMITIVE_TYPES:
            return kind if set(node) == {"type"} else out
        if kind == "array":
            out["items"] = walk(node["items"], namespace)
            return out
        if kind == "map":
            out["values"] = walk(node["values"], namespace)
            return out
        if kind not in NAMED_TYPES:
            if set(node) == {"type"}:
                return walk(kind, namespace)  # {"type": "agentbus.Foo"}: a reference
            raise SchemaLoadError(f"unknown schema type {kind!r}")
        name = node.get("name")
        if not isinstance(name, str) or not name:
            raise SchemaLoadError(f"{kind} without a name: {node!r}")
        own_namespace = node.get("namespace", namespace) if "." not in name else _namespace_of(name)
        fullname = _qualify(name, own_namespace or "")
        if fullname in defined or fullname in PRIMITIVE_TYPES:
            raise SchemaLoadError(f"type {fullname} defined twice")
        defined.add(fullname)
        out["name"] = fullname
        inner_namespace = _namespace_of(fullname)
        if "aliases" in node:
            out["aliases"] = [_qualify(alias, inner_namespace) for alias in node["aliases"]]
        if kind in ("record", "error"):
            fields = []
            for fld in node.get("fields", []):
                if not isinstance(fld, dict) or "name" not in fld or "type" not in fld:
                    raise SchemaLoadError(f"bad field in {fullname}: {fld!r}")
                new_field = dict(fld)
                new_field["type"] = walk(fld["type"], inner_namespace)
                fields.append(new_field)
            out["fields"] = fields
        return out

    return walk(schema, "")


def parsing_canonical_form(schema: JsonSchema) -> str:
    """The Avro Parsing Canonical Form of ``schema`` (spec rules PRIMITIVES, FULLNAMES, STRIP, ORDER, ...).

    Raises:
        SchemaLoadError: the schema is not valid JSON Avro.
    """
    seen: set[str] = set()

    def dump(value: object) -> str:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))

    def pcf(node: JsonSchema) -> str:
        if isinstance(node, str):
            return dump(node)
        if isinstance(node, list):
            return "[" + ",".join(pcf(branch) for branch in node) + "]"
        kind = node["type"]
        if kind in PRIMITIVE_TYPES:
            return dump(kind)
        if kind == "array":
            return '{"type":"array","items":' + pcf(node["items"]) + "}"
        if kind == "map":
            return '{"type":"map","values":' + pcf(node["values"]) + "}"
        name = node["name"]
        if name in seen:
            return dump(name)
        seen.add(name)
        head = '{"name":' + dump(name)
        if kind in ("record", "error"):
            fields = ",".join(
                '{"name":' + dump(fld["name"]) + ',"type":' + pcf(fld["type"]) + "}" for fld in node["fields"]
            )
            return head + ',"type":"record","fields":[' + fields + "]}"
        if kind == "enum":
            return head + ',"type":"enum","symbols":' + dump(list(node["symbols"])) + "}"
        # fixed; size as a plain integer (INTEGERS rule)
        return head + ',"type":"fixed","size":' + str(int(node["size"])) + "}"

    return pcf(normalise_schema(schema))


# ------------------------------------------------------------------------ registry


def default_schema_dir() -> Path:
    """``$AGENTBUS_SCHEMA_DIR`` if set, else the repository's ``schemas/``."""
    env = os.environ.get(SCHEMA_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "schemas"


@dataclass(frozen=True, slots=True)
class SchemaVersion:
    """One published version of a record schema."""

    name: str
    """Record name as its folder is named, e.g. ``UserMessage``."""
    full_name: str
    """Namespaced name, e.g. ``agentbus.UserMessage``."""
    version: int
    path: Path
    schema: dict[str, Any] = field(repr=False)
    """The schema JSON exactly as loaded from the file."""
    parsed: dict[str, Any] = field(repr=False)
    """fastavro's parsed form (what the reader and writer take)."""
    canonical_form: str = field(repr=False)
    fingerprint: bytes
    """The 8 fingerprint bytes as written on the wire (little-endian CRC-64-AVRO)."""

    @property
    def fingerprint_hex(self) -> str:
        return self.fingerprint.hex()

    @property
    def header(self) -> bytes:
        """The 10-byte single-object header of values written with this version."""
        return MAGIC + self.fingerprint


class SchemaRegistry:
    """Every published version of every record in a schema directory, indexed by fingerprint.

    Raises (from the constructor):
        SchemaLoadError: a file is unreadable or invalid, a file name is not ``v<N>.avsc``, a
            schema's record name differs from its folder, or two files share a fingerprint.
    """

    def __init__(self, schema_dir: Path | str | None = None) -> None:
        self.schema_dir = Path(schema_dir) if schema_dir is not None else default_schema_dir()
        self._by_fingerprint: dict[bytes, SchemaVersion] = {}
        self._versions: dict[str, dict[int, SchemaVersion]] = {}
        self._aliases: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        if not self.schema_dir.is_dir():
            raise SchemaLoadError(f"schema directory {self.schema_dir} does not exist")
        for folder in sorted(p for p in self.schema_dir.iterdir() if p.is_dir()):
            for path in sorted(folder.glob("*.avsc")):
                self._add(self._load_file(folder.name, path))
        if not self._versions:
            raise SchemaLoadError(f"no schemas in {self.schema_dir}")

    @staticmethod
    def _load_file(record_name: str, path: Path) -> SchemaVersion:
        match = _VERSION_FILE.match(path.name)
        if match is None:
            raise SchemaLoadError(f"{path}: schema files must be named v<N>.avsc")
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SchemaLoadError(f"{path}: cannot read schema: {exc}") from exc
        if not isinstance(schema, dict) or schema.get("type") != "record":
            raise SchemaLoadError(f"{path}: top-level schema must be a record")
        normalised = normalise_schema(schema)
        assert isinstance(normalised, dict)
        full_name = str(normalised["name"])
        if full_name.rpartition(".")[2] != record_name:
            raise SchemaLoadError(f"{path}: schema names record {full_name}, folder says {record_name}")
        try:
            parsed = parse_schema(schema)
        except Exception as exc:  # fastavro raises several types for invalid schemas
            raise SchemaLoadError(f"{path}: invalid schema: {exc}") from exc
        canonical = parsing_canonical_form(schema)
        return SchemaVersion(
            name=record_name,
            full_name=full_name,
            version=int(match.group(1)),
            path=path,
            schema=schema,
            parsed=cast(dict[str, Any], parsed),
            canonical_form=canonical,
            fingerprint=fingerprint64(canonical),
        )

    def _add(self, sv: SchemaVersion) -> None:
        clash = self._by_fingerprint.get(sv.fingerprint)
        if clash is not None:
            raise SchemaLoadError(
                f"{sv.path} has the same fingerprint {sv.fingerprint_hex} as {clash.path}: "
                "a new version must change the schema"
            )
        versions = self._versions.setdefault(sv.name, {})
        if sv.version in versions:  # unreachable with the v<N> name pattern; kept as a guard
            raise SchemaLoadError(f"{sv.path}: version {sv.version} of {sv.name} defined twice")
        if versions and next(iter(versions.values())).full_name != sv.full_name:
            raise SchemaLoadError(f"{sv.path}: namespace differs from the other versions of {sv.name}")
        versions[sv.version] = sv
        self._by_fingerprint[sv.fingerprint] = sv
        self._aliases[sv.name] = sv.name
        self._aliases[sv.full_name] = sv.name

    # -- lookups

    def names(self) -> list[str]:
        """Record names (folder names), sorted."""
        return sorted(self._versions)

    def __iter__(self) -> Iterator[SchemaVersion]:
        """Every version of every record, by name then version."""
        for name in self.names():
            yield from self.versions(name)

    def __len__(self) -> int:
        return len(self._by_fingerprint)

    def resolve_name(self, name: str) -> str:
        """The folder name for ``name`` given as ``UserMessage`` or ``agentbus.UserMessage``.

        Raises:
            UnknownRecordError: no such record.
        """
        try:
            return self._aliases[name]
        except KeyError:
            raise UnknownRecordError(f"unknown record {name!r}") from None

    def versions(self, name: str) -> list[SchemaVersion]:
        """All versions of a record, oldest first.

        Raises:
            UnknownRecordError: no such record.
        """
        versions = self._versions[self.resolve_name(name)]
        return [versions[v] for v in sorted(versions)]

    def latest(self, name: str) -> SchemaVersion:
        """The newest version of a record.

        Raises:
            UnknownRecordError: no such record.
        """
        versions = self._versions[self.resolve_name(name)]
        return versions[max(versions)]

    def get(self, name: str, version: int | None = None) -> SchemaVersion:
        """A given version of a record (the newest if ``version`` is None).

        Raises:
            UnknownRecordError: no such record or version.
        """
        if version is None:
            return self.latest(name)
        record = self.resolve_name(name)
        try:
            return self._versions[record][version]
        except KeyError:
            raise UnknownRecordError(f"{record} has no version {version}") from None

    def by_fingerprint(self, fingerprint: bytes) -> SchemaVersion | None:
        """The version whose wire fingerprint is ``fingerprint``, if known."""
        return self._by_fingerprint.get(bytes(fingerprint))


# --------------------------------------------------------------------------- codec


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded value: the record, the versions it was written and read with, and the datum."""

    name: str
    writer_version: int
    reader_version: int
    datum: dict[str, Any]


Buffer: TypeAlias = bytes | bytearray | memoryview


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class AvroCodec:
    """Encode and decode single-object Avro values against a :class:`SchemaRegistry`."""

    def __init__(self, registry: SchemaRegistry | None = None) -> None:
        self.registry = registry if registry is not None else default_registry()

    # -- encode

    def encode(self, record_name: str, datum: Mapping[str, Any], version: int | None = None) -> bytes:
        """Validate ``datum`` and encode it with ``version`` of the record (default: the newest).

        Fields with a default may be left out; fields not in the schema are an error.

        Raises:
            UnknownRecordError: no such record or version.
            DatumValidationError: the datum does not match the schema.
        """
        sv = self.registry.get(record_name, version)
        self._validate(sv, datum)
        buf = io.BytesIO()
        buf.write(sv.header)
        try:
            fastavro.schemaless_writer(buf, sv.parsed, datum, strict_allow_default=True)
        except Exception as exc:  # validation passed but the writer still refused: report it as invalid
            raise DatumValidationError(
                f"invalid {sv.name} v{sv.version} datum: {exc}", field=_field_from_writer_error(str(exc))
            ) from exc
        return buf.getvalue()

    @staticmethod
    def _validate(sv: SchemaVersion, datum: Mapping[str, Any]) -> None:
        if not isinstance(datum, Mapping):
            raise DatumValidationError(f"{sv.name} datum must be a mapping, not {type(datum).__name__}")
        try:
            # The raising mode builds an exception per rejected union branch: ~6x slower, so it only
            # runs to explain a datum already found invalid.
            if fastavro.validation.validate(datum, sv.parsed, raise_errors=False):
                return
            fastavro.validation.validate(datum, sv.parsed, raise_errors=True)
        except fastavro.validation.ValidationError as exc:
            problems = []
            first_field: str | None = None
            for err in exc.errors:
                fld = getattr(err, "field", "") or None
                first_field = first_field or fld
                expected = err.schema if isinstance(err.schema, str) else _short(err.schema, 60)
                got = f"{_short(err.datum)} ({type(err.datum).__name__})"
                problems.append(f"{fld or 'record'} is {got}, expected {expected}")
            raise DatumValidationError(
                f"invalid {sv.name} v{sv.version} datum: " + "; ".join(problems), field=first_field
            ) from None
        except Exception as exc:  # fastavro may raise TypeError etc. on odd datums
            raise DatumValidationError(f"invalid {sv.name} v{sv.version} datum: {exc}") from exc
        raise DatumValidationError(f"invalid {sv.name} v{sv.version} datum")

    # -- decode

    def peek(self, data: Buffer | None) -> SchemaVersion:
        """The writer schema version of a value, from its header alone.

        Raises:
            TruncatedRecordError, BadMagicError, UnknownFingerprintError.
        """
        if not data:
            raise TruncatedRecordError("empty value")
        head = bytes(data[:HEADER_SIZE])
        if head[:2] != MAGIC[: len(head[:2])]:
            raise BadMagicError(f"value starts with {head[:2].hex()}, not the single-object marker c301")
        if len(head) < HEADER_SIZE:
            raise TruncatedRecordError(
                f"value is {len(head)} bytes, shorter than the {HEADER_SIZE}-byte header"
            )
        fingerprint = head[len(MAGIC) :]
        sv = self.registry.by_fingerprint(fingerprint)
        if sv is None:
            raise UnknownFingerprintError(fingerprint)
        return sv

    def decode(
        self,
        data: Buffer | None,
        expected: str | Collection[str] | None = None,
        *,
        reader_version: int | None = None,
    ) -> Decoded:
        """Decode a single-object value, resolving its writer version to the reader version.

        ``expected`` restricts the records accepted (names or full names); it is checked from the
        header before the body is read. The reader is the newest version of the record unless
        ``reader_version`` says otherwise.

        Raises:
            TruncatedRecordError: shorter than the header, or the body ends early.
            BadMagicError: not single-object encoding.
            UnknownFingerprintError: a writer schema this reader does not know.
            UnexpectedRecordError: a record not in ``expected``.
            SchemaResolutionError: the writer's data cannot be read with the reader schema.
            MalformedBodyError: the body is not a valid encoding, or has trailing bytes.
            UnknownRecordError: ``expected`` or ``reader_version`` names something not in the registry
                (a programming error, deliberately not a CodecError).
        """
        writer = self.peek(data)
        assert data is not None  # peek rejects None
        if expected is not None:
            accepted = self._accepted(expected)
            if writer.name not in accepted:
                raise UnexpectedRecordError(writer.name, accepted)
        if reader_version is None or reader_version == writer.version:
            reader = self.registry.latest(writer.name) if reader_version is None else writer
        else:
            reader = self.registry.get(writer.name, reader_version)
        body = memoryview(data)[HEADER_SIZE:]
        buf = io.BytesIO(body)
        try:
            datum = fastavro.schemaless_reader(
                buf, writer.parsed, reader.parsed if reader is not writer else None
            )
        except fastavro.read.SchemaResolutionError as exc:
            raise SchemaResolutionError(
                f"cannot read {writer.name} v{writer.version} as v{reader.version}: {exc}"
            ) from exc
        except Exception as exc:  # what garbage makes fastavro raise: EOFError, IndexError, UnicodeError...
            what = f"{type(exc).__name__}: {_short(str(exc))}"
            # fastavro reports running out of bytes as EOFError or IndexError (a varint cut short), and
            # a negative length as EOFError too: only a read past the end means the body was cut.
            if _reads_past_end(body, writer, reader):
                raise TruncatedRecordError(
                    f"{writer.name} v{writer.version} body ends early: {what}"
                ) from exc
            raise MalformedBodyError(f"{writer.name} v{writer.version} body is malformed: {what}") from exc
        if buf.tell() != len(body):
            raise MalformedBodyError(
                f"{writer.name} v{writer.version} body has {len(body) - buf.tell()} trailing bytes"
            )
        if not isinstance(datum, dict):
            raise MalformedBodyError(f"{writer.name} decoded to {type(datum).__name__}, not a record")
        return Decoded(
            name=writer.name, writer_version=writer.version, reader_version=reader.version, datum=datum
        )

    def _accepted(self, expected: str | Collection[str]) -> frozenset[str]:
        names = (expected,) if isinstance(expected, str) else expected
        return frozenset(self.registry.resolve_name(n) for n in names)


class _ShortReadTracker(io.BytesIO):
    """A BytesIO that notes whether a reader ever asked for more bytes than were left."""

    short_read = False

    def read(self, size: int | None = -1, /) -> bytes:
        out = super().read(size)
        if size is not None and size >= 0 and len(out) < size:
            self.short_read = True
        return out


def _reads_past_end(body: memoryview, writer: SchemaVersion, reader: SchemaVersion) -> bool:
    """Replay a failed decode on an instrumented buffer (slow path only) to tell truncation from garbage."""
    tracker = _ShortReadTracker(body)
    try:
        fastavro.schemaless_reader(tracker, writer.parsed, reader.parsed if reader is not writer else None)
    except Exception:  # noqa: BLE001 - the failure being classified; only the short-read flag matters
        return tracker.short_read
    return tracker.short_read


def _field_from_writer_error(message: str) -> str | None:
    match = re.search(r"Field (\S+) is specified|more fields than the schema specifies: (.+)$", message)
    if match is None:
        return None
    return match.group(1) or match.group(2)


@functools.cache
def default_registry() -> SchemaRegistry:
    """The process-wide registry of :func:`default_schema_dir` (loaded once)."""
    return SchemaRegistry()


@functools.cache
def default_codec() -> AvroCodec:
    """The process-wide codec over :func:`default_registry`."""
    return AvroCodec(default_registry())
