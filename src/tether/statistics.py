"""From per-token statistics to the per-pair `PairStats` an objective reads.

The concatenated batch has 2B sequences: rows 0..B-1 chosen, B..2B-1 rejected (see `tether.batch`).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from tether.heads import StatRequest, TokenStats, sequence_sums
from tether.objectives import Objective, PairStats


def stat_request(objective: Objective, entropy: bool = False) -> StatRequest:
    """The token statistics `objective` asks for (`Objective.stat_request`), plus the entropy metric if asked."""
    request = objective.stat_request()
    return replace(request, entropy=True) if entropy else request


def pair_stats(
    tokens: TokenStats, mask: torch.Tensor, ref_sequence_logps: torch.Tensor | None = None
) -> PairStats:
    """Sum token statistics per sequence and split them into chosen / rejected halves.

    tokens: statistics of the N response tokens selected by mask (2B, T-1) (see `heads.response_positions`).
    ref_sequence_logps: (2B,) reference sequence log-probs from elsewhere (e.g. a cache); otherwise they
    come from tokens.ref_logps.
    """
    if mask.shape[0] % 2:
        raise ValueError(f"a concatenated preference batch has an even number of rows, got {mask.shape[0]}")
    b = mask.shape[0] // 2

    def split(values: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if values is None:
            return None, None
        seq = sequence_sums(values, mask)
        return seq[:b], seq[b:]

    if ref_sequence_logps is not None:
        ref = ref_sequence_logps.to(tokens.logps.dtype)
        ref_c, ref_r = ref[:b], ref[b:]
    elif tokens.ref_logps is not None:
        ref_c, ref_r = split(tokens.ref_logps)
    else:
        raise ValueError(
            "reference log-probs are missing: pass ref_sequence_logps or compute tokens.ref_logps"
        )
    pol_c, pol_r = split(tokens.logps)
    lengths = mask.sum(1).to(tokens.logps.dtype)
    kl_c, kl_r = split(tokens.kl)
    rel_c, rel_r = split(tokens.relaxed_logps)
    tig_c, tig_r = split(tokens.tightened_logps)
    ent_c, ent_r = split(tokens.entropy)
    return PairStats(
        policy_chosen_logps=pol_c,
        policy_rejected_logps=pol_r,
        ref_chosen_logps=ref_c.detach(),
        ref_rejected_logps=ref_r.detach(),
        chosen_lengths=lengths[:b],
        rejected_lengths=lengths[b:],
        kl_chosen=kl_c,
        kl_rejected=kl_r,
        relaxed_chosen_logps=rel_c,
        relaxed_rejected_logps=rel_r,
        tightened_chosen_logps=tig_c,
        tightened_rejected_logps=tig_r,
        entropy_chosen=ent_c,
        entropy_rejected=ent_r,
    )
