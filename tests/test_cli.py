"""Tests for tether.cli: `tether train` end to end on the tiny setup, and exit code 2 for user errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tether.cli import main
from tether.train import read_metrics

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def config_file(train_yaml):
    """The tiny setup of conftest, training into tmp_path/run, with a checkpoint every step."""
    return train_yaml("run", checkpoint={"every": 1})


def test_train_writes_the_run_folder(tmp_path, config_file, capsys):
    code = main(["train", str(config_file), "optim.max_steps=2", "objective.name=tdpo1"])
    assert code == 0
    run = tmp_path / "run"
    assert "final model in" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    saved = (run / "config.yaml").read_text()
    assert "tdpo1" in saved and "max_steps: 2" in saved  # the config as run, overrides applied
    report = json.loads((run / "data_report.json").read_text())
    assert report["kept"] == 24
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001"]
    # A checkpoint loads as a model too (DESIGN.md section 4), with the weights accelerate saved.
    ckpt = run / "checkpoints" / "step-00000001"
    loaded = AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    saved = load_file(str(ckpt / "model.safetensors"))
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert json.loads((run / "final" / "tether_objective.json").read_text())["name"] == "tdpo1"
    AutoModelForCausalLM.from_pretrained(run / "final")

    # --resume of the finished run says so and leaves final/ as it is.
    written = (run / "final" / "model.safetensors").stat().st_mtime_ns
    assert main(["train", str(config_file), "optim.max_steps=2", "objective.name=tdpo1", "--resume"]) == 0
    assert "is complete" in capsys.readouterr().out
    assert (run / "final" / "model.safetensors").stat().st_mtime_ns == written
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["optim.batch_size=0"], "optim.batch_size"),
        (["optim.batch_size=two"], "optim.batch_size"),
        (["optimizer.lr=0.1"], "optimizer"),
        (["objective.name=kto"], "objective.name"),
        (["data.train=/nonexistent/pairs.jsonl"], "data.train"),
        (["model.path=/nonexistent/model"], "model.path"),
    ],
)
def test_bad_config_exits_2_naming_the_field(tmp_path, config_file, capsys, args, field):
    assert main(["train", str(config_file), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tether train: error:") and field in err
    assert not (tmp_path / "run" / "final").exists()


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_bad_data_row_exits_2_naming_the_line(tmp_path, train_yaml, capsys):
    data = tmp_path / "bad.jsonl"
    good = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
    data.write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": None}) + "\n")
    assert main(["train", str(train_yaml("run", pairs=data))]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "chosen" in err


def test_resume_with_changed_objective_exits_2(tmp_path, config_file, capsys):
    assert main(["train", str(config_file), "optim.max_steps=2"]) == 0
    assert main(["train", str(config_file), "optim.max_steps=2", "objective.beta=0.5", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "objective.beta" in err and "allow_changed_config" in err
    # A fresh run into a folder with checkpoints is refused too (it would mix two runs' checkpoints).
    assert main(["train", str(config_file), "optim.max_steps=2"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_version(capsys):
    from tether import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"tether {__version__}"


def test_train_help_lists_objectives_and_every_config_key(capsys):
    """`tether train --help` names every objective and every field of TrainConfig with its doc, generated from
    tether.config's comments (a field added without a comment fails here)."""
    import dataclasses

    from tether.config import TrainConfig, field_docs
    from tether.objectives import OBJECTIVES

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    docs = field_docs()
    keys = {"output_dir"} | {
        f"{s.name}.{f.name}"
        for s in dataclasses.fields(TrainConfig)
        if s.name != "output_dir"
        for f in dataclasses.fields(getattr(TrainConfig(), s.name))
    }
    assert set(docs) == keys
    for key, doc in docs.items():
        assert len(doc) > 5, key
        assert f"  {key} " in out and doc[:40] in out, key
    assert docs["optim.lr"] == "peak learning rate of AdamW"
    assert docs["lora.target_modules"] == "modules that get adapters"
    for name in OBJECTIVES:
        assert f"  {name} " in out


def test_cpu_run_prints_no_deepspeed_accelerator_warning(train_yaml):
    """With deepspeed installed, accelerate imports it inside unwrap_model on every run, and deepspeed then logs
    "Setting accelerator to CPU ..." (twice per run here, before the filter); `tether train` shows neither."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("deepspeed") is None or torch.cuda.is_available():
        pytest.skip("the warning needs deepspeed installed and no GPU")
    src = Path(__file__).resolve().parents[1] / "src"
    proc = subprocess.run(
        [sys.executable, "-m", "tether.cli", "train", str(train_yaml("quiet")), "optim.max_steps=1"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "done: 1 steps" in proc.stdout
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr
