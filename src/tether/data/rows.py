"""Checking one raw row and reading it as a preference example, in the formats TRL's DPOTrainer accepts.

Standard format: `prompt`, `chosen`, `rejected` are text. Conversational format: each is a list of
`{"role", "content"}` messages; the prompt is the conversation so far, chosen and rejected the messages that
continue it. Implicit-prompt form (TRL's `extract_prompt`): no `prompt`; `chosen` and `rejected` are full
texts or conversations and the prompt is their longest common prefix (see `split_implicit_prompt`).

`parse_row` returns a `PreferenceExample` or a `BadRow` with the first problem found, checking in this order:
the row is an object; no value in it is nested deeper than `MAX_NESTING` (`nested_too_deep`) and no text in
it, keys included, holds a lone UTF-16 surrogate (`lone_surrogate`: JSON's "\ud800" escape decodes to one, and
tokenizers raise on it); each field is present (`missing_field`), not null (`null_field`), text or a list
(`wrong_type`), all three of the same kind (`wrong_type`); text is not blank and message lists are not empty
(`empty_field`); each message is an object with a known `role` (`unknown_role`) and string `content`
(`wrong_type`); chosen differs from rejected (`identical_responses`, compared before tokenization).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from tether.data.errors import (
    EMPTY_FIELD,
    IDENTICAL_RESPONSES,
    INVALID_JSON,
    LONE_SURROGATE,
    MAX_NESTING,
    MISSING_FIELD,
    NESTED_TOO_DEEP,
    NULL_FIELD,
    UNKNOWN_ROLE,
    WRONG_TYPE,
    BadRow,
)

VALID_ROLES = ("system", "user", "assistant", "tool")
FIELDS = ("prompt", "chosen", "rejected")

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class PreferenceExample:
    """One checked row. prompt/chosen/rejected: all `str` (standard) or all message lists (conversational).

    tools and chat_template_kwargs are the row's optional `tools` (a list, or a JSON string of one) and
    `chat_template_kwargs` columns, passed to the chat template as TRL does; unused for standard rows.
    """

    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages
    tools: list[Any] | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list of messages"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def parse_row(row: Any, *, implicit_prompt: bool = False) -> PreferenceExample | BadRow:
    """Check `row` (a dict from `sources.load_rows`) and read it as a `PreferenceExample`.

    implicit_prompt: a row without `prompt` takes its prompt from the common prefix of chosen and rejected
    (the file is in the implicit-prompt form); when False, a missing `prompt` is `missing_field`.
    """
    if not isinstance(row, dict):
        return BadRow(
            WRONG_TYPE,
            None,
            f"a row must be an object with 'prompt', 'chosen' and 'rejected', got {_kind(row)}",
        )
    bad = check_values(row)
    if bad is not None:
        return bad
    implicit = implicit_prompt and "prompt" not in row
    names = FIELDS[1:] if implicit else FIELDS
    for name in names:
        if name not in row:
            return BadRow(MISSING_FIELD, name, f"the row has no {name!r} (it has {sorted(map(str, row))})")
        if row[name] is None:
            return BadRow(NULL_FIELD, name, f"{name!r} is null")
        if not isinstance(row[name], str | list):
            return BadRow(WRONG_TYPE, name, f"expected text or a list of messages, got {_kind(row[name])}")
    first = names[0]
    conversational = isinstance(row[first], list)
    for name in names[1:]:
        if isinstance(row[name], list) != conversational:
            return BadRow(
                WRONG_TYPE,
                name,
                f"{first!r} is {_kind(row[first])} but {name!r} is {_kind(row[name])}; all must be the same kind",
            )
    for name in names:
        bad = _check_messages(name, row[name]) if conversational else _check_text(name, row[name])
        if bad is not None:
            return bad
    if row["chosen"] == row["rejected"]:
        return BadRow(IDENTICAL_RESPONSES, "rejected", "'chosen' and 'rejected' are the same")
    if implicit:
        prompt, chosen, rejected = split_implicit_prompt(row["chosen"], row["rejected"])
        if not prompt:
            return BadRow(
                EMPTY_FIELD,
                "prompt",
                "the row has no 'prompt' and 'chosen' and 'rejected' share no leading "
                f"{'messages' if conversational else 'text'} to take it from",
            )
    else:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if not conversational:
        return PreferenceExample(prompt, chosen, rejected)
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            return BadRow(INVALID_JSON, "tools", f"'tools' is a string but not JSON ({exc.msg})")
    if tools is not None and not isinstance(tools, list):
        return BadRow(WRONG_TYPE, "tools", f"expected a list of tool schemas, got {_kind(tools)}")
    kwargs = row.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        return BadRow(WRONG_TYPE, "chat_template_kwargs", f"expected an object, got {_kind(kwargs)}")
    return PreferenceExample(prompt, chosen, rejected, tools=tools, chat_template_kwargs=kwargs)


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_values(row: dict[str, Any]) -> BadRow | None:
    """`nested_too_deep` or `lone_surrogate` for the first such value of `row`, walked without recursion (the row
    itself is level 1), else None. A surrogate names the path to its text (e.g. "chosen[0].content"), a nesting
    the top-level field that holds it."""
    stack: list[tuple[Any, str | None, str | None, int]] = [(row, None, None, 1)]
    while stack:
        value, where, top, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and (found := _SURROGATE.search(value)):
                return BadRow(
                    LONE_SURROGATE,
                    where,
                    f"{found.group()!r} at character {found.start()} is half of a UTF-16 pair, not a character",
                )
        elif isinstance(value, dict | list) and depth > MAX_NESTING:
            return BadRow(
                NESTED_TOO_DEEP, top, f"objects or lists nested more than {MAX_NESTING} levels deep"
            )
        elif isinstance(value, dict):
            inner = []
            for key, item in value.items():
                if isinstance(key, str) and _SURROGATE.search(key):
                    return BadRow(LONE_SURROGATE, where, f"the key {key!r} holds a lone surrogate")
                path = str(key) if where is None else f"{where}.{key}"
                inner.append((item, path, path if top is None else top, depth + 1))
            stack.extend(reversed(inner))
        elif isinstance(value, list):
            stack.extend(reversed([(v, f"{where}[{i}]", top, depth + 1) for i, v in enumerate(value)]))
    return None


def split_implicit_prompt(chosen: str | Messages, rejected: str | Messages) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) from two full texts or conversations, as TRL's `extract_prompt` splits them.

    The prompt is the longest common prefix (characters or messages). For text, a space just before the
    split goes to the responses ("The sky is" + " blue."). If one response is a prefix of the other, the
    prompt stops one item earlier so that both responses keep at least one item. Unlike TRL, a split at 0
    gives an empty prompt (TRL then looks at index -1); `parse_row` rejects that row.
    """
    n = min(len(chosen), len(rejected))
    split = n - 1
    for i in range(n):
        if chosen[i] != rejected[i]:
            split = i - 1 if i > 0 and chosen[i - 1] == " " else i
            break
    return chosen[:split], chosen[split:], rejected[split:]


def _check_text(name: str, text: str) -> BadRow | None:
    if not text.strip():
        return BadRow(EMPTY_FIELD, name, f"{name!r} is blank")
    return None


def _check_messages(name: str, messages: list[Any]) -> BadRow | None:
    if not messages:
        return BadRow(EMPTY_FIELD, name, f"{name!r} is an empty list of messages")
    blank = True
    for i, message in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            return BadRow(
                WRONG_TYPE,
                where,
                f"a message must be an object with 'role' and 'content', got {_kind(message)}",
            )
        if "role" not in message:
            return BadRow(MISSING_FIELD, f"{where}.role", "the message has no 'role'")
        role = message["role"]
        if role is None:
            return BadRow(NULL_FIELD, f"{where}.role", "'role' is null")
        if not isinstance(role, str):
            return BadRow(WRONG_TYPE, f"{where}.role", f"'role' must be text, got {_kind(role)}")
        if role not in VALID_ROLES:
            return BadRow(
                UNKNOWN_ROLE, f"{where}.role", f"role {role!r} is not one of {', '.join(VALID_ROLES)}"
            )
        # An assistant message that calls tools may have no content, as in the chat templates that support it.
        calls_tools = bool(message.get("tool_calls"))
        if calls_tools:
            blank = False
        if "content" not in message:
            if calls_tools:
                continue
            return BadRow(MISSING_FIELD, f"{where}.content", "the message has no 'content'")
        content = message["content"]
        if content is None:
            if calls_tools:
                continue
            return BadRow(NULL_FIELD, f"{where}.content", "'content' is null")
        if not isinstance(content, str):
            return BadRow(WRONG_TYPE, f"{where}.content", f"'content' must be a string, got {_kind(content)}")
        blank = blank and not content.strip()
    if blank:
        return BadRow(EMPTY_FIELD, name, f"every message of {name!r} has blank content")
    return None
