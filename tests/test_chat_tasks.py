"""Tests of the built-in chat tasks (`tether.chat_tasks`): prompts, the counting verifier, the review reward."""

from __future__ import annotations

import pytest

from tether.chat_tasks import CHAT_TASKS, CountTask, ReviewTask, get_chat_task
from tether.evaluate.runner import get_task

COUNT = CountTask()
PROMPT = "List the whole numbers from 58 to 64, separated by commas."


def test_count_prompts_are_deterministic_per_seed_and_in_range():
    prompts = COUNT.make_prompts(200, seed=3)
    assert prompts == COUNT.make_prompts(200, seed=3)
    assert prompts != COUNT.make_prompts(200, seed=4)
    sizes = set()
    for prompt in prompts:
        a, b = COUNT.bounds(prompt)
        assert 10 <= a <= 90 and b <= 99
        sizes.add(b - a + 1)
    assert sizes == set(range(6, 11))  # every list length 6..10 occurs in 200 draws


def test_count_reference_answer_passes_its_verifier():
    assert COUNT.reference_answer(PROMPT) == "58, 59, 60, 61, 62, 63, 64"
    for prompt in COUNT.make_prompts(50, seed=0):
        assert COUNT.verify(prompt, COUNT.reference_answer(prompt))
    assert [p for p, _ in COUNT.sft_examples(5, seed=2)] == COUNT.make_prompts(5, seed=2)


@pytest.mark.parametrize(
    "completion",
    [
        "58, 59, 60, 61, 62, 63, 64",
        "58,59,60,61,62,63,64.",
        "  58 59 60 61 62 63 64\n",
        "58, 59, 60, 61, 62, 63 and 64",
        "58; 59; 60; 61; 62; 63; 64",
        "Sure! Here are the whole numbers from 58 to 64:\n\n58, 59, 60, 61, 62, 63, 64.",
        "The numbers are: {58, 59, 60, 61, 62, 63, 64}",
        "1. 58\n2. 59\n3. 60\n4. 61\n5. 62\n6. 63\n7. 64",
        "- 58\n- 59\n- 60\n- 61\n- 62\n- 63\n- 64\n\nI hope this helps!",
        "58\n59\n60\n61\n62\n63\n64",
        "Here are the whole numbers between 58 and 64: 58, 59, 60, 61, 62, 63, 64",
        "58, 59, 60, 61, 62, 63, 64\n\nSo the list is 58, 59, 60, 61, 62, 63, 64.",  # the same list twice
    ],
)
def test_count_verifier_accepts_right_lists_in_any_layout(completion):
    assert COUNT.verify(PROMPT, completion)
    assert COUNT.reward(PROMPT, completion) == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "58, 59, 60, 61, 62, 63",  # stops early
        "58, 59, 60, 61, 62, 63, 64, 65",  # overruns b
        "57, 58, 59, 60, 61, 62, 63, 64",  # starts before a
        "58, 59, 60, 62, 63, 64",  # skips a number
        "58, 59, 60, 60, 61, 62, 63, 64",  # repeats one
        "64, 63, 62, 61, 60, 59, 58",  # wrong order
        "58, 59, 60, 61, 62, 63, 64, and finally 65",  # a number outside [a, b] after the list
        "There are 7 numbers: 58, 59, 60, 61, 62, 63, 64",  # a number outside [a, b] before it
        "58, 59, 60, 61, 62, 63, 64\n58, 59, 60",  # the list goes on
        "[58, 59, 60, 61, 62, 63, 64]\n\nGrouped: 58, 60, 62",  # a second, different list
        "58 to 64",  # no list
        "585960616263 64",  # digits run together
    ],
)
def test_count_verifier_rejects_wrong_numbers(completion):
    assert not COUNT.verify(PROMPT, completion)
    assert COUNT.reward(PROMPT, completion) == 0.0


def test_count_runs_strip_list_markers_only_before_numbers():
    assert COUNT.runs("1. 58\n2) 59\n* 60") == [[58, 59, 60]]
    assert COUNT.runs("64.\n65") == [[64], [65]]  # "64." ending a line is no list marker
    assert COUNT.runs("58 to 64: 58, 59") == [[58], [64], [58, 59]]


@pytest.mark.parametrize(
    "prompt", ["List the whole numbers from 9 to 3, separated by commas.", "Count from 1 to 5.", "58"]
)
def test_count_rejects_prompts_it_did_not_make(prompt):
    with pytest.raises(ValueError, match="count task"):
        COUNT.verify(prompt, "1, 2, 3")


def test_review_reward_counts_lexicon_words_per_word():
    task = ReviewTask()
    prompt = task.make_prompts(1, seed=0)[0]
    assert task.reward(prompt, "") == 0.0
    assert task.reward(prompt, "Great pizza, friendly staff.") == 2 / 4
    assert task.reward(prompt, "The food was GOOD but the service was slow and rude.") == (1 - 2) / 11
    assert task.reward(prompt, "Bad.") == -1.0
    assert task.reward(prompt, "A restaurant.") == 0.0


def test_review_prompts_are_deterministic_and_vary():
    task = ReviewTask()
    prompts = task.make_prompts(64, seed=1)
    assert prompts == task.make_prompts(64, seed=1) and prompts != task.make_prompts(64, seed=2)
    assert len(set(prompts)) > 8
    assert all(p.startswith("Write a short review of a ") for p in prompts)
    for prompt, review in task.sft_examples(20, seed=0):
        assert abs(task.reward(prompt, review)) == pytest.approx(1 / 3)  # "It was <word>."


def test_chat_tasks_are_found_by_name_and_by_tether_eval():
    assert set(CHAT_TASKS) == {"count", "count_from_one", "review"}
    assert get_chat_task("count") is CHAT_TASKS["count"]
    assert get_task("review") is CHAT_TASKS["review"]  # `tether eval` task: review
    assert get_task("reverse").name == "reverse"  # toy tasks still resolve
    with pytest.raises(KeyError, match="known: \\['count', 'count_from_one', 'review'\\]"):
        get_chat_task("addition")


def test_count_from_one_asks_from_1_to_10_to_15_and_verifies_like_count():
    """count_from_one: a = 1 and 10-15 numbers, so b in 10..15 (6 distinct prompts); the verifier is count's."""
    task = get_chat_task("count_from_one")
    prompts = task.make_prompts(64, seed=0)
    assert {task.bounds(p) for p in prompts} <= {(1, b) for b in range(10, 16)}
    assert len(set(prompts)) > 1
    assert prompts == task.make_prompts(64, seed=0)
    prompt = "List the whole numbers from 1 to 12, separated by commas."
    assert task.verify(prompt, "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12")
    assert not task.verify(prompt, "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11")  # stops early
    assert not task.verify(prompt, "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13")  # overruns
