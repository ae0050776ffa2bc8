"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1).

With n samples per problem of which c are correct, the probability that at least one of k samples drawn
without replacement is correct is

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

The product form (the paper's numerically stable implementation) never forms the huge binomials.
pass@k is defined for k <= n only; the benchmark score is the mean of pass@k over problems.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def _pass_at_k_scalar(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k(n: int | np.ndarray, c: int | np.ndarray, k: int | np.ndarray) -> float | np.ndarray:
    """Unbiased pass@k estimate 1 - C(n-c, k)/C(n, k), elementwise over broadcast arrays.

    Args:
        n: samples per problem, shape (P,) or scalar.
        c: correct samples per problem, same or broadcastable shape, 0 <= c <= n.
        k: samples drawn, broadcastable, 1 <= k <= n.

    Returns:
        A float for scalar inputs, else a float64 array of the broadcast shape.

    Raises:
        ValueError: when an element violates 0 <= c <= n or 1 <= k <= n.
    """
    n_arr, c_arr, k_arr = np.broadcast_arrays(np.asarray(n), np.asarray(c), np.asarray(k))
    for name, arr in (("n", n_arr), ("c", c_arr), ("k", k_arr)):
        if arr.size and not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"pass_at_k: {name} must hold integers, got {arr!r}")
    if np.any(c_arr < 0) or np.any(c_arr > n_arr):
        raise ValueError("pass_at_k: every c must satisfy 0 <= c <= n")
    if np.any(k_arr < 1) or np.any(k_arr > n_arr):
        raise ValueError("pass_at_k: every k must satisfy 1 <= k <= n (draw at least k samples per problem)")
    out = np.empty(n_arr.shape, dtype=np.float64)
    for idx in np.ndindex(n_arr.shape):
        out[idx] = _pass_at_k_scalar(int(n_arr[idx]), int(c_arr[idx]), int(k_arr[idx]))
    if out.ndim == 0:
        return float(out)
    return out


def mean_pass_at_k(
    num_samples: Sequence[int] | np.ndarray, num_correct: Sequence[int] | np.ndarray, ks: Iterable[int]
) -> dict[int, float]:
    """Mean over problems of pass@k for each k; k larger than any problem's n is left out.

    Args:
        num_samples: (P,) samples per problem.
        num_correct: (P,) correct samples per problem.
        ks: the k values wanted.

    Returns:
        {k: mean pass@k} for every k <= min(num_samples), in the order given.
    """
    n = np.asarray(num_samples)
    c = np.asarray(num_correct)
    if n.shape != c.shape or n.ndim != 1 or n.size == 0:
        raise ValueError("mean_pass_at_k: num_samples and num_correct must be equal-length, non-empty 1-D")
    return {int(k): float(np.mean(pass_at_k(n, c, int(k)))) for k in ks if int(k) <= int(n.min())}
