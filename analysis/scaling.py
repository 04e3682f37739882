"""Scaling-law fits: Chinchilla's parametric loss, compute-optimal allocation, IsoFLOP power laws.

    python -m analysis.scaling --csv=../shared/data/chinchilla_svg_extracted_data.csv --drop_highest=5 \
        --out=fit.json --plot=fit.png
    python -m analysis.scaling --runs runs/llama-10m runs/llama-25m ...

Approach 3 of Hoffmann et al. (2022), "Training Compute-Optimal Large Language Models", fitted as in
Besiroglu et al. (2024), "Chinchilla Scaling: A replication attempt":

    L(N, D) = E + A / N^alpha + B / D^beta          N parameters, D training tokens

parameterised by theta = (a, b, e, alpha, beta) with A = exp(a), B = exp(b), E = exp(e), and fitted by
minimising  sum_i Huber_delta(log L_hat(N_i, D_i) - log L_i)  (delta = 1e-3; log L_hat is a logsumexp
of the three terms) with L-BFGS-B from every point of a grid of initialisations, keeping the best.

scipy's L-BFGS-B stops once an iteration lowers f by less than ftol * max(|f|, 1); this objective is
~1e-3, so at scipy's defaults that is a loose *absolute* test on a long, flat valley, and where a
start stops along the valley depends on its path. The grid therefore runs at scipy's defaults (as the
references did), and the best point is then polished with tight tolerances to the valley's minimum.
On the reference data (five highest losses dropped) this gives E=1.8172, A=477.8, B=2143,
alpha=0.3473, beta=0.3672 at objective 0.00101827, as does Epoch AI's own notebook procedure rerun on
the same CSV. Besiroglu et al. report E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658
(objective 0.0010228 at those rounded values): the same valley, 0.9% apart in A and 2.8% in B, well
inside B's bootstrap spread (a standard deviation of ~1400).

Compute-optimal allocation under C = 6 N D (Hoffmann et al. eq. 4), and the Approach-2 alternative
(a parabola per IsoFLOP group, then a power law of the optima in compute) sit beside the fit.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import OptimizeResult, minimize
from scipy.special import huber

from data.jsonl import read_jsonl

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # optional: fits give the same results without it, only slower
    threadpool_limits = None

PARAM_NAMES = ("E", "A", "B", "alpha", "beta")
HUBER_DELTA = 1e-3
# Epoch AI's CSV of Hoffmann et al.'s Figure 4 (../shared/data/chinchilla_svg_extracted_data.csv).
CSV_COLUMNS = {"n_params": "Model Size", "compute": "Training FLOP", "loss": "loss"}

# scipy's L-BFGS-B defaults, spelled out: what the grid runs at (and what the references ran at).
GRID_OPTIONS = {"ftol": 2.220446049250313e-09, "gtol": 1e-05, "maxiter": 15000}
# Tight enough to reach the bottom of the valley for objectives of order 1e-4 .. 1.
POLISH_OPTIONS = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 15000}

Progress = Callable[[str], None]


# ----------------------------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class ScalingPoints:
    """Training runs as (N, D, loss) triples: float64 arrays of shape [P], all finite and > 0.

    flops: each run's training FLOPs by the model's own formula (models/config.py flops_per_token x D),
    when known; `compute` is 6 N D otherwise.
    """

    n_params: np.ndarray
    n_tokens: np.ndarray
    loss: np.ndarray
    flops: np.ndarray | None = None

    def __post_init__(self) -> None:
        fields = ("n_params", "n_tokens", "loss") + (("flops",) if self.flops is not None else ())
        for field in fields:
            values = np.asarray(getattr(self, field), dtype=np.float64)
            if values.ndim != 1:
                raise ValueError(f"ScalingPoints.{field}: expected shape [P], got {values.shape}")
            bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
            if bad.size:
                raise ValueError(f"ScalingPoints.{field}[{bad[0]}]: must be finite and > 0, got {values[bad[0]]}")
            object.__setattr__(self, field, values)
        if len({len(getattr(self, field)) for field in fields}) != 1:
            raise ValueError(f"ScalingPoints: lengths differ ({', '.join(f'{f} {len(getattr(self, f))}' for f in fields)})")

    def __len__(self) -> int:
        return len(self.loss)

    @property
    def compute(self) -> np.ndarray:
        """Training FLOPs, shape [P]: `flops` when given, else C = 6 N D."""
        return self.flops if self.flops is not None else 6.0 * self.n_params * self.n_tokens

    def logs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(log N, log D, log loss), each [P]: the fit's inputs."""
        return np.log(self.n_params), np.log(self.n_tokens), np.log(self.loss)

    def take(self, indices: np.ndarray) -> ScalingPoints:
        return ScalingPoints(self.n_params[indices], self.n_tokens[indices], self.loss[indices],
                             None if self.flops is None else self.flops[indices])

    def drop_highest_loss(self, count: int) -> ScalingPoints:
        """The points without the `count` highest losses (Besiroglu et al. drop 5 as outliers)."""
        if not 0 <= count < len(self):
            raise ValueError(f"drop_highest_loss: count must be in [0, {len(self)}), got {count}")
        keep = np.sort(np.argsort(self.loss, kind="stable")[: len(self) - count])
        return self.take(keep)


def _positive_number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where}: expected a finite number > 0, got {text!r}")
    return value


def read_scaling_csv(path: str | Path) -> ScalingPoints:
    """Reads a CSV with columns `Model Size` (N), `Training FLOP` (C) and `loss`; D = C / (6 N).

    That is the layout of Epoch AI's extraction of Hoffmann et al.'s Figure 4; other columns are ignored.
    """
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS.values() if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        columns: dict[str, list[float]] = {key: [] for key in CSV_COLUMNS}
        for row in reader:
            for key, column in CSV_COLUMNS.items():
                where = f"{path}:{reader.line_num}: column {column!r}"
                columns[key].append(_positive_number(row[column] or "", where))
    if not columns["loss"]:
        raise ValueError(f"{path}: no data rows")
    n_params, compute = np.array(columns["n_params"]), np.array(columns["compute"])
    return ScalingPoints(n_params, compute / (6.0 * n_params), np.array(columns["loss"]))


def _run_field(summary: Mapping[str, Any], field: str, kind: type | tuple[type, ...], where: Path) -> Any:
    value = summary.get(field)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: field {field!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _last_eval_loss(metrics_path: Path) -> float | None:
    """The loss of the last `"split": "eval"` record of a metrics.jsonl (appended across resumes)."""
    if not metrics_path.exists():
        return None
    loss = None
    for line in read_jsonl(metrics_path):
        if line.record.get("split") == "eval" and "loss" in line.record:
            loss = line.record["loss"]
    return loss


def collect_runs(run_dirs: Iterable[str | Path], *, batch_size: int | None = None, seq_len: int | None = None,
                 param_counts: Mapping[str, int] | None = None) -> ScalingPoints:
    """One (N, D, final eval loss) point per codelm run directory (as `train.pretrain` writes them).

    N: `param_counts[model]` when the table names the run's `summary.json` "model", else the summary's
      "params_non_embedding", else the preset's non-embedding count (for summaries written before
      that field existed).
    D: the summary's "tokens_trained", else "steps" * batch_size * seq_len.
    loss: summary "eval_loss"; when that is null, the last eval record of the run's metrics.jsonl.
    """
    from models.config import ConfigError, get_preset  # noqa: PLC0415  (only run collection needs models)

    if (batch_size is not None and batch_size <= 0) or (seq_len is not None and seq_len <= 0):
        raise ValueError(f"collect_runs: batch_size and seq_len must be > 0, got {batch_size}, {seq_len}")
    param_counts = param_counts or {}
    n_params, n_tokens, losses = [], [], []
    for run_dir in map(Path, run_dirs):
        summary_path = run_dir / "summary.json"
        try:
            summary = json.loads(summary_path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{summary_path}: missing (is {run_dir} a finished train.pretrain run?)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{summary_path}:{e.lineno}: not JSON ({e.msg})") from None
        model = _run_field(summary, "model", str, summary_path)
        steps = _run_field(summary, "steps", int, summary_path)
        if steps <= 0:
            raise ValueError(f"{summary_path}: field 'steps' must be > 0, got {steps}")
        loss = summary.get("eval_loss")
        if loss is None:
            loss = _last_eval_loss(run_dir / "metrics.jsonl")
        if not isinstance(loss, (int, float)) or isinstance(loss, bool):
            raise ValueError(f"{summary_path}: no final eval loss in 'eval_loss' or {run_dir / 'metrics.jsonl'} "
                             f"(train with train.eval_every > 0)")
        if model in param_counts:
            n = param_counts[model]
        elif isinstance(summary.get("params_non_embedding"), int):
            n = summary["params_non_embedding"]
        else:
            try:
                n = get_preset(model).param_count(embeddings=False)
            except ConfigError as e:
                raise ValueError(f"{summary_path}: {e}; pass its parameter count in param_counts") from None
        n_params.append(n)
        if isinstance(summary.get("tokens_trained"), int):
            n_tokens.append(summary["tokens_trained"])
        elif batch_size and seq_len:
            n_tokens.append(steps * batch_size * seq_len)
        else:
            raise ValueError(f"{summary_path}: no 'tokens_trained'; pass batch_size and seq_len (--batch_size, --seq_len)")
        losses.append(loss)
    if not losses:
        raise ValueError("collect_runs: no run directories given")
    return ScalingPoints(np.array(n_params, float), np.array(n_tokens, float), np.array(losses, float))


# ------------------------------------------------------------------------------------------ law
@dataclasses.dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    @classmethod
    def from_theta(cls, theta: Sequence[float]) -> ChinchillaLaw:
        """From the fit's parameter vector (a, b, e, alpha, beta) = (log A, log B, log E, alpha, beta)."""
        a, b, e, alpha, beta = map(float, theta)
        return cls(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)

    @property
    def theta(self) -> np.ndarray:
        """(log A, log B, log E, alpha, beta), shape [5]. A term that underflowed to 0 in a degenerate fit
        (exp of a very negative log) maps to the log of the smallest positive float, so refits can start there."""
        tiny = np.finfo(np.float64).tiny
        return np.array([math.log(max(self.A, tiny)), math.log(max(self.B, tiny)), math.log(max(self.E, tiny)),
                         self.alpha, self.beta])

    def loss(self, n_params: np.ndarray | float, n_tokens: np.ndarray | float) -> np.ndarray:
        """Predicted loss; broadcasts N and D."""
        return self.E + self.A / np.power(n_params, self.alpha) + self.B / np.power(n_tokens, self.beta)

    @property
    def optimal_exponents(self) -> tuple[float, float]:
        """(a, b) with N_opt ~ C^a and D_opt ~ C^b: beta / (alpha + beta) and alpha / (alpha + beta)."""
        total = self.alpha + self.beta
        return self.beta / total, self.alpha / total

    def compute_optimal(self, compute: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """(N_opt, D_opt) minimising L subject to 6 N D = C (Hoffmann et al. eq. 4); broadcasts C.

        G = (alpha A / (beta B))^(1 / (alpha + beta)), N_opt = G (C/6)^a, D_opt = (C/6) / N_opt.
        """
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        half_budget = np.asarray(compute, dtype=np.float64) / 6.0
        n_opt = g * half_budget ** self.optimal_exponents[0]
        return n_opt, half_budget / n_opt

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in PARAM_NAMES}


ADDITIVE_NAMES = ("Nc", "Dc", "alpha_N", "alpha_D", "L_inf")


@dataclasses.dataclass(frozen=True)
class AdditiveLaw:
    """L(N, D) = (Nc / N)^alpha_N + (Dc / D)^alpha_D + L_inf, the form recent code scaling-law work
    fits (its published Python exponents: alpha_N 0.221, alpha_D 1.217, L_inf 0.566).

    The same family as Chinchilla's L = E + A / N^alpha + B / D^beta with A = Nc^alpha_N,
    B = Dc^alpha_D, E = L_inf, so it is fitted through `fit_chinchilla` and converted; Nc and Dc are
    the scales at which each term reaches 1 nat.
    """

    Nc: float
    Dc: float
    alpha_N: float
    alpha_D: float
    L_inf: float

    @classmethod
    def from_chinchilla(cls, law: ChinchillaLaw) -> AdditiveLaw:
        """Nc = A^(1/alpha), Dc = B^(1/beta): infinite (or 0) when an exponent is near 0, as the fit allows."""
        with np.errstate(over="ignore", divide="ignore"):
            return cls(Nc=float(np.float64(law.A) ** (1.0 / law.alpha)), Dc=float(np.float64(law.B) ** (1.0 / law.beta)),
                       alpha_N=law.alpha, alpha_D=law.beta, L_inf=law.E)

    def to_chinchilla(self) -> ChinchillaLaw:
        return ChinchillaLaw(E=self.L_inf, A=self.Nc**self.alpha_N, B=self.Dc**self.alpha_D, alpha=self.alpha_N,
                             beta=self.alpha_D)

    def loss(self, n_params: np.ndarray | float, n_tokens: np.ndarray | float) -> np.ndarray:
        """Predicted loss; broadcasts N and D."""
        return (np.power(self.Nc / np.asarray(n_params, np.float64), self.alpha_N)
                + np.power(self.Dc / np.asarray(n_tokens, np.float64), self.alpha_D) + self.L_inf)

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in ADDITIVE_NAMES}


def compute_optimal_numeric(loss: Callable[[np.ndarray, np.ndarray], np.ndarray], compute: np.ndarray | float,
                            flops_per_token: Callable[[np.ndarray], np.ndarray], n_range: tuple[float, float] = (1e2, 1e13),
                            resolution: int = 20001) -> tuple[np.ndarray, np.ndarray]:
    """(N_opt, D_opt), each shaped like `compute`: the N minimising loss(N, C / flops_per_token(N)).

    For compute measured by a model's own FLOP formula instead of 6 N D (small models spend most of
    theirs in the LM head); a log-spaced search over `n_range` (relative step ~0.2% at the default).
    NaN where the minimum lies at an end of the range (the law has no interior optimum there).
    """
    budgets = np.atleast_1d(np.asarray(compute, np.float64))
    n_grid = np.geomspace(*n_range, resolution)
    d_grid = budgets[:, None] / flops_per_token(n_grid)[None, :]  # [B, G]
    best = np.argmin(loss(n_grid[None, :], d_grid), axis=1)
    interior = (best > 0) & (best < resolution - 1)
    n_opt = np.where(interior, n_grid[best], np.nan)
    d_opt = np.where(interior, d_grid[np.arange(len(budgets)), best], np.nan)
    shape = np.shape(compute)
    return n_opt.reshape(shape), d_opt.reshape(shape)


# ------------------------------------------------------------------------------------ objective
def huber_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
                    delta: float = HUBER_DELTA) -> tuple[float, np.ndarray]:
    """sum_i Huber_delta(log L_hat_i - log L_i) and its gradient in theta = (a, b, e, alpha, beta).

    log_n, log_d, log_loss: shape [P]. log L_hat = logsumexp(a - alpha log N, b - beta log D, e).
    """
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # [3, P]
    top = terms.max(axis=0)
    shifted = np.exp(terms - top)
    total = shifted.sum(axis=0)
    residual = top + np.log(total) - log_loss
    # d logsumexp / d term = softmax weight; d Huber / d residual = clip(residual, -delta, delta).
    term_grads = shifted / total * np.clip(residual, -delta, delta)  # [3, P]
    grad = np.array([term_grads[0].sum(), term_grads[1].sum(), term_grads[2].sum(),
                     -term_grads[0] @ log_n, -term_grads[1] @ log_d])
    return float(huber(delta, residual).sum()), grad


def objective_at(law: ChinchillaLaw, points: ScalingPoints, delta: float = HUBER_DELTA) -> float:
    """The fit's objective (sum of Huber terms on log loss) of `law` on `points`."""
    value, _ = huber_objective(law.theta, *points.logs(), delta)
    return value


@contextlib.contextmanager
def _single_threaded_blas():
    """scipy >= 1.15's L-BFGS-B makes tiny LAPACK calls that a multi-threaded OpenBLAS slows ~10x
    (scipy issue 22438); the remedy its maintainers give is one BLAS thread around the solver."""
    if threadpool_limits is None:
        yield
    else:
        with threadpool_limits(limits=1, user_api="blas"):
            yield


def _usable(result: OptimizeResult) -> bool:
    """A finite objective at a point whose A, B, E (exp of its first three coordinates) are finite floats."""
    return bool(np.isfinite(result.fun) and np.all(np.isfinite(result.x)) and np.all(result.x[:3] < 700.0))


def _lbfgs(start: np.ndarray, log_data: tuple[np.ndarray, ...], delta: float,
           options: Mapping[str, float]) -> OptimizeResult:
    return minimize(huber_objective, start, args=(*log_data, delta), jac=True, method="L-BFGS-B",
                    options=dict(options))


# ---------------------------------------------------------------------------------------- fitting
@dataclasses.dataclass(frozen=True)
class InitGrid:
    """L-BFGS starting points: the Cartesian product of the values given per parameter."""

    a: tuple[float, ...]
    b: tuple[float, ...]
    e: tuple[float, ...]
    alpha: tuple[float, ...]
    beta: tuple[float, ...]

    def starts(self) -> np.ndarray:
        """Shape [S, 5], columns (a, b, e, alpha, beta)."""
        return np.array(list(itertools.product(self.a, self.b, self.e, self.alpha, self.beta)), dtype=np.float64)

    def __len__(self) -> int:
        return len(self.a) * len(self.b) * len(self.e) * len(self.alpha) * len(self.beta)


# Hoffmann et al.'s grid (their Appendix D), as used by Besiroglu et al.: 6 * 6 * 5 * 5 * 5 = 4500 starts.
HOFFMANN_GRID = InitGrid(a=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0), b=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
                         e=(-1.0, -0.5, 0.0, 0.5, 1.0), alpha=(0.0, 0.5, 1.0, 1.5, 2.0),
                         beta=(0.0, 0.5, 1.0, 1.5, 2.0))
# Every other value of each range of HOFFMANN_GRID: 3^5 = 243 starts, for quick fits.
COARSE_GRID = InitGrid(a=(0.0, 10.0, 20.0), b=(0.0, 10.0, 20.0), e=(-1.0, 0.0, 1.0), alpha=(0.0, 1.0, 2.0),
                       beta=(0.0, 1.0, 2.0))
GRIDS = {"hoffmann": HOFFMANN_GRID, "coarse": COARSE_GRID}


@dataclasses.dataclass(frozen=True)
class ChinchillaFit:
    """The best of the grid's L-BFGS-B runs, polished."""

    law: ChinchillaLaw
    objective: float  # sum of Huber terms at `law`
    n_points: int
    start: np.ndarray  # [5] the grid point the winning run started from
    n_starts: int
    n_unconverged: int  # grid runs that stopped without meeting the tolerances (still candidates)
    delta: float = HUBER_DELTA

    def as_dict(self) -> dict[str, Any]:
        n_exponent, d_exponent = self.law.optimal_exponents
        return {
            "params": self.law.as_dict(), "objective": self.objective, "n_points": self.n_points,
            "huber_delta": self.delta, "n_starts": self.n_starts, "n_unconverged": self.n_unconverged,
            "start": dict(zip(("a", "b", "e", "alpha", "beta"), self.start.tolist())),
            "compute_optimal_exponents": {"n_opt": n_exponent, "d_opt": d_exponent},
        }


def fit_chinchilla(points: ScalingPoints, grid: InitGrid = HOFFMANN_GRID, delta: float = HUBER_DELTA,
                   progress: Progress | None = None) -> ChinchillaFit:
    """Fits L(N, D) by L-BFGS-B from every start of `grid`, keeps the lowest objective, polishes it.

    Runs that end non-finite are discarded; runs that stop early (e.g. a failed line search) still
    compete, since their objective is a true value at a point and the winner is polished anyway.
    """
    if len(points) < 5:
        raise ValueError(f"fit_chinchilla: 5 parameters need at least 5 points, got {len(points)}")
    log_data = points.logs()
    starts = grid.starts()
    best, best_start, n_unconverged = None, None, 0
    began = time.perf_counter()
    with _single_threaded_blas():
        for i, start in enumerate(starts):
            result = _lbfgs(start, log_data, delta, GRID_OPTIONS)
            n_unconverged += not result.success
            if _usable(result) and (best is None or result.fun < best.fun):
                best, best_start = result, start
            if progress and (i + 1) % max(1, len(starts) // 10) == 0:
                progress(f"fit: {i + 1}/{len(starts)} starts, best objective "
                         f"{best.fun if best else math.nan:.8g}, {time.perf_counter() - began:.1f}s")
        if best is None:
            raise RuntimeError(f"fit_chinchilla: all {len(starts)} L-BFGS-B runs diverged")
        polished = _lbfgs(best.x, log_data, delta, POLISH_OPTIONS)
    winner = polished if _usable(polished) and polished.fun <= best.fun else best
    return ChinchillaFit(ChinchillaLaw.from_theta(winner.x), float(winner.fun), len(points), best_start,
                         len(starts), int(n_unconverged), delta)


@dataclasses.dataclass(frozen=True)
class BootstrapResult:
    """Refits on resampled points. samples: [R, 5], columns PARAM_NAMES (E, A, B, alpha, beta), one row
    per refit that ended finite (`n_failed` did not)."""

    samples: np.ndarray
    level: float
    n_failed: int = 0

    def intervals(self) -> dict[str, dict[str, float]]:
        """Percentile intervals at `level`, and the standard deviation, per parameter."""
        return percentile_intervals(self.samples, PARAM_NAMES, self.level)

    def additive_intervals(self) -> dict[str, dict[str, float]]:
        """The same refits in the additive form's parameters (ADDITIVE_NAMES)."""
        samples = np.array([list(AdditiveLaw.from_chinchilla(ChinchillaLaw(*row)).as_dict().values())
                            for row in self.samples])
        return percentile_intervals(samples, ADDITIVE_NAMES, self.level)


def percentile_intervals(samples: np.ndarray, names: Sequence[str], level: float) -> dict[str, dict[str, float]]:
    """Per column of samples [R, len(names)]: the central `level` percentile interval and the std."""
    tail = 100 * (1 - level) / 2
    with np.errstate(invalid="ignore", over="ignore"):
        low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
        std = samples.std(axis=0, ddof=1)
    return {name: {"low": float(lo), "high": float(hi), "std": float(sd)} for name, lo, hi, sd in zip(names, low, high, std)}


def bootstrap(points: ScalingPoints, fit: ChinchillaFit, n_resamples: int, seed: int = 0, level: float = 0.95,
              progress: Progress | None = None) -> BootstrapResult:
    """Resamples the points with replacement `n_resamples` times and refits each by L-BFGS-B.

    Each refit starts from the full-data optimum rather than the whole grid: it stays in the fit's basin
    (the interval describes that optimum, not jumps between distant local minima) at 1/len(grid) the cost.
    """
    if n_resamples < 2:
        raise ValueError(f"bootstrap: n_resamples must be >= 2, got {n_resamples}")
    rng = np.random.default_rng(seed)
    samples = []
    with _single_threaded_blas():
        for r in range(n_resamples):
            resampled = points.take(rng.integers(0, len(points), len(points)))
            result = _lbfgs(fit.law.theta, resampled.logs(), fit.delta, POLISH_OPTIONS)
            if _usable(result):
                law = ChinchillaLaw.from_theta(result.x)
                samples.append([getattr(law, name) for name in PARAM_NAMES])
            if progress and (r + 1) % max(1, n_resamples // 10) == 0:
                progress(f"bootstrap: {r + 1}/{n_resamples} resamples")
    if len(samples) < 2:
        raise RuntimeError(f"bootstrap: only {len(samples)} of {n_resamples} refits ended finite")
    return BootstrapResult(np.array(samples), level, n_resamples - len(samples))


# ---------------------------------------------------------------------------- Approach 2: IsoFLOP
@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """y = coefficient * x^exponent."""

    coefficient: float
    exponent: float

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        return self.coefficient * np.power(x, self.exponent)


def fit_power_law(x: np.ndarray, y: np.ndarray) -> PowerLaw:
    """Least-squares line through (log x, log y); x, y: shape [K], K >= 2, positive."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2 or np.any(x <= 0) or np.any(y <= 0):
        raise ValueError(f"fit_power_law: need two positive arrays of equal shape [K >= 2], got {x.shape}, {y.shape}")
    exponent, log_coefficient = np.polyfit(np.log(x), np.log(y), 1)
    return PowerLaw(float(math.exp(log_coefficient)), float(exponent))


@dataclasses.dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per token as 6 N + k N^g in the non-embedding parameter count N.

    6 N is the parameters' share; k N^g is what is left (the LM head, V d, and attention), which grows
    slower than N: g = 0 for a fixed head, ~1/2 when the head grows with d and N with d^2. Dominant in
    small models, it vanishes relative to 6 N in large ones, so the fit extrapolates to 6 N D.
    """

    coefficient: float
    exponent: float

    def __call__(self, n_params: np.ndarray | float) -> np.ndarray:
        n = np.asarray(n_params, np.float64)
        return 6.0 * n + self.coefficient * np.power(n, self.exponent)

    @classmethod
    def fit(cls, n_params: np.ndarray, flops_per_token: np.ndarray) -> FlopsPerToken:
        """Least squares in log space over runs: n_params, flops_per_token [K], with the remainder
        flops_per_token - 6 N > 0 (one distinct N gives exponent 0)."""
        n, fpt = np.asarray(n_params, np.float64), np.asarray(flops_per_token, np.float64)
        rest = fpt - 6.0 * n
        if np.any(rest <= 0):
            raise ValueError("FlopsPerToken.fit: flops_per_token must exceed 6 N (the LM head and attention add to it)")
        if len(np.unique(n)) < 2:
            return cls(float(rest.mean()), 0.0)
        law = fit_power_law(n, rest)
        return cls(law.coefficient, law.exponent)


@dataclasses.dataclass(frozen=True)
class IsoFlopOptima:
    """Per IsoFLOP group: compute [G] (geometric mean), the parabola's optimal N [G] and its loss [G]."""

    compute: np.ndarray
    n_opt: np.ndarray
    loss_opt: np.ndarray

    def d_opt(self, flops_per_token: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """D at each optimum [G]: C / (6 N_opt), or C / flops_per_token(N_opt) for a model's own formula."""
        return self.compute / (flops_per_token(self.n_opt) if flops_per_token else 6.0 * self.n_opt)

    def power_laws(self, flops_per_token: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, PowerLaw]:
        """N_opt(C) and D_opt(C) (see `d_opt`) as power laws in C (Hoffmann et al. Approach 2)."""
        return {"n_opt": fit_power_law(self.compute, self.n_opt),
                "d_opt": fit_power_law(self.compute, self.d_opt(flops_per_token))}


def isoflop_groups(points: ScalingPoints, rel_tolerance: float = 0.05) -> list[np.ndarray]:
    """Indices of points whose compute lies within a factor (1 + rel_tolerance) of their group's
    smallest, by increasing compute."""
    groups: list[list[int]] = []
    for idx in np.argsort(points.compute, kind="stable"):
        if groups and points.compute[idx] <= points.compute[groups[-1][0]] * (1 + rel_tolerance):
            groups[-1].append(int(idx))
        else:
            groups.append([int(idx)])
    return [np.array(g) for g in groups]


def _parabola(log_n: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """(curvature, slope, intercept) of loss as a parabola in log N."""
    return np.polyfit(log_n, loss, 2)


def isoflop_optima(points: ScalingPoints, rel_tolerance: float = 0.05, min_sizes: int = 3) -> IsoFlopOptima:
    """Fits loss as a parabola in log N per IsoFLOP group (`isoflop_groups`) of at least `min_sizes`
    distinct N, and takes its minimum.

    Groups whose parabola opens downwards or whose minimum lies outside the sampled N are skipped: their
    optimum is not bracketed.
    """
    rows = []
    for group in isoflop_groups(points, rel_tolerance):
        log_n, loss = np.log(points.n_params[group]), points.loss[group]
        if len(np.unique(log_n)) < min_sizes:
            continue
        curvature, slope, intercept = _parabola(log_n, loss)
        vertex = -slope / (2 * curvature)
        if curvature <= 0 or not log_n.min() <= vertex <= log_n.max():
            continue
        rows.append((math.exp(np.log(points.compute[group]).mean()), math.exp(vertex),
                     intercept - slope**2 / (4 * curvature)))
    if len(rows) < 2:
        raise ValueError(f"isoflop_optima: {len(rows)} IsoFLOP group(s) with a bracketed minimum; need >= 2")
    return IsoFlopOptima(*map(np.array, zip(*rows)))


ISOFLOP_NAMES = ("n_opt_coefficient", "n_opt_exponent", "d_opt_coefficient", "d_opt_exponent")


def bootstrap_isoflop(points: ScalingPoints, n_resamples: int, rel_tolerance: float = 0.05, seed: int = 0,
                      level: float = 0.95, min_sizes: int = 3,
                      flops_per_token: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:
    """Intervals of Approach 2's power laws N_opt = k C^a, D_opt = k' C^b by a residual bootstrap.

    An IsoFLOP profile holds a handful of sizes, too few to resample points (a resample often keeps
    fewer than three distinct N), so each resample adds residuals drawn with replacement from all
    groups' parabola fits to those fits, and refits the parabolas and the power laws. Resamples that
    leave fewer than two bracketed optima are counted in `n_failed`.
    """
    if n_resamples < 2:
        raise ValueError(f"bootstrap_isoflop: n_resamples must be >= 2, got {n_resamples}")
    fitted, residuals = points.loss.copy(), []
    for group in isoflop_groups(points, rel_tolerance):
        log_n = np.log(points.n_params[group])
        if len(np.unique(log_n)) >= min_sizes:
            fitted[group] = np.polyval(_parabola(log_n, points.loss[group]), log_n)
            residuals.append(points.loss[group] - fitted[group])
    pool = np.concatenate(residuals) if residuals else np.zeros(1)
    # Residuals of a 3-parameter fit to k points shrink by sqrt((k - 3) / k) on average: undo that.
    dof = sum(len(r) for r in residuals) - 3 * len(residuals)
    pool = pool * math.sqrt(len(pool) / dof) if dof > 0 else pool
    rng = np.random.default_rng(seed)
    samples, failed = [], 0
    for _ in range(n_resamples):
        loss = np.maximum(fitted + rng.choice(pool, size=len(fitted)), 1e-9)
        resampled = dataclasses.replace(points, loss=loss)
        try:
            laws = isoflop_optima(resampled, rel_tolerance, min_sizes).power_laws(flops_per_token)
        except ValueError:
            failed += 1
            continue
        samples.append([laws["n_opt"].coefficient, laws["n_opt"].exponent, laws["d_opt"].coefficient,
                        laws["d_opt"].exponent])
    if len(samples) < 2:
        raise RuntimeError(f"bootstrap_isoflop: only {len(samples)} of {n_resamples} resamples had two bracketed optima")
    return {"n_resamples": n_resamples, "n_failed": failed, "level": level,
            "intervals": percentile_intervals(np.array(samples), ISOFLOP_NAMES, level)}


# ----------------------------------------------------------------------------------------- plot
def plot_fit(points: ScalingPoints, law: ChinchillaLaw, path: str | Path, title: str = "") -> Path:
    """Loss vs compute: the points coloured by N, the fit's iso-N curves, and its compute-optimal frontier."""
    import matplotlib  # noqa: PLC0415  (plotting is optional; keep it off the import path)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.colors import LogNorm  # noqa: PLC0415

    compute = points.compute
    budgets = np.geomspace(compute.min() / 3, compute.max() * 3, 200)
    norm = LogNorm(points.n_params.min(), points.n_params.max())
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for n in np.geomspace(points.n_params.min(), points.n_params.max(), 6):
        ax.plot(budgets, law.loss(n, budgets / (6 * n)), color=cmap(norm(n)), lw=1, alpha=0.8)
    n_opt, d_opt = law.compute_optimal(budgets)
    ax.plot(budgets, law.loss(n_opt, d_opt), "k--", lw=2, label="compute-optimal frontier")
    ax.axhline(law.E, color="grey", ls=":", lw=1, label=f"E = {law.E:.3f}")
    dots = ax.scatter(compute, points.loss, c=points.n_params, cmap=cmap, norm=norm, s=14, edgecolors="k",
                      linewidths=0.3, zorder=3)
    fig.colorbar(dots, ax=ax, label="parameters N (lines: the fit at fixed N)")
    ax.set_xscale("log")
    ax.set_ylim(law.E * 0.97, points.loss.max() * 1.05)
    ax.set_xlabel("training compute C = 6 N D (FLOP)")
    ax.set_ylabel("loss")
    ax.set_title(title or f"L = {law.E:.3f} + {law.A:.4g}/N^{law.alpha:.3f} + {law.B:.4g}/D^{law.beta:.3f}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ CLI
def _frontier_table(law: ChinchillaLaw, points: ScalingPoints) -> list[dict[str, float]]:
    """N_opt, D_opt and the predicted loss at each power of ten from the data's least compute to 100x its most."""
    decades = range(math.floor(math.log10(points.compute.min())), math.ceil(math.log10(points.compute.max())) + 3)
    budgets = np.array([float(f"1e{k}") for k in decades])
    n_opt, d_opt = law.compute_optimal(budgets)
    return [{"compute": float(c), "n_opt": float(n), "d_opt": float(d), "loss": float(law.loss(n, d))}
            for c, n, d in zip(budgets, n_opt, d_opt)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis.scaling", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", type=Path, help="CSV with columns 'Model Size', 'Training FLOP', 'loss'")
    source.add_argument("--runs", type=Path, nargs="+", help="train.pretrain output dirs (summary.json)")
    parser.add_argument("--batch_size", type=int, help="--runs: sequences per step")
    parser.add_argument("--seq_len", type=int, help="--runs: tokens per sequence")
    parser.add_argument("--param_counts", type=Path, help="--runs: JSON {model name: N} overriding presets")
    parser.add_argument("--drop_highest", type=int, default=0, help="drop this many highest-loss points")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="hoffmann", help="L-BFGS initialisation grid")
    parser.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples for intervals (0: none)")
    parser.add_argument("--level", type=float, default=0.95, help="bootstrap interval coverage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--isoflop_tolerance", type=float, default=0.0,
                        help="> 0: also fit Approach-2 power laws over IsoFLOP groups of this relative width")
    parser.add_argument("--out", type=Path, help="write the fit as JSON here too")
    parser.add_argument("--plot", type=Path, help="write a PNG of loss vs compute with the fit")
    return parser


def load_points(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ScalingPoints:
    if args.csv:
        return read_scaling_csv(args.csv)
    table = None
    if args.param_counts:
        try:
            table = json.loads(args.param_counts.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{args.param_counts}:{e.lineno}: not JSON ({e.msg})") from None
    return collect_runs(args.runs, batch_size=args.batch_size, seq_len=args.seq_len, param_counts=table)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    points = load_points(args, parser).drop_highest_loss(args.drop_highest)
    fit = fit_chinchilla(points, GRIDS[args.grid], progress=progress)
    source = str(args.csv) if args.csv else [str(r) for r in args.runs]
    report = {"source": source, "dropped_highest": args.drop_highest, "grid": args.grid, **fit.as_dict(),
              "frontier": _frontier_table(fit.law, points)}
    if args.bootstrap:
        result = bootstrap(points, fit, args.bootstrap, seed=args.seed, level=args.level, progress=progress)
        report["bootstrap"] = {"n_resamples": args.bootstrap, "n_failed": result.n_failed, "level": args.level,
                               "intervals": result.intervals()}
    if args.isoflop_tolerance > 0:
        laws = isoflop_optima(points, args.isoflop_tolerance).power_laws()
        report["isoflop_power_laws"] = {k: dataclasses.asdict(v) for k, v in laws.items()}
    if args.plot:
        report["plot"] = str(plot_fit(points, fit.law, args.plot))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report = run(args, parser)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
