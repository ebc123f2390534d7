"""One-GPU check after the review mends: chunked's paths (plain, gemm_sms, symm, symm+gemm_sms, below threshold)
against the baseline on the same inputs, through the package's own numerics check. World 1, NCCL."""
import json, os, sys
import torch
import torch.distributed as dist
from overlap_bench import strategies
from overlap_bench.numerics import rel_err, within_tolerance

os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29533")
torch.cuda.set_device(0)
dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
gen = torch.Generator(device="cuda").manual_seed(0)
rows = []
for (K, N, M) in ((2048, 8192, 16384), (7392, 8192, 8192)):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=gen) / K ** 0.5
    y_base = strategies.run("baseline", x, w, None, None, strategies.make_settings("baseline"))
    for label in sys.argv[1:]:
        name, settings = strategies.parse(label)
        why = strategies.unavailable_reason(name, settings, "nccl")
        if why:
            rows.append({"K": K, "N": N, "M": M, "label": label, "status": "unavailable", "reason": why}); continue
        y = strategies.run(name, x, w, None, None, settings)
        torch.cuda.synchronize()
        e = rel_err(y, y_base)
        rows.append({"K": K, "N": N, "M": M, "label": label, "status": "ok" if within_tolerance(e, "bfloat16") else "failed",
                     "rel_err": e, "paths": dict(strategies.pipeline.PATHS) if hasattr(strategies, "pipeline") else None})
for r in rows:
    print(json.dumps(r))
dist.destroy_process_group()
