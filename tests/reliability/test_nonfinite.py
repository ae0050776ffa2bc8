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
from tether.config import load_config
from tether.train import NonFiniteError, train

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
    assert done.stderr.count("NonFiniteError") >= 2, done.stderr[-4000:]  # one per rank
    assert re.search(r"\bstep 3\b", done.stderr)
