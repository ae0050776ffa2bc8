"""Evaluation of trained policies by what they generate.

Modules, one job each:
- `sampling`: n samples per prompt over a temperature grid from a local HF causal LM, cached as JSONL.
- `passk`: the unbiased pass@k estimator (Chen et al. 2021).
- `verifiers` / `execution`: exact match, user callables, and program execution in a limited subprocess.
- `diversity`: distinct-n, unique answers, mean pairwise normalized edit distance.
- `likelihood`: per-token policy entropy and sequential KL to a reference, chunked (no (B, T, V) tensors).
- `rewards`: reward-model or callable rewards and win rates against reference samples.
- `config` / `runner` / `plots`: the eval config, `run_eval` (eval.json + PNGs) and `main` for `tether eval`.

Names are re-exported lazily, so `import tether.evaluate` loads neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "pass_at_k": "passk",
    "mean_pass_at_k": "passk",
    "distinct_n": "diversity",
    "unique_answers": "diversity",
    "pairwise_edit_distance": "diversity",
    "SandboxConfig": "execution",
    "ExecutionResult": "execution",
    "run_program": "execution",
    "run_programs": "execution",
    "sandbox_report": "execution",
    "ExactMatch": "verifiers",
    "ProgramVerifier": "verifiers",
    "make_verifier": "verifiers",
    "SampleSet": "sampling",
    "sample": "sampling",
    "sample_grid": "sampling",
    "ResponseStats": "likelihood",
    "response_stats": "likelihood",
    "score_texts": "likelihood",
    "policy_entropy": "likelihood",
    "sequential_kl": "likelihood",
    "RewardModelScorer": "rewards",
    "load_reward": "rewards",
    "win_rate": "rewards",
    "EvalConfig": "config",
    "ModelSpec": "config",
    "ConfigError": "config",
    "load_config": "config",
    "run_eval": "runner",
    "main": "runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"tether.evaluate.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'tether.evaluate' has no attribute {name!r}")
