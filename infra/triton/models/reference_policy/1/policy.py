"""Decision logic of the reference policy: a deterministic stand-in for a tool-calling LLM.

Pure Python standard library (it runs inside Triton's Python-backend stub, so it
imports nothing from ``shared/``). It reads the prompt format of ``shared/prompt.py``
(ChatML framing, tool specs in ``<tools>``, Hermes/Qwen ``<tool_call>`` blocks, tool
results in ``<tool_response>``) and writes what a real model would: one
``<tool_call>`` block, or an answer in plain text. Same prompt, same completion;
sampling parameters are ignored.

Rules
-----
1. Parse the prompt into the tool names listed in ``<tools>`` and the messages. The
   *current turn* is the LAST user message and every assistant/tool message after it.
   A prompt without ChatML framing is read as one user message (its last ``user:``
   line, or the whole text) with no tools.
2. Split the user message into ordered *clauses* on `` and then ``, `` then `` and
   ``; `` (case-insensitive); trailing ``.``, ``!`` and ``?`` are dropped.
3. Each clause is one intent, tried in this order:

   * ``wait|sleep N [second(s)]``            -> ``sleep {"seconds": N}`` (int, or float if it has decimals)
   * ``fetch|get <http(s) url>``              -> ``http.get {"url": <url>}``
   * ``remember [that] <key> is <value>``     -> ``kv.put {"key": <key>, "value": <value>}``;
     ``remember <text>`` (no `` is ``)        -> ``kv.put {"key": "note", "value": <text>}``
   * ``what did I tell you [about <key>]``, ``what is my <key>``, ``recall [<key>]``
                                              -> ``kv.get {"key": <key or "note">}``
   * ``notify ...`` / ``send ...``            -> ``notify {"channel": <c>, "message": <the clause>}``
     where ``c`` is the word after ``notify`` (or after ``to`` for ``send``) when it
     looks like a name (letters, digits, ``_ . - #``, not a pronoun or article), else
     ``"default"``
   * an arithmetic expression (digits, ``+ - * / % ^ ( )``, decimals, spaces), optionally
     after ``what is``, ``what's``, ``calculate``, ``compute`` or ``evaluate``
                                              -> ``calculator {"expression": <expression>}``
   * anything else: no tool.

   Keys are normalised: lower case, a leading ``my ``/``the ``/``our `` dropped,
   whitespace runs replaced by ``_`` (so "remember that my favourite colour is blue"
   and "what is my favourite colour" meet at ``favourite_colour``).
4. Walk the clauses in order. A clause is *done* when a tool call with the same name and
   arguments was already made in the current turn (each made call satisfies one clause).
   The first clause not done whose tool is listed in ``<tools>`` is performed: the
   completion is exactly one block ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``.
   One call per step, so several clauses take several steps.
5. When no clause is left to perform, the completion is the answer: one sentence per
   clause, in order, built from the turn's tool responses (paired with calls in order):
   status ``OK`` uses the output (``2+3*4 = 14.``, ``I'll remember that colour is blue.``,
   ``You told me: colour is blue.``, ``Waited 1 seconds.``, ``Notification sent to ops
   (id n-1).``, ``Fetched http://...: 200, 1234 bytes.``); ``ERROR``, ``TIMEOUT`` and
   ``OUTCOME_UNKNOWN`` are reported as such; a clause whose tool is not listed gets
   ``The <tool> tool is not available.``; a clause with no intent gets
   ``You said: <clause>.``
"""

import json
import re

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_TOOL_RESPONSE = re.compile(r"<tool_response>(.*?)</tool_response>", re.DOTALL)
_TOOLS = re.compile(r"<tools>\n(.*?)\n?</tools>", re.DOTALL)
_CLAUSE_SPLIT = re.compile(r"\s+and\s+then\s+|\s+then\s+|;\s+", re.IGNORECASE)

_SLEEP = re.compile(
    r"^(?:please\s+)?(?:wait|sleep)\s+(?:for\s+)?(\d+(?:\.\d+)?)\s*(?:s|secs?|seconds?)?$", re.IGNORECASE
)
_FETCH = re.compile(r"^(?:please\s+)?(?:fetch|get)\s+(https?://\S+)", re.IGNORECASE)
_REMEMBER = re.compile(r"^(?:please\s+)?remember\s+(?:that\s+)?(.+)$", re.IGNORECASE | re.DOTALL)
_RECALL = (
    re.compile(r"^what\s+did\s+i\s+tell\s+you(?:\s+about\s+(.+))?$", re.IGNORECASE),
    re.compile(r"^what\s+is\s+my\s+(.+)$", re.IGNORECASE),
    re.compile(r"^recall(?:\s+(.+))?$", re.IGNORECASE),
)
_NOTIFY = re.compile(r"^(?:please\s+)?notify\b\s*(\S*)", re.IGNORECASE)
_SEND = re.compile(r"^(?:please\s+)?send\b", re.IGNORECASE)
_SEND_TO = re.compile(r"\bto\s+(\S+)", re.IGNORECASE)
_NAME = re.compile(r"^#?[A-Za-z][\w.\-]*$")
_NOT_NAMES = {
    "that", "the", "a", "an", "me", "us", "them", "him", "her", "it", "everyone", "everybody",
    "about", "when", "with", "to", "of", "if", "please", "all", "my", "our",
}  # fmt: skip
_MATH_PREFIX = re.compile(r"^(?:what\s+is|what's|calculate|compute|evaluate)\s+", re.IGNORECASE)
_EXPRESSION = re.compile(r"^[\d\s+\-*/%^().]+$")


# -- reading the prompt ---------------------------------------------------------------


def _parse_prompt(prompt):
    """(tool names, [(role, content)]) of a ChatML prompt; the open assistant header is dropped."""
    if IM_START not in prompt:
        last_user = ""
        for line in prompt.splitlines():
            if line.startswith("user:"):
                last_user = line[len("user:") :].strip()
        return [], [("user", last_user or prompt.strip())]
    tools = []
    messages = []
    for chunk in prompt.split(IM_START)[1:]:
        role, _, rest = chunk.partition("\n")
        closed = IM_END in rest
        content = rest.split(IM_END, 1)[0]
        role = role.strip()
        if role == "system":
            tools = _tool_names(content)
        elif closed:
            messages.append((role, content))
    return tools, messages


def _tool_names(system):
    match = _TOOLS.search(system)
    if not match:
        return []
    names = []
    for line in match.group(1).splitlines():
        try:
            spec = json.loads(line)
        except ValueError:
            continue
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            names.append(spec["name"])
        elif isinstance(spec, dict) and isinstance(spec.get("function"), dict):  # OpenAI-style wrapper
            names.append(spec["function"].get("name"))
    return names


def _calls_of(content):
    calls = []
    for body in _TOOL_CALL.findall(content):
        try:
            data = json.loads(body)
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        arguments = data.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                arguments = {}
        calls.append({"name": data.get("name"), "arguments": arguments})
    return calls


def _responses_of(content):
    responses = []
    for body in _TOOL_RESPONSE.findall(content):
        try:
            data = json.loads(body)
        except ValueError:
            data = {"status": "OK", "output": body.strip()}
        responses.append(data if isinstance(data, dict) else {"status": "OK", "output": data})
    return responses


def _current_turn(messages):
    """(user text, [(call, response or None)]) of the last user message and what followed it."""
    last = max((i for i, (role, _) in enumerate(messages) if role == "user"), default=None)
    if last is None:
        return "", []
    made = []  # [call, response]
    pending = []  # indices into made, awaiting a response
    for role, content in messages[last + 1 :]:
        if role == "assistant":
            for call in _calls_of(content):
                made.append([call, None])
                pending.append(len(made) - 1)
        elif role == "tool":
            for response in _responses_of(content):
                if not pending:
                    continue
                name = response.get("name")
                pick = next((i for i in pending if made[i][0]["name"] == name), pending[0])
                pending.remove(pick)
                made[pick][1] = response
    return messages[last][1], [(call, response) for call, response in made]


# -- intents ---------------------------------------------------------------------------


def _clauses(text):
    clauses = []
    for part in _CLAUSE_SPLIT.split(text.strip()):
        part = part.strip().rstrip(".!?").strip()
        if part:
            clauses.append(part)
    return clauses


def _key(text):
    key = text.strip().rstrip(".!?").strip().lower()
    key = re.sub(r"^(?:my|the|our)\s+", "", key)
    return re.sub(r"\s+", "_", key) or "note"


def _number(text):
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def _intent(clause):
    """(tool name, arguments) for one clause, or None when it needs no tool."""
    match = _SLEEP.match(clause)
    if match:
        return "sleep", {"seconds": _number(match.group(1))}
    match = _FETCH.match(clause)
    if match:
        return "http.get", {"url": match.group(1).rstrip(",.;")}
    match = _REMEMBER.match(clause)
    if match:
        fact = match.group(1).strip()
        parts = re.split(r"\s+is\s+", fact, maxsplit=1, flags=re.IGNORECASE)
        if len(parts) == 2 and parts[0].strip() and parts[1].strip():
            return "kv.put", {"key": _key(parts[0]), "value": parts[1].strip()}
        return "kv.put", {"key": "note", "value": fact}
    for pattern in _RECALL:
        match = pattern.match(clause)
        if match:
            return "kv.get", {"key": _key(match.group(1) or "note")}
    match = _NOTIFY.match(clause)
    if match:
        return "notify", {"channel": _channel(match.group(1)), "message": clause}
    if _SEND.match(clause):
        match = _SEND_TO.search(clause)
        return "notify", {"channel": _channel(match.group(1) if match else ""), "message": clause}
    expression = _MATH_PREFIX.sub("", clause).strip().rstrip("=").strip()
    if expression and _EXPRESSION.match(expression) and any(c.isdigit() for c in expression):
        return "calculator", {"expression": expression}
    return None


def _channel(word):
    word = word.strip().rstrip(":,.;!?")
    if _NAME.match(word) and word.lower() not in _NOT_NAMES:
        return word
    return "default"


# -- answering -------------------------------------------------------------------------


def _render(value):
    if value is None:
        return "nothing"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _field(output, *names):
    if isinstance(output, dict):
        for name in names:
            if output.get(name) is not None:
                return output[name]
    return None


def _ok_sentence(name, arguments, output):
    if name == "calculator":
        result = _field(output, "result", "value")
        return f"{arguments.get('expression')} = {_render(output if result is None else result)}."
    if name == "kv.put":
        return f"I'll remember that {_spoken(arguments.get('key'))} is {arguments.get('value')}."
    if name == "kv.get":
        key = _spoken(arguments.get("key"))
        value = output.get("value") if isinstance(output, dict) else output
        if value is None or (isinstance(output, dict) and output.get("found") is False):
            return f"You have not told me anything about {key}."
        return f"You told me: {key} is {_render(value)}."
    if name == "sleep":
        return f"Waited {_render(arguments.get('seconds'))} seconds."
    if name == "notify":
        ident = _field(output, "id", "notification_id", "message_id")
        if ident is None and isinstance(output, (str, int)):
            ident = output
        suffix = f" (id {_render(ident)})" if ident is not None else ""
        return f"Notification sent to {arguments.get('channel', 'default')}{suffix}."
    if name == "http.get":
        status = _field(output, "status", "status_code")
        size = _field(output, "bytes", "size", "length", "content_length")
        if size is None and isinstance(_field(output, "body", "text"), str):
            size = len(_field(output, "body", "text").encode("utf-8"))
        if status is not None and size is not None:
            return f"Fetched {arguments.get('url')}: {_render(status)}, {_render(size)} bytes."
        return f"Fetched {arguments.get('url')}: {_render(output)[:200]}."
    return f"{name} returned {_render(output)[:200]}."


def _spoken(key):
    return str(key or "note").replace("_", " ")


def _sentence(name, arguments, response):
    if response is None:
        return f"The {name} call has no result yet."
    status = str(response.get("status") or "OK").upper()
    if status == "OK":
        output = response.get("output")
        if isinstance(output, str):
            # ToolResult.output is JSON text; read the value it holds.
            try:
                output = json.loads(output)
            except ValueError:
                pass
        return _ok_sentence(name, arguments, output)
    error = response.get("error")
    detail = f": {_render(error)}" if error else ""
    if status == "TIMEOUT":
        return f"The {name} call timed out{detail}."
    if status == "OUTCOME_UNKNOWN":
        return f"I don't know whether the {name} call took effect (outcome unknown){detail}."
    if status == "ERROR":
        return f"The {name} call failed{detail}."
    return f"The {name} call ended with status {status}{detail}."


_MARKER = re.compile(r"<(?=\|[A-Za-z0-9_.\-]{1,64}\|>|/?(?:tool_call|tool_response|tools)>)", re.IGNORECASE)


def _tool_call_block(name, arguments):
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    # a marker inside a JSON string is written \u003c..., as shared/prompt.py does
    return "<tool_call>\n" + _MARKER.sub(r"\\u003c", body) + "\n</tool_call>"


def decide(prompt, params=None):
    """Return the completion for ``prompt``: one ``<tool_call>`` block, or the answer text.

    Deterministic: the same prompt gives the same completion, whatever ``params`` holds.
    """
    tools, messages = _parse_prompt(prompt)
    user_text, made = _current_turn(messages)
    unused = list(made)
    sentences = []
    for clause in _clauses(user_text):
        intent = _intent(clause)
        if intent is None:
            sentences.append(f"You said: {clause}.")
            continue
        name, arguments = intent
        if name not in tools:
            sentences.append(f"The {name} tool is not available.")
            continue
        match = next(
            (item for item in unused if item[0]["name"] == name and item[0]["arguments"] == arguments), None
        )
        if match is None:
            return _tool_call_block(name, arguments)
        unused.remove(match)
        sentences.append(_sentence(name, arguments, match[1]))
    if not sentences:
        return "You said nothing I can act on."
    return " ".join(sentences)
