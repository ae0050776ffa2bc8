"""Study 6: how much room the H-DPO studies gave alpha (the offset beta*(1 - alpha)*|rw - rl| against the margins).

H-DPO's margin h = beta*[alpha*(pw - pl) - (rw - rl)] is DPO's margin at beta*alpha plus the per-pair offset
beta*(alpha - 1)*(rw - rl), where rw - rl is the reference's sequence log-prob gap of the pair. alpha can only
change what training does through that offset (and the overall scale, which Adam largely ignores), so it acts
where the offset is comparable to the trained margins. This study measures both for studies 1 and 4
(`hdpo_alpha_sweep`, `combinations`), which use the same pairs (task `reverse`, the same PairSizes and seeds).

What can and cannot be measured without rerunning those studies:
  - rw - rl needs only the reference and the pair files, but runs/ is not kept and the shared reference rebuilt
    from the same recipe (SFT seed 0) is not bit-identical to the one the studies used (its SFT loss and pair
    counts differ, both recorded in the JSON). The gaps below are those of the rebuilt reference and its
    pairs: the same recipe and sizes, not the same files.
  - The studies logged only the last step's batch-mean `rewards/margins` (one batch of about 10 pairs) per run;
    those are read from results/*.json as they are.
  - Per-pair trained margins need the trained policies, which are not kept: the 10 policies of study 1 (5
    alphas x 2 betas) are retrained for TRAIN_SEEDS only, on the rebuilt pairs (training only, no evaluation;
    about 1 minute per seed), and scored on their own training pairs.

    python experiments/hdpo_mechanism.py
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import combinations
import common as c
import hdpo_alpha_sweep as sweep
import numpy as np
import torch

NAME = "hdpo_mechanism"
TASK = sweep.TASK
SEEDS = sweep.SEEDS
TRAIN_SEEDS = (0,)
QUANTILES = (0.1, 0.5, 0.9)
SATURATED = 0.9  # a pair whose sigma(h) exceeds this gives little gradient: its loss has (nearly) saturated


def sequence_logps(model_dir: Path, pairs: Sequence[tuple[str, str, str]]) -> tuple[list[float], list[float]]:
    """Sequence log-probs of the chosen and the rejected responses (response tokens and <eos>, as in training)."""
    from transformers import AutoModelForCausalLM

    from tether.evaluate.likelihood import score_sequences

    tokenizer, prompt_ids, responses = c.encode_pairs(TASK, pairs)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    out = []
    for completion_ids in responses:
        with torch.no_grad():
            out.append(
                score_sequences(model, prompt_ids, completion_ids, tokenizer.pad_token_id).logps.tolist()
            )
    return out[0], out[1]


def run() -> dict[str, Any]:
    c.setup()
    timer = c.Timer()
    with timer.stage("reference"):
        ref_dir = c.shared_reference(TASK)
    per_seed: dict[str, Any] = {}
    for seed in SEEDS:
        with timer.stage("pairs"):
            data, pairing = c.shared_pairs(TASK, seed, sweep.PAIRS)
            pairs = c.read_pairs(data)
            rw, rl = sequence_logps(ref_dir, pairs)
        entry: dict[str, Any] = {"pairing": pairing, "ref_gap": (np.asarray(rw) - np.asarray(rl)).tolist()}
        if seed in TRAIN_SEEDS:
            policy_gap, final = {}, {}
            for beta in sweep.BETAS:
                for alpha in sweep.ALPHAS:
                    name = sweep.model_name(alpha, beta)
                    c.log(f"{NAME} seed {seed}: training {name}")
                    with timer.stage("train"):
                        run_dir = c.train_policy(
                            c.RUNS / NAME / f"seed{seed}" / name,
                            TASK,
                            data,
                            sweep.overrides(alpha, beta),
                            seed,
                            sweep.TRAIN,
                        )
                    with timer.stage("score"):
                        pw, pl = sequence_logps(run_dir / "final", pairs)
                    policy_gap[name] = (np.asarray(pw) - np.asarray(pl)).tolist()
                    final[name] = c.read_metrics(run_dir)[-1]
            entry["policy_gap"] = policy_gap
            entry["final"] = final
        per_seed[str(seed)] = entry
    results = {
        "study": NAME,
        "task": TASK,
        "alphas": list(sweep.ALPHAS),
        "betas": list(sweep.BETAS),
        "seeds": list(SEEDS),
        "train_seeds": list(TRAIN_SEEDS),
        "sizes": {"pairs": sweep.PAIRS.__dict__, "train": sweep.TRAIN.__dict__},
        "reference": c.reference_info(TASK),
        "per_seed": per_seed,
        "wall": timer.as_dict(),
    }
    c.write_json(c.RESULTS / f"{NAME}.json", results)
    return results


# --- analysis (also run by make_report.py from the JSON) ---------------------------------------------------


def ref_gaps(results: dict[str, Any]) -> np.ndarray:
    """rw - rl of every pair of every seed."""
    return np.concatenate([results["per_seed"][str(s)]["ref_gap"] for s in results["seeds"]])


def offsets(results: dict[str, Any], alpha: float, beta: float) -> np.ndarray:
    """beta * (1 - alpha) * |rw - rl| over every pair of every seed."""
    return beta * abs(1 - alpha) * np.abs(ref_gaps(results))


def quantiles(values: np.ndarray) -> list[float]:
    return [float(q) for q in np.quantile(values, QUANTILES)]


def trained_margins(results: dict[str, Any], alpha: float, beta: float) -> dict[str, np.ndarray]:
    """Per pair over the retrained seeds: h (the trained H-DPO margin), its DPO part alpha*beta*[(pw - pl) -
    (rw - rl)] and its offset beta*(alpha - 1)*(rw - rl)."""
    name = sweep.model_name(alpha, beta)
    entries = [results["per_seed"][str(s)] for s in results["train_seeds"]]
    ref = np.concatenate([e["ref_gap"] for e in entries])
    policy = np.concatenate([e["policy_gap"][name] for e in entries])
    return {
        "h": beta * (alpha * policy - ref),
        "dpo_part": alpha * beta * (policy - ref),
        "offset": beta * (alpha - 1) * ref,
        "logratio": policy - ref,
    }


def study_margins(study: dict[str, Any], model: str) -> list[float]:
    """The study's own last-step batch-mean `rewards/margins` per seed (one batch each)."""
    return [study["per_seed"][str(s)]["training"][model]["final"]["rewards/margins"] for s in study["seeds"]]


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """A measurement, not a claim from a paper: no verdicts."""
    return []


def plot(results: dict[str, Any]) -> list[str]:
    fig, axes = c.figure(3)
    ax = axes[0][0]
    gaps = ref_gaps(results)
    ax.hist(gaps, bins=60, color="gray")
    ax.set_title("reference gap rw - rl per pair (nats)", fontsize=10)
    ax.set_xlabel("rw - rl")
    for ax, beta in zip(axes[0][1:], results["betas"]):
        bins = None
        for alpha in results["alphas"]:
            m = trained_margins(results, alpha, beta)
            _, bins, _ = ax.hist(
                m["h"], bins=bins if bins is not None else 50, histtype="step", label=f"h, alpha={alpha:g}"
            )
        low = min(results["alphas"])
        ax.hist(
            trained_margins(results, low, beta)["offset"],
            bins=bins,
            histtype="stepfilled",
            alpha=0.3,
            color="black",
            label=f"offset beta(alpha-1)(rw-rl), alpha={low:g}",
        )
        ax.set_title(f"beta={beta:g}: trained margin h per pair", fontsize=10)
        ax.set_xlabel("nats")
        ax.legend(fontsize=7)
    return [c.save_figure(fig, "hdpo_mechanism")]


def studies() -> dict[str, dict[str, Any]]:
    """The results of the two H-DPO studies whose runs this study describes (those present)."""
    out = {}
    for module in (sweep, combinations):
        path = c.RESULTS / f"{module.NAME}.json"
        if path.exists():
            out[module.NAME] = c.read_json(path)
    return out


if __name__ == "__main__":
    run()
