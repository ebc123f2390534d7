"""The confirmation stage (issue 13): a pick out of many measurements is confirmed by re-measurement before
it is shipped.

The first pass measures every setting once; its best setting is the best of many noisy numbers, so its
speedup is biased upwards (the winner's curse). After the first pass, for every group (shape, M, dtype,
bias, env, world) the leading candidates (the best :data:`TOP` by first-pass speedup, and every peer such
as ``pr``) are measured again against the baseline, interleaved, with repeats, exactly as ``compare`` does
(:func:`overlap_bench.bench.run_ab`), and judged with ``compare``'s one statistic
(:func:`overlap_bench.stats.judge`: ratio of medians, its bootstrap CI). A setting is shipped only
where the confirmed CI's lower bound exceeds ``1 + min_effect``.

The decision logic (:func:`leaders`, :func:`decide`) is pure: it takes numbers, so it is tested with
injected samples (the null test) and times nothing. The measurements are :class:`Record` lines (``kind``
confirm) in the run folder's ``confirm.jsonl`` (:data:`overlap_bench.runfolder.CONFIRM`), one per timed region
and side, written by ``run_ab`` as ``compare``'s are.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from overlap_bench import runfolder
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
           min_effect: float = MIN_EFFECT, alpha: float = SHIP_ALPHA, n_boot: int = 10000, seed: int = 0) -> Decision:
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
        return Decision("baseline", 1.0, math.nan, math.nan, reps, len(results), *lead_fields)
    win = max(passing, key=lambda lab: (results[lab].ci_low, lab))
    c = results[win]
    return Decision(win, c.speedup, c.ci_low, c.ci_high, reps, len(results), *lead_fields)


# ---- the stored records ---------------------------------------------------------------------------------

BUCKET_FIELDS = ("shape", "K", "N", "dtype", "bias", "world", "backend", "device", "env_key", "M")
"""What identifies a bucket (the analysis group and M), in the order of :func:`bucket_of`."""


def bucket_of(r: Any) -> tuple:
    """The bucket of a record (first pass or confirmation): :data:`BUCKET_FIELDS` values."""
    from overlap_bench.analysis import env_key

    return (r.shape, r.K, r.N, r.dtype, bool(r.bias), r.world, r.backend, r.device, env_key(r.env), r.M)


def candidate_key(r: Record) -> tuple:
    """``(bucket..., candidate label)`` of a confirmation record, either side (resume skips stored keys)."""
    return bucket_of(r) + (r.extra["pair"][1],)


def load(run_dir: str | os.PathLike) -> list[Record]:
    """The confirmation records of ``confirm.jsonl`` (torn lines skipped): per candidate of a bucket the
    last ``repeats`` records of each side, or, where its check failed, that record. A candidate with fewer
    (a run killed while measuring it) is left out, so a resumed sweep measures it again."""
    groups: dict[tuple, list[Record]] = {}
    for r in runfolder.RunFolder(run_dir).load(runfolder.CONFIRM).records:
        groups.setdefault(candidate_key(r), []).append(r)
    out: list[Record] = []
    for recs in groups.values():
        n = int(recs[-1].extra["repeats"])
        sides = [[r for r in recs if r.ok and r.extra["side"] == s] for s in "ab"]
        if all(len(side) >= n for side in sides):
            out += sides[0][-n:] + sides[1][-n:]
        else:
            out += [r for r in recs if not r.ok][-1:]
    return out


def by_bucket(records: Iterable[Record]) -> dict[tuple, dict[str, tuple[list[float], list[float]]]]:
    """``bucket -> {label: (baseline tokens/s, candidate tokens/s)}`` of the measured records, in repeat
    order (a candidate whose check failed has none)."""
    out: dict[tuple, dict[str, tuple[list[float], list[float]]]] = {}
    for r in records:
        if r.ok:
            key = candidate_key(r)
            pair = out.setdefault(key[:-1], {}).setdefault(key[-1], ([], []))
            pair[r.extra["side"] == "b"].append(float(r.tokens_per_s))
    return out


# ---- the stage in a sweep --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One candidate of one bucket to re-measure against the baseline."""

    case: Any
    """The bucket's baseline ``spec.Case`` (shape, M, dtype, bias, env: the job's variables)."""
    candidate: tuple[str, Any]
    """The candidate's strategy and typed settings, from its first-pass record."""
    first_pass_speedup: float
    candidates: int
    """Settings the first pass timed in this bucket."""


def plan(records: Iterable[Any], done: set[tuple], *, top: int = TOP, world: int | None = None,
         backend: str | None = None) -> list[Job]:
    """The candidates to confirm, from a run's records (:func:`analysis.score`), bucket by bucket, leaving
    out the keys in ``done`` (stored already: a resumed sweep does not measure them again)."""
    from overlap_bench import analysis, strategies
    from overlap_bench.spec import Case

    at: dict[tuple, list[Any]] = {}
    for r in analysis.score(records):
        if (world is None or r.world == world) and (backend is None or r.backend == backend):
            at.setdefault(bucket_of(r), []).append(r)
    jobs = []
    base = strategies.make_settings("baseline")
    for bucket, g in sorted(at.items(), key=lambda kv: tuple(map(str, kv[0]))):
        first = {r.label: r for r in g if r.ok and math.isfinite(r.t_ms)}
        for lab in leaders({lab: r.speedup for lab, r in first.items()}, strategies.peers(), top):
            if bucket + (lab,) not in done:
                r = first[lab]
                case = Case(r.shape, r.K, r.N, r.M, r.dtype, bool(r.bias), "baseline", base,
                            tuple(sorted(r.env.items())))
                jobs.append(Job(case, (r.strategy, strategies.make_settings(r.strategy, r.settings)),
                                float(r.speedup), len(first)))
    return jobs


def measure(ctx: Any, jobs: list[Job], repeats: int, opts: Any) -> None:
    """Every rank's function of the confirmation job: each candidate against the baseline with
    :func:`overlap_bench.bench.run_ab` (``compare``'s interleaved repeats); rank 0 appends the records
    (``kind`` confirm) to ``confirm.jsonl``."""
    from overlap_bench.bench import run_ab, same_cases

    for job in same_cases(jobs, ctx):
        run_ab(ctx, [job.case], (("baseline", job.case.settings), job.candidate), repeats, opts,
               runfolder.CONFIRM, "confirm",
               {"first_pass_speedup": job.first_pass_speedup, "candidates": job.candidates})


# ---- what a run ships ------------------------------------------------------------------------------------

def ship(best: "Any", records: list[Record], *, unconfirmed: bool = False,
         min_effect: float = MIN_EFFECT) -> "Any":
    """The export's rule on :func:`analysis.best_settings` rows: where confirmation records (:func:`load`)
    exist for a bucket, :func:`decide` picks what ships (a confirmed setting, its strategy and settings
    taken from its records, or the baseline) and the row gains a ``confirmation`` mapping (confirmed
    speedup, CI, repeats, candidates tried, the leader's first-pass and confirmed speedup). A bucket
    without them ships the baseline, unless ``unconfirmed`` (then the first pass's pick, labelled by the
    caller)."""
    from overlap_bench import metrics

    samples = by_bucket(records)
    info: dict[tuple, dict[str, list[Record]]] = {}
    for r in records:
        key = candidate_key(r)
        info.setdefault(key[:-1], {}).setdefault(key[-1], []).append(r)
    best = best.copy()
    best["confirmation"] = None
    for i, r in best.iterrows():
        bucket = tuple(r[f] if f != "bias" else bool(r[f]) for f in BUCKET_FIELDS)
        got = info.get(bucket)
        if got is None:
            if not unconfirmed:
                best.loc[i, ["strategy", "label", "speedup"]] = ["baseline", "baseline", 1.0]
                best.at[i, "settings"] = {}
                best.at[i, "eta"] = metrics.eta(r["t_base_ms"], r["t_base_ms"], r["t_gemm_ms"], r["t_comm_ms"],
                                                r["t_base_iqr_ms"])
            continue
        first_pass = {lab: recs[0].extra.get("first_pass_speedup") for lab, recs in got.items()}
        order = sorted(got, key=lambda lab: -float(first_pass[lab] or -math.inf))
        d = decide(samples.get(bucket, {}), order, min_effect=min_effect)
        if d.label == "baseline":
            name, settings, t_a, t_b = "baseline", {}, r["t_base_ms"], r["t_base_ms"]
        else:
            side = {s: [x for x in got[d.label] if x.extra["side"] == s] for s in "ab"}
            name, settings = side["b"][0].strategy, dict(side["b"][0].settings)
            t_a, t_b = (float(statistics.median(x.t_ms for x in side[s])) for s in "ab")
        best.loc[i, ["strategy", "label", "speedup"]] = [name, d.label, d.speedup]
        best.at[i, "settings"] = settings
        best.at[i, "eta"] = metrics.eta(t_a, t_b, r["t_gemm_ms"], r["t_comm_ms"], r["t_base_iqr_ms"])
        best.at[i, "confirmation"] = {
            "speedup": d.speedup, "ci": [d.ci_low, d.ci_high], "repeats": d.repeats,
            "confirmed": d.confirmed, "candidates": int(r["candidates"]), "min_effect": min_effect,
            "leader": d.leader, "leader_first_pass_speedup": first_pass[d.leader] if d.leader else None,
            "leader_speedup": d.leader_speedup, "leader_ci": list(d.leader_ci)}
    return best
