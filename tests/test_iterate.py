"""`tether iterate`: on-policy rounds on the toy reverse task, their records, and resume after SIGKILL.

The initial policy is the toy tokenizer and the default tiny Llama (hidden 64), supervised-fine-tuned for 250
steps on the reverse task in the module fixture (about 10 s): at temperature 1 it reverses about one word in
ten, so 4 samples of 16 prompts give a few verified pairs each round. Every run is 2 rounds of 3 DPO steps.

What is compared after a kill: every line of rounds.jsonl without its `seconds` field (stage wall times),
the bytes of each round's samples.jsonl and pairs.jsonl, and every tensor of the last round's
final/model.safetensors, against an uninterrupted run of the same command. Both runs are subprocesses with
one torch thread on CPU and optim.deterministic=true, where the pipeline is deterministic: the comparison is
exact (bitwise).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tether import cli
from tether.config import ConfigError
from tether.iterate import config_from_dict, iterate, labeller, read_rounds
from tether.toy.tasks import get_task

pytestmark = pytest.mark.usefixtures("single_thread")

ROUNDS = 2
STEPS = 3
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


@pytest.fixture(scope="module")
def initial_model(tmp_path_factory) -> Path:
    """The toy reverse reference, small: 250 SFT steps of the default tiny Llama."""
    from tether.toy.model import build_tiny_llama
    from tether.toy.sft import sft
    from tether.toy.tokenizer import build_tokenizer

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    model = build_tiny_llama(tokenizer, seed=0)
    sft(model, tokenizer, get_task("reverse").sft_examples(2000, seed=0), steps=250, seed=0, progress=False)
    torch.set_num_threads(previous)
    folder = tmp_path_factory.mktemp("reverse_reference")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def config_dict(model: Path, output_dir: Path, **top: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "output_dir": str(output_dir),
        "model": str(model),
        "rounds": ROUNDS,
        "task": "reverse",
        "num_prompts": 16,
        "verifier": "task",
        "progress": False,
        "sample": {"n": 4, "max_new_tokens": 16},
        "eval": {
            "num_prompts": 8,
            "n_samples": 4,
            "k": [1, 4],
            "max_new_tokens": 16,
            "diversity_unit": "char",
        },
        "train": {
            "data": {"max_length": 64, "max_prompt_length": 32},
            "objective": {"name": "dpo", "beta": 0.1},
            "optim": {
                "lr": 1e-3,
                "batch_size": 2,
                "max_steps": STEPS,
                "scheduler": "constant",
                "deterministic": True,
            },
            "checkpoint": {"every": 1, "keep_last": 2},
        },
    }
    config.update(top)
    return config


@pytest.fixture(scope="module")
def two_rounds(initial_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("iterate") / "run"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    iterate(config_from_dict(config_dict(initial_model, out)))
    torch.set_num_threads(previous)
    return out


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- the records -----------------------------------------------------------------------------------------


def test_rounds_jsonl_is_round_zero_then_each_round_record(two_rounds):
    records = read_rounds(two_rounds)
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in (1, 2):
        assert records[r] == json.loads((two_rounds / f"round-{r:03d}" / "record.json").read_text())
    head = (two_rounds / "rounds.png").read_bytes()[:8]
    assert head == b"\x89PNG\r\n\x1a\n"


def test_labels_and_pairs_agree_with_the_verifier(two_rounds):
    """Labels are the task's verdicts; pairs are counted independently from samples.jsonl (one per prompt
    with a right and a wrong non-empty sample), and every pair's chosen is right and rejected wrong."""
    task = get_task("reverse")
    for r in (1, 2):
        folder = two_rounds / f"round-{r:03d}"
        samples = _lines(folder / "samples.jsonl")
        assert len(samples) == 16 and all(len(s["completions"]) == 4 for s in samples)
        assert [s["prompt"] for s in samples] == task.make_prompts(16, seed=r)  # fresh prompts each round
        for s in samples:
            assert s["labels"] == [float(task.verify(s["prompt"], c)) for c in s["completions"]]
        pairable = sum(
            len({label for c, label in zip(s["completions"], s["labels"]) if c.strip()}) == 2 for s in samples
        )
        pairs = _lines(folder / "pairs.jsonl")
        record = json.loads((folder / "record.json").read_text())
        assert pairable > 0
        assert record["pairing"]["num_pairs"] == len(pairs) == pairable
        assert record["pairing"]["skipped_all_tied"] == 16 - pairable
        for pair in pairs:
            prompt = pair["prompt"][0]["content"]
            assert task.verify(prompt, pair["chosen"][0]["content"])
            assert not task.verify(prompt, pair["rejected"][0]["content"])


def test_each_round_trains_from_the_last_policy_against_the_initial_model(two_rounds, initial_model):
    for r, start in ((1, initial_model), (2, two_rounds / "round-001" / "train" / "final")):
        folder = two_rounds / f"round-{r:03d}"
        train = yaml.safe_load((folder / "train" / "config.yaml").read_text())
        assert train["model"]["path"] == str(start)
        assert train["reference"]["path"] == str(initial_model)
        assert train["data"]["train"] == str(folder / "pairs.jsonl")
        metrics = _lines(folder / "train" / "metrics.jsonl")
        record = json.loads((folder / "record.json").read_text())
        assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
        assert record["train"]["steps"] == STEPS
        assert record["train"]["last"] == {k: v for k, v in metrics[-1].items() if k != "step_time_s"}
    # Round 1 starts at the reference: DPO's first loss is log 2 exactly. Round 2 starts elsewhere.
    first = [_lines(two_rounds / f"round-{r:03d}" / "train" / "metrics.jsonl")[0]["loss"] for r in (1, 2)]
    assert first[0] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(first[1] - math.log(2)) > 1e-3


def test_eval_metrics_and_both_kls_come_from_the_eval_files(two_rounds, initial_model):
    records = read_rounds(two_rounds)
    first = json.loads((two_rounds / "round-001" / "eval" / "eval.json").read_text())
    assert records[0]["eval"]["1"]["pass@k"] == first["models"]["reference"]["temperatures"]["1"]["pass@k"]
    assert records[0]["policy"] == str(initial_model)
    for r in (1, 2):
        folder = two_rounds / f"round-{r:03d}"
        against_initial = json.loads((folder / "eval" / "eval.json").read_text())
        assert against_initial["config"]["reference"] == str(initial_model)
        policy = against_initial["models"]["policy"]
        assert policy["path"] == str(folder / "train" / "final")
        metrics, held_out = policy["temperatures"]["1"], records[r]["eval"]["1"]
        assert held_out["pass@k"] == metrics["pass@k"] and held_out["entropy"] == metrics["entropy"]
        assert held_out["kl_forward_initial"] == metrics["kl_forward"] > 0
    # Round 1's previous policy is the initial model; round 2's is round 1's, evaluated in eval_previous/.
    assert not (two_rounds / "round-001" / "eval_previous").exists()
    assert records[1]["eval"]["1"]["kl_forward_previous"] == records[1]["eval"]["1"]["kl_forward_initial"]
    second = json.loads((two_rounds / "round-002" / "eval_previous" / "eval.json").read_text())
    assert second["config"]["reference"] == str(two_rounds / "round-001" / "train" / "final")
    kl_previous = second["models"]["policy"]["temperatures"]["1"]["kl_forward"]
    assert (
        records[2]["eval"]["1"]["kl_forward_previous"]
        == kl_previous
        != records[2]["eval"]["1"]["kl_forward_initial"]
    )


def test_reference_previous_trains_against_the_last_policy(initial_model, tmp_path):
    """With reference: previous the round-2 reference is the round-2 starting policy: first loss log 2."""
    out = tmp_path / "run"
    iterate(config_from_dict(config_dict(initial_model, out, reference="previous")))
    train = yaml.safe_load((out / "round-002" / "train" / "config.yaml").read_text())
    assert train["reference"]["path"] is None  # the policy's own initial weights
    first = _lines(out / "round-002" / "train" / "metrics.jsonl")[0]["loss"]
    assert first == pytest.approx(math.log(2), abs=1e-6)
    assert read_rounds(out)[2]["reference"] == "round-001/train/final"


def partial_reward(prompt: str, completion: str) -> float:
    """Share of the answer's positions where the completion has the right letter (a dense reward)."""
    answer = prompt[::-1]
    return sum(a == c for a, c in zip(answer, completion)) / max(len(answer), len(completion), 1)


def test_labels_come_from_the_verifier_or_the_callable_reward(initial_model, tmp_path):
    rows = [{"prompt": "abc"}, {"prompt": "abcd"}]
    prompts, completions = ["abc", "abc", "abcd", "abcd"], ["cba", "cbx", "dcba", "dc"]
    verified = config_from_dict(config_dict(initial_model, tmp_path / "a"))
    assert labeller(verified, rows)(prompts, completions) == [1.0, 0.0, 1.0, 0.0]
    rewarded = config_from_dict(
        config_dict(initial_model, tmp_path / "b", verifier=None, reward="test_iterate:partial_reward")
    )
    assert labeller(rewarded, rows)(prompts, completions) == [1.0, 2 / 3, 1.0, 0.5]


def test_a_round_with_a_callable_reward(initial_model, tmp_path):
    """Pairs ordered by the reward; the held-out reward in the record is eval.json's; no pass@k without a
    verifier."""
    out = tmp_path / "run"
    data = config_dict(initial_model, out, rounds=1, verifier=None, reward="test_iterate:partial_reward")
    records = iterate(config_from_dict(data))
    for pair in _lines(out / "round-001" / "pairs.jsonl"):
        prompt = pair["prompt"][0]["content"]
        assert partial_reward(prompt, pair["chosen"][0]["content"]) > partial_reward(
            prompt, pair["rejected"][0]["content"]
        )
    result = json.loads((out / "round-001" / "eval" / "eval.json").read_text())
    metrics = result["models"]["policy"]["temperatures"]["1"]
    assert records[1]["eval"]["1"]["reward"] == metrics["reward"] and "pass@k" not in metrics
    assert records[0]["eval"]["1"]["reward"] == result["models"]["reference"]["temperatures"]["1"]["reward"]


def test_prompt_files_with_exact_match(initial_model, tmp_path):
    """Training prompts from a JSONL file (its first num_prompts rows, the same each round), held-out prompts
    from another, labels by exact match against each row's answer."""
    task = get_task("reverse")

    def write(path: Path, words: list[str]) -> Path:
        path.write_text("".join(json.dumps({"prompt": w, "answer": w[::-1]}) + "\n" for w in words))
        return path

    train_words = task.make_prompts(20, seed=5)
    data = config_dict(
        initial_model,
        tmp_path / "run",
        task=None,
        prompts=str(write(tmp_path / "train.jsonl", train_words)),
        num_prompts=16,
        verifier="exact_match",
    )
    data["eval"]["prompts"] = str(write(tmp_path / "held_out.jsonl", task.make_prompts(8, seed=6)))
    data["sample"]["n"] = 8  # the same 16 prompts every round: enough samples that round 2 still has pairs
    iterate(config_from_dict(data))
    for r in (1, 2):
        samples = _lines(tmp_path / "run" / f"round-{r:03d}" / "samples.jsonl")
        assert [s["prompt"] for s in samples] == train_words[:16]
        for s in samples:
            assert s["labels"] == [float(c.strip() == s["prompt"][::-1]) for c in s["completions"]]
    held_out = read_rounds(tmp_path / "run")[2]["eval"]["1"]
    assert held_out["num_prompts"] == 8 and set(held_out["pass@k"]) == {"1", "4"}


def test_the_toy_example_runs_a_round(initial_model, tmp_path):
    """examples/iterate_toy.yaml, shrunk by overrides and pointed at the test's model, through the CLI."""
    example = Path(__file__).resolve().parents[1] / "examples" / "iterate_toy.yaml"
    out = tmp_path / "run"
    shrink = [
        f"model={initial_model}",
        f"output_dir={out}",
        "rounds=1",
        "num_prompts=8",
        "eval.num_prompts=4",
        "train.optim.max_steps=2",
        "progress=false",
    ]
    assert cli.main(["iterate", str(example), *shrink]) == 0
    record = read_rounds(out)[1]
    assert record["train"]["steps"] == 2 and record["objective"] == {"name": "dpo", "beta": 0.1}


def test_cli_bad_key_exits_2_naming_it(initial_model, tmp_path, capsys):
    example = Path(__file__).resolve().parents[1] / "examples" / "iterate_toy.yaml"
    assert cli.main(["iterate", str(example), "sample.temprature=0.5"]) == 2
    err = capsys.readouterr().err
    assert "sample.temprature" in err and "Traceback" not in err


# --- configuration ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({"sample": {"temprature": 1.0}}, "sample.temprature"),
        ({"rounds_": 2}, "rounds_"),
        ({"train": {"optim": {"lrr": 1.0}}}, "optim.lrr"),
        ({"train": {"output_dir": "x"}}, "train.output_dir"),
        ({"train": {"model": {"path": "x"}}}, "train.model.path"),
        ({"train": {"model": {"adapter": "x"}}}, "train.model.adapter"),
        ({"train": {"objective": {"name": "nope"}}}, "objective.name"),
        ({"reference": "last"}, "reference"),
        ({"train": {"lora": {"enabled": True}}}, "train.reference.mode=copy"),
        ({"verifier": None}, "verifier / reward"),
        ({"eval": {"k": [1, 16]}}, "eval: k"),
    ],
)
def test_bad_config_is_refused_by_name(initial_model, tmp_path, change, names):
    data = config_dict(initial_model, tmp_path / "run")
    for key, value in change.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        config_from_dict(data)


def test_fresh_run_into_a_used_folder_and_changed_resume_are_refused(two_rounds, initial_model):
    with pytest.raises(ConfigError, match="--resume"):
        iterate(config_from_dict(config_dict(initial_model, two_rounds)))
    changed = config_dict(initial_model, two_rounds, num_prompts=8)
    with pytest.raises(ConfigError, match="num_prompts"):
        iterate(config_from_dict(changed), resume=True)


# --- kill -9 and --resume --------------------------------------------------------------------------------


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tether.cli", *args],
        stdout=open(log, "wb"),  # noqa: SIM115 - the child holds it; closed with the process
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **ENV},
        start_new_session=True,
    )


def _run(args: list[str], log: Path, timeout: float = 300) -> None:
    proc = _start(args, log)
    try:
        proc.wait(timeout=timeout)
    finally:
        _kill(proc)
    assert proc.returncode == 0, log.read_text()[-3000:]


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process group this test started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=30)


def _outcome(out: Path) -> dict[str, Any]:
    return {
        "records": [{k: v for k, v in rec.items() if k != "seconds"} for rec in read_rounds(out)],
        "files": {
            f"{r}/{name}": (out / f"round-{r:03d}" / name).read_bytes()
            for r in range(1, ROUNDS + 1)
            for name in ("samples.jsonl", "pairs.jsonl")
        },
        "weights": load_file(str(out / f"round-{ROUNDS:03d}" / "train" / "final" / "model.safetensors")),
    }


@pytest.fixture(scope="module")
def config_file(initial_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("iterate_cli") / "iterate.yaml"
    path.write_text(yaml.safe_dump(config_dict(initial_model, path.parent / "unused")))
    return path


@pytest.fixture(scope="module")
def uninterrupted(config_file) -> dict[str, Any]:
    out = config_file.parent / "uninterrupted"
    _run(["iterate", str(config_file), f"output_dir={out}"], config_file.parent / "uninterrupted.log")
    return _outcome(out)


KILL_POINTS = {
    # between rounds: round 1 is complete, round 2 has not begun its training
    "between_rounds": lambda out: (out / "round-001" / "record.json").exists(),
    # inside round 2: its samples are written, training has not finished
    "after_sampling": lambda out: (out / "round-002" / "samples.jsonl").exists(),
    # inside round 2's training: a complete checkpoint exists, so training resumes from it
    "mid_training": lambda out: (out / "round-002" / "train" / "checkpoints" / "step-00000002").exists(),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_kill_9_then_resume_gives_the_uninterrupted_result(point, config_file, uninterrupted, tmp_path):
    out = tmp_path / "run"
    args = ["iterate", str(config_file), f"output_dir={out}"]
    proc = _start(args, tmp_path / "killed.log")
    deadline = time.monotonic() + 240
    while not KILL_POINTS[point](out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    reached = KILL_POINTS[point](out)
    _kill(proc)
    assert reached, (tmp_path / "killed.log").read_text()[-3000:]
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    assert not (out / f"round-{ROUNDS:03d}" / "record.json").exists()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("round-*/record.json")}
    round_one = (out / "round-001" / "samples.jsonl").stat().st_mtime_ns

    _run([*args, "--resume"], tmp_path / "resumed.log")
    log = (tmp_path / "resumed.log").read_text()
    assert "round 1/2" not in log  # a finished round is never redone ...
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # ... nor rewritten
    assert (out / "round-001" / "samples.jsonl").stat().st_mtime_ns == round_one
    if point == "mid_training":
        assert "resumed from" in log and "step-0000000" in log
    got = _outcome(out)
    assert got["records"] == uninterrupted["records"]
    assert got["files"] == uninterrupted["files"]
    assert got["weights"].keys() == uninterrupted["weights"].keys()
    for name, tensor in uninterrupted["weights"].items():
        assert torch.equal(got["weights"][name], tensor), name
