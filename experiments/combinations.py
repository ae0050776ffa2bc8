"""Study 4: H-DPO's alpha composed with epsilon-DPO's adaptive beta and with TDPO2 (a combination no paper ran).

tether defines the compositions through `objective.entropy_alpha`: the policy's log-probability inside every
log-ratio is multiplied by alpha (H-DPO's h), while epsilon-DPO keeps its per-pair beta and TDPO2 its sequential
KL terms. On the verifiable "reverse" task, for each seed and beta in {0.1, 1}: pairs from the shared reference
-> DPO and H-DPO (alpha 0.9, 1.1), epsilon-DPO and TDPO2 each with entropy_alpha 1 (plain), 0.9 and 1.1 -> the
same evaluation as study 1 at temperatures 0.5 and 1. Writes results/combinations.json and figures/combinations_b*.png.

    python experiments/combinations.py
"""

from __future__ import annotations

from typing import Any

import common as c
import numpy as np

NAME = "combinations"
TASK = "reverse"
BETAS = (0.1, 1.0)  # as in study 1: H-DPO's alpha has more room at the larger beta
ALPHAS = (0.9, 1.0, 1.1)
FAMILIES: dict[str, list[str]] = {
    "dpo": ["objective.name=dpo"],  # with alpha != 1 this family is H-DPO (objective hdpo)
    "epsilon_dpo": ["objective.name=epsilon_dpo", "objective.epsilon=0.01"],
    "tdpo2": ["objective.name=tdpo2", "objective.alpha=0.5"],
}
SEEDS = (0, 1, 2, 3, 4)
PAIRS = c.PairSizes(prompts=300, samples_per_prompt=8, pairs_per_prompt=2)  # the same pairs as study 1
TRAIN = c.TrainSizes(epochs=2)
EVAL = c.EvalSizes(prompts=64, samples=32, temperatures=(0.5, 1.0))
LOG_KEYS = ("entropy/chosen", "beta/base", "beta/relaxed_frac", "beta/tightened_frac", "kl/seq_rejected")


def variant(family: str, alpha: float, beta: float) -> str:
    return (family if alpha == 1.0 else f"{family}+a{alpha:g}") + f"_b{beta:g}"


def overrides(family: str, alpha: float, beta: float) -> list[str]:
    if alpha == 1.0:
        return [*FAMILIES[family], f"objective.beta={beta}"]
    if family == "dpo":
        return ["objective.name=hdpo", f"objective.alpha={alpha}", f"objective.beta={beta}"]
    return [*FAMILIES[family], f"objective.entropy_alpha={alpha}", f"objective.beta={beta}"]


def run() -> dict[str, Any]:
    c.setup()
    timer = c.Timer()
    with timer.stage("reference"):
        c.shared_reference(TASK)
    variants = {variant(f, a, b): overrides(f, a, b) for b in BETAS for f in FAMILIES for a in ALPHAS}
    per_seed = c.run_variants(
        NAME, TASK, variants, SEEDS, PAIRS, TRAIN, EVAL, "verifier", timer, log_keys=LOG_KEYS
    )
    sizes = c.run_sizes(PAIRS, TRAIN, EVAL)
    fields = {"families": list(FAMILIES), "alphas": list(ALPHAS), "betas": list(BETAS)}
    return c.save_results(NAME, TASK, SEEDS, sizes, per_seed, timer, **fields)


# --- analysis (also run by make_report.py from the JSON) ---------------------------------------------------


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Expectations carried over from H-DPO's math, tested in each family at each beta (no paper reports these)."""
    return [claim for beta in results["betas"] for claim in claims_at(results, beta)]


def claims_at(results: dict[str, Any], beta: float) -> list[dict[str, Any]]:
    def per_seed(family: str, alpha: float, key: str) -> np.ndarray:
        return np.asarray(c.seed_values(results, variant(family, alpha, beta), 1.0, key))

    out = []
    for key, label in (("entropy", "policy entropy"), ("pass@1", "pass@1")):
        subs = {}
        for family in results["families"]:
            low, plain, high = (per_seed(family, a, key) for a in (0.9, 1.0, 1.1))
            t = c.MATERIAL["entropy" if key == "entropy" else "pass"]
            if key == "entropy":
                subs[f"{family}: plain - alpha 0.9"] = c.verdict((plain - low).tolist(), t)
                subs[f"{family}: alpha 1.1 - plain"] = c.verdict((high - plain).tolist(), t)
            else:
                subs[f"{family}: alpha 0.9 - plain"] = c.verdict((low - plain).tolist(), t)
        direction = (
            "entropy at T=1 rises with alpha (0.9 < plain < 1.1)"
            if key == "entropy"
            else "alpha 0.9 raises pass@1 at T=1 over the plain objective"
        )
        out.append(
            c.compound(
                f"beta={beta:g}: in every family (DPO, epsilon-DPO, TDPO2), {direction}",
                f"per seed, paired differences of {label} at T=1 as named; claim d >"
                f" {c.MATERIAL['entropy' if key == 'entropy' else 'pass']} for each; held only if all are held",
                subs,
                "all",
            )
        )
    # What alpha did do in every family: move the KL to the reference, as a rescaled beta would.
    subs = {}
    for family in results["families"]:
        low, plain, high = (np.log(per_seed(family, a, "kl_forward")) for a in (0.9, 1.0, 1.1))
        subs[f"{family}: ln KL(alpha 0.9 / plain)"] = c.verdict(
            (low - plain).tolist(), c.MATERIAL["kl_ratio"]
        )
        subs[f"{family}: ln KL(plain / alpha 1.1)"] = c.verdict(
            (plain - high).tolist(), c.MATERIAL["kl_ratio"]
        )
    out.append(
        c.compound(
            f"beta={beta:g}: in every family, the sequential KL to the reference falls as alpha rises (as if"
            " alpha rescaled beta; this test was posed after looking at the tables)",
            "per seed, d = ln of the ratio of KL(ref || pi) at T=1 as named; claim d >"
            f" {c.MATERIAL['kl_ratio']} (about 10%) for each; held only if all are held",
            subs,
            "all",
        )
    )
    return out


def plot(results: dict[str, Any]) -> list[str]:
    return [
        c.plot_temperature_panels(
            results,
            [variant(f, a, beta) for f in results["families"] for a in results["alphas"]],
            f"combinations_b{beta:g}",
        )
        for beta in results["betas"]
    ]


if __name__ == "__main__":
    run()
