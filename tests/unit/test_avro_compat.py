"""Schema compatibility: the checker in shared/avro_compat.py, and every published version vs the others."""

from __future__ import annotations

import io
import itertools
from typing import Any

import fastavro
import pytest
from fastavro.schema import parse_schema

from shared.avro import SchemaRegistry, SchemaVersion
from shared.avro_compat import (
    CompatibilityError,
    Incompatibility,
    IncompatibilityKind,
    assert_full,
    check_can_read,
    check_full,
)

REGISTRY = SchemaRegistry()
PAIRS = [
    (new, old)
    for name in REGISTRY.names()
    for old, new in itertools.combinations(REGISTRY.versions(name), 2)  # oldest first
]

K = IncompatibilityKind


def kinds(problems: list[Incompatibility]) -> list[IncompatibilityKind]:
    return [p.kind for p in problems]


def rec(*fields: dict[str, Any], name: str = "R", namespace: str = "test", **extra: Any) -> dict[str, Any]:
    return {"type": "record", "name": name, "namespace": namespace, "fields": list(fields), **extra}


def fld(name: str, type_: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, **extra}


def enum(symbols: list[str], name: str = "E", **extra: Any) -> dict[str, Any]:
    return {"type": "enum", "name": name, "symbols": symbols, **extra}


def resolves(reader: Any, writer: Any, datum: Any) -> Any:
    """What fastavro reads when ``datum`` is written with ``writer`` and read with ``reader``."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parse_schema(writer), datum)
    buf.seek(0)
    return fastavro.schemaless_reader(buf, parse_schema(writer), parse_schema(reader))


# ------------------------------------------------------- the published schemas


def test_there_is_at_least_one_evolved_record() -> None:
    assert PAIRS, "UserMessage has two versions; the compatibility suite must have something to check"


@pytest.mark.parametrize(
    ("new", "old"), PAIRS, ids=[f"{n.name}-v{n.version}-vs-v{o.version}" for n, o in PAIRS]
)
def test_every_version_is_fully_compatible_with_every_earlier_one(
    new: SchemaVersion, old: SchemaVersion
) -> None:
    problems = check_full(new.schema, old.schema)
    assert not problems, "\n".join(str(p) for p in problems)


@pytest.mark.parametrize("sv", list(REGISTRY), ids=[f"{sv.name}-v{sv.version}" for sv in REGISTRY])
def test_every_schema_reads_itself(sv: SchemaVersion) -> None:
    assert check_full(sv.schema, sv.schema) == []


def test_different_records_are_incompatible() -> None:
    um = REGISTRY.latest("UserMessage").schema
    tr = REGISTRY.latest("TurnRequested").schema
    assert K.NAME_MISMATCH in kinds(check_can_read(tr, um))


# --------------------------------------------------------------- records


def test_added_field_without_default_breaks_backward_only() -> None:
    old = rec(fld("a", "string"))
    new = rec(fld("a", "string"), fld("b", "string"))
    problems = check_can_read(new, old)
    assert kinds(problems) == [K.READER_FIELD_MISSING_DEFAULT_VALUE]
    assert problems[0].location == "/fields/b"
    assert check_can_read(old, new) == []  # forward: the old reader ignores b
    full = check_full(new, old)
    assert [(p.direction, p.kind) for p in full] == [("backward", K.READER_FIELD_MISSING_DEFAULT_VALUE)]


def test_added_field_with_default_is_fully_compatible() -> None:
    old = rec(fld("a", "string"))
    new = rec(
        fld("a", "string"),
        fld("b", ["null", "string"], default=None),
        fld("m", {"type": "map", "values": "string"}, default={}),
    )
    assert check_full(new, old) == []
    assert resolves(new, old, {"a": "x"}) == {"a": "x", "b": None, "m": {}}


def test_removed_field_without_default_breaks_forward() -> None:
    old = rec(fld("a", "string"), fld("b", "string"))
    new = rec(fld("a", "string"))
    assert check_can_read(new, old) == []
    assert [(p.direction, p.kind) for p in check_full(new, old)] == [
        ("forward", K.READER_FIELD_MISSING_DEFAULT_VALUE)
    ]


def test_field_renamed_with_alias_is_readable() -> None:
    old = rec(fld("text", "string"))
    new = rec(fld("body", "string", aliases=["text"]))
    assert check_can_read(new, old) == []
    assert kinds(check_can_read(old, new)) == [K.READER_FIELD_MISSING_DEFAULT_VALUE]


def test_record_renamed_with_alias_is_readable() -> None:
    old = rec(fld("a", "int"), name="Old")
    new = rec(fld("a", "int"), name="New", aliases=["Old"])
    assert check_can_read(new, old) == []
    assert kinds(check_can_read(old, new)) == [K.NAME_MISMATCH]


def test_named_types_match_by_unqualified_name() -> None:
    assert check_can_read(rec(fld("a", "int"), namespace="one"), rec(fld("a", "int"), namespace="two")) == []


def test_field_order_does_not_matter() -> None:
    assert (
        check_full(rec(fld("a", "int"), fld("b", "string")), rec(fld("b", "string"), fld("a", "int"))) == []
    )


# ------------------------------------------------------------- primitives


@pytest.mark.parametrize(
    ("writer", "reader"),
    [
        ("int", "long"), ("int", "float"), ("int", "double"), ("long", "float"), ("long", "double"),
        ("float", "double"), ("string", "bytes"), ("bytes", "string"),
    ],
)  # fmt: skip
def test_promotions_are_accepted(writer: str, reader: str) -> None:
    assert check_can_read(rec(fld("x", reader)), rec(fld("x", writer))) == []


@pytest.mark.parametrize(
    ("writer", "reader"),
    [
        ("long", "int"), ("double", "float"), ("float", "long"), ("string", "int"), ("int", "string"),
        ("boolean", "int"), ("null", "string"), ("bytes", "long"),
    ],
)  # fmt: skip
def test_narrowing_and_unrelated_types_are_rejected(writer: str, reader: str) -> None:
    problems = check_can_read(rec(fld("x", reader)), rec(fld("x", writer)))
    assert kinds(problems) == [K.TYPE_MISMATCH]
    assert problems[0].location == "/fields/x/type"


def test_int_to_long_change_is_backward_but_not_forward() -> None:
    old, new = rec(fld("n", "int")), rec(fld("n", "long"))
    assert [(p.direction, p.kind) for p in check_full(new, old)] == [("forward", K.TYPE_MISMATCH)]
    assert resolves(new, old, {"n": 7}) == {"n": 7}


def test_type_change_string_to_int_is_rejected_both_ways() -> None:
    old, new = rec(fld("x", "string")), rec(fld("x", "int"))
    assert [(p.direction, p.kind) for p in check_full(new, old)] == [
        ("backward", K.TYPE_MISMATCH),
        ("forward", K.TYPE_MISMATCH),
    ]


# ------------------------------------------------------------------ enums


def test_removed_enum_symbol_without_default_is_rejected() -> None:
    old = rec(fld("e", enum(["A", "B", "C"])))
    new = rec(fld("e", enum(["A", "B"])))
    problems = check_can_read(new, old)
    assert kinds(problems) == [K.MISSING_ENUM_SYMBOLS]
    assert "C" in problems[0].message
    assert problems[0].location == "/fields/e/type/symbols"
    assert check_can_read(old, new) == []


def test_removed_enum_symbol_with_reader_default_is_accepted() -> None:
    old = rec(fld("e", enum(["A", "B", "C"])))
    new = rec(fld("e", enum(["A", "B"], default="A")))
    assert check_can_read(new, old) == []
    assert resolves(new, old, {"e": "C"}) == {"e": "A"}


def test_enum_default_not_among_symbols_does_not_count() -> None:
    old = rec(fld("e", enum(["A", "Z"])))
    new = rec(fld("e", {"type": "enum", "name": "E", "symbols": ["A"], "default": "Z"}))
    assert kinds(check_can_read(new, old)) == [K.MISSING_ENUM_SYMBOLS]


def test_enum_name_mismatch() -> None:
    assert kinds(
        check_can_read(rec(fld("e", enum(["A"], name="X"))), rec(fld("e", enum(["A"], name="Y"))))
    ) == [K.NAME_MISMATCH]


# ----------------------------------------------------------------- unions


def test_removed_union_branch_is_rejected() -> None:
    old = rec(fld("v", ["null", "string", "long"], default=None))
    new = rec(fld("v", ["null", "string"], default=None))
    problems = check_can_read(new, old)
    assert kinds(problems) == [K.MISSING_UNION_BRANCH]
    assert "long" in problems[0].message
    assert check_can_read(old, new) == []  # forward: the old reader has every branch the new writer uses


def test_removed_record_branch_of_a_union_is_rejected() -> None:
    a = rec(fld("x", "int"), name="A")
    b = rec(fld("y", "int"), name="B")
    old = rec(fld("payload", [a, b]), name="Event")
    new = rec(fld("payload", [a]), name="Event")
    assert kinds(check_can_read(new, old)) == [K.MISSING_UNION_BRANCH]
    assert check_can_read(old, new) == []


def test_incompatible_record_inside_a_union_reports_the_deep_reason() -> None:
    old = rec(fld("payload", [rec(fld("x", "int"), name="A")]), name="Event")
    new = rec(fld("payload", [rec(fld("x", "int"), fld("y", "string"), name="A")]), name="Event")
    problems = check_can_read(new, old)
    assert kinds(problems) == [K.READER_FIELD_MISSING_DEFAULT_VALUE]
    assert problems[0].location == "/fields/payload/type/0/fields/y"


def test_non_union_writer_read_by_union_reader() -> None:
    assert check_can_read(rec(fld("x", ["null", "string"])), rec(fld("x", "string"))) == []
    assert check_can_read(rec(fld("x", ["null", "long"])), rec(fld("x", "int"))) == []  # via promotion
    assert kinds(check_can_read(rec(fld("x", ["null", "long"])), rec(fld("x", "string")))) == [
        K.MISSING_UNION_BRANCH
    ]


def test_union_writer_read_by_non_union_reader_needs_every_branch() -> None:
    assert kinds(check_can_read(rec(fld("x", "string")), rec(fld("x", ["null", "string"])))) == [
        K.TYPE_MISMATCH
    ]
    assert check_can_read(rec(fld("x", "long")), rec(fld("x", ["int", "long"]))) == []


def test_making_a_field_nullable_is_backward_only() -> None:
    old = rec(fld("x", "string"))
    new = rec(fld("x", ["null", "string"], default=None))
    assert [p.direction for p in check_full(new, old)] == ["forward"]


# --------------------------------------------------- arrays, maps and fixed


def test_array_items_and_map_values_are_checked_recursively() -> None:
    assert (
        check_can_read(
            rec(fld("a", {"type": "array", "items": "long"})),
            rec(fld("a", {"type": "array", "items": "int"})),
        )
        == []
    )
    problems = check_can_read(
        rec(fld("m", {"type": "map", "values": "int"})), rec(fld("m", {"type": "map", "values": "string"}))
    )
    assert kinds(problems) == [K.TYPE_MISMATCH]
    assert problems[0].location == "/fields/m/type/values"
    problems = check_can_read(
        rec(fld("a", {"type": "array", "items": enum(["A"])})),
        rec(fld("a", {"type": "array", "items": enum(["A", "B"])})),
    )
    assert kinds(problems) == [K.MISSING_ENUM_SYMBOLS]
    assert kinds(
        check_can_read(
            rec(fld("a", {"type": "array", "items": "int"})), rec(fld("a", {"type": "map", "values": "int"}))
        )
    ) == [K.TYPE_MISMATCH]


def test_fixed_size_and_name() -> None:
    def fixed(size: int, name: str = "F") -> dict[str, Any]:
        return rec(fld("f", {"type": "fixed", "name": name, "size": size}))

    assert check_full(fixed(16), fixed(16)) == []
    assert kinds(check_can_read(fixed(16), fixed(32))) == [K.FIXED_SIZE_MISMATCH]
    assert kinds(check_can_read(fixed(16, "F"), fixed(16, "G"))) == [K.NAME_MISMATCH]


# ------------------------------------------------------ references and recursion


def test_references_to_named_types_are_followed() -> None:
    art = rec(fld("id", "string"), name="Artifact")
    old = rec(fld("first", art), fld("second", ["null", "Artifact"], default=None), name="Outer")
    art2 = rec(fld("id", "string"), fld("size", "long"), name="Artifact")
    new = rec(fld("first", art2), fld("second", ["null", "Artifact"], default=None), name="Outer")
    problems = check_can_read(new, old)
    # Artifact is compared once, where it is defined: one problem, not one per reference.
    assert kinds(problems) == [K.READER_FIELD_MISSING_DEFAULT_VALUE]
    assert problems[0].location == "/fields/first/type/fields/size"


def linked_list(value_type: str, extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return rec(
        fld("value", value_type), fld("next", ["null", "Node"], default=None), *(extra or []), name="Node"
    )


def test_recursive_schemas_terminate() -> None:
    assert check_full(linked_list("int"), linked_list("int")) == []
    assert [(p.direction, p.kind) for p in check_full(linked_list("long"), linked_list("int"))] == [
        ("forward", K.TYPE_MISMATCH)
    ]
    problems = check_can_read(linked_list("int", [fld("tag", "string")]), linked_list("int"))
    assert kinds(problems) == [K.READER_FIELD_MISSING_DEFAULT_VALUE]


def test_assert_full_raises_with_every_problem() -> None:
    with pytest.raises(CompatibilityError) as info:
        assert_full(rec(fld("x", "int")), rec(fld("x", "string")))
    assert len(info.value.incompatibilities) == 2
    assert "backward" in str(info.value) and "forward" in str(info.value)
    assert_full(rec(fld("x", "int")), rec(fld("x", "int")))


def test_primitive_top_level_schemas() -> None:
    assert check_can_read("long", "int") == []
    assert kinds(check_can_read("int", "long")) == [K.TYPE_MISMATCH]
    assert check_can_read({"type": "long", "logicalType": "timestamp-millis"}, "long") == []
