"""Scaling-law plots to PNG: IsoFLOP profiles, the fitted loss surface, the compute-optimal frontier,
residuals. Each takes points and fits from analysis.scaling and returns the path it wrote."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from analysis.scaling import IsoFlopOptima, PowerLaw, ScalingPoints, isoflop_groups

LossFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _pyplot():
    import matplotlib  # noqa: PLC0415  (plotting is optional; keep it off the import path)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    fig.clf()
    return path


def plot_isoflop(points: ScalingPoints, path: str | Path, rel_tolerance: float = 0.05,
                 optima: IsoFlopOptima | None = None, law: LossFn | None = None) -> Path:
    """Loss vs N for each IsoFLOP group: the runs, the group's parabola in log N and its minimum, and
    (dashed) the fitted law along the same budget when `law` is given (D = C / FLOPs-per-token of each run)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    groups = isoflop_groups(points, rel_tolerance)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(groups)))
    for group, color in zip(groups, colors):
        n, loss = points.n_params[group], points.loss[group]
        compute = float(np.exp(np.log(points.compute[group]).mean()))
        ax.scatter(n, loss, color=color, edgecolors="k", linewidths=0.4, zorder=3, label=f"C = {compute:.2g}")
        if len(np.unique(n)) >= 3:
            grid = np.geomspace(n.min(), n.max(), 100)
            ax.plot(grid, np.polyval(np.polyfit(np.log(n), loss, 2), np.log(grid)), color=color, lw=1)
        if law is not None:
            order = np.argsort(n)
            ax.plot(n[order], law(n[order], points.n_tokens[group][order]), color=color, ls="--", lw=1)
    if optima is not None:
        ax.scatter(optima.n_opt, optima.loss_opt, marker="*", s=140, color="red", zorder=4, label="parabola minima")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("IsoFLOP profiles (solid: parabola in log N; dashed: fitted law)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_contours(points: ScalingPoints, law: LossFn, path: str | Path, title: str = "",
                  frontier: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    """The fitted L(N, D) as filled contours over log N x log D, the runs coloured by their loss on the
    same scale, and the compute-optimal path (N*, D*) when given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=120)
    n = np.geomspace(points.n_params.min() / 2, points.n_params.max() * 2, 120)
    d = np.geomspace(points.n_tokens.min() / 2, points.n_tokens.max() * 2, 120)
    grid_n, grid_d = np.meshgrid(n, d)
    surface = law(grid_n, grid_d)
    levels = np.linspace(min(surface.min(), points.loss.min()), np.percentile(surface, 95), 15)
    filled = ax.contourf(grid_n, grid_d, surface, levels=levels, cmap="viridis", extend="max")
    ax.contour(grid_n, grid_d, surface, levels=levels, colors="k", linewidths=0.3)
    ax.scatter(points.n_params, points.n_tokens, c=points.loss, cmap="viridis", vmin=levels[0], vmax=levels[-1],
               edgecolors="w", linewidths=1, s=50, zorder=3)
    if frontier is not None and np.any(np.isfinite(frontier[0])):
        ax.plot(*frontier, "r--", lw=1.5, label="compute-optimal N*, D*")
        ax.legend(loc="upper right", fontsize=8)
    fig.colorbar(filled, ax=ax, label="loss")
    ax.set(xscale="log", yscale="log", xlim=(n[0], n[-1]), ylim=(d[0], d[-1]), xlabel="non-embedding parameters N",
           ylabel="training tokens D", title=title or "fitted loss surface")
    return _save(fig, path)


def plot_frontier(budgets: np.ndarray, frontiers: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path,
                  optima: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                  power_laws: Mapping[str, PowerLaw] | None = None) -> Path:
    """N*(C) and D*(C): one curve per fit in `frontiers` (label -> (N*, D*) at `budgets`), and
    Approach 2's IsoFLOP minima (C, N*, D*) with their power laws when given."""
    plt = _pyplot()
    fig, (ax_n, ax_d) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    for label, (n_opt, d_opt) in frontiers.items():
        if np.any(np.isfinite(n_opt)):  # NaN: no interior optimum at that budget
            ax_n.plot(budgets, n_opt, label=label)
            ax_d.plot(budgets, d_opt, label=label)
    if optima is not None:
        compute, n_points, d_points = optima
        ax_n.scatter(compute, n_points, color="red", marker="*", s=120, zorder=3, label="IsoFLOP minima")
        ax_d.scatter(compute, d_points, color="red", marker="*", s=120, zorder=3, label="IsoFLOP minima")
    if power_laws is not None:
        for ax, key in ((ax_n, "n_opt"), (ax_d, "d_opt")):
            ax.plot(budgets, power_laws[key](budgets), "r:", label=f"Approach 2: C^{power_laws[key].exponent:.2f}")
    for ax, what in ((ax_n, "N* (non-embedding parameters)"), (ax_d, "D* (tokens)")):
        ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel=what)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("compute-optimal allocation")
    return _save(fig, path)


def plot_residuals(points: ScalingPoints, laws: Mapping[str, LossFn], path: str | Path) -> Path:
    """Observed minus fitted loss against the fitted loss, per law, coloured by N."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(laws), figsize=(5.5 * len(laws), 4.2), dpi=120, squeeze=False)
    for ax, (label, law) in zip(axes[0], laws.items()):
        predicted = law(points.n_params, points.n_tokens)
        dots = ax.scatter(predicted, points.loss - predicted, c=np.log10(points.n_params), cmap="viridis",
                          edgecolors="k", linewidths=0.3)
        ax.axhline(0, color="grey", lw=1)
        rms = float(np.sqrt(np.mean((points.loss - predicted) ** 2)))
        ax.set(xlabel="fitted loss", ylabel="observed - fitted", title=f"{label} (RMS {rms:.4f})")
        fig.colorbar(dots, ax=ax, label="log10 N")
    return _save(fig, path)
