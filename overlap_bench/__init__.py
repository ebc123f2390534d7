"""overlap-bench: measure, tune and ship GEMM / all-reduce overlap for tensor-parallel row-parallel layers."""

import importlib

__version__ = "0.1.0"


def __getattr__(name: str):
    """``overlap_bench.PolicyRowwiseParallel``, imported on first use (torch's tensor parallelism is not light)."""
    if name == "PolicyRowwiseParallel":
        return importlib.import_module("overlap_bench.tp").PolicyRowwiseParallel
    raise AttributeError(f"module 'overlap_bench' has no attribute {name!r}")
