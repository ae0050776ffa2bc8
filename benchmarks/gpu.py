"""tether against TRL's DPOTrainer on one GPU: speed in bf16 at a 0.5B-class Llama, and the memory ceiling.

    python benchmarks/gpu.py                 # one CUDA GPU, about 5-8 minutes (stops starting work at --budget-s)
    python benchmarks/gpu.py --dry-run       # the same code path at toy sizes on CPU (1.5 CPU-minutes: 10 processes)

Not yet run on a GPU (see benchmarks/README.md); only the dry run has run, on CPU, in tests/test_benchmarks.py.

Part 1, speed (each run a fresh subprocess, tether and TRL alternating, as benchmarks/vs_trl.py): a Llama
built from a config with a fixed seed (hidden 1024, 24 layers, 16 heads, intermediate 4096, vocabulary
32000, untied head: 468M parameters; the model, tokenizer and synthetic pairs come from vs_trl.build_assets),
pairs of 2k tokens (prompt 128-512, responses 512-1536 tokens, 4 pairs per step), bf16 autocast with float32
weights in both libraries (tether optim.mixed_precision=bf16, TRL bf16=True), AdamW as in vs_trl.py.
Runs: tether dpo (reference copy), tether dpo with the reference cache, tether tdpo2 and epsilon_dpo, TRL
DPOTrainer with a reference model, TRL with its GPU fast path precompute_ref_log_probs=True (and
use_liger_kernel=True when liger_kernel is installed). Per run: real tokens/s over the timed steps (the
optimizer-step hook of vs_trl.py, after torch.cuda.synchronize), peak CUDA memory
(torch.cuda.max_memory_allocated), and the losses of the first steps (tether against TRL: the same within
bf16 rounding).

Part 2, the memory ceiling: peak CUDA memory of one optimizer step pair (2 steps, 1 pair per step: the chosen
and rejected rows of prompt + response = L tokens, a quarter of them prompt) for L = 2k, 4k, ... 128k, for
tether dpo, tether tdpo2 and TRL DPOTrainer (reference model), each in one subprocess that walks up the
lengths until the first out-of-memory error. The longest length each fits is reported.

--dry-run uses a tiny model (hidden 64, 2 layers, vocabulary 512), 64-256-token pairs, float32 and the CPU
(CUDA_VISIBLE_DEVICES is emptied for the workers), peak memory from ru_maxrss instead of CUDA: the code path
is the same, so a broken flag or API change shows up on CPU; it also checks that tether's and TRL's losses
agree to 1e-4 relative in float32.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import vs_trl  # noqa: E402  (benchmarks/ is not a package)

GPU_CONFIG = vs_trl.BenchConfig(
    hidden=1024,
    layers=24,
    heads=16,
    intermediate=4096,
    vocab=32000,
    prompt=(128, 512),
    response=(512, 1536),
    max_length=131072,  # the model's max_position_embeddings: the sweep's longest length
    pairs_per_step=4,
    warmup=2,
    timed=5,
)
DRY_CONFIG = vs_trl.BenchConfig(
    hidden=64,
    layers=2,
    heads=4,
    intermediate=128,
    vocab=512,
    prompt=(16, 64),
    response=(32, 128),
    max_length=256,
    pairs_per_step=2,
    warmup=1,
    timed=1,
)
GPU_SWEEP = (2048, 4096, 8192, 16384, 32768, 65536, 131072)  # 141 GB of an H200: TRL's ceiling is far up
DRY_SWEEP = (64, 128)
DRY_REL_TOL = 1e-4  # float32 on CPU: tether's and TRL's losses agree as in vs_trl.py
BF16_REL_TOL = 2e-2  # bf16 autocast: the two libraries round differently


@dataclass(frozen=True)
class GpuRun:
    label: str
    lib: str  # tether | trl
    objective: str = "dpo"
    ref: str = "copy"  # copy | cache (tether's reference cache; TRL's precompute_ref_log_probs)


SPEED_RUNS = (
    GpuRun("tether dpo", "tether"),
    GpuRun("trl dpo", "trl"),
    GpuRun("tether dpo cache", "tether", ref="cache"),
    GpuRun("trl dpo precompute", "trl", ref="cache"),
    GpuRun("tether tdpo2", "tether", objective="tdpo2"),
    GpuRun("tether epsilon_dpo", "tether", objective="epsilon_dpo"),
)
SWEEP_RUNS = (
    GpuRun("tether dpo", "tether"),
    GpuRun("tether tdpo2", "tether", objective="tdpo2"),
    GpuRun("trl dpo", "trl"),
)


# --- the worker (a fresh process) ----------------------------------------------------------------------


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb() -> float:
    """Peak CUDA memory allocated since the last reset, MB; on CPU the process's ru_maxrss (never reset)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class SyncedProbe(vs_trl.StepProbe):
    """vs_trl's optimizer-step hook, after the GPU has finished the step's work."""

    def __call__(self, optimizer, args, kwargs) -> None:
        if isinstance(optimizer, self.optimizer_type):
            _sync()
        super().__call__(optimizer, args, kwargs)


def _train_tether(spec: dict) -> list[float]:
    import tether.train

    cfg = vs_trl._tether_config(spec)
    cfg.optim.mixed_precision = spec["mixed_precision"]
    tether.train.train(cfg)
    lines = (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def _train_trl(spec: dict) -> list[float]:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    workdir = Path(spec["workdir"])
    dataset = load_dataset("json", data_files=spec["data"], split="train", cache_dir=str(workdir / "hf"))
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    on_gpu = torch.cuda.is_available()
    args = vs_trl.trl_args(
        spec,
        gradient_checkpointing=False,
        use_cpu=not on_gpu,
        bf16=spec["mixed_precision"] == "bf16",
        use_liger_kernel=spec["liger"],
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    losses: list[float] = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        out = compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if model.training:
            losses.append(float((out[0] if return_outputs else out).detach()))
        return out

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    return losses


def _train(spec: dict) -> list[float]:
    return _train_trl(spec) if spec["lib"] == "trl" else _train_tether(spec)


def speed_worker(spec: dict) -> dict:
    import torch

    probe = SyncedProbe(torch.optim.AdamW)
    _reset_peak()
    losses = _train(spec)
    return {"losses": losses, "wall": probe.wall, "peak_mb": _peak_mb()}


def sweep_worker(spec: dict) -> dict:
    """Walk up spec["lengths"] (one data file each) until the first out-of-memory error."""
    import torch

    rows = []
    for length, data in zip(spec["lengths"], spec["data_files"]):
        if time.time() > spec["deadline"]:
            rows.append({"length": length, "status": "skipped (time budget)"})
            continue
        _reset_peak()
        step_spec = {**spec, "data": data, "workdir": str(Path(spec["workdir"]) / str(length))}
        try:
            losses = _train(step_spec)
        except torch.OutOfMemoryError:
            rows.append({"length": length, "status": "OOM"})
            break
        rows.append({"length": length, "status": "ok", "peak_mb": _peak_mb(), "losses": losses})
    return {"rows": rows}


def worker(spec: dict) -> None:
    result = sweep_worker(spec) if spec["kind"] == "sweep" else speed_worker(spec)
    Path(spec["result"]).write_text(json.dumps(result))


# --- the parent ----------------------------------------------------------------------------------------


def write_pairs(path: Path, n: int, length: int, vocab: int, seed: int) -> None:
    """n pairs of prompt + response = `length` tokens each (<s> and </s> included), a quarter prompt."""
    import random

    rng = random.Random(seed)
    p = max(2, length // 4)
    r = length - p

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(4, vocab)}" for _ in range(k))

    with open(path, "w") as fh:
        for _ in range(n):
            fh.write(
                json.dumps(
                    {"prompt": words(p - 1), "chosen": " " + words(r - 1), "rejected": " " + words(r - 1)}
                )
                + "\n"
            )


def run_worker(spec: dict, env: dict, timeout: float) -> dict:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    log = Path(spec["workdir"]) / "worker.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['label']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(Path(spec["result"]).read_text())


def rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on CPU, float32 (seconds per run)")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="start no new work after this many seconds (GPU: 420)"
    )
    parser.add_argument("--skip-sweep", action="store_true", help="only the speed comparison")
    parser.add_argument("--json", default=None, help="also write the results here as JSON")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0

    t0 = time.time()
    dry = args.dry_run
    deadline = t0 + (args.budget_s if args.budget_s is not None else (1e9 if dry else 420.0))
    cfg = DRY_CONFIG if dry else GPU_CONFIG
    lengths = DRY_SWEEP if dry else GPU_SWEEP
    env = vs_trl.worker_env()
    if dry:  # the CPU, one thread per worker: toy matmuls gain nothing from more and the test shares cores
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", GOMP_SPINCOUNT="1000")
    elif not _cuda():
        print("gpu.py: no CUDA device; use --dry-run to check the code path on CPU", file=sys.stderr)
        return 2
    liger = not dry and importlib.util.find_spec("liger_kernel") is not None
    precision = "no" if dry else "bf16"
    folder = Path(tempfile.mkdtemp(prefix="tether_gpu_"))
    out: list[str] = []

    def say(line: str = "") -> None:
        out.append(line)
        print(line, flush=True)

    try:
        counts = vs_trl.build_assets(cfg, folder)
        base = {
            "model": str(folder / "model"),
            "max_length": cfg.max_length,
            "lr": cfg.lr,
            "beta": cfg.beta,
            "seed": cfg.seed,
            "gc": False,
            "mixed_precision": precision,
            "liger": liger,
        }
        say(f"tether vs TRL DPOTrainer, {'DRY RUN on CPU, float32' if dry else 'one GPU, bf16 autocast'}")
        say(
            f"model: Llama hidden {cfg.hidden}, {cfg.layers} layers, {cfg.heads} heads, intermediate"
            f" {cfg.intermediate}, vocab {cfg.vocab}, untied head: {cfg.n_params() / 1e6:.0f}M parameters"
        )
        say(
            f"speed: {cfg.pairs_per_step} pairs per step, prompts {cfg.prompt[0]}-{cfg.prompt[1]} tokens,"
            f" responses {cfg.response[0]}-{cfg.response[1]}; {cfg.warmup} warm-up + {cfg.timed} timed steps;"
            f" TRL use_liger_kernel={liger}"
        )
        say(f"{'run':<22}{'real tok/s':>12}{'s/step':>9}{'peak MB':>10}  losses")
        results: dict[str, dict] = {}
        for run in SPEED_RUNS:
            if time.time() > deadline:
                say(f"{run.label:<22} skipped (time budget)")
                continue
            workdir = folder / run.label.replace(" ", "_")
            spec = {
                **base,
                **asdict(run),
                "kind": "speed",
                "workdir": str(workdir),
                "result": str(workdir / "result.json"),
                "data": str(folder / "data.jsonl"),
                "pairs_per_step": cfg.pairs_per_step,
                "steps": cfg.steps,
            }
            res = run_worker(spec, env, timeout=min(900.0, max(60.0, deadline + 120 - time.time())))
            wall = res["wall"][-1] - res["wall"][cfg.warmup - 1]
            tok_s = sum(counts["real_tokens"][cfg.warmup :]) / wall
            res.update(tok_s=tok_s, step_s=wall / cfg.timed)
            results[run.label] = res
            losses = " ".join(f"{x:.5f}" for x in res["losses"][:3])
            say(f"{run.label:<22}{tok_s:>12.0f}{wall / cfg.timed:>9.3f}{res['peak_mb']:>10.0f}  {losses}")
        checks = []
        for a, b in (("tether dpo", "trl dpo"), ("tether dpo cache", "trl dpo precompute")):
            if a in results and b in results:
                ra, rb = results[a], results[b]
                d = rel_diff(ra["losses"][:3], rb["losses"][:3])
                tol = DRY_REL_TOL if dry else BF16_REL_TOL
                checks.append({"pair": [a, b], "loss_rel_diff": d, "ok": d <= tol})
                say(
                    f"  {a} / {b}: tok/s x{ra['tok_s'] / rb['tok_s']:.2f}, peak memory"
                    f" x{ra['peak_mb'] / rb['peak_mb']:.2f}, losses 1-3 rel.diff {d:.1e}"
                    f" [{'ok' if d <= tol else 'FAIL'} at {tol:g}]"
                )
        if dry:
            say("  (dry run: peak MB is the process's ru_maxrss, not CUDA memory)")

        sweep: dict[str, list] = {}
        if not args.skip_sweep:
            say("")
            say(
                f"memory ceiling: 1 pair per step, prompt + response = L tokens; peak {'RSS' if dry else 'CUDA'} MB"
            )
            data_files = []
            for length in lengths:
                path = folder / f"sweep_{length}.jsonl"
                write_pairs(path, n=2, length=length, vocab=cfg.vocab, seed=cfg.seed)
                data_files.append(str(path))
            for run in SWEEP_RUNS:
                if time.time() > deadline:
                    say(f"{run.label:<22} skipped (time budget)")
                    continue
                workdir = folder / ("sweep_" + run.label.replace(" ", "_"))
                spec = {
                    **base,
                    **asdict(run),
                    "kind": "sweep",
                    "label": run.label,
                    "workdir": str(workdir),
                    "result": str(workdir / "result.json"),
                    "lengths": list(lengths),
                    "data_files": data_files,
                    "pairs_per_step": 1,
                    "steps": 2,
                    "deadline": deadline,
                }
                rows = run_worker(spec, env, timeout=min(900.0, max(60.0, deadline + 120 - time.time())))[
                    "rows"
                ]
                sweep[run.label] = rows
                cells = [
                    f"{r['length']}: {r['peak_mb']:.0f}"
                    if r["status"] == "ok"
                    else f"{r['length']}: {r['status']}"
                    for r in rows
                ]
                fits = [r["length"] for r in rows if r["status"] == "ok"]
                say(f"{run.label:<22} longest fit {max(fits) if fits else 'none'}; " + ", ".join(cells))
        say("")
        say(f"total wall time {(time.time() - t0) / 60:.1f} min")
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "dry_run": dry,
                        "config": asdict(cfg),
                        "speed": results,
                        "checks": checks,
                        "sweep": sweep,
                    },
                    indent=1,
                )
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
