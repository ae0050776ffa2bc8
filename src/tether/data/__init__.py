"""Preference data: read, check, tokenize (as TRL 1.16's DPOTrainer does), truncate, count, and collate.

    dataset, report = load_preference_data("train.jsonl", tokenizer, max_length=1024, max_prompt_length=512)
    collate = PreferenceCollator(tokenizer.pad_token_id)   # -> tether.batch.PreferenceBatch

Modules: `sources` (files to raw rows), `rows` (checking a row; the accepted formats), `tokenize`
(tokenization and the truncation policy), `dataset` (TokenizedPair, PreferenceDataset, PreferenceCollator),
`errors` (bad-row reason ids, DataError, DataReport), `load` (the entry point). docs/data.md is the user guide.
"""

from __future__ import annotations

from tether.data.dataset import PreferenceCollator, PreferenceDataset, TokenizedPair
from tether.data.errors import BAD_ROW_REASONS, REASON_FIXES, BadRow, DataError, DataReport
from tether.data.load import load_preference_data
from tether.data.rows import VALID_ROLES, PreferenceExample, parse_row, split_implicit_prompt
from tether.data.sources import RowSource, load_rows, open_source
from tether.data.tokenize import check_lengths, tokenize_example, tokenize_examples, truncate_pair

__all__ = [
    "BAD_ROW_REASONS",
    "REASON_FIXES",
    "VALID_ROLES",
    "BadRow",
    "DataError",
    "DataReport",
    "PreferenceCollator",
    "PreferenceDataset",
    "PreferenceExample",
    "RowSource",
    "TokenizedPair",
    "check_lengths",
    "load_preference_data",
    "load_rows",
    "open_source",
    "parse_row",
    "split_implicit_prompt",
    "tokenize_example",
    "tokenize_examples",
    "truncate_pair",
]
