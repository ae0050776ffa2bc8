"""Study 2: TDPO1 / TDPO2 vs DPO on the controlled-sentiment task (scalar reward).

For each seed and beta: pairs from the shared reference -> DPO, TDPO1 and TDPO2 (alpha 0.3, 0.5, 0.7),
checkpointed during training -> at every checkpoint (and the final model):
- reward and sequential KL to the reference of the policy's own samples at temperature 1 (`tether.evaluate`:
  kl_reverse = sum_t KL(pi || pi_ref), kl_forward = sum_t KL(pi_ref || pi), nats per response);
- TDPO's sequential KL D(x, y; pi_ref || pi) of the chosen and of the rejected responses of a fixed subset
  of the training pairs (the same measurement for every objective; TDPO also logs it while training).
Writes results/tdpo_vs_dpo.json and figures/tdpo_*.png.

    python experiments/tdpo_vs_dpo.py
"""

from __future__ import annotations

from typing import Any

import common as c
import numpy as np

NAME = "tdpo_vs_dpo"
TASK = "sentiment"
OBJECTIVES: dict[str, list[str]] = {
    "dpo": ["objective.name=dpo"],
    "tdpo1": ["objective.name=tdpo1"],
    "tdpo2_a0.3": ["objective.name=tdpo2", "objective.alpha=0.3"],
    "tdpo2_a0.5": ["objective.name=tdpo2", "objective.alpha=0.5"],
    "tdpo2_a0.7": ["objective.name=tdpo2", "objective.alpha=0.7"],
}
BETAS = (0.05, 0.1, 0.5)
MAIN_BETA = 0.1  # the beta of the chosen-vs-rejected KL claims
SEEDS = (0, 1, 2)
PAIRS = c.PairSizes(prompts=200, samples_per_prompt=8, pairs_per_prompt=2)
TRAIN = c.TrainSizes(epochs=2, checkpoint_every=10)
EVAL = c.EvalSizes(prompts=32, samples=8, temperatures=(1.0,))
KL_PAIRS = 64  # training pairs on which the chosen / rejected sequential KL is measured
BUDGETS = 10  # KL budgets of the frontier comparison
FINAL_KEYS = ("reward", "win_rate", "kl_reverse", "kl_forward", "kl_chosen", "kl_rejected")  # report table


def run() -> dict[str, Any]:
    c.setup()
    timer = c.Timer()
    with timer.stage("reference"):
        c.shared_reference(TASK)
    per_seed: dict[str, Any] = {}
    for seed in SEEDS:
        base = c.RUNS / NAME / f"seed{seed}"
        with timer.stage("pairs"):
            data, pairing = c.shared_pairs(TASK, seed, PAIRS)
        kl_pairs = c.read_pairs(data)[:KL_PAIRS]
        runs: dict[str, Any] = {}
        models = {}
        for beta in BETAS:
            for objective, extra in OBJECTIVES.items():
                key = f"{objective}_b{beta:g}"
                c.log(f"{NAME} seed {seed}: training {key}")
                with timer.stage("train"):
                    run_dir = c.train_policy(
                        base / key, TASK, data, [*extra, f"objective.beta={beta}"], seed, TRAIN
                    )
                metrics = c.read_metrics(run_dir)
                entry: dict[str, Any] = {
                    "objective": objective,
                    "beta": beta,
                    "logged": {
                        k: [m.get(k) for m in metrics]
                        for k in ("step", "loss", "rewards/accuracies", "kl/seq_chosen", "kl/seq_rejected")
                    },
                    "checkpoints": [],
                }
                with timer.stage("pair_kl"):
                    for step, folder in c.checkpoints(run_dir):
                        chosen, rejected = c.pair_kl(folder, TASK, kl_pairs)
                        entry["checkpoints"].append(
                            {"step": step, "kl_chosen": chosen, "kl_rejected": rejected}
                        )
                        models[f"{key}@{step}"] = folder
                runs[key] = entry
        with timer.stage("eval"):
            c.log(f"{NAME} seed {seed}: evaluating {len(models)} checkpoints")
            evaluation = c.evaluate(base / "eval", TASK, models, seed, EVAL, "reward")
        for key, entry in runs.items():
            for point in entry["checkpoints"]:
                row = evaluation["models"][f"{key}@{point['step']}"]["temperatures"]["1"]
                point.update(
                    {m: row[m] for m in ("reward", "win_rate", "kl_forward", "kl_reverse", "entropy")}
                )
        ref_row = evaluation["models"]["reference"]["temperatures"]["1"]
        per_seed[str(seed)] = {
            "pairing": pairing,
            "reference": {m: ref_row[m] for m in ("reward", "entropy")},
            "runs": runs,
        }
    sizes = c.run_sizes(PAIRS, TRAIN, EVAL, kl_pairs=KL_PAIRS)
    fields = {"objectives": list(OBJECTIVES), "betas": list(BETAS), "main_beta": MAIN_BETA}
    return c.save_results(NAME, TASK, SEEDS, sizes, per_seed, timer, **fields)


# --- analysis (also run by make_report.py from the JSON) ---------------------------------------------------


def run_entry(results: dict[str, Any], seed: int, objective: str, beta: float) -> dict[str, Any]:
    return results["per_seed"][str(seed)]["runs"][f"{objective}_b{beta:g}"]


def final(results: dict[str, Any], objective: str, beta: float, key: str) -> list[float]:
    """Per-seed value of `key` at the final checkpoint."""
    return [run_entry(results, s, objective, beta)["checkpoints"][-1][key] for s in results["seeds"]]


def frontier_points(results: dict[str, Any], seed: int, objective: str, kl_key: str) -> np.ndarray:
    """(N, 2) array of (KL, reward) over every checkpoint of every beta of one objective and seed."""
    points = [
        (p[kl_key], p["reward"])
        for beta in results["betas"]
        for p in run_entry(results, seed, objective, beta)["checkpoints"]
    ]
    return np.asarray(points, dtype=np.float64)


def best_reward_within(points: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """For each KL budget, the highest reward among points whose KL is at most the budget."""
    return np.asarray([points[points[:, 0] <= b, 1].max() for b in budgets])


def frontier_gap(results: dict[str, Any], seed: int, a: str, b: str, kl_key: str) -> float:
    """Mean over shared KL budgets of best_reward(a) - best_reward(b) (see `claims` for the budgets)."""
    pa, pb = frontier_points(results, seed, a, kl_key), frontier_points(results, seed, b, kl_key)
    low = max(pa[:, 0].min(), pb[:, 0].min())
    high = min(pa[:, 0].max(), pb[:, 0].max())
    if not high > low:
        return float("nan")
    budgets = np.linspace(low, high, BUDGETS)
    return float((best_reward_within(pa, budgets) - best_reward_within(pb, budgets)).mean())


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    beta = results["main_beta"]
    out = []
    # 1. DPO: the rejected responses' KL grows much faster than the chosen ones'.
    ratio = np.log(np.asarray(final(results, "dpo", beta, "kl_rejected"))) - np.log(
        np.asarray(final(results, "dpo", beta, "kl_chosen"))
    )
    out.append(
        {
            "claim": "DPO: the sequential KL of rejected responses grows much faster than that of chosen ones",
            "rule": f"per seed d = ln(KL_rejected / KL_chosen) of DPO's final model (beta={beta:g}, measured on"
            " training pairs); 'much faster' means a ratio above 2: claim d > ln 2",
            **c.verdict(ratio.tolist(), float(np.log(2.0))),
            "extra": {"KL_rejected / KL_chosen": c.summary(np.exp(ratio).tolist())},
        }
    )
    # 2. TDPO2 keeps both low: lower chosen and rejected KL than DPO at the same beta.
    subs = {}
    for side in ("kl_chosen", "kl_rejected"):
        diffs = np.log(final(results, "dpo", beta, side)) - np.log(final(results, "tdpo2_a0.5", beta, side))
        subs[side] = c.verdict(diffs.tolist(), c.MATERIAL["kl_ratio"])
    out.append(
        c.compound(
            "TDPO2 keeps the KL of both chosen and rejected responses low (below DPO's)",
            f"per seed d = ln(KL(DPO) / KL(TDPO2, alpha=0.5)) of the final models at beta={beta:g}, for"
            f" chosen and for rejected responses; claim d > {c.MATERIAL['kl_ratio']} (about 10% lower) for both",
            subs,
            "all",
            extra={
                f"{name} final KL_rejected / KL_chosen (beta={beta:g})": c.summary(
                    (
                        np.asarray(final(results, name, beta, "kl_rejected"))
                        / final(results, name, beta, "kl_chosen")
                    ).tolist()
                )
                for name in ("dpo", "tdpo2_a0.5")
            },
        )
    )
    # 3. TDPO2 dominates the reward-KL frontier.
    subs = {}
    for kl_key in ("kl_reverse", "kl_forward"):
        for other in ("dpo", "tdpo1"):
            gaps = [frontier_gap(results, s, "tdpo2_a0.5", other, kl_key) for s in results["seeds"]]
            subs[f"TDPO2 vs {other}, {kl_key}"] = c.verdict(gaps, c.MATERIAL["reward"])
    out.append(
        c.compound(
            "TDPO2 dominates the reward-KL frontier (over DPO and TDPO1)",
            "per seed, pool the (KL, reward) points of every checkpoint and beta of each method; at"
            f" {BUDGETS} KL budgets spread evenly over the KL range both methods cover, take each method's best"
            " reward within the budget; d = mean over budgets of best(TDPO2, alpha=0.5) - best(other);"
            f" claim d > {c.MATERIAL['reward']}, for both KL directions and both other methods",
            subs,
            "all",
        )
    )
    return out


def plot(results: dict[str, Any]) -> list[str]:
    paths = []
    # Frontier: reward vs KL (both directions), every checkpoint of every beta, seeds pooled.
    fig, axes = c.figure(2, width=5.0, height=4.0)
    for ax, kl_key in zip(axes[0], ("kl_reverse", "kl_forward")):
        for objective in results["objectives"]:
            pts = np.concatenate([frontier_points(results, s, objective, kl_key) for s in results["seeds"]])
            ax.scatter(pts[:, 0], pts[:, 1], s=8, alpha=0.6, label=objective)
        ref = np.mean([results["per_seed"][str(s)]["reference"]["reward"] for s in results["seeds"]])
        ax.axhline(ref, color="black", linestyle="--", linewidth=1, label="reference")
        ax.set_xscale("log")
        ax.set_xlabel(f"{kl_key} (nats per response, own samples at T=1)")
        ax.set_title("reward vs sequential KL: all checkpoints, betas, seeds", fontsize=10)
    axes[0][0].set_ylabel("reward")
    axes[0][0].legend(fontsize=7)
    paths.append(c.save_figure(fig, "tdpo_frontier"))
    # KL of chosen / rejected over training at every beta.
    fig, axes = c.figure(len(results["betas"]), 2)
    for col, beta in enumerate(results["betas"]):
        for row, side in enumerate(("kl_chosen", "kl_rejected")):
            ax = axes[row][col]
            for objective in results["objectives"]:
                entries = [run_entry(results, s, objective, beta) for s in results["seeds"]]
                steps = [0] + [p["step"] for p in entries[0]["checkpoints"]]
                c.band(ax, steps, [[0.0] + [p[side] for p in e["checkpoints"]] for e in entries], objective)
            ax.set_title(f"{side.replace('kl_', 'seq. KL of ')} pairs, beta={beta:g}", fontsize=10)
            ax.set_xlabel("optimizer step")
    axes[0][0].legend(fontsize=7)
    paths.append(c.save_figure(fig, "tdpo_pair_kl"))
    return paths


if __name__ == "__main__":
    run()
