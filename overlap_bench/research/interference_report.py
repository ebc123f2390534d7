"""Reading ``overlap-bench interference`` records: slowdown curves, eta-bound predictions (:mod:`.eta_bound`)
from multi-GPU runs or a bus bandwidth, the slowdown table and the plots."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

from overlap_bench import metrics
from overlap_bench.errors import UserError
from overlap_bench.markdown import cell, table
from overlap_bench.records import Record, json_safe, load_records
from overlap_bench.research import eta_bound
from overlap_bench.runfolder import (INTERFERENCE_CSV, INTERFERENCE_MD, PREDICTION_JSON, PREDICTION_MD, RunFolder,
                                     plot_name)

STRATEGY = "interference"
"""``Record.strategy`` of every interference record."""
COVERED_MIN = 0.9
"""A condition whose side work covered the GEMM in fewer of its repetitions is marked in the table."""


def _ctas_ok(records: Iterable[Record]) -> list[Record]:
    return [r for r in records if r.strategy == STRATEGY and r.ok and r.settings.get("beside") == "ctas"]


def slowdown_curves(records: Iterable[Record]) -> dict[tuple, dict[int, float]]:
    """``{(K, N, M, dtype): {ctas: slowdown}}`` from the ok ``ctas`` records at the first rate found."""
    recs = _ctas_ok(records)
    out: dict[tuple, dict[int, float]] = {}
    for r in recs:
        if r.settings["cta_gbps"] == recs[0].settings["cta_gbps"]:
            out.setdefault((r.K, r.N, r.M, r.dtype), {})[r.settings["ctas"]] = r.extra["slowdown"]
    return out


def comm_rows(run_dir: Path) -> list[Record]:
    """One record per (shape, M, dtype, env) of a multi-GPU run that measured ``t_comm`` (the first seen)."""
    loaded = load_records(run_dir)
    if not loaded.records:
        raise UserError(f"--comm-from: {run_dir} has no records.jsonl records; give a multi-GPU run directory")
    seen: dict[tuple, Record] = {}
    for r in loaded.records:
        if r.world > 1 and math.isfinite(r.t_comm_ms):
            seen.setdefault((r.K, r.N, r.M, r.dtype, tuple(sorted(r.env.items()))), r)
    return list(seen.values())


def predict_from_runs(records: list[Record], comm_dirs: list[Path], ctas: float) -> list[eta_bound.Prediction]:
    """Predictions for every multi-GPU record whose shape, M and dtype the interference run measured; its
    ``t_gemm`` and ``t_comm`` (same card, same job) and the interference run's ``s(ctas)``."""
    curves = slowdown_curves(records)
    out = []
    for d in comm_dirs:
        for r in comm_rows(d):
            key = (r.K, r.N, r.M, r.dtype)
            if key not in curves:
                continue
            env = " ".join(f"{k}={v}" for k, v in sorted(r.env.items())) or "default"
            out.append(eta_bound.predict(
                shape=r.shape, K=r.K, N=r.N, M=r.M, t_gemm=r.t_gemm_ms, t_comm=r.t_comm_ms, curve=curves[key],
                ctas=ctas, comm_from=f"{r.device} x{r.world}", env=env, t_base=r.t_base_ms,
                t_joint_measured=float(r.extra.get("t_joint_ms", math.nan) or math.nan)))
    return out


def predict_from_busbw(records: list[Record], busbw: float, world: int, ctas: float) -> list[eta_bound.Prediction]:
    """Predictions with ``t_comm`` from nccl-tests' all-reduce formula at ``busbw`` GB/s over ``world`` ranks
    and ``t_gemm`` from the interference run's references."""
    curves = slowdown_curves(records)
    refs = {(r.K, r.N, r.M, r.dtype): (r.shape, r.t_base_ms) for r in reversed(_ctas_ok(records))}  # first wins
    out = []
    for (k, n, m, dtype), curve in sorted(curves.items()):
        shape, t_gemm = refs[(k, n, m, dtype)]
        t_comm = metrics.allreduce_ms(m, n, dtype, world, busbw)
        out.append(eta_bound.predict(shape=shape, K=k, N=n, M=m, t_gemm=t_gemm, t_comm=t_comm, curve=curve,
                                     ctas=ctas, comm_from=f"busbw={busbw:g},world={world}"))
    return out


def _num(x: Any, spec: str) -> str:
    return "-" if x is None or not isinstance(x, (int, float)) or not math.isfinite(x) else format(x, spec)


def _pct(x: Any) -> str:
    return "-" if _num(x, "g") == "-" else f"{100 * x:+.1f}%"


def _column(r: Record, many_rates: bool) -> str:
    s = r.settings
    if s["beside"] == "ctas":
        rate = "full" if s["cta_gbps"] == 0 else f"{s['cta_gbps']:g}"
        return f"k={s['ctas']}" + (f"@{rate}" if many_rates or s["cta_gbps"] == 0 else "")
    if s["beside"] == "copy":
        return f"copy {s['copy']}"
    granted = r.extra.get("sms_seen")
    return f"SMs {s['sms']}" + (f" ({granted} ran)" if granted and granted > 0 and granted != s["sms"] else "")


def slowdown_table(records: list[Record]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per shape and M, the GEMM alone and each condition's slowdown [range], ``!`` when the
    references drifted beyond the range, ``?`` when the side work did not cover the GEMM; ``n/a``, ``failed``."""
    recs = [r for r in records if r.strategy == STRATEGY]
    many = len({r.settings.get("cta_gbps") for r in recs if r.settings.get("beside") == "ctas"}) > 1
    order = sorted(recs, key=lambda r: (["ctas", "copy", "green"].index(r.settings["beside"]),
                                        r.settings.get("cta_gbps", 0), -r.settings.get("sms", 0),
                                        r.settings.get("ctas", 0)))
    cols = list(dict.fromkeys(_column(r, many) for r in order))
    header = ["shape", "M", "GEMM alone ms"] + cols
    rows = []
    for key in sorted({(r.shape, r.M) for r in recs}):
        mine = {_column(r, many): r for r in recs if (r.shape, r.M) == key}
        alone = [r.t_base_ms for r in mine.values() if r.ok]
        rows.append([key[0], str(key[1]), f"{statistics.median(alone):.3f}" if alone else "-",
                     *(_cell(mine.get(c)) for c in cols)])
    return header, rows


def _cell(r: Record | None) -> str:
    """One condition's slowdown cell of :func:`slowdown_table`."""
    if r is None:
        return ""
    if not r.ok:
        return "n/a" if r.status == "unavailable" else "failed"
    e = r.extra
    text = _pct(e["slowdown"])
    if e.get("rounds", 1) > 1:
        text += f" [{100 * e['slowdown_lo']:+.0f}, {100 * e['slowdown_hi']:+.0f}]"
    return text + (" !" if e.get("drift_flag") else "") + (" ?" if e.get("covered", 1) < COVERED_MIN else "")


PRED_HEADER = ["shape", "M", "env", "t_comm from", "t_gemm", "t_comm", "s(k)", "t_joint max", "t_joint rate",
               "t_joint measured", "err max", "err rate", "eta max", "eta rate", "eta measured"]


def prediction_rows(preds: list[eta_bound.Prediction]) -> list[list[str]]:
    """Rows of :data:`PRED_HEADER`."""
    return [[p.shape, str(p.M), p.env, p.comm_from, *(_num(x, ".3f") for x in (p.t_gemm_ms, p.t_comm_ms)),
             _pct(p.slowdown), *(_num(x, ".3f") for x in (p.t_joint_max_ms, p.t_joint_rate_ms, p.t_joint_measured_ms)),
             _pct(p.err_max), _pct(p.err_rate), *(_num(x, ".2f") for x in (p.eta_max, p.eta_rate, p.eta_measured))]
            for p in sorted(preds, key=lambda p: (p.env, p.shape, p.M))]


def write_outputs(out_dir: Path, records: list[Record], preds: list[eta_bound.Prediction], *,
                  ctas: float, plots: bool = True) -> list[Path]:
    """``interference.md``/``.csv``, the plots and, with predictions, ``prediction.md``/``.json``."""
    import pandas as pd

    folder = RunFolder(out_dir)
    written = []
    header, rows = slowdown_table(records)
    md = ["# GEMM slowdown beside communication-like work (one GPU)", "",
          f"Device: {records[0].device if records else '?'}. Slowdown = t / mean(reference before, after) - 1, "
          "median over rounds [range]; `!` reference drift beyond the range; `?` side work did not cover the "
          "GEMM; `n/a` unavailable.", "",
          table(header, [[cell(c) for c in r] for r in rows], "llr" + "r" * (len(header) - 3)), ""]
    written.append(folder.write_text(INTERFERENCE_MD, "\n".join(md)))
    frame = pd.DataFrame([{**asdict(r), "ok": r.ok} for r in records])
    if not frame.empty:
        frame["slowdown"] = [r.extra.get("slowdown", math.nan) for r in records]
        written.append(folder.write_text(INTERFERENCE_CSV, frame.drop(columns=["extra"]).to_csv(index=False)))
    if preds:
        lines = ["# Predicted joint time and eta bound", "",
                 f"s(k) at k = {ctas:g} CTAs. Models: max = max(t_gemm (1 + s), t_comm); rate = the GEMM slowed "
                 "only while the all-reduce runs. err = (predicted - measured) / measured.", "",
                 table(PRED_HEADER, [[cell(c) for c in r] for r in prediction_rows(preds)], "llll" + "r" * 11), ""]
        summ = {env: eta_bound.error_summary(p for p in preds if p.env == env)
                for env in sorted({p.env for p in preds})}
        for env, e in summ.items():
            if math.isfinite(e["max_abs_err_rate"]):
                lines.append(f"- {env}: median |err| max model {e['median_abs_err_max']:.1%}, rate model "
                             f"{e['median_abs_err_rate']:.1%}; largest {e['max_abs_err_max']:.1%} / "
                             f"{e['max_abs_err_rate']:.1%}.")
        written.append(folder.write_text(PREDICTION_MD, "\n".join(lines) + "\n"))
        doc = json_safe({"ctas": ctas, "summary_by_env": summ, "rows": [p.to_dict() for p in preds]})
        written.append(folder.write_text(PREDICTION_JSON, json.dumps(doc, indent=1, allow_nan=False) + "\n"))
    if plots and records:
        written += plot(out_dir, records)
    return written


def _x(r: Record, key: str) -> int:
    """Plot position: CTAs, or the SMs a green context really ran on (it rounds the count asked for)."""
    seen = r.extra.get("sms_seen") if key == "sms" else None
    return seen if isinstance(seen, int) and seen > 0 else r.settings[key]


def plot(out_dir: Path, records: list[Record]) -> list[Path]:
    """``slowdown_ctas.png`` (slowdown vs CTAs, one panel per shape, one line per M and rate) and
    ``slowdown_sms.png`` (slowdown vs SMs left to the GEMM in a green context, with the SM-share line)."""
    import matplotlib  # heavy, and sets the process's backend: only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.strategy == STRATEGY and r.ok]
    shapes = sorted({r.shape for r in ok})
    written = []
    for kind, xkey in (("ctas", "ctas"), ("green", "sms")):
        sel = [r for r in ok if r.settings.get("beside") == kind]
        if not sel:
            continue
        fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4), squeeze=False)
        for ax, shape in zip(axes[0], shapes):
            mine = [r for r in sel if r.shape == shape]
            series = sorted({(r.M, r.settings.get("cta_gbps")) for r in mine})
            rates = sorted({rate for _, rate in series}, key=str)
            for i, (m, rate) in enumerate(series):
                pts = sorted(((_x(r, xkey), r.extra) for r in mine if r.M == m and r.settings.get("cta_gbps") == rate),
                             key=lambda p: p[0])
                xs, ys = [x for x, _ in pts], [100 * e["slowdown"] for _, e in pts]
                lo = [100 * (e["slowdown"] - e["slowdown_lo"]) for _, e in pts]
                hi = [100 * (e["slowdown_hi"] - e["slowdown"]) for _, e in pts]
                label = f"M={m}" + ("" if rate is None else (" full speed" if rate == 0 else f" {rate:g} GB/s/CTA"))
                # Each line its own colour; the rate also by marker and dashes (full speed dashed).
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="osD^v<>"[rates.index(rate) % 7], capsize=3, label=label,
                            color=f"C{i % 10}", linestyle="--" if rate == 0 else "-")
            if kind == "green" and mine:
                total = mine[0].extra.get("sms_device") or max(r.settings["sms"] for r in mine)
                xs = sorted({_x(r, xkey) for r in mine})
                ax.plot(xs, [100 * (total / x - 1) for x in xs], "k--", label="SM share (total / SMs - 1)")
                ax.set_xlabel("SMs the GEMM's green context ran on (counted)")
            else:
                ax.set_xlabel("CTAs beside the GEMM (512 threads each)")
            ax.set_ylabel("GEMM slowdown, %")
            ax.set_title(f"{shape} (K={mine[0].K}, N={mine[0].N})" if mine else shape)
            ax.axhline(0, color="grey", lw=0.5)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{ok[0].device}, {ok[0].dtype}: slowdown vs mean of the bracketing references "
                     "(bars: range over rounds)", fontsize=9)
        written.append(RunFolder(out_dir).save_figure(fig, plot_name("slowdown", xkey)))
        plt.close(fig)
    return written
