"""Study 11: H-DPO's alpha on the real model, swept, with pass@k to k = 64 and DPO at its best temperature.

Study 7 (`real_demo_seeds.py`) trained DPO and H-DPO alpha 0.8 / 1.2 with the demo's settings and sampled 8
answers per prompt: alpha 1.2 kept diversity, but whether alpha < 1 sharpens and helps pass@1 was unclear,
and pass@8 was ~1 for every policy, too small a k for the paper's large-k claim. This study takes the paper's
comparison as it stated it (arXiv 2411.07595, section 5: alpha 0.8 at T=1 beats DPO at its best temperature,
T=0.5, on GSM8K; alpha > 1 better pass@k for k > 100 on HumanEval) to SmolLM2-135M-Instruct:

  - per seed of study 7, its pairs and its trained DPO (alpha 1) and alpha 0.8 policies are reused, and alpha
    0.9 and 1.1 are trained the same way (`tether.demo.pretrained_settings`: beta 0.2, lr 1e-5, 20 steps of 4
    pairs, the seed's training order), so the sweep is alpha in {0.8, 0.9, 1.0, 1.1};
  - every policy and the reference are sampled at T=1, N_SAMPLES = 64 answers on each of the demo's 8
    evaluation prompts (the prompts and sampling seed of study 7), pass@k for k = 1 ... 64;
  - DPO is also sampled at T in DPO_TEMPERATURES (16 answers per prompt: enough for pass@1), and "DPO's best
    temperature" is the one of {0.25, 0.5, 0.75, 1} with the highest pass@1 in that seed. Choosing the best
    on the same samples flatters DPO, which makes claim 3 harder to hold, not easier;
  - the mechanism of study 6 is measured on the seed's pairs: the offset beta*(1 - alpha)*|rw - rl| (rw - rl:
    the reference's sequence log-prob gap) against DPO's trained margins beta*[(pw - pl) - (rw - rl)].

Settings were fixed before any run (the demo's, so the rows are comparable with study 7; alpha 1.1 instead of
1.2 and k = 64 because the issue asks for them; 8 prompts because the cores allow 64 samples on 8). Claims:

  1. entropy at T=1 rises with alpha: per seed, the least-squares slope of entropy on alpha > 0;
  2. unique answers at T=1 rise with alpha: slope > 0;
  3. H-DPO alpha 0.8 at T=1 has a higher pass@1 than DPO at its best temperature (and, a separate line,
     alpha 0.9);
  4. pass@1 at T=1 falls with alpha (sharpening helps pass@1): slope of pass@1 on alpha < 0;
  5. H-DPO alpha 1.1 has a higher pass@64 at T=1 than DPO (the paper's large-k claim, at the largest k here).
     With 8 prompts pass@64 moves in steps of about 1/8 when a prompt is lost or won: a coarse measurement.

    python experiments/real_alpha_sweep.py [--model FOLDER]   # after real_demo_seeds.py

About 25 minutes per seed on 2 CPU cores (2 trainings of ~3 minutes, 4 policies x 512 samples, 3 x 128 for DPO's
temperatures); the reference's 512 samples are drawn once (the sample cache is shared by the seeds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import common as c
import numpy as np
import real_demo_seeds

NAME = "real_alpha_sweep"
TASK = real_demo_seeds.TASK
SEEDS = real_demo_seeds.SEEDS
ALPHAS = (0.8, 0.9, 1.0, 1.1)
REUSED = {0.8: "hdpo_a0.8", 1.0: "dpo"}  # trained by study 7, same settings
N_SAMPLES = 64
KS = (1, 2, 4, 8, 16, 32, 64)
TEMPERATURE = 1.0
DPO_TEMPERATURES = (0.25, 0.5, 0.75)
DPO_TEMPERATURE_SAMPLES = 16
BETA = 0.2  # tether.demo.pretrained_settings
QUANTILES = (0.1, 0.5, 0.9)


def model_name(alpha: float) -> str:
    return REUSED.get(alpha, f"hdpo_a{alpha:g}")


def _train(out: Path, model: Path, seed: int) -> dict[str, Path]:
    """The seed's policies by name: study 7's where reused, the others trained into out/runs."""
    from tether.demo import PRETRAINED, _train_policies, pretrained_settings

    demo = real_demo_seeds.run_dir(seed)
    runs = {REUSED[a]: demo / "runs" / REUSED[a] for a in REUSED}
    missing = [a for a in ALPHAS if a not in REUSED and not (out / "runs" / model_name(a) / "final").exists()]
    if missing:
        c.log(f"seed {seed}: training alpha {', '.join(f'{a:g}' for a in missing)}")
        _train_policies(
            out,
            model,
            demo / "data" / "pairs.jsonl",
            pretrained_settings(PRETRAINED),
            False,
            seed,
            objectives=[(model_name(a), ["objective.name=hdpo", f"objective.alpha={a:g}"]) for a in missing],
        )
    runs.update({model_name(a): out / "runs" / model_name(a) for a in ALPHAS if a not in REUSED})
    return runs


def _evaluate(
    out: Path,
    model: Path,
    runs: dict[str, Path],
    temperatures: tuple[float, ...],
    samples: int,
    reference: bool,
) -> dict[str, Any]:
    """`tether eval` of `runs` on the demo's evaluation prompts; samples cached in runs/NAME/samples."""
    from tether.chat_tasks import get_chat_task
    from tether.demo import EVAL_SEED, PRETRAINED
    from tether.evaluate.config import config_from_dict
    from tether.evaluate.runner import run_eval

    folder = out / ("eval_t1" if reference else "eval_dpo_temperatures")
    if (folder / "eval.json").exists():
        return c.read_json(folder / "eval.json")
    config = config_from_dict(
        {
            "models": [{"name": name, "path": str(run / "final")} for name, run in runs.items()],
            "reference": str(model) if reference else None,
            "task": TASK,
            "num_prompts": PRETRAINED.eval_prompts,
            "temperatures": list(temperatures),
            "n_samples": samples,
            "k": [k for k in KS if k <= samples],
            "max_new_tokens": get_chat_task(TASK).max_new_tokens,
            "seed": EVAL_SEED,
            "verifier": "task",
            "diversity_unit": "word",
            "output_dir": str(folder),
            "cache_dir": str(c.RUNS / NAME / "samples"),
            "batch_size": PRETRAINED.eval_prompts * samples,  # one sampling call per model and temperature
            "sampler": "shared_prefix",
            "progress": False,
        }
    )
    return run_eval(config)


def _pair_gaps(model_dir: Path, pairs_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Sequence log-probs (chosen, rejected) of every training pair under the model, tokenized as in training."""
    chosen, rejected = c.score_pair_file(model_dir, pairs_path)
    return chosen.logps.double().numpy(), rejected.logps.double().numpy()


def _mechanism(model: Path, runs: dict[str, Path], pairs_path: Path) -> dict[str, Any]:
    """rw - rl per pair (reference), and each policy's trained margin beta*[(pw - pl) - (rw - rl)]."""
    rw, rl = _pair_gaps(model, pairs_path)
    out: dict[str, Any] = {"ref_gap": (rw - rl).tolist(), "dpo_margin": {}}
    for alpha in ALPHAS:
        pw, pl = _pair_gaps(runs[model_name(alpha)] / "final", pairs_path)
        out["dpo_margin"][f"{alpha:g}"] = (BETA * ((pw - pl) - (rw - rl))).tolist()
    return out


def run(model: Path) -> dict[str, Any]:
    timer = c.Timer()
    per_seed = {}
    for seed in SEEDS:
        demo = real_demo_seeds.trained_seed(seed)
        out = c.RUNS / NAME / f"seed{seed}"
        with timer.stage("train"):
            runs = _train(out, model, seed)
        with timer.stage("eval T=1"):
            c.log(f"seed {seed}: sampling {N_SAMPLES} per prompt at T={TEMPERATURE:g}")
            main = _evaluate(out, model, runs, (TEMPERATURE,), N_SAMPLES, reference=True)
        with timer.stage("eval DPO temperatures"):
            c.log(f"seed {seed}: DPO at T={DPO_TEMPERATURES}")
            temps = _evaluate(
                out, model, {"dpo": runs["dpo"]}, DPO_TEMPERATURES, DPO_TEMPERATURE_SAMPLES, False
            )
        with timer.stage("mechanism"):
            mechanism_path = out / "mechanism.json"
            if not mechanism_path.exists():
                c.write_json(mechanism_path, _mechanism(model, runs, demo / "data" / "pairs.jsonl"))
            mechanism = c.read_json(mechanism_path)
        key = f"{TEMPERATURE:g}"
        per_seed[str(seed)] = {
            "eval": {name: row["temperatures"][key] for name, row in main["models"].items()},
            "dpo_temperatures": {
                f"{t:g}": temps["models"]["dpo"]["temperatures"][f"{t:g}"] for t in DPO_TEMPERATURES
            },
            "mechanism": mechanism,
        }
    results = {
        "study": NAME,
        "task": TASK,
        "model": str(model),
        "seeds": list(SEEDS),
        "alphas": list(ALPHAS),
        "n_samples": N_SAMPLES,
        "dpo_temperatures": list(DPO_TEMPERATURES),
        "dpo_temperature_samples": DPO_TEMPERATURE_SAMPLES,
        "beta": BETA,
        "per_seed": per_seed,
        "wall": timer.as_dict(),
    }
    c.write_json(c.RESULTS / f"{NAME}.json", results)
    return results


def value(row: dict[str, Any], key: str) -> float:
    """One eval metric of a row ("pass@<k>" for pass@k)."""
    return float(row["pass@k"][key.removeprefix("pass@")] if key.startswith("pass@") else row[key])


def per_alpha(results: dict[str, Any], key: str) -> np.ndarray:
    """(seeds, alphas) array of one metric at T=1."""
    return np.array(
        [
            [value(results["per_seed"][str(s)]["eval"][model_name(a)], key) for a in results["alphas"]]
            for s in results["seeds"]
        ]
    )


def slopes(results: dict[str, Any], key: str) -> np.ndarray:
    """Per seed, the least-squares slope of the metric on alpha."""
    return np.polyfit(np.asarray(results["alphas"]), per_alpha(results, key).T, 1)[0]


def dpo_best(results: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
    """Per seed, DPO's best pass@1 over its temperatures (T=1 from the main evaluation) and that temperature."""
    best, where = [], []
    for s in results["seeds"]:
        p = results["per_seed"][str(s)]
        options = {t: value(row, "pass@1") for t, row in p["dpo_temperatures"].items()}
        options[f"{TEMPERATURE:g}"] = value(p["eval"]["dpo"], "pass@1")
        t = max(options, key=options.get)
        best.append(options[t])
        where.append(t)
    return np.array(best), where


def seed_metric(results: dict[str, Any], model: str, key: str) -> np.ndarray:
    return np.array([value(results["per_seed"][str(s)]["eval"][model], key) for s in results["seeds"]])


def offsets(results: dict[str, Any], alpha: float) -> np.ndarray:
    """beta*|1 - alpha|*|rw - rl| over every seed's pairs."""
    gaps = np.concatenate([results["per_seed"][str(s)]["mechanism"]["ref_gap"] for s in results["seeds"]])
    return results["beta"] * abs(1 - alpha) * np.abs(gaps)


def margins(results: dict[str, Any], alpha: float) -> np.ndarray:
    return np.concatenate(
        [results["per_seed"][str(s)]["mechanism"]["dpo_margin"][f"{alpha:g}"] for s in results["seeds"]]
    )


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    v, mat = c.verdict, c.MATERIAL
    best, _ = dpo_best(results)
    top = f"pass@{max(KS)}"
    return [
        {"claim": "entropy at T=1 rises with alpha", "rule": "d = slope of entropy on alpha (per seed) > 0"}
        | v(slopes(results, "entropy").tolist()),
        {"claim": "unique answers at T=1 rise with alpha", "rule": "d = slope of unique answers on alpha > 0"}
        | v(slopes(results, "unique_answers").tolist()),
        {
            "claim": "H-DPO alpha 0.8 at T=1 has a higher pass@1 than DPO at its best temperature",
            "rule": f"d = pass@1(alpha 0.8, T=1) - max over T of pass@1(DPO, T) > {mat['pass']:g}",
        }
        | v((seed_metric(results, model_name(0.8), "pass@1") - best).tolist(), mat["pass"]),
        {
            "claim": "H-DPO alpha 0.9 at T=1 has a higher pass@1 than DPO at its best temperature",
            "rule": f"d = pass@1(alpha 0.9, T=1) - max over T of pass@1(DPO, T) > {mat['pass']:g}",
        }
        | v((seed_metric(results, model_name(0.9), "pass@1") - best).tolist(), mat["pass"]),
        {"claim": "pass@1 at T=1 falls as alpha rises", "rule": "d = -(slope of pass@1 on alpha) > 0"}
        | v((-slopes(results, "pass@1")).tolist()),
        {
            "claim": f"H-DPO alpha 1.1 has a higher {top} at T=1 than DPO",
            "rule": f"d = {top}(alpha 1.1) - {top}(DPO) > {mat['pass']:g}",
        }
        | v(
            (seed_metric(results, model_name(1.1), top) - seed_metric(results, "dpo", top)).tolist(),
            mat["pass"],
        ),
    ]


def plot(results: dict[str, Any]) -> list[str]:
    fig, axes = c.figure(3, width=4.2, height=3.5)
    alphas = np.asarray(results["alphas"])
    for ax, (key, label) in zip(
        axes[0][:2], (("entropy", "entropy at T=1 (nats/token)"), ("pass@1", "pass@1"))
    ):
        c.band(ax, alphas, per_alpha(results, key).tolist(), "H-DPO (alpha 1 = DPO)", marker="o")
        ax.set(xlabel="alpha", title=label)
    best, _ = dpo_best(results)
    axes[0][1].axhline(float(best.mean()), color="grey", ls="--", lw=1, label="DPO at its best T (mean)")
    axes[0][1].legend(fontsize=7)
    ks = np.asarray(KS)
    for name, label in [("reference", "reference"), *[(model_name(a), f"alpha {a:g}") for a in ALPHAS]]:
        curves = [
            [value(results["per_seed"][str(s)]["eval"][name], f"pass@{k}") for k in KS]
            for s in results["seeds"]
        ]
        c.band(axes[0][2], ks, curves, label, marker=".")
    axes[0][2].set(xscale="log", xlabel="k", title="pass@k at T=1 (mean, band = seeds)")
    axes[0][2].set_xticks(ks, [str(k) for k in ks])
    axes[0][2].legend(fontsize=7)
    fig.suptitle(
        f"SmolLM2-135M-Instruct, task {results['task']}: H-DPO's alpha, {len(results['seeds'])} seeds"
    )
    return [c.save_figure(fig, NAME)]


if __name__ == "__main__":
    real_demo_seeds.main_on_study_7(__doc__, run, claims)
