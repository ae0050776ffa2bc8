"""Token statistics from final hidden states and the output embedding, without the (N, V) logits tensor.

Every objective in `tether.objectives` is a function of a few per-token statistics of the response tokens:
the target log-prob under the policy (and the reference), the full-vocabulary KL(pi_ref || pi) per token
(TDPO), the target log-prob under the two perturbed policies of epsilon-DPO, and the policy entropy (a
metric). All of them are reductions over the vocabulary of one token's logits, so they can be computed
chunk by chunk over tokens: `token_stats` multiplies `chunk_size` hidden states by the head, reduces, and
drops the chunk's logits. Its backward pass recomputes each chunk's logits instead of storing them, so the
extra memory is O(chunk_size * V) in both passes, not O(N * V).

Gradient flows to the policy's hidden states and head weight through two outputs, the target log-probs
and the per-token KL:
    d logp_t / d z   = onehot(y_t) - p          (p = softmax(z), z the policy logits)
    d KL_t / d z     = p - p_ref                (KL_t = sum_v p_ref,v (log p_ref,v - log p_v))
Everything else (reference log-probs, perturbed log-probs, entropy) is computed without gradient.

Some models transform W h + b before their logits (`HeadTransform`): a constant scale s (Granite divides by
`logits_scaling`, Cohere multiplies by `logit_scale`) and Gemma-style soft-capping c, applied in that order:
    l = c * tanh(s z / c)   (l = s z without a cap),   z = W h + b.
Every statistic is computed from l (and the reference's own l_ref), and the backward multiplies d/dl by
    dl/dz = s * (1 - (l / c)^2)   (s without a cap),
which is how autograd differentiates tanh too (from its output).

`token_stats_from_logits` computes the same statistics with plain autograd from logits that are already
materialized; it backs `tether.functional` and is the reference the chunked path is tested against.
Precision: the head matmul runs in the hidden states' dtype, as the model's own lm_head would (bf16 hidden
states give bf16-rounded logits, which is also what TRL sees before it upcasts); the logits are then upcast
and every reduction over the vocabulary (log-softmax, KL, entropy, the perturbed log-probs) and the backward
closed forms run in at least float32. float64 inputs stay float64 (for gradcheck). Upcasting the head itself
would cost a float32 copy of the (V, H) weight per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

DEFAULT_CHUNK_SIZE = 1024


@dataclass(frozen=True)
class HeadTransform:
    """What a model applies to z = W h + b to get its logits: l = softcap * tanh(scale * z / softcap).

    scale: a constant multiplier (> 0); 1 for a plain head. softcap: the cap c (> 0) of Gemma-style final-logit
    soft-capping, applied after the scale, or None for none. `tether.causal_lm.head_transform` reads it from a
    model's config.
    """

    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"HeadTransform.scale must be a finite number > 0, got {self.scale!r}")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise ValueError(
                f"HeadTransform.softcap must be None or a finite number > 0, got {self.softcap!r}"
            )

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """The logits of z (any shape), out of place and differentiable."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def apply_(self, z: torch.Tensor) -> torch.Tensor:
        """`self(z)` in place (no gradient): z becomes the logits."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def slope_(self, logits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """dl/dz = scale * (1 - (l / softcap)^2) from the logits l, into `out` (needs a softcap)."""
        return torch.div(logits, self.softcap, out=out).square_().neg_().add_(1.0).mul_(self.scale)

    def to_dict(self) -> dict[str, float | None]:
        return {"scale": self.scale, "softcap": self.softcap}


IDENTITY = HeadTransform()


@dataclass(frozen=True)
class StatRequest:
    """Which per-token statistics to compute besides the policy's target log-probs.

    kl: per-token KL(pi_ref || pi) over the full vocabulary (differentiable; needs reference hidden states).
    epsilon: if set, epsilon-DPO's perturbed target log-probs at beta/(1+epsilon) and beta/(1-epsilon)
        (no gradient; needs reference hidden states).
    entropy: per-token policy entropy -sum_v p log p (no gradient; a metric).
    """

    kl: bool = False
    epsilon: float | None = None
    entropy: bool = False

    @property
    def needs_reference_logits(self) -> bool:
        return self.kl or self.epsilon is not None


@dataclass
class TokenStats:
    """Per-token statistics for N response tokens; every tensor has shape (N,) and is float32 or float64.

    logps: log pi(y_t | ...) (differentiable). ref_logps: log pi_ref(y_t | ...) (no grad), when the reference
    was given. kl: KL(pi_ref || pi) at that position (differentiable). relaxed_logps / tightened_logps: target
    log-prob under log_softmax((1+e) z - e z_ref) and log_softmax((1-e) z + e z_ref), the estimates of the
    policy trained with beta/(1+e) and beta/(1-e) (no grad). entropy: policy entropy (no grad).
    """

    logps: torch.Tensor
    ref_logps: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    relaxed_logps: torch.Tensor | None = None
    tightened_logps: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


_FIELDS = ("logps", "ref_logps", "kl", "relaxed_logps", "tightened_logps", "entropy")  # TokenStats order


def _present(request: StatRequest, has_ref: bool) -> dict[str, bool]:
    """Which `TokenStats` fields a request computes."""
    perturbed = request.epsilon is not None
    return {
        "logps": True,
        "ref_logps": has_ref,
        "kl": request.kl,
        "relaxed_logps": perturbed,
        "tightened_logps": perturbed,
        "entropy": request.entropy,
    }


def _gather(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _chunk_statistics(
    z: torch.Tensor, z_ref: torch.Tensor | None, targets: torch.Tensor, request: StatRequest
) -> TokenStats:
    """All statistics for one chunk from its logits z, z_ref: (n, V); targets: (n,). Pure, differentiable."""
    logq = torch.log_softmax(z, dim=-1)
    stats = TokenStats(logps=_gather(logq, targets))
    if z_ref is not None:
        logq_ref = torch.log_softmax(z_ref, dim=-1)
        stats.ref_logps = _gather(logq_ref, targets)
        if request.kl:
            # KL(ref || pi) from log-probs only: exp(logq_ref) underflows to 0, never to 0 * -inf.
            stats.kl = (logq_ref.exp() * (logq_ref - logq)).sum(-1)
        if request.epsilon is not None:
            e = request.epsilon
            # (1 + e) z - e z_ref and (1 - e) z + e z_ref, written as z +/- e (z - z_ref): equal to z bit for bit
            # when z_ref == z, so that every epsilon-DPO step is exactly 0 at policy == reference.
            delta = z - z_ref
            stats.relaxed_logps = _gather(torch.log_softmax(z + e * delta, dim=-1), targets)
            stats.tightened_logps = _gather(torch.log_softmax(z - e * delta, dim=-1), targets)
    if request.entropy:
        stats.entropy = -(logq.exp() * logq).sum(-1)
    return stats


def token_stats_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ref_logits: torch.Tensor | None = None,
    request: StatRequest = StatRequest(),
) -> TokenStats:
    """Statistics from materialized logits (N, V) and ref_logits (N, V); targets (N,). Plain autograd.

    Only `logps` and `kl` carry gradient; the metric-only statistics are detached, as in `token_stats`.
    """
    if request.needs_reference_logits and ref_logits is None:
        raise ValueError("this StatRequest needs reference logits (kl or epsilon was requested)")
    z = logits.to(_compute_dtype(logits.dtype))
    z_ref = None if ref_logits is None else ref_logits.detach().to(z.dtype)
    stats = _chunk_statistics(z, z_ref, targets, request)
    for name in ("ref_logps", "relaxed_logps", "tightened_logps", "entropy"):
        value = getattr(stats, name)
        if value is not None:
            setattr(stats, name, value.detach())
    return stats


def _logits_into(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    transform: HeadTransform,
    out: torch.Tensor,
) -> torch.Tensor:
    """(n, H) x (V, H) -> (n, V) logits written into a preallocated buffer `out` (no new allocation per chunk).

    The matmul runs in the hidden states' dtype; `out` (the compute dtype, >= float32) receives the result,
    then the bias and the head transform are applied to it in place.
    """
    if out.dtype == hidden.dtype:
        torch.mm(hidden, weight.t(), out=out)
    else:
        out.copy_(hidden @ weight.t())
    if bias is not None:
        out.add_(bias)
    return transform.apply_(out)


def head_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    transform: HeadTransform = IDENTITY,
) -> torch.Tensor:
    """The (n, V) logits the chunked head computes for hidden (n, H), materialized (no grad): for checks only."""
    with torch.no_grad():
        out = torch.empty(
            hidden.shape[0], weight.shape[0], dtype=_compute_dtype(hidden.dtype), device=hidden.device
        )
        return _logits_into(hidden, weight.to(hidden.dtype), bias, transform, out)


def _logsumexp_(z: torch.Tensor, work: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise logsumexp of z (n, V); leaves exp(z - max) in `work` (same shape).

    Returns lse (n,), max (n, 1) and s = sum exp(z - max) (n, 1), so that softmax(z) = work / s.
    """
    m = z.amax(-1, keepdim=True)
    torch.sub(z, m, out=work).exp_()
    s = work.sum(-1, keepdim=True)
    return (m + s.log()).squeeze(-1), m, s


def _chunk_forward(
    z: torch.Tensor,
    z_ref: torch.Tensor | None,
    ref_logits: Callable[[torch.Tensor], torch.Tensor],
    work: torch.Tensor,
    scratch: torch.Tensor | None,
    targets: torch.Tensor,
    request: StatRequest,
) -> dict[str, torch.Tensor]:
    """The statistics of `_chunk_statistics` for one chunk, from reductions instead of (n, V) log-softmaxes.

    z: the chunk's policy logits (n, V); z_ref: a buffer for the reference logits, filled by ref_logits(z_ref)
    (None without a reference; it may be z itself when the policy logits are no longer needed); work, scratch:
    (n, V) buffers. All are overwritten. With lse = logsumexp(z) and p = softmax(z):
        logp_t = z_t - lse;   entropy = lse - sum_v p_v z_v;
        KL(ref || pi) = sum_v p_ref,v (z_ref,v - z_v) + lse - lse_ref   (sum_v p_ref,v = 1).
    Returns (n,) tensors keyed like `TokenStats`, plus "lse" and "lse_ref".
    """
    t = targets.unsqueeze(-1)
    out: dict[str, torch.Tensor] = {}
    lse, m, s = _logsumexp_(z, work)
    out["lse"] = lse
    out["logps"] = z.gather(-1, t).squeeze(-1) - lse
    keep_z = request.needs_reference_logits
    if request.entropy:
        # entropy = log s - sum_v (work_v / s) (z_v - max): shifted, so no large terms cancel.
        shifted = torch.sub(z, m, out=scratch) if keep_z else z.sub_(m)
        out["entropy"] = s.squeeze(-1).log() - shifted.mul_(work).sum(-1) / s.squeeze(-1)
    if z_ref is None:
        return out
    ref_logits(z_ref)
    lse_ref, _, s_ref = _logsumexp_(z_ref, work)  # work = p_ref * s_ref
    out["lse_ref"] = lse_ref
    out["ref_logps"] = z_ref.gather(-1, t).squeeze(-1) - lse_ref
    if request.kl:
        weighted = torch.sub(z_ref, z, out=scratch).mul_(work).sum(-1)
        out["kl"] = weighted / s_ref.squeeze(-1) + (lse - lse_ref)
    if request.epsilon is not None:
        e = request.epsilon
        # z +/- e (z - z_ref) (see `_chunk_statistics`): z_ref becomes z - z_ref in place, as it is not needed
        # any more; each perturbed logit row is formed in `scratch`.
        delta = z_ref.neg_().add_(z)
        for name, sign in (("relaxed_logps", e), ("tightened_logps", -e)):
            mixed = torch.add(z, delta, alpha=sign, out=scratch)
            lse_mixed, _, _ = _logsumexp_(mixed, work)
            out[name] = mixed.gather(-1, t).squeeze(-1) - lse_mixed
    return out


class _ChunkedHead(torch.autograd.Function):
    """Forward: statistics chunk by chunk. Backward: recompute each chunk's logits, apply the closed forms.

    Memory: the (n, V) buffers are allocated once per call and reused by every chunk. Sequence statistics
    (logps, ref_logps, entropy) need two buffers of chunk_size rows in forward and one in backward; statistics
    of the reference distribution (kl, epsilon) need four in forward, so their forward chunks are half as long
    (the same memory), and two in backward; a soft-capped policy head needs one more in backward (dl/dz).
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        ref_hidden,
        ref_weight,
        ref_bias,
        targets,
        request,
        chunk_size,
        transform,
        ref_transform,
    ):
        n, vocab = hidden.shape[0], weight.shape[0]
        dtype = _compute_dtype(hidden.dtype)
        device = hidden.device
        has_ref = ref_hidden is not None
        joint = request.needs_reference_logits  # policy and reference logits of a chunk held at once
        step = max(1, chunk_size // 2) if joint else chunk_size
        rows = min(step, n)
        weight_c = weight.to(hidden.dtype)
        ref_weight_c = ref_weight.to(hidden.dtype) if has_ref else None
        buffers = [torch.empty(rows, vocab, dtype=dtype, device=device) for _ in range(4 if joint else 2)]
        present = _present(request, has_ref)
        out = {k: torch.empty(n, dtype=dtype, device=device) if present[k] else None for k in _FIELDS}
        lse = torch.empty(n, dtype=dtype, device=device)
        lse_ref = torch.empty(n if has_ref else 0, dtype=dtype, device=device)
        for start in range(0, n, step):
            sl = slice(start, min(start + step, n))
            k = sl.stop - start
            z, work = buffers[0][:k], buffers[1][:k]
            scratch = buffers[3][:k] if joint else None
            z_ref = (buffers[2][:k] if joint else z) if has_ref else None
            _logits_into(hidden[sl], weight_c, bias, transform, z)
            chunk = _chunk_forward(
                z,
                z_ref,
                lambda buf, sl=sl: _logits_into(ref_hidden[sl], ref_weight_c, ref_bias, ref_transform, buf),
                work,
                scratch,
                targets[sl],
                request,
            )
            lse[sl] = chunk.pop("lse")
            if has_ref:
                lse_ref[sl] = chunk.pop("lse_ref")
            for name, value in chunk.items():
                out[name][sl] = value
        del buffers
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, lse, lse_ref)
        ctx.request = request
        ctx.chunk_size = chunk_size
        ctx.transforms = (transform, ref_transform)
        # Outputs must be tensors: absent statistics come back as empty tensors and are mapped to None.
        results = [out[k] if out[k] is not None else hidden.new_empty(0, dtype=dtype) for k in _FIELDS]
        ctx.mark_non_differentiable(*[r for i, r in enumerate(results) if i not in (0, 2)])
        return tuple(results)

    @staticmethod
    def backward(ctx, grad_logps, _g_ref, grad_kl, _g_rel, _g_tight, _g_ent):
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return *_ChunkedHead._backward(ctx, grad_logps, grad_kl), None, None

    @staticmethod
    def _backward(ctx, grad_logps, grad_kl):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, lse, lse_ref = ctx.saved_tensors
        request, chunk_size = ctx.request, ctx.chunk_size
        transform, ref_transform = ctx.transforms
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        use_kl = request.kl and grad_kl is not None and grad_kl.numel() > 0
        low_precision = hidden.dtype in (torch.float16, torch.bfloat16)
        acc_dtype = torch.float32 if low_precision else weight.dtype
        n, vocab = hidden.shape[0], weight.shape[0]
        rows = min(chunk_size, n)
        weight_c = weight.to(hidden.dtype)
        ref_weight_c = ref_weight.to(hidden.dtype) if use_kl else None
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if need_b else None
        if grad_logps is None:
            grad_logps = torch.zeros_like(lse)
        buffer = torch.empty(rows, vocab, dtype=lse.dtype, device=hidden.device)
        ref_buffer = torch.empty(rows, vocab, dtype=lse.dtype, device=hidden.device) if use_kl else None
        capped = transform.softcap is not None
        slope_buffer = torch.empty(rows, vocab, dtype=lse.dtype, device=hidden.device) if capped else None
        for start in range(0, n, chunk_size):
            sl = slice(start, min(start + chunk_size, n))
            k = sl.stop - start
            logits = _logits_into(hidden[sl], weight_c, bias, transform, buffer[:k])
            slope = transform.slope_(logits, slope_buffer[:k]) if capped else None  # dl/dz
            # p = softmax(l) = exp(l - lse), in place in the logits buffer
            g = logits.sub_(lse[sl].unsqueeze(-1)).exp_()
            g_lp = grad_logps[sl].unsqueeze(-1)
            # d logp/dz = onehot - p ; d KL/dz = p - p_ref: g = p (g_kl - g_lp) - p_ref g_kl + onehot g_lp
            if use_kl:
                g_kl = grad_kl[sl].unsqueeze(-1)
                p_ref = _logits_into(ref_hidden[sl], ref_weight_c, ref_bias, ref_transform, ref_buffer[:k])
                p_ref.sub_(lse_ref[sl].unsqueeze(-1)).exp_()
                g.mul_(g_kl - g_lp).addcmul_(p_ref, g_kl, value=-1)
            else:
                g.mul_(-g_lp)
            g.scatter_add_(-1, targets[sl].unsqueeze(-1), g_lp)
            # g = d/dl; chain rule to z = W h + b
            if capped:
                g.mul_(slope)
            elif transform.scale != 1.0:
                g.mul_(transform.scale)
            g_w = g.to(hidden.dtype)
            if need_h:
                torch.mm(g_w, weight_c, out=grad_h[sl])
            if need_w:
                if g_w.dtype == acc_dtype:
                    grad_w.addmm_(g_w.t(), hidden[sl])
                else:
                    grad_w += (g_w.t() @ hidden[sl]).to(acc_dtype)
            if need_b:
                grad_b += g.sum(0).to(acc_dtype)
            del g, g_w, slope
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    request: StatRequest = StatRequest(),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    transform: HeadTransform = IDENTITY,
    ref_transform: HeadTransform = IDENTITY,
) -> TokenStats:
    """Per-token statistics of N response tokens, chunked over tokens.

    hidden: (N, H) final hidden states of the policy at the positions that predict the targets.
    weight: (V, H) the policy's output embedding (lm_head weight); bias: (V,) or None.
    targets: (N,) token ids. ref_hidden: (N, H) the reference's final hidden states at the same positions,
    ref_weight: (V, H), ref_bias: (V,) or None (no gradient flows to any of them).
    transform, ref_transform: what the policy's and the reference's heads do to W h + b (`HeadTransform`).
    Peak extra memory is at most two (chunk_size, V) buffers in the compute dtype, in forward and in backward
    (three in backward with a soft-capped policy head and kl), reused by every chunk (see `_ChunkedHead`).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if request.needs_reference_logits and (ref_hidden is None or ref_weight is None):
        raise ValueError("kl / epsilon statistics need ref_hidden and ref_weight")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be (N, H) and targets (N,); got {tuple(hidden.shape)}, {tuple(targets.shape)}"
        )
    if ref_hidden is not None:
        ref_hidden = ref_hidden.detach()
        ref_weight = ref_weight.detach()
        ref_bias = None if ref_bias is None else ref_bias.detach()
    if ref_hidden is not None and ref_hidden.dtype != hidden.dtype:
        ref_hidden = ref_hidden.to(hidden.dtype)
    # The chunk matmuls choose their own precision (logits in >= float32); autocast must not recast them.
    with torch.autocast(hidden.device.type, enabled=False):
        outputs = _ChunkedHead.apply(
            hidden,
            weight,
            bias,
            ref_hidden,
            ref_weight,
            ref_bias,
            targets,
            request,
            chunk_size,
            transform,
            ref_transform,
        )
    present = _present(request, ref_hidden is not None)
    return TokenStats(**{n: (o if present[n] else None) for n, o in zip(_FIELDS, outputs)})


def response_positions(labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the response tokens are predicted, in the Hugging Face shift convention.

    labels: (S, T). Returns mask (S, T-1), true where the logit at position t predicts a response token
    labels[t+1], and targets (N,) = those token ids in row-major order.
    """
    shifted = labels[:, 1:]
    mask = shifted != ignore_index
    return mask, shifted[mask]


def sequence_sums(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum per-token values (N,) back to their sequences: mask (S, T-1) from `response_positions` -> (S,)."""
    seq_index = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    out = values.new_zeros(mask.shape[0])
    return out.index_add(0, seq_index, values)
