"""PNG plots of an eval result (the dict `run_eval` writes to eval.json).

Figures are drawn on matplotlib's Agg canvas created inside each function (`Figure` + `FigureCanvasAgg`),
so nothing changes matplotlib's global backend and importing this module draws nothing.
Each function returns the path it wrote, or None when the result holds nothing to plot.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def _new_figure(ncols: int, width: float = 4.5, height: float = 3.6) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _rows(result: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """{model name: {temperature string: metrics}}, reference included when present."""
    return {name: entry["temperatures"] for name, entry in result["models"].items()}


def plot_pass_at_k(result: dict[str, Any], path: str) -> str | None:
    """pass@k against k (log axis), one panel per temperature, one line per model."""
    rows = _rows(result)
    temps = sorted({t for per_t in rows.values() for t in per_t}, key=float)
    if not any("pass@k" in m for per_t in rows.values() for m in per_t.values()):
        return None
    fig = _new_figure(len(temps))
    axes = fig.subplots(1, len(temps), squeeze=False)[0]
    for ax, temp in zip(axes, temps):
        for name, per_t in rows.items():
            passk = per_t.get(temp, {}).get("pass@k")
            if passk:
                ks = sorted(passk, key=int)
                ax.plot([int(k) for k in ks], [passk[k] for k in ks], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"T = {float(temp):g}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def plot_entropy_diversity(result: dict[str, Any], path: str) -> str | None:
    """Token entropy, unique answers per prompt, distinct-2 and pairwise edit distance against temperature,
    one line per model."""
    rows = _rows(result)
    panels = [
        ("entropy", "entropy per token (nats)"),
        ("unique_answers", "unique answers per prompt"),
        ("distinct_2", "distinct-2"),
        ("edit_distance", "pairwise edit distance"),
    ]
    fig = _new_figure(len(panels))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    drawn = False
    for ax, (key, label) in zip(axes, panels):
        for name, per_t in rows.items():
            temps = sorted((t for t in per_t if per_t[t].get(key) is not None), key=float)
            if temps:
                ax.plot([float(t) for t in temps], [per_t[t][key] for t in temps], marker="o", label=name)
                drawn = True
        ax.set_xlabel("temperature")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if not drawn:
        return None
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def pareto_front(kl: np.ndarray, reward: np.ndarray) -> np.ndarray:
    """Indices of points no other point beats (lower or equal KL and higher or equal reward, one strictly),
    sorted by KL. kl, reward: (N,)."""
    order = np.lexsort((-reward, kl))
    front, best = [], -np.inf
    for i in order:
        if reward[i] > best:
            front.append(i)
            best = reward[i]
    return np.asarray(front, dtype=int)


def plot_reward_kl(result: dict[str, Any], path: str) -> str | None:
    """Mean reward against mean forward sequential KL, a point per (model, temperature), with the frontier."""
    points = []
    for name, per_t in _rows(result).items():
        for temp, metrics in per_t.items():
            if metrics.get("reward") is not None and metrics.get("kl_forward") is not None:
                points.append((name, float(temp), metrics["kl_forward"], metrics["reward"]))
    if not points:
        return None
    fig = _new_figure(1, width=5.5, height=4.2)
    ax = fig.subplots()
    for name in dict.fromkeys(p[0] for p in points):
        mine = [p for p in points if p[0] == name]
        ax.scatter([p[2] for p in mine], [p[3] for p in mine], label=name)
        for _, temp, x, y in mine:
            ax.annotate(f"T={temp:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    kl = np.array([p[2] for p in points])
    reward = np.array([p[3] for p in points])
    if len(points) > 1:
        front = pareto_front(kl, reward)
        ax.plot(kl[front], reward[front], color="black", alpha=0.5, linestyle="--", label="frontier")
    ax.set_xlabel("sequential KL(pi_ref || pi) per response (nats)")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def plot_all(result: dict[str, Any], output_dir: str) -> list[str]:
    """Every plot that has data, as PNGs in output_dir; returns the paths written."""
    os.makedirs(output_dir, exist_ok=True)
    jobs = [
        (plot_pass_at_k, "pass_at_k.png"),
        (plot_entropy_diversity, "entropy_diversity.png"),
        (plot_reward_kl, "reward_vs_kl.png"),
    ]
    written = [fn(result, os.path.join(output_dir, name)) for fn, name in jobs]
    return [p for p in written if p is not None]
