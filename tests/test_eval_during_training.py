"""Evaluation during training (eval.*) and TRL-style logs (logging.every windows, num_tokens) in tether.train.

What must hold:
- the eval record of step 0 (eval.at_start) is the loss over every eval pair computed independently from the
  initial model's full logits with `tether.functional` (policy == reference); eval runs every eval.every
  steps and once after the last, under TRL's names (eval_loss, eval_rewards/*, eval_logps/*, ...), with the
  training step's statistics (entropy, KL, epsilon-DPO's beta), and does not change the training;
- with reference.mode=cache the eval pairs get their own cache and the same records as a frozen copy;
- a logged record with logging.every=N is the mean of the N per-step records of a logging.every=1 run
  (learning_rate, grad_norm, num_tokens: the last step's; pairs and tokens: summed), and num_tokens is the
  running count of non-padding tokens;
- a run resumed from a checkpoint inside a logging window writes exactly the records (eval ones included) of
  the uninterrupted run;
- 2 processes (torchrun, gloo) give the eval records of 1 process, with an uneven last eval batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from tether.config import ConfigError, load_config
from tether.train import read_metrics, step_pairs, train, window_record

pytestmark = pytest.mark.usefixtures("single_thread")

TIMING = ("step_time_s", "eval_runtime")


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.fixture(scope="module")
def eval_pairs(tmp_path_factory, make_pairs):
    """7 held-out pairs (another seed than the 24 training pairs): batches of 3 leave an uneven last one."""
    return make_pairs(tmp_path_factory.mktemp("eval") / "eval.jsonl", 7, seed=5)


def _independent_eval_loss(config, model_dir, data) -> dict[str, float]:
    """Mean loss and reward accuracy over every pair of `data` from the model's full logits (policy == ref)."""
    from tether.data import PreferenceCollator, load_preference_data
    from tether.functional import preference_loss
    from tether.modeling import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    dataset, _ = load_preference_data(
        str(data), tokenizer, max_length=64, max_prompt_length=32, progress=False
    )
    batch = PreferenceCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    losses, metrics = preference_loss(
        config.objective.name, logits, logits, batch.labels, entropy=True, **config.objective.hparams()
    )
    return {"loss": float(losses.mean()), "entropy/chosen": float(metrics["entropy/chosen"])}


def test_eval_at_start_every_n_and_at_end(train_yaml, tiny_model_dir, eval_pairs):
    """hdpo (its loss at policy == reference is not log 2): step-0 eval equals the independent computation;
    evaluations at steps 0, 2, 4 and 5 (the end); the training records are those of a run without eval."""
    sections = dict(objective={"name": "hdpo", "alpha": 0.9}, optim={"max_steps": 5})
    config = load_config(
        train_yaml(
            "with_eval",
            eval={"data": str(eval_pairs), "every": 2, "at_start": True, "batch_size": 3},
            **sections,
        )
    )
    result = train(config)
    plain = train(load_config(train_yaml("without_eval", **sections)))

    evals = read_metrics(config.output_dir, split="eval")
    assert [r["step"] for r in evals] == [0, 2, 4, 5]
    assert [r["eval_pairs"] for r in evals] == [7] * 4
    assert all(r["split"] == "eval" for r in evals)
    expected = _independent_eval_loss(config, tiny_model_dir, eval_pairs)
    assert abs(expected["loss"] - math.log(2)) > 1e-4  # hdpo with alpha 0.9: not the trivial value
    assert evals[0]["eval_loss"] == pytest.approx(expected["loss"], abs=1e-5)
    assert evals[0]["eval_entropy/chosen"] == pytest.approx(expected["entropy/chosen"], rel=1e-5)
    assert evals[0]["eval_rewards/margins"] != 0.0  # alpha != 1: the rewards differ already at step 0
    for key in (
        "eval_rewards/chosen",
        "eval_rewards/rejected",
        "eval_rewards/accuracies",
        "eval_logps/chosen",
    ):
        assert all(key in r for r in evals), key
    assert evals[-1]["eval_loss"] != pytest.approx(evals[0]["eval_loss"], abs=1e-6)  # training moved it
    # Evaluating changes nothing in training: the same records (timing aside) as the run without eval.
    assert _strip(read_metrics(config.output_dir)) == _strip(read_metrics(plain.output_dir))
    assert _strip(result.eval_history) == _strip(evals)
    assert [r["step"] for r in read_metrics(config.output_dir, split=None)] == [0, 1, 2, 2, 3, 4, 4, 5, 5]


@pytest.mark.parametrize("objective", ["tdpo2", "epsilon_dpo"])
def test_eval_with_reference_cache_equals_copy(train_yaml, eval_pairs, objective):
    """The eval pairs get their own cache (reference_cache_eval/): the same eval records as a frozen copy,
    including the statistics of the objective (TDPO's sequence KL, epsilon-DPO's beta)."""
    runs = {}
    for mode in ("copy", "cache"):
        config = load_config(
            train_yaml(
                mode,
                objective={"name": objective},
                reference={"mode": mode},
                eval={"data": str(eval_pairs), "every": 2},
                optim={"max_steps": 3},
            )
        )
        train(config)
        runs[mode] = read_metrics(config.output_dir, split="eval")
    copy_, cache = runs["copy"], runs["cache"]
    assert [r["step"] for r in cache] == [2, 3]
    stat = "eval_kl/seq_chosen" if objective == "tdpo2" else "eval_beta/mean"
    for a, b in zip(copy_, cache, strict=True):
        assert stat in a and stat in b
        for key in a:
            if key not in TIMING and isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def test_eval_cache_folder_is_separate(tmp_path, train_yaml, eval_pairs):
    config = load_config(
        train_yaml(
            reference={"mode": "cache"},
            eval={"data": str(eval_pairs), "at_end": True},
            optim={"max_steps": 1},
        )
    )
    train(config)
    out = tmp_path / "run"
    assert (out / "reference_cache" / "meta.json").is_file()
    assert (out / "reference_cache_eval" / "meta.json").is_file()
    assert (out / "eval_data_report.json").is_file()


def test_windowed_logs_are_means_of_per_step_records(train_yaml, pairs_file):
    """logging.every=3 over 7 steps logs steps 3, 6, 7; each record is the mean of the logging.every=1 run's
    records of its window; learning_rate, grad_norm, num_tokens hold the last step's; pairs, tokens sum."""
    sections = dict(objective={"name": "epsilon_dpo"}, optim={"max_steps": 7, "scheduler": "cosine"})
    per_step = read_metrics(train(load_config(train_yaml("every1", **sections))).output_dir)
    windowed = read_metrics(
        train(
            load_config(train_yaml("every3", logging={"every": 3, "progress": False}, **sections))
        ).output_dir
    )
    assert [r["step"] for r in windowed] == [3, 6, 7]
    for record, (lo, hi) in zip(windowed, [(0, 3), (3, 6), (6, 7)], strict=True):
        window = per_step[lo:hi]
        for key in (
            "loss",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "entropy/chosen",
            "beta/mean",
        ):
            assert record[key] == pytest.approx(sum(r[key] for r in window) / len(window), rel=1e-9), key
        for key in ("learning_rate", "grad_norm", "num_tokens", "epoch", "beta/base_next"):
            assert record[key] == window[-1][key], key
        assert record["pairs"] == sum(r["pairs"] for r in window)
        assert record["tokens"] == sum(r["tokens"] for r in window)
    assert windowed[0]["loss"] != per_step[2]["loss"]  # a mean, not the last step's value
    assert "lr" not in per_step[0] and per_step[0]["learning_rate"] > 0


def test_num_tokens_is_the_running_count_of_non_padding_tokens(train_yaml, pairs_file):
    """num_tokens after step k = the prompt + response tokens of both sides of every pair of steps 1..k
    (the attention mask's ones; TRL's num_tokens), counted here from the tokenized pairs, not the batch."""
    from tether.data import load_preference_data
    from tether.modeling import load_tokenizer

    config = load_config(train_yaml(optim={"max_steps": 4, "batch_size": 5}))
    records = read_metrics(train(config).output_dir)
    dataset, _ = load_preference_data(
        str(pairs_file), load_tokenizer(config.model), max_length=64, max_prompt_length=32, progress=False
    )
    total = 0
    for record in records:
        _, pairs = step_pairs(len(dataset), 5, record["step"] - 1, config.optim.seed, True)
        for i in pairs:
            item = dataset[i]
            total += 2 * len(item.prompt_ids) + len(item.chosen_ids) + len(item.rejected_ids)
        assert record["num_tokens"] == total, record["step"]
    assert records[-1]["num_tokens"] > records[-1]["tokens"] > 0


def test_window_record_leaves_out_non_finite_values():
    """A skipped step's NaN loss is left out of the window's mean (TRL's logging_nan_inf_filter); all NaN
    gives NaN."""
    records = [
        {"step": 1, "loss": 1.0, "pairs": 4, "learning_rate": 0.1},
        {"step": 2, "loss": float("nan"), "pairs": 4, "learning_rate": 0.2},
        {"step": 3, "loss": 3.0, "pairs": 2, "learning_rate": 0.3},
    ]
    out = window_record(records)
    assert out == {"step": 3, "loss": 2.0, "pairs": 10, "learning_rate": 0.3}
    assert math.isnan(window_record(records[1:2])["loss"])


def test_resume_inside_a_window_writes_the_uninterrupted_records(train_yaml, eval_pairs):
    """Checkpoint every 2 steps, log every 3, evaluate every 2: resumed from step-2 (steps 1-2 of the first
    window are in the checkpoint), the run writes the same train and eval records as the uninterrupted run."""
    sections = dict(
        objective={"name": "epsilon_dpo"},
        optim={"max_steps": 6},
        checkpoint={"every": 2, "keep_last": 5},
        logging={"every": 3, "progress": False},
        eval={"data": str(eval_pairs), "every": 2, "at_start": True},
    )
    config = load_config(train_yaml(**sections))
    out = train(config).output_dir
    full = read_metrics(out, split=None)
    assert [(r["step"], r.get("split", "train")) for r in full] == [
        (0, "eval"),
        (2, "eval"),
        (3, "train"),
        (4, "eval"),
        (6, "train"),
        (6, "eval"),
    ]
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    train(config, resume=True)
    assert _strip(read_metrics(out, split=None)) == _strip(full)


def test_fresh_start_drops_an_earlier_attempts_step_0_evaluation(tmp_path, train_yaml, eval_pairs):
    """A run killed before its first checkpoint leaves metrics.jsonl with its step-0 evaluation; the restart
    (no checkpoint: step 0 again) evaluates step 0 anew and keeps one such record, not two."""
    config = load_config(train_yaml(eval={"data": str(eval_pairs), "at_start": True}, optim={"max_steps": 1}))
    (tmp_path / "run").mkdir()
    stale = {"step": 0, "split": "eval", "eval_loss": 123.0}
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps(stale) + "\n")
    train(config)
    evals = read_metrics(config.output_dir, split="eval")
    assert [r["step"] for r in evals] == [0, 1]
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)  # dpo at policy == reference


def test_eval_config_is_checked(train_yaml, eval_pairs):
    with pytest.raises(ConfigError, match="eval.every.*eval.data is null"):
        load_config(train_yaml(eval={"every": 2}))
    with pytest.raises(ConfigError, match="eval.batch_size must be >= 1"):
        load_config(train_yaml(eval={"data": str(eval_pairs), "batch_size": 0}))
    config = load_config(train_yaml(eval={"data": "no/such/file.jsonl"}))
    with pytest.raises(ConfigError, match="eval.data: no/such/file.jsonl does not exist"):
        config.validate(check_paths=True)


_RANK_SCRIPT = """
import sys
from tether.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_processes_evaluate_like_one(tmp_path, train_yaml, make_pairs, eval_pairs, free_port):
    """torchrun --nproc_per_node 2 (gloo): eval batch 2 x 2 processes over 7 pairs (rank 1 runs a zero-weight
    filler in the last round) gives the one-process eval records, and the same windowed train records."""
    data = make_pairs(tmp_path / "pairs.jsonl", 10, seed=2)
    common = dict(
        pairs=data,
        eval={"data": str(eval_pairs), "every": 2, "batch_size": 2, "at_start": True},
        logging={"every": 2, "progress": False},
    )
    one = load_config(train_yaml("one", optim={"max_steps": 3, "batch_size": 4}, **common))
    train(one)
    two = train_yaml("two", optim={"max_steps": 3, "batch_size": 2}, **common)
    script = tmp_path / "rank_script.py"
    script.write_text(_RANK_SCRIPT)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    proc = subprocess.run(
        [*launch, str(script), "train", str(two)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m1, m2 = read_metrics(tmp_path / "one", split=None), read_metrics(tmp_path / "two", split=None)
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == [0, 2, 2, 3, 3]
    for a, b in zip(m1, m2, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if key in TIMING or not isinstance(value, (int, float)):
                continue
            if isinstance(value, int):
                assert b[key] == value, (a["step"], key)
            else:
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (a["step"], key)
