"""``gemm_sms=N``: the chunk products in a CUDA green context of N SMs, the rest left to communication."""

from __future__ import annotations

import torch

_STREAMS: dict[tuple[int, int], tuple[object, torch.cuda.Stream]] = {}


def green_reason(n: int, backend: str) -> str | None:
    """Why a green context of ``n`` SMs cannot be used here, or None (creates and keeps it when it can)."""
    if backend != "nccl" or not torch.cuda.is_available():
        return f"gemm_sms={n} needs CUDA green contexts (GPUs, backend nccl); {backend} runs on the CPU"
    try:
        from torch.cuda import green_contexts
    except ImportError:
        return "gemm_sms needs torch.cuda.green_contexts, which this torch lacks"
    if not getattr(green_contexts, "SUPPORTED", False):
        return "gemm_sms needs CUDA green contexts, and this torch was built without them"
    dev = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(dev).multi_processor_count
    if n >= total:
        return f"gemm_sms={n} leaves no SM for communication: this GPU has {total} SMs; use gemm_sms < {total}"
    try:
        green_stream(n)
    except RuntimeError as exc:  # driver older than 12.8, or the split failed
        return f"gemm_sms={n}: no green context: {str(exc).splitlines()[0]}"
    return None


def green_stream(n: int) -> torch.cuda.Stream:
    """The stream of a green context of ``n`` SMs on the current device (created once, kept alive)."""
    dev = torch.cuda.current_device()
    key = (dev, n)
    if key not in _STREAMS:
        from torch.cuda.green_contexts import GreenContext

        ctx = GreenContext.create(num_sms=n, device_id=dev)
        _STREAMS[key] = (ctx, ctx.Stream())
    return _STREAMS[key][1]
