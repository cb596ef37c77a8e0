"""The built-in tools: calculator, kv.put / kv.get, sleep, notify and http.get."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from fractions import Fraction
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from services.tool_exec.tools.base import Effect, Tool, ToolContext, ToolError, ToolOutput, TransientToolError

__all__ = [
    "MAX_EXPRESSION_CHARS",
    "Calculator",
    "HttpGet",
    "KvGet",
    "KvPut",
    "Notify",
    "Sleep",
    "evaluate",
    "render",
]

# --------------------------------------------------------------------------- calculator

MAX_EXPRESSION_CHARS = 200
MAX_BITS = 4096  # largest numerator/denominator of any intermediate result (~1233 decimal digits)
MAX_DEPTH = 64  # nesting of parentheses and unary signs
DECIMAL_PLACES = 20  # digits after the point for a non-terminating decimal

_OPERATORS = set("+-*/%^()")


def _tokenize(text: str) -> list[tuple[str, Fraction | None, int]]:
    """``(kind, value, position)``: kind is ``num``, an operator character, or ``end``."""
    tokens: list[tuple[str, Fraction | None, int]] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in " \t\r\n":
            i += 1
        elif ch in _OPERATORS:
            tokens.append((ch, None, i))
            i += 1
        elif ch.isascii() and (ch.isdigit() or ch == "."):
            start = i
            while i < n and text[i].isascii() and text[i].isdigit():
                i += 1
            whole = text[start:i]
            frac = ""
            if i < n and text[i] == ".":
                i += 1
                f_start = i
                while i < n and text[i].isascii() and text[i].isdigit():
                    i += 1
                frac = text[f_start:i]
            if not whole and not frac:
                raise ToolError(f"malformed number at position {start}")
            tokens.append(("num", Fraction(int(whole + frac or "0"), 10 ** len(frac)), start))
        else:
            raise ToolError(f"unexpected character {ch!r} at position {i}")
    tokens.append(("end", None, n))
    return tokens


def _bounded(value: Fraction) -> Fraction:
    if value.numerator.bit_length() > MAX_BITS or value.denominator.bit_length() > MAX_BITS:
        raise ToolError(f"result too large (more than {MAX_BITS} bits)")
    return value


class _Parser:
    """Recursive descent over::

    expr  := term (('+' | '-') term)*
    term  := unary (('*' | '/' | '%') unary)*
    unary := ('-' | '+') unary | power
    power := atom ('^' unary)?          right-associative; -2^2 = -4, 2^-1 = 0.5
    atom  := number | '(' expr ')'
    """

    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0
        self.depth = 0

    def _peek(self) -> str:
        return self.tokens[self.pos][0]

    def _take(self) -> tuple[str, Fraction | None, int]:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def _unexpected(self) -> ToolError:
        kind, _, where = self.tokens[self.pos]
        what = "end of input" if kind == "end" else ("a number" if kind == "num" else repr(kind))
        return ToolError(f"unexpected {what} at position {where}")

    def parse(self) -> Fraction:
        value = self._expr()
        if self._peek() != "end":
            raise self._unexpected()
        return value

    def _expr(self) -> Fraction:
        value = self._term()
        while self._peek() in ("+", "-"):
            op = self._take()[0]
            rhs = self._term()
            value = _bounded(value + rhs if op == "+" else value - rhs)
        return value

    def _term(self) -> Fraction:
        value = self._unary()
        while self._peek() in ("*", "/", "%"):
            op = self._take()[0]
            rhs = self._unary()
            if op == "*":
                value = _bounded(value * rhs)
            elif rhs == 0:
                raise ToolError("division by zero" if op == "/" else "modulo by zero")
            else:
                value = _bounded(value / rhs if op == "/" else value % rhs)
        return value

    def _unary(self) -> Fraction:
        if self._peek() in ("-", "+"):
            op = self._take()[0]
            self._enter()
            value = self._unary()
            self.depth -= 1
            return -value if op == "-" else value
        return self._power()

    def _power(self) -> Fraction:
        base = self._atom()
        if self._peek() != "^":
            return base
        self._take()
        self._enter()
        exponent = self._unary()
        self.depth -= 1
        return _pow(base, exponent)

    def _atom(self) -> Fraction:
        kind, value, _ = self.tokens[self.pos]
        if kind == "num":
            self.pos += 1
            assert value is not None
            return value
        if kind == "(":
            self.pos += 1
            self._enter()
            inner = self._expr()
            self.depth -= 1
            if self._peek() != ")":
                raise self._unexpected()
            self.pos += 1
            return inner
        raise self._unexpected()

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ToolError(f"expression nested more than {MAX_DEPTH} levels deep")


def _pow(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise ToolError("exponent must be an integer (results are exact)")
    e = exponent.numerator
    if base == 0:
        if e < 0:
            raise ToolError("division by zero (zero to a negative power)")
        return Fraction(1) if e == 0 else Fraction(0)
    if base in (1, -1):
        return base ** (e % 2 if base == -1 else 0)
    size = max(base.numerator.bit_length(), base.denominator.bit_length())
    # |a^e| has about size*|e| bits (at least |e| bits for |a| >= 2 or a fraction); refuse before computing
    if abs(e) > MAX_BITS or (size - 1) * abs(e) > MAX_BITS:
        raise ToolError(f"power too large (result over {MAX_BITS} bits)")
    return _bounded(base**e)


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression; :class:`ToolError` for anything malformed."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    if not expression.strip():
        raise ToolError("empty expression")
    return _Parser(expression).parse()


def render(value: Fraction) -> int | str:
    """An int when integral, else a decimal string: exact when it terminates, else rounded."""
    if value.denominator == 1:
        return value.numerator
    sign = "-" if value < 0 else ""
    num, den = abs(value.numerator), value.denominator
    rest, twos, fives = den, 0, 0
    while rest % 2 == 0:
        rest //= 2
        twos += 1
    while rest % 5 == 0:
        rest //= 5
        fives += 1
    places = max(twos, fives) if rest == 1 else DECIMAL_PLACES
    scaled = (num * 10**places * 2 + den) // (2 * den)  # round half up
    digits = str(scaled).rjust(places + 1, "0")
    whole, frac = digits[:-places], digits[-places:].rstrip("0")
    return f"{sign}{whole}.{frac}" if frac else f"{sign}{whole}"


class Calculator(Tool):
    name = "calculator"
    description = (
        "Evaluate an arithmetic expression exactly: numbers (with decimals), + - * / %, "
        "^ for integer powers, unary minus and parentheses. At most 200 characters."
    )
    parameters = {
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "e.g. (2 + 3) * 4 ^ 2 / 7"}},
        "required": ["expression"],
        "additionalProperties": False,
    }
    effect = Effect.READ_ONLY
    timeout_s = 5.0

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        value = evaluate(args["expression"])
        output: dict[str, Any] = {"expression": args["expression"], "result": render(value)}
        if value.denominator != 1:
            output["fraction"] = f"{value.numerator}/{value.denominator}"
        return ToolOutput(output)


# --------------------------------------------------------------------------- kv


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


_KEY = {"type": "string", "minLength": 1, "maxLength": 256}


class KvPut(Tool):
    name = "kv.put"
    description = "Store a JSON value under a key in this session's durable scratch space."
    parameters = {
        "type": "object",
        "properties": {"key": _KEY, "value": {"description": "any JSON value"}},
        "required": ["key", "value"],
        "additionalProperties": False,
    }
    effect = Effect.IDEMPOTENT_WRITE
    timeout_s = 10.0

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        await ctx.statements.run(
            "INSERT INTO {ks}.session_kv (tenant_id, session_id, key, value, updated_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (ctx.tenant_id, ctx.session_id, args["key"], json.dumps(args["value"]), _now()),
        )
        return ToolOutput({"key": args["key"], "stored": True})


class KvGet(Tool):
    name = "kv.get"
    description = "Read the JSON value stored under a key in this session's scratch space."
    parameters = {
        "type": "object",
        "properties": {"key": _KEY},
        "required": ["key"],
        "additionalProperties": False,
    }
    effect = Effect.READ_ONLY
    timeout_s = 10.0

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        rows = await ctx.statements.run(
            "SELECT value FROM {ks}.session_kv WHERE tenant_id = ? AND session_id = ? AND key = ?",
            (ctx.tenant_id, ctx.session_id, args["key"]),
        )
        if not rows:
            return ToolOutput({"key": args["key"], "found": False})
        return ToolOutput({"key": args["key"], "found": True, "value": json.loads(rows[0]["value"])})


# --------------------------------------------------------------------------- sleep


class Sleep(Tool):
    name = "sleep"
    description = "Wait for the given number of seconds (0 to 60)."
    parameters = {
        "type": "object",
        "properties": {"seconds": {"type": "number", "minimum": 0, "maximum": 60}},
        "required": ["seconds"],
        "additionalProperties": False,
    }
    effect = Effect.READ_ONLY
    timeout_s = 65.0

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        await asyncio.sleep(float(args["seconds"]))
        return ToolOutput({"slept_s": args["seconds"]})


# --------------------------------------------------------------------------- notify


class Notify(Tool):
    name = "notify"
    description = "Send a notification message to a channel. Irreversible: it is sent at most once."
    parameters = {
        "type": "object",
        "properties": {
            "channel": {"type": "string", "minLength": 1, "maxLength": 128},
            "message": {"type": "string", "minLength": 1, "maxLength": 4000},
        },
        "required": ["channel", "message"],
        "additionalProperties": False,
    }
    effect = Effect.IRREVERSIBLE
    timeout_s = 10.0

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        notification_id = uuid.uuid4()
        await ctx.statements.run(
            "INSERT INTO {ks}.notify_outbox (idempotency_key, notification_id, tenant_id, session_id,"
            " channel, message, sent_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                ctx.idempotency_key,
                notification_id,
                ctx.tenant_id,
                ctx.session_id,
                args["channel"],
                args["message"],
                _now(),
            ),
        )
        return ToolOutput({"notification_id": str(notification_id)})


# --------------------------------------------------------------------------- http.get

MAX_BODY_BYTES = 64 * 1024
MAX_REDIRECTS = 5


def _check_url(url: str, allowlist: tuple[str, ...]) -> None:
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        raise ToolError(f"malformed URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ToolError("only http and https URLs are allowed")
    if not host:
        raise ToolError("URL has no host")
    if host.lower() not in {h.lower() for h in allowlist}:
        raise ToolError(f"host not allowed: {host}")


class HttpGet(Tool):
    name = "http.get"
    description = "Fetch a URL with HTTP GET (allowed hosts only); returns status, content type and body."
    parameters = {
        "type": "object",
        "properties": {"url": {"type": "string", "minLength": 1, "maxLength": 2048}},
        "required": ["url"],
        "additionalProperties": False,
    }
    effect = Effect.READ_ONLY
    timeout_s = 15.0
    max_concurrency = 16

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        url: str = args["url"]
        allowlist = ctx.settings.http_allowlist
        _check_url(url, allowlist)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s or ctx.settings.default_timeout_s)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                # Redirects are followed by hand so every hop passes the allow-list.
                for _ in range(MAX_REDIRECTS + 1):
                    async with http.get(url, allow_redirects=False) as resp:
                        location = resp.headers.get("Location")
                        if resp.status in (301, 302, 303, 307, 308) and location:
                            url = urljoin(url, location)
                            _check_url(url, allowlist)
                            continue
                        body = bytearray()
                        while len(body) <= MAX_BODY_BYTES:
                            chunk = await resp.content.read(MAX_BODY_BYTES + 1 - len(body))
                            if not chunk:
                                break
                            body.extend(chunk)
                        truncated = len(body) > MAX_BODY_BYTES
                        text = bytes(body[:MAX_BODY_BYTES]).decode(resp.charset or "utf-8", errors="replace")
                        return ToolOutput(
                            {
                                "status": resp.status,
                                "content_type": resp.content_type,
                                "body": text,
                                "truncated": truncated,
                            }
                        )
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise TransientToolError(f"connection error: {type(exc).__name__}: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise ToolError(f"HTTP error: {type(exc).__name__}: {exc}") from exc
        except LookupError:  # an unknown charset
            raise ToolError("response has an unknown charset") from None
        raise ToolError(f"more than {MAX_REDIRECTS} redirects")
