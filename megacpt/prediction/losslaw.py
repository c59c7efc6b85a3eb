"""Loss laws with LR annealing: a validation-loss curve as a function of the LR of every step before it.

A `LrLossCurve` is the LR of every step of one model's life (all stages, oldest first) and the loss after given
numbers of steps. Three laws, constants named as in docs/PREDICT.md and the papers:

- tissue (Tissue et al. 2024): L = L0 + A * S1^-alpha - C * S2. S1 is the area under the LR curve; S2 sums
  the "annealing momentum" m_i = lambda * m_(i-1) + (eta_(i-1) - eta_i), lambda = 0.999, so a decay lowers the
  loss with a lag and a re-warm (negative m) raises it.
- multipower (Luo et al. 2025): L = L0 + A * S1^-alpha - B * sum_k (eta_(k-1) - eta_k) * G(eta_k^-gamma * S_k),
  G(x) = 1 - (C x + 1)^-beta, S_k the LR area from step k to now. S1 here counts the warmup at its real LRs
  (the paper's S1 + S_W).
- cpt (Wang, Tissue et al. 2025): tissue + B * (1 - f)^kappa * (1 - (1 + E * S1_cpt)^-beta), S1_cpt the LR area
  since the stage that switched to new data began and f that stage's replay fraction. B is signed: positive
  on a validation set of the old data (forgetting), negative on one of the new data (adaptation). The factor
  (1 - f)^kappa is megacpt's: it is 1 without replay and 0 when the whole batch is replay (no shift at all),
  and one exponent suffices to interpolate between fractions, so two fractions fit it and an unseen fraction
  can still be predicted; with a single fraction kappa cannot be told from B and is fixed at 1.

For tissue and cpt the model's first warmup counts as if the LR were already at its peak (Tissue et al.). The
constants are fitted with scipy's least_squares on log-loss residuals with a robust (soft L1) loss, from
several seeded starts inside bounds. This module reads no files; megacpt/prediction/predict_command.py does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy.optimize import least_squares
from scipy.signal import lfilter

from megacpt.errors import UserError

MOMENTUM_DECAY = 0.999  # lambda of S2 (Tissue et al.)
ROBUST_SCALE = 0.01  # residuals (in log loss) above ~1% count linearly, so a loss spike cannot drag the fit


@dataclass(frozen=True)
class LrLossCurve:
    """One model's LR history and the losses measured on it.

    `steps[j]` is the number of steps done (1 .. len(lrs)) when `losses[j]` was measured; `losses` is empty for
    a curve that is only to be predicted. `shift_start` is the first step of the stage that switched to new
    data (None: none did) and `replay` that stage's replay fraction; only the cpt law reads them.
    """

    lrs: np.ndarray
    steps: np.ndarray
    losses: np.ndarray = field(default_factory=lambda: np.empty(0))
    shift_start: int | None = None
    replay: float = 0.0


@dataclass(frozen=True)
class Fit:
    """Fitted constants and how well they describe the points they were fitted on (loss units, not log)."""

    law: str
    constants: dict[str, float]
    fixed: tuple[str, ...]
    r2: float
    mae: float
    points: int


# ------------------------------------------------------------------------------------ LR-history features


def effective_lrs(curve: LrLossCurve) -> np.ndarray:
    """The LRs with the model's first warmup (the rise its history starts with) held at the peak it reaches.

    A history that starts flat has no first warmup: a later rise (a re-warm) is not one.
    """
    lrs = np.asarray(curve.lrs, dtype=float)
    stops_rising = np.flatnonzero(np.diff(lrs) <= 0)
    end = stops_rising[0] + 1 if stops_rising.size else len(lrs)
    out = lrs.copy()
    out[:end] = lrs[end - 1]
    return out


def area(lrs: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """S1: the sum of the LRs of the first n steps, for each n in `steps`."""
    return np.cumsum(lrs)[steps - 1]


def annealing_area(lrs: np.ndarray, steps: np.ndarray, decay: float = MOMENTUM_DECAY) -> np.ndarray:
    """S2 = sum of m_i over the first n steps, m_i = decay * m_(i-1) + (eta_(i-1) - eta_i), m_0 = 0."""
    drops = np.concatenate([[0.0], -np.diff(lrs)])
    momentum = lfilter([1.0], [1.0, -decay], drops)
    return np.cumsum(momentum)[steps - 1]


def shift_area(curve: LrLossCurve, lrs: np.ndarray) -> np.ndarray:
    """S1_cpt: the LR area since the stage on new data began (0 before it and when there is none)."""
    if curve.shift_start is None:
        return np.zeros(len(curve.steps))
    cumulative = np.concatenate([[0.0], np.cumsum(lrs)])
    return np.maximum(cumulative[curve.steps] - cumulative[curve.shift_start], 0.0)


@dataclass(frozen=True)
class _DecayTerms:
    """What the multi-power law's LD needs at each loss point n: for every step k < n with an LR change,
    the drop eta_(k-1) - eta_k, log eta_k and S_k(n) (zero where k >= n)."""

    drops: np.ndarray  # (K,)
    log_lr: np.ndarray  # (K,)
    area_after: np.ndarray  # (points, K)


def _decay_terms(lrs: np.ndarray, steps: np.ndarray) -> _DecayTerms:
    drops = np.concatenate([[0.0], -np.diff(lrs)])
    ks = np.flatnonzero(drops)
    cumulative = np.concatenate([[0.0], np.cumsum(lrs)])
    area_after = cumulative[steps][:, None] - cumulative[ks][None, :]
    area_after = np.where(ks[None, :] < steps[:, None], area_after, 0.0)
    return _DecayTerms(drops[ks], np.log(np.maximum(lrs[ks], 1e-30)), area_after)


# --------------------------------------------------------------------------------------------- the laws


@dataclass(frozen=True)
class Law:
    """A law: its constants, their bounds, a random start, and the loss it predicts at a curve's points.

    `prepare` turns a curve into the fixed arrays the law reads (computed once per fit); `model` maps
    (constants, prepared) to losses. Bounds and starts may depend on the losses' scale, hence `bounds(y)`.
    """

    params: tuple[str, ...]
    prepare: Callable[[LrLossCurve], dict]
    model: Callable[[dict[str, float], dict], np.ndarray]
    bounds: Callable[[np.ndarray], dict[str, tuple[float, float]]]
    start: Callable[[np.random.Generator, np.ndarray, list[dict]], dict[str, float]]


def _tissue_prepare(curve: LrLossCurve) -> dict:
    lrs = effective_lrs(curve)
    return {"s1": area(lrs, curve.steps), "s2": annealing_area(lrs, curve.steps)}


def _tissue_model(p: dict[str, float], x: dict) -> np.ndarray:
    return p["L0"] + p["A"] * x["s1"] ** -p["alpha"] - p["C"] * x["s2"]


def _power_start(rng: np.random.Generator, y: np.ndarray, xs: list[dict]) -> dict[str, float]:
    """L0 below the lowest loss and A, alpha that put the power law through the earliest point."""
    s1 = np.concatenate([x["s1"] for x in xs])
    first = int(np.argmin(s1))
    L0 = rng.uniform(0.3, 0.95) * y.min()
    alpha = rng.uniform(0.1, 1.0)
    return {"L0": L0, "alpha": alpha, "A": max(y[first] - L0, 1e-3) * s1[first] ** alpha}


def _tissue_start(rng: np.random.Generator, y: np.ndarray, xs: list[dict]) -> dict[str, float]:
    s2 = max(np.abs(np.concatenate([x["s2"] for x in xs])).max(), 1e-12)
    return {**_power_start(rng, y, xs), "C": rng.uniform(0.0, 0.5) * (y.max() - y.min() + 1e-3) / s2}


def _tissue_bounds(y: np.ndarray) -> dict[str, tuple[float, float]]:
    return {"L0": (0.0, y.max()), "A": (0.0, np.inf), "alpha": (0.01, 3.0), "C": (0.0, np.inf)}


def _multipower_prepare(curve: LrLossCurve) -> dict:
    lrs = effective_lrs(curve)
    return {"s1": area(np.asarray(curve.lrs, dtype=float), curve.steps), "decay": _decay_terms(lrs, curve.steps)}


def _multipower_model(p: dict[str, float], x: dict) -> np.ndarray:
    d: _DecayTerms = x["decay"]
    g = 1.0 - (p["C"] * np.exp(-p["gamma"] * d.log_lr)[None, :] * d.area_after + 1.0) ** -p["beta"]
    return p["L0"] + p["A"] * x["s1"] ** -p["alpha"] - p["B"] * (g @ d.drops)


def _multipower_start(rng: np.random.Generator, y: np.ndarray, xs: list[dict]) -> dict[str, float]:
    drop = max(max(float(np.abs(x["decay"].drops).sum()) for x in xs), 1e-12)
    return {**_power_start(rng, y, xs), "B": rng.uniform(0.05, 0.5) * (y.max() - y.min() + 1e-3) / drop,
            "C": np.exp(rng.uniform(np.log(0.1), np.log(10.0))), "beta": rng.uniform(0.2, 1.5),
            "gamma": rng.uniform(0.2, 1.0)}


def _multipower_bounds(y: np.ndarray) -> dict[str, tuple[float, float]]:
    return {"L0": (0.0, y.max()), "A": (0.0, np.inf), "alpha": (0.01, 3.0), "B": (0.0, np.inf),
            "C": (1e-6, np.inf), "beta": (0.01, 5.0), "gamma": (0.0, 2.0)}


def _cpt_prepare(curve: LrLossCurve) -> dict:
    lrs = effective_lrs(curve)
    return {**_tissue_prepare(curve), "s1_cpt": shift_area(curve, lrs), "keep": 1.0 - curve.replay}


def _cpt_model(p: dict[str, float], x: dict) -> np.ndarray:
    shift = 1.0 - (1.0 + p["E"] * x["s1_cpt"]) ** -p["beta"]
    return _tissue_model(p, x) + p["B"] * x["keep"] ** p["kappa"] * shift


def _cpt_start(rng: np.random.Generator, y: np.ndarray, xs: list[dict]) -> dict[str, float]:
    s1_cpt = max(max(float(x["s1_cpt"].max()) for x in xs), 1e-12)
    return {**_tissue_start(rng, y, xs), "B": rng.uniform(-0.5, 0.5) * (y.max() - y.min() + 1e-3),
            "E": np.exp(rng.uniform(np.log(0.3), np.log(30.0))) / s1_cpt, "beta": rng.uniform(0.2, 1.5),
            "kappa": rng.uniform(0.5, 2.0)}


def _cpt_bounds(y: np.ndarray) -> dict[str, tuple[float, float]]:
    return {**_tissue_bounds(y), "B": (-y.max(), y.max()), "E": (1e-9, np.inf), "beta": (0.01, 5.0),
            "kappa": (0.0, 10.0)}


LAWS: dict[str, Law] = {
    "tissue": Law(("L0", "A", "alpha", "C"), _tissue_prepare, _tissue_model, _tissue_bounds, _tissue_start),
    "multipower": Law(("L0", "A", "alpha", "B", "C", "beta", "gamma"), _multipower_prepare, _multipower_model,
                      _multipower_bounds, _multipower_start),
    "cpt": Law(("L0", "A", "alpha", "C", "B", "E", "beta", "kappa"), _cpt_prepare, _cpt_model, _cpt_bounds, _cpt_start),
}


# ------------------------------------------------------------------------------------------- fit, predict


def predict(law_name: str, constants: dict[str, float], curve: LrLossCurve) -> np.ndarray:
    """The loss the law predicts after each of `curve.steps` steps."""
    law = LAWS[law_name]
    return law.model(constants, law.prepare(curve))


def fit(law_name: str, curves: list[LrLossCurve], starts: int = 8, seed: int = 0) -> Fit:
    """Fit the law's constants to every curve's losses at once; the best of `starts` seeded starts wins.

    It needs at least twice as many points as free constants: with fewer, the fit could pass through every
    point and the constants would mean nothing.
    """
    law = LAWS[law_name]
    y = np.concatenate([c.losses for c in curves])
    fixed = _fixed_constants(law_name, curves)
    free = [name for name in law.params if name not in fixed]
    if len(y) < 2 * len(free):
        raise UserError(f"the {law_name} law has {len(free)} constants to fit and needs at least {2 * len(free)} "
                        f"evaluation points, the runs hold {len(y)} (evaluate more often: train.eval_interval)")
    if np.any(~np.isfinite(y)) or np.any(y <= 0):
        raise UserError("every evaluation loss to fit must be a positive finite number")
    xs = [law.prepare(c) for c in curves]
    bounds = law.bounds(y)
    lower = np.array([bounds[n][0] for n in free])
    upper = np.array([bounds[n][1] for n in free])

    def constants(v: np.ndarray) -> dict[str, float]:
        given = {**fixed, **dict(zip(free, v.tolist()))}
        return {name: given[name] for name in law.params}

    def residuals(v: np.ndarray) -> np.ndarray:
        pred = np.concatenate([law.model(constants(v), x) for x in xs])
        return np.log(np.maximum(pred, 1e-6)) - np.log(y)

    rng = np.random.default_rng(seed)
    best = None
    for _ in range(starts):
        guess = law.start(rng, y, xs)
        v0 = np.clip([guess[n] for n in free], lower, upper)
        result = least_squares(residuals, v0, bounds=(lower, upper), loss="soft_l1", f_scale=ROBUST_SCALE,
                               x_scale="jac", max_nfev=2000)
        if best is None or result.cost < best.cost:
            best = result
    found = constants(best.x)
    pred = np.concatenate([law.model(found, x) for x in xs])
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return Fit(law_name, found, tuple(fixed), 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
               float(np.mean(np.abs(y - pred))), len(y))


def _fixed_constants(law_name: str, curves: list[LrLossCurve]) -> dict[str, float]:
    """Constants the data cannot determine: kappa without two replay fractions (see the module docstring)."""
    if law_name != "cpt":
        return {}
    if all(c.shift_start is None for c in curves):
        raise UserError("the cpt law needs a run with a stage that switched to new data (its shift term starts "
                        "there); these runs have none: use --law tissue or multipower")
    fractions = {c.replay for c in curves if c.shift_start is not None}
    return {} if len(fractions) > 1 else {"kappa": 1.0}
