"""``python -m overlap_bench.research.tp_check --out DIR``: PolicyRowwiseParallel against torch's RowwiseParallel
(same output) and the drop-in RowParallelLinear (its overhead), on one process group (by default one rank).
Per preset shape and M: each output's ``rel_err`` against RowwiseParallel's and the three layers' times."""

from __future__ import annotations

import argparse
import copy
import csv
import io
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import init_device_mesh
from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

from overlap_bench import envinfo, runfolder
from overlap_bench.errors import UserError
from overlap_bench.layer import RowParallelLinear
from overlap_bench.metrics import DTYPES
from overlap_bench.metrics import TOLERANCE, rel_err, within_tolerance
from overlap_bench.policy import PACKAGE_DIR, PolicyError, load_policy, policy_filename
from overlap_bench.presets import row_parallel_shapes
from overlap_bench.timing import time_region
from overlap_bench.tp import PolicyRowwiseParallel

LAYERS = ("style", "dropin", "rowwise")
"""PolicyRowwiseParallel, RowParallelLinear (both under the policy) and torch's RowwiseParallel."""
DEFAULT_POLICY = PACKAGE_DIR / policy_filename("NVIDIA H100 80GB HBM3", 4, "bfloat16")
RESULT = "tp_check.json"


def _ready(y: torch.Tensor) -> torch.Tensor:
    """The output with its collective finished (torch's path returns an async collective tensor)."""
    return y.wait() if hasattr(y, "wait") else y


def check_shape(name: str, k: int, n: int, tokens: list[int], policy, mesh, dtype: str, device: torch.device,
                warmup: int, reps: int, rounds: int) -> list[dict]:
    """The rows of one ``(K per rank, N)`` shape: per M, each layer's choice, ``rel_err`` and time."""
    world, rank = mesh.size(), dist.get_rank()
    torch.manual_seed(0)  # the same full weight on every rank
    full = nn.Linear(k * world, n, bias=False, device=device, dtype=DTYPES[dtype])
    layers = {"style": parallelize_module(copy.deepcopy(full), mesh, PolicyRowwiseParallel(policy=policy)),
              "dropin": RowParallelLinear.from_weight(full.weight[:, rank * k:(rank + 1) * k].detach(), policy=policy),
              "rowwise": parallelize_module(full, mesh, RowwiseParallel())}
    rows = []
    for m in tokens:
        x = torch.randn(m, k, device=device, dtype=DTYPES[dtype])
        with torch.no_grad():
            ys = {key: _ready(layer(x)) for key, layer in layers.items()}
            times: dict[str, list] = {key: [] for key in LAYERS}
            for r in range(rounds):
                for key in LAYERS:
                    times[key].append(time_region(lambda: _ready(layers[key](x)), warmup=warmup if r == 0 else 1,
                                                  reps=reps, group=None, device=device))
        t = {key: statistics.median(v.median_ms for v in times[key]) for key in LAYERS}
        err = {key: rel_err(ys[key], ys["rowwise"]) for key in ("style", "dropin")}
        rows.append({
            "shape": name, "K": k, "N": n, "M": m, "dtype": dtype, "world": world,
            "choice_style": layers["style"].last_choice.label, "choice_dropin": layers["dropin"].last_choice.label,
            "reason": layers["style"].last_choice.reason,
            "rel_err_style": err["style"], "rel_err_dropin": err["dropin"], "tol": TOLERANCE[dtype],
            "ok": all(within_tolerance(e, dtype) for e in err.values()),
            **{f"t_{key}_ms": t[key] for key in LAYERS},
            **{f"iqr_{key}_ms": max(v.iqr_ms for v in times[key]) for key in LAYERS},
            "style_over_dropin": t["style"] / t["dropin"] - 1, "style_over_rowwise": t["style"] / t["rowwise"] - 1})
        del x, ys
    return rows


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m overlap_bench.research.tp_check", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for tp_check.json/.csv, env.json and COMMAND.md")
    ap.add_argument("--preset", default="qwen2.5-72b")
    ap.add_argument("--tp", type=int, default=4, help="tensor-parallel size of the per-rank shapes")
    ap.add_argument("--tokens", default="2048,8192,16384", help="comma-separated token counts M")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on CPU")
    ap.add_argument("--policy", default=str(DEFAULT_POLICY), help="policy file (its meta is not enforced)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three layers")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the check on this process group (one rank of its own when none is set up); rank 0 writes."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    cuda = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        tokens = [0]
    for flag, values, lo in (("--tokens", tokens, 1), ("--warmup", [args.warmup], 0), ("--reps", [args.reps], 1),
                             ("--rounds", [args.rounds], 1)):
        if min(values) < lo:
            raise UserError(f"{flag}: give integers >= {lo} (e.g. --tokens 2048,8192 --warmup 5 --reps 20)")
    if dtype not in DTYPES:
        raise UserError(f"--dtype: unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    try:
        shapes, policy = row_parallel_shapes(args.preset, args.tp), load_policy(args.policy)
    except (ValueError, PolicyError) as e:
        raise UserError(f"--preset/--tp/--policy: {e}") from None
    folder = runfolder.RunFolder(runfolder.ensure_folder(Path(args.out), "--out"))
    if (folder / RESULT).exists():
        raise UserError(f"--out: {folder.path} already holds {RESULT}; choose a new --out")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    own = not dist.is_initialized()
    if own and "WORLD_SIZE" in os.environ:  # under torchrun
        dist.init_process_group("nccl" if cuda else "gloo")
    elif own:
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        rows = [row for name, (k, n) in shapes.items() for row in check_shape(
            name, k, n, tokens, policy, mesh, dtype, device, args.warmup, args.reps, args.rounds)]
        rank = dist.get_rank()
    finally:
        if own:
            dist.destroy_process_group()
    if rank != 0:
        return []
    _write(folder, rows, " ".join(["python -m overlap_bench.research.tp_check", *map(shlex.quote, argv or [])]))
    return rows


def _write(folder: runfolder.RunFolder, rows: list[dict], command: str) -> None:
    folder.write_json(runfolder.ENV, envinfo.collect(command))
    folder.write_json(RESULT, rows)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    folder.write_text("tp_check.csv", text.getvalue())
    folder.write_text("COMMAND.md", f"# tp_check\n\n    {command}\n\nPer shape and M: the choice of "
                      "PolicyRowwiseParallel (style) and RowParallelLinear (dropin) under the policy given, each "
                      "output's rel_err against torch's RowwiseParallel, and the three layers' times (ms, the median "
                      "of interleaved rounds' medians). The policy's meta (device, world) is not enforced: this "
                      "checks the layers, not the overlap.\n")


if __name__ == "__main__":
    try:
        for row in main():
            print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
