"""Per-token statistics of a policy (and its reference) on given responses, without (B, T, V) tensors.

For a sequence x + y with response tokens y_1..y_L (position t predicted from x, y_<t):
- entropy:     H_t = -sum_v pi(v | x, y_<t) log pi(v | x, y_<t); reported summed per sequence and as the
               token mean sum_seq sum_t H_t / sum_seq L (`mean_token_entropy`).
- log-prob:    sum_t log pi(y_t | x, y_<t).
- sequential KL, forward (TDPO's D(x, y; pi_ref || pi), Zeng et al. 2024 eq. 4):
               sum_t KL(pi_ref(. | x, y_<t) || pi(. | x, y_<t))
- sequential KL, reverse: sum_t KL(pi(. | x, y_<t) || pi_ref(. | x, y_<t)).
Every distribution comes from `log_softmax` of fp32 logits (never softmax().log()); p log p is taken as 0
where p underflows to 0, so masked (-inf) logits give finite results, not NaN.

Memory: sequences go through the model `seq_chunk` at a time, and only response positions of the final
hidden states go through the output head, `token_chunk` at a time, under no_grad: the largest vocabulary
tensor held is (token_chunk, V) per model. Models whose logits are not `output_embeddings(hidden)` (up to
the head transform of `tether.causal_lm.head_transform`: a logit scale, soft-capping) are detected on the first chunk with `logits_to_keep=1` and fall back to
full logits per sequence chunk, (seq_chunk, T, V).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.causal_lm import head_transform
from tether.evaluate.sampling import encode_prompts, format_prompts, pad_token_id, uses_chat_template


@dataclass
class ResponseStats:
    """Per-sequence sums over response tokens, each (B,); KL fields are None without a reference."""

    num_tokens: torch.Tensor
    logps: torch.Tensor
    entropy: torch.Tensor
    kl_forward: torch.Tensor | None = None
    kl_reverse: torch.Tensor | None = None


def mean_token_entropy(stats: ResponseStats) -> float:
    """Entropy per response token pooled over all sequences: sum H / sum L (0.0 with no tokens)."""
    total = int(stats.num_tokens.sum())
    return float(stats.entropy.sum()) / total if total else 0.0


def token_statistics(
    logits: torch.Tensor, targets: torch.Tensor, ref_logits: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-token entropy, target log-prob and (with ref_logits) forward and reverse KL.

    Args:
        logits: (N, V) policy logits at the predicting positions.
        targets: (N,) the tokens that follow.
        ref_logits: (N, V) reference logits at the same positions, or None.

    Returns:
        {"entropy", "logp"} and, with a reference, {"kl_forward", "kl_reverse"}, each (N,) float32.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    zero = logp.new_zeros(())
    out = {
        "entropy": -torch.where(p > 0, p * logp, zero).sum(-1),
        "logp": logp.gather(-1, targets[:, None].long()).squeeze(-1),
    }
    if ref_logits is not None:
        ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
        ref_p = ref_logp.exp()
        out["kl_forward"] = torch.where(ref_p > 0, ref_p * (ref_logp - logp), zero).sum(-1)
        out["kl_reverse"] = torch.where(p > 0, p * (logp - ref_logp), zero).sum(-1)
    return out


# model -> whether head(final hidden states) reproduces its logits; checked once per model object.
_HEAD_CHECKS: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


class _Head:
    """Final hidden states and the output head of a causal LM, or full logits when they disagree."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.head = model.get_output_embeddings()
        base = getattr(model, getattr(model, "base_model_prefix", ""), None)
        self.base = base if isinstance(base, torch.nn.Module) and base is not model else None
        self.transform = head_transform(model)  # scale, soft-capping
        usable = self.head is not None and self.base is not None
        self.checked = not usable or model in _HEAD_CHECKS
        self.use_hidden = usable and _HEAD_CHECKS.get(model, True)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transform(self.head(hidden))

    def check(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden: torch.Tensor) -> None:
        """Compare head(hidden) with the model's own last-position logits once."""
        self.checked = True
        try:
            ref = self.model(
                input_ids=input_ids[:1], attention_mask=attention_mask[:1], logits_to_keep=1
            ).logits[:, -1]
        except TypeError:  # no logits_to_keep: one sequence of full logits
            ref = self.model(input_ids=input_ids[:1], attention_mask=attention_mask[:1]).logits[:, -1]
        ours = self.logits_from_hidden(hidden[:1, -1])
        self.use_hidden = torch.allclose(ours.float(), ref.float(), rtol=1e-3, atol=1e-3)
        _HEAD_CHECKS[self.model] = self.use_hidden

    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(B, T, H) final hidden states (True) or (B, T, V) logits (False)."""
        if self.use_hidden and self.base is not None:
            hidden = self.base(input_ids=input_ids, attention_mask=attention_mask)
            hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
            if not self.checked:
                self.check(input_ids, attention_mask, hidden)
            if self.use_hidden:
                return hidden, True
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits, False

    def chunk_logits(self, states: torch.Tensor, is_hidden: bool) -> torch.Tensor:
        return self.logits_from_hidden(states) if is_hidden else states


@torch.no_grad()
def response_stats(
    policy: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    reference: PreTrainedModel | None = None,
    *,
    seq_chunk: int = 8,
    token_chunk: int = 512,
) -> ResponseStats:
    """Entropy, log-probs and (with a reference) sequential KL, summed over each sequence's response tokens.

    Args:
        policy: the causal LM pi; reference: pi_ref or None.
        input_ids, attention_mask: (B, T), right-padded.
        response_mask: (B, T), 1 where the token is a response token (predicted from the position before).
        seq_chunk: sequences per forward pass; token_chunk: response positions per head call.

    Returns:
        ResponseStats with (B,) tensors on the CPU.
    """
    if seq_chunk < 1 or token_chunk < 1:
        raise ValueError(f"seq_chunk and token_chunk must be >= 1, got {seq_chunk}, {token_chunk}")
    B = input_ids.shape[0]
    stats = {name: torch.zeros(B, dtype=torch.float64) for name in ("logps", "entropy")}
    if reference is not None:
        stats.update({name: torch.zeros(B, dtype=torch.float64) for name in ("kl_forward", "kl_reverse")})
    num_tokens = response_mask[:, 1:].sum(-1).long().cpu()
    heads = [_Head(policy)] + ([_Head(reference)] if reference is not None else [])
    for start in range(0, B, seq_chunk):
        sl = slice(start, start + seq_chunk)
        ids, mask, resp = input_ids[sl], attention_mask[sl], response_mask[sl]
        rows, cols = resp[:, 1:].nonzero(as_tuple=True)  # cols: index of the predicting position
        if rows.numel() == 0:
            continue
        targets = ids[rows, cols + 1]
        states = []
        for head in heads:
            dev = next(head.model.parameters()).device
            s, is_hidden = head.states(ids.to(dev), mask.to(dev))
            states.append((s, is_hidden, dev))
        for t0 in range(0, rows.numel(), token_chunk):
            r, c = rows[t0 : t0 + token_chunk], cols[t0 : t0 + token_chunk]
            chunk_logits = [
                h.chunk_logits(s[r.to(d), c.to(d)], is_h) for h, (s, is_h, d) in zip(heads, states)
            ]
            ref_logits = chunk_logits[1].to(chunk_logits[0].device) if reference is not None else None
            per_token = token_statistics(
                chunk_logits[0], targets[t0 : t0 + token_chunk].to(chunk_logits[0].device), ref_logits
            )
            index = (r + start).cpu()
            for name, values in per_token.items():
                key = "logps" if name == "logp" else name
                stats[key].index_add_(0, index, values.double().cpu())
    return ResponseStats(
        num_tokens=num_tokens,
        logps=stats["logps"],
        entropy=stats["entropy"],
        kl_forward=stats.get("kl_forward"),
        kl_reverse=stats.get("kl_reverse"),
    )


def pack_right(
    prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt + completion: (input_ids, attention_mask, response_mask), each (B, T) long."""
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    resp = torch.zeros_like(ids)
    for i, (p, s) in enumerate(zip(prompt_ids, seqs)):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
        resp[i, len(p) : len(s)] = 1
    return ids, attn, resp


def score_sequences(
    policy: PreTrainedModel,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int,
    reference: PreTrainedModel | None = None,
    *,
    seq_chunk: int = 8,
    token_chunk: int = 512,
) -> ResponseStats:
    """`response_stats` over token-id pairs, packed `seq_chunk` at a time in length order (less padding).

    Returns (N,) statistics in the input order.
    """
    n = len(prompt_ids)
    order = sorted(range(n), key=lambda i: len(prompt_ids[i]) + len(completion_ids[i]))
    parts: list[tuple[list[int], ResponseStats]] = []
    for start in range(0, n, seq_chunk):
        idx = order[start : start + seq_chunk]
        ids, attn, resp = pack_right([prompt_ids[i] for i in idx], [completion_ids[i] for i in idx], pad_id)
        parts.append(
            (
                idx,
                response_stats(
                    policy, ids, attn, resp, reference, seq_chunk=seq_chunk, token_chunk=token_chunk
                ),
            )
        )
    out = {}
    for name in ("num_tokens", "logps", "entropy", "kl_forward", "kl_reverse"):
        if name.startswith("kl") and reference is None:
            out[name] = None
            continue
        dtype = torch.long if name == "num_tokens" else torch.float64
        full = torch.zeros(n, dtype=dtype)
        for idx, st in parts:
            full[torch.tensor(idx, dtype=torch.long)] = getattr(st, name)
        out[name] = full
    return ResponseStats(**out)


def encode_texts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    use_chat_template: bool = True,
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of prompts (formatted as for sampling) and of completions (no special tokens added)."""
    templated = uses_chat_template(tokenizer, use_chat_template)
    prompt_ids = encode_prompts(tokenizer, format_prompts(tokenizer, prompts, use_chat_template), templated)
    completion_ids = [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions]
    return prompt_ids, completion_ids


def score_texts(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    reference: PreTrainedModel | None = None,
    *,
    use_chat_template: bool = True,
    seq_chunk: int = 8,
    token_chunk: int = 512,
) -> ResponseStats:
    """Statistics of (prompt, completion) texts: (N,) per-sequence sums in input order."""
    prompt_ids, completion_ids = encode_texts(tokenizer, prompts, completions, use_chat_template)
    return score_sequences(
        policy,
        prompt_ids,
        completion_ids,
        pad_token_id(tokenizer),
        reference,
        seq_chunk=seq_chunk,
        token_chunk=token_chunk,
    )


def policy_entropy(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    **kwargs: object,
) -> float:
    """Mean per-token policy entropy (nats) over the response tokens of the given texts."""
    return mean_token_entropy(score_texts(policy, tokenizer, prompts, completions, **kwargs))  # type: ignore[arg-type]


def sequential_kl(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward, reverse) sequential KL per response, each (N,) float64 in nats."""
    stats = score_texts(policy, tokenizer, prompts, completions, reference, **kwargs)  # type: ignore[arg-type]
    if stats.kl_forward is None or stats.kl_reverse is None:
        raise RuntimeError("sequential_kl: no KL computed (reference missing)")
    return stats.kl_forward, stats.kl_reverse
