"""benchmarks/gpu.py has not run on a GPU here: its --dry-run takes the same code path at toy sizes on CPU."""

from __future__ import annotations

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
