"""Tests for `tether.objectives`: hand-derived losses, identities between objectives, validation, epsilon-DPO's
adaptive beta and its state, and gradients.

Every numeric case is in float64 and written out in the docstring. Constants used throughout:
    softplus(-1) = log(1 + e^-1) = 0.31326168751822286   (= -log sigma(1))
    softplus(1)  = log(1 + e)    = 1.3132616875182228    (= -log sigma(-1)); softplus(1) - softplus(-1) = 1
    sigma(-1)    = 1 - sigma(1)  = 0.2689414213699951
    log 2                        = 0.6931471805599453
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tether.heads import StatRequest
from tether.objectives import (
    DPO,
    HDPO,
    IPO,
    OBJECTIVES,
    TDPO1,
    TDPO2,
    ConservativeDPO,
    EpsilonDPO,
    ObjectiveConfigError,
    PairStats,
    Stat,
    build_objective,
    dual_alpha_step,
    epsilon_steps,
    sft_term,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only add overhead


SOFTPLUS_M1 = 0.31326168751822286
SOFTPLUS_P1 = 1.3132616875182228
SIGMA_M1 = 0.2689414213699951
LOG2 = 0.6931471805599453
TOL = dict(rtol=0, atol=1e-12)


def t64(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def make_stats(pw, pl, rw, rl, grad: bool = True, **extra) -> PairStats:
    """PairStats from lists of per-pair values (float64); policy log-probs (and kl_*) require grad."""
    kwargs = {}
    for name, values in extra.items():
        kwargs[name] = t64(*values, grad=grad and name.startswith("kl_"))
    return PairStats(
        policy_chosen_logps=t64(*pw, grad=grad),
        policy_rejected_logps=t64(*pl, grad=grad),
        ref_chosen_logps=t64(*rw),
        ref_rejected_logps=t64(*rl),
        **kwargs,
    )


def assert_close(actual: torch.Tensor, expected, **tol) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.detach().to(torch.float64), expected, **(tol or TOL))


# Two pairs used by several tests (beta = 0.5):
#   pair 0: pw=-10, rw=-12, pl=-11, rl=-11 -> (pw-rw)=2,  (pl-rl)=0 -> margin  2 -> h =  1
#   pair 1: pw=-5,  rw=-4,  pl=-3,  rl=-4  -> (pw-rw)=-1, (pl-rl)=1 -> margin -2 -> h = -1
TWO_PAIRS = dict(pw=[-10.0, -5.0], pl=[-11.0, -3.0], rw=[-12.0, -4.0], rl=[-11.0, -4.0])


# --------------------------------------------------------------------------------------------------------------
# Hand-derived losses, one per objective
# --------------------------------------------------------------------------------------------------------------


def test_dpo_hand_derived_losses_and_metrics():
    """DPO, beta=0.5, TWO_PAIRS: h = [1, -1].

    losses = [softplus(-1), softplus(1)] = [0.31326168751822286, 1.3132616875182228]
    rewards: r_w = 0.5*(pw-rw) = [1, -0.5], r_l = 0.5*(pl-rl) = [0, 0.5]
    metrics: loss = (0.31326168751822286 + 1.3132616875182228)/2 = 0.8132616875182228
             rewards/chosen = (1 - 0.5)/2 = 0.25, rewards/rejected = (0 + 0.5)/2 = 0.25,
             rewards/margins = mean(1 - 0, -0.5 - 0.5) = mean(1, -1) = 0,
             rewards/accuracies = mean(1 > 0, -0.5 > 0.5) = 0.5,
             logps/chosen = mean(-10, -5) = -7.5, logps/rejected = mean(-11, -3) = -7,
             logratios/chosen = mean(pw - rw) = mean(2, -1) = 0.5, logratios/rejected = mean(0, 1) = 0.5.
    Metrics are detached (they must not keep the graph alive).
    """
    out = DPO(beta=0.5)(make_stats(**TWO_PAIRS))
    assert_close(out.losses, [SOFTPLUS_M1, SOFTPLUS_P1])
    assert_close(out.chosen_rewards, [1.0, -0.5])
    assert_close(out.rejected_rewards, [0.0, 0.5])
    expected = {
        "loss": 0.8132616875182228,
        "rewards/chosen": 0.25,
        "rewards/rejected": 0.25,
        "rewards/margins": 0.0,
        "rewards/accuracies": 0.5,
        "logps/chosen": -7.5,
        "logps/rejected": -7.0,
        "logratios/chosen": 0.5,
        "logratios/rejected": 0.5,
    }
    assert set(expected) <= set(out.metrics)
    for name, value in expected.items():
        assert_close(out.metrics[name], value)
        assert not out.metrics[name].requires_grad, name
    assert out.beta_steps is None


def test_entropy_metric_is_token_mean():
    """entropy/chosen = sum of summed entropies / sum of lengths: ([3, 5] -> 8) / ([2, 6] -> 8) = 1.0;
    entropy/rejected = ([1, 2] -> 3) / ([3, 3] -> 6) = 0.5. Absent without lengths or entropy."""
    stats = make_stats(
        **TWO_PAIRS,
        entropy_chosen=[3.0, 5.0],
        entropy_rejected=[1.0, 2.0],
        chosen_lengths=[2.0, 6.0],
        rejected_lengths=[3.0, 3.0],
    )
    out = DPO(beta=0.5)(stats)
    assert_close(out.metrics["entropy/chosen"], 1.0)
    assert_close(out.metrics["entropy/rejected"], 0.5)
    assert "entropy/chosen" not in DPO(beta=0.5)(make_stats(**TWO_PAIRS)).metrics


def test_ipo_hand_derived():
    """IPO (Azar et al. eq. 17), beta=0.5 so 1/(2 beta) = 1. TWO_PAIRS: q = margin = [2, -2].

    losses = [(2 - 1)^2, (-2 - 1)^2] = [1, 9]; rewards r_w = 0.5*[2, -1] = [1, -0.5], r_l = [0, 0.5].
    """
    out = IPO(beta=0.5)(make_stats(**TWO_PAIRS))
    assert_close(out.losses, [1.0, 9.0])
    assert_close(out.chosen_rewards, [1.0, -0.5])
    assert_close(out.rejected_rewards, [0.0, 0.5])


def test_ipo_length_normalized_hand_derived():
    """IPO with length_normalize=True (TRL's `ipo`), beta=0.5, TWO_PAIRS, lengths chosen [4, 1], rejected [3, 2]:
    pair 0: chosen ratio 2/4 = 0.5, rejected 0/3 = 0  -> q = 0.5  -> (0.5 - 1)^2 = 0.25
    pair 1: chosen ratio -1/1 = -1, rejected 1/2 = 0.5 -> q = -1.5 -> (-1.5 - 1)^2 = 6.25
    rewards (beta times the summed log-ratios, as TRL logs them for ipo): r_w = [1, -0.5], r_l = [0, 0.5].
    Without lengths the objective must refuse (it cannot silently fall back to summed log-probs).
    """
    ipo = IPO(beta=0.5, length_normalize=True)
    assert ipo.needs == frozenset({Stat.LENGTHS})
    assert IPO(beta=0.5).needs == frozenset()
    out = ipo(make_stats(**TWO_PAIRS, chosen_lengths=[4.0, 1.0], rejected_lengths=[3.0, 2.0]))
    assert_close(out.losses, [0.25, 6.25])
    assert_close(out.chosen_rewards, [1.0, -0.5])
    assert_close(out.rejected_rewards, [0.0, 0.5])
    with pytest.raises(ValueError, match="chosen_lengths"):
        ipo(make_stats(**TWO_PAIRS))


def test_cdpo_hand_derived():
    """cDPO, beta=0.5, label_smoothing e=0.25, TWO_PAIRS (h = [1, -1]):
    loss(h) = -(1-e) log sigma(h) - e log sigma(-h) = 0.75 softplus(-h) + 0.25 softplus(h)
    pair 0: 0.75*0.31326168751822286 + 0.25*1.3132616875182228 = 0.31326168751822286 + 0.25 = 0.5632616875182228
    pair 1: 0.75*1.3132616875182228 + 0.25*0.31326168751822286 = 0.31326168751822286 + 0.75 = 1.0632616875182228
    """
    out = ConservativeDPO(beta=0.5, label_smoothing=0.25)(make_stats(**TWO_PAIRS))
    assert_close(out.losses, [SOFTPLUS_M1 + 0.25, SOFTPLUS_M1 + 0.75])
    assert_close(out.chosen_rewards, [1.0, -0.5])


def test_hdpo_hand_derived():
    """H-DPO, beta=0.5, alpha=0.5: pw=-4, rw=-3, pl=-6, rl=-2.
    alpha*pw - rw = -2 + 3 = 1; alpha*pl - rl = -3 + 2 = -1; h = 0.5*(1 - (-1)) = 1 -> loss 0.31326168751822286.
    Rewards with the same alpha: r_w = 0.5*1 = 0.5, r_l = 0.5*(-1) = -0.5.
    (DPO on the same numbers has margin (-1) - (-4) = 3, h = 1.5: a different loss, so alpha is really used.)
    """
    stats = make_stats(pw=[-4.0], pl=[-6.0], rw=[-3.0], rl=[-2.0])
    out = HDPO(beta=0.5, alpha=0.5)(stats)
    assert_close(out.losses, [SOFTPLUS_M1])
    assert_close(out.chosen_rewards, [0.5])
    assert_close(out.rejected_rewards, [-0.5])
    assert_close(DPO(beta=0.5)(stats).losses, [math.log1p(math.exp(-1.5))])


# epsilon-DPO, beta=0.5, epsilon=0.25: beta/(1+e) = 0.4, beta/(1-e) = 2/3. Three pairs, all with h = beta_i*margin = 1:
#   A (s=+1): z = pw-pl = -10-(-12) = 2, z+ = -9-(-12) = 3, z- = -11-(-12) = 1 -> z+ > z > z- ; margin 2.5 (rw-rl = -0.5)
#   B (s=-1): z = 2, z+ = 1, z- = 3 -> z- > z > z+                                        ; margin 1.5 (rw-rl = 0.5)
#   C (s= 0): z = 2, z+ = 3, z- = 3 -> neither ordering                                  ; margin 2   (rw-rl = 0)
EPS_PAIRS = dict(
    pw=[-10.0, -10.0, -10.0],
    pl=[-12.0, -12.0, -12.0],
    rw=[-12.0, -11.0, -11.0],
    rl=[-11.5, -11.5, -11.0],
    relaxed_chosen_logps=[-9.0, -11.0, -9.0],
    relaxed_rejected_logps=[-12.0, -12.0, -12.0],
    tightened_chosen_logps=[-11.0, -9.0, -9.0],
    tightened_rejected_logps=[-12.0, -12.0, -12.0],
)


def test_epsilon_dpo_hand_derived():
    """epsilon-DPO on EPS_PAIRS (beta=0.5, e=0.25): s = [+1, -1, 0], beta_i = 0.5/(1 + 0.25 s) = [0.4, 2/3, 0.5].
    h = beta_i * margin = [0.4*2.5, (2/3)*1.5, 0.5*2] = [1, 1, 1] -> every loss 0.31326168751822286.
    rewards r_w = beta_i*(pw - rw) = [0.4*2, (2/3)*1, 0.5*1] = [0.8, 2/3, 0.5];
            r_l = beta_i*(pl - rl) = [0.4*(-0.5), (2/3)*(-0.5), 0.5*(-1)] = [-0.2, -1/3, -0.5].
    metrics: beta/mean = (0.4 + 2/3 + 0.5)/3 = 0.5222222222222223, beta/base = 0.5,
             beta/relaxed_frac = beta/tightened_frac = 1/3.
    """
    obj = EpsilonDPO(beta=0.5, epsilon=0.25)
    out = obj(make_stats(**EPS_PAIRS))
    assert_close(out.beta_steps, [1.0, -1.0, 0.0])
    assert_close(out.losses, [SOFTPLUS_M1] * 3)
    assert_close(out.chosen_rewards, [0.8, 2 / 3, 0.5])
    assert_close(out.rejected_rewards, [-0.2, -1 / 3, -0.5])
    assert_close(out.metrics["beta/mean"], 0.5222222222222223)
    assert_close(out.metrics["beta/base"], 0.5)
    assert_close(out.metrics["beta/relaxed_frac"], 1 / 3)
    assert_close(out.metrics["beta/tightened_frac"], 1 / 3)
    assert obj.needs == frozenset({Stat.PERTURBED}) and obj.needs_reference_distribution


def test_tdpo1_hand_derived():
    """TDPO1, beta=0.5: margin 3 (pw=-1, rw=-2, pl=-4, rl=-2 -> 1 - (-2)), kl_w=0.5, kl_l=1.5.
    u = 0.5*3 = 1.5; delta = 0.5*1.5 - 0.5*0.5 = 0.5; loss = softplus(-(u - delta)) = softplus(-1) = 0.31326168751822286.
    metrics kl/seq_chosen = 0.5, kl/seq_rejected = 1.5.
    """
    stats = make_stats(pw=[-1.0], pl=[-4.0], rw=[-2.0], rl=[-2.0], kl_chosen=[0.5], kl_rejected=[1.5])
    obj = TDPO1(beta=0.5)
    out = obj(stats)
    assert_close(out.losses, [SOFTPLUS_M1])
    assert_close(out.metrics["kl/seq_chosen"], 0.5)
    assert_close(out.metrics["kl/seq_rejected"], 1.5)
    assert obj.needs == frozenset({Stat.TOKEN_KL}) and obj.needs_reference_distribution


def test_tdpo2_hand_derived():
    """TDPO2, beta=0.5, alpha=0.5: margin 2.5 (pw=-1, rw=-2, pl=-3.5, rl=-2 -> 1 - (-1.5)), kl_w=0.5, kl_l=1.5.
    u = 1.25; delta = 0.5*1.5 - 0.5*0.5 = 0.5; u - alpha*delta = 1.25 - 0.25 = 1 -> loss 0.31326168751822286.
    (TDPO1 on the same numbers: u - delta = 0.75 -> softplus(-0.75), a different value.)
    """
    stats = make_stats(pw=[-1.0], pl=[-3.5], rw=[-2.0], rl=[-2.0], kl_chosen=[0.5], kl_rejected=[1.5])
    assert_close(TDPO2(beta=0.5, alpha=0.5)(stats).losses, [SOFTPLUS_M1])
    assert_close(TDPO1(beta=0.5)(stats).losses, [math.log1p(math.exp(-0.75))])


@pytest.mark.parametrize("name", ["epsilon_dpo", "tdpo1", "tdpo2"])
def test_entropy_alpha_composition_hand_derived(name):
    """H-DPO's alpha composed with epsilon-DPO / TDPO: entropy_alpha=0.5, beta=0.5 on the H-DPO case
    (pw=-4, rw=-3, pl=-6, rl=-2 -> h = 1), with every step 0 (perturbed = policy) and kl = 0 -> softplus(-1).
    """
    stats = make_stats(
        pw=[-4.0],
        pl=[-6.0],
        rw=[-3.0],
        rl=[-2.0],
        relaxed_chosen_logps=[-4.0],
        relaxed_rejected_logps=[-6.0],
        tightened_chosen_logps=[-4.0],
        tightened_rejected_logps=[-6.0],
        kl_chosen=[0.0],
        kl_rejected=[0.0],
    )
    obj = build_objective(name, beta=0.5, entropy_alpha=0.5)
    out = obj(stats)
    assert_close(out.losses, [SOFTPLUS_M1])
    assert_close(out.chosen_rewards, [0.5])
    assert_close(out.rejected_rewards, [-0.5])


# --------------------------------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------------------------------

RANDOM_PAIRS = dict(
    pw=[-12.3, -40.1, -7.7, -3.0],
    pl=[-15.2, -38.0, -9.9, -3.0],
    rw=[-13.0, -41.5, -6.0, -2.5],
    rl=[-14.1, -37.2, -10.4, -3.5],
)


def _grads(loss: torch.Tensor, stats: PairStats) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.autograd.grad(loss.sum(), (stats.policy_chosen_logps, stats.policy_rejected_logps))


def test_hdpo_alpha_one_is_dpo_exactly():
    """H-DPO with alpha=1 is DPO: equal losses and rewards bit for bit, and equal gradients."""
    s1, s2 = make_stats(**RANDOM_PAIRS), make_stats(**RANDOM_PAIRS)
    dpo, hdpo = DPO(beta=0.3)(s1), HDPO(beta=0.3, alpha=1.0)(s2)
    assert torch.equal(dpo.losses, hdpo.losses)
    assert torch.equal(dpo.chosen_rewards, hdpo.chosen_rewards)
    assert torch.equal(dpo.rejected_rewards, hdpo.rejected_rewards)
    for a, b in zip(_grads(dpo.losses, s1), _grads(hdpo.losses, s2)):
        assert torch.equal(a, b)
    # and alpha != 1 really differs (the identity is not vacuous)
    assert not torch.allclose(HDPO(beta=0.3, alpha=0.9)(s2).losses, dpo.losses)


def test_epsilon_dpo_with_zero_steps_is_dpo():
    """epsilon-DPO where every s_i = 0 (perturbed log-probs equal the policy's: z+ = z = z-) uses beta_i = beta:
    equal losses, rewards and gradients as DPO."""
    p = RANDOM_PAIRS
    same = dict(
        relaxed_chosen_logps=p["pw"],
        relaxed_rejected_logps=p["pl"],
        tightened_chosen_logps=p["pw"],
        tightened_rejected_logps=p["pl"],
    )
    s1, s2 = make_stats(**p), make_stats(**p, **same)
    dpo, eps = DPO(beta=0.3)(s1), EpsilonDPO(beta=0.3, epsilon=0.5)(s2)
    assert torch.equal(eps.beta_steps, torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(eps.losses, dpo.losses, **TOL)
    torch.testing.assert_close(eps.chosen_rewards, dpo.chosen_rewards, **TOL)
    for a, b in zip(_grads(dpo.losses, s1), _grads(eps.losses, s2)):
        torch.testing.assert_close(a, b, **TOL)


def test_cdpo_without_smoothing_is_dpo():
    """cDPO with label_smoothing=0: -(1-0) log sigma(h) - 0 * log sigma(-h) = DPO's loss exactly, also for large |h|."""
    p = dict(
        RANDOM_PAIRS, pw=[-12.3, -40.1, -7.7, 500.0]
    )  # last pair: h = 0.3*502.5, log sigma(-h) ~ -150.75
    s1, s2 = make_stats(**p), make_stats(**p)
    dpo, cdpo = DPO(beta=0.3)(s1), ConservativeDPO(beta=0.3, label_smoothing=0.0)(s2)
    assert torch.equal(dpo.losses, cdpo.losses)
    for a, b in zip(_grads(dpo.losses, s1), _grads(cdpo.losses, s2)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [TDPO1, TDPO2])
def test_tdpo_with_zero_kl_is_dpo_and_log2_at_reference(cls):
    """TDPO with kl_chosen = kl_rejected = 0: delta = 0, so the loss is DPO's. At policy == reference (and KL 0)
    u = 0 and the loss is -log sigma(0) = log 2 = 0.6931471805599453."""
    zeros = dict(kl_chosen=[0.0] * 4, kl_rejected=[0.0] * 4)
    torch.testing.assert_close(
        cls(beta=0.3)(make_stats(**RANDOM_PAIRS, **zeros)).losses,
        DPO(beta=0.3)(make_stats(**RANDOM_PAIRS)).losses,
        **TOL,
    )
    p = RANDOM_PAIRS
    at_ref = make_stats(pw=p["pw"], pl=p["pl"], rw=p["pw"], rl=p["pl"], **zeros)
    assert_close(cls(beta=0.3)(at_ref).losses, [LOG2] * 4)


def _h(stats: PairStats, beta: float, alpha: float = 1.0) -> torch.Tensor:
    return (
        beta
        * (
            (alpha * stats.policy_chosen_logps - stats.ref_chosen_logps)
            - (alpha * stats.policy_rejected_logps - stats.ref_rejected_logps)
        ).detach()
    )


def test_swapped_maps_h_to_minus_h():
    """Swapping chosen and rejected maps h to -h, so each loss becomes its formula at -h:
    DPO: softplus(h); H-DPO: softplus(h_alpha); cDPO: (1-e) softplus(h) + e softplus(-h);
    IPO: (-q - 1/(2 beta))^2; TDPO1: softplus(u - delta); TDPO2: softplus(u - alpha*delta) (u, delta of the
    unswapped pairs). Rewards swap too: chosen rewards of the swapped pairs are the rejected ones."""
    stats = make_stats(**RANDOM_PAIRS, kl_chosen=[0.2, 1.0, 0.0, 3.0], kl_rejected=[0.7, 0.1, 2.0, 3.0])
    sw = stats.swapped()
    assert sw.policy_chosen_logps is stats.policy_rejected_logps
    assert sw.kl_chosen is stats.kl_rejected and sw.kl_rejected is stats.kl_chosen
    beta, e = 0.3, 0.2
    h = _h(stats, beta)
    q = h / beta
    kl_w, kl_l = stats.kl_chosen.detach(), stats.kl_rejected.detach()
    delta = beta * kl_l - beta * kl_w
    cases = [
        (DPO(beta=beta), F.softplus(h)),
        (HDPO(beta=beta, alpha=0.7), F.softplus(_h(stats, beta, 0.7))),
        (ConservativeDPO(beta=beta, label_smoothing=e), (1 - e) * F.softplus(h) + e * F.softplus(-h)),
        (IPO(beta=beta), (-q - 1 / (2 * beta)) ** 2),
        (TDPO1(beta=beta), F.softplus(h - delta)),
        (TDPO2(beta=beta, alpha=0.5), F.softplus(h - 0.5 * delta)),
    ]
    for obj, expected in cases:
        out, out_sw = obj(stats), obj(sw)
        torch.testing.assert_close(out_sw.losses.detach(), expected, **TOL, msg=repr(obj))
        torch.testing.assert_close(out_sw.chosen_rewards, out.rejected_rewards, **TOL)


def test_swapped_epsilon_dpo_flips_the_step():
    """epsilon-DPO's step is not symmetric under the swap: z, z+, z- all change sign, so z+ > z > z- becomes
    z- > z > z+ and s -> -s (EPS_PAIRS: [1, -1, 0] -> [-1, 1, 0]). With beta_i' = beta/(1 - e s) the swapped
    loss is softplus(beta_i' * margin): margins [2.5, 1.5, 2], beta_i' = [2/3, 0.4, 0.5] -> h' = [5/3, 0.6, 1].
    """
    stats = make_stats(**EPS_PAIRS)
    out = EpsilonDPO(beta=0.5, epsilon=0.25)(stats.swapped())
    assert_close(out.beta_steps, [-1.0, 1.0, 0.0])
    expected = [math.log1p(math.exp(5 / 3)), math.log1p(math.exp(0.6)), SOFTPLUS_P1]
    assert_close(out.losses, expected)


# --------------------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------------------


def test_dpo_gradient_hand_derived():
    """dL/dpw = -beta*(1 - sigma(h)) = -0.5*sigma(-1) = -0.13447071068499755 at h = 1 (pair 0 of TWO_PAIRS);
    dL/dpl = +0.13447071068499755. Reference log-probs carry no gradient."""
    stats = make_stats(pw=[-10.0], pl=[-11.0], rw=[-12.0], rl=[-11.0])
    g_w, g_l = _grads(DPO(beta=0.5)(stats).losses, stats)
    assert_close(g_w, [-0.13447071068499755])
    assert_close(g_l, [0.13447071068499755])


def test_tdpo_kl_gradients_hand_derived():
    """TDPO2 (beta=0.5, alpha=0.5) on the TDPO2 hand case (x = u - alpha*delta = 1, loss = -log sigma(x)):
    dL/dx = -(1 - sigma(1)) = -sigma(-1); x = u - alpha*beta*kl_l + alpha*sg(beta*kl_w), so
      dL/dkl_chosen   = 0                                    (stop-gradient)
      dL/dkl_rejected = -sigma(-1) * (-alpha*beta) = +alpha*beta*(1 - sigma(1)) = 0.25*0.2689414213699951
                      = 0.06723535534249878
    (the gradient of the maximized log sigma(x) is the negative of this: -alpha*beta*(1 - sigma(x))).
    TDPO1 on its own hand case (x = u - beta*kl_l + beta*kl_w = 1) has no stop-gradient:
      dL/dkl_chosen = -beta*sigma(-1) = -0.13447071068499755, dL/dkl_rejected = +0.13447071068499755.
    """
    s2 = make_stats(pw=[-1.0], pl=[-3.5], rw=[-2.0], rl=[-2.0], kl_chosen=[0.5], kl_rejected=[1.5])
    loss2 = TDPO2(beta=0.5, alpha=0.5)(s2).losses.sum()
    g_w, g_l = torch.autograd.grad(loss2, (s2.kl_chosen, s2.kl_rejected), allow_unused=True)
    assert g_w is None  # no path from kl_chosen to the loss: its gradient is exactly 0
    assert_close(g_l, [0.06723535534249878])
    s1 = make_stats(pw=[-1.0], pl=[-4.0], rw=[-2.0], rl=[-2.0], kl_chosen=[0.5], kl_rejected=[1.5])
    g_w, g_l = torch.autograd.grad(TDPO1(beta=0.5)(s1).losses.sum(), (s1.kl_chosen, s1.kl_rejected))
    assert_close(g_w, [-0.13447071068499755])
    assert_close(g_l, [0.13447071068499755])


GRADCHECK_CASES = [
    ("dpo", dict(beta=0.3)),
    ("ipo", dict(beta=0.3)),
    ("ipo", dict(beta=0.3, length_normalize=True)),
    ("cdpo", dict(beta=0.3, label_smoothing=0.2)),
    ("hdpo", dict(beta=0.3, alpha=0.8)),
    ("epsilon_dpo", dict(beta=0.5, epsilon=0.25, entropy_alpha=0.9)),
    ("tdpo1", dict(beta=0.3)),
    ("tdpo2", dict(beta=0.3, alpha=0.5, entropy_alpha=1.1)),
]


@pytest.mark.parametrize("name,hparams", GRADCHECK_CASES)
def test_gradcheck(name, hparams):
    """Analytic gradients of the per-pair losses wrt the policy log-probs (and the kl terms for TDPO) agree with
    finite differences in float64. TDPO2's kl_chosen sits under a stop-gradient (finite differences see it, the
    gradient by design does not), so it is held fixed there and only kl_rejected is checked. epsilon-DPO uses
    EPS_PAIRS, whose steps are 1 or more away from any tie, so a 1e-6 perturbation cannot change s."""
    obj = build_objective(name, **hparams)
    base = make_stats(
        **EPS_PAIRS, chosen_lengths=[3.0, 5.0, 2.0], rejected_lengths=[4.0, 1.0, 6.0], grad=False
    )
    base.kl_chosen, base.kl_rejected = t64(0.3, 1.2, 0.0), t64(0.8, 0.1, 2.5)
    names = ["policy_chosen_logps", "policy_rejected_logps"]
    names += {"tdpo1": ["kl_chosen", "kl_rejected"], "tdpo2": ["kl_rejected"]}.get(name, [])
    inputs = [getattr(base, n).clone().requires_grad_() for n in names]

    def loss(*xs):
        return obj(PairStats(**{**base.__dict__, **dict(zip(names, xs))})).losses

    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# epsilon-DPO: steps, base beta, state
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "z,z_plus,z_minus,expected",
    [
        (2.0, 3.0, 1.0, 1.0),  # z+ > z > z-: relax
        (2.0, 1.0, 3.0, -1.0),  # z- > z > z+: tighten
        (2.0, 3.0, 3.0, 0.0),  # both above z
        (2.0, 1.0, 1.0, 0.0),  # both below z
        (2.0, 2.0, 1.0, 0.0),  # z+ == z: boundary, not strictly ordered
        (2.0, 3.0, 2.0, 0.0),  # z- == z: boundary
        (2.0, 2.0, 3.0, 0.0),  # z+ == z on the tighten side
        (2.0, 2.0, 2.0, 0.0),  # all equal
        (-1.5, -0.5, -2.5, 1.0),  # negative preference logits order the same way
    ],
)
def test_epsilon_steps_cases(z, z_plus, z_minus, expected):
    """s = +1 iff z+ > z > z-, -1 iff z- > z > z+, else 0 (equality at a boundary gives 0). Each case is one pair
    with rejected log-probs 0 under all three policies, so z = pw, z+ = relaxed_w, z- = tightened_w."""
    stats = make_stats(
        pw=[z],
        pl=[0.0],
        rw=[0.0],
        rl=[0.0],
        relaxed_chosen_logps=[z_plus],
        relaxed_rejected_logps=[0.0],
        tightened_chosen_logps=[z_minus],
        tightened_rejected_logps=[0.0],
    )
    s = epsilon_steps(stats)
    assert_close(s, [expected])
    assert s.dtype == torch.float64 and not s.requires_grad


def test_epsilon_steps_ties_between_chosen_and_rejected():
    """chosen == rejected under every policy (z = z+ = z- = 0, the same response twice) gives s = 0, whatever the
    log-prob values."""
    v = [-3.0, -7.5, 0.0]
    stats = make_stats(
        pw=v,
        pl=v,
        rw=[-1.0, -2.0, -3.0],
        rl=[-1.0, -2.0, -3.0],
        relaxed_chosen_logps=[-2.0, -8.0, -1.0],
        relaxed_rejected_logps=[-2.0, -8.0, -1.0],
        tightened_chosen_logps=[-4.0, -7.0, -0.5],
        tightened_rejected_logps=[-4.0, -7.0, -0.5],
    )
    assert_close(epsilon_steps(stats), [0.0, 0.0, 0.0])


def _eps_microbatch(steps: list[float]) -> PairStats:
    """One pair per step value, each with z = 2, margin 2 and z+/z- chosen to give that step."""
    zp = {1.0: 3.0, -1.0: 1.0, 0.0: 3.0}
    zm = {1.0: 1.0, -1.0: 3.0, 0.0: 3.0}
    n = len(steps)
    return make_stats(
        pw=[-10.0] * n,
        pl=[-12.0] * n,
        rw=[-11.0] * n,
        rl=[-11.0] * n,
        relaxed_chosen_logps=[-12.0 + zp[s] for s in steps],
        relaxed_rejected_logps=[-12.0] * n,
        tightened_chosen_logps=[-12.0 + zm[s] for s in steps],
        tightened_rejected_logps=[-12.0] * n,
    )


def test_epsilon_base_beta_update_over_two_micro_batches():
    """One optimizer step of 2 micro-batches (beta=0.5, e=0.25): micro-batch 1 has s = [+1, +1, 0], micro-batch 2
    s = [-1, +1]. m = mean over the step's 5 pairs = (1 + 1 + 0 - 1 + 1)/5 = 0.4 (the mean of the micro-batch
    means, (2/3 + 0)/2 = 1/3, would be wrong with unequal micro-batches).
    update_base_beta(0.4): beta <- 0.5 / (1 + 0.25*0.4) = 0.5/1.1 = 0.45454545454545453.
    The step's own losses used the old beta: with margin 2 and beta_i = 0.5/(1 + 0.25 s), micro-batch 1 had
    h = [0.8, 0.8, 1.0]; the same pairs after the update give h = 2*0.45454545454545453/(1 + 0.25 s).
    """
    obj = EpsilonDPO(beta=0.5, epsilon=0.25)
    mb1, mb2 = _eps_microbatch([1.0, 1.0, 0.0]), _eps_microbatch([-1.0, 1.0])
    out1, out2 = obj(mb1), obj(mb2)
    assert_close(out1.beta_steps, [1.0, 1.0, 0.0])
    assert_close(out2.beta_steps, [-1.0, 1.0])
    assert_close(out1.losses, [math.log1p(math.exp(-0.8))] * 2 + [SOFTPLUS_M1])
    m = torch.cat([out1.beta_steps, out2.beta_steps]).mean().item()
    assert m == pytest.approx(0.4, abs=1e-15)
    new_beta = obj.update_base_beta(m)
    assert new_beta == pytest.approx(0.45454545454545453, rel=1e-15, abs=0)
    assert obj.beta == new_beta
    # losses computed before the update are unchanged (they used the old beta) ...
    assert_close(out1.losses, [math.log1p(math.exp(-0.8))] * 2 + [SOFTPLUS_M1])
    # ... and the next step uses the new one
    h = [2 * new_beta / 1.25, 2 * new_beta / 1.25, 2 * new_beta]
    assert_close(obj(mb1).losses, [math.log1p(math.exp(-x)) for x in h])


def test_epsilon_base_beta_update_validates_mean_step():
    """The mean of steps in {-1, 0, 1} lies in [-1, 1]; anything else is a caller bug and is refused."""
    obj = EpsilonDPO(beta=0.5, epsilon=0.25)
    for bad in (1.5, -1.01, float("nan")):
        with pytest.raises(ObjectiveConfigError, match="mean step"):
            obj.update_base_beta(bad)
    assert obj.beta == 0.5
    assert obj.update_base_beta(-1.0) == pytest.approx(0.5 / 0.75, rel=1e-15)
    # the mean step arrives as a 0-dim tensor from the all-reduce: beta stays a Python float
    assert type(obj.update_base_beta(torch.tensor(0.5, dtype=torch.float64))) is float
    assert type(obj.state_dict()["beta"]) is float


def test_epsilon_state_dict_round_trip():
    """After an update (beta = 0.5/1.1), state_dict holds that beta; loading it into a fresh objective built with
    beta=0.5 restores it exactly, and the two compute identical losses. Stateless objectives have an empty state
    and refuse a non-empty one."""
    obj = EpsilonDPO(beta=0.5, epsilon=0.25)
    obj.update_base_beta(0.4)
    state = obj.state_dict()
    assert state == {"beta": 0.5 / 1.1}
    fresh = EpsilonDPO(beta=0.5, epsilon=0.25)
    fresh.load_state_dict(state)
    assert fresh.beta == obj.beta
    stats = make_stats(**EPS_PAIRS)
    assert torch.equal(fresh(stats).losses, obj(stats).losses)
    with pytest.raises(ObjectiveConfigError):
        fresh.load_state_dict({"beta": -1.0})
    dpo = DPO(beta=0.1)
    assert dpo.state_dict() == {}
    dpo.load_state_dict({})
    with pytest.raises(ValueError, match="no state"):
        dpo.load_state_dict({"beta": 0.2})


# --------------------------------------------------------------------------------------------------------------
# Validation and registry
# --------------------------------------------------------------------------------------------------------------

ALL_NAMES = {"dpo", "ipo", "cdpo", "hdpo", "epsilon_dpo", "tdpo1", "tdpo2"}


def test_registry_has_exactly_the_seven_objectives():
    """The registry maps exactly these names to classes whose `name` is the key."""
    assert set(OBJECTIVES) == ALL_NAMES
    for name, cls in OBJECTIVES.items():
        assert cls.name == name


@pytest.mark.parametrize("name", sorted(ALL_NAMES))
@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf")])
def test_invalid_beta_is_rejected(name, beta):
    """beta <= 0, nan or inf is refused at construction, naming the field."""
    with pytest.raises(ObjectiveConfigError, match="beta"):
        build_objective(name, beta=beta)


@pytest.mark.parametrize(
    "name,field",
    [("hdpo", "alpha"), ("tdpo2", "alpha"), ("epsilon_dpo", "entropy_alpha"), ("tdpo1", "entropy_alpha")],
)
@pytest.mark.parametrize("value", [0.0, -0.5, float("nan")])
def test_invalid_alpha_is_rejected(name, field, value):
    """alpha / entropy_alpha <= 0 (or nan) is refused, naming the field."""
    with pytest.raises(ObjectiveConfigError, match=field):
        build_objective(name, **{field: value})


@pytest.mark.parametrize("epsilon", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_invalid_epsilon_is_rejected(epsilon):
    """epsilon must lie in (0, 1): beta/(1-e) is undefined at 1 and the step is vacuous at 0."""
    with pytest.raises(ObjectiveConfigError, match="epsilon"):
        EpsilonDPO(beta=0.1, epsilon=epsilon)


@pytest.mark.parametrize("label_smoothing", [-0.1, 0.5, 0.7, float("nan")])
def test_invalid_label_smoothing_is_rejected(label_smoothing):
    """label_smoothing must lie in [0, 0.5): at 0.5 the loss no longer depends on which response was chosen."""
    with pytest.raises(ObjectiveConfigError, match="label_smoothing"):
        ConservativeDPO(beta=0.1, label_smoothing=label_smoothing)


def test_config_error_is_a_value_error():
    assert issubclass(ObjectiveConfigError, ValueError)


def test_unknown_objective_lists_the_choices():
    """An unknown name is refused with every registered name in the message."""
    with pytest.raises(ObjectiveConfigError) as info:
        build_objective("dpoo", beta=0.1)
    message = str(info.value)
    assert "dpoo" in message
    for name in ALL_NAMES:
        assert repr(name) in message


@pytest.mark.parametrize("name", ["dpo", "ipo", "cdpo"])
def test_entropy_alpha_rejected_where_not_defined(name):
    """dpo/ipo/cdpo do not take H-DPO's entropy_alpha; the error points to hdpo."""
    with pytest.raises(ObjectiveConfigError, match="hdpo"):
        build_objective(name, entropy_alpha=0.9)


def test_unknown_hparam_names_the_accepted_ones():
    """A misspelled argument is refused, listing what the objective accepts; 'alpha' on epsilon_dpo points to
    entropy_alpha."""
    with pytest.raises(ObjectiveConfigError, match="label_smoothing"):
        build_objective("cdpo", label_smoothin=0.1)
    with pytest.raises(ObjectiveConfigError, match="entropy_alpha"):
        build_objective("epsilon_dpo", alpha=0.9)


def test_build_objective_passes_hparams_and_reports_them():
    """build_objective constructs the registered class with the given values; hparams() reports all of them."""
    obj = build_objective("tdpo2", beta=0.2, alpha=0.7)
    assert isinstance(obj, TDPO2)
    assert obj.hparams() == {"beta": 0.2, "alpha": 0.7, "entropy_alpha": 1.0}
    assert repr(obj) == "TDPO2(beta=0.2, alpha=0.7, entropy_alpha=1.0)"


@pytest.mark.parametrize(
    "name,missing",
    [("tdpo1", "kl_chosen"), ("tdpo2", "kl_chosen"), ("epsilon_dpo", "relaxed_chosen_logps")],
)
def test_missing_statistic_is_named(name, missing):
    """An objective given PairStats without a statistic it needs fails naming that field."""
    with pytest.raises(ValueError, match=missing):
        build_objective(name)(make_stats(**TWO_PAIRS))


# --------------------------------------------------------------------------------------------------------------
# The loss mixture: weight * objective + sft_weight * SFT term (TRL's loss_type [sigmoid, sft])
# --------------------------------------------------------------------------------------------------------------


def test_sft_term_hand_derived():
    """TWO_PAIRS with chosen lengths 4 and 6: the SFT term is the token mean over the batch's chosen tokens,
    -(pw_0 + pw_1) / (4 + 6) = -(-10 - 5) / 10 = 1.5, for both pairs (not the mean of per-pair means,
    (10/4 + 5/6) / 2 = 1.6667). Its gradient wrt pw_i is -1/10 per pair, so d(sum of losses)/d pw_i = -2/10."""
    stats = make_stats(**TWO_PAIRS, chosen_lengths=[4.0, 6.0], rejected_lengths=[1.0, 1.0])
    sft = sft_term(stats)
    assert_close(sft, [1.5, 1.5])
    (grad,) = torch.autograd.grad(sft.sum(), stats.policy_chosen_logps)
    assert_close(grad, [-0.2, -0.2])


def test_dpo_with_sft_hand_derived():
    """TWO_PAIRS at beta 0.5 (h = 1, -1), chosen lengths 4 and 6, weight 0.8, sft_weight 0.3:
    per-pair loss = 0.8 * softplus(-h) + 0.3 * 1.5 = [0.8*0.31326 + 0.45, 0.8*1.31326 + 0.45]
    = [0.70060935, 1.50060935]; the metric `loss` is their mean 1.10060935, `loss/dpo` the DPO mean
    (0.31326 + 1.31326)/2 = 0.81326168, `loss/sft` = 1.5. Rewards are DPO's: beta*(pw - rw) = [1, -0.5]."""
    stats = make_stats(**TWO_PAIRS, chosen_lengths=[4.0, 6.0], rejected_lengths=[1.0, 1.0])
    out = build_objective("dpo", beta=0.5, weight=0.8, sft_weight=0.3)(stats)
    expected = [0.8 * SOFTPLUS_M1 + 0.45, 0.8 * SOFTPLUS_P1 + 0.45]
    assert_close(out.losses, expected)
    assert_close(out.metrics["loss"], sum(expected) / 2)
    assert_close(out.metrics["loss/dpo"], (SOFTPLUS_M1 + SOFTPLUS_P1) / 2)
    assert_close(out.metrics["loss/sft"], 1.5)
    assert_close(out.chosen_rewards, [1.0, -0.5])


@pytest.mark.parametrize("name", sorted(ALL_NAMES))
def test_sft_composes_with_every_objective(name):
    """For every objective: loss(weight w, sft s) = w * loss(plain) + s * sft_term, pair by pair, and the
    plain objective's rewards are unchanged (the SFT term moves the loss only)."""
    hparams = {"tdpo2": dict(alpha=0.5), "hdpo": dict(alpha=0.9), "cdpo": dict(label_smoothing=0.1)}
    stats = make_stats(
        **EPS_PAIRS,
        chosen_lengths=[3.0, 5.0, 2.0],
        rejected_lengths=[4.0, 1.0, 6.0],
        kl_chosen=[0.3, 1.2, 0.0],
        kl_rejected=[0.8, 0.1, 2.5],
    )
    plain = build_objective(name, beta=0.5, **hparams.get(name, {}))(stats)
    mixed_obj = build_objective(name, beta=0.5, weight=0.7, sft_weight=2.0, **hparams.get(name, {}))
    mixed = mixed_obj(stats)
    nll = -sum(EPS_PAIRS["pw"]) / 10.0
    assert_close(mixed.losses, 0.7 * plain.losses.detach() + 2.0 * nll)
    assert_close(mixed.chosen_rewards, plain.chosen_rewards)
    assert mixed_obj.hparams()["sft_weight"] == 2.0 and mixed_obj.hparams()["weight"] == 0.7


@pytest.mark.parametrize("name", ["dpo", "ipo", "tdpo1"])
def test_gradcheck_with_sft(name):
    """Finite differences agree with autograd for the mixture (the SFT term couples the pairs through the
    batch's token count: each loss depends on every chosen log-prob)."""
    obj = build_objective(name, beta=0.5, sft_weight=0.5)
    base = make_stats(
        **EPS_PAIRS, chosen_lengths=[3.0, 5.0, 2.0], rejected_lengths=[4.0, 1.0, 6.0], grad=False
    )
    base.kl_chosen, base.kl_rejected = t64(0.3, 1.2, 0.0), t64(0.8, 0.1, 2.5)
    names = ["policy_chosen_logps", "policy_rejected_logps"]
    inputs = [getattr(base, n).clone().requires_grad_() for n in names]

    def loss(*xs):
        return obj(PairStats(**{**base.__dict__, **dict(zip(names, xs))})).losses

    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(weight=-1.0), "weight must be"),
        (dict(sft_weight=float("nan")), "sft_weight must be"),
        (dict(weight=0.0), "both 0"),
    ],
)
def test_invalid_mixture_weights_are_rejected(kwargs, match):
    with pytest.raises(ObjectiveConfigError, match=match):
        build_objective("dpo", **kwargs)


def test_sft_alone_is_the_nll():
    """weight 0, sft_weight 1 (TRL's loss_type: [sft]): the loss is the SFT term only."""
    stats = make_stats(**TWO_PAIRS, chosen_lengths=[4.0, 6.0], rejected_lengths=[1.0, 1.0])
    out = build_objective("dpo", beta=0.5, weight=0.0, sft_weight=1.0)(stats)
    assert_close(out.losses, [1.5, 1.5])


def test_after_step_hook_updates_only_epsilon_dpo():
    """The loop calls `after_step` once per optimizer step on every objective. Default: no state change, no
    metrics, and the mean step is never asked for (its all-reduce is skipped). epsilon-DPO (beta=0.5, e=0.25):
    an applied step with mean step 0.4 sets beta = 0.5/1.1 and reports it as beta/base_next; a skipped step
    (None) leaves beta and still reports it."""

    def never() -> float:
        raise AssertionError("a stateless objective asked for the mean step")

    for name in ("dpo", "ipo", "tdpo2"):
        assert build_objective(name).after_step(never) == {}
    obj = EpsilonDPO(beta=0.5, epsilon=0.25)
    assert obj.after_step(None) == {"beta/base_next": 0.5}
    assert obj.after_step(lambda: 0.4) == {"beta/base_next": 0.5 / 1.1}
    assert obj.beta == 0.5 / 1.1


def test_objectives_declare_their_stat_request():
    """Each objective asks for what it reads: TDPO the token KL, epsilon-DPO its perturbed log-probs at its own
    epsilon, DPO nothing beyond the log-probs."""
    assert build_objective("dpo").stat_request() == StatRequest()
    assert build_objective("tdpo1").stat_request() == StatRequest(kl=True)
    assert EpsilonDPO(beta=0.5, epsilon=0.25).stat_request() == StatRequest(epsilon=0.25)


# --- H-DPO with an entropy target (docs/objectives.md, "H-DPO with an entropy target") ----------------------


@pytest.mark.parametrize(
    ("alpha", "entropy", "target", "lr", "expected"),
    [
        # above target lowers alpha: exp(-0.5 * (0.5 - 0.3)) = exp(-0.1)
        (1.0, 0.5, 0.3, 0.5, 0.9048374180359595),
        # below target raises it: 0.8 * exp(-1 * (0.1 - 0.3)) = 0.8 * exp(0.2) = 0.8 * 1.2214027581601699
        (0.8, 0.1, 0.3, 1.0, 0.9771222065281359),
        # clamped below: 0.55 * exp(-1) = 0.2023 -> alpha_min 0.5 exactly
        (0.55, 1.3, 0.3, 1.0, 0.5),
        # clamped above: 1.9 * exp(1) = 5.16 -> alpha_max 2.0 exactly
        (1.9, 0.0, 1.0, 1.0, 2.0),
        # at the target alpha stays, bit for bit
        (0.9, 0.3, 0.3, 1.0, 0.9),
    ],
)
def test_dual_alpha_step_hand_derived(alpha, entropy, target, lr, expected):
    """log alpha <- log alpha - lr * (H - H_target), clamped to [0.5, 2]: hand-derived values."""
    got = dual_alpha_step(alpha, entropy, target, lr, alpha_min=0.5, alpha_max=2.0)
    assert got == pytest.approx(expected, rel=1e-15, abs=0)


def test_dual_alpha_step_mean_error_identity():
    """What the update guarantees (docs/objectives.md): while no clamp acts, the mean entropy error over T steps
    is exactly -(log alpha_T - log alpha_0) / (lr * T): a bounded alpha means a vanishing mean error."""
    gen = torch.Generator().manual_seed(0)
    entropies = (0.3 + 0.05 * torch.randn(200, generator=gen, dtype=torch.float64)).tolist()
    alpha, lr, target = 1.0, 0.2, 0.31
    for h in entropies:
        alpha = dual_alpha_step(alpha, h, target, lr, alpha_min=1e-6, alpha_max=1e6)
    mean_error = sum(h - target for h in entropies) / len(entropies)
    assert 0.5 < alpha < 2 and mean_error != 0.0
    assert mean_error == pytest.approx(-math.log(alpha) / (lr * len(entropies)), rel=1e-9)


def test_entropy_target_updates_alpha_after_the_step():
    """hdpo (beta 0.5, alpha 1, target 0.3 nats, lr 0.5): the step's loss uses the old alpha (logged as
    `alpha`); after_step with the step's entropy 0.5 sets alpha = exp(-0.1) (above target: down) and reports
    it; the next loss equals plain hdpo at that alpha; a skipped step (None) leaves alpha."""
    stats = make_stats(**TWO_PAIRS)
    obj = build_objective("hdpo", beta=0.5, alpha=1.0, entropy_target=0.3, alpha_lr=0.5)
    assert obj.needs == frozenset({Stat.ENTROPY}) and obj.stat_request().entropy
    first = obj(stats)
    assert float(first.metrics["alpha"]) == 1.0
    assert torch.equal(first.losses, HDPO(beta=0.5, alpha=1.0)(stats).losses)
    record = obj.after_step(None, lambda: 0.5)
    assert record == {"alpha/next": math.exp(-0.1), "entropy/target": 0.3, "entropy/step": 0.5}
    assert torch.equal(obj(stats).losses, HDPO(beta=0.5, alpha=math.exp(-0.1))(stats).losses)
    assert obj.after_step(None, None) == {
        "alpha/next": math.exp(-0.1),
        "entropy/target": 0.3,
        "entropy/step": None,
    }
    assert obj.alpha == math.exp(-0.1)


def test_entropy_target_with_zero_lr_is_hdpo_exactly():
    """alpha_lr 0: alpha never moves, and every loss and gradient equals fixed-alpha hdpo bit for bit."""
    obj = build_objective("hdpo", beta=0.3, alpha=0.9, entropy_target=0.2, alpha_lr=0.0)
    for entropy in (0.7, 0.01, 3.0):
        s1, s2 = make_stats(**TWO_PAIRS), make_stats(**TWO_PAIRS)
        a, b = obj(s1), HDPO(beta=0.3, alpha=0.9)(s2)
        assert torch.equal(a.losses, b.losses)
        for ga, gb in zip(_grads(a.losses, s1), _grads(b.losses, s2)):
            assert torch.equal(ga, gb)
        obj.after_step(None, lambda e=entropy: e)
        assert obj.alpha == 0.9


def test_entropy_target_fraction_state_round_trip():
    """A fraction waits for the reference's entropy (0.8 nats -> target 0.4); alpha and the measured entropy
    are state: a fresh objective loaded from state_dict continues identically."""
    obj = HDPO(beta=0.1, alpha=1.0, entropy_target_fraction=0.5, alpha_lr=1.0)
    assert obj.needs_reference_entropy and obj.target is None
    with pytest.raises(ObjectiveConfigError, match="reference entropy was never set"):
        obj.after_step(None, lambda: 0.3)
    obj.set_reference_entropy(0.8)
    assert not obj.needs_reference_entropy and obj.target == 0.4
    obj.after_step(None, lambda: 0.6)  # 0.2 above: alpha = exp(-0.2)
    assert obj.alpha == pytest.approx(math.exp(-0.2), rel=1e-15)
    state = obj.state_dict()
    assert state == {"alpha": obj.alpha, "reference_entropy": 0.8}
    fresh = HDPO(beta=0.1, alpha=1.0, entropy_target_fraction=0.5, alpha_lr=1.0)
    fresh.load_state_dict(state)
    assert fresh.alpha == obj.alpha and fresh.target == 0.4
    assert obj.after_step(None, lambda: 0.1) == fresh.after_step(None, lambda: 0.1)
    # Without a target hdpo has no state and no extra hparams, as before.
    assert HDPO(alpha=0.9).state_dict() == {} and HDPO(alpha=0.9).hparams() == {"beta": 0.1, "alpha": 0.9}


def test_entropy_target_composes_with_entropy_alpha():
    """epsilon_dpo (beta 0.5, e 0.25) with entropy_alpha 1 and a target 0.3, lr 0.5: one step with mean
    beta step 0.4 and entropy 0.5 sets beta = 0.5/1.1 and entropy_alpha = exp(-0.1); both are state.
    tdpo2's entropy_alpha moves the same way; its own alpha (0.5) does not."""
    obj = build_objective("epsilon_dpo", beta=0.5, epsilon=0.25, entropy_target=0.3, alpha_lr=0.5)
    assert obj.needs == frozenset({Stat.PERTURBED, Stat.ENTROPY})
    record = obj.after_step(lambda: 0.4, lambda: 0.5)
    assert record["beta/base_next"] == 0.5 / 1.1 and record["alpha/next"] == math.exp(-0.1)
    assert obj.state_dict() == {"beta": 0.5 / 1.1, "alpha": math.exp(-0.1), "reference_entropy": None}
    tdpo2 = build_objective("tdpo2", alpha=0.5, entropy_target=0.3, alpha_lr=0.5)
    tdpo2.after_step(None, lambda: 0.5)
    assert tdpo2.entropy_alpha == math.exp(-0.1) and tdpo2.alpha == 0.5
    assert tdpo2.needs == frozenset({Stat.TOKEN_KL, Stat.ENTROPY})


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("hdpo", dict(entropy_target=0.3, entropy_target_fraction=0.5), "not both"),
        ("hdpo", dict(entropy_target=-0.1), "entropy_target must be"),
        ("hdpo", dict(entropy_target_fraction=0.0), "entropy_target_fraction must be"),
        ("hdpo", dict(entropy_target=0.3, alpha=0.4), "alpha_min <= alpha <= alpha_max"),
        ("hdpo", dict(entropy_target=0.3, alpha_min=1.2, alpha_max=1.5, alpha=1.0), "alpha_min <= alpha"),
        ("hdpo", dict(entropy_target=0.3, alpha_lr=-1.0), "alpha_lr must be"),
        ("hdpo", dict(alpha_lr=0.5), "set entropy_target or entropy_target_fraction"),
        ("dpo", dict(entropy_target=0.3), "entropy target adapts H-DPO's alpha"),
    ],
)
def test_entropy_target_validation(name, kwargs, match):
    with pytest.raises(ObjectiveConfigError, match=match):
        build_objective(name, **kwargs)
