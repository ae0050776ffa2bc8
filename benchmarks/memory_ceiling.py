"""The memory ceiling on CPU: peak memory of one DPO training step against sequence length, tether and TRL.

    python benchmarks/memory_ceiling.py --write-results    # the sweep below; writes its RESULTS.md section
    python benchmarks/memory_ceiling.py --report-only --write-results   # table, plot, section from the JSON

What runs. vs_trl.py's default model (a Llama of hidden 512, 8 layers, 8 heads, intermediate 1376, vocabulary
32000, untied head: 58.1M parameters, built from a config with a fixed seed; max_position_embeddings 8192)
and its word-level tokenizer. For each length L in 512, 1024, 2048, 4096, 8192: one preference pair whose
chosen and rejected rows are each prompt + response = L tokens (a quarter prompt, <s> and </s> included;
max_length L, nothing truncated), one optimizer step (policy forward and backward, the reference forward,
gradient clipping, AdamW, which allocates its state in that step), batch 1, float32. Configurations: tether
dpo, tdpo2 and epsilon_dpo (reference copy), each without and with gradient checkpointing; TRL 1.16
DPOTrainer (loss sigmoid, reference model) without and with gradient checkpointing; and the full-logits
path, tether's loop with the chunked head replaced by the model's normal forward (full (2, L, V) logits for
the policy and the reference, vs_trl.full_logits_pair_stats).

How it measures. Every point (configuration, length) runs in a fresh subprocess (vs_trl.py's workers); its
peak memory is the child's VmHWM, the resident-memory high-water mark of the whole process (weights,
reference, AdamW state and the step's activations included), sampled by the parent and read by the child
at its end. The parent samples the child's RSS every 20 ms and kills it as soon as it exceeds the ceiling
(default 20 GB of the machine's 23): that point does not fit, and the configuration's sweep stops there (a
longer length needs more). The parent also kills the child, and marks the point aborted (neither fit nor
miss), if the machine's MemAvailable falls under --min-free-gb: the box is shared and must never swap or
invoke the OOM killer; the child's oom_score_adj is 1000 so that it, not a neighbour, goes first.

Time. Wall time does not change the memory, but it limits the sweep. The lengths run breadth-first (every
configuration at 512, then each one still going at 1024, ...), so a time budget (--budget-min) cuts the long
points, not whole configurations; a configuration stops before a length when its previous point used more
than --max-point-cpu-s CPU seconds (default 600: 5 minutes on 2 idle cores; a point costs 2-3x more per
doubling of L, so the 8k point is dropped when the 4k one alone took more than that). CPU seconds, not wall
seconds, because on a shared machine the wall time of a point says more about the neighbours than about
the point. A configuration whose sweep was cut by time gets its longer lengths predicted from a straight
line through its last two measured points, marked as predicted (~) in the table and dotted in the plot;
the targets use measured points only.

A larger vocabulary (`--vocab 128256`: Llama 3's; Qwen2.5 has 151,936 and Gemma 256,000) keeps the body and
changes only the vocabulary, with its own JSON, plot and RESULTS.md section:

    python benchmarks/memory_ceiling.py --vocab 128256 --lengths 512 1024 2048 4096 8192 16384 \
        --only "tether dpo" "trl dpo" "tether tdpo2" "tether dpo +gc" "trl dpo +gc" "full-logits dpo"

Why, decided before it ran: what this benchmark compares is the full (2, L, V) logits against tether's chunked
head, and at V = 32000 no configuration reached the 20 GB ceiling by L = 8192 on this 23 GB machine, so that
sweep cannot say how much longer tether fits; vocabularies of 128k-256k are what current models bring. Its
model has 156.6M parameters (embedding and untied head 65.7M each) and the same 8 layers of width 512.
The configurations, also chosen before it ran: the ones the targets compare (tether dpo and TRL with and
without checkpointing, TDPO2) and the full-logits path, which says how much of the difference is the head;
epsilon-DPO and TDPO2 with checkpointing are left out to fit the sweep in a session (at V = 32000 epsilon-DPO
stayed within 11% of DPO's memory up to 4096, within 3% at 2048 and 4096, and TDPO2 +gc within 10% of
DPO +gc).

Why the 58M model and not SmolLM2-135M's shape: a step at 8k tokens per row costs about 14 TFLOP on the 58M
model and 54 TFLOP on SmolLM2's (30 layers, plus attention that grows with L), 2 to 4 CPU-hours for the
whole sweep on this machine's 2 shared cores instead of under one; the memory behaviour being compared (full
logits of a 32000-word vocabulary at every position against tether's chunked head on response tokens) is
the same in kind.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import results_md  # noqa: E402  (benchmarks/ is not a package)
import vs_trl  # noqa: E402

LENGTHS = (512, 1024, 2048, 4096, 8192)
SMALL_LENGTHS = (64, 128)  # --small: the tests' sizes
SMALL = replace(vs_trl.TINY, prompt=(8, 16), response=(8, 16))


@dataclass(frozen=True)
class Config:
    label: str
    lib: str  # tether | trl | full (tether's loop, full-logits statistics)
    objective: str = "dpo"
    gc: bool = False


CONFIGS = (
    Config("tether dpo", "tether"),
    Config("trl dpo", "trl"),
    Config("tether tdpo2", "tether", "tdpo2"),
    Config("tether dpo +gc", "tether", gc=True),
    Config("trl dpo +gc", "trl", gc=True),
    Config("tether tdpo2 +gc", "tether", "tdpo2", gc=True),
    Config("full-logits dpo", "full"),
    Config("tether epsilon_dpo", "tether", "epsilon_dpo"),
    Config("tether epsilon_dpo +gc", "tether", "epsilon_dpo", gc=True),
)


def write_pair(path: Path, length: int, vocab: int, seed: int) -> None:
    """One pair whose rows are prompt + response = `length` tokens (<s> from the tokenizer, </s> from the
    libraries), a quarter of them prompt; chosen and rejected differ."""
    import random

    rng = random.Random(seed)
    p = max(2, length // 4)

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(4, vocab)}" for _ in range(k))

    row = {
        "prompt": words(p - 1),
        "chosen": " " + words(length - p - 1),
        "rejected": " " + words(length - p - 1),
    }
    path.write_text(json.dumps(row) + "\n")


# --- one point: a child process watched by the parent ----------------------------------------------------


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _first_to_die() -> None:
    """In the child before exec: the kernel's OOM killer picks this process before any other."""
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass


def _vm_hwm_mb(pid: int) -> float:
    """VmHWM of a process, MB (0 when it is gone): its resident-memory high-water mark since its exec."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def watch(cmd: list[str], env: dict, ceiling_mb: float, min_free_mb: float, timeout_s: float) -> dict:
    """Run `cmd`, sampling its RSS and VmHWM every 20 ms; kill it above `ceiling_mb`, when the machine's
    MemAvailable falls under `min_free_mb`, or after `timeout_s`. Returns status (ok | over ceiling |
    aborted: machine low on memory | timeout | out of memory | failed), the highest VmHWM sampled (MB), the
    wall time and the tail of its output. (Not the child's ru_maxrss from wait4: on Linux it starts at the
    parent's high-water mark, see vs_trl.peak_rss_mb.)"""
    import psutil

    log = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_first_to_die)
    proc = psutil.Process(child.pid)
    hwm, status = 0.0, None
    while True:
        pid, wstatus, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        try:
            rss = proc.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            rss = 0.0
        hwm = max(hwm, _vm_hwm_mb(child.pid), rss)
        if status is None:
            if rss > ceiling_mb:
                status = "over ceiling"
            elif mem_available_mb() < min_free_mb:
                status = "aborted: machine low on memory"
            elif time.perf_counter() - t0 > timeout_s:
                status = "timeout"
            if status is not None:
                os.kill(child.pid, signal.SIGKILL)
        time.sleep(0.02)
    child.returncode = os.waitstatus_to_exitcode(wstatus)
    log.seek(0)
    tail = log.read().decode(errors="replace")[-3000:]
    log.close()
    if status is None:
        if child.returncode == 0:
            status = "ok"
        elif "MemoryError" in tail or "DefaultCPUAllocator: can't allocate" in tail:
            status = "out of memory"
        elif child.returncode == -signal.SIGKILL:
            status = "killed (by the kernel: out of memory?)"
        else:
            status = "failed"
    return {
        "status": status,
        "peak_mb": hwm,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "tail": tail if status not in ("ok", "over ceiling") else "",
    }


def run_point(cfg: Config, length: int, folder: Path, env: dict, args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"{cfg.label.replace(' ', '_')}_{length}_", dir=folder))
    spec = {
        **asdict(cfg),
        "ref": "copy",
        "workdir": str(workdir),
        "model": str(folder / "model"),
        "data": str(folder / f"pair_{length}.jsonl"),
        "result": str(workdir / "result.json"),
        "max_length": length,
        "pairs_per_step": 1,
        "steps": 1,
        "lr": vs_trl.DEFAULT.lr,
        "beta": vs_trl.DEFAULT.beta,
        "seed": 0,
        "mm_size": 64,  # the worker's matmul-peak probe: negligible here
    }
    cmd = [sys.executable, str(HERE / "vs_trl.py"), "--worker", json.dumps(spec)]
    point = watch(cmd, env, args.ceiling_gb * 1024, args.min_free_gb * 1024, args.timeout_s)
    point["length"] = length
    if point["status"] == "ok":
        res = json.loads(Path(spec["result"]).read_text())
        expected = 2 * (length - max(2, length // 4))  # response tokens of the pair (chosen + rejected)
        if res["response_tokens"] != [expected]:
            raise RuntimeError(
                f"{cfg.label} at {length}: response tokens {res['response_tokens']} != {expected}"
            )
        point["step_peak_mb"] = res["maxrss_mb"][-1]  # VmHWM at the optimizer step's hook
        point["peak_mb"] = max(point["peak_mb"], res["exit_peak_mb"])  # VmHWM at the worker's end
        point["loss"] = res["losses"][0]
    shutil.rmtree(workdir, ignore_errors=True)
    return point


def fits(point: dict) -> bool:
    return point["status"] == "ok"


def next_point(points: list, length: int, args) -> dict | None:
    """None when `length` should run next for a configuration whose earlier points are `points` (increasing
    length); else the reason it does not run (a skipped point), or {} when its sweep has already ended."""
    if not points:
        return None
    last = points[-1]
    if not fits(last):
        return {}
    cpu = last.get("cpu_s", last["wall_s"])
    if cpu > args.max_point_cpu_s:
        return {
            "length": length,
            "status": f"skipped: the {last['length']} point used {cpu:.0f} CPU s > {args.max_point_cpu_s:.0f}",
        }
    return None


def sweep(configs, lengths, folder: Path, env: dict, args, results: dict, log) -> None:
    """Every configuration at the shortest length, then every one still going at the next length, and so on
    (so that a time budget cuts the long points, not whole configurations). A configuration stops at its
    first point that does not fit, and before a length whose predecessor took more than args.max_point_cpu_s."""
    points = results["points"]
    for length in lengths:
        for cfg in configs:
            mine = points.setdefault(cfg.label, [])
            if any(q["length"] == length for q in mine):
                continue
            skip = next_point(mine, length, args)
            if skip is None and time.time() > args.deadline:
                skip = {"length": length, "status": "skipped: time budget"}
            if skip is not None:
                if skip and not mine[-1]["status"].startswith("skipped"):
                    mine.append(skip)
                continue
            point = run_point(cfg, length, folder, env, args)
            mine.append(point)
            log(
                f"  {cfg.label:<24} {length:>5}: {point['status']:<14} peak {point['peak_mb']:7.0f} MB,"
                f" {point['wall_s']:5.0f} s, {point['cpu_s']:5.0f} CPU s (load {os.getloadavg()[0]:.1f}, MemAvailable {mem_available_mb():.0f} MB)"
            )
            args.save()


# --- report --------------------------------------------------------------------------------------------


def longest_fit(points: list) -> int | None:
    ok = [p["length"] for p in points if fits(p)]
    return max(ok) if ok else None


def complete(points: list, lengths) -> bool:
    """The sweep of a configuration found its limit: a point that does not fit, or fit at every length."""
    return bool(points) and (
        points[-1]["status"] in ("over ceiling", "out of memory")
        or points[-1]["status"].startswith("killed")
        or longest_fit(points) == max(lengths)
    )


def predicted(points: list, lengths, ceiling_mb: float) -> dict:
    """For a configuration whose sweep stopped before its limit (time, not memory): the peak at each longer
    length extrapolated linearly from its last two fitting points, {length: MB}. Empty otherwise."""
    ok = [q for q in points if fits(q)]
    if len(ok) < 2 or complete(points, lengths):
        return {}
    (l1, m1), (l2, m2) = [(q["length"], q["peak_mb"]) for q in ok[-2:]]
    slope = (m2 - m1) / (l2 - l1)
    return {L: m2 + slope * (L - l2) for L in lengths if L > l2}


def predicted_fit(points: list, lengths, ceiling_mb: float) -> int | None:
    pred = predicted(points, lengths, ceiling_mb)
    fit = [L for L, mb in pred.items() if mb <= ceiling_mb]
    return max(fit) if fit else None


def report(results: dict) -> str:
    lengths = results["lengths"]
    rows = results["points"]
    ceiling_mb = results["ceiling_gb"] * 1024
    top = max(lengths)
    out = []
    p = out.append
    p("memory ceiling on CPU: peak RSS of one DPO training step (batch 1 pair) against sequence length L")
    p(f"model: {results['model']}")
    p(
        "data: one pair, chosen and rejected rows each prompt + response = L tokens (a quarter prompt), max_length L;"
        " float32, AdamW, reference copy; torch threads: see the runs (memory does not depend on them)"
    )
    p(
        f"ceiling {results['ceiling_gb']:g} GB (the machine: {results['mem_total_gb']:.1f} GB); a point above it is"
        " killed and ends its configuration's sweep"
    )
    p("")
    head = f"{'configuration':<24}" + "".join(f"{L:>9}" for L in lengths) + f"{'longest fit':>14}"
    p(head)
    p(f"{'':<24}" + "".join(f"{'MB':>9}" for _ in lengths) + f"{'(predicted)':>14}")
    p("-" * len(head))
    notes = []
    for label, points in rows.items():
        by_len = {q["length"]: q for q in points}
        pred = predicted(points, lengths, ceiling_mb)
        cells = []
        for L in lengths:
            q = by_len.get(L)
            if q is not None and fits(q):
                cells.append(f"{q['peak_mb']:>9.0f}")
            elif q is not None and q["status"] == "over ceiling":
                cells.append(f"{'>ceil':>9}")
            elif L in pred:
                cells.append(f"{'~' + format(pred[L], '.0f'):>9}")
            elif q is None:
                cells.append(f"{'':>9}")
            else:
                cells.append(f"{'fail':>9}")
            if q is not None and not fits(q) and q["status"] != "over ceiling":
                notes.append(f"{label} at {L}: {q['status']}")
        fit = longest_fit(points)
        cell = str(fit) if fit else "none"
        if not points:
            cell = "not run"
        elif not complete(points, lengths):
            pf = predicted_fit(points, lengths, ceiling_mb)
            cell = f"{cell} (~{pf})" if pf and pf != fit else f"{cell} (cut)"
        p(f"{label:<24}" + "".join(cells) + f"{cell:>14}")
    p("")
    p(
        "CPU seconds per point (process start to exit, all threads; ?: not recorded by the script's first version;"
    )
    p("wall seconds on a shared machine say little):")
    for label, points in rows.items():
        times = ", ".join(
            f"{q['length']}: {q['cpu_s']:.0f}" if "cpu_s" in q else f"{q['length']}: ?"
            for q in points
            if "wall_s" in q
        )
        if times:
            p(f"  {label:<24} {times}")
    for note in notes:
        p(f"  note: {note}")
    p("")
    p(
        "cells: peak RSS (VmHWM of the fresh process: weights, reference, AdamW state and the step's activations)"
        " in MB; >ceil: killed above the ceiling; ~N: not run (the sweep was cut by time, see the notes),"
        " predicted by a straight line through the configuration's last two measured points. longest fit: the"
        " longest measured L under the ceiling (the top of the sweep: the real limit is higher); (~L): the"
        " longest L whose predicted peak is under the ceiling; (cut): none predicted further."
    )
    p("")
    p("targets (on measured points only):")

    def fit_of(label):
        return longest_fit(rows[label]) if label in rows else None

    def verdict(met: bool | None) -> str:
        return "not determined: sweep cut by time" if met is None else ("met" if met else "NOT met")

    def ratio_target(a: str, b: str):
        fa, fb = fit_of(a), fit_of(b)
        if fa is None or b not in rows:
            return None
        if fb is None:
            return (f"tether fits >= 4x TRL's length ({a}: {fa}; {b}: none of the lengths)", verdict(True))
        r = fa / fb
        open_ended = fa == top or not complete(rows[a], lengths)
        bound = " (a lower bound: tether's sweep did not reach its limit)" if open_ended and r < 4 else ""
        if not complete(rows[b], lengths):
            bound += f" ({b}'s sweep did not reach its limit either)"
        undetermined = r < 4 and open_ended and not complete(rows[b], lengths)
        text = f"tether fits >= 4x TRL's length ({a}: {fa} / {b}: {fb} = x{r:g}{bound})"
        if fa == fb == top:
            return (text, "not determined: both fit every length of the sweep")
        return (text, verdict(None if undetermined else r >= 4))

    targets = [ratio_target("tether dpo", "trl dpo"), ratio_target("tether dpo +gc", "trl dpo +gc")]
    measured_t = [(fit_of(k) or 0, k) for k in rows if k.startswith("tether")]
    measured_r = [(fit_of(k) or 0, k) for k in rows if k.startswith("trl")]
    if measured_t and measured_r and min(fit for fit, _ in measured_t + measured_r) < top:
        best_t, best_r = max(measured_t)[1], max(measured_r)[1]
        if (best_t, best_r) not in (("tether dpo", "trl dpo"), ("tether dpo +gc", "trl dpo +gc")):
            targets.append(ratio_target(best_t, best_r))
    for suffix in ("", " +gc"):
        a, b = f"tether tdpo2{suffix}", f"tether dpo{suffix}"
        if a in rows and b in rows:
            fa, fb = fit_of(a), fit_of(b)
            met = (fa or 0) >= (fb or 0)
            if not met and not complete(rows[a], lengths):
                met = None  # its sweep was cut by time before the length tether dpo reached
            targets.append((f"TDPO2 fits the same length as tether DPO ({a}: {fa}; {b}: {fb})", verdict(met)))
    for t in targets:
        if t is not None:
            p(f"  [{t[1]}] {t[0]}")
    return "\n".join(out)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in results["points"].items():
        ok = [q for q in points if fits(q)]
        if not ok:
            continue
        style = "--" if "+gc" in label else "-"
        line = ax.plot(
            [q["length"] for q in ok], [q["peak_mb"] / 1024 for q in ok], style, marker="o", label=label
        )
        pred = predicted(points, results["lengths"], results["ceiling_gb"] * 1024)
        if pred:
            xs = [ok[-1]["length"], *pred]
            ys = [ok[-1]["peak_mb"] / 1024, *(mb / 1024 for mb in pred.values())]
            ax.plot(xs, ys, ":", marker="o", markerfacecolor="none", color=line[0].get_color())
        over = [q for q in points if q["status"] == "over ceiling"]
        if over:
            ax.plot(
                [q["length"] for q in over],
                [results["ceiling_gb"]] * len(over),
                marker="x",
                markersize=10,
                linestyle="",
                color=line[0].get_color(),
            )
    ax.axhline(results["ceiling_gb"], color="grey", linewidth=1)
    ax.text(
        results["lengths"][0],
        results["ceiling_gb"] * 1.02,
        f"ceiling {results['ceiling_gb']:g} GB (x: killed above it; dotted: predicted, not run)",
    )
    ax.set_xscale("log", base=2)
    ax.set_xticks(results["lengths"], [str(L) for L in results["lengths"]])
    ax.set_xlabel("tokens per row (prompt + response), L")
    ax.set_ylabel("peak RSS of one training step, GB")
    ax.set_title(f"peak memory against sequence length: {results['model_short']}, float32, CPU, 1 pair")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ------------------------------------------------------------------------------------------------


def machine() -> str:
    """The machine a sweep runs on, recorded with each run (a --report-only rewrite may run elsewhere)."""
    return f"{os.cpu_count()} CPUs (nproc), {vs_trl.cpu_model()}, {platform.machine()}, {platform.system()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--lengths", type=int, nargs="*", default=None, help="tokens per row (default 512 ... 8192)"
    )
    parser.add_argument("--only", nargs="*", default=None, help="these configurations (labels as printed)")
    parser.add_argument("--ceiling-gb", type=float, default=20.0, help="kill a point above this RSS")
    parser.add_argument(
        "--min-free-gb", type=float, default=1.0, help="abort a point if MemAvailable falls under"
    )
    parser.add_argument(
        "--max-point-cpu-s",
        type=float,
        default=600.0,
        help="no longer length after a point using this much CPU",
    )
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="kill a point after this long")
    parser.add_argument(
        "--budget-min", type=float, default=None, help="start no point after this many minutes"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker (default torch's; memory: no effect)",
    )
    parser.add_argument(
        "--vocab",
        type=int,
        default=vs_trl.DEFAULT.vocab,
        help="the model's vocabulary (default 32000; e.g. 128256, Llama 3's): its own JSON, plot and section",
    )
    parser.add_argument(
        "--json", default=None, help="results file (default figures/memory_ceiling[_vocabN].json)"
    )
    parser.add_argument(
        "--plot", default=None, help="figure file (default figures/memory_ceiling[_vocabN].png)"
    )
    parser.add_argument("--resume", action="store_true", help="keep the points already in --json")
    parser.add_argument("--report-only", action="store_true", help="no runs: report from --json")
    parser.add_argument("--write-results", action="store_true", help="rewrite its section of RESULTS.md")
    parser.add_argument("--results-file", default=str(HERE / "RESULTS.md"), help=argparse.SUPPRESS)
    parser.add_argument("--small", action="store_true", help="toy model and lengths (tests)")
    parser.add_argument("--build-assets", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    base = SMALL if args.small else replace(vs_trl.DEFAULT, vocab=args.vocab)
    stem = "memory_ceiling" if args.vocab == vs_trl.DEFAULT.vocab else f"memory_ceiling_vocab{args.vocab}"
    args.json = args.json or str(HERE / "figures" / f"{stem}.json")
    args.plot = args.plot or str(HERE / "figures" / f"{stem}.png")
    section = "memory_ceiling" if args.vocab == vs_trl.DEFAULT.vocab else f"memory_ceiling:vocab{args.vocab}"
    if args.build_assets:
        cfg = replace(base, max_length=args.max_length, warmup=1, timed=0, pairs_per_step=1)
        vs_trl.build_assets(cfg, Path(args.build_assets))
        return 0

    json_path = Path(args.json)
    bench = base
    lengths = tuple(args.lengths or (SMALL_LENGTHS if args.small else LENGTHS))
    configs = [c for c in CONFIGS if args.only is None or c.label in args.only]
    if args.only is not None and len(configs) != len(args.only):
        parser.error(f"unknown label among {args.only}; labels: {[c.label for c in CONFIGS]}")
    if args.report_only or args.resume:
        results = json.loads(json_path.read_text())
    else:
        results = {"points": {}}
    if not args.report_only:
        bench = replace(bench, max_length=max(lengths))
        results.update(
            model=bench.describe(),
            model_short=f"{bench.name} {bench.n_params() / 1e6:.1f}M",
            lengths=sorted(set(results.get("lengths", [])) | set(lengths)) if args.resume else list(lengths),
            ceiling_gb=args.ceiling_gb,
            mem_total_gb=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            threads=args.threads,
        )
        json_path.parent.mkdir(parents=True, exist_ok=True)

        def save() -> None:
            json_path.write_text(json.dumps(results, indent=1))

        args.save = save
        args.deadline = time.time() + 60 * args.budget_min if args.budget_min else float("inf")
        env = vs_trl.worker_env(GOMP_SPINCOUNT="1000")
        if args.threads is not None:
            env["OMP_NUM_THREADS"] = str(args.threads)

        def log(msg: str) -> None:
            print(msg, file=sys.stderr, flush=True)

        folder = Path(tempfile.mkdtemp(prefix="tether_memory_ceiling_"))
        load_start = os.getloadavg()
        try:
            # in a subprocess: this process stays small (it is every worker's parent) and imports no torch
            build = [
                sys.executable,
                __file__,
                "--build-assets",
                str(folder),
                "--max-length",
                str(max(lengths)),
                "--vocab",
                str(args.vocab),
            ]
            subprocess.run(build + (["--small"] if args.small else []), env=env, check=True)
            for i, length in enumerate(lengths):
                write_pair(folder / f"pair_{length}.jsonl", length, bench.vocab, seed=i)
            for cfg in configs:  # a resumed run redoes the points that did not reach a verdict
                keep = [
                    q
                    for q in results["points"].get(cfg.label, [])
                    if not q["status"].startswith(("skipped", "aborted", "timeout", "failed"))
                ]
                results["points"][cfg.label] = keep
            sweep(configs, sorted(lengths), folder, env, args, results, log)
            save()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        results.setdefault("runs", []).append(
            {
                "date": datetime.datetime.now().astimezone().strftime("%a %b %d %H:%M:%S %Z %Y"),
                "configurations": [c.label for c in configs],
                "threads": args.threads,
                "machine": machine(),
                "load_start": load_start,
                "load_end": os.getloadavg(),
            }
        )
        results["points"] = {
            c.label: results["points"][c.label] for c in CONFIGS if c.label in results["points"]
        }
        results["parent_peak_mb"] = vs_trl.peak_rss_mb()
        save()
    text = report(results)
    print(text)
    plot(results, Path(args.plot))
    if args.write_results:
        runs = "; ".join(
            f"{r['date']} ({', '.join(r['configurations'])}; torch threads {r.get('threads') or 'default'}; load average 1/5/15 min at the start"
            f" {' '.join(f'{x:.2f}' for x in r['load_start'])}, at the end {' '.join(f'{x:.2f}' for x in r['load_end'])})"
            for r in results.get("runs", [])
        )
        try:
            plot_ref = Path(args.plot).resolve().relative_to(HERE)
        except ValueError:
            plot_ref = Path(args.plot)
        flag = "" if section == "memory_ceiling" else f" --vocab {args.vocab}"
        body = [
            "## Memory ceiling" + ("" if not flag else f": vocabulary {args.vocab}"),
            "",
            f"Written by `benchmarks/memory_ceiling.py{flag} --write-results`; every number in this section is the"
            f" script's output (its points are kept in benchmarks/figures/{Path(args.json).name}). Method: the"
            " script's docstring and benchmarks/README.md.",
            "",
            f"- runs: {runs}",
            f"- machine: {'; '.join(dict.fromkeys(r.get('machine', 'not recorded') for r in results.get('runs', [])))}",
            f"- plot: [{plot_ref}]({plot_ref})",
            "",
            "```",
            text,
            "```",
        ]
        results_md.write_section(Path(args.results_file), section, "\n".join(body))
        print(f"[memory_ceiling] wrote its section of {args.results_file}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
