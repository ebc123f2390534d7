"""One GPU: chunked-prefill attention as the nano-batch schedule runs it (each token range over the keys of
all ranges up to its own) against the whole sequence's causal attention, on Qwen2.5-72B per-rank heads at
tp=4, for both implementations (``lower-right``: one SDPA call with a bottom-right causal mask; ``split``:
prefix and own range merged by log-sum-exp) and the whole call restricted to one kernel (which one torch
picks): error and time (median of 10 CUDA-event timed calls). Prints JSON lines."""

import json
import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from overlap_bench import model
from overlap_bench.nanobatch import nano_bounds, split_attention
from overlap_bench.numerics import rel_err
from overlap_bench.presets import PRESETS


def timed(fn, reps=10):
    for _ in range(2):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


d = model.Dims.of(PRESETS["qwen2.5-72b"], 4)
g = torch.Generator(device="cuda").manual_seed(0)
for m in (16384, 32768):
    q = torch.randn(1, d.heads, m, d.head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, d.kv_heads, m, d.head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, d.kv_heads, m, d.head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    whole = model.attention(q, k, v)
    row = {"M": m, "heads": d.heads, "kv_heads": d.kv_heads, "head_dim": d.head_dim,
           "t_whole_ms": timed(lambda: model.attention(q, k, v))}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                row[f"t_whole_{name}_only_ms"] = timed(lambda: model.attention(q, k, v))
        except RuntimeError as e:
            row[f"whole_{name}_only"] = f"not taken: {str(e).splitlines()[0][:200]}"
    for n in (2, 3):
        bounds = nano_bounds(m, n)
        for impl, attend in (("lower_right", model.attention), ("split", split_attention)):

            def parts():
                return [attend(q[:, :, s:e], k[:, :, :e], v[:, :, :e]) for s, e in bounds]

            try:
                row[f"rel_err_{impl}_n{n}"] = rel_err(torch.cat(parts(), dim=2), whole)
                row[f"t_{impl}_n{n}_ms"] = timed(parts)
            except RuntimeError as e:
                row[f"{impl}_n{n}"] = f"failed: {str(e).splitlines()[0][:200]}"
    print(json.dumps(row), flush=True)
