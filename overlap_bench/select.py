"""What a run ships, decided once: records -> latest per case -> scored (:data:`RULE`) -> best per bucket ->
confirmation -> env variant and policy slot: one :class:`Decision` per bucket, which every output renders."""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from dataclasses import dataclass, field
from itertools import takewhile
from typing import Any, Iterable

from overlap_bench import confirm, metrics, strategies
from overlap_bench.keys import BucketKey, Env
from overlap_bench.metrics import REFERENCE, finite, is_plain, is_reference
from overlap_bench.records import Record
from overlap_bench.stats import MIN_EFFECT, geomean

log = logging.getLogger("overlap_bench.select")

# The first pass's rule, and how numbers against the best plain all-reduce are taken: each stated once where shown.
RULE = ("t_base is the reference: the fastest baseline measurement at that M (the one taken before the "
        "strategies, or the baseline strategy's own record); speedup = t_base / t; eta = (t_base − t) / "
        f"(t_base − max(t_gemm, t_comm)), n/a where that hideable time is below {metrics.ETA_MIN_ROOM:.0%} of t_base "
        f"or {metrics.ETA_MIN_SPREADS:g}× the spread. "
        "The best setting is the fastest ok one if it beats t_base beyond the measured spread (t + iqr/2 < "
        "t_base − iqr_base/2) and the references are consistent, else the baseline.")
PLAIN_RULE = ("vs best plain = t_plain / t, where t_plain is the fastest plain all-reduce at that M (t_base, or a "
              "faster `baseline:comm=...` record: no overlap, another all-reduce); eta vs plain = (t_plain − t) / "
              "(t_plain − max(t_gemm, t_comm)), n/a by the same rule: the hidden fraction of what the fastest plain "
              "all-reduce still costs.")


def latest(records: Iterable[Record]) -> list[Record]:
    """One record per case (bucket and label), in file order, its last line."""
    records = list(records)
    last = {(r.bucket, r.label): i for i, r in enumerate(records)}
    return [records[i] for i in sorted(last.values())]


def _reference(group: list[Record]) -> tuple[float, float, tuple[str, ...]]:
    """``(t_base, iqr, flags)`` of one bucket: its fastest baseline measurement and what makes it doubtful."""
    base = [(r.t_base_ms, r.t_base_iqr_ms) for r in group if finite(r.t_base_ms)]
    base += [v for r in group for v in r.base_refs[1:]]  # the bracketing references
    base += [(r.t_ms, r.t_iqr_ms) for r in group if is_reference(r.label) and r.ok and finite(r.t_ms)]
    t_ref, ref_iqr = metrics.reference(base)
    flags = []
    times = sorted({t for t, _ in base if finite(t) and t > 0})
    widest = max((i for _, i in base if finite(i)), default=0.0)
    if len(times) > 1 and times[-1] - times[0] > widest:
        flags.append(f"reference drift: baseline measured {times[0]:.4g}..{times[-1]:.4g} ms")
    flags += sorted({metrics.inconsistent(t_ref, r.t_gemm_ms, r.t_comm_ms, ref_iqr) for r in group} - {None})
    over = sorted({r.label for r in group if r.ok and finite(r.t_ms) and r.t_ms < t_ref and not is_plain(r.strategy)
                   and metrics.eta(t_ref, r.t_ms, r.t_gemm_ms, r.t_comm_ms) > 1})
    if over:  # t below the ideal bound (the ring's t_comm: a faster plain all-reduce is not bound by it)
        flags.append(f"eta above 1 (t below the ideal bound, a measurement fault): {', '.join(over)}")
    return t_ref, ref_iqr, tuple(flags)


def _scored(records: Iterable[Record]) -> tuple[list[Record], dict[BucketKey, tuple[float, float, tuple]]]:
    """:func:`score`'s records, and each bucket's ``(t_base, iqr, flags)``."""
    recs = latest(records)
    refs = {key: _reference([r for r in recs if r.bucket == key]) for key in {r.bucket for r in recs}}
    out = []
    for r in recs:
        t_ref, ref_iqr, _ = refs[r.bucket]
        spread = max(ref_iqr, r.t_iqr_ms if finite(r.t_iqr_ms) else 0.0)
        timed = r.ok and finite(r.t_ms)
        out.append(dataclasses.replace(
            r, t_base_ms=t_ref, t_base_iqr_ms=ref_iqr, ideal_ms=metrics.ideal_ms(r.t_gemm_ms, r.t_comm_ms),
            speedup=metrics.speedup(t_ref, r.t_ms) if timed else math.nan,
            eta=metrics.eta(t_ref, r.t_ms, r.t_gemm_ms, r.t_comm_ms, spread) if timed else math.nan))
    return out, refs


def score(records: Iterable[Record]) -> list[Record]:
    """The :func:`latest` records with ``t_base_ms`` their bucket's reference and ``speedup``, ``eta``, ``ideal_ms``
    derived from it."""
    return _scored(records)[0]


@dataclass(frozen=True)
class Best:
    """The first pass's winner in one bucket, and every number tables and summary show of it."""

    key: BucketKey
    strategy: str
    settings: dict[str, Any]
    label: str
    t_ms: float  # the winner's time (the reference itself when the baseline wins)
    t_iqr_ms: float
    t_base_ms: float
    t_base_iqr_ms: float
    t_gemm_ms: float
    t_comm_ms: float
    speedup: float
    eta: float
    rel_err: float
    candidates: int  # settings with a time here (more candidates, more selection bias)
    peers: dict[str, float] = field(default_factory=dict)  # speedup of each peer strategy (e.g. pr)
    flags: tuple[str, ...] = ()  # what makes the bucket's numbers doubtful
    scored: tuple[Record, ...] = field(default=(), repr=False)  # the bucket's latest records, scored
    t_plain_ms: float = math.nan  # the fastest plain all-reduce here: t_base, or a faster reference's time
    plain: str = REFERENCE  # its label: baseline, or the faster baseline:comm=...
    vs_plain: dict[str, tuple[float, float]] = field(default_factory=dict)  # label -> (speedup, eta) vs t_plain_ms

    @property
    def M(self) -> int:
        return self.key.M

    @property
    def speedup_plain(self) -> float:
        """The winner's speedup against the best plain all-reduce."""
        return self.vs_plain.get(self.label, (math.nan, math.nan))[0]

    @property
    def eta_plain(self) -> float:
        """The winner's eta against the best plain all-reduce."""
        return self.vs_plain.get(self.label, (math.nan, math.nan))[1]

    @property
    def references(self) -> list[str]:
        """Labels of the plain references (not the ring baseline) measured here (ok records)."""
        return sorted({r.label for r in self.scored if r.ok and is_plain(r.strategy) and not is_reference(r.label)})


def best(records: Iterable[Record]) -> list[Best]:
    """The winner per bucket, in key order: the fastest ok record where it beats the reference beyond the spread
    and the references are consistent (:data:`RULE`), else ``baseline``; with its numbers against the best plain."""
    scored, refs = _scored(records)
    peer_names = strategies.peers()
    out = []
    for key, (t_ref, ref_iqr, flags) in sorted(refs.items()):
        g = [r for r in scored if r.bucket == key]
        ok = [r for r in g if r.ok and finite(r.t_ms)]
        win = min(ok, key=lambda r: r.t_ms) if ok else None
        if win is not None and not is_reference(win.label):
            beats = win.t_ms < t_ref and metrics.beyond_spread(win.t_ms, win.t_iqr_ms, t_ref, ref_iqr)
            if not beats or any(f.startswith("references inconsistent") for f in flags):
                win = None
        if win is None or is_reference(win.label):
            ref = ([r for r in g if finite(r.t_gemm_ms)] or g)[-1]
            base = min((r for r in ok if is_reference(r.label)), key=lambda r: r.t_ms, default=None)
            win = dataclasses.replace(ref, strategy=REFERENCE, settings={}, label=REFERENCE, t_ms=t_ref,
                                      t_iqr_ms=ref_iqr, rel_err=base.rel_err if base else math.nan,
                                      speedup=1.0 if finite(t_ref) else math.nan,
                                      eta=metrics.eta(t_ref, t_ref, ref.t_gemm_ms, ref.t_comm_ms, ref_iqr))
        peers = {p: r.speedup for p in peer_names for r in ok if r.strategy == p}
        plain = [r for r in ok if is_plain(r.strategy) and not is_reference(r.label)]
        t_plain = metrics.best_plain(t_ref, [r.t_ms for r in plain])
        by = next((r for r in plain if r.t_ms == t_plain), None)  # a reference faster than t_base, else None
        plain_iqr = by.t_iqr_ms if by else ref_iqr
        vs_plain = {r.label: _vs_plain(t_plain, plain_iqr, r) for r in [*ok, win]}
        out.append(Best(key, win.strategy, dict(win.settings), win.label, win.t_ms, win.t_iqr_ms, t_ref, ref_iqr,
                        win.t_gemm_ms, win.t_comm_ms, win.speedup, win.eta, win.rel_err, len(ok), peers,
                        tuple(flags), tuple(g), t_plain, by.label if by else REFERENCE, vs_plain))
    return out


def _vs_plain(t_plain: float, plain_iqr: float, r: Record) -> tuple[float, float]:
    """``(speedup, eta)`` of ``r`` against the best plain all-reduce ``t_plain`` (spread: the larger IQR)."""
    spread = max(plain_iqr if finite(plain_iqr) else 0.0, r.t_iqr_ms if finite(r.t_iqr_ms) else 0.0)
    return (metrics.speedup_vs_plain(t_plain, r.t_ms),
            metrics.eta_vs_plain(t_plain, r.t_ms, r.t_gemm_ms, r.t_comm_ms, spread))


def threshold(winners: Iterable[tuple[int, str]]) -> int | None:
    """Smallest M from which every larger M's ``(M, strategy)`` overlaps (is not plain); None if the largest is."""
    winners = sorted(winners, reverse=True)
    if len({m for m, _ in winners}) != len(winners):
        raise ValueError("threshold() takes one winner per M")
    run = [int(m) for m, _ in takewhile(lambda w: not is_plain(w[1]), winners)]
    return run[-1] if run else None


# ---- the decision -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    """What one bucket ships and why, with every number tables, summary and policy show of it."""

    key: BucketKey
    best: Best
    strategy: str
    settings: dict[str, Any]
    label: str
    speedup: float  # confirmed where confirmed, else the first pass's (1.0: a baseline shipped unconfirmed)
    eta: float
    why: str  # confirmed, baseline: not confirmed, baseline: no confirmation, or first pass (unconfirmed)
    confirmation: confirm.Outcome | None = None
    in_policy: bool = False  # in its (dtype, world) policy: the chosen env, and fastest of its (K, N, M)


def decide(records: Iterable[Record], confirmations: Iterable[Record] = (), *, unconfirmed: bool = False,
           env: dict[str, str] | None = None, min_effect: float = MIN_EFFECT) -> list[Decision]:
    """Every bucket's decision, in key order: what its confirmation ships, else the baseline (``unconfirmed``: the
    first pass's pick); each (dtype, world)'s policy takes the env variant ``env``, else the fastest one."""
    confirmations = list(confirmations)
    samples = confirm.by_bucket(confirmations)
    got: dict[BucketKey, dict[str, list[Record]]] = {}
    for r in confirmations:
        got.setdefault(r.bucket, {}).setdefault(r.ab.pair[1], []).append(r)
    out = [_ship(b, got.get(b.key), samples.get(b.key, {}), unconfirmed, min_effect) for b in best(records)]
    return _place(out, env)


def _ship(b: Best, got: dict[str, list[Record]] | None, samples: dict, unconfirmed: bool,
          min_effect: float) -> Decision:
    if got is None:
        if unconfirmed:
            return Decision(b.key, b, b.strategy, b.settings, b.label, b.speedup, b.eta, "first pass (unconfirmed)")
        eta = metrics.eta(b.t_base_ms, b.t_base_ms, b.t_gemm_ms, b.t_comm_ms, b.t_base_iqr_ms)
        return Decision(b.key, b, REFERENCE, {}, REFERENCE, 1.0, eta, "baseline: no confirmation")
    first_pass = {lab: recs[0].ab.first_pass_speedup for lab, recs in got.items()}
    screened = max(recs[0].extra.get("screened", 0) for recs in got.values())
    d = dataclasses.replace(confirm.decide(samples, first_pass, min_effect=min_effect), candidates=b.candidates,
                            screened=screened)
    if is_reference(d.label):
        name, settings, t_a, t_b = REFERENCE, {}, b.t_base_ms, b.t_base_ms
    else:  # strategy and settings come from the candidate's own records
        side = {s: [x for x in got[d.label] if x.ab.side == s] for s in "ab"}
        name, settings = side["b"][0].strategy, dict(side["b"][0].settings)
        t_a, t_b = (float(statistics.median(x.t_ms for x in side[s])) for s in "ab")
    return Decision(b.key, b, name, settings, d.label, d.speedup,
                    metrics.eta(t_a, t_b, b.t_gemm_ms, b.t_comm_ms, b.t_base_iqr_ms),
                    "baseline: not confirmed" if is_reference(d.label) else "confirmed", d)


def _pick_env(decisions: list[Decision]) -> Env:
    """The env variant whose first-pass winners are fastest (geomean of absolute times over the cases all measured;
    not speedups: a variable slowing the baseline too would look better against its own slower baseline)."""
    by_env: dict[str, list[Best]] = {}
    for d in decisions:
        by_env.setdefault(d.key.env.text, []).append(d.best)
    keys = sorted(by_env)
    common = set.intersection(*({(b.key.shape, b.key.K, b.key.N, b.key.M) for b in by_env[k]} for k in keys))
    scores = {}
    for k in keys:
        times = [b.t_ms for b in by_env[k] if (not common or (b.key.shape, b.key.K, b.key.N, b.key.M) in common)
                 and math.isfinite(b.t_ms) and b.t_ms > 0]
        scores[k] = geomean(times) if times else math.inf  # no usable time: never the fastest
    chosen = min(keys, key=lambda k: (scores[k], k != "default"))
    log.info("env variants scored by geometric-mean winner time (ms): %s; chose %s", scores, chosen)
    return by_env[chosen][0].key.env


def _place(decisions: list[Decision], env: dict[str, str] | None) -> list[Decision]:
    """Mark what each (dtype, world)'s policy holds: the chosen env's decisions, per (K, N, M) the fastest."""
    slots: dict[tuple, list[int]] = {}
    by_family: dict[tuple, list[int]] = {}
    for i, d in enumerate(decisions):
        by_family.setdefault((d.key.dtype, d.key.world), []).append(i)
    for family in by_family.values():
        chosen = Env(env) if env is not None else _pick_env([decisions[i] for i in family])
        for i in family:
            k = decisions[i].key
            if k.env == chosen:
                slots.setdefault((k.dtype, k.world, k.K, k.N, k.M), []).append(i)
    kept = {min(idx, key=lambda i: -decisions[i].speedup if math.isfinite(decisions[i].speedup) else math.inf)
            for idx in slots.values()}
    return [dataclasses.replace(d, in_policy=True) if i in kept else d for i, d in enumerate(decisions)]
