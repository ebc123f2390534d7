"""Analysis of a run's records with pandas: per-shape tables, the best setting per M, and thresholds."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from overlap_bench.markdown import cell, table
from overlap_bench.records import Record, load_records, records_frame, write_atomic

GROUP = ["shape", "K", "N", "dtype", "bias", "world", "device", "backend", "env_key"]
"""Columns that identify one comparison (a shape measured in one job configuration on one kind of GPU)."""
_CASE = ["shape", "K", "N", "M", "dtype", "bias", "label", "env_key", "world", "device", "backend"]
_TABLE_COLS = ["shape", "K", "N", "M", "dtype", "world", "env", "label", "t_base_ms", "t_ms", "speedup", "eta",
               "rel_err", "status", "best"]
BEST_COLS = ["shape", "K", "N", "dtype", "bias", "world", "device", "backend", "env", "M", "strategy", "settings", "label",
             "speedup", "eta", "t_ms", "t_base_ms", "env_key"]


def env_key(env: dict[str, str] | str | None) -> str:
    """Stable text for an env variant: ``"A=1,B=2"`` (sorted), or ``"default"`` for no variables."""
    if isinstance(env, str):
        return env
    if not env:
        return "default"
    return ",".join(f"{k}={v}" for k, v in sorted(env.items()))


def frame(records: Iterable[Record] | str | os.PathLike) -> pd.DataFrame:
    """Records (or a run directory) as a DataFrame with an extra ``env_key`` column."""
    if isinstance(records, (str, os.PathLike)):
        records = load_records(records).records
    df = records_frame(list(records))
    if df.empty:
        names = list(Record.__dataclass_fields__) + ["ok", "env_key"]
        return pd.DataFrame(columns=names)
    df["env_key"] = df["env"].map(env_key)
    return df


def _as_frame(df: pd.DataFrame | Iterable[Record] | str | os.PathLike) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        return frame(df)
    if "env_key" not in df.columns:
        df = df.assign(env_key=df["env"].map(env_key) if len(df) else [])
    return df


def _dedup(df: pd.DataFrame) -> pd.DataFrame:
    # A case measured twice (a rerun appended to the same records.jsonl) counts once: the latest line wins.
    return df.drop_duplicates(subset=_CASE, keep="last")


def _num(v: Any, default: float = math.nan) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return default
    return default if math.isnan(f) else f


def best_settings(df: pd.DataFrame | Iterable[Record], env: dict[str, str] | str | None = None) -> pd.DataFrame:
    """The winning setting per (shape, K, N, dtype, bias, world, device, backend, env) and M.

    Among ``ok`` records the lowest ``t_ms`` wins, but a non-baseline winner is kept only when it beats the
    baseline by more than the measured spread (``t + iqr/2 < ref - iqr_ref/2``); otherwise, and when
    nothing at that M passed, the winner is ``baseline``. ``env`` (dict or key) keeps one variant only.

    ``ref`` is the faster of the two baseline measurements at that M: the reference ``t_base`` taken before
    the strategies, and the ``baseline`` strategy's own record (timed like every strategy). A transient
    that slowed one of them then cannot make a tie look like a win. The ``speedup`` column is ``ref / t``.
    """
    df = _as_frame(df)
    if env is not None:
        df = df[df["env_key"] == env_key(env)]
    if df.empty:
        return pd.DataFrame(columns=BEST_COLS)
    df = _dedup(df)
    rows = []
    for (*key, m), g in df.groupby(GROUP + ["M"], sort=True):
        ok = g[(g["status"] == "ok") & g["t_ms"].notna()]
        base = ok[ok["strategy"] == "baseline"]
        base_rec = base.loc[base["t_ms"].idxmin()] if not base.empty else None
        win = ok.loc[ok["t_ms"].idxmin()] if not ok.empty else None
        ref, ref_iqr = _reference(win, base_rec)
        if win is not None and win["strategy"] != "baseline":
            if not win["t_ms"] + _num(win["t_iqr_ms"], 0.0) / 2 < ref - ref_iqr / 2:
                win = None  # within noise of the baseline (or no baseline time): not a win
        first = g.iloc[0]
        row = dict(zip(GROUP, key), M=int(m), env=dict(first["env"]))
        if win is not None and win["strategy"] != "baseline":
            row.update(strategy=win["strategy"], settings=dict(win["settings"]), label=win["label"],
                       speedup=ref / win["t_ms"], eta=win["eta"], t_ms=win["t_ms"], t_base_ms=ref)
        else:
            t = _num(base_rec["t_ms"]) if base_rec is not None else ref
            row.update(strategy="baseline", settings={}, label="baseline", speedup=ref / t if t > 0 else 1.0,
                       eta=0.0, t_ms=t, t_base_ms=ref)
        rows.append(row)
    return pd.DataFrame(rows)[BEST_COLS].reset_index(drop=True)


def _reference(win: Any, base_rec: Any) -> tuple[float, float]:
    """The baseline time a winner must beat, and its IQR: the faster of the two baseline measurements."""
    cands = []
    for rec, t_col, iqr_col in ((win, "t_base_ms", "t_base_iqr_ms"), (base_rec, "t_ms", "t_iqr_ms")):
        if rec is not None and not math.isnan(_num(rec[t_col])):
            cands.append((_num(rec[t_col]), _num(rec[iqr_col], 0.0)))
    return min(cands) if cands else (math.nan, 0.0)


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


def tables(df: pd.DataFrame | Iterable[Record]) -> dict[str, pd.DataFrame]:
    """One table per (shape, dtype, bias, world, device, backend, env variant): a row per M and setting, ``best`` marking
    each M's winner (from :func:`best_settings`)."""
    df = _dedup(_as_frame(df))
    if df.empty:
        return {}
    best = best_settings(df)
    winners = set(zip(*(best[c] for c in GROUP + ["M", "label"])))
    out: dict[str, pd.DataFrame] = {}
    for key, g in df.groupby(GROUP, sort=True):
        g = g.sort_values(["M", "label"], kind="stable").copy()
        g["best"] = [tuple(r) in winners for r in g[GROUP + ["M", "label"]].itertuples(index=False)]
        g["env"] = g["env_key"]
        out[_table_name(key)] = g[_TABLE_COLS].reset_index(drop=True)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "✓" if v else ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
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


def write_tables(df: pd.DataFrame | Iterable[Record], run_dir: str | os.PathLike) -> list[Path]:
    """Write ``tables.csv`` (every row) and ``tables.md`` (a section per table, winners marked) into
    ``run_dir``; returns both paths."""
    run_dir = Path(run_dir)
    df = _as_frame(df)
    tabs = tables(df)
    best = best_settings(df)
    all_rows = pd.concat(tabs.values(), ignore_index=True) if tabs else pd.DataFrame(columns=_TABLE_COLS)
    csv_path, md_path = run_dir / "tables.csv", run_dir / "tables.md"
    write_atomic(csv_path, all_rows.to_csv(index=False))
    parts = ["# Results", "", "Winner per M marked ✓ (kept only when faster than baseline beyond the spread)."]
    for (key, g) in best.groupby(GROUP, sort=True) if not best.empty else []:
        name = _table_name(key)
        thr = threshold(g)
        parts += ["", f"## {name}", "", f"K={key[1]}, N={key[2]}; overlap wins from M = "
                  + (str(thr) if thr is not None else "never (baseline at the largest M)"), "",
                  _markdown(tabs[name])]
    write_atomic(md_path, "\n".join(parts) + "\n")
    return [csv_path, md_path]
