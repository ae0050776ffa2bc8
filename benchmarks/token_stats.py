"""Peak extra memory and time of one forward+backward of the lm_head statistics: full logits vs chunked.

    python benchmarks/token_stats.py                      # N=4096, V=32000, H=512, float32, CPU
    python benchmarks/token_stats.py --repeats 1 --chunks 1024

What is measured. For each statistic request an objective needs (DPO: policy + reference target log-probs;
TDPO: + per-token KL(pi_ref || pi); epsilon-DPO: + the two perturbed log-probs), one training step of the head:
  full     logits = hidden @ weight.T (with grad) and ref_logits = ref_hidden @ ref_weight.T (no grad), then
           `token_stats_from_logits` and backward: the (N, V) path a plain implementation takes;
  chunked  `tether.heads.token_stats(..., chunk_size=C)` and backward (default C, and the other sizes asked).
The backward is of sum(logps) (+ sum(kl) for TDPO) into hidden and weight (both require grad).

How. Every case runs in a FRESH subprocess, so its peak resident memory is its own. In the child, the inputs
are built, then the resident set size is read (VmRSS, /proc/self/status) as the baseline, the peak counter is
reset by writing "5" to /proc/self/clear_refs (Linux resets VmHWM to the current RSS), one step runs, and
VmHWM - baseline is the peak EXTRA memory of the step: every buffer it allocated at its high point, the weight
gradient included. Where clear_refs cannot be written, a thread samples RSS with psutil every 0.5 ms instead
(may miss short peaks; the table says which method ran). Memory is taken from the first step in the process:
later steps can reuse memory that malloc kept from earlier ones, which RSS would then not show. Time is the
median wall time of `--repeats` further steps after that first (warm-up) step.

Target: chunked peak extra memory <= 1/8 of full, at <= 1.3x its time.
Timings on a shared machine vary with the other load on it; the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

REQUESTS = ("dpo", "tdpo", "epsilon_dpo")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakRSS:
    """Peak RSS during a block: VmHWM after resetting it via clear_refs, else psutil polling."""

    def __init__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM (clear_refs)"
        except OSError:
            self.method = "psutil polling"

    def __enter__(self):
        self.peak_kib = 0
        if self.method.startswith("VmHWM"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            import psutil

            proc, self._stop = psutil.Process(), threading.Event()

            def poll():
                while not self._stop.is_set():
                    self.peak_kib = max(self.peak_kib, proc.memory_info().rss // 1024)
                    time.sleep(0.0005)

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.method.startswith("VmHWM"):
            self.peak_kib = _status_kib("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
        return False


def child(args) -> dict:
    """One case in this (fresh) process; returns peak extra MiB and per-step times."""
    import gc

    import torch

    from tether.heads import DEFAULT_CHUNK_SIZE, StatRequest, token_stats, token_stats_from_logits

    n, v, h = args.n, args.v, args.h
    request = {
        "dpo": StatRequest(),
        "tdpo": StatRequest(kl=True),
        "epsilon_dpo": StatRequest(epsilon=0.01),
    }[args.request]
    chunk = args.chunk or DEFAULT_CHUNK_SIZE
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).requires_grad_()
    ref_hidden = hidden.detach() + 0.1 * torch.randn(n, h, generator=g)
    ref_weight = weight.detach() + 0.01 * torch.randn(v, h, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)

    def step():
        if args.method == "full":
            logits = hidden @ weight.t()
            with torch.no_grad():
                ref_logits = ref_hidden @ ref_weight.t()
            stats = token_stats_from_logits(logits, targets, ref_logits, request=request)
        else:
            stats = token_stats(
                hidden,
                weight,
                targets,
                ref_hidden=ref_hidden,
                ref_weight=ref_weight,
                request=request,
                chunk_size=chunk,
            )
        loss = stats.logps.sum()
        if stats.kl is not None:
            loss = loss + stats.kl.sum()
        loss.backward()

    def reset():
        hidden.grad = None
        weight.grad = None
        gc.collect()

    reset()
    baseline_kib = _status_kib("VmRSS")
    meter = PeakRSS()
    with meter:
        t0 = time.perf_counter()
        step()
        first = time.perf_counter() - t0
    peak_extra_mib = (meter.peak_kib - baseline_kib) / 1024
    times = []
    for _ in range(args.repeats):
        reset()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "peak_extra_mib": peak_extra_mib,
        "first_s": first,
        "times_s": times,
        "chunk": chunk if args.method == "chunked" else None,
        "memory_method": meter.method,
        "threads": torch.get_num_threads(),
    }


def run_case(args, request: str, method: str, chunk: int | None) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        f"--request={request}",
        f"--method={method}",
        f"--chunk={chunk or 0}",
        f"--n={args.n}",
        f"--v={args.v}",
        f"--h={args.h}",
        f"--repeats={args.repeats}",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4096, help="response tokens N")
    p.add_argument("--v", type=int, default=32000, help="vocabulary size V")
    p.add_argument("--h", type=int, default=512, help="hidden size H")
    p.add_argument("--repeats", type=int, default=2, help="timed steps after the warm-up step")
    p.add_argument(
        "--chunks", default="default,256", help="chunk sizes for the chunked path ('default' = 1024)"
    )
    p.add_argument("--requests", default=",".join(REQUESTS), help=f"subset of {REQUESTS}")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--request", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    chunks = [None if c == "default" else int(c) for c in args.chunks.split(",")]
    requests = args.requests.split(",")
    start, load0 = time.time(), os.getloadavg()
    print(
        f"token_stats benchmark: N={args.n} V={args.v} H={args.h} float32 CPU, "
        f"forward+backward, {args.repeats} timed step(s) after 1 warm-up, each case in a fresh process"
    )
    print(f"one (N, V) float32 tensor = {args.n * args.v * 4 / 2**20:.0f} MiB")
    rows = []
    for request in requests:
        full = run_case(args, request, "full", None)
        rows.append((request, "full", full, full))
        for c in chunks:
            rows.append((request, "chunked", run_case(args, request, "chunked", c), full))
    header = (
        f"{'request':<12} {'method':<8} {'chunk':>6} {'peak extra MiB':>15} {'time s (median)':>16} "
        f"{'mem/full':>9} {'time/full':>10} {'target':>7}"
    )
    print(header)
    print("-" * len(header))
    for request, method, r, full in rows:
        t, t_full = statistics.median(r["times_s"]), statistics.median(full["times_s"])
        mem_ratio, time_ratio = r["peak_extra_mib"] / full["peak_extra_mib"], t / t_full
        target = "" if method == "full" else ("met" if mem_ratio <= 1 / 8 and time_ratio <= 1.3 else "MISSED")
        print(
            f"{request:<12} {method:<8} {r['chunk'] or '-':>6} {r['peak_extra_mib']:>15.1f} {t:>16.2f} "
            f"{mem_ratio:>9.3f} {time_ratio:>10.2f} {target:>7}"
        )
    load1 = os.getloadavg()
    print(
        f"target: chunked peak extra <= 1/8 of full (0.125) at <= 1.3x its time; memory: {rows[0][2]['memory_method']}"
        f", first step of each process; torch threads: {rows[0][2]['threads']}; "
        f"load average (1 min) {load0[0]:.1f} at start, {load1[0]:.1f} at end on {os.cpu_count()} CPUs; "
        f"total {time.time() - start:.0f} s"
    )
    print(
        "all step times (s): "
        + "; ".join(
            f"{q}/{m}/{r['chunk'] or '-'}: {[round(x, 2) for x in r['times_s']]}" for q, m, r, _ in rows
        )
    )


if __name__ == "__main__":
    main()
