"""Scalar rewards for (prompt, completion) pairs, and win rates of policy samples against reference samples.

A reward is either a Python callable (prompt, completion) -> float (or a "module:function" string naming
one), or a reward model: `AutoModelForSequenceClassification` loaded from a local folder or a Hub id's
snapshot in the hub cache (`tether.hub`), safetensors weights only, `trust_remote_code` off. The reward
model's score is its first logit on the chat-templated conversation [user: prompt, assistant: completion]
when its tokenizer has a chat template, else on prompt + completion.

Win rate (per prompt i with policy rewards a_1..a_n and reference rewards b_1..b_m):
    w_i = (1 / (n m)) sum_j sum_l [1(a_j > b_l) + 0.5 * 1(a_j = b_l)]
and the win rate is the mean of w_i over prompts: ties count half, 0.5 means no difference.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from tether import hub
from tether.evaluate.verifiers import load_callable

RewardFn = Callable[[str, str], float]


class RewardModelScorer:
    """Scores (prompt, completion) pairs with a local sequence-classification reward model.

    Args:
        path: a folder holding config, tokenizer and *.safetensors weights, or a Hub id (org/name) whose
            snapshot is in the hub cache (fetched first when the Hub is reachable and not offline).
        device: where to run it; batch_size: pairs per forward pass; max_length: tokens kept (from the left).
    """

    def __init__(
        self, path: str, device: str | torch.device = "cpu", batch_size: int = 8, max_length: int = 2048
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if hub.is_hub_id(path):
            try:
                path = hub.local_path(path)
            except hub.HubError as exc:
                raise ValueError(f"reward model: {exc}") from None
        if not os.path.isdir(path):
            raise ValueError(f"reward model {path!r} is not a folder or a Hub id (org/name)")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, trust_remote_code=False, use_safetensors=True
        ).to(device)
        self.model.eval()
        self.device = torch.device(device)
        self.max_length = max_length
        pad = self.tokenizer.pad_token_id
        if self.model.config.pad_token_id is None and pad is not None:
            self.model.config.pad_token_id = pad
        # Without a pad id the model cannot find each row's last token in a padded batch: score one by one.
        self.batch_size = batch_size if self.model.config.pad_token_id is not None and pad is not None else 1

    def _text(self, prompt: str, completion: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                tokenize=False,
            )
        return prompt + completion

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        texts = [self._text(p, c) for p, c in zip(prompts, completions, strict=True)]
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                add_special_tokens=not templated,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            scores.extend(logits[:, 0].float().cpu().tolist())
        return scores


def load_reward(spec: str | RewardFn, device: str | torch.device = "cpu", batch_size: int = 8) -> Callable:
    """A reward from a spec: a callable, a "module:function" string, or a reward-model folder or Hub id.

    Returns a callable; `score_all` knows both kinds (per-pair callables and batch scorers).
    """
    if callable(spec):
        return spec
    if isinstance(spec, str) and (os.path.isdir(spec) or hub.is_hub_id(spec)):
        return RewardModelScorer(spec, device=device, batch_size=batch_size)
    return load_callable(spec, "reward")


def score_all(reward: Callable, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Rewards of aligned pairs: batched for a RewardModelScorer, one call per pair for a callable."""
    if len(prompts) != len(completions):
        raise ValueError(f"score_all: {len(prompts)} prompts but {len(completions)} completions")
    if isinstance(reward, RewardModelScorer):
        return reward(prompts, completions)
    return [float(reward(p, c)) for p, c in zip(prompts, completions)]


def win_rate(
    policy_rewards: Sequence[Sequence[float]], reference_rewards: Sequence[Sequence[float]]
) -> float:
    """Mean over prompts of the pairwise win rate of policy samples over reference samples (ties 1/2).

    Args:
        policy_rewards: (P, n) rewards of the policy's samples per prompt.
        reference_rewards: (P, m) rewards of the reference's samples for the same prompts.
    """
    if len(policy_rewards) != len(reference_rewards) or not policy_rewards:
        raise ValueError("win_rate: need the same, non-zero number of prompts on both sides")
    per_prompt = []
    for a, b in zip(policy_rewards, reference_rewards):
        a_arr, b_arr = np.asarray(a, dtype=np.float64)[:, None], np.asarray(b, dtype=np.float64)[None, :]
        if a_arr.size == 0 or b_arr.size == 0:
            raise ValueError("win_rate: every prompt needs at least one sample on each side")
        per_prompt.append(float(np.mean((a_arr > b_arr) + 0.5 * (a_arr == b_arr))))
    return float(np.mean(per_prompt))
