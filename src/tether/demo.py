"""`tether demo`: the whole pipeline on the built-in toy world, through tether's normal code paths.

1. Build the character-level tokenizer and a tiny Llama (`tether.toy`), supervised-fine-tune it on the
   verifiable string-reversal task: that model is the reference, saved as a Hugging Face folder.
2. Sample from the reference, label pairs by the task's verifier (chosen = correct, rejected = wrong), and
   write them as JSONL in TRL's conversational format.
3. Train one policy per objective with `tether.train.train` (DPO, H-DPO alpha < 1 and > 1, epsilon-DPO,
   TDPO2), each from the reference folder, exactly as `tether train` would.
4. Evaluate every policy and the reference with `tether.evaluate` (pass@k over a temperature grid, unique
   answers, policy entropy, sequential KL to the reference), write plots and a Markdown report.

Nothing is downloaded. On 2 CPU cores the default run takes about 2-3 minutes (measured 98 s on an idle machine
on 2026-12-02; 120 s on 2026-12-03, load average 0.5, after held-out evaluations were added) and `quick=True` under a minute.
torch runs on one thread for the tiny model.

`run_demo(model_path=FOLDER)` (`tether demo --model FOLDER`) runs the same pipeline on a pretrained chat model
instead, a local Hugging Face folder with a chat template (SmolLM2-135M-Instruct, converted from its GGUF
file): no SFT (the model itself is the reference), pairs and evaluation on the verifiable chat task "count"
of `tether.chat_tasks`, a few dozen optimizer steps per objective (`PRETRAINED` gives the sizes and why).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.train import read_metrics

DEMO_OBJECTIVES: list[tuple[str, list[str]]] = [
    ("dpo", ["objective.name=dpo"]),
    ("hdpo_a0.8", ["objective.name=hdpo", "objective.alpha=0.8"]),
    ("hdpo_a1.2", ["objective.name=hdpo", "objective.alpha=1.2"]),
    ("epsilon_dpo", ["objective.name=epsilon_dpo", "objective.epsilon=0.01"]),
    ("tdpo2", ["objective.name=tdpo2", "objective.alpha=0.5"]),
]


@dataclass(frozen=True)
class DemoSizes:
    sft_examples: int
    sft_steps: int
    pair_prompts: int
    samples_per_prompt: int
    train_epochs: int
    eval_prompts: int
    eval_samples: int
    temperatures: tuple[float, ...]


# beta of every demo run. At beta 0.1 (the demo until 2026-12-03) DPO's chosen log-prob fell below the
# reference's during training (likelihood displacement: -0.74 -> -1.65 nats) and pass@1 dropped below the
# reference's; at beta 1 the chosen log-prob rises and every method improves on the reference (docs/toy.md has
# the three-seed measurement). A larger beta also gives H-DPO's alpha room: its margin is DPO's at alpha*beta
# plus beta*(alpha - 1)*(reference margin), about 1.1 nats at alpha 0.8 on these pairs.
BETA = 1.0
PAIR_SEED = 1  # prompts and samples of the pairs: PAIR_SEED + 2 * seed
EVAL_SEED = 124  # prompts and samples of the evaluation (even: never a pair seed)
HELDOUT_SEED = 1001  # prompts and samples of the held-out pairs evaluated during training: + 2 * seed
HELDOUT_SHARE = 4  # held-out prompts: a quarter of the training pairs' prompts, minus any that repeats one
EVALS_PER_RUN = 4  # evaluations of the held-out pairs during each training run (and one before it)
DEMO_BATCH = 16  # pairs per optimizer step of the toy demo
PASS_TOLERANCE = 0.02  # pass@1 differences within this are reported as equal (the experiments' "matches")

# The reference needs about 600 SFT steps before its samples give informative pairs (docs/toy.md), in both.
FULL = DemoSizes(4000, 600, 600, 8, 2, 64, 16, (0.25, 0.5, 0.75, 1.0))
QUICK = DemoSizes(4000, 600, 128, 4, 1, 16, 8, (0.5, 1.0))


@dataclass(frozen=True)
class PretrainedSizes:
    pair_prompts: int
    samples_per_prompt: int
    pairs_per_prompt: int
    train_steps: int  # optimizer steps per objective
    batch_size: int  # pairs per step
    eval_prompts: int
    eval_samples: int  # per prompt, at temperature 1


# Sized for 30 minutes on 2 CPU cores with SmolLM2-135M-Instruct (measured: 20-22 min, docs/real_tasks.md),
# from CPU time first measured on a busy machine: sampling 384 rows of 64 new tokens took 11.4 CPU-minutes.
# The reference solves "count" at pass@1 ~0.06 at T=1, so pairs come from 12 samples per prompt (a prompt gives pairs only
# when some sample is right): 24 prompts x 12 samples give ~20-25 pairs, trained 20 steps of 4 pairs (a few
# epochs: near convergence, where H-DPO's alpha acts). Evaluation: 8 new prompts x 8 samples per model at
# T=1, 6 models.
PRETRAINED = PretrainedSizes(24, 12, 4, 20, 4, 8, 8)
PRETRAINED_QUICK = PretrainedSizes(16, 8, 2, 6, 4, 8, 4)
PRETRAINED_TASK = "count"


def run_demo(
    output_dir: str | Path = "runs/demo",
    quick: bool = False,
    progress: bool = True,
    model_path: str | Path | None = None,
    seed: int = 0,
    task: str | None = None,
) -> Path:
    """Run the demo pipeline into output_dir; returns the path of the Markdown report.

    model_path: None for the toy model; else a local Hugging Face folder of a pretrained chat model (with a
    chat template), which becomes the reference (no SFT).
    seed: one replicate of the whole pipeline (SFT, pair sampling, training order); 0 is the default run,
    whose figures the README shows. The evaluation prompts and sampling seed are the same for every seed.
    task: with model_path, the verifiable chat task of `tether.chat_tasks` for pairs and evaluation
    (default PRETRAINED_TASK); the toy demo has one task and refuses another.
    """
    import torch
    from transformers.utils import logging as hf_logging

    threads, hf_bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    if model_path is None:
        # A 64-wide model gains nothing from more threads; on a busy machine spinning threads cost a lot.
        torch.set_num_threads(1)
    if not progress:
        hf_logging.disable_progress_bar()  # transformers' loading / saving bars
    if model_path is None and task is not None:
        from tether.config import ConfigError

        raise ConfigError("demo --task: the toy demo has one task; --task goes with --model")
    try:
        if model_path is not None:
            sizes = PRETRAINED_QUICK if quick else PRETRAINED
            return _run_pretrained(
                Path(output_dir), Path(model_path), sizes, quick, progress, seed, task or PRETRAINED_TASK
            )
        return _run(Path(output_dir), QUICK if quick else FULL, quick, progress, seed)
    finally:
        torch.set_num_threads(threads)
        if hf_bars:
            hf_logging.enable_progress_bar()


def _run(out: Path, sizes: DemoSizes, quick: bool, progress: bool, seed: int) -> Path:
    import torch

    from tether.toy.model import build_tiny_llama
    from tether.toy.pairs import make_preference_pairs, write_jsonl
    from tether.toy.sft import sft
    from tether.toy.tasks import get_task
    from tether.toy.tokenizer import build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    task = get_task("reverse")

    # 1. Reference: SFT of the tiny model on the task.
    _stage(1, f"SFT of the tiny model on '{task.name}' ({sizes.sft_steps} steps): the reference")
    t0 = time.perf_counter()
    tokenizer = build_tokenizer()
    model = build_tiny_llama(tokenizer, seed=seed)
    torch.manual_seed(seed)
    sft_losses = sft(
        model,
        tokenizer,
        task.sft_examples(sizes.sft_examples, seed=seed),
        steps=sizes.sft_steps,
        seed=seed,
        progress=progress,
    )
    ref_dir = out / "reference"
    model.save_pretrained(ref_dir, safe_serialization=True)
    tokenizer.save_pretrained(ref_dir)
    timings["sft"] = time.perf_counter() - t0

    # 2. Preference pairs sampled from the reference, labelled by the verifier.
    _stage(2, f"preference pairs from {sizes.pair_prompts} prompts x {sizes.samples_per_prompt} samples")
    t0 = time.perf_counter()
    pair_seed = PAIR_SEED + 2 * seed  # odd: never the evaluation's prompt seed (EVAL_SEED)
    prompts = task.make_prompts(sizes.pair_prompts, seed=pair_seed)
    rows, pairing = make_preference_pairs(
        task, model, tokenizer, prompts, sizes.samples_per_prompt, seed=pair_seed, pairs_per_prompt=2
    )
    data_path = out / "data" / "pairs.jsonl"
    write_jsonl(rows, data_path)
    # Held-out pairs made the same way from other prompts: evaluated during training (eval.*).
    heldout_seed = HELDOUT_SEED + 2 * seed
    seen = set(prompts)
    heldout = [
        p for p in task.make_prompts(sizes.pair_prompts // HELDOUT_SHARE, seed=heldout_seed) if p not in seen
    ]
    heldout_rows, _ = make_preference_pairs(
        task, model, tokenizer, heldout, sizes.samples_per_prompt, seed=heldout_seed, pairs_per_prompt=2
    )
    heldout_path = out / "data" / "eval_pairs.jsonl"
    write_jsonl(heldout_rows, heldout_path)
    timings["pairs"] = time.perf_counter() - t0
    del model
    every = max(1, math.ceil(len(rows) / DEMO_BATCH) * sizes.train_epochs // EVALS_PER_RUN)
    held_out = [
        f"eval.data={heldout_path}",
        f"eval.every={every}",
        "eval.at_start=true",
        "eval.batch_size=64",
    ]

    # 3. One policy per objective, through the normal training path.
    t0 = time.perf_counter()
    runs = _train_policies(
        out,
        ref_dir,
        data_path,
        [
            "data.max_length=64",
            "data.max_prompt_length=32",
            f"objective.beta={BETA}",
            "optim.lr=1e-4",
            f"optim.batch_size={DEMO_BATCH}",
            "optim.scheduler=cosine",
            f"optim.warmup_steps={0 if quick else 2}",
            f"optim.epochs={sizes.train_epochs}",
            *(held_out if heldout_rows else []),  # (no pair from the held-out prompts: no evaluation)
        ],
        progress,
        seed,
    )
    timings["train"] = time.perf_counter() - t0

    # 4. Evaluation, plots, report.
    _stage(4, f"evaluating the reference and {len(runs)} policies")
    t0 = time.perf_counter()
    evaluation = _evaluate(
        out,
        ref_dir,
        runs,
        progress,
        task="reverse",
        prompts=sizes.eval_prompts,
        samples=sizes.eval_samples,
        temperatures=sizes.temperatures,
        max_new_tokens=24,
        diversity_unit="char",  # answers are single words: word bigrams would all be 0
        batch_size=64,
    )
    timings["eval"] = time.perf_counter() - t0
    figures = _plot_training(out, runs)
    summary = {
        "quick": quick,
        "seed": seed,
        "beta": BETA,
        "sizes": sizes.__dict__,
        "sft_final_loss": sft_losses[-1],
        "pairing": pairing.as_dict(),
        "held_out": {"pairs": len(heldout_rows), "prompts": len(heldout), "eval_every": every},
        "timings_s": timings,
        "levers": levers(evaluation, runs, temperature=max(sizes.temperatures)),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    p = summary["pairing"]
    intro = [
        "# tether demo",
        "",
        "Task: reverse a random word (`tether.toy.tasks.ReverseTask`), checked by exact match. The reference is",
        "a tiny Llama fine-tuned on the task; preference pairs are its own samples, labelled by the verifier.",
        f"Seed {summary['seed']}; every objective at beta {summary['beta']:g}.",
        "",
        f"- SFT final loss: {summary['sft_final_loss']:.3f}",
        f"- pairs: {p['num_pairs']} from {p['num_prompts']} prompts x {p['samples_per_prompt']} samples"
        f" ({p['skipped_all_tied']} prompts gave no pair: all samples right or all wrong;"
        f" {p['empty_samples']} empty samples never paired)",
        f"- held-out pairs: {len(heldout_rows)} from {len(heldout)} other prompts, made the same way and"
        f" evaluated before training and every {every} steps (dashed in the training curves)",
        "- stage timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings_s"].items()),
    ]
    closing = [
        "response. Numbers from one seed of a tiny model: a smoke test of the pipeline, not a study (see",
        "experiments/ for seeds and error bars).",
    ]
    return _write_report(out, intro, closing, runs, evaluation, figures, summary["levers"])


def _run_pretrained(
    out: Path,
    model_dir: Path,
    sizes: PretrainedSizes,
    quick: bool,
    progress: bool,
    seed: int,
    task_name: str,
) -> Path:
    """The demo on a pretrained chat model: the model is the reference; pairs and eval on a verifiable chat
    task (`count` by default)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tether.chat_tasks import get_chat_task
    from tether.config import ConfigError
    from tether.toy.pairs import make_preference_pairs, write_jsonl

    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"demo --model: {model_dir} is not a Hugging Face model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"demo --model: the tokenizer in {model_dir} has no chat template; the demo needs one"
        )
    try:
        task = get_chat_task(task_name)
    except KeyError as exc:
        raise ConfigError(f"demo --task: {exc.args[0]}") from None
    if not hasattr(task, "verify"):
        raise ConfigError(
            f"demo --task: {task_name!r} has a reward, not a verifier; the demo needs a verifiable task"
            " (pairs are chosen = verified right, rejected = wrong)"
        )
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    # 1. The reference is the model as given: no SFT.
    _stage(1, f"reference: {model_dir} as given (no SFT)")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, use_safetensors=True)
    timings["load"] = time.perf_counter() - t0

    # 2. Preference pairs sampled from the reference, labelled by the verifier.
    _stage(2, f"preference pairs from {sizes.pair_prompts} prompts x {sizes.samples_per_prompt} samples")
    t0 = time.perf_counter()
    rows, pairing = make_preference_pairs(
        task,
        model,
        tokenizer,
        task.make_prompts(sizes.pair_prompts, seed=PAIR_SEED + 2 * seed),
        sizes.samples_per_prompt,
        seed=PAIR_SEED + 2 * seed,
        pairs_per_prompt=sizes.pairs_per_prompt,
    )
    if not rows:
        raise RuntimeError("demo: the reference's samples gave no preference pair (all right or all wrong)")
    data_path = out / "data" / "pairs.jsonl"
    write_jsonl(rows, data_path)
    timings["pairs"] = time.perf_counter() - t0
    del model

    # 3. One policy per objective, through the normal training path.
    t0 = time.perf_counter()
    runs = _train_policies(
        out,
        model_dir,
        data_path,
        pretrained_settings(sizes),
        progress,
        seed,
    )
    timings["train"] = time.perf_counter() - t0

    # 4. Evaluation, plots, report.
    _stage(4, f"evaluating the reference and {len(runs)} policies")
    t0 = time.perf_counter()
    evaluation = pretrained_evaluation(out, model_dir, runs, progress, task.name, sizes)
    timings["eval"] = time.perf_counter() - t0
    figures = _plot_training(out, runs)
    summary = {
        "model": str(model_dir),
        "task": task.name,
        "quick": quick,
        "sizes": sizes.__dict__,
        "seed": seed,
        "pairing": pairing.as_dict(),
        "timings_s": timings,
        "torch_threads": torch.get_num_threads(),
        "levers": levers(evaluation, runs, temperature=1.0),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    p = pairing
    intro = [
        "# tether demo on a pretrained model",
        "",
        f"Model: `{model_dir}`, the reference as given (no SFT). Task `{task.name}`: {task.description}.",
        "Chat template on, answers checked by the task's verifier; preference pairs are the reference's own",
        "samples at T=1, labelled by the verifier (chosen = correct).",
        "",
        f"- pairs: {p.num_pairs} from {p.num_prompts} prompts x {p.samples_per_prompt} samples"
        f" ({p.skipped_all_tied} prompts gave no pair: all samples right or all wrong;"
        f" {p.empty_samples} empty samples never paired); reference accuracy on them {p.mean_reward:.3f}",
        f"- training: {sizes.train_steps} steps of {sizes.batch_size} pairs per objective, beta 0.2, lr 1e-5,"
        " cosine after 2 warmup steps",
        f"- evaluation: {sizes.eval_prompts} new prompts x {sizes.eval_samples} samples at T=1, top_k off, top_p 1",
        "- stage timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
    ]
    closing = [
        "response. Numbers from one seed and a few dozen steps: they show the pipeline on a real model, not",
        "a study; pass@1 from this many samples has a standard error of several points.",
    ]
    return _write_report(out, intro, closing, runs, evaluation, figures, summary["levers"])


def pretrained_settings(sizes: PretrainedSizes) -> list[str]:
    """The training overrides of the demo on a pretrained model (besides paths, seed and objective)."""
    return [
        "data.max_length=192",  # system + user turn ~50 tokens, responses <= 64 new tokens
        "data.max_prompt_length=96",
        "objective.beta=0.2",
        "optim.lr=1e-5",
        f"optim.batch_size={sizes.batch_size}",
        "optim.scheduler=cosine",
        "optim.warmup_steps=2",
        f"optim.max_steps={sizes.train_steps}",
        "optim.epochs=100",  # max_steps decides
    ]


def pretrained_evaluation(
    out: Path, model_dir: Path, runs: dict[str, Path], progress: bool, task: str, sizes: PretrainedSizes
) -> dict[str, Any]:
    """The pretrained demo's evaluation (into out/eval): the reference and every run at T=1 on the task."""
    from tether.chat_tasks import get_chat_task

    return _evaluate(
        out,
        model_dir,
        runs,
        progress,
        task=task,
        prompts=sizes.eval_prompts,
        samples=sizes.eval_samples,
        temperatures=(1.0,),
        max_new_tokens=get_chat_task(task).max_new_tokens,
        diversity_unit="word",
        batch_size=sizes.eval_prompts * sizes.eval_samples,  # one sampling call per model
        # tether eval's default sampler: each prompt prefilled once, its KV cache shared by its samples
        # (benchmarks/sampling.py: about 2x plain generate on SmolLM2). Same distribution, other draws.
        sampler="shared_prefix",
    )


def _train_policies(
    out: Path,
    ref_dir: Path,
    data_path: Path,
    settings: list[str],
    progress: bool,
    seed: int,
    objectives: list[tuple[str, list[str]]] = DEMO_OBJECTIVES,
) -> dict[str, Path]:
    """One `tether.train.train` run per `objectives` entry (name, overrides) from ref_dir on data_path;
    returns name -> run folder."""
    from tether.config import load_config
    from tether.train import train

    runs: dict[str, Path] = {}
    for index, (name, overrides) in enumerate(objectives, 1):
        _stage(3, f"training {name} ({index}/{len(objectives)})")
        config = load_config(
            None,
            [
                f"output_dir={out / 'runs' / name}",
                f"model.path={ref_dir}",
                f"data.train={data_path}",
                *settings,
                f"optim.seed={seed}",
                f"logging.progress={'true' if progress else 'false'}",
                *overrides,
            ],
        )
        _fresh(Path(config.output_dir))
        train(config)
        runs[name] = Path(config.output_dir)
    return runs


def levers(evaluation: dict[str, Any], runs: dict[str, Path], temperature: float) -> dict[str, Any]:
    """What each method's lever did in this run, from its evaluation at `temperature` and its metrics.

    Returns {model: {pass@1, entropy, unique_answers, kl (sequential KL(ref || pi) per response)}} for the
    reference and every policy, plus per run the mean of log pi(y_w) - log pi_ref(y_w) over the last tenth of
    the logged steps (negative: likelihood displacement) and, for epsilon-DPO, the mean fractions of pairs
    whose beta was relaxed / tightened over training and the final base beta.
    """
    out: dict[str, Any] = {"temperature": temperature, "models": {}, "training": {}}
    for name, entry in evaluation["models"].items():
        m = next(v for t, v in entry["temperatures"].items() if float(t) == temperature)
        out["models"][name] = {
            "pass@1": m["pass@k"]["1"],
            "entropy": m["entropy"],
            "unique_answers": m["unique_answers"],
            "kl": m.get("kl_forward", 0.0),
        }
    for name, run in runs.items():
        metrics = [m for m in read_metrics(run) if m.get("logratios/chosen") is not None]
        tail = metrics[-max(1, len(metrics) // 10) :]  # the last tenth of training: batches average out
        record = {"logratios/chosen late": sum(m["logratios/chosen"] for m in tail) / len(tail)}
        if any("beta/relaxed_frac" in m for m in metrics):
            for key in ("beta/relaxed_frac", "beta/tightened_frac"):
                values = [m[key] for m in metrics if m.get(key) is not None]
                record[f"{key} mean"] = sum(values) / len(values)
            record["beta/base first"] = metrics[0]["beta/base"]
            record["beta/base last"] = metrics[-1]["beta/base"]
        out["training"][name] = record
    return out


def _lever_lines(lev: dict[str, Any]) -> list[str]:
    """One sentence per method: what its lever did here, against the direction its paper gives."""
    m, t = lev["models"], lev["training"]
    ref, dpo = m["reference"], m["dpo"]
    temp = lev["temperature"]

    def cmp(a: float, b: float) -> str:
        return "higher than" if a > b else "lower than" if a < b else "equal to"

    lines = [
        f"All at T={temp:g}, on each model's own samples (pass@1, entropy in nats per token, KL(ref‖pi) per response).",
        "",
    ]
    better = [n for n in m if n != "reference" and m[n]["pass@1"] > ref["pass@1"]]
    lines.append(
        f"- **Preference training vs the reference** (pass@1 {ref['pass@1']:.3f}): "
        + ", ".join(f"{n} {m[n]['pass@1']:.3f}" for n in m if n != "reference")
        + f". {len(better)} of {len(m) - 1} policies improve on the reference."
    )
    falling = [n for n, r in t.items() if r["logratios/chosen late"] < 0]
    lines.append(
        "- **Likelihood displacement** (chosen responses less likely than under the reference, mean of"
        " log pi(y_w) - log pi_ref(y_w) over the last tenth of training): "
        + (
            ", ".join(f"{n} {t[n]['logratios/chosen late']:+.2f} nats" for n in falling)
            if falling
            else "in no run"
        )
        + "."
    )
    if "hdpo_a0.8" in m and "hdpo_a1.2" in m:
        lo, hi = m["hdpo_a0.8"]["entropy"], m["hdpo_a1.2"]["entropy"]
        lines.append(
            f"- **H-DPO's alpha** (paper: alpha < 1 lowers entropy, alpha > 1 raises it; DPO {dpo['entropy']:.3f}):"
            f" alpha 0.8 {lo:.3f}, {cmp(lo, dpo['entropy'])} DPO's"
            + (" as the paper says" if lo < dpo["entropy"] else " (not the paper's direction)")
            + f"; alpha 1.2 {hi:.3f}, {cmp(hi, dpo['entropy'])} DPO's"
            + (" as the paper says." if hi > dpo["entropy"] else " (not the paper's direction).")
            + " docs/toy.md explains what alpha does on offline pairs."
        )
    if "tdpo2" in m:
        td = m["tdpo2"]
        same = abs(td["pass@1"] - dpo["pass@1"]) <= PASS_TOLERANCE
        lines.append(
            f"- **TDPO2** (paper: lower KL at equal or better reward): KL {td['kl']:.3f} vs DPO {dpo['kl']:.3f},"
            f" pass@1 {td['pass@1']:.3f} vs {dpo['pass@1']:.3f}: KL {cmp(td['kl'], dpo['kl'])} DPO's at pass@1"
            + (
                f" within {PASS_TOLERANCE} of DPO's."
                if same
                else f" {cmp(td['pass@1'], dpo['pass@1'])} DPO's."
            )
        )
    eps = t.get("epsilon_dpo", {})
    if "beta/relaxed_frac mean" in eps:
        lines.append(
            f"- **epsilon-DPO's per-pair beta**: on average {eps['beta/relaxed_frac mean']:.1%} of pairs per step"
            f" had their beta relaxed and {eps['beta/tightened_frac mean']:.1%} tightened; the base beta went"
            f" from {eps['beta/base first']:g} to {eps['beta/base last']:.3f}."
        )
    return lines


def _stage(number: int, what: str) -> None:
    print(f"[tether demo] {number}/4 {what}", flush=True)


def _fresh(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def _plot_training(out: Path, runs: dict[str, Path]) -> list[Path]:
    """training_curves.png: loss, reward margin and accuracy, entropy per optimizer step for every run, and
    the same metrics on the held-out pairs (eval_*, dashed with dots) where the run evaluated them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("loss", "loss"),
        ("rewards/margins", "reward margin"),
        ("rewards/accuracies", "reward accuracy"),
        ("entropy/chosen", "policy entropy on chosen (nats/token)"),
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
    held_out = False
    for name, run in runs.items():
        metrics, evals = read_metrics(run), read_metrics(run, split="eval")
        held_out = held_out or bool(evals)
        steps = [m["step"] for m in metrics]
        for ax, (key, _) in zip(axes, keys):
            values = [m.get(key) for m in metrics]  # null (a skipped step) plots as a gap
            (line,) = ax.plot(steps, [float("nan") if v is None else v for v in values], label=name)
            if evals:
                values = [e.get(f"eval_{key}") for e in evals]
                ax.plot(
                    [e["step"] for e in evals],
                    [float("nan") if v is None else v for v in values],
                    linestyle="--",
                    marker=".",
                    color=line.get_color(),
                )
    if held_out:
        axes[0].plot([], [], "k--.", label="held-out pairs (eval_*)")
    for ax, (_, title) in zip(axes, keys):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _evaluate(
    out: Path,
    ref_dir: Path,
    runs: dict[str, Path],
    progress: bool,
    *,
    task: str,
    prompts: int,
    samples: int,
    temperatures: tuple[float, ...],
    max_new_tokens: int,
    diversity_unit: str,
    batch_size: int,
    sampler: str = "generate",  # the toy demo's committed figures were sampled so (same seed, same samples)
) -> dict[str, Any]:
    """`tether eval` on the reference and every trained policy (pass@k, diversity, entropy, KL)."""
    from tether.evaluate.config import config_from_dict
    from tether.evaluate.runner import run_eval

    ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= samples]
    config = config_from_dict(
        {
            "models": [{"name": name, "path": str(run / "final")} for name, run in runs.items()],
            "reference": str(ref_dir),
            "task": task,
            "num_prompts": prompts,
            "temperatures": list(temperatures),
            "n_samples": samples,
            "k": ks,
            "max_new_tokens": max_new_tokens,
            "seed": EVAL_SEED,
            "verifier": "task",
            "diversity_unit": diversity_unit,
            "output_dir": str(out / "eval"),
            "batch_size": batch_size,
            "sampler": sampler,
            "progress": progress,
        }
    )
    return run_eval(config)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "-"


def _write_report(
    out: Path,
    intro: list[str],
    closing: list[str],
    runs: dict[str, Path],
    evaluation: dict[str, Any],
    figures: list[Path],
    lever_summary: dict[str, Any],
) -> Path:
    """A short Markdown report; every number in it comes from this run's files.

    intro: the title and the lines that describe the run; closing: the lines that end the sentence
    "Entropy is ... KL per" (the caveat).
    """
    lines = [*intro]
    lines += [
        "",
        "## Training (last step)",
        "",
        "| objective | steps | loss | reward accuracy | reward margin | entropy/chosen |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        last = read_metrics(run)[-1]
        lines.append(
            f"| {name} | {last['step']} | {_fmt(last.get('loss'))} | {_fmt(last.get('rewards/accuracies'))} |"
            f" {_fmt(last.get('rewards/margins'))} | {_fmt(last.get('entropy/chosen'))} |"
        )
    lines += ["", "![training curves](training_curves.png)", "", "## What each lever did", ""]
    lines += _lever_lines(lever_summary)
    lines += ["", "## Evaluation", ""]
    temps = list(next(iter(evaluation["models"].values()))["temperatures"])
    ks = sorted(
        {
            int(k)
            for e in evaluation["models"].values()
            for m in e["temperatures"].values()
            for k in m.get("pass@k", {})
        }
    )
    header = (
        "| model | T | " + " | ".join(f"pass@{k}" for k in ks) + " | unique answers | entropy | KL(ref‖pi) |"
    )
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for name, entry in evaluation["models"].items():
        for t in temps:
            m = entry["temperatures"][t]
            cells = " | ".join(_fmt(m.get("pass@k", {}).get(str(k))) for k in ks)
            lines.append(
                f"| {name} | {t} | {cells} | {_fmt(m.get('unique_answers'))} | {_fmt(m.get('entropy'))} |"
                f" {_fmt(m.get('kl_forward'))} |"
            )
    lines.append("")
    for plot in evaluation.get("plots", []):
        rel = Path(plot).resolve().relative_to(out.resolve())
        lines.append(f"![{rel.stem}]({rel.as_posix()})")
    lines += [
        "",
        "Entropy is nats per token on each model's own samples; KL(ref‖pi) is TDPO's sequential forward KL per",
        *closing,
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
