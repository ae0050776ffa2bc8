"""Tests of the toy world (`tether.toy`): tokenizer, tiny model, tasks, SFT, sampling and pairing.

Everything is built from a seed in the test; nothing is downloaded. The slowest test is the 100-step SFT.
"""

from __future__ import annotations

import json
import math
import random
import string

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tether.toy.model import build_tiny_llama, tiny_llama_config
from tether.toy.pairs import (
    PairingStats,
    make_preference_pairs,
    pair_indices,
    sample_completions,
    write_jsonl,
)
from tether.toy.sft import IGNORE_INDEX, encode_example, sft
from tether.toy.tasks import TASKS, ReverseTask, SentimentTask, get_task
from tether.toy.tokenizer import ALPHABET, SPECIAL_TOKENS, build_tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The toy model's matrices are too small to gain from intra-op threads, and OpenMP threads that spin
    on shared, busy cores make every step many times slower; run this module on one thread, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# --- tokenizer ---------------------------------------------------------------------------------------


def test_tokenizer_vocab_and_special_tokens(tokenizer):
    assert len(tokenizer) == len(SPECIAL_TOKENS) + len(ALPHABET) == 53
    assert (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.unk_token_id,
    ) == (
        0,
        1,
        2,
        3,
    )
    assert len(set(ALPHABET)) == len(ALPHABET)


def test_tokenizer_round_trip_one_token_per_character(tokenizer):
    rng = random.Random(0)
    texts = [ALPHABET, "the film was great, but the plot was dull.", "  two  spaces ", "it's ok!?"]
    texts += ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40))) for _ in range(50)]
    for text in texts:
        ids = tokenizer(text)["input_ids"]  # no special tokens are added by plain encoding
        assert len(ids) == len(text)
        assert tokenizer.decode(ids) == text


def test_tokenizer_unknown_characters_map_to_unk(tokenizer):
    assert (
        tokenizer("aÄ\nB")["input_ids"]
        == [tokenizer.convert_tokens_to_ids("a")] + [tokenizer.unk_token_id] * 3
    )


def test_chat_template(tokenizer):
    user = [{"role": "user", "content": "pumz"}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert prompt == "<bos><|user|>pumz<|assistant|>"
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "zmup"}], tokenize=False)
    assert full == "<bos><|user|>pumz<|assistant|>zmup<eos>"
    ids = tokenizer.apply_chat_template(user, add_generation_prompt=True)["input_ids"]
    assert ids == [1, tokenizer.convert_tokens_to_ids("<|user|>"), *tokenizer("pumz")["input_ids"], 6]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "pumz"
    with pytest.raises(Exception, match="unknown role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_tokenizer_save_and_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "really brilliant, and the cast was fun."
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token, loaded.unk_token) == (
        "<pad>",
        "<bos>",
        "<eos>",
        "<unk>",
    )
    messages = [{"role": "user", "content": "abc"}]
    assert loaded.apply_chat_template(messages, add_generation_prompt=True) == tokenizer.apply_chat_template(
        messages, add_generation_prompt=True
    )


# --- model -------------------------------------------------------------------------------------------


def test_model_matches_tokenizer_and_counts_parameters(tokenizer):
    model = build_tiny_llama(tokenizer, seed=0)
    config = model.config
    assert config.vocab_size == len(tokenizer)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert not config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    # embeddings 2 * 53 * 64 = 6,784; per layer attention 4 * 64 * 64 = 16,384, MLP 3 * 64 * 192 = 36,864,
    # two RMSNorms 128; two layers 106,752; final norm 64: 113,600.
    assert sum(p.numel() for p in model.parameters()) == 113_600
    assert not model.training


def test_model_is_deterministic_per_seed_and_leaves_global_rng_alone(tokenizer):
    state = torch.random.get_rng_state()
    a, b, c = (build_tiny_llama(tokenizer, seed=s) for s in (0, 0, 1))
    assert torch.equal(state, torch.random.get_rng_state())
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_config_overrides_and_save_load(tokenizer, tmp_path):
    config = tiny_llama_config(53, hidden_size=32, num_heads=4, num_kv_heads=2)
    assert (config.intermediate_size, config.num_key_value_heads, config.head_dim) == (96, 2, 8)
    model = build_tiny_llama(tokenizer, seed=3, hidden_size=32, num_kv_heads=2)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([tokenizer("hello there")["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


# --- tasks -------------------------------------------------------------------------------------------


def test_registry():
    assert sorted(TASKS) == ["reverse", "sentiment"]
    assert isinstance(get_task("reverse"), ReverseTask)
    with pytest.raises(KeyError, match="known: \\['reverse', 'sentiment'\\]"):
        get_task("addition")


def test_reverse_verifier_and_reward():
    task = ReverseTask()
    assert task.reference_answer("pumz") == "zmup"
    assert task.verify("pumz", "zmup") and task.verify("pumz", " zmup \n")
    assert (
        not task.verify("pumz", "zmpu") and not task.verify("pumz", "") and not task.verify("pumz", "zmupz")
    )
    assert task.reward("abc", "cba") == 1.0
    assert task.reward("abc", "cab") == 0.0
    with pytest.raises(ValueError, match="lowercase letters"):
        task.reference_answer("12+7=")


def test_reverse_prompts_and_sft_targets():
    task = ReverseTask()
    prompts = task.make_prompts(500, seed=0)
    assert prompts == task.make_prompts(500, seed=0) != task.make_prompts(500, seed=1)
    assert {len(p) for p in prompts} == set(range(task.MIN_LENGTH, task.MAX_LENGTH + 1))
    assert all(set(p) <= set(string.ascii_lowercase) for p in prompts)
    assert task.max_new_tokens > task.MAX_LENGTH  # room for the longest answer and <eos>
    examples = task.sft_examples(4000, seed=0)
    # A wrong target is the right answer with one adjacent pair swapped: same letters, exactly 2 differ.
    for word, target in examples:
        answer = task.reference_answer(word)
        assert sorted(target) == sorted(answer)
        assert sum(x != y for x, y in zip(target, answer)) in (0, 2)
    # The error rate rises with the length: 0.1 at 3 letters, 0.6 at 12 (binomial std about 0.02-0.03).
    assert task.error_rate(task.MIN_LENGTH) == pytest.approx(0.1)
    assert task.error_rate(task.MAX_LENGTH) == pytest.approx(0.6)
    short = [t != task.reference_answer(w) for w, t in examples if len(w) <= 5]
    long = [t != task.reference_answer(w) for w, t in examples if len(w) >= 10]
    assert 0.07 < sum(short) / len(short) < 0.25
    assert 0.40 < sum(long) / len(long) < 0.65


def test_sentiment_reward_hand_cases():
    task = SentimentTask()
    assert task.reward("the film was", "great.") == 1.0
    assert task.reward("the film was", "really awful.") == -0.5
    assert task.reward("the film was", "dull, but the cast was lovely.") == 0.0
    assert task.reward("the film was", "good, and the music was superb.") == pytest.approx(2 / 6)  # 6 words
    assert task.reward("the film was", "GREAT") == 1.0  # case-insensitive
    assert task.reward("the film was", "greatness goodness") == 0.0  # whole words only
    assert task.reward("the film was", "") == 0.0
    assert task.reward("the film was", "?!.") == 0.0


def test_sentiment_prompts_and_sft_examples():
    task = SentimentTask()
    prompts = task.make_prompts(200, seed=0)
    assert prompts == task.make_prompts(200, seed=0)
    assert len(set(prompts)) > 20
    examples = task.sft_examples(2000, seed=0)
    rewards = [task.reward(p, c) for p, c in examples]
    assert all(-1.0 <= r <= 1.0 for r in rewards)
    assert min(rewards) == -1.0 and max(rewards) == 1.0
    assert abs(sum(rewards) / len(rewards)) < 0.05  # mixed sentiment, balanced on average
    assert max(len(c) for _, c in examples) < task.max_new_tokens
    assert all(set(p + c) <= set(ALPHABET) for p, c in examples)


# --- SFT ---------------------------------------------------------------------------------------------


def test_encode_example_masks_the_prompt(tokenizer):
    input_ids, labels = encode_example(tokenizer, "abc", "cba")
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "abc"}], add_generation_prompt=True
    )["input_ids"]
    completion_ids = tokenizer("cba")["input_ids"] + [tokenizer.eos_token_id]
    assert input_ids == prompt_ids + completion_ids
    assert labels == [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def test_sft_reduces_loss(tokenizer):
    """100 steps on the sentiment task: from about ln(53) = 3.97 (uniform) to a last-10 mean below 1.0."""
    task = get_task("sentiment")
    model = build_tiny_llama(tokenizer, seed=0)
    losses = sft(
        model, tokenizer, task.sft_examples(800, seed=0), steps=100, batch_size=8, seed=0, progress=False
    )
    assert len(losses) == 100
    assert abs(losses[0] - math.log(len(tokenizer))) < 0.2
    assert sum(losses[-10:]) / 10 < 1.0
    assert not model.training


def test_sft_is_deterministic(tokenizer):
    examples = get_task("reverse").sft_examples(50, seed=0)
    runs = []
    for _ in range(2):
        model = build_tiny_llama(tokenizer, seed=0)
        losses = sft(model, tokenizer, examples, steps=4, batch_size=32, seed=7, progress=False)
        runs.append((losses, model.lm_head.weight.detach().clone()))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])
    other = build_tiny_llama(tokenizer, seed=0)
    assert sft(other, tokenizer, examples, steps=4, batch_size=32, seed=8, progress=False) != runs[0][0]


# --- sampling and pairs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tokenizer):
    """A briefly trained reverse model: its greedy outputs depend on the prompt."""
    model = build_tiny_llama(tokenizer, seed=0)
    sft(
        model,
        tokenizer,
        get_task("reverse").sft_examples(640, seed=0),
        steps=20,
        batch_size=32,
        progress=False,
    )
    return model


def test_sample_completions_shape_and_determinism(tokenizer, model):
    prompts = ["abc", "pumzxyqwer", "ok"]
    state = torch.random.get_rng_state()
    first = sample_completions(model, tokenizer, prompts, n=5, temperature=1.0, max_new_tokens=12, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    assert [len(c) for c in first] == [5, 5, 5]
    assert all(len(tokenizer(c)["input_ids"]) <= 12 for cs in first for c in cs)
    assert sample_completions(model, tokenizer, prompts, 5, 1.0, 12, seed=3) == first
    assert sample_completions(model, tokenizer, prompts, 5, 1.0, 12, seed=4) != first


def test_batched_left_padded_greedy_equals_one_by_one(tokenizer, model):
    prompts = ["abc", "abcdefghijkl", "xy", "pumz"]  # different lengths: the batch is left-padded
    batched = sample_completions(model, tokenizer, prompts, n=1, temperature=0.0, max_new_tokens=16)
    single = [
        sample_completions(model, tokenizer, [p], n=1, temperature=0.0, max_new_tokens=16)[0] for p in prompts
    ]
    assert batched == single


def test_pair_indices_hand_cases():
    assert pair_indices([0.0, 1.0, 0.0, 1.0]) == [(1, 2)]
    assert pair_indices([0.0, 1.0, 0.0, 1.0], pairs_per_prompt=2) == [(1, 2), (3, 0)]
    assert pair_indices([1.0, 0.0, 0.0, 0.0], pairs_per_prompt=2) == [(0, 3)]  # second pair would tie
    assert pair_indices([0.5, 0.5, 0.5]) == []
    assert pair_indices([0.1, 0.9, 0.4, -0.2, 0.7], pairs_per_prompt=3) == [(1, 3), (4, 0)]


class _LengthTask:
    """Reward = completion length, except for prompts starting with "t", where every sample ties at 0."""

    name = "length"
    max_new_tokens = 8

    def reward(self, prompt: str, completion: str) -> float:
        return 0.0 if prompt.startswith("t") else float(len(completion))


def test_make_preference_pairs(tokenizer, model, tmp_path):
    task = _LengthTask()
    prompts = ["tie", "abc", "tuv", "pumz", "xyzzy", "tt"]
    rows, stats = make_preference_pairs(task, model, tokenizer, prompts, samples_per_prompt=6, seed=0)
    # The same sampling, redone: which prompts have all samples tied.
    samples = sample_completions(model, tokenizer, prompts, 6, 1.0, task.max_new_tokens, seed=0)
    samples = [[c for c in cs if c.strip()] for cs in samples]  # empty completions are never paired
    tied = [p for p, cs in zip(prompts, samples) if len({task.reward(p, c) for c in cs}) < 2]
    assert {"tie", "tuv", "tt"} <= set(tied)
    assert isinstance(stats, PairingStats)
    assert stats.skipped_all_tied == len(tied)
    assert stats.num_pairs == len(rows) == len(prompts) - len(tied)
    assert [r["prompt"][0]["content"] for r in rows] == [p for p in prompts if p not in tied]
    for row, (prompt, completions) in zip(
        rows, [(p, cs) for p, cs in zip(prompts, samples) if p not in tied]
    ):
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["prompt"] == [{"role": "user", "content": prompt}]
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert task.reward(prompt, chosen) > task.reward(prompt, rejected)
        assert task.reward(prompt, chosen) == max(task.reward(prompt, c) for c in completions)
        assert task.reward(prompt, rejected) == min(task.reward(prompt, c) for c in completions)
    assert stats.mean_chosen_reward > stats.mean_rejected_reward
    with pytest.raises(ValueError, match="samples_per_prompt"):
        make_preference_pairs(task, model, tokenizer, prompts, samples_per_prompt=1)


def test_make_preference_pairs_never_pairs_an_empty_completion(tokenizer, model, monkeypatch):
    """An empty sample has the lowest length reward, but an empty response is a bad row for the data loader:
    it must not become a rejected response; it is counted instead."""
    import tether.toy.pairs as pairs_module

    fixed = [["", "ab", "abcd", " "], ["", "", "xyz", "  "], ["abc", "", "a", "abcde"]]
    monkeypatch.setattr(pairs_module, "sample_completions", lambda *args, **kwargs: fixed)
    rows, stats = make_preference_pairs(
        _LengthTask(), model, tokenizer, ["p", "q", "r"], samples_per_prompt=4
    )
    pairs = [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]
    assert pairs == [("abcd", "ab"), ("abcde", "a")]
    assert (stats.empty_samples, stats.skipped_all_tied, stats.num_pairs) == (6, 1, 2)


def test_make_preference_pairs_all_tied(tokenizer, model):
    rows, stats = make_preference_pairs(_LengthTask(), model, tokenizer, ["ta", "tb"], samples_per_prompt=3)
    assert rows == []
    assert (stats.num_pairs, stats.skipped_all_tied) == (0, 2)
    assert math.isnan(stats.mean_chosen_reward)


def test_write_jsonl_is_atomic_and_round_trips(tmp_path):
    rows = [
        {
            "prompt": [{"role": "user", "content": "abc"}],
            "chosen": [{"role": "assistant", "content": "cba"}],
            "rejected": [{"role": "assistant", "content": "bca"}],
        }
    ] * 3
    path = tmp_path / "sub" / "pairs.jsonl"
    path.parent.mkdir()
    path.write_text("old content\n")
    write_jsonl(rows, path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    assert [p.name for p in path.parent.iterdir()] == ["pairs.jsonl"]  # no temp file left behind

    def failing_rows():
        yield rows[0]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(failing_rows(), path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows  # old file intact
    assert [p.name for p in path.parent.iterdir()] == ["pairs.jsonl"]
