"""The CPU policy forward in groups of close row lengths: time against `merge_pad_tokens`, side by side.

    python benchmarks/row_groups.py                       # smol and default configs, 5 rounds
    python benchmarks/row_groups.py --config smol --repeats 3 --merge 0 64

On CPU, `tether.causal_lm.final_hidden_states` runs a micro-batch's rows in groups (`row_groups`): the rows
of one length together, and the rows of a shorter length in the same forward as a longer group (padded to
it) when the padding they add is at most `merge_pad_tokens`. 0 is one forward per distinct length, no padding
computed (tether before MERGE_PAD_TOKENS); a huge value is one padded forward for the whole micro-batch.
Under the cost model c * (tokens of a forward + m), merging is cheaper exactly when the padding is at most
m, so the best setting measures m, the per-forward cost in tokens on this machine (small forwards run
their matmuls below peak).

What runs: vs_trl.py's model of the config (SmolLM2-135M's real weights from --smol-path when present) and
pairs drawn as vs_trl.py draws them (same distributions, --steps micro-batches of the config's pairs per
step), loaded and collated by tether. For every micro-batch: the policy forward (`final_hidden_states`, the
body; tether's chunked head is the same for every setting and is left out) and a backward of the sum of
squares of the real positions' hidden states. A round times every setting once over all micro-batches, in
the order given; --repeats rounds; the report gives each setting's median seconds per round [min-max], the
ratio to merge 0 per round, the forwards and the tokens computed. Float32, --threads torch threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import vs_trl  # noqa: E402  (the benchmark's models and pair distributions)

MERGES = (0, 16, 32, 64, 128, 256, 10**9)


def batches_of(cfg: vs_trl.BenchConfig, folder: Path, steps: int):
    """(model, micro-batches) of cfg with `steps` micro-batches of cfg.pairs_per_step pairs, as tether collates."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tether.data import load_preference_data
    from tether.data.dataset import PreferenceCollator

    cfg = replace(cfg, warmup=0, timed=steps)
    vs_trl.build_assets(cfg, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    pairs, _ = load_preference_data(
        folder / "data.jsonl", tokenizer, max_length=cfg.max_length, max_prompt_length=None, progress=False
    )
    collate = PreferenceCollator(tokenizer.pad_token_id)
    n = cfg.pairs_per_step
    batches = [collate([pairs[i] for i in range(s * n, (s + 1) * n)]) for s in range(steps)]
    model = LlamaForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)
    model.train()
    return model, batches


def time_round(model, batches, merge: int) -> float:
    from tether.causal_lm import final_hidden_states

    start = time.perf_counter()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        hidden = final_hidden_states(model, batch, True, merge)
        (hidden[batch.attention_mask.bool()] ** 2).sum().backward()
    return time.perf_counter() - start


def work(batches, merge: int) -> tuple[int, int, int]:
    """(forwards, tokens computed, real tokens) over the micro-batches."""
    from tether.causal_lm import row_groups

    forwards = computed = real = 0
    for batch in batches:
        lengths = batch.attention_mask.sum(1).tolist()
        groups = row_groups(lengths, merge)
        forwards += len(groups)
        computed += sum(length * len(rows) for length, rows in groups)
        real += sum(lengths)
    return forwards, computed, real


def report(name: str, cfg: vs_trl.BenchConfig, batches, times: dict[int, list[float]]) -> None:
    base = times[0] if 0 in times else None
    print(f"\n{name} config: {cfg.describe()}")
    print(
        f"  {len(batches)} micro-batches of {cfg.pairs_per_step} pairs (2 rows each), max_length {cfg.max_length}"
    )
    print(
        f"  {'merge_pad_tokens':>16}  {'s/round median [min-max]':>26}  {'vs 0 (per round)':>24}  forwards  tokens/real"
    )
    for merge, values in times.items():
        forwards, computed, real = work(batches, merge)
        spread = f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"
        if base is not None:
            ratios = [b / v for b, v in zip(base, values)]
            vs = f"x{statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]"
        else:
            vs = "-"
        label = "all (one forward)" if merge >= 10**9 else str(merge)
        print(f"  {label:>16}  {spread:>26}  {vs:>24}  {forwards:>8}  {computed / real:>11.3f}")
    print("  (vs 0 > 1: faster than one forward per distinct length)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", nargs="*", default=["smol", "default"], choices=sorted(vs_trl.CONFIGS))
    parser.add_argument(
        "--merge", type=int, nargs="*", default=list(MERGES), help="merge_pad_tokens settings"
    )
    parser.add_argument("--repeats", type=int, default=5, help="rounds (each times every setting once)")
    parser.add_argument("--steps", type=int, default=8, help="micro-batches per round")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--smol-path", default=vs_trl.SMOL.weights, help="converted SmolLM2 folder (random if absent)"
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    print(f"row groups on CPU: torch {torch.__version__}, {args.threads} threads, {args.repeats} rounds")
    for name in args.config:
        cfg = vs_trl.CONFIGS[name]
        if name == "smol":
            cfg = replace(cfg, weights=args.smol_path)
        with tempfile.TemporaryDirectory(prefix="tether-row-groups-") as tmp:
            model, batches = batches_of(cfg, Path(tmp), args.steps)
            time_round(model, batches[:1], 0)  # warm-up: allocator, oneDNN kernels
            times: dict[int, list[float]] = {m: [] for m in args.merge}
            for _ in range(args.repeats):
                for merge in args.merge:
                    times[merge].append(time_round(model, batches, merge))
            report(name, cfg, batches, times)
    return 0


if __name__ == "__main__":
    sys.exit(main())
