"""benchmarks/gpu.py has not run on a GPU here: its --dry-run takes the same code path at toy sizes on CPU."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path) -> None:
    """Every speed run and every sweep length completes; tether's and TRL's losses at steps 1-2 agree to 1e-4
    in float32 (the comparison trains the same model on the same pairs), and the table is printed."""
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        start_new_session=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True
    speed = result["speed"]
    labels = [
        "tether dpo",
        "trl dpo",
        "tether dpo cache",
        "trl dpo precompute",
        "tether tdpo2",
        "tether epsilon_dpo",
    ]
    assert list(speed) == labels
    steps = result["config"]["warmup"] + result["config"]["timed"]
    for label, run in speed.items():
        assert len(run["losses"]) == steps and len(run["wall"]) == steps, label
        assert run["tok_s"] > 0 and run["peak_mb"] > 0, label
    assert [c["pair"] for c in result["checks"]] == [
        ["tether dpo", "trl dpo"],
        ["tether dpo cache", "trl dpo precompute"],
    ]
    assert all(c["ok"] and c["loss_rel_diff"] <= 1e-4 for c in result["checks"]), result["checks"]
    assert list(result["sweep"]) == ["tether dpo", "tether tdpo2", "trl dpo"]
    for label, rows in result["sweep"].items():
        assert [r["length"] for r in rows] == [64, 128] and all(r["status"] == "ok" for r in rows), label
    assert "memory ceiling" in proc.stdout and "tether dpo / trl dpo" in proc.stdout


# --- RESULTS.md: each script owns one section -------------------------------------------------------------

sys.path.insert(0, str(ROOT / "benchmarks"))

import memory_ceiling  # noqa: E402  (benchmarks/ is not a package)
import results_md  # noqa: E402
import vs_trl  # noqa: E402

OTHER_SECTIONS = """# tether benchmarks: results

<!-- BEGIN vs_trl:default (written by a script; edits inside are overwritten) -->
old default numbers
<!-- END vs_trl:default -->

## Run-to-run spread
hand-written text

## Sampling speed
sampling numbers
"""


def test_results_section_rewrites_only_its_own_section() -> None:
    """Rewriting one section replaces exactly the lines between its markers; a new section is appended; the
    hand-written sections and the other script's section stay byte for byte."""
    new = results_md.replace_section(OTHER_SECTIONS, "vs_trl:default", "new default numbers")
    assert new == OTHER_SECTIONS.replace("old default numbers", "new default numbers")
    added = results_md.replace_section(new, "memory_ceiling", "## Memory ceiling\ntable")
    assert added.startswith(new.rstrip() + "\n\n<!-- BEGIN memory_ceiling ")
    assert added.endswith("## Memory ceiling\ntable\n<!-- END memory_ceiling -->\n")
    again = results_md.replace_section(added, "memory_ceiling", "## Memory ceiling\ntable 2")
    assert again == added.replace("table\n", "table 2\n")
    broken = OTHER_SECTIONS.replace("<!-- END vs_trl:default -->\n", "")
    with pytest.raises(ValueError, match="broken markers"):
        results_md.replace_section(broken, "vs_trl:default", "x")


def _bench_env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }


@pytest.mark.slow
def test_vs_trl_write_results_keeps_the_other_sections(tmp_path) -> None:
    """`vs_trl.py --write-results` on the tiny config (tied head, grouped-query attention like SmolLM2) writes
    its own section with the run's row, and leaves the others in place (before, it rewrote the whole file)."""
    results = tmp_path / "RESULTS.md"
    results.write_text(OTHER_SECTIONS)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "vs_trl.py"), "--config", "tiny", "--only", "tether dpo"]
    cmd += ["--write-results", "--results-file", str(results)]
    proc = subprocess.run(cmd, env=_bench_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = results.read_text()
    assert text.startswith(OTHER_SECTIONS.rstrip() + "\n\n<!-- BEGIN vs_trl:tiny ")
    section = text[len(OTHER_SECTIONS) :]
    assert "tied lm_head" in section and "(2 key/value heads)" in section
    row = next(line for line in section.splitlines() if line.startswith("tether dpo "))
    assert row.split()[9] == "0.69315"  # loss@1: policy = reference, log 2
    assert "load average (1, 5, 15 min) at the start" in section


def test_smol_config_counts_and_tiny_build(tmp_path) -> None:
    """SMOL has SmolLM2-135M's parameter count: embedding 49152*576 = 28,311,552 (tied: once) + 30 layers *
    (q, o 576*576; k, v 576*192; gate, up, down 576*1536; two norms 576) = 30 * 3,540,096 + final norm 576 =
    134,515,008; N_matmul counts the tied head as a matmul: 30 * 3,538,944 + 28,311,552 = 134,479,872.
    build_assets checks its counting against the built model (tied head and grouped-query attention)."""
    assert vs_trl.SMOL.n_params() == 134_515_008
    assert vs_trl.SMOL.n_matmul() == 134_479_872
    counts = vs_trl.build_assets(vs_trl.TINY, tmp_path)
    assert len(counts["real_tokens"]) == vs_trl.TINY.steps
    assert vs_trl.real_weights(vs_trl.SMOL.__class__(weights=str(tmp_path / "none"))) is None
    (tmp_path / "model").mkdir(exist_ok=True)
    real = vs_trl.SMOL.__class__(weights=str(tmp_path / "model"))
    assert vs_trl.real_weights(real) == str(tmp_path / "model")  # config.json + model.safetensors saved there


# --- memory_ceiling.py ------------------------------------------------------------------------------------


def test_watch_kills_a_child_above_the_ceiling() -> None:
    """A child that allocates 20 MB every 10 ms is killed once its RSS passes a 150 MB ceiling: its peak stays
    near the ceiling (far below the 1.2 GB it would reach), and the point is 'over ceiling'. A child of 30 MB
    reports its own peak, not this (large) test process's: ru_maxrss would start at the parent's."""
    grow = "import time\nx = []\nfor i in range(60):\n    x.append(bytearray(20 * 2**20)); time.sleep(0.01)"
    point = memory_ceiling.watch([sys.executable, "-c", grow], {}, 150, 100, 60)
    assert point["status"] == "over ceiling"
    assert 150 < point["peak_mb"] < 400
    small = memory_ceiling.watch(
        [sys.executable, "-c", "import time; x = bytearray(30 * 2**20); time.sleep(0.5)"], {}, 150, 100, 60
    )
    assert small["status"] == "ok" and 30 < small["peak_mb"] < 150


def test_sweep_order_and_stops(monkeypatch) -> None:
    """Breadth-first: every configuration at 512, then those still going at 1024, ...; a configuration stops
    after its first point above the ceiling, and before a length whose predecessor used > max_point_cpu_s CPU
    seconds (wall seconds do not count)."""
    ran = []
    over = {("trl dpo", 1024)}
    slow = {("tether tdpo2", 1024)}

    def fake(cfg, length, folder, env, args):
        ran.append((cfg.label, length))
        status = "over ceiling" if (cfg.label, length) in over else "ok"
        return {
            "length": length,
            "status": status,
            "peak_mb": length,
            "wall_s": 1000,
            "cpu_s": 700 if (cfg.label, length) in slow else 1,
        }

    monkeypatch.setattr(memory_ceiling, "run_point", fake)
    configs = [c for c in memory_ceiling.CONFIGS if c.label in ("tether dpo", "trl dpo", "tether tdpo2")]
    args = argparse.Namespace(max_point_cpu_s=600, deadline=float("inf"), save=lambda: None)
    results = {"points": {}}
    memory_ceiling.sweep(configs, (512, 1024, 2048), None, {}, args, results, lambda m: None)
    assert ran == [
        ("tether dpo", 512),
        ("trl dpo", 512),
        ("tether tdpo2", 512),
        ("tether dpo", 1024),
        ("trl dpo", 1024),
        ("tether tdpo2", 1024),
        ("tether dpo", 2048),
    ]
    points = results["points"]
    assert points["tether tdpo2"][-1] == {
        "length": 2048,
        "status": "skipped: the 1024 point used 700 CPU s > 600",
    }
    assert [memory_ceiling.longest_fit(points[k]) for k in points] == [2048, 512, 1024]


def test_report_targets() -> None:
    """Longest fits 8192 (tether dpo) against 2048 (TRL): x4, met; TDPO2 fits 4096 < 8192: not met. A sweep
    cut by time after 2048 (peaks 256, 512 MB at 1024, 2048) is extrapolated along that line (0.25 MB per
    token): ~1024 MB at 4096 and ~2048 at 8192, marked as predicted; its target uses measured points only."""

    def pts(fit, top=8192):
        out = [
            {"length": L, "status": "ok", "peak_mb": L / 4, "wall_s": 1}
            for L in (512, 1024, 2048, 4096, 8192)
        ]
        out = [q for q in out if q["length"] <= fit]
        if fit < top:
            out.append({"length": fit * 2, "status": "over ceiling", "peak_mb": 20480, "wall_s": 1})
        return out

    results = {
        "lengths": [512, 1024, 2048, 4096, 8192],
        "points": {
            "tether dpo": pts(8192),
            "trl dpo": pts(2048),
            "tether tdpo2": pts(4096),
            "tether dpo +gc": pts(2048, top=2048) + [{"length": 4096, "status": "skipped: time budget"}],
            "trl dpo +gc": pts(1024),
        },
        "model": "m",
        "threads": 1,
        "ceiling_gb": 20,
        "mem_total_gb": 23,
    }
    text = memory_ceiling.report(results)
    assert "[met] tether fits >= 4x TRL's length (tether dpo: 8192 / trl dpo: 2048 = x4)" in text
    assert "[NOT met] TDPO2 fits the same length as tether DPO (tether tdpo2: 4096; tether dpo: 8192)" in text
    assert "longest fit" in text and ">ceil" in text
    gc_row = next(line for line in text.splitlines() if line.startswith("tether dpo +gc"))
    assert gc_row.split()[3:] == ["128", "256", "512", "~1024", "~2048", "2048", "(~8192)"]
    assert (
        "[NOT met] tether fits >= 4x TRL's length (tether dpo +gc: 2048 / trl dpo +gc: 1024 = x2 (a lower"
        in text
    )
    # Both fit every length: the ratio is not known (x1 is only a lower bound), and no best-vs-best line.
    results["points"]["trl dpo"] = pts(8192)
    text = memory_ceiling.report(results)
    assert (
        "[not determined: both fit every length of the sweep] tether fits >= 4x TRL's length (tether dpo: 8192"
        " / trl dpo: 8192 = x1" in text
    )


@pytest.mark.slow
def test_memory_ceiling_small_run(tmp_path) -> None:
    """One real point end to end (toy model, 64 tokens per row, a fresh worker): it fits, its peak RSS is the
    worker's (hundreds of MB: torch and the model), the script's section is written and the plot saved."""
    results = tmp_path / "RESULTS.md"
    results.write_text(OTHER_SECTIONS)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "memory_ceiling.py"), "--small", "--lengths", "64"]
    cmd += ["--only", "tether tdpo2", "--json", str(tmp_path / "m.json"), "--plot", str(tmp_path / "m.png")]
    cmd += ["--write-results", "--results-file", str(results), "--threads", "1"]
    proc = subprocess.run(cmd, env=_bench_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    point = json.loads((tmp_path / "m.json").read_text())["points"]["tether tdpo2"][0]
    assert point["status"] == "ok" and 100 < point["peak_mb"] < 3000
    assert point["step_peak_mb"] <= point["peak_mb"]
    assert (tmp_path / "m.png").stat().st_size > 1000
    text = results.read_text()
    assert text.startswith(OTHER_SECTIONS.rstrip() + "\n\n<!-- BEGIN memory_ceiling ")


def test_repeats_report_medians_and_spread() -> None:
    """--repeats: each number of the table is the median over the runs, and the spread block lists the
    median [min-max] per configuration and each run's own tether/TRL ratio (taken within the run, not as a
    ratio of medians)."""

    def summary(tok_s: float, mfu: float) -> dict:
        return {
            "tok_s": tok_s,
            "mfu": mfu,
            "cpu_step_s": 1.0,
            "peak_gflops": 100.0,
            "step_s": 10.0 / tok_s,
            "losses": [0.69, 0.68],
        }

    runs = [
        {"tether dpo": summary(300.0, 0.50), "trl dpo": summary(100.0, 0.20)},
        {"tether dpo": summary(200.0, 0.70), "trl dpo": summary(100.0, 0.20)},
        {"tether dpo": summary(250.0, 0.65), "trl dpo": summary(50.0, 0.10)},
    ]
    med = vs_trl.median_summary([r["tether dpo"] for r in runs])
    assert med["tok_s"] == 250.0 and med["mfu"] == 0.65 and med["losses"] == [0.69, 0.68]
    lines = vs_trl.spread_lines(runs)
    assert lines[0].startswith("spread over 3 runs")
    assert "tok/s 250.0 [200.0-300.0]" in lines[1] and "MFU 65 [50-70]%" in lines[1]
    # within-run ratios 3.0, 2.0, 5.0: median 3.0 (the ratio of the medians would be 250/100 = 2.5)
    assert lines[3] == "  tether dpo / trl dpo: tok/s x3.00 (per run: x3.00, x2.00, x5.00)"


# --- row_groups.py ----------------------------------------------------------------------------------------


def test_row_groups_benchmark_tiny(tmp_path, capsys) -> None:
    """Both settings run on the same micro-batches; merging never adds forwards and never computes fewer
    tokens than the real ones, and one forward per distinct length computes exactly the real tokens."""
    import row_groups

    assert row_groups.main(["--config", "tiny", "--repeats", "1", "--steps", "3", "--merge", "0", "64"]) == 0
    rows = {
        line.split()[0]: line.split()
        for line in capsys.readouterr().out.splitlines()
        if line.strip().split(" ")[0] in ("0", "64")
    }
    assert set(rows) == {"0", "64"}
    forwards = {k: int(v[-2]) for k, v in rows.items()}
    tokens = {k: float(v[-1]) for k, v in rows.items()}
    assert forwards["64"] <= forwards["0"] and tokens["0"] == 1.0 and tokens["64"] >= 1.0
