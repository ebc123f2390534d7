"""A run directory rendered for people: plots per group and a ``summary.md`` that renders on GitHub.

For each group of ok records that share shape, K, N, dtype, bias, world size, device, backend and process
environment, :func:`write_report` writes, next to ``records.jsonl``:

- ``speedup_<slug>.png``: speedup against tokens M: the best setting per M, the peer strategies (``pr``), the
  baseline and the ideal bound ``t_base / max(t_gemm, t_comm)`` bold, every other setting faint, and a point
  above the ideal bound (impossible) marked as a measurement fault;
- ``eta_<slug>.png``: the hidden fraction over M and whichever settings vary (one panel per strategy and
  value of a second varying setting), each cell the best eta over the other settings;
- ``breakdown_<slug>.png``: per M, ``t_gemm``, ``t_comm``, ``t_base`` and ``t`` of the best setting;
- ``summary.md``: environment, one table per group (best setting per M), the threshold, flags, links to the
  PNGs, and the failed / unavailable cases with their reasons.

Every number is :mod:`overlap_bench.analysis`'s (``score``, ``best``, ``threshold``): the tables, this
summary and the exported policy show the same speedup and eta for a bucket.
matplotlib is imported only inside :func:`write_report`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from overlap_bench import analysis, strategies
from overlap_bench.markdown import cell, table
from overlap_bench.records import Loaded, Record, load_records
from overlap_bench.runfolder import ENV, SPEC, SUMMARY, RunFolder, plot_name

_ENV_KEYS = ("gpu_name", "gpu_count", "torch", "nccl", "cuda", "host", "git_commit", "command")
"""env.json keys shown first, in this order; any others follow in sorted order."""


@dataclass
class Group(analysis.GroupKey):
    """Records of one comparison (:class:`analysis.GroupKey`), the latest per case."""

    records: list[Record] = field(default_factory=list)
    slug: str = ""
    _winners: Any = field(default=None, repr=False)
    _scored: Any = field(default=None, repr=False)

    @property
    def ms(self) -> list[int]:
        """Measured token counts, ascending."""
        return sorted({r.M for r in self.records if r.ok})

    @property
    def scored(self) -> list[Record]:
        """The ok records as :func:`analysis.score` states them (speedup and eta against the reference)."""
        if self._scored is None:
            self._scored = [r for r in analysis.score(self.records) if r.ok]
        return self._scored

    def winners(self) -> list[analysis.Best]:
        """This group's :func:`analysis.best` rows (one per M), computed once."""
        if self._winners is None:
            self._winners = analysis.best(self.records)
        return self._winners

    def threshold(self) -> int | None:
        """:func:`analysis.threshold` of this group's winners."""
        return analysis.threshold(pd.DataFrame({"M": [b.M for b in self.winners()],
                                                "strategy": [b.strategy for b in self.winners()]}))

    def best(self, m: int) -> analysis.Best | None:
        """The winner at ``m`` (None when nothing at ``m`` has a time)."""
        return next((b for b in self.winners() if b.M == m and _finite(b.t_ms)), None)

    def title(self) -> str:
        env = ", ".join(f"{k}={v}" for k, v in sorted(self.env.items()))
        line1 = f"{self.shape}   K×N = {self.K}×{self.N}   {self.dtype}" + ("   +bias" if self.bias else "")
        line2 = f"{self.device}, world {self.world} ({self.backend})" + (f", {env}" if env else "")
        return line1 + "\n" + line2


# --------------------------------------------------------------------------------------------- helpers


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


SLUG_MAX = 96
"""Longest slug: with a prefix and ``.png`` a file name stays far below the 255-byte limit of file systems."""


def slugify(text: str) -> str:
    """Filesystem-safe, short form of ``text``: letters, digits, ``-``, ``_`` and ``.`` only, no leading dot,
    at most :data:`SLUG_MAX` characters (a longer one keeps its start and a hash of the whole text)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text)
    s = re.sub(r"-{2,}", "-", s).strip("-.")
    if len(s) > SLUG_MAX:
        s = s[:SLUG_MAX - 9].rstrip("-.") + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return s or "group"


def _fmt(x: Any, spec: str) -> str:
    return format(x, spec) if _finite(x) else "–"


def _group_records(records: list[Record]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for r in records:
        env = {str(k): str(v) for k, v in (r.env or {}).items()}
        key = (r.shape, r.K, r.N, r.dtype, bool(r.bias), r.world, r.device, r.backend, tuple(sorted(env.items())))
        if key not in groups:
            groups[key] = Group(r.shape, r.K, r.N, r.dtype, bool(r.bias), r.world, r.device, r.backend, env)
        groups[key].records.append(r)
    out = [groups[k] for k in sorted(groups, key=lambda k: tuple(str(p) for p in k))]
    out = [g for g in out if g.ms]  # nothing ok: nothing to plot (the problems section lists them)
    seen: dict[str, int] = {}
    for g in out:
        parts = [g.shape, g.dtype, f"tp{g.world}"]
        parts += [f"{k}-{v}" for k, v in sorted(g.env.items())]
        base = slugify("_".join(slugify(p) for p in parts))
        n = seen.get(base, 0) + 1
        seen[base] = n
        # Same shape name with another K/N, device, backend or bias: keep the files apart.
        g.slug = base if n == 1 else f"{base}_{n}"
    return out


def _setting_text(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _save_png(fig: Any, path: Path) -> None:
    """``fig`` saved as ``path`` (atomically, by the run folder)."""
    RunFolder(path.parent).save_figure(fig, path.name)


def _m_axis(ax: Any, ms: list[int]) -> None:
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log", base=2)
    ax.set_xticks(ms)
    ax.set_xticklabels([str(m) for m in ms], rotation=45 if len(ms) > 6 else 0)
    ax.xaxis.set_minor_locator(NullLocator())
    if len(ms) == 1:
        ax.set_xlim(ms[0] / 2, ms[0] * 2)


# ----------------------------------------------------------------------------------------------- plots


def _ideal_by_m(g: Group) -> dict[int, float]:
    """Per M, the ideal bound on speedup: ``t_base / max(t_gemm, t_comm)`` (median over the M's records)."""
    out = {}
    for m in g.ms:
        ratios = [r.t_base_ms / r.ideal_ms for r in g.scored
                  if r.M == m and _finite(r.t_base_ms) and _finite(r.ideal_ms) and r.ideal_ms > 0]
        if ratios:
            out[m] = statistics.median(ratios)
    return out


def _plot_speedup(plt: Any, g: Group, path: Path) -> None:
    """Bold: the best setting per M, the peers (``pr``), the baseline and the ideal bound; every other setting
    a faint unlabelled line; a point above the ideal bound (physically impossible) marked as a fault."""
    ms = g.ms
    lines: dict[str, dict[int, float]] = {}
    for r in g.scored:
        if r.strategy != "baseline" and _finite(r.speedup):
            lines.setdefault(r.label, {})[r.M] = r.speedup
    ideal = _ideal_by_m(g)
    bests = [b for m in ms if (b := g.best(m)) is not None and _finite(b.speedup)]
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
        if r.strategy != "baseline" and r.strategy not in strategies.peers() and _finite(r.eta):
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
    import numpy as np
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
    import numpy as np

    rows = [(m, b) for m in g.ms if (b := g.best(m)) is not None]
    ms = [m for m, _ in rows]
    series = [
        ("t_gemm", [b.t_gemm_ms for _, b in rows], "#4c72b0"),
        ("t_comm", [b.t_comm_ms for _, b in rows], "#dd8452"),
        ("t_base (gemm then all-reduce)", [b.t_base_ms for _, b in rows], "#8c8c8c"),
        ("t of the best setting", [b.t_ms for _, b in rows], "#55a868"),
    ]
    values = [v for _, vs, _ in series for v in vs if _finite(v) and v > 0]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(ms) + 3.0), 4.8))
    try:
        x = np.arange(len(ms))
        width = 0.2
        for i, (name, vs, colour) in enumerate(series):
            ys = [v if _finite(v) else 0.0 for v in vs]
            bars = ax.bar(x + (i - 1.5) * width, ys, width, label=name, color=colour)
            if i == 3:
                for bar, (_, b) in zip(bars, rows):
                    s = b.speedup
                    if _finite(s):
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


# --------------------------------------------------------------------------------------------- summary


def _env_section(run_dir: Path) -> list[str]:
    path = run_dir / ENV
    out = ["## Environment", ""]
    if not path.exists():
        return out + ["No `env.json` in this run.", ""]
    try:
        env = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return out + [f"`env.json` could not be read: {cell(e)}", ""]
    if not isinstance(env, dict):
        return out + [f"`env.json` is not an object: `{cell(env)}`", ""]
    rows: list[list[str]] = []
    keys = [k for k in _ENV_KEYS if k in env] + sorted(k for k in env if k not in _ENV_KEYS)
    for k in keys:
        v = env[k]
        if isinstance(v, dict):
            if not v:
                rows.append([cell(k), "(none)"])
            for sk, sv in sorted(v.items(), key=lambda kv: str(kv[0])):
                rows.append([cell(f"{k}.{sk}"), f"`{cell(sv)}`"])
        elif k in ("command", "git_commit") and v not in (None, ""):
            rows.append([cell(k), f"`{cell(v)}`"])
        else:
            rows.append([cell(k), cell("" if v is None else v)])
    if not rows:
        return out + ["`env.json` is empty.", ""]
    return out + [table(["key", "value"], rows), ""]


def _group_section(g: Group, pngs: dict[str, str | None]) -> list[str]:
    lines = [f"## {cell(g.shape)} · K×N = {g.K}×{g.N} · {g.dtype} · world {g.world} · {cell(g.device)}", ""]
    extra = [f"backend `{g.backend}`"]
    if g.bias:
        extra.append("with bias")
    if g.env:
        extra.append("env " + ", ".join(f"`{cell(k)}={cell(v)}`" for k, v in sorted(g.env.items())))
    labels = sorted({r.label for r in g.scored})
    extra.append(f"{len(labels)} setting{'s' if len(labels) != 1 else ''}, "
                 f"{len(g.scored)} ok record{'s' if len(g.scored) != 1 else ''}")
    lines += ["; ".join(extra) + ".", ""]

    thr = g.threshold()
    if thr is not None:
        lines.append(f"**Threshold: M = {thr}** — from here on, every measured M's best setting is not the "
                     "baseline and beats it beyond the measured spread.")
    else:
        lines.append("**Threshold: none** — at the largest measured M the best setting is the baseline.")
    lines.append("")

    peers = strategies.peers()
    header = ["M", "t_gemm (ms)", "t_comm (ms)", "t_base (ms)", "best setting", "t (ms)", "speedup", "eta",
              "rel_err"] + [f"{p} speedup" for p in peers]
    align = "rrrrlrrrr" + "r" * len(peers)
    rows, flagged = [], []
    for m in g.ms:
        b = g.best(m)
        if b is None:
            continue
        rows.append([str(m), _fmt(b.t_gemm_ms, ".3f"), _fmt(b.t_comm_ms, ".3f"), _fmt(b.t_base_ms, ".3f"),
                     f"`{cell(b.label)}`", _fmt(b.t_ms, ".3f"), _fmt(b.speedup, ".3f"),
                     _fmt(b.eta, ".2f") if _finite(b.eta) else "n/a", _fmt(b.rel_err, ".2e")]
                    + [_fmt(b.peers.get(p), ".3f") for p in peers])
        flagged += [f"- M={m}: {cell('; '.join(b.flags))}"] if b.flags else []
    lines += [table(header, rows, align), ""]
    lines += (["Flags (numbers at these M are doubtful):", ""] + flagged + [""]) if flagged else []
    lines += [analysis.RULE, ""]
    for kind, caption in (("speedup", "Speedup vs tokens"), ("eta", "Hidden fraction (chunked)"),
                          ("breakdown", "Time breakdown")):
        name = pngs.get(kind)
        if name:
            lines += [f"![{caption}]({name})", ""]
        elif kind == "eta":
            lines += ["_No setting varies with an eta in this group: no eta heatmap._", ""]
    return lines


def _ci(lo: Any, hi: Any) -> str:
    return f"[{lo:.3f}, {hi:.3f}]" if _finite(lo) and _finite(hi) else "n/a"


def _confirmation_section(run_dir: Path, records: list[Record]) -> list[str]:
    """First-pass vs confirmed speedup per bucket (the selection bias, measured) and what export ships."""
    from overlap_bench import confirm

    rows = confirm.load(run_dir)
    lines = ["## Confirmation", ""]
    if not rows:
        return lines + ["No confirmation in this run (`--no-confirm`, or the stage did not run): `export` ships "
                        "the baseline in every bucket unless asked for `--unconfirmed`.", ""]
    best = confirm.ship(analysis.best_settings(records), rows)
    table_rows = []
    for r in best.itertuples(index=False):
        c = r.confirmation
        if not isinstance(c, dict):
            table_rows.append([cell(r.shape), str(r.M), cell(r.env_key), "—", "—", "not confirmed", "`baseline`",
                               "—", "—", str(r.candidates)])
            continue
        table_rows.append([cell(r.shape), str(r.M), cell(r.env_key), f"`{cell(c['leader'])}`",
                           _fmt(c["leader_first_pass_speedup"], ".3f"),
                           f"{_fmt(c['leader_speedup'], '.3f')} {_ci(*c['leader_ci'])}", f"`{cell(r.label)}`",
                           f"{_fmt(c['speedup'], '.3f')} {_ci(*c['ci'])}", str(c["repeats"]), str(c["candidates"])])
    header = ["shape", "M", "env", "first-pass leader", "first pass", "confirmed [CI]", "ships", "shipped [CI]",
              "repeats", "candidates"]
    return lines + [
        "Each bucket's leading candidates (the best of the first pass and the peers) measured again against the "
        "baseline, interleaved (A B A B ...), as `compare` does: speedup = ratio of median tokens/s, CI by "
        f"bootstrap of that ratio (Bonferroni: 1 − 0.05/k with k candidates). A setting ships only where its "
        f"CI lower bound exceeds 1 + {confirm.MIN_EFFECT}. *first pass* vs *confirmed* of the leader is the "
        "selection bias, measured.", "", table(header, table_rows, "lrllrrlrrr"), ""]


def _problems_section(records: list[Record], torn: list[int]) -> list[str]:
    bad = [r for r in records if r.status != "ok"]
    if not bad and not torn:
        return []
    lines = ["## Failed and unavailable cases", ""]
    for r in bad:
        lines.append(f"- **{cell(r.status)}** `{cell(r.label)}` — {cell(r.shape)} (K={r.K}, N={r.N}), "
                     f"M={r.M}, {r.dtype}, world {r.world}, {cell(r.device)}: "
                     f"{cell(r.reason) if r.reason else 'no reason recorded'}")
    if torn:
        lines.append(f"- records.jsonl lines skipped as torn (not valid JSON): {', '.join(map(str, torn))}")
    return lines + [""]


def write_report(run_dir: str | os.PathLike, loaded: Loaded | None = None) -> list[Path]:
    """Write the plots and ``summary.md`` of ``run_dir`` into it; returns the written paths (summary last).
    ``loaded``: its records when the caller has read them already (read here otherwise).

    Raises ``FileNotFoundError`` when ``run_dir`` is not a directory. A run with no ok records still gets
    a ``summary.md`` that says so.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    loaded = loaded or load_records(run_dir)
    records = analysis.latest(loaded.records)
    ok = [r for r in records if r.ok]
    groups = _group_records(records)

    written: list[Path] = []
    sections: list[str] = []
    if groups:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for g in groups:
            pngs: dict[str, str | None] = {}
            p = run_dir / plot_name("speedup", g.slug)
            _plot_speedup(plt, g, p)
            written.append(p)
            pngs["speedup"] = p.name
            cells = _eta_panels(g)
            if cells:
                p = run_dir / plot_name("eta", g.slug)
                _plot_eta(plt, g, p, cells)
                written.append(p)
                pngs["eta"] = p.name
            p = run_dir / plot_name("breakdown", g.slug)
            _plot_breakdown(plt, g, p)
            written.append(p)
            pngs["breakdown"] = p.name
            sections += _group_section(g, pngs)

    counts = {s: sum(1 for r in records if r.status == s) for s in sorted({r.status for r in records})}
    head = [f"# overlap-bench report: {cell(run_dir.resolve().name)}", ""]
    tally = ", ".join(f"{n} {s}" for s, n in counts.items()) or "none"
    head.append(f"Records: {len(records)} ({tally}) in `records.jsonl`"
                + (f"; sweep spec: [{SPEC}]({SPEC})" if (run_dir / SPEC).exists() else "") + ".")
    head.append("")
    if not ok:
        head += ["**No ok records in this run: nothing to plot or tabulate.**", ""]
    conf = _confirmation_section(run_dir, records) if ok else []
    text = "\n".join(head + _env_section(run_dir) + conf + sections
                     + _problems_section(records, loaded.torn_lines))
    written.append(RunFolder(run_dir).write_text(SUMMARY, text.rstrip("\n") + "\n"))
    return written
