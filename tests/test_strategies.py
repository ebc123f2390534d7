"""Every strategy gives the baseline's result on gloo at world sizes 2 and 3 (run through the real launcher),
every split's row bounds cover the rows once and in order, and the path that runs at a threshold is observed.

A finding on ANY rank fails a test (``ranks.every_rank``): a strategy wrong only on rank 1 is caught.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from overlap_bench import strategies
from overlap_bench.strategies import pipeline
from overlap_bench.strategies.pr import PR_THRESHOLD, pr_bounds
from overlap_bench.strategies.pipeline import even_bounds
from ranks import every_rank

LABELS = ["baseline", "pr", "chunked:chunks=1", "chunked:chunks=3", "chunked:chunks=3,comm=async",
          "chunked:chunks=4,threshold=8", "chunked:chunks=3,align=4", "chunked:chunks=7,comm=async",
          # every split, with and without alignment (the shipped H100 policy runs split=geo, align=128)
          "chunked:chunks=4,split=edges", "chunked:chunks=3,split=edges,align=4,comm=async",
          "chunked:chunks=3,split=geo,ratio=1.4", "chunked:chunks=4,split=geo,ratio=0.35,align=2,comm=async",
          "chunked:chunks=5,split=geo,ratio=3.0,align=8"]
SHIPPED = "chunked:chunks=4,split=geo,ratio=1.4,align=128"
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


def _check_all(ctx, cases, paths):
    """This rank's findings: outputs unlike the baseline's, and ``(label, M, path)`` runs where another path ran."""
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
    for lab, m, want in paths:
        x, w, b = _inputs(ctx.rank, m, 4, 8, torch.float32, True)
        name, s = strategies.parse(lab)
        pipeline.PATHS.clear()
        strategies.run(name, x, w, b, None, s)
        if dict(pipeline.PATHS) != {want: 1}:
            errors.append(f"{lab} at M={m}: ran {dict(pipeline.PATHS)}, expected {want}")
    return errors


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
        ([SHIPPED, "chunked:chunks=4,split=edges,align=64"], 600, 8, 8, torch.float32, True),
    ]
    # Which path runs at the edges (outputs agree either way, so only the path shows a wrong comparison).
    paths = [("pr", PR_THRESHOLD - 1, "baseline"), ("pr", PR_THRESHOLD, "chunks=4"), ("pr", 30000, "chunks=3"),
             ("chunked:chunks=3,threshold=8", 7, "baseline"), ("chunked:chunks=3,threshold=8", 8, "chunks=3"),
             ("chunked:chunks=3,threshold=16384", PR_THRESHOLD, "chunks=3"), ("chunked:chunks=1", 9, "chunks=1"),
             ("chunked:chunks=4,split=edges", 12, "chunks=4"), ("baseline", 9, "baseline")]
    every_rank(_check_all, (cases, paths), world, tmp_path)


def _wrong_on_rank_1(ctx):
    # The harness itself: a finding on rank 1 only must fail the test.
    return ["planted"] if ctx.rank == 1 else []


def test_a_finding_on_rank_1_alone_fails_the_test(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="rank 1: planted"):
        every_rank(_wrong_on_rank_1, (), 2, tmp_path)


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


def test_edges_and_geo_bounds_worked_by_hand():
    # edges: weights 0.5, 1, 1, 0.5 (sum 3) -> cumulative 1/6, 1/2, 5/6 of 12 rows
    assert even_bounds(12, 4, split="edges") == [(0, 2), (2, 6), (6, 10), (10, 12)]
    assert even_bounds(10, 2, split="edges") == [(0, 5), (5, 10)]  # fewer than 3 chunks: no half chunks
    # 1000 rows: 166, 500, 833 rounded to multiples of 64: 192, 512, 832
    assert even_bounds(1000, 4, align=64, split="edges") == [(0, 192), (192, 512), (512, 832), (832, 1000)]
    # geo: weights 1, 2, 4 (sum 7) of 14 rows; shrinking 4, 2, 1
    assert even_bounds(14, 3, split="geo", ratio=2.0) == [(0, 2), (2, 6), (6, 14)]
    assert even_bounds(14, 3, split="geo", ratio=0.5) == [(0, 8), (8, 12), (12, 14)]
    assert even_bounds(10, 3, split="geo", ratio=1.0) == [(0, 3), (3, 6), (6, 10)]
    # weights 1, 3, 9 (sum 13) of 100 rows: 7, 30 -> multiples of 8: 8, 32
    assert even_bounds(100, 3, align=8, split="geo", ratio=3.0) == [(0, 8), (8, 32), (32, 100)]
    # the shipped schedule: weights 1, 1.4, 1.96, 2.744 of 600 rows: 84, 202, 368 -> multiples of 128
    assert even_bounds(600, 4, align=128, split="geo", ratio=1.4) == [(0, 128), (128, 256), (256, 384), (384, 600)]


@settings(max_examples=300, deadline=None)
@given(m=st.integers(1, 20000), chunks=st.integers(1, 64), align=st.integers(1, 512),
       split=st.sampled_from(pipeline.SPLITS), ratio=st.floats(0.05, 20.0))
def test_every_split_covers_every_row_once_in_order(m, chunks, align, split, ratio):
    chunks = min(chunks, m)
    b = even_bounds(m, chunks, align, split, ratio)
    assert b[0][0] == 0 and b[-1][1] == m
    assert all(e1 == s2 for (_, e1), (s2, _) in zip(b, b[1:]))  # no gap, no overlap, in order
    assert all(e > s for s, e in b)  # no empty range
    assert 1 <= len(b) <= chunks
    assert all(s % align == 0 for s, _ in b)  # inner edges on the tile grid
    if align == 1 and split == "even":
        assert len(b) == chunks


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
