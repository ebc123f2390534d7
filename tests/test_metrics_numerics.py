"""Every derived metric and the correctness gate against values worked out by hand (written here, never computed
by the code under test), at several world sizes and dtypes; the gate also on gloo ranks with planted errors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from overlap_bench import metrics, strategies
from overlap_bench.bench import check_against_baseline, inputs
from overlap_bench.metrics import TOLERANCE, rel_err, within_tolerance
from overlap_bench.spec import Case
from ranks import every_rank

approx = pytest.approx


# ------------------------------------------------------------------------------------------- metrics

def test_dtype_bytes():
    assert (metrics.dtype_bytes("bfloat16"), metrics.dtype_bytes("float16"), metrics.dtype_bytes("float32")) == (2, 2, 4)


@pytest.mark.parametrize("t_gemm, t_comm, ideal", [(2.0, 3.0, 3.0), (3.0, 2.0, 3.0), (1.5, 1.5, 1.5)])
def test_ideal_is_the_larger_of_the_two(t_gemm, t_comm, ideal):
    assert metrics.ideal_ms(t_gemm, t_comm) == ideal


def test_speedup():
    assert metrics.speedup(4.0, 2.5) == approx(1.6)
    assert metrics.speedup(2.0, 4.0) == approx(0.5)  # slower than the baseline: below 1
    assert math.isnan(metrics.speedup(2.0, 0.0))


@pytest.mark.parametrize("t_base, t, t_gemm, t_comm, want", [
    (5.0, 4.0, 3.0, 2.0, 0.5),    # room 5 - 3 = 2, hidden 1
    (5.0, 4.0, 1.0, 3.0, 0.5),    # the floor is the LARGER time (3), not the smaller (1 would give 0.25)
    (5.0, 3.0, 3.0, 2.0, 1.0),    # at the floor
    (5.0, 5.0, 3.0, 2.0, 0.0),    # nothing hidden
    (5.0, 6.0, 3.0, 2.0, -0.5),   # slower than the baseline: negative
    (10.0, 7.0, 6.0, 2.0, 0.75),  # room 4, hidden 3
])
def test_eta_by_hand(t_base, t, t_gemm, t_comm, want):
    assert metrics.eta(t_base, t, t_gemm, t_comm) == approx(want)


def test_eta_is_nan_without_room():
    assert math.isnan(metrics.eta(3.0, 2.0, 3.0, 1.0))   # baseline already at the floor
    assert math.isnan(metrics.eta(2.5, 2.0, 3.0, 1.0))   # baseline below the floor (noise)


def test_tflops_by_hand():
    assert metrics.tflops(1000, 1000, 1000, 2.0) == approx(1.0)  # 2e9 flop in 2 ms
    # 2 * 4096 * 2048 * 8192 = 137,438,953,472 flop in 1 ms
    assert metrics.tflops(4096, 2048, 8192, 1.0) == approx(137.438953472)
    assert metrics.tflops(4096, 2048, 8192, 4.0) == approx(34.359738368)
    assert math.isnan(metrics.tflops(1, 1, 1, 0.0))


# 1000 x 1000 elements in 1 ms: algbw 4 GB/s in float32, 2 GB/s in 16-bit types; busbw = algbw * 2(n-1)/n
@pytest.mark.parametrize("dtype, world, want", [
    ("float32", 2, 4.0), ("float32", 4, 6.0), ("float32", 8, 7.0), ("float32", 1, 0.0),
    ("bfloat16", 2, 2.0), ("bfloat16", 4, 3.0), ("bfloat16", 8, 3.5), ("float16", 3, 8 / 3),
])
def test_busbw_nccl_tests_definition(dtype, world, want):
    assert metrics.busbw_gbps(1000, 1000, dtype, world, 1.0) == approx(want)


@pytest.mark.parametrize("dtype, world, busbw", [("float32", 4, 6.0), ("bfloat16", 8, 3.5), ("float16", 2, 2.0)])
def test_allreduce_ms_by_hand(dtype, world, busbw):
    # the same 1000 x 1000 all-reduce as above: at that bus bandwidth it takes 1 ms
    assert metrics.allreduce_ms(1000, 1000, dtype, world, busbw) == approx(1.0)
    assert metrics.allreduce_ms(1000, 1000, dtype, world, 2 * busbw) == approx(0.5)


def test_busbw_scales_with_time_and_size():
    assert metrics.busbw_gbps(1000, 1000, "float32", 4, 2.0) == approx(3.0)
    assert metrics.busbw_gbps(2000, 500, "bfloat16", 4, 0.5) == approx(6.0)
    assert math.isnan(metrics.busbw_gbps(1000, 1000, "float32", 4, 0.0))


def test_tokens_per_s_units():
    assert metrics.tokens_per_s(4096, 2.0) == approx(2_048_000.0)  # per second, t in ms
    assert metrics.tokens_per_s(1000, 0.5) == approx(2_000_000.0)
    assert math.isnan(metrics.tokens_per_s(1000, 0.0))


def test_derive_wires_every_input_to_its_metric():
    # world 4, bfloat16, M=2000, K=500, N=1000; t_gemm 1.0, t_comm 2.0, t_base 3.0, t 2.5 (all ms)
    d = metrics.derive(m=2000, k=500, n=1000, dtype="bfloat16", world=4, t_ms=2.5, t_base_ms=3.0, t_gemm_ms=1.0,
                       t_comm_ms=2.0)
    assert d == {
        "ideal_ms": approx(2.0),
        "speedup": approx(1.2),
        "eta": approx(0.5),               # (3 - 2.5) / (3 - 2)
        "tokens_per_s": approx(800_000.0),  # 2000 / 2.5e-3
        "tflops": approx(0.8),            # 2 * 2000 * 500 * 1000 = 2e9 flop in 2.5 ms
        "busbw_gbps": approx(3.0),        # 4e6 B in 2 ms = 2 GB/s, x 2*3/4
    }
    # float32 at world 2: busbw from t_comm only, with the 4-byte element
    d = metrics.derive(m=1000, k=8, n=1000, dtype="float32", world=2, t_ms=1.0, t_base_ms=1.0, t_gemm_ms=0.5,
                       t_comm_ms=0.5)
    assert d["busbw_gbps"] == approx(8.0) and d["speedup"] == approx(1.0) and d["eta"] == approx(0.0)


# ------------------------------------------------------------------------------------------- numerics gate

def test_tolerance_values():
    assert TOLERANCE == {"float32": 1e-5, "float16": 5e-3, "bfloat16": 2e-2}


@pytest.mark.parametrize("dtype, inside, outside", [
    ("float32", 0.9e-5, 1.1e-5), ("float16", 4.9e-3, 5.1e-3), ("bfloat16", 1.9e-2, 2.1e-2)])
def test_gate_edges_per_dtype(dtype, inside, outside):
    assert within_tolerance(0.0, dtype) and within_tolerance(inside, dtype)
    assert not within_tolerance(outside, dtype)
    assert not within_tolerance(100 * inside, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_inf_errors_never_pass(dtype, bad):
    assert not within_tolerance(bad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rel_err_by_hand(dtype):
    base = torch.tensor([3.0, 4.0], dtype=dtype)   # norm 5
    assert rel_err(torch.tensor([3.0, 4.5], dtype=dtype), base) == approx(0.1)  # diff norm 0.5
    assert rel_err(torch.tensor([0.0, 0.0], dtype=dtype), base) == approx(1.0)
    assert rel_err(base.clone(), base) == 0.0
    assert rel_err(torch.tensor([0.0, 2.0], dtype=dtype), torch.zeros(2, dtype=dtype)) == approx(2.0)
    assert math.isnan(rel_err(torch.tensor([math.nan, 4.0], dtype=dtype), base))
    assert math.isinf(rel_err(torch.tensor([math.inf, 4.0], dtype=dtype), base))


@dataclass(frozen=True)
class _WrongSettings:
    """A planted wrong strategy (registered inside the test's ranks only)."""

    how: str = "scale"
    """``scale``: the baseline times ``factor``; ``nan``/``inf``: one element poisoned; ``unreduced``: the last
    row left as this rank's partial (not all-reduced)."""
    factor: float = 1.0
    rank: int = -1
    """Only this rank's output is wrong (-1: every rank)."""


def _wrong(x, weight, bias, group, s: _WrongSettings):
    import torch.distributed as dist

    y = strategies.run("baseline", x, weight, bias, group, strategies.make_settings("baseline"))
    if s.rank not in (-1, dist.get_rank()):
        return y
    if s.how == "scale":
        return (y.double() * s.factor).to(y.dtype)
    if s.how in ("nan", "inf"):
        y[0, 0] = math.nan if s.how == "nan" else math.inf
        return y
    if s.how == "unreduced":
        y[-1] = (x[-1:] @ weight.t())[0]
        return y
    raise ValueError(s.how)


GATE_CASES = [  # (dtype, settings, expected status); M=64 rows, K=32, N=48
    ("float32", _WrongSettings(factor=1 + 2e-6), "ok"),
    ("float32", _WrongSettings(factor=1 + 1e-4), "failed"),
    ("float32", _WrongSettings(factor=1 + 1e-3, rank=1), "failed"),   # wrong on rank 1 only
    ("float32", _WrongSettings(how="nan", rank=1), "failed"),         # NaN on rank 1 only
    ("float32", _WrongSettings(how="nan", rank=0), "failed"),
    ("float32", _WrongSettings(how="inf", rank=0), "failed"),
    ("float32", _WrongSettings(how="unreduced"), "failed"),          # one row of 64 not summed
    ("float16", _WrongSettings(factor=1 + 1e-3), "ok"),
    ("float16", _WrongSettings(factor=1.01), "failed"),
    ("float16", _WrongSettings(how="inf", rank=1), "failed"),
    ("bfloat16", _WrongSettings(factor=1.0), "ok"),
    ("bfloat16", _WrongSettings(factor=1.05), "failed"),
    ("bfloat16", _WrongSettings(how="unreduced", rank=1), "failed"),
    ("bfloat16", _WrongSettings(how="nan", rank=1), "failed"),
]


def _gate_on_ranks(ctx, cases):
    if "test_wrong" not in strategies.REGISTRY:
        strategies.register("test_wrong", _WrongSettings, "planted wrong output (tests only)")(_wrong)
    found = []
    for dtype, s, want in cases:
        case = Case("t", 32, 48, 64, dtype, True, "test_wrong", s, ())
        x, w, b = inputs(case, ctx, 0)
        y_base = strategies.run("baseline", x, w, b, None, strategies.make_settings("baseline"))
        got = check_against_baseline("test_wrong", s, x, w, b, y_base, dtype, ctx)
        if got.status != want:
            found.append(f"{dtype} {s}: {got.status} ({got.reason}, rel_err {got.rel_err}), expected {want}")
        elif want == "failed" and "tolerance" not in (got.reason or ""):
            found.append(f"{dtype} {s}: failed without naming the tolerance: {got.reason}")
    return found


@pytest.mark.parametrize("world", [2, 3])
def test_gate_fails_wrong_outputs_on_any_rank(world, tmp_path):
    every_rank(_gate_on_ranks, (GATE_CASES,), world, tmp_path)
