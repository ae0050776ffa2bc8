"""Bad-row reasons, the error raised for them, and the report that counts them.

Every row the loader reads ends up either kept or skipped with exactly one reason, a stable string id from
`BAD_ROW_REASONS` (dashboards and tests match on these ids; never rename one). `DataReport` keeps the counts
so that `kept + sum(skipped.values()) == total` holds by construction: `total` is derived, not stored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

# Reading the file.
INVALID_JSON = "invalid_json"
INVALID_UTF8 = "invalid_utf8"
NUMBER_TOO_LONG = "number_too_long"
NESTED_TOO_DEEP = "nested_too_deep"
LONE_SURROGATE = "lone_surrogate"
# Checking the fields of one row.
MISSING_FIELD = "missing_field"
NULL_FIELD = "null_field"
WRONG_TYPE = "wrong_type"
EMPTY_FIELD = "empty_field"
UNKNOWN_ROLE = "unknown_role"
IDENTICAL_RESPONSES = "identical_responses"
# Tokenizing.
TEMPLATE_ERROR = "template_error"
PROMPT_NOT_PREFIX = "prompt_not_prefix"
# Truncating.
PROMPT_TOO_LONG = "prompt_too_long"
EMPTY_RESPONSE_AFTER_TRUNCATION = "empty_response_after_truncation"
IDENTICAL_AFTER_TRUNCATION = "identical_after_truncation"

# Objects and lists nested deeper than this in a row are `nested_too_deep` (deeper ones would reach Python's
# recursion limit in the JSON parser, in comparisons or in the chat template).
MAX_NESTING = 100

# What to do about each reason; the error message quotes it.
REASON_FIXES: dict[str, str] = {
    INVALID_JSON: "fix the JSON on that line (a JSONL file holds one JSON object per line)",
    INVALID_UTF8: "re-encode the file as UTF-8",
    NUMBER_TOO_LONG: "write the number as a string, or drop it: Python reads integers of at most 4300 digits",
    NESTED_TOO_DEEP: f"flatten the row: objects and lists may be nested at most {MAX_NESTING} levels deep",
    LONE_SURROGATE: "replace the lone UTF-16 surrogate escape (\\ud800 to \\udfff without its pair) by the "
    "character meant, or remove it: it is not a character and no tokenizer can encode it",
    MISSING_FIELD: "add the field: every row needs 'chosen' and 'rejected', and 'prompt' unless the whole "
    "file uses the implicit-prompt form (its first row has no 'prompt'); every message needs 'role' and "
    "'content'",
    NULL_FIELD: "give the field a value",
    WRONG_TYPE: "give 'prompt', 'chosen' and 'rejected' all as text (standard format) or all as lists of "
    "{'role': ..., 'content': <string>} messages (conversational format)",
    EMPTY_FIELD: "give the field non-blank text or at least one message",
    UNKNOWN_ROLE: "use only the roles system, user, assistant and tool",
    IDENTICAL_RESPONSES: "drop or fix the row: a pair whose chosen and rejected responses are the same "
    "states no preference",
    TEMPLATE_ERROR: "the tokenizer's chat template rejected this conversation; fix the conversation "
    "(e.g. make user and assistant turns alternate) or the template",
    PROMPT_NOT_PREFIX: "use a chat template that renders the prompt (with add_generation_prompt=True) "
    "exactly as it renders the start of the full conversation, or, for text rows, end the prompt where a "
    "token ends (move a trailing space to the start of the responses)",
    PROMPT_TOO_LONG: "raise max_length, set max_prompt_length below max_length so that long prompts are "
    "cut from the left, or shorten the prompt",
    EMPTY_RESPONSE_AFTER_TRUNCATION: "give the response text that tokenizes to at least one token, or "
    "raise max_length",
    IDENTICAL_AFTER_TRUNCATION: "raise max_length so that the responses differ within it, or drop the row",
}

BAD_ROW_REASONS: tuple[str, ...] = tuple(REASON_FIXES)

SKIP_HINT = "or count and skip such rows with on_bad_row='skip' (config: data.on_bad_row=skip)"

# Row numbers remembered per reason, so a skip report can point at examples.
_EXAMPLE_ROWS = 5


@dataclass(frozen=True)
class BadRow:
    """Why one row cannot be used: a reason id, the offending field (None for the whole row), and details."""

    reason: str
    field: str | None
    detail: str


class DataError(ValueError):
    """A data problem, with a message naming the file, the row, the field, the reason and the fix.

    Attributes: source (file or dataset name), row (1-based line or row number, None for file-level
    problems), field (None when the whole row or file is at fault), reason (a `BAD_ROW_REASONS` id for row
    problems; `file_not_found`, `empty_file`, `unreadable_file`, `unknown_format`, `missing_split`,
    `no_chat_template` or `no_rows` for file-level ones).
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        row: int | None = None,
        field: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.source = source
        self.row = row
        self.field = field
        self.reason = reason

    @classmethod
    def for_row(cls, source: str, unit: str, row: int, bad: BadRow) -> DataError:
        """The error for a bad row, e.g. "train.jsonl, line 7, field 'chosen': identical_responses: ..."."""
        where = f"{source}, {unit} {row}"
        if bad.field is not None:
            where += f", field {bad.field!r}"
        message = f"{where}: {bad.reason}: {bad.detail}. To fix: {REASON_FIXES[bad.reason]}; {SKIP_HINT}."
        return cls(message, source=source, row=row, field=bad.field, reason=bad.reason)


@dataclass
class DataReport:
    """What the loader kept and skipped. `total` = kept + sum(skipped.values()), always.

    skipped: rows skipped per reason id (only reasons that occurred). example_rows: the first few row numbers
    skipped for each reason. prompts_truncated / responses_truncated: kept pairs whose prompt was cut to
    max_prompt_length / whose chosen or rejected response was cut to fit max_length.
    """

    source: str = ""
    unit: str = "row"
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    example_rows: dict[str, list[int]] = field(default_factory=dict)
    prompts_truncated: int = 0
    responses_truncated: int = 0

    @property
    def total(self) -> int:
        return self.kept + sum(self.skipped.values())

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def add_skip(self, reason: str, row: int) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        rows = self.example_rows.setdefault(reason, [])
        if len(rows) < _EXAMPLE_ROWS:
            rows.append(row)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "unit": self.unit,
            "total": self.total,
            "kept": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
            "example_rows": {k: list(v) for k, v in sorted(self.example_rows.items())},
            "prompts_truncated": self.prompts_truncated,
            "responses_truncated": self.responses_truncated,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataReport:
        """Inverse of `to_dict` (`total` is recomputed, not read)."""
        return cls(
            source=data.get("source", ""),
            unit=data.get("unit", "row"),
            kept=int(data["kept"]),
            skipped={k: int(v) for k, v in data.get("skipped", {}).items()},
            example_rows={k: [int(r) for r in v] for k, v in data.get("example_rows", {}).items()},
            prompts_truncated=int(data.get("prompts_truncated", 0)),
            responses_truncated=int(data.get("responses_truncated", 0)),
        )

    def write_json(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def format_table(self) -> str:
        """A plain-text table for the console, one line per count, skip reasons indented under `skipped`."""
        lines = [f"data: {self.source}"]
        rows: list[tuple[str, int, str]] = [("rows read", self.total, ""), ("kept", self.kept, "")]
        rows.append(("skipped", self.num_skipped, ""))
        for reason, count in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
            examples = self.example_rows.get(reason, [])
            more = ", ..." if count > len(examples) else ""
            unit = self.unit if count == 1 else f"{self.unit}s"
            where = f"({unit} {', '.join(map(str, examples))}{more})" if examples else ""
            rows.append((f"  {reason}", count, where))
        rows.append(("prompts truncated", self.prompts_truncated, ""))
        rows.append(("responses truncated", self.responses_truncated, ""))
        width = max(len(name) for name, _, _ in rows)
        digits = max(len(str(count)) for _, count, _ in rows)
        for name, count, note in rows:
            lines.append(f"  {name:<{width}}  {count:>{digits}}  {note}".rstrip())
        return "\n".join(lines)
