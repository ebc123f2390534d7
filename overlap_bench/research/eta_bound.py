"""Bound eta before renting a multi-GPU node: the joint time of a GEMM and an all-reduce launched together from
the GEMM's slowdown ``s(k)`` beside k CTAs (``overlap-bench interference``). ``max`` model:
``max(t_gemm (1 + s), t_comm)``; ``rate`` model: the GEMM slowed only while the all-reduce runs."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

from overlap_bench import metrics

MODELS = ("max", "rate")


def interp_slowdown(curve: Mapping[float, float], k: float) -> float:
    """``s(k)`` interpolated linearly on a measured ``{ctas: slowdown}`` curve, ``s(0) = 0``; NaN outside it."""
    pts = sorted((float(x), float(y)) for x, y in curve.items() if math.isfinite(y))
    if not pts or k < 0:
        return math.nan
    if pts[0][0] > 0:
        pts.insert(0, (0.0, 0.0))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= k <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (k - x0) / (x1 - x0)
    return pts[0][1] if k == pts[0][0] else math.nan


def joint_ms(t_gemm: float, t_comm: float, s: float, model: str = "rate") -> float:
    """Predicted time of the GEMM and the all-reduce launched together (``model``: ``max`` or ``rate``)."""
    if model not in MODELS:
        raise ValueError(f"model: '{model}' is not one of {', '.join(MODELS)}")
    if not all(math.isfinite(v) for v in (t_gemm, t_comm, s)) or s <= -1:
        return math.nan
    slowed = t_gemm * (1 + s)
    if model == "max" or t_comm >= slowed:
        return max(slowed, t_comm)
    # During t_comm the GEMM does t_comm / (1 + s) of its alone-time work; the rest runs at full speed.
    return t_gemm + t_comm * s / (1 + s)


def eta_of_joint(t_gemm: float, t_comm: float, t_joint: float, t_base: float | None = None) -> float:
    """The eta a schedule reaching ``t_joint`` would have (``t_base`` defaults to ``t_gemm + t_comm``)."""
    base = t_gemm + t_comm if t_base is None or not math.isfinite(t_base) else t_base
    return metrics.eta(base, t_joint, t_gemm, t_comm)


@dataclass(frozen=True)
class Prediction:
    """One shape and M: the inputs (``slowdown``: ``s(ctas)``), both models' joint times and etas, and their
    relative errors against a measured joint launch."""

    shape: str
    K: int
    N: int
    M: int
    env: str
    t_gemm_ms: float
    t_comm_ms: float
    comm_from: str
    ctas: float
    slowdown: float
    t_joint_max_ms: float
    t_joint_rate_ms: float
    eta_max: float
    eta_rate: float
    t_joint_measured_ms: float = math.nan
    err_max: float = math.nan
    err_rate: float = math.nan
    eta_measured: float = math.nan

    def to_dict(self) -> dict:
        """Plain dict (a JSON row)."""
        return asdict(self)


def predict(*, shape: str, K: int, N: int, M: int, t_gemm: float, t_comm: float, curve: Mapping[float, float],
            ctas: float, comm_from: str, env: str = "-", t_base: float | None = None,
            t_joint_measured: float = math.nan) -> Prediction:
    """Both models for one case, and their error against a measured joint time when one is given."""
    s = interp_slowdown(curve, ctas)
    t_max, t_rate = joint_ms(t_gemm, t_comm, s, "max"), joint_ms(t_gemm, t_comm, s, "rate")

    def err(pred: float) -> float:
        return (pred - t_joint_measured) / t_joint_measured if t_joint_measured > 0 else math.nan

    return Prediction(shape=shape, K=K, N=N, M=M, env=env, t_gemm_ms=t_gemm, t_comm_ms=t_comm, comm_from=comm_from,
                      ctas=ctas, slowdown=s, t_joint_max_ms=t_max, t_joint_rate_ms=t_rate,
                      eta_max=eta_of_joint(t_gemm, t_comm, t_max, t_base),
                      eta_rate=eta_of_joint(t_gemm, t_comm, t_rate, t_base),
                      t_joint_measured_ms=t_joint_measured, err_max=err(t_max), err_rate=err(t_rate),
                      eta_measured=eta_of_joint(t_gemm, t_comm, t_joint_measured, t_base))


def error_summary(preds: Iterable[Prediction]) -> dict[str, float]:
    """Median and largest absolute relative error of each model over the rows that have a measurement."""
    out: dict[str, float] = {}
    rows = [p for p in preds if math.isfinite(p.t_joint_measured_ms)]
    for model in MODELS:
        errs = sorted(abs(getattr(p, f"err_{model}")) for p in rows if math.isfinite(getattr(p, f"err_{model}")))
        out[f"median_abs_err_{model}"] = statistics.median(errs) if errs else math.nan
        out[f"max_abs_err_{model}"] = errs[-1] if errs else math.nan
    return out
