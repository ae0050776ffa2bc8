"""`tether iterate`: on-policy preference rounds (iterative / online DPO) with any tether objective.

Each round r = 1..R, in `<output_dir>/round-NNN/`:

1. sample: n responses per prompt from the current policy (the initial model in round 1, round r-1's trained
   model after), labelled with the verifier (1.0 correct, 0.0 wrong) or the reward -> `samples.jsonl`;
2. pairs: chosen = higher label, rejected = lower, by `tether.toy.pairs.pair_samples` -> `pairs.jsonl` and
   `pairing.json` (pairs made, prompts skipped because every sample tied, empty samples);
3. train: `tether.train.train` on those pairs, from the current policy, with the `train:` section of the
   config (any objective and option of `tether train`) -> `train/` (its `final/` is the next policy);
   the training reference is the initial model (`reference: initial`) or the current policy
   (`reference: previous`);
4. eval: `tether.evaluate.runner.run_eval` of the new policy on held-out prompts, once against the initial
   model and once against the previous policy (the sequential KL to each) -> `eval/`, `eval_previous/`;
5. `record.json`: the round's record, written last and atomically: the completion marker.

Resume: a round whose `record.json` exists is never touched again. In an unfinished round each stage whose
output exists is kept (every output is written atomically, `train/final/` by a rename), and the first missing
one restarts; training itself continues from its last complete checkpoint (`train(config, resume=True)`).
Sampling, pairing and evaluation are seeded, so on CPU with one thread and `train.optim.deterministic` a
resumed run writes the same records and weights as an uninterrupted one.

After every round `rounds.jsonl` (line 0: the initial model, from round 1's evaluation; then one line per
finished round) and `rounds.png` are rewritten from the round folders.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tether.config import ConfigError, TrainConfig, _merge, from_dict, read_config_dict
from tether.files import atomic_write

RECORD = "record.json"  # written last in a round folder: the round is complete
SET_PER_ROUND = ("output_dir", "model.path", "data.train", "reference.path")  # train fields iterate owns


@dataclass
class SampleConfig:
    n: int = 8  # responses sampled per prompt from the current policy each round
    temperature: float = 1.0  # sampling temperature (> 0: greedy samples are all alike and give no pair)
    top_p: float = 1.0  # nucleus sampling mass, in (0, 1]
    max_new_tokens: int = 32  # tokens generated per response at most
    batch_size: int = 64  # rows per generate call
    pairs_per_prompt: int = 1  # pairs per prompt: k-th best against k-th worst, while they differ
    seed: int = 0  # round r samples with seed + r


@dataclass
class HeldOutConfig:
    prompts: str | None = None  # JSONL of held-out prompts (needed when training prompts come from a file)
    num_prompts: int = 64  # held-out prompts (a task draws them with `seed`; a file gives its first rows)
    n_samples: int = 8  # samples per held-out prompt and temperature
    k: list[int] = field(default_factory=lambda: [1, 4, 8])  # pass@k values (<= n_samples)
    temperatures: list[float] = field(default_factory=lambda: [1.0])  # evaluation temperatures
    max_new_tokens: int = 32  # tokens generated per sample at most
    batch_size: int = 64  # rows per generate call
    seed: int = 1234  # held-out task prompts and sampling seed (keep it apart from the training seeds)
    diversity_unit: str = "word"  # word | char: unit of distinct-n and edit distance


@dataclass
class IterateConfig:
    output_dir: str = "runs/iterate"  # run folder: iterate.yaml, round-NNN/, rounds.jsonl, rounds.png
    model: str = ""  # the initial policy: a local Hugging Face model folder
    rounds: int = 3  # number of rounds
    reference: str = "initial"  # training reference: initial (the initial model) | previous (last policy)
    task: str | None = (
        None  # built-in task (tether.toy.tasks): fresh prompts each round, seed prompt_seed + r
    )
    prompts: str | None = None  # JSONL of {"prompt": ...} rows, the same every round (instead of task)
    num_prompts: int = 64  # training prompts per round (a file: its first rows; 0 = all)
    prompt_seed: int = 0  # seed of the task's training prompts
    verifier: str | None = None  # task | exact_match | module:function (label 1.0 right, 0.0 wrong)
    reward: str | None = None  # task | module:function | local reward-model folder (instead of verifier)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: HeldOutConfig = field(default_factory=HeldOutConfig)
    progress: bool = True  # progress bars
    train: dict[str, Any] = field(default_factory=dict)  # a `tether train` config without SET_PER_ROUND

    def validate(self) -> IterateConfig:
        """Check values and build round 1's TrainConfig and EvalConfig; ConfigError names the field."""
        if not self.model:
            raise ConfigError("model is empty: give the initial policy's local model folder")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.reference not in ("initial", "previous"):
            raise ConfigError(f"reference must be one of ['initial', 'previous'], got {self.reference!r}")
        if (self.task is None) == (self.prompts is None):
            raise ConfigError("task / prompts: give exactly one (a built-in task or a JSONL file of prompts)")
        if self.prompts is not None and self.eval.prompts is None:
            raise ConfigError("eval.prompts: training prompts come from a file: give held-out prompts too")
        if (self.verifier is None) == (self.reward is None):
            raise ConfigError("verifier / reward: give exactly one to label the samples")
        if self.sample.n < 2:
            raise ConfigError(f"sample.n must be >= 2 to make pairs, got {self.sample.n}")
        for name in ("max_new_tokens", "batch_size", "pairs_per_prompt"):
            if getattr(self.sample, name) < 1:
                raise ConfigError(f"sample.{name} must be >= 1, got {getattr(self.sample, name)}")
        if not self.sample.temperature > 0:
            raise ConfigError(f"sample.temperature must be > 0, got {self.sample.temperature}")
        if self.num_prompts < 0 or (self.task is not None and self.num_prompts < 1):
            raise ConfigError(f"num_prompts must be >= 1 (0 = the whole file), got {self.num_prompts}")
        taken = [name for name in SET_PER_ROUND if _has_key(self.train, name)]
        if taken:
            raise ConfigError(
                f"train.{taken[0]} is set by tether iterate each round; remove it from the train section"
            )
        if _has_key(self.train, "model.adapter"):
            raise ConfigError(
                "train.model.adapter: each round of tether iterate starts from the previous round's final model,"
                " so an adapter would be loaded again every round; merge it into its base first and set model"
            )
        train = round_train_config(self, 1, Path(self.model))
        if self.reference == "initial" and train.reference_mode() == "adapter":
            raise ConfigError(
                "reference: initial needs the initial model beside the policy, but the LoRA policy with its"
                " adapters off is the reference (train.reference.mode adapter or auto): set"
                " train.reference.mode=copy or cache, or reference: previous"
            )
        train.validate(check_paths=False)
        eval_config(self, Path(self.output_dir) / "round-001", Path(self.model), Path(self.model))
        return self


def _has_key(tree: dict[str, Any], dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def load_iterate_config(path: str | Path, overrides: list[str] | None = None) -> IterateConfig:
    """An IterateConfig from YAML with key=value overrides (`train.objective.name=hdpo`), validated."""
    return config_from_dict(read_config_dict(path, overrides))


def config_from_dict(data: dict[str, Any]) -> IterateConfig:
    """Unknown keys are refused by name; the `train` section is checked as a `tether train` config."""
    data = dict(data)
    train = data.pop("train", None) or {}
    if not isinstance(train, dict):
        raise ConfigError(f"train must be a mapping of `tether train` sections, got {train!r}")
    config = from_dict(IterateConfig, data)
    config.train = train
    return config.validate()


def to_dict(config: IterateConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


# --- the round loop --------------------------------------------------------------------------------------


def iterate(config: IterateConfig, resume: bool = False) -> list[dict[str, Any]]:
    """Run (or, with resume, continue) every round; returns the records written to rounds.jsonl."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not config.progress:
        hf_logging.disable_progress_bar()  # transformers' loading / saving bars
    try:
        return _rounds(config, resume)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _rounds(config: IterateConfig, resume: bool) -> list[dict[str, Any]]:
    out = Path(config.output_dir)
    start_run_folder(out, config, resume)
    policy = Path(config.model)
    for r in range(1, config.rounds + 1):
        folder = out / f"round-{r:03d}"
        if not (folder / RECORD).exists():
            _say(f"round {r}/{config.rounds}, starting from {policy}")
            _say(_summary(run_round(config, r, folder, policy)))
        policy = folder / "train" / "final"
        records = write_rounds(out, config.rounds)
        plot_rounds(records, out / "rounds.png")
    return records


def _summary(record: dict[str, Any]) -> str:
    p = record["pairing"]
    parts = [f"round {record['round']}: {p['num_pairs']} pairs ({p['skipped_all_tied']} prompts tied)"]
    for t, m in record["eval"].items():
        headline = f"pass@1 {m['pass@k']['1']:.3f}" if "1" in m.get("pass@k", {}) else ""
        if "reward" in m:
            headline += f" reward {m['reward']:.3f}"
        parts.append(f"T={t}: {headline} entropy {m['entropy']:.3f} KL initial {m['kl_forward_initial']:.3f}")
    return "; ".join(parts)


def run_round(config: IterateConfig, r: int, folder: Path, policy: Path) -> dict[str, Any]:
    """One round: each stage runs unless its output is already there; record.json is written last."""
    seconds: dict[str, float] = {}
    with _timed(seconds, "sample"):
        if not (folder / "samples.jsonl").exists():
            sample_and_label(config, r, policy, folder / "samples.jsonl")
    with _timed(seconds, "pairs"):
        if not (folder / "pairing.json").exists():
            make_pairs(config, folder)
    with _timed(seconds, "train"):
        if not (folder / "train" / "final").exists():
            train_round(config, r, policy)
    with _timed(seconds, "eval"):
        evaluations = evaluate_round(config, folder, folder / "train" / "final", policy)
    record = round_record(config, r, policy, evaluations, seconds)
    with atomic_write(folder / RECORD) as f:
        json.dump(record, f, indent=1)
    return record


# --- stages ----------------------------------------------------------------------------------------------


def training_prompts(config: IterateConfig, r: int) -> list[dict[str, Any]]:
    """Round r's prompt rows: a task's fresh prompts (seed prompt_seed + r) or the file's rows."""
    from tether.evaluate.runner import get_task, load_examples

    if config.task is not None:
        return [
            {"prompt": p}
            for p in get_task(config.task).make_prompts(config.num_prompts, config.prompt_seed + r)
        ]
    held_out = eval_config(config, Path(config.output_dir), Path(config.model), Path(config.model))
    rows, _ = load_examples(
        dataclasses.replace(held_out, task=None, prompts=config.prompts, num_prompts=config.num_prompts)
    )
    return rows


def labeller(
    config: IterateConfig, rows: list[dict[str, Any]]
) -> Callable[[list[str], list[str]], list[float]]:
    """labels(prompts, completions) -> floats: the verifier as 1.0 / 0.0, or the reward."""
    from tether.evaluate.execution import SandboxConfig
    from tether.evaluate.rewards import load_reward, score_all
    from tether.evaluate.runner import get_task
    from tether.evaluate.verifiers import make_verifier, verify_all

    task = get_task(config.task) if config.task is not None else None
    if config.verifier is not None:
        verifier = (
            task.verify
            if config.verifier == "task"
            else make_verifier(config.verifier, rows, SandboxConfig())
        )
        return lambda prompts, completions: [float(v) for v in verify_all(verifier, prompts, completions)]
    reward = task.reward if config.reward == "task" else load_reward(config.reward)
    return lambda prompts, completions: [float(v) for v in score_all(reward, prompts, completions)]


def sample_and_label(config: IterateConfig, r: int, policy: Path, path: Path) -> None:
    """n samples per training prompt from `policy`, labelled; one JSON line per prompt, written atomically."""
    import torch

    from tether.evaluate.sampling import sample
    from tether.modeling import load_causal_lm, load_tokenizer

    rows = training_prompts(config, r)
    prompts = [row["prompt"] for row in rows]
    model_config = round_train_config(config, r, policy).model
    tokenizer = load_tokenizer(model_config)
    model = load_causal_lm(str(policy), model_config)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    s = config.sample
    samples = sample(
        model,
        tokenizer,
        prompts,
        temperature=s.temperature,
        top_p=s.top_p,
        n=s.n,
        max_new_tokens=s.max_new_tokens,
        seed=s.seed + r,
        batch_size=s.batch_size,
        progress=config.progress,
    )
    del model
    label = labeller(config, rows)
    flat_prompts = [p for p, per in zip(prompts, samples.completions) for _ in per]
    flat_labels = label(flat_prompts, [c for per in samples.completions for c in per])
    with atomic_write(path) as f:
        for i, (prompt, completions) in enumerate(zip(prompts, samples.completions)):
            labels = flat_labels[i * s.n : (i + 1) * s.n]
            f.write(json.dumps({"prompt": prompt, "completions": completions, "labels": labels}) + "\n")


def read_samples(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_pairs(config: IterateConfig, folder: Path) -> None:
    """pairs.jsonl (TRL's conversational format) and pairing.json (its counts) from samples.jsonl."""
    from tether.toy.pairs import pair_samples, write_jsonl

    samples = read_samples(folder / "samples.jsonl")
    rows, stats = pair_samples(
        [s["prompt"] for s in samples],
        [s["completions"] for s in samples],
        [s["labels"] for s in samples],
        config.sample.pairs_per_prompt,
    )
    if not rows:
        raise ConfigError(
            f"{folder}: no preference pair: every prompt's samples got the same label"
            " (raise sample.n or sample.temperature, or start from a better model)"
        )
    write_jsonl(rows, folder / "pairs.jsonl")
    with atomic_write(folder / "pairing.json") as f:
        json.dump(stats.as_dict(), f, indent=1)


def train_round(config: IterateConfig, r: int, policy: Path) -> None:
    """`tether train` from `policy` on round r's pairs; a killed attempt continues from its last checkpoint."""
    from tether.train import complete_checkpoints, train

    train_config = round_train_config(config, r, policy)
    resume = bool(complete_checkpoints(Path(train_config.output_dir) / "checkpoints"))
    train(train_config, resume=resume)


def round_train_config(config: IterateConfig, r: int, policy: Path) -> TrainConfig:
    """The `train:` section with the fields iterate owns: round r's folder, policy, pairs and reference."""
    folder = Path(config.output_dir) / f"round-{r:03d}"
    train = copy.deepcopy(config.train)
    owned = {
        "output_dir": str(folder / "train"),
        "model": {"path": str(policy)},
        "data": {"train": str(folder / "pairs.jsonl")},
        # reference.path null: the policy's own initial weights, i.e. the previous round's policy.
        "reference": {"path": str(config.model) if config.reference == "initial" else None},
    }
    train["logging"] = {"progress": config.progress, **(train.get("logging") or {})}
    return from_dict(TrainConfig, _merge(train, owned))


def eval_config(config: IterateConfig, folder: Path, policy: Path, reference: Path, name: str = "eval"):
    """run_eval's config: `policy` against `reference` on the held-out prompts, into folder/name."""
    from tether.evaluate.config import config_from_dict as eval_from_dict

    e = config.eval
    try:
        return eval_from_dict(
            {
                "models": [{"name": "policy", "path": str(policy)}],
                "reference": str(reference),
                "task": config.task if e.prompts is None else None,
                "prompts": e.prompts,
                "num_prompts": e.num_prompts,
                "temperatures": e.temperatures,
                "n_samples": e.n_samples,
                "k": e.k,
                "max_new_tokens": e.max_new_tokens,
                "seed": e.seed,
                "verifier": config.verifier,
                "reward": config.reward,
                "output_dir": str(folder / name),
                # Shared by all rounds: a policy's held-out samples are drawn once and read back later.
                "cache_dir": str(Path(config.output_dir) / "eval_samples"),
                "batch_size": e.batch_size,
                "diversity_unit": e.diversity_unit,
                "dtype": round_train_config(config, 1, policy).model.dtype,
                "progress": config.progress,
            }
        ).validate()
    except ConfigError as exc:  # name the section: the eval fields are iterate's `eval.*`
        raise ConfigError(f"eval: {exc}") from None


def evaluate_round(config: IterateConfig, folder: Path, policy: Path, previous: Path) -> dict[str, Any]:
    """eval.json of `policy` against the initial model and (after round 1) against `previous`."""
    from tether.evaluate.runner import run_eval

    initial = Path(config.model)
    runs = {"initial": ("eval", initial)}
    if previous != initial:
        runs["previous"] = ("eval_previous", previous)
    results = {}
    for key, (name, reference) in runs.items():
        path = folder / name / "eval.json"
        if not path.exists():
            run_eval(eval_config(config, folder, policy, reference, name))
        results[key] = json.loads(path.read_text())
    return results


# --- records ---------------------------------------------------------------------------------------------


def round_record(
    config: IterateConfig, r: int, previous: Path, evaluations: dict[str, Any], seconds: dict[str, float]
) -> dict[str, Any]:
    """The round's record: pairs made and skipped, training's last step, held-out metrics per temperature
    with the KL to the initial model and to the previous policy (nats per response), and the wall time of
    each stage in this attempt (`seconds`, the one field that differs between equal runs). Paths of a
    round's outputs are relative to output_dir."""
    from tether.train import read_metrics

    out = Path(config.output_dir)
    folder = out / f"round-{r:03d}"
    last = read_metrics(folder / "train")[-1]
    train_config = round_train_config(config, r, previous)
    sampled_from = config.model if r == 1 else f"round-{r - 1:03d}/train/final"
    policy = evaluations["initial"]["models"]["policy"]["temperatures"]
    against_previous = evaluations.get("previous", evaluations["initial"])["models"]["policy"]["temperatures"]
    held_out = {}
    for t, metrics in policy.items():
        held_out[t] = {
            **{k: v for k, v in metrics.items() if k not in ("kl_forward", "kl_reverse", "from_cache")},
            "kl_forward_initial": metrics.get("kl_forward"),
            "kl_reverse_initial": metrics.get("kl_reverse"),
            "kl_forward_previous": against_previous[t].get("kl_forward"),
            "kl_reverse_previous": against_previous[t].get("kl_reverse"),
        }
    return {
        "round": r,
        "policy": f"round-{r:03d}/train/final",
        "sampled_from": sampled_from,
        "reference": config.model if config.reference == "initial" else sampled_from,
        "objective": {"name": train_config.objective.name, **train_config.objective.hparams()},
        "pairing": json.loads((folder / "pairing.json").read_text()),
        "train": {"steps": last["step"], "last": {k: v for k, v in last.items() if k != "step_time_s"}},
        "eval": held_out,
        "seconds": seconds,
    }


def initial_record(out: Path) -> dict[str, Any]:
    """Round 0: the initial model's held-out metrics, as round 1's evaluation measured them."""
    result = json.loads((out / "round-001" / "eval" / "eval.json").read_text())
    entry = result["models"]["reference"]
    held_out = {
        t: {
            **{k: v for k, v in m.items() if k not in ("kl_forward", "kl_reverse", "from_cache")},
            "kl_forward_initial": 0.0,
            "kl_reverse_initial": 0.0,
        }
        for t, m in entry["temperatures"].items()
    }
    return {"round": 0, "policy": entry["path"], "eval": held_out}  # entry["path"] is config.model


def write_rounds(out: Path, rounds: int) -> list[dict[str, Any]]:
    """rounds.jsonl from the finished round folders (round 0 first), written atomically; returns the lines."""
    records = [initial_record(out)]
    for r in range(1, rounds + 1):
        path = out / f"round-{r:03d}" / RECORD
        if not path.exists():
            break
        records.append(json.loads(path.read_text()))
    with atomic_write(out / "rounds.jsonl") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return records


def read_rounds(out: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(out) / "rounds.jsonl").read_text().splitlines() if line]


def plot_rounds(records: list[dict[str, Any]], path: Path) -> None:
    """rounds.png: pass@k or reward, entropy, KL to the initial and previous policy, pairs, per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [rec["round"] for rec in records]
    temps = list(records[0]["eval"])
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for t in temps:
        metrics = [rec["eval"][t] for rec in records]
        if "pass@k" in metrics[0]:
            for k in metrics[0]["pass@k"]:
                axes[0].plot(rounds, [m["pass@k"][k] for m in metrics], marker="o", label=f"pass@{k} T={t}")
        if "reward" in metrics[0]:
            axes[0].plot(rounds, [m["reward"] for m in metrics], marker="s", label=f"reward T={t}")
        axes[1].plot(rounds, [m["entropy"] for m in metrics], marker="o", label=f"T={t}")
        for key, style in (("kl_forward_initial", "-"), ("kl_forward_previous", "--")):
            values = [m.get(key, float("nan")) for m in metrics]
            axes[2].plot(rounds, values, style, marker="o", label=f"{key.split('_')[-1]} T={t}")
    made = [rec.get("pairing", {}).get("num_pairs", float("nan")) for rec in records]
    skipped = [rec.get("pairing", {}).get("skipped_all_tied", float("nan")) for rec in records]
    axes[3].plot(rounds, made, marker="o", label="pairs made")
    axes[3].plot(rounds, skipped, marker="o", label="prompts skipped (all tied)")
    titles = (
        "held-out pass@k / reward",
        "entropy (nats/token)",
        "KL(ref‖pi) to initial / previous (nats)",
        "pairs",
    )
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round (0 = initial model)")
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- run folder ------------------------------------------------------------------------------------------


def start_run_folder(out: Path, config: IterateConfig, resume: bool) -> None:
    """Refuse a fresh run into a used folder and a resume whose config changed (rounds may grow)."""
    saved = out / "iterate.yaml"
    current = to_dict(config)
    if saved.exists():
        if not resume:
            raise ConfigError(f"output_dir {out} already holds a run; pass --resume or choose another")
        before = yaml.safe_load(saved.read_text())
        changed = sorted(
            k
            for k in {*before, *current}
            if k not in ("rounds", "progress") and before.get(k) != current.get(k)
        )
        if changed:
            raise ConfigError(f"refusing to resume {out}: changed since it was started: {changed}")
    with atomic_write(saved) as f:
        yaml.safe_dump(current, f, sort_keys=False)


class _timed:
    """Adds the wall time of the block to seconds[name]."""

    def __init__(self, seconds: dict[str, float], name: str):
        self.seconds, self.name = seconds, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.seconds[self.name] = round(time.perf_counter() - self.t0, 3)


def _say(what: str) -> None:
    print(f"[tether iterate] {what}", flush=True)
