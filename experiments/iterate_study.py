"""Study 8: on-policy rounds (`tether iterate`) with DPO, H-DPO (alpha 0.8 and 1.2) and TDPO2 on "reverse".

Each run is `tether iterate examples/iterate_toy.yaml` through its Python API (`load_iterate_config` +
`iterate`, the code the CLI calls), from the shared reverse reference, with these overrides only:

- `rounds` 4; `model` the shared reference (the same SFT recipe as `tether demo`'s: 4000 examples, 600 steps);
- the objective (`train.objective.*`), one of METHODS below, at the config's beta 0.1;
- the seed s in {0, 1, 2}: training prompts `prompt_seed` 1000 + 10 s (round r draws with prompt_seed + r),
  sampling `sample.seed` 10 s, data order `train.optim.seed` s, held-out prompts and samples `eval.seed`
  10000 + s. Within a seed every method sees the same held-out prompts and the same round-1 samples (all
  start from the same model), so differences between methods are paired by seed.

Everything else is the config's, fixed before any run: 128 fresh prompts x 8 samples at T = 1 per round (16
new tokens), up to 2 best-vs-worst pairs per prompt, 30 AdamW steps of batch 16 per round (lr 2e-4, cosine,
2 warmup steps), reference = the initial model every round; held out: 64 prompts x 8 samples at T = 1, pass@k
for k in {1, 4, 8}. Per round the study records pass@1, pass@8, entropy (nats per token, the policy's own
samples at T = 1), the sequential KL to the initial model (forward KL(ref || pi) and reverse, nats per
response) and to the previous round's policy, pairs made and prompts skipped (all samples tied).

Claims, stated before running (all at the last round R = 4 unless said otherwise, T = 1, per-seed paired
differences judged by `common.verdict`; TOLERANCE is the "matches" tolerance of pass@k):
1. H-DPO alpha 0.8 sharpens: its entropy is lower than DPO's (by > MATERIAL entropy) and its pass@1 higher
   (by > MATERIAL pass); held only if both hold.
2. H-DPO alpha 1.2 keeps diversity: its entropy is higher than DPO's (by > MATERIAL entropy) and its pass@8
   matches or beats DPO's (> -TOLERANCE); held only if both hold.
3. TDPO2 (alpha 0.5) stays closer to the initial model at no cost in pass@1: ln(KL_forward(DPO) /
   KL_forward(TDPO2)) to the initial model > MATERIAL kl_ratio, and pass@1(TDPO2) - pass@1(DPO) > -TOLERANCE;
   held only if both hold.
4. H-DPO's sharpening compounds over rounds: the entropy gap entropy(DPO) - entropy(alpha 0.8) is larger at
   round R than at round 1 (by > MATERIAL entropy).
5. The rounds help DPO: pass@1 of DPO at round R exceeds the initial model's (by > MATERIAL pass).

Writes results/iterate_study.json and figures/iterate_study.png; runs go to runs/iterate_study/ (a finished
run is reused; an unfinished one continues with `--resume`'s code path).

    python experiments/iterate_study.py
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import common as c
import numpy as np

NAME = "iterate_study"
TASK = "reverse"
CONFIG = c.ROOT.parent / "examples" / "iterate_toy.yaml"
ROUNDS = 4
SEEDS = (0, 1, 2)
METHODS: dict[str, list[str]] = {
    "dpo": ["train.objective.name=dpo"],
    "hdpo_a0.8": ["train.objective.name=hdpo", "train.objective.alpha=0.8"],
    "hdpo_a1.2": ["train.objective.name=hdpo", "train.objective.alpha=1.2"],
    "tdpo2": ["train.objective.name=tdpo2", "train.objective.alpha=0.5"],
}
TOLERANCE = 0.02  # pass@k points within which "matches" holds
TEMPERATURE = "1"  # the held-out temperature of every claim (the config evaluates at T = 1 only)
# Per-round fields kept from rounds.jsonl (held-out metrics at TEMPERATURE, and the round's pairing).
EVAL_KEYS = (
    "pass@k",
    "entropy",
    "accuracy",
    "kl_forward_initial",
    "kl_reverse_initial",
    "kl_forward_previous",
    "kl_reverse_previous",
)
PAIRING_KEYS = ("num_pairs", "skipped_all_tied", "empty_samples", "mean_reward")


def seed_overrides(seed: int) -> list[str]:
    """The seed's prompts, samples, data order and held-out set (see the module docstring)."""
    return [
        f"prompt_seed={1000 + 10 * seed}",
        f"sample.seed={10 * seed}",
        f"train.optim.seed={seed}",
        f"eval.seed={10_000 + seed}",
    ]


def run_config(method: str, seed: int, out: Path, extra: list[str] | None = None):
    """examples/iterate_toy.yaml with the study's overrides, loaded and validated as `tether iterate` does."""
    from tether.iterate import load_iterate_config

    overrides = [
        f"output_dir={out}",
        f"model={c.shared_reference(TASK)}",
        f"rounds={ROUNDS}",
        "progress=false",
        *seed_overrides(seed),
        *METHODS[method],
        *(extra or []),
    ]
    return load_iterate_config(CONFIG, overrides)


def run_one(method: str, seed: int, extra: list[str] | None = None) -> list[dict[str, Any]]:
    """One `tether iterate` run (resumed if a previous attempt stopped); its rounds.jsonl records."""
    from tether.iterate import iterate, read_rounds

    out = c.RUNS / NAME / f"seed{seed}" / method
    config = run_config(method, seed, out, extra)
    if (out / "rounds.jsonl").exists() and len(read_rounds(out)) == ROUNDS + 1:
        return read_rounds(out)
    return iterate(config, resume=(out / "iterate.yaml").exists())


def compact(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round (0 = the initial model): the held-out metrics at TEMPERATURE, pairing, train, seconds."""
    rows = []
    for rec in records:
        held_out = rec["eval"][TEMPERATURE]
        row: dict[str, Any] = {"round": rec["round"], **{k: held_out.get(k) for k in EVAL_KEYS}}
        if rec["round"] > 0:
            row["pairing"] = {k: rec["pairing"].get(k) for k in PAIRING_KEYS}
            last = rec["train"]["last"]
            row["train"] = {
                "steps": rec["train"]["steps"],
                **{k: last.get(k) for k in ("loss", "rewards/accuracies", "rewards/margins")},
            }
            row["seconds"] = rec["seconds"]
        rows.append(row)
    return rows


def run(seeds: tuple[int, ...] = SEEDS, methods: tuple[str, ...] = tuple(METHODS)) -> dict[str, Any]:
    c.setup()
    timer = c.Timer()
    with timer.stage("reference"):
        c.shared_reference(TASK)
    per_seed: dict[str, Any] = {}
    for seed in seeds:
        per_seed[str(seed)] = {}
        for method in methods:
            c.log(f"{NAME} seed {seed}: {ROUNDS} rounds of {method}")
            with timer.stage("iterate"):
                per_seed[str(seed)][method] = compact(run_one(method, seed))
    config = run_config(methods[0], seeds[0], c.RUNS / NAME / "sizes")
    sizes = {
        "rounds": ROUNDS,
        "num_prompts": config.num_prompts,
        "sample": config.sample.__dict__,
        "eval": config.eval.__dict__,
        "train": {k: config.train[k] for k in ("objective", "optim")},
        "config": CONFIG.relative_to(c.ROOT.parent).as_posix(),
    }
    return c.save_results(NAME, TASK, seeds, sizes, per_seed, timer, methods={m: METHODS[m] for m in methods})


# --- analysis (also run by make_report.py from the JSON) ---------------------------------------------------


def kmax(results: dict[str, Any]) -> int:
    """The largest k of the held-out pass@k."""
    return max(results["sizes"]["eval"]["k"])


def value(row: dict[str, Any], key: str) -> float:
    """One metric of a per-round row: "pass@<k>", "pairs", "tied" or a held-out key."""
    if key.startswith("pass@"):
        return float(row["pass@k"][key.removeprefix("pass@")])
    if key == "pairs":
        return float(row["pairing"]["num_pairs"]) if "pairing" in row else math.nan
    if key == "tied":
        return float(row["pairing"]["skipped_all_tied"]) if "pairing" in row else math.nan
    if key == "mean_reward":
        return float(row["pairing"]["mean_reward"]) if "pairing" in row else math.nan
    return math.nan if row.get(key) is None else float(row[key])


def per_seed(results: dict[str, Any], method: str, key: str, r: int | None = None) -> np.ndarray:
    """Per-seed values of one metric at round r (default: the last); shape (seeds,)."""
    r = results["sizes"]["rounds"] if r is None else r
    return np.asarray([value(results["per_seed"][str(s)][method][r], key) for s in results["seeds"]])


def curves(results: dict[str, Any], method: str, key: str) -> np.ndarray:
    """(seeds, rounds + 1) values of one metric, round 0 (the initial model) first."""
    return np.asarray(
        [[value(row, key) for row in results["per_seed"][str(s)][method]] for s in results["seeds"]]
    )


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The five claims of the module docstring, with their rule, per-seed differences and verdict."""
    R, k = results["sizes"]["rounds"], kmax(results)
    ent, pas, kl = c.MATERIAL["entropy"], c.MATERIAL["pass"], c.MATERIAL["kl_ratio"]

    def d(a: str, b: str, key: str, r: int | None = None) -> list[float]:
        return (per_seed(results, a, key, r) - per_seed(results, b, key, r)).tolist()

    out = [
        c.compound(
            f"over {R} rounds, H-DPO alpha 0.8 ends with lower entropy and higher pass@1 than DPO",
            f"per seed at round {R}, T=1: (a) d = entropy(DPO) - entropy(alpha 0.8), claim d > {ent:g} nats/token;"
            f" (b) d = pass@1(alpha 0.8) - pass@1(DPO), claim d > {pas:g}; held only if both are held",
            {
                "entropy(DPO) - entropy(a0.8)": c.verdict(d("dpo", "hdpo_a0.8", "entropy"), ent),
                "pass@1(a0.8) - pass@1(DPO)": c.verdict(d("hdpo_a0.8", "dpo", "pass@1"), pas),
            },
            "all",
        ),
        c.compound(
            f"over {R} rounds, H-DPO alpha 1.2 ends with higher entropy than DPO and pass@{k} at least DPO's",
            f"per seed at round {R}, T=1: (a) d = entropy(alpha 1.2) - entropy(DPO), claim d > {ent:g};"
            f" (b) d = pass@{k}(alpha 1.2) - pass@{k}(DPO), claim d > -{TOLERANCE} (matches within 2 points);"
            " held only if both are held",
            {
                "entropy(a1.2) - entropy(DPO)": c.verdict(d("hdpo_a1.2", "dpo", "entropy"), ent),
                f"pass@{k}(a1.2) - pass@{k}(DPO)": c.verdict(d("hdpo_a1.2", "dpo", f"pass@{k}"), -TOLERANCE),
            },
            "all",
        ),
        c.compound(
            f"over {R} rounds, TDPO2 ends closer to the initial model than DPO at a pass@1 at least DPO's",
            f"per seed at round {R}, T=1: (a) d = ln(KL(DPO) / KL(TDPO2)), KL the sequential forward"
            f" KL(initial || pi) on the policy's held-out samples, claim d > {kl:g} (about 10% lower);"
            f" (b) d = pass@1(TDPO2) - pass@1(DPO), claim d > -{TOLERANCE}; held only if both are held",
            {
                "ln KL(DPO) / KL(TDPO2)": c.verdict(
                    np.log(
                        per_seed(results, "dpo", "kl_forward_initial")
                        / per_seed(results, "tdpo2", "kl_forward_initial")
                    ).tolist(),
                    kl,
                ),
                "pass@1(TDPO2) - pass@1(DPO)": c.verdict(d("tdpo2", "dpo", "pass@1"), -TOLERANCE),
            },
            "all",
        ),
    ]
    gap_last = np.asarray(d("dpo", "hdpo_a0.8", "entropy"))
    gap_first = np.asarray(d("dpo", "hdpo_a0.8", "entropy", 1))
    out.append(
        {
            "claim": "H-DPO alpha 0.8's sharpening compounds: its entropy gap below DPO grows from round 1"
            f" to round {R}",
            "rule": f"per seed d = [entropy(DPO) - entropy(alpha 0.8)] at round {R} minus the same at round 1,"
            f" T=1; claim d > {ent:g}",
            **c.verdict((gap_last - gap_first).tolist(), ent),
        }
    )
    out.append(
        {
            "claim": f"the rounds help: DPO's pass@1 at round {R} exceeds the initial model's",
            "rule": f"per seed d = pass@1(DPO, round {R}) - pass@1(initial model), T=1; claim d > {pas:g}",
            **c.verdict(
                (per_seed(results, "dpo", "pass@1") - per_seed(results, "dpo", "pass@1", 0)).tolist(), pas
            ),
        }
    )
    return out


PANELS = (
    ("pass@1", "held-out pass@1"),
    ("pass@{k}", "held-out pass@{k}"),
    ("entropy", "entropy (nats/token, own samples)"),
    ("kl_forward_initial", "KL(initial ‖ pi) (nats/response)"),
    ("kl_forward_previous", "KL(previous ‖ pi) (nats/response)"),
    ("pairs", "pairs made"),
    ("tied", "prompts skipped (all samples tied)"),
    ("mean_reward", "mean label of the round's samples"),
)
ROUND_ONLY = ("kl_forward_previous", "pairs", "tied", "mean_reward")  # no round-0 value


def plot(results: dict[str, Any]) -> list[str]:
    """One panel per metric over rounds: mean over seeds and the min-max band, per method."""
    k = kmax(results)
    fig, axes = c.figure(4, 2)
    rounds = list(range(results["sizes"]["rounds"] + 1))
    for method in results["methods"]:
        for ax, (key, title) in zip(axes.flat, PANELS):
            values = curves(results, method, key.format(k=k))
            first = 1 if key in ROUND_ONLY else 0
            c.band(ax, rounds[first:], values[:, first:], method, marker="o")
            ax.set_title(title.format(k=k), fontsize=10)
            ax.set_xlabel("round (0 = initial model)")
            ax.set_xticks(rounds)
    axes[0][0].legend(fontsize=7)
    return [c.save_figure(fig, NAME)]


if __name__ == "__main__":
    run()
