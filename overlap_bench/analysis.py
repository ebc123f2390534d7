"""A run's records analysed once: every speedup and eta against one reference, the best setting per M as typed
rows, thresholds, and ``tables.md``/``tables.csv``. ``tables.md``, ``summary.md`` (report), the policy export
and ``run``'s table only render what this module returns, so one bucket shows one set of numbers everywhere.

The definitions (:mod:`overlap_bench.metrics`): within a group (same shape, M, dtype, bias, world, device,
backend and process environment) ``t_base`` is :func:`metrics.reference` of the group's baseline
measurements (the reference measured before the strategies and the ``baseline`` strategy's own record: the
fastest), ``speedup = t_base / t`` and ``eta = (t_base - t) / (t_base - max(t_gemm, t_comm))`` (n/a when
that room is too small to measure).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from overlap_bench import metrics, runfolder, strategies
from overlap_bench.markdown import cell, table
from overlap_bench.records import Record, load_records, records_frame

GROUP = ["shape", "K", "N", "dtype", "bias", "world", "device", "backend", "env_key"]
"""Columns that identify one comparison (a shape measured in one job configuration on one kind of GPU)."""
_TABLE_COLS = ["shape", "K", "N", "M", "dtype", "world", "env", "label", "t_base_ms", "t_ms", "speedup", "eta",
               "rel_err", "status", "best"]


def env_key(env: dict[str, str] | str | None) -> str:
    """Stable text for an env variant: ``"A=1,B=2"`` (sorted), or ``"default"`` for no variables."""
    if isinstance(env, str):
        return env
    if not env:
        return "default"
    return ",".join(f"{k}={v}" for k, v in sorted(env.items()))


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _group_key(r: Record) -> tuple:
    return (r.shape, r.K, r.N, r.dtype, bool(r.bias), r.world, r.device, r.backend, env_key(r.env))


def latest(records: Iterable[Record]) -> list[Record]:
    """One record per case and device, in file order: a case measured again (a rerun appended to the same
    file) keeps its last line; the same case on another GPU is another case."""
    last: dict[tuple, int] = {}
    records = list(records)
    for i, r in enumerate(records):
        try:
            last[(r.device, r.key())] = i
        except (AttributeError, TypeError):  # env not a dict of hashables: keep the record as it is
            last[("unkeyed", i)] = i
    keep = set(last.values())
    return [r for i, r in enumerate(records) if i in keep]


def score(records: Iterable[Record]) -> list[Record]:
    """:func:`latest` records with ``t_base_ms`` replaced by the group's reference (and its IQR), and
    ``speedup``, ``eta`` and ``ideal_ms`` derived from it; ``extra["flags"]`` lists what makes a group's
    numbers doubtful (references that contradict each other or drift beyond the spread)."""
    recs = latest(records)
    at: dict[tuple, list[Record]] = {}
    for r in recs:
        at.setdefault((_group_key(r), r.M), []).append(r)
    refs = {key: _reference(g) for key, g in at.items()}
    for key, g in at.items():  # eta above 1 means t below the ideal bound: a measurement fault, flagged
        over = sorted({r.label for r in g if r.ok and _finite(r.t_ms) and r.t_ms < refs[key][0] and
                       metrics.eta(refs[key][0], r.t_ms, r.t_gemm_ms, r.t_comm_ms) > 1})
        if over:
            refs[key] = refs[key][:2] + (refs[key][2] + (f"eta above 1 (t below the ideal bound, a measurement "
                                                          f"fault): {', '.join(over)}",),)
    out = []
    for r in recs:
        t_ref, ref_iqr, flags = refs[(_group_key(r), r.M)]
        spread = max(ref_iqr, r.t_iqr_ms if _finite(r.t_iqr_ms) else 0.0)
        timed = r.ok and _finite(r.t_ms)
        out.append(dataclasses.replace(
            r, t_base_ms=t_ref, t_base_iqr_ms=ref_iqr, ideal_ms=metrics.ideal_ms(r.t_gemm_ms, r.t_comm_ms),
            speedup=metrics.speedup(t_ref, r.t_ms) if timed else math.nan,
            eta=metrics.eta(t_ref, r.t_ms, r.t_gemm_ms, r.t_comm_ms, spread) if timed else math.nan,
            extra={**(r.extra or {}), "flags": list(flags)}))
    return out


def _reference(group: list[Record]) -> tuple[float, float, tuple[str, ...]]:
    """``(t_base, iqr, flags)`` of one group at one M."""
    base = [(r.t_base_ms, r.t_base_iqr_ms) for r in group if _finite(r.t_base_ms)]
    base += [tuple(v) for r in group for v in (r.extra or {}).get("t_base_refs", [])[1:]]  # bracketed refs
    base += [(r.t_ms, r.t_iqr_ms) for r in group if r.strategy == "baseline" and r.ok and _finite(r.t_ms)]
    t_ref, ref_iqr = metrics.reference(base)
    flags = []
    times = sorted({t for t, _ in base if _finite(t) and t > 0})
    widest = max((i for _, i in base if _finite(i)), default=0.0)
    if len(times) > 1 and times[-1] - times[0] > widest:
        flags.append(f"reference drift: baseline measured {times[0]:.4g}..{times[-1]:.4g} ms")
    bad = {metrics.inconsistent(t_ref, r.t_gemm_ms, r.t_comm_ms, ref_iqr) for r in group} - {None}
    return t_ref, ref_iqr, tuple(flags + sorted(bad))


@dataclass
class GroupKey:
    """What identifies one comparison: a shape measured in one job configuration on one kind of GPU."""

    shape: str
    K: int
    N: int
    dtype: str
    bias: bool
    world: int
    device: str
    backend: str
    env: dict[str, str]

    @property
    def env_key(self) -> str:
        return env_key(self.env)


@dataclass
class Best(GroupKey):
    """The best setting of one group at one M, and every number that tables, summary and policy show of it."""

    M: int
    strategy: str
    settings: dict[str, Any]
    label: str
    t_ms: float
    """The winner's time (the reference itself when the baseline wins)."""
    t_iqr_ms: float
    t_base_ms: float
    """The reference (:func:`metrics.reference`)."""
    t_base_iqr_ms: float
    t_gemm_ms: float
    t_comm_ms: float
    speedup: float
    eta: float
    rel_err: float
    candidates: int
    """Settings with a time at this M (of which this is the best: more candidates, more selection bias)."""
    peers: dict[str, float] = field(default_factory=dict)
    """Speedup of each peer strategy (``strategies.peers()``, e.g. ``pr``) measured at this M."""
    flags: tuple[str, ...] = ()


def best(records: Iterable[Record]) -> list[Best]:
    """The winner per group and M, sorted by group then M.

    Among ok records the lowest ``t_ms`` wins, but a non-baseline winner is kept only when it beats the
    reference beyond the measured spread (``t + iqr/2 < t_base - iqr_base/2``) and the group's references
    are consistent; otherwise, and when nothing at that M passed, the winner is ``baseline``.
    """
    scored = score(records)
    at: dict[tuple, list[Record]] = {}
    for r in scored:
        at.setdefault((_group_key(r), r.M), []).append(r)
    peer_names = strategies.peers()
    out = []
    for (key, m), g in sorted(at.items(), key=lambda kv: (tuple(map(str, kv[0][0])), kv[0][1])):
        ok = [r for r in g if r.ok and _finite(r.t_ms)]
        first = g[0]
        flags = tuple(first.extra.get("flags", ()))
        t_ref, ref_iqr = first.t_base_ms, first.t_base_iqr_ms
        win = min(ok, key=lambda r: r.t_ms) if ok else None
        if win is not None and win.strategy != "baseline":
            beats = win.t_ms + (win.t_iqr_ms if _finite(win.t_iqr_ms) else 0.0) / 2 < t_ref - ref_iqr / 2
            if not beats or any(f.startswith("references inconsistent") for f in flags):
                win = None
        if win is None or win.strategy == "baseline":
            beside = [r for r in g if _finite(r.t_gemm_ms)] or g
            ref = beside[-1]
            base_recs = [r for r in ok if r.strategy == "baseline"]
            rel = min(base_recs, key=lambda r: r.t_ms).rel_err if base_recs else math.nan
            win = dataclasses.replace(ref, strategy="baseline", settings={}, label="baseline", t_ms=t_ref,
                                      t_iqr_ms=ref_iqr, rel_err=rel,
                                      speedup=1.0 if _finite(t_ref) else math.nan,
                                      eta=metrics.eta(t_ref, t_ref, ref.t_gemm_ms, ref.t_comm_ms, ref_iqr))
        peers = {p: r.speedup for p in peer_names for r in ok if r.strategy == p}
        out.append(Best(first.shape, first.K, first.N, first.dtype, bool(first.bias), first.world, first.device,
                        first.backend, dict(first.env), int(m), win.strategy, dict(win.settings), win.label,
                        win.t_ms, win.t_iqr_ms, t_ref, ref_iqr, win.t_gemm_ms, win.t_comm_ms, win.speedup,
                        win.eta, win.rel_err, len(ok), peers, flags))
    return out


def _records(data: pd.DataFrame | Iterable[Record] | str | os.PathLike) -> list[Record]:
    if isinstance(data, (str, os.PathLike)):
        return load_records(data).records
    if isinstance(data, pd.DataFrame):
        return [Record.from_dict(row) for row in data.to_dict(orient="records")]
    return list(data)


def frame(records: Iterable[Record] | str | os.PathLike) -> pd.DataFrame:
    """Records (or a run directory) as a DataFrame with an extra ``env_key`` column (measurements as written)."""
    df = records_frame(_records(records))
    if df.empty:
        return pd.DataFrame(columns=list(Record.__dataclass_fields__) + ["ok", "env_key"])
    df["env_key"] = df["env"].map(env_key)
    return df


def best_settings(data: pd.DataFrame | Iterable[Record], env: dict[str, str] | str | None = None) -> pd.DataFrame:
    """:func:`best` as a DataFrame (one column per :class:`Best` field, plus ``env_key``); ``env`` (dict or
    key) keeps one variant only."""
    rows = [{**dataclasses.asdict(b), "env_key": b.env_key} for b in best(_records(data))]
    if env is not None:
        rows = [r for r in rows if r["env_key"] == env_key(env)]
    cols = [f.name for f in dataclasses.fields(Best)] + ["env_key"]
    return pd.DataFrame(rows, columns=cols)


def threshold(best: pd.DataFrame) -> int | None:
    """Smallest M from which every larger measured M has a non-baseline winner (None if the largest M's is
    baseline). ``best`` holds one shape's rows of :func:`best_settings`."""
    if best.empty:
        return None
    if best["M"].duplicated().any():
        raise ValueError("threshold() takes the best_settings rows of one shape/dtype/world/env (M repeats)")
    out = None
    for m, strategy in sorted(zip(best["M"], best["strategy"]), reverse=True):
        if strategy == "baseline":
            break
        out = int(m)
    return out


def _table_name(key: tuple) -> str:
    shape, _k, _n, dtype, bias, world, device, backend, env = key
    return f"{shape} | {dtype}{' +bias' if bias else ''} | world={world} | {device} | {backend} | {env}"


def tables(data: pd.DataFrame | Iterable[Record]) -> dict[str, pd.DataFrame]:
    """One table per (shape, dtype, bias, world, device, backend, env variant): a row per M and setting
    (scored by :func:`score`), ``best`` marking each M's winner (from :func:`best`)."""
    recs = _records(data)
    df = frame(score(recs))
    if df.empty:
        return {}
    winners = {(_best_key(b), b.M, b.label) for b in best(recs)}
    out: dict[str, pd.DataFrame] = {}
    for key, g in df.groupby(GROUP, sort=True):
        g = g.sort_values(["M", "label"], kind="stable").copy()
        g["best"] = [(key, m, lab) in winners for m, lab in zip(g["M"], g["label"])]
        g["env"] = g["env_key"]
        out[_table_name(key)] = g[_TABLE_COLS].reset_index(drop=True)
    return out


def _best_key(b: Best) -> tuple:
    return (b.shape, b.K, b.N, b.dtype, b.bias, b.world, b.device, b.backend, b.env_key)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "✓" if v else ""
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    return cell(v)


def _markdown(t: pd.DataFrame) -> str:
    cols = ["M", "label", "t_base_ms", "t_ms", "speedup", "eta", "rel_err", "status", "best"]
    rows = []
    for r in t[cols].itertuples(index=False):
        cells = [_fmt(v) for v in r]
        if r.best:
            cells[1] = f"**{cells[1]}**"
        rows.append(cells)
    return table(cols, rows)


RULE = ("t_base is the reference: the fastest baseline measurement at that M (the one taken before the "
        "strategies, or the baseline strategy's own record); speedup = t_base / t; eta = (t_base − t) / "
        f"(t_base − max(t_gemm, t_comm)), n/a where that hideable time is below {metrics.ETA_MIN_ROOM:.0%} of t_base "
        f"or {metrics.ETA_MIN_SPREADS:g}× the spread. "
        "The best setting is the fastest ok one if it beats t_base beyond the measured spread (t + iqr/2 < "
        "t_base − iqr_base/2) and the references are consistent, else the baseline.")
"""The rule, stated once for tables.md and summary.md."""


def write_tables(data: pd.DataFrame | Iterable[Record], run_dir: str | os.PathLike) -> list[Path]:
    """Write ``tables.csv`` (every row) and ``tables.md`` (a section per table, winners marked, flags listed)
    into ``run_dir``; returns both paths."""
    folder = runfolder.RunFolder(run_dir)
    recs = _records(data)
    tabs = tables(recs)
    bests = best_settings(recs)
    all_rows = pd.concat(tabs.values(), ignore_index=True) if tabs else pd.DataFrame(columns=_TABLE_COLS)
    csv_path = folder.write_text(runfolder.TABLES_CSV, all_rows.to_csv(index=False))
    parts = ["# Results", "", "Winner per M marked ✓. " + RULE]
    for key, g in bests.groupby(GROUP, sort=True) if not bests.empty else []:
        name = _table_name(key)
        thr = threshold(g)
        parts += ["", f"## {name}", "", f"K={key[1]}, N={key[2]}; overlap wins from M = "
                  + (str(thr) if thr is not None else "never (baseline at the largest M)"), "",
                  _markdown(tabs[name])]
        flagged = [f"- M={m}: {'; '.join(fl)}" for m, fl in zip(g["M"], g["flags"]) if fl]
        if flagged:
            parts += ["", "Flags (numbers at these M are doubtful):", ""] + flagged
    return [csv_path, folder.write_text(runfolder.TABLES_MD, "\n".join(parts) + "\n")]
