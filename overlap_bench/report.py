"""A run directory rendered for people: plots per group and a ``summary.md`` that renders on GitHub.

For each group of ok records that share shape, K, N, dtype, bias, world size, device, backend and process
environment, :func:`write_report` writes, next to ``records.jsonl``:

- ``speedup_<slug>.png``: speedup over the baseline against tokens M, one line per setting, the
  baseline at 1.0 and the ideal bound ``t_base / max(t_gemm, t_comm)``;
- ``eta_<slug>.png``: the hidden fraction of the ``chunked`` records over tokens x chunks, one panel per
  communication path, each cell the best eta over the other settings;
- ``breakdown_<slug>.png``: per M, ``t_gemm``, ``t_comm``, ``t_base`` and ``t`` of the best setting;
- ``summary.md``: environment, one table per group (best setting per M), the threshold, links to the
  PNGs, and the failed / unavailable cases with their reasons.

Per M, the best setting and the threshold are those of :func:`overlap_bench.analysis.best_settings` and
:func:`overlap_bench.analysis.threshold` (a setting wins only when it beats the baseline beyond the measured
spread; the exported policy uses the same rule). The row shows the winning record's own ``t_gemm``,
``t_comm`` and ``t_base`` (measured side by side with it), so ``speedup = t_base / t`` holds within the row.
matplotlib is imported only inside :func:`write_report`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overlap_bench import analysis
from overlap_bench.markdown import cell, table
from overlap_bench.records import Record, atomic_file, load_records, write_atomic

SUMMARY = "summary.md"
ENV = "env.json"
SPEC = "spec.yaml"

_ENV_KEYS = ("gpu_name", "gpu_count", "torch", "nccl", "cuda", "host", "git_commit", "command")
"""env.json keys shown first, in this order; any others follow in sorted order."""


@dataclass
class Group:
    """Ok records of one (shape, K, N, dtype, bias, world, device, backend, env) combination."""

    shape: str
    K: int
    N: int
    dtype: str
    bias: bool
    world: int
    device: str
    backend: str
    env: dict[str, str]
    records: list[Record] = field(default_factory=list)
    slug: str = ""
    _winners: Any = field(default=None, repr=False)

    @property
    def ms(self) -> list[int]:
        """Measured token counts, ascending."""
        return sorted({r.M for r in self.records})

    def winners(self) -> Any:
        """This group's rows of :func:`analysis.best_settings` (one per M), computed once."""
        if self._winners is None:
            self._winners = analysis.best_settings(self.records)
        return self._winners

    def threshold(self) -> int | None:
        """:func:`analysis.threshold` of this group's winners."""
        return analysis.threshold(self.winners())

    def best(self, m: int) -> Record | None:
        """The winner at ``m`` by :func:`analysis.best_settings`, as a record: the winning record itself
        (the baseline record when the baseline wins). When the baseline wins but has no record at ``m``,
        a baseline stand-in timed at the winner row's ``t_base`` (with ``t_gemm``/``t_comm`` of the record
        that baseline time was measured beside). None when nothing at ``m`` has a time."""
        best = self.winners()
        rows = best[best["M"] == m] if len(best) else best
        if rows.empty:
            return None
        w = rows.iloc[0]
        at_m = [r for r in self.records if r.M == m]
        same = [r for r in at_m if r.label == w["label"] and _finite(r.t_ms)]
        if same:  # the last record written for a case is the one analysis kept
            return min(same, key=lambda r: r.t_ms) if w["strategy"] == "baseline" else same[-1]
        t, t_base = float(w["t_ms"]), float(w["t_base_ms"])
        if w["strategy"] != "baseline" or not _finite(t) or not at_m:
            return None
        beside = [r for r in at_m if r.t_base_ms == t_base]
        ref = beside[-1] if beside else dataclasses.replace(at_m[-1], t_gemm_ms=math.nan, t_comm_ms=math.nan)
        return dataclasses.replace(ref, strategy="baseline", settings={}, label="baseline", t_ms=t,
                                   t_iqr_ms=ref.t_base_iqr_ms, t_base_ms=t_base, speedup=float(w["speedup"]),
                                   eta=float(w["eta"]), rel_err=math.nan, note="no baseline record at this M")

    def title(self) -> str:
        env = ", ".join(f"{k}={v}" for k, v in sorted(self.env.items()))
        line1 = f"{self.shape}   K×N = {self.K}×{self.N}   {self.dtype}" + ("   +bias" if self.bias else "")
        line2 = f"{self.device}, world {self.world} ({self.backend})" + (f", {env}" if env else "")
        return line1 + "\n" + line2


# --------------------------------------------------------------------------------------------- helpers


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def slugify(text: str) -> str:
    """Filesystem-safe form of ``text``: letters, digits, ``-``, ``_`` and ``.`` only, no leading dot."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text)
    s = re.sub(r"-{2,}", "-", s).strip("-.")
    return s or "group"


def _speedup(r: Record) -> float:
    if _finite(r.speedup):
        return r.speedup
    if _finite(r.t_base_ms) and _finite(r.t_ms) and r.t_ms > 0:
        return r.t_base_ms / r.t_ms
    return math.nan


def _ideal(r: Record) -> float:
    if _finite(r.ideal_ms):
        return r.ideal_ms
    if _finite(r.t_gemm_ms) and _finite(r.t_comm_ms):
        return max(r.t_gemm_ms, r.t_comm_ms)
    return math.nan


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


def _legend_labels(records: list[Record]) -> dict[str, str]:
    """Short legend text per label: settings equal across all of a strategy's records in the group dropped."""
    by_strategy: dict[str, list[Record]] = {}
    for r in records:
        by_strategy.setdefault(r.strategy, []).append(r)
    out: dict[str, str] = {}
    for strat, recs in by_strategy.items():
        keys = {k for r in recs for k in (r.settings or {})}
        varying = [k for k in sorted(keys) if len({json.dumps((r.settings or {}).get(k), sort_keys=True)
                                                   for r in recs}) > 1]
        for r in recs:
            if r.label in out:
                continue
            order = [k for k in (r.settings or {}) if k in varying]
            text = ", ".join(f"{k}={_setting_text((r.settings or {})[k])}" for k in order)
            out[r.label] = f"{strat}: {text}" if text else strat
    # Two labels that differ only in settings we dropped (should not happen) keep their full text.
    counts: dict[str, int] = {}
    for v in out.values():
        counts[v] = counts.get(v, 0) + 1
    return {lab: (lab if counts[short] > 1 else short) for lab, short in out.items()}


def _setting_text(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _save_png(fig: Any, path: Path) -> None:
    """``fig.savefig`` written atomically."""
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")


def _m_axis(ax: Any, ms: list[int]) -> None:
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log", base=2)
    ax.set_xticks(ms)
    ax.set_xticklabels([str(m) for m in ms], rotation=45 if len(ms) > 6 else 0)
    ax.xaxis.set_minor_locator(NullLocator())
    if len(ms) == 1:
        ax.set_xlim(ms[0] / 2, ms[0] * 2)


# ----------------------------------------------------------------------------------------------- plots


def _plot_speedup(plt: Any, g: Group, path: Path) -> None:
    ms = g.ms
    shorts = _legend_labels(g.records)
    lines: dict[str, dict[int, float]] = {}
    for r in g.records:  # the last record written for a (label, M) wins: a rerun replaces the earlier one
        s = _speedup(r)
        if r.strategy != "baseline" and _finite(s):
            lines.setdefault(r.label, {})[r.M] = s
    ideal: list[tuple[int, float]] = []
    for m in ms:
        ratios = [r.t_base_ms / _ideal(r) for r in g.records
                  if r.M == m and _finite(r.t_base_ms) and _finite(_ideal(r)) and _ideal(r) > 0]
        if ratios:
            ideal.append((m, statistics.median(ratios)))

    fig, ax = plt.subplots(figsize=(8.5, 5))
    try:
        n = len(lines)
        cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
        markers = "os^Dv<>pPhX*"
        ax.axhline(1.0, color="black", linewidth=1.2, label="baseline (1.0)")
        if ideal:
            ax.plot([m for m, _ in ideal], [v for _, v in ideal], linestyle="--", color="grey", linewidth=1.5,
                    marker="_", markersize=14, markeredgewidth=2, label="ideal: t_base / max(t_gemm, t_comm)")
        for i, lab in enumerate(sorted(lines, key=lambda lab: (lab.split(":")[0] != "pr", lab))):
            pts = sorted(lines[lab].items())
            ax.plot([m for m, _ in pts], [v for _, v in pts], marker=markers[i % len(markers)],
                    color=cmap(i % cmap.N), linewidth=1.4, markersize=6, label=shorts.get(lab, lab))
        _m_axis(ax, ms)
        ax.set_xlabel("tokens M (rows; log2 scale)")
        ax.set_ylabel("speedup over baseline, t_base / t (×)")
        ax.set_title(g.title(), fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, frameon=False)
        _save_png(fig, path)
    finally:
        plt.close(fig)


def _eta_cells(g: Group) -> dict[str, dict[tuple[int, int], float]]:
    """``comm -> (chunks, M) -> best eta`` over the chunked records' other settings."""
    out: dict[str, dict[tuple[int, int], float]] = {}
    for r in g.records:
        s = r.settings or {}
        if r.strategy != "chunked" or "chunks" not in s or not _finite(r.eta):
            continue
        cells = out.setdefault(str(s.get("comm", "?")), {})
        key = (int(s["chunks"]), r.M)
        cells[key] = max(cells.get(key, -math.inf), r.eta)
    return out


def _plot_eta(plt: Any, g: Group, path: Path, cells_by_comm: dict[str, dict[tuple[int, int], float]]) -> None:
    import numpy as np
    from matplotlib.colors import Normalize

    comms = sorted(cells_by_comm)
    ms = sorted({m for cells in cells_by_comm.values() for _, m in cells})
    chunks = sorted({c for cells in cells_by_comm.values() for c, _ in cells})
    width = max(4.5, 0.75 * len(ms) + 2.0)
    fig, axes = plt.subplots(1, len(comms), figsize=(width * len(comms) + 1.2, max(3.2, 0.5 * len(chunks) + 2.4)),
                             squeeze=False, constrained_layout=True)
    try:
        cmap = plt.get_cmap("RdBu").with_extremes(bad="#dddddd")
        norm = Normalize(vmin=-1.0, vmax=1.0, clip=True)
        image = None
        for ax, comm in zip(axes[0], comms):
            cells = cells_by_comm[comm]
            grid = np.full((len(chunks), len(ms)), np.nan)
            for (c, m), v in cells.items():
                grid[chunks.index(c), ms.index(m)] = v
            image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, origin="lower", aspect="auto")
            for i in range(len(chunks)):
                for j in range(len(ms)):
                    v = grid[i, j]
                    text = "–" if not math.isfinite(v) else f"{v:.2f}"
                    colour = "white" if math.isfinite(v) and abs(v) > 0.6 else "black"
                    ax.text(j, i, text, ha="center", va="center", fontsize=8, color=colour)
            ax.set_xticks(range(len(ms)))
            ax.set_xticklabels([str(m) for m in ms], rotation=45 if len(ms) > 6 else 0)
            ax.set_yticks(range(len(chunks)))
            ax.set_yticklabels([str(c) for c in chunks])
            ax.set_xlabel("tokens M (rows)")
            ax.set_ylabel("chunks")
            ax.set_title(f"chunked, comm={comm}", fontsize=9)
        fig.suptitle(g.title() + "\neta = (t_base - t) / (t_base - max(t_gemm, t_comm)), best over other settings",
                     fontsize=9)
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
                    s = _speedup(b)
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
    labels = sorted({r.label for r in g.records})
    extra.append(f"{len(labels)} setting{'s' if len(labels) != 1 else ''}, "
                 f"{len(g.records)} ok record{'s' if len(g.records) != 1 else ''}")
    lines += ["; ".join(extra) + ".", ""]

    thr = g.threshold()
    if thr is not None:
        lines.append(f"**Threshold: M = {thr}** — from here on, every measured M's best setting is not the "
                     "baseline and beats it beyond the measured spread.")
    else:
        lines.append("**Threshold: none** — at the largest measured M the best setting is the baseline.")
    lines.append("")

    header = ["M", "t_gemm (ms)", "t_comm (ms)", "t_base (ms)", "best setting", "t (ms)", "speedup", "eta",
              "rel_err", "pr speedup"]
    align = "rrrrlrrrrr"
    rows = []
    for m in g.ms:
        b = g.best(m)
        if b is None:
            continue
        prs = [r for r in g.records if r.M == m and r.strategy == "pr" and _finite(_speedup(r))]
        pr_s = _fmt(_speedup(prs[-1]), ".3f") if prs else "–"
        rows.append([str(m), _fmt(b.t_gemm_ms, ".3f"), _fmt(b.t_comm_ms, ".3f"), _fmt(b.t_base_ms, ".3f"),
                     f"`{cell(b.label)}`", _fmt(b.t_ms, ".3f"), _fmt(_speedup(b), ".3f"), _fmt(b.eta, ".2f"),
                     _fmt(b.rel_err, ".2e"), pr_s])
    lines += [table(header, rows, align), ""]
    lines.append("Best setting: the ok record with the lowest t at that M if it beats the baseline beyond the "
                 "measured spread (t + iqr/2 < ref − iqr_ref/2, ref = the faster of t_base and the baseline "
                 "strategy's own record), else the baseline (as in "
                 "`analysis.best_settings` and the exported policy); its own side-by-side t_gemm, t_comm and "
                 "t_base are shown. speedup = t_base / t; eta = (t_base − t) / (t_base − max(t_gemm, t_comm)).")
    lines.append("")
    for kind, caption in (("speedup", "Speedup vs tokens"), ("eta", "Hidden fraction (chunked)"),
                          ("breakdown", "Time breakdown")):
        name = pngs.get(kind)
        if name:
            lines += [f"![{caption}]({name})", ""]
        elif kind == "eta":
            lines += ["_No `chunked` records with an eta in this group: no eta heatmap._", ""]
    return lines


def _latest(records: list[Record]) -> list[Record]:
    """One record per case and device: a case measured again (a rerun appended to the same file) keeps its
    last line; the same case measured on another GPU is another case (as in ``analysis``)."""
    last: dict[tuple, int] = {}
    for i, r in enumerate(records):
        try:
            last[(r.device, r.key())] = i
        except (AttributeError, TypeError):  # env not a dict of hashables: keep the record as it is
            last[("unkeyed", i)] = i
    keep = set(last.values())
    return [r for i, r in enumerate(records) if i in keep]


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


def write_report(run_dir: str | os.PathLike) -> list[Path]:
    """Write the plots and ``summary.md`` of ``run_dir`` into it; returns the written paths (summary last).

    Raises ``FileNotFoundError`` when ``run_dir`` is not a directory. A run with no ok records still gets
    a ``summary.md`` that says so.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    loaded = load_records(run_dir)
    records = _latest(loaded.records)
    ok = [r for r in records if r.ok]
    groups = _group_records(ok)

    written: list[Path] = []
    sections: list[str] = []
    if groups:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for g in groups:
            pngs: dict[str, str | None] = {}
            p = run_dir / f"speedup_{g.slug}.png"
            _plot_speedup(plt, g, p)
            written.append(p)
            pngs["speedup"] = p.name
            cells = _eta_cells(g)
            if cells:
                p = run_dir / f"eta_{g.slug}.png"
                _plot_eta(plt, g, p, cells)
                written.append(p)
                pngs["eta"] = p.name
            p = run_dir / f"breakdown_{g.slug}.png"
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
    text = "\n".join(head + _env_section(run_dir) + sections + _problems_section(records, loaded.torn_lines))
    summary = run_dir / SUMMARY
    write_atomic(summary, text.rstrip("\n") + "\n")
    written.append(summary)
    return written
