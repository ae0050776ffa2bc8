"""Study 13: epsilon-DPO against DPO across beta on the real model (SmolLM2-135M-Instruct, chat task `count`).

epsilon-DPO (arXiv 2502.13177) adapts each pair's beta from the preference logit's monotonicity under the
perturbations beta*(1 +/- epsilon) and moves the base beta with the batch; the paper reports a better best
result than DPO and less sensitivity to the starting beta. Study 7 compared the two at the demo's beta 0.2
only (epsilon-DPO 0.06 below DPO's pass@1, not held), and study 3 (`epsilon_dpo_beta.py`) across beta on the
toy. This study is study 3's question on the real model:

  - per seed of study 7, its pairs and its DPO and epsilon-DPO (epsilon 0.01) at beta 0.2 are reused, and
    both are trained at beta in NEW_BETAS the same way (`tether.demo.pretrained_settings` with beta replaced:
    lr 1e-5, 20 steps of 4 pairs, the seed's order) and evaluated exactly as study 7 evaluates (the same
    8 prompts x 8 samples at T=1 and sampling seed), so every (method, beta) row of a seed is comparable;
  - epsilon-DPO's logged lever: the share of pairs whose beta was relaxed / tightened per step, and its
    base beta at the end.

Settings fixed before running (study 3's betas around the demo's 0.2 by a factor 2 each way; the cores allowed
two more betas); claims:

  1. epsilon-DPO's best pass@1 over beta is higher than DPO's best (the paper's headline);
  2. epsilon-DPO is less sensitive to beta: the range (max - min) of its pass@1 over the betas is smaller
     than DPO's.

    python experiments/real_epsilon_beta.py [--model FOLDER]   # after real_demo_seeds.py

About 14 minutes per seed on 2 CPU cores (4 trainings, one evaluation of 5 models of 64 samples each); the
results JSON is rewritten after every seed, so a stopped run reports the seeds it finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import common as c
import numpy as np
import real_demo_seeds

from tether.train import read_metrics

NAME = "real_epsilon_beta"
TASK = real_demo_seeds.TASK
SEEDS = real_demo_seeds.SEEDS
BETAS = (0.1, 0.2, 0.4)
DEMO_BETA = 0.2  # tether.demo.pretrained_settings; its runs are study 7's
METHODS = {
    "dpo": ["objective.name=dpo"],
    "epsilon_dpo": ["objective.name=epsilon_dpo", "objective.epsilon=0.01"],
}
TEMPERATURE = real_demo_seeds.TEMPERATURE
LEVER_KEYS = ("beta/relaxed_frac", "beta/tightened_frac", "beta/base")


def run_name(method: str, beta: float) -> str:
    return method if beta == DEMO_BETA else f"{method}_b{beta:g}"


def _settings(beta: float) -> list[str]:
    from tether.demo import PRETRAINED, pretrained_settings

    settings = [s for s in pretrained_settings(PRETRAINED) if not s.startswith("objective.beta=")]
    if len(settings) != len(pretrained_settings(PRETRAINED)) - 1:
        raise RuntimeError("tether.demo.pretrained_settings no longer sets objective.beta: update this study")
    return [*settings, f"objective.beta={beta:g}"]


def run(model: Path) -> dict[str, Any]:
    from tether.demo import PRETRAINED, _train_policies, pretrained_evaluation

    timer = c.Timer()
    per_seed = {}
    for seed in SEEDS:
        demo = real_demo_seeds.trained_seed(seed)
        out = c.RUNS / NAME / f"seed{seed}"
        runs = {}
        for beta in BETAS:
            for method, overrides in METHODS.items():
                name = run_name(method, beta)
                runs[name] = (demo if beta == DEMO_BETA else out) / "runs" / name
                if not (runs[name] / "final").exists():
                    with timer.stage("train"):
                        c.log(f"seed {seed}: training {name}")
                        _train_policies(
                            out,
                            model,
                            demo / "data" / "pairs.jsonl",
                            _settings(beta),
                            False,
                            seed,
                            objectives=[(name, overrides)],
                        )
        new = {name: path for name, path in runs.items() if not path.is_relative_to(demo)}
        with timer.stage("eval"):
            if (out / "eval" / "eval.json").exists():
                evaluation = c.read_json(out / "eval" / "eval.json")
            else:
                c.log(f"seed {seed}: evaluating {', '.join(new)}")
                evaluation = pretrained_evaluation(out, model, new, False, TASK, PRETRAINED)
        fixed = c.read_json(demo / "eval" / "eval.json")["models"]
        rows = {name: fixed[name]["temperatures"][TEMPERATURE] for name in ("reference", *METHODS)}
        rows |= {name: evaluation["models"][name]["temperatures"][TEMPERATURE] for name in new}
        lever = {}
        for beta in BETAS:
            metrics = [m for m in read_metrics(runs[run_name("epsilon_dpo", beta)]) if "beta/base" in m]
            lever[f"{beta:g}"] = {key: [m[key] for m in metrics] for key in LEVER_KEYS}
        per_seed[str(seed)] = {
            "eval": rows,
            "reference_here": evaluation["models"]["reference"]["temperatures"][TEMPERATURE],
            "lever": lever,
        }
        # Written after every seed: a study stopped early still reports the seeds it finished.
        results = {
            "study": NAME,
            "task": TASK,
            "model": str(model),
            "seeds": [int(s) for s in per_seed],
            "betas": list(BETAS),
            "methods": list(METHODS),
            "sizes": {"train_steps": PRETRAINED.train_steps, "batch_size": PRETRAINED.batch_size},
            "per_seed": per_seed,
            "wall": timer.as_dict(),
        }
        c.write_json(c.RESULTS / f"{NAME}.json", results)
    return results


def pass1(results: dict[str, Any], method: str) -> np.ndarray:
    """(seeds, betas) pass@1 at T=1."""
    return np.array(
        [
            [
                results["per_seed"][str(s)]["eval"][run_name(method, b)]["pass@k"]["1"]
                for b in results["betas"]
            ]
            for s in results["seeds"]
        ],
        dtype=np.float64,
    )


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    v, mat = c.verdict, c.MATERIAL["pass"]
    dpo, eps = pass1(results, "dpo"), pass1(results, "epsilon_dpo")
    spread = lambda a: a.max(1) - a.min(1)  # noqa: E731
    return [
        {
            "claim": "epsilon-DPO's best pass@1 over beta is higher than DPO's best",
            "rule": f"d = max over beta pass@1(epsilon-DPO) - max over beta pass@1(DPO) > {mat:g}",
        }
        | v((eps.max(1) - dpo.max(1)).tolist(), mat),
        {
            "claim": "epsilon-DPO's pass@1 is less sensitive to beta than DPO's",
            "rule": f"d = range over beta of pass@1(DPO) - the same range of epsilon-DPO > {mat:g}",
        }
        | v((spread(dpo) - spread(eps)).tolist(), mat),
    ]


def plot(results: dict[str, Any]) -> list[str]:
    fig, axes = c.figure(2, width=4.4, height=3.5)
    betas = np.asarray(results["betas"])
    for method in results["methods"]:
        c.band(axes[0][0], betas, pass1(results, method).tolist(), method, marker="o")
    axes[0][0].set(xscale="log", xlabel="beta", title="pass@1 at T=1 (mean, band = seeds)")
    axes[0][0].set_xticks(betas, [f"{b:g}" for b in betas])
    axes[0][0].legend(fontsize=8)
    for beta in results["betas"]:
        frac = [
            np.mean(results["per_seed"][str(s)]["lever"][f"{beta:g}"]["beta/relaxed_frac"])
            for s in results["seeds"]
        ]
        axes[0][1].scatter([beta] * len(frac), frac, color="black", s=12)
    axes[0][1].set(
        xscale="log", xlabel="beta", ylim=(0, 1), title="epsilon-DPO: share of pairs relaxed per step"
    )
    axes[0][1].set_xticks(betas, [f"{b:g}" for b in betas])
    fig.suptitle(f"SmolLM2-135M-Instruct, task {results['task']}: epsilon-DPO across beta")
    return [c.save_figure(fig, NAME)]


if __name__ == "__main__":
    real_demo_seeds.main_on_study_7(__doc__, run, claims)
