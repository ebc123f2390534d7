"""The plots of one group of a run (PNG, matplotlib): speedup over M (the best setting, the peers, the baseline
and the ideal bound ``t_base / max(t_gemm, t_comm)`` bold, every other setting faint, a point above the bound
marked as a measurement fault), eta per setting and M, and the time breakdown of the best setting."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from overlap_bench import strategies
from overlap_bench.keys import GroupKey
from overlap_bench.metrics import finite
from overlap_bench.records import Record
from overlap_bench.runfolder import RunFolder, plot_name
from overlap_bench.select import Best, Decision


@dataclass
class Group:
    """One comparison's decisions (one per M), as its plots and its summary section show them."""

    key: GroupKey
    decisions: list[Decision]
    slug: str = ""

    @property
    def scored(self) -> list[Record]:
        """The ok records, scored."""
        return [r for d in self.decisions for r in d.best.scored if r.ok]

    @property
    def ms(self) -> list[int]:
        """Measured token counts, ascending."""
        return sorted({r.M for r in self.scored})

    def best(self, m: int) -> Best | None:
        """The first pass's winner at ``m`` (None when nothing there has a time)."""
        return next((d.best for d in self.decisions if d.key.M == m and finite(d.best.t_ms)), None)

    def title(self) -> str:
        k = self.key
        line1 = f"{k.shape}   K×N = {k.K}×{k.N}   {k.dtype}" + ("   +bias" if k.bias else "")
        line2 = f"{k.device}, world {k.world} ({k.backend})" + (f", {', '.join(f'{a}={b}' for a, b in k.env)}"
                                                                if k.env else "")
        return line1 + "\n" + line2


def draw(run_dir: Path, g: Group) -> dict[str, Path]:
    """Write the plots of ``g`` into ``run_dir``: ``{kind: path}``, the eta heatmap only where a setting
    varies."""
    import matplotlib  # heavy, and only needed here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {"speedup": run_dir / plot_name("speedup", g.slug)}
    _plot_speedup(plt, g, out["speedup"])
    panels = _eta_panels(g)
    if panels:
        out["eta"] = run_dir / plot_name("eta", g.slug)
        _plot_eta(plt, g, out["eta"], panels)
    out["breakdown"] = run_dir / plot_name("breakdown", g.slug)
    _plot_breakdown(plt, g, out["breakdown"])
    return out


def _setting_text(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _save_png(fig: Any, path: Path) -> None:
    RunFolder(path.parent).save_figure(fig, path.name)


def _m_axis(ax: Any, ms: list[int]) -> None:
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log", base=2)
    ax.set_xticks(ms)
    ax.set_xticklabels([str(m) for m in ms], rotation=45 if len(ms) > 6 else 0)
    ax.xaxis.set_minor_locator(NullLocator())
    if len(ms) == 1:
        ax.set_xlim(ms[0] / 2, ms[0] * 2)


def _ideal_by_m(g: Group) -> dict[int, float]:
    """Per M, the ideal bound on speedup: ``t_base / max(t_gemm, t_comm)`` (median over the M's records)."""
    out = {}
    for m in g.ms:
        ratios = [r.t_base_ms / r.ideal_ms for r in g.scored
                  if r.M == m and finite(r.t_base_ms) and finite(r.ideal_ms) and r.ideal_ms > 0]
        if ratios:
            out[m] = statistics.median(ratios)
    return out


def _plot_speedup(plt: Any, g: Group, path: Path) -> None:
    """Bold: the best setting per M, the peers (``pr``), the baseline and the ideal bound; every other setting
    a faint unlabelled line; a point above the ideal bound (physically impossible) marked as a fault."""
    ms = g.ms
    lines: dict[str, dict[int, float]] = {}
    for r in g.scored:
        if r.strategy != "baseline" and finite(r.speedup):
            lines.setdefault(r.label, {})[r.M] = r.speedup
    ideal = _ideal_by_m(g)
    bests = [b for m in ms if (b := g.best(m)) is not None and finite(b.speedup)]
    peers = set(strategies.peers())

    fig, ax = plt.subplots(figsize=(8.5, 5))
    try:
        ax.axhline(1.0, color="black", linewidth=1.8, label="baseline (1.0)")
        if ideal:
            ax.plot(list(ideal), list(ideal.values()), linestyle="--", color="grey", linewidth=2, marker="_",
                    markersize=14, markeredgewidth=2, label="ideal: t_base / max(t_gemm, t_comm)")
        for lab, pts in lines.items():
            if lab.split(":")[0] not in peers:
                ax.plot(sorted(pts), [pts[m] for m in sorted(pts)], color="#999999", alpha=0.3, linewidth=0.8)
        for i, lab in enumerate(sorted(lab for lab in lines if lab.split(":")[0] in peers)):
            pts = lines[lab]
            ax.plot(sorted(pts), [pts[m] for m in sorted(pts)], color=f"C{1 + i}", linewidth=2.2, marker="s",
                    label=lab)
        if bests:
            ax.plot([b.M for b in bests], [b.speedup for b in bests], color="C0", linewidth=2.6, marker="o",
                    markersize=7, label="best setting per M (label at each point)")
            for b in bests:  # the last point's text goes left, away from the legend
                last = b is bests[-1] and len(bests) > 1
                ax.annotate(b.label.replace(",", ",\n"), (b.M, b.speedup), xytext=(-4 if last else 4, 4),
                            textcoords="offset points", fontsize=6, color="C0", ha="right" if last else "left")
        faults = {m: sum(v > ideal[m] * 1.001 for v in (pts.get(m, -math.inf) for pts in lines.values()))
                  for m in ideal}
        faults = {m: n for m, n in faults.items() if n}
        if faults:
            ax.scatter(list(faults), [ideal[m] for m in faults], marker="X", s=140, color="red", zorder=5,
                       label="settings above the ideal bound: a measurement fault")
            for m, n in faults.items():
                ax.annotate(f"{n} above", (m, ideal[m]), xytext=(6, -10), textcoords="offset points",
                            fontsize=7, color="red")
        _m_axis(ax, ms)
        ax.set_xlabel("tokens M (rows; log2 scale)")
        ax.set_ylabel("speedup over baseline, t_base / t (×)")
        ax.set_title(g.title() + f"\n{len(lines)} settings; faint lines: the others", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, frameon=False)
        _save_png(fig, path)
    finally:
        plt.close(fig)


def _eta_panels(g: Group) -> list[tuple[str, str, dict[tuple[Any, int], float]]]:
    """Heatmap panels ``(title, row setting, (row value, M) -> best eta)`` built from whatever varies: per
    non-baseline, non-peer strategy, rows are the varying numeric setting with the most values, one panel per
    value of the next varying setting (if any), each cell the best eta over the remaining settings."""
    by_strategy: dict[str, list[Record]] = {}
    for r in g.scored:
        if r.strategy != "baseline" and r.strategy not in strategies.peers() and finite(r.eta):
            by_strategy.setdefault(r.strategy, []).append(r)
    panels = []
    for name, recs in sorted(by_strategy.items()):
        values = {k: {json.dumps(r.settings.get(k)) for r in recs} for k in {k for r in recs for k in r.settings}}
        varying = sorted((k for k, v in values.items() if len(v) > 1), key=lambda k: (-len(values[k]), k))
        numeric = [k for k in varying if all(isinstance(r.settings.get(k), (int, float)) for r in recs)]
        if not numeric:
            continue
        row = numeric[0]
        col = next((k for k in varying if k != row and len(values[k]) <= 4), None)
        split: dict[str, dict[tuple[Any, int], float]] = {}
        for r in recs:
            cells = split.setdefault(f"{name}, {col}={_setting_text(r.settings.get(col))}" if col else name, {})
            key = (r.settings[row], r.M)
            cells[key] = max(cells.get(key, -math.inf), r.eta)
        panels += [(title, row, cells) for title, cells in sorted(split.items())]
    return panels


def _plot_eta(plt: Any, g: Group, path: Path, panels: list[tuple[str, str, dict[tuple[Any, int], float]]]) -> None:
    from matplotlib.colors import Normalize

    ms = sorted({m for _, _, cells in panels for _, m in cells})
    n_rows = max(len({y for y, _ in cells}) for _, _, cells in panels)
    width = max(4.5, 0.75 * len(ms) + 2.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels) + 1.2, max(3.2, 0.5 * n_rows + 2.4)),
                             squeeze=False, constrained_layout=True)
    try:
        cmap = plt.get_cmap("RdBu").with_extremes(bad="#dddddd")
        norm = Normalize(vmin=-1.0, vmax=1.0, clip=True)
        image = None
        for ax, (title, row, cells) in zip(axes[0], panels):
            ys = sorted({y for y, _ in cells})
            grid = np.full((len(ys), len(ms)), np.nan)
            for (y, m), v in cells.items():
                grid[ys.index(y), ms.index(m)] = v
            image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, origin="lower", aspect="auto")
            for i in range(len(ys)):
                for j in range(len(ms)):
                    v = grid[i, j]
                    text = "n/a" if not math.isfinite(v) else f"{v:.2f}" + ("!" if v > 1 else "")
                    colour = "white" if math.isfinite(v) and abs(v) > 0.6 else "black"
                    ax.text(j, i, text, ha="center", va="center", fontsize=8, color=colour)
            ax.set_xticks(range(len(ms)))
            ax.set_xticklabels([str(m) for m in ms], rotation=45 if len(ms) > 6 else 0)
            ax.set_yticks(range(len(ys)))
            ax.set_yticklabels([str(y) for y in ys])
            ax.set_xlabel("tokens M (rows)")
            ax.set_ylabel(row)
            ax.set_title(title, fontsize=9)
        fig.suptitle(g.title() + "\neta = (t_base - t) / (t_base - max(t_gemm, t_comm)), best over other settings; "
                     "! above 1: below the ideal bound, a measurement fault", fontsize=9)
        cbar = fig.colorbar(image, ax=list(axes[0]), shrink=0.9)
        cbar.set_label("eta: 1 = at floor, 0 = none hidden, < 0 slower")
        _save_png(fig, path)
    finally:
        plt.close(fig)


def _plot_breakdown(plt: Any, g: Group, path: Path) -> None:
    rows = [(m, b) for m in g.ms if (b := g.best(m)) is not None]
    ms = [m for m, _ in rows]
    series = [
        ("t_gemm", [b.t_gemm_ms for _, b in rows], "#4c72b0"),
        ("t_comm", [b.t_comm_ms for _, b in rows], "#dd8452"),
        ("t_base (gemm then all-reduce)", [b.t_base_ms for _, b in rows], "#8c8c8c"),
        ("t of the best setting", [b.t_ms for _, b in rows], "#55a868"),
    ]
    values = [v for _, vs, _ in series for v in vs if finite(v) and v > 0]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(ms) + 3.0), 4.8))
    try:
        x = np.arange(len(ms))
        width = 0.2
        for i, (name, vs, colour) in enumerate(series):
            ys = [v if finite(v) else 0.0 for v in vs]
            bars = ax.bar(x + (i - 1.5) * width, ys, width, label=name, color=colour)
            if i == 3:
                for bar, (_, b) in zip(bars, rows):
                    s = b.speedup
                    if finite(s):
                        ax.annotate(f"×{s:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                    xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                                    fontsize=7)
        if values and max(values) / min(values) > 20:
            ax.set_yscale("log")
            ax.set_ylabel("time, ms (log scale)")
        else:
            ax.set_ylabel("time, ms")
        ax.set_xticks(x)
        ax.set_xticklabels([f"{m}\n{b.strategy}" for m, b in rows], fontsize=8)
        ax.set_xlabel("tokens M (rows) and best strategy; ×: speedup of the best setting over baseline")
        ax.set_title(g.title(), fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, frameon=False)
        _save_png(fig, path)
    finally:
        plt.close(fig)
