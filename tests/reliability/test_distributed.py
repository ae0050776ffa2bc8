"""Two processes (torchrun, gloo on CPU) train exactly like one process with the same global batch.

Promise (train.py docstring): a step's gradient is that of the mean loss over its pairs whatever the split
over processes and micro-batches; every pair is seen once per epoch, the last uneven step included; a
process without a pair in a micro-batch runs a zero-weight filler so that collectives never hang.

9 pairs, global batch 4 (1 process x batch 2 x accumulation 2, or 2 processes x batch 1 x accumulation 2):
steps of 4, 4 and 1 pairs per epoch; in the 1-pair step rank 1 has nothing but a filler. Two epochs, shuffled.
Launched as a user would, with plain `torchrun --standalone --nproc_per_node=2` (no accelerate config, no
ACCELERATE_USE_CPU): `accelerate launch --cpu` starts a single process, so it cannot be used for this.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tether.config import load_config
from tether.train import train

pytestmark = pytest.mark.slow

PAIRS, EPOCHS = 9, 2
RUN = {
    "optim": {
        "batch_size": 2,
        "grad_accum": 2,
        "max_steps": None,
        "epochs": EPOCHS,
        "seed": 5,
        "scheduler": "cosine",
    }
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, write_jsonl, write_config, good_rows, runner, metrics):
    root = tmp_path_factory.mktemp("distributed")
    data = write_jsonl(root / "train.jsonl", good_rows(PAIRS, seed=4))
    config = write_config(root / "cfg.yaml", data, root / "unused", **RUN)

    one = root / "one"
    train(load_config(config, [f"output_dir={one}"]))

    two = root / "two"
    reports = root / "reports"
    done = runner.run(
        ["train", str(config), f"output_dir={two}", "optim.batch_size=1"],
        root / "log",
        probes=True,
        nproc=2,
        env={"RELIABILITY_REPORT_DIR": str(reports)},
        timeout=300,  # a hang (e.g. a collective one rank never joins) fails here instead of blocking CI
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return {
        "one": metrics(one / "metrics.jsonl"),
        "two": metrics(two / "metrics.jsonl"),
        "ranks": [json.loads((reports / f"rank-{r}.json").read_text()) for r in (0, 1)],
        "weights": (
            load_file(str(one / "final" / "model.safetensors")),
            load_file(str(two / "final" / "model.safetensors")),
        ),
    }


def test_both_ranks_ran_as_one_job(runs):
    assert [r["world_size"] for r in runs["ranks"]] == [2, 2]
    assert [r["exit_code"] for r in runs["ranks"]] == [0, 0]
    # Only the main process writes metrics: one line per step, not one per process.
    assert [m["step"] for m in runs["two"]] == list(range(1, 3 * EPOCHS + 1))


def test_two_processes_equal_one_process(runs):
    one, two = runs["one"], runs["two"]
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert a["pairs"] == b["pairs"] and a["epoch"] == b["epoch"]
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
    w1, w2 = runs["weights"]
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-5)


def test_parameters_equal_across_ranks(runs):
    digests = {r["param_digest"] for r in runs["ranks"]}
    assert len(digests) == 1 and None not in digests


def test_uneven_data_every_pair_once_per_epoch(runs):
    two = runs["two"]
    assert [m["pairs"] for m in two] == [4, 4, 1] * EPOCHS
    for epoch in range(EPOCHS):
        assert sum(m["pairs"] for m in two if m["epoch"] == epoch) == PAIRS


def test_a_slow_reference_cache_build_stops_at_distributed_timeout_s_with_a_clear_error(
    tmp_path, write_jsonl, write_config, good_rows, runner
):
    """The main process builds the reference cache while the others wait at a barrier, for at most
    distributed.timeout_s (torch's default under NCCL, 10 minutes, is too short for a large data set). A probe
    slows the build to 60 s on the main process; with a 5 s timeout the waiting process stops with a one-line
    error naming the field, and torchrun stops the job, long before the build would have ended."""
    data = write_jsonl(tmp_path / "train.jsonl", good_rows(PAIRS, seed=4))
    config = write_config(
        tmp_path / "cfg.yaml",
        data,
        tmp_path / "run",
        reference={"mode": "cache"},
        optim={"batch_size": 1, "grad_accum": 2, "max_steps": 1},
        distributed={"timeout_s": 5},
    )
    done = runner.run(
        ["train", str(config)],
        tmp_path / "log",
        probes=True,
        nproc=2,
        env={"RELIABILITY_SLOW_CACHE_S": "60"},
        timeout=200,
    )
    assert done.returncode != 0
    assert (
        "tether train: error: process 1 waited more than distributed.timeout_s=5 s for the main process to build"
        " the reference cache" in done.stderr
    ), done.stderr[-3000:]
    assert not (tmp_path / "run" / "reference_cache").exists()  # stopped before the build ended
