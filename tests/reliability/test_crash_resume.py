"""Crash and resume: a SIGKILLed `tether train` continues, with --resume, exactly as if never stopped.

Promise (DESIGN.md section 4, train.py docstring): checkpoints are written into `step-N.partial/` and renamed
once complete; only complete ones are loaded; a resumed run's metrics and final weights equal those of the
uninterrupted run, bit for bit on CPU with optim.deterministic=true.

One uninterrupted run (module fixture) is the reference. Each scenario starts the same command in its own
process group, kills it with SIGKILL at a chosen moment, runs `tether train ... --resume`, and compares every
metric of metrics.jsonl (except step_time_s) and every tensor of final/model.safetensors with the reference.
The run: 32 pairs, batch 2 x accumulation 2 (two micro-steps per optimizer step), 12 steps, a checkpoint
after every step (keep_last=2), cosine schedule with warmup (scheduler state matters), deterministic.
"""

from __future__ import annotations

import math
import random
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from tether import cli
from tether.config import load_config
from tether.train import complete_checkpoints, train

pytestmark = pytest.mark.slow

STEPS = 12
RUN = {
    "optim": {
        "batch_size": 2,
        "grad_accum": 2,
        "max_steps": STEPS,
        "deterministic": True,
        "seed": 3,
        "scheduler": "cosine",
        "warmup_steps": 2,
    },
    "checkpoint": {"every": 1, "keep_last": 2},
}
KILLED = -signal.SIGKILL


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, write_jsonl, write_config, good_rows):
    root = tmp_path_factory.mktemp("crash")
    data = write_jsonl(root / "train.jsonl", good_rows(32, seed=1))
    config = write_config(root / "cfg.yaml", data, root / "unused", **RUN)
    return root, config


@pytest.fixture(scope="module")
def reference(workdir, runner, metrics):
    """The uninterrupted run: its metrics (without timings) and final weights."""
    root, config = workdir
    out = root / "uninterrupted"
    done = runner.run(["train", str(config), f"output_dir={out}"], root / "log_uninterrupted", timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, _metrics(metrics, out), load_file(str(out / "final" / "model.safetensors"))


def _metrics(read_metrics, out: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "step_time_s"} for m in read_metrics(out / "metrics.jsonl")]


def _state(out: Path) -> tuple[list[str], list[str]]:
    ckpt = out / "checkpoints"
    complete = [p.name for p in complete_checkpoints(ckpt)]
    partial = sorted(p.name for p in ckpt.glob("*.partial")) if ckpt.is_dir() else []
    return complete, partial


def _crash_then_resume(tmp_path, workdir, runner, poll_until, trigger, *, env=None, delay=0.0):
    """Start the run, SIGKILL its process group once trigger(out) holds (+ delay s), then --resume it.

    Returns (out, complete checkpoints at the kill, partial folders at the kill, resume output).
    """
    _, config = workdir
    out = tmp_path / "run"
    args = ["train", str(config), f"output_dir={out}"]
    proc = runner.start(runner.command(args, probes=env is not None), tmp_path / "log_killed", env)
    reached = poll_until(lambda: trigger(out), proc, timeout=180)
    if reached and delay:
        time.sleep(delay)
    killed = runner.kill(proc)
    assert reached, f"the run never reached the kill point\n{killed.stderr[-3000:]}"
    assert killed.returncode == KILLED, f"the run ended by itself before the kill\n{killed.stderr[-3000:]}"
    complete, partial = _state(out)
    for name in partial:  # what the kill left, for the tests to inspect after the resume replaced it
        shutil.copytree(out / "checkpoints" / name, tmp_path / "partial_at_kill")
    resumed = runner.run(args + ["--resume"], tmp_path / "log_resumed", timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return out, complete, partial, resumed


def _assert_resumed_from(resumed, out: Path, complete: list[str]) -> None:
    if "is complete: final/ holds step" in resumed.stdout:
        # The kill landed after the run had written final/ (its last steps were fast): a valid outcome, and
        # the resume must then do nothing; the weights are still compared with the uninterrupted run.
        assert "nothing to do" in resumed.stdout, resumed.stdout
    elif complete:
        assert f"resumed from {out / 'checkpoints' / complete[-1]} at step" in resumed.stdout, resumed.stdout
    else:
        assert "no complete checkpoint" in resumed.stdout, resumed.stdout


def _assert_same_as_uninterrupted(reference, read_metrics, out: Path) -> None:
    _, ref_metrics, ref_weights = reference
    got = _metrics(read_metrics, out)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for want, have in zip(ref_metrics, got):
        assert have == want, f"step {want['step']} differs after resume"
    weights = load_file(str(out / "final" / "model.safetensors"))
    assert weights.keys() == ref_weights.keys()
    for name in ref_weights:
        assert torch.equal(weights[name], ref_weights[name]), f"{name} differs after resume"
    # A partial folder left by the kill is replaced when its step is saved again: none survives.
    assert not list((out / "checkpoints").glob("*.partial"))


@pytest.mark.parametrize("seed", [0, 1])
def test_kill_at_a_random_moment(seed, tmp_path, workdir, runner, poll_until, reference, metrics):
    """Kill after a random number of logged steps plus a random delay (lands mid-step, mid-save or between)."""
    rng = random.Random(seed)
    after_steps, delay = rng.randint(2, STEPS - 4), rng.uniform(0.0, 0.3)

    def logged(out: Path) -> bool:
        path = out / "metrics.jsonl"
        return path.is_file() and path.read_text().count("\n") >= after_steps

    out, complete, _, resumed = _crash_then_resume(tmp_path, workdir, runner, poll_until, logged, delay=delay)
    assert complete, "a checkpoint is written after every step"
    _assert_resumed_from(resumed, out, complete)
    _assert_same_as_uninterrupted(reference, metrics, out)


@pytest.mark.parametrize("seed", [2, 3])
def test_kill_as_soon_as_a_partial_checkpoint_appears(
    seed, tmp_path, workdir, runner, poll_until, reference, metrics
):
    """Poll for `step-K.partial/` and kill at once: the kill usually lands inside the write."""
    step = random.Random(seed).randint(3, STEPS - 3)

    def partial_appeared(out: Path) -> bool:
        return (out / "checkpoints" / f"step-{step:08d}.partial").exists()

    out, complete, partial, resumed = _crash_then_resume(
        tmp_path, workdir, runner, poll_until, partial_appeared
    )
    last = int(re.match(r"step-(\d+)", complete[-1]).group(1))
    assert last in (step - 1, step), (complete, partial)  # step only if its rename won the race with the kill
    _assert_resumed_from(resumed, out, complete)
    _assert_same_as_uninterrupted(reference, metrics, out)


def test_kill_during_checkpoint_write_never_loads_the_partial(
    tmp_path, workdir, runner, poll_until, reference, metrics
):
    """Deterministic: the probe pauses inside step 5's save after the model and optimizer files are written."""
    pause = tmp_path / "paused"
    env = {"RELIABILITY_PAUSE_SAVE": "5", "RELIABILITY_PAUSE_FILE": str(pause)}
    out, complete, partial, resumed = _crash_then_resume(
        tmp_path, workdir, runner, poll_until, lambda out: pause.exists(), env=env
    )
    assert partial == ["step-00000005.partial"] and complete[-1] == "step-00000004"
    # The kill left a loadable-looking folder behind: weights and optimizer state, but no state.json.
    written = {p.name for p in (tmp_path / "partial_at_kill").iterdir()}
    assert {"model.safetensors", "optimizer.bin"} <= written and "state.json" not in written
    _assert_resumed_from(resumed, out, complete)
    assert "step-00000005" not in resumed.stdout.split("resumed from")[1].split("\n")[0]
    _assert_same_as_uninterrupted(reference, metrics, out)


def test_kill_between_accumulation_micro_steps(tmp_path, workdir, runner, poll_until, reference, metrics):
    """The probe pauses before the 2nd micro-batch of step 7 (its 1st has already been backpropagated)."""
    pause = tmp_path / "paused"
    env = {"RELIABILITY_PAUSE_FORWARD": str(2 * 6 + 2), "RELIABILITY_PAUSE_FILE": str(pause)}
    out, complete, _, resumed = _crash_then_resume(
        tmp_path, workdir, runner, poll_until, lambda out: pause.exists(), env=env
    )
    assert complete[-1] == "step-00000006"
    _assert_resumed_from(resumed, out, complete)
    _assert_same_as_uninterrupted(reference, metrics, out)


def test_kill_before_the_first_checkpoint_completes(
    tmp_path, workdir, runner, poll_until, reference, metrics
):
    pause = tmp_path / "paused"
    env = {"RELIABILITY_PAUSE_SAVE": "1", "RELIABILITY_PAUSE_FILE": str(pause)}
    out, complete, partial, resumed = _crash_then_resume(
        tmp_path, workdir, runner, poll_until, lambda out: pause.exists(), env=env
    )
    assert complete == [] and partial == ["step-00000001.partial"]
    _assert_resumed_from(resumed, out, complete)
    _assert_same_as_uninterrupted(reference, metrics, out)


# --- resuming with a different configuration --------------------------------------------------------------


@pytest.fixture
def finished_copy(reference, tmp_path):
    """A copy of the uninterrupted run's folder (it keeps its last two checkpoints) without final/: as if killed
    while saving the final model (a finished run is not resumed: test_run_folder.py)."""
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    shutil.rmtree(out / "final")
    return out


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("objective.beta=0.2", "objective.beta"),
        ("objective.name=ipo", "objective.name"),
        ("optim.seed=4", "optim.seed"),
    ],
)
def test_resume_with_changed_config_is_refused_before_loading(
    finished_copy, workdir, monkeypatch, override, field
):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded although the resume is refused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    _, config = workdir
    cfg = load_config(config, [f"output_dir={finished_copy}", override])
    with pytest.raises(ValueError) as info:
        train(cfg, resume=True)
    message = str(info.value)
    assert "refusing to resume" in message and field in message
    assert "checkpoint.allow_changed_config=true" in message


def test_resume_with_changed_config_is_allowed_when_asked(finished_copy, workdir, metrics):
    _, config = workdir
    cfg = load_config(
        config, [f"output_dir={finished_copy}", "objective.beta=0.2", "checkpoint.allow_changed_config=true"]
    )
    result = train(cfg, resume=True)
    assert result.history[0]["step"] == STEPS  # resumed from the last checkpoint (step 11): only step 12 ran
    assert [m["step"] for m in metrics(finished_copy / "metrics.jsonl")] == list(range(1, STEPS + 1))


def test_fresh_run_into_a_folder_with_checkpoints_is_refused(finished_copy, workdir):
    _, config = workdir
    with pytest.raises(ValueError, match="--resume"):
        train(load_config(config, [f"output_dir={finished_copy}"]))


def test_cli_refused_resume_is_a_clean_error(finished_copy, workdir, capsys):
    _, config = workdir
    code = cli.main(["train", str(config), f"output_dir={finished_copy}", "objective.beta=0.2", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "allow_changed_config" in err


# --- state left in the run folder -------------------------------------------------------------------------


def test_reference_cache_of_other_data_is_never_reused(tmp_path, write_jsonl, write_config, good_rows):
    """At step 1 the policy is the reference, so the loss is log 2 exactly, whatever the data, if the
    reference statistics belong to the data being trained on."""
    rows = good_rows(8, seed=6)
    first_data = write_jsonl(tmp_path / "a.jsonl", rows)
    # Same prompts and token counts, other rejected answers: only a content check can tell the files apart.
    other_data = write_jsonl(
        tmp_path / "b.jsonl", [{**r, "rejected": str((int(r["chosen"]) + 2) % 10)} for r in rows]
    )
    config = write_config(
        tmp_path / "cfg.yaml",
        first_data,
        tmp_path / "run",
        reference={"mode": "cache"},
        optim={"max_steps": 1},
    )
    first = train(load_config(config))
    assert first.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    shutil.rmtree(tmp_path / "run" / "final")  # a fresh run is refused over a final model; the cache stays
    second = train(load_config(config, [f"data.train={other_data}"]))
    assert second.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # The same path regenerated in place (same size, other content), as a data pipeline would.
    first_data.write_bytes(other_data.read_bytes())
    shutil.rmtree(tmp_path / "run" / "final")
    third = train(load_config(config))
    assert third.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
