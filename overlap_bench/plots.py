"""The plots of one group of a run (PNG, matplotlib): speedup over M with its spread, eta per setting and M, and
the time breakdown of the best setting."""

from __future__ import annotations

import json
import math
import statistics
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from overlap_bench import strategies
from overlap_bench.keys import GroupKey
from overlap_bench.metrics import finite, is_plain, is_reference
from overlap_bench.records import Record
from overlap_bench.runfolder import RunFolder, plot_name
from overlap_bench.select import Best, Decision

_MARKERS = "o^vDPs*<>ph"
"""One marker per best setting on the speedup plot, named in its legend."""


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

    @property
    def bests(self) -> list[Best]:
        """The first pass's winner at each measured M that has a time, ascending."""
        return [d.best for d in self.decisions if d.key.M in self.ms and finite(d.best.t_ms)]

    def title(self) -> str:
        k = self.key
        env = f", {', '.join(f'{a}={b}' for a, b in k.env)}" if k.env else ""
        return (f"{k.shape}   K×N = {k.K}×{k.N}   {k.dtype}" + ("   +bias" if k.bias else "")
                + f"\n{k.device}, world {k.world} ({k.backend}){env}")


def draw(run_dir: Path, g: Group) -> dict[str, Path]:
    """Write the plots of ``g`` into ``run_dir``: ``{kind: path}`` (no eta heatmap without a grid)."""
    import matplotlib  # heavy, and only needed here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    for kind, plot in (("speedup", _plot_speedup), ("eta", _plot_eta), ("breakdown", _plot_breakdown)):
        try:
            fig = plot(plt, g)
            if fig is not None:
                out[kind] = RunFolder(run_dir).save_figure(fig, plot_name(kind, g.slug))
        finally:
            plt.close("all")
    return out


def _wrap(label: str, width: int) -> str:
    """A setting's label broken after its commas into lines of about ``width`` characters."""
    return "\n".join(textwrap.wrap(label.replace(",", ", "), width, break_long_words=False))


def _ideal_by_m(g: Group) -> dict[int, float]:
    """Per M, the ideal bound on speedup: ``t_base / max(t_gemm, t_comm)`` (median over the M's records)."""
    ratios: dict[int, list[float]] = {}
    for r in g.scored:
        if finite(r.t_base_ms) and finite(r.ideal_ms) and r.ideal_ms > 0:
            ratios.setdefault(r.M, []).append(r.t_base_ms / r.ideal_ms)
    return {m: statistics.median(v) for m, v in sorted(ratios.items())}


def _line(ax: Any, pts: list[tuple[int, float, float, float]], colour: str, **kw: Any) -> None:
    """Speedups ``t_base / t`` over M from ``(M, t_base, t, iqr)`` points, shaded across ``t_base / (t ± iqr/2)``."""
    m, tb, t, iqr = (np.array(v, dtype=float) for v in zip(*sorted(pts)))
    half = np.nan_to_num(iqr) / 2
    ax.fill_between(m, tb / (t + half), np.where(t > half, tb / np.maximum(t - half, 1e-12), np.nan), color=colour,
                    alpha=0.15, linewidth=0)
    ax.plot(m, tb / t, color=colour, **kw)


def _plot_speedup(plt: Any, g: Group) -> Any:
    """Shaded by their spread: the best setting per M (legend by marker), the peers, the baseline; the ideal bound;
    dotted: the best plain all-reduce per M; faint: the other settings; a point above the bound marked a fault."""
    from matplotlib.ticker import NullLocator

    lines: dict[str, list[Record]] = {}
    for r in sorted(g.scored, key=lambda r: r.M):
        if not is_reference(r.label) and finite(r.speedup):
            lines.setdefault(r.label, []).append(r)
    ideal = _ideal_by_m(g)
    bests = [b for b in g.bests if finite(b.speedup)]
    peers = set(strategies.peers())
    fig, ax = plt.subplots(figsize=(8.5, 5))
    ax.axhline(1.0, color="black", linewidth=1.8, label="baseline (1.0; shaded: its spread, IQR)")
    if ideal:
        ax.plot(list(ideal), list(ideal.values()), linestyle="--", color="grey", linewidth=2, marker="_",
                markersize=14, markeredgewidth=2, label="ideal: t_base / max(t_gemm, t_comm)")
    for lab, recs in lines.items():
        if lab.split(":")[0] not in peers:
            ax.plot([r.M for r in recs], [r.speedup for r in recs], color="#999999", alpha=0.3, linewidth=0.8)
    for i, lab in enumerate(sorted(lab for lab in lines if lab.split(":")[0] in peers)):
        _line(ax, [(r.M, r.t_base_ms, r.t_ms, r.t_iqr_ms) for r in lines[lab]], f"C{1 + i}", linewidth=2.2,
              marker="s", label=lab)
    plain = [b for b in bests if b.references and finite(b.t_plain_ms)]
    if plain:
        ax.plot([b.M for b in plain], [b.t_base_ms / b.t_plain_ms for b in plain], color="C3", linestyle=":",
                linewidth=2.2, marker="x", markersize=9, label="best plain all-reduce per M: t_base / t_plain")
        for b in plain:
            if not is_reference(b.plain):
                ax.annotate(b.plain.partition(":")[2], (b.M, b.t_base_ms / b.t_plain_ms), xytext=(4, 4),
                            textcoords="offset points", fontsize=7, color="C3")
    if bests:
        _line(ax, [(b.M, b.t_base_ms, b.t_base_ms, b.t_base_iqr_ms) for b in bests], "black", linewidth=1.8)
        _line(ax, [(b.M, b.t_base_ms, b.t_ms, b.t_iqr_ms) for b in bests], "C0", linewidth=2.6,
              label="best setting per M (shaded: its spread); marker:")
        for i, lab in enumerate(dict.fromkeys(b.label for b in bests)):
            at = [b for b in bests if b.label == lab]
            ax.plot([b.M for b in at], [b.speedup for b in at], linestyle="none", color="C0", markersize=8,
                    marker=_MARKERS[i % len(_MARKERS)], label=_wrap(lab, 40))
    faults = Counter(r.M for recs in lines.values() for r in recs  # the bound is the ring's: not a plain one's
                     if not is_plain(r.strategy) and r.speedup > ideal.get(r.M, math.inf) * 1.001)
    if faults:
        ax.scatter(list(faults), [ideal[m] for m in faults], marker="X", s=140, color="red", zorder=5,
                   label="settings above the ideal bound: a measurement fault")
        for m, n in faults.items():
            ax.annotate(f"{n} above", (m, ideal[m]), xytext=(6, -10), textcoords="offset points", fontsize=7,
                        color="red")
    ax.set_xscale("log", base=2)
    ax.set_xticks(g.ms, [str(m) for m in g.ms], rotation=45 if len(g.ms) > 6 else 0)
    ax.xaxis.set_minor_locator(NullLocator())
    if len(g.ms) == 1:
        ax.set_xlim(g.ms[0] / 2, g.ms[0] * 2)
    ax.set(xlabel="tokens M (rows; log2 scale)", ylabel="speedup over baseline, t_base / t (×)")
    ax.set_title(g.title() + f"\n{len(lines)} settings; faint lines: the others", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, frameon=False)
    return fig


def _others(g: Group) -> list[Record]:
    """The records an eta heatmap can show: of strategies that overlap, other than the peers."""
    return [r for r in g.scored if not is_plain(r.strategy) and r.strategy not in strategies.peers()]


def no_eta_reason(g: Group) -> str:
    """Why ``g`` has no eta heatmap, in plain words."""
    if not _others(g):
        return "no strategy here besides the baseline and its peers"
    if not any(finite(r.eta) for r in _others(g)):
        return "eta is n/a for every setting here (too little time to hide to measure it; see the rule above)"
    return "no strategy here has a numeric setting that takes more than one value where eta is measured " \
           "(nothing to lay out on a grid)"


def _eta_panels(g: Group) -> list[tuple[str, str, dict[tuple[Any, int], float]]]:
    """Heatmap panels ``(title, row setting, (row value, M) -> best eta)`` per strategy of :func:`_others`: rows
    its varying numeric setting with most values, a panel per value of the next one, cells the best eta."""
    by_strategy: dict[str, list[Record]] = {}
    for r in _others(g):
        if finite(r.eta):
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
            v = r.settings.get(col)
            cells = split.setdefault(f"{name}, {col}={str(v).lower() if isinstance(v, bool) else v}" if col
                                     else name, {})
            cells[r.settings[row], r.M] = max(cells.get((r.settings[row], r.M), -math.inf), r.eta)
        panels += [(title, row, cells) for title, cells in sorted(split.items())]
    return panels


def _plot_eta(plt: Any, g: Group) -> Any:
    from matplotlib.colors import Normalize

    panels = _eta_panels(g)
    if not panels:
        return None
    ms = sorted({m for _, _, cells in panels for _, m in cells})
    n_rows = max(len({y for y, _ in cells}) for _, _, cells in panels)
    width = max(4.5, 0.75 * len(ms) + 2.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels) + 1.2, max(3.2, 0.5 * n_rows + 2.4)),
                             squeeze=False, constrained_layout=True)
    cmap = plt.get_cmap("RdBu").with_extremes(bad="#dddddd")
    for ax, (title, row, cells) in zip(axes[0], panels):
        ys = sorted({y for y, _ in cells})
        grid = np.full((len(ys), len(ms)), np.nan)
        for (y, m), v in cells.items():
            grid[ys.index(y), ms.index(m)] = v
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=Normalize(vmin=-1.0, vmax=1.0, clip=True),
                          origin="lower", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            text = "n/a" if not math.isfinite(v) else f"{v:.2f}" + ("!" if v > 1 else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if math.isfinite(v) and abs(v) > 0.6 else "black")
        ax.set_xticks(range(len(ms)), [str(m) for m in ms], rotation=45 if len(ms) > 6 else 0)
        ax.set_yticks(range(len(ys)), [str(y) for y in ys])
        ax.set(xlabel="tokens M (rows)", ylabel=row)
        ax.set_title(title, fontsize=9)
    fig.suptitle(g.title() + "\neta = (t_base - t) / (t_base - max(t_gemm, t_comm)), best over other settings; "
                 "! above 1: below the ideal bound, a measurement fault", fontsize=9)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.9).set_label("eta: 1 = at floor, 0 = none hidden, < 0 slower")
    return fig


def _plot_breakdown(plt: Any, g: Group) -> Any:
    rows = g.bests
    series = [("t_gemm", "t_gemm_ms", "#4c72b0"), ("t_comm", "t_comm_ms", "#dd8452"),
              ("t_base (gemm then all-reduce)", "t_base_ms", "#8c8c8c"), ("t of the best setting", "t_ms", "#55a868")]
    values = [v for _, f, _ in series for b in rows if finite(v := getattr(b, f)) and v > 0]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(rows) + 3.0), 5.2))
    x = np.arange(len(rows))
    for i, (name, f, colour) in enumerate(series):
        bars = ax.bar(x + (i - 1.5) * 0.2, [v if finite(v := getattr(b, f)) else 0.0 for b in rows], 0.2,
                      label=name, color=colour)
    for bar, b in zip(bars, rows):  # the last series: the best setting's time, with its speedup
        if finite(b.speedup):
            ax.annotate(f"×{b.speedup:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7)
    log = bool(values) and max(values) / min(values) > 20
    ax.set(yscale="log" if log else "linear", ylabel="time, ms" + (" (log scale)" if log else ""),
           xlabel="tokens M (rows) and the best setting there; ×: its speedup over baseline")
    ax.set_xticks(x, [f"{b.M}\n{_wrap(b.label, 18)}" for b in rows], fontsize=7)
    ax.set_title(g.title(), fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, frameon=False)
    return fig
