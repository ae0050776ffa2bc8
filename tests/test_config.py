"""Tests for tether.config: YAML + key=value overrides, and every error naming the field at fault.

Also: `TrainConfig.validate` refuses a model folder that train could not load (pickle-only weights, no
tokenizer) before anything is loaded.
"""

from __future__ import annotations

import pytest
import torch

from tether.config import (
    ConfigError,
    TrainConfig,
    config_fingerprint,
    load_config,
    parse_overrides,
    save_config,
)


@pytest.fixture
def yaml_path(tmp_path):
    def write(text: str):
        path = tmp_path / "cfg.yaml"
        path.write_text(text)
        return path

    return write


def test_yaml_and_overrides(yaml_path):
    path = yaml_path(
        "output_dir: runs/x\n"
        "objective:\n  name: hdpo\n  beta: 0.05\n"
        "optim:\n  lr: 1e-5\n  batch_size: 8\n"  # YAML 1.1 reads 1e-5 (no dot) as a string: converted
        "lora:\n  target_modules: [q_proj]\n"
    )
    config = load_config(
        path, ["objective.alpha=0.9", "optim.max_steps=7", "lora.target_modules=[q_proj,v_proj]"]
    )
    assert config.output_dir == "runs/x"
    assert (config.objective.name, config.objective.beta, config.objective.alpha) == ("hdpo", 0.05, 0.9)
    assert config.optim.lr == 1e-5 and isinstance(config.optim.lr, float)
    assert (config.optim.batch_size, config.optim.max_steps) == (8, 7)
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.optim.grad_accum == 1  # untouched fields keep their defaults
    assert config.build_objective().hparams() == {"beta": 0.05, "alpha": 0.9}
    # Overrides alone (no file), null for optional fields, and an integer where a float is expected.
    config = load_config(None, ["optim.max_steps=null", "optim.lr=1", "data.max_length=null"])
    assert config.optim.max_steps is None and config.optim.lr == 1.0 and config.data.max_length is None


def test_save_and_load_roundtrip(tmp_path):
    config = load_config(None, ["objective.name=tdpo2", "objective.alpha=0.3", "lora.enabled=true"])
    save_config(config, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert again == config
    assert config_fingerprint(again) == config_fingerprint(config)


def test_empty_section_means_defaults(yaml_path):
    config = load_config(yaml_path("optim:\nlogging:\n  progress: false\n"))
    assert config.optim == TrainConfig().optim and config.logging.progress is False


@pytest.mark.parametrize(
    ("text", "overrides", "field"),
    [
        ("foo: 1\n", [], "foo"),
        ("optim:\n  lrr: 0.1\n", [], "optim.lrr"),
        ("", ["objective.betta=0.2"], "objective.betta"),
        ("", ["lora.rank=8"], "lora.rank"),
    ],
)
def test_unknown_keys_are_named(yaml_path, text, overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(yaml_path(text), overrides)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("optim.batch_size=four", "optim.batch_size"),
        ("optim.batch_size=2.5", "optim.batch_size"),
        ("optim.batch_size=true", "optim.batch_size"),  # a bool is not an integer
        ("optim.lr=fast", "optim.lr"),
        ("logging.progress=maybe", "logging.progress"),
        ("lora.target_modules=q_proj", "lora.target_modules"),
        ("lora.target_modules=[1]", r"lora.target_modules\[0\]"),
        ("model.path=[a]", "model.path"),
        ("optim=3", "optim"),
    ],
)
def test_wrong_types_are_named(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["optim.batch_size=0"], "optim.batch_size"),
        (["optim.grad_accum=-1"], "optim.grad_accum"),
        (["optim.max_steps=0"], "optim.max_steps"),
        (["optim.lr=-1e-3"], "optim.lr"),
        (["optim.lr=.nan"], "optim.lr"),
        (["optim.scheduler=exponential"], "optim.scheduler"),
        (["optim.on_nonfinite=ignore"], "optim.on_nonfinite"),
        (["optim.adam_beta2=1.0"], "optim.adam_beta2"),
        (["optim.adam_eps=0"], "optim.adam_eps"),
        (["optim.warmup_steps=-1"], "optim.warmup_steps"),
        (["optim.max_grad_norm=0"], "optim.max_grad_norm"),
        (["checkpoint.every=-2"], "checkpoint.every"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
        (["model.dtype=float8"], "model.dtype"),
        (["data.on_bad_row=ignore"], "data.on_bad_row"),
        (["data.max_length=0"], "data.max_length"),
        (["data.max_length=100", "data.max_prompt_length=100"], "data.max_prompt_length"),
        (["reference.mode=frozen"], "reference.mode"),
        (["reference.mode=adapter"], "reference.mode"),  # needs lora.enabled
        (["lora.enabled=true", "lora.target_modules=[lm_head]"], "lora.target_modules"),
        (["lora.enabled=true", "lora.dropout=1.5"], "lora.dropout"),
        (["objective.name=orpo"], "objective.name"),
        (["objective.beta=0"], "objective.beta"),
        (["objective.name=cdpo", "objective.label_smoothing=0.7"], "objective.label_smoothing"),
        (["objective.name=epsilon_dpo", "objective.epsilon=1.5"], "objective.epsilon"),
        (["objective.name=dpo", "objective.alpha=0.9"], "objective.alpha"),  # dpo has no alpha
    ],
)
def test_invalid_values_are_named(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("optim: {lr: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "broken.yaml")


# --- model folders: refused by validate, before anything is loaded ----------------------------------------


@pytest.fixture
def nothing_loads(monkeypatch):
    """Make every loader in tether.train fail loudly: a test using this proves validate refused first."""
    import tether.data
    import tether.train

    def boom(*args, **kwargs):
        raise AssertionError("something was loaded before the config was validated")

    monkeypatch.setattr(tether.train, "load_tokenizer", boom)
    monkeypatch.setattr(tether.train, "load_causal_lm", boom)
    monkeypatch.setattr(tether.data, "load_preference_data", boom)


def _train(path):
    from tether.train import train

    train(load_config(path))


def test_model_folder_with_only_pickle_weights_is_refused(tmp_path, make_model, train_yaml, nothing_loads):
    folder = make_model(tmp_path / "model")
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"model\.path.*safetensors.*safe_serialization=True"):
        _train(train_yaml("run", model=folder))
    assert not (tmp_path / "run").exists()


def test_model_folder_without_tokenizer_is_refused(tmp_path, make_model, train_yaml, nothing_loads):
    folder = make_model(tmp_path / "model")
    for file in folder.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            file.unlink()
    with pytest.raises(ConfigError, match=r"model\.path.*tokenizer"):
        _train(train_yaml("run", model=folder))


@pytest.mark.parametrize("what", ["no folder", "no config.json", "no data"])
def test_missing_paths_are_refused(tmp_path, tiny_model_dir, pairs_file, train_yaml, nothing_loads, what):
    model, data, field = tiny_model_dir, pairs_file, "model.path"
    if what == "no folder":
        model = tmp_path / "missing"
    elif what == "no config.json":
        model = tmp_path / "model"
        model.mkdir()
        (model / "model.safetensors").write_bytes(b"")
    else:
        data, field = tmp_path / "missing.jsonl", "data.train"
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _train(train_yaml("run", model=model, pairs=data))


def test_sft_weight_in_config_reaches_the_objective(yaml_path):
    """objective.weight / objective.sft_weight build the mixture and enter the resume fingerprint; at their
    defaults (1, 0) neither appears (fingerprints of earlier runs stay equal)."""
    config = load_config(yaml_path("objective:\n  name: tdpo1\n  sft_weight: 0.25\n  weight: 0.5\n"))
    objective = config.build_objective()
    assert (objective.weight, objective.sft_weight) == (0.5, 0.25)
    fingerprint = config_fingerprint(config)
    assert fingerprint["objective.sft_weight"] == 0.25 and fingerprint["objective.weight"] == 0.5
    assert "objective.sft_weight" not in config_fingerprint(load_config(None))
    with pytest.raises(ConfigError, match="sft_weight must be"):
        load_config(None, ["objective.sft_weight=-1"])


def test_train_and_eval_configs_share_one_mechanism(tmp_path):
    """One ConfigError class (`tether.evaluate.config.ConfigError` is `tether.config.ConfigError`), and both
    loaders read the file and overrides through `tether.config.read_config_dict`: an override that is not YAML
    (`[1` opens a list it never closes) is a ConfigError naming the field in either (before, the training
    loader let yaml's ParserError escape), and an eval model without a path names `models[0].path`."""
    from tether.evaluate import config as eval_config

    assert eval_config.ConfigError is ConfigError
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_config(None, ["optim.lr=[1"])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ab"}\n')
    overrides = ["models=[{name: m, path: x}]", f"prompts={prompts}"]
    assert eval_config.load_config(None, overrides).models == [eval_config.ModelSpec("m", "x")]
    with pytest.raises(ConfigError, match="top_p"):
        eval_config.load_config(None, [*overrides, "top_p=[1"])
    with pytest.raises(ConfigError, match=r"models\[0\]\.path"):
        eval_config.load_config(None, ["models=[{name: m}]", f"prompts={prompts}"])
