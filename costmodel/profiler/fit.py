"""Turning raw samples into what a profile stores: size-binned operation tables and the
latency + size / bandwidth fit of each communication pattern (scipy), with its residual.

Pure Python + scipy; no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class LinearFit:
    """seconds = latency_s + bytes / (bandwidth_gbs x 1e9); `residual` is the RMS relative error."""

    latency_s: float
    bandwidth_gbs: float
    residual: float

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / (self.bandwidth_gbs * 1e9)

    def describe(self) -> str:
        return (f"fit: {self.latency_s * 1e6:.0f} us + bytes / {self.bandwidth_gbs:.2f} GB/s, "
                f"RMS relative residual {self.residual * 100:.1f} %")


def fit_latency_bandwidth(sizes: Sequence[float], seconds: Sequence[float]) -> LinearFit:
    """Least squares on relative errors (every size counts alike, 4 KB as much as 64 MB), with the
    latency and the inverse bandwidth kept non-negative."""
    from scipy.optimize import least_squares

    if len(sizes) != len(seconds) or len(sizes) < 2:
        raise ValueError("a latency/bandwidth fit needs at least two (size, seconds) samples")
    xs = [float(x) for x in sizes]
    ys = [float(y) for y in seconds]

    def relative(params):
        latency, per_byte = params
        return [(latency + per_byte * x) / y - 1.0 for x, y in zip(xs, ys)]

    # Start from the two ends: the smallest message is mostly latency, the largest mostly bandwidth.
    per_byte0 = max((ys[-1] - ys[0]) / max(xs[-1] - xs[0], 1.0), 1e-15)
    latency0 = max(ys[0] - per_byte0 * xs[0], 1e-9)
    result = least_squares(relative, x0=[latency0, per_byte0], bounds=([0.0, 1e-18], [math.inf, math.inf]),
                           x_scale=[latency0, per_byte0])
    latency, per_byte = result.x
    residual = math.sqrt(sum(r * r for r in relative(result.x)) / len(xs))
    return LinearFit(float(latency), float(1.0 / per_byte / 1e9), residual)


def fit_latency_and_bulk(sizes: Sequence[float], seconds: Sequence[float], bulk_bytes: float = 2**20) -> LinearFit:
    """Latency from the smallest message, bandwidth from the bulk ones (>= `bulk_bytes`, median
    seconds per byte). For a shaped or shared link, where mid-size messages ride the token bucket's
    burst and a relative fit over all sizes would trade the bulk rate for them."""
    pairs = sorted(zip(map(float, sizes), map(float, seconds)))
    bulk = [t / n for n, t in pairs if n >= bulk_bytes] or [pairs[-1][1] / pairs[-1][0]]
    per_byte = sorted(bulk)[len(bulk) // 2]
    latency = max(0.0, pairs[0][1] - pairs[0][0] * per_byte)
    residual = math.sqrt(sum(((latency + per_byte * n) / t - 1.0) ** 2 for n, t in pairs) / len(pairs))
    return LinearFit(latency, 1.0 / per_byte / 1e9, residual)


def binned_table(samples: Iterable[tuple[float, float]], factor: float = 4.0) -> list[list[float]]:
    """[size, seconds] points, one per size bin of width `factor`: the geometric means of the sizes
    and of the rates (size / second) of the samples in the bin. Different shapes of similar size
    (tall or wide GEMMs) average out, so the table is smooth enough to interpolate."""
    bins: dict[int, list[tuple[float, float]]] = {}
    for size, seconds in samples:
        if size <= 0 or seconds <= 0:
            raise ValueError(f"sample ({size}, {seconds}) must have a positive size and time")
        bins.setdefault(math.floor(math.log(size) / math.log(factor)), []).append((size, seconds))
    points = []
    for key in sorted(bins):
        group = bins[key]
        log_size = sum(math.log(s) for s, _ in group) / len(group)
        log_rate = sum(math.log(s / t) for s, t in group) / len(group)
        size = math.exp(log_size)
        points.append([float(f"{size:.6g}"), float(f"{size / math.exp(log_rate):.6g}")])
    return points


def rate_summary(points: Sequence[Sequence[float]], unit: float, label: str) -> str:
    """'label: a at size x .. b at size y' of size/seconds rates, in `unit` per second."""
    first, last = points[0], points[-1]
    peak = max(points, key=lambda p: p[0] / p[1])
    return (f"{label}: {first[0] / first[1] / unit:.1f} at {first[0]:.3g}, peak {peak[0] / peak[1] / unit:.1f} "
            f"at {peak[0]:.3g}, {last[0] / last[1] / unit:.1f} at {last[0]:.3g}")


def monotone_points(samples: Iterable[tuple[float, float]]) -> list[list[float]]:
    """[size, seconds] points sorted by size, each time capped by every larger size's time.

    Moving more bytes of one pattern never takes less time, so a sample slower than a bigger one
    met contention from elsewhere on the machine (its times have a long upper tail); the cap removes
    such spikes without touching the bulk of the curve.
    """
    points = sorted((float(size), float(seconds)) for size, seconds in samples)
    capped: list[list[float]] = []
    ceiling = math.inf
    for size, seconds in reversed(points):
        ceiling = min(ceiling, seconds)
        capped.append([size, float(f"{ceiling:.6g}")])
    return capped[::-1]
