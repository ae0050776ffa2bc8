"""Tests for `tether.heads`: the chunked statistics equal the plain full-logits computation (values and gradients),
gradients pass gradcheck, numerically fragile cases stay finite, the shift convention of `response_positions`,
and the chunked path never saves an (N, V) tensor for backward.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tether.heads import (
    IDENTITY,
    HeadTransform,
    StatRequest,
    TokenStats,
    response_positions,
    sequence_sums,
    token_stats,
    token_stats_from_logits,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only add overhead


FIELDS = ("logps", "ref_logps", "kl", "relaxed_logps", "tightened_logps", "entropy")
DIFFERENTIABLE = ("logps", "kl")

# Every StatRequest combination; kl and epsilon need the reference, so without it only entropy varies.
REQUESTS_WITH_REF = [
    StatRequest(kl=kl, epsilon=eps, entropy=ent)
    for kl, eps, ent in itertools.product([False, True], [None, 0.1], [False, True])
]
REQUESTS_WITHOUT_REF = [StatRequest(), StatRequest(entropy=True)]
CASES = [(True, r) for r in REQUESTS_WITH_REF] + [(False, r) for r in REQUESTS_WITHOUT_REF]


def make_inputs(n=13, v=11, h=5, bias=True, seed=0, dtype=torch.float64):
    """Random policy head inputs and a reference that differs from the policy (so KL > 0)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    hidden = randn(n, h)
    weight = randn(v, h)
    return dict(
        hidden=hidden,
        weight=weight,
        bias=randn(v, scale=0.5) if bias else None,
        ref_hidden=(hidden.double() + randn(n, h, scale=0.5).double()).to(dtype),
        ref_weight=(weight.double() + randn(v, h, scale=0.3).double()).to(dtype),
        ref_bias=randn(v, scale=0.5) if bias else None,
        targets=torch.randint(0, v, (n,), generator=g),
    )


def full_logits(x, w, b):
    z = x @ w.t()
    return z if b is None else z + b


def chunked(inp, with_ref, request, chunk_size):
    kwargs = dict(bias=inp["bias"], request=request, chunk_size=chunk_size)
    if with_ref:
        kwargs.update(ref_hidden=inp["ref_hidden"], ref_weight=inp["ref_weight"], ref_bias=inp["ref_bias"])
    return token_stats(inp["hidden"], inp["weight"], inp["targets"], **kwargs)


def plain(inp, with_ref, request):
    ref_logits = full_logits(inp["ref_hidden"], inp["ref_weight"], inp["ref_bias"]) if with_ref else None
    logits = full_logits(inp["hidden"], inp["weight"], inp["bias"])
    return token_stats_from_logits(logits, inp["targets"], ref_logits, request=request)


def leaves(inp):
    return [inp[k] for k in ("hidden", "weight", "bias") if inp[k] is not None]


def scalar(stats: TokenStats, seed: int = 1) -> torch.Tensor:
    """A random linear combination of the differentiable outputs, so both backward paths are exercised."""
    g = torch.Generator().manual_seed(seed)
    total = (torch.randn(stats.logps.shape, generator=g, dtype=stats.logps.dtype) * stats.logps).sum()
    if stats.kl is not None:
        total = total + (torch.randn(stats.kl.shape, generator=g, dtype=stats.kl.dtype) * stats.kl).sum()
    return total


@pytest.mark.parametrize("with_ref,request_", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunked_equals_full_logits(chunk_size, with_bias, with_ref, request_):
    """token_stats (chunk sizes 1, 7 and 64 > N = 13) equals token_stats_from_logits on hidden @ weight.T + bias:
    every statistic to 1e-10, the same statistics present, the same ones differentiable, and equal gradients wrt
    hidden, weight and bias (1e-10, float64) through logps and kl. The reference gets no gradient."""
    a = make_inputs(bias=with_bias)
    b = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    for inp in (a, b):
        for x in [*leaves(inp), inp["ref_hidden"], inp["ref_weight"]]:
            x.requires_grad_()
    got, want = chunked(a, with_ref, request_, chunk_size), plain(b, with_ref, request_)
    for name in FIELDS:
        g, w = getattr(got, name), getattr(want, name)
        assert (g is None) == (w is None), name
        if g is None:
            continue
        assert g.shape == (13,) and g.dtype == torch.float64, name
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10, msg=name)
        assert g.requires_grad == (name in DIFFERENTIABLE) == w.requires_grad, name
    assert (got.kl is not None) == request_.kl
    assert (got.entropy is not None) == request_.entropy
    grads_got = torch.autograd.grad(scalar(got), leaves(a))
    grads_want = torch.autograd.grad(scalar(want), leaves(b))
    for g, w, name in zip(grads_got, grads_want, ("hidden", "weight", "bias")):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10, msg=name)
    if with_ref:
        assert a["ref_hidden"].grad is None and a["ref_weight"].grad is None


@pytest.mark.parametrize("request_", [StatRequest(kl=True, epsilon=0.1, entropy=True), StatRequest(kl=True)])
def test_gradcheck_through_token_stats(request_):
    """Finite differences agree with the custom backward wrt hidden, weight and bias (float64, N=5 with chunk size
    2, so several chunks and a partial last chunk are used), for both differentiable outputs (logps, kl)."""
    inp = make_inputs(n=5, v=4, h=3)
    x = [inp["hidden"].requires_grad_(), inp["weight"].requires_grad_(), inp["bias"].requires_grad_()]

    def f(hidden, weight, bias):
        s = token_stats(
            hidden,
            weight,
            inp["targets"],
            bias=bias,
            ref_hidden=inp["ref_hidden"],
            ref_weight=inp["ref_weight"],
            ref_bias=inp["ref_bias"],
            request=request_,
            chunk_size=2,
        )
        return s.logps, s.kl

    assert torch.autograd.gradcheck(f, x, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_without_reference():
    """The logps-only path (no reference, no bias) also passes gradcheck."""
    inp = make_inputs(n=5, v=4, h=3, bias=False)
    x = [inp["hidden"].requires_grad_(), inp["weight"].requires_grad_()]
    f = lambda h, w: token_stats(h, w, inp["targets"], chunk_size=2).logps  # noqa: E731
    assert torch.autograd.gradcheck(f, x, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("request_", [StatRequest(), StatRequest(kl=True, epsilon=0.1)])
def test_frozen_head_still_gives_hidden_gradient(request_):
    """A head weight with requires_grad=False (frozen lm_head, the LoRA case) gets no gradient, and the hidden
    states' gradient still equals the full-logits computation's (1e-10)."""
    a = make_inputs()
    b = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    for inp in (a, b):
        inp["hidden"].requires_grad_()
        inp["bias"] = None
    got, want = chunked(a, True, request_, 4), plain(b, True, request_)
    assert not a["weight"].requires_grad
    (g,) = torch.autograd.grad(scalar(got), [a["hidden"]])
    (w,) = torch.autograd.grad(scalar(want), [b["hidden"]])
    torch.testing.assert_close(g, w, rtol=0, atol=1e-10)
    assert a["weight"].grad is None


def test_kl_zero_at_reference_and_nonnegative_otherwise():
    """KL(pi_ref || pi) is 0 (to 1e-12) with zero gradient when the reference head and states are the policy's,
    and > 0 at every token when they differ."""
    inp = make_inputs(bias=False)
    hidden, weight = inp["hidden"].requires_grad_(), inp["weight"].requires_grad_()
    same = token_stats(
        hidden, weight, inp["targets"], ref_hidden=hidden, ref_weight=weight, request=StatRequest(kl=True)
    )
    torch.testing.assert_close(same.kl, torch.zeros(13, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(same.ref_logps, same.logps.detach(), rtol=0, atol=1e-12)
    g_h, g_w = torch.autograd.grad(same.kl.sum(), [hidden, weight])
    assert g_h.abs().max() < 1e-12 and g_w.abs().max() < 1e-12
    other = chunked(inp, True, StatRequest(kl=True), 5)
    assert (other.kl > 0).all()


def test_entropy_of_equal_logits_is_log_vocab():
    """A zero head gives equal logits: the policy is uniform, so entropy = log V (V=11: 2.3978952727983707) and
    every log-prob is -log V. Random logits have entropy below log V."""
    for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        hidden = torch.randn(6, 4, dtype=dtype)
        s = token_stats(
            hidden, torch.zeros(11, 4, dtype=dtype), torch.arange(6), request=StatRequest(entropy=True)
        )
        expected = torch.full((6,), math.log(11), dtype=dtype)
        torch.testing.assert_close(s.entropy, expected, rtol=0, atol=atol)
        torch.testing.assert_close(s.logps, -expected, rtol=0, atol=atol)
    inp = make_inputs()
    assert (chunked(inp, False, StatRequest(entropy=True), 4).entropy < math.log(11)).all()


def underflow_inputs(dtype):
    """Reference logits 0 at the target and -200 elsewhere: in float32 exp(-200) underflows to 0 (float64 keeps
    it, ~1.4e-87). ref_weight = 200*I, ref_hidden = e_target - 1. The policy is random."""
    n, v = 4, 6
    g = torch.Generator().manual_seed(3)
    targets = torch.tensor([0, 2, 5, 1])
    ref_hidden = torch.nn.functional.one_hot(targets, v).double() - 1.0
    return dict(
        hidden=torch.randn(n, v, generator=g, dtype=torch.float64).to(dtype),
        weight=torch.randn(v, v, generator=g, dtype=torch.float64).to(dtype),
        ref_hidden=ref_hidden.to(dtype),
        ref_weight=(200.0 * torch.eye(v, dtype=torch.float64)).to(dtype),
        targets=targets,
    )


def test_kl_with_underflowing_reference_stays_finite():
    """TDPO's reference code forms KL from softmax().log(): with p_ref = 0 after float32 underflow that gives
    0 * -inf = nan (shown below, so this test would notice if the case stopped underflowing). token_stats in
    float32 gives a finite KL equal to the float64 value (1e-5 relative) and a finite hidden/weight gradient equal
    to float64's (1e-4)."""
    x32, x64 = underflow_inputs(torch.float32), underflow_inputs(torch.float64)
    z_ref32 = x32["ref_hidden"] @ x32["ref_weight"].t()
    p_ref = torch.softmax(z_ref32, dim=-1)
    assert (p_ref == 0).any(), "the case must underflow in float32"
    p = torch.softmax(x32["hidden"] @ x32["weight"].t(), dim=-1)
    naive = (p_ref * (p_ref.log() - p.log())).sum(-1)
    assert torch.isnan(naive).all()

    results = {}
    for name, x in (("f32", x32), ("f64", x64)):
        hidden, weight = x["hidden"].requires_grad_(), x["weight"].requires_grad_()
        s = token_stats(
            hidden,
            weight,
            x["targets"],
            ref_hidden=x["ref_hidden"],
            ref_weight=x["ref_weight"],
            request=StatRequest(kl=True),
            chunk_size=3,
        )
        grads = torch.autograd.grad((s.kl + s.logps).sum(), [hidden, weight])
        results[name] = (s.kl, *grads)
    for value in results["f32"]:
        assert torch.isfinite(value).all()
    kl32, gh32, gw32 = results["f32"]
    kl64, gh64, gw64 = results["f64"]
    torch.testing.assert_close(kl32.double(), kl64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh32.double(), gh64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw32.double(), gw64, rtol=1e-4, atol=1e-5)


def _bf16_case():
    inp = make_inputs(n=16, v=50, h=8, bias=False, dtype=torch.bfloat16)
    request = StatRequest(kl=True, epsilon=0.1, entropy=True)
    got = chunked(inp, True, request, 7)
    up = {
        k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inp.items()
    }
    want = plain(up, True, request)
    max_logit = max(
        full_logits(up["hidden"], up["weight"], None).abs().max().item(),
        full_logits(up["ref_hidden"], up["ref_weight"], None).abs().max().item(),
    )
    return inp, got, want, max_logit


def test_bf16_hidden_states_give_float32_statistics():
    """bf16 hidden states and head: every statistic is float32 and finite, and within the error that rounding the
    logits to bf16 can cause (|dz| <= 2^-8 |z| per logit, so a log-prob moves by <= 2 * 2^-8 * max|z|; the KL
    and the perturbed log-probs by a few times that) of the float32 computation on the same values. The
    gradient wrt the bf16 hidden states is finite and bf16."""
    inp, got, want, max_logit = _bf16_case()
    tol = 4 * 2**-8 * max_logit
    for name in FIELDS:
        g = getattr(got, name)
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        torch.testing.assert_close(g, getattr(want, name), rtol=0, atol=tol, msg=name)
    hidden = inp["hidden"].requires_grad_()
    s = chunked(inp, True, StatRequest(kl=True), 7)
    (g_h,) = torch.autograd.grad((s.logps + s.kl).sum(), [hidden])
    assert g_h.dtype == torch.bfloat16 and torch.isfinite(g_h).all()


def test_bf16_statistics_are_the_float32_reductions_of_the_bf16_logits():
    """The module contract: the head matmul runs in bf16 (as the model's lm_head would), then every reduction
    runs in float32. So the statistics equal the float32 computation on the bf16-rounded logits up to float32
    round-off (1e-4), not merely to the bf16 rounding error."""
    inp = make_inputs(n=16, v=50, h=8, bias=False, dtype=torch.bfloat16)
    request = StatRequest(kl=True, epsilon=0.1, entropy=True)
    got = chunked(inp, True, request, 7)
    z = (inp["hidden"] @ inp["weight"].t()).float()
    z_ref = (inp["ref_hidden"] @ inp["ref_weight"].t()).float()
    want = token_stats_from_logits(z, inp["targets"], z_ref, request=request)
    for name in FIELDS:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=1e-4, msg=name)


@pytest.mark.parametrize("path", ["full", "chunked"])
def test_perturbed_logps_equal_policy_logps_at_reference(path):
    """DESIGN.md: 'At policy == reference every s_i is 0'. That needs z+ = z = z- exactly (a rounding difference
    decides the strict comparisons in `epsilon_steps`), i.e. relaxed_logps == tightened_logps == logps bit for
    bit when the reference logits equal the policy's. Computing the perturbed logits as z + e*(z - z_ref) and
    z - e*(z - z_ref) gives that exactly (z - z_ref = 0)."""
    g = torch.Generator().manual_seed(0)
    n, v, h = 256, 512, 16
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    request = StatRequest(epsilon=0.01)
    if path == "full":
        z = hidden @ weight.t()
        s = token_stats_from_logits(z, targets, z.clone(), request=request)
    else:
        s = token_stats(hidden, weight, targets, ref_hidden=hidden, ref_weight=weight, request=request)
    assert torch.equal(s.relaxed_logps, s.logps.detach())
    assert torch.equal(s.tightened_logps, s.logps.detach())


# --- head transforms (logit scale, soft-capping) ------------------------------------------------------------

# The caps are small against these logits (|z| up to ~6), so tanh is far from linear.
TRANSFORMS = [
    (HeadTransform(scale=0.125), HeadTransform(scale=0.125)),  # Granite, logits_scaling=8
    (HeadTransform(softcap=3.0), HeadTransform(softcap=3.0)),  # Gemma-2 style
    (HeadTransform(scale=2.5, softcap=3.0), HeadTransform(scale=0.7, softcap=4.0)),  # both; reference differs
    (HeadTransform(scale=2.5, softcap=3.0), IDENTITY),  # a plain reference for a transformed policy
]


def transformed_pair(inp, with_ref, request, chunk_size, transforms):
    """(chunked, plain) statistics with head transforms: the plain path gets the transformed full logits."""
    transform, ref_transform = transforms
    b = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    for x in leaves(inp) + leaves(b):
        x.requires_grad_()
    kwargs = dict(bias=inp["bias"], request=request, chunk_size=chunk_size, transform=transform)
    if with_ref:
        kwargs.update(
            ref_hidden=inp["ref_hidden"],
            ref_weight=inp["ref_weight"],
            ref_bias=inp["ref_bias"],
            ref_transform=ref_transform,
        )
    got = token_stats(inp["hidden"], inp["weight"], inp["targets"], **kwargs)
    ref_logits = (
        ref_transform(full_logits(b["ref_hidden"], b["ref_weight"], b["ref_bias"])) if with_ref else None
    )
    logits = transform(full_logits(b["hidden"], b["weight"], b["bias"]))
    want = token_stats_from_logits(logits, b["targets"], ref_logits, request=request)
    return got, want, leaves(inp), leaves(b)


@pytest.mark.parametrize("transforms", TRANSFORMS, ids=lambda t: f"{t[0]}/{t[1]}")
@pytest.mark.parametrize("with_ref,request_", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("chunk_size", [1, 7])
def test_transformed_head_equals_full_transformed_logits(chunk_size, with_ref, request_, transforms):
    """With a head transform l = c tanh(s z / c) (or s z), token_stats equals token_stats_from_logits on the
    transformed full logits (the reference's with its own transform): every statistic to 1e-10 and the gradients
    wrt hidden, weight and bias to 1e-10 (float64), for every StatRequest."""
    got, want, x_got, x_want = transformed_pair(make_inputs(), with_ref, request_, chunk_size, transforms)
    for name in FIELDS:
        g, w = getattr(got, name), getattr(want, name)
        assert (g is None) == (w is None), name
        if g is not None:
            torch.testing.assert_close(g, w, rtol=0, atol=1e-10, msg=name)
    for g, w, name in zip(
        torch.autograd.grad(scalar(got), x_got), torch.autograd.grad(scalar(want), x_want), "hwb"
    ):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10, msg=name)


def test_transform_changes_the_statistics():
    """The comparison above could pass with a transform that is ignored on both paths: the transformed statistics
    differ from the plain ones (by more than 0.1 nats somewhere) for a scale and for a cap alone."""
    inp = make_inputs()
    request = StatRequest(kl=True, epsilon=0.1, entropy=True)
    base = chunked(inp, True, request, 7)
    for t in (HeadTransform(scale=0.125), HeadTransform(softcap=3.0)):
        got, *_ = transformed_pair(make_inputs(), True, request, 7, (t, t))
        for name in FIELDS:
            assert (getattr(got, name) - getattr(base, name)).abs().max() > 0.1, (t, name)


@pytest.mark.parametrize("transforms", TRANSFORMS[1:3], ids=["cap", "scale+cap"])
@pytest.mark.parametrize(
    "request_",
    [
        StatRequest(),
        StatRequest(kl=True),
        StatRequest(epsilon=0.1),
        StatRequest(kl=True, epsilon=0.1, entropy=True),
    ],
    ids=["logps", "kl", "epsilon", "all"],
)
def test_gradcheck_with_head_transform(request_, transforms):
    """Finite differences agree with the closed-form backward through the soft-cap and scale, wrt hidden, weight
    and bias (float64, N=5 in chunks of 2), for the statistics of every objective: sequence log-probs (DPO, IPO,
    cDPO, H-DPO), token KL (TDPO), the perturbed log-probs (epsilon-DPO; no gradient of their own)."""
    inp = make_inputs(n=5, v=4, h=3)
    x = [inp["hidden"].requires_grad_(), inp["weight"].requires_grad_(), inp["bias"].requires_grad_()]
    transform, ref_transform = transforms

    def f(hidden, weight, bias):
        s = token_stats(
            hidden,
            weight,
            inp["targets"],
            bias=bias,
            ref_hidden=inp["ref_hidden"],
            ref_weight=inp["ref_weight"],
            ref_bias=inp["ref_bias"],
            request=request_,
            chunk_size=2,
            transform=transform,
            ref_transform=ref_transform,
        )
        return (s.logps, s.kl) if request_.kl else s.logps

    assert torch.autograd.gradcheck(f, x, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_soft_capped_scaled_logprob_hand_made():
    """V=2, H=1, weight [[0], [1]], hidden 4, so z = [0, 4]; scale 0.5, cap 2: l = [0, 2 tanh(1)] =
    [0, 1.5231883119115297]. log p(1) = -log(1 + exp(-l_1)) = -0.19722303923521486, and
    d log p(1) / d hidden = (1 - p(1)) * 0.5 * (1 - tanh(1)^2) = 0.037586129509363075."""
    hidden = torch.tensor([[4.0]], dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    s = token_stats(hidden, weight, torch.tensor([1]), transform=HeadTransform(scale=0.5, softcap=2.0))
    torch.testing.assert_close(s.logps, torch.tensor([-0.19722303923521486], dtype=torch.float64))
    (g,) = torch.autograd.grad(s.logps.sum(), [hidden])
    torch.testing.assert_close(g, torch.tensor([[0.037586129509363075]], dtype=torch.float64))


@pytest.mark.parametrize(
    "bad", [dict(scale=0.0), dict(scale=-1.0), dict(scale=float("nan")), dict(softcap=0.0)]
)
def test_head_transform_rejects_meaningless_values(bad):
    with pytest.raises(ValueError, match="HeadTransform"):
        HeadTransform(**bad)


def test_response_positions_and_sequence_sums_hand_made():
    """Shift convention: the logit at t predicts labels[t+1]; -100 is never a target; labels[:, 0] never is.
    labels row 0 = [-100, -100, 5, 6, -100, -100] -> shifted [-100, 5, 6, -100, -100] -> mask [F, T, T, F, F]
    labels row 1 = [4, 7, -100, 8, 9, -100]      -> shifted [7, -100, 8, 9, -100]    -> mask [T, F, T, T, F]
    row 2 = all -100 -> no response token.
    targets (row-major) = [5, 6, 7, 8, 9]; sequence_sums([1, 2, 3, 4, 5]) = [1+2, 3+4+5, 0] = [3, 12, 0],
    and the gradient of sum(c * sums) wrt the values is c of each value's row."""
    labels = torch.tensor(
        [[-100, -100, 5, 6, -100, -100], [4, 7, -100, 8, 9, -100], [-100] * 6],
    )
    mask, targets = response_positions(labels)
    expected_mask = torch.tensor(
        [[0, 1, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0]],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected_mask)
    assert torch.equal(targets, torch.tensor([5, 6, 7, 8, 9]))
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64, requires_grad=True)
    sums = sequence_sums(values, mask)
    assert torch.equal(sums, torch.tensor([3.0, 12.0, 0.0], dtype=torch.float64))
    (grad,) = torch.autograd.grad(
        (sums * torch.tensor([10.0, 100.0, 1000.0], dtype=torch.float64)).sum(), values
    )
    assert torch.equal(grad, torch.tensor([10.0, 10.0, 100.0, 100.0, 100.0], dtype=torch.float64))
    # a custom ignore_index: [0, 0, 3, 4, 0] with ignore_index=0 -> shifted [0, 3, 4, 0] -> targets [3, 4]
    mask0, targets0 = response_positions(torch.tensor([[0, 0, 3, 4, 0]]), ignore_index=0)
    assert torch.equal(mask0, torch.tensor([[False, True, True, False]]))
    assert torch.equal(targets0, torch.tensor([3, 4]))


def test_input_validation():
    """Bad inputs fail with a message instead of a shape error deep inside the loop."""
    inp = make_inputs(bias=False)
    with pytest.raises(ValueError, match="chunk_size"):
        token_stats(inp["hidden"], inp["weight"], inp["targets"], chunk_size=0)
    with pytest.raises(ValueError, match="ref_hidden"):
        token_stats(inp["hidden"], inp["weight"], inp["targets"], request=StatRequest(kl=True))
    with pytest.raises(ValueError, match=r"\(N, H\)"):
        token_stats(inp["hidden"], inp["weight"], inp["targets"][:-1])
    with pytest.raises(ValueError, match="reference logits"):
        token_stats_from_logits(
            torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), request=StatRequest(epsilon=0.1)
        )


class SavedForBackward:
    """Counts the elements held for backward: every tensor autograd saves (saved_tensors_hooks sees built-in ops'
    saved tensors and custom Functions' save_for_backward alike), plus tensors a custom Function keeps as ctx
    attributes (found on the output's grad_fn, which is the ctx). Shared storage is counted once."""

    def __init__(self):
        self.seen: dict[tuple[int, int], int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.seen[(t.untyped_storage().data_ptr(), t.numel())] = t.numel()
        return t

    def add_ctx(self, grad_fn) -> None:
        for value in vars(grad_fn).values():
            for t in value if isinstance(value, list | tuple) else [value]:
                if isinstance(t, torch.Tensor):
                    self.pack(t)

    @property
    def numel(self) -> int:
        return sum(self.seen.values())


def test_chunked_head_does_not_save_logits():
    """N=2048 tokens, V=8192, H=64 (float32), chunk_size=128, every statistic requested. What token_stats keeps
    for backward must not contain an (N, V) tensor: fewer than N*V/4 = 4,194,304 elements are saved (the inputs
    hidden, weight, ref_hidden, ref_weight are ~1.3M; one (N, V) buffer alone is 16.8M). The same counter on the
    full-logits path sees at least N*V saved elements (so the measurement can fail), and on token_stats at least
    the head weight (so it does see a custom Function's saved tensors). Backward then runs and gives finite grads.
    """
    n, v, h = 2048, 8192, 64
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (0.1 * torch.randn(v, h, generator=g)).requires_grad_()
    ref_hidden, ref_weight = hidden.detach() + 0.1, weight.detach() * 0.9
    targets = torch.randint(0, v, (n,), generator=g)
    request = StatRequest(kl=True, epsilon=0.1, entropy=True)

    counter = SavedForBackward()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        s = token_stats(
            hidden,
            weight,
            targets,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            request=request,
            chunk_size=128,
        )
        loss = s.logps.sum() + s.kl.sum()
    counter.add_ctx(s.logps.grad_fn)
    assert v * h <= counter.numel < n * v // 4, counter.numel
    g_h, g_w = torch.autograd.grad(loss, [hidden, weight])
    assert torch.isfinite(g_h).all() and torch.isfinite(g_w).all()

    control = SavedForBackward()
    with torch.autograd.graph.saved_tensors_hooks(control.pack, lambda t: t):
        full = token_stats_from_logits(
            hidden @ weight.t(), targets, ref_hidden @ ref_weight.t(), request=request
        )
    del full
    assert control.numel >= n * v
