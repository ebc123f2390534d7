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
import statistics
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
    """Append one confirmation row to ``confirm.jsonl``, fsync'd, never glued onto a torn last line."""
    runfolder.RunFolder(run_dir).append_line(json.dumps(row, allow_nan=True), runfolder.CONFIRM)


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


# ---- the stage in a sweep --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One candidate of one bucket to re-measure against the baseline."""

    bucket: dict[str, Any]
    """:data:`BUCKET_FIELDS` values, plus ``env`` (the variables) for the job that measures it."""
    label: str
    first_pass_speedup: float
    candidates: int
    """Settings the first pass timed in this bucket."""


def plan(records: Iterable[Any], done: set[tuple], *, top: int = TOP, world: int | None = None,
         backend: str | None = None) -> list[Job]:
    """The candidates to confirm, from a run's records (:func:`analysis.score`), bucket by bucket, leaving
    out the keys in ``done`` (stored already: a resumed sweep does not measure them again)."""
    from overlap_bench import analysis, strategies

    at: dict[tuple, list[Any]] = {}
    for r in analysis.score(records):
        if (world is None or r.world == world) and (backend is None or r.backend == backend):
            at.setdefault(_bucket_of(r), []).append(r)
    jobs = []
    for bucket, g in sorted(at.items(), key=lambda kv: tuple(map(str, kv[0]))):
        first = {r.label: r.speedup for r in g if r.ok and math.isfinite(r.t_ms)}
        for lab in leaders(first, strategies.peers(), top):
            if bucket + (lab,) not in done:
                fields = dict(zip(BUCKET_FIELDS, bucket))
                jobs.append(Job({**fields, "env": dict(g[0].env)}, lab, float(first[lab]), len(first)))
    return jobs


def _bucket_of(r: Any) -> tuple:
    from overlap_bench.analysis import env_key

    return (r.shape, r.K, r.N, r.dtype, bool(r.bias), r.world, r.backend, r.device, env_key(r.env), r.M)


def measure(ctx: Any, jobs: list[Job], repeats: int, opts: Any) -> None:
    """Every rank's function of the confirmation job: each candidate against the baseline with
    :func:`overlap_bench.bench.run_ab` (``compare``'s interleaved repeats); rank 0 appends the rows."""
    from overlap_bench import strategies
    from overlap_bench.bench import run_ab, same_cases
    from overlap_bench.spec import Case

    jobs = same_cases(jobs, ctx)
    tmp = Path(opts.out_dir) / ".confirm-row.json"
    for job in jobs:
        b = job.bucket
        case = Case(b["shape"], b["K"], b["N"], b["M"], b["dtype"], b["bias"], "baseline",
                    strategies.make_settings("baseline"), tuple(sorted(b["env"].items())))
        run_ab(ctx, [case], ("baseline", job.label), repeats, opts, str(tmp))
        if ctx.rank == 0:
            (ab,) = json.loads(tmp.read_text(encoding="utf-8"))
            row = {f: b[f] for f in BUCKET_FIELDS}
            row.update(label=job.label, env=b["env"], first_pass_speedup=job.first_pass_speedup,
                       candidates=job.candidates, repeats=repeats, warmup=opts.warmup, reps=opts.reps,
                       samples_a=ab["samples_a"], samples_b=ab["samples_b"], t_ms_a=ab["t_ms_a"],
                       t_ms_b=ab["t_ms_b"], rel_err=ab.get("rel_err_b"), error=ab.get("error"))
            append(opts.out_dir, row)
    if ctx.rank == 0 and tmp.exists():
        tmp.unlink()


# ---- what a run ships ------------------------------------------------------------------------------------

def ship(best: "Any", rows: list[dict[str, Any]], *, unconfirmed: bool = False,
         min_effect: float = MIN_EFFECT) -> "Any":
    """The export's rule on :func:`analysis.best_settings` rows: where confirmation rows exist for a bucket,
    :func:`decide` picks what ships (a confirmed setting or the baseline) and the row gains a
    ``confirmation`` mapping (confirmed speedup, CI, repeats, candidates tried, the leader's first-pass
    and confirmed speedup). A bucket without them ships the baseline, unless ``unconfirmed`` (then the
    first pass's pick, labelled by the caller)."""
    from overlap_bench import metrics, strategies

    samples = by_bucket(rows)
    info: dict[tuple, dict[tuple, dict[str, Any]]] = {}
    for r in rows:
        info.setdefault(row_key(r)[:-1], {})[r["label"]] = r
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
        order = sorted(got, key=lambda lab: -float(got[lab].get("first_pass_speedup") or -math.inf))
        d = decide(samples.get(bucket, {}), order, min_effect=min_effect)
        lead = got.get(d.leader) if d.leader else None
        name, settings = strategies.parse(d.label)
        if d.label == "baseline":
            t_a = t_b = r["t_base_ms"]
        else:
            t_a, t_b = (float(statistics.median(got[d.label][k])) for k in ("t_ms_a", "t_ms_b"))
        best.loc[i, ["strategy", "label", "speedup"]] = [name, d.label, d.speedup]
        best.at[i, "settings"] = strategies.settings_dict(settings)
        best.at[i, "eta"] = metrics.eta(t_a, t_b, r["t_gemm_ms"], r["t_comm_ms"], r["t_base_iqr_ms"])
        best.at[i, "confirmation"] = {
            "speedup": d.speedup, "ci": [d.ci_low, d.ci_high], "repeats": d.repeats,
            "confirmed": d.confirmed, "candidates": int(r["candidates"]), "min_effect": min_effect,
            "leader": d.leader, "leader_first_pass_speedup": lead.get("first_pass_speedup") if lead else None,
            "leader_speedup": d.leader_speedup, "leader_ci": list(d.leader_ci)}
    return best

