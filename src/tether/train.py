"""The training loop on `accelerate`: `_train` runs named stages and a step loop of a few lines.

Setup: `_setup_accelerator`, `_resume_point` (checks before anything heavy is loaded), the data,
`_check_resume_length`, `_setup_policy` (policy and reference), `_setup_optimizer`, `_restore`. Each step:
`_train_step` (`_accumulate_gradients` over the micro-batches, the non-finite check, the update, the
objective's `after_step` hook, `_reduce_metrics`) returns the step's record; `_log` writes it and
`_write_checkpoint` saves every checkpoint.every steps; `_write_final` saves the final model.

Assumptions, stated once:
- The data order is a pure function of (seed, epoch): every optimizer step s takes the pairs
  perm_epoch[k*G : (k+1)*G] with G = batch_size * grad_accum * world_size. A resumed run therefore needs only
  the step number to continue exactly where it stopped. The last step of an epoch may be smaller.
- Within a step, micro-batch j of process r holds pairs [(j*W + r)*b, (j*W + r + 1)*b) of the step. Each process
  backpropagates sum(losses) * W / n_step, so after DDP averages gradients over W processes the step's gradient
  is exactly that of the mean loss over its n_step pairs: batch 4 x accumulation 1 equals 2 x 2 equals 1 x 4,
  and 2 processes equal 1, also for an uneven last window. A process with no pairs in a micro-batch still runs
  one (a repeated pair with weight 0) so collectives never hang.
- Checkpoints are only written at optimizer-step boundaries, into `step-N.partial/`, renamed to `step-N/` once
  complete (N zero-padded to 8 digits: `step-00000010/`, so names sort by step); `state.json` is written
  last, and only folders with it are ever loaded. Without parameter sharding a checkpoint also loads as a
  model with `AutoModelForCausalLM.from_pretrained` (config.json + tokenizer, or the LoRA adapter); under FSDP
  or DeepSpeed it holds accelerate's sharded state, for --resume only. The final model is always a full
  `save_pretrained` folder; `final/tether_run.json`, written once it is complete, records the step it holds,
  so that --resume of a finished run leaves it alone. A fresh run never writes into a folder holding either.
- --resume compares the run's fingerprint (`tether.config.config_fingerprint`: the data by content, paths
  resolved) with the checkpoint's; `tether.config.RESUME_ACCEPTED` lists the changes it accepts.
- The model is trained through `tether.modeling.PolicyStatistics`, whose forward runs the policy and the
  chunked head, so DDP, FSDP and DeepSpeed see the head inside the forward they wrap.
- metrics.jsonl holds one strict-JSON line per logged step (non-finite values as null): with logging.every N,
  the means over the N steps since the last logged one (`window_record`, as TRL's logging_steps), and one line
  per evaluation of eval.data (`"split": "eval"`, TRL's eval_* names; `_evaluate`), written before that
  step's checkpoint. A resumed or restarted run first drops the lines after its start step; the steps of an
  unfinished window and the running token count are checkpointed, so resumed logs equal uninterrupted ones.
- The reference cache (reference.mode=cache) records what it was built from and is rebuilt when that changed.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from tether import hub
from tether.config import ConfigError, TrainConfig, config_fingerprint, resume_changes, save_config
from tether.files import atomic_write
from tether.heads import StatRequest
from tether.modeling import (
    PolicyStatistics,
    disable_dropout,
    load_adapter,
    load_causal_lm,
    load_tokenizer,
    prepare_four_bit,
)
from tether.objectives import Objective, PairStats
from tether.reference import (
    AdapterReference,
    CachedReference,
    ModelReference,
    Reference,
    build_reference_cache,
)
from tether.statistics import stat_request

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


class NonFiniteError(RuntimeError):
    """A loss or gradient was NaN/inf and optim.on_nonfinite is 'error'."""


class NonFiniteWeightsError(NonFiniteError):
    """A parameter holds NaN/inf when a checkpoint or the final model is about to be written: nothing is written."""


class RunWriteError(OSError):
    """Writing into the run folder failed (a full disk, a read-only or vanished file system)."""

    def __str__(self) -> str:  # the message alone: "[Errno 28]" says nothing the message does not
        return self.strerror or super().__str__()


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_model: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)  # every step's record (not windowed)
    skipped_steps: int = 0
    main_process: bool = True  # False on the other processes of a multi-process run
    eval_history: list[dict[str, Any]] = field(default_factory=list)  # the eval records of this attempt


# --- data order ----------------------------------------------------------------------------------------


def epoch_permutation(num_pairs: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_pairs))
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_pairs, generator=g).tolist()


def step_pairs(
    num_pairs: int, global_batch: int, step: int, seed: int, shuffle: bool
) -> tuple[int, list[int]]:
    """(epoch, dataset indices) of optimizer step `step` (0-based)."""
    steps_per_epoch = math.ceil(num_pairs / global_batch)
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    perm = epoch_permutation(num_pairs, seed, epoch, shuffle)
    return epoch, perm[step_in_epoch * global_batch : (step_in_epoch + 1) * global_batch]


# --- checkpoints ---------------------------------------------------------------------------------------


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints (step-N with state.json) sorted by step; partial folders are never returned."""
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        m = CHECKPOINT_RE.match(child.name)
        if m and (child / "state.json").is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def _save_checkpoint(
    accelerator,
    folder: Path,
    step: int,
    state: dict[str, Any],
    keep_last: int,
    model,
    tokenizer,
    loadable: bool,
) -> Path:
    """accelerate's state (weights, optimizer, scheduler, RNG) plus, if loadable (not FSDP or DeepSpeed),
    what `from_pretrained` needs to load the checkpoint as a model: config.json and the tokenizer (or, with
    LoRA, the adapter on its base model). FSDP and DeepSpeed write their own per-process files: --resume only."""
    final = folder / f"step-{step:08d}"
    staging = folder / f"step-{step:08d}.partial"
    require_finite_weights(accelerator, model, f"checkpoint step-{step:08d}", folder)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model).causal_lm
        if loadable and hasattr(unwrapped, "peft_config"):  # adapter_config.json + adapter weights
            unwrapped.save_pretrained(staging, safe_serialization=True)
        elif loadable:
            unwrapped.config.save_pretrained(staging)
            if getattr(unwrapped, "generation_config", None) is not None:
                unwrapped.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with atomic_write(staging / "state.json") as f:  # written last: marks the folder complete
            f.write(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for old in complete_checkpoints(folder)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def require_finite_weights(accelerator, model, what: str, ckpt_dir: Path) -> None:
    """Raise `NonFiniteWeightsError` on every process, before anything is written, if any parameter holds
    NaN/inf on any process: a saved model must never be silently broken. One pass over the local parameters
    (or shards: FSDP2's DTensors, DeepSpeed ZeRO-3's partitions) and one all-reduce of a count."""
    bad, first = 0, None
    for name, param in accelerator.unwrap_model(model).named_parameters():
        local = getattr(param, "ds_tensor", None)  # ZeRO-3: the parameter itself is an empty placeholder
        if local is None:
            local = param.to_local() if hasattr(param, "to_local") else param
        if not bool(torch.isfinite(local.detach()).all()):
            bad += 1
            first = first or name
    total = int(accelerator.reduce(torch.tensor(bad, device=accelerator.device), reduction="sum"))
    if total:
        kept = [p.name for p in complete_checkpoints(ckpt_dir)]
        where = f"parameter {first}" if first else "a parameter on another process"
        raise NonFiniteWeightsError(
            f"not writing {what}: {where} holds NaN or inf ({total} non-finite tensors over all processes)."
            f" Earlier checkpoints are intact ({', '.join(kept) if kept else 'none were written'} in {ckpt_dir})."
            " The weights diverged although each step's loss and gradient were finite: lower optim.lr, clip"
            " gradients (optim.max_grad_norm), or train in float32 / bfloat16 weights"
        )


FINISHED_RECORD = "tether_run.json"  # in final/: the step the final model holds and the run's fingerprint


def _finished_record(final: Path) -> dict[str, Any] | None:
    """final/'s record ({"step", "skipped_steps", "fingerprint"}), or None: no final model, or one written by
    a run killed before it recorded the step (or by an older tether); such a run is resumed as before."""
    record = final / FINISHED_RECORD
    return json.loads(record.read_text()) if record.is_file() else None


@contextlib.contextmanager
def _explain_write_failure(what: str, target: Path, ckpt_dir: Path):
    """Turn a failed write into the run folder (a full disk: torch says `unexpected pos` or `PytorchStreamWriter
    failed`, safetensors `os error 28`) into a RunWriteError that says so, where, and what is still intact.
    A half-written `*.partial` folder is removed to free the space (it would never be loaded)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised unchanged unless it is a failed write
        reason = _write_failure(exc)
        if reason is None:
            raise
        if target.name.endswith(".partial"):
            shutil.rmtree(target, ignore_errors=True)
        done = complete_checkpoints(ckpt_dir)
        intact = (
            f"the last complete checkpoint, {done[-1]}, is intact (a .partial folder is never loaded): free"
            " space and run again with --resume"
            if done
            else "no checkpoint was complete yet"
        )
        raise RunWriteError(
            getattr(exc, "errno", None) or errno.EIO,
            f"could not write {what} into {target}: {reason}; {intact}",
        ) from exc


def _write_failure(exc: BaseException) -> str | None:
    """Why a write failed, if exc is a failed write; None for any other error."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    if "No space left" in text or "os error 28" in text or "StorageFull" in text:
        return "the disk is full"
    if isinstance(exc, OSError):
        return f"the write failed ({exc.strerror or text})"
    # torch.save reports a short write only as a failed write or a wrong position in its zip container.
    if "unexpected pos" in text or "PytorchStreamWriter failed" in text or "file write failed" in text:
        return f"the write failed, most likely because the disk is full ({text.splitlines()[0][:200]})"
    return None


def data_digest(source: str, split: str, revision: str | None = None) -> str:
    """SHA-256 of the data's content, streamed: a file's bytes, or the files of a folder (of the split's
    subfolder for a saved DatasetDict; relative path and bytes, sorted; `cache-*.arrow` files that `.map`
    leaves there are no content); a Hub data set id is its cached snapshot folder (`tether.hub`)."""
    h = hashlib.sha256()
    path = Path(hub.local_path(source, revision, "dataset"))
    if path.is_dir() and (path / "dataset_dict.json").is_file() and (path / split).is_dir():
        path = path / split
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        files = [
            (str(f.relative_to(path)), f)
            for f in sorted(path.rglob("*"))
            if f.is_file() and not (f.name.startswith("cache-") and f.suffix == ".arrow")
        ]
    else:
        h.update(f"name:{source}\nsplit:{split}".encode())
        return h.hexdigest()
    for name, f in files:
        if path.is_dir():
            h.update(name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


_TRAJECTORY_FIELDS = {
    f"optim.{name}"
    for name in ("lr", "scheduler", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps")
} | {"optim.max_grad_norm", "optim.mixed_precision"}


def _changes(keys: list[str], saved: dict[str, Any], current: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys)


# --- setup ---------------------------------------------------------------------------------------------


def _refuse_float16_training(model, config: TrainConfig) -> None:
    """Refuse to train float16 parameters with AdamW: float16's range cannot hold AdamW's state (adam_eps 1e-8
    and squared gradients below 6e-8 round to 0, and 0/0 turns the first step's update into NaN) and plain
    float16 training has no loss scaling. Frozen float16 weights (a LoRA base, a reference) are fine."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
    if trainable:
        raise ConfigError(
            f"model.dtype={config.model.dtype} would train {len(trainable)} float16 parameters (first:"
            f" {trainable[0]}) with AdamW, whose state underflows in float16 (the first step makes every weight"
            " NaN). Use model.dtype=float32 with optim.mixed_precision=fp16 (float32 weights and optimizer state,"
            " float16 compute with loss scaling), or model.dtype=bfloat16, or LoRA (lora.enabled=true: the"
            " adapters train in float32 on the float16 base)"
        )


def _check_lora_targets(model, targets: list[str]) -> None:
    """Every name in lora.target_modules must name a module of the model (as peft matches it: the full
    name or its last parts), checked before any training; peft fails only when no name matches."""
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise ConfigError(
            f"lora.target_modules: {missing} name no module of {type(model).__name__}; its linear modules"
            f" are {linear} (lm_head cannot be adapted)"
        )


def _apply_lora(model, config: TrainConfig):
    from peft import LoraConfig, get_peft_model

    lora = config.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def _scheduler(optimizer, config: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(config.optim.scheduler, config.optim.scheduler)
    return get_scheduler(
        name, optimizer, num_warmup_steps=config.optim.warmup_steps, num_training_steps=max(total_steps, 1)
    )


def _make_reference(
    config, policy, dataset, collate, accelerator, objective, split_rows, data_set: str = "train"
) -> Reference:
    """The reference for `dataset`; data_set ("train" or "eval") names the data (data.train or eval.data)
    and, with reference.mode=cache, the cache folder (reference_cache/, reference_cache_eval/)."""
    mode = config.reference_mode()
    if mode == "adapter":
        return AdapterReference(policy, split_rows=split_rows)
    if mode == "copy":
        if config.reference.path:
            ref = load_causal_lm(config.reference.path, config.model, config.reference.revision)
        else:
            ref = copy.deepcopy(policy)
        disable_dropout(ref)
        return ModelReference(ref.to(accelerator.device))
    # cache: one pass with a frozen reference on the main process, then every process memory-maps it.
    folder = Path(config.output_dir) / ("reference_cache" if data_set == "train" else "reference_cache_eval")
    store_hidden = objective.needs_reference_distribution
    if data_set == "eval":
        key = {
            **_cache_key(config, len(dataset), store_hidden, *config.eval_source()),
            "split": config.eval.split,
        }
    else:
        key = _cache_key(
            config, len(dataset), store_hidden, config.data.train, config.data.subset, config.data.revision
        )
    if accelerator.is_main_process:
        if _cached_key(folder) != key:  # absent, or built from another model / data / setting: rebuild
            ref = (
                load_causal_lm(config.reference.path, config.model, config.reference.revision)
                if config.reference.path
                else policy
            )
            ref = ref.to(accelerator.device)
            was_training = ref.training
            build_reference_cache(
                ref,
                dataset,
                collate,
                folder,
                store_hidden=store_hidden,
                hidden_dtype=getattr(torch, config.reference.cache_dtype),
                batch_size=config.optim.batch_size,
                chunk_size=config.optim.chunk_size,
                device=accelerator.device,
                progress=config.logging.progress,
                key=key,
            )
            ref.train(was_training)
            del ref
    try:
        accelerator.wait_for_everyone()
    except RuntimeError as exc:  # torch.distributed.DistBackendError included
        if "timed out" not in str(exc).lower() and "timeout" not in str(exc).lower():
            raise
        raise ConfigError(
            f"process {accelerator.process_index} waited more than distributed.timeout_s="
            f"{config.distributed.timeout_s} s for the main process to build the reference cache: raise"
            " distributed.timeout_s (the cache pass takes about one reference forward per pair)"
        ) from exc
    return CachedReference(folder, device=accelerator.device)


def _cache_key(
    config: TrainConfig,
    pairs: int,
    store_hidden: bool,
    data: str,
    subset: str | None,
    data_revision: str | None,
) -> dict[str, Any]:
    """What the reference cache of the pairs in `data` (data.train or eval.data, read at subset and
    data_revision) depends on; a cache whose key differs is stale and rebuilt. Hub models and data sets are
    named by id and commit (`tether.hub.identity`), local ones by their resolved path."""
    if config.reference.path:
        reference, revision, adapter = config.reference.path, config.reference.revision, None
    else:  # the initial policy: the base, with the loaded adapter if any
        (reference, revision), adapter = hub.base_model(config.model), config.model.adapter
    tokenizer, tokenizer_revision = hub.tokenizer_source(config.model)
    return json.loads(
        json.dumps(
            {
                # 2: caches record and apply the model's head transform (logit scale, soft-cap); a cache
                # written before it holds wrong log-probs for such models and is rebuilt.
                # 3: caches hold the reference's summed token entropy per response (an entropy target's
                # fraction reads it).
                "format": 3,
                "reference": hub.identity(reference, revision),
                "weights": _stamps(Path(hub.local_path(reference, revision)), "*.safetensors"),
                "adapter": hub.identity(adapter),
                "adapter_weights": _stamps(Path(hub.local_path(adapter)), "*.safetensors") if adapter else [],
                "load_in_4bit": config.model.load_in_4bit,
                "tokenizer": hub.identity(tokenizer, tokenizer_revision),
                "data": hub.identity(data, data_revision, "dataset"),
                "data_stamp": _stamps(Path(hub.local_path(data, data_revision, "dataset")), "*"),
                "data_subset": subset,
                "max_length": config.data.max_length,
                "max_prompt_length": config.data.max_prompt_length,
                "model_dtype": config.model.dtype,
                "pairs": pairs,
                "hidden": store_hidden,
                "hidden_dtype": config.reference.cache_dtype,
            }
        )
    )


def _stamps(path: Path, pattern: str) -> list[list[Any]]:
    """(name, size, mtime_ns) of a file, or of the files matching pattern in a folder: changes when they do."""
    files = sorted(path.glob(pattern)) if path.is_dir() else [path]
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]


def _cached_key(folder: Path) -> dict[str, Any] | None:
    meta = folder / "meta.json"
    return json.loads(meta.read_text()).get("key") if meta.is_file() else None


# --- the loop ------------------------------------------------------------------------------------------


def train(config: TrainConfig, resume: bool = False) -> TrainResult:
    """Train a policy on preference pairs as configured; see the module docstring for the invariants."""
    # optim.deterministic switches a process-wide torch flag: put it back afterwards for the caller.
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        return _train(config, resume)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _train(config: TrainConfig, resume: bool) -> TrainResult:
    from tqdm.auto import tqdm

    from tether.data import PreferenceCollator

    # --- setup: checks first, then data, policy and reference, optimizer, resumed state
    config.validate(check_paths=True)
    objective = config.build_objective()
    out_dir = Path(config.output_dir)
    accelerator, engine = _setup_accelerator(config)
    main = accelerator.is_main_process
    data_hash = data_digest(config.data.train, config.data.split, config.data.revision)
    fingerprint = config_fingerprint(config, processes=accelerator.num_processes, data_digest=data_hash)
    start = _resume_point(config, resume, fingerprint, main)  # before anything heavy is loaded

    tokenizer = load_tokenizer(config.model)
    dataset, report = _read_pairs(
        config,
        tokenizer,
        main,
        config.data.train,
        split=config.data.split,
        subset=config.data.subset,
        revision=config.data.revision,
    )
    global_batch = config.optim.batch_size * config.optim.grad_accum * accelerator.num_processes
    total_steps = config.optim.max_steps or math.ceil(len(dataset) / global_batch) * config.optim.epochs
    if _check_resume_length(config, resume, start, total_steps, main):  # final/ already holds the last step
        skipped = int(start.finished.get("skipped_steps", 0))
        return TrainResult(out_dir, total_steps, out_dir / "final", [], skipped, main)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "config.yaml")
        print(report.format_table())
        report.write_json(out_dir / "data_report.json")
    if len(dataset) == 0:
        raise ValueError(f"no usable preference pairs in {config.data.train} (see the data report above)")
    eval_dataset = _load_eval_data(config, tokenizer, main) if config.evaluates() else None
    collate = PreferenceCollator(tokenizer.pad_token_id)

    policy, reference, eval_reference = _setup_policy(
        config, accelerator, engine, objective, dataset, collate, eval_dataset
    )
    if objective.needs_reference_entropy and not _restores_objective(start):
        objective.set_reference_entropy(_reference_entropy(config, accelerator, reference, dataset, collate))
        if main:
            print(
                "[tether] the reference's per-token entropy on the training responses:"
                f" {objective.reference_entropy:.4f} nats; entropy target {objective.target:.4f}"
            )
    model, optimizer, scheduler = _setup_optimizer(config, accelerator, engine, policy, total_steps)
    state = _restore(accelerator, start, objective)
    if main:
        # Lines after the start step belong to an attempt that did not reach a checkpoint (all of them on a
        # fresh start, the step-0 evaluation included): drop them so that every step appears once.
        _truncate_metrics(out_dir / "metrics.jsonl", start.step if start.checkpoint else -1)
    if config.logging.trackers:
        accelerator.init_trackers("tether", config=_flat(config.to_dict()))
    bar = tqdm(
        total=total_steps,
        initial=start.step,
        desc=f"train {objective.name}",
        disable=not (config.logging.progress and main),
        unit="step",
    )
    run = _Run(
        config=config,
        accelerator=accelerator,
        engine=engine,
        objective=objective,
        dataset=dataset,
        collate=collate,
        tokenizer=tokenizer,
        model=model,
        reference=reference,
        optimizer=optimizer,
        scheduler=scheduler,
        request=stat_request(objective, entropy=config.logging.entropy),
        global_batch=global_batch,
        total_steps=total_steps,
        fingerprint=fingerprint,
        bar=bar,
        skipped_steps=int(state.get("skipped_steps", 0)),
        num_tokens=int(state.get("num_tokens", 0)),
        window=list(state.get("log_window", [])),
        eval_dataset=eval_dataset,
        eval_reference=eval_reference,
    )

    # --- the loop: one optimizer step, its record, the log (the window's means), the evaluation when due,
    # a checkpoint every checkpoint.every steps (after the evaluation of its step: a resume keeps both)
    history: list[dict[str, Any]] = []
    evaluations: list[dict[str, Any]] = []
    model.train()
    if config.evaluates() and config.eval.at_start and start.step == 0:
        evaluations.append(_evaluate(run, 0))
    for step in range(start.step, total_steps):
        record = _train_step(run, step)
        history.append(record)
        logged = _close_window(run, record)
        if main:
            _log(run, record, logged)
        steps_done = step + 1
        if _eval_due(run, steps_done):
            evaluations.append(_evaluate(run, steps_done))
        if config.checkpoint.every and steps_done % config.checkpoint.every == 0 and steps_done < total_steps:
            _write_checkpoint(run, steps_done)
    bar.close()

    # --- the end: the final model
    _write_final(run)
    if config.logging.trackers:
        accelerator.end_training()
    return TrainResult(out_dir, total_steps, out_dir / "final", history, run.skipped_steps, main, evaluations)


@dataclass
class ResumePoint:
    """Where a run starts: step 0, or the newest complete checkpoint of the run it resumes."""

    step: int = 0
    checkpoint: Path | None = None  # the checkpoint folder it continues from
    state: dict[str, Any] | None = None  # that checkpoint's state.json
    changed: list[str] = field(
        default_factory=list
    )  # fingerprint fields changed since the run's newest record
    finished: dict[str, Any] | None = None  # final/'s record (`FINISHED_RECORD`), if the run has one


@dataclass
class _Run:
    """What the step loop works with, built once by `_train`'s setup stages."""

    config: TrainConfig
    accelerator: Any
    engine: str  # `_engine`
    objective: Objective
    dataset: Any  # a `tether.data` PreferenceDataset
    collate: Any  # PreferenceCollator
    tokenizer: Any
    model: Any  # the prepared PolicyStatistics (wrapped by DDP, FSDP or DeepSpeed)
    reference: Reference
    optimizer: torch.optim.Optimizer
    scheduler: Any
    request: StatRequest
    global_batch: int  # pairs per optimizer step: batch_size * grad_accum * processes
    total_steps: int
    fingerprint: dict[str, Any]
    bar: Any  # the tqdm progress bar
    skipped_steps: int = (
        0  # steps skipped for a non-finite loss or gradient, this run and the ones it resumes
    )
    num_tokens: int = 0  # non-padding tokens (prompts and responses) of every step so far (TRL's num_tokens)
    window: list[dict[str, Any]] = field(default_factory=list)  # step records since the last logged one
    state_keys: set[str] = field(default_factory=set)  # record keys the window logs as their last value
    eval_dataset: Any = None  # held-out pairs (eval.data), or None
    eval_reference: Reference | None = None  # their reference (a separate cache with reference.mode=cache)

    @property
    def out_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"


# --- setup stages --------------------------------------------------------------------------------------


def _setup_accelerator(config: TrainConfig):
    """(accelerate's Accelerator, its engine: `_engine`), the DeepSpeed config filled in, the seed set."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    accelerator = Accelerator(
        mixed_precision=config.optim.mixed_precision,
        log_with=config.logging.trackers or None,
        project_dir=str(config.output_dir),
        # Without cpu=True, accelerate ignores a torchrun launch on a machine with no GPU: every process
        # would train alone on the whole data.
        cpu=not _has_accelerator(),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.distributed.timeout_s))],
    )
    engine = _engine(accelerator)
    if engine in ("deepspeed", "zero3"):
        _configure_deepspeed(accelerator.state.deepspeed_plugin, config, zero3=engine == "zero3")
    world = accelerator.num_processes
    if int(os.environ.get("WORLD_SIZE", world)) != world:  # (mpirun sets no WORLD_SIZE: nothing to compare)
        raise RuntimeError(
            f"launched as {os.environ['WORLD_SIZE']} processes (WORLD_SIZE) but accelerate runs {world}:"
            " check the launcher"
        )
    if config.optim.deterministic:
        torch.use_deterministic_algorithms(True)
    set_seed(config.optim.seed)
    return accelerator, engine


def _resume_point(config: TrainConfig, resume: bool, fingerprint: dict[str, Any], main: bool) -> ResumePoint:
    """Where the run starts. A fresh run refuses a folder holding checkpoints or a final model; --resume
    refuses a run whose fingerprint changed in a way `tether.config.RESUME_ACCEPTED` does not accept (unless
    checkpoint.allow_changed_config) and prints the accepted changes."""
    out_dir = Path(config.output_dir)
    ckpt_dir, final = out_dir / "checkpoints", out_dir / "final"
    found = complete_checkpoints(ckpt_dir)
    if not resume:
        if found:
            raise ConfigError(
                f"output_dir {out_dir} already holds checkpoints; pass --resume to continue that run or choose"
                " another output_dir"
            )
        if final.exists():
            raise ConfigError(
                f"output_dir {out_dir} already holds a final model (final/); pass --resume to continue that run"
                " (a finished run is left as it is) or choose another output_dir"
            )
        return ResumePoint()
    start = ResumePoint(finished=_finished_record(final))  # how far the run's final model got, if it has one
    if found:
        start.checkpoint = found[-1]
        start.state = json.loads((start.checkpoint / "state.json").read_text())
        start.step = int(start.state["step"])
    # Compared with the newest record of the run: the final model's, or else the last checkpoint's.
    finished = start.finished
    newest = finished if finished is not None and finished["step"] >= start.step else start.state
    if newest is not None:
        refused, accepted = resume_changes(newest["fingerprint"], fingerprint)
        start.changed = refused + accepted
        if refused and not config.checkpoint.allow_changed_config:
            trajectory = [key for key in refused if key in _TRAJECTORY_FIELDS]
            raise ConfigError(
                f"refusing to resume from {start.checkpoint if newest is start.state else final}: changed since"
                f" it was written: {_changes(refused, newest['fingerprint'], fingerprint)}; restore them, or"
                " set checkpoint.allow_changed_config=true to resume anyway"
                + (
                    f" ({', '.join(trajectory)} would change every step from here on: the result would"
                    " match no uninterrupted run)"
                    if trajectory
                    else ""
                )
            )
        if start.changed and main:
            print(
                f"[tether] --resume with changes: {_changes(start.changed, newest['fingerprint'], fingerprint)}"
            )
    return start


def _read_pairs(
    config: TrainConfig,
    tokenizer,
    main: bool,
    source: str,
    split: str,
    subset: str | None = None,
    revision: str | None = None,
):
    """`load_preference_data` of `source` with data's truncation and bad-row policy, a progress bar on the
    main process: (dataset, report). data.train and eval.data are both read with it."""
    from tether.data import load_preference_data

    return load_preference_data(
        source,
        tokenizer,
        max_length=config.data.max_length,
        max_prompt_length=config.data.max_prompt_length,
        on_bad_row=config.data.on_bad_row,
        split=split,
        subset=subset,
        revision=revision,
        progress=config.logging.progress and main,
    )


def _check_resume_length(
    config: TrainConfig, resume: bool, start: ResumePoint, total_steps: int, main: bool
) -> bool:
    """True if --resume finds the run complete (final/ holds step total_steps): nothing to do. Refuses a run
    resumed beyond its configured length."""
    out_dir = Path(config.output_dir)
    if resume and start.finished is not None:
        if start.finished["step"] == total_steps:
            if main:
                print(
                    f"[tether] the run in {out_dir} is complete: final/ holds step {total_steps} of"
                    f" {total_steps}; nothing to do (raise optim.max_steps or optim.epochs to train on)"
                )
            return True
        if start.finished["step"] > total_steps:
            raise ConfigError(
                f"output_dir {out_dir} holds a final model of step {start.finished['step']}, beyond the"
                f" {total_steps} steps now configured (optim.max_steps / optim.epochs); a run cannot be shortened"
                " by resuming: choose another output_dir"
            )
    if resume and start.checkpoint is None and main:
        print(f"[tether] --resume: no complete checkpoint in {out_dir / 'checkpoints'}; starting from step 0")
    if start.step > total_steps:
        raise ConfigError(
            f"cannot resume from {start.checkpoint}: its step {start.step} is beyond the {total_steps} steps now"
            " configured (optim.max_steps / optim.epochs)"
        )
    if (
        main
        and resume
        and config.optim.scheduler != "constant"
        and any(key in ("optim.max_steps", "optim.epochs") for key in start.changed)
    ):
        print(f"[tether] the {config.optim.scheduler} learning-rate schedule now spans {total_steps} steps")
    return False


def _setup_policy(
    config: TrainConfig, accelerator, engine: str, objective: Objective, dataset, collate, eval_dataset=None
) -> tuple[PolicyStatistics, Reference, Reference | None]:
    """The policy (dropout off, LoRA applied, on its device unless sharded), its reference and the eval set's
    reference (None without eval data): the same one, or with reference.mode=cache the eval pairs' own cache,
    built here from the initial weights as the training cache is."""
    sharded = engine in ("fsdp", "zero3")  # parameters sharded across processes
    if sharded and config.model.load_in_4bit:
        raise ConfigError(
            "model.load_in_4bit=true is not supported with FSDP or DeepSpeed ZeRO-3 (sharded 4-bit weights need"
            " a quantized storage dtype tether does not set up): run it with DDP or one process"
        )
    model = _load_policy(config, prepare=True)
    _refuse_float16_training(model, config)
    if not sharded and not config.model.load_in_4bit:  # FSDP, ZeRO-3 and 4-bit loading place the weights
        model.to(accelerator.device)
    # Sharded layers run once per forward: no split by row length (`final_hidden_states`).
    reference = _make_reference(config, model, dataset, collate, accelerator, objective, not sharded)
    eval_reference = None
    if eval_dataset is not None:
        eval_reference = reference
        if config.reference_mode() == "cache":
            eval_reference = _make_reference(
                config, model, eval_dataset, collate, accelerator, objective, not sharded, data_set="eval"
            )
    policy = PolicyStatistics(model, split_rows=not sharded)
    if engine == "zero3":
        _register_head_with_zero3(policy)
    return policy, reference, eval_reference


def _load_policy(config: TrainConfig, prepare: bool = False):
    """The initial policy: the base model (4-bit for QLoRA) with the loaded adapter, or new LoRA adapters, or
    neither. prepare: also turn dropout off and set up gradient checkpointing (training, not re-loading)."""
    path, revision = hub.base_model(config.model)
    model = load_causal_lm(path, config.model, revision)
    if prepare:
        disable_dropout(model)
        if config.model.load_in_4bit:
            model = prepare_four_bit(model, config.model.gradient_checkpointing)
        elif config.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.model.adapter is not None:
        model = load_adapter(model, config.model.adapter)
        if prepare:
            disable_dropout(model)  # the adapter's own lora_dropout
    elif config.lora.enabled:
        _check_lora_targets(model, config.lora.target_modules)
        model = _apply_lora(model, config)
    return model


def _setup_optimizer(
    config: TrainConfig, accelerator, engine: str, policy: PolicyStatistics, total_steps: int
):
    """(the prepared model, AdamW, the learning-rate schedule); the schedule is checkpointed with the run."""
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=config.optim.lr,
        betas=(config.optim.adam_beta1, config.optim.adam_beta2),
        eps=config.optim.adam_eps,
        weight_decay=config.optim.weight_decay,
        fused=_fused_adamw(trainable, engine) or None,
    )
    scheduler = _scheduler(optimizer, config, total_steps)
    model, optimizer = accelerator.prepare(policy, optimizer)  # FSDP replaces the parameters
    if engine == "fsdp":
        require_head_in_root_unit(model, accelerator.unwrap_model(model).causal_lm.get_output_embeddings())
    accelerator.register_for_checkpointing(scheduler)
    return model, optimizer, scheduler


def _fused_adamw(params: list[torch.Tensor], engine: str) -> bool:
    """Use torch's fused AdamW kernel (the same update in one kernel per device and dtype: on CPU the
    per-parameter loop's sqrt/div/addcdiv passes were about 6% of a DPO step) when the parameters stay
    whole, plain tensors on CPU or CUDA: the plain engine (one process or DDP). FSDP's and DeepSpeed's
    parameters are theirs to manage, so they keep torch's default implementation."""
    return engine == "plain" and all(
        p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES and type(p) is torch.nn.Parameter
        for p in params
    )


_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _reference_entropy(config: TrainConfig, accelerator, reference: Reference, dataset, collate) -> float:
    """The reference's token-mean next-token entropy over every response token (chosen and rejected) of the
    training pairs: one reference pass before training (read from a reference cache), each process taking
    pairs rank, rank + W, ..., the sums added over processes (every process gets the same value)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    sums = reference.entropy_sums(
        dataset,
        collate,
        list(range(rank, len(dataset), world)),
        batch_size=config.optim.batch_size,
        chunk_size=config.optim.chunk_size,
        device=accelerator.device,
    )
    total, tokens = accelerator.reduce(sums.to(accelerator.device), reduction="sum").tolist()
    return total / tokens


def _restores_objective(start: ResumePoint) -> bool:
    """True when `_restore` will load the objective's state from the checkpoint (the objective unchanged)."""
    return start.checkpoint is not None and not any(key.startswith("objective.") for key in start.changed)


def _restore(accelerator, start: ResumePoint, objective: Objective) -> dict[str, Any]:
    """Load the checkpoint `start` continues from, if any (weights, optimizer, schedule, RNG, the objective's
    state); returns its state.json (skipped_steps, num_tokens, log_window), or {} for a fresh start."""
    if start.checkpoint is None:
        return {}
    accelerator.load_state(str(start.checkpoint))
    if _restores_objective(start):
        objective.load_state_dict(start.state["objective"])
    elif accelerator.is_main_process:  # (allow_changed_config) the old objective's state does not apply
        print("[tether] the objective changed: its state (e.g. epsilon-DPO's beta) starts from the config")
    if accelerator.is_main_process:
        print(f"[tether] resumed from {start.checkpoint} at step {start.step}")
    return start.state


# --- one optimizer step --------------------------------------------------------------------------------


@dataclass
class _StepSums:
    """One optimizer step's sums on this process, over its micro-batches."""

    metrics: dict[str, torch.Tensor]  # the objective's metrics, each times the micro-batch's pairs
    pair_count: torch.Tensor  # pairs counted (a zero-weight filler counts none), 0-dim
    tokens: int  # response tokens of the counted pairs
    input_tokens: int  # non-padding tokens (prompts and responses, both sides) of the counted pairs
    beta_steps: torch.Tensor  # sum of ObjectiveOutput.beta_steps over the counted pairs, float64 0-dim
    entropy: torch.Tensor  # (summed policy entropy, tokens) of the counted pairs' responses, float64 (2,)
    nonfinite: torch.Tensor  # micro-batches with a non-finite loss, 0-dim
    bad_rows: list[int]  # data rows whose loss was non-finite

    @classmethod
    def zeros(cls, device) -> _StepSums:
        return cls(
            metrics={},
            pair_count=torch.zeros((), device=device),
            tokens=0,
            input_tokens=0,
            beta_steps=torch.zeros((), dtype=torch.float64, device=device),
            entropy=torch.zeros(2, dtype=torch.float64, device=device),
            nonfinite=torch.zeros((), device=device),
            bad_rows=[],
        )

    def add(self, out, batch, pairs: int, weight: float, stats: PairStats | None = None) -> None:
        """Add a micro-batch's metrics (objective output `out` of `pairs` pairs in `batch`), each times its pairs,
        and the policy's summed response entropy when `stats` carries it.

        A zero-weight filler still adds (zeros to) every metric: the tensors reduced across processes in
        `_reduce_metrics` must have the same size on every process, or gloo/NCCL fail or hang."""
        counted = float(pairs) if weight else 0.0
        self.pair_count += counted
        for name, value in out.metrics.items():
            value = value.detach().float()
            self.metrics[name] = self.metrics.get(name, 0.0) + (
                value * counted if weight else torch.zeros_like(value)
            )
        if weight:
            self.tokens += batch.num_response_tokens()
            self.input_tokens += int(batch.attention_mask.sum())
            if out.beta_steps is not None:
                self.beta_steps += out.beta_steps.detach().double().sum()
            if stats is not None and stats.entropy_chosen is not None:
                self.entropy[0] += stats.entropy_chosen.double().sum() + stats.entropy_rejected.double().sum()
                self.entropy[1] += float(stats.chosen_lengths.sum() + stats.rejected_lengths.sum())


def _train_step(run: _Run, step: int) -> dict[str, Any]:
    """Optimizer step `step` (0-based): every micro-batch's forward and backward, then the update, or for a
    non-finite loss or gradient a skip (optim.on_nonfinite=skip: counted in run.skipped_steps) or
    NonFiniteError. Returns the step's record, reduced over processes."""
    config, accelerator = run.config, run.accelerator
    t0 = time.perf_counter()
    epoch, pairs = step_pairs(
        len(run.dataset), run.global_batch, step, config.optim.seed, config.data.shuffle
    )
    sums = _accumulate_gradients(run, pairs)
    learning_rate = run.scheduler.get_last_lr()[0]  # the rate this step uses (what TRL logs)
    # Every process agrees on a non-finite step: the flag is summed over processes.
    bad = accelerator.reduce(sums.nonfinite, reduction="sum")
    # All parameters (frozen ones have no gradient): accelerate's FSDP clipping needs the model's list.
    # Without clipping, max_norm=inf still gives the global norm (sharded gradients included) and scales
    # every gradient by exactly 1.
    grad_norm = accelerator.clip_grad_norm_(
        list(run.model.parameters()),
        float("inf") if config.optim.max_grad_norm is None else config.optim.max_grad_norm,
    )
    # fp16's loss scaler skips overflowing steps itself; elsewhere a non-finite gradient is an error.
    # (DeepSpeed reports no norm where it computed none.)
    finite_norm = grad_norm is None or torch.isfinite(torch.as_tensor(grad_norm)).all()
    if config.optim.mixed_precision != "fp16" and not finite_norm:
        bad = bad + 1
    if float(bad) > 0:
        if config.optim.on_nonfinite == "error":
            raise NonFiniteError(
                f"non-finite loss or gradient at step {step + 1} (epoch {epoch}); rows on this process:"
                f" {sums.bad_rows or 'none (another process or the gradient)'}; set optim.on_nonfinite=skip to"
                " skip such steps"
            )
        run.optimizer.zero_grad(set_to_none=True)
        run.skipped_steps += 1
        if accelerator.is_main_process:
            run.bar.write(
                f"[tether] step {step + 1}: non-finite loss/gradient, step skipped ({run.skipped_steps} so far)"
            )
        mean_beta_step = token_entropy = None
    else:
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)

        def mean_beta_step() -> float:
            return float(accelerator.reduce(sums.beta_steps, reduction="sum")) / len(pairs)

        def token_entropy() -> float:
            total, tokens = accelerator.reduce(sums.entropy, reduction="sum").tolist()
            if tokens == 0:
                raise RuntimeError("the objective asked for the step's entropy, which was not computed")
            return total / tokens

    objective_metrics = run.objective.after_step(mean_beta_step, token_entropy)
    run.state_keys.update(objective_metrics)
    means, counted, tokens, input_tokens = _reduce_metrics(accelerator, sums)
    run.num_tokens += input_tokens
    return {
        "step": step + 1,
        "epoch": epoch,
        **means,
        "learning_rate": learning_rate,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "pairs": counted,
        "tokens": tokens,
        "num_tokens": run.num_tokens,
        "step_time_s": time.perf_counter() - t0,
        "skipped_steps": run.skipped_steps,
        **objective_metrics,
    }


def _accumulate_gradients(run: _Run, pairs: list[int]) -> _StepSums:
    """Forward and backward of this process's micro-batches of one optimizer step's pairs (see the module
    docstring for who takes which pairs and how the loss is scaled); gradients sync on the last one only."""
    accelerator, world, b = run.accelerator, run.accelerator.num_processes, run.config.optim.batch_size
    rank, n_step = accelerator.process_index, len(pairs)
    num_micro = math.ceil(n_step / (b * world))
    device = accelerator.device
    sums = _StepSums.zeros(device)
    for j in range(num_micro):
        indices = pairs[(j * world + rank) * b : (j * world + rank + 1) * b]
        weight = 1.0
        if not indices:  # this process has no pair left in the step: run one with weight 0
            indices, weight = pairs[:1], 0.0
        batch = run.collate([run.dataset[i] for i in indices]).to(device)
        sync = j == num_micro - 1
        # DeepSpeed takes the accumulation boundary from sync_gradients (it steps in the last backward);
        # DDP and FSDP skip the gradient all-reduce of the other micro-batches through no_sync.
        accelerator.sync_gradients = sync
        skip_sync = not sync and world > 1 and run.engine in ("plain", "fsdp")
        with accelerator.no_sync(run.model) if skip_sync else contextlib.nullcontext():
            with accelerator.autocast():
                stats = PairStats(
                    **run.model(run.reference, batch, indices, run.request, run.config.optim.chunk_size)
                )
                out = run.objective(stats)
            loss = out.losses.sum() * (weight * world / n_step)
            finite = torch.isfinite(out.losses.detach())
            if not finite.all():
                sums.nonfinite += 1
                sums.bad_rows.extend(
                    run.dataset[i].row_number for i, ok in zip(indices, finite.tolist()) if not ok
                )
            accelerator.backward(loss)
        sums.add(out, batch, len(indices), weight, stats)
    return sums


def _reduce_metrics(accelerator, sums: _StepSums) -> tuple[dict[str, float], int, int, int]:
    """(pair-weighted means of the objective's metrics over micro-batches and processes, pairs, response
    tokens, non-padding tokens)."""
    names = sorted(sums.metrics)
    local = sums.pair_count
    packed = torch.stack([sums.metrics[name] for name in names] + [local.float()]) if names else local[None]
    packed = accelerator.reduce(packed, reduction="sum")
    count = float(packed[-1])
    means = {name: float(packed[i]) / max(count, 1.0) for i, name in enumerate(names)}
    counts = torch.tensor([sums.tokens, sums.input_tokens], device=accelerator.device)
    tokens, input_tokens = (int(v) for v in accelerator.reduce(counts, "sum"))
    return means, int(count), tokens, input_tokens


# --- evaluation ----------------------------------------------------------------------------------------


def _load_eval_data(config: TrainConfig, tokenizer, main: bool):
    """The held-out pairs of eval.data, read as data.train is (`_read_pairs`; `TrainConfig.eval_source`);
    their report is printed and written to eval_data_report.json."""
    data, subset, revision = config.eval_source()
    dataset, report = _read_pairs(
        config, tokenizer, main, data, split=config.eval.split, subset=subset, revision=revision
    )
    if main:
        print(report.format_table())
        report.write_json(Path(config.output_dir) / "eval_data_report.json")
    if len(dataset) == 0:
        raise ValueError(
            f"no usable preference pairs in eval.data {config.eval.data} (see the data report above)"
        )
    return dataset


def _eval_due(run: _Run, steps_done: int) -> bool:
    """Whether the eval set is evaluated after optimizer step `steps_done` (every eval.every steps, at the end
    of every epoch with eval.per_epoch, after the last step with eval.at_end; at most once per step)."""
    ev = run.config.eval
    if not run.config.evaluates():
        return False
    steps_per_epoch = math.ceil(len(run.dataset) / run.global_batch)
    return bool(
        (ev.every and steps_done % ev.every == 0)
        or (ev.per_epoch and steps_done % steps_per_epoch == 0)
        or (ev.at_end and steps_done == run.total_steps)
    )


def _evaluate(run: _Run, step: int) -> dict[str, Any]:
    """The eval record after `step` optimizer steps: the objective's metrics on every eval pair, with the
    policy in eval mode and no gradient, under TRL's names (`eval_loss`, `eval_rewards/margins`, ...).

    The statistics are the training step's (`_StepSums.add`, `_reduce_metrics`): pair-weighted means over
    the whole eval set. Micro-batch j of process r holds eval pairs [(j*W + r)*b, (j*W + r + 1)*b); a process
    with none left runs a zero-weight filler, so that every process runs the same forwards (DDP, FSDP and
    DeepSpeed communicate in them). The objective's state (epsilon-DPO's base beta) is read, never changed.
    The main process appends the record to metrics.jsonl and sends it to the trackers."""
    accelerator, world = run.accelerator, run.accelerator.num_processes
    rank, n = accelerator.process_index, len(run.eval_dataset)
    b = run.config.eval.batch_size or run.config.optim.batch_size
    t0 = time.perf_counter()
    sums = _StepSums.zeros(accelerator.device)
    run.model.eval()
    try:
        with torch.no_grad():
            for j in range(math.ceil(n / (b * world))):
                indices = list(range((j * world + rank) * b, min((j * world + rank + 1) * b, n)))
                weight = 1.0
                if not indices:
                    indices, weight = [0], 0.0
                batch = run.collate([run.eval_dataset[i] for i in indices]).to(accelerator.device)
                with accelerator.autocast():
                    stats = PairStats(
                        **run.model(
                            run.eval_reference, batch, indices, run.request, run.config.optim.chunk_size
                        )
                    )
                    out = run.objective(stats)
                sums.add(out, batch, len(indices), weight)
    finally:
        run.model.train()
    means, counted, tokens, _ = _reduce_metrics(accelerator, sums)
    record = {
        "step": step,
        "split": "eval",
        **{f"eval_{name}": value for name, value in means.items()},
        "eval_pairs": counted,
        "eval_tokens": tokens,
        "eval_runtime": time.perf_counter() - t0,
    }
    if accelerator.is_main_process:
        _append_metrics(run, record, f"the evaluation of step {step}")
    if accelerator.is_main_process and run.config.logging.progress:
        shown = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")
        run.bar.write(
            f"[tether] step {step}: " + ", ".join(f"{k} {record.get(k, float('nan')):.4f}" for k in shown)
        )
    return record


# --- logging and checkpoints ---------------------------------------------------------------------------


# Record keys the logging window reports as their value at its last step (TRL logs these so), or summed over
# it; every other key is the mean of the window's finite values (TRL's logging_nan_inf_filter).
_WINDOW_LAST = frozenset({"step", "epoch", "learning_rate", "grad_norm", "num_tokens", "skipped_steps"})
_WINDOW_SUM = frozenset({"pairs", "tokens"})


def _close_window(run: _Run, record: dict[str, Any]) -> dict[str, Any] | None:
    """Add the step's record to the logging window; at a logging step (every logging.every steps, and the
    last) return the window's record (`window_record`) and start a new window, else None. The window is
    checkpointed (state.json's log_window), so a resumed run logs what the uninterrupted run logs."""
    run.window.append(record)
    done = record["step"]
    if done % run.config.logging.every and done != run.total_steps:
        return None
    logged = window_record(run.window, last=_WINDOW_LAST | run.state_keys)
    run.window = []
    return logged


def window_record(
    records: list[dict[str, Any]], last: frozenset[str] | set[str] = _WINDOW_LAST
) -> dict[str, Any]:
    """One logged record for the step records of a logging window, as TRL logs `logging_steps` > 1: each
    metric is the mean over the window's steps of its finite values (a skipped step's NaN loss is left out;
    NaN if none is finite); the keys in `last` hold the last step's value (learning_rate, grad_norm,
    num_tokens, ...); pairs and tokens are summed."""
    out: dict[str, Any] = {}
    for key in records[-1]:
        values = [r.get(key) for r in records]
        if key in last or not all(isinstance(v, (int, float)) or v is None for v in values):
            out[key] = values[-1]
        elif key in _WINDOW_SUM:
            out[key] = sum(v for v in values if v is not None)
        else:
            finite = [float(v) for v in values if v is not None and math.isfinite(v)]
            out[key] = sum(finite) / len(finite) if finite else float("nan")
    return out


def _append_metrics(run: _Run, record: dict[str, Any], what: str) -> None:
    """(Main process) append a record to metrics.jsonl (strict JSON) and send its numbers to the trackers."""
    path = run.out_dir / "metrics.jsonl"
    with _explain_write_failure(what, path, run.ckpt_dir), open(path, "a") as fh:
        fh.write(json.dumps(_strict_json(record), allow_nan=False) + "\n")
    if run.config.logging.trackers:
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        run.accelerator.log(numbers, step=record["step"])


def _log(run: _Run, record: dict[str, Any], logged: dict[str, Any] | None) -> None:
    """(Main process) at a logging step (`logged`: the window's record): append it to metrics.jsonl and send
    it to the trackers; always: update the progress bar with the step's record."""
    if logged is not None:
        _append_metrics(run, logged, f"the metrics of step {logged['step']}")
    run.bar.set_postfix(
        loss=f"{record.get('loss', float('nan')):.4f}",
        margin=f"{record.get('rewards/margins', 0.0):.3f}",
    )
    run.bar.update(1)


def _write_checkpoint(run: _Run, steps_done: int) -> None:
    """Checkpoint `step-{steps_done}` (all processes take part); a failed write becomes a RunWriteError."""
    state = {
        "step": steps_done,
        "objective": run.objective.state_dict(),
        "skipped_steps": run.skipped_steps,
        "fingerprint": run.fingerprint,
        "num_tokens": run.num_tokens,
        "log_window": run.window,  # steps since the last logged one: the next logged record averages them too
    }
    staging = run.ckpt_dir / f"step-{steps_done:08d}.partial"
    with _explain_write_failure(f"checkpoint step {steps_done}", staging, run.ckpt_dir):
        _save_checkpoint(
            run.accelerator,
            run.ckpt_dir,
            steps_done,
            state,
            run.config.checkpoint.keep_last,
            run.model,
            run.tokenizer,
            loadable=run.engine == "plain",
        )


def _write_final(run: _Run) -> None:
    """The final model into final/ (refused if a weight is non-finite), then its `FINISHED_RECORD`."""
    accelerator, final = run.accelerator, run.out_dir / "final"
    accelerator.wait_for_everyone()
    require_finite_weights(accelerator, run.model, "the final model", run.ckpt_dir)
    # Sharded: every process takes part in gathering the full weights (to the main process, on CPU).
    full_state = accelerator.get_state_dict(run.model) if run.engine in ("fsdp", "zero3") else None
    if accelerator.is_main_process:
        with _explain_write_failure("the final model", final.with_name("final.partial"), run.ckpt_dir):
            causal_lm = accelerator.unwrap_model(run.model).causal_lm
            _save_final(causal_lm, run.tokenizer, final, run.config, run.objective, full_state)
            # Written once final/ is complete: a resume of this run then knows it is finished.
            record = {
                "step": run.total_steps,
                "skipped_steps": run.skipped_steps,
                "fingerprint": run.fingerprint,
            }
            with atomic_write(final / FINISHED_RECORD) as f:
                f.write(json.dumps(record))
    accelerator.wait_for_everyone()


def _save_final(model, tokenizer, folder: Path, config: TrainConfig, objective, full_state=None) -> None:
    """save_pretrained into a staging folder, renamed when complete.

    full_state: the gathered state dict of a sharded run (FSDP / ZeRO-3), whose own modules hold only shards:
    it is loaded (strictly) into a fresh CPU copy of the model, which is then saved (and merged) as usual.
    """
    if full_state is not None:
        model = _load_policy(config)
        model.load_state_dict(full_state)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    if config.trains_adapter() and config.lora.merge_on_save:
        model = model.merge_and_unload()
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "tether_objective.json").write_text(
        json.dumps({"name": objective.name, "hparams": objective.hparams(), "state": objective.state_dict()})
    )
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)


def _engine(accelerator) -> str:
    """How the model is distributed: "plain" (one process or DDP), "fsdp", "deepspeed" (ZeRO-0/1/2: parameters
    whole on every process) or "zero3" (parameters sharded)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return "zero3" if getattr(accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3 else "deepspeed"
    return "plain"


def _configure_deepspeed(plugin, config: TrainConfig, zero3: bool) -> None:
    """Fill the DeepSpeed config's "auto" entries from tether's config, and refuse what tether's loop cannot
    honour under DeepSpeed, before any model is loaded.

    tether accumulates micro-batches itself (optim.grad_accum, uneven last windows included) and tells
    DeepSpeed the boundary through accelerate; DeepSpeed's own accumulation would divide the loss again.
    DeepSpeed clips (gradient_clipping = optim.max_grad_norm) and steps inside the last backward of a step, so
    a non-finite step cannot be skipped afterwards. tether's AdamW and schedule are used, not the config's.
    """
    ds = plugin.deepspeed_config

    def fill(key: str, value: Any, source: str) -> None:
        current = ds.get(key, "auto")
        if current == "auto":
            ds[key] = value
        elif current != value:
            raise ConfigError(
                f"the DeepSpeed config sets {key}={current!r} but {source} gives {value!r}: set it to"
                ' "auto" (or remove it)'
            )

    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(
                f"the DeepSpeed config has a {section!r} section: remove it; tether builds AdamW and the"
                " schedule from optim.*"
            )
    fill("train_micro_batch_size_per_gpu", config.optim.batch_size, "optim.batch_size")
    fill("gradient_accumulation_steps", 1, "tether (it accumulates optim.grad_accum micro-batches itself)")
    fill("gradient_clipping", config.optim.max_grad_norm or 0.0, "optim.max_grad_norm")
    if config.optim.on_nonfinite == "skip":
        raise ConfigError(
            "optim.on_nonfinite=skip is not supported under DeepSpeed (it steps inside the last backward of a"
            " step, before tether sees the loss); use optim.on_nonfinite=error"
        )
    if zero3:
        # No zero.Init: from_pretrained loads whole models, so the reference copy, the reference cache and the
        # final save see real weights; DeepSpeed partitions the policy when accelerate prepares it. (The
        # context manager accelerate offers for this does the same two assignments.)
        plugin.zero3_init_flag = False
        plugin.dschf = None  # drops transformers' weak reference to the ZeRO-3 config
    if zero3 and not ds.get("zero_optimization", {}).get("stage3_gather_16bit_weights_on_model_save", False):
        raise ConfigError(
            "DeepSpeed ZeRO-3 needs zero_optimization.stage3_gather_16bit_weights_on_model_save=true (accelerate"
            " config: zero3_save_16bit_model: true) to gather the final model"
        )


def require_head_in_root_unit(model, head) -> None:
    """Under FSDP the output embedding must belong to the root unit, whose parameters are gathered for the
    whole forward of `PolicyStatistics`. An auto-wrap policy that puts lm_head (or a module holding it, or its
    weight tied into another unit) in a unit of its own leaves the weight sharded where the chunked head reads
    it: refused by name. model: the prepared (FSDP) model; head: the causal LM's output embedding module."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    for name, module in model.named_modules():
        if module is model or not isinstance(module, (FSDPModule, FullyShardedDataParallel)):
            continue
        # The module itself, or its weight through another module of the unit (tied input embedding).
        if any(m is head for m in module.modules()) or any(p is head.weight for p in module.parameters()):
            raise ConfigError(
                f"FSDP put {name.replace('_fsdp_wrapped_module.', '')} (it holds the output embedding) in a unit"
                " of its own; tether's chunked head needs lm_head in the root unit: wrap the decoder layers only"
                " (fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP)"
            )


def _register_head_with_zero3(policy: PolicyStatistics) -> None:
    """ZeRO-3 gathers a parameter around the forward of the module that owns it; the chunked head reads the
    output embedding in `PolicyStatistics`'s forward instead of calling lm_head, so its weight (and bias) are
    registered as external parameters of that module."""
    from deepspeed.runtime.zero import register_external_parameter

    for param in policy.causal_lm.get_output_embeddings().parameters(recurse=False):
        register_external_parameter(policy, param)


def _has_accelerator() -> bool:
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def read_metrics(output_dir: str | Path, split: str | None = "train") -> list[dict[str, Any]]:
    """The records of a run's `metrics.jsonl` (non-finite values are None): split "train" (the default) gives
    one per logged step, "eval" the evaluations (`"split": "eval"`, eval_* metrics), None every record in
    file order.

    A torn last line (a run stopped, or a disk filled, while appending) is left out with a warning naming the
    file and line; a line that is not JSON anywhere else is an error (ValueError naming the line)."""
    path = Path(output_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i != last:
                raise ValueError(f"{path}, line {i + 1}: not a JSON record ({exc})") from exc
            warnings.warn(
                f"{path}, line {i + 1}: torn last line left out (a run stopped while appending to it)",
                stacklevel=2,
            )
    if split is None:
        return records
    return [r for r in records if r.get("split", "train") == split]


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the metric lines of steps <= step (the run redoes the later ones).

    A run killed while appending can leave a torn last line: it is dropped with the rest.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", step + 1) <= step:
            kept.append(line)
    with atomic_write(path) as f:
        f.writelines(line + "\n" for line in kept)


def _strict_json(record: dict[str, Any]) -> dict[str, Any]:
    """NaN / inf (a skipped step's loss) become null: bare NaN is not JSON and breaks strict readers."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
