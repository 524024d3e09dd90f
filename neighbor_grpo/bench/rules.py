"""The comparison's rules, as pure functions on curves: fixed before any run, frozen in the results JSON.

- evaluation points: the same forward-equivalent points for every method, denser early (`evaluation_points`);
- final value: the mean of the last 3 held-out evaluations (`final_value`);
- target: base + 0.8 x the best main-table method's mean final gain over the base (`frozen_target`);
- time to target: linear interpolation between the two evaluations that bracket the first crossing; a run that
  never gets there is censored at its budget, a lower bound, never dropped (`crossing_point`);
- lr selection: the highest area under the held-out proxy curve (`area_under_curve`, applied by
  bench.grid.select), never the gold;
- gold-free selection (issue #23): the held-out proxy area with the proxy counted as 0 from the evaluation at
  which a gold-free monitor leaves its band for good (`band_exit`: out at most evaluations from there to the end;
  the first exit, `first_band_exit`, is recorded beside it; `monitored_proxy_area`), a one-evaluation spike cut
  to its neighbours (`despiked`), averaged over the tuning seeds (`select_gold_free`); the bands come from the
  base model's own spread (`bands_from_base_spread`);
- sustained time to target: the first evaluation from which the curve stays >= target to the end
  (`sustained_crossing`), the first crossing beside it;
- lr grids widened in x3 steps both ways until the choice is interior, at most `MAX_LR_POINTS` (`widen_lrs`);
- intervals: 95% Student-t intervals over seeds, of paired log-ratios (`paired_ratio`) and of paired differences
  (`no_worse`).
"""

from __future__ import annotations

import math
from typing import Sequence

FINAL_EVALUATIONS = 3
TARGET_FRACTION = 0.8
NO_WORSE_MARGIN = 0.02
CONFIDENCE = 0.95
MAX_LR_POINTS = 6
LR_STEP = 3.0

# Which way each gold-free monitor goes when a run degrades (issue #23): fewer distinct samples per prompt, more
# pixels outside the data range, a velocity field far from the base model's, samples far from any real digit.
# A band is bounded only on that side; moving the other way (more diverse, fewer clipped pixels) is no harm.
MONITOR_HARM = {"diversity": "low", "out_of_range": "high", "distance": "high", "realism": "high"}


def evaluation_points(budget: float, count: int, power: float = 1.5) -> list[float]:
    """`count` points in (0, budget], the last at the budget, spaced as (k / count) ** power: denser early, where
    the curves move fastest. The base model (point 0) is evaluated besides these."""
    if not budget > 0:
        raise ValueError(f"budget: expected > 0 forward-equivalents, got {budget}")
    if count < FINAL_EVALUATIONS:
        raise ValueError(f"evaluations per run: expected >= {FINAL_EVALUATIONS} (the final value averages the last "
                         f"{FINAL_EVALUATIONS}), got {count}")
    return [budget * (k / count) ** power for k in range(1, count + 1)]


def final_value(values: Sequence[float], last: int = FINAL_EVALUATIONS) -> float:
    """Mean of the last `last` held-out evaluations (one evaluation is too noisy to end a curve on)."""
    if len(values) < last:
        raise ValueError(f"a final value needs >= {last} evaluations, got {len(values)}")
    tail = list(values)[-last:]
    return sum(tail) / len(tail)


def frozen_target(base: float, finals: dict[str, Sequence[float]], fraction: float = TARGET_FRACTION) -> float:
    """base + fraction x max over methods of (mean over seeds of the final value - base)."""
    if not finals:
        raise ValueError("a target needs at least one method's final values")
    gains = [sum(v) / len(v) - base for v in finals.values()]
    return base + fraction * max(gains)


def crossing_point(xs: Sequence[float], ys: Sequence[float], target: float) -> float | None:
    """Where the curve first reaches `target`, linearly interpolated between the two evaluations that bracket the
    crossing; None if it never does (censored at the last x)."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"a curve needs as many x as y values (>= 1), got {len(xs)} and {len(ys)}")
    for i, y in enumerate(ys):
        if y >= target:
            if i == 0:
                return float(xs[0])
            x0, y0, x1 = xs[i - 1], ys[i - 1], xs[i]
            return float(x0 + (target - y0) / (y - y0) * (x1 - x0))
    return None


def value_at(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """y where the curve first reaches x, interpolated (xs need not be monotone: a distance from the base can
    shrink); None if x is never reached. The same first-crossing rule with the roles of x and y swapped."""
    return crossing_point(ys, xs, x)


def area_under_curve(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Trapezoid area divided by the x-range: the curve's mean height, comparable across budgets."""
    if len(xs) < 2:
        raise ValueError(f"an area needs >= 2 points, got {len(xs)}")
    area = sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))
    return area / (xs[-1] - xs[0])


def despiked(ys: Sequence[float]) -> list[float]:
    """Each evaluation after the first capped at the higher of its neighbours (the last at its predecessor): a
    value one evaluation alone reaches is noise, not progress, and must not win a selection."""
    ys = [float(y) for y in ys]
    out = list(ys)
    for i in range(1, len(ys)):
        neighbours = ys[i - 1:i] + ys[i + 1:i + 2]
        out[i] = min(ys[i], max(neighbours))
    return out


def bands_from_base_spread(spread: dict[str, Sequence[float]], quantile: float = 1.0) -> dict[str, list[float | None]]:
    """Each monitor's band from the base model's own spread: on the harmful side (MONITOR_HARM) the `quantile` of
    the base model's values toward harm (1.0: its worst value); unbounded on the other. `spread` holds per-prompt
    values (a run leaves its band when its average is worse than the base model's worst prompt) or per-sample
    values (worse than the base model's `quantile` sample: its average image, pair or state looks like the base
    model's rare bad ones)."""
    import numpy as np

    if not 0.5 < quantile <= 1.0:
        raise ValueError(f"monitor bands: expected a quantile in (0.5, 1], got {quantile}")
    bands = {}
    for name, values in spread.items():
        if name not in MONITOR_HARM:
            raise ValueError(f"monitor bands: unknown monitor {name!r}; expected one of {sorted(MONITOR_HARM)}")
        if len(values) == 0:
            raise ValueError(f"monitor bands: {name} has no values of the base model")
        if MONITOR_HARM[name] == "low":
            bands[name] = [float(np.quantile(values, 1.0 - quantile)), None]
        else:
            bands[name] = [None, float(np.quantile(values, quantile))]
    return bands


def _out_of_band(record: dict, low: float | None, high: float | None, name: str) -> bool:
    value = record.get(name)
    return value is not None and ((low is not None and value < low) or (high is not None and value > high))


def first_band_exit(records: Sequence[dict], bands: dict[str, Sequence[float | None]]) -> int | None:
    """Index of the first evaluation at which any monitor with a band leaves it; None if none ever does. A record
    without a monitor's value (an older results JSON) is not judged on that monitor. Reported beside
    `band_exit`; the rule before issue #23's fresh grids showed one noisy evaluation could decide a selection."""
    for i, record in enumerate(records):
        if any(_out_of_band(record, low, high, name) for name, (low, high) in bands.items()):
            return i
    return None


def band_exit(records: Sequence[dict], bands: dict[str, Sequence[float | None]]) -> int | None:
    """Index of the first evaluation from which a monitor stays out of its band for good: out at more than half of
    the evaluations from there to the end (it included); None if no monitor does. A monitor that steps out once
    and comes back (the base model's own noise at a run's better state) is not an exit; a run that keeps leaving
    its band to the end is one, from where it began, even if single evaluations dip back in."""
    exits = []
    for name, (low, high) in bands.items():
        out = [_out_of_band(record, low, high, name) for record in records]
        for i in range(len(out)):
            if out[i] and 2 * sum(out[i:]) > len(out) - i:
                exits.append(i)
                break
    return min(exits, default=None)


def monitored_proxy_area(xs: Sequence[float], proxy: Sequence[float], exit_index: int | None) -> float:
    """The despiked held-out proxy's area (mean height), counted as 0 from `exit_index` on: a run earns nothing
    for the reward it gains after a monitor says it left what the base model does."""
    ys = despiked(proxy)
    if exit_index is not None:
        ys = ys[:exit_index] + [0.0] * (len(ys) - exit_index)
    return area_under_curve(xs, ys)


def select_gold_free(candidates: Sequence[dict], bands: dict[str, Sequence[float | None]],
                     exit_rule=band_exit) -> dict:
    """The gold-free rule: each candidate {"lr", "knob_index", "runs": [one run per tuning seed]} scores the mean
    over its runs of `monitored_proxy_area` (a run is {"curve": [records with fe, proxy and monitors]}) cut where
    `exit_rule` says it left its bands; the highest wins; ties: the smaller lr, then the knob listed first.
    Returns the winner with every score."""
    if not candidates:
        raise ValueError("gold-free selection needs at least one candidate")
    scored = []
    for candidate in candidates:
        areas, exits, first_exits = [], [], []
        for run in candidate["runs"]:
            curve = run["curve"]
            exit_index, first = exit_rule(curve, bands), first_band_exit(curve, bands)
            exits.append(None if exit_index is None else curve[exit_index]["fe"])
            first_exits.append(None if first is None else curve[first]["fe"])
            areas.append(monitored_proxy_area([r["fe"] for r in curve], [r["proxy"] for r in curve], exit_index))
        scored.append({**candidate, "score": sum(areas) / len(areas), "areas": areas, "band_exit_fe": exits,
                       "first_band_exit_fe": first_exits})
    best = max(scored, key=lambda c: (c["score"], -c["lr"], -c["knob_index"]))
    return {"best": best, "scored": scored}


def sustained_crossing(xs: Sequence[float], ys: Sequence[float], target: float) -> float | None:
    """Where the curve reaches `target` for good: the first evaluation from which every later one is >= target,
    interpolated against the evaluation before it; None if the last evaluation is below target (censored). A
    transient spike above the target, or a crossing the curve falls back from, is not a crossing."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"a curve needs as many x as y values (>= 1), got {len(xs)} and {len(ys)}")
    if ys[-1] < target:
        return None
    start = len(ys) - 1
    while start > 0 and ys[start - 1] >= target:
        start -= 1
    if start == 0:
        return float(xs[0])
    x0, y0, x1, y1 = xs[start - 1], ys[start - 1], xs[start], ys[start]
    return float(x0 + (target - y0) / (y1 - y0) * (x1 - x0))


def widen_lrs(lrs: Sequence[float], chosen: float, max_points: int = MAX_LR_POINTS,
              step: float = LR_STEP) -> float | None:
    """The next lr to add when the choice sits at an end of the grid: one x`step` beyond that end (rounded to 3
    significant digits); None when the choice is interior or the grid already has `max_points` (the choice then
    stays at an end, and the table must say so)."""
    lrs = sorted(set(lrs))
    if len(lrs) >= max_points or len(lrs) < 2 or lrs[0] < chosen < lrs[-1]:
        return None
    return float(f"{(chosen * step if chosen == lrs[-1] else chosen / step):.3g}")


def at_grid_end(lrs: Sequence[float], chosen: float) -> str | None:
    """'top' or 'bottom' when `chosen` is an end of the lr grid, 'single' for a one-point grid, else None."""
    lrs = sorted(set(lrs))
    if len(lrs) < 2:
        return "single"
    if lrs[0] < chosen < lrs[-1]:
        return None
    return "top" if chosen == lrs[-1] else "bottom"


def _t_cdf(t: float, df: int) -> float:
    """Student-t CDF, closed forms by the degrees of freedom (Abramowitz & Stegun 26.7.3 / 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    if df % 2 == 1:
        total, term = 0.0, math.cos(theta)
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= math.cos(theta) ** 2 * (2 * k) / (2 * k + 1)
        a = (2 / math.pi) * (theta + math.sin(theta) * total) if df > 1 else 2 * theta / math.pi
    else:
        total, term = 0.0, 1.0
        for k in range(1, df // 2 + 1):
            total += term
            term *= math.cos(theta) ** 2 * (2 * k - 1) / (2 * k)
        a = math.sin(theta) * total
    return 0.5 + a / 2


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (bisection on the exact CDF; scipy-free)."""
    if not 0 < p < 1 or df < 1 or int(df) != df:
        raise ValueError(f"t quantile: expected 0 < p < 1 and an integer df >= 1, got p={p}, df={df}")
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_cdf(mid, int(df)) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """Mean and two-sided Student-t interval of the mean; no interval from fewer than 2 values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def paired_ratio(ours: Sequence[float | None], theirs: Sequence[float | None],
                 ours_budget: float | Sequence[float], theirs_budget: float | Sequence[float]) -> dict:
    """Theirs over ours, seed by seed (seed s against seed s): the geometric mean and a 95% t-interval of the
    log-ratios. None is a censored run: it did not reach the target within its budget (one for all seeds, or one
    per seed). A censored seed leaves a bound without an interval: theirs censored -> the ratio is > the estimate
    with theirs set to its budget; ours censored -> < that; both censored (on any seeds) -> 'unknown'."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError(f"paired ratios need as many seeds on both sides (>= 1), got {len(ours)} and {len(theirs)}")
    n = len(ours)
    ours_budget = [ours_budget] * n if isinstance(ours_budget, (int, float)) else list(ours_budget)
    theirs_budget = [theirs_budget] * n if isinstance(theirs_budget, (int, float)) else list(theirs_budget)
    both = any(a is None and b is None for a, b in zip(ours, theirs))
    theirs_censored = any(b is None for b in theirs)
    ours_censored = any(a is None for a in ours)
    at_start = any(v is not None and v <= 0 for v in (*ours, *theirs))  # the base model already meets the target
    if both or (theirs_censored and ours_censored) or at_start:
        return {"kind": "unknown", "estimate": None, "low": None, "high": None}
    logs = [math.log((tb if b is None else b) / (ob if a is None else a))
            for a, b, ob, tb in zip(ours, theirs, ours_budget, theirs_budget)]
    estimate = math.exp(sum(logs) / len(logs))
    if theirs_censored or ours_censored:
        return {"kind": ">" if theirs_censored else "<", "estimate": estimate, "low": None, "high": None}
    interval = t_interval(logs)
    low, high = interval["low"], interval["high"]
    return {"kind": "=", "estimate": estimate, "low": None if low is None else math.exp(low),
            "high": None if high is None else math.exp(high)}


def no_worse(ours: Sequence[float], theirs: Sequence[float], margin: float = NO_WORSE_MARGIN) -> dict:
    """Ours is 'no worse' than theirs when the lower 95% bound of the mean paired difference (ours - theirs) of the
    final values is >= -margin."""
    if len(ours) != len(theirs) or len(ours) < 2:
        raise ValueError(f"'no worse' needs >= 2 paired seeds, got {len(ours)} and {len(theirs)}")
    interval = t_interval([a - b for a, b in zip(ours, theirs)])
    return {**interval, "margin": margin, "no_worse": interval["low"] >= -margin}


def format_ratio(ratio: dict) -> str:
    """'2.10x [1.40, 3.15]', '> 3.00x', '< 0.50x' or 'unknown'."""
    if ratio["kind"] == "unknown":
        return "unknown (both censored)"
    if ratio["kind"] in "<>":
        return f"{ratio['kind']} {ratio['estimate']:.2f}x"
    if ratio["low"] is None:
        return f"{ratio['estimate']:.2f}x"
    return f"{ratio['estimate']:.2f}x [{ratio['low']:.2f}, {ratio['high']:.2f}]"
