"""PolicyRowwiseParallel in torch's own tensor parallelism: a ColwiseParallel + PolicyRowwiseParallel model gives
ColwiseParallel + RowwiseParallel's outputs and gradients on gloo ranks while the policy's chunked and pr paths
really run; unknown shapes, other output layouts and baseline buckets are torch's own path; the README example
runs as written."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import overlap_bench
from overlap_bench.errors import UserError
from overlap_bench.launch import RankContext
from overlap_bench.policy import Policy, load_policy
from overlap_bench.research import tp_check
from overlap_bench.strategies.pipeline import PATHS
from overlap_bench.tp import PolicyRowwiseParallel
from tests.ranks import every_rank

ROOT = Path(__file__).resolve().parents[1]
K, N, D = 24, 10, 6  # the row-parallel layer's full K (divides by 2 and 3), its N, the model's input width
PR_M = 16384  # pr chunks from here (M // 3 rows each)
# M -> (what the policy runs, the PATHS counter its call adds); 3-D inputs count every leading dim as rows
CASES = {5: ("baseline", None), 8: ("chunked:chunks=3,comm=stream", "chunks=3"), 40: ("baseline", None),
         64: ("baseline", None), PR_M: ("pr", "chunks=4")}


def _policy(world: int) -> dict:
    """chunked from 8 rows, baseline from 40 (a bucket that ships the baseline), pr from 64 (its one range below
    16384 rows: RowwiseParallel's path)."""
    buckets = {8: {"strategy": "chunked", "settings": {"chunks": 3}}, 40: {"strategy": "baseline"},
               64: {"strategy": "pr"}}
    return {"meta": {"device": "cpu", "world_size": world, "dtype": "float32"},
            "shapes": {f"{K // world},{N}": {"name": "test/row", "buckets": buckets}}}


def _model(mesh, row_style, out: int = N) -> nn.Module:
    torch.manual_seed(0)  # the same full weights on every rank and in both plans
    model = nn.Sequential(nn.Linear(D, K), nn.Tanh(), nn.Linear(K, out))
    return parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": row_style})


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = (t.full_tensor() if isinstance(t, DTensor) else t for t in (a, b))
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def _check(ctx: RankContext, policy_path: str) -> list[str]:
    bad: list[str] = []
    mesh = init_device_mesh("cpu", (ctx.world,))
    policy = load_policy(policy_path, expect_world=ctx.world)
    ref, new = _model(mesh, RowwiseParallel()), _model(mesh, PolicyRowwiseParallel(policy=policy))
    for m, (label, path) in CASES.items():
        shape = (m // 4, 4, D) if m % 4 == 0 else (m, D)  # 3-D [B, S, D] where it divides: rows = B * S
        x = torch.randn(shape)
        xr, xn = x.clone().requires_grad_(), x.clone().requires_grad_()
        PATHS.clear()
        yr, yn = ref(xr), new(xn)
        ran = dict(PATHS)
        (yr.square().sum() + yn.square().sum()).backward()
        if new[2].last_choice.label != label or ran != ({path: 1} if path else {}):
            bad.append(f"M={m}: ran {new[2].last_choice.label} with paths {ran}, expected {label}, {path}")
        if m == 64 and "pr at M=64 is one product and all-reduce" not in new[2].last_choice.reason:
            bad.append(f"M=64: {new[2].last_choice.reason}")
        if not (_close(yr, yn) and not isinstance(yn, DTensor)):
            bad.append(f"M={m}: output differs from RowwiseParallel's or is not a local tensor ({type(yn)})")
        if not _close(xr.grad, xn.grad):
            bad.append(f"M={m}: input gradient differs")
        for (name, a), b in zip(ref.named_parameters(), new.parameters()):
            if a.grad.placements != b.grad.placements or not _close(a.grad, b.grad):
                bad.append(f"M={m}: gradient of {name} differs ({a.grad.placements} vs {b.grad.placements})")
        ref.zero_grad(), new.zero_grad()

    # use_local_output=False: a Replicate DTensor, as RowwiseParallel gives
    keep = _model(mesh, PolicyRowwiseParallel(policy=policy, use_local_output=False))
    y = keep(torch.randn(8, D))
    if not (isinstance(y, DTensor) and y.placements == (Replicate(),)) or keep[2].last_choice.strategy != "chunked":
        bad.append(f"use_local_output=False gave {type(y).__name__} {getattr(y, 'placements', '')}")
    # another output layout (sequence parallel's reduce-scatter) is RowwiseParallel's own path
    seq_ref = _model(mesh, RowwiseParallel(output_layouts=Shard(0)))
    seq = _model(mesh, PolicyRowwiseParallel(policy=policy, output_layouts=Shard(0)))
    x = torch.randn(8 * ctx.world, D)
    PATHS.clear()
    if not _close(seq_ref(x), seq(x)) or PATHS or "reduce-scatter" not in seq[2].last_choice.reason:
        bad.append(f"Shard(0) output: {seq[2].last_choice}, paths {dict(PATHS)}")
    # a shape the policy does not know: torch's path, one warning however often it is called
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda rec: seen.append(rec.getMessage())
    logging.getLogger("overlap_bench.policy").addHandler(handler)
    other, other_ref = (_model(mesh, style, out=N + 1) for style in (PolicyRowwiseParallel(policy=policy),
                                                                      RowwiseParallel()))
    PATHS.clear()
    for _ in range(3):
        x = torch.randn(8, D)
        if not _close(other(x), other_ref(x)):
            bad.append("unknown shape: output differs from RowwiseParallel's")
    if other[2].last_choice.reason != f"shape K={K // ctx.world}, N={N + 1} not in policy" or PATHS:
        bad.append(f"unknown shape ran {other[2].last_choice}, paths {dict(PATHS)}")
    if len([s for s in seen if f"N={N + 1}" in s]) != 1:
        bad.append(f"unknown shape warned {seen}")
    return bad


@pytest.mark.parametrize("world", [2, 3])
def test_the_style_gives_rowwise_parallels_outputs_and_gradients_running_the_policys_paths(tmp_path, world):
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(_policy(world)))
    every_rank(_check, (str(path),), world, tmp_path / "ranks", timeout_s=120)


def test_the_style_is_exported_lazily_and_wants_a_policy():
    assert overlap_bench.PolicyRowwiseParallel is PolicyRowwiseParallel
    with pytest.raises(TypeError, match=r"^PolicyRowwiseParallel: policy must be a Policy \(") as err:
        PolicyRowwiseParallel(policy="policy.yaml")
    assert "\n" not in str(err.value)
    assert PolicyRowwiseParallel(policy=Policy()).use_local_output


def test_the_readme_tp_example_runs_as_written(tmp_path):
    found = re.search(r"```python\n(# tp_example\.py.*?)```\s*\n(.*?)```text\n(.*?)```",
                      (ROOT / "README.md").read_text(), re.S)
    assert found, "README.md has no '# tp_example.py' block followed by its printed output"
    code, promised = found.group(1), found.group(3).splitlines()
    assert any(": chunked:" in line for line in promised) and any(": baseline," in line for line in promised)
    assert promised and all(line.endswith(": True") for line in promised)
    (tmp_path / "tp_example.py").write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "tp_example.py"]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and "terminate called without an active exception" in res.stderr:
        # A rare abort of a gloo rank's C++ threads (seen under load, not reproduced alone): run once more; that
        # run must pass whole. A bug of ours fails both runs alike (the example is deterministic).
        res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    cause = [line for line in res.stderr.splitlines() if not line.startswith("W")]  # not torchrun's warnings
    assert res.returncode == 0, "\n".join([f"stdout: {res.stdout!r}", *cause[:60]])
    assert res.stdout.splitlines() == promised


def test_the_one_gpu_check_runs_on_cpu_and_writes_its_results(tmp_path):
    pol = tmp_path / "p.yaml"  # tiny/o_proj at tp=2: chunked from 32 rows; tiny/down_proj unknown (baseline)
    pol.write_text(yaml.safe_dump({"meta": {"device": "cpu", "world_size": 2, "dtype": "float32"}, "shapes": {
        "128,256": {"buckets": {1: {"strategy": "baseline"},
                                32: {"strategy": "chunked", "settings": {"chunks": 3}}}}}}))
    args = ["--out", str(tmp_path / "out"), "--preset", "tiny", "--tp", "2", "--tokens", "16,64",
            "--policy", str(pol), "--dtype", "float32", "--warmup", "0", "--reps", "1", "--rounds", "1"]
    rows = tp_check.main(args)
    assert not dist.is_initialized()  # its own one-rank group, ended
    got = [(r["shape"], r["M"], r["choice_style"], r["choice_dropin"]) for r in rows]
    assert got == [("tiny/o_proj", 16, "baseline", "baseline"),
                   ("tiny/o_proj", 64, "chunked:chunks=3,comm=stream", "chunked:chunks=3,comm=stream"),
                   ("tiny/down_proj", 16, "baseline", "baseline"), ("tiny/down_proj", 64, "baseline", "baseline")]
    assert all(r["ok"] and r["rel_err_style"] <= 1e-6 and r["t_style_ms"] > 0 for r in rows)
    out = tmp_path / "out"
    assert json.loads((out / "tp_check.json").read_text()) == rows
    assert len((out / "tp_check.csv").read_text().splitlines()) == 5
    assert json.loads((out / "env.json").read_text())["command"].startswith("python -m overlap_bench.research.tp_check")
    assert "--preset tiny" in (out / "COMMAND.md").read_text()
    with pytest.raises(UserError, match="already holds tp_check.json"):
        tp_check.main(args)
    with pytest.raises(UserError, match="^--tokens: "):
        tp_check.main([*args[:6], "--tokens", "0,8"])
