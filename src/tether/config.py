"""Configuration: our own dataclasses, loaded from YAML with `key=value` overrides.

    tether train run.yaml objective.name=hdpo objective.alpha=0.9

The mechanism is shared by the training config (`TrainConfig`, here) and the eval config
(`tether.evaluate.config.EvalConfig`): `read_config_dict` reads the YAML file and merges the overrides
(the one place a raw config dict is read), `from_dict` builds a dataclass from it, checking every value
against the field's annotation, and one `ConfigError` names the field. Every field is documented in one
line. Unknown keys, wrong types and invalid values fail before any model is loaded (`TrainConfig.validate`
also checks the paths exist).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tether import hub, trl_config
from tether.gguf import GGUFError, check_gguf, is_gguf
from tether.objectives import ObjectiveConfigError, build_objective


class ConfigError(ValueError):
    """A configuration field is unknown, of the wrong type or invalid."""


@dataclass
class ModelConfig:
    path: str = ""  # local folder with config.json, *.safetensors weights and the tokenizer; or a .gguf file;
    # or a Hub id (org/name), read from the Hugging Face cache (docs/models.md). With `adapter`: its base model
    # (empty: the base its adapter_config.json names)
    revision: str | None = None  # Hub revision (branch, tag or commit) of a Hub id in `path` (default: main)
    adapter: str | None = None  # a PEFT adapter folder or Hub id to start from, trained further (LoRA)
    tokenizer_path: str | None = None  # tokenizer folder (or .gguf file, or Hub id) if it is not `path`'s
    dtype: str = "float32"  # dtype of the weights: float32 | bfloat16 | float16
    trust_remote_code: bool = False  # run the model folder's own Python code (off unless you trust it)
    attn_implementation: str | None = None  # transformers attention backend, e.g. "sdpa" or "eager"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    load_in_4bit: bool = False  # QLoRA: a frozen 4-bit base (bitsandbytes, CUDA only) under LoRA adapters
    bnb_4bit_quant_type: str = "nf4"  # 4-bit data type with load_in_4bit: nf4 | fp4
    use_bnb_nested_quant: bool = False  # with load_in_4bit: quantize the quantization constants too


@dataclass
class LoraConfig:
    enabled: bool = False  # train LoRA adapters (peft) instead of all weights
    r: int = 16  # adapter rank
    alpha: float = 32.0  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]  # modules that get adapters
    )
    merge_on_save: bool = True  # merge adapters into the weights of the final saved model


@dataclass
class DataConfig:
    train: str = ""  # JSONL / Parquet / CSV file, a folder of such files or a `datasets.save_to_disk` folder,
    # or a Hub data set id (org/name), read from the Hugging Face cache (docs/models.md)
    split: str = "train"  # split to use when `train` is a folder or Hub data set with several splits
    subset: str | None = None  # configuration (subset) of a folder or Hub data set that has several
    revision: str | None = (
        None  # Hub revision (branch, tag or commit) when `train` is a Hub id (default: main)
    )
    max_length: int | None = 512  # max tokens of prompt + response (responses truncated from the right)
    max_prompt_length: int | None = 256  # max prompt tokens (prompts truncated from the left)
    on_bad_row: str = "error"  # error: stop at the first bad row | skip: count, report and skip bad rows
    shuffle: bool = True  # reshuffle the pairs every epoch (seeded by optim.seed and the epoch)


@dataclass
class EvalConfig:
    data: str | None = (
        None  # held-out pairs, read as data.train is (file, datasets folder or Hub data set id;
    )
    # data.on_bad_row, data.max_length and data.max_prompt_length apply, and data.subset and data.revision
    # when it names the same data set as data.train); null: no evaluation during training
    split: str = "test"  # split to use when `eval.data` is a data set with splits (folder or Hub id)
    every: int = 0  # evaluate every N optimizer steps (0: not by step count)
    per_epoch: bool = False  # evaluate at the end of every epoch (TRL's eval_strategy: epoch)
    at_start: bool = False  # evaluate before the first step, as step 0 (TRL's eval_on_start)
    at_end: bool = True  # evaluate after the last step (once, if it is also an `every` or epoch step)
    batch_size: int | None = None  # eval pairs per forward per process (null: optim.batch_size)


@dataclass
class ObjectiveConfig:
    name: str = "dpo"  # dpo | ipo | cdpo | hdpo | epsilon_dpo | tdpo1 | tdpo2
    beta: float = 0.1  # KL strength (the base beta for epsilon_dpo)
    alpha: float | None = None  # H-DPO's entropy coefficient (hdpo) or TDPO2's alpha (tdpo2)
    entropy_alpha: float | None = None  # H-DPO's alpha composed with epsilon_dpo / tdpo1 / tdpo2
    # Entropy target (hdpo; epsilon_dpo / tdpo1 / tdpo2 through entropy_alpha): alpha, starting at its
    # configured value, moves after each step toward this policy entropy on the training responses.
    entropy_target: float | None = None  # target token-mean policy entropy, nats per token
    entropy_target_fraction: float | None = None  # or: that fraction of the reference's (measured once)
    alpha_lr: float | None = None  # step size on log alpha per nat of entropy error (default 0.1)
    alpha_min: float | None = None  # lower clamp of alpha (default 0.5)
    alpha_max: float | None = None  # upper clamp of alpha (default 2.0)
    epsilon: float | None = None  # epsilon-DPO's perturbation size, in (0, 1)
    label_smoothing: float | None = None  # cDPO's label noise, in [0, 0.5)
    length_normalize: bool | None = None  # IPO: divide log-ratios by response length (TRL's ipo)
    weight: float = 1.0  # weight of this objective's loss in the total (TRL's loss_weights[0])
    sft_weight: float = 0.0  # weight of the SFT term added: chosen responses' token-mean NLL (TRL's sft)

    def hparams(self) -> dict[str, Any]:
        """Arguments of `build_objective`: beta, every field that was set, and the loss mixture's weights
        when they are not 1 and 0."""
        out = {"beta": self.beta}
        for name in (
            "alpha",
            "entropy_alpha",
            "epsilon",
            "label_smoothing",
            "length_normalize",
            "entropy_target",
            "entropy_target_fraction",
            "alpha_lr",
            "alpha_min",
            "alpha_max",
        ):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.weight != 1.0:
            out["weight"] = self.weight
        if self.sft_weight != 0.0:
            out["sft_weight"] = self.sft_weight
        return out


@dataclass
class ReferenceConfig:
    mode: str = "auto"  # copy: frozen copy (+1 model in memory) | adapter: LoRA policy with adapters off
    # (no extra memory; needs lora.enabled) | cache: one pass before training, stored on disk (no model in
    # memory during training) | auto: adapter with LoRA, else copy
    # With model.adapter: adapter (and auto) is the base with the adapter off, as TRL; copy and cache are the
    # adapter as loaded (the initial policy)
    path: str | None = None  # another reference model folder, .gguf or Hub id (default: the initial policy)
    revision: str | None = None  # Hub revision of a Hub id in `path` (default: main)
    cache_dtype: str = (
        "float32"  # dtype of cached reference hidden states (TDPO / epsilon-DPO); float16 halves disk
    )


@dataclass
class OptimConfig:
    lr: float = 1e-6  # peak learning rate of AdamW
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    max_grad_norm: float | None = 1.0  # clip the global gradient norm (None: no clipping)
    scheduler: str = "cosine"  # cosine | linear | constant (all after linear warmup)
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0
    batch_size: int = 4  # pairs per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: int = 1  # passes over the data (ignored when max_steps is set)
    max_steps: int | None = None  # stop after this many optimizer steps
    mixed_precision: str = "no"  # no | bf16 | fp16 (autocast via accelerate)
    chunk_size: int = 1024  # response tokens per lm_head chunk (memory ~ chunk_size * vocab)
    seed: int = 0  # seeds model init of adapters, data order and dropout
    deterministic: bool = False  # torch deterministic algorithms (bitwise resume on CPU)
    on_nonfinite: str = "error"  # error: stop naming step and rows | skip: drop the step, counted


@dataclass
class CheckpointConfig:
    every: int = 0  # save a checkpoint every N optimizer steps (0: only the final model)
    keep_last: int = 2  # number of complete checkpoints to keep
    allow_changed_config: bool = False  # resume even if a field --resume refuses changed (docs/training.md)


@dataclass
class DistributedConfig:
    # Longest time (seconds) a process waits for the others at a collective: the other processes wait while
    # the main one builds the reference cache (reference.mode=cache) or writes a checkpoint. torch's
    # default (10 minutes under NCCL) is too short for a cache of a large data set.
    timeout_s: int = 7200


@dataclass
class LogConfig:
    every: int = (
        1  # write metrics every N optimizer steps: the means over those N steps (TRL's logging_steps)
    )
    trackers: list[str] = field(default_factory=list)  # accelerate trackers, e.g. [tensorboard, wandb]
    progress: bool = True  # show a progress bar
    entropy: bool = True  # compute the policy-entropy metrics (entropy/chosen, entropy/rejected)


@dataclass
class TrainConfig:
    output_dir: str = "runs/tether"  # run folder: config, metrics.jsonl, checkpoints/, final/
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def trains_adapter(self) -> bool:
        """True when LoRA adapters are trained: new ones (lora.enabled) or a loaded one (model.adapter)."""
        return self.lora.enabled or self.model.adapter is not None

    def reference_mode(self) -> str:
        """The resolved reference mode (auto -> adapter with LoRA or a loaded adapter, else copy)."""
        if self.reference.mode == "auto":
            return "adapter" if self.trains_adapter() else "copy"
        return self.reference.mode

    def validate(self, check_paths: bool = True) -> None:
        """Check every value (and the model/data paths); raise ConfigError naming the field and the fix."""
        if not self.output_dir.strip():
            raise ConfigError(
                "output_dir is empty: name a run folder (an empty one would write into the current directory)"
            )
        _choice("model.dtype", self.model.dtype, ("float32", "bfloat16", "float16"))
        _choice("model.bnb_4bit_quant_type", self.model.bnb_4bit_quant_type, ("nf4", "fp4"))
        _choice("data.on_bad_row", self.data.on_bad_row, ("error", "skip"))
        _choice("reference.mode", self.reference.mode, ("auto", "copy", "adapter", "cache"))
        _choice("reference.cache_dtype", self.reference.cache_dtype, ("float32", "bfloat16", "float16"))
        _choice("optim.scheduler", self.optim.scheduler, ("cosine", "linear", "constant"))
        _choice("optim.mixed_precision", self.optim.mixed_precision, ("no", "bf16", "fp16"))
        _choice("optim.on_nonfinite", self.optim.on_nonfinite, ("error", "skip"))
        for name, value in (
            ("optim.batch_size", self.optim.batch_size),
            ("optim.grad_accum", self.optim.grad_accum),
            ("optim.epochs", self.optim.epochs),
            ("optim.chunk_size", self.optim.chunk_size),
            ("checkpoint.keep_last", self.checkpoint.keep_last),
            ("logging.every", self.logging.every),
            ("lora.r", self.lora.r),
        ):
            _positive(name, value)
        if self.optim.max_steps is not None:
            _positive("optim.max_steps", self.optim.max_steps)
        self._validate_eval()
        _positive("distributed.timeout_s", self.distributed.timeout_s)
        if not 0 <= self.optim.seed < 2**32:  # numpy's seed range (accelerate's set_seed seeds numpy too)
            raise ConfigError(f"optim.seed must be in [0, 2**32), got {self.optim.seed!r}")
        _known_trackers(self.logging.trackers)
        if not (math.isfinite(self.optim.lr) and self.optim.lr >= 0):
            raise ConfigError(f"optim.lr must be a finite number >= 0, got {self.optim.lr!r}")
        if self.optim.max_grad_norm is not None and not self.optim.max_grad_norm > 0:
            raise ConfigError(f"optim.max_grad_norm must be > 0 or null, got {self.optim.max_grad_norm!r}")
        for name, value in (
            ("optim.adam_beta1", self.optim.adam_beta1),
            ("optim.adam_beta2", self.optim.adam_beta2),
        ):
            if not 0 <= value < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        if not (math.isfinite(self.optim.adam_eps) and self.optim.adam_eps > 0):
            raise ConfigError(f"optim.adam_eps must be a finite number > 0, got {self.optim.adam_eps!r}")
        if not (math.isfinite(self.optim.weight_decay) and self.optim.weight_decay >= 0):
            raise ConfigError(
                f"optim.weight_decay must be a finite number >= 0, got {self.optim.weight_decay!r}"
            )
        for name, value in (
            ("optim.warmup_steps", self.optim.warmup_steps),
            ("checkpoint.every", self.checkpoint.every),
        ):
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value!r}")
        if self.data.max_length is not None:
            _positive("data.max_length", self.data.max_length)
        if self.data.max_prompt_length is not None:
            _positive("data.max_prompt_length", self.data.max_prompt_length)
        if (
            self.data.max_length is not None
            and self.data.max_prompt_length is not None
            and self.data.max_prompt_length >= self.data.max_length
        ):
            raise ConfigError(
                f"data.max_prompt_length ({self.data.max_prompt_length}) must be below data.max_length"
                f" ({self.data.max_length}) to leave room for the response"
            )
        if self.lora.enabled:
            if not (math.isfinite(self.lora.alpha) and self.lora.alpha > 0):
                raise ConfigError(f"lora.alpha must be a finite number > 0, got {self.lora.alpha!r}")
            if not 0 <= self.lora.dropout < 1:
                raise ConfigError(f"lora.dropout must be in [0, 1), got {self.lora.dropout!r}")
            if not self.lora.target_modules:
                raise ConfigError(
                    "lora.target_modules is empty: name the modules to adapt, e.g. [q_proj, v_proj]"
                )
            if "lm_head" in self.lora.target_modules:
                raise ConfigError(
                    "lora.target_modules must not contain lm_head: tether's chunked head reads the output"
                    " embedding directly (adapt the attention / MLP projections instead)"
                )
        self.build_objective()
        _representable_floats(self)
        mode = self.reference_mode()
        if mode == "adapter" and not self.trains_adapter():
            raise ConfigError(
                "reference.mode=adapter needs lora.enabled=true or model.adapter (set reference.mode=copy or"
                " cache)"
            )
        if self.model.adapter is not None and self.lora.enabled:
            raise ConfigError(
                f"model.adapter={self.model.adapter!r} is trained further as it is (its own r, alpha and target"
                " modules); lora.enabled=true would add a second, new adapter: set lora.enabled=false"
            )
        self._check_quantization(mode)
        if mode == "adapter" and self.reference.path is not None:
            raise ConfigError(
                "reference.path cannot be used with reference.mode=adapter (the policy is the reference)"
            )
        if check_paths:
            _run_folder(self.output_dir)
            for name, path, revision in (
                ("model", self.model.path, self.model.revision),
                ("reference", self.reference.path, self.reference.revision),
                ("data", self.data.train, self.data.revision),
            ):
                if revision is not None and not hub.is_hub_id(path):
                    where = "data.train" if name == "data" else f"{name}.path"
                    raise ConfigError(
                        f"{name}.revision={revision!r} is read only when {where} is a Hub id (org/name);"
                        f" {where}={path!r} is not"
                    )
            self._check_model_sources()
            if self.model.load_in_4bit:
                reason = four_bit_unavailable()
                if reason:
                    raise ConfigError(f"model.load_in_4bit=true is refused: {reason}")
            if not self.data.train:
                raise ConfigError(
                    "data.train is empty: give a JSONL/Parquet/CSV file, a data folder or a Hub data set id"
                )
            if hub.is_hub_id(self.data.train):
                _hub_snapshot("data.train", self.data.train, self.data.revision, "dataset")
            elif not Path(self.data.train).exists():
                raise ConfigError(f"data.train: {self.data.train} does not exist")
            elif self.data.subset is not None and Path(self.data.train).is_file():
                raise ConfigError(
                    f"data.subset={self.data.subset!r} is read only when data.train is a folder or Hub data set;"
                    f" {self.data.train} is a file"
                )
            if self.eval.data is not None:
                data, _, revision = self.eval_source()
                if hub.is_hub_id(data):
                    _hub_snapshot("eval.data", data, revision, "dataset")
                elif not Path(data).exists():
                    raise ConfigError(f"eval.data: {data} does not exist")

    def _check_model_sources(self) -> None:
        """The model (or adapter and its base), tokenizer and reference exist, locally or in the Hub cache."""
        model = self.model
        if model.adapter is not None:
            folder = _hub_snapshot("model.adapter", model.adapter, None, "model")
            if not folder.is_dir():
                raise ConfigError(
                    f"model.adapter: {model.adapter} is not a folder or a Hub id (org/name) (docs/models.md)"
                )
            if not (folder / hub.ADAPTER_CONFIG).is_file():
                raise ConfigError(
                    f"model.adapter: {model.adapter} has no {hub.ADAPTER_CONFIG}: not a PEFT adapter folder"
                    " (save one with peft's save_pretrained)"
                )
            if not (folder / hub.ADAPTER_WEIGHTS).is_file():
                raise ConfigError(
                    f"model.adapter: {model.adapter} has no {hub.ADAPTER_WEIGHTS}; tether loads safetensors"
                    " only (re-save the adapter with safe_serialization=True)"
                )
        try:
            base, revision = hub.base_model(model)
        except hub.HubError as exc:
            raise ConfigError(f"model.adapter: {exc}") from None
        name = (
            "model.path"
            if model.path or model.adapter is None
            else f"model.adapter's base_model_name_or_path ({base})"
        )
        _model_folder(name, base, revision)
        tokenizer, revision = hub.tokenizer_source(model)
        _tokenizer("model.tokenizer_path" if model.tokenizer_path else name, tokenizer, revision)
        if self.reference.path is not None:
            _model_folder("reference.path", self.reference.path, self.reference.revision)

    def _check_quantization(self, mode: str) -> None:
        """QLoRA's combinations (the device and bitsandbytes are checked with the paths)."""
        model = self.model
        if not model.load_in_4bit:
            for name, value, default in (
                ("bnb_4bit_quant_type", model.bnb_4bit_quant_type, "nf4"),
                ("use_bnb_nested_quant", model.use_bnb_nested_quant, False),
            ):
                if value != default:
                    raise ConfigError(f"model.{name}={value!r} is read only with model.load_in_4bit=true")
            return
        if not self.trains_adapter():
            raise ConfigError(
                "model.load_in_4bit=true (QLoRA) trains LoRA adapters on a frozen 4-bit base: set"
                " lora.enabled=true (or model.adapter)"
            )
        if is_gguf(model.path):
            raise ConfigError(
                "model.load_in_4bit=true cannot quantize a .gguf file as it loads: convert it first"
                " (tether convert-gguf FILE DIR) and set model.path to the folder"
            )
        if self.lora.merge_on_save:
            raise ConfigError(
                "model.load_in_4bit=true with lora.merge_on_save=true would merge the adapters into 4-bit"
                " weights (rounding the base): set lora.merge_on_save=false (final/ then holds the adapter; merge"
                " it into the unquantized base afterwards)"
            )
        if mode == "copy" and self.reference.path is None:
            raise ConfigError(
                "model.load_in_4bit=true with reference.mode=copy would copy the quantized policy: use"
                " reference.mode=adapter (the base with the adapters off) or cache"
            )

    def _validate_eval(self) -> None:
        ev = self.eval
        if ev.every < 0:
            raise ConfigError(f"eval.every must be >= 0, got {ev.every!r}")
        if ev.batch_size is not None:
            _positive("eval.batch_size", ev.batch_size)
        if ev.data is not None and not ev.data.strip():
            raise ConfigError(
                "eval.data is empty: give a JSONL/Parquet/CSV file or a datasets folder, or null"
            )
        if ev.data is None and (ev.every or ev.per_epoch or ev.at_start):
            asked = [f"eval.{k}" for k in ("every", "per_epoch", "at_start") if getattr(ev, k)]
            raise ConfigError(f"{', '.join(asked)} set but eval.data is null: name the held-out pairs file")

    def evaluates(self) -> bool:
        """True when the run evaluates held-out pairs during training (eval.data is set)."""
        return self.eval.data is not None

    def eval_source(self) -> tuple[str, str | None, str | None]:
        """(eval.data, subset, revision): a held-out split of the training data set (eval.data equal to
        data.train, as TRL's dataset_test_split) is read at its subset and revision; other eval data at
        neither (a Hub id at its main revision)."""
        data = self.eval.data
        if data is None:
            raise ValueError("eval_source: eval.data is null")
        if data == self.data.train:
            return data, self.data.subset, self.data.revision
        return data, None, None

    def build_objective(self):
        try:
            return build_objective(self.objective.name, **self.objective.hparams())
        except ObjectiveConfigError as exc:
            # Name every objective field that was set: the one at fault is among them.
            given = {"name": self.objective.name, **self.objective.hparams()}
            fields = ", ".join(f"objective.{k}={v!r}" for k, v in given.items())
            raise ConfigError(f"{fields}: {exc}") from exc


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value!r}")


FLOAT32_MAX = (
    3.4028234663852886e38  # the largest float32: torch turns a larger Python float into inf or fails
)


def _representable_floats(config: Any, prefix: str = "") -> None:
    """Every float field of every section is finite and fits float32 (the optimizer and the loss compute in
    the parameters' dtype: a larger lr fails at the first step with "cannot be converted ... without overflow")."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _representable_floats(value, name + ".")
        elif isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise ConfigError(
                f"{name} must be a finite number of at most {FLOAT32_MAX:.4g} in size, got {value!r}"
            )


def _known_trackers(trackers: list[str]) -> None:
    """Names accelerate knows (`accelerate.utils.LoggerType`) whose package is installed: accelerate itself
    fails late on an unknown name and silently drops an uninstalled one."""
    if not trackers:
        return
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType]
    available = {LoggerType(t).value for t in get_available_trackers()}
    for i, name in enumerate(trackers):
        if name not in known:
            raise ConfigError(f"logging.trackers[{i}]: unknown tracker {name!r}; accelerate knows {known}")
        if name != "all" and name not in available:
            raise ConfigError(
                f"logging.trackers[{i}]: {name!r} is not installed (pip install it, or remove it from the list)"
            )


def _run_folder(output_dir: str) -> None:
    """output_dir, or the first of its parents that exists, must be a folder (it is created if missing)."""
    for path in (Path(output_dir), *Path(output_dir).parents):
        if path.exists():
            if not path.is_dir():
                what = "is" if path == Path(output_dir) else f"is inside {path}, which is"
                raise ConfigError(
                    f"output_dir: {output_dir} {what} a file, not a folder; choose a run folder"
                )
            return


def four_bit_unavailable() -> str | None:
    """Why 4-bit loading (QLoRA) cannot run here, or None: it needs a CUDA device and bitsandbytes."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return (
            "4-bit weights need a CUDA device (bitsandbytes' kernels) and this machine has none"
            " (torch.cuda.is_available() is False); train LoRA on the unquantized model (load_in_4bit=false)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        return "4-bit weights need the bitsandbytes package: pip install bitsandbytes"
    return None


def _hub_snapshot(name: str, path: str, revision: str | None, repo_type: str) -> Path:
    """The local folder of `path`: itself, or its Hub cache snapshot (ConfigError naming the field if none)."""
    try:
        return Path(hub.local_path(path, revision, repo_type))
    except hub.HubError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _model_folder(name: str, path: str, revision: str | None = None) -> None:
    """A Hugging Face model folder (local, or a Hub id's cached snapshot): config.json and safetensors
    weights; or a local .gguf file (see tether.gguf)."""
    if not path:
        raise ConfigError(
            f"{name} is empty: give a local model folder (config.json + *.safetensors), a .gguf file or a Hub"
            " id (org/name)"
        )
    if is_gguf(path):
        _gguf_file(name, path)
        return
    folder = _hub_snapshot(name, path, revision, "model")
    if not folder.is_dir():
        raise ConfigError(
            f"{name}: {path} is not a folder, a .gguf file or a Hub id (org/name) (docs/models.md)"
        )
    if hub.is_adapter(folder):
        raise ConfigError(
            f"{name}: {path} is a PEFT adapter ({hub.ADAPTER_CONFIG}), not a full model: write model.adapter:"
            f" {path} (its base model is the base_model_name_or_path of {hub.ADAPTER_CONFIG}; model.path"
            " overrides it)"
        )
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{name}: {path} has no config.json; save the model with save_pretrained")
    if not any(folder.glob("*.safetensors")):
        hint = (
            " (found pickle weights: re-save with safe_serialization=True)"
            if any(folder.glob("*.bin"))
            else ""
        )
        raise ConfigError(f"{name}: {path} has no *.safetensors weights{hint}; tether loads safetensors only")


def _tokenizer(name: str, path: str, revision: str | None) -> None:
    if is_gguf(path):
        _gguf_file(name, path)
        return
    tok = _hub_snapshot(name, path, revision, "model")
    if not any((tok / f).is_file() for f in hub.TOKENIZER_FILES):
        raise ConfigError(
            f"{name}: no tokenizer files in {tok}; save the tokenizer there or set model.tokenizer_path"
        )


def _gguf_file(name: str, path: str) -> None:
    try:
        check_gguf(path)
    except GGUFError as exc:
        raise ConfigError(f"{name}: {exc}") from None


# --- loading -----------------------------------------------------------------------------------------


def _convert(value: Any, tp: Any, name: str) -> Any:
    """Check/convert a YAML value to the annotated type; raise ConfigError naming the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, name)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(
            f"{name}: {value!r} fits none of {tp}" if errors else f"{name}: invalid value {value!r}"
        )
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{name} must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_convert(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is Callable:  # a function given in Python (configs built in code)
        if not callable(value):
            raise ConfigError(f"{name} must be callable, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # (configs built in code)
            return value
        if value is None:  # a YAML section whose fields are all commented out
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a mapping of fields, got {value!r}")
        return from_dict(tp, value, name)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string, got {value!r}")
    raise ConfigError(f"{name}: unsupported field type {tp!r}")


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """The dataclass `cls` from a mapping of its fields (nested sections are mappings too): every value is
    checked against the field's annotation; an unknown key, a missing required field or a value of the wrong
    type raises ConfigError naming the field (`prefix.key`, `prefix[i]` in lists)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key(s) {[where + k for k in unknown]}; {prefix or 'top level'} has {names}"
        )
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for key in required:
        if key not in data:
            raise ConfigError(f"{prefix}.{key} is missing" if prefix else f"{key} is missing")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'}; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. objective.beta=0.1)")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"override {item!r} names no field (key=value)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key.strip()}: cannot parse {raw!r} as YAML: {exc}") from exc
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part}")
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's mapping of sections. The one place a config file is read, for every config of tether."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def read_config_dict(
    path: str | Path | None = None, overrides: Sequence[str] | None = None
) -> dict[str, Any]:
    """The raw config: the YAML file's mapping (empty when path is None) with the key=value overrides merged
    in (`tether eval`'s and `tether iterate`'s configs; training adds TRL files and sources: resolve_config)."""
    data = read_yaml(path) if path is not None else {}
    return _merge(data, parse_overrides(list(overrides or [])))


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """A TrainConfig from a plain mapping of its sections, checked (`TrainConfig.validate`, paths aside)."""
    config = from_dict(TrainConfig, data)
    config.validate(check_paths=False)
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a TrainConfig from YAML (or defaults when path is None) and apply key=value overrides.

    The YAML may be tether's or a `trl dpo` config (docs/trl.md); `resolve_config` also says where each value
    came from."""
    return resolve_config(path, overrides)[0]


def resolve_config(
    path: str | Path | None = None, overrides: Sequence[str] | None = None
) -> tuple[TrainConfig, dict[str, str]]:
    """(config, sources): sources maps every field set by the file or the command line ("optim.lr") to where
    its value came from; fields absent from it hold tether's defaults."""
    data: dict[str, Any] = {}
    overrides = list(overrides or [])
    sources: dict[str, str] = {}
    if path is not None:
        data = read_yaml(path)
        if trl_config.is_trl_config(data):  # TRL's field names and defaults (tether.trl_config)
            trl_values, overrides = trl_config.trl_overrides(overrides)
            try:
                data, sources = trl_config.from_trl({**data, **trl_values})
            except trl_config.TRLConfigError as exc:
                raise ConfigError(f"{path} (a TRL config): {exc}") from exc
            sources.update({k: "command line (TRL name)" for k in _trl_targets(trl_values, sources)})
        else:
            sources = {k: f"{path}" for k in _flat_keys(data)}
    update = parse_overrides(overrides)
    data = _switched_objective(data, update)
    kept = data.get("objective") if isinstance(data.get("objective"), dict) else {}
    sources = {k: v for k, v in sources.items() if not k.startswith("objective.") or k[10:] in kept}
    data = _merge(data, update)
    sources.update({k: "command line" for k in _flat_keys(update)})
    return config_from_dict(data), sources


def _flat_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        if isinstance(v, dict) and v and k in _SECTIONS:
            keys.extend(f"{prefix}{k}.{sub}" for sub in v)
        else:
            keys.append(f"{prefix}{k}")
    return keys


def _trl_targets(trl_values: dict[str, Any], sources: dict[str, str]) -> list[str]:
    """The tether keys whose value came from a TRL field given on the command line."""
    return [key for key, source in sources.items() if any(f"TRL {name}" in source for name in trl_values)]


def _switched_objective(data: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`objective.name=X` on the command line replaces the file's objective: the file's hyperparameters belong
    to the file's objective (H-DPO's alpha is not TDPO2's alpha), so they are dropped, with a note, unless
    the command line sets them too. beta and the loss weights carry over."""
    new = (update.get("objective") or {}).get("name")
    section = data.get("objective")
    if not isinstance(section, dict) or new is None or new == section.get("name", "dpo"):
        return data
    keep = {"name", "beta", "weight", "sft_weight"}
    dropped = sorted(k for k in section if k not in keep and k not in update["objective"])
    if dropped:
        old = section.get("name", "dpo")
        listed = ", ".join(f"objective.{k}={section[k]!r}" for k in dropped)
        print(
            f"[tether] objective.name={new} replaces the file's {old}: dropped {listed} (they are {old}'s;"
            " set them on the command line to keep them)",
            file=sys.stderr,
        )
    return {**data, "objective": {k: v for k, v in section.items() if k not in dropped}}


def explain(config: TrainConfig, sources: dict[str, str]) -> str:
    """Every config field with its resolved value and where the value came from (`tether train --explain`)."""
    lines = []
    flat = _flat_values(config.to_dict())
    width = max(len(f"{k}: {json.dumps(v)}") for k, v in flat.items())
    for key, value in flat.items():
        text = f"{key}: {json.dumps(value)}"
        lines.append(f"{text:<{width}}  # {sources.get(key, 'tether default')}")
    return "\n".join(lines)


def _flat_values(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat_values(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_SECTIONS = frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.name != "output_dir")


def field_docs() -> dict[str, str]:
    """{"optim.lr": "peak learning rate of AdamW", ...}: every config field with its comment in this module
    (the comment on the field's line and the comment lines right after it, else the comment block above it),
    so that `tether train --help` and this file cannot disagree."""
    import ast
    import inspect

    def docs_of(cls: type) -> dict[str, str]:
        lines = inspect.getsource(cls).splitlines()
        body = ast.parse("\n".join(lines)).body[0].body
        out = {}
        for node in body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            trailing = [
                ln.split("#", 1)[1].strip() for ln in lines[node.lineno - 1 : node.end_lineno] if "#" in ln
            ]
            following = node.end_lineno
            while trailing and following < len(lines) and lines[following].strip().startswith("#"):
                trailing.append(lines[following].strip()[1:].strip())
                following += 1
            leading, j = [], node.lineno - 2
            while not trailing and j >= 0 and lines[j].strip().startswith("#"):
                leading.insert(0, lines[j].strip()[1:].strip())
                j -= 1
            out[node.target.id] = " ".join(trailing or leading)
        return out

    result = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SECTIONS:
            section = typing.get_type_hints(TrainConfig)[f.name]
            for name, doc in docs_of(section).items():
                result[f"{f.name}.{name}"] = doc
        else:
            result[f.name] = docs_of(TrainConfig).get(f.name, "")
    return result


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


# Fields of the fingerprint that --resume accepts when they changed (it prints them): they change neither what
# the checkpoint holds nor the math of the steps ahead, only how many steps there are and how they run. Every
# other field is refused unless checkpoint.allow_changed_config=true. docs/training.md has the table.
RESUME_ACCEPTED = frozenset(
    {
        "data.train",  # the same content (compared by its digest) under another path
        "data.on_bad_row",  # with the same content the kept rows are the same (error mode kept every row)
        "optim.max_steps",
        "optim.epochs",
        "optim.on_nonfinite",
        "optim.chunk_size",
        "model.attn_implementation",
        "model.gradient_checkpointing",
    }
)


DATA_CONTENT = "data content (sha256)"  # the fingerprint's key for the data digest


def config_fingerprint(
    config: TrainConfig, processes: int = 1, data_digest: str | None = None
) -> dict[str, Any]:
    """What a resumed run is compared on with the run it continues, keyed by config field name so that a
    refusal can say which field changed (`resume_changes` says which changes are refused).

    The data order depends on the global batch only (batch 4 x 1 process == 2 x 2 processes), so that is
    what is compared, not its factors. Paths are compared resolved (`d/../d/x` is `d/x`), Hub ids by id and
    commit (`tether.hub.identity`); the data by its content, data_digest (`tether.train.data_digest`), when
    given.
    """

    def resolved(path: str | None, revision: str | None = None, kind: str = "model") -> str | None:
        return hub.identity(path, revision, kind)

    optim = config.optim
    fields: dict[str, Any] = {"objective.name": config.objective.name}
    fields.update({f"objective.{k}": v for k, v in config.objective.hparams().items()})
    fields.update(
        {
            "optim.seed": optim.seed,
            "global batch (optim.batch_size x optim.grad_accum x processes)": optim.batch_size
            * optim.grad_accum
            * processes,
            "data.train": resolved(config.data.train, config.data.revision, "dataset"),
            "data.split": config.data.split,
            "data.subset": config.data.subset,
            "data.shuffle": config.data.shuffle,
            "data.max_length": config.data.max_length,
            "data.max_prompt_length": config.data.max_prompt_length,
            "data.on_bad_row": config.data.on_bad_row,
            "model.path": resolved(config.model.path, config.model.revision),
            "model.adapter": resolved(config.model.adapter),
            "model.tokenizer_path": resolved(config.model.tokenizer_path),
            "model.load_in_4bit": config.model.load_in_4bit,
            "model.dtype": config.model.dtype,
            "model.attn_implementation": config.model.attn_implementation,
            "model.gradient_checkpointing": config.model.gradient_checkpointing,
            "lora.enabled": config.lora.enabled,
            "reference.mode": config.reference_mode(),
            "reference.path": resolved(config.reference.path, config.reference.revision),
            "optim.lr": optim.lr,
            "optim.scheduler": optim.scheduler,
            "optim.warmup_steps": optim.warmup_steps,
            "optim.weight_decay": optim.weight_decay,
            "optim.adam_beta1": optim.adam_beta1,
            "optim.adam_beta2": optim.adam_beta2,
            "optim.adam_eps": optim.adam_eps,
            "optim.max_grad_norm": optim.max_grad_norm,
            "optim.mixed_precision": optim.mixed_precision,
            "optim.max_steps": optim.max_steps,
            "optim.epochs": optim.epochs,
            "optim.on_nonfinite": optim.on_nonfinite,
            "optim.chunk_size": optim.chunk_size,
        }
    )
    if data_digest is not None:
        fields[DATA_CONTENT] = data_digest
    if config.lora.enabled:
        fields.update(
            {
                "lora.r": config.lora.r,
                "lora.alpha": config.lora.alpha,
                "lora.dropout": config.lora.dropout,
                "lora.target_modules": sorted(config.lora.target_modules),
            }
        )
    if config.reference_mode() == "cache":
        fields["reference.cache_dtype"] = config.reference.cache_dtype
    if config.model.load_in_4bit:
        fields["model.bnb_4bit_quant_type"] = config.model.bnb_4bit_quant_type
        fields["model.use_bnb_nested_quant"] = config.model.use_bnb_nested_quant
    return json.loads(json.dumps(fields))


def resume_changes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, accepted): the fingerprint fields that differ between a checkpoint (saved) and this run.

    A field only one side records (a checkpoint of an older tether, a LoRA field on one side) is compared
    through the fields both record (lora.enabled, reference.mode)."""
    changed = sorted(k for k in saved.keys() & current.keys() if saved[k] != current[k])
    accepted = set(RESUME_ACCEPTED)
    if DATA_CONTENT not in saved.keys() & current.keys():  # without both digests the path is all there is
        accepted.discard("data.train")
    return [k for k in changed if k not in accepted], [k for k in changed if k in accepted]
