"""Where a tether DPO step spends its time on CPU: the profile behind the MFU column of vs_trl.py.

    python benchmarks/profile_tether.py                     # vs_trl's default model and data, reference copy
    python benchmarks/profile_tether.py --quick --ref cache

Builds the same model and pairs as `vs_trl.py` (same config, same seed), trains with `tether.train.train`
exactly as vs_trl's `tether dpo` run does, and profiles the optimizer steps after the first one with
`torch.profiler` (CPU activities, FLOP counting on). It prints:
  - the share of time per op category: the ops' self CPU time (the wall time of each op on the thread that
    called it; intra-op threads work inside it) divided by the summed self time of all ops: matmuls
    (mm / addmm / bmm), attention kernels, vocabulary reductions of the head (exp / log / logsumexp /
    softmax), AdamW's elementwise updates, everything else;
  - the FLOP rate the matmul ops reached (profiler FLOPs / their self time) against torch.mm's rate on
    2048 x 2048 matrices measured in the same process: low MFU is then either time outside matmuls or
    matmuls slower than the benchmark shape;
  - the top ops by self CPU time.
The profiler adds its own overhead per op (small against these op sizes); use the shares, not the seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import vs_trl  # noqa: E402  (the benchmark's model, data and tether config)

CATEGORIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::_addmm_activation")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("head reductions", ("aten::exp", "aten::log", "aten::logsumexp", "aten::softmax", "aten::_softmax")),
    ("AdamW", ("_foreach_", "aten::addcdiv", "aten::addcmul", "aten::lerp", "aten::sqrt")),
)


def category(name: str) -> str:
    for label, keys in CATEGORIES:
        if any(key in name for key in keys):
            return label
    return "other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="vs_trl's --quick model and data")
    parser.add_argument("--ref", choices=["copy", "cache"], default="copy", help="reference mode")
    parser.add_argument("--gc", action="store_true", help="gradient checkpointing")
    parser.add_argument("--top", type=int, default=15, help="ops to list")
    args = parser.parse_args(argv)

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile

    import tether.train

    cfg = vs_trl.QUICK if args.quick else vs_trl.DEFAULT
    with tempfile.TemporaryDirectory(prefix="tether_profile_") as tmp:
        folder = Path(tmp)
        vs_trl.build_assets(cfg, folder)
        spec = {
            "workdir": str(folder),
            "model": str(folder / "model"),
            "data": str(folder / "data.jsonl"),
            "gc": args.gc,
            "max_length": cfg.max_length,
            "objective": "dpo",
            "beta": cfg.beta,
            "ref": args.ref,
            "lr": cfg.lr,
            "pairs_per_step": cfg.pairs_per_step,
            "steps": cfg.steps,
            "seed": cfg.seed,
        }
        prof = profile(activities=[ProfilerActivity.CPU], with_flops=True)
        steps = []

        def on_step(optimizer, _args, _kwargs) -> None:  # after every optimizer step
            steps.append(optimizer)
            if len(steps) == 1:
                prof.start()  # profile steps 2..N: step 1 pays one-off allocations
            elif len(steps) == cfg.steps:
                prof.stop()

        handle = register_optimizer_step_post_hook(on_step)
        try:
            tether.train.train(vs_trl._tether_config(spec))
        finally:
            handle.remove()
        peak = vs_trl.matmul_peak() / 1e9  # GFLOP/s

    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    by_category: dict[str, float] = defaultdict(float)
    mm_flops = mm_time = 0.0
    for e in events:
        label = category(e.key)
        by_category[label] += e.self_cpu_time_total
        if label == "matmul":
            mm_flops += e.flops or 0
            mm_time += e.self_cpu_time_total
    print(
        f"tether dpo, reference {args.ref}{', gradient checkpointing' if args.gc else ''}:"
        f" {'quick' if args.quick else 'default'} vs_trl config, optimizer steps 2-{cfg.steps} profiled,"
        f" torch threads {torch.get_num_threads()}"
    )
    print("\nshare of op self time per category:")
    for label, _ in (*CATEGORIES, ("other", ())):
        print(f"  {label:<16} {by_category[label] / total:6.1%}")
    if mm_time:
        # self_cpu_time_total is in microseconds
        rate = mm_flops / (mm_time * 1e-6) / 1e9
        print(
            f"\nmatmul ops: {mm_flops / 1e12:.2f} TFLOP counted by the profiler at {rate:.1f} GFLOP/s of op self"
            f" time; torch.mm 2048^2 peak in this process {peak:.1f} GFLOP/s ({rate / peak:.0%} of it)"
        )
    print(f"\ntop {args.top} ops by self CPU time:")
    print(f"  {'op':<48} {'self ms':>10} {'share':>7} {'calls':>7}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(
            f"  {e.key[:48]:<48} {e.self_cpu_time_total / 1e3:10.1f} {e.self_cpu_time_total / total:7.1%}"
            f" {e.count:7d}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
