"""Calibration: a few named physical constants fitted to measured latencies, each inside a physical bound.

Two stages, each a bounded nonlinear least-squares fit (scipy.optimize.least_squares) of the
logarithm of predicted over measured latency:
1. per GPU type, from the rows that ran on one GPU: the achieved fractions of peak of large GEMMs
   and of attention;
2. per cluster, from its multi-GPU rows with the GPU held at stage 1's values: the host's time per
   eager operator (a property of the node's CPU, and what bounds scaling once a block's kernels
   shrink below it; a single GPU running a large generation hides it, so one-GPU rows cannot tell it),
   and for every link tier that carries the rows' exposed communication the achieved fraction of
   point-to-point/ring traffic, that of all-to-all, and the per-message latency.
Each parameter starts from its datasheet-based prior and is softly pulled back to it (a prior
residual of log(value / prior) / PRIOR_SPREAD, in units of MEASUREMENT_SPREAD), so a parameter
the rows say nothing about stays at its prior instead of wandering to a bound. Uncertainties come
from the Jacobian at the solution. The rows' cluster column decides which cluster each row is on.
"""
from __future__ import annotations

import math
import multiprocessing
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

from costmodel.errors import DitplanError
from costmodel.config import ParallelConfig
from costmodel.topology import Cluster, LinkSpec, load_cluster

# Spread of a measured latency around the model (log units) and of a constant around its
# datasheet-based prior: a prior is worth one row whose error is PRIOR_SPREAD / MEASUREMENT_SPREAD
# times the parameter's relative change.
MEASUREMENT_SPREAD = 0.05
PRIOR_SPREAD = 0.5
# A parameter is fitted only where the rows pin it down: to within this relative spread (from the
# rows' sensitivity to it at the prior, at MEASUREMENT_SPREAD per row). The others keep their prior:
# a latency of a few microseconds, say, that changes no row by more than the noise.
IDENTIFIABLE = 0.2
# Physical bounds. GEMMs in eager PyTorch reach 30-90 % of the tensor-core peak (cuBLAS at DiT
# shapes); FlashAttention-style kernels 20-85 %; an eager operator costs the host 4-60 us (a fast
# server core issuing a cached kernel to a slow or loaded one going through Python module calls).
GPU_BOUNDS: dict[str, tuple[float, float, str]] = {
    "matmul_efficiency": (0.3, 0.9, "of peak"),
    "attention_efficiency": (0.2, 0.85, "of peak"),
}
HOST_BOUNDS = (4.0, 60.0, "us")
# A link carries 5-95 % of its datasheet bandwidth for bulk point-to-point traffic and 3-95 % for
# all-to-all (many small flows through shared switches and host bridges); a message costs 1 us (NVLink)
# to 500 us (TCP over Ethernet, staged through host memory).
LINK_BOUNDS: dict[str, tuple[float, float, str]] = {
    "efficiency": (0.05, 0.95, "of bandwidth"),
    "alltoall_efficiency": (0.03, 0.95, "of bandwidth"),
    "latency_us": (1.0, 500.0, "us"),
}
PATTERN_FIELDS = {"p2p": ("efficiency", "latency_us"), "all_gather": ("efficiency", "latency_us"),
                  "all_to_all": ("alltoall_efficiency", "latency_us")}


@dataclass
class Parameter:
    """One fitted constant: `scope` is a GPU type id (stage 1) or a cluster id (stage 2)."""

    scope: str
    name: str  # matmul_efficiency, host_op_us, or <tier>.<field>
    prior: float  # the datasheet-based value it starts from
    low: float
    high: float
    unit: str
    replaced: float  # the value in the profile before this calibration
    value: float = math.nan
    sigma: float = math.nan  # one standard deviation, in the parameter's unit
    fitted: bool = True  # False: the rows do not constrain it, so it stays at its prior

    @property
    def label(self) -> str:
        return f"{self.scope}.{self.name}"

    @property
    def at_bound(self) -> bool:
        return math.isclose(self.value, self.low, rel_tol=1e-3) or math.isclose(self.value, self.high, rel_tol=1e-3)


@dataclass
class Calibration:
    parameters: list[Parameter]
    rows: list[dict[str, Any]]  # the rows used, each with predicted_s and error_pct under the fitted values
    bases: dict[str, Cluster] = field(default_factory=dict, repr=False)
    left_out: list[tuple[dict[str, Any], str]] = field(default_factory=list)  # rows the model cannot price, why

    def cluster(self, cluster_id: str, gpus: int) -> Cluster:
        """The cluster with the fitted constants (priors where nothing was fitted), on its first `gpus` GPUs."""
        return _apply(_at_priors(_base(self.bases, cluster_id)), gpus, {p.label: p.value for p in self.parameters})


def _base(bases: dict[str, Cluster], cluster_id: str) -> Cluster:
    """The cluster as loaded (its shipped constants), cached in `bases`."""
    if cluster_id not in bases:
        bases[cluster_id] = load_cluster(cluster_id)
    return bases[cluster_id]


def _at_priors(cluster: Cluster) -> Cluster:
    """The cluster with every calibrated constant back at its datasheet-based prior: calibration
    starts here, so no fit ever sees constants an earlier fit derived from the same rows."""
    hw_priors = {name: value for name, value in cluster.hardware.priors if name in GPU_BOUNDS}
    priors = dict(cluster.priors)
    links = {}
    for tier, link in cluster.tiers().items():
        changes = {name: priors[f"links.{tier}.{name}"] for name in LINK_BOUNDS if f"links.{tier}.{name}" in priors}
        if changes:
            links[tier] = replace(link, **changes)
    return cluster.with_constants(hardware=replace(cluster.hardware, **hw_priors) if hw_priors else None,
                                  host_op_us=priors.get("host_op_us"), links=links)


def _prior_of(priors: tuple[tuple[str, float], ...], name: str, current: float) -> float:
    return dict(priors).get(name, current)


def _apply(base: Cluster, gpus: int, values: dict[str, float]) -> Cluster:
    """`base` with every value that names its GPU type or itself, on its first `gpus` GPUs."""
    hw = base.hardware
    hw_values = {name: values[f"{hw.id}.{name}"] for name in GPU_BOUNDS if f"{hw.id}.{name}" in values}
    host = values.get(f"{base.id}.host_op_us")
    links: dict[str, LinkSpec] = {}
    for tier, link in base.tiers().items():
        changes = {name: values[f"{base.id}.{tier}.{name}"] for name in LINK_BOUNDS if f"{base.id}.{tier}.{name}" in values}
        if changes:
            links[tier] = replace(link, **changes)
    cluster = base.with_constants(hardware=replace(hw, **hw_values) if hw_values else None, host_op_us=host, links=links)
    cluster.gpus = gpus
    return cluster


def _gpu_parameters(cluster: Cluster) -> list[Parameter]:
    hw = cluster.hardware
    out = []
    for name, (low, high, unit) in GPU_BOUNDS.items():
        prior = min(max(_prior_of(hw.priors, name, getattr(hw, name)), low), high)
        out.append(Parameter(hw.id, name, prior, low, high, unit, getattr(hw, name)))
    return out


def _host_parameter(cluster: Cluster) -> Parameter:
    low, high, unit = HOST_BOUNDS
    prior = min(max(_prior_of(cluster.priors, "host_op_us", cluster.host_op_us), low), high)
    return Parameter(cluster.id, "host_op_us", prior, low, high, unit, cluster.host_op_us)


def _link_parameters(cluster: Cluster, tiers: Iterable[str], patterns: set[str]) -> list[Parameter]:
    out = []
    for tier in tiers:
        link = cluster.tiers()[tier]
        names = sorted({name for pattern in patterns for name in PATTERN_FIELDS[pattern]}, key=list(LINK_BOUNDS).index)
        for name in names:
            low, high, unit = LINK_BOUNDS[name]
            current = getattr(link, name)
            prior = min(max(_prior_of(cluster.priors, f"links.{tier}.{name}", current), low), high)
            out.append(Parameter(cluster.id, f"{tier}.{name}", prior, low, high, unit, current))
    return out


def _fit(parameters: list[Parameter], rows: list[dict[str, Any]], predict: Callable[[dict[str, Any], dict[str, float]], float],
         fixed: dict[str, float]) -> None:
    """Least squares in log space; fills each parameter's value and sigma."""
    import numpy as np
    from scipy.optimize import least_squares

    if not parameters:
        return
    measured = np.array([float(row["latency_s"]) for row in rows])
    at_priors = {**fixed, **{p.label: p.prior for p in parameters}}
    free = [p for p in parameters if rows and _pinned(p, rows, predict, at_priors)]
    for parameter in parameters:
        if parameter not in free:
            parameter.value, parameter.sigma, parameter.fitted = parameter.prior, math.nan, False
    if not free:
        return
    fixed = {**at_priors, **{p.label: p.prior for p in parameters if p not in free}}
    x0 = np.log([p.prior for p in free])
    weight = MEASUREMENT_SPREAD / PRIOR_SPREAD

    def residuals(x: Any) -> Any:
        values = {**fixed, **{p.label: float(math.exp(v)) for p, v in zip(free, x)}}
        predicted = np.array([predict(row, values) for row in rows])
        return np.concatenate([np.log(predicted / measured), weight * (x - x0)])

    lower = np.log([p.low for p in free])
    upper = np.log([p.high for p in free])
    # Tolerances well below the 3 significant digits the profiles keep.
    result = least_squares(residuals, x0, bounds=(lower, upper), diff_step=1e-3, xtol=1e-5, ftol=1e-5, gtol=1e-8)
    fitted = result.fun[:len(rows)]
    # Residual variance: the rows' own scatter where there are more rows than parameters, never below
    # the measurement spread.
    dof = len(rows) - len(free)
    variance = max(MEASUREMENT_SPREAD**2, float(fitted @ fitted) / dof if dof > 0 else 0.0)
    covariance = np.linalg.pinv(result.jac.T @ result.jac) * variance
    for index, parameter in enumerate(free):
        parameter.value = float(math.exp(result.x[index]))
        parameter.sigma = float(parameter.value * math.sqrt(max(0.0, covariance[index, index])))


def _pinned(parameter: Parameter, rows: list[dict[str, Any]], predict: Callable[[dict[str, Any], dict[str, float]], float],
            values: dict[str, float]) -> bool:
    """Whether the rows determine `parameter` to within IDENTIFIABLE (the other parameters at their priors).

    The sensitivity is taken over a wide step each way (x/1.65 and x1.65, within the bounds): a host
    overhead or a link hidden behind compute at the prior only shows once it grows past it.
    """
    base = [math.log(predict(row, values)) for row in rows]
    best = 0.0
    for step in (-0.5, 0.5):
        moved_value = min(max(parameter.prior * math.exp(step), parameter.low), parameter.high)
        moved = math.log(moved_value / parameter.prior)
        if abs(moved) < 1e-9:
            continue
        shifted = [math.log(predict(row, {**values, parameter.label: moved_value})) for row in rows]
        information = sum((b - a) ** 2 for a, b in zip(base, shifted)) / (moved * MEASUREMENT_SPREAD) ** 2
        best = max(best, information)
    return best > 0 and 1.0 / math.sqrt(best) < IDENTIFIABLE


# Models whose public rows the built-in constants are validated on but not fitted to (`--builtin`
# leaves them out), so that their validation error is out of sample: added to the catalogue after
# the constants were fitted.
BUILTIN_HELD_OUT_MODELS = ("hunyuan-video",)


def calibrate(rows: list[dict[str, str]], clusters: list[str] | None = None,
              bases: dict[str, Cluster] | None = None, held_out_models: tuple[str, ...] = ()) -> Calibration:
    """Fit the GPU and link constants of `clusters` (default: every cluster the rows name) to `rows`.

    `bases` maps cluster ids to the Cluster each starts from (default: the built-in or file of that id);
    rows of `held_out_models` are left out of the fit.
    """
    from costmodel.validation import prediction_parts, published_latency

    bases = bases if bases is not None else {}
    names = clusters if clusters is not None else sorted({row["cluster"] for row in rows})
    starts = {name: _at_priors(_base(bases, name)) for name in names}

    def predict(row: dict[str, Any], values: dict[str, float]) -> float:
        return prediction_parts(row, _apply(starts[row["cluster"]], int(row["gpus"]), values))[0]

    usable, left_out = [], []
    for row in rows:
        if row["cluster"] in starts and row["model"] in held_out_models:
            left_out.append((row, f"{row['model']} is held out of the fit to validate the constants out of sample"))
        elif row["cluster"] in starts:
            reason = _unpriceable(row, starts[row["cluster"]])
            if reason:
                left_out.append((row, reason))
            else:
                usable.append(row)
    if not usable:
        raise DitplanError(f"no measurement row names cluster {' or '.join(names)} with a model and configuration "
                           "the cost model can price; nothing to calibrate.")
    # Stage 1: per GPU type, the one-GPU rows of every cluster with that GPU.
    parameters: list[Parameter] = []
    fixed: dict[str, float] = {}
    for hw_id in dict.fromkeys(bases[name].hardware.id for name in names):
        single = [row for row in usable if int(row["gpus"]) == 1 and starts[row["cluster"]].hardware.id == hw_id]
        gpu = _gpu_parameters(next(bases[name] for name in names if bases[name].hardware.id == hw_id))
        _fit(gpu, single, predict, {})
        parameters += gpu
        fixed.update({p.label: p.value for p in gpu})
    # Stage 2: per cluster, its multi-GPU rows, compute held at stage 1's values.
    for name in names:
        multi = [row for row in usable if int(row["gpus"]) > 1 and row["cluster"] == name]
        tiers, patterns = _traffic(multi, _apply(starts[name], starts[name].gpus, fixed))
        links = ([_host_parameter(bases[name])] if multi else []) + _link_parameters(bases[name], tiers, patterns)
        _fit(links, multi, predict, fixed)
        parameters += links
    values = {p.label: p.value for p in parameters}
    fitted_rows = []
    for row in usable:
        predicted = predict(row, values)
        published = published_latency(row)
        fitted_rows.append({**row, "predicted_s": predicted, "error_pct": 100.0 * (predicted - published) / published})
    return Calibration(parameters, fitted_rows, bases, left_out)


def _unpriceable(row: dict[str, str], start: Cluster) -> str:
    """Why the cost model cannot price `row` (a model it does not know, a configuration that breaks a
    rule), or "" where it can. A malformed row is the user's mistake and stops the calibration."""
    from costmodel.validation import prediction_parts

    for key in ("height", "width", "steps", "gpus", "latency_s"):
        try:
            value = float(row[key])
        except (KeyError, TypeError, ValueError):
            raise DitplanError(f"measurement row {row.get('scenario', '?')!r}: {key}={row.get(key)!r} is not a number.") from None
        if not math.isfinite(value) or value <= 0:
            raise DitplanError(f"measurement row {row.get('scenario', '?')!r}: {key}={row.get(key)!r} must be a positive number.")
    try:
        prediction_parts(row, _apply(start, int(row["gpus"]), {}))
    except (DitplanError, ValueError) as error:
        return str(error)
    return ""


def _patterns(config: ParallelConfig) -> set[str]:
    """The communication patterns a configuration uses."""
    patterns = set()
    if config.ulysses > 1:
        patterns.add("all_to_all")
    if config.ring > 1 or config.pipefusion > 1:
        patterns.add("p2p")
    if config.sp > 1 or config.cfg > 1:
        patterns.add("all_gather")
    return patterns


def _traffic(rows: list[dict[str, Any]], start: Cluster) -> tuple[list[str], set[str]]:
    """The tiers that carry the rows' exposed communication at the starting constants, and the patterns used."""
    from costmodel.validation import prediction_parts, row_config

    tiers: set[str] = set()
    patterns: set[str] = set()
    for row in rows:
        _, result = prediction_parts(row, _apply(start, int(row["gpus"]), {}))
        tiers.update(tier for tier, seconds in result.comm_by_tier.items() if seconds > 0 and tier in start.tiers())
        patterns |= _patterns(row_config(row))
    return [tier for tier in start.tiers() if tier in tiers], patterns


def leave_one_scenario_out(rows: list[dict[str, str]], clusters: list[str] | None = None,
                           bases: dict[str, Cluster] | None = None, progress: bool | None = None) -> list[dict[str, Any]]:
    """For each scenario: calibrate without its rows, predict them. One dict per predicted row.

    Only the constants the held-out rows bear on are refitted: those of its cluster and of the other
    clusters with the same GPU type; everything else would come out as in the full fit. The folds are
    independent fits, run in parallel on the machine's cores; `progress` shows a bar on stderr (None:
    where stderr is a terminal).
    """
    import sys
    from concurrent.futures import ProcessPoolExecutor

    bases = bases if bases is not None else {}
    names = clusters if clusters is not None else sorted({row["cluster"] for row in rows})
    scenarios = list(dict.fromkeys(row["scenario"] for row in rows if row["cluster"] in names))
    folds = [(scenario, rows, names, bases) for scenario in scenarios]
    workers = min(len(folds), os.cpu_count() or 1)
    bar = None
    if progress or (progress is None and sys.stderr.isatty()):
        from tqdm import tqdm

        bar = tqdm(total=len(folds), desc="cross-validating", unit="scenario", file=sys.stderr, leave=False)
    # Forked workers inherit the loaded profiles; map keeps the scenarios' order.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) if workers > 1 else None
    out: list[dict[str, Any]] = []
    try:
        for predicted in (pool.map(_fold, folds) if pool is not None else map(_fold, folds)):
            out.extend(predicted)
            if bar is not None:
                bar.update()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
    return out


def _fold(fold: tuple[str, list[dict[str, str]], list[str], dict[str, Cluster]]) -> list[dict[str, Any]]:
    """One scenario predicted by constants calibrated on the others (see `leave_one_scenario_out`)."""
    from costmodel.validation import prediction_parts, published_latency

    scenario, rows, names, bases = fold
    held = [row for row in rows if row["scenario"] == scenario]
    gpu_types = {_base(bases, row["cluster"]).hardware.id for row in held}
    affected = [name for name in names if _base(bases, name).hardware.id in gpu_types]
    rest = [row for row in rows if row["scenario"] != scenario and row["cluster"] in affected]
    calibration = _calibrate_or_priors(rest, affected, bases)
    out = []
    for row in held:
        try:
            predicted, _ = prediction_parts(row, calibration.cluster(row["cluster"], int(row["gpus"])))
        except (DitplanError, ValueError):
            continue
        published = published_latency(row)
        out.append({**row, "predicted_s": predicted, "error_pct": 100.0 * (predicted - published) / published})
    return out


def _calibrate_or_priors(rows: list[dict[str, str]], names: list[str], bases: dict[str, Cluster]) -> Calibration:
    """Calibration on `rows`; with no usable row, every parameter at its prior."""
    try:
        return calibrate(rows, names, bases)
    except DitplanError:
        return Calibration([], [], bases)  # every constant at its prior
