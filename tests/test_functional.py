"""Tests for `tether.functional.preference_loss`: every objective against a direct re-derivation from the formulas
of DESIGN.md section 1 (full log_softmax over the vocabulary, one position at a time), gradcheck through the
functional API, the values at policy == reference, input errors, and parity with TRL 1.16's DPOTrainer.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tether.functional import preference_loss
from tether.objectives import OBJECTIVES, ObjectiveConfigError

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only add overhead


CASES = [
    ("dpo", dict(beta=0.3)),
    ("ipo", dict(beta=0.3)),
    ("ipo", dict(beta=0.3, length_normalize=True)),
    ("cdpo", dict(beta=0.3, label_smoothing=0.2)),
    ("hdpo", dict(beta=0.3, alpha=0.8)),
    ("epsilon_dpo", dict(beta=0.3, epsilon=0.1)),
    ("epsilon_dpo", dict(beta=0.3, epsilon=0.1, entropy_alpha=0.9)),
    ("tdpo1", dict(beta=0.3)),
    ("tdpo1", dict(beta=0.3, entropy_alpha=1.2)),
    ("tdpo2", dict(beta=0.3, alpha=0.5)),
]
CASE_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in h.items())}" for n, h in CASES]


def test_cases_cover_every_registered_objective():
    assert {name for name, _ in CASES} == set(OBJECTIVES)


def make_batch(b=3, t=7, v=11, seed=0, dtype=torch.float64):
    """(2B, T, V) policy and reference logits and (2B, T) labels with prompt and padding masked by -100:
    row i has prompt length 1 + i % 3 and i % 2 padding positions at the end (at least one response token)."""
    g = torch.Generator().manual_seed(seed)
    policy = 2.0 * torch.randn(2 * b, t, v, generator=g, dtype=dtype)
    ref = policy + 1.5 * torch.randn(2 * b, t, v, generator=g, dtype=dtype)
    labels = torch.randint(0, v, (2 * b, t), generator=g)
    for i in range(2 * b):
        labels[i, : 1 + i % 3] = -100
        if i % 2:
            labels[i, t - i % 2 :] = -100
    return policy, ref, labels


def direct(name, hp, policy, ref, labels):
    """DESIGN.md section 1, written out: per-sequence sums over response tokens (the logit at position t predicts
    labels[t+1]) of log-probs, KL(pi_ref || pi) and the perturbed log-probs, then the loss of `name`.
    Returns (losses (B,), dict of per-sequence quantities (2B,))."""
    rows, t_len, _ = policy.shape
    seq = {k: [] for k in ("logp", "ref_logp", "kl", "relaxed", "tightened", "entropy", "length")}
    e = hp.get("epsilon", 0.1)
    for i in range(rows):
        acc = {k: policy.new_zeros(()) for k in seq}
        for t in range(t_len - 1):
            y = int(labels[i, t + 1])
            if y == -100:
                continue
            f, f_ref = policy[i, t], ref[i, t].detach()
            logq, logq_ref = F.log_softmax(f, -1), F.log_softmax(f_ref, -1)
            acc["logp"] = acc["logp"] + logq[y]
            acc["ref_logp"] = acc["ref_logp"] + logq_ref[y]
            acc["kl"] = acc["kl"] + (logq_ref.exp() * (logq_ref - logq)).sum()
            acc["relaxed"] = acc["relaxed"] + F.log_softmax((1 + e) * f.detach() - e * f_ref, -1)[y]
            acc["tightened"] = acc["tightened"] + F.log_softmax((1 - e) * f.detach() + e * f_ref, -1)[y]
            acc["entropy"] = acc["entropy"] - (logq.exp() * logq).sum().detach()
            acc["length"] = acc["length"] + 1
        for k in seq:
            seq[k].append(acc[k])
    seq = {k: torch.stack(v) for k, v in seq.items()}
    b = rows // 2

    def halves(k):
        return seq[k][:b], seq[k][b:]

    (pw, pl), (rw, rl) = halves("logp"), halves("ref_logp")
    beta = hp["beta"]
    a = hp.get("entropy_alpha", hp.get("alpha", 1.0) if name == "hdpo" else 1.0)
    margin = (a * pw - rw) - (a * pl - rl)
    if name in ("dpo", "hdpo"):
        losses = -F.logsigmoid(beta * margin)
    elif name == "cdpo":
        ls = hp["label_smoothing"]
        losses = -(1 - ls) * F.logsigmoid(beta * margin) + -ls * F.logsigmoid(-beta * margin)
    elif name == "ipo":
        cw, cl = pw - rw, pl - rl
        if hp.get("length_normalize"):
            (nw, nl) = halves("length")
            cw, cl = cw / nw, cl / nl
        losses = ((cw - cl) - 1 / (2 * beta)) ** 2
    elif name == "epsilon_dpo":
        z = (pw - pl).detach()
        (xw, xl), (tw, tl) = halves("relaxed"), halves("tightened")
        z_plus, z_minus = xw - xl, tw - tl
        s = torch.where(
            (z_plus > z) & (z > z_minus), 1.0, torch.where((z_minus > z) & (z > z_plus), -1.0, 0.0)
        )
        s = seq["steps"] = s.to(z.dtype)  # exact: s is -1, 0 or 1
        losses = -F.logsigmoid(beta / (1 + e * s) * margin)
    elif name in ("tdpo1", "tdpo2"):
        d_w, d_l = halves("kl")
        u = beta * margin
        if name == "tdpo1":
            losses = -F.logsigmoid(u - (beta * d_l - beta * d_w))
        else:
            losses = -F.logsigmoid(u - hp["alpha"] * (beta * d_l - (beta * d_w).detach()))
    else:
        raise AssertionError(name)
    return losses, seq


@pytest.mark.parametrize("name,hp", CASES, ids=CASE_IDS)
def test_matches_direct_computation(name, hp):
    """Per-pair losses, their gradient wrt the policy logits (1e-10, float64), and the metrics that are functions
    of the sums (logps/*, kl/seq_*, entropy/*, beta/steps) equal the direct re-derivation. The masks matter:
    prompt and padding positions hold random logits, so counting them would change every value. For epsilon-DPO
    the case has both relaxed and tightened pairs (else it would not test the step)."""
    policy, ref, labels = make_batch()
    policy_a, policy_b = policy.clone().requires_grad_(), policy.clone().requires_grad_()
    losses, metrics = preference_loss(name, policy_a, ref, labels, entropy=True, **hp)
    want, seq = direct(name, hp, policy_b, ref, labels)
    assert losses.shape == (3,) and losses.dtype == torch.float64
    torch.testing.assert_close(losses, want, rtol=0, atol=1e-10)
    (g_a,) = torch.autograd.grad(losses.sum(), policy_a)
    (g_b,) = torch.autograd.grad(want.sum(), policy_b)
    torch.testing.assert_close(g_a, g_b, rtol=0, atol=1e-10)
    close = dict(rtol=0, atol=1e-10)
    torch.testing.assert_close(metrics["loss"], want.detach().mean(), **close)
    torch.testing.assert_close(metrics["logps/chosen"], seq["logp"][:3].detach().mean(), **close)
    torch.testing.assert_close(metrics["logps/rejected"], seq["logp"][3:].detach().mean(), **close)
    for side, rows in (("chosen", slice(0, 3)), ("rejected", slice(3, 6))):
        expected = seq["entropy"][rows].sum() / seq["length"][rows].sum()
        torch.testing.assert_close(metrics[f"entropy/{side}"], expected, **close)
    if name.startswith("tdpo"):
        torch.testing.assert_close(metrics["kl/seq_chosen"], seq["kl"][:3].detach().mean(), **close)
        torch.testing.assert_close(metrics["kl/seq_rejected"], seq["kl"][3:].detach().mean(), **close)
    if name == "epsilon_dpo":
        torch.testing.assert_close(metrics["beta/steps"], seq["steps"], rtol=0, atol=0)
        assert set(seq["steps"].tolist()) >= {1.0, -1.0}, seq["steps"]


def test_gradient_is_zero_at_masked_positions():
    """Prompt and padding positions (where labels[t+1] == -100) and the last position get exactly zero gradient:
    they contribute nothing to any loss."""
    policy, ref, labels = make_batch()
    policy.requires_grad_()
    losses, _ = preference_loss("tdpo1", policy, ref, labels, beta=0.3)
    (grad,) = torch.autograd.grad(losses.sum(), policy)
    predicts_response = torch.zeros_like(labels, dtype=torch.bool)
    predicts_response[:, :-1] = labels[:, 1:] != -100
    assert grad[~predicts_response].abs().max() == 0
    assert (grad[predicts_response].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("name,hp", CASES, ids=CASE_IDS)
def test_gradcheck_through_functional_api(name, hp):
    """Finite differences wrt the policy logits (float64, 2 pairs, T=4, V=3) agree with autograd through
    preference_loss for every objective. TDPO2 stops the gradient of beta*D(x, y_w), which depends on the chosen
    rows' logits, so finite differences there measure a dependence the gradient omits by design: for TDPO2 only
    the rejected rows are perturbed (its full gradient is checked against the direct computation above)."""
    policy, ref, labels = make_batch(b=2, t=4, v=3, seed=1)
    if name == "tdpo2":
        chosen, rejected = policy[:2], policy[2:].clone().requires_grad_()
        f = lambda x: preference_loss(name, torch.cat([chosen, x]), ref, labels, **hp)[0]  # noqa: E731
        inputs = (rejected,)
    else:
        f = lambda x: preference_loss(name, x, ref, labels, **hp)[0]  # noqa: E731
        inputs = (policy.requires_grad_(),)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


# At policy == reference every log-ratio is 0, every KL is 0 and the perturbed policies equal the policy:
#   dpo, cdpo (h = 0: -(1-e) log 1/2 - e log 1/2), hdpo with alpha = 1, epsilon_dpo (margin 0 whatever beta_i),
#   tdpo1, tdpo2 -> log 2 = 0.6931471805599453.
#   ipo: q = 0 -> (0 - 1/(2 beta))^2 = 1/(4 beta^2): beta = 0.5 -> 1, beta = 0.1 -> 25 (length-normalized too).
#   hdpo with alpha != 1: h = beta*(alpha - 1)*(logp(y_w) - logp(y_l)) is not 0, so the loss is not log 2:
#   it is -log sigma(beta*(alpha-1)*(pw - pl)) (checked separately below).
AT_REFERENCE = [
    ("dpo", dict(beta=0.1), math.log(2)),
    ("cdpo", dict(beta=0.1, label_smoothing=0.3), math.log(2)),
    ("hdpo", dict(beta=0.1, alpha=1.0), math.log(2)),
    ("epsilon_dpo", dict(beta=0.1, epsilon=0.3), math.log(2)),
    ("tdpo1", dict(beta=0.1), math.log(2)),
    ("tdpo2", dict(beta=0.1, alpha=0.5), math.log(2)),
    ("ipo", dict(beta=0.5), 1.0),
    ("ipo", dict(beta=0.1), 25.0),
    ("ipo", dict(beta=0.1, length_normalize=True), 25.0),
]


@pytest.mark.parametrize("name,hp,expected", AT_REFERENCE)
def test_values_at_policy_equal_reference(name, hp, expected):
    """See the table above; rewards and KL metrics are 0 there too."""
    policy, _, labels = make_batch()
    losses, metrics = preference_loss(name, policy, policy.clone(), labels, **hp)
    torch.testing.assert_close(
        losses, torch.full((3,), expected, dtype=torch.float64), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        metrics["rewards/margins"], torch.tensor(0.0, dtype=torch.float64), **dict(rtol=0, atol=1e-12)
    )
    if name.startswith("tdpo"):
        assert abs(metrics["kl/seq_chosen"].item()) < 1e-12 and abs(metrics["kl/seq_rejected"].item()) < 1e-12


def test_hdpo_at_reference_is_not_log2():
    """H-DPO with alpha = 0.8 at policy == reference: h = beta*(alpha-1)*(pw - pl) = -0.02*(pw - pl), so the loss is
    softplus(0.02*(pw - pl)), not log 2 (pw, pl: the sequence log-probs, recomputed here)."""
    policy, _, labels = make_batch()
    losses, _ = preference_loss("hdpo", policy, policy.clone(), labels, beta=0.1, alpha=0.8)
    _, seq = direct("dpo", dict(beta=0.1), policy, policy.clone(), labels)
    pw, pl = seq["logp"][:3], seq["logp"][3:]
    torch.testing.assert_close(losses, F.softplus(0.02 * (pw - pl)), rtol=0, atol=1e-12)
    assert (losses - math.log(2)).abs().min() > 1e-3


def test_shape_errors():
    """Mismatched policy/reference shapes, labels that do not match the logits, and an odd number of rows (not a
    concatenated chosen/rejected batch) are refused with a ValueError; an unknown objective with the config error."""
    policy, ref, labels = make_batch()
    with pytest.raises(ValueError, match="differ in shape"):
        preference_loss("dpo", policy, ref[..., :-1], labels)
    with pytest.raises(ValueError, match=r"\(2B, T\)"):
        preference_loss("dpo", policy, ref, labels[:, :-1])
    with pytest.raises(ValueError, match=r"\(2B, T\)"):
        preference_loss("dpo", policy[:5], ref[:5], labels[:5])
    with pytest.raises(ObjectiveConfigError, match="unknown objective"):
        preference_loss("dpo2", policy, ref, labels)


def test_entropy_target_is_refused_by_a_single_loss_call():
    """An entropy target is state moved after each optimizer step: one loss call cannot honour it."""
    policy, ref, labels = make_batch()
    with pytest.raises(ValueError, match="after_step"):
        preference_loss("hdpo", policy, ref, labels, alpha=0.9, entropy_target=0.3)


# --------------------------------------------------------------------------------------------------------------
# Parity with TRL 1.16's DPOTrainer
# --------------------------------------------------------------------------------------------------------------


def _tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list("0123456789+-=*abcdefgh "))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _tiny_llama(tokenizer, seed):
    from transformers import LlamaForCausalLM

    from tether.toy.model import tiny_llama_config

    config = tiny_llama_config(
        len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.3,  # spread-out logits, so policy and reference differ clearly
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.double().eval()


@pytest.fixture(scope="module")
def trl_setup(tmp_path_factory):
    """A float64 tiny Llama policy and a differently seeded reference, a char tokenizer built in code, and a
    factory of DPOTrainers over one in-memory dataset of 4 pairs (prompts and completions of different lengths)."""
    pytest.importorskip("trl", reason="trl is not installed (pip install -e .[dev])")
    datasets = pytest.importorskip("datasets")
    from trl import DPOConfig, DPOTrainer

    tokenizer = _tiny_tokenizer()
    policy, reference = _tiny_llama(tokenizer, 0), _tiny_llama(tokenizer, 1)
    data = datasets.Dataset.from_dict(
        {
            "prompt": ["12+7=", "3*4=", "ab cd", "9-9="],
            "chosen": ["19", "12", " efg", "0"],
            "rejected": ["20 ab", "7", "h", "00 0 1"],
        }
    )
    out = tmp_path_factory.mktemp("trl")

    def trainer(loss_type: str | list[str], beta: float, loss_weights: list[float] | None = None):
        args = DPOConfig(
            output_dir=str(out),
            beta=beta,
            loss_type=[loss_type] if isinstance(loss_type, str) else loss_type,
            loss_weights=loss_weights,
            per_device_train_batch_size=4,
            report_to="none",
            use_cpu=True,
            # TRL's default on CPU is bf16 autocast, which runs its fused LM head in bf16 (~1e-3 log-prob error);
            # parity needs full precision.
            bf16=False,
        )
        return DPOTrainer(
            model=policy, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer
        )

    return trainer, policy, reference


def _trl_batch(trainer):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])


def _our_inputs(batch, policy, reference):
    """Logits of both models on TRL's collated batch, and labels masked as TRL masks them (completion tokens only)."""
    with torch.no_grad():
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits, ref_logits = policy(**kwargs).logits, reference(**kwargs).logits
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return logits, ref_logits, labels


def _trl_loss(trainer, batch) -> float:
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


# TRL computes its log-probs with a fused LM head that accumulates in float32, so agreement is to float32 precision.
TRL_TOL = dict(rel=2e-6, abs=2e-6)


def test_dpo_matches_trl_sigmoid(trl_setup):
    """Our DPO's batch-mean loss equals TRL's `sigmoid` loss on the same models and batch, and the metrics TRL
    logs under the same names (rewards/*, logps/*) agree too."""
    make, policy, reference = trl_setup
    trainer = make("sigmoid", beta=0.5)
    batch = _trl_batch(trainer)
    trl_loss = _trl_loss(trainer, batch)
    losses, metrics = preference_loss("dpo", *_our_inputs(batch, policy, reference), beta=0.5)
    assert losses.mean().item() == pytest.approx(trl_loss, **TRL_TOL)
    assert abs(trl_loss - math.log(2)) > 1e-3  # the models differ: not the trivial value
    logged = trainer._metrics["train" if trainer.model.training else "eval"]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert metrics[name].item() == pytest.approx(logged[name][-1], **TRL_TOL), name
    assert metrics["rewards/accuracies"].item() == logged["rewards/accuracies"][-1]


def test_ipo_length_normalized_matches_trl_ipo(trl_setup):
    """TRL's `ipo` divides each log-ratio by the completion length before squaring; that is our
    IPO(length_normalize=True). The unnormalized IPO gives a different value on this batch. The metrics TRL
    logs (rewards/*: beta times the summed log-ratios; logps/*) agree too."""
    make, policy, reference = trl_setup
    trainer = make("ipo", beta=0.5)
    batch = _trl_batch(trainer)
    trl_loss = _trl_loss(trainer, batch)
    inputs = _our_inputs(batch, policy, reference)
    losses, metrics = preference_loss("ipo", *inputs, beta=0.5, length_normalize=True)
    assert losses.mean().item() == pytest.approx(trl_loss, **TRL_TOL)
    logged = trainer._metrics["train" if trainer.model.training else "eval"]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert metrics[name].item() == pytest.approx(logged[name][-1], **TRL_TOL), name
    assert metrics["rewards/accuracies"].item() == logged["rewards/accuracies"][-1]
    plain, _ = preference_loss("ipo", *inputs, beta=0.5)
    assert abs(plain.mean().item() - trl_loss) > 1e-3


def test_cdpo_matches_trl_sigmoid_on_both_orders(trl_setup):
    """TRL 1.16 no longer applies label smoothing to `sigmoid` (and its `robust` loss is a different, debiased
    one), so cDPO is checked through its definition: mean cDPO loss = (1-e) * mean sigmoid loss + e * mean sigmoid
    loss with chosen and rejected swapped, with TRL computing both sigmoid losses (e = 0.2)."""
    make, policy, reference = trl_setup
    trainer = make("sigmoid", beta=0.5)
    batch = _trl_batch(trainer)
    b = batch["input_ids"].shape[0] // 2
    swapped = {k: torch.cat([v[b:], v[:b]]) for k, v in batch.items()}
    e = 0.2
    expected = (1 - e) * _trl_loss(trainer, batch) + e * _trl_loss(trainer, swapped)
    losses, _ = preference_loss("cdpo", *_our_inputs(batch, policy, reference), beta=0.5, label_smoothing=e)
    assert losses.mean().item() == pytest.approx(expected, **TRL_TOL)


def test_dpo_with_sft_matches_trl_sigmoid_sft(trl_setup):
    """TRL's `loss_type: [sigmoid, sft]` with `loss_weights: [0.8, 0.5]` equals our DPO with weight 0.8 and
    sft_weight 0.5: TRL's sft is the token mean of the chosen completions' NLL over the batch. The SFT term
    changes the value here (it is not the plain sigmoid loss)."""
    make, policy, reference = trl_setup
    trainer = make(["sigmoid", "sft"], beta=0.5, loss_weights=[0.8, 0.5])
    batch = _trl_batch(trainer)
    trl_loss = _trl_loss(trainer, batch)
    inputs = _our_inputs(batch, policy, reference)
    losses, metrics = preference_loss("dpo", *inputs, beta=0.5, weight=0.8, sft_weight=0.5)
    assert losses.mean().item() == pytest.approx(trl_loss, **TRL_TOL)
    plain, _ = preference_loss("dpo", *inputs, beta=0.5)
    assert abs(plain.mean().item() - trl_loss) > 1e-2
    assert metrics["loss/sft"].item() > 0.1
