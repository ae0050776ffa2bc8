"""Built-in chat tasks for a small pretrained instruct model (SmolLM2-135M-Instruct), and their registry.

- `CountTask` ("count"), verifiable: "List the whole numbers from 58 to 64, separated by commas." asks for
  the 6 to 10 consecutive two-digit numbers a..b. A correct answer is 22 to 38 SmolLM2 tokens long ("58, 59,
  60, 61, 62, 63, 64" is 26), long enough for sequence log-prob gaps between chosen and rejected responses
  to be large. `verify` is lenient about layout and strict about numbers (see its docstring).
  SmolLM2-135M-Instruct (from its 4-bit GGUF file) solves it at pass@1 about 0.06 at temperature 1
  (docs/real_tasks.md has the measurement): its samples mix right answers with lists that overrun b, skip or
  repeat a number, and with talk.
- `ReviewTask` ("review"), a scalar reward for TDPO-style controlled generation (in the spirit of TDPO's
  IMDb positive-sentiment setting): "Write a short review of a pizza restaurant." The reward is
  (#positive - #negative) / #words of the completion, in [-1, 1], from fixed lexicons.

They follow the toy tasks' interface (`tether.toy.tasks.Task`): `name`, `max_new_tokens`,
`make_prompts(n, seed)`, `sft_examples(n, seed)`, `reward(prompt, completion)`; `CountTask` also has
`verify` and `reference_answer`, and each a one-line `description` (the demo's report prints it). Prompts
and completions are plain text; whoever tokenizes them applies the chat template. Everything is a pure function of its arguments; the seed fixes the sample.
"""

from __future__ import annotations

import random
import re
from typing import ClassVar


class CountTask:
    """List the whole numbers from a to b: a uniform in [LOW, HIGH], COUNT[0]..COUNT[1] numbers, b <= 99."""

    name = "count"
    description: ClassVar[str] = "list the 6 to 10 consecutive two-digit whole numbers from a to b"
    # A 10-number numbered list ("1. 58\n2. 59\n...") takes about 60 tokens; a comma list at most 38 (+ <eos>).
    max_new_tokens: int = 64
    LOW: ClassVar[int] = 10
    HIGH: ClassVar[int] = 90
    COUNT: ClassVar[tuple[int, int]] = (6, 10)
    TEMPLATE: ClassVar[str] = "List the whole numbers from {a} to {b}, separated by commas."
    _PROMPT = re.compile(re.escape(TEMPLATE).replace(r"\{a\}", r"(\d+)").replace(r"\{b\}", r"(\d+)"))
    # A list marker at the start of a line, before a number: "3. ", "3) ", "- ", "* ", "• ".
    _MARKER = re.compile(r"^[ \t]*(?:[-*•]|\d+[.)])[ \t]+(?=\d)", re.MULTILINE)
    # A run: integers separated only by whitespace, commas, semicolons or the word "and".
    _RUN = re.compile(r"\d+(?:(?:[\s,;]|\band\b)+\d+)*")

    def make_prompts(self, n: int, seed: int) -> list[str]:
        rng = random.Random(f"{self.name}/prompts/{seed}")
        prompts = []
        for _ in range(n):
            a = rng.randint(self.LOW, self.HIGH)
            b = a + rng.randint(*self.COUNT) - 1
            prompts.append(self.TEMPLATE.format(a=a, b=b))
        return prompts

    def bounds(self, prompt: str) -> tuple[int, int]:
        """(a, b) of a prompt made by `make_prompts`; raises ValueError for any other text."""
        match = self._PROMPT.fullmatch(prompt.strip())
        if match is None or int(match.group(1)) > int(match.group(2)):
            raise ValueError(f"count task: {prompt!r} is not a prompt of the form {self.TEMPLATE!r}")
        return int(match.group(1)), int(match.group(2))

    def reference_answer(self, prompt: str) -> str:
        a, b = self.bounds(prompt)
        return ", ".join(str(i) for i in range(a, b + 1))

    def runs(self, completion: str) -> list[list[int]]:
        """The runs of integers in `completion`, list markers removed: "1. 58\\n2. 59" -> [[58, 59]]."""
        text = self._MARKER.sub("", completion)
        return [[int(x) for x in re.findall(r"\d+", m.group())] for m in self._RUN.finditer(text)]

    def verify(self, prompt: str, completion: str) -> bool:
        """True when a run of integers is exactly a, a+1, ..., b, no other run has 3 or more numbers, and every
        integer written lies in [a, b].

        Lenient about layout: any prose around the list ("Here they are: ..."), separators of commas,
        semicolons, spaces, newlines or "and", a numbered or bulleted list, braces or a final period.
        Strict about numbers: a missing, repeated or extra number in the list fails, and so does a second,
        different list ("... 64. Grouped: 58, 60, 62") or any number outside [a, b] ("... 64, and finally
        65", "there are 7 of them"); naming a and b in the prose ("from 58 to 64: 58, 59, ...", "between 58
        and 64: ...") does not.
        """
        a, b = self.bounds(prompt)
        runs = self.runs(completion)
        expected = list(range(a, b + 1))
        return (
            expected in runs
            and all(run == expected for run in runs if len(run) >= 3)
            and all(a <= x <= b for run in runs for x in run)
        )

    def reward(self, prompt: str, completion: str) -> float:
        """1.0 if `verify` passes, else 0.0."""
        return 1.0 if self.verify(prompt, completion) else 0.0

    def sft_examples(self, n: int, seed: int) -> list[tuple[str, str]]:
        """n (prompt, reference answer) pairs."""
        return [(p, self.reference_answer(p)) for p in self.make_prompts(n, seed)]


class ReviewTask:
    """Controlled sentiment: reward = (#positive - #negative) / #words of the completion, in [-1, 1].

    Words are maximal runs of letters and apostrophes, compared in lower case with the POSITIVE and
    NEGATIVE lexicons; a completion without words scores 0. Prompts ask for a short review of a thing
    ("Write a short review of a pizza restaurant."), neutral about the sentiment wanted.
    """

    name = "review"
    description: ClassVar[str] = "write a short review; reward = lexicon sentiment in [-1, 1]"
    max_new_tokens: int = 48
    POSITIVE: ClassVar[frozenset[str]] = frozenset(
        "good great excellent amazing wonderful fantastic delicious friendly beautiful perfect love loved "
        "lovely best enjoy enjoyed enjoyable fun happy nice impressive incredible awesome pleasant superb "
        "brilliant charming recommend fresh comfortable helpful favorite outstanding".split()
    )
    NEGATIVE: ClassVar[frozenset[str]] = frozenset(
        "bad poor terrible awful horrible boring dull disappointing disappointed worst hate hated slow rude "
        "dirty bland expensive overpriced mediocre noisy broken cold weak annoying mess messy unpleasant "
        "tasteless crowded uncomfortable unfortunately".split()
    )
    THINGS: ClassVar[tuple[str, ...]] = (
        "pizza restaurant",
        "coffee shop",
        "science fiction movie",
        "mystery novel",
        "hotel by the sea",
        "pair of running shoes",
        "video game",
        "museum",
        "bakery",
        "rock concert",
        "smartphone",
        "city park",
        "cooking class",
        "train journey",
        "board game",
        "music album",
    )
    _WORD = re.compile(r"[a-z']+")

    def make_prompts(self, n: int, seed: int) -> list[str]:
        rng = random.Random(f"{self.name}/prompts/{seed}")
        return [f"Write a short review of a {rng.choice(self.THINGS)}." for _ in range(n)]

    def reward(self, prompt: str, completion: str) -> float:
        """(#positive - #negative) / #words of `completion` (the prompt does not count), in [-1, 1]."""
        words = self._WORD.findall(completion.lower())
        if not words:
            return 0.0
        return sum((w in self.POSITIVE) - (w in self.NEGATIVE) for w in words) / len(words)

    def sft_examples(self, n: int, seed: int) -> list[tuple[str, str]]:
        """n (prompt, review) pairs: one positive or negative sentence each, with probability 1/2."""
        rng = random.Random(f"{self.name}/sft/{seed}")
        positive, negative = sorted(self.POSITIVE), sorted(self.NEGATIVE)
        examples = []
        for prompt in self.make_prompts(n, seed):
            word = rng.choice(positive if rng.random() < 0.5 else negative)
            examples.append((prompt, f"It was {word}."))
        return examples


class CountFromOneTask(CountTask):
    """`count` from 1: "List the whole numbers from 1 to b, separated by commas.", b in 10..15 (6 prompts).

    The calibrated task of docs/real_tasks.md: SmolLM2-135M-Instruct's pass@1 at T=1 (top_k off, top_p 1,
    64 new tokens, chat template) was 0.258 with `tether eval examples/eval_count.yaml task=count_from_one`
    (32 prompts x 8 samples; 0.195 in a first probe with another sampling seed), against 0.059 for `count`
    and 0.117 with a start drawn from 1..9. Right answers are 20-75 tokens (median 45). Only 6 distinct
    prompts: a test bed for one model's pass rate, not a data set of varied prompts.
    """

    name = "count_from_one"
    description: ClassVar[str] = "list the whole numbers from 1 to b, b in 10..15 (6 distinct prompts)"
    LOW: ClassVar[int] = 1
    HIGH: ClassVar[int] = 1
    COUNT: ClassVar[tuple[int, int]] = (10, 15)


CHAT_TASKS: dict[str, CountTask | ReviewTask] = {
    task.name: task for task in (CountTask(), CountFromOneTask(), ReviewTask())
}


def get_chat_task(name: str) -> CountTask | ReviewTask:
    """The chat task called `name`; raises KeyError naming the known chat tasks otherwise."""
    try:
        return CHAT_TASKS[name]
    except KeyError:
        raise KeyError(f"unknown chat task {name!r}; known: {sorted(CHAT_TASKS)}") from None
