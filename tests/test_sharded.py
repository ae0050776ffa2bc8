"""FSDP and DeepSpeed: tether's loop with two CPU processes (gloo) equals one process, and resumes bitwise.

What must hold (tether.modeling.PolicyStatistics, tether.train):
- the chunked head runs inside the forward of the module FSDP / DeepSpeed wrap, so with the parameters
  sharded (FSDP2, ZeRO-3) or the optimizer state partitioned (ZeRO-2) two processes with batch 1 x accumulation 2
  train like one process with batch 4: same losses, token counts and final weights (float32 rounding);
- a run resumed from its step-2 checkpoint (accelerate's sharded / DeepSpeed files) ends bitwise where the
  uninterrupted run ended;
- LoRA with the adapter-disabled reference, and the reference cache, work under FSDP2 and ZeRO-3;
- FSDP1 (torch's wrapper) gives the single-process gradients of `PolicyStatistics`, and an auto-wrap policy
  that puts lm_head in a unit of its own is refused.

The runs are launched as a user launches them, `accelerate launch --config_file examples/accelerate/fsdp.yaml`
(or zero3.yaml) with 2 processes. accelerate enables FSDP and DeepSpeed only for accelerator (GPU) processes,
so the rank script switches them on for CPU processes and otherwise runs `tether train` as the CLI does: for
FSDP it sets accelerate's distributed type and the plugin (built from the launcher's FSDP_* variables) after
the `Accelerator` is built; for DeepSpeed it makes accelerate take gloo as the backend and leaves
`cpu=False`, so that accelerate's DeepSpeed branch (deepspeed's CPU accelerator) runs. The FSDP1 check calls
torch directly: accelerate's FSDP1 path passes a device index ("cpu:0") that FSDP1 refuses on CPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tether.config import load_config
from tether.train import read_metrics, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

_RANK_SCRIPT = """
import sys
import accelerate, accelerate.state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
import tether.train
from tether.cli import main

if sys.argv[1] == "fsdp":
    class FSDPOnCPU(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch set
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.state.distributed_type = DistributedType.FSDP
            self.state.fsdp_plugin = plugin

    accelerate.Accelerator = FSDPOnCPU
else:  # deepspeed: the ACCELERATE_DEEPSPEED_* variables come from accelerate launch
    tether.train._has_accelerator = lambda: True
    accelerate.state.PartialState._prepare_backend = lambda self, *a, **k: ("gloo", DistributedType.MULTI_CPU)
sys.exit(main(sys.argv[2:]))
"""

# 10 pairs, global batch 4: steps of 4, 4 and 2 pairs (in the last one each process has one micro-batch).
RUN = {
    "objective": {"name": "epsilon_dpo", "beta": 0.1},
    "optim": {"max_steps": 3, "lr": 1e-2, "adam_eps": 1e-3, "scheduler": "cosine", "warmup_steps": 0},
    "checkpoint": {"every": 2, "keep_last": 2},
}
VARIANTS = {  # reference modes other than `copy`, with TDPO2 (it needs the reference's distributions)
    "lora": {"objective": {"name": "tdpo2", "beta": 0.1}, "lora": {"enabled": True, "r": 4, "alpha": 8.0}},
    "cache": {"objective": {"name": "tdpo2", "beta": 0.1}, "reference": {"mode": "cache"}},
}


EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "accelerate"
ENGINES = {  # engine -> accelerate launch options (the example configs users start from)
    "fsdp2": ["--config_file", str(EXAMPLES / "fsdp.yaml")],
    "zero2": ["--config_file", str(EXAMPLES / "zero3.yaml"), "--zero_stage", "2"],
    "zero3": ["--config_file", str(EXAMPLES / "zero3.yaml")],
}


def _launch(port: int, tmp_path: Path, engine: str, config: Path, *extra: str) -> None:
    """`accelerate launch --config_file examples/accelerate/... --num_processes 2` of `tether train`."""
    script = tmp_path / "rank_script.py"
    script.write_text(_RANK_SCRIPT)
    launch = [sys.executable, "-m", "accelerate.commands.launch", *ENGINES[engine], "--num_processes", "2"]
    launch += ["--main_process_port", str(port)]
    kind = "fsdp" if engine.startswith("fsdp") else "deepspeed"
    proc = subprocess.run(
        [*launch, str(script), kind, "train", str(config), *extra],
        # PYTHONFAULTHANDLER: a rank that aborts prints where its threads were
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"},
        capture_output=True,
        text=True,
        timeout=300,  # a collective one rank never joins fails here instead of blocking CI
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # FSDP2 warns when a wrapped module returns a view (an in-place op on it would skip the all-gather).
    assert "returned a view tensor" not in proc.stderr


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _assert_same_run(one: Path, two: Path, atol: float) -> None:
    m1, m2 = read_metrics(one), read_metrics(two)
    assert [r["pairs"] for r in m2] == [4, 4, 2]
    for a, b in zip(m1, m2, strict=True):
        assert a["tokens"] == b["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], abs=atol), a["step"]
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], rel=1e-5, abs=1e-6), a["step"]
    assert _max_diff(_weights(one / "final"), _weights(two / "final")) <= atol


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, make_pairs, config_dict):
    """Per variant (plain / lora): the yaml of the run and the folder of its one-process result."""
    root = tmp_path_factory.mktemp("sharded")
    pairs = make_pairs(root / "pairs.jsonl", 10, seed=2)

    def one_process(name: str, **sections) -> tuple[Path, Path]:
        config = config_dict(tiny_model_dir, pairs, root / name, **sections)
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        train(load_config(path))
        return path, root / name

    return {
        "plain": one_process("one", **RUN),
        **{name: one_process(f"one_{name}", **{**RUN, **sections}) for name, sections in VARIANTS.items()},
    }


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_two_sharded_processes_equal_one_and_resume_bitwise(
    setup, tmp_path, engine, tiny_model_dir, free_port
):
    config, one = setup["plain"]
    two = tmp_path / "two"
    batch = ["optim.batch_size=1", "optim.grad_accum=2"]
    _launch(free_port(), tmp_path, engine, config, f"output_dir={two}", *batch)
    _assert_same_run(one, two, atol=1e-6)
    assert _max_diff(_weights(one / "final"), _weights(tiny_model_dir)) > 1e-3  # the weights did move

    checkpoint = two / "checkpoints" / "step-00000002"
    assert (checkpoint / "state.json").is_file()
    assert not (checkpoint / "config.json").exists()  # sharded files: for --resume, not from_pretrained

    # Resume from the step-2 checkpoint of a copy of the run: bitwise the uninterrupted run's end.
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "final")
    _launch(free_port(), tmp_path, engine, config, f"output_dir={resumed}", *batch, "--resume")
    final, again = _weights(two / "final"), _weights(resumed / "final")
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert read_metrics(resumed)[2]["loss"] == read_metrics(two)[2]["loss"]


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_adapter_and_cached_references_under_sharding(setup, tmp_path, engine, variant, free_port):
    """LoRA with the adapter-disabled reference (merged final weights), and the reference cache of hidden
    states (built from the whole model before sharding), train as in 1 process."""
    config, one = setup[variant]
    two = tmp_path / "two"
    _launch(free_port(), tmp_path, engine, config, f"output_dir={two}", "optim.batch_size=2")
    _assert_same_run(one, two, atol=1e-6)


_FSDP1_SCRIPT = """
import copy, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel
from tether.batch import PreferenceBatch
from tether.config import ConfigError
from tether.heads import StatRequest
from tether.modeling import PolicyStatistics
from tether.objectives import PairStats
from tether.reference import ModelReference
from tether.train import require_head_in_root_unit

torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
reference = ModelReference(copy.deepcopy(model))
ids = torch.randint(0, model.config.vocab_size, (4, 12))
labels = ids.clone()
labels[:, :5] = -100
batch = PreferenceBatch(ids, torch.ones_like(ids), labels)
request = StatRequest(kl=True, epsilon=0.1)

def loss(policy, rows, pairs):
    part = PreferenceBatch(batch.input_ids[rows], batch.attention_mask[rows], batch.labels[rows])
    s = PairStats(**policy(reference, part, pairs, request, 16))
    return sum(t.sum() for t in (s.policy_chosen_logps, s.policy_rejected_logps, s.kl_chosen,
                                 s.kl_rejected, s.relaxed_chosen_logps))

single = PolicyStatistics(copy.deepcopy(model))
loss(single, [0, 1, 2, 3], [0, 1]).backward()
expected = {n: p.grad for n, p in single.named_parameters()}

dist.init_process_group("gloo")
rank = dist.get_rank()
# Units for the decoder layers and for the decoder (`model`, a top-level child that FSDP1 swaps for its
# wrapper on PolicyStatistics only: the causal LM must call the wrapped one); lm_head stays in the root unit.
policy = ModuleWrapPolicy({LlamaDecoderLayer, LlamaModel})
sharded = FSDP(PolicyStatistics(model, split_rows=False), auto_wrap_policy=policy,
               device_id=torch.device("cpu"), use_orig_params=True)
assert type(sharded.module.causal_lm.model).__name__ == "LlamaModel"  # not yet synchronized
require_head_in_root_unit(sharded, model.get_output_embeddings())
(loss(sharded, [rank, rank + 2], [rank]) * 2).backward()  # pair `rank`: rows rank (chosen) and rank+2
with FSDP.summon_full_params(sharded, with_grads=True):
    worst = max(float((p.grad - expected[n.replace("_fsdp_wrapped_module.", "")]).abs().max())
                for n, p in sharded.named_parameters())
assert worst < 1e-5, worst

carved = copy.deepcopy(single)
fully_shard(carved.lm_head)
fully_shard(carved)
config = copy.deepcopy(model.config)
config.tie_word_embeddings = True
tied = PolicyStatistics(type(model)(config), split_rows=False)
assert tied.lm_head.weight is tied.model.embed_tokens.weight
# The tied weight goes with the decoder's unit (FSDP1 flattens a shared parameter into the first unit).
tied = FSDP(tied, auto_wrap_policy=ModuleWrapPolicy({LlamaModel}), device_id=torch.device("cpu"),
            use_orig_params=True)
for bad in (carved, tied):
    try:
        require_head_in_root_unit(bad, bad.lm_head)
        raise SystemExit("lm_head's weight outside the root FSDP unit was not refused")
    except ConfigError as error:
        assert "output embedding" in str(error), error
print("ok", rank, worst)
"""


def test_fsdp1_gradients_equal_one_process_and_a_separate_head_unit_is_refused(
    tmp_path, tiny_model_dir, free_port
):
    script = tmp_path / "fsdp1.py"
    script.write_text(_FSDP1_SCRIPT)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    proc = subprocess.run(
        [*launch, str(script), str(tiny_model_dir)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("ok ") == 2
