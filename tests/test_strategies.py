"""Every strategy gives the baseline's result on gloo at world sizes 2 and 3 (run through the real launcher)."""

import pytest
import torch
import torch.distributed as dist

from overlap_bench import strategies
from overlap_bench.launch import JobConfig, launch
from overlap_bench.strategies.pr import PR_THRESHOLD, pr_bounds
from overlap_bench.strategies.pipeline import even_bounds

LABELS = ["baseline", "pr", "chunked:chunks=1", "chunked:chunks=3", "chunked:chunks=3,comm=async",
          "chunked:chunks=4,threshold=8", "chunked:chunks=3,align=4", "chunked:chunks=7,comm=async"]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _inputs(rank, m, k, n, dtype, bias):
    g = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).div(k ** 0.5).to(dtype)
    b = torch.randn(n, generator=torch.Generator().manual_seed(99)).to(dtype) if bias else None
    return x, w, b


def _reference(world, m, k, n, dtype, bias):
    """The row-parallel result computed by hand from every rank's inputs (bias exactly once)."""
    total = torch.zeros(m, n, dtype=torch.float64)
    for r in range(world):
        x, w, b = _inputs(r, m, k, n, dtype, bias)
        total += x.double() @ w.double().t()
    if bias:
        total += b.double()
    return total


def _check_all(ctx, cases, failures_path):
    errors = []
    for labels, m, k, n, dtype, bias in cases:
        x, w, b = _inputs(ctx.rank, m, k, n, dtype, bias)
        y_base = strategies.run("baseline", x, w, b, None, strategies.make_settings("baseline"))
        ref = _reference(ctx.world, m, k, n, dtype, bias).to(dtype)
        try:
            torch.testing.assert_close(y_base, ref, **TOL[dtype])
        except AssertionError as exc:
            errors.append(f"baseline vs hand reference m={m} {dtype} bias={bias}: {exc}")
        for lab in labels:
            name, settings = strategies.parse(lab)
            y = strategies.run(name, x, w, b, None, settings)
            if y.shape != (m, n):
                errors.append(f"{lab} m={m}: shape {tuple(y.shape)}")
                continue
            try:
                torch.testing.assert_close(y, y_base, **TOL[dtype])
            except AssertionError as exc:
                errors.append(f"{lab} m={m} {dtype} bias={bias}: {exc}")
    dist.barrier()
    if ctx.rank == 0:
        with open(failures_path, "w") as fh:
            fh.write("\n".join(errors))


@pytest.mark.parametrize("world", [2, 3])
def test_every_strategy_equals_baseline(world, tmp_path):
    cases = [
        (LABELS, 10, 16, 12, torch.float32, False),   # 10 rows not divisible by 3, 4 or 7
        (LABELS, 10, 16, 12, torch.float32, True),    # bias counted once
        (LABELS, 33, 24, 8, torch.bfloat16, True),
        (["chunked:chunks=5", "chunked:chunks=5,comm=async"], 5, 8, 8, torch.float32, True),  # chunks = M
        (["pr", "chunked:chunks=3,threshold=16384"], PR_THRESHOLD - 1, 4, 8, torch.float32, True),
        (["pr"], PR_THRESHOLD, 4, 8, torch.float32, True),
        (["pr"], PR_THRESHOLD + 1, 4, 8, torch.float32, False),  # remainder chunk
    ]
    out = tmp_path / "failures.txt"
    launch(_check_all, (cases, str(out)), JobConfig(nproc=world, backend="gloo", timeout_s=60))
    assert out.read_text() == ""


def test_pr_switches_at_threshold_and_makes_remainder_chunk():
    assert pr_bounds(PR_THRESHOLD - 1) == [(0, PR_THRESHOLD - 1)]
    size = PR_THRESHOLD // 3
    assert pr_bounds(PR_THRESHOLD) == [(0, size), (size, 2 * size), (2 * size, 3 * size), (3 * size, PR_THRESHOLD)]
    assert PR_THRESHOLD % 3 == 1  # so 16384 itself already has a one-row remainder chunk
    b = pr_bounds(30000)
    assert b == [(0, 10000), (10000, 20000), (20000, 30000)]
    b = pr_bounds(16385)
    assert len(b) == 4 and b[-1] == (3 * (16385 // 3), 16385) and b[-1][1] - b[-1][0] == 2


def test_even_bounds_cover_rows_once():
    for m, c, a in [(10, 3, 1), (10, 10, 1), (1000, 3, 128), (7, 1, 1), (16385, 8, 64)]:
        b = even_bounds(m, c, a)
        assert b[0][0] == 0 and b[-1][1] == m
        assert all(e1 == s2 for (_, e1), (s2, _) in zip(b, b[1:]))
        assert len(b) <= c
    assert even_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert [s for s, _ in even_bounds(1000, 3, 128)][1:] == [384, 640]
    with pytest.raises(ValueError, match="chunks"):
        even_bounds(4, 5)


@pytest.mark.parametrize("text,field", [
    ("chunked:chunks=0", "chunks"), ("chunked:threshold=-1", "threshold"), ("chunked:comm=nccl", "comm"),
    ("chunked:align=0", "align"), ("chunked:chunks=two", "chunks"), ("chunked:priority=maybe", "priority"),
    ("chunked:chunk=4", "chunk"), ("pr:chunks=3", "chunks"), ("nosuch", "nosuch"), ("chunked:chunks", "chunks"),
])
def test_invalid_settings_name_the_field(text, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        strategies.parse(text)


def test_label_round_trips():
    for text in ["baseline", "pr", "chunked:chunks=3", "chunked:chunks=2,comm=async,priority=true,align=128"]:
        name, s = strategies.parse(text)
        assert strategies.parse(strategies.label(name, s)) == (name, s)


def test_unavailable_is_said_not_hidden():
    name, s = strategies.parse("chunked:priority=true")
    assert "gloo" in strategies.unavailable_reason(name, s, "gloo")
    assert strategies.unavailable_reason(name, s, "nccl") is None
    assert "async work handles" in strategies.backend_note("pr", strategies.parse("pr")[1], "gloo")
