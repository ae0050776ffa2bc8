"""Hub ids (through a hub cache laid out here as huggingface_hub lays it out, offline), PEFT adapter folders as
the starting point, and QLoRA's refusal without CUDA. Nothing is downloaded: HF_HUB_OFFLINE is on and every
cache is a tmp folder."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether import hub
from tether.config import ConfigError, config_fingerprint, config_from_dict
from tether.data import load_preference_data
from tether.modeling import load_causal_lm, load_tokenizer
from tether.train import read_metrics, train

pytestmark = pytest.mark.usefixtures("single_thread")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"
LOG2 = math.log(2)


def lay_out(
    cache: Path, repo_type: str, repo_id: str, files: dict[str, bytes], commit: str, ref: str = "main"
):
    """A repository in the hub cache exactly as huggingface_hub writes it: `<type>s--org--name/refs/<ref>` holds
    the commit, `snapshots/<commit>/<file>` are relative symlinks to `blobs/<sha256>`."""
    root = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    (root / "blobs").mkdir(exist_ok=True)
    snapshot = root / "snapshots" / commit
    for rel, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        target = snapshot / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, target.parent), target)
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache in tmp, offline; datasets' own cache in tmp too."""
    import datasets
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    for name, value in (
        ("HF_HOME", tmp_path / "hf"),
        ("HF_HUB_CACHE", cache),
        ("HF_DATASETS_CACHE", tmp_path / "hf" / "datasets"),
    ):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_RESOLVED", {})
    return cache


@pytest.fixture
def hub_model(hub_cache, tiny_model_dir):
    """The tiny model as Hub model org/tiny (main -> COMMIT) in the cache."""
    lay_out(hub_cache, "model", "org/tiny", folder_files(tiny_model_dir), COMMIT)
    return "org/tiny"


def test_is_hub_id():
    assert hub.is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not hub.is_hub_id("data/train.jsonl")  # a file tether reads, missing: a missing file
    assert not hub.is_hub_id("/abs/folder") and not hub.is_hub_id("a/b/c") and not hub.is_hub_id("model")


def test_hub_model_loads_from_the_cache_and_runs_are_keyed_by_commit(
    tmp_path, hub_model, hub_cache, tiny_model_dir, pairs_file, config_dict
):
    local = load_causal_lm(
        str(tiny_model_dir), config_from_dict(config_dict(tiny_model_dir, pairs_file, tmp_path / "x")).model
    )
    config = config_from_dict(
        config_dict(
            hub_model, pairs_file, tmp_path / "run", reference={"mode": "cache"}, optim={"max_steps": 1}
        )
    )
    config.validate(check_paths=True)
    model = load_causal_lm(config.model.path, config.model)
    for (name, a), (_, b) in zip(local.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    assert model.config._name_or_path == "org/tiny"  # saved configs and adapters name the id
    assert load_tokenizer(config.model).encode("1+2=") == load_tokenizer(local_config(tiny_model_dir)).encode(
        "1+2="
    )
    assert config_fingerprint(config)["model.path"] == f"hub:org/tiny@{COMMIT}"

    train(config)
    key = json.loads((tmp_path / "run" / "reference_cache" / "meta.json").read_text())["key"]
    assert key["reference"] == key["tokenizer"] == f"hub:org/tiny@{COMMIT}"
    assert str(hub_cache) not in json.dumps(key["reference"])


def local_config(path: Path):
    from tether.config import ModelConfig

    return ModelConfig(path=str(path))


def test_hub_revision_picks_its_commit(
    tmp_path, hub_cache, tiny_model_dir, make_model, pairs_file, config_dict
):
    lay_out(hub_cache, "model", "org/tiny", folder_files(tiny_model_dir), COMMIT)
    other = make_model(tmp_path / "other", seed=1)
    lay_out(hub_cache, "model", "org/tiny", folder_files(other), OTHER, ref="v1")
    config = config_from_dict(config_dict("org/tiny", pairs_file, tmp_path / "run", model={"revision": "v1"}))
    config.validate(check_paths=True)
    assert config_fingerprint(config)["model.path"] == f"hub:org/tiny@{OTHER}"
    loaded = load_causal_lm("org/tiny", config.model, "v1").state_dict()
    expected = load_file(str(other / "model.safetensors"))
    name = next(iter(expected))
    assert torch.equal(loaded[name], expected[name])
    raw = config_dict(tiny_model_dir, pairs_file, tmp_path / "run", model={"revision": "v1"})
    with pytest.raises(ConfigError, match="model.revision='v1' is read only when model.path is a Hub id"):
        config_from_dict(raw).validate(check_paths=True)  # a local folder has no revisions: not ignored
    config = config_from_dict(config_dict("org/tiny", pairs_file, tmp_path / "run", model={"revision": "v2"}))
    with pytest.raises(ConfigError, match="model.path: Hub model 'org/tiny' at revision 'v2' is not"):
        config.validate(check_paths=True)


@pytest.mark.parametrize("field", ["model.path", "reference.path", "data.train"])
def test_an_uncached_id_offline_says_so_and_how_to_use_a_local_copy(
    tmp_path, hub_cache, tiny_model_dir, pairs_file, config_dict, field
):
    section, key = field.split(".")
    raw = config_dict(tiny_model_dir, pairs_file, tmp_path / "run")
    raw.setdefault(section, {})[key] = "org/absent"
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw).validate(check_paths=True)
    message = str(info.value)
    assert message.startswith(f"{field}: Hub ")
    for part in (
        "'org/absent' is not a local path",
        str(hub_cache),
        "offline (HF_HUB_OFFLINE=1)",
        "HF_HUB_CACHE",
    ):
        assert part in message
    flag = " --repo-type dataset" if field == "data.train" else ""
    assert f"hf download org/absent{flag} --local-dir DIR" in message


def rows(n: int, tag: str) -> bytes:
    return b"".join(
        json.dumps({"prompt": f"{tag}{i}+1=", "chosen": str(i + 1), "rejected": str(i)}).encode() + b"\n"
        for i in range(n)
    )


def test_hub_data_set_loads_from_the_cache(tmp_path, hub_cache, tiny_model_dir):
    import datasets

    tokenizer = load_tokenizer(local_config(tiny_model_dir))
    readme = (
        b"---\nconfigs:\n- config_name: easy\n  data_files:\n  - split: train\n    path: easy/train.jsonl\n"
        b"- config_name: hard\n  data_files:\n  - split: train\n    path: hard/train.jsonl\n---\n"
    )
    lay_out(
        hub_cache,
        "dataset",
        "org/prefs",
        {"data/train.jsonl": rows(5, "a"), "data/test.jsonl": rows(2, "b")},
        COMMIT,
    )
    lay_out(
        hub_cache,
        "dataset",
        "org/subsets",
        {"README.md": readme, "easy/train.jsonl": rows(3, "e"), "hard/train.jsonl": rows(4, "h")},
        OTHER,
    )
    # datasets alone cannot read a raw repository from the hub cache offline (it looks for data sets it has
    # prepared itself): why tether resolves the snapshot folder and hands that to datasets.
    with pytest.raises(ConnectionError):
        datasets.load_dataset("org/prefs", split="train")

    limits = {"max_length": 64, "max_prompt_length": 32, "progress": False}
    test, report = load_preference_data("org/prefs", tokenizer, split="test", **limits)
    local = tmp_path / "test.jsonl"
    local.write_bytes(rows(2, "b"))
    expected, _ = load_preference_data(local, tokenizer, **limits)
    assert len(test) == report.kept == 2
    assert [p.prompt_ids for p in test] == [p.prompt_ids for p in expected]
    assert len(load_preference_data("org/prefs", tokenizer, **limits)[0]) == 5
    assert len(load_preference_data("org/subsets", tokenizer, subset="hard", **limits)[0]) == 4

    with pytest.raises(ConfigError, match="data.subset='hard' is read only when data.train is a folder"):
        config_from_dict(
            {"model": {"path": str(tiny_model_dir)}, "data": {"train": str(local), "subset": "hard"}}
        ).validate(check_paths=True)

    from tether.data.errors import DataError
    from tether.train import data_digest

    with pytest.raises(DataError, match="Unknown split"):
        load_preference_data("org/prefs", tokenizer, split="validation", **limits)
    # The digest is the snapshot's content, not the name.
    snapshot = hub_cache / "datasets--org--prefs" / "snapshots" / COMMIT
    assert data_digest("org/prefs", "train") == data_digest(str(snapshot), "train")
    assert hub.identity("org/prefs", None, "dataset") == f"hub:org/prefs@{COMMIT}"


def test_training_evaluates_a_hub_data_sets_test_split(tmp_path, hub_cache, tiny_model_dir, config_dict):
    """eval.data as TRL's dataset_test_split makes it: the training data set's id, its test split read at
    data.subset and data.revision (here a tag whose commit differs from main's); a missing id names eval.data."""
    readme = (
        b"---\nconfigs:\n- config_name: hard\n  data_files:\n  - split: train\n    path: hard/train.jsonl\n"
        b"  - split: test\n    path: hard/test.jsonl\n---\n"
    )
    files = {"README.md": readme, "hard/train.jsonl": rows(8, "h"), "hard/test.jsonl": rows(3, "t")}
    lay_out(hub_cache, "dataset", "org/prefs", {**files, "hard/test.jsonl": rows(5, "t")}, COMMIT)
    lay_out(hub_cache, "dataset", "org/prefs", files, OTHER, ref="v1")
    raw = config_dict(
        tiny_model_dir,
        "org/prefs",
        tmp_path / "run",
        data={"subset": "hard", "revision": "v1"},
        optim={"max_steps": 2, "batch_size": 4},
        reference={"mode": "cache"},
        eval={"data": "org/prefs", "split": "test", "at_end": True},
    )
    config = config_from_dict(raw)
    config.validate(check_paths=True)
    assert config.eval_source() == ("org/prefs", "hard", "v1")
    result = train(config)
    assert [r["eval_pairs"] for r in result.eval_history] == [3]  # v1's test split, not main's 5 rows
    key = json.loads((tmp_path / "run" / "reference_cache_eval" / "meta.json").read_text())["key"]
    assert (key["data"], key["data_subset"], key["split"]) == (f"hub:org/prefs@{OTHER}", "hard", "test")

    other = config_from_dict({**raw, "eval": {"data": "org/held-out", "at_end": True}})
    assert other.eval_source() == ("org/held-out", None, None)  # another data set: neither applies
    with pytest.raises(ConfigError, match="^eval.data: .*org/held-out"):
        other.validate(check_paths=True)


def test_eval_loads_a_hub_model(hub_model, tiny_model_dir):
    from tether.evaluate.config import EvalConfig
    from tether.evaluate.runner import load_model

    model, tokenizer = load_model(hub_model, EvalConfig(), torch.device("cpu"))
    expected = load_file(str(tiny_model_dir / "model.safetensors"))
    name = next(iter(expected))
    assert torch.equal(model.state_dict()[name], expected[name])


def test_eval_scores_with_a_hub_reward_model(tmp_path, hub_cache, tiny_model_dir):
    """A reward model named by Hub id is read from its cached snapshot and scores as its local folder does;
    an id not in the cache (offline) is a clear error."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    from tether.evaluate.rewards import RewardModelScorer, load_reward, score_all

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_labels = 1
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "rm")
    lay_out(hub_cache, "model", "org/rm", folder_files(tmp_path / "rm"), COMMIT)

    scorer = load_reward("org/rm")
    assert isinstance(scorer, RewardModelScorer)
    prompts, completions = ["1+2=", "3+4="], ["3", "8"]
    assert score_all(scorer, prompts, completions) == score_all(
        load_reward(str(tmp_path / "rm")), prompts, completions
    )
    with pytest.raises(ValueError, match="^reward model: .*org/missing"):
        load_reward("org/missing")


def test_trl_names_hub_ids_revisions_subsets_and_adapters(tmp_path, hub_model, make_adapter):
    from tether.trl_config import TRLConfigError, from_trl

    data, _ = from_trl(
        {
            "model_name_or_path": hub_model,
            "model_revision": "v1",
            "dataset_name": "org/prefs",
            "dataset_config": "hard",
        }
    )
    assert data["model"]["path"] == "org/tiny" and data["model"]["revision"] == "v1"
    assert data["data"]["train"] == "org/prefs" and data["data"]["subset"] == "hard"
    data, _ = from_trl({"model_name_or_path": hub_model, "model_revision": "main"})  # TRL's default
    assert "revision" not in data["model"]
    adapter = make_adapter(tmp_path / "adapter")
    data, sources = from_trl({"model_name_or_path": str(adapter)})
    assert data["model"]["adapter"] == str(adapter) and "path" not in data["model"]
    assert "adapter" in sources["model.adapter"]
    with pytest.raises(TRLConfigError, match="^bnb_4bit_quant_storage"):
        from_trl({"model_name_or_path": "m", "load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16"})
    data, _ = from_trl({"model_name_or_path": "m", "load_in_4bit": True, "use_peft": True})
    assert data["model"]["load_in_4bit"] is True and data["lora"]["merge_on_save"] is False


# --- adapters ------------------------------------------------------------------------------------------


@pytest.fixture
def make_adapter(tiny_model_dir):
    """make_adapter(folder) -> a PEFT LoRA adapter (q/v, r 4, random non-zero B) saved by peft on the tiny
    model, whose adapter_config.json names the tiny model's folder as its base."""

    def make(folder: Path) -> Path:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(3)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(base, lora).save_pretrained(folder, safe_serialization=True)
        return folder

    return make


def test_training_continues_an_adapter_with_either_reference(
    tmp_path, tiny_model_dir, pairs_file, config_dict, make_adapter
):
    adapter = make_adapter(tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model_dir
    )
    common = {"optim": {"max_steps": 2, "batch_size": 24, "lr": 1e-2}}

    def run(name: str, model: dict, **sections) -> list[dict]:
        raw = config_dict(tiny_model_dir, pairs_file, tmp_path / name, **common, **sections)
        raw["model"] = model
        train(config_from_dict(raw))
        return read_metrics(tmp_path / name)

    base = run("base", {"path": str(tiny_model_dir)})  # step 1: the base's log-probs, as the policy
    off = run("off", {"adapter": str(adapter)}, lora={"merge_on_save": False})  # reference: adapter off
    loaded = run("loaded", {"adapter": str(adapter)}, reference={"mode": "copy"})  # reference: as loaded
    beta = 0.1
    # rewards/chosen = beta (policy - reference) log-probs, mean over pairs; at step 1 the policy is the
    # adapter as loaded: with reference.mode=copy the rewards are 0 and the loss log 2.
    assert loaded[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert loaded[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert off[0]["logps/chosen"] == pytest.approx(loaded[0]["logps/chosen"], abs=1e-6)
    ref_off = off[0]["logps/chosen"] - off[0]["rewards/chosen"] / beta
    assert ref_off == pytest.approx(base[0]["logps/chosen"], abs=1e-4)  # the base's log-probs
    assert abs(off[0]["logps/chosen"] - base[0]["logps/chosen"]) > 1e-2  # the adapter changes them

    final = tmp_path / "off" / "final"  # merge_on_save=false: the adapter, trained further
    start, trained = (
        load_file(str(adapter / "adapter_model.safetensors")),
        load_file(str(final / "adapter_model.safetensors")),
    )
    assert start.keys() == trained.keys()
    assert any(not torch.equal(start[k], trained[k]) for k in start)
    merged = tmp_path / "loaded" / "final"  # merge_on_save (default): a full model folder
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()


def test_adapter_misuse_is_refused(tmp_path, tiny_model_dir, pairs_file, config_dict, make_adapter):
    adapter = make_adapter(tmp_path / "adapter")
    raw = config_dict(adapter, pairs_file, tmp_path / "run")
    with pytest.raises(ConfigError, match=f"model.path: {adapter} is a PEFT adapter .* write model.adapter"):
        config_from_dict(raw).validate(check_paths=True)
    raw = config_dict(
        tiny_model_dir, pairs_file, tmp_path / "run", model={"adapter": str(adapter)}, lora={"enabled": True}
    )
    with pytest.raises(ConfigError, match="lora.enabled=true would add a second, new adapter"):
        config_from_dict(raw)
    (adapter / "adapter_model.safetensors").rename(adapter / "x")
    raw = config_dict("", pairs_file, tmp_path / "run", model={"adapter": str(adapter)})
    with pytest.raises(ConfigError, match="model.adapter: .* has no adapter_model.safetensors"):
        config_from_dict(raw).validate(check_paths=True)


# --- QLoRA -----------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_four_bit_is_refused_without_cuda(tmp_path, tiny_model_dir, pairs_file, config_dict):
    qlora = {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}
    raw = config_dict(
        tiny_model_dir,
        pairs_file,
        tmp_path / "run",
        model=qlora,
        lora={"enabled": True, "merge_on_save": False},
    )
    config = config_from_dict(raw)  # the combination is valid; this machine cannot run it
    with pytest.raises(ConfigError, match=r"^model.load_in_4bit=true is refused: .*CUDA device.*none"):
        config.validate(check_paths=True)
    with pytest.raises(ConfigError, match=r"^model.load_in_4bit=true is refused: .*CUDA"):
        load_causal_lm(str(tiny_model_dir), config.model)
    for sections, fragment in (
        ({"model": qlora}, "trains LoRA adapters on a frozen 4-bit base"),
        ({"model": qlora, "lora": {"enabled": True}}, "lora.merge_on_save=false"),
        ({"model": {"use_bnb_nested_quant": True}}, "read only with model.load_in_4bit=true"),
        (
            {
                "model": qlora,
                "lora": {"enabled": True, "merge_on_save": False},
                "reference": {"mode": "copy"},
            },
            "reference.mode=copy would copy the quantized policy",
        ),
    ):
        with pytest.raises(ConfigError, match=fragment):
            config_from_dict(config_dict(tiny_model_dir, pairs_file, tmp_path / "run", **sections))
