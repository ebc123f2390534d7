"""Every derived number of a record, defined once: the reference, ideal, speedup, eta, TFLOP/s, busbw; and the
numerics gate (``rel_err`` against the baseline within a dtype's tolerance)."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

# Dtype names accepted in specs and on the command line.
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def finite(x: Any) -> bool:
    """Whether ``x`` is a number (not a bool) and finite: a time or ratio that can be shown and compared."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype named in :data:`DTYPES`."""
    return DTYPES[dtype].itemsize


def ideal_ms(t_gemm: float, t_comm: float) -> float:
    """The floor for any overlap of the two operations: ``max(t_gemm, t_comm)``."""
    return max(t_gemm, t_comm)


def reference(baselines: Iterable[tuple[float, float]]) -> tuple[float, float]:
    """THE reference of every speedup and eta: ``(t_base, iqr)`` of a bucket's fastest baseline measurement (a slow
    one would turn a tie into a win); ``(nan, 0)`` if none."""
    usable = [(t, iqr if math.isfinite(iqr) else 0.0) for t, iqr in baselines if math.isfinite(t) and t > 0]
    return min(usable) if usable else (math.nan, 0.0)


def beyond_spread(t: float, iqr: float, t_base: float, iqr_base: float) -> bool:
    """Whether ``t`` and ``t_base`` differ beyond the spread: their half-IQR bands (a missing IQR: 0) do not overlap."""
    h, hb = ((x if finite(x) else 0.0) / 2 for x in (iqr, iqr_base))
    return t + h < t_base - hb or t - h > t_base + hb


def speedup(t_base: float, t: float) -> float:
    """``t_base / t`` (``t_base`` from :func:`reference`): above 1 is faster than the baseline."""
    return t_base / t if t > 0 else math.nan


REFERENCE = "baseline"  # the label of THE reference: the product, then NCCL's default (ring) all-reduce


def is_reference(label: str) -> bool:
    """Whether ``label`` is THE reference of every speedup and eta (the ring baseline's default settings)."""
    return label == REFERENCE


def is_plain(strategy: str) -> bool:
    """Whether ``strategy`` is a plain all-reduce after the product (no overlap): ``baseline``, any ``comm``."""
    return strategy == REFERENCE


def best_plain(t_base: float, plain: Iterable[float]) -> float:
    """``t_plain``: a bucket's fastest plain all-reduce, the reference ``t_base`` or a plain reference's time."""
    usable = [t for t in (t_base, *plain) if finite(t) and t > 0]
    return min(usable) if usable else math.nan


def speedup_vs_plain(t_plain: float, t: float) -> float:
    """``t_plain / t`` (``t_plain`` from :func:`best_plain`): above 1 beats every plain all-reduce measured."""
    return speedup(t_plain, t)


# eta is n/a when the hideable time t_base - ideal is below this fraction of t_base or this many spreads.
ETA_MIN_ROOM = 0.05
ETA_MIN_SPREADS = 3.0


def eta(t_base: float, t: float, t_gemm: float, t_comm: float, spread: float = 0.0) -> float:
    """Hidden fraction of the hideable time, ``(t_base - t) / (t_base - ideal)`` (1 = at the floor, < 0 = slower);
    NaN when a time is missing or the hideable time is below ETA_MIN_ROOM * t_base or ETA_MIN_SPREADS * spread."""
    room = t_base - ideal_ms(t_gemm, t_comm)
    spread = spread if math.isfinite(spread) else 0.0
    if not room > max(ETA_MIN_ROOM * t_base, ETA_MIN_SPREADS * spread, 0.0):
        return math.nan
    return (t_base - t) / room


def eta_vs_plain(t_plain: float, t: float, t_gemm: float, t_comm: float, spread: float = 0.0) -> float:
    """:func:`eta` against ``t_plain`` (:func:`best_plain`): ``(t_plain - t) / (t_plain - ideal)``."""
    return eta(t_plain, t, t_gemm, t_comm, spread)


def model_eta(t_base: float, t: float, t_nocomm: float, noise: float = 0.0) -> float:
    """The share of a forward's row-parallel communication a mode hid, ``(t_base - t) / (t_base - t_nocomm)``;
    NaN unless ``t_base - t_nocomm`` is above ``noise`` (the measured spread)."""
    room = t_base - t_nocomm
    if not room > max(noise, 0.0):
        return math.nan
    return (t_base - t) / room


def inconsistent(t_base: float, t_gemm: float, t_comm: float, spread: float = 0.0) -> str | None:
    """Why a group's references contradict each other (a part slower than the whole beyond the spread), else None."""
    spread = spread if math.isfinite(spread) else 0.0
    for name, part in (("t_gemm", t_gemm), ("t_comm", t_comm)):
        if math.isfinite(part) and part > t_base + spread:
            return f"references inconsistent: {name} {part:.4g} ms > t_base {t_base:.4g} ms"
    return None


def tflops(m: int, k: int, n: int, t_ms: float) -> float:
    """Per-rank TFLOP/s of the ``[M,K]x[K,N]`` product (K per rank) done in ``t_ms``."""
    return 2.0 * m * k * n / (t_ms * 1e-3) / 1e12 if t_ms > 0 else math.nan


def busbw_gbps(m: int, n: int, dtype: str, world: int, t_comm_ms: float) -> float:
    """All-reduce bus bandwidth in GB/s as nccl-tests defines it: ``algbw * 2(n-1)/n``."""
    if t_comm_ms <= 0:
        return math.nan
    algbw = m * n * dtype_bytes(dtype) / (t_comm_ms * 1e-3) / 1e9
    return algbw * 2 * (world - 1) / world


def allreduce_ms(m: int, n: int, dtype: str, world: int, busbw_gbps_: float) -> float:
    """Time of an ``[M,N]`` all-reduce at bus bandwidth ``busbw_gbps_`` (the inverse of :func:`busbw_gbps`)."""
    if busbw_gbps_ <= 0 or world < 2:
        return math.nan
    return m * n * dtype_bytes(dtype) * 2 * (world - 1) / world / (busbw_gbps_ * 1e9) * 1e3


def tokens_per_s(m: int, t_ms: float) -> float:
    """Token rows per second through the layer."""
    return m / (t_ms * 1e-3) if t_ms > 0 else math.nan


def derive(*, m: int, k: int, n: int, dtype: str, world: int, t_ms: float, t_base_ms: float,
           t_gemm_ms: float, t_comm_ms: float) -> dict[str, float]:
    """All derived metrics of one measured case, as record fields."""
    return {"ideal_ms": ideal_ms(t_gemm_ms, t_comm_ms), "speedup": speedup(t_base_ms, t_ms),
            "eta": eta(t_base_ms, t_ms, t_gemm_ms, t_comm_ms), "tokens_per_s": tokens_per_s(m, t_ms),
            "tflops": tflops(m, k, n, t_ms), "busbw_gbps": busbw_gbps(m, n, dtype, world, t_comm_ms)}


# Largest accepted ||y - y_base|| / ||y_base|| per dtype: a few units of rounding above the noise of other GEMM
# kernels (a chunked product) and other NCCL algorithms (smaller messages) summing differently.
TOLERANCE: dict[str, float] = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 2e-2}


def rel_err(y: torch.Tensor, y_base: torch.Tensor) -> float:
    """``||y - y_base|| / ||y_base||`` computed in float64."""
    ref = y_base.double()
    denom = ref.norm().item()
    diff = (y.double() - ref).norm().item()
    return diff / denom if denom > 0 else diff


def within_tolerance(err: float, dtype: str) -> bool:
    """Whether ``err`` passes for ``dtype`` (NaN never passes)."""
    return err <= TOLERANCE[dtype]
