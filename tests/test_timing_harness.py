"""The timing harness with scripted per-call durations that differ between ranks (gloo): the per-rank median (not
the mean), the IQR (inclusive quartiles), the max over ranks (not the min, not rank 0's), warm-up calls left out,
and the counts agreed between ranks. Expected values are worked out by hand below."""

from __future__ import annotations

import math

import pytest

from overlap_bench.timing import allreduce_max, time_region
from ranks import every_rank

# Durations in ms of each call on each rank: the first WARMUP are warm-up calls (huge: they must not count).
WARMUP, REPS = 2, 5
SCRIPT = {
    # sorted 1, 2, 3, 7, 100: median 3 (mean 22.6); inclusive quartiles 2 and 7: IQR 5
    0: [1000.0, 1000.0, 7.0, 1.0, 100.0, 3.0, 2.0],
    # sorted 5, 5, 5, 5, 6: median 5 (the slowest rank of a 2-rank job); IQR 0
    1: [1000.0, 1000.0, 5.0, 5.0, 6.0, 5.0, 5.0],
    # sorted 7, 7, 8, 9, 10: median 8 (the slowest of 3 ranks); quartiles 7 and 9: IQR 2
    2: [1000.0, 1000.0, 8.0, 9.0, 7.0, 10.0, 7.0],
}
# max over ranks of the medians, and of the IQRs (each rank's own: rank 0 has the widest spread, not the slowest median)
EXPECTED = {2: (5.0, 5.0), 3: (8.0, 5.0)}


class ScriptedClock:
    """A clock (seconds) that only moves when the timed function runs, by the next scripted duration."""

    def __init__(self, durations_ms):
        self.now, self.left, self.calls = 0.0, list(durations_ms), 0

    def __call__(self) -> float:
        return self.now

    def step(self) -> None:
        self.calls += 1
        self.now += self.left.pop(0) / 1e3


def _timed(ctx):
    """This rank's findings about time_region (scripted clock) and allreduce_max."""
    found = _maxes(ctx)
    clock = ScriptedClock(SCRIPT[ctx.rank])
    # Ranks ask for different counts; every rank must run the largest (else a collective inside fn deadlocks).
    warmup, reps = (WARMUP, REPS) if ctx.rank == 0 else (WARMUP - 1, REPS - 2)
    t = time_region(clock.step, warmup=warmup, reps=reps, group=None, device=ctx.device, clock=clock)
    want_med, want_iqr = EXPECTED[ctx.world]
    if t.median_ms != pytest.approx(want_med) or t.iqr_ms != pytest.approx(want_iqr):
        found.append(f"median {t.median_ms}, iqr {t.iqr_ms}; expected {want_med}, {want_iqr}")
    if t.reps != REPS or clock.calls != WARMUP + REPS:
        found.append(f"reps {t.reps}, calls {clock.calls}; expected {REPS}, {WARMUP + REPS}")
    return found


def _maxes(ctx):
    r = ctx.rank
    got = allreduce_max([float(r), -float(r), 10.0 - r, math.nan if r == 1 else 1.0, math.nan if r == 0 else 2.0],
                        None, ctx.device)
    want = [ctx.world - 1.0, 0.0, 10.0]
    if got[:3] != want or not (math.isnan(got[3]) and math.isnan(got[4])):
        return [f"allreduce_max gave {got}, expected {want} + [nan, nan]"]
    return []


@pytest.mark.parametrize("world", [2, 3])
def test_median_iqr_max_over_ranks_and_nan_reaching_every_rank(world, tmp_path):
    """One job per world size (starting ranks is the slow part): time_region and allreduce_max."""
    every_rank(_timed, (), world, tmp_path)
