"""The run folder: what a fresh run, a --resume and a full disk do with what a run left there.

Promises (train.py docstring, docs/training.md "Resuming"):
- a fresh run never overwrites a run: neither its checkpoints nor its final model;
- a checkpoint write that fails (a full disk) says so, where, and that the earlier checkpoints are intact;
  a resume then continues from the last complete one;
- a torn last line of metrics.jsonl (a disk that filled while appending) is left out with a warning by
  `read_metrics`; a broken line elsewhere is an error;
- --resume compares the data by content and paths resolved; changed optimizer settings and model / reference
  are refused, a raised step count is accepted and printed; a finished run is left as it is.

Every run is in-process: 8 pairs, batch 2, constant lr (conftest's `base_config`), 3 or 4 steps.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import accelerate
import pytest

from tether import cli
from tether.config import ConfigError, load_config
from tether.train import RunWriteError, complete_checkpoints, data_digest, read_metrics, train

CHECKPOINTED = {"optim": {"max_steps": 3}, "checkpoint": {"every": 1, "keep_last": 5}}


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, write_jsonl, write_config, good_rows):
    """A finished 3-step run with checkpoints at steps 1 and 2: (root, config path, run folder)."""
    root = tmp_path_factory.mktemp("run_folder")
    (root / "data").mkdir()
    data = write_jsonl(root / "data" / "train.jsonl", good_rows(8, seed=2))
    config = write_config(root / "cfg.yaml", data, root / "finished", **CHECKPOINTED)
    train(load_config(config))
    return root, config, root / "finished"


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run: (config path, its folder); overrides point output_dir at it."""
    _, config, folder = finished
    out = tmp_path / "run"
    shutil.copytree(folder, out)
    return config, out


@pytest.fixture
def interrupted(run):
    """The finished run without its final model: as if killed after the step-2 checkpoint."""
    config, out = run
    shutil.rmtree(out / "final")
    return config, out


def _steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out)]


# --- a fresh run into an existing run ---------------------------------------------------------------------


def test_fresh_run_into_a_folder_with_only_a_final_model_is_refused(run, capsys):
    config, out = run
    shutil.rmtree(out / "checkpoints")  # checkpoint.every=0 leaves only final/
    final_before, metrics_before = _digest(out / "final"), (out / "metrics.jsonl").read_bytes()
    code = cli.main(["train", str(config), f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tether train: error: ") and "Traceback" not in err
    assert "final model" in err and "--resume" in err and str(out) in err
    assert _digest(out / "final") == final_before
    assert (out / "metrics.jsonl").read_bytes() == metrics_before


# --- a checkpoint write that fails ------------------------------------------------------------------------

TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 1536 vs 1430"


@pytest.mark.parametrize(
    "failure",
    [RuntimeError(TORCH_SHORT_WRITE), OSError(errno.ENOSPC, "No space left on device")],
    ids=["torch_short_write", "enospc"],
)
def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_earlier_ones(
    tmp_path, write_jsonl, write_config, good_rows, monkeypatch, capsys, failure
):
    """The save of step 3 writes part of its files, then fails as torch.save (or the OS) does on a full disk."""
    data = write_jsonl(tmp_path / "train.jsonl", good_rows(8, seed=2))
    out = tmp_path / "run"
    config = write_config(tmp_path / "cfg.yaml", data, out, optim={"max_steps": 4}, checkpoint={"every": 1})
    original = accelerate.Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        if Path(output_dir).name == "step-00000003.partial":
            (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
            raise failure
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    with pytest.raises(RunWriteError) as info:
        train(load_config(config))
    message = str(info.value)
    ckpts = out / "checkpoints"
    assert f"could not write checkpoint step 3 into {ckpts / 'step-00000003.partial'}" in message
    assert "the disk is full" in message or "most likely because the disk is full" in message
    assert f"{ckpts / 'step-00000002'}, is intact" in message and "--resume" in message
    assert info.value.__cause__ is failure
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step-00000001", "step-00000002"]
    assert not list(ckpts.glob("*.partial"))  # removed: it held nothing loadable and took the space

    monkeypatch.setattr(accelerate.Accelerator, "save_state", original)  # space freed
    capsys.readouterr()
    train(load_config(config), resume=True)
    assert f"resumed from {ckpts / 'step-00000002'} at step 2" in capsys.readouterr().out
    assert _steps(out) == [1, 2, 3, 4]


def test_cli_a_full_disk_exits_1_with_one_line(
    tmp_path, write_jsonl, write_config, good_rows, monkeypatch, capsys
):
    """`tether train` reports the failed write in one line (exit 1: the input was fine), no traceback."""
    from tether.cli import main

    data = write_jsonl(tmp_path / "train.jsonl", good_rows(8, seed=2))
    config = write_config(
        tmp_path / "cfg.yaml", data, tmp_path / "run", optim={"max_steps": 2}, checkpoint={"every": 1}
    )

    def save_state(self, output_dir=None, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    capsys.readouterr()
    assert main(["train", str(config)]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("tether train: error:")]
    assert len(errors) == 1 and errors[0].startswith("tether train: error: could not write checkpoint step 1")
    assert "the disk is full" in errors[0] and "Traceback" not in err


@pytest.fixture
def small_disk(tmp_path):
    """A 560 KiB tmpfs (needs root): room for the run's files and one checkpoint (~350 KiB), not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=560k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_really_full_disk_during_a_checkpoint(
    tmp_path, write_jsonl, write_config, good_rows, small_disk, capsys
):
    """The same on a real full file system: the second checkpoint does not fit; after the disk grows,
    --resume continues from the first."""
    data = write_jsonl(tmp_path / "train.jsonl", good_rows(8, seed=2))
    out = small_disk / "run"
    config = write_config(tmp_path / "cfg.yaml", data, out, optim={"max_steps": 3}, checkpoint={"every": 1})
    with pytest.raises(RunWriteError) as info:
        train(load_config(config))
    message = str(info.value)
    ckpts = out / "checkpoints"
    assert f"could not write checkpoint step 2 into {ckpts / 'step-00000002.partial'}" in message
    assert "disk is full" in message and f"{ckpts / 'step-00000001'}, is intact" in message
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step-00000001"]
    assert not list(ckpts.glob("*.partial"))

    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    capsys.readouterr()
    train(load_config(config), resume=True)
    assert f"resumed from {ckpts / 'step-00000001'} at step 1" in capsys.readouterr().out
    assert _steps(out) == [1, 2, 3]


def test_other_errors_inside_a_checkpoint_write_are_not_reworded(
    tmp_path, write_jsonl, write_config, good_rows, monkeypatch
):
    data = write_jsonl(tmp_path / "train.jsonl", good_rows(8, seed=2))
    config = write_config(tmp_path / "cfg.yaml", data, tmp_path / "run", checkpoint={"every": 1})

    def save_state(self, output_dir=None, **kwargs):
        raise RuntimeError("a bug, not a write")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    with pytest.raises(RuntimeError, match="^a bug, not a write$"):
        train(load_config(config))


# --- metrics.jsonl ----------------------------------------------------------------------------------------


def test_read_metrics_leaves_out_a_torn_last_line_with_a_warning(tmp_path):
    lines = [json.dumps({"step": s, "loss": 0.5}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')
    with pytest.warns(UserWarning, match=r"metrics\.jsonl, line 4: torn last line"):
        records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]


def test_read_metrics_refuses_a_broken_line_before_the_last(tmp_path):
    lines = [json.dumps({"step": 1}), '{"step": 2, "lo', json.dumps({"step": 3})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not a JSON record"):
        read_metrics(tmp_path)


# --- --resume ---------------------------------------------------------------------------------------------


def test_resume_after_the_data_changed_is_refused(interrupted, write_jsonl, good_rows):
    config, out = interrupted
    data = Path(load_config(config).data.train)
    original = data.read_bytes()
    write_jsonl(data, good_rows(6, seed=9))  # rewritten in place: same path, other rows
    try:
        with pytest.raises(ConfigError, match=r"refusing to resume.*data content \(sha256\)"):
            train(load_config(config, [f"output_dir={out}"]), resume=True)
    finally:
        data.write_bytes(original)  # the module's other tests use it


def test_resume_with_the_same_data_spelled_another_way_is_accepted(interrupted, capsys):
    config, out = interrupted
    data = Path(load_config(config).data.train)
    spelled = data.parent / ".." / data.parent.name / data.name  # dir/../dir/train.jsonl
    train(load_config(config, [f"output_dir={out}", f"data.train={spelled}"]), resume=True)
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "at step 2" in printed and "--resume with changes" not in printed
    assert _steps(out) == [1, 2, 3]


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=0.02",
        "optim.scheduler=cosine",
        "optim.weight_decay=0.1",
        "optim.warmup_steps=1",
        "reference.mode=cache",
        "model.path",  # the same weights in another folder: refused too (allow_changed_config to accept)
    ],
)
def test_resume_with_a_changed_setting_is_refused_naming_it(interrupted, tmp_path, model_dir, override):
    config, out = interrupted
    if override == "model.path":
        override = f"model.path={shutil.copytree(model_dir, tmp_path / 'moved_model')}"
    field = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"refusing to resume.*{field}.*allow_changed_config") as info:
        train(load_config(config, [f"output_dir={out}", override]), resume=True)
    if field.startswith("optim."):
        assert "match no uninterrupted run" in str(info.value)
    # Allowed when asked.
    train(
        load_config(config, [f"output_dir={out}", override, "checkpoint.allow_changed_config=true"]),
        resume=True,
    )
    assert _steps(out) == [1, 2, 3]


def test_resume_with_on_bad_row_changed_on_the_same_data_is_accepted_and_printed(interrupted, capsys):
    config, out = interrupted
    train(load_config(config, [f"output_dir={out}", "data.on_bad_row=skip"]), resume=True)
    printed = capsys.readouterr().out
    assert "data.on_bad_row: 'error' -> 'skip'" in printed and "at step 2" in printed


def test_resume_of_a_finished_run_does_nothing(run, capsys):
    config, out = run
    final_before, metrics_before = _digest(out / "final"), (out / "metrics.jsonl").read_bytes()
    result = train(load_config(config, [f"output_dir={out}"]), resume=True)
    assert "is complete: final/ holds step 3 of 3" in capsys.readouterr().out
    assert result.history == [] and result.steps == 3
    assert _digest(out / "final") == final_before
    assert (out / "metrics.jsonl").read_bytes() == metrics_before


def test_resume_of_a_finished_run_with_more_steps_continues(run, capsys):
    config, out = run
    result = train(load_config(config, [f"output_dir={out}", "optim.max_steps=5"]), resume=True)
    printed = capsys.readouterr().out
    assert "optim.max_steps: 3 -> 5" in printed and "at step 2" in printed  # from the last checkpoint
    assert [r["step"] for r in result.history] == [3, 4, 5]
    assert _steps(out) == [1, 2, 3, 4, 5]
    assert json.loads((out / "final" / "tether_run.json").read_text())["step"] == 5


def test_resume_with_fewer_steps_than_the_final_model_is_refused(run):
    config, out = run
    with pytest.raises(ConfigError, match="final model of step 3, beyond the 2 steps"):
        train(load_config(config, [f"output_dir={out}", "optim.max_steps=2"]), resume=True)


def test_data_digest_of_a_datasets_folder_follows_the_split_content(tmp_path, good_rows):
    """The digest --resume compares: the chosen split's rows count, another split and `.map` caches do not."""
    datasets = pytest.importorskip("datasets")

    def save(train_rows, test_rows, folder):
        datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(train_rows), "test": datasets.Dataset.from_list(test_rows)}
        ).save_to_disk(str(folder))
        return data_digest(str(folder), "train")

    rows = good_rows(6, seed=1)
    first = save(rows, rows[:2], tmp_path / "a")
    assert save(rows, rows[2:], tmp_path / "b") == first  # only the test split differs
    (tmp_path / "a" / "train" / "cache-0123abcd.arrow").write_bytes(b"a .map cache")
    assert data_digest(str(tmp_path / "a"), "train") == first
    assert save(rows[:5], rows[:2], tmp_path / "c") != first
    assert data_digest(str(tmp_path / "a"), "test") != first


def test_a_checkpoint_without_a_data_digest_still_refuses_another_data_path(interrupted, tmp_path):
    """A checkpoint written before data digests existed: the path is all it knows, so a changed one is refused."""
    config, out = interrupted
    state_file = complete_checkpoints(out / "checkpoints")[-1] / "state.json"
    state = json.loads(state_file.read_text())
    del state["fingerprint"]["data content (sha256)"]
    state_file.write_text(json.dumps(state))
    copy = shutil.copy(load_config(config).data.train, tmp_path / "same_rows.jsonl")
    with pytest.raises(ConfigError, match=r"refusing to resume.*data\.train"):
        train(load_config(config, [f"output_dir={out}", f"data.train={copy}"]), resume=True)
