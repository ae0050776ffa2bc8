"""Supervised fine-tuning of a toy model on (prompt, completion) pairs: the step that makes a reference.

Each example is tokenized as chat_template([user: prompt], add_generation_prompt=True) + completion + <eos>;
the loss is the mean cross-entropy over completion tokens (the <eos> included) of the batch, never over
prompt or padding tokens. Plain PyTorch AdamW at a constant learning rate; batches are drawn by
reshuffling the examples every epoch with a seeded RNG, so a run on CPU is deterministic for a fixed seed.
"""

from __future__ import annotations

import random

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.batch import IGNORE_INDEX


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of chat_template([user: prompt], add_generation_prompt=True): what the model continues."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example, both of length T; labels are IGNORE_INDEX on the prompt."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def collate(examples: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples: input_ids, attention_mask, labels, each (B, T)."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[tuple[str, str]],
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Fine-tune `model` in place for `steps` AdamW steps; returns the loss of every step (length `steps`).

    The model is left in eval mode. The loss is the token-level mean over the batch's completion tokens
    (shifted by one: the logit at position t predicts token t+1).
    """
    if not examples:
        raise ValueError("sft: no examples")
    encoded = [encode_example(tokenizer, prompt, completion) for prompt, completion in examples]
    rng = random.Random(seed)
    order: list[int] = []
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    device = next(model.parameters()).device
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc="sft", disable=not progress)
    for _ in bar:
        while len(order) < batch_size:
            # Refill with a fresh permutation; leftovers of the last epoch come first.
            permutation = list(range(len(encoded)))
            rng.shuffle(permutation)
            order += permutation
        batch_indices, order = order[:batch_size], order[batch_size:]
        batch = collate([encoded[i] for i in batch_indices], tokenizer.pad_token_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
