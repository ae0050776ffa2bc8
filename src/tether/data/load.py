"""`load_preference_data`: the one entry point the trainer calls (read, check, tokenize, truncate, count).

Every row read is either kept or skipped for exactly one reason; with on_bad_row="error" (the default) the
first bad row raises `DataError` instead. The form of the file is decided by its first row: if that row has
no `prompt`, rows without one use the implicit-prompt form; otherwise a missing `prompt` is `missing_field`.
A source that yields no usable row at all is an error in either mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from tether.data.dataset import PreferenceDataset, TokenizedPair
from tether.data.errors import BadRow, DataError, DataReport
from tether.data.rows import PreferenceExample, parse_row
from tether.data.sources import RowSource, open_source
from tether.data.tokenize import check_lengths, tokenize_examples, truncate_pair

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ON_BAD_ROW = ("error", "skip")
_CHUNK = 256  # rows tokenized per batched tokenizer call


def load_preference_data(
    source: Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    on_bad_row: str = "error",
    split: str = "train",
    subset: str | None = None,
    revision: str | None = None,
    progress: bool = True,
) -> tuple[PreferenceDataset, DataReport]:
    """Read `source`, check every row, tokenize as TRL does, truncate, and count what was kept and skipped.

    source: a .jsonl/.json/.parquet/.pq/.csv path, a folder saved with `datasets` save_to_disk, a folder of
        data files, a Hub data set id (`revision`, from the hub cache), or a `datasets.Dataset` /
        `DatasetDict` (`split` picks from a DatasetDict or folder, `subset` a folder's configuration).
    max_length / max_prompt_length: token limits, None for none (policy in `tether.data.tokenize`).
    on_bad_row: "error" raises `DataError` at the first bad row; "skip" counts it per reason and goes on.
    progress: show a tqdm bar over rows.
    Returns the dataset (file order) and the report, with report.kept == len(dataset).
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    check_lengths(max_length, max_prompt_length)
    rows = open_source(source, split=split, subset=subset, revision=revision)
    report = DataReport(source=rows.name, unit=rows.unit)
    dataset = PreferenceDataset()
    implicit_prompt: bool | None = None
    checked_template = False
    bar = tqdm(total=rows.count() if progress else None, desc=f"Reading {rows.name}", disable=not progress)
    try:
        for chunk in _chunks(iter(rows), _CHUNK):
            parsed: list[tuple[int, PreferenceExample | BadRow]] = []
            for number, row in chunk:
                if isinstance(row, BadRow):
                    parsed.append((number, row))
                    continue
                if implicit_prompt is None and isinstance(row, dict):
                    implicit_prompt = "prompt" not in row
                example = parse_row(row, implicit_prompt=bool(implicit_prompt))
                if isinstance(example, PreferenceExample) and example.conversational and not checked_template:
                    _check_chat_template(tokenizer, rows)
                    checked_template = True
                parsed.append((number, example))
            examples = [item for _, item in parsed if isinstance(item, PreferenceExample)]
            tokenized = iter(tokenize_examples(examples, tokenizer))
            for number, item in parsed:
                if isinstance(item, BadRow):
                    result: TokenizedPair | BadRow = item
                else:
                    limits = {"max_length": max_length, "max_prompt_length": max_prompt_length}
                    result = _truncate(next(tokenized), number, report, **limits)
                if isinstance(result, BadRow):
                    if on_bad_row == "error":
                        raise DataError.for_row(rows.name, rows.unit, number, result)
                    report.add_skip(result.reason, number)
                else:
                    dataset.append(result)
                    report.kept += 1
            bar.update(chunk[-1][0] - bar.n if rows.unit == "line" else len(chunk))
    finally:
        bar.close()
    if report.kept == 0:
        what = "has no rows" if report.total == 0 else "has no usable rows"
        raise DataError(f"{rows.name} {what}.\n{report.format_table()}", source=rows.name, reason="no_rows")
    return dataset, report


def _truncate(
    tokenized: Any, number: int, report: DataReport, *, max_length: int | None, max_prompt_length: int | None
) -> TokenizedPair | BadRow:
    if isinstance(tokenized, BadRow):
        return tokenized
    out = truncate_pair(*tokenized, max_length=max_length, max_prompt_length=max_prompt_length)
    if isinstance(out, BadRow):
        return out
    report.prompts_truncated += out.prompt_truncated
    report.responses_truncated += out.response_truncated
    return TokenizedPair(out.prompt_ids, out.chosen_ids, out.rejected_ids, row_number=number)


def _check_chat_template(tokenizer: PreTrainedTokenizerBase, rows: RowSource) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"{rows.name} holds conversational rows (lists of messages) but the tokenizer has no chat "
            "template; set tokenizer.chat_template, or give prompt/chosen/rejected as text",
            source=rows.name,
            reason="no_chat_template",
        )


def _chunks(items: Iterator[tuple[int, Any]], size: int) -> Iterator[list[tuple[int, Any]]]:
    while chunk := list(islice(items, size)):
        yield chunk
