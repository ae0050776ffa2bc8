"""The two built-in toy tasks and their registry.

- `ReverseTask` ("reverse"), verifiable: the prompt "pumz" asks for "zmup", checked by exact match. Words
  have 3 to 12 letters and a length-dependent share of the SFT targets is wrong, so the reference is right
  more often on short words than long ones and more often greedily than at temperature 1. It is the
  setting for pass@k and diversity: any number of samples per prompt can be checked exactly.
- `SentimentTask` ("sentiment"), controlled generation with a scalar reward (TDPO's IMDb
  controlled-sentiment setting in miniature): prompts are short review openings ("the film was"), the
  reward is (positive words - negative words) / words of the completion, in [-1, 1], from fixed lexicons.
  Its SFT completions mix positive and negative words, so the reference writes reviews of every sentiment.

Each task has a `name`, `make_prompts(n, seed)`, `sft_examples(n, seed)` -> [(prompt, completion)] and
`reward(prompt, completion)`. Prompts and completions are plain text (the chat template is applied by
whoever tokenizes them). Everything is a pure function of its arguments; the seed fixes the sample.
"""

from __future__ import annotations

import random
import re
import string
from typing import ClassVar, Protocol


class Task(Protocol):
    """What the toy pipeline needs from a task."""

    name: str
    max_new_tokens: int  # enough new tokens to sample any completion the task expects (<eos> included)

    def make_prompts(self, n: int, seed: int) -> list[str]: ...

    def sft_examples(self, n: int, seed: int) -> list[tuple[str, str]]: ...

    def reward(self, prompt: str, completion: str) -> float: ...


class ReverseTask:
    """Verifiable string reversal: the prompt is a word ("pumz"), the answer the word reversed ("zmup").

    Words are random lowercase strings of MIN_LENGTH..MAX_LENGTH letters (uniform length). The SFT targets
    are corrupted (two adjacent differing letters swapped) with a probability that rises linearly with the
    length, from ERROR_RATE[0] at MIN_LENGTH to ERROR_RATE[1] at MAX_LENGTH. The reference learns that
    mistake distribution on top of its own errors: sampled at temperature 1 it fails often, more so on long
    words, while its most likely answer (greedy) is usually right, which is what entropy-controlling
    objectives act on. Measured by `tether demo` after 600 SFT steps of batch 32 (docs/toy.md): pass@1 0.56
    at temperature 1 and 0.93 at 0.25.
    """

    name = "reverse"
    max_new_tokens: int = 16  # answers have at most MAX_LENGTH = 12 characters, then <eos>
    MIN_LENGTH: ClassVar[int] = 3
    MAX_LENGTH: ClassVar[int] = 12
    ERROR_RATE: ClassVar[tuple[float, float]] = (0.1, 0.6)
    _PROMPT = re.compile(r"([a-z]+)")

    def _word(self, rng: random.Random) -> str:
        length = rng.randint(self.MIN_LENGTH, self.MAX_LENGTH)
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))

    def make_prompts(self, n: int, seed: int) -> list[str]:
        rng = random.Random(f"{self.name}/prompts/{seed}")
        return [self._word(rng) for _ in range(n)]

    def reference_answer(self, prompt: str) -> str:
        """The correct completion of `prompt`; raises ValueError unless it is lowercase letters a-z."""
        match = self._PROMPT.fullmatch(prompt.strip())
        if match is None:
            raise ValueError(f"reverse task: prompt {prompt!r} is not a word of lowercase letters a-z")
        return match.group(1)[::-1]

    def verify(self, prompt: str, completion: str) -> bool:
        return completion.strip() == self.reference_answer(prompt)

    def reward(self, prompt: str, completion: str) -> float:
        """1.0 if the completion is the reversed word, else 0.0."""
        return 1.0 if self.verify(prompt, completion) else 0.0

    def error_rate(self, length: int) -> float:
        """Probability that the SFT target of a word of this length is corrupted."""
        low, high = self.ERROR_RATE
        return low + (high - low) * (length - self.MIN_LENGTH) / (self.MAX_LENGTH - self.MIN_LENGTH)

    def sft_examples(self, n: int, seed: int) -> list[tuple[str, str]]:
        """n (prompt, target) pairs; a length-dependent fraction of targets is wrong (see the class doc)."""
        rng = random.Random(f"{self.name}/sft/{seed}")
        examples = []
        for _ in range(n):
            word = self._word(rng)
            target = word[::-1]
            if rng.random() < self.error_rate(len(word)):
                target = _swap_adjacent(target, rng)
            examples.append((word, target))
        return examples


def _swap_adjacent(text: str, rng: random.Random) -> str:
    """`text` with one random pair of adjacent differing characters swapped (unchanged if there is none)."""
    positions = [i for i in range(len(text) - 1) if text[i] != text[i + 1]]
    if not positions:
        return text
    i = rng.choice(positions)
    return text[:i] + text[i + 1] + text[i] + text[i + 2 :]


class SentimentTask:
    """Controlled sentiment: reward = (#positive - #negative) / #words of the completion, in [-1, 1].

    Words are maximal runs of letters and apostrophes, compared in lower case with the POSITIVE and
    NEGATIVE lexicons; a completion without words scores 0. Prompts are review openings (subject + verb,
    e.g. "the plot felt"); SFT completions are one or two clauses whose adjectives are positive or negative
    with probability 1/2 each ("quite dull, but the music was lovely.").
    """

    name = "sentiment"
    max_new_tokens: int = 64  # SFT completions have at most 53 characters
    POSITIVE: ClassVar[frozenset[str]] = frozenset(
        {"good", "great", "fun", "superb", "lovely", "brilliant", "moving", "charming"}
    )
    NEGATIVE: ClassVar[frozenset[str]] = frozenset(
        {"bad", "dull", "awful", "boring", "weak", "poor", "messy", "tedious"}
    )
    SUBJECTS: ClassVar[tuple[str, ...]] = (
        "the film",
        "the movie",
        "this story",
        "the acting",
        "the plot",
        "the cast",
        "the music",
        "the script",
        "the ending",
        "overall it",
    )
    VERBS: ClassVar[tuple[str, ...]] = ("was", "is", "felt", "seemed")
    _ADVERBS: ClassVar[tuple[str, ...]] = ("", "", "very ", "quite ", "really ")
    _WORD = re.compile(r"[a-z']+")

    def _opening(self, rng: random.Random) -> str:
        return f"{rng.choice(self.SUBJECTS)} {rng.choice(self.VERBS)}"

    def make_prompts(self, n: int, seed: int) -> list[str]:
        rng = random.Random(f"{self.name}/prompts/{seed}")
        return [self._opening(rng) for _ in range(n)]

    def reward(self, prompt: str, completion: str) -> float:
        """(#positive - #negative) / #words of `completion` (the prompt does not count), in [-1, 1]."""
        words = self._WORD.findall(completion.lower())
        if not words:
            return 0.0
        return sum((w in self.POSITIVE) - (w in self.NEGATIVE) for w in words) / len(words)

    def _completion(self, rng: random.Random) -> str:
        positive, negative = sorted(self.POSITIVE), sorted(self.NEGATIVE)

        def adjective() -> str:
            return rng.choice(self._ADVERBS) + rng.choice(positive if rng.random() < 0.5 else negative)

        text = adjective()
        if rng.random() < 0.5:
            text += f", {rng.choice(('and', 'but'))} {rng.choice(self.SUBJECTS[3:9])} was {adjective()}"
        return text + "."

    def sft_examples(self, n: int, seed: int) -> list[tuple[str, str]]:
        """n (opening, continuation) pairs of mixed sentiment."""
        rng = random.Random(f"{self.name}/sft/{seed}")
        return [(self._opening(rng), self._completion(rng)) for _ in range(n)]


TASKS: dict[str, Task] = {task.name: task for task in (ReverseTask(), SentimentTask())}


def get_task(name: str) -> Task:
    """The registered task called `name`; raises KeyError naming the known tasks otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown toy task {name!r}; known: {sorted(TASKS)}") from None
