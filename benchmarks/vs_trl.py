"""tether against TRL's DPOTrainer: the same model, data, optimizer and precision, on this machine's CPU.

    python benchmarks/vs_trl.py                    # default config (about 15 minutes on 2 idle cores)
    python benchmarks/vs_trl.py --quick            # a smaller model and data (about 2 minutes)
    python benchmarks/vs_trl.py --write-results    # also write benchmarks/RESULTS.md
    python benchmarks/vs_trl.py --repeats 3        # every run 3 times: medians and the spread between runs

What runs. The script builds a Llama-architecture model from a config with a fixed seed (default: hidden
512, 8 layers, 8 heads, intermediate 1376, vocabulary 32000, untied head: 58.1M parameters) and saves it to a
temporary folder with a word-level tokenizer built in code (32000 words "w4".."w31999" plus <pad>, <s>, </s>,
<unk>; split on whitespace; <s> prepended). Synthetic preference pairs in TRL's standard text format (prompt,
chosen, rejected strings; prompts 32-192 tokens with <s>, responses 16-320 tokens with the </s> both libraries
append; no row needs truncation at max_length 512) are written as JSONL. Both libraries tokenize them to the
same ids (checked: each worker's per-step real and response token counts must equal the counts the script
derives from the data). Each configuration then trains in a FRESH SUBPROCESS, tether and TRL alternating:
  - tether: `tether.train.train` (its accelerate loop), objective dpo, reference copy (a frozen copy) or cache
    (reference log-probs computed once before training); gradient checkpointing off / on.
  - TRL 1.16 DPOTrainer (loss sigmoid): reference model, or precompute_ref_log_probs=True; gradient
    checkpointing off / on (TRL's own default is on).
  - tether tdpo2 and epsilon_dpo (reference copy), and the same two objectives through a full-logits path in
    the same loop: tether's loop with `compute_pair_stats` replaced by the model's normal forward (full
    (2B, T, V) logits for policy and reference) and `token_stats_from_logits` + `pair_stats`, the code path
    of `tether.functional.preference_loss`.
Same work everywhere: AdamW (lr 5e-5, betas 0.9/0.999, eps 1e-8, no weight decay), constant schedule, no
warm-up, gradient clipping at norm 1.0, beta 0.1, 4 pairs per optimizer step, no gradient accumulation,
float32 on CPU, dropout off, data in file order (tether data.shuffle=false, TRL
train_sampling_strategy=sequential). TRL uses its default optimizer (adamw_torch_fused, the same AdamW update
from one fused kernel); tether uses torch.optim.AdamW, fused too (one process). The losses at steps 1-3 must
agree to 1e-4 relative between the two libraries (and between tether's chunked and full-logits paths); the
script checks it.

How it measures, inside each subprocess:
  - Step time: `torch.optim.optimizer.register_optimizer_step_post_hook` records time.perf_counter() (and
    time.process_time(), the CPU time of all the process's threads) after every optimizer step of the
    underlying torch optimizer, the same hook for both libraries. A step's time is the interval between
    consecutive hooks: the whole loop iteration (batch, forward, backward, clipping, optimizer, logging). The
    first `warmup` steps are warm-up, the rest are timed (default 1 + 3, --quick 1 + 2); tether's own
    metrics.jsonl step_time_s goes to results.json (with --keep) as a cross-check.
  - Real tokens: non-padding tokens of the step's batch (attention mask ones: prompt+chosen and
    prompt+rejected rows), derived from the data. real tok/s = real tokens of the timed steps / their time.
  - Peak RSS: the process's VmHWM (/proc/self/status; ru_maxrss where there is no /proc, see peak_rss_mb)
    read in the hook of the last step (the high-water mark over setup and training, before the final model
    is saved).
  - Activation peak: peak RSS minus the RSS after the first optimizer step (when weights, gradients and AdamW
    state exist); at that hook the script calls glibc malloc_trim(0) first so freed activation memory is not
    counted in the baseline.
  - MFU: model FLOPs per real token over the measured time, against the matmul peak. Model FLOPs per real
    token = 8 * N_matmul with a reference forward every step (policy forward 2N + backward 4N + reference
    forward 2N), 6 * N_matmul with a cached/precomputed reference. N_matmul = the weights of every nn.Linear
    of the model (attention q/k/v/o and MLP gate/up/down of every layer, plus lm_head) = the parameters that
    take part in matmuls; the input embedding (a lookup) and the norms are excluded, and so are the attention
    score matmuls QK^T and PV (no parameters; about 4*T*H FLOPs per token per layer forward). Gradient
    checkpointing's recomputation is not counted (it is not model work). The matmul peak is measured in
    every subprocess with torch.mm on 2048x2048 float32 matrices at its start and its end (best of several
    timed repetitions); a run's MFU uses its own peak.
Every worker runs with the same environment: HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1, torch's default thread
count (one per core) and the OpenMP settings of --omp-env (default GOMP_SPINCOUNT=1000: torch's OpenMP
threads spin 1000 iterations instead of 300000 before they sleep; as fast as the default on an idle machine,
and several times faster when other processes compete for the cores; see README.md).
The 1-minute load average before each run is printed; results from a loaded machine are noisy, and the CPU
seconds per step (cpu s/step) are less sensitive to other load than wall time.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import results_md  # noqa: E402  (benchmarks/ is not a package)

REL_TOL = 1e-4  # losses at steps 1-3 must agree to this relative tolerance


@dataclass(frozen=True)
class BenchConfig:
    hidden: int = 512
    layers: int = 8
    heads: int = 8
    intermediate: int = 1376
    vocab: int = 32000
    prompt: tuple[int, int] = (32, 192)  # prompt tokens, <s> included
    response: tuple[int, int] = (16, 320)  # response tokens, </s> included
    max_length: int = 512
    pairs_per_step: int = 4
    warmup: int = 1  # warm-up optimizer steps (untimed); step 1 is always warm-up
    timed: int = 3  # timed optimizer steps
    lr: float = 5e-5
    beta: float = 0.1
    seed: int = 0
    kv_heads: int | None = None  # key/value heads (grouped-query attention when < heads); None: heads
    tied: bool = False  # lm_head shares the input embedding's weight
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    weights: str | None = None  # a Hugging Face folder of this shape whose weights to use, if it exists
    name: str = "Llama"  # the model's name in the report
    mm_size: int = 2048  # matrix size of the torch.mm peak measured in every worker

    @property
    def steps(self) -> int:
        return self.warmup + self.timed

    def _attention(self) -> int:
        """q, k, v, o weights of one layer (k and v are kv_heads * head_dim wide)."""
        kv = self.hidden // self.heads * (self.kv_heads or self.heads)
        return 2 * self.hidden * self.hidden + 2 * self.hidden * kv

    def n_params(self) -> int:
        per_layer = self._attention() + 3 * self.hidden * self.intermediate + 2 * self.hidden
        embeddings = (1 if self.tied else 2) * self.vocab * self.hidden
        return embeddings + self.layers * per_layer + self.hidden

    def n_matmul(self) -> int:
        """Weights of every nn.Linear: q, k, v, o, gate, up, down per layer, and lm_head (tied or not: it is
        a matmul either way)."""
        return (
            self.layers * (self._attention() + 3 * self.hidden * self.intermediate) + self.vocab * self.hidden
        )

    def describe(self) -> str:
        kv = f" ({self.kv_heads} key/value heads)" if self.kv_heads else ""
        return (
            f"{self.name}: hidden {self.hidden}, {self.layers} layers, {self.heads} heads{kv}, intermediate"
            f" {self.intermediate}, vocab {self.vocab}, {'tied' if self.tied else 'untied'} lm_head;"
            f" {self.n_params() / 1e6:.2f}M parameters, N_matmul {self.n_matmul() / 1e6:.2f}M (every nn.Linear"
            " weight incl. lm_head)"
        )


DEFAULT = BenchConfig()
QUICK = BenchConfig(
    hidden=256,
    layers=4,
    heads=4,
    intermediate=688,
    vocab=8000,
    prompt=(16, 96),
    response=(8, 160),
    max_length=256,
    warmup=1,
    timed=2,
)
# SmolLM2-135M(-Instruct)'s architecture (its config.json): tied embeddings, vocabulary 49152, 30 layers of
# width 576, grouped-query attention with 3 key/value heads. The weights come from `weights` when that folder
# holds the converted model, else they are random (same shapes, same cost per step). Shorter pairs than the
# default (prompts 16-64 tokens, responses 8-128, max_length 192, 2 pairs per step) and a 1024^2 matmul peak,
# so that its six runs take about 5 minutes on 2 idle cores.
SMOL = BenchConfig(
    hidden=576,
    layers=30,
    heads=9,
    kv_heads=3,
    intermediate=1536,
    vocab=49152,
    tied=True,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    prompt=(16, 64),
    response=(8, 128),
    max_length=192,
    pairs_per_step=2,
    warmup=1,
    timed=2,
    mm_size=1024,
    weights="/tmp/smol/model",
    name="SmolLM2-135M",
)
# For tests: the smol config's features (tied head, grouped-query attention) at toy size, seconds per run.
TINY = BenchConfig(
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    intermediate=128,
    vocab=512,
    tied=True,
    prompt=(8, 24),
    response=(4, 24),
    max_length=64,
    pairs_per_step=2,
    warmup=1,
    timed=1,
    mm_size=256,
)
CONFIGS = {"default": DEFAULT, "quick": QUICK, "smol": SMOL, "tiny": TINY}
SMOL_RUNS = (  # the comparison of issue 16 on the real architecture; no checkpointing, no full-logits path
    "tether dpo",
    "trl dpo",
    "tether dpo cache",
    "trl dpo precompute",
    "tether tdpo2",
    "tether epsilon_dpo",
)


@dataclass(frozen=True)
class RunSpec:
    label: str
    lib: str  # tether | trl | full (tether's loop, full-logits statistics)
    objective: str = "dpo"
    ref: str = "copy"  # tether: copy | cache; trl: copy (reference model) | cache (precompute_ref_log_probs)
    gc: bool = False

    @property
    def cached_ref(self) -> bool:
        return self.ref == "cache"


# tether and TRL alternate; each pair has the same reference mode and gradient checkpointing.
RUNS = (
    RunSpec("tether dpo", "tether"),
    RunSpec("trl dpo", "trl"),
    RunSpec("tether dpo cache", "tether", ref="cache"),
    RunSpec("trl dpo precompute", "trl", ref="cache"),
    RunSpec("tether dpo +gc", "tether", gc=True),
    RunSpec("trl dpo +gc", "trl", gc=True),
    RunSpec("tether dpo cache +gc", "tether", ref="cache", gc=True),
    RunSpec("trl dpo precompute +gc", "trl", ref="cache", gc=True),
    RunSpec("tether tdpo2", "tether", objective="tdpo2"),
    RunSpec("full-logits tdpo2", "full", objective="tdpo2"),
    RunSpec("tether epsilon_dpo", "tether", objective="epsilon_dpo"),
    RunSpec("full-logits epsilon_dpo", "full", objective="epsilon_dpo"),
)


# --- preparation ---------------------------------------------------------------------------------------


def build_assets(cfg: BenchConfig, folder: Path) -> dict:
    """Model + tokenizer in folder/model, pairs in folder/data.jsonl; returns per-step token counts."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from tether.toy.model import tiny_llama_config

    model_dir = folder / "model"
    source = real_weights(cfg)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, cfg.vocab)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(cfg.seed)
    if source is not None:
        # The real weights; the word-level tokenizer above maps text to ids below the same vocabulary size,
        # and the cost of a step does not depend on which ids they are. Special ids as in the tokenizer.
        model = LlamaForCausalLM.from_pretrained(source, dtype=torch.float32)
        c = model.config
        if (c.hidden_size, c.num_hidden_layers, c.vocab_size, c.tie_word_embeddings) != (
            cfg.hidden,
            cfg.layers,
            cfg.vocab,
            cfg.tied,
        ):
            raise RuntimeError(f"{source}: not the shape of {cfg.name}")
        c.bos_token_id, c.eos_token_id, c.pad_token_id = 1, 2, 0
        c.max_position_embeddings = max(c.max_position_embeddings, cfg.max_length)
    else:
        config = tiny_llama_config(
            cfg.vocab,
            hidden_size=cfg.hidden,
            intermediate_size=cfg.intermediate,
            num_layers=cfg.layers,
            num_heads=cfg.heads,
            num_kv_heads=cfg.kv_heads,
            max_position_embeddings=cfg.max_length,
            tie_word_embeddings=cfg.tied,
            rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
            rms_norm_eps=cfg.rms_norm_eps,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    if (n_params, n_linear) != (cfg.n_params(), cfg.n_matmul()):
        raise RuntimeError(f"parameter count {n_params}/{n_linear} != {cfg.n_params()}/{cfg.n_matmul()}")
    model.save_pretrained(model_dir, safe_serialization=True)

    rng = random.Random(cfg.seed)
    n_pairs = cfg.steps * cfg.pairs_per_step
    real, response = [0] * cfg.steps, [0] * cfg.steps
    padded = [0] * cfg.steps
    rows: list[list[int]] = [[] for _ in range(cfg.steps)]  # each step's row lengths (chosen, rejected)
    with open(folder / "data.jsonl", "w") as fh:
        for i in range(n_pairs):
            p = rng.randint(*cfg.prompt)
            c, r = rng.randint(*cfg.response), rng.randint(*cfg.response)
            p, c, r = p, min(c, cfg.max_length - p), min(r, cfg.max_length - p)

            def words(n: int) -> str:
                return " ".join(f"w{rng.randrange(4, cfg.vocab)}" for _ in range(n))

            # <s> comes from the tokenizer and </s> from the libraries: p-1 and c-1 / r-1 words.
            row = {"prompt": words(p - 1), "chosen": " " + words(c - 1), "rejected": " " + words(r - 1)}
            if row["chosen"] == row["rejected"]:
                raise RuntimeError("identical responses; change the seed")
            fh.write(json.dumps(row) + "\n")
            s = i // cfg.pairs_per_step
            real[s] += 2 * p + c + r
            response[s] += c + r
            padded[s] = max(padded[s], p + max(c, r))
            rows[s] += [p + c, p + r]
    padded = [w * 2 * cfg.pairs_per_step for w in padded]
    return {"real_tokens": real, "response_tokens": response, "padded_tokens": padded, "row_lengths": rows}


def real_weights(cfg: BenchConfig) -> str | None:
    """cfg.weights when that folder holds a model (config.json and safetensors), else None (random weights)."""
    if cfg.weights is None:
        return None
    folder = Path(cfg.weights)
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return str(folder)
    return None


# --- the worker (one configuration, one fresh process) ---------------------------------------------------


def matmul_peak(n: int = 2048, reps: int = 5, inner: int = 3) -> float:
    """Best float32 torch.mm rate in FLOP/s over `reps` timings of `inner` products of n x n matrices."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        best = max(best, 2 * n**3 * inner / (time.perf_counter() - t))
    return best


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark, MB: VmHWM of /proc/self/status (ru_maxrss where there
    is no /proc). Not ru_maxrss on Linux: a child's ru_maxrss starts at its parent's high-water mark (the
    kernel carries the parent's through fork and exec), so a worker started by a parent that built a large
    model would never report less than the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepProbe:
    """Global optimizer step hook: wall/CPU time, RSS after step 1 (after malloc_trim), peak RSS (VmHWM)."""

    def __init__(self, optimizer_type):
        import psutil

        self.optimizer_type = optimizer_type
        self.proc = psutil.Process()
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.maxrss_mb: list[float] = []
        self.rss_after_first_mb: float | None = None
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:  # not glibc
            self._trim = None
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(self)

    def __call__(self, optimizer, args, kwargs) -> None:
        if not isinstance(optimizer, self.optimizer_type):  # e.g. accelerate's wrapper around the real one
            return
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.maxrss_mb.append(peak_rss_mb())
        if len(self.wall) == 1:
            if self._trim is not None:
                self._trim(0)
            self.rss_after_first_mb = self.proc.memory_info().rss / 2**20
            # malloc_trim's page faults are paid here, not in the next step
            self.wall[-1] = time.perf_counter()
            self.cpu[-1] = time.process_time()


def _tether_config(spec: dict):
    from tether.config import TrainConfig

    cfg = TrainConfig()
    cfg.output_dir = str(Path(spec["workdir"]) / "out")
    cfg.model.path = spec["model"]
    cfg.model.gradient_checkpointing = spec["gc"]
    cfg.data.train = spec["data"]
    cfg.data.max_length = spec["max_length"]
    cfg.data.max_prompt_length = None
    cfg.data.shuffle = False
    cfg.objective.name = spec["objective"]
    cfg.objective.beta = spec["beta"]
    cfg.reference.mode = "cache" if spec["ref"] == "cache" else "copy"
    cfg.optim.lr = spec["lr"]
    cfg.optim.scheduler = "constant"
    cfg.optim.warmup_steps = 0
    cfg.optim.max_grad_norm = 1.0
    cfg.optim.batch_size = spec["pairs_per_step"]
    cfg.optim.grad_accum = 1
    cfg.optim.max_steps = spec["steps"]
    cfg.optim.seed = spec["seed"]
    cfg.logging.progress = False
    cfg.logging.entropy = False  # a metric TRL does not compute
    return cfg


def full_logits_pair_stats(policy, reference, batch, indices, request, chunk_size, split_rows=True):
    """`compute_pair_stats` through full logits: the model's normal forward + `token_stats_from_logits`."""
    import torch

    from tether.heads import response_positions, token_stats_from_logits
    from tether.statistics import pair_stats

    mask, targets = response_positions(batch.labels)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
    with torch.no_grad():
        ref_logits = reference.model(**inputs).logits  # (2B, T, V)
    logits = policy(**inputs).logits  # (2B, T, V)
    tokens = token_stats_from_logits(logits[:, :-1][mask], targets, ref_logits[:, :-1][mask], request=request)
    return pair_stats(tokens, mask)


def _run_tether(spec: dict, probe_box: list) -> dict:
    import torch

    import tether.modeling
    import tether.train

    probe_box.append(StepProbe(torch.optim.AdamW))
    if spec["lib"] == "full":
        tether.modeling.compute_pair_stats = full_logits_pair_stats
    cfg = _tether_config(spec)
    tether.train.train(cfg)
    lines = (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {
        "losses": [r["loss"] for r in records],
        "response_tokens": [r["tokens"] for r in records],
        "step_time_s": [r["step_time_s"] for r in records],
    }


def trl_fields(spec: dict) -> dict:
    """TRL's DPOConfig arguments for a run spec: the same schedule, loss and data order as tether's run;
    float32 on CPU (a TRL YAML of them is what tests/test_trl_config.py translates)."""
    return dict(
        output_dir=str(Path(spec["workdir"]) / "out"),
        per_device_train_batch_size=spec["pairs_per_step"],
        gradient_accumulation_steps=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=spec["steps"],
        beta=spec["beta"],
        loss_type=["sigmoid"],
        max_length=spec["max_length"],
        precompute_ref_log_probs=spec["ref"] == "cache",
        gradient_checkpointing=spec["gc"],
        train_sampling_strategy="sequential",
        seed=spec["seed"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=True,
        bf16=False,  # TRL's default is bf16 autocast; both libraries run float32 here
        fp16=False,
    )


def trl_args(spec: dict, **changes):
    """TRL's DPOConfig of `trl_fields(spec)`, with `changes` (DPOConfig fields) on top."""
    from trl import DPOConfig

    return DPOConfig(**{**trl_fields(spec), **changes})


def _run_trl(spec: dict, probe_box: list) -> dict:
    import torch
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    probe_box.append(StepProbe(torch.optim.AdamW))
    workdir = Path(spec["workdir"])
    dataset = load_dataset("json", data_files=spec["data"], split="train", cache_dir=str(workdir / "hf"))
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    args = trl_args(spec)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    losses, real, response = [], [], []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        out = compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss = out[0] if return_outputs else out
        if model.training:
            losses.append(float(loss.detach()))
            real.append(int(inputs["attention_mask"].sum()))
            response.append(int(inputs["completion_mask"].sum()))
        return out

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    return {
        "losses": losses,
        "real_tokens": real,
        "response_tokens": response,
        "trl_version": trl.__version__,
    }


def worker(spec: dict) -> None:
    import torch

    start = time.perf_counter()
    peak_start = matmul_peak(spec["mm_size"])
    probe_box: list[StepProbe] = []
    result = _run_trl(spec, probe_box) if spec["lib"] == "trl" else _run_tether(spec, probe_box)
    probe = probe_box[0]
    peak_end = matmul_peak(spec["mm_size"])
    result.update(
        wall=probe.wall,
        cpu=probe.cpu,
        maxrss_mb=probe.maxrss_mb,
        exit_peak_mb=peak_rss_mb(),
        rss_after_first_mb=probe.rss_after_first_mb,
        to_first_step_s=probe.wall[0] - start if probe.wall else None,
        matmul_peak=[peak_start, peak_end],
        threads=torch.get_num_threads(),
    )
    Path(spec["result"]).write_text(json.dumps(result))


# --- the parent: run everything, check, report -----------------------------------------------------------


def _load1() -> float:
    return os.getloadavg()[0]


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of every benchmark worker subprocess (here, gpu.py, memory_ceiling.py): this process's,
    offline (nothing is downloaded), no tokenizer threads, no progress bars; `extra` set on top."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
        **extra,
    }


def run_one(run: RunSpec, cfg: BenchConfig, folder: Path, env: dict, log, keep: bool) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=run.label.replace(" ", "_") + "_", dir=folder))
    spec = {
        **asdict(run),
        "workdir": str(workdir),
        "model": str(folder / "model"),
        "data": str(folder / "data.jsonl"),
        "result": str(workdir / "result.json"),
        "max_length": cfg.max_length,
        "pairs_per_step": cfg.pairs_per_step,
        "steps": cfg.steps,
        "lr": cfg.lr,
        "beta": cfg.beta,
        "seed": cfg.seed,
        "mm_size": cfg.mm_size,
    }
    load = _load1()
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        env={**env, "HF_DATASETS_CACHE": str(workdir / "hf")},
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - t
    (workdir / "worker.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{run.label} failed (exit {proc.returncode}); log: {workdir / 'worker.log'}\n{proc.stderr[-3000:]}"
        )
    result = json.loads(Path(spec["result"]).read_text())
    result.update(load1=load, elapsed_s=elapsed)
    log(f"  {run.label:<26} done in {elapsed:5.0f} s (load average before: {load:.1f})")
    if keep:
        shutil.rmtree(workdir / "out" / "final", ignore_errors=True)  # tether's saved model: not needed
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def summarize(run: RunSpec, res: dict, cfg: BenchConfig, counts: dict) -> dict:
    w = cfg.warmup
    if len(res["wall"]) != cfg.steps:
        raise RuntimeError(f"{run.label}: {len(res['wall'])} optimizer steps recorded, expected {cfg.steps}")
    wall = res["wall"][-1] - res["wall"][w - 1]
    cpu = res["cpu"][-1] - res["cpu"][w - 1]
    tokens = sum(counts["real_tokens"][w:])
    peak = max(res["matmul_peak"])
    flops_per_token = (6 if run.cached_ref else 8) * cfg.n_matmul()
    maxrss = res["maxrss_mb"][-1]
    return {
        "tok_s": tokens / wall,
        "step_s": wall / cfg.timed,
        "cpu_step_s": cpu / cfg.timed,
        "mfu": flops_per_token * tokens / wall / peak,
        "peak_gflops": peak / 1e9,
        "peak_rss_mb": maxrss,
        "act_peak_mb": maxrss - res["rss_after_first_mb"],
        "losses": res["losses"][:3],
        "to_first_step_s": res["to_first_step_s"],
        "load1": res["load1"],
    }


def median_summary(summaries: list[dict]) -> dict:
    """One summary from several runs of the same configuration: each number the median over the runs (the
    losses are the same in every run, the first run's are kept)."""
    out = dict(summaries[0])
    for key, value in summaries[0].items():
        if isinstance(value, (int, float)):
            out[key] = statistics.median(s[key] for s in summaries)
    return out


def _spread(values: list[float], fmt: str) -> str:
    """'median [min-max]' of the values, each formatted with `fmt`."""
    med = statistics.median(values)
    return f"{med:{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def spread_lines(per_run: list[dict]) -> list[str]:
    """The run-to-run spread of a --repeats report: per configuration the median and range over the runs of
    tok/s, MFU and cpu s/step; per tether/TRL pair and token-level objective, the ratio taken within each
    run (side by side), listed per run."""
    out = [f"spread over {len(per_run)} runs (each run: every configuration once, in the order above):"]
    labels = list(per_run[0])
    for label in labels:
        rows = [run[label] for run in per_run]
        out.append(
            f"  {label:<24} tok/s {_spread([r['tok_s'] for r in rows], '.1f')}"
            f"  MFU {_spread([100 * r['mfu'] for r in rows], '.0f')}%"
            f"  cpu s/step {_spread([r['cpu_step_s'] for r in rows], '.2f')}"
            f"  mm peak {_spread([r['peak_gflops'] for r in rows], '.0f')} GFLOP/s"
        )
    ratios = [(a, b, "tok_s") for a, b in TETHER_TRL_PAIRS] + [
        (f"tether {obj}", "tether dpo", "step_s") for obj in ("tdpo2", "epsilon_dpo")
    ]
    for a, b, key in ratios:
        if a in labels and b in labels:
            each = [run[a][key] / run[b][key] for run in per_run]
            what = "tok/s" if key == "tok_s" else "s/step"
            out.append(
                f"  {a} / {b}: {what} x{statistics.median(each):.2f} (per run:"
                f" {', '.join(f'x{x:.2f}' for x in each)})"
            )
    return out


def work_ratio_line(cfg: BenchConfig, counts: dict) -> str:
    """The matmul work of the timed steps, TRL / tether: TRL on CPU applies every nn.Linear, lm_head included
    (its fused head scores every position off CUDA), to every position of its padded batch; tether the body's
    to the tokens of its row groups (`tether.causal_lm.row_groups`: the real tokens and the little padding
    merged into shared forwards) and lm_head to the response tokens only. The tok/s ratio the two would reach
    at equal matmul efficiency (attention scores and the element-wise work aside)."""
    from tether.causal_lm import row_groups

    w = cfg.warmup
    head = cfg.vocab * cfg.hidden
    body = cfg.n_matmul() - head
    trl = sum(counts["padded_tokens"][w:]) * cfg.n_matmul()
    grouped = sum(
        length * len(index) for lengths in counts["row_lengths"][w:] for length, index in row_groups(lengths)
    )
    tether = grouped * body + sum(counts["response_tokens"][w:]) * head
    return (
        f"matmul work of the timed steps, TRL / tether: x{trl / tether:.2f} (TRL: every nn.Linear at every padded"
        " position; tether: the body at its row groups' tokens, lm_head at response tokens; the tok/s ratio at"
        " equal matmul speed)"
    )


def check_tokens(run: RunSpec, res: dict, counts: dict) -> None:
    """Same pairs in the same order: per-step token counts must equal those derived from the data."""
    if res["response_tokens"] != counts["response_tokens"]:
        raise RuntimeError(
            f"{run.label}: response tokens {res['response_tokens']} != {counts['response_tokens']}"
        )
    if "real_tokens" in res and res["real_tokens"] != counts["real_tokens"]:
        raise RuntimeError(f"{run.label}: real tokens {res['real_tokens']} != {counts['real_tokens']}")


def rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


TETHER_TRL_PAIRS = (  # same reference mode and checkpointing
    ("tether dpo", "trl dpo"),
    ("tether dpo cache", "trl dpo precompute"),
    ("tether dpo +gc", "trl dpo +gc"),
    ("tether dpo cache +gc", "trl dpo precompute +gc"),
)
MFU_TARGET = 0.6  # of the measured matmul peak (issue 16: the median of 3 runs on the default config)


def report(
    cfg: BenchConfig, rows: dict, versions: dict, counts: dict, args, per_run: list[dict] | None = None
) -> str:
    """The report of one run (`rows`), or of several (`per_run`: each run's summaries by label; `rows` then
    holds their medians, and the spread between runs is printed)."""
    out = []
    p = out.append
    p(f"tether vs TRL DPOTrainer on CPU ({args.config_name} config)")
    p(
        f"versions: tether {versions['tether']}, trl {versions['trl']}, torch {versions['torch']},"
        f" transformers {versions['transformers']}, accelerate {versions['accelerate']}, python {versions['python']}"
    )
    p(f"model: {cfg.describe()}")
    if cfg.weights is not None:
        source = real_weights(cfg)
        p(
            f"weights: {'the real weights from ' + source if source else 'random (no model at ' + cfg.weights + ')'};"
            " token ids from a word-level tokenizer of the same vocabulary size (the cost does not depend on them)"
        )
    steps = len(counts["real_tokens"])
    p(
        f"data: {steps * cfg.pairs_per_step} pairs, {cfg.pairs_per_step} per step, prompts {cfg.prompt[0]}-{cfg.prompt[1]}"
        f" tokens, responses {cfg.response[0]}-{cfg.response[1]}, max_length {cfg.max_length};"
        f" real tokens per step {counts['real_tokens']} (padded to the longest row: {counts['padded_tokens']})"
    )
    any_row = next(iter(rows.values()))
    p(
        f"steps: {cfg.warmup} warm-up + {cfg.timed} timed per run; AdamW lr {cfg.lr}, constant, clip 1.0, beta"
        f" {cfg.beta}, float32; torch threads {any_row['threads']}, OpenMP env {' '.join(args.omp_env) or 'unchanged'}"
    )
    if per_run:
        p(
            f"every configuration ran {len(per_run)} times; each number in the table is the median over the runs"
        )
    p("")
    head = (
        f"{'run':<25}{'real tok/s':>11}{'s/step':>8}{'cpu s/step':>11}{'MFU':>6}{'mm peak':>8}"
        f"{'peak RSS':>9}{'act.peak':>9}{'loss@1':>9}{'loss@2':>9}{'loss@3':>9}{'start':>7}{'load':>6}"
    )
    p(head)
    p(f"{'':<25}{'':>11}{'':>8}{'':>11}{'':>6}{'GFLOP/s':>8}{'MB':>9}{'MB':>9}{'':>27}{'s':>7}{'':>6}")
    p("-" * len(head))
    for label, r in rows.items():
        s = r["summary"]
        losses = "".join(f"{x:>9.5f}" for x in s["losses"])
        p(
            f"{label:<25}{s['tok_s']:>11.1f}{s['step_s']:>8.2f}{s['cpu_step_s']:>11.2f}{s['mfu']:>6.0%}"
            f"{s['peak_gflops']:>8.1f}{s['peak_rss_mb']:>9.0f}{s['act_peak_mb']:>9.0f}{losses}"
            f"{s['to_first_step_s']:>7.0f}{s['load1']:>6.1f}"
        )
    p("")
    p(
        "columns: real tok/s = non-padding tokens of the timed steps / their wall time; s/step, cpu s/step = wall"
    )
    p(
        "and process CPU seconds per timed optimizer step; MFU = (8 or 6) * N_matmul * real tokens / time / mm peak;"
    )
    p(
        f"mm peak = best torch.mm {cfg.mm_size}^2 float32 rate in that run; peak RSS = VmHWM; act.peak = peak RSS - RSS"
    )
    p(
        "after step 1; start = seconds from process start to the end of step 1 (imports, loading, tokenization,"
    )
    p(
        "reference cache/precompute, step 1); load = 1-minute load average before the run. MFU credits the same"
    )
    p(
        "model FLOPs to both libraries although tether applies lm_head to response tokens only and TRL on CPU to"
    )
    p("every position, padding included.")
    loads = [r["summary"]["load1"] for r in rows.values()]
    if max(loads) > 0.5 * (os.cpu_count() or 1):
        p(
            f"SHARED MACHINE: 1-minute load average {min(loads):.1f}-{max(loads):.1f} before the runs on"
            f" {os.cpu_count()} cores; wall-time columns and their ratios carry the other processes' noise (cpu"
        )
        p("s/step, memory and losses much less). Compare runs within this report only.")
    p("")

    def s(label):
        return rows[label]["summary"] if label in rows else None

    checks = []
    if per_run:
        out.extend(spread_lines(per_run))
        p("")
    p("tether / TRL, same settings (>1 = tether more tokens/s; <1 = tether less memory):")
    pairs = TETHER_TRL_PAIRS
    for a, b in pairs:
        if s(a) and s(b):
            d = rel_diff(s(a)["losses"], s(b)["losses"])
            checks.append((f"losses 1-3 {a} vs {b}", d))
            p(
                f"  {a:<22} / {b:<24} tok/s x{s(a)['tok_s'] / s(b)['tok_s']:.2f}  MFU x{s(a)['mfu'] / s(b)['mfu']:.2f}  cpu s/step"
                f" x{s(a)['cpu_step_s'] / s(b)['cpu_step_s']:.2f}  peak RSS x{s(a)['peak_rss_mb'] / s(b)['peak_rss_mb']:.2f}"
                f"  act.peak x{s(a)['act_peak_mb'] / s(b)['act_peak_mb']:.2f}  loss rel.diff {d:.1e}"
            )
    if s("tether dpo") and s("trl dpo"):
        p(f"  {work_ratio_line(cfg, counts)}")
    targets = []
    tether_dpo = [k for k in rows if k.startswith("tether dpo")]
    trl_dpo = [k for k in rows if k.startswith("trl dpo")]
    if tether_dpo and trl_dpo:
        best_t = max(tether_dpo, key=lambda k: s(k)["tok_s"])
        best_r = max(trl_dpo, key=lambda k: s(k)["tok_s"])
        ratio = s(best_t)["tok_s"] / s(best_r)["tok_s"]
        p(f"  best vs best: {best_t} / {best_r}: tok/s x{ratio:.2f}")
        targets.append(
            (f"tether DPO tok/s >= 1.5x TRL's best ({best_t} / {best_r}: x{ratio:.2f})", ratio >= 1.5)
        )
        for a, b in pairs:
            if s(a) and s(b):
                r = s(a)["peak_rss_mb"] / s(b)["peak_rss_mb"]
                targets.append((f"peak RSS <= 0.6x TRL's ({a} / {b}: x{r:.2f})", r <= 0.6))
        for k in tether_dpo:
            what = f"median of {len(per_run)} runs " if per_run else ""
            targets.append(
                (
                    f"MFU >= {MFU_TARGET:.0%} of the measured matmul peak ({k}: {what}{s(k)['mfu']:.0%})",
                    s(k)["mfu"] >= MFU_TARGET,
                )
            )
    base = s("tether dpo")
    if base and (s("tether tdpo2") or s("tether epsilon_dpo")):
        p("")
        p(
            "token-level objectives (reference copy, no checkpointing) against tether dpo and the full-logits path:"
        )
        for obj in ("tdpo2", "epsilon_dpo"):
            t, f = s(f"tether {obj}"), s(f"full-logits {obj}")
            if t:
                step_r = t["step_s"] / base["step_s"]
                act_r = t["act_peak_mb"] / base["act_peak_mb"]
                line = f"  tether {obj:<12} / tether dpo: s/step x{step_r:.2f}, act.peak x{act_r:.2f}"
                targets.append((f"tether {obj} s/step <= 1.25x tether dpo's (x{step_r:.2f})", step_r <= 1.25))
                targets.append((f"tether {obj} act.peak <= 1.2x tether dpo's (x{act_r:.2f})", act_r <= 1.2))
                if f:
                    d = rel_diff(t["losses"], f["losses"])
                    checks.append((f"losses 1-3 tether {obj} vs full-logits", d))
                    line += (
                        f";  / full-logits: s/step x{t['step_s'] / f['step_s']:.2f},"
                        f" act.peak x{t['act_peak_mb'] / f['act_peak_mb']:.2f}, loss rel.diff {d:.1e}"
                    )
                p(line)
    p("")
    p(f"checks (losses at steps 1-3 agree to {REL_TOL:g} relative; token counts per step equal the data's):")
    for name, d in checks:
        p(f"  [{'ok' if d <= REL_TOL else 'FAIL'}] {name}: {d:.1e}")
    p("  [ok] every run saw the same pairs in the same order (per-step token counts)")
    p("")
    p("targets:")
    for name, ok in targets:
        p(f"  [{'met' if ok else 'NOT met'}] {name}")
    return "\n".join(out)


def versions() -> dict:
    import accelerate
    import torch
    import transformers
    import trl

    import tether

    return {
        "tether": getattr(tether, "__version__", "?"),
        "trl": trl.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller model and data (about 2 minutes)")
    parser.add_argument(
        "--config",
        choices=sorted(CONFIGS),
        default=None,
        help="default | quick (= --quick) | smol (SmolLM2-135M's architecture; its 6 runs) | tiny (tests)",
    )
    parser.add_argument(
        "--smol-path", default=SMOL.weights, help="the converted SmolLM2 folder (random weights if absent)"
    )
    parser.add_argument(
        "--write-results", action="store_true", help="rewrite this config's section of benchmarks/RESULTS.md"
    )
    parser.add_argument("--results-file", default=str(HERE / "RESULTS.md"), help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", default=None, help="run only these labels (see RUNS)")
    parser.add_argument("--no-gc", action="store_true", help="skip the gradient-checkpointing runs")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every configuration this many times (round robin); report medians and the spread",
    )
    parser.add_argument("--keep", default=None, help="keep the model, data and run folders here")
    parser.add_argument(
        "--omp-env",
        nargs="*",
        default=["GOMP_SPINCOUNT=1000"],
        help="KEY=VALUE OpenMP settings for every worker (none: leave the environment as it is)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0

    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.quick and args.config not in (None, "quick"):
        parser.error("--quick and --config other than quick")
    args.config_name = args.config or ("quick" if args.quick else "default")
    cfg = CONFIGS[args.config_name]
    if args.config_name == "smol":
        cfg = replace(cfg, weights=args.smol_path)
    only = args.only if args.only is not None else (SMOL_RUNS if args.config_name == "smol" else None)
    runs = [r for r in RUNS if (only is None or r.label in only) and not (args.no_gc and r.gc)]
    command = "python benchmarks/vs_trl.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:])
    )
    env = worker_env(**dict(item.split("=", 1) for item in args.omp_env))
    folder = Path(args.keep or tempfile.mkdtemp(prefix="tether_vs_trl_"))
    folder.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    load_start = os.getloadavg()
    log(f"[vs_trl] assets in {folder}")
    counts = build_assets(cfg, folder)
    per_run = []  # each repeat's rows, by label
    for repeat in range(args.repeats):
        if args.repeats > 1:
            log(f"[vs_trl] run {repeat + 1} of {args.repeats}")
        rows = {}
        for run in runs:
            res = run_one(run, cfg, folder, env, log, keep=bool(args.keep))
            check_tokens(run, res, counts)
            rows[run.label] = {"spec": run, "raw": res, "summary": summarize(run, res, cfg, counts)}
            rows[run.label]["threads"] = res["threads"]
        per_run.append(rows)
    if args.repeats > 1:
        summaries = [{k: v["summary"] for k, v in rows.items()} for rows in per_run]
        rows = {k: v | {"summary": median_summary([s[k] for s in summaries])} for k, v in per_run[0].items()}
        text = report(cfg, rows, versions(), counts, args, per_run=summaries)
    else:
        text = report(cfg, rows, versions(), counts, args)
    total = time.perf_counter() - t0
    load_end = os.getloadavg()
    text += f"\n\ntotal wall time {total / 60:.1f} min; load average (1, 5, 15 min) at the start"
    text += (
        f" {' '.join(f'{x:.2f}' for x in load_start)}, at the end {' '.join(f'{x:.2f}' for x in load_end)}"
    )
    print(text)
    if args.keep:
        (folder / "results.json").write_text(
            json.dumps(
                [{k: v["raw"] | {"summary": v["summary"]} for k, v in rows.items()} for rows in per_run]
            )
        )
    else:
        shutil.rmtree(folder, ignore_errors=True)
    if args.write_results:
        now = datetime.datetime.now().astimezone().strftime("%a %b %d %H:%M:%S %Z %Y")
        runs_note = f", {args.repeats} runs" if args.repeats > 1 else ""
        body = [
            f"## tether vs TRL DPOTrainer: {args.config_name} config{runs_note}",
            "",
            f"Written by `benchmarks/vs_trl.py --config {args.config_name}"
            f"{f' --repeats {args.repeats}' if args.repeats > 1 else ''} --write-results`; every number in this"
            " section is the script's output. See benchmarks/README.md for the method and the columns.",
            "",
            f"- date: {now}",
            f"- machine: {os.cpu_count()} CPUs (nproc), {cpu_model()}, {platform.machine()}, {platform.system()}",
            f"- command: `{command.strip()}`",
            "",
            "```",
            text,
            "```",
        ]
        section = f"vs_trl:{args.config_name}" + (f":x{args.repeats}" if args.repeats > 1 else "")
        results_md.write_section(Path(args.results_file), section, "\n".join(body))
        log(f"[vs_trl] wrote its section of {args.results_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
