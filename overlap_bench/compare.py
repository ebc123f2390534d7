"""``overlap-bench compare``: statistics and reports from the records of two runs or of one A/B run (no GPU)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, fields
from typing import Any, Iterable

import numpy as np
import pandas as pd

from overlap_bench.keys import BucketKey, Env
from overlap_bench.markdown import cell, table
from overlap_bench.metrics import finite
from overlap_bench.records import Record, json_safe, load_records
from overlap_bench.stats import MIN_EFFECT, VERDICTS, Comparison, format_ci, geomean, judge

CASE_COLUMNS = ["shape", "K", "N", "M", "dtype", "a_label", "b_label", "samples_a", "samples_b"]
COLUMNS = CASE_COLUMNS + [f.name for f in fields(Comparison)]

ComparisonTable = pd.DataFrame
"""One row per case: :data:`CASE_COLUMNS`, then every :class:`~overlap_bench.stats.Comparison` field."""


def build_table(rows: list[dict[str, Any]], *, min_effect: float = MIN_EFFECT, alpha: float = 0.05,
                n_boot: int = 10000, seed: int = 0) -> ComparisonTable:
    """Judge ``samples_b`` against ``samples_a`` (tokens/s) for each row (resampled as pairs where the row says
    ``paired``); extra keys are kept as columns."""
    out = []
    for row in rows:
        missing = [c for c in CASE_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"comparison row lacks {missing}")
        a, b = [float(x) for x in row["samples_a"]], [float(x) for x in row["samples_b"]]
        cmp = judge(a, b, min_effect=min_effect, alpha=alpha, paired=bool(row.get("paired")), n_boot=n_boot,
                    seed=seed)
        out.append({**row, "samples_a": a, "samples_b": b, **asdict(cmp)})
    extra = [k for r in rows for k in r if k not in COLUMNS]
    df = pd.DataFrame(out, columns=COLUMNS + list(dict.fromkeys(extra)))
    df.attrs.update(alpha=alpha, min_effect=min_effect)
    return df


def summary(df: ComparisonTable) -> dict[str, Any]:
    """Geometric-mean speedup over the rows with a verdict (NaN if none has one) and the count of each verdict."""
    judged = df[df["verdict"] != "too few samples"] if len(df) else df
    speedups = [s for s in judged["speedup"] if math.isfinite(s) and s > 0] if len(judged) else []
    counts = df["verdict"].value_counts().to_dict() if len(df) else {}
    return {"rows": int(len(df)), "judged": len(speedups), "geomean_speedup": geomean(speedups),
            "verdicts": {v: int(counts.get(v, 0)) for v in VERDICTS}}


def _case(r: Record) -> tuple[BucketKey, str]:
    # Two runs may come from different machines: a case is its bucket without world, backend and device.
    return BucketKey.of(r, world=0, backend="", device=""), r.label


def _name(label: str, dtype: str, bias: Any, env: Any) -> str:
    """A setting as reports name it: label, dtype, bias and env variant (a table's missing column: none)."""
    bias = isinstance(bias, (bool, np.bool_)) and bias
    return f"{label} ({dtype})" + (" +bias" if bias else "") + (f" env {Env(env).text}" if env else "")


def _describe(case: tuple[BucketKey, str]) -> str:
    return f"{case[0].shape} M={case[0].M} " + _name(case[1], case[0].dtype, case[0].bias, case[0].env)


def _why(r: Record) -> str:
    return f"{r.status}" + (f": {r.reason}" if r.reason else "")


def table_from_records(a: Iterable[Record], b: Iterable[Record], *, one_run: bool = False,
                       min_effect: float = MIN_EFFECT, alpha: float = 0.05, n_boot: int = 10000,
                       seed: int = 0) -> tuple[ComparisonTable, list[str]]:
    """Records ``b`` against ``a`` per case (shape, sizes, dtype, bias, env, label; ``one_run``, an A/B run's sides:
    the label pair), each ok record a tokens/s sample; and one line per case not compared (or failed)."""
    key = (lambda r: (_case(r)[0], " → ".join(r.ab.pair))) if one_run else _case
    ok: dict[str, dict[tuple, list[Record]]] = {"A": {}, "B": {}}
    failed: dict[str, dict[tuple, Record]] = {"A": {}, "B": {}}
    for side, recs in (("A", a), ("B", b)):
        for r in recs:
            if r.ok and finite(r.tokens_per_s) and r.tokens_per_s > 0:
                ok[side].setdefault(key(r), []).append(r)
            else:
                failed[side].setdefault(key(r), r)

    rows, unmatched = [], []
    for case, ra in ok["A"].items():
        rb = ok["B"].get(case)
        if rb:
            k = case[0]
            rows.append(dict(shape=k.shape, K=k.K, N=k.N, M=k.M, dtype=k.dtype, a_label=ra[0].label,
                             b_label=rb[0].label, samples_a=[float(r.tokens_per_s) for r in ra],
                             samples_b=[float(r.tokens_per_s) for r in rb], bias=k.bias, env=dict(k.env),
                             t_ms_a=[r.t_ms for r in ra], t_ms_b=[r.t_ms for r in rb],
                             rel_err_a=max(r.rel_err for r in ra), rel_err_b=max(r.rel_err for r in rb),
                             paired=one_run))
    for side, other in (("A", "B"), ("B", "A")):
        for case in ok[side]:
            if case not in ok[other]:
                why = f" [{other}: {_why(failed[other][case])}]" if case in failed[other] else ""
                unmatched.append(f"only in {side}: {_describe(case)}{why}")
        if one_run:  # a side failed its check: nothing of that case was timed
            unmatched += [f"{_describe(case)}: {r.label}: {_why(r)}" for case, r in failed[side].items()
                          if case not in ok["A"] and case not in ok["B"]]
    return build_table(rows, min_effect=min_effect, alpha=alpha, n_boot=n_boot, seed=seed), unmatched


def compare_run_dirs(dir_a: str | os.PathLike, dir_b: str | os.PathLike | None = None, **stat: Any,
                     ) -> tuple[ComparisonTable, list[str]]:
    """Run B's records against run A's, or without ``dir_b`` side b against side a of the A/B run ``dir_a``
    (``stat``: :func:`table_from_records`' options); torn lines skipped go to ``df.attrs["torn_lines"]``."""
    loaded = {"A": load_records(dir_a)} | ({"B": load_records(dir_b)} if dir_b is not None else {})
    if dir_b is None:
        a, b = ([r for r in loaded["A"].records if r.extra.get("side") == s] for s in "ab")
    else:
        a, b = loaded["A"].records, loaded["B"].records
    df, unmatched = table_from_records(a, b, one_run=dir_b is None, **stat)
    df.attrs["torn_lines"] = {side: list(ld.torn_lines) for side, ld in loaded.items()}
    return df, unmatched


# ---- reports ---------------------------------------------------------------------------------------------

WITHIN_NOISE = "≈"
_NOTE = f"{WITHIN_NOISE}: the CI holds 1.0, the difference is within the noise."


def _setting(row: pd.Series) -> str:
    label = row["a_label"] if row["a_label"] == row["b_label"] else f"{row['a_label']} → {row['b_label']}"
    env = row.get("env")
    return _name(label, row["dtype"], row.get("bias"), env if isinstance(env, dict) else None)


def _tps(samples: list[float], median: float) -> str:
    """A side's median tokens/s and beside it its spread: the IQR, as a share of the median."""
    if not math.isfinite(median):
        return "n/a"
    iqr = np.subtract(*np.percentile(samples, [75, 25]))
    return f"{median:,.0f}" + (f" (IQR {100 * iqr / median:.1f}%)" if len(samples) > 1 else "")


def _speedup(row: pd.Series, min_effect: float) -> str:
    ci = format_ci(row["ci_low"], row["ci_high"], (1 - min_effect, 1.0, 1 + min_effect))
    mark = f"{WITHIN_NOISE} " if row["ci_low"] <= 1 <= row["ci_high"] else ""
    return f"{mark}{row['speedup']:.3f}× [{ci if ci != 'n/a' else 'n/a: ' + str(row['verdict'])}]"


def _p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _report(df: ComparisonTable) -> tuple[list[str], list[list[str]]]:
    """The report's header and rows (tokens/s with their IQR, the speedup with its CI)."""
    m = df.attrs.get("min_effect", MIN_EFFECT)
    header = ["shape", "M", "setting", "A tok/s median (IQR)", "B tok/s median (IQR)",
              f"speedup [{100 * (1 - df.attrs.get('alpha', 0.05)):g}% CI]", "p", "verdict"]
    return header, [[str(r["shape"]), str(r["M"]), _setting(r), _tps(r["samples_a"], r["median_a"]),
                     _tps(r["samples_b"], r["median_b"]), _speedup(r, m), _p(r["p_value"]), str(r["verdict"])]
                    for _, r in df.iterrows()]


def _summary_line(summ: dict[str, Any]) -> str:
    g = summ["geomean_speedup"]
    counts = ", ".join(f"{n} {v}" for v, n in summ["verdicts"].items())
    gm = f"{g:.3f}×" if math.isfinite(g) else "n/a"
    return f"Geometric-mean speedup (B/A) over {summ['judged']} of {summ['rows']} case(s): {gm} ({counts})"


def to_markdown(df: ComparisonTable, summ: dict[str, Any], title: str) -> str:
    """A GitHub-flavoured markdown table (B against A) with the geomean line, ready for a pull request."""
    header, rows = _report(df)
    return "\n".join([f"### {title}", "", table(header, [[cell(c) for c in r] for r in rows], "lrlrrrrl"), "",
                      _NOTE, "", f"**{_summary_line(summ)}**", ""])


def to_json(df: ComparisonTable, summ: dict[str, Any]) -> str:
    """``{"summary": ..., "rows": [...]}`` with the sample lists kept and NaN/inf written as null."""
    return json.dumps(json_safe({"summary": summ, "rows": df.to_dict(orient="records")}), indent=2, allow_nan=False)


def rich_table(df: ComparisonTable, summ: dict[str, Any], title: str):
    """The report as a :class:`rich.table.Table` for the terminal."""
    from rich.table import Table
    from rich.text import Text

    style = {"faster": "green", "slower": "red"}
    header, rows = _report(df)
    out = Table(title=title, caption=_summary_line(summ) + "\n" + _NOTE)
    for h, just in zip(header, ["left", "right", "left", "right", "right", "right", "right", "left"]):
        out.add_column(h, justify=just)
    for row in rows:  # Text, not markup: labels and CIs contain brackets
        out.add_row(*(Text(c) for c in row[:-1]), Text(row[-1], style=style.get(row[-1], "dim")))
    return out
