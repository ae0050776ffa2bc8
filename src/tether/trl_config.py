"""TRL's `trl dpo` config file, read as is: `from_trl(dict) -> (tether_dict, provenance)`.

A TRL user keeps their YAML (the fields of TRL 1.16's DPOConfig, transformers' TrainingArguments, TRL's
ModelConfig and ScriptArguments) and `tether train` reads it. Every field TRL defines that tether reads is in
`FIELDS`, one entry each: *mapped* (to which tether key, converted how), *no effect* (accepted because it
changes only speed, output or logging around the run, not the training), or *refused* (by name, with the
reason). A key in no entry is refused too: none is ignored. Where a field is absent, TRL's default applies
(`TRL_DEFAULTS`), not tether's: linear schedule, bf16 autocast, 3 epochs, no prompt limit, max_length 1024,
length-normalised IPO, gradient checkpointing on, seed 42, batch 8, logging every 10 steps.

One added line selects tether's objectives: `objective: hdpo` (the name; the objective's own defaults) or
`objective: {name: hdpo, alpha: 0.9}` (a tether `objective` section). It takes the place of `loss_type`'s
`sigmoid`; `loss_type: [sigmoid, sft]` with `loss_weights` still adds the SFT term. Other tether sections
(`optim: {chunk_size: 512}`) may sit in the same file and are applied last. docs/trl.md has the table.

Pure apart from a look at two paths: `dataset_name`, a folder holding `<split>.jsonl` and the like, as
`datasets.load_dataset(folder)` reads it, resolves to that file; `model_name_or_path`, a PEFT adapter folder
(local, or a Hub id in the hub cache), becomes `model.adapter`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Top-level keys of tether's own config (TrainConfig's fields): a file with any other key TRL defines is a TRL
# file. `output_dir` is both (same meaning).
TETHER_SECTIONS = (
    "model",
    "lora",
    "data",
    "eval",
    "objective",
    "reference",
    "optim",
    "checkpoint",
    "logging",
    "distributed",
)

# TRL's loss names tether computes, and the objective each one is.
TRL_LOSSES = {"sigmoid": "dpo", "ipo": "ipo"}


class TRLConfigError(ValueError):
    """A TRL field tether cannot honour, or a value TRL itself would refuse."""


@dataclass(frozen=True)
class Field:
    """One TRL field. kind: mapped | no_effect | refused. `target`: the tether key (mapped); `allowed`: the
    values accepted without effect (no_effect / refused fields: any other value is refused with `why`)."""

    kind: str
    target: str | None = None
    why: str = ""
    allowed: tuple[Any, ...] | None = None  # None: every value (no_effect) / no value (refused)


def _m(target: str, why: str = "") -> Field:
    return Field("mapped", target, why)


def _noop(why: str, allowed: tuple[Any, ...] | None = None) -> Field:
    return Field("no_effect", None, why, allowed)


def _refuse(why: str, allowed: tuple[Any, ...] = ()) -> Field:
    return Field("refused", None, why, allowed)


_QUANT = "8-bit training is not supported by tether train (4-bit QLoRA is: load_in_4bit, on CUDA)"

FIELDS: dict[str, Field] = {
    # ScriptArguments
    "dataset_name": _m(
        "data.train",
        "a local file or folder (of data files, or saved with save_to_disk), or a Hub id from the hub cache",
    ),
    "dataset_train_split": _m(
        "data.split", "picks <split>.* in the dataset folder, or the split of a saved DatasetDict"
    ),
    "dataset_test_split": _m(
        "eval.data / eval.split", "with eval_strategy steps or epoch: the split of dataset_name evaluated"
    ),
    "dataset_config": _m("data.subset", "the configuration (subset) of a Hub data set or data folder"),
    "dataset_streaming": _refuse(
        "tether reads the whole data set (it validates and reports every row)", (False,)
    ),
    "ignore_bias_buffers": _noop("a DDP workaround; tether's DDP does not need it"),
    # ModelConfig
    "model_name_or_path": _m(
        "model.path",
        "a local model folder or a Hub id (hub cache); a PEFT adapter folder or id -> model.adapter",
    ),
    "model_revision": _m(
        "model.revision", "of a Hub id in model_name_or_path; main -> null (the default branch)"
    ),
    "dtype": _m(
        "model.dtype", "float32 | bfloat16 | float16; 'auto' is refused (tether needs a named dtype)"
    ),
    "attn_implementation": _m("model.attn_implementation"),
    "trust_remote_code": _m("model.trust_remote_code"),
    "use_peft": _m("lora.enabled"),
    "lora_r": _m("lora.r"),
    "lora_alpha": _m("lora.alpha"),
    "lora_dropout": _m("lora.dropout"),
    "lora_target_modules": _m(
        "lora.target_modules", "null: peft's default for Llama/Qwen/Mistral-style models, [q_proj, v_proj]"
    ),
    "lora_task_type": _noop("tether trains causal LMs only", ("CAUSAL_LM",)),
    "lora_target_parameters": _refuse("LoRA on parameters (not modules) is not supported", (None,)),
    "lora_modules_to_save": _refuse("fully trained modules beside LoRA are not supported", (None,)),
    "use_rslora": _refuse("rank-stabilised LoRA is not supported", (False,)),
    "use_dora": _refuse("DoRA is not supported", (False,)),
    "load_in_8bit": _refuse(_QUANT, (False,)),
    "load_in_4bit": _m(
        "model.load_in_4bit", "QLoRA through bitsandbytes on CUDA (refused on CPU); the adapter is saved"
    ),
    "bnb_4bit_quant_type": _m("model.bnb_4bit_quant_type"),
    "use_bnb_nested_quant": _m("model.use_bnb_nested_quant"),
    "bnb_4bit_quant_storage": _refuse(
        "a storage dtype for 4-bit weights (for FSDP) is not supported: bitsandbytes' uint8", (None, "uint8")
    ),
    # DPOConfig
    "beta": _m("objective.beta"),
    "loss_type": _m(
        "objective.name",
        "sigmoid -> dpo, ipo -> ipo (length-normalised, as TRL), sft -> objective.sft_weight; other TRL losses are refused",
    ),
    "loss_weights": _m("objective.weight / objective.sft_weight", "one weight per loss_type entry"),
    "label_smoothing": _m(
        "objective.label_smoothing", "only with objective cdpo: TRL 1.16's sigmoid ignores it"
    ),
    "max_length": _m("data.max_length", "TRL has no prompt limit: data.max_prompt_length is null"),
    "truncation_mode": _refuse(
        "tether keeps the start of prompt + response (TRL's keep_start)", ("keep_start",)
    ),
    "precompute_ref_log_probs": _m(
        "reference.mode", "true -> cache, false -> auto (a frozen copy, or the policy with adapters off)"
    ),
    "precompute_ref_batch_size": _noop("speed only: the cache pass uses optim.batch_size"),
    "disable_dropout": _refuse("tether always disables dropout (TRL's default)", (True,)),
    "learning_rate": _m("optim.lr"),
    "model_init_kwargs": _refuse("use dtype / attn_implementation / trust_remote_code", (None,)),
    "router_aux_loss_coef": _refuse("Mixture-of-Experts auxiliary losses are not supported", (None,)),
    "dataset_num_proc": _noop("tokenization speed only"),
    "padding_free": _refuse(
        "padding-free batches are not supported (TRL 1.16 falls back to padding too)", (False,)
    ),
    "pad_to_multiple_of": _noop("padding layout only; padding never counts in any statistic"),
    "ld_alpha": _refuse("LD-DPO's length weighting is not a tether objective", (None,)),
    "f_divergence_type": _refuse("only the reverse KL of DPO", ("reverse_kl",)),
    "f_alpha_divergence_coef": _noop("read only with f_divergence_type alpha_divergence"),
    "use_weighting": _refuse("WPO weighting is not supported", (False,)),
    "discopop_tau": _noop("read only with loss_type discopop"),
    "activation_offloading": _refuse(
        "activation offloading is not supported (gradient_checkpointing is)", (False,)
    ),
    "sync_ref_model": _refuse(
        "a moving reference (TR-DPO) is not supported: the reference is frozen", (False,)
    ),
    "ref_model_mixup_alpha": _noop("read only with sync_ref_model"),
    "ref_model_sync_steps": _noop("read only with sync_ref_model"),
    "pad_token": _noop("deprecated in TRL; tether uses the tokenizer's pad token"),
    "rpo_alpha": _refuse(
        "removed from TRL: write loss_type: [sigmoid, sft] with loss_weights: [1.0, rpo_alpha]"
    ),
    "use_liger_kernel": _refuse(
        "Liger kernels are not used: tether's chunked head already avoids the logits", (False,)
    ),
    # TrainingArguments
    "output_dir": _m("output_dir"),
    "lr_scheduler_type": _m(
        "optim.scheduler", "linear | cosine | constant (no warmup, as TRL) | constant_with_warmup"
    ),
    "lr_scheduler_kwargs": _refuse("scheduler arguments are not supported", (None, {})),
    "warmup_steps": _m(
        "optim.warmup_steps", "a value below 1 is a ratio of max_steps (transformers 5), rounded up"
    ),
    "warmup_ratio": _m("optim.warmup_steps", "older transformers' ratio of max_steps, rounded up"),
    "num_train_epochs": _m(
        "optim.epochs", "a whole number (a fraction only with max_steps, which then decides)"
    ),
    "max_steps": _m("optim.max_steps", "-1 -> null (epochs decide)"),
    "per_device_train_batch_size": _m("optim.batch_size"),
    "gradient_accumulation_steps": _m("optim.grad_accum"),
    "gradient_checkpointing": _m("model.gradient_checkpointing"),
    "gradient_checkpointing_kwargs": _noop("tether uses non-reentrant checkpointing"),
    "bf16": _m("optim.mixed_precision", "null (TRL's default) is true unless fp16 is set"),
    "fp16": _m("optim.mixed_precision"),
    "tf32": _refuse("TF32 is not switched by tether train", (None, False)),
    "seed": _m("optim.seed"),
    "data_seed": _refuse("one seed (seed) orders the data", (None,)),
    "full_determinism": _m("optim.deterministic"),
    "train_sampling_strategy": _m(
        "data.shuffle", "random -> true (tether's own seeded order), sequential -> false"
    ),
    "logging_steps": _m(
        "logging.every", "a whole number of steps; each logged record holds the means over them, as TRL's"
    ),
    "logging_strategy": _refuse("tether logs every logging_steps optimizer steps", ("steps",)),
    "logging_first_step": _noop("which steps are logged only"),
    "logging_nan_inf_filter": _noop("logging only"),
    "save_strategy": _m("checkpoint.every", "steps -> save_steps, no -> 0; epoch is refused"),
    "save_steps": _m("checkpoint.every"),
    "save_total_limit": _m(
        "checkpoint.keep_last", "null (TRL keeps every checkpoint): tether keeps checkpoint.keep_last"
    ),
    "save_only_model": _refuse("tether checkpoints hold the optimizer too (exact resume)", (False,)),
    "eval_strategy": _m(
        "eval.every / eval.per_epoch / eval.at_end",
        "steps: every eval_steps and after the last step; epoch: at the end of every epoch; no: none",
    ),
    "eval_steps": _m(
        "eval.every", "null: logging_steps (as TRL); a value below 1 is a ratio of max_steps, rounded up"
    ),
    "eval_on_start": _m("eval.at_start"),
    "eval_delay": _refuse("evaluation starts with the first eval step", (0, 0.0)),
    "per_device_eval_batch_size": _m("eval.batch_size"),
    "do_train": _noop("tether train trains"),
    "do_eval": _noop("eval_strategy decides (TRL sets do_eval from it)"),
    "report_to": _m("logging.trackers", "none -> [], a name or a list of names"),
    "run_name": _noop("tracker run name only"),
    "disable_tqdm": _m("logging.progress", "the negation"),
    "max_grad_norm": _m("optim.max_grad_norm", "0 or null -> no clipping"),
    "weight_decay": _m("optim.weight_decay"),
    "adam_beta1": _m("optim.adam_beta1"),
    "adam_beta2": _m("optim.adam_beta2"),
    "adam_epsilon": _m("optim.adam_eps"),
    "optim": _refuse("tether's optimizer is torch's AdamW", ("adamw_torch", "adamw_torch_fused")),
    "use_cpu": _noop("accelerate picks the device"),
    "dataloader_num_workers": _noop("loading speed only"),
    "dataloader_pin_memory": _noop("loading speed only"),
    "dataloader_drop_last": _refuse("tether runs every pair", (False,)),
    "remove_unused_columns": _noop("tether reads prompt / chosen / rejected only"),
    "resume_from_checkpoint": _refuse("use tether train --resume", (None,)),
    "push_to_hub": _refuse("tether does not upload", (False,)),
    "hub_model_id": _noop("read only with push_to_hub"),
    "hub_strategy": _noop("read only with push_to_hub"),
    "hub_private_repo": _noop("read only with push_to_hub"),
    "torch_compile": _refuse("torch.compile is not supported", (False,)),
    "ddp_timeout": _m("distributed.timeout_s"),
    "ddp_find_unused_parameters": _noop("accelerate sets up DDP"),
    "torch_empty_cache_steps": _noop("memory housekeeping only"),
}

# TRL's defaults for the fields that change training where tether's default differs (or that TRL sets
# itself): applied when the TRL file leaves them out.
TRL_DEFAULTS: dict[str, Any] = {
    "output_dir": "trainer_output",
    "beta": 0.1,
    "loss_type": ["sigmoid"],
    "learning_rate": 1e-6,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "num_train_epochs": 3.0,
    "max_steps": -1,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": True,
    "bf16": None,
    "fp16": False,
    "seed": 42,
    "max_length": 1024,
    "precompute_ref_log_probs": False,
    "logging_steps": 10,
    "eval_strategy": "no",
    "dataset_test_split": "test",
    "per_device_eval_batch_size": 8,
    "eval_on_start": False,
    "save_strategy": "steps",
    "save_steps": 500,
    "report_to": "none",
    "max_grad_norm": 1.0,
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "dtype": "float32",
    "use_peft": False,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "lora_target_modules": None,
    "dataset_train_split": "train",
    "train_sampling_strategy": "random",
}

# Keys whose presence marks a TRL file (any TRL field that is not also a tether top-level key would do).
MARKERS = frozenset(FIELDS) - {"output_dir", "optim"}


def is_trl_config(raw: dict[str, Any]) -> bool:
    """True when the YAML mapping is a `trl dpo` config: it has a TRL field at the top level."""
    return any(k in MARKERS for k in raw) or isinstance(raw.get("optim"), str)


def trl_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Split command-line overrides of a TRL file: TRL field names (`learning_rate=1e-5`, no dot) are applied
    to the TRL mapping before translation, and so is `objective=hdpo` (the objective line); the rest (`objective.alpha=0.9`) are tether's, applied after."""
    import yaml

    trl, rest = {}, []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if sep and (key in FIELDS and key != "output_dir" or key == "objective"):
            trl[key] = yaml.safe_load(raw) if raw != "" else ""
        else:
            rest.append(item)
    return trl, rest


def _set(out: dict[str, Any], key: str, value: Any) -> None:
    node = out
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _number(name: str, value: Any) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 5e-7 (no dot) as a string; TRL's parser converts it
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TRLConfigError(f"{name} must be a number, got {value!r}")
    return value


def _whole(name: str, value: Any) -> int:
    value = _number(name, value)
    if value != int(value):
        raise TRLConfigError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def _dataset(name: str, split: str) -> tuple[str, str]:
    """(data.train, data.split) for dataset_name: a folder holding `<split>.<ext>` (as datasets reads a local
    folder of data files) resolves to that file; anything else is passed on (a file, a saved dataset)."""
    folder = Path(name)
    if folder.is_dir() and not (folder / "dataset_dict.json").exists():
        for ext in ("jsonl", "json", "parquet", "csv"):
            if (folder / f"{split}.{ext}").is_file():
                return str(folder / f"{split}.{ext}"), split
    return name, split


def from_trl(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Translate a TRL DPO config mapping into tether's nested config dict.

    Returns (tether_dict, provenance): provenance maps each tether key set here ("optim.lr") to where its value
    came from ("TRL learning_rate", "TRL default of lr_scheduler_type", "tether objective line").
    Raises TRLConfigError naming the first field tether cannot honour and why.
    """

    def tether_key(k: str) -> bool:  # TRL's `optim` is the optimizer's name, tether's a section
        return k in TETHER_SECTIONS and not (k == "optim" and isinstance(raw[k], str))

    tether_sections = {k: raw[k] for k in raw if tether_key(k) and k != "objective"}
    trl = {k: v for k, v in raw.items() if not tether_key(k)}
    objective_line = raw.get("objective")
    for name in sorted(trl):
        if name not in FIELDS:
            raise TRLConfigError(
                f"{name}: not a TRL DPO field tether reads (docs/trl.md lists every field it maps, accepts or"
                " refuses); remove it"
            )
        field = FIELDS[name]
        if field.kind != "mapped" and field.allowed is not None and trl[name] not in field.allowed:
            raise TRLConfigError(f"{name}: {trl[name]!r} is refused: {field.why}")

    out: dict[str, Any] = {}
    prov: dict[str, str] = {}

    def value(name: str) -> tuple[Any, str]:
        if name in trl:
            return trl[name], f"TRL {name}"
        return TRL_DEFAULTS.get(name), f"TRL default of {name}"

    def put(key: str, name: str, convert: Callable[[Any], Any] = lambda v: v) -> None:
        v, source = value(name)
        _set(out, key, convert(v))
        prov[key] = source

    put("output_dir", "output_dir", str)
    if "model_name_or_path" in trl:
        _model(trl, out, prov)
    dtype, source = value("dtype")
    if dtype == "auto":
        raise TRLConfigError("dtype: 'auto' is refused: name the dtype (float32, bfloat16 or float16)")
    _set(out, "model.dtype", dtype)
    prov["model.dtype"] = source
    for key, name in (
        ("model.attn_implementation", "attn_implementation"),
        ("model.trust_remote_code", "trust_remote_code"),
    ):
        if name in trl:
            put(key, name)
    put("model.gradient_checkpointing", "gradient_checkpointing")

    for name in ("load_in_4bit", "bnb_4bit_quant_type", "use_bnb_nested_quant"):
        if name in trl:
            put(f"model.{name}", name)
    if trl.get("load_in_4bit"):
        _set(out, "lora.merge_on_save", False)
        prov["lora.merge_on_save"] = "TRL load_in_4bit (TRL saves the adapter; merging would round the base)"

    # Data: TRL truncates prompt + completion to max_length, keeping the start; no prompt limit of its own.
    if "dataset_name" in trl:
        split, split_source = value("dataset_train_split")
        train, split = _dataset(str(trl["dataset_name"]), str(split))
        _set(out, "data.train", train)
        _set(out, "data.split", split)
        prov["data.train"], prov["data.split"] = "TRL dataset_name", split_source
    if trl.get("dataset_config") is not None:
        put("data.subset", "dataset_config", str)
    put("data.max_length", "max_length")
    _set(out, "data.max_prompt_length", None)
    prov["data.max_prompt_length"] = "TRL default (no prompt limit)"
    strategy, source = value("train_sampling_strategy")
    if strategy not in ("random", "sequential"):
        raise TRLConfigError(
            f"train_sampling_strategy: {strategy!r} is refused: only random and sequential orders"
        )
    _set(out, "data.shuffle", strategy == "random")
    prov["data.shuffle"] = source

    _objective(trl, objective_line, value, out, prov)

    # Reference
    pre, source = value("precompute_ref_log_probs")
    _set(out, "reference.mode", "cache" if pre else "auto")
    prov["reference.mode"] = source

    # LoRA
    put("lora.enabled", "use_peft", bool)
    put("lora.r", "lora_r", lambda v: _whole("lora_r", v))
    put("lora.alpha", "lora_alpha", lambda v: float(_number("lora_alpha", v)))
    put("lora.dropout", "lora_dropout", lambda v: float(_number("lora_dropout", v)))
    put("lora.target_modules", "lora_target_modules", _target_modules)

    # Optimizer and schedule
    put("optim.lr", "learning_rate", lambda v: float(_number("learning_rate", v)))
    put("optim.weight_decay", "weight_decay", lambda v: float(_number("weight_decay", v)))
    put("optim.adam_beta1", "adam_beta1", lambda v: float(_number("adam_beta1", v)))
    put("optim.adam_beta2", "adam_beta2", lambda v: float(_number("adam_beta2", v)))
    put("optim.adam_eps", "adam_epsilon", lambda v: float(_number("adam_epsilon", v)))
    put("optim.max_grad_norm", "max_grad_norm", lambda v: float(v) if v else None)
    put("optim.batch_size", "per_device_train_batch_size", lambda v: _whole("per_device_train_batch_size", v))
    put("optim.grad_accum", "gradient_accumulation_steps", lambda v: _whole("gradient_accumulation_steps", v))
    put("optim.seed", "seed", lambda v: _whole("seed", v))
    if "full_determinism" in trl:
        put("optim.deterministic", "full_determinism", bool)
    max_steps = _whole("max_steps", value("max_steps")[0])
    put("optim.max_steps", "max_steps", lambda v: None if max_steps <= 0 else max_steps)
    epochs, source = value("num_train_epochs")
    epochs = _number("num_train_epochs", epochs)
    if max_steps <= 0 and epochs != int(epochs):
        raise TRLConfigError(
            f"num_train_epochs: {epochs!r} is refused: tether runs whole epochs; set max_steps for a part"
        )
    _set(out, "optim.epochs", max(1, math.ceil(epochs)))
    prov["optim.epochs"] = source
    _schedule(trl, value, max_steps, out, prov)
    bf16, bf16_source = value("bf16")
    fp16, fp16_source = value("fp16")
    if bf16 and fp16:
        raise TRLConfigError("bf16 and fp16 are both true: choose one")
    if fp16:
        _set(out, "optim.mixed_precision", "fp16")
        prov["optim.mixed_precision"] = fp16_source
    else:
        _set(out, "optim.mixed_precision", "no" if bf16 is False else "bf16")
        prov["optim.mixed_precision"] = bf16_source + (" (null: true unless fp16)" if bf16 is None else "")

    # Checkpoints and logging
    save, source = value("save_strategy")
    if save == "no":
        _set(out, "checkpoint.every", 0)
        prov["checkpoint.every"] = source
    elif save == "steps":
        put("checkpoint.every", "save_steps", lambda v: _whole("save_steps", v))
    else:
        raise TRLConfigError(
            f"save_strategy: {save!r} is refused: tether saves every save_steps steps or not"
        )
    if trl.get("save_total_limit") is not None:
        put("checkpoint.keep_last", "save_total_limit", lambda v: _whole("save_total_limit", v))
    steps = _number("logging_steps", value("logging_steps")[0])
    if steps < 1:
        raise TRLConfigError(f"logging_steps: {steps!r} is refused: give a whole number of steps")
    put("logging.every", "logging_steps", lambda v: _whole("logging_steps", v))
    put("logging.trackers", "report_to", _trackers)
    if "disable_tqdm" in trl:
        put("logging.progress", "disable_tqdm", lambda v: not v)
    if "ddp_timeout" in trl:
        put("distributed.timeout_s", "ddp_timeout", lambda v: _whole("ddp_timeout", v))
    _evaluation(trl, value, max_steps, out, prov)

    # Tether sections in the same file come last.
    for section, body in tether_sections.items():
        if body is None:
            continue
        if not isinstance(body, dict):
            raise TRLConfigError(f"{section} must be a mapping of tether's {section} fields, got {body!r}")
        for key, v in _flat(body).items():
            _set(out, f"{section}.{key}", v)
            prov[f"{section}.{key}"] = f"tether {section} section in the file"
    return out, prov


def _model(trl: dict[str, Any], out: dict[str, Any], prov: dict[str, str]) -> None:
    """model.path and model.revision from model_name_or_path and model_revision; a PEFT adapter (a folder, or
    a Hub id in the hub cache) is model.adapter, on the base its adapter_config.json names."""
    from tether import hub

    name, revision = str(trl["model_name_or_path"]), trl.get("model_revision")
    try:
        folder = hub.local_path(name, revision)
    except hub.HubError:  # not cached: validation says so, naming model.path
        folder = None
    if folder is not None and hub.is_adapter(folder):
        if revision not in (None, "main"):
            raise TRLConfigError(
                f"model_revision: {revision!r} is refused: {name} is a PEFT adapter, loaded at its main revision"
            )
        _set(out, "model.adapter", name)
        prov["model.adapter"] = "TRL model_name_or_path (a PEFT adapter)"
        return
    _set(out, "model.path", name)
    prov["model.path"] = "TRL model_name_or_path"
    if revision not in (None, "main"):
        _set(out, "model.revision", str(revision))
        prov["model.revision"] = "TRL model_revision"


def _evaluation(trl, value, max_steps: int, out, prov) -> None:
    """eval.* from eval_strategy, eval_steps, eval_on_start, per_device_eval_batch_size and the test split of
    dataset_name, with TRL's semantics: `steps` evaluates every eval_steps (null: logging_steps) and after the
    last step, `epoch` at the end of every epoch, `no` never (the test split is then not read)."""
    strategy, source = value("eval_strategy")
    if strategy == "no":
        return
    if strategy not in ("steps", "epoch"):
        raise TRLConfigError(
            f"eval_strategy: {strategy!r} is refused: tether evaluates by steps, epoch or no"
        )
    if "dataset_name" not in trl:
        raise TRLConfigError(f"eval_strategy: {strategy!r} needs dataset_name (its test split is evaluated)")
    split, split_source = value("dataset_test_split")
    data, split = _dataset(str(trl["dataset_name"]), str(split))
    _set(out, "eval.data", data)
    _set(out, "eval.split", split)
    prov["eval.data"] = f"TRL dataset_name with {split_source}"
    prov["eval.split"] = split_source
    if strategy == "steps":
        steps, steps_source = value("eval_steps")
        if not steps:  # TrainingArguments: eval_steps falls back to logging_steps
            steps, steps_source = value("logging_steps")
            steps_source += " (eval_steps unset: TRL evaluates every logging_steps)"
        steps = _number("eval_steps", steps)
        if 0 < steps < 1:
            if max_steps <= 0:
                raise TRLConfigError(
                    f"eval_steps: a ratio ({steps!r}) needs max_steps; give a whole number of steps"
                )
            steps_source += f" (ratio {steps} of max_steps {max_steps}, rounded up)"
            steps = math.ceil(max_steps * steps)
        _set(out, "eval.every", _whole("eval_steps", steps))
        prov["eval.every"] = steps_source
        _set(out, "eval.at_end", True)
        prov["eval.at_end"] = f"{source} (TRL evaluates after the last step too)"
    else:
        _set(out, "eval.per_epoch", True)
        _set(out, "eval.at_end", False)
        prov["eval.per_epoch"] = prov["eval.at_end"] = source
    put_value = value("eval_on_start")
    _set(out, "eval.at_start", bool(put_value[0]))
    prov["eval.at_start"] = put_value[1]
    size, size_source = value("per_device_eval_batch_size")
    _set(out, "eval.batch_size", _whole("per_device_eval_batch_size", size))
    prov["eval.batch_size"] = size_source


def _target_modules(value: Any) -> list[str]:
    if value is None:
        return ["q_proj", "v_proj"]
    if isinstance(value, str):
        if value == "all-linear":
            raise TRLConfigError(
                "lora_target_modules: 'all-linear' is refused: name the modules, e.g. [q_proj, k_proj, v_proj,"
                " o_proj, gate_proj, up_proj, down_proj]"
            )
        return [value]
    return list(value)


def _trackers(value: Any) -> list[str]:
    if value in (None, "none", []):
        return []
    names = [value] if isinstance(value, str) else list(value)
    return [] if names == ["none"] else names


def _schedule(trl, value, max_steps: int, out, prov) -> None:
    kind, source = value("lr_scheduler_type")
    names = {
        "linear": "linear",
        "cosine": "cosine",
        "constant": "constant",
        "constant_with_warmup": "constant",
    }
    if kind not in names:
        raise TRLConfigError(
            f"lr_scheduler_type: {kind!r} is refused: tether has linear, cosine, constant and"
            " constant_with_warmup"
        )
    _set(out, "optim.scheduler", names[kind])
    prov["optim.scheduler"] = source
    if "warmup_ratio" in trl and "warmup_steps" in trl:
        raise TRLConfigError("warmup_ratio and warmup_steps are both set: keep one")
    name = "warmup_ratio" if "warmup_ratio" in trl else "warmup_steps"
    warmup, source = value(name)
    warmup = _number(name, warmup or 0)
    if name == "warmup_ratio" or 0 < warmup < 1:
        if not 0 <= warmup <= 1:
            raise TRLConfigError(f"{name}: a ratio must be in [0, 1], got {warmup!r}")
        if max_steps <= 0:
            raise TRLConfigError(
                f"{name}: a warmup ratio ({warmup!r}) needs max_steps (tether's warmup is a count of steps and"
                " the number of steps per epoch is known only once the data is read); give warmup_steps >= 1"
                " or max_steps"
            )
        steps = math.ceil(max_steps * warmup)  # transformers' get_warmup_steps
        source += f" (ratio {warmup} of max_steps {max_steps}, rounded up)"
    else:
        steps = _whole(name, warmup)
    if kind == "constant" and steps:
        source += "; TRL's constant schedule ignores warmup: 0"
        steps = 0
    _set(out, "optim.warmup_steps", steps)
    prov["optim.warmup_steps"] = source


def _objective(trl, line, value, out, prov) -> None:
    """objective.* from loss_type / loss_weights / beta / label_smoothing and the tether objective line."""
    losses, loss_source = value("loss_type")
    losses = [losses] if isinstance(losses, str) else list(losses)
    weights, weight_source = value("loss_weights")
    if weights is None:
        weights = [1.0] * len(losses)
    if len(weights) != len(losses):
        raise TRLConfigError(
            f"loss_weights: {len(weights)} weights for {len(losses)} loss types ({losses}); give one per loss"
        )
    if len(set(losses)) != len(losses):
        raise TRLConfigError(f"loss_type: {losses} names a loss twice")
    sft_weight = 0.0
    preference = []
    for loss, weight in zip(losses, weights):
        if loss == "sft":
            sft_weight = float(_number("loss_weights", weight))
        elif loss in TRL_LOSSES:
            preference.append((loss, float(_number("loss_weights", weight))))
        else:
            raise TRLConfigError(
                f"loss_type: {loss!r} is refused: tether computes TRL's sigmoid (dpo), ipo and sft; for its own"
                " objectives add `objective: NAME` (dpo, ipo, cdpo, hdpo, epsilon_dpo, tdpo1, tdpo2)"
            )
    if len(preference) > 1:
        raise TRLConfigError(
            f"loss_type: {losses} mixes {len(preference)} preference losses; tether trains one preference"
            " objective, optionally with sft"
        )
    if line is not None:
        section = {"name": line} if isinstance(line, str) else line
        if not isinstance(section, dict) or "name" not in section:
            raise TRLConfigError(
                f"objective: {line!r} must be a tether objective name (objective: hdpo) or a section with"
                " its name (objective: {name: hdpo, alpha: 0.9})"
            )
        if preference and preference[0][0] != "sigmoid":
            raise TRLConfigError(
                f"objective: {section['name']!r} and loss_type {preference[0][0]!r} both choose the loss: keep"
                " one (loss_type: sigmoid, or leave it out, with the objective line)"
            )
        if not preference:
            raise TRLConfigError(
                f"objective: {section['name']!r} has no preference loss to replace: loss_type {losses} is"
                " sft alone; write loss_type: [sigmoid, sft] (with loss_weights) to add the SFT term"
            )
        name = section["name"]
        loss_weight = preference[0][1]
    elif preference:
        name = TRL_LOSSES[preference[0][0]]
        loss_weight = preference[0][1]
        section = {}
    else:  # loss_type: [sft] alone: the SFT term only; the objective is kept for its metrics
        name, loss_weight, section = "dpo", 0.0, {}
    _set(out, "objective.name", name)
    prov["objective.name"] = "tether objective line" if line is not None else loss_source
    beta, source = value("beta")
    _set(out, "objective.beta", float(_number("beta", beta)))
    prov["objective.beta"] = source
    if name == "ipo" and "length_normalize" not in section:
        _set(out, "objective.length_normalize", True)
        prov["objective.length_normalize"] = "TRL's ipo (length-normalised)"
    smoothing = trl.get("label_smoothing", 0.0)
    if smoothing:
        if name != "cdpo":
            raise TRLConfigError(
                f"label_smoothing: {smoothing!r} is refused with objective {name!r}: TRL 1.16's sigmoid loss"
                " ignores it; for conservative DPO add `objective: cdpo`"
            )
        _set(out, "objective.label_smoothing", float(_number("label_smoothing", smoothing)))
        prov["objective.label_smoothing"] = "TRL label_smoothing"
    if loss_weight != 1.0 or "loss_weights" in trl:
        _set(out, "objective.weight", loss_weight)
        prov["objective.weight"] = weight_source
    if sft_weight:
        _set(out, "objective.sft_weight", sft_weight)
        prov["objective.sft_weight"] = f"{loss_source} (sft) with {weight_source}"
    for key, v in section.items():
        if key != "name":
            _set(out, f"objective.{key}", v)
            prov[f"objective.{key}"] = "tether objective line"
