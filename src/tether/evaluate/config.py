"""The evaluation config: one dataclass, loaded from YAML with key=value overrides by the mechanism of
`tether.config` (the same `ConfigError`, type checks and override syntax as the training config).

Unknown keys and values of the wrong type or range raise `ConfigError`, whose message names the field.
Override values are parsed as YAML (`temperatures=[0.2,1.0]`, `reference=null`, `seed=3`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from tether.config import ConfigError, from_dict, read_config_dict

__all__ = ["ConfigError", "EvalConfig", "ModelSpec", "config_from_dict", "load_config"]


@dataclass
class ModelSpec:
    """One model to evaluate."""

    name: str  # label in eval.json and the plots
    path: (
        str  # local folder with config, tokenizer and safetensors weights, a .gguf file, or a Hub id (cache)
    )
    revision: str | None = None  # Hub revision of a Hub id in `path` (default: main)


@dataclass
class EvalConfig:
    """What `run_eval` evaluates and how; one line per field, units in the comment."""

    models: list[ModelSpec] = field(
        default_factory=list
    )  # policies: [{name, path}] (a bare path is also read)
    reference: str | None = (
        None  # local folder, .gguf or Hub id of pi_ref: sequential KL, win rates, a "reference" row
    )
    prompts: str | None = (
        None  # JSONL file, one {"prompt": ...} per line (+ "answer" / "test" / "entry_point")
    )
    task: str | None = None  # built-in task (tether.chat_tasks, tether.toy.tasks), instead of `prompts`
    num_prompts: int = 64  # prompts drawn from `task`; for `prompts`, the first rows kept (0 = all)
    temperatures: list[float] = field(default_factory=lambda: [0.2, 0.6, 1.0])  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass, in (0, 1]
    n_samples: int = 16  # samples per prompt and temperature
    k: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # pass@k values (those <= n_samples)
    max_new_tokens: int = 128  # tokens generated per sample at most
    seed: int = 0  # sampling seed (and task prompt seed)
    verifier: str | Callable[[str, str], bool] | None = (
        None  # exact_match | execution | task | module:function
    )
    reward: str | Callable[[str, str], float] | None = None  # task | module:function | reward-model folder
    output_dir: str = "eval_out"  # eval.json and the PNG plots go here
    cache_dir: str | None = None  # sample cache; None = <output_dir>/samples
    batch_size: int = 16  # sequences sampled at once (and reward-model batch)
    sampler: Literal["shared_prefix", "generate"] = "shared_prefix"  # decoding loop; see docs/evaluate.md
    use_chat_template: bool = True  # format prompts with the tokenizer's chat template when it has one
    diversity_unit: Literal["word", "char"] = "word"  # units of distinct-n and edit distance
    device: str = "auto"  # "auto" = cuda if available else cpu; or any torch device string
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # model weights dtype for evaluation
    seq_chunk: int = 8  # sequences per forward pass when scoring entropy / KL
    token_chunk: int = 512  # response tokens per output-head call when scoring (memory: token_chunk x V)
    execution_timeout_s: float = 10.0  # wall-clock limit per program for verifier=execution, seconds
    execution_workers: int = 4  # programs run at once for verifier=execution
    trust_remote_code: bool = False  # allow model code from the model folders (off unless asked)
    progress: bool = True  # tqdm progress bars

    def validate(self) -> EvalConfig:
        """Check ranges and combinations; raises ConfigError naming the field. Returns self."""
        if not self.models:
            raise ConfigError("models: give at least one {name, path}")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names) or "reference" in names:
            raise ConfigError(f"models: names must be unique and not 'reference', got {names}")
        if (self.prompts is None) == (self.task is None):
            raise ConfigError("prompts / task: give exactly one (a JSONL file or a built-in task name)")
        if self.prompts is not None and not os.path.isfile(self.prompts):
            raise ConfigError(f"prompts: no such file {self.prompts!r}")
        _check(self.num_prompts >= 0, "num_prompts", "must be >= 0")
        _check(bool(self.temperatures), "temperatures", "must not be empty")
        _check(all(t >= 0 for t in self.temperatures), "temperatures", "must all be >= 0")
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(self.n_samples >= 1, "n_samples", "must be >= 1")
        _check(
            bool(self.k) and all(1 <= k <= self.n_samples for k in self.k),
            "k",
            "values must be in [1, n_samples]",
        )
        for name in ("max_new_tokens", "batch_size", "seq_chunk", "token_chunk", "execution_workers"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        _check(self.execution_timeout_s > 0, "execution_timeout_s", "must be > 0")
        if self.verifier == "task" or self.reward == "task":
            _check(
                self.task is not None,
                "verifier" if self.verifier == "task" else "reward",
                "'task' needs `task`",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (callables shown by their qualified name)."""
        out = asdict(self)
        for key in ("verifier", "reward"):
            value = getattr(self, key)
            if callable(value):
                out[key] = (
                    f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', repr(value))}"
                )
        return out


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


def _model_entry(value: Any) -> Any:
    """A bare path stands for {name: its folder's name, path}; so does a mapping without a name."""
    if isinstance(value, str):
        value = {"path": value}
    if isinstance(value, Mapping) and "name" not in value and isinstance(value.get("path"), str):
        value = {**value, "name": os.path.basename(os.path.normpath(value["path"]))}
    return value


def config_from_dict(data: Mapping[str, Any]) -> EvalConfig:
    """An EvalConfig from a plain mapping (`tether.config.from_dict`); unknown keys and ill-typed values raise
    ConfigError naming the field."""
    if isinstance(data.get("models"), (list, tuple)):
        data = {**data, "models": [_model_entry(m) for m in data["models"]]}
    return from_dict(EvalConfig, data)


def load_config(path: str | None, overrides: Sequence[str] = ()) -> EvalConfig:
    """Read a YAML config (or none), apply key=value overrides, validate; ConfigError names the field."""
    data = read_config_dict(path, overrides)
    try:
        return config_from_dict(data).validate()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
