"""A sweep's bucket simulated with known truth, through the real selection and decision functions.

A bucket is measured as a sweep measures it: a first pass (the baseline reference bracketed every
``bench.BRACKET_EVERY`` candidates, each candidate once, speedups against the fastest reference), then
optionally the screen (``confirm.shortlist``: the best :data:`stats.SCREEN_TOP` and the peers,
:data:`stats.SCREEN_REPEATS` interleaved pairs each), then the confirmation (``confirm.finalists``: ``confirm.TOP``
leaders and the peers, ``repeats`` interleaved pairs each, A B then B A as ``bench.run_ab`` orders them) judged by
``confirm.decide``: the functions the sweep selects and decides with. Every region's time
carries lognormal noise (``sigma``: the region-to-region CV) and a slow linear drift of the machine.
"""

from __future__ import annotations

import numpy as np

from overlap_bench import confirm, metrics, stats
from overlap_bench.bench import BRACKET_EVERY
from overlap_bench.spec import CONFIRM_REPEATS

SETTINGS = [f"chunked:chunks={c},comm={m}" for c in range(2, 22) for m in ("stream", "async")] + ["pr"]
"""41 settings, ``pr`` the peer (always confirmed)."""
PEERS = ["pr"]
WINNER = "chunked:chunks=4,comm=stream"
DRIFT = 0.03
"""The clock slows by this fraction over a bucket's measurements."""


class _Machine:
    """Timed regions in sequence: true time x drift x lognormal noise, and tokens/s (M = 1) of a pair."""

    def __init__(self, rng: np.random.Generator, sigma: float, steps: int):
        self.rng, self.sigma, self.step, self.steps = rng, sigma, 0, steps

    def region(self, true_t: float) -> float:
        self.step += 1
        return true_t * (1 + DRIFT * self.step / self.steps) * float(np.exp(self.rng.normal(0, self.sigma)))

    def pairs(self, gain: float, repeats: int) -> tuple[list[float], list[float]]:
        a, b = [], []
        for rep in range(repeats):
            for side in ((0, 1), (1, 0))[rep % 2]:
                (b if side else a).append(1.0 / self.region(1.0 / gain if side else 1.0))
        return a, b


def bucket(rng: np.random.Generator, sigma: float, gains: dict[str, float] | None = None, *, repeats: int =
           CONFIRM_REPEATS, screen: bool = True, n_boot: int = 2000) -> tuple[dict[str, float], confirm.Outcome]:
    """One bucket: ``(first-pass speedups, decision)``; ``gains`` maps a label to its true speedup (else 1)."""
    gains = gains or {}
    steps = 2 * len(SETTINGS) + 2 * (stats.SCREEN_TOP + 1) * stats.SCREEN_REPEATS + 2 * (confirm.TOP + 1) * repeats
    m = _Machine(rng, sigma, steps)
    refs, times = [m.region(1.0)], {}
    for i, lab in enumerate(SETTINGS):
        times[lab] = m.region(1.0 / gains.get(lab, 1.0))
        if (i + 1) % BRACKET_EVERY == 0 or i == len(SETTINGS) - 1:
            refs.append(m.region(1.0))
    t_ref, _ = metrics.reference((t, 0.0) for t in refs)
    first = {lab: metrics.speedup(t_ref, t) for lab, t in times.items()}
    screened = {lab: m.pairs(gains.get(lab, 1.0), stats.SCREEN_REPEATS)
                for lab in (confirm.shortlist(first, PEERS) if screen else [])}
    lead = confirm.finalists(first, screened, PEERS)  # the sweep's own selection (sweep.plan_stage)
    samples = {lab: m.pairs(gains.get(lab, 1.0), repeats) for lab in lead}
    return first, confirm.decide(samples, first, n_boot=n_boot)


def rates(seed: int, trials: int, sigma: float, gain: float, **kw) -> tuple[float, float]:
    """``(share of buckets shipping a true win, share shipping a setting that is no win)`` with ``WINNER``
    truly ``gain`` faster and every other setting tying the baseline (``gain`` 1: the null)."""
    rng = np.random.default_rng(seed)
    gains = {WINNER: gain}
    shipped = [bucket(rng, sigma, gains, **kw)[1].label for _ in range(trials)]
    true = sum(gains.get(lab, 1.0) > 1 for lab in shipped)
    false = sum(lab != "baseline" and gains.get(lab, 1.0) <= 1 for lab in shipped)
    return true / trials, false / trials


if __name__ == "__main__":  # python tests/sim_stats.py TRIALS GAIN SIGMA[,SIGMA..] REPEATS[,REPEATS..] [SEED]
    import sys

    trials, gain, sigmas, reps = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
    for s in map(float, sigmas.split(",")):
        for r in map(int, reps.split(",")):
            true, false = rates(int(sys.argv[5]) if len(sys.argv) > 5 else 1, trials, s, gain, repeats=r)
            print(f"noise {s:.0%}, {r} repeats, {trials} buckets, winner {gain}: ships it {true:.2%}, "
                  f"ships a non-win {false:.2%} ({round(false * trials)})", flush=True)
