"""The verdicts and report sections of experiments/real_alpha_sweep.py and real_tdpo.py, from hand-made numbers."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
sweep = pytest.importorskip("real_alpha_sweep")
tdpo = pytest.importorskip("real_tdpo")
eps = pytest.importorskip("real_epsilon_beta")
report = pytest.importorskip("make_report")

KS = (1, 2, 4, 8, 16, 32, 64)


def _row(pass1: float, entropy: float, unique: float, kl: float = 1.0, pass64: float = 1.0) -> dict:
    """An eval row; pass@k rises from pass@1 to pass@64 linearly in log k."""
    curve = {str(k): pass1 + (pass64 - pass1) * math.log(k) / math.log(64) for k in KS}
    return {"pass@k": curve, "entropy": entropy, "unique_answers": unique, "kl_forward": kl}


def _sweep_results(per_seed_rows: list[dict[str, dict]], dpo_temps: list[dict[str, float]]) -> dict:
    per_seed = {}
    for s, (rows, temps) in enumerate(zip(per_seed_rows, dpo_temps)):
        per_seed[str(s)] = {
            "eval": rows,
            "dpo_temperatures": {t: _row(p, 0.1, 2.0) for t, p in temps.items()},
            "mechanism": {
                "ref_gap": [10.0, -20.0, 30.0],
                "dpo_margin": {f"{a:g}": [1.0 + a, 2.0, 3.0] for a in sweep.ALPHAS},
            },
        }
    return {
        "study": sweep.NAME,
        "task": "count",
        "seeds": list(range(len(per_seed_rows))),
        "alphas": list(sweep.ALPHAS),
        "n_samples": 64,
        "dpo_temperatures": list(sweep.DPO_TEMPERATURES),
        "dpo_temperature_samples": 16,
        "beta": 0.2,
        "per_seed": per_seed,
        "wall": {"total_s": 60.0, "stages_s": {"train": 30.0, "eval": 30.0}},
    }


def _sweep_seed(j: int) -> dict[str, dict]:
    """Entropy and unique answers rise with alpha, pass@1 falls; alpha 1.1 loses a prompt at k = 64."""
    return {
        "reference": _row(0.1, 1.5, 9.0, kl=0.0),
        "hdpo_a0.8": _row(0.70 + 0.01 * j, 0.10, 3.0, pass64=0.875),
        "hdpo_a0.9": _row(0.62, 0.15, 3.5),
        "dpo": _row(0.60, 0.20 + 0.01 * j, 4.0),
        "hdpo_a1.1": _row(0.50, 0.30, 5.0, pass64=1.0 - 0.125 * (j == 0)),
    }


def test_alpha_sweep_claims_follow_the_per_seed_numbers():
    """DPO's best temperature: 0.5 in seeds 0 and 1 (0.72, above alpha 0.8's 0.70 / 0.71), T=1 in seed 2 (0.60,
    below alpha 0.8's 0.72): the mean difference 0.03 is above the 0.01 threshold but its interval reaches it,
    so claim 3 is unclear; alpha 0.9 is below DPO's best everywhere (not held); alpha 1.1's pass@64 equals DPO's in two seeds
    and is 1/8 lower in one (not held)."""
    temps = [{"0.25": 0.65, "0.5": 0.72, "0.75": 0.70}, {"0.25": 0.6, "0.5": 0.72, "0.75": 0.7}, {"0.5": 0.5}]
    temps[2] |= {"0.25": 0.4, "0.75": 0.55}
    results = _sweep_results([_sweep_seed(j) for j in range(3)], temps)
    best, where = sweep.dpo_best(results)
    assert best.tolist() == pytest.approx([0.72, 0.72, 0.60])
    assert where == ["0.5", "0.5", "1"]
    claims = sweep.claims(results)
    assert [c["verdict"] for c in claims] == ["held", "held", "unclear", "not held", "held", "not held"]
    # Slope of entropy on alpha, seed 0: least squares through (0.8, 0.1), (0.9, 0.15), (1, 0.2), (1.1, 0.3).
    x, y = np.array([0.8, 0.9, 1.0, 1.1]), np.array([0.10, 0.15, 0.20, 0.30])
    expected = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    assert claims[0]["diffs"][0] == pytest.approx(expected)
    assert claims[2]["diffs"] == pytest.approx([0.70 - 0.72, 0.71 - 0.72, 0.72 - 0.60])
    assert claims[5]["diffs"] == pytest.approx([-0.125, 0.0, 0.0])


def test_alpha_sweep_offsets_scale_with_one_minus_alpha():
    results = _sweep_results([_sweep_seed(0)] * 2, [{"0.25": 0.1, "0.5": 0.1, "0.75": 0.1}] * 2)
    assert sweep.offsets(results, 0.8).tolist() == pytest.approx([0.2 * 0.2 * g for g in (10, 20, 30)] * 2)
    assert sweep.offsets(results, 1.1).tolist() == pytest.approx([0.2 * 0.1 * g for g in (10, 20, 30)] * 2)
    assert sweep.margins(results, 0.9).tolist() == [1.9, 2.0, 3.0] * 2


def _tdpo_results(rows: list[dict[str, dict]], kls: list[dict[str, tuple[float, float]]]) -> dict:
    return {
        "study": tdpo.NAME,
        "task": "count",
        "seeds": list(range(len(rows))),
        "methods": list(tdpo.METHODS),
        "per_seed": {
            str(s): {
                "eval": r,
                "reference_here": r["reference"],
                "pair_kl": {m: {"chosen": [ch, ch], "rejected": [rej, rej]} for m, (ch, rej) in kl.items()},
            }
            for s, (r, kl) in enumerate(zip(rows, kls))
        },
        "wall": {"total_s": 60.0, "stages_s": {"train": 60.0}},
    }


def test_tdpo_claims_follow_the_per_seed_numbers():
    """TDPO1: half DPO's KL on its own samples, pass@1 0.01 lower (within the tolerance): held. TDPO2: its
    rejected-side KL 40% of DPO's, its sides balanced where DPO's are 4:1: held. TDPO1's rejected KL equals
    DPO's: not held."""
    rows, kls = [], []
    for j in range(3):
        rows.append(
            {
                "reference": _row(0.1, 1.5, 9.0, kl=0.0),
                "dpo": _row(0.60 + 0.01 * j, 0.3, 4.0, kl=4.0 + j),
                "tdpo1": _row(0.59 + 0.01 * j, 0.4, 4.0, kl=2.0 + 0.5 * j),
                "tdpo2": _row(0.55, 0.4, 4.0, kl=3.0),
            }
        )
        kls.append({"dpo": (5.0, 20.0 + j), "tdpo1": (5.0, 20.0 + j), "tdpo2": (8.0, 0.4 * (20.0 + j))})
    claims = tdpo.claims(_tdpo_results(rows, kls))
    assert [c["verdict"] for c in claims] == ["held", "held", "held", "not held"]
    assert claims[0]["subclaims"]["ln KL ratio"]["diffs"] == pytest.approx([math.log(2)] * 3)
    assert claims[1]["diffs"] == pytest.approx([-math.log(0.4)] * 3)
    # Balance: ln(20/5) for DPO against ln(8/8) = 0 for TDPO2 in seed 0.
    assert claims[2]["diffs"][0] == pytest.approx(math.log(20 / 5) - math.log(8 / 8))
    assert claims[3]["diffs"] == pytest.approx([0.0] * 3)


def test_report_sections_render_from_the_results(tmp_path, monkeypatch):
    """The REPORT.md sections are built from the JSON alone (a formatting error shows here, not after a run)."""
    monkeypatch.setattr(sys.modules["common"], "RESULTS", tmp_path)  # no other study's results
    temps = [{"0.25": 0.65, "0.5": 0.72, "0.75": 0.70}] * 3
    lines = report.section_real_alpha_sweep(_sweep_results([_sweep_seed(j) for j in range(3)], temps))
    text = "\n".join(lines)
    assert "| alpha 0.9 |" in text and "pass@64" in text
    assert "| 0 | 0.650 | 0.720 | 0.700 | 0.600 | 0.5 | 0.700 |" in text
    rows = [{"reference": _row(0.1, 1.5, 9.0, kl=0.0), **{m: _row(0.5, 0.3, 4.0) for m in tdpo.METHODS}}] * 2
    kls = [{m: (5.0, 20.0) for m in tdpo.METHODS}] * 2
    text = "\n".join(report.section_real_tdpo(_tdpo_results(rows, kls)))
    assert "equal study 7's" in text and "| tdpo1 |" in text


def test_plots_draw_from_the_results(tmp_path, monkeypatch):
    common = sys.modules["common"]
    monkeypatch.setattr(common, "ROOT", tmp_path)
    monkeypatch.setattr(common, "FIGURES", tmp_path)
    temps = [{"0.25": 0.65, "0.5": 0.72, "0.75": 0.70}] * 3
    assert sweep.plot(_sweep_results([_sweep_seed(j) for j in range(3)], temps)) == [f"{sweep.NAME}.png"]
    rows = [{"reference": _row(0.1, 1.5, 9.0, kl=0.0), **{m: _row(0.5, 0.3, 4.0) for m in tdpo.METHODS}}] * 2
    assert tdpo.plot(_tdpo_results(rows, [{m: (5.0, 20.0) for m in tdpo.METHODS}] * 2)) == [
        f"{tdpo.NAME}.png"
    ]
    assert (tmp_path / f"{sweep.NAME}.png").stat().st_size > 10_000


def _eps_results(pass1: dict[str, list[list[float]]]) -> dict:
    """pass1: method -> per seed, pass@1 at each beta of eps.BETAS."""
    seeds = range(len(pass1["dpo"]))
    lever = {"beta/relaxed_frac": [0.0, 1.0], "beta/tightened_frac": [0.0, 0.0], "beta/base": [0.2, 0.19]}
    per_seed = {}
    for s in seeds:
        rows = {"reference": _row(0.1, 1.5, 9.0, kl=0.0)}
        for method, values in pass1.items():
            rows |= {eps.run_name(method, b): _row(p, 0.3, 4.0) for b, p in zip(eps.BETAS, values[s])}
        per_seed[str(s)] = {
            "eval": rows,
            "reference_here": rows["reference"],
            "lever": {f"{b:g}": lever for b in eps.BETAS},
        }
    return {
        "study": eps.NAME,
        "task": "count",
        "seeds": list(seeds),
        "betas": list(eps.BETAS),
        "methods": list(eps.METHODS),
        "per_seed": per_seed,
        "wall": {"total_s": 60.0, "stages_s": {"train": 60.0}},
    }


def test_epsilon_beta_claims_and_section():
    """DPO: 0.4 / 0.6 / 0.3 over beta (best 0.6, range 0.3); epsilon-DPO: 0.5 / 0.55 / 0.5 (best 0.55, range
    0.05): its best is lower (not held), its range smaller by 0.25 in every seed (held)."""
    results = _eps_results({"dpo": [[0.4, 0.6, 0.3]] * 3, "epsilon_dpo": [[0.5, 0.55, 0.5]] * 3})
    assert eps.run_name("dpo", 0.2) == "dpo" and eps.run_name("epsilon_dpo", 0.4) == "epsilon_dpo_b0.4"
    claims = eps.claims(results)
    assert [c["verdict"] for c in claims] == ["not held", "held"]
    assert claims[0]["diffs"] == pytest.approx([-0.05] * 3)
    assert claims[1]["diffs"] == pytest.approx([0.25] * 3)
    text = "\n".join(report.section_real_epsilon_beta(results))
    assert "| 0.4 | 0.50 ± 0.00 | 0.00 ± 0.00 | 0.190 ± 0.000 |" in text
    assert "| dpo | 0.400 ± 0.000 | 0.600 ± 0.000 | 0.300 ± 0.000 | 0.600 ± 0.000 |" in text


def test_epsilon_beta_settings_replace_only_beta():
    from tether.demo import PRETRAINED, pretrained_settings

    settings = eps._settings(0.4)
    assert settings[-1] == "objective.beta=0.4"
    assert [s for s in settings if s.startswith("objective.beta=")] == ["objective.beta=0.4"]
    assert len(settings) == len(pretrained_settings(PRETRAINED))


def test_alpha_curve_gap_interpolates_the_h_dpo_points(tmp_path, monkeypatch):
    """H-DPO points (KL, pass@1): alpha 1.2 (2, 0.3), 1.1 (4, 0.4), 1.0 (6, 0.5), 0.9 (8, 0.6), 0.8 (10, 0.7).
    TDPO2 at KL 5 with pass@1 0.6 lies 0.15 above the curve's 0.45 there; TDPO1 at KL 12 is outside it."""
    common = sys.modules["common"]
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    kl = {0.8: 10.0, 0.9: 8.0, 1.0: 6.0, 1.1: 4.0}
    sweep_rows = {sweep.model_name(a): _row(0.5 + (1.0 - a), 0.3, 4.0, kl=k) for a, k in kl.items()}
    common.write_json(
        tmp_path / "real_alpha_sweep.json", {"alphas": list(kl), "per_seed": {"0": {"eval": sweep_rows}}}
    )
    common.write_json(
        tmp_path / "real_demo_seeds.json",
        {"per_seed": {"0": {"eval": {"hdpo_a1.2": _row(0.3, 0.5, 6.0, kl=2.0)}}}},
    )
    rows = {
        "dpo": _row(0.5, 0.3, 4.0, kl=6.0),
        "tdpo1": _row(0.7, 0.3, 4.0, kl=12.0),
        "tdpo2": _row(0.6, 0.3, 4.0, kl=5.0),
    }
    results = {"seeds": [0], "per_seed": {"0": {"eval": rows}}}
    assert report.alpha_curve_gap(results, "tdpo2") == pytest.approx([0.15])
    assert report.alpha_curve_gap(results, "dpo") == pytest.approx([0.0])
    assert report.alpha_curve_gap(results, "tdpo1") == [None]
    text = "\n".join(report.frontier_lines({**results, "per_seed": {"0": {"eval": rows}}}))
    assert "tdpo2 +0.150" in text and "tdpo1 outside" in text
