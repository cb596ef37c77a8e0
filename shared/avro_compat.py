"""Avro schema compatibility: can a reader schema read what a writer schema wrote?

Implements the resolution rules of the Avro specification
(https://avro.apache.org/docs/current/specification/#schema-resolution) as a
static check, in the manner of Java's ``SchemaCompatibility``: instead of
failing on the first problem it lists every incompatibility with its location.

* ``check_can_read(reader, writer)`` — empty list means every value written
  with ``writer`` can be read with ``reader``.
* ``check_full(new, old)`` — backward (``new`` reads ``old``) and forward
  (``old`` reads ``new``): what a published record version must satisfy
  against all earlier versions.

Schemas are the JSON (dicts, lists, strings) as loaded from ``.avsc`` files;
namespaces are resolved first, and named types are matched by unqualified
name (or the reader's aliases), as the specification says.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from shared.avro import PRIMITIVE_TYPES, JsonSchema, SchemaLoadError, normalise_schema

__all__ = [
    "CompatibilityError",
    "Incompatibility",
    "IncompatibilityKind",
    "SchemaLoadError",
    "assert_full",
    "check_can_read",
    "check_full",
]


class IncompatibilityKind(StrEnum):
    """Why a reader cannot read a writer (names as in Java's ``SchemaIncompatibilityType``)."""

    NAME_MISMATCH = "NAME_MISMATCH"
    FIXED_SIZE_MISMATCH = "FIXED_SIZE_MISMATCH"
    MISSING_ENUM_SYMBOLS = "MISSING_ENUM_SYMBOLS"
    READER_FIELD_MISSING_DEFAULT_VALUE = "READER_FIELD_MISSING_DEFAULT_VALUE"
    TYPE_MISMATCH = "TYPE_MISMATCH"
    MISSING_UNION_BRANCH = "MISSING_UNION_BRANCH"


@dataclass(frozen=True, slots=True)
class Incompatibility:
    """One reason the reader cannot read the writer.

    ``location`` is a path into the reader schema, e.g. ``/fields/payload/type/2/fields/status/type``;
    ``direction`` is set by :func:`check_full` to ``backward`` or ``forward``.
    """

    kind: IncompatibilityKind
    location: str
    message: str
    direction: str = ""

    def __str__(self) -> str:
        prefix = f"{self.direction}: " if self.direction else ""
        return f"{prefix}{self.kind} at {self.location or '/'}: {self.message}"


class CompatibilityError(ValueError):
    """Raised by :func:`assert_full`; ``incompatibilities`` lists every problem."""

    def __init__(self, incompatibilities: list[Incompatibility]) -> None:
        self.incompatibilities = incompatibilities
        super().__init__("; ".join(str(i) for i in incompatibilities))


# Writer type -> reader types that can read it (besides the same type). Avro spec "Schema Resolution".
_PROMOTIONS: dict[str, frozenset[str]] = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}

_NAMED = frozenset({"record", "error", "enum", "fixed"})


class _Schema:
    """A normalised schema with its named types indexed, so references can be followed."""

    def __init__(self, schema: JsonSchema) -> None:
        self.root = normalise_schema(schema)
        self.named: dict[str, dict[str, Any]] = {}
        self._index(self.root)

    def _index(self, node: JsonSchema) -> None:
        if isinstance(node, list):
            for branch in node:
                self._index(branch)
        elif isinstance(node, dict):
            kind = node["type"]
            if kind in _NAMED:
                self.named[node["name"]] = node
                for fld in node.get("fields", []):
                    self._index(fld["type"])
            elif kind == "array":
                self._index(node["items"])
            elif kind == "map":
                self._index(node["values"])

    def deref(self, node: JsonSchema) -> JsonSchema:
        """Follow a reference to a named type to its definition."""
        if isinstance(node, str) and node not in PRIMITIVE_TYPES:
            return self.named[node]
        return node


def _kind(node: JsonSchema) -> str:
    """The type of a dereferenced schema: a primitive name, ``union``, or a complex type."""
    if isinstance(node, str):
        return node
    if isinstance(node, list):
        return "union"
    kind = str(node["type"])
    return "record" if kind == "error" else kind


def _short_name(fullname: str) -> str:
    return fullname.rpartition(".")[2]


def _describe(node: JsonSchema) -> str:
    if isinstance(node, str):
        return node
    if isinstance(node, list):
        return "[" + ", ".join(_describe(b) for b in node) + "]"
    kind = node["type"]
    if kind in _NAMED:
        return f"{kind} {node['name']}"
    if kind == "array":
        return f"array<{_describe(node['items'])}>"
    if kind == "map":
        return f"map<{_describe(node['values'])}>"
    return str(kind)


class _Checker:
    def __init__(self, reader: _Schema, writer: _Schema) -> None:
        self.reader = reader
        self.writer = writer
        # Pairs of named types already being (or done being) compared: makes recursive types terminate,
        # and reports a problem of a shared named type once.
        self._seen: set[tuple[str, str]] = set()

    def check(self, r: JsonSchema, w: JsonSchema, loc: str) -> Iterator[Incompatibility]:
        r_def = self.reader.deref(r)
        w_def = self.writer.deref(w)
        r_kind, w_kind = _kind(r_def), _kind(w_def)

        if r_kind in _NAMED and w_kind == r_kind:
            assert isinstance(r_def, dict) and isinstance(w_def, dict)
            key = (r_def["name"], w_def["name"])
            if key in self._seen:
                return
            self._seen.add(key)

        if w_kind == "union":
            assert isinstance(w_def, list)
            if r_kind == "union":
                assert isinstance(r_def, list)
                # Each branch the writer may have chosen must resolve to some reader branch.
                for branch in w_def:
                    yield from self._check_union_reader(r_def, branch, loc)
                return
            # Union writer, non-union reader: every branch the writer may have chosen must be readable.
            for branch in w_def:
                yield from self.check(r_def, branch, loc)
            return

        if r_kind == "union":
            assert isinstance(r_def, list)
            yield from self._check_union_reader(r_def, w_def, loc)
            return

        if r_kind == w_kind:
            yield from self._check_same_kind(r_kind, r_def, w_def, loc)
            return

        if r_kind in _PROMOTIONS.get(w_kind, frozenset()):
            return
        yield Incompatibility(
            IncompatibilityKind.TYPE_MISMATCH,
            loc,
            f"reader type {_describe(r_def)} cannot read writer type {_describe(w_def)}",
        )

    def _check_union_reader(self, r_union: list[Any], w: JsonSchema, loc: str) -> Iterator[Incompatibility]:
        """A non-union writer read by a union reader: resolved against the first matching reader branch."""
        w_def = self.writer.deref(w)
        index = self._matching_branch(r_union, w_def)
        if index is None:
            yield Incompatibility(
                IncompatibilityKind.MISSING_UNION_BRANCH,
                loc,
                f"reader union {_describe(r_union)} has no branch for writer type {_describe(w_def)}",
            )
            return
        yield from self.check(r_union[index], w_def, f"{loc}/{index}")

    def _matching_branch(self, r_union: list[Any], w_def: JsonSchema) -> int | None:
        """Index of the reader branch the writer type resolves to: same type first, then promotions."""
        w_kind = _kind(w_def)
        promotable = None
        for i, branch in enumerate(r_union):
            b_def = self.reader.deref(branch)
            b_kind = _kind(b_def)
            if b_kind == w_kind:
                if b_kind not in _NAMED:
                    return i
                assert isinstance(b_def, dict) and isinstance(w_def, dict)
                if self._names_match(b_def, w_def):
                    return i
            elif promotable is None and b_kind in _PROMOTIONS.get(w_kind, frozenset()):
                promotable = i
        return promotable

    @staticmethod
    def _names_match(r_def: dict[str, Any], w_def: dict[str, Any]) -> bool:
        w_name = _short_name(w_def["name"])
        if _short_name(r_def["name"]) == w_name:
            return True
        return any(_short_name(alias) == w_name for alias in r_def.get("aliases", ()))

    def _check_same_kind(
        self, kind: str, r_def: JsonSchema, w_def: JsonSchema, loc: str
    ) -> Iterator[Incompatibility]:
        if kind in PRIMITIVE_TYPES:
            return
        assert isinstance(r_def, dict) and isinstance(w_def, dict)
        if kind == "array":
            yield from self.check(r_def["items"], w_def["items"], f"{loc}/items")
            return
        if kind == "map":
            yield from self.check(r_def["values"], w_def["values"], f"{loc}/values")
            return
        if not self._names_match(r_def, w_def):
            yield Incompatibility(
                IncompatibilityKind.NAME_MISMATCH,
                f"{loc}/name",
                f"reader {kind} {r_def['name']} does not match writer {kind} {w_def['name']}",
            )
            return
        if kind == "fixed":
            if r_def["size"] != w_def["size"]:
                yield Incompatibility(
                    IncompatibilityKind.FIXED_SIZE_MISMATCH,
                    f"{loc}/size",
                    f"fixed {r_def['name']}: reader size {r_def['size']}, writer size {w_def['size']}",
                )
            return
        if kind == "enum":
            missing = [s for s in w_def["symbols"] if s not in r_def["symbols"]]
            if missing and r_def.get("default") not in r_def["symbols"]:
                yield Incompatibility(
                    IncompatibilityKind.MISSING_ENUM_SYMBOLS,
                    f"{loc}/symbols",
                    f"enum {r_def['name']}: reader lacks writer symbols {missing} and has no default",
                )
            return
        yield from self._check_record(r_def, w_def, loc)

    def _check_record(
        self, r_def: dict[str, Any], w_def: dict[str, Any], loc: str
    ) -> Iterator[Incompatibility]:
        w_fields = {f["name"]: f for f in w_def["fields"]}
        for r_field in r_def["fields"]:
            name = r_field["name"]
            w_field = w_fields.get(name)
            if w_field is None:
                w_field = next((w_fields[a] for a in r_field.get("aliases", ()) if a in w_fields), None)
            field_loc = f"{loc}/fields/{name}"
            if w_field is None:
                if "default" not in r_field:
                    yield Incompatibility(
                        IncompatibilityKind.READER_FIELD_MISSING_DEFAULT_VALUE,
                        field_loc,
                        f"record {r_def['name']}: reader field {name!r} is not in the writer "
                        "and has no default",
                    )
                continue
            yield from self.check(r_field["type"], w_field["type"], f"{field_loc}/type")


def check_can_read(reader: JsonSchema, writer: JsonSchema) -> list[Incompatibility]:
    """Every reason data written with ``writer`` cannot be read with ``reader``; empty if it can.

    Raises:
        SchemaLoadError: a schema is not valid JSON Avro.
    """
    checker = _Checker(_Schema(reader), _Schema(writer))
    return list(checker.check(checker.reader.root, checker.writer.root, ""))


def check_full(new: JsonSchema, old: JsonSchema) -> list[Incompatibility]:
    """Full compatibility: ``new`` reads ``old`` (backward) and ``old`` reads ``new`` (forward).

    Raises:
        SchemaLoadError: a schema is not valid JSON Avro.
    """
    backward = [replace(i, direction="backward") for i in check_can_read(new, old)]
    forward = [replace(i, direction="forward") for i in check_can_read(old, new)]
    return backward + forward


def assert_full(new: JsonSchema, old: JsonSchema) -> None:
    """Raise :class:`CompatibilityError` unless ``new`` and ``old`` are fully compatible.

    Raises:
        CompatibilityError: listing every incompatibility.
        SchemaLoadError: a schema is not valid JSON Avro.
    """
    problems = check_full(new, old)
    if problems:
        raise CompatibilityError(problems)
