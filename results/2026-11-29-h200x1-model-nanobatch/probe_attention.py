"""One GPU: chunked-prefill attention as the nano-batch schedule runs it (each token range over the keys of
all ranges up to its own, causal mask aligned bottom right) against the whole sequence's causal attention,
on Qwen2.5-72B per-rank heads at tp=4: which SDPA kernels take it, its error, its time. Prints JSON lines."""

import json
import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from overlap_bench import model
from overlap_bench.nanobatch import nano_bounds
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
    for n in (2, 3):
        bounds = nano_bounds(m, n)

        def parts():
            return [model.attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e]) for s, e in bounds]

        row[f"rel_err_n{n}"] = rel_err(torch.cat(parts(), dim=2), whole)
        row[f"t_n{n}_ms"] = timed(parts)
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                row[f"flash_only_rel_err_n{n}"] = rel_err(torch.cat(parts(), dim=2), whole)
        except RuntimeError as e:
            row[f"flash_only_n{n}"] = f"not taken: {str(e).splitlines()[0][:200]}"
    print(json.dumps(row), flush=True)
