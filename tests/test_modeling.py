"""Tests for the head checks of `tether.modeling` and `tether.causal_lm`: `head_transform` reads each known family's logit transform, the
load-time probe (`check_head_matches_logits`) accepts exactly the models whose logits tether's chunked head
reproduces, and the statistics of a transformed model through `compute_pair_stats` are the model's own.

Every model is a tiny one built here from a config (transformers' own classes), nothing is downloaded. Their
weights are initialized with a large `initializer_range` so that logits are of order 10 and soft-capping at
2 really bends them.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import tether.causal_lm as causal_lm
from tether.batch import PreferenceBatch
from tether.causal_lm import head_transform
from tether.data.dataset import PreferenceCollator, TokenizedPair
from tether.heads import IDENTITY, HeadTransform, StatRequest, response_positions, token_stats_from_logits
from tether.modeling import (
    UnsupportedModelError,
    check_head_matches_logits,
    compute_pair_stats,
    load_causal_lm,
)
from tether.reference import CachedReference, ModelReference, build_reference_cache
from tether.statistics import pair_stats

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    initializer_range=0.5,
)

# (config class, model class, the config's transform fields, the HeadTransform each family's forward applies,
# read from its ForCausalLM.forward in transformers). Falcon-H1 (lm_head_multiplier) passes the same check but
# takes ~7 s to build on CPU (Mamba reference kernels), so it is left out here.
FAMILIES = [
    ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=8.0), HeadTransform(scale=0.125)),
    (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        dict(logits_scaling=8.0, num_local_experts=2, num_experts_per_tok=1),
        HeadTransform(scale=0.125),
    ),
    (
        "MiniCPM3Config",  # divides the hidden states by hidden_size / dim_model_base = 4 before lm_head
        "MiniCPM3ForCausalLM",
        dict(dim_model_base=8, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8),
        HeadTransform(scale=0.25),
    ),
    ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.25), HeadTransform(scale=0.25)),
    ("Cohere2Config", "Cohere2ForCausalLM", dict(logit_scale=0.25), HeadTransform(scale=0.25)),
    ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", dict(logits_scaling=0.25), HeadTransform(scale=0.25)),
    (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(final_logit_softcapping=2.0, head_dim=8),
        HeadTransform(softcap=2.0),
    ),
    (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(final_logit_softcapping=2.0, head_dim=8),
        HeadTransform(softcap=2.0),
    ),
    ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(final_logit_softcapping=None, head_dim=8), IDENTITY),
    ("LlamaConfig", "LlamaForCausalLM", {}, IDENTITY),
]


def build(config_name: str, model_name: str, fields: dict, seed: int = 0, **more):
    config = getattr(transformers, config_name)(**{**SMALL, **fields, **more})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return getattr(transformers, model_name)(config).eval()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f"{f[1]}-{f[2]}")
def test_known_family_transform_is_what_its_forward_does(family, monkeypatch):
    """head_transform reads the expected HeadTransform from each family's config, the probe accepts the model
    with it, and (for a non-identity transform) refuses the same model when tether ignores the transform, so
    the probe is what makes the table right, not the table alone."""
    config_name, model_name, fields, expected = family
    model = build(config_name, model_name, fields)
    assert head_transform(model) == expected
    check_head_matches_logits(model)
    if not expected.is_identity:
        monkeypatch.setattr(causal_lm, "head_transform", lambda m: IDENTITY)
        with pytest.raises(UnsupportedModelError, match=model_name):
            check_head_matches_logits(model)


def _pairs(vocab: int) -> list[TokenizedPair]:
    """2 pairs: prompts of 4 tokens, responses of 9/5 (chosen) and 7/3 (rejected) tokens."""
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    return [TokenizedPair(ids(4), ids(9), ids(7), 1), TokenizedPair(ids(4), ids(5), ids(3), 2)]


def _batch(vocab: int) -> tuple[PreferenceBatch, list[int]]:
    return PreferenceCollator(0)(_pairs(vocab)), [0, 1]


@pytest.mark.parametrize(
    "family", [FAMILIES[0], FAMILIES[5]], ids=["granite-logits_scaling=8", "gemma2-softcap=2"]
)
def test_transformed_model_statistics_are_the_models_own(family, tmp_path):
    """Issue 14: a tiny Granite with logits_scaling=8 gave a sequence log-prob of -50.24 from tether against
    -49.94 from the model itself. Through load_causal_lm and compute_pair_stats (the training path), the
    sequence log-probs, the TDPO KL and epsilon-DPO's perturbed log-probs now equal token_stats_from_logits on
    the model's own logits (1e-4), for Granite's scale and Gemma-2's soft-cap, against a reference that
    differs (another seed). Ignoring the transform moves the log-probs by more than 0.1 nats."""
    config_name, model_name, fields, _ = family
    for seed, name in ((0, "policy"), (1, "reference")):
        build(config_name, model_name, fields, seed=seed).save_pretrained(tmp_path / name)
    cfg = modeling_config()
    policy = load_causal_lm(str(tmp_path / "policy"), cfg)
    reference = ModelReference(load_causal_lm(str(tmp_path / "reference"), cfg))
    batch, indices = _batch(SMALL["vocab_size"])
    request = StatRequest(kl=True, epsilon=0.1, entropy=True)
    got = compute_pair_stats(policy, reference, batch, indices, request, chunk_size=5)

    mask, targets = response_positions(batch.labels)
    with torch.no_grad():
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1][mask]
        ref_logits = reference.model(batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1][
            mask
        ]
    want_tokens = token_stats_from_logits(logits, targets, ref_logits, request=request)
    want = pair_stats(want_tokens, mask)
    for field in (
        "policy_chosen_logps",
        "policy_rejected_logps",
        "ref_chosen_logps",
        "kl_chosen",
        "kl_rejected",
        "relaxed_chosen_logps",
        "tightened_rejected_logps",
        "entropy_chosen",
    ):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=0, atol=1e-4, msg=field)
    with pytest.MonkeyPatch.context() as mp:  # what tether computed before it read the transform
        mp.setattr(causal_lm, "head_transform", lambda m: IDENTITY)
        before = compute_pair_stats(policy, reference, batch, indices, request, chunk_size=5)
    assert (before.policy_chosen_logps - want.policy_chosen_logps).abs().max() > 0.1


@pytest.mark.parametrize(
    "family,store_hidden",
    [(FAMILIES[0], False), (FAMILIES[5], True)],
    ids=["granite-logps", "gemma2-hidden"],
)
def test_reference_cache_keeps_the_head_transform(family, store_hidden, tmp_path):
    """reference.mode=cache: the cached sequence log-probs (Granite) and the reference logits recomputed from
    cached hidden states (Gemma-2, TDPO's KL and epsilon-DPO) carry the reference's transform: the statistics
    equal those with the reference model in memory (1e-5)."""
    config_name, model_name, fields, expected = family
    policy = build(config_name, model_name, fields, seed=0)
    ref_model = build(config_name, model_name, fields, seed=1)
    pairs = _pairs(SMALL["vocab_size"])
    folder = build_reference_cache(
        ref_model, pairs, PreferenceCollator(0), tmp_path / "cache", store_hidden=store_hidden, progress=False
    )
    cached = CachedReference(folder)
    if store_hidden:
        assert cached.head()[2] == expected
    batch, indices = _batch(SMALL["vocab_size"])
    request = StatRequest(kl=True, epsilon=0.1) if store_hidden else StatRequest()
    got = compute_pair_stats(policy, cached, batch, indices, request, chunk_size=5)
    want = compute_pair_stats(policy, ModelReference(ref_model), batch, indices, request, chunk_size=5)
    for field in ("ref_chosen_logps", "ref_rejected_logps", "kl_chosen", "relaxed_chosen_logps"):
        if getattr(want, field) is not None:
            torch.testing.assert_close(
                getattr(got, field), getattr(want, field), rtol=0, atol=1e-5, msg=field
            )


def modeling_config():
    from tether.config import ModelConfig

    return ModelConfig(path="unused")


class _BiasedLlama(LlamaForCausalLM):
    """A head tether cannot see: the forward adds a fixed bias to the logits after lm_head."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits + torch.linspace(0, 0.5, out.logits.shape[-1])
        return out


def test_probe_refuses_a_head_it_cannot_reproduce():
    """A forward hook on lm_head that adds a per-token bias, and a subclass that adds one to the logits, are
    refused naming the class, the largest difference and the likely cause; the plain model passes, so the
    refusal comes from the change. A hook that shifts every logit of a row by one constant changes no
    log-prob and passes."""
    config = LlamaConfig(**SMALL)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    check_head_matches_logits(model)
    hook = model.lm_head.register_forward_hook(lambda m, i, o: o + torch.linspace(0, 0.5, o.shape[-1]))
    with pytest.raises(UnsupportedModelError) as info:
        check_head_matches_logits(model, "/models/x")
    message = str(info.value)
    assert "LlamaForCausalLM (/models/x)" in message and "differ" in message
    assert "Likely cause: the forward changes the logits in a way its config does not name" in message
    diff = float(message.split("by up to ")[1].split(" ")[0])
    assert 0.1 < diff <= 0.5, message
    hook.remove()
    hook = model.lm_head.register_forward_hook(lambda m, i, o: o + 3.0)
    check_head_matches_logits(model)
    hook.remove()
    torch.manual_seed(0)
    with pytest.raises(UnsupportedModelError, match="_BiasedLlama"):
        check_head_matches_logits(_BiasedLlama(config).eval())


def test_probe_names_a_scale_it_does_not_know(monkeypatch):
    """A Granite whose logits_scaling tether did not read is refused with the fitted constant (1/8) and the
    config field that sets it."""
    model = build("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=8.0))
    monkeypatch.setattr(causal_lm, "head_transform", lambda m: IDENTITY)
    with pytest.raises(UnsupportedModelError, match=r"times a constant 0\.125.*logits_scaling=8\.0"):
        check_head_matches_logits(model)


def test_load_causal_lm_refuses_a_config_field_the_forward_ignores(tmp_path):
    """Llama's forward ignores final_logit_softcapping; a config.json that sets it would make tether cap logits
    the model never caps: load_causal_lm refuses, naming the field."""
    model = build("LlamaConfig", "LlamaForCausalLM", {})
    model.config.final_logit_softcapping = 2.0
    model.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="ignores.*final_logit_softcapping=2.0"):
        load_causal_lm(str(tmp_path), modeling_config())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tied", [False, True])
def test_probe_accepts_tied_and_16_bit_models(dtype, tied):
    """Tied embeddings (the head reads the input embedding's weight) and 16-bit weights pass the probe, for a
    plain head and for Gemma-2's soft-cap (the model rounds each step of the cap to 16 bits, tether does not)."""
    for name, fields in (("Llama", {}), ("Gemma2", dict(final_logit_softcapping=2.0, head_dim=8))):
        model = build(f"{name}Config", f"{name}ForCausalLM", fields, tie_word_embeddings=tied).to(dtype)
        assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
        check_head_matches_logits(model)


# --- the CPU forward in groups of close row lengths ------------------------------------------------------


def test_row_groups_by_hand():
    lengths = [10, 8, 8, 3, 40, 39]
    assert causal_lm.row_groups(lengths, 0) == [(40, [4]), (39, [5]), (10, [0]), (8, [1, 2]), (3, [3])]
    # 39 pads 1 token into 40's forward; 10 would pad 30; the two rows of 8 pad 2 each (4 <= 4); 3 would pad 7.
    assert causal_lm.row_groups(lengths, 4) == [(40, [4, 5]), (10, [0, 1, 2]), (3, [3])]
    assert causal_lm.row_groups(lengths, 3) == [(40, [4, 5]), (10, [0]), (8, [1, 2]), (3, [3])]
    assert causal_lm.row_groups(lengths, 10**9) == [(40, [4, 5, 0, 1, 2, 3])]
    with pytest.raises(ValueError, match="merge_pad_tokens"):
        causal_lm.row_groups(lengths, -1)


def test_grouped_forward_equals_the_padded_batch_in_values_and_gradients():
    """Any grouping (one forward per length, merged, one forward for all) gives the padded batch's hidden
    states at real positions, zeros at padding, and the same parameter gradients, in float64."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).double()

    def ids(n: int, offset: int) -> list[int]:
        return [(7 * i + offset) % 60 + 3 for i in range(n)]

    pairs = [
        TokenizedPair(ids(5, 0), ids(9, 1), ids(3, 2), 1),
        TokenizedPair(ids(2, 3), ids(12, 4), ids(12, 5), 2),
        TokenizedPair(ids(6, 6), ids(1, 7), ids(8, 8), 3),
    ]
    batch = PreferenceCollator(0)(pairs)  # row lengths 14, 14, 7, 8, 14, 14
    mask = batch.attention_mask.bool()

    def run(split_rows: bool, merge: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        hidden = causal_lm.final_hidden_states(model, batch, split_rows, merge)
        (hidden[mask] ** 2).sum().backward()
        return hidden.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    padded, padded_grads = run(False, 0)
    for merge in (0, 1, 6, 10**9):
        hidden, grads = run(True, merge)
        torch.testing.assert_close(hidden[mask], padded[mask], rtol=1e-10, atol=1e-10)
        assert torch.all(hidden[~mask] == 0)
        assert len(grads) == len(padded_grads) == len(list(model.parameters())) - 1  # all but lm_head
        for got, expected in zip(grads, padded_grads):
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
