"""The second stages' rules and records. The first pass's best is biased upwards (best of many noisy numbers):
each bucket's best few are screened (:func:`shortlist`), the screen's best (:func:`finalists`) measured again
against the baseline, both interleaved, and a setting ships only where :func:`decide` confirms it."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from overlap_bench import runfolder
from overlap_bench.keys import BucketKey
from overlap_bench.metrics import REFERENCE, is_reference
from overlap_bench.records import CONFIRM, Record
from overlap_bench.stats import MIN_EFFECT, SCREEN_TOP, SHIP_ALPHA, judge, screen_speedups

TOP = 3  # candidates confirmed per bucket besides the peers
Samples = Mapping[str, tuple[Sequence[float], Sequence[float]]]  # label -> (baseline, candidate) tokens/s per repeat


def leaders(scores: Mapping[str, float], peers: Iterable[str] = (), top: int = TOP) -> list[str]:
    """The best ``top`` labels by finite speedup other than the reference (plain references count), then every
    label whose strategy is a peer (e.g. ``pr``), each once."""
    usable = {lab: s for lab, s in scores.items()
              if not is_reference(lab) and isinstance(s, (int, float)) and math.isfinite(s)}
    ranked = sorted(usable, key=lambda lab: (-usable[lab], lab))
    peers = set(peers)
    return ranked[:top] + [lab for lab in ranked[top:] if lab.split(":", 1)[0] in peers]


def shortlist(first_pass: Mapping[str, float], peers: Iterable[str] = (), top: int = TOP) -> list[str]:
    """What the screen re-measures in one bucket: the first pass's best ``max(SCREEN_TOP, top)`` and the peers;
    none where the confirmation takes every candidate anyway."""
    peers = list(peers)
    if len(leaders(first_pass, peers, len(first_pass))) <= len(leaders(first_pass, peers, top)):
        return []
    return leaders(first_pass, peers, max(SCREEN_TOP, top))


def finalists(first_pass: Mapping[str, float], screen: Samples, peers: Iterable[str] = (),
              top: int = TOP) -> list[str]:
    """The confirmation's candidates: the :func:`leaders` by the screen where there was one, else by the first pass."""
    return leaders(screen_speedups(screen) if screen else first_pass, peers, top)


@dataclass(frozen=True)
class Outcome:
    """What the confirmation of one bucket decided, and the numbers behind it."""

    label: str  # the setting to ship: a confirmed candidate, or baseline
    speedup: float  # its ratio of medians against the interleaved baseline (1.0 for the baseline)
    ci: tuple[float, float]  # its bootstrap bounds at the ship rule's level (NaN for the baseline)
    expected: float  # the speedup to expect: the CI's lower bound (1.0 for the baseline)
    repeats: int  # interleaved repeats per side (the fewest of the candidates)
    confirmed: int
    min_effect: float
    leader: str | None  # the candidates' first-pass best: first pass vs confirmed shows the selection bias
    leader_first_pass_speedup: float | None
    leader_speedup: float
    leader_ci: tuple[float, float]
    candidates: int = 0  # settings the first pass timed
    screened: int = 0  # settings the screen re-measured (0: no screen)


def decide(samples: Samples, first_pass: Mapping[str, float] | None = None, *, min_effect: float = MIN_EFFECT,
           alpha: float = SHIP_ALPHA, n_boot: int = 10000, seed: int = 0) -> Outcome:
    """Decide one bucket from its ``samples`` (``first_pass``: label -> speedup, names the leader): of the candidates
    :func:`stats.judge` finds ``faster`` (one-sided, paired, Bonferroni over them), the highest lower bound ships."""
    first_pass = first_pass or {}
    k = max(1, sum(1 for a, b in samples.values() if len(a) and len(b)))
    results = {lab: judge(a, b, min_effect=min_effect, alpha=alpha, one_sided=True, family=k, paired=True,
                          n_boot=n_boot, seed=seed)
               for lab, (a, b) in samples.items() if len(a) and len(b)}
    reps = min((min(c.n_a, c.n_b) for c in results.values()), default=0)
    lead = min(results, key=lambda lab: (-(first_pass.get(lab) or -math.inf), lab), default=None)
    lc = results.get(lead)
    about = (reps, len(results), min_effect, lead, first_pass.get(lead), lc.speedup if lc else math.nan,
             (lc.ci_low, lc.ci_high) if lc else (math.nan, math.nan))
    passing = [lab for lab, c in results.items() if c.verdict == "faster"]
    if not passing:
        return Outcome(REFERENCE, 1.0, (math.nan, math.nan), 1.0, *about)
    win = max(passing, key=lambda lab: (results[lab].ci_low, lab))
    c = results[win]
    return Outcome(win, c.speedup, (c.ci_low, c.ci_high), c.expected, *about)


# ---- the stored records ---------------------------------------------------------------------------------

def candidate_key(r: Record) -> tuple[BucketKey, str]:
    """``(bucket, candidate label)`` of an A/B record, either side (resume skips stored keys)."""
    return r.bucket, r.ab.pair[1]


def load(run_dir: str | os.PathLike, name: str = CONFIRM) -> list[Record]:
    """The A/B log ``name``: per candidate the last ``repeats`` records of each side, or its failed check; one cut
    short (a run killed while measuring it) is left out, so a resumed sweep measures it again."""
    groups: dict[tuple, list[Record]] = {}
    for r in runfolder.RunFolder(run_dir).load(name).records:
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
    """``bucket -> {label: (baseline, candidate) tokens/s}`` in repeat order (ok records only)."""
    out: dict[BucketKey, dict[str, tuple[list[float], list[float]]]] = {}
    for r in records:
        if r.ok:
            bucket, label = candidate_key(r)
            out.setdefault(bucket, {}).setdefault(label, ([], []))[r.ab.side == "b"].append(float(r.tokens_per_s))
    return out
