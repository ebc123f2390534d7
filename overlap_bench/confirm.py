"""The confirmation stage (issue 13): a pick out of many measurements is confirmed by re-measurement before
it is shipped.

The first pass measures every setting once; its best setting is the best of many noisy numbers, so its
speedup is biased upwards (the winner's curse). After the first pass, for every group (shape, M, dtype,
bias, env, world) the leading candidates (the best :data:`TOP` by first-pass speedup, and every peer such
as ``pr``) are measured again against the baseline, interleaved, with repeats, exactly as ``compare`` does
(:func:`overlap_bench.bench.run_ab`), and judged with ``compare``'s one statistic
(:func:`overlap_bench.stats.compare_samples`: ratio of medians, its bootstrap CI). A setting is shipped only
where the confirmed CI's lower bound exceeds ``1 + min_effect``.

The decision logic (:func:`leaders`, :func:`decide`) is pure: it takes numbers, so it is tested with
injected samples (the null test) and times nothing. The measured rows live in the run folder's
``confirm.jsonl`` (:data:`overlap_bench.runfolder.CONFIRM`), one line per (group, M, candidate).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from overlap_bench import runfolder
from overlap_bench.stats import compare_samples

TOP = 3
"""Candidates confirmed per group and M besides the peers: the best this many by first-pass speedup."""
REPEATS = 20
"""Interleaved repeats per side (baseline, candidate) in the confirmation: with a region-to-region noise
of about 1% this finds a 3% gain in at least 95% of buckets (``tests/test_confirm.py``)."""
MIN_EFFECT = 0.01
"""A setting ships only where the confirmed speedup's CI lower bound exceeds ``1 + MIN_EFFECT``."""


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
class Decision:
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
           min_effect: float = MIN_EFFECT, alpha: float = 0.05, n_boot: int = 10000, seed: int = 0) -> Decision:
    """Decide one bucket from its confirmation samples: ``label -> (baseline tokens/s, candidate tokens/s)``,
    interleaved repeats. ``order`` lists the labels by first-pass rank (its first is the leader).

    A candidate passes when :func:`compare_samples`'s CI lower bound exceeds ``1 + min_effect``; of those
    the one with the highest lower bound ships (the least doubtful gain), else the baseline. With ``k``
    candidates each CI is a ``1 - alpha / k`` interval (Bonferroni): ``k`` chances to pass by luck would
    otherwise ship a tie ``k`` times as often as ``alpha`` says."""
    order = [lab for lab in (order or sorted(samples)) if lab in samples]
    k = max(1, sum(1 for a, b in samples.values() if len(a) and len(b)))
    results = {lab: compare_samples(a, b, min_effect=min_effect, alpha=alpha / k, n_boot=n_boot, seed=seed)
               for lab, (a, b) in samples.items() if len(a) and len(b)}
    reps = min((min(c.n_a, c.n_b) for c in results.values()), default=0)
    passing = [lab for lab, c in results.items() if math.isfinite(c.ci_low) and c.ci_low > 1 + min_effect]
    lead = next((lab for lab in order if lab in results), None)
    lc = results.get(lead) if lead else None
    lead_fields = (lead, lc.speedup if lc else math.nan, (lc.ci_low, lc.ci_high) if lc else (math.nan, math.nan))
    if not passing:
        return Decision("baseline", 1.0, math.nan, math.nan, reps, len(results), *lead_fields)
    win = max(passing, key=lambda lab: (results[lab].ci_low, lab))
    c = results[win]
    return Decision(win, c.speedup, c.ci_low, c.ci_high, reps, len(results), *lead_fields)


# ---- the stored rows -----------------------------------------------------------------------------------

BUCKET_FIELDS = ("shape", "K", "N", "dtype", "bias", "world", "backend", "device", "env_key", "M")
"""What identifies a bucket in ``confirm.jsonl`` (the analysis group and M)."""


def row_key(row: Mapping[str, Any]) -> tuple:
    """``(bucket, label)`` of a stored confirmation row (resume skips the keys already stored)."""
    return tuple(row.get(f) for f in BUCKET_FIELDS) + (row.get("label"),)


def load(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``confirm.jsonl`` (the last row per key; torn lines skipped), or [] when there is none."""
    path = Path(run_dir) / runfolder.CONFIRM
    if not path.exists():
        return []
    rows: dict[tuple, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line torn by a killed run: that candidate is confirmed again on resume
            continue
        if isinstance(row, dict) and isinstance(row.get("samples_a"), list):
            rows[row_key(row)] = row
    return list(rows.values())


def append(run_dir: str | os.PathLike, row: Mapping[str, Any]) -> None:
    """Append one confirmation row to ``confirm.jsonl``, flushed to disk (a kill loses at most this line)."""
    path = Path(run_dir) / runfolder.CONFIRM
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, allow_nan=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def by_bucket(rows: Iterable[Mapping[str, Any]]) -> dict[tuple, dict[str, tuple[list[float], list[float]]]]:
    """``bucket -> {label: (baseline samples, candidate samples)}`` of the rows that were measured (a row
    whose candidate failed its numerics check holds an ``error`` and no samples)."""
    out: dict[tuple, dict[str, tuple[list[float], list[float]]]] = {}
    for r in rows:
        if r.get("error") or not r.get("samples_a") or not r.get("samples_b"):
            continue
        out.setdefault(row_key(r)[:-1], {})[r["label"]] = ([float(x) for x in r["samples_a"]],
                                                           [float(x) for x in r["samples_b"]])
    return out
