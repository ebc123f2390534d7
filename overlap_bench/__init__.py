"""overlap-bench: measure, tune and ship GEMM / all-reduce overlap for tensor-parallel row-parallel layers."""

__version__ = "0.1.0"
