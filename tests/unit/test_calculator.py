"""The calculator tool: a recursive-descent parser over exact fractions, never eval."""

from __future__ import annotations

import asyncio
import random
from fractions import Fraction
from typing import Any

import pytest

from services.tool_exec.tools.base import ToolError
from services.tool_exec.tools.builtin import MAX_EXPRESSION_CHARS, Calculator, evaluate, render


def calc(expression: str) -> int | str:
    return render(evaluate(expression))


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("10 - 4 - 3", 3),  # left-associative
        ("100 / 10 / 5", 2),
        ("2 ^ 3 ^ 2", 512),  # right-associative: 2^(3^2)
        ("(2 ^ 3) ^ 2", 64),
        ("-2 ^ 2", -4),  # unary minus binds looser than ^
        ("(-2) ^ 2", 4),
        ("2 ^ -1", "0.5"),
        ("--3", 3),
        ("-(4 - 6)", 2),
        ("+5", 5),
        ("3 * -2", -6),
        ("7 % 3", 1),
        ("-7 % 3", 2),  # floor modulo, as Python
        ("2 * 3 % 4", 2),
        ("0.1 + 0.2", "0.3"),  # exact, no float rounding
        ("1.5 * 4", 6),
        (".5 + 1.", "1.5"),
        ("1 / 3", "0.33333333333333333333"),
        ("2 / 3", "0.66666666666666666667"),
        ("-7 / 4", "-1.75"),
        ("1 / 8", "0.125"),
        ("12345678901234567890 * 98765432109876543210", 1219326311370217952237463801111263526900),
        ("2 ^ 100", 2**100),
        ("0 ^ 0", 1),
        ("(-1) ^ 1001", -1),
        ("1 ^ 100000000", 1),
        ("  ( 1 )  ", 1),
    ],
)
def test_values(expression: str, expected: int | str) -> None:
    assert calc(expression) == expected


def test_results_are_exact_fractions() -> None:
    assert evaluate("1/3 + 1/6") == Fraction(1, 2)
    assert evaluate("0.1 * 3") == Fraction(3, 10)


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("1 / 0", "division by zero"),
        ("1 / (2 - 2)", "division by zero"),
        ("5 % 0", "modulo by zero"),
        ("0 ^ -1", "division by zero"),
        ("2 ^ 0.5", "exponent must be an integer"),
        ("2 ^ 100000", "too large"),
        ("10 ^ 10 ^ 10", "too large"),
        ("(2 ^ 4000) * (2 ^ 4000)", "too large"),
        ("9 ^ 9 ^ 9", "too large"),
        ("1" * (MAX_EXPRESSION_CHARS + 1), "longer than"),
        ("", "empty"),
        ("   ", "empty"),
        ("2 +", "unexpected end of input"),
        ("2 ** 3", "unexpected '*'"),
        ("2 **", "unexpected '*'"),
        ("(1 + 2", "unexpected end of input"),
        ("1 + 2)", "unexpected ')'"),
        ("1 2", "unexpected a number"),
        ("1.2.3", "unexpected a number"),
        (".", "malformed number"),
        ("abc", "unexpected character 'a'"),
        ("__import__('os')", "unexpected character '_'"),
        ("1e5", "unexpected character 'e'"),
        ("٣ + 1", "unexpected character"),  # non-ASCII digits are not numbers
        ("(" * 80 + "1" + ")" * 80, "nested more than"),
        ("-" * 150 + "1", "nested more than"),
    ],
)
def test_bad_input_is_a_tool_error_with_a_reason(expression: str, reason: str) -> None:
    with pytest.raises(ToolError) as info:
        evaluate(expression)
    assert reason in info.value.reason


def test_fuzzed_input_raises_only_tool_errors() -> None:
    rng = random.Random(20240601)
    alphabet = "0123456789....+-*/%^^()  ()eE_x'\"[]{}é\n"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(600):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        try:
            value = evaluate(text)
        except ToolError as exc:
            assert exc.reason
            outcomes["error"] += 1
        else:
            assert isinstance(value, Fraction)
            render(value)
            outcomes["ok"] += 1
    # also well-formed random expressions with big numbers and powers
    for _ in range(300):
        parts = [str(rng.randint(0, 10 ** rng.randint(1, 30)))]
        for _ in range(rng.randint(0, 8)):
            parts += [rng.choice("+-*/%^"), rng.choice(["", "-"]) + str(rng.randint(0, 999))]
        try:
            render(evaluate("".join(parts)[:MAX_EXPRESSION_CHARS]))
            outcomes["ok"] += 1
        except ToolError:
            outcomes["error"] += 1
    assert outcomes["ok"] > 50 and outcomes["error"] > 50


def test_the_tool_returns_result_and_fraction() -> None:
    tool = Calculator()
    ctx: Any = None  # the calculator uses nothing from its context
    out = asyncio.run(tool.run({"expression": "1/4 + 1/2"}, ctx))
    assert out.output == {"expression": "1/4 + 1/2", "result": "0.75", "fraction": "3/4"}
    out = asyncio.run(tool.run({"expression": "6*7"}, ctx))
    assert out.output == {"expression": "6*7", "result": 42}
