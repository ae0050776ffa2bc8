"""Bad configuration fails fast: before any tokenizer or weights are read, naming the field and the fix.

Every case goes through `tether train CONFIG key=value` (`tether.cli.main`), which must return 2 with a
one-line `tether train: error: ...` on stderr (no traceback). `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` are replaced by functions that fail the test, so a check that happens only
after loading (or not at all) is caught.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import transformers

from tether import cli
from tether.config import ConfigError, load_config


@pytest.fixture
def nothing_heavy(monkeypatch):
    calls: list[str] = []

    def refuse(what):
        def fail(*args, **kwargs):
            calls.append(what)
            raise AssertionError(f"{what} was called although the config is invalid")

        return fail

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse("model loading"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse("tokenizer loading"))
    return calls


@pytest.fixture
def setup(tmp_path, write_jsonl, write_config, good_rows):
    data = write_jsonl(tmp_path / "train.jsonl", good_rows(8))
    return write_config(tmp_path / "cfg.yaml", data, tmp_path / "run")


def _fails_cleanly(config: Path, overrides: list[str], capsys, must_mention: list[str]) -> str:
    code = cli.main(["train", str(config), *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("tether train: error: ") and "Traceback" not in err
    for text in must_mention:
        assert text in err, f"{text!r} not in: {err}"
    return err


# (overrides, texts the error must contain: the field and the fix)
CASES = {
    "unknown_objective": (["objective.name=dpo2"], ["objective", "'dpo2'", "choose one of", "hdpo"]),
    "hdpo_alpha_zero": (["objective.name=hdpo", "objective.alpha=0"], ["alpha", "> 0"]),
    "hdpo_alpha_negative": (["objective.name=hdpo", "objective.alpha=-0.5"], ["alpha", "> 0"]),
    "tdpo2_alpha_zero": (["objective.name=tdpo2", "objective.alpha=0"], ["alpha", "> 0"]),
    "entropy_alpha_zero": (["objective.name=tdpo1", "objective.entropy_alpha=0"], ["entropy_alpha", "> 0"]),
    "beta_zero": (["objective.beta=0"], ["beta", "> 0"]),
    "beta_negative": (["objective.beta=-0.1"], ["beta", "> 0"]),
    "beta_nan": (["objective.beta=.nan"], ["beta", "> 0"]),
    "epsilon_zero": (["objective.name=epsilon_dpo", "objective.epsilon=0"], ["epsilon", "(0, 1)"]),
    "epsilon_one": (["objective.name=epsilon_dpo", "objective.epsilon=1"], ["epsilon", "(0, 1)"]),
    "epsilon_above_one": (["objective.name=epsilon_dpo", "objective.epsilon=1.5"], ["epsilon", "(0, 1)"]),
    "epsilon_negative": (["objective.name=epsilon_dpo", "objective.epsilon=-0.01"], ["epsilon", "(0, 1)"]),
    "epsilon_on_dpo": (["objective.epsilon=0.01"], ["epsilon", "'dpo'", "accepts"]),
    "entropy_alpha_on_dpo": (["objective.entropy_alpha=0.9"], ["entropy_alpha", "hdpo"]),
    "alpha_on_epsilon_dpo": (
        ["objective.name=epsilon_dpo", "objective.alpha=0.9"],
        ["alpha", "entropy_alpha"],
    ),
    "label_smoothing_half": (["objective.name=cdpo", "objective.label_smoothing=0.5"], ["label_smoothing"]),
    "adapter_without_lora": (["reference.mode=adapter"], ["reference.mode=adapter", "lora.enabled=true"]),
    "adapter_with_reference_path": (
        ["lora.enabled=true", "reference.mode=adapter", "reference.path=/somewhere"],
        ["reference.path", "reference.mode=adapter"],
    ),
    "bad_reference_mode": (["reference.mode=frozen"], ["reference.mode", "'copy'", "'cache'"]),
    "bad_cache_dtype": (["reference.mode=cache", "reference.cache_dtype=int8"], ["reference.cache_dtype"]),
    "cache_with_missing_reference": (
        ["reference.mode=cache", "reference.path=/no/such/model"],
        ["reference.path", "/no/such/model", "not a folder"],
    ),
    "unknown_key": (["objective.temperature=1"], ["objective.temperature", "unknown config key"]),
    "wrong_type": (["optim.batch_size=two"], ["optim.batch_size", "integer"]),
    "zero_batch": (["optim.batch_size=0"], ["optim.batch_size", ">= 1"]),
    "negative_lr": (["optim.lr=-1"], ["optim.lr", ">= 0"]),
    "bad_on_bad_row": (["data.on_bad_row=drop"], ["data.on_bad_row", "'skip'"]),
    "bad_on_nonfinite": (["optim.on_nonfinite=ignore"], ["optim.on_nonfinite", "'skip'"]),
    "bad_dtype": (["model.dtype=float8"], ["model.dtype", "'bfloat16'"]),
    "empty_model_path": (["model.path="], ["model.path", "empty"]),
    "missing_model_path": (["model.path=/no/such/model"], ["model.path", "/no/such/model", "not a folder"]),
    "empty_output_dir": (["output_dir="], ["output_dir", "empty", "current directory"]),
    "negative_seed": (["optim.seed=-1"], ["optim.seed", "[0, 2**32)"]),
    "seed_too_large": (["optim.seed=4294967296"], ["optim.seed", "[0, 2**32)"]),
    "unknown_tracker": (["logging.trackers=[bogus]"], ["logging.trackers[0]", "'bogus'", "'tensorboard'"]),
    "lr_beyond_float32": (["optim.lr=1e39"], ["optim.lr", "finite", "3.403e+38"]),
    "weight_decay_beyond_float32": (["optim.weight_decay=1e39"], ["optim.weight_decay", "3.403e+38"]),
    "beta_beyond_float32": (["objective.beta=1e39"], ["objective.beta", "3.403e+38"]),
    "infinite_grad_norm": (["optim.max_grad_norm=.inf"], ["optim.max_grad_norm", "finite"]),
    "zero_timeout": (["distributed.timeout_s=0"], ["distributed.timeout_s", ">= 1"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_invalid_config_fails_before_loading_anything(setup, capsys, nothing_heavy, case):
    overrides, must_mention = CASES[case]
    _fails_cleanly(setup, overrides, capsys, must_mention)
    assert nothing_heavy == []


def test_load_config_alone_rejects_values_without_touching_paths(tmp_path):
    """`load_config` (no path checks) already refuses invalid values, so `tether eval` etc. share them."""
    with pytest.raises(ConfigError, match="epsilon must be in"):
        load_config(None, ["objective.name=epsilon_dpo", "objective.epsilon=2"])
    config = load_config(None, ["model.path=/no/such/model"])  # paths are checked by validate() only
    with pytest.raises(ConfigError, match="model.path"):
        config.validate(check_paths=True)


def test_prompt_limit_not_below_max_length_is_a_config_error(setup, capsys, nothing_heavy):
    _fails_cleanly(
        setup,
        ["data.max_length=32", "data.max_prompt_length=32"],
        capsys,
        ["data.max_prompt_length", "data.max_length"],
    )


@pytest.mark.parametrize("override", ["optim.adam_beta1=1.5", "optim.adam_beta2=-0.1"])
def test_adam_betas_outside_unit_interval_are_config_errors(setup, capsys, nothing_heavy, override):
    _fails_cleanly(setup, [override], capsys, [override.split("=")[0]])


# --- model folders ---------------------------------------------------------------------------------------


def _model_copy(model_dir: Path, dest: Path, *, weights: bool = True, tokenizer: bool = True) -> Path:
    shutil.copytree(model_dir, dest)
    if not weights:
        for f in dest.glob("*.safetensors"):
            f.unlink()
    if not tokenizer:
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "special_tokens_map.json",
        ):
            (dest / name).unlink(missing_ok=True)
    return dest


class _WouldRun:
    """Unpickling this writes the marker file: a stand-in for code hidden in a pickle checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def test_model_folder_without_weights(setup, model_dir, tmp_path, capsys, nothing_heavy):
    folder = _model_copy(model_dir, tmp_path / "no_weights", weights=False)
    _fails_cleanly(
        setup,
        [f"model.path={folder}"],
        capsys,
        ["model.path", "no *.safetensors weights", "safetensors only"],
    )


def test_model_folder_with_only_pickle_weights(setup, model_dir, tmp_path, capsys, nothing_heavy):
    folder = _model_copy(model_dir, tmp_path / "bin_only", weights=False)
    marker = tmp_path / "marker.txt"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _WouldRun(marker)}))
    _fails_cleanly(
        setup, [f"model.path={folder}"], capsys, ["model.path", "safe_serialization=True", "safetensors only"]
    )
    assert not marker.exists()


def test_reference_folder_with_only_pickle_weights(setup, model_dir, tmp_path, capsys, nothing_heavy):
    folder = _model_copy(model_dir, tmp_path / "ref_bin_only", weights=False)
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    _fails_cleanly(setup, [f"reference.path={folder}"], capsys, ["reference.path", "safetensors"])


def test_model_folder_without_tokenizer(setup, model_dir, tmp_path, capsys, nothing_heavy):
    folder = _model_copy(model_dir, tmp_path / "no_tokenizer", tokenizer=False)
    _fails_cleanly(
        setup, [f"model.path={folder}"], capsys, ["model.path", "no tokenizer files", "model.tokenizer_path"]
    )


def test_model_folder_without_config_json(setup, model_dir, tmp_path, capsys, nothing_heavy):
    folder = _model_copy(model_dir, tmp_path / "no_config")
    (folder / "config.json").unlink()
    _fails_cleanly(setup, [f"model.path={folder}"], capsys, ["model.path", "config.json"])


def test_separate_tokenizer_path_satisfies_the_check(setup, model_dir, tmp_path, capsys, monkeypatch):
    """The positive counterpart: weights in one folder and the tokenizer in model.tokenizer_path pass validation."""
    folder = _model_copy(model_dir, tmp_path / "weights_only", tokenizer=False)
    config = load_config(setup, [f"model.path={folder}", f"model.tokenizer_path={model_dir}"])
    config.validate(check_paths=True)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize("inside", [False, True], ids=["is_a_file", "inside_a_file"])
def test_output_dir_that_is_a_file(setup, tmp_path, capsys, nothing_heavy, inside):
    existing = tmp_path / "notes.txt"
    existing.write_text("not a run folder")
    output_dir = existing / "run" if inside else existing
    _fails_cleanly(setup, [f"output_dir={output_dir}"], capsys, ["output_dir", str(output_dir), "a file"])
    assert existing.read_text() == "not a run folder"


def test_unknown_lora_target_fails_before_training_naming_the_modules(setup, capsys):
    """Checked once the model is loaded (its module names are needed), before anything trains or is written."""
    code = cli.main(["train", str(setup), "lora.enabled=true", "lora.target_modules=[q_proj,no_such_proj]"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # after transformers' loading progress bar
    assert last.startswith("tether train: error: lora.target_modules: ['no_such_proj'] name no module")
    for name in ("'q_proj'", "'down_proj'", "'lm_head'"):  # the model's linear modules
        assert name in last
    run = load_config(setup).output_dir
    assert not (Path(run) / "metrics.jsonl").exists() and not (Path(run) / "final").exists()
