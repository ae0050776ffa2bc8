"""Helpers shared by every study: the cached reference and pairs, training, evaluation, statistics, plots.

Every study uses tether's public API only: `tether.toy` builds the reference and the preference pairs,
`tether.config.load_config` + `tether.train.train` train each policy exactly as `tether train` would, and
`tether.evaluate` measures it. Run outputs (models, checkpoints, sample caches) go under experiments/runs/
(ignored by git); each study writes one JSON under experiments/results/ and PNGs under experiments/figures/.

Compute plan, stated once: ONE supervised reference per task is built on first use and reused by every run
of every study (experiments/runs/_shared/<task>/reference). A study's seed s changes what comes after it:
the prompts and samples of the preference pairs, the data order of preference training (optim.seed) and
the evaluation prompts and samples. Seeds therefore measure the spread from pairs, training and evaluation,
not from the reference.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tether.files import atomic_write
from tether.train import read_metrics

ROOT = Path(__file__).resolve().parent
RUNS = ROOT / "runs"
RESULTS = ROOT / "results"
FIGURES = ROOT / "figures"
SHARED = RUNS / "_shared"
DPI = 100

# Verdict rule shared by every claim (see `verdict`): the interval is mean +- Z_SE standard errors.
Z_SE = 2.0
# Smallest difference counted as an effect in claims "X is higher than Y" (the verdict threshold), per metric.
MATERIAL = {
    "entropy": 0.005,  # nats per token (the references' entropy at T=1 is about 0.34)
    "pass": 0.01,  # pass@k, one point
    "reward": 0.01,  # sentiment reward, in [-1, 1]
    "kl_ratio": 0.1,  # ln of a KL ratio: about 10% lower
}


def setup() -> None:
    """One torch thread (the toy matrices gain nothing from more, and the cores are shared); quiet libraries."""
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for folder in (RESULTS, FIGURES, SHARED):
        folder.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing): studies run in parallel share the cached stages."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_json(path: Path, data: Any) -> None:
    """Strict JSON (NaN written as null, floats to 6 significant digits), atomically."""
    with atomic_write(path) as f:
        f.write(json.dumps(_finite(data), separators=(",", ":"), allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _finite(value.item())
    return value


# --- the shared reference and the preference pairs ---------------------------------------------------


@dataclass(frozen=True)
class TaskSetup:
    """How the shared reference of a task is made and how its pairs and policies are tokenized."""

    task: str
    sft_examples: int  # supervised examples (task.sft_examples seed 0)
    sft_steps: int  # AdamW steps of batch 32, lr 3e-3 (tether.toy.sft defaults)
    max_length: int  # data.max_length of preference training (prompt + response tokens)
    max_prompt_length: int  # data.max_prompt_length
    lr: float  # peak learning rate of preference training (see README: chosen by a small DPO sweep)


TASKS = {
    "reverse": TaskSetup("reverse", 4000, sft_steps=600, max_length=64, max_prompt_length=32, lr=1e-4),
    "sentiment": TaskSetup("sentiment", 4000, sft_steps=400, max_length=96, max_prompt_length=32, lr=3e-4),
}


def shared_reference(task_name: str) -> Path:
    """The SFT reference of `task_name` (a Hugging Face folder), built once (seed 0) and then reused."""
    from tether.toy.model import build_tiny_llama
    from tether.toy.sft import sft
    from tether.toy.tasks import get_task
    from tether.toy.tokenizer import build_tokenizer

    setup_ = TASKS[task_name]
    folder = SHARED / task_name / "reference"
    info_path = SHARED / task_name / "reference.json"
    with file_lock(SHARED / task_name / ".lock"):
        if info_path.exists():
            return folder
        t0 = time.perf_counter()
        tokenizer = build_tokenizer()
        model = build_tiny_llama(tokenizer, seed=0)
        examples = get_task(task_name).sft_examples(setup_.sft_examples, seed=0)
        losses = sft(model, tokenizer, examples, steps=setup_.sft_steps, seed=0, progress=False)
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        # sft_final_loss: the mean loss of the last 20 SFT steps.
        info = {
            **asdict(setup_),
            "sft_final_loss": float(np.mean(losses[-20:])),
            "wall_s": time.perf_counter() - t0,
        }
        write_json(info_path, info)
    return folder


def reference_info(task_name: str) -> dict[str, Any]:
    """How the shared reference was built (and its wall time), with the task's current training setup."""
    return {**read_json(SHARED / task_name / "reference.json"), **asdict(TASKS[task_name])}


def save_results(
    study: str,
    task: str,
    seeds: Sequence[int],
    sizes: dict[str, Any],
    per_seed: Any,
    timer: Any,
    **fields: Any,
) -> dict[str, Any]:
    """Write results/<study>.json in the layout make_report.py reads; returns it.

    fields: the study's own axes (betas, alphas, ...), stored between "task" and "seeds".
    """
    results = {
        "study": study,
        "task": task,
        **fields,
        "seeds": list(seeds),
        "sizes": sizes,
        "reference": reference_info(task),
        "per_seed": per_seed,
        "wall": timer.as_dict(),
    }
    write_json(RESULTS / f"{study}.json", results)
    return results


def run_sizes(pairs: Any, train: Any, evaluation: Any, **extra: Any) -> dict[str, Any]:
    """The "sizes" entry of a results file: the dataclasses' fields, plus study-specific sizes."""
    return {"pairs": pairs.__dict__, "train": train.__dict__, "eval": evaluation.__dict__, **extra}


@dataclass(frozen=True)
class PairSizes:
    prompts: int  # prompts sampled for pairs
    samples_per_prompt: int  # reference samples per prompt (temperature 1)
    pairs_per_prompt: int  # best-vs-worst pairs per prompt (tether.toy.pairs.pair_indices)


def shared_pairs(task_name: str, seed: int, sizes: PairSizes) -> tuple[Path, dict[str, Any]]:
    """Preference pairs sampled from the shared reference with seed `seed` (cached); (jsonl, stats)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tether.toy.pairs import make_preference_pairs, write_jsonl
    from tether.toy.tasks import get_task

    ref = shared_reference(task_name)
    stem = f"pairs_p{sizes.prompts}_n{sizes.samples_per_prompt}_k{sizes.pairs_per_prompt}_seed{seed}"
    path = SHARED / task_name / f"{stem}.jsonl"
    stats_path = path.with_suffix(".json")
    with file_lock(SHARED / task_name / ".lock"):
        if not stats_path.exists():
            task = get_task(task_name)
            model = AutoModelForCausalLM.from_pretrained(ref, use_safetensors=True).eval()
            tokenizer = AutoTokenizer.from_pretrained(ref)
            # Pair prompts use seeds 1000+ so they never coincide with the evaluation prompts' seeds.
            prompts = task.make_prompts(sizes.prompts, seed=1000 + seed)
            rows, stats = make_preference_pairs(
                task, model, tokenizer, prompts, sizes.samples_per_prompt, 1000 + seed, sizes.pairs_per_prompt
            )
            write_jsonl(rows, path)
            write_json(stats_path, stats.as_dict())
    return path, read_json(stats_path)


def read_pairs(path: Path) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) texts of a pairs JSONL in TRL's conversational format."""
    out = []
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        out.append((row["prompt"][0]["content"], row["chosen"][0]["content"], row["rejected"][0]["content"]))
    return out


# --- training -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSizes:
    epochs: int = 2  # passes over the pairs
    batch_size: int = 16  # pairs per optimizer step
    checkpoint_every: int = 0  # save step-N/ checkpoints every N steps (0: final model only)


def train_policy(
    run_dir: Path, task_name: str, data: Path, overrides: Sequence[str], seed: int, sizes: TrainSizes
) -> Path:
    """Train one policy from the shared reference with `tether.train.train`; cached by its final/ folder.

    AdamW at the task's learning rate, cosine schedule after 2 warmup steps, beta from `overrides`.

    `overrides` are tether config overrides (objective.*); returns run_dir (metrics.jsonl, final/, checkpoints/).
    """
    from tether.config import load_config
    from tether.train import train

    if (run_dir / "final" / "config.json").exists() and (run_dir / "metrics.jsonl").exists():
        return run_dir
    setup_ = TASKS[task_name]
    config = load_config(
        None,
        [
            f"output_dir={run_dir}",
            f"model.path={shared_reference(task_name)}",
            f"data.train={data}",
            f"data.max_length={setup_.max_length}",
            f"data.max_prompt_length={setup_.max_prompt_length}",
            # tether.toy.pairs can pair an empty sample (<eos> first), which tether's loader rejects as a
            # blank response: skip such rows (counted in the loader's report) instead of stopping.
            "data.on_bad_row=skip",
            f"optim.lr={setup_.lr}",
            f"optim.batch_size={sizes.batch_size}",
            "optim.scheduler=cosine",
            "optim.warmup_steps=2",
            f"optim.epochs={sizes.epochs}",
            f"optim.seed={seed}",
            f"checkpoint.every={sizes.checkpoint_every}",
            "checkpoint.keep_last=1000",
            "logging.progress=false",
            *overrides,
        ],
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    train(config)
    return run_dir


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every saved checkpoint and of final/, in step order."""
    found = []
    for folder in sorted((Path(run_dir) / "checkpoints").glob("step-*")):
        if folder.name.removeprefix("step-").isdigit() and (folder / "config.json").exists():
            found.append((int(folder.name.removeprefix("step-")), folder))
    found.append((read_metrics(run_dir)[-1]["step"], Path(run_dir) / "final"))
    return found


# --- evaluation -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSizes:
    prompts: int  # evaluation prompts (task.make_prompts with the evaluation seed)
    samples: int  # samples per prompt and temperature
    temperatures: tuple[float, ...]
    batch_size: int = 256  # sequences per generate call


def evaluate(
    out_dir: Path, task_name: str, models: dict[str, Path], seed: int, sizes: EvalSizes, score: str
) -> dict[str, Any]:
    """`tether.evaluate.run_eval` on `models` and the shared reference; cached by out_dir/eval.json.

    score: "verifier" (pass@k for k = 1, 2, 4, ... up to the sample count) or "reward" (reward, win rate).
    Samples are cached under the task's shared folder (keyed by weights, prompts, seed and sizes); a cached
    eval.json is reused only if it covers every model asked for.
    """
    from tether.evaluate.config import config_from_dict
    from tether.evaluate.runner import run_eval
    from tether.toy.tasks import get_task

    if (out_dir / "eval.json").exists():
        cached = read_json(out_dir / "eval.json")
        if set(models) <= set(cached["models"]):
            return cached
    ks = [2**i for i in range(int(math.log2(sizes.samples)) + 1)]
    config = config_from_dict(
        {
            "models": [{"name": name, "path": str(path)} for name, path in models.items()],
            "reference": str(shared_reference(task_name)),
            "task": task_name,
            "num_prompts": sizes.prompts,
            "temperatures": list(sizes.temperatures),
            "n_samples": sizes.samples,
            "k": ks,
            "max_new_tokens": get_task(task_name).max_new_tokens,
            "seed": 10_000 + seed,
            "verifier": "task" if score == "verifier" else None,
            "reward": "task" if score == "reward" else None,
            "output_dir": str(out_dir),
            "cache_dir": str(SHARED / task_name / "samples"),
            "batch_size": sizes.batch_size,
            "sampler": "generate",  # the sampler of the committed figures (same seed, same samples)
            "progress": False,
        }
    )
    return run_eval(config)


def metric(evaluation: dict[str, Any], model: str, temperature: float, key: str) -> float:
    """One metric of one model at one temperature from a run_eval result; pass@k as key "pass@<k>"."""
    values = evaluation["models"][model]["temperatures"][f"{temperature:g}"]
    if key.startswith("pass@"):
        return float(values["pass@k"][key.removeprefix("pass@")])
    return float(values[key])


def pair_kl(model_dir: Path, task_name: str, pairs: Sequence[tuple[str, str, str]]) -> tuple[float, float]:
    """Mean sequential forward KL(pi_ref || pi) of the chosen and of the rejected responses of `pairs`.

    TDPO's D(x, y) summed over the response tokens and <eos>, as in training, with `tether.evaluate`'s
    chunked scorer; this gives the same quantity for DPO, which does not log it.
    """
    from transformers import AutoModelForCausalLM

    from tether.evaluate.likelihood import score_sequences

    ref_dir = shared_reference(task_name)
    tokenizer, prompt_ids, responses = encode_pairs(task_name, pairs)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    reference = AutoModelForCausalLM.from_pretrained(ref_dir, use_safetensors=True).eval()
    out = []
    for completion_ids in responses:
        with torch.no_grad():
            stats = score_sequences(policy, prompt_ids, completion_ids, tokenizer.pad_token_id, reference)
        out.append(float(stats.kl_forward.mean()))
    return out[0], out[1]


def score_pair_file(
    model_dir: Path,
    pairs_path: Path,
    reference_dir: Path | None = None,
    max_length: int = 192,
    max_prompt_length: int = 96,
) -> tuple[Any, Any]:
    """`score_sequences` of a pretrained chat model on every pair of a preference JSONL file, tokenized by
    `tether.data` exactly as training tokenizes it (chat template, limits of `tether.demo.pretrained_settings`).

    Returns the ResponseStats of the chosen and of the rejected responses (with the sequential KLs against
    reference_dir's model when given), in file order.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tether.data.load import load_preference_data
    from tether.evaluate.likelihood import score_sequences

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset, _ = load_preference_data(
        pairs_path, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, progress=False
    )
    items = [dataset[i] for i in range(len(dataset))]
    prompts = [item.prompt_ids for item in items]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def load(folder: Path) -> Any:
        return AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()

    policy = load(model_dir)
    reference = load(reference_dir) if reference_dir is not None else None
    with torch.no_grad():
        return tuple(
            score_sequences(policy, prompts, [getattr(item, side) for item in items], pad, reference)
            for side in ("chosen_ids", "rejected_ids")
        )


def encode_pairs(task_name: str, pairs: Sequence[tuple[str, str, str]]) -> tuple[Any, list, list]:
    """(tokenizer, prompt ids, [chosen ids, rejected ids]) of `pairs` with the shared reference's tokenizer:
    the templated prompt, and each response's tokens plus <eos>, as in training."""
    from transformers import AutoTokenizer

    from tether.toy.sft import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(shared_reference(task_name))
    prompt_ids = [encode_prompt(tokenizer, p) for p, _, _ in pairs]
    responses = [
        [
            tokenizer(row[column], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for row in pairs
        ]
        for column in (1, 2)
    ]
    return tokenizer, prompt_ids, responses


def eval_table(evaluation: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """{model: {T: {metric: value}}} of a run_eval result for the given keys (and pass@k when present)."""
    table: dict[str, Any] = {}
    for model, entry in evaluation["models"].items():
        table[model] = {}
        for temp, row in entry["temperatures"].items():
            table[model][temp] = {k: row[k] for k in (*keys, "pass@k") if k in row}
    return table


def run_variants(
    study: str,
    task_name: str,
    variants: dict[str, Sequence[str]],
    seeds: Sequence[int],
    pairs: PairSizes,
    train_sizes: TrainSizes,
    eval_sizes: EvalSizes,
    score: str,
    timer: Timer,
    eval_keys: Sequence[str] = ("entropy", "unique_answers", "accuracy", "kl_forward", "kl_reverse"),
    log_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """Per seed: pairs -> one policy per variant (name -> config overrides) -> one evaluation of all.

    Returns {seed: {"pairing", "training": {variant: {"final": last metrics record, "logged": {key: series}}},
    "eval": eval_table}}; `score` is passed to `evaluate`.
    """
    per_seed: dict[str, Any] = {}
    for seed in seeds:
        base = RUNS / study / f"seed{seed}"
        with timer.stage("pairs"):
            data, pairing = shared_pairs(task_name, seed, pairs)
        models, training = {}, {}
        with timer.stage("train"):
            for name, overrides in variants.items():
                log(f"{study} seed {seed}: training {name}")
                run_dir = train_policy(base / name, task_name, data, overrides, seed, train_sizes)
                models[name] = run_dir / "final"
                records = read_metrics(run_dir)
                training[name] = {
                    "final": records[-1],
                    "logged": {k: [r.get(k) for r in records] for k in ("step", *log_keys)},
                }
        with timer.stage("eval"):
            log(f"{study} seed {seed}: evaluating {len(models)} policies")
            evaluation = evaluate(base / "eval", task_name, models, seed, eval_sizes, score)
        per_seed[str(seed)] = {
            "pairing": pairing,
            "training": training,
            "eval": eval_table(evaluation, eval_keys),
        }
    return per_seed


def seed_values(results: dict[str, Any], model: str, temp: float, key: str) -> list[float]:
    """Per-seed values of one evaluation metric of a `run_variants` result ("pass@<k>" for pass@k)."""
    out = []
    for seed in results["seeds"]:
        row = results["per_seed"][str(seed)]["eval"][model][f"{temp:g}"]
        out.append(row["pass@k"][key.removeprefix("pass@")] if key.startswith("pass@") else row[key])
    return out


def logged(results: dict[str, Any], model: str, key: str) -> tuple[list[int], list[list[float]]]:
    """(steps, per-seed series) of one logged training metric of a `run_variants` result."""
    runs = [results["per_seed"][str(s)]["training"][model]["logged"] for s in results["seeds"]]
    return runs[0]["step"], [r[key] for r in runs]


# --- statistics and verdicts ----------------------------------------------------------------------------


def summary(values: Sequence[float]) -> dict[str, Any]:
    """mean, sample std (ddof 1), min, max and n of per-seed values (NaNs dropped)."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {
        "mean": float(arr.mean()),
        "std": std,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n": int(arr.size),
    }


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson correlation of the ranks; ties get their mean rank)."""

    def ranks(v: Sequence[float]) -> np.ndarray:
        arr = np.asarray(v, dtype=np.float64)
        order = arr.argsort(kind="stable")
        r = np.empty(arr.size)
        r[order] = np.arange(arr.size, dtype=np.float64)
        for value in np.unique(arr):
            r[arr == value] = r[arr == value].mean()
        return r

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def verdict(diffs: Sequence[float], threshold: float = 0.0) -> dict[str, Any]:
    """Verdict on the claim "d > threshold" from per-seed paired values d (one per seed).

    m = mean(d), se = std(d, ddof=1) / sqrt(n). held: m - Z_SE*se > threshold (the whole interval is on the
    claim's side); not held: m <= threshold (the point estimate is not on the claim's side); unclear:
    m > threshold but the interval reaches the threshold.
    """
    arr = np.asarray(diffs, dtype=np.float64)
    m = float(arr.mean())
    se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else float("inf")
    if m - Z_SE * se > threshold:
        label = "held"
    elif m <= threshold:
        label = "not held"
    else:
        label = "unclear"
    return {"verdict": label, "mean": m, "se": se, "threshold": threshold, "diffs": arr.tolist()}


def combine(verdicts: Sequence[str], rule: str) -> str:
    """Combine verdicts of sub-claims: rule "all" (held only if all are held) or "any" (held if one is)."""
    if rule == "all":
        if all(v == "held" for v in verdicts):
            return "held"
        return "not held" if any(v == "not held" for v in verdicts) else "unclear"
    if any(v == "held" for v in verdicts):
        return "held"
    return "not held" if all(v == "not held" for v in verdicts) else "unclear"


def compound(
    claim: str, rule: str, subs: dict[str, dict[str, Any]], how: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A claim made of sub-claims (each a `verdict`): its verdict is `combine`d by `how` ("all" / "any")."""
    out = {"claim": claim, "rule": rule, "verdict": combine([v["verdict"] for v in subs.values()], how)}
    out["subclaims"] = subs
    if extra is not None:
        out["extra"] = extra
    return out


# --- bookkeeping and plots ------------------------------------------------------------------------------


class Timer:
    """Wall time of a study, per stage and in total (seconds)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t0

    def as_dict(self) -> dict[str, Any]:
        return {"total_s": time.perf_counter() - self.start, "stages_s": self.stages}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def figure(ncols: int, nrows: int = 1, width: float = 4.2, height: float = 3.4):
    """A matplotlib figure (Agg backend) with a grid of axes, always returned as a 2-D array."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, axes


def save_figure(fig, name: str) -> str:
    """Save under experiments/figures/ at DPI; returns the path relative to experiments/."""
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = FIGURES / f"{name}.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path.relative_to(ROOT).as_posix()


def plot_temperature_panels(results: dict[str, Any], models: Sequence[str], name: str) -> str:
    """Entropy, unique answers and pass@1 vs temperature, and pass@k vs k at T=1 (mean, min-max band)."""
    temps = results["sizes"]["eval"]["temperatures"]
    n = results["sizes"]["eval"]["samples"]
    ks = [2**i for i in range(int(math.log2(n)) + 1)]
    fig, axes = figure(4)
    for model in ["reference", *models]:
        style = {"color": "black", "linestyle": "--"} if model == "reference" else {"marker": "o"}
        for ax, key in zip(axes[0][:3], ("entropy", "unique_answers", "pass@1")):
            band(ax, temps, list(zip(*[seed_values(results, model, t, key) for t in temps])), model, **style)
        if 1.0 in temps:
            per_seed = list(zip(*[seed_values(results, model, 1.0, f"pass@{k}") for k in ks]))
            band(axes[0][3], ks, per_seed, model, **style)
    titles = ("policy entropy (nats/token)", "unique answers per prompt", "pass@1", "pass@k at T=1")
    for ax, title in zip(axes[0], titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("temperature")
    axes[0][3].set_xscale("log", base=2)
    axes[0][3].set_xlabel("k")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, name)


def band(ax, x: Sequence[float], per_seed: Sequence[Sequence[float]], label: str, **style: Any) -> None:
    """Mean over seeds as a line with a shaded min-max band; per_seed is (seeds, len(x))."""
    arr = np.asarray(per_seed, dtype=np.float64)
    line = ax.plot(x, arr.mean(0), label=label, **style)[0]
    ax.fill_between(x, arr.min(0), arr.max(0), color=line.get_color(), alpha=0.15)
