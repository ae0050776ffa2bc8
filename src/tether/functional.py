"""Functional API over materialized logits, for users with their own training loop.

    losses, metrics = preference_loss("tdpo2", policy_logits, ref_logits, labels, beta=0.1, alpha=0.5)
    losses, metrics = preference_loss("dpo", policy_logits, ref_logits, labels, beta=0.1, sft_weight=0.5)

Inputs follow the concatenated-batch layout of `tether.batch`: policy_logits and ref_logits are (2B, T, V)
for rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}], labels (2B, T) with -100 at every position
that is not a response token, and the logit at position t predicts labels[t+1]. Gradients flow to
policy_logits only. This path holds whole logits; the trainer uses `tether.heads` to avoid them.
"""

from __future__ import annotations

from typing import Any

import torch

from tether.heads import response_positions, token_stats_from_logits
from tether.objectives import build_objective
from tether.statistics import pair_stats, stat_request


def preference_loss(
    name: str,
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    entropy: bool = False,
    **hparams: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses (B,) and batch-mean metrics of objective `name` (see `tether.objectives.OBJECTIVES`).

    policy_logits, ref_logits: (2B, T, V); labels: (2B, T). entropy=True adds the `entropy/*` metrics.
    hparams may include `weight` and `sft_weight`: the loss is weight * objective + sft_weight * TRL's SFT
    term (`tether.objectives.sft_term`).
    Stateful objectives (epsilon_dpo) use the base beta given in hparams; the per-pair steps are returned
    as the metric `beta/steps` (B,), the only non-scalar entry.
    """
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(
            f"policy and reference logits differ in shape: {policy_logits.shape} vs {ref_logits.shape}"
        )
    if policy_logits.shape[:2] != labels.shape or labels.shape[0] % 2:
        raise ValueError(
            f"expected logits (2B, T, V) and labels (2B, T); got {tuple(policy_logits.shape)}, {tuple(labels.shape)}"
        )
    if {"entropy_target", "entropy_target_fraction"} & set(hparams):
        raise ValueError(
            "an entropy target moves alpha after each optimizer step, which one loss call cannot do: use the"
            " fixed alpha here, or build the objective with tether.objectives.build_objective and call its"
            " after_step(None, lambda: step_entropy) after each step of your loop (docs/objectives.md)"
        )
    objective = build_objective(name, **hparams)
    mask, targets = response_positions(labels)
    tokens = token_stats_from_logits(
        policy_logits[:, :-1][mask],
        targets,
        ref_logits[:, :-1][mask],
        request=stat_request(objective, entropy=entropy),
    )
    out = objective(pair_stats(tokens, mask))
    metrics = dict(out.metrics)
    if out.beta_steps is not None:
        metrics["beta/steps"] = out.beta_steps
    return out.losses, metrics
