"""Probes the reliability tests install into a tether training run, in-process or in a launched process.

In-process: `monkeypatch.setattr(tether.train, "load_causal_lm", make_loader(tether.train.load_causal_lm, ...))`.
As a script (under `python` or `torchrun`): `python _probes.py train CONFIG [key=value ...] [--resume]` runs
`tether.cli.main` with the probes chosen by environment variables:

  RELIABILITY_NAN_FORWARD=N  the N-th policy forward with gradient (1-based, counted per process, one per
                             micro-batch: the input embedding runs once per forward) gets NaN in
                             row RELIABILITY_NAN_ROW (default 0) of its input embeddings: that one sequence's
                             loss is NaN, the other rows of the micro-batch stay finite
  RELIABILITY_NAN_RANK=R     inject only on the process with RANK R (default: every process)
  RELIABILITY_NAN_GRAD_FORWARD=N  in the backward of the N-th policy forward, the gradient of the output
                             embedding becomes NaN (the loss stays finite: only the gradient check can see it)
  RELIABILITY_PAUSE_FORWARD=N  just before the N-th policy forward with gradient, create RELIABILITY_PAUSE_FILE
                             and sleep (the test kills the process there)
  RELIABILITY_PAUSE_SAVE=S   inside the checkpoint save of step S, after accelerate wrote the model and optimizer
                             into `step-S.partial/` and before `state.json`: create the pause file and sleep
  RELIABILITY_SLOW_CACHE_S=T  on the main process, the reference cache build (reference.mode=cache) first
                             sleeps T seconds: the other processes wait for it at a barrier
  RELIABILITY_REPORT_DIR=D   after training, write D/rank-R.json with the exit code, skipped_steps and a SHA-256
                             of this process's parameters (to compare ranks)

Policy forwards are told apart from reference forwards by autograd: the reference always runs without
gradient (a copy in eval mode under no_grad, or the policy itself under no_grad for the cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PAUSE_SECONDS = 300  # the test kills the process long before; a bound so that nothing can hang forever


def install(
    model: torch.nn.Module,
    *,
    nan_forward: int = 0,
    nan_row: int = 0,
    nan_grad_forward: int = 0,
    pause_forward: int = 0,
    pause_file: str | None = None,
) -> dict[str, int]:
    """Register the probes on `model`; returns the live counter {"forwards": policy forwards so far}."""
    state = {"forwards": 0}

    def pre_hook(module, args):
        if not torch.is_grad_enabled():
            return None
        state["forwards"] += 1
        if pause_forward and state["forwards"] == pause_forward and pause_file:
            Path(pause_file).touch()
            time.sleep(PAUSE_SECONDS)
        return None

    def embed_hook(module, args, output):
        if torch.is_grad_enabled() and nan_forward and state["forwards"] == nan_forward:
            output = output.clone()
            output[nan_row] = float("nan")
            return output
        return None

    def grad_hook(grad):
        if nan_grad_forward and state["forwards"] == nan_grad_forward:
            return torch.full_like(grad, float("nan"))
        return None

    # The input embedding runs once per policy forward of a micro-batch (`final_hidden_states`), whether the
    # batch runs in one model call or in one call per row length.
    model.get_input_embeddings().register_forward_pre_hook(pre_hook)
    model.get_input_embeddings().register_forward_hook(embed_hook)
    if nan_grad_forward:
        model.get_output_embeddings().weight.register_hook(grad_hook)
    return state


def make_loader(original: Callable, holder: dict[str, Any] | None = None, **probe_kwargs: Any) -> Callable:
    """Wrap `tether.train.load_causal_lm`: the first model loaded (the policy) gets the probes."""
    holder = {} if holder is None else holder

    def load(path, config, *args, **kwargs):  # the signature of load_causal_lm, whatever it grows
        model = original(path, config, *args, **kwargs)
        if "policy" not in holder:
            holder["policy"] = model
            holder["state"] = install(model, **probe_kwargs)
        return model

    return load


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter (by name), bit for bit."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _pause_in_save(step: int, pause_file: str) -> None:
    from accelerate import Accelerator

    original = Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        out = original(self, output_dir, **kwargs)
        if output_dir is not None and Path(output_dir).name == f"step-{step:08d}.partial":
            if self.is_main_process:
                Path(pause_file).touch()
            time.sleep(PAUSE_SECONDS)
        return out

    Accelerator.save_state = save_state


def _slow_cache_build(train_module, seconds: float) -> None:
    original = train_module.build_reference_cache

    def build(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    train_module.build_reference_cache = build


def main(argv: list[str]) -> int:
    import tether.train as train_module
    from tether import cli

    env = os.environ
    rank = int(env.get("RANK", "0"))
    nan_rank = env.get("RELIABILITY_NAN_RANK")
    inject = nan_rank is None or int(nan_rank) == rank
    pause_file = env.get("RELIABILITY_PAUSE_FILE")
    holder: dict[str, Any] = {}
    train_module.load_causal_lm = make_loader(
        train_module.load_causal_lm,
        holder,
        nan_forward=int(env.get("RELIABILITY_NAN_FORWARD", "0")) if inject else 0,
        nan_row=int(env.get("RELIABILITY_NAN_ROW", "0")),
        nan_grad_forward=int(env.get("RELIABILITY_NAN_GRAD_FORWARD", "0")) if inject else 0,
        pause_forward=int(env.get("RELIABILITY_PAUSE_FORWARD", "0")),
        pause_file=pause_file,
    )
    if env.get("RELIABILITY_SLOW_CACHE_S"):
        _slow_cache_build(train_module, float(env["RELIABILITY_SLOW_CACHE_S"]))
    if env.get("RELIABILITY_PAUSE_SAVE"):
        _pause_in_save(int(env["RELIABILITY_PAUSE_SAVE"]), pause_file or "")

    results: dict[str, Any] = {}
    original_train = train_module.train

    def train(config, resume=False):
        results["result"] = original_train(config, resume=resume)
        return results["result"]

    train_module.train = train  # tether.cli imports it from the module at call time
    code = cli.main(argv)
    report_dir = env.get("RELIABILITY_REPORT_DIR")
    if report_dir:
        result = results.get("result")
        report = {
            "rank": rank,
            "world_size": int(env.get("WORLD_SIZE", "1")),
            "exit_code": code,
            "steps": result.steps if result else None,
            "skipped_steps": result.skipped_steps if result else None,
            "param_digest": parameter_digest(holder["policy"]) if "policy" in holder else None,
        }
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        (Path(report_dir) / f"rank-{rank}.json").write_text(json.dumps(report))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
