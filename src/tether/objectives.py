"""Preference objectives: DPO, IPO, cDPO, H-DPO, epsilon-DPO, TDPO1, TDPO2.

Each objective is a small class: hyperparameters validated at construction, a `needs` set naming the
statistics it reads from `PairStats`, and `__call__(stats) -> ObjectiveOutput` with per-pair losses (B,) and
batch-mean metrics under TRL's names. `build_objective(name, **hparams)` is the registry.

Notation (shared/DESIGN.md section 1): pw, pl = policy sequence log-probs of chosen / rejected (summed over
response tokens), rw, rl = the reference's; sigma the logistic function; sg() stop-gradient.

Compositions (where the math composes). H-DPO's entropy coefficient alpha replaces the policy's log-prob
logp by alpha*logp inside the log-ratio; it is accepted as `entropy_alpha` by
  - epsilon_dpo: loss = -log sigma(beta_i * [(a*pw - rw) - (a*pl - rl)])
  - tdpo1 / tdpo2: u = beta*(a*pw - rw) - beta*(a*pl - rl), and TDPO's delta as usual.
entropy_alpha = 1 (the default) is the plain method. dpo/ipo/cdpo reject it (use `hdpo` for DPO with alpha;
IPO's and cDPO's papers define no entropy-controlled form).

Entropy target (beyond the paper): hdpo, and epsilon_dpo / tdpo1 / tdpo2 with entropy_alpha, accept
`entropy_target` (nats per token) or `entropy_target_fraction` (of the reference's per-token entropy on the
training responses, measured once before training), with `alpha_lr`, `alpha_min`, `alpha_max`: after each
optimizer step alpha <- clamp(alpha * exp(-alpha_lr * (H_step - H_target)), alpha_min, alpha_max), H_step the
policy's token-mean entropy on the step's responses over every process (`dual_alpha_step`; the derivation
is in docs/objectives.md, "H-DPO with an entropy target"). The step's own loss used the old alpha.

Loss mixture: every objective adds TRL's SFT term (`sft_term`, the chosen responses' token-mean NLL) with
`build_objective(name, weight=w, sft_weight=s)`: loss = w * (objective) + s * sft, rewards and metrics the
objective's (plus `loss/<name>` and `loss/sft`). That is TRL's `loss_type: [<loss>, sft]` with
`loss_weights: [w, s]`; one preference objective per run (TRL's lists of two preference losses have no
tether counterpart).
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from tether.heads import StatRequest


class Stat(StrEnum):
    """Statistics an objective may need beyond the four sequence log-probs."""

    LENGTHS = "lengths"  # response token counts per sequence
    TOKEN_KL = "token_kl"  # sum over tokens of KL(pi_ref || pi): needs reference distributions
    PERTURBED = "perturbed"  # epsilon-DPO's perturbed log-probs: needs reference distributions
    ENTROPY = "entropy"  # summed policy entropy (a metric; optional for every objective)


REFERENCE_DISTRIBUTION_STATS = frozenset({Stat.TOKEN_KL, Stat.PERTURBED})


@dataclass
class PairStats:
    """Per-pair statistics, each of shape (B,). Optional fields are None when not computed.

    policy_*_logps carry gradient; ref_*_logps never do. kl_* = sum over response tokens of
    KL(pi_ref(.|x,y<t) || pi(.|x,y<t)) (carry gradient). relaxed_* / tightened_* = sequence log-probs under the
    estimates of the policy at beta/(1+e) and beta/(1-e) (no grad). entropy_* = summed per-token policy
    entropy (no grad). *_lengths = number of response tokens.
    """

    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor | None = None
    rejected_lengths: torch.Tensor | None = None
    kl_chosen: torch.Tensor | None = None
    kl_rejected: torch.Tensor | None = None
    relaxed_chosen_logps: torch.Tensor | None = None
    relaxed_rejected_logps: torch.Tensor | None = None
    tightened_chosen_logps: torch.Tensor | None = None
    tightened_rejected_logps: torch.Tensor | None = None
    entropy_chosen: torch.Tensor | None = None
    entropy_rejected: torch.Tensor | None = None

    def swapped(self) -> PairStats:
        """The same pairs with chosen and rejected exchanged."""
        kwargs = {}
        for f in fields(self):
            name = f.name
            for a, b in (("chosen", "rejected"), ("rejected", "chosen")):
                if a in name:
                    name = name.replace(a, b)
                    break
            kwargs[name] = getattr(self, f.name)
        return PairStats(**kwargs)


@dataclass
class ObjectiveOutput:
    """losses, chosen_rewards, rejected_rewards: (B,); metrics: scalar tensors (batch means, detached).

    beta_steps: epsilon-DPO's per-pair step s in {-1, 0, +1} (B,), else None.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    beta_steps: torch.Tensor | None = None


class ObjectiveConfigError(ValueError):
    """An objective's name or hyperparameters are invalid."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ObjectiveConfigError(message)


def _check_beta(beta: float) -> float:
    _require(math.isfinite(beta) and beta > 0, f"beta must be a finite number > 0, got {beta!r}")
    return float(beta)


def _check_alpha(alpha: float, name: str = "alpha") -> float:
    _require(math.isfinite(alpha) and alpha > 0, f"{name} must be a finite number > 0, got {alpha!r}")
    return float(alpha)


def _metrics(out: ObjectiveOutput, stats: PairStats) -> ObjectiveOutput:
    """Fill the metrics every objective reports (TRL's names; token-mean entropy when available)."""
    cr, rr = out.chosen_rewards.detach(), out.rejected_rewards.detach()
    m = out.metrics
    m["loss"] = out.losses.detach().mean()
    m["rewards/chosen"] = cr.mean()
    m["rewards/rejected"] = rr.mean()
    m["rewards/margins"] = (cr - rr).mean()
    m["rewards/accuracies"] = (cr > rr).float().mean()
    m["logps/chosen"] = stats.policy_chosen_logps.detach().mean()
    m["logps/rejected"] = stats.policy_rejected_logps.detach().mean()
    # log pi(y) - log pi_ref(y) of the batch's responses, whatever the objective's beta or alpha: a negative
    # logratios/chosen is likelihood displacement (the chosen responses lost probability to unseen ones).
    m["logratios/chosen"] = (stats.policy_chosen_logps - stats.ref_chosen_logps).detach().mean()
    m["logratios/rejected"] = (stats.policy_rejected_logps - stats.ref_rejected_logps).detach().mean()
    for side in ("chosen", "rejected"):
        ent, lengths = getattr(stats, f"entropy_{side}"), getattr(stats, f"{side}_lengths")
        if ent is not None and lengths is not None:
            m[f"entropy/{side}"] = ent.detach().sum() / lengths.sum().clamp(min=1)
    return out


def _stat(stats: PairStats, name: str, objective: str) -> torch.Tensor:
    value = getattr(stats, name)
    if value is None:
        raise ValueError(f"objective '{objective}' needs PairStats.{name}, which was not computed")
    return value


class Objective(ABC):
    """Base class: a pure function of PairStats, plus (for epsilon-DPO) a checkpointable base beta."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[Stat]] = frozenset()

    @property
    def needs_reference_distribution(self) -> bool:
        """True when the objective needs the reference's full next-token distributions, not just log-probs."""
        return bool(self.needs & REFERENCE_DISTRIBUTION_STATS)

    # The loss mixture (TRL's `loss_type: [sigmoid, sft]` with `loss_weights`): set by `build_objective`.
    weight: float = 1.0  # weight of the preference loss
    sft_weight: float = 0.0  # weight of the SFT term (`sft_term`)

    @abstractmethod
    def pair_loss(self, stats: PairStats) -> ObjectiveOutput:
        """The preference loss alone: per-pair losses (B,), rewards and metrics."""

    def __call__(self, stats: PairStats) -> ObjectiveOutput:
        """weight * pair_loss + sft_weight * sft_term (per pair, (B,)); rewards are the preference loss's."""
        out = self.pair_loss(stats)
        if self.weight == 1.0 and self.sft_weight == 0.0:
            return out
        losses = self.weight * out.losses
        if self.sft_weight:
            sft = sft_term(stats)
            losses = losses + self.sft_weight * sft
            out.metrics["loss/sft"] = sft.detach()[0]
        out.metrics["loss/" + self.name] = out.metrics["loss"]
        out.losses = losses
        out.metrics["loss"] = losses.detach().mean()
        return out

    def stat_request(self) -> StatRequest:
        """The token statistics this objective reads (from `needs`)."""
        return StatRequest(kl=Stat.TOKEN_KL in self.needs, entropy=Stat.ENTROPY in self.needs)

    def after_step(
        self,
        mean_beta_step: Callable[[], float] | None,
        token_entropy: Callable[[], float] | None = None,
    ) -> dict[str, float | None]:
        """Called once per optimizer step on every process, after the step; returns metrics for its record.

        mean_beta_step: None if the step was skipped (non-finite); else a function giving the mean of
        `ObjectiveOutput.beta_steps` over the step's pairs on all processes (an all-reduce, run only if called,
        and then on every process). token_entropy: None if the step was skipped; else a function giving the
        policy's token-mean entropy over every response token (chosen and rejected) of the step's pairs on all
        processes (an all-reduce, likewise; needs Stat.ENTROPY). State changed here is what `state_dict`
        checkpoints. No-op by default.
        """
        return {}

    @property
    def needs_reference_entropy(self) -> bool:
        """True while the objective waits for `set_reference_entropy` (an entropy target given as a fraction)."""
        return False

    def set_reference_entropy(self, entropy: float) -> None:
        """The reference's per-token entropy on the training responses (nats), measured before training."""
        raise ValueError(f"objective '{self.name}' has no entropy target given as a fraction")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"objective '{self.name}' has no state, got keys {sorted(state)}")

    def hparams(self) -> dict[str, Any]:
        """Constructor arguments (plus the mixture's weights when not 1 and 0), for logging and for refusing a
        resume with changed hyperparameters."""
        out = {k: getattr(self, k) for k in inspect.signature(type(self)).parameters}
        if self.weight != 1.0:
            out["weight"] = self.weight
        if self.sft_weight != 0.0:
            out["sft_weight"] = self.sft_weight
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"


def sft_term(stats: PairStats) -> torch.Tensor:
    """TRL's `sft` loss: the policy's negative log-likelihood of the chosen responses, averaged over every
    chosen response token of the batch, -sum_i pw_i / sum_i |y_w,i|, repeated for each pair: (B,).

    A batch mean (not a per-pair mean of per-pair means), as TRL computes it; the loop's mean over pairs then
    gives it unchanged. Needs only the chosen log-probs and lengths that every PairStats carries.
    """
    lengths = _stat(stats, "chosen_lengths", "sft")
    nll = -stats.policy_chosen_logps.sum() / lengths.sum().clamp(min=1)
    return nll.expand(stats.policy_chosen_logps.shape)


def _logratio_margin(stats: PairStats, alpha: float = 1.0) -> torch.Tensor:
    """(a*pw - rw) - (a*pl - rl): (B,). alpha = 1 gives DPO's (pw - rw) - (pl - rl)."""
    return (alpha * stats.policy_chosen_logps - stats.ref_chosen_logps) - (
        alpha * stats.policy_rejected_logps - stats.ref_rejected_logps
    )


def _rewards(
    stats: PairStats, beta: float | torch.Tensor, alpha: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards (chosen, rejected) = beta * (a*pw - rw), beta * (a*pl - rl), detached: (B,) each.

    beta: a number, or per pair (B,) for epsilon-DPO; alpha = 1 gives DPO's beta * (pw - rw).
    """
    chosen = beta * (alpha * stats.policy_chosen_logps - stats.ref_chosen_logps).detach()
    rejected = beta * (alpha * stats.policy_rejected_logps - stats.ref_rejected_logps).detach()
    return chosen, rejected


class DPO(Objective):
    """DPO (Rafailov et al. 2023, eq. 7): loss = -log sigma(beta * [(pw - rw) - (pl - rl)])."""

    name = "dpo"

    def __init__(self, beta: float = 0.1):
        self.beta = _check_beta(beta)

    def pair_loss(self, stats: PairStats) -> ObjectiveOutput:
        h = self.beta * _logratio_margin(stats)
        out = ObjectiveOutput(-F.logsigmoid(h), *_rewards(stats, self.beta))
        return _metrics(out, stats)


class ConservativeDPO(Objective):
    """cDPO, label-smoothed DPO (Mitchell 2023 note; DPO paper's eq. 7 with noisy labels):
    loss = -(1 - e) log sigma(h) - e log sigma(-h), h = beta * [(pw - rw) - (pl - rl)], 0 <= e < 0.5.
    """

    name = "cdpo"

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.1):
        self.beta = _check_beta(beta)
        _require(
            math.isfinite(label_smoothing) and 0.0 <= label_smoothing < 0.5,
            f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}",
        )
        self.label_smoothing = float(label_smoothing)

    def pair_loss(self, stats: PairStats) -> ObjectiveOutput:
        h = self.beta * _logratio_margin(stats)
        e = self.label_smoothing
        out = ObjectiveOutput(-(1 - e) * F.logsigmoid(h) - e * F.logsigmoid(-h), *_rewards(stats, self.beta))
        return _metrics(out, stats)


class IPO(Objective):
    """IPO (Azar et al. 2023, eq. 17): loss = (q - 1/(2*beta))^2, q = (pw - rw) - (pl - rl).

    length_normalize=True divides each sequence's log-ratio by its response length first, as TRL's `ipo`
    loss does (the IPO paper's per-token form). The rewards are beta times the summed log-ratios either way,
    as TRL 1.16 logs them for `ipo`: the normalisation enters the loss only.
    """

    name = "ipo"

    def __init__(self, beta: float = 0.1, length_normalize: bool = False):
        self.beta = _check_beta(beta)
        self.length_normalize = bool(length_normalize)

    @property
    def needs(self) -> frozenset[Stat]:  # type: ignore[override]
        return frozenset({Stat.LENGTHS}) if self.length_normalize else frozenset()

    def pair_loss(self, stats: PairStats) -> ObjectiveOutput:
        chosen = stats.policy_chosen_logps - stats.ref_chosen_logps
        rejected = stats.policy_rejected_logps - stats.ref_rejected_logps
        if self.length_normalize:
            chosen = chosen / _stat(stats, "chosen_lengths", self.name).clamp(min=1)
            rejected = rejected / _stat(stats, "rejected_lengths", self.name).clamp(min=1)
        q = chosen - rejected
        out = ObjectiveOutput((q - 1 / (2 * self.beta)) ** 2, *_rewards(stats, self.beta))
        return _metrics(out, stats)


# Defaults of the entropy target's alpha control (docs/objectives.md, "H-DPO with an entropy target").
ALPHA_LR = 0.1  # per step and per nat of error: a 0.1-nat gap moves alpha by 1% per step, e-fold in 100 steps
ALPHA_MIN = 0.5  # below it the policy's log-prob has half DPO's weight in the log-ratio; the paper used 0.8-1
ALPHA_MAX = 2.0  # the mirror image of ALPHA_MIN in log alpha; the paper's largest alpha was 1.1


def dual_alpha_step(
    alpha: float, entropy: float, target: float, lr: float, alpha_min: float, alpha_max: float
) -> float:
    """One dual step on H-DPO's entropy coefficient: log alpha <- log alpha - lr * (entropy - target),
    then alpha clamped to [alpha_min, alpha_max] (docs/objectives.md, "H-DPO with an entropy target").

    Entropy above target lowers alpha (sharpens), below raises it. Written alpha * exp(-lr * error), which is
    the same update and returns alpha bit for bit when lr * error == 0.
    """
    return min(max(alpha * math.exp(-lr * (entropy - target)), alpha_min), alpha_max)


class _EntropyTarget:
    """H-DPO's entropy coefficient adapted toward a target per-token policy entropy, for the objectives that
    carry it (`hdpo`'s alpha; `entropy_alpha` of epsilon_dpo, tdpo1, tdpo2). Mixed in before `Objective`.

    Without a target (both None) nothing changes: no entropy is requested, no state, no extra hparams.
    """

    _alpha_name: ClassVar[str] = "entropy_alpha"  # the attribute that holds the coefficient
    _needs: ClassVar[frozenset[Stat]] = frozenset()  # the objective's own statistics

    def _init_target(
        self,
        entropy_target: float | None,
        entropy_target_fraction: float | None,
        alpha_lr: float,
        alpha_min: float,
        alpha_max: float,
    ) -> None:
        alpha = getattr(self, self._alpha_name)
        _require(
            entropy_target is None or entropy_target_fraction is None,
            "give entropy_target (nats per token) or entropy_target_fraction (of the reference's entropy),"
            " not both",
        )
        if entropy_target is not None:
            _require(
                math.isfinite(entropy_target) and entropy_target > 0,
                f"entropy_target must be a finite number > 0 (nats per token), got {entropy_target!r}",
            )
            entropy_target = float(entropy_target)
        if entropy_target_fraction is not None:
            _require(
                math.isfinite(entropy_target_fraction) and entropy_target_fraction > 0,
                f"entropy_target_fraction must be a finite number > 0, got {entropy_target_fraction!r}",
            )
            entropy_target_fraction = float(entropy_target_fraction)
        _require(
            math.isfinite(alpha_lr) and alpha_lr >= 0,
            f"alpha_lr must be a finite number >= 0, got {alpha_lr!r}",
        )
        alpha_min, alpha_max = _check_alpha(alpha_min, "alpha_min"), _check_alpha(alpha_max, "alpha_max")
        _require(
            alpha_min <= alpha <= alpha_max,
            f"need alpha_min <= {self._alpha_name} <= alpha_max, got {alpha_min} <= {alpha} <= {alpha_max}",
        )
        self.entropy_target, self.entropy_target_fraction = entropy_target, entropy_target_fraction
        self.alpha_lr, self.alpha_min, self.alpha_max = float(alpha_lr), alpha_min, alpha_max
        self.reference_entropy: float | None = None  # measured before training (fraction only): state
        if not self.targeted and (alpha_lr, alpha_min, alpha_max) != (ALPHA_LR, ALPHA_MIN, ALPHA_MAX):
            raise ObjectiveConfigError(
                "alpha_lr, alpha_min and alpha_max control alpha toward an entropy target: set entropy_target"
                " or entropy_target_fraction too"
            )

    @property
    def targeted(self) -> bool:
        return self.entropy_target is not None or self.entropy_target_fraction is not None

    @property
    def needs(self) -> frozenset[Stat]:  # type: ignore[override]
        return self._needs | ({Stat.ENTROPY} if self.targeted else frozenset())

    @property
    def target(self) -> float | None:
        """The target per-token entropy in nats (None while a fraction waits for the reference's entropy)."""
        if self.entropy_target is not None:
            return self.entropy_target
        if self.entropy_target_fraction is None or self.reference_entropy is None:
            return None
        return self.entropy_target_fraction * self.reference_entropy

    @property
    def needs_reference_entropy(self) -> bool:
        return self.entropy_target_fraction is not None and self.reference_entropy is None

    def set_reference_entropy(self, entropy: float) -> None:
        entropy = float(entropy)
        _require(self.entropy_target_fraction is not None, "no entropy_target_fraction to resolve")
        _require(math.isfinite(entropy) and entropy > 0, f"reference entropy must be > 0, got {entropy!r}")
        self.reference_entropy = entropy

    def _alpha_metrics(self, out: ObjectiveOutput) -> ObjectiveOutput:
        if self.targeted:  # the alpha this step's loss used
            out.metrics["alpha"] = torch.tensor(getattr(self, self._alpha_name), dtype=out.losses.dtype)
        return out

    def _target_step(self, token_entropy: Callable[[], float] | None) -> dict[str, float | None]:
        """The dual step after an optimizer step (None: the step was skipped, alpha stays)."""
        if not self.targeted:
            return {}
        target = self.target
        _require(target is not None, "the reference entropy was never set (set_reference_entropy)")
        entropy = None
        if token_entropy is not None:
            entropy = float(token_entropy())
            alpha = dual_alpha_step(
                getattr(self, self._alpha_name),
                entropy,
                target,
                self.alpha_lr,
                self.alpha_min,
                self.alpha_max,
            )
            setattr(self, self._alpha_name, alpha)
        return {
            "alpha/next": getattr(self, self._alpha_name),
            "entropy/target": target,
            "entropy/step": entropy,
        }

    def after_step(self, mean_beta_step, token_entropy=None):
        return self._target_step(token_entropy)

    def state_dict(self) -> dict[str, Any]:
        if not self.targeted:
            return {}
        return {"alpha": getattr(self, self._alpha_name), "reference_entropy": self.reference_entropy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.targeted:
            Objective.load_state_dict(self, state)  # type: ignore[arg-type]
            return
        setattr(self, self._alpha_name, _check_alpha(float(state["alpha"]), self._alpha_name))
        ref = state["reference_entropy"]
        self.reference_entropy = None if ref is None else float(ref)

    def hparams(self) -> dict[str, Any]:
        out = Objective.hparams(self)  # type: ignore[arg-type]
        if not self.targeted:
            for name in ("entropy_target", "entropy_target_fraction", "alpha_lr", "alpha_min", "alpha_max"):
                out.pop(name)
        return out


class HDPO(_EntropyTarget, Objective):
    """H-DPO (Omura et al. 2024, arXiv 2411.07595, the H-DPO loss):
    loss = -log sigma(beta * [(alpha*pw - rw) - (alpha*pl - rl)]).

    From max E[r] - beta*(-alpha*H(pi) + CE(pi, pi_ref)); alpha < 1 sharpens the policy, alpha > 1 keeps
    diversity, alpha = 1 is DPO exactly. Rewards are reported with the same alpha.

    With entropy_target (nats per token) or entropy_target_fraction, alpha is state, moved after each
    optimizer step toward that policy entropy (`dual_alpha_step`; `_EntropyTarget`), starting at `alpha`.
    """

    name = "hdpo"
    _alpha_name = "alpha"

    def __init__(
        self,
        beta: float = 0.1,
        alpha: float = 0.95,
        entropy_target: float | None = None,
        entropy_target_fraction: float | None = None,
        alpha_lr: float = ALPHA_LR,
        alpha_min: float = ALPHA_MIN,
        alpha_max: float = ALPHA_MAX,
    ):
        self.beta = _check_beta(beta)
        self.alpha = _check_alpha(alpha)
        self._init_target(entropy_target, entropy_target_fraction, alpha_lr, alpha_min, alpha_max)

    def pair_loss(self, stats: PairStats) -> ObjectiveOutput:
        h = self.beta * _logratio_margin(stats, self.alpha)
        out = ObjectiveOutput(-F.logsigmoid(h), *_rewards(stats, self.beta, self.alpha))
        return _metrics(self._alpha_metrics(out), stats)


def epsilon_steps(stats: PairStats) -> torch.Tensor:
    """epsilon-DPO's per-pair step s (B,) in {-1, 0, +1} (arXiv 2502.13177, as in the authors' code).

    z = pw - pl under the current policy, z_plus under the beta/(1+e) estimate, z_minus under beta/(1-e).
    s = +1 if z_plus > z > z_minus (the preference logit grows as beta shrinks: relax),
    s = -1 if z_minus > z > z_plus (it grows as beta grows: tighten), else 0 (ties included).
    """
    z = (stats.policy_chosen_logps - stats.policy_rejected_logps).detach()
    z_plus = stats.relaxed_chosen_logps - stats.relaxed_rejected_logps
    z_minus = stats.tightened_chosen_logps - stats.tightened_rejected_logps
    relax = (z_plus > z) & (z > z_minus)
    tighten = (z_minus > z) & (z > z_plus)
    return relax.to(z.dtype) - tighten.to(z.dtype)


class EpsilonDPO(_EntropyTarget, Objective):
    """epsilon-DPO (arXiv 2502.13177, the per-pair loss with the authors' beta update): per-pair beta_i = beta / (1 + e * s_i),
    loss = -log sigma(beta_i * [(a*pw - rw) - (a*pl - rl)]), s_i from `epsilon_steps` (a = entropy_alpha,
    H-DPO's coefficient; 1 is plain epsilon-DPO).

    The base beta is state: after each optimizer step, `after_step` calls `update_base_beta(m)`, which sets
    beta <- beta / (1 + e*m), m = mean of s over that step's pairs on every process. The step's own loss used
    the old beta. With an entropy target, entropy_alpha is state too (`_EntropyTarget`), updated after beta.
    """

    name = "epsilon_dpo"
    _needs = frozenset({Stat.PERTURBED})

    def __init__(
        self,
        beta: float = 0.1,
        epsilon: float = 0.01,
        entropy_alpha: float = 1.0,
        entropy_target: float | None = None,
        entropy_target_fraction: float | None = None,
        alpha_lr: float = ALPHA_LR,
        alpha_min: float = ALPHA_MIN,
        alpha_max: float = ALPHA_MAX,
    ):
        self.beta = _check_beta(beta)
        _require(math.isfinite(epsilon) and 0 < epsilon < 1, f"epsilon must be in (0, 1), got {epsilon!r}")
        self.epsilon = float(epsilon)
        self.entropy_alpha = _check_alpha(entropy_alpha, "entropy_alpha")
        self._init_target(entropy_target, entropy_target_fraction, alpha_lr, alpha_min, alpha_max)

    def pair_loss(self, stats: PairStats) -> ObjectiveOutput:
        for name in ("relaxed_chosen_logps", "relaxed_rejected_logps"):
            _stat(stats, name, self.name)
        s = epsilon_steps(stats)
        beta_i = self.beta / (1 + self.epsilon * s)
        a = self.entropy_alpha
        out = ObjectiveOutput(
            -F.logsigmoid(beta_i * _logratio_margin(stats, a)), *_rewards(stats, beta_i, a), beta_steps=s
        )
        out.metrics["beta/mean"] = beta_i.mean()
        out.metrics["beta/base"] = torch.tensor(self.beta, dtype=beta_i.dtype)
        out.metrics["beta/relaxed_frac"] = (s > 0).to(beta_i.dtype).mean()
        out.metrics["beta/tightened_frac"] = (s < 0).to(beta_i.dtype).mean()
        return _metrics(self._alpha_metrics(out), stats)

    def update_base_beta(self, mean_step: float) -> float:
        """beta <- beta / (1 + e * m); m is the mean step over the optimizer step's pairs (all processes)."""
        mean_step = float(mean_step)  # a 0-dim tensor from the all-reduce must not turn beta into a tensor
        _require(-1.0 <= mean_step <= 1.0, f"mean step must be in [-1, 1], got {mean_step!r}")
        self.beta = self.beta / (1 + self.epsilon * mean_step)
        return self.beta

    def stat_request(self) -> StatRequest:
        return replace(
            super().stat_request(), epsilon=self.epsilon
        )  # the perturbed log-probs (Stat.PERTURBED)

    def after_step(
        self,
        mean_beta_step: Callable[[], float] | None,
        token_entropy: Callable[[], float] | None = None,
    ) -> dict[str, float | None]:
        if mean_beta_step is not None:  # a skipped step leaves beta as it was
            self.update_base_beta(mean_beta_step())
        return {"beta/base_next": self.beta, **self._target_step(token_entropy)}

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = _check_beta(float(state["beta"]))
        if self.targeted:
            super().load_state_dict(state)


class _TDPOBase(_EntropyTarget, Objective):
    _needs = frozenset({Stat.TOKEN_KL})

    def _parts(self, stats: PairStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kl_w = _stat(stats, "kl_chosen", self.name)
        kl_l = _stat(stats, "kl_rejected", self.name)
        u = self.beta * _logratio_margin(stats, self.entropy_alpha)
        return u, kl_w, kl_l

    def _finish(self, losses: torch.Tensor, stats: PairStats, kl_w, kl_l) -> ObjectiveOutput:
        out = ObjectiveOutput(losses, *_rewards(stats, self.beta, self.entropy_alpha))
        out.metrics["kl/seq_chosen"] = kl_w.detach().mean()
        out.metrics["kl/seq_rejected"] = kl_l.detach().mean()
        return _metrics(self._alpha_metrics(out), stats)


class TDPO1(_TDPOBase):
    """TDPO1 (Zeng et al. 2024, arXiv 2404.11999, the TDPO1 loss): loss = -log sigma(u - delta),
    u = beta*(a*pw - rw) - beta*(a*pl - rl), delta = beta*D(x, y_l) - beta*D(x, y_w),
    D = sum over response tokens of KL(pi_ref(.|x,y<t) || pi(.|x,y<t)); a = entropy_alpha (1: plain TDPO1).
    """

    name = "tdpo1"

    def __init__(
        self,
        beta: float = 0.1,
        entropy_alpha: float = 1.0,
        entropy_target: float | None = None,
        entropy_target_fraction: float | None = None,
        alpha_lr: float = ALPHA_LR,
        alpha_min: float = ALPHA_MIN,
        alpha_max: float = ALPHA_MAX,
    ):
        self.beta = _check_beta(beta)
        self.entropy_alpha = _check_alpha(entropy_alpha, "entropy_alpha")
        self._init_target(entropy_target, entropy_target_fraction, alpha_lr, alpha_min, alpha_max)

    def pair_loss(self, stats: PairStats) -> ObjectiveOutput:
        u, kl_w, kl_l = self._parts(stats)
        delta = self.beta * kl_l - self.beta * kl_w
        return self._finish(-F.logsigmoid(u - delta), stats, kl_w, kl_l)


class TDPO2(_TDPOBase):
    """TDPO2 (Zeng et al. 2024, arXiv 2404.11999, the TDPO2 loss): loss = -log sigma(u - alpha*delta),
    delta = beta*D(x, y_l) - sg(beta*D(x, y_w)); u and D as in TDPO1 (a = entropy_alpha).
    """

    name = "tdpo2"

    def __init__(
        self,
        beta: float = 0.1,
        alpha: float = 0.5,
        entropy_alpha: float = 1.0,
        entropy_target: float | None = None,
        entropy_target_fraction: float | None = None,
        alpha_lr: float = ALPHA_LR,
        alpha_min: float = ALPHA_MIN,
        alpha_max: float = ALPHA_MAX,
    ):
        self.beta = _check_beta(beta)
        self.alpha = _check_alpha(alpha)
        self.entropy_alpha = _check_alpha(entropy_alpha, "entropy_alpha")
        self._init_target(entropy_target, entropy_target_fraction, alpha_lr, alpha_min, alpha_max)

    def pair_loss(self, stats: PairStats) -> ObjectiveOutput:
        u, kl_w, kl_l = self._parts(stats)
        delta = self.beta * kl_l - (self.beta * kl_w).detach()
        return self._finish(-F.logsigmoid(u - self.alpha * delta), stats, kl_w, kl_l)


OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (DPO, IPO, ConservativeDPO, HDPO, EpsilonDPO, TDPO1, TDPO2)
}


def build_objective(name: str, weight: float = 1.0, sft_weight: float = 0.0, **hparams: Any) -> Objective:
    """Construct a registered objective by its config name, with a clear error for unknown names/arguments.

    weight, sft_weight: the loss is weight * (the objective's loss) + sft_weight * `sft_term`, TRL's
    `loss_type: [sigmoid, sft]` with `loss_weights: [weight, sft_weight]`; any objective composes with it.
    """
    for label, value in (("weight", weight), ("sft_weight", sft_weight)):
        _require(
            isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
            f"{label} must be a finite number >= 0, got {value!r}",
        )
    _require(weight > 0 or sft_weight > 0, "weight and sft_weight are both 0: the loss would be 0")
    if name not in OBJECTIVES:
        raise ObjectiveConfigError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        hint = ""
        if {"entropy_target", "entropy_target_fraction"} & set(unknown):
            hint = (
                " An entropy target adapts H-DPO's alpha: objectives hdpo, epsilon_dpo, tdpo1 and tdpo2 accept"
                " it (use hdpo for DPO with an entropy target)."
            )
        elif "entropy_alpha" in unknown:
            hint = (
                " H-DPO's entropy coefficient composes only with epsilon_dpo, tdpo1 and tdpo2 (as"
                " entropy_alpha); for DPO with alpha use objective 'hdpo' and its 'alpha'."
            )
        elif "alpha" in unknown:
            hint = " 'alpha' is H-DPO's (hdpo) or TDPO2's (tdpo2); use 'entropy_alpha' to add H-DPO's alpha"
            hint += " to epsilon_dpo or tdpo1."
        raise ObjectiveConfigError(
            f"objective {name!r} does not accept {unknown}; it accepts {accepted}.{hint}"
        )
    objective = cls(**hparams)
    objective.weight, objective.sft_weight = float(weight), float(sft_weight)
    return objective
