"""The tokenized preference batch that flows from `data` to the forward pass.

Layout (the concatenated batch, as in the original DPO code and TRL): rows 0..B-1 hold prompt+chosen, rows
B..2B-1 hold prompt+rejected for the same prompts in the same order. Sequences are right-padded to the
longest row of the batch. `labels` follows the Hugging Face convention: it holds the token id at every
response position and -100 at prompt and padding positions; the logit at position t predicts labels[t+1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class PreferenceBatch:
    """input_ids, attention_mask, labels: (2B, T) long tensors; see the module docstring for the layout."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device: torch.device | str) -> PreferenceBatch:
        return PreferenceBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device)
        )

    def num_response_tokens(self) -> int:
        """Response (label) tokens in the batch, chosen and rejected together."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())
