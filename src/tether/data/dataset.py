"""Tokenized pairs, the dataset that holds them, and the collator that batches them into `PreferenceBatch`.

`PreferenceDataset` stores all token ids in three flat int32 arrays with offsets (4 bytes a token rather than
a Python int each) and builds a `TokenizedPair` on access; it pickles, so DataLoader workers can use it.

Padding: `PreferenceCollator(pad_token_id)` right-pads to the longest row of each batch. `attention_mask`,
not the pad id, says which tokens are real, so a tokenizer without a pad token can pass its eos id as the
pad id: an eos the data itself contains keeps attention_mask 1 and its label, padding gets 0 and -100.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from tether.batch import IGNORE_INDEX, PreferenceBatch

_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")


@dataclass(frozen=True)
class TokenizedPair:
    """One preference pair as token ids (lists of ints), and its 1-based row (or JSONL line) number."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    row_number: int


class PreferenceDataset(Dataset[TokenizedPair]):
    """A torch Dataset of `TokenizedPair`, in file order."""

    def __init__(self, pairs: Iterable[TokenizedPair] = ()) -> None:
        self._ids = {name: array("i") for name in _FIELDS}
        self._offsets = {name: array("q", [0]) for name in _FIELDS}
        self._rows = array("q")
        for pair in pairs:
            self.append(pair)

    def append(self, pair: TokenizedPair) -> None:
        for name in _FIELDS:
            self._ids[name].extend(getattr(pair, name))
            self._offsets[name].append(len(self._ids[name]))
        self._rows.append(pair.row_number)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> TokenizedPair:
        n = len(self._rows)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} pairs")
        index %= n
        ids = [
            self._ids[name][self._offsets[name][index] : self._offsets[name][index + 1]].tolist()
            for name in _FIELDS
        ]
        return TokenizedPair(*ids, row_number=self._rows[index])

    @property
    def row_numbers(self) -> list[int]:
        return self._rows.tolist()

    def lengths(self) -> list[int]:
        """Per pair, the longer of len(prompt+chosen) and len(prompt+rejected): the row length it pads to."""
        p, c, r = (self._offsets[name] for name in _FIELDS)
        return [(p[i + 1] - p[i]) + max(c[i + 1] - c[i], r[i + 1] - r[i]) for i in range(len(self._rows))]


@dataclass(frozen=True)
class PreferenceCollator:
    """Batches `TokenizedPair`s into a `PreferenceBatch` (layout in `tether.batch`).

    For B pairs: input_ids, attention_mask, labels of shape (2B, T), T = the longest prompt+response of the
    batch; rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected in the same order; right padding with
    pad_token_id; attention_mask 1 on real tokens; labels = input_ids on response tokens, IGNORE_INDEX (-100) on
    prompt and padding. If the tokenizer has no pad token, pass its eos id (see the module docstring).
    """

    pad_token_id: int

    def __post_init__(self) -> None:
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int):
            raise TypeError(
                f"pad_token_id must be an int, got {self.pad_token_id!r}; a tokenizer without a pad token "
                "can pass tokenizer.eos_token_id"
            )

    def __call__(self, pairs: Sequence[TokenizedPair]) -> PreferenceBatch:
        if not pairs:
            raise ValueError("cannot collate an empty list of pairs")
        sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs]
        sequences += [(p.prompt_ids, p.rejected_ids) for p in pairs]
        width = max(len(prompt) + len(response) for prompt, response in sequences)
        input_ids, attention_mask, labels = [], [], []
        for prompt, response in sequences:
            real = len(prompt) + len(response)
            pad = width - real
            input_ids.append([*prompt, *response] + [self.pad_token_id] * pad)
            attention_mask.append([1] * real + [0] * pad)
            labels.append([IGNORE_INDEX] * len(prompt) + list(response) + [IGNORE_INDEX] * pad)
        return PreferenceBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long),
            attention_mask=torch.tensor(attention_mask, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
        )
