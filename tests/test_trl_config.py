"""Tests for tether.trl_config: a `trl dpo` YAML read as is, with TRL's defaults; the one-line objective switch;
refused fields by name; `--explain`; and a run from a TRL file equal to the hand-written tether config.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tether.config import ConfigError, TrainConfig, load_config, resolve_config
from tether.objectives import OBJECTIVES
from tether.trl_config import FIELDS, TRL_DEFAULTS, TRLConfigError, from_trl, is_trl_config

pytestmark = pytest.mark.usefixtures("single_thread")

SRC = Path(__file__).resolve().parents[1] / "src"

sys.path.insert(0, str(SRC.parent / "benchmarks"))

import vs_trl  # noqa: E402  (benchmarks/ is not a package)

# The DPOConfig arguments benchmarks/vs_trl.py gives TRL (its trl_fields) for a run of these settings, as a TRL
# YAML would hold them.
BENCHMARK_ARGS = vs_trl.trl_fields(
    {
        "workdir": "",
        "pairs_per_step": 4,
        "lr": 1e-6,
        "steps": 6,
        "beta": 0.1,
        "max_length": 256,
        "ref": "cache",
        "gc": False,
        "seed": 0,
    }
)


def _write(tmp_path, mapping, name="trl.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    return path


def test_every_trl_field_name_exists_in_trl():
    """The table names only fields TRL 1.16 / transformers define (plus warmup_ratio, older transformers', and
    rpo_alpha, removed, both kept to answer with the fix): a typo in the table would accept a field TRL
    refuses. The defaults listed are TRL's own."""
    trl = pytest.importorskip("trl")
    known = {}
    for cls in (trl.DPOConfig, trl.ModelConfig, trl.ScriptArguments):
        known.update({f.name: f for f in dataclasses.fields(cls)})
    assert set(FIELDS) - set(known) == {"warmup_ratio", "rpo_alpha"}
    for name, value in TRL_DEFAULTS.items():
        f = known[name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if name == "output_dir":  # None in the dataclass; transformers names it trainer_output
            continue
        assert default == value, name


def test_benchmark_arguments_map_to_the_tether_config_it_runs():
    """benchmarks/vs_trl.py runs TRL with BENCHMARK_ARGS and tether with hand-set fields (its _run_tether): the
    translation of the former gives the latter."""
    data, sources = from_trl({**BENCHMARK_ARGS, "model_name_or_path": "m", "dataset_name": "d.jsonl"})
    config = load_config(None, [])
    config = dataclasses.replace(config)
    expected = {
        "model.path": "m",
        "model.gradient_checkpointing": False,
        "data.train": "d.jsonl",
        "data.max_length": 256,
        "data.max_prompt_length": None,
        "data.shuffle": False,
        "objective.name": "dpo",
        "objective.beta": 0.1,
        "reference.mode": "cache",
        "optim.lr": 1e-6,
        "optim.scheduler": "constant",
        "optim.warmup_steps": 0,
        "optim.max_grad_norm": 1.0,
        "optim.batch_size": 4,
        "optim.grad_accum": 1,
        "optim.max_steps": 6,
        "optim.seed": 0,
        "optim.mixed_precision": "no",
        "checkpoint.every": 0,
        "logging.every": 1,
        "logging.trackers": [],
        "logging.progress": False,
    }
    for key, value in expected.items():
        section, _, name = key.partition(".")
        assert data[section][name] == value, key
        assert sources[key].startswith("TRL"), key


def test_trl_defaults_apply_where_the_file_is_silent():
    """A minimal TRL file gets TRL's defaults, each different from tether's own: linear schedule, bf16 (bf16
    null and fp16 false), 3 epochs, batch 8, seed 42, max_length 1024 and no prompt limit, gradient
    checkpointing, logging every 10 steps, checkpoints every 500, LoRA dropout 0.05 on q/v."""
    config = TrainConfig()
    data, sources = from_trl({"model_name_or_path": "m", "dataset_name": "d.jsonl"})
    got = {
        "optim.scheduler": "linear",
        "optim.mixed_precision": "bf16",
        "optim.epochs": 3,
        "optim.batch_size": 8,
        "optim.seed": 42,
        "data.max_length": 1024,
        "data.max_prompt_length": None,
        "model.gradient_checkpointing": True,
        "logging.every": 10,
        "checkpoint.every": 500,
        "lora.dropout": 0.05,
        "lora.target_modules": ["q_proj", "v_proj"],
    }
    for key, value in got.items():
        section, _, name = key.partition(".")
        assert data[section][name] == value, key
        assert getattr(getattr(config, section), name) != value, f"{key}: tether's default is the same"
        assert "TRL default" in sources[key], key


@pytest.mark.parametrize(
    "mapping,name",
    [
        ({"loss_type": "hinge"}, "loss_type"),
        ({"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}, "loss_type"),
        ({"rpo_alpha": 1.0}, "rpo_alpha"),
        ({"load_in_8bit": True}, "load_in_8bit"),
        ({"eval_strategy": "steps", "eval_steps": 50}, "eval_strategy"),  # no dataset_name to split
        ({"dataset_name": "d", "eval_strategy": "steps", "eval_delay": 5}, "eval_delay"),
        ({"dataset_name": "d", "eval_strategy": "steps", "eval_steps": 0.5}, "eval_steps"),  # no max_steps
        ({"lr_scheduler_type": "cosine_with_restarts"}, "lr_scheduler_type"),
        ({"warmup_steps": 0.1}, "warmup_steps"),  # a ratio without max_steps
        ({"label_smoothing": 0.1}, "label_smoothing"),  # TRL's sigmoid ignores it
        ({"optim": "sgd"}, "optim"),
        ({"use_weighting": True}, "use_weighting"),
        ({"not_a_field": 1}, "not_a_field"),
        ({"num_train_epochs": 1.5}, "num_train_epochs"),
        ({"objective": "hdpo", "loss_type": "ipo"}, "objective"),
        ({"objective": "hdpo", "loss_type": ["sft"]}, "objective"),
    ],
)
def test_refused_fields_are_named(mapping, name):
    with pytest.raises(TRLConfigError, match=f"^{name}"):
        from_trl({"model_name_or_path": "m", **mapping})


def test_refused_field_exits_2_naming_it(tmp_path):
    """The command line: a refused TRL field stops `tether train` (and --explain) with exit 2 and its name."""
    path = _write(tmp_path, {"model_name_or_path": "m", "dataset_name": "d", "use_dora": True})
    proc = subprocess.run(
        [sys.executable, "-m", "tether.cli", "train", str(path), "--explain"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "use_dora" in proc.stderr and "DoRA" in proc.stderr


def test_no_effect_fields_are_accepted_and_refused_values_of_them_are_not():
    data, _ = from_trl(
        {"model_name_or_path": "m", "push_to_hub": False, "use_cpu": True, "lora_task_type": "CAUSAL_LM"}
    )
    assert data["model"]["path"] == "m"
    with pytest.raises(TRLConfigError, match="^push_to_hub"):
        from_trl({"model_name_or_path": "m", "push_to_hub": True})


def test_loss_type_list_with_weights_maps_to_the_sft_term():
    """loss_type [sigmoid, sft] with loss_weights [0.8, 0.5] -> dpo, weight 0.8, sft_weight 0.5; [ipo] -> IPO
    length-normalised (TRL's); [sft] alone -> weight 0."""
    data, _ = from_trl({"loss_type": ["sigmoid", "sft"], "loss_weights": [0.8, 0.5]})
    assert data["objective"] | {} == {"name": "dpo", "beta": 0.1, "weight": 0.8, "sft_weight": 0.5}
    data, _ = from_trl({"loss_type": "ipo", "beta": 0.3})
    assert data["objective"] == {"name": "ipo", "beta": 0.3, "length_normalize": True}
    data, _ = from_trl({"loss_type": ["sft"]})
    assert data["objective"]["weight"] == 0.0 and data["objective"]["sft_weight"] == 1.0
    with pytest.raises(TRLConfigError, match="^loss_weights"):
        from_trl({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]})


def test_warmup_ratio_is_a_share_of_max_steps():
    """transformers 5 reads warmup_steps < 1 as a ratio: ceil(0.1 * 25) = 3; warmup_ratio (older) too;
    TRL's constant schedule ignores warmup."""
    data, _ = from_trl({"warmup_steps": 0.1, "max_steps": 25})
    assert data["optim"]["warmup_steps"] == 3
    data, _ = from_trl({"warmup_ratio": 0.1, "max_steps": 25})
    assert data["optim"]["warmup_steps"] == 3
    data, _ = from_trl({"warmup_steps": 5, "lr_scheduler_type": "constant"})
    assert data["optim"]["warmup_steps"] == 0
    data, _ = from_trl({"warmup_steps": 5, "lr_scheduler_type": "constant_with_warmup"})
    assert (data["optim"]["scheduler"], data["optim"]["warmup_steps"]) == ("constant", 5)


def test_eval_strategy_maps_with_trls_semantics(tmp_path):
    """steps: every eval_steps, which falls back to logging_steps (TrainingArguments), a ratio of max_steps
    rounded up, and after the last step; epoch: at every epoch's end only; no (TRL's default): no eval. The
    test split of the dataset folder is the eval data; per_device_eval_batch_size defaults to TRL's 8."""
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "dev.jsonl").write_text("")
    base = {"dataset_name": str(tmp_path), "dataset_test_split": "dev", "logging_steps": 5}
    data, sources = from_trl({**base, "eval_strategy": "steps"})
    assert data["eval"] == {
        "data": str(tmp_path / "dev.jsonl"),
        "split": "dev",
        "every": 5,
        "at_end": True,
        "at_start": False,
        "batch_size": 8,
    }
    assert "logging_steps" in sources["eval.every"]
    data, _ = from_trl({**base, "eval_strategy": "steps", "eval_steps": 0.25, "max_steps": 10})
    assert data["eval"]["every"] == 3
    data, _ = from_trl(
        {**base, "eval_strategy": "epoch", "eval_on_start": True, "per_device_eval_batch_size": 2}
    )
    assert {k: data["eval"][k] for k in ("per_epoch", "at_end", "at_start", "batch_size")} == {
        "per_epoch": True,
        "at_end": False,
        "at_start": True,
        "batch_size": 2,
    }
    data, _ = from_trl(base)
    assert "eval" not in data


def test_dataset_folder_resolves_to_its_split_file(tmp_path):
    """dataset_name: a folder with train.jsonl / test.jsonl (what datasets.load_dataset(folder) reads) ->
    the split's file."""
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "dev.jsonl").write_text("")
    data, _ = from_trl({"dataset_name": str(tmp_path)})
    assert data["data"]["train"] == str(tmp_path / "train.jsonl")
    data, _ = from_trl({"dataset_name": str(tmp_path), "dataset_train_split": "dev"})
    assert data["data"]["train"] == str(tmp_path / "dev.jsonl")


TRL_YAML = {  # the shape of TRL's documented `trl dpo --config` example, pointed at local folders
    "model_name_or_path": None,
    "dataset_name": None,
    "learning_rate": 1.0e-3,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "max_steps": 3,
    "max_length": 64,
    "logging_steps": 1,
    "bf16": False,
    "output_dir": None,
}

OBJECTIVE_LINES = {
    "dpo": "dpo",
    "ipo": "ipo",
    "cdpo": {"name": "cdpo", "label_smoothing": 0.2},
    "hdpo": {"name": "hdpo", "alpha": 0.9},
    "epsilon_dpo": "epsilon_dpo",
    "tdpo1": "tdpo1",
    "tdpo2": {"name": "tdpo2", "alpha": 0.5},
}


def test_every_objective_is_one_added_line():
    """Adding `objective: NAME` (or `objective: {name: NAME, ...}`) to a TRL file switches to each of
    tether's objectives and changes nothing else."""
    assert set(OBJECTIVE_LINES) == set(OBJECTIVES)
    base = {**TRL_YAML, "model_name_or_path": "m", "dataset_name": "d", "output_dir": "o"}
    plain, _ = from_trl(base)
    for name, line in OBJECTIVE_LINES.items():
        data, sources = from_trl({**base, "objective": line})
        assert data["objective"]["name"] == name
        assert sources["objective.name"] == "tether objective line"
        assert {k: v for k, v in data.items() if k != "objective"} == {
            k: v for k, v in plain.items() if k != "objective"
        }
        config = load_config(None, [f"objective.{k}={v}" for k, v in data["objective"].items()])
        config.build_objective()  # valid


def test_detection_by_keys():
    assert is_trl_config({"model_name_or_path": "m"}) and is_trl_config({"learning_rate": 1e-6})
    assert is_trl_config({"optim": "adamw_torch", "output_dir": "x"})
    assert not is_trl_config({"output_dir": "x", "optim": {"lr": 1e-6}, "model": {"path": "m"}})


def test_explain_names_every_source(tmp_path, capsys):
    """--explain prints every config field with its value and source: the TRL file, TRL's default, tether's
    default, an override by TRL name and one by tether name."""
    from tether.cli import main

    path = _write(tmp_path, {"model_name_or_path": "m", "dataset_name": "d.jsonl", "beta": 0.2})
    assert main(["train", str(path), "learning_rate=2e-6", "optim.chunk_size=256", "--explain"]) == 0
    lines = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert set(lines) >= {
        f"{s}.{f.name}"
        for s in ("optim", "data")
        for f in dataclasses.fields(type(getattr(TrainConfig(), s)))
    }
    assert "0.2" in lines["objective.beta"] and "# TRL beta" in lines["objective.beta"]
    assert "# TRL default of lr_scheduler_type" in lines["optim.scheduler"]
    assert "2e-06" in lines["optim.lr"] and "command line (TRL name)" in lines["optim.lr"]
    assert "256" in lines["optim.chunk_size"] and "# command line" in lines["optim.chunk_size"]
    assert "# tether default" in lines["optim.on_nonfinite"]


def test_trl_file_trains_as_the_equivalent_tether_config(tmp_path, tiny_model_dir, pairs_file):
    """3 steps (batch 4 x accumulation 2, lr 1e-3) from an unmodified TRL-style YAML give the same losses as
    the tether config written out by hand with TRL's defaults (linear schedule, seed 42, no prompt limit,
    gradient checkpointing, logging every step as the file says); a tether config with tether's defaults for
    the fields the TRL file leaves out (cosine, seed 0) trains differently, so the defaults were applied."""
    from tether.train import train

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(pairs_file, data_dir / "train.jsonl")
    trl_path = _write(
        tmp_path,
        {
            **TRL_YAML,
            "model_name_or_path": str(tiny_model_dir),
            "dataset_name": str(data_dir),
            "output_dir": str(tmp_path / "trl"),
            "disable_tqdm": True,
        },
    )
    tether = {
        "output_dir": str(tmp_path / "tether"),
        "model": {"path": str(tiny_model_dir), "gradient_checkpointing": True},
        "data": {"train": str(data_dir / "train.jsonl"), "max_length": 64, "max_prompt_length": None},
        "objective": {"name": "dpo", "beta": 0.1},
        "optim": {
            "lr": 1e-3,
            "batch_size": 4,
            "grad_accum": 2,
            "max_steps": 3,
            "scheduler": "linear",
            "seed": 42,
            "epochs": 3,
        },
        "checkpoint": {"every": 500},
        "logging": {"every": 1, "progress": False},
    }
    tether_path = _write(tmp_path, tether, "tether.yaml")
    native = _write(
        tmp_path,
        {
            **tether,
            "output_dir": str(tmp_path / "native"),
            "optim": {**tether["optim"], "scheduler": "cosine", "seed": 0},
        },
        "native.yaml",
    )

    def losses(path):
        return [r["loss"] for r in train(load_config(path)).history]

    from_trl_file, by_hand = losses(trl_path), losses(tether_path)
    assert len(from_trl_file) == 3
    assert from_trl_file == by_hand
    assert losses(native)[1:] != by_hand[1:]


def test_switching_objective_on_the_command_line_drops_the_old_ones_hyperparameters(capsys):
    """examples/toy.yaml is hdpo with alpha 0.9: objective.name=X on the command line works for every X; the
    file's alpha is dropped (it is H-DPO's) with a note, unless the command line sets it; beta carries over."""
    example = Path(__file__).resolve().parents[1] / "examples" / "toy.yaml"
    for name in OBJECTIVES:
        config = load_config(example, [f"objective.name={name}"])
        config.build_objective()
        assert config.objective.beta == 0.1
        if name != "hdpo":
            assert config.objective.alpha is None
            assert "dropped objective.alpha=0.9" in capsys.readouterr().err
    config = load_config(example, ["objective.name=tdpo2", "objective.alpha=0.3"])
    assert config.objective.alpha == 0.3


def test_trl_override_of_a_refused_field_is_a_config_error(tmp_path):
    path = _write(tmp_path, {"model_name_or_path": "m"})
    with pytest.raises(ConfigError, match="torch_compile"):
        resolve_config(path, ["torch_compile=true"])
    config, sources = resolve_config(path, ["objective=tdpo2"])
    assert config.objective.name == "tdpo2" and sources["objective.name"] == "tether objective line"


def test_docs_table_has_every_field():
    """docs/trl.md's field-by-field table has a row for every field of the table in code, with its status."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "trl.md").read_text()
    rows = {
        line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| `")
    }
    assert set(FIELDS) <= set(rows)
    for name, field in FIELDS.items():
        status = {"mapped": "mapped", "no_effect": "no effect", "refused": "**refused**"}[field.kind]
        assert status in rows[name], name


PARSED_BY_TRL = {
    "minimal": {
        "model_name_or_path": "m",
        "dataset_name": "d.jsonl",
        "use_cpu": True,
    },  # TRL needs it for bf16 on CPU
    "example": {
        **TRL_YAML,
        "model_name_or_path": "m",
        "dataset_name": "d.jsonl",
        "output_dir": "o",
        "warmup_steps": 0.1,
    },
    "benchmark": {**BENCHMARK_ARGS, "model_name_or_path": "m", "dataset_name": "d.jsonl"},
    "lora": {
        "model_name_or_path": "m",
        "use_peft": True,
        "lora_r": 32,
        "lora_alpha": 16,
        "lora_target_modules": ["q_proj", "k_proj"],
        "fp16": True,
        "lr_scheduler_type": "cosine",
        "num_train_epochs": 2,
        "save_steps": 7,
        "loss_type": "ipo",
        "beta": 0.3,
    },
}


@pytest.mark.parametrize("case", sorted(PARSED_BY_TRL))
def test_trl_parses_the_same_file_to_the_same_settings(tmp_path, case):
    """TRL's own parser (`trl dpo --config`: TrlParser over ScriptArguments, DPOConfig, ModelConfig) reads the
    same YAML, and every setting it resolves equals the translated tether config's: an independent check of
    the mapping and of TRL's defaults (warmup through transformers' own get_warmup_steps)."""
    pytest.importorskip("trl")
    from trl import DPOConfig, ModelConfig, ScriptArguments, TrlParser

    path = _write(tmp_path, PARSED_BY_TRL[case])
    parser = TrlParser((ScriptArguments, DPOConfig, ModelConfig))
    script, args, model = parser.parse_args_and_config(["--config", str(path)])
    c = load_config(path)
    assert c.output_dir == args.output_dir
    assert c.model.path == model.model_name_or_path and c.model.dtype == model.dtype
    assert c.model.gradient_checkpointing == args.gradient_checkpointing
    assert c.data.max_length == args.max_length and c.data.max_prompt_length is None
    assert c.data.split == script.dataset_train_split
    assert c.objective.beta == args.beta
    losses = {"sigmoid": "dpo", "ipo": "ipo"}
    assert c.objective.name == losses[args.loss_type[0]]
    assert (c.objective.length_normalize is True) == (args.loss_type == ["ipo"])
    assert c.optim.lr == args.learning_rate
    scheduler = args.lr_scheduler_type.value
    assert c.optim.scheduler == {"constant_with_warmup": "constant"}.get(scheduler, scheduler)
    max_steps = args.max_steps if args.max_steps > 0 else 100
    expected_warmup = 0 if scheduler == "constant" else args.get_warmup_steps(max_steps)
    if args.max_steps > 0 or args.warmup_steps >= 1:
        assert c.optim.warmup_steps == expected_warmup
    assert c.optim.max_steps == (args.max_steps if args.max_steps > 0 else None)
    assert c.optim.epochs == args.num_train_epochs
    assert c.optim.batch_size == args.per_device_train_batch_size
    assert c.optim.grad_accum == args.gradient_accumulation_steps
    assert c.optim.seed == args.seed
    assert c.optim.max_grad_norm == args.max_grad_norm
    assert c.optim.weight_decay == args.weight_decay
    assert (c.optim.adam_beta1, c.optim.adam_beta2, c.optim.adam_eps) == (
        args.adam_beta1,
        args.adam_beta2,
        args.adam_epsilon,
    )
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
    assert c.optim.mixed_precision == precision
    assert c.logging.every == args.logging_steps
    assert c.checkpoint.every == (0 if args.save_strategy.value == "no" else args.save_steps)
    assert c.reference.mode == ("cache" if args.precompute_ref_log_probs else "auto")
    assert c.lora.enabled == model.use_peft
    assert (c.lora.r, c.lora.alpha, c.lora.dropout) == (model.lora_r, model.lora_alpha, model.lora_dropout)
    if model.lora_target_modules is not None:
        assert c.lora.target_modules == list(model.lora_target_modules)


@pytest.mark.parametrize(
    "extra",
    [{}, {"loss_type": ["sigmoid", "sft"], "loss_weights": [0.8, 0.5], "warmup_steps": 0.5, "beta": 0.3}],
    ids=["sigmoid", "sigmoid+sft,warmup-ratio"],
)
def test_trl_and_tether_train_the_same_yaml_to_the_same_losses(
    tmp_path, monkeypatch, tiny_model_dir, pairs_file, extra
):
    """`trl dpo --config x.yaml` (TRL's own script, in this process, offline) and `tether train x.yaml` on the
    same unmodified TRL YAML: 3 steps of batch 2 x accumulation 2 at lr 1e-3 under TRL's default linear
    schedule, data in order (train_sampling_strategy: sequential, since TRL's sampler is its own). The step
    losses agree to float32 rounding: TRL's per step is the mean of its micro-batch losses. Steps 2 and 3 move
    away from log 2, so they test the update (lr, schedule, clipping, Adam), not only the first forward. The
    second case mixes TRL's sft term in (weights 0.8 / 0.5) and warms up over ceil(0.5 * 3) = 2 steps."""
    pytest.importorskip("trl")
    from trl import DPOTrainer
    from trl.scripts.dpo import main as trl_main
    from trl.scripts.dpo import make_parser

    from tether.train import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(pairs_file, data_dir / "train.jsonl")
    path = _write(
        tmp_path,
        {
            "model_name_or_path": str(tiny_model_dir),
            "dataset_name": str(data_dir),
            "learning_rate": 1.0e-3,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "max_steps": 3,
            "max_length": 64,
            "logging_steps": 1,
            "bf16": False,
            "use_cpu": True,
            "train_sampling_strategy": "sequential",
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "output_dir": str(tmp_path / "trl"),
            **extra,
        },
    )
    micro: list[float] = []
    compute_loss = DPOTrainer.compute_loss

    def recording(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = compute_loss(
            self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if model.training:
            micro.append(float((out[0] if return_outputs else out).detach()))
        return out

    monkeypatch.setattr(DPOTrainer, "compute_loss", recording)
    trl_main(*make_parser().parse_args_and_config(["--config", str(path)]))
    trl_steps = [(micro[i] + micro[i + 1]) / 2 for i in range(0, len(micro), 2)]

    config = load_config(path, [f"output_dir={tmp_path / 'tether'}"])
    ours = [r["loss"] for r in train(config).history]
    assert len(trl_steps) == len(ours) == 3
    assert ours == pytest.approx(trl_steps, abs=2e-6)
    assert abs(ours[2] - ours[0]) > 1e-3  # training moved the loss


def test_trl_and_tether_log_the_same_windows_and_evaluations(
    tmp_path, monkeypatch, tiny_model_dir, make_pairs, pairs_file
):
    """`trl dpo` and `tether train` on one TRL YAML with logging_steps 2 and eval_strategy steps (eval_steps 2,
    per_device_eval_batch_size 3, the folder's test.jsonl of 6 pairs): 4 steps log at steps 2 and 4 the mean
    loss and reward margin over the window's steps, and the eval metrics (eval_loss, eval_rewards/*,
    eval_logps/*) at steps 2 and 4, the same in both to float32 rounding. (TRL averages its eval metrics per
    batch, tether per pair: equal here, where every eval batch holds 3 pairs.)"""
    pytest.importorskip("trl")
    from trl import DPOTrainer
    from trl.scripts.dpo import main as trl_main
    from trl.scripts.dpo import make_parser

    from tether.train import read_metrics, train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(pairs_file, data_dir / "train.jsonl")
    make_pairs(data_dir / "test.jsonl", 6, seed=7)
    path = _write(
        tmp_path,
        {
            "model_name_or_path": str(tiny_model_dir),
            "dataset_name": str(data_dir),
            "learning_rate": 1.0e-3,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "max_steps": 4,
            "max_length": 64,
            "logging_steps": 2,
            "eval_strategy": "steps",
            "eval_steps": 2,
            "per_device_eval_batch_size": 3,
            "bf16": False,
            "use_cpu": True,
            "train_sampling_strategy": "sequential",
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "output_dir": str(tmp_path / "trl"),
        },
    )
    logs: list[dict] = []
    log = DPOTrainer.log

    def recording(self, entries, start_time=None):
        log(self, entries, start_time)
        logs.append(dict(entries, step=self.state.global_step))

    monkeypatch.setattr(DPOTrainer, "log", recording)
    trl_main(*make_parser().parse_args_and_config(["--config", str(path)]))
    trl_train = [e for e in logs if "loss" in e]
    trl_eval = [e for e in logs if "eval_loss" in e]

    config = load_config(path, [f"output_dir={tmp_path / 'tether'}"])
    assert (config.eval.every, config.eval.batch_size, config.eval.at_end) == (2, 3, True)
    train(config)
    ours, our_eval = read_metrics(config.output_dir), read_metrics(config.output_dir, split="eval")
    assert [e["step"] for e in trl_train] == [r["step"] for r in ours] == [2, 4]
    assert [e["step"] for e in trl_eval] == [r["step"] for r in our_eval] == [2, 4]
    for theirs, mine in zip(trl_train, ours, strict=True):
        for key in ("loss", "rewards/margins", "rewards/chosen", "logps/rejected", "learning_rate"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=2e-6), (mine["step"], key)
        assert mine["num_tokens"] == theirs["num_tokens"]
    for theirs, mine in zip(trl_eval, our_eval, strict=True):
        for key in ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies", "eval_logps/chosen"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=2e-6), (mine["step"], key)
