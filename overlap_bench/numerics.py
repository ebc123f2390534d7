"""Correctness beside every time: each strategy's output against the baseline's on the same inputs."""

from __future__ import annotations

import torch

TOLERANCE: dict[str, float] = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 2e-2}
"""Largest accepted ``||y - y_base|| / ||y_base||`` per dtype: a few units of the dtype's rounding above the noise
of other GEMM kernels (a chunked product) and other NCCL algorithms (smaller messages) summing differently."""


def rel_err(y: torch.Tensor, y_base: torch.Tensor) -> float:
    """``||y - y_base|| / ||y_base||`` computed in float64."""
    ref = y_base.double()
    denom = ref.norm().item()
    diff = (y.double() - ref).norm().item()
    return diff / denom if denom > 0 else diff


def within_tolerance(err: float, dtype: str) -> bool:
    """Whether ``err`` passes for ``dtype`` (NaN never passes)."""
    return err <= TOLERANCE[dtype]
