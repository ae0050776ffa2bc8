"""The evaluation config: one dataclass, loadable from YAML with key=value overrides.

Unknown keys and values of the wrong type or range raise `ConfigError`, whose message names the field.
Override values are parsed as YAML (`temperatures=[0.2,1.0]`, `reference=null`, `seed=3`).
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the field (and the file when there is one)."""


@dataclass
class ModelSpec:
    """One model to evaluate."""

    name: str  # label in eval.json and the plots
    path: str  # local folder with config, tokenizer and safetensors weights


@dataclass
class EvalConfig:
    """What `run_eval` evaluates and how; one line per field, units in the comment."""

    models: list[ModelSpec] = field(
        default_factory=list
    )  # policies: [{name, path}] (a bare path is also read)
    reference: str | None = None  # local folder of pi_ref: sequential KL, win rates, a "reference" row
    prompts: str | None = (
        None  # JSONL file, one {"prompt": ...} per line (+ "answer" / "test" / "entry_point")
    )
    task: str | None = None  # built-in task of tether.toy.tasks, instead of `prompts`
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


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """value checked/converted to annotation tp; ConfigError naming `name` when it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(name, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{name}: must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is Callable:
        if not callable(value):
            raise ConfigError(f"{name}: must be callable, got {value!r}")
        return value
    if tp is ModelSpec:
        return _model_spec(name, value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: must be a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported type {tp}")  # pragma: no cover


def _model_spec(name: str, value: Any) -> ModelSpec:
    if isinstance(value, ModelSpec):
        return value
    if isinstance(value, str):
        return ModelSpec(name=os.path.basename(os.path.normpath(value)), path=value)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}: must be {{name, path}} or a path, got {value!r}")
    unknown = set(value) - {"name", "path"}
    if unknown:
        raise ConfigError(f"{name}.{sorted(unknown)[0]}: unknown key (a model has 'name' and 'path')")
    if "path" not in value:
        raise ConfigError(f"{name}.path: missing")
    path = _coerce(f"{name}.path", value["path"], str)
    label = _coerce(f"{name}.name", value.get("name", os.path.basename(os.path.normpath(path))), str)
    return ModelSpec(name=label, path=path)


def config_from_dict(data: Mapping[str, Any]) -> EvalConfig:
    """An EvalConfig from a plain mapping; unknown keys and ill-typed values raise ConfigError."""
    hints = typing.get_type_hints(EvalConfig)
    known = {f.name for f in fields(EvalConfig)}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    kwargs = {key: _coerce(key, value, hints[key]) for key, value in data.items()}
    return EvalConfig(**kwargs)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """["key=value", ...] -> {key: YAML-parsed value}; a malformed item raises ConfigError."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key.strip()}: cannot parse {raw!r}: {exc}") from exc
    return out


def load_config(path: str | None, overrides: Sequence[str] = ()) -> EvalConfig:
    """Read a YAML config (or none), apply key=value overrides, validate; ConfigError names the field."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except OSError as exc:
            raise ConfigError(f"config {path!r}: cannot read: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path!r}: invalid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path!r}: the top level must be a mapping of fields")
        data.update(loaded or {})
    data.update(parse_overrides(overrides))
    try:
        return config_from_dict(data).validate()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
