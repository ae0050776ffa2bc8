"""The objectives' population optimum on a table policy (experiments/theory_check.py is the full study).

Each prompt has K one-token candidate responses with a reference distribution pi_ref and a reward r; pairs are
drawn from pi_ref x pi_ref and labelled by Bradley-Terry in r. Over the full pairwise population, H-DPO's loss
is minimized by pi* proportional to (pi_ref exp(r / beta))^(1 / alpha) (docs/objectives.md derives it), so a
table of logits trained through `tether.functional.preference_loss` must land on that closed form.
"""

from __future__ import annotations

import pytest
import torch

from tether.functional import preference_loss

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: extra threads only add overhead

BETA = 0.5
K = 6


def _problem(prompts: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ref = torch.log_softmax(torch.randn(prompts, K, generator=g, dtype=torch.float64), -1)
    return ref, torch.randn(prompts, K, generator=g, dtype=torch.float64)


def _pairs(prompts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt, chosen, rejected) of every ordered pair of distinct candidates."""
    p, i, j = torch.meshgrid(torch.arange(prompts), torch.arange(K), torch.arange(K), indexing="ij")
    keep = i != j
    return p[keep], i[keep], j[keep]


def _batch(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Two-position rows: position 0 holds the prompt's logits (predicting the candidate), position 1 nothing."""
    first = torch.cat([table[rows], table[rows]]).unsqueeze(1)
    return torch.cat([first, torch.zeros_like(first)], dim=1)


def _population_loss(logits, ref, rewards, name, **hparams):
    p, i, j = _pairs(ref.shape[0])
    weights = ref.exp()[p, i] * ref.exp()[p, j] * torch.sigmoid(rewards[p, i] - rewards[p, j])
    labels = torch.stack([torch.full((2 * p.numel(),), -100), torch.cat([i, j])], dim=1)
    losses, _ = preference_loss(name, _batch(logits, p), _batch(ref, p), labels, beta=BETA, **hparams)
    return (weights * losses).sum()


def _train(ref, rewards, name, **hparams) -> torch.Tensor:
    logits = ref.clone().requires_grad_(True)
    # One LBFGS call of at most 100 iterations: about 40 loss evaluations reach TV ~1e-7 on this problem.
    opt = torch.optim.LBFGS(
        [logits], max_iter=100, tolerance_grad=1e-10, tolerance_change=1e-16, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = _population_loss(logits, ref, rewards, name, **hparams)
        loss.backward()
        return loss

    opt.step(closure)
    return torch.softmax(logits.detach(), -1)


def _entropy(pi: torch.Tensor) -> torch.Tensor:
    return -(pi * pi.log()).sum(-1)


def test_hdpo_population_optimum_is_the_closed_form_and_entropy_rises_with_alpha():
    ref, rewards = _problem()
    entropies, optima = [], []
    for alpha in (0.7, 1.0, 1.2):
        name, hparams = ("dpo", {}) if alpha == 1.0 else ("hdpo", {"alpha": alpha})
        trained = _train(ref, rewards, name, **hparams)
        optimum = torch.softmax((ref + rewards / BETA) / alpha, -1)
        tv = 0.5 * (trained - optimum).abs().sum(-1)
        assert tv.max() < 1e-6, (alpha, tv)
        entropies.append(_entropy(trained))
        optima.append(optimum)
    # The closed forms are far apart, so reaching the right one is a real check.
    assert (0.5 * (optima[0] - optima[2]).abs().sum(-1)).min() > 0.05
    # Entropy rises with alpha on every prompt: sharpened below 1, flattened above.
    assert torch.all(entropies[0] < entropies[1]) and torch.all(entropies[1] < entropies[2])


def test_tdpo1_is_dpo_on_one_token_responses():
    """With one response token, D(x, y_w) = D(x, y_l) = KL(pi_ref || pi) at that position: TDPO1's delta is 0."""
    ref, rewards = _problem(prompts=2)
    logits = (ref + 0.3 * rewards).requires_grad_(True)
    dpo = _population_loss(logits, ref, rewards, "dpo")
    (g_dpo,) = torch.autograd.grad(dpo, logits)
    tdpo1 = _population_loss(logits, ref, rewards, "tdpo1")
    (g_tdpo1,) = torch.autograd.grad(tdpo1, logits)
    torch.testing.assert_close(tdpo1, dpo, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_tdpo1, g_dpo, rtol=1e-10, atol=1e-12)
    # TDPO2's stop-gradient on the chosen KL leaves the value equal but adds a pull towards pi_ref.
    tdpo2 = _population_loss(logits, ref, rewards, "tdpo2", alpha=0.5)
    (g_tdpo2,) = torch.autograd.grad(tdpo2, logits)
    torch.testing.assert_close(tdpo2, dpo, rtol=1e-12, atol=1e-12)
    assert (g_tdpo2 - g_dpo).abs().max() > 1e-3
