"""Diversity of a set of samples for one prompt; no embeddings, nothing to download.

Units: `unit="word"` splits on whitespace (`str.split()`), `unit="char"` takes every character (spaces
included). All three metrics are computed over the n samples of one prompt; the runner averages them over
prompts.

- distinct-n (Li et al. 2016): unique n-grams / total n-grams, pooled over the samples (n-grams never cross
  sample boundaries). 0.0 when there is no n-gram at all.
- unique answers: the number of different samples after `str.strip()`.
- mean pairwise normalized edit distance: mean over the n(n-1)/2 unordered pairs of
  Levenshtein(a, b) / max(len(a), len(b)) in units; 0 for identical samples, 1 for samples with nothing in
  common at any position. 0.0 for fewer than two samples; a pair of two empty samples counts 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Literal

import numpy as np

Unit = Literal["word", "char"]


def tokenize(text: str, unit: Unit = "word") -> list[str]:
    """Split a sample into units: whitespace-separated words or single characters."""
    if unit == "word":
        return text.split()
    if unit == "char":
        return list(text)
    raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")


def distinct_n(samples: Sequence[str], n: int, unit: Unit = "word") -> float:
    """Unique n-grams / total n-grams, pooled over `samples`; 0.0 when they hold no n-gram."""
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    grams: list[tuple[str, ...]] = []
    for text in samples:
        units = tokenize(text, unit)
        grams.extend(tuple(units[i : i + n]) for i in range(len(units) - n + 1))
    if not grams:
        return 0.0
    return len(set(grams)) / len(grams)


def unique_answers(samples: Sequence[str]) -> int:
    """Number of different samples after stripping surrounding whitespace."""
    return len({s.strip() for s in samples})


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance (unit-cost insert, delete, substitute) between two unit sequences.

    Row-by-row dynamic programme, each row vectorized: the insertion recurrence
    cur[j] = min(tmp[j], cur[j-1] + 1) is a running minimum of tmp[j] - j, plus j.
    """
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    vocab: dict[str, int] = {}
    ia = np.array([vocab.setdefault(u, len(vocab)) for u in a])
    ib = np.array([vocab.setdefault(u, len(vocab)) for u in b])
    cols = np.arange(len(b) + 1)
    prev = cols.copy()
    for i in range(1, len(a) + 1):
        tmp = np.empty_like(prev)
        tmp[0] = i
        sub = prev[:-1] + (ib != ia[i - 1])
        tmp[1:] = np.minimum(prev[1:] + 1, sub)
        prev = np.minimum.accumulate(tmp - cols) + cols
    return int(prev[-1])


def pairwise_edit_distance(samples: Sequence[str], unit: Unit = "word") -> float:
    """Mean over unordered pairs of edit distance / max length, in `unit`s; 0.0 for < 2 samples."""
    units = [tokenize(s, unit) for s in samples]
    scores = []
    for a, b in combinations(units, 2):
        longest = max(len(a), len(b))
        scores.append(0.0 if longest == 0 else edit_distance(a, b) / longest)
    return float(np.mean(scores)) if scores else 0.0
