"""Tests for tether.train: the loop's invariants on a tiny Llama (CPU, seconds each).

What must hold (module docstring of tether.train):
- at step 1 the policy is the reference, so every DPO-family loss takes its closed form (log 2; IPO:
  (0 - 1/(2 beta))^2 = 1/(4 beta^2); H-DPO with alpha != 1 is *not* log 2: beta*(alpha-1)*(pw - pl) != 0), and
  equals the loss computed independently from the model's full logits with `tether.functional`;
- batch 4 x accumulation 1 == 2 x 2 == 1 x 4, also for an uneven last window;
- a run killed with SIGKILL and resumed continues bitwise as if never stopped; a resume with a changed objective,
  beta, seed or global batch is refused naming the field; partial checkpoints and torn metric lines are ignored;
- 2 processes (torchrun, gloo) == 1 process with the same global batch, and the ranks hold identical weights;
- LoRA with reference.mode=adapter == reference.mode=copy, training only the adapters;
- reference.mode=cache == copy; the cache is reused on resume and rebuilt when it is stale;
- a non-finite step is skipped without touching weights or optimizer (on_nonfinite=skip) or raises naming
  the step and the rows (on_nonfinite=error).
- under DeepSpeed, tether's batch, accumulation and clipping fill the config's "auto" entries, and settings
  its loop cannot honour are refused by name (FSDP / DeepSpeed runs themselves: tests/test_sharded.py).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tether.config import ConfigError, load_config
from tether.train import NonFiniteError, complete_checkpoints, read_metrics, step_pairs, train

pytestmark = pytest.mark.usefixtures("single_thread")
DPO_FAMILY = ["dpo", "ipo", "cdpo", "hdpo", "epsilon_dpo", "tdpo1", "tdpo2"]
LOG2 = math.log(2.0)


def _config(train_yaml, name="run", overrides=(), **kwargs):
    """(TrainConfig, yaml path) of the conftest `train_yaml` config `name`, with key=value overrides."""
    path = train_yaml(name, **kwargs)
    return load_config(path, list(overrides)), path


def load_weights(folder) -> dict[str, torch.Tensor]:
    """The tensors of a saved model or checkpoint folder (its *.safetensors files), by name."""
    return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _assert_weights_close(a: dict, b: dict, atol: float) -> float:
    """Same tensor names; max |a - b| <= atol. Returns the max difference."""
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= atol, f"weights differ by {worst:.3g} > {atol}"
    return worst


def _max_change(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _strip_timing(records):
    return [{k: v for k, v in r.items() if k != "step_time_s"} for r in records]


# --- 1. every objective trains -------------------------------------------------------------------------


def _independent_step1_loss(config, model_dir, data):
    """Mean loss of step 1's pairs from the initial model's full logits, via tether.functional (policy == ref)."""
    from tether.data import PreferenceCollator, load_preference_data
    from tether.functional import preference_loss
    from tether.modeling import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    dataset, _ = load_preference_data(
        str(data), tokenizer, max_length=64, max_prompt_length=32, progress=False
    )
    global_batch = config.optim.batch_size * config.optim.grad_accum
    _, pairs = step_pairs(len(dataset), global_batch, 0, config.optim.seed, config.data.shuffle)
    batch = PreferenceCollator(tokenizer.pad_token_id)([dataset[i] for i in pairs])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    losses, _ = preference_loss(
        config.objective.name, logits, logits, batch.labels, **config.objective.hparams()
    )
    return float(losses.mean())


@pytest.mark.parametrize("name", DPO_FAMILY)
def test_every_objective_trains_ten_steps(train_yaml, tiny_model_dir, pairs_file, name):
    config, _ = _config(train_yaml, objective={"name": name}, optim={"max_steps": 10})
    result = train(config)

    records = read_metrics(config.output_dir)
    assert [r["step"] for r in records] == list(range(1, 11))
    for r in records:
        for key, value in r.items():
            assert isinstance(value, (int, float)) and math.isfinite(value), (r["step"], key, value)
    assert result.steps == 10 and result.skipped_steps == 0

    # Step 1: policy == reference. Closed forms where the objective has one at zero log-ratio.
    first = records[0]["loss"]
    beta = config.objective.beta
    if name == "ipo":
        assert first == pytest.approx(1 / (4 * beta**2), rel=1e-6)  # (0 - 1/(2 beta))^2 = 25 at beta 0.1
    elif name == "hdpo":
        # h = beta*(alpha - 1)*(pw - pl) is not 0 for alpha = 0.95, so the first loss is not log 2.
        assert abs(first - LOG2) > 1e-4
    else:
        assert first == pytest.approx(LOG2, abs=1e-6)
    assert first == pytest.approx(_independent_step1_loss(config, tiny_model_dir, pairs_file), abs=1e-5)
    if name != "hdpo":
        assert records[0]["rewards/margins"] == 0.0
    if name == "epsilon_dpo":  # at policy == reference every step s_i is 0 (DESIGN.md)
        assert records[0]["beta/relaxed_frac"] == 0.0 and records[0]["beta/tightened_frac"] == 0.0
        assert records[0]["beta/base_next"] == beta
    if name in ("tdpo1", "tdpo2"):
        assert records[0]["kl/seq_chosen"] == 0.0 and records[0]["kl/seq_rejected"] == 0.0
        assert records[-1]["kl/seq_chosen"] > 0.0

    # The final model loads with plain transformers and has moved away from the initial weights.
    final = AutoModelForCausalLM.from_pretrained(result.final_model)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trained, start = final.state_dict(), initial.state_dict()
    assert trained.keys() == start.keys()
    assert _max_change(trained, start) > 1e-4
    assert (result.final_model / "tether_objective.json").is_file()


# --- 2. gradient accumulation ----------------------------------------------------------------------------


@pytest.mark.parametrize(("num_pairs", "objective"), [(12, "dpo"), (10, "tdpo2")])
def test_gradient_accumulation_is_invariant(
    tmp_path, train_yaml, make_pairs, tiny_model_dir, num_pairs, objective
):
    """4 x 1 == 2 x 2 == 1 x 4 after 3 steps; with 10 pairs the third step has only 2 (uneven window)."""
    data = make_pairs(tmp_path / "pairs.jsonl", num_pairs, seed=1)
    runs = {}
    for batch_size, accum in ((4, 1), (2, 2), (1, 4)):
        config, _ = _config(
            train_yaml,
            name=f"b{batch_size}x{accum}",
            pairs=data,
            objective={"name": objective},
            data={"shuffle": True},
            # A large adam_eps makes the update Lipschitz in the gradient (Adam's first step is otherwise
            # sign(g): float noise on a near-zero gradient would flip it by 2*lr).
            optim={
                "batch_size": batch_size,
                "grad_accum": accum,
                "max_steps": 3,
                "lr": 1e-2,
                "adam_eps": 1e-3,
            },
        )
        result = train(config)
        runs[(batch_size, accum)] = (read_metrics(config.output_dir), load_weights(result.final_model))
    ref_metrics, ref_weights = runs[(4, 1)]
    assert [r["pairs"] for r in ref_metrics] == ([4, 4, 4] if num_pairs == 12 else [4, 4, 2])
    assert _max_change(ref_weights, load_weights(tiny_model_dir)) > 1e-3  # the comparison means something
    for key in ((2, 2), (1, 4)):
        metrics, weights = runs[key]
        for a, b in zip(ref_metrics, metrics):
            assert a["pairs"] == b["pairs"] and a["tokens"] == b["tokens"]
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-6), key
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), key
        _assert_weights_close(ref_weights, weights, atol=1e-6)


# --- 3. exact resume -------------------------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tether.cli", "train", *args]


def test_killed_run_resumes_bitwise(tmp_path, train_yaml):
    """SIGKILL after the first checkpoint, --resume: metrics and final weights equal an uninterrupted run."""
    overrides = [
        "checkpoint.every=2",
        "optim.deterministic=true",
        "optim.max_steps=30",
        "objective.name=tdpo2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every run (and less contention)

    train(load_config(train_yaml("full"), overrides))  # uninterrupted, in this process (one thread too)

    cut = tmp_path / "cut"
    cut_cfg = train_yaml("cut")
    proc = subprocess.Popen(
        _cli(str(cut_cfg), *overrides), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not complete_checkpoints(cut / "checkpoints") and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (cut / "final").exists()
    killed_at = [r["step"] for r in read_metrics(cut)] if (cut / "metrics.jsonl").exists() else []
    assert len(killed_at) < 30

    resumed = subprocess.run(
        _cli(str(cut_cfg), *overrides, "--resume"), env=env, capture_output=True, text=True, check=True
    )
    assert "resumed from" in resumed.stdout

    full, again = read_metrics(tmp_path / "full"), read_metrics(cut)
    assert [r["step"] for r in again] == list(range(1, 31))
    assert _strip_timing(again) == _strip_timing(full)  # bitwise: floats compare exactly
    a, b = load_weights(tmp_path / "full" / "final"), load_weights(cut / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def checkpointed_run(train_yaml):
    """A 4-step epsilon-DPO run (its base beta is state) with a checkpoint at step 2, its final/ removed:
    (yaml path, final weights, metrics)."""
    config, path = _config(
        train_yaml,
        objective={"name": "epsilon_dpo"},
        optim={"max_steps": 4},
        checkpoint={"every": 2, "keep_last": 3},
    )
    result = train(config)
    assert [p.name for p in complete_checkpoints(result.output_dir / "checkpoints")] == ["step-00000002"]
    weights = load_weights(result.final_model)
    shutil.rmtree(result.final_model)  # as if killed before final/: a resume redoes steps 3 and 4
    return path, weights, read_metrics(result.output_dir)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("objective.beta=0.2", "objective.beta"),
        ("objective.name=ipo", "objective.name"),
        ("optim.seed=1", "optim.seed"),
        ("optim.batch_size=8", r"global batch \(optim.batch_size"),
    ],
)
def test_resume_with_changed_config_is_refused(checkpointed_run, override, field):
    path, _, _ = checkpointed_run
    with pytest.raises(ConfigError, match=rf"{field}.*allow_changed_config"):
        train(load_config(path, [override]), resume=True)
    # Allowed when asked: it continues from the checkpoint with the new setting.
    result = train(load_config(path, [override, "checkpoint.allow_changed_config=true"]), resume=True)
    assert [r["step"] for r in read_metrics(result.output_dir)] == [1, 2, 3, 4]


def test_resume_with_the_same_global_batch_is_allowed(checkpointed_run):
    """2 x accumulation 2 takes the same pairs per step as 4 x 1: the data order is unchanged."""
    path, final_weights, metrics = checkpointed_run
    result = train(load_config(path, ["optim.batch_size=2", "optim.grad_accum=2"]), resume=True)
    resumed = read_metrics(result.output_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed, metrics):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    _assert_weights_close(load_weights(result.final_model), final_weights, atol=1e-6)


def test_fresh_run_into_checkpointed_folder_is_refused(checkpointed_run):
    path, _, _ = checkpointed_run
    with pytest.raises(ConfigError, match="--resume"):
        train(load_config(path))


def test_partial_checkpoints_are_never_loaded(checkpointed_run, capsys):
    """step-N.partial (no state.json) and a step-N folder without state.json are skipped: resume from step 2."""
    path, final_weights, metrics = checkpointed_run
    ckpts = load_config(path).output_dir + "/checkpoints"
    good = Path(ckpts) / "step-00000002"
    for broken in ("step-00000003.partial", "step-00000004"):
        shutil.copytree(good, Path(ckpts) / broken)
        (Path(ckpts) / broken / "state.json").unlink()
        (Path(ckpts) / broken / "model.safetensors").write_bytes(b"not a safetensors file")
    (Path(ckpts) / "step-00000003.partial" / "state.json").write_text(
        json.dumps({"step": 3})
    )  # still partial
    capsys.readouterr()
    result = train(load_config(path), resume=True)
    assert f"resumed from {good} at step 2" in capsys.readouterr().out
    # Bitwise the uninterrupted run, epsilon-DPO's adapted base beta (state.json) included.
    assert metrics[1]["beta/base_next"] != 0.1
    assert _strip_timing(read_metrics(result.output_dir)) == _strip_timing(metrics)
    weights = load_weights(result.final_model)
    assert all(torch.equal(weights[k], final_weights[k]) for k in weights)


def test_torn_metrics_line_is_dropped_on_resume(checkpointed_run):
    """A run killed while appending to metrics.jsonl leaves a torn last line; resume must not choke on it."""
    path, _, metrics = checkpointed_run
    run = Path(load_config(path).output_dir)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    train(load_config(path), resume=True)
    assert _strip_timing(read_metrics(run)) == _strip_timing(metrics)


# --- 4. two processes --------------------------------------------------------------------------------------

_RANK_SCRIPT = """
import os, sys, torch
import tether.train
from tether.cli import main

loaded = []
_load = tether.train.load_causal_lm

def _record(*args, **kwargs):  # the first model loaded is the policy; it is trained in place
    model = _load(*args, **kwargs)
    loaded.append(model)
    return model

tether.train.load_causal_lm = _record
code = main(sys.argv[2:])
state = {k: v.detach().clone() for k, v in loaded[0].state_dict().items()}
torch.save(state, os.path.join(sys.argv[1], "rank%s.pt" % os.environ["RANK"]))
sys.exit(code)
"""


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, train_yaml, make_pairs, tiny_model_dir, free_port):
    """torchrun --nproc_per_node 2 (gloo, CPU) == 1 process with the same global batch, weights equal on ranks.

    10 pairs, global batch 4: the third step has 2 pairs, so rank 1 runs a zero-weight micro-batch.
    """
    data = make_pairs(tmp_path / "pairs.jsonl", 10, seed=2)
    optim = {"max_steps": 3, "lr": 1e-2, "adam_eps": 1e-3}
    one, _ = _config(train_yaml, "one", pairs=data, optim={**optim, "batch_size": 4})
    train(one)
    two = train_yaml("two", pairs=data, optim={**optim, "batch_size": 2})  # x 2 processes
    script = tmp_path / "rank_script.py"
    script.write_text(_RANK_SCRIPT)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    proc = subprocess.run(
        [*launch, str(script), str(tmp_path), "train", str(two)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["pairs"] for r in m2] == [4, 4, 2]
    for a, b in zip(m1, m2):
        assert a["tokens"] == b["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6), a["step"]
        for key in ("rewards/margins", "logps/chosen", "logps/rejected"):  # sums of log-probs: relative
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), (a["step"], key)
    w1, w2 = load_weights(tmp_path / "one" / "final"), load_weights(tmp_path / "two" / "final")
    assert _max_change(w1, load_weights(tiny_model_dir)) > 1e-3
    _assert_weights_close(w1, w2, atol=1e-6)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert all(torch.equal(rank0[k], w2[k]) for k in w2)


# --- 5. LoRA -------------------------------------------------------------------------------------------------


def test_adapter_reference_equals_frozen_base_per_pair(tiny_model_dir, pairs_file):
    """With non-zero adapters (policy != reference), the adapter-disabled policy gives the per-pair reference
    statistics of a frozen copy of the base model."""
    from peft import LoraConfig, get_peft_model

    from tether.data import PreferenceCollator, load_preference_data
    from tether.modeling import compute_pair_stats, load_tokenizer
    from tether.objectives import build_objective
    from tether.reference import AdapterReference, ModelReference
    from tether.statistics import stat_request

    config = load_config(None, [f"model.path={tiny_model_dir}"])
    tokenizer = load_tokenizer(config.model)
    dataset, _ = load_preference_data(
        str(pairs_file), tokenizer, max_length=64, max_prompt_length=32, progress=False
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    frozen = ModelReference(copy.deepcopy(base))
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    indices = [0, 1, 2, 3, 4]
    batch = PreferenceCollator(tokenizer.pad_token_id)([dataset[i] for i in indices])
    request = stat_request(build_objective("tdpo2"), entropy=True)
    a = compute_pair_stats(policy, AdapterReference(policy), batch, indices, request, 7)
    b = compute_pair_stats(policy, frozen, batch, indices, request, 7)
    assert (
        float((a.policy_chosen_logps - a.ref_chosen_logps).detach().abs().max()) > 1e-3
    )  # policy != reference
    for field in (
        "ref_chosen_logps",
        "ref_rejected_logps",
        "policy_chosen_logps",
        "kl_chosen",
        "kl_rejected",
    ):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=1e-6, rtol=0)


def test_lora_adapter_reference_equals_copy_and_trains_only_adapters(tmp_path, train_yaml, tiny_model_dir):
    runs = {}
    for mode in ("adapter", "copy"):
        config, _ = _config(
            train_yaml,
            name=mode,
            objective={"name": "tdpo2"},
            lora={"enabled": True, "r": 4, "alpha": 8.0},
            reference={"mode": mode},
            optim={"lr": 1e-2, "max_steps": 3},
            checkpoint={"every": 2},
        )
        result = train(config)
        runs[mode] = (read_metrics(config.output_dir), result.final_model)
    # A LoRA checkpoint holds the adapter on its base model: it loads with plain transformers too.
    ckpt = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "checkpoints" / "step-00000002")
    assert any("lora_B" in name for name in ckpt.state_dict())
    (adapter, final), (copied, _) = runs["adapter"], runs["copy"]
    assert adapter[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    for a, b in zip(adapter, copied):
        for key in (
            "loss",
            "rewards/chosen",
            "rewards/rejected",
            "logps/chosen",
            "kl/seq_chosen",
            "grad_norm",
        ):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)

    # merge_on_save: a plain model folder; only the LoRA target modules (q/k/v/o) changed.
    assert not (final / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(final).state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert merged.keys() == initial.keys()
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    for name, value in initial.items():
        if any(t in name for t in targets):
            continue
        assert torch.equal(merged[name], value), f"{name} changed but is not a LoRA target"
    changed = [n for n in initial if any(t in n for t in targets) and not torch.equal(merged[n], initial[n])]
    assert changed, "no adapter was trained"


# --- 6. cached reference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["dpo", "tdpo2"])
def test_cached_reference_equals_copy_and_is_reused(tmp_path, train_yaml, objective):
    runs = {}
    for mode in ("cache", "copy"):
        config, path = _config(
            train_yaml,
            name=mode,
            objective={"name": objective},
            reference={"mode": mode},
            optim={"max_steps": 3},
            checkpoint={"every": 2},
        )
        train(config)
        runs[mode] = (read_metrics(config.output_dir), path)
    for a, b in zip(runs["cache"][0], runs["copy"][0]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5), a["step"]

    cache = tmp_path / "cache" / "reference_cache"
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["hidden"] is (objective == "tdpo2")  # token-level objectives cache hidden states
    before = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in cache.iterdir()}
    train(load_config(runs["cache"][1]), resume=True)
    assert {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in cache.iterdir()} == before
    assert _strip_timing(read_metrics(tmp_path / "cache")) == _strip_timing(runs["cache"][0])


def test_stale_reference_cache_is_rebuilt(tmp_path, train_yaml, make_model, tiny_model_dir):
    """A cache left in output_dir by a run of another model must not be reused: the first loss would then
    compare the new policy with the old model instead of being log 2."""
    other = make_model(tmp_path / "other_model", seed=1)
    for model in (tiny_model_dir, other):
        config, _ = _config(train_yaml, model=model, reference={"mode": "cache"}, optim={"max_steps": 1})
        shutil.rmtree(Path(config.output_dir) / "final", ignore_errors=True)  # the cache stays
        train(config)
        assert read_metrics(config.output_dir)[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    meta = json.loads((tmp_path / "run" / "reference_cache" / "meta.json").read_text())
    assert meta["key"]["reference"] == str(other.resolve())


# --- non-finite steps -------------------------------------------------------------------------------------


def _poison(monkeypatch, at_step: int, row: int = 0):
    """At optimizer step `at_step`, write NaN into the input embeddings of one sequence: row
    `row` of that step's concatenated batch (one micro-batch per step in these tests).

    The row is found by its tokens, not its position, so this holds however the forward groups the rows;
    only forwards with grad (the policy's) are touched, not the reference's.
    """
    import tether.modeling
    import tether.train

    state = {"step": 0, "target": None, "inputs": None}
    compute, load = tether.modeling.compute_pair_stats, tether.train.load_causal_lm

    def counting(policy, reference, batch, *args):
        state["step"] += 1
        state["target"] = None
        if state["step"] == at_step:
            state["target"] = batch.input_ids[row, : int(batch.attention_mask[row].sum())]
        return compute(policy, reference, batch, *args)

    def embed_hook(module, args, output):
        target = state["target"]
        if target is None or not torch.is_grad_enabled():
            return None
        ids, n = args[0], len(target)
        hits = [r for r in range(ids.shape[0]) if ids.shape[1] >= n and torch.equal(ids[r, :n], target)]
        if not hits:
            return None
        output = output.clone()
        output[hits] = float("nan")
        return output

    def poisoned(*args, **kwargs):
        model = load(*args, **kwargs)
        model.get_input_embeddings().register_forward_hook(embed_hook)
        return model

    monkeypatch.setattr(tether.modeling, "compute_pair_stats", counting)
    monkeypatch.setattr(tether.train, "load_causal_lm", poisoned)


def test_nonfinite_step_is_skipped(train_yaml, monkeypatch):
    _poison(monkeypatch, at_step=3)
    config, _ = _config(
        train_yaml,
        optim={"max_steps": 4, "on_nonfinite": "skip"},
        checkpoint={"every": 1, "keep_last": 10},
    )
    result = train(config)
    assert result.skipped_steps == 1
    records = read_metrics(config.output_dir)
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1]
    # The skipped step's loss was NaN: written as null (bare NaN is not JSON), the next step is finite again.
    assert records[2]["loss"] is None and math.isfinite(records[3]["loss"])
    assert math.isnan(result.history[2]["loss"])

    ckpt = Path(config.output_dir) / "checkpoints"
    before, after = ckpt / "step-00000002", ckpt / "step-00000003"
    w2, w3 = load_weights(before), load_weights(after)
    assert all(torch.equal(w2[k], w3[k]) for k in w2), "the skipped step changed the weights"
    opt2 = torch.load(before / "optimizer.bin", weights_only=False)
    opt3 = torch.load(after / "optimizer.bin", weights_only=False)
    assert opt2["param_groups"] == opt3["param_groups"]
    for i, state in opt2["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt3["state"][i][key]), f"optimizer state {i}.{key} changed"
    assert _max_change(load_weights(result.final_model), w3) > 1e-5  # step 4 trains again


def test_nonfinite_step_raises_naming_step_and_row(train_yaml, monkeypatch):
    _poison(monkeypatch, at_step=3, row=1)
    config, _ = _config(train_yaml, optim={"max_steps": 4, "on_nonfinite": "error"})
    # Row 1 of the concatenated batch is the chosen side of the step's second pair; rows are JSONL lines.
    _, pairs = step_pairs(24, 4, 2, config.optim.seed, config.data.shuffle)
    with pytest.raises(NonFiniteError, match=rf"step 3\b.*\[{pairs[1] + 1}\]"):
        train(config)
    assert [r["step"] for r in read_metrics(config.output_dir)] == [1, 2]


@pytest.mark.parametrize(
    "kind, stage, expected",
    [
        ("FSDP", None, "fsdp"),
        ("DEEPSPEED", 3, "zero3"),
        ("DEEPSPEED", 2, "deepspeed"),
        ("MULTI_CPU", None, "plain"),
        ("NO", None, "plain"),
    ],
)
def test_engine_kind(kind, stage, expected):
    """FSDP and ZeRO-3 shard parameters; ZeRO-1/2 keep them whole but step inside backward; DDP is plain."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from tether.train import _engine

    accelerator = SimpleNamespace(
        distributed_type=DistributedType[kind],
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)),
    )
    assert _engine(accelerator) == expected


def test_fused_adamw_only_for_whole_plain_parameters():
    """The plain engine (one process or DDP) steps CPU/CUDA float parameters with torch's fused AdamW kernel;
    FSDP and DeepSpeed keep torch's default, and so does any parameter that is not a plain nn.Parameter or
    whose dtype the kernel does not take. The fused update is the same AdamW: one step from the same state
    agrees with the default implementation to float32 rounding."""
    from tether.train import _fused_adamw

    weight = torch.nn.Parameter(torch.randn(4, 3))
    assert _fused_adamw([weight], "plain")
    assert not _fused_adamw([weight], "fsdp") and not _fused_adamw([weight], "deepspeed")
    assert not _fused_adamw([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))], "plain")
    assert _fused_adamw([], "plain")

    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 32))
    b = torch.nn.Parameter(a.detach().clone())
    opts = [torch.optim.AdamW([p], lr=1e-2, fused=f) for p, f in ((a, True), (b, None))]
    for _ in range(3):
        grad = torch.randn(64, 32)
        for p, opt in zip((a, b), opts):
            p.grad = grad.clone()
            opt.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(a, torch.zeros_like(a))


def _deepspeed_plugin(**entries):
    from types import SimpleNamespace

    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", **entries}
    return SimpleNamespace(deepspeed_config=config, zero3_init_flag=True, dschf=object())


def test_deepspeed_auto_entries_are_filled_from_tethers_config(train_yaml):
    from tether.train import _configure_deepspeed

    config, _ = _config(train_yaml, optim={"batch_size": 3, "grad_accum": 5, "max_grad_norm": 0.5})
    plugin = _deepspeed_plugin(
        zero_optimization={"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    )
    _configure_deepspeed(plugin, config, zero3=True)
    ds = plugin.deepspeed_config
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 1  # tether accumulates the 5 micro-batches itself
    assert ds["gradient_clipping"] == 0.5
    assert plugin.zero3_init_flag is False and plugin.dschf is None  # models load whole (no zero.Init)


@pytest.mark.parametrize(
    "entries, optim, zero3, match",
    [
        ({"gradient_accumulation_steps": 4}, {}, False, "gradient_accumulation_steps=4"),
        ({"train_micro_batch_size_per_gpu": 8}, {}, False, "optim.batch_size"),
        ({"gradient_clipping": 2.0}, {"max_grad_norm": 1.0}, False, "optim.max_grad_norm"),
        ({"optimizer": {"type": "AdamW"}}, {}, False, "'optimizer' section"),
        ({"scheduler": {"type": "WarmupLR"}}, {}, False, "'scheduler' section"),
        ({}, {"on_nonfinite": "skip"}, False, "on_nonfinite=skip"),
        ({"zero_optimization": {"stage": 3}}, {}, True, "stage3_gather_16bit_weights_on_model_save"),
    ],
)
def test_deepspeed_settings_tether_cannot_honour_are_refused(train_yaml, entries, optim, zero3, match):
    from tether.train import _configure_deepspeed

    config, _ = _config(train_yaml, optim=optim)
    with pytest.raises(ConfigError, match=match):
        _configure_deepspeed(_deepspeed_plugin(**entries), config, zero3=zero3)


# --- H-DPO with an entropy target ----------------------------------------------------------------------------


def _reference_token_entropy(config, model_dir, data, pairs=None) -> float:
    """The initial model's token-mean entropy over every response token of `pairs` (default: every pair), from
    its full logits (an independent computation of what an entropy_target_fraction multiplies)."""
    from tether.data import PreferenceCollator, load_preference_data
    from tether.modeling import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    dataset, _ = load_preference_data(
        str(data), tokenizer, max_length=64, max_prompt_length=32, progress=False
    )
    pairs = range(len(dataset)) if pairs is None else pairs
    batch = PreferenceCollator(tokenizer.pad_token_id)([dataset[i] for i in pairs])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    logq = torch.log_softmax(logits[:, :-1], dim=-1)
    mask = batch.labels[:, 1:] != -100
    return float(-(logq.exp() * logq).sum(-1)[mask].mean())


# The tiny model's entropy (about 4 nats per token) falls little in 4 steps: 0.9 of it keeps alpha off its
# clamps (about -0.1 in log alpha per step).
ENTROPY_TARGET = {"name": "hdpo", "beta": 0.5, "alpha": 1.0, "entropy_target_fraction": 0.9, "alpha_lr": 0.25}


@pytest.mark.parametrize("mode", ["copy", "cache"])
def test_entropy_target_moves_alpha_by_the_logged_entropy(train_yaml, tiny_model_dir, pairs_file, mode):
    """hdpo with entropy_target_fraction 0.9: the target is 0.9 x the reference's entropy on the training
    responses (computed independently from full logits), step k+1's loss uses the alpha step k left
    (`alpha` == previous `alpha/next`), and each `alpha/next` is the dual step from the logged entropy.
    At step 1 the policy is the reference: the step's entropy is above 0.9 of it, so alpha goes down; it
    stays inside its clamps [0.5, 2] (the dual step is not trivially a clamp)."""
    from tether.objectives import dual_alpha_step

    config, _ = _config(
        train_yaml, objective=ENTROPY_TARGET, reference={"mode": mode}, optim={"max_steps": 4}
    )
    train(config)
    records = read_metrics(config.output_dir)
    h_ref = _reference_token_entropy(config, tiny_model_dir, pairs_file)
    alpha = 1.0
    for r in records:
        assert r["entropy/target"] == pytest.approx(0.9 * h_ref, rel=1e-6)
        assert r["alpha"] == pytest.approx(alpha, rel=1e-6)  # the loss's alpha (a float32 metric)
        assert r["alpha/next"] == dual_alpha_step(
            alpha, r["entropy/step"], r["entropy/target"], 0.25, 0.5, 2.0
        )
        assert 0.5 < r["alpha/next"] < alpha  # above target every step, never clamped
        alpha = r["alpha/next"]
    # Step 1's entropy is the initial model's on step 1's pairs (policy == reference), from full logits.
    _, first = step_pairs(24, config.optim.batch_size, 0, config.optim.seed, config.data.shuffle)
    h_first = _reference_token_entropy(config, tiny_model_dir, pairs_file, first)
    assert records[0]["entropy/step"] == pytest.approx(h_first, rel=1e-6)
    assert records[0]["entropy/step"] > records[0]["entropy/target"]
    assert records[0]["alpha/next"] < 1.0
    state = json.loads((Path(config.output_dir) / "final" / "tether_objective.json").read_text())["state"]
    assert state == {"alpha": alpha, "reference_entropy": pytest.approx(h_ref, rel=1e-6)}


def test_entropy_target_resumes_bitwise(train_yaml, monkeypatch):
    """A 4-step entropy-target run with a checkpoint at step 2, its final/ removed and resumed: every record
    (alpha included) and the final weights equal the uninterrupted run's, and the reference's entropy comes
    from the checkpoint (no second measuring pass)."""
    from tether.reference import Reference

    config, path = _config(
        train_yaml,
        objective=ENTROPY_TARGET,
        optim={"max_steps": 4, "deterministic": True},
        checkpoint={"every": 2, "keep_last": 3},
    )
    result = train(config)
    full, weights = read_metrics(result.output_dir), load_weights(result.final_model)
    assert len({r["alpha/next"] for r in full}) == 4  # alpha moved every step
    shutil.rmtree(result.final_model)

    def no_pass(*args, **kwargs):
        raise AssertionError("the reference entropy was measured again on resume")

    monkeypatch.setattr(Reference, "entropy_sums", no_pass)
    again = train(load_config(path), resume=True)
    assert _strip_timing(read_metrics(again.output_dir)) == _strip_timing(full)
    resumed = load_weights(again.final_model)
    assert all(torch.equal(resumed[k], weights[k]) for k in weights)


_ALPHA_RANK_SCRIPT = """
import json, os, sys
import tether.objectives
from tether.cli import main

seen = []
_after = tether.objectives.HDPO.after_step

def _record(self, *args, **kwargs):  # every process's alpha after every step
    out = _after(self, *args, **kwargs)
    seen.append([self.alpha, self.target])
    return out

tether.objectives.HDPO.after_step = _record
code = main(sys.argv[2:])
with open(os.path.join(sys.argv[1], "alpha%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(seen, f)
sys.exit(code)
"""


@pytest.mark.slow
def test_entropy_target_two_processes_agree(tmp_path, train_yaml, make_pairs, free_port):
    """torchrun --nproc_per_node 2 (gloo): both processes hold the same target and alpha after every step
    (bit for bit: the entropy is reduced over processes before the update), equal to 1 process with the
    same global batch up to the order of float64 sums. 10 pairs, global batch 4: step 3 has 2 pairs."""
    data = make_pairs(tmp_path / "pairs.jsonl", 10, seed=2)
    optim = {"max_steps": 3, "lr": 1e-2, "adam_eps": 1e-3}
    one, _ = _config(
        train_yaml, "one", pairs=data, objective=ENTROPY_TARGET, optim={**optim, "batch_size": 4}
    )
    train(one)
    two = train_yaml("two", pairs=data, objective=ENTROPY_TARGET, optim={**optim, "batch_size": 2})
    script = tmp_path / "alpha_script.py"
    script.write_text(_ALPHA_RANK_SCRIPT)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    proc = subprocess.run(
        [*launch, str(script), str(tmp_path), "train", str(two)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = json.loads((tmp_path / "alpha0.json").read_text())
    rank1 = json.loads((tmp_path / "alpha1.json").read_text())
    assert len(rank0) == 3 and rank0 == rank1
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["alpha/next"] for r in m2] == [a for a, _ in rank0]
    for a, b in zip(m1, m2):
        for key in ("entropy/target", "entropy/step", "alpha/next"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), (a["step"], key)
    assert m2[-1]["alpha/next"] != 1.0
