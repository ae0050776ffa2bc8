"""`run_eval`: sample every model over the temperature grid, compute every metric, write eval.json and plots.

Flow: load the prompt rows (JSONL or a built-in task) -> build the verifier and reward -> load the reference
(if any) and sample it -> for each model: load, sample each temperature (cached), score entropy and
sequential KL on its own samples, verify, reward, compare with the reference's samples -> eval.json ->
plots. Models are loaded one at a time (the reference stays loaded); from local folders, .gguf files or Hub
ids in the hub cache (`tether.hub`), safetensors-only, `trust_remote_code` as configured (off by default).

Metrics per model and temperature (see docs/evaluate.md for formulas): num_prompts, n_samples,
mean_length_tokens, pass@k {k: value} and accuracy (with a verifier), distinct_1, distinct_2,
unique_answers, edit_distance, entropy (nats per token, on the model's own samples), kl_forward and
kl_reverse (nats per response, against the reference; 0 for the reference itself), reward and win_rate
(win rate against the reference's samples at the same temperature), from_cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import numpy as np
import torch

from tether import hub
from tether.data.errors import INVALID_UTF8, REASON_FIXES, BadRow
from tether.data.rows import check_values
from tether.data.sources import parse_json
from tether.evaluate.config import ConfigError, EvalConfig, config_from_dict, load_config
from tether.evaluate.diversity import distinct_n, pairwise_edit_distance, unique_answers
from tether.evaluate.execution import SandboxConfig, sandbox_report
from tether.evaluate.likelihood import mean_token_entropy, score_sequences
from tether.evaluate.passk import mean_pass_at_k
from tether.evaluate.plots import plot_all
from tether.evaluate.rewards import load_reward, score_all, win_rate
from tether.evaluate.sampling import SampleSet, pad_token_id, sample
from tether.evaluate.verifiers import make_verifier, verify_all
from tether.files import atomic_write
from tether.gguf import GGUFError, check_gguf, is_gguf, pretrained_source

REFERENCE = "reference"


def load_examples(cfg: EvalConfig) -> tuple[list[dict[str, Any]], Any]:
    """The prompt rows ({"prompt": str, ...}) and the task object (None for a JSONL source)."""
    if cfg.prompts is not None:
        rows = [_prompt_row(cfg.prompts, lineno, raw) for lineno, raw in _lines(cfg.prompts)]
        if cfg.num_prompts:
            rows = rows[: cfg.num_prompts]
        if not rows:
            raise ConfigError(f"prompts: {cfg.prompts} holds no prompt")
        return rows, None
    task = get_task(cfg.task)
    made = task.make_prompts(cfg.num_prompts, cfg.seed)
    rows = [dict(p) if isinstance(p, dict) else {"prompt": p} for p in made]
    return rows, task


def _lines(path: str) -> list[tuple[int, bytes]]:
    """(line number, bytes) of each non-blank line; a leading UTF-8 byte-order mark is dropped."""
    with open(path, "rb") as f:
        lines = f.read().removeprefix(b"\xef\xbb\xbf").split(b"\n")
    return [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]


def _prompt_row(path: str, lineno: int, raw: bytes) -> dict[str, Any]:
    """One prompt line read as training data is (the same bad-row reasons), or ConfigError naming the line."""
    where = f"prompts: {path} line {lineno}"
    try:
        row = parse_json(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: {INVALID_UTF8}: byte {exc.start}: {exc.reason}") from None
    if isinstance(row, BadRow):
        bad = row
    elif not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise ConfigError(f"{where}: needs a string field 'prompt'")
    elif (bad := check_values(row)) is None:
        return row
    field = f" (field {bad.field!r})" if bad.field else ""
    raise ConfigError(f"{where}{field}: {bad.reason}: {bad.detail}; to fix: {REASON_FIXES[bad.reason]}")


def get_task(name: str | None) -> Any:
    """A built-in task: a chat task of tether.chat_tasks, else tether.toy.tasks.get_task(name)."""
    from tether.chat_tasks import CHAT_TASKS

    if name in CHAT_TASKS:
        return CHAT_TASKS[name]
    try:
        from tether.toy.tasks import get_task as _get_task
    except ImportError as exc:
        raise ConfigError(f"task: built-in tasks are unavailable ({exc})") from exc
    try:
        return _get_task(name)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"task: {exc}") from exc


def _task_method(task: Any, method: str, field_name: str) -> Callable:
    fn = getattr(task, method, None)
    if not callable(fn):
        raise ConfigError(f"{field_name}: task {getattr(task, 'name', task)!r} has no {method}()")
    return fn


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    path: str, cfg: EvalConfig, device: torch.device, revision: str | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) from a local folder (local files only, safetensors only), a Hub id's snapshot in the
    hub cache (`tether.hub`) or a local .gguf file (dequantized, see tether.gguf), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_gguf(path):
        try:
            check_gguf(path)
        except GGUFError as exc:
            raise ConfigError(f"model path: {exc}") from None
    elif hub.is_hub_id(path):
        try:
            path = hub.local_path(path, revision)
        except hub.HubError as exc:
            raise ConfigError(f"model path: {exc}") from None
    elif not os.path.isdir(path):
        raise ConfigError(f"model path {path!r} is not a local folder, a .gguf file or a Hub id (org/name)")
    source, kwargs = pretrained_source(path, model=False)
    tokenizer = AutoTokenizer.from_pretrained(
        source, local_files_only=True, trust_remote_code=cfg.trust_remote_code, **kwargs
    )
    source, kwargs = pretrained_source(path, model=True)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=cfg.trust_remote_code,
        dtype=getattr(torch, cfg.dtype),
        **kwargs,
    ).to(device)
    model.eval()
    return model, tokenizer


def _flat(samples: SampleSet) -> tuple[list[str], list[str]]:
    prompts = [p for p, comps in zip(samples.prompts, samples.completions) for _ in comps]
    completions = [c for comps in samples.completions for c in comps]
    return prompts, completions


def diversity_metrics(samples: SampleSet, unit: str) -> dict[str, float]:
    """distinct-1/2, unique answers and pairwise edit distance, each averaged over prompts."""
    per = samples.completions
    return {
        "distinct_1": float(np.mean([distinct_n(c, 1, unit) for c in per])),  # type: ignore[arg-type]
        "distinct_2": float(np.mean([distinct_n(c, 2, unit) for c in per])),  # type: ignore[arg-type]
        "unique_answers": float(np.mean([unique_answers(c) for c in per])),
        "edit_distance": float(np.mean([pairwise_edit_distance(c, unit) for c in per])),  # type: ignore[arg-type]
    }


def evaluate_samples(
    samples: SampleSet,
    model: Any,
    tokenizer: Any,
    cfg: EvalConfig,
    *,
    reference: Any = None,
    is_reference: bool = False,
    verifier: Callable[[str, str], bool] | None = None,
    reward: Callable | None = None,
    reference_rewards: list[list[float]] | None = None,
) -> tuple[dict[str, Any], list[list[float]] | None]:
    """Every metric of one SampleSet; also returns the per-prompt rewards (P, n) when there is a reward."""
    n = cfg.n_samples
    metrics: dict[str, Any] = {
        "num_prompts": len(samples.prompts),
        "n_samples": n,
        "from_cache": samples.from_cache,
        "mean_length_tokens": float(np.mean([len(ids) for per in samples.completion_ids for ids in per])),
    }
    flat_prompt_ids = [pid for pid, per in zip(samples.prompt_ids, samples.completion_ids) for _ in per]
    flat_completion_ids = [ids for per in samples.completion_ids for ids in per]
    stats = score_sequences(
        model,
        flat_prompt_ids,
        flat_completion_ids,
        pad_token_id(tokenizer),
        None if is_reference else reference,
        seq_chunk=cfg.seq_chunk,
        token_chunk=cfg.token_chunk,
    )
    metrics["entropy"] = mean_token_entropy(stats)
    if is_reference:
        metrics["kl_forward"] = metrics["kl_reverse"] = 0.0
    elif stats.kl_forward is not None and stats.kl_reverse is not None:
        metrics["kl_forward"] = float(stats.kl_forward.mean())
        metrics["kl_reverse"] = float(stats.kl_reverse.mean())
    metrics.update(diversity_metrics(samples, cfg.diversity_unit))

    prompts, completions = _flat(samples)
    if verifier is not None:
        correct = np.asarray(verify_all(verifier, prompts, completions), dtype=bool).reshape(-1, n)
        metrics["accuracy"] = float(correct.mean())
        passk = mean_pass_at_k(np.full(len(correct), n), correct.sum(1), cfg.k)
        metrics["pass@k"] = {str(k): v for k, v in passk.items()}
    rewards = None
    if reward is not None:
        flat_rewards = score_all(reward, prompts, completions)
        rewards = [flat_rewards[i * n : (i + 1) * n] for i in range(len(samples.prompts))]
        metrics["reward"] = float(np.mean(flat_rewards))
        if reference_rewards is not None:
            metrics["win_rate"] = win_rate(rewards, reference_rewards)
    return metrics, rewards


def _checked(cfg: EvalConfig) -> EvalConfig:
    """Type-check a config built in Python the same way a YAML one is checked."""
    return config_from_dict({f.name: getattr(cfg, f.name) for f in fields(cfg)}).validate()


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """Evaluate every model of the config; writes <output_dir>/eval.json and PNG plots, returns the result.

    Returns:
        {"config": ..., "sandbox": ... (verifier=execution only), "models": {name: {"path",
        "temperatures": {"<T>": metrics}}}, "plots": [paths]}; the reference, when given, is the
        model named "reference".
    """
    cfg = _checked(config)
    examples, task = load_examples(cfg)
    prompts = [ex["prompt"] for ex in examples]
    verifier = reward = None
    sandbox = SandboxConfig(timeout_s=cfg.execution_timeout_s)
    if cfg.verifier is not None:
        verifier = (
            _task_method(task, "verify", "verifier")
            if cfg.verifier == "task"
            else make_verifier(cfg.verifier, examples, sandbox, cfg.execution_workers)
        )
    device = _resolve_device(cfg.device)
    if cfg.reward is not None:
        reward = (
            _task_method(task, "reward", "reward")
            if cfg.reward == "task"
            else load_reward(cfg.reward, device, cfg.batch_size)
        )
    cache_dir = cfg.cache_dir or os.path.join(cfg.output_dir, "samples")
    os.makedirs(cfg.output_dir, exist_ok=True)

    def draw(model: Any, tokenizer: Any, path: str, revision: str | None = None) -> dict[float, SampleSet]:
        return {
            t: sample(
                model,
                tokenizer,
                prompts,
                temperature=t,
                top_p=cfg.top_p,
                n=cfg.n_samples,
                max_new_tokens=cfg.max_new_tokens,
                seed=cfg.seed,
                batch_size=cfg.batch_size,
                use_chat_template=cfg.use_chat_template,
                cache_dir=cache_dir,
                model_id=hub.identity(path, revision) if hub.is_hub_id(path) else os.path.abspath(path),
                progress=cfg.progress,
                sampler=cfg.sampler,
            )
            for t in cfg.temperatures
        }

    result: dict[str, Any] = {"config": cfg.to_dict(), "models": {}}
    if cfg.verifier == "execution":
        result["sandbox"] = sandbox_report(sandbox)
    reference = ref_tokenizer = None
    ref_rewards: dict[float, list[list[float]] | None] = {}
    if cfg.reference is not None:
        reference, ref_tokenizer = load_model(cfg.reference, cfg, device)
        entry: dict[str, Any] = {"path": cfg.reference, "temperatures": {}}
        for t, samples in draw(reference, ref_tokenizer, cfg.reference).items():
            metrics, ref_rewards[t] = evaluate_samples(
                samples, reference, ref_tokenizer, cfg, is_reference=True, verifier=verifier, reward=reward
            )
            entry["temperatures"][f"{t:g}"] = metrics
        result["models"][REFERENCE] = entry

    for spec in cfg.models:
        model, tokenizer = load_model(spec.path, cfg, device, spec.revision)
        if ref_tokenizer is not None and tokenizer.get_vocab() != ref_tokenizer.get_vocab():
            raise ConfigError(
                f"models.{spec.name}: its tokenizer differs from the reference's; KL needs one vocabulary"
            )
        entry = {"path": spec.path, "temperatures": {}}
        for t, samples in draw(model, tokenizer, spec.path, spec.revision).items():
            metrics, _ = evaluate_samples(
                samples,
                model,
                tokenizer,
                cfg,
                reference=reference,
                verifier=verifier,
                reward=reward,
                reference_rewards=ref_rewards.get(t),
            )
            entry["temperatures"][f"{t:g}"] = metrics
        result["models"][spec.name] = entry
        del model

    result["plots"] = plot_all(result, cfg.output_dir)
    path = os.path.join(cfg.output_dir, "eval.json")
    with atomic_write(path) as f:  # a killed run never leaves a torn eval.json
        json.dump(result, f, indent=2)
    return result


def format_summary(result: dict[str, Any]) -> str:
    """A small text table: one line per model and temperature with the headline metrics."""
    cols = ["accuracy", "entropy", "distinct_2", "kl_forward", "reward", "win_rate"]
    lines = ["model".ljust(16) + "T".rjust(6) + "".join(c.rjust(12) for c in cols)]
    for name, entry in result["models"].items():
        for temp, metrics in entry["temperatures"].items():
            cells = "".join(
                (f"{metrics[c]:.4f}" if isinstance(metrics.get(c), float) else "-").rjust(12) for c in cols
            )
            lines.append(name[:16].ljust(16) + temp.rjust(6) + cells)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`tether eval CONFIG [key=value ...]`: argv holds CONFIG and the overrides. Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="tether eval",
        description="Evaluate models: pass@k, diversity, entropy, sequential KL, rewards; writes eval.json and plots.",
    )
    parser.add_argument("config", help="YAML eval config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (values parsed as YAML)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        cfg = load_config(args.config, args.overrides)
        result = run_eval(cfg)
    except ConfigError as exc:
        print(f"tether eval: {exc}", file=sys.stderr)
        return 2
    print(format_summary(result))
    print(f"wrote {os.path.join(cfg.output_dir, 'eval.json')} and {len(result['plots'])} plot(s)")
    return 0
