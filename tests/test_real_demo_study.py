"""The verdicts of experiments/real_demo_seeds.py computed from hand-made per-seed numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
study = pytest.importorskip("real_demo_seeds")


def _row(pass1: float, pass8: float, entropy: float, unique: float, kl: float) -> dict:
    return {
        "pass@k": {"1": pass1, "8": pass8},
        "entropy": entropy,
        "unique_answers": unique,
        "kl_forward": kl,
    }


def _results(rows_per_seed: list[dict[str, tuple]]) -> dict:
    return {
        "seeds": list(range(len(rows_per_seed))),
        "per_seed": {
            str(s): {"eval": {m: _row(*v) for m, v in rows.items()}} for s, rows in enumerate(rows_per_seed)
        },
    }


def test_claims_follow_the_per_seed_differences():
    """Three seeds: alpha 0.8 sharper than DPO by 0.02-0.04 nats in every seed (held); its pass@1 below DPO's
    in two seeds (not held: the mean difference is negative); TDPO2's KL ~half DPO's in every seed with pass@1
    equal (held); epsilon-DPO 0.05 below DPO in every seed (not held)."""
    seeds = []
    for j in range(3):
        seeds.append(
            {
                "reference": (0.10, 0.5, 1.5, 8.0, 0.0),
                "dpo": (0.70 + 0.01 * j, 1.0, 0.20, 4.0, 4.0 + j),
                "hdpo_a0.8": (0.66 + 0.03 * j, 1.0, 0.17 - 0.01 * j, 4.0, 4.5),
                "hdpo_a1.2": (0.50, 1.0, 0.50 + 0.1 * j, 6.0, 2.5),
                "epsilon_dpo": (0.65 + 0.01 * j, 1.0, 0.20, 4.0, 4.0),
                "tdpo2": (0.70 + 0.01 * j, 1.0, 0.30, 5.0, 2.0 + 0.5 * j),
            }
        )
    claims = study.claims(_results(seeds))
    verdicts = [c["verdict"] for c in claims]
    assert len(claims) == 7
    assert verdicts == ["held", "held", "not held", "held", "held", "held", "not held"]
    # The H-DPO entropy claim's d: DPO minus alpha 0.8, per seed.
    assert claims[1]["diffs"] == pytest.approx([0.03, 0.04, 0.05])
    # TDPO2's KL test is on ln(KL(DPO) / KL(TDPO2)).
    import math

    assert claims[5]["subclaims"]["ln KL ratio"]["diffs"] == pytest.approx(
        [math.log(4 / 2), math.log(5 / 2.5), math.log(6 / 3)]
    )


def test_a_claim_with_mixed_seeds_is_unclear():
    """alpha 0.8's entropy below DPO's on average but above it in one seed: the interval reaches the threshold."""
    base = {
        "reference": (0.1, 0.5, 1.5, 8.0, 0.0),
        "hdpo_a1.2": (0.5, 1.0, 0.5, 6.0, 2.5),
        "epsilon_dpo": (0.7, 1.0, 0.2, 4.0, 4.0),
        "tdpo2": (0.7, 1.0, 0.3, 5.0, 2.0),
    }
    seeds = [
        base | {"dpo": (0.7, 1.0, 0.20, 4.0, 4.0), "hdpo_a0.8": (0.7, 1.0, h, 4.0, 4.0)}
        for h in (0.10, 0.12, 0.21)
    ]
    assert study.claims(_results(seeds))[1]["verdict"] == "unclear"
