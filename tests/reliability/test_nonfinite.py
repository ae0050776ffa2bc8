"""Non-finite losses and gradients: stop naming the step and the rows, or skip the step without a trace.

Promise (config `optim.on_nonfinite`, train.py): "error" (default) raises `NonFiniteError` naming the step and
the batch rows; "skip" drops the step, leaves parameters, optimizer state and LR schedule exactly as they were,
and counts it (`skipped_steps` in metrics.jsonl and the checkpoint); under several processes every process
agrees (no rank steps while another skips, none hangs).

NaN is injected by tests/reliability/_probes.py: a forward hook puts NaN into the input embeddings of one row
(one sequence) of one chosen policy forward, so exactly one pair's loss is NaN; or a gradient hook makes the
output embedding's gradient NaN while the loss stays finite. 8 pairs in file order (data.shuffle=false),
batch 2, no accumulation: step s holds JSONL lines 2s-1 and 2s, and the 3rd forward is step 3 (lines 5, 6).
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

import tether.train
from tether.config import ConfigError, load_config
from tether.train import NonFiniteError, NonFiniteWeightsError, train

RUN = {
    "data": {"shuffle": False},
    "optim": {"batch_size": 2, "max_steps": 5, "scheduler": "constant"},
    "checkpoint": {"every": 1, "keep_last": 10},
}


@pytest.fixture
def setup(tmp_path, write_jsonl, write_config, good_rows):
    data = write_jsonl(tmp_path / "train.jsonl", good_rows(8, seed=2))
    out = tmp_path / "run"
    return write_config(tmp_path / "cfg.yaml", data, out, **RUN), out


def _with_probes(monkeypatch, probes, **kwargs):
    monkeypatch.setattr(
        tether.train, "load_causal_lm", probes.make_loader(tether.train.load_causal_lm, **kwargs)
    )


def _optimizer_state(folder):
    return torch.load(folder / "optimizer.bin", weights_only=True, map_location="cpu")


def _assert_same_state(a, b):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "parameters changed"
    oa, ob = _optimizer_state(a), _optimizer_state(b)
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for name, value in oa["state"][i].items():
            assert torch.equal(value, ob["state"][i][name]), f"optimizer state {i}.{name} changed"
    scheduler = "custom_checkpoint_0.pkl"  # the LR scheduler registered for checkpointing
    sa = torch.load(a / scheduler, weights_only=False)
    sb = torch.load(b / scheduler, weights_only=False)
    assert sa == sb, "the LR schedule advanced"


def test_nan_stops_by_default_naming_step_and_row(setup, monkeypatch, probes):
    config, out = setup
    _with_probes(monkeypatch, probes, nan_forward=3, nan_row=0)
    with pytest.raises(NonFiniteError) as info:
        train(load_config(config))
    message = str(info.value)
    assert re.search(r"\bstep 3\b", message), message
    rows = re.search(r"rows[^:\[]*:\s*\[([\d, ]+)\]", message)
    assert rows and [int(r) for r in rows.group(1).split(",")] == [5], message
    assert "optim.on_nonfinite=skip" in message  # the fix
    assert not (out / "final").exists()
    assert [p.name for p in tether.train.complete_checkpoints(out / "checkpoints")][-1] == "step-00000002"


def test_nan_loss_skip_leaves_parameters_optimizer_and_schedule_unchanged(
    setup, monkeypatch, probes, metrics
):
    config, out = setup
    _with_probes(monkeypatch, probes, nan_forward=3, nan_row=1)
    result = train(load_config(config, ["optim.on_nonfinite=skip"]))
    assert result.skipped_steps == 1
    ckpt = out / "checkpoints"
    _assert_same_state(ckpt / "step-00000002", ckpt / "step-00000003")
    # Training goes on afterwards: the next step does change the weights.
    w3, w4 = (
        load_file(str(ckpt / "step-00000003" / "model.safetensors")),
        load_file(str(ckpt / "step-00000004" / "model.safetensors")),
    )
    assert any(not torch.equal(w3[k], w4[k]) for k in w3)
    logged = metrics(out / "metrics.jsonl")
    assert [m["skipped_steps"] for m in logged] == [0, 0, 1, 1, 1]
    assert all(math.isfinite(m["loss"]) for m in logged if m["step"] != 3)
    assert json.loads((ckpt / "step-00000004" / "state.json").read_text())["skipped_steps"] == 1


def test_nan_gradient_with_finite_loss_is_caught_too(setup, monkeypatch, probes, metrics):
    config, out = setup
    _with_probes(monkeypatch, probes, nan_grad_forward=3)
    with pytest.raises(NonFiniteError, match=r"\bstep 3\b"):
        train(load_config(config))
    monkeypatch.undo()
    _with_probes(monkeypatch, probes, nan_grad_forward=3)
    out2 = out.with_name("run_skip")
    result = train(load_config(config, ["optim.on_nonfinite=skip", f"output_dir={out2}"]))
    assert result.skipped_steps == 1
    _assert_same_state(out2 / "checkpoints" / "step-00000002", out2 / "checkpoints" / "step-00000003")
    assert [m["skipped_steps"] for m in metrics(out2 / "metrics.jsonl")] == [0, 0, 1, 1, 1]


def test_metrics_jsonl_stays_strict_json_when_a_step_is_skipped(setup, monkeypatch, probes):
    """NaN/Infinity are not JSON: a skipped step's metrics must not break strict readers (jq, browsers)."""
    config, out = setup
    _with_probes(monkeypatch, probes, nan_forward=3)
    train(load_config(config, ["optim.on_nonfinite=skip"]))

    def refuse(token):
        raise ValueError(f"non-JSON constant {token}")

    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)


# --- non-finite weights are never saved -------------------------------------------------------------------


def _all_finite(folder):
    return all(torch.isfinite(t).all() for t in load_file(str(folder / "model.safetensors")).values())


def test_float16_training_is_refused_before_anything_is_written(setup, tmp_path):
    """Issue 14: model.dtype=float16 made step 1's checkpoint all NaN although its loss and gradient norm were
    finite (AdamW's eps 1e-8 and small squared gradients are 0 in float16, and 0/0 is NaN); with skip the run
    exited 0 with an all-NaN final model. Now it is refused with the reason and the fixes before any step, in
    both modes, and no checkpoint or final model is written."""
    config, out = setup
    with pytest.raises(ConfigError) as info:
        train(load_config(config, ["model.dtype=float16", "optim.on_nonfinite=skip"]))
    message = str(info.value)
    assert "float16" in message and "model.dtype=float32 with optim.mixed_precision=fp16" in message
    assert not (out / "final").exists() and not (out / "checkpoints").exists()


def test_float16_base_with_lora_still_trains(setup):
    """The refusal is only for float16 *trained* parameters: a frozen float16 base with LoRA (PEFT keeps the
    adapters in float32) trains, and every checkpoint and the final model are finite."""
    config, out = setup
    train(load_config(config, ["model.dtype=float16", "lora.enabled=true", "optim.max_steps=2"]))
    checkpoints = tether.train.complete_checkpoints(out / "checkpoints")
    assert checkpoints and all(_all_finite(c) for c in checkpoints) and _all_finite(out / "final")


def _poison_adamw(monkeypatch, at_step: int):
    """AdamW that writes NaN into its first parameter (model.embed_tokens.weight) after step `at_step`: weights
    go bad while every loss and gradient stays finite, as in float16."""

    class PoisonedAdamW(torch.optim.AdamW):
        steps = 0

        @torch.no_grad()
        def step(self, closure=None):
            out = super().step(closure)
            PoisonedAdamW.steps += 1
            if PoisonedAdamW.steps == at_step:
                self.param_groups[0]["params"][0][0, 0] = float("nan")
            return out

    monkeypatch.setattr(torch.optim, "AdamW", PoisonedAdamW)


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_nonfinite_weights_are_never_checkpointed(setup, monkeypatch, mode):
    """Weights that turn NaN at step 3 behind finite losses: writing step 3's checkpoint is refused with
    NonFiniteWeightsError naming the tensor and the intact checkpoints; steps 1 and 2 stay complete and
    finite, and no step-3 folder (complete or partial) and no final model exist."""
    config, out = setup
    _poison_adamw(monkeypatch, at_step=3)
    with pytest.raises(NonFiniteWeightsError) as info:
        train(load_config(config, [f"optim.on_nonfinite={mode}"]))
    message = str(info.value)
    assert "model.embed_tokens.weight" in message and "step-00000003" in message
    assert "step-00000001, step-00000002" in message  # the intact checkpoints, named
    ckpt = out / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000001", "step-00000002"]
    assert all(_all_finite(c) for c in tether.train.complete_checkpoints(ckpt))
    assert not (out / "final").exists()


def test_nonfinite_weights_are_never_saved_as_the_final_model(setup, monkeypatch):
    """Without checkpoints, NaN weights after the last step: no final model is written."""
    config, out = setup
    _poison_adamw(monkeypatch, at_step=5)
    with pytest.raises(NonFiniteWeightsError, match="final model"):
        train(load_config(config, ["checkpoint.every=0", "optim.on_nonfinite=skip"]))
    assert not (out / "final").exists() and not (out / "final.partial").exists()


# --- two processes (gloo) ------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_skip_the_same_step(setup, runner, metrics, tmp_path):
    """NaN on rank 0 only: both ranks skip step 3 and end with bitwise equal parameters."""
    config, out = setup
    reports = tmp_path / "reports"
    env = {
        "RELIABILITY_NAN_FORWARD": "3",
        "RELIABILITY_NAN_RANK": "0",
        "RELIABILITY_REPORT_DIR": str(reports),
    }
    done = runner.run(
        ["train", str(config), "optim.batch_size=1", "optim.on_nonfinite=skip"],
        tmp_path / "log",
        probes=True,
        nproc=2,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((reports / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["skipped_steps"] for r in ranks] == [1, 1]
    assert ranks[0]["param_digest"] == ranks[1]["param_digest"]
    logged = metrics(out / "metrics.jsonl")
    assert [m["skipped_steps"] for m in logged] == [0, 0, 1, 1, 1]
    assert [m["pairs"] for m in logged] == [2] * 5  # one pair per process per step
    _assert_same_state(out / "checkpoints" / "step-00000002", out / "checkpoints" / "step-00000003")


@pytest.mark.slow
def test_two_processes_both_stop_when_only_one_sees_nan(setup, runner, tmp_path):
    """NaN on rank 1 only (not the main process): both ranks raise, neither waits forever for the other."""
    config, _ = setup
    env = {"RELIABILITY_NAN_FORWARD": "3", "RELIABILITY_NAN_RANK": "1"}
    done = runner.run(
        ["train", str(config), "optim.batch_size=1"],
        tmp_path / "log",
        probes=True,
        nproc=2,
        env=env,
        timeout=300,
    )
    assert done.returncode != 0
    # One line per rank: the CLI prints a stopped run's error as `tether train: error: ...`, exit 1.
    assert done.stderr.count("tether train: error: non-finite loss or gradient") >= 2, done.stderr[-4000:]
    assert re.search(r"\bstep 3\b", done.stderr)
