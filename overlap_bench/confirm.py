"""The confirmation stage's rule and records: the first pass's best is the best of many noisy numbers (biased
upwards), so each bucket's leaders (:func:`leaders`) are measured again against the baseline, interleaved, as
``compare`` does (``sweep.measure_confirmation`` into ``confirm.jsonl``), and a setting ships only where
:func:`decide` confirms it. The rule takes numbers, so it is tested with injected samples.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable, Mapping

from overlap_bench import runfolder
from overlap_bench.keys import BucketKey
from overlap_bench.records import Record
from overlap_bench.stats import MIN_EFFECT, SHIP_ALPHA, judge

TOP = 3
"""Candidates confirmed per group and M besides the peers: the best this many by first-pass speedup."""
REPEATS = 20
"""Interleaved repeats per side (baseline, candidate) in the confirmation: with a region-to-region noise
of about 1% this finds a 3% gain in at least 95% of buckets (``tests/test_confirm.py``)."""


def leaders(first_pass: Mapping[str, float], peers: Iterable[str] = (), top: int = TOP) -> list[str]:
    """The candidates to confirm from one bucket's first pass (label -> first-pass speedup): the best
    ``top`` non-baseline labels by speedup, then every label whose strategy is a peer (e.g. ``pr``), each
    once. Labels without a finite speedup (failed, unavailable) are never candidates."""
    usable = {lab: s for lab, s in first_pass.items()
              if lab != "baseline" and isinstance(s, (int, float)) and math.isfinite(s)}
    ranked = sorted(usable, key=lambda lab: (-usable[lab], lab))
    out = ranked[:top]
    peer_set = set(peers)
    out += [lab for lab in ranked if lab.split(":", 1)[0] in peer_set and lab not in out]
    return out


@dataclass(frozen=True)
class Outcome:
    """What the confirmation of one bucket decided, and the numbers behind it."""

    label: str
    """The setting to ship: a confirmed candidate, or ``baseline``."""
    speedup: float
    """The shipped setting's confirmed speedup (ratio of medians against the interleaved baseline); 1.0 for
    the baseline."""
    ci_low: float
    ci_high: float
    """Its bootstrap CI (NaN for the baseline)."""
    repeats: int
    """Interleaved repeats per side behind the decision (the fewest of the candidates confirmed)."""
    confirmed: int
    """Candidates re-measured."""
    leader: str | None
    """The first-pass best of the candidates (None when none was confirmed)."""
    leader_speedup: float
    """The leader's confirmed speedup (compare with its first-pass speedup: the selection bias)."""
    leader_ci: tuple[float, float]


def decide(samples: Mapping[str, tuple[list[float], list[float]]], order: list[str] | None = None, *,
           min_effect: float = MIN_EFFECT, alpha: float = SHIP_ALPHA, n_boot: int = 10000, seed: int = 0) -> Outcome:
    """Decide one bucket from its confirmation samples: ``label -> (baseline tokens/s, candidate tokens/s)``,
    interleaved repeats. ``order`` lists the labels by first-pass rank (its first is the leader).

    A candidate passes when :func:`stats.judge`'s one-sided verdict, over the ``k`` candidates confirmed
    (Bonferroni: its lower bound is a ``1 - alpha / k`` bound) with the repeats resampled as pairs, is
    ``faster``; of those the one with the highest lower bound ships (the least doubtful gain), else the
    baseline."""
    order = [lab for lab in (order or sorted(samples)) if lab in samples]
    k = max(1, sum(1 for a, b in samples.values() if len(a) and len(b)))
    results = {lab: judge(a, b, min_effect=min_effect, alpha=alpha, one_sided=True, family=k, paired=True,
                          n_boot=n_boot, seed=seed)
               for lab, (a, b) in samples.items() if len(a) and len(b)}
    reps = min((min(c.n_a, c.n_b) for c in results.values()), default=0)
    passing = [lab for lab, c in results.items() if c.verdict == "faster"]
    lead = next((lab for lab in order if lab in results), None)
    lc = results.get(lead) if lead else None
    lead_fields = (lead, lc.speedup if lc else math.nan, (lc.ci_low, lc.ci_high) if lc else (math.nan, math.nan))
    if not passing:
        return Outcome("baseline", 1.0, math.nan, math.nan, reps, len(results), *lead_fields)
    win = max(passing, key=lambda lab: (results[lab].ci_low, lab))
    c = results[win]
    return Outcome(win, c.speedup, c.ci_low, c.ci_high, reps, len(results), *lead_fields)


# ---- the stored records ---------------------------------------------------------------------------------

def candidate_key(r: Record) -> tuple[BucketKey, str]:
    """``(bucket, candidate label)`` of a confirmation record, either side (resume skips stored keys)."""
    return r.bucket, r.ab.pair[1]


def load(run_dir: str | os.PathLike) -> list[Record]:
    """The records of ``confirm.jsonl`` (torn lines skipped): per candidate of a bucket the last ``repeats``
    records of each side, or, where its check failed, that record. A candidate with fewer (a run killed while
    measuring it) is left out, so a resumed sweep measures it again."""
    groups: dict[tuple, list[Record]] = {}
    for r in runfolder.RunFolder(run_dir).load(runfolder.CONFIRM).records:
        groups.setdefault(candidate_key(r), []).append(r)
    out: list[Record] = []
    for recs in groups.values():
        n = recs[-1].ab.repeats
        sides = [[r for r in recs if r.ok and r.ab.side == s] for s in "ab"]
        if all(len(side) >= n for side in sides):
            out += sides[0][-n:] + sides[1][-n:]
        else:
            out += [r for r in recs if not r.ok][-1:]
    return out


def by_bucket(records: Iterable[Record]) -> dict[BucketKey, dict[str, tuple[list[float], list[float]]]]:
    """``bucket -> {label: (baseline tokens/s, candidate tokens/s)}`` in repeat order (a candidate whose check
    failed has none)."""
    out: dict[BucketKey, dict[str, tuple[list[float], list[float]]]] = {}
    for r in records:
        if r.ok:
            bucket, label = candidate_key(r)
            pair = out.setdefault(bucket, {}).setdefault(label, ([], []))
            pair[r.ab.side == "b"].append(float(r.tokens_per_s))
    return out
