"""Sampling from a toy reference and turning scored samples into preference pairs (TRL's format).

Pairs are written in TRL's conversational format, one JSON object per line:

    {"prompt": [{"role": "user", "content": p}],
     "chosen": [{"role": "assistant", "content": c}],
     "rejected": [{"role": "assistant", "content": r}]}

with reward(p, c) > reward(p, r) strictly. A prompt whose samples all have the same reward gives no pair
and is counted in `PairingStats.skipped_all_tied`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.files import atomic_write
from tether.toy.sft import encode_prompt
from tether.toy.tasks import Task


@torch.no_grad()
def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    n: int,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    seed: int = 0,
    batch_size: int = 64,
) -> list[list[str]]:
    """n completions per prompt: result[i][j] is sample j of prompts[i], decoded without special tokens.

    Each prompt is formatted with the chat template (user turn, generation prompt); batches of
    `batch_size` prompts are left-padded and sampled with `model.generate` until <eos> or
    `max_new_tokens`. temperature == 0 means greedy decoding; otherwise pure temperature sampling (no top-k
    or top-p). The torch RNG is seeded with `seed` inside a forked RNG state, so the caller's RNG is
    untouched and the same arguments (batch_size included) give the same completions.
    """
    if temperature < 0:
        raise ValueError(f"sample_completions: temperature must be >= 0, got {temperature}")
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    results: list[list[str]] = []
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            length = max(len(ids) for ids in chunk)
            # Left padding: every prompt ends at the last column, where generation starts.
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (length - len(ids)) + ids for ids in chunk])
            attention_mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids in chunk])
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                num_return_sequences=n,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **(sampling if temperature > 0 else {"do_sample": False}),
            )
            texts = tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)
            # generate repeats each prompt n times in a row: rows i*n .. i*n+n-1 belong to prompt i.
            results += [texts[i * n : (i + 1) * n] for i in range(len(chunk))]
    model.train(was_training)
    return results


@dataclass
class PairingStats:
    """What `make_preference_pairs` did; counts are over prompts unless named otherwise."""

    num_prompts: int
    samples_per_prompt: int
    num_pairs: int
    skipped_all_tied: int  # prompts without two non-empty samples of different reward (no pair possible)
    empty_samples: int  # samples with an empty completion: never paired (tether's loader rejects them)
    mean_reward: float  # over all samples
    mean_chosen_reward: float  # over pairs; nan if there are none
    mean_rejected_reward: float  # over pairs; nan if there are none

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pair_indices(rewards: list[float], pairs_per_prompt: int = 1) -> list[tuple[int, int]]:
    """(chosen, rejected) sample indices for one prompt, with rewards[chosen] > rewards[rejected].

    Samples are ranked by reward, highest first, ties in sampling order. Pair k takes the k-th best and the
    k-th worst sample; pairing stops at the first k whose two rewards tie, so no sample is used twice and
    at most min(pairs_per_prompt, len(rewards) // 2) pairs come back. All rewards equal: no pair.
    Example: rewards [0, 1, 0, 1] -> ranking [1, 3, 0, 2] -> pairs [(1, 2), (3, 0)].
    """
    ranked = sorted(range(len(rewards)), key=lambda i: -rewards[i])  # sorted() is stable
    pairs = []
    for k in range(min(pairs_per_prompt, len(ranked) // 2)):
        best, worst = ranked[k], ranked[-1 - k]
        if rewards[best] <= rewards[worst]:
            break
        pairs.append((best, worst))
    return pairs


def make_preference_pairs(
    task: Task,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    samples_per_prompt: int,
    seed: int = 0,
    pairs_per_prompt: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int | None = None,
) -> tuple[list[dict[str, list[dict[str, str]]]], PairingStats]:
    """Sample from `model`, score with `task.reward`, and pair samples of the same prompt (`pair_samples`).

    With pairs_per_prompt=1 each prompt gives its best sample against its worst; empty completions are never
    paired (see `pair_samples`). max_new_tokens defaults to the task's.
    Returns (rows in TRL's conversational format, stats).
    """
    if samples_per_prompt < 2:
        raise ValueError(f"make_preference_pairs: samples_per_prompt must be >= 2, got {samples_per_prompt}")
    if max_new_tokens is None:
        max_new_tokens = task.max_new_tokens
    samples = sample_completions(
        model, tokenizer, prompts, samples_per_prompt, temperature, max_new_tokens, seed
    )
    rewards = [
        [task.reward(p, c) for c in completions] for p, completions in zip(prompts, samples, strict=True)
    ]
    return pair_samples(prompts, samples, rewards, pairs_per_prompt)


def pair_samples(
    prompts: list[str],
    completions: list[list[str]],
    rewards: list[list[float]],
    pairs_per_prompt: int = 1,
) -> tuple[list[dict[str, list[dict[str, str]]]], PairingStats]:
    """Preference pairs from scored samples: completions[i][j] of prompts[i] has reward rewards[i][j].

    Within each prompt, non-empty samples are paired by `pair_indices`. An empty completion (the model
    stopped at once) is never paired, an empty response being a bad row for tether's data loader; it is
    counted in `empty_samples` (its reward still counts in `mean_reward`). A prompt whose non-empty samples
    all tie gives no pair and is counted in `skipped_all_tied`. Every prompt must have the same number of
    samples. Returns (rows in TRL's conversational format, stats).
    """
    rows: list[dict[str, list[dict[str, str]]]] = []
    all_rewards: list[float] = []
    chosen_rewards: list[float] = []
    rejected_rewards: list[float] = []
    skipped = empty = 0
    for prompt, per_prompt, per_rewards in zip(prompts, completions, rewards, strict=True):
        if len(per_rewards) != len(per_prompt):
            raise ValueError(f"pair_samples: {len(per_prompt)} completions but {len(per_rewards)} rewards")
        all_rewards += per_rewards
        kept = [(c, r) for c, r in zip(per_prompt, per_rewards) if c.strip()]
        empty += len(per_prompt) - len(kept)
        kept_rewards = [r for _, r in kept]
        if len(set(kept_rewards)) < 2:
            skipped += 1
            continue
        for chosen, rejected in pair_indices(kept_rewards, pairs_per_prompt):
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": kept[chosen][0]}],
                    "rejected": [{"role": "assistant", "content": kept[rejected][0]}],
                }
            )
            chosen_rewards.append(kept_rewards[chosen])
            rejected_rewards.append(kept_rewards[rejected])
    stats = PairingStats(
        num_prompts=len(prompts),
        samples_per_prompt=len(completions[0]) if completions else 0,
        num_pairs=len(rows),
        skipped_all_tied=skipped,
        empty_samples=empty,
        mean_reward=_mean(all_rewards),
        mean_chosen_reward=_mean(chosen_rewards),
        mean_rejected_reward=_mean(rejected_rewards),
    )
    return rows, stats


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write one JSON object per line to `path` atomically (`tether.files.atomic_write`).

    A failure part-way (an exception from `rows`, a full disk) leaves any previous file at `path` intact.
    """
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
