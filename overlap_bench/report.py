"""A run rendered from its decisions (:func:`select.decide`, which alone decides): ``tables.md``/``tables.csv``
(every setting per M, winners marked) and ``summary.md`` (environment, confirmation, groups with plots, failures)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from itertools import groupby
from pathlib import Path
from typing import Any

from overlap_bench import confirm, plots, select, strategies
from overlap_bench.markdown import cell, table
from overlap_bench.metrics import finite, is_plain, is_reference
from overlap_bench.plots import Group
from overlap_bench.records import Loaded, Record, load_records
from overlap_bench.runfolder import ENV, SPEC, SUMMARY, TABLES_CSV, TABLES_MD, RunFolder
from overlap_bench.select import PLAIN_RULE, RULE, Decision

_ENV_KEYS = ("gpu_name", "gpu_count", "torch", "nccl", "cuda", "host", "git_commit", "command")
"""env.json keys shown first, in this order; any others follow in sorted order."""
_TABLE_COLS = ["shape", "K", "N", "M", "dtype", "world", "env", "label", "t_base_ms", "t_ms", "speedup", "eta",
               "rel_err", "status", "best", "t_plain_ms", "vs_plain", "eta_plain"]
_NO_PLAIN = (math.nan, math.nan)
SLUG_MAX = 96
"""Longest slug: with a prefix and ``.png`` a file name stays far below the 255-byte limit of file systems."""


def _fmt(x: Any, spec: str) -> str:
    return format(x, spec) if finite(x) else "–"


def slugify(text: str) -> str:
    """Filesystem-safe ``text`` (letters, digits, ``-_.``, no leading dot), at most :data:`SLUG_MAX` characters
    (a longer one keeps its start and a hash of the whole)."""
    s = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9._-]+", "-", text)).strip("-.")
    if len(s) > SLUG_MAX:
        s = s[:SLUG_MAX - 9].rstrip("-.") + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return s or "group"


def _groups(decisions: list[Decision]) -> list[Group]:
    """The decisions by group (key order, one per M), slugs given; a group with nothing ok is left out."""
    out = [g for key, ds in groupby(decisions, key=lambda d: d.key.group) if (g := Group(key, list(ds))).ms]
    seen: dict[str, int] = {}
    for g in out:
        parts = [g.key.shape, g.key.dtype, f"tp{g.key.world}"] + [f"{k}-{v}" for k, v in g.key.env]
        base = slugify("_".join(slugify(p) for p in parts))
        seen[base] = n = seen.get(base, 0) + 1
        g.slug = base if n == 1 else f"{base}_{n}"  # same shape name with another K/N, device, backend or bias
    return out


# ---- tables.md and tables.csv ------------------------------------------------------------------------------

def table_rows(decisions: list[Decision]) -> list[dict[str, Any]]:
    """Every scored record of the buckets as a row (key order, then label), the first pass's winner marked ``best``
    with its :class:`select.Best` numbers (a winning baseline without a record: a ``reference`` row); ``vs_plain``,
    ``eta_plain``: against the best plain all-reduce ``t_plain_ms``."""
    rows = []
    for d in decisions:
        b, k = d.best, d.key
        cells = [(r.label, r.status, b if r.label == b.label else r) for r in b.scored]
        cells += [(b.label, "reference", b)] if b.label not in {r.label for r in b.scored} else []
        rows += [{"shape": k.shape, "K": k.K, "N": k.N, "M": k.M, "dtype": k.dtype, "world": k.world,
                  "env": k.env.text, "label": label, "t_base_ms": b.t_base_ms, "t_ms": x.t_ms, "speedup": x.speedup,
                  "eta": x.eta, "rel_err": x.rel_err, "status": status, "best": x is b, "t_plain_ms": b.t_plain_ms,
                  "vs_plain": b.vs_plain.get(label, _NO_PLAIN)[0], "eta_plain": b.vs_plain.get(label, _NO_PLAIN)[1]}
                 for label, status, x in sorted(cells, key=lambda c: c[0])]
    return rows


def _tfmt(v: Any) -> str:
    if isinstance(v, bool):
        return "✓" if v else ""
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    return cell(v)


def write_tables(decisions: list[Decision], run_dir: str | os.PathLike) -> list[Path]:
    """Write ``tables.csv`` (every row) and ``tables.md`` (a section per group, winners marked, flags); both paths."""
    import pandas as pd  # here: every rank imports this module (through sweep), only a launcher writes tables

    folder = RunFolder(run_dir)
    rows = pd.DataFrame(table_rows(decisions), columns=_TABLE_COLS)
    csv_path = folder.write_text(TABLES_CSV, rows.to_csv(index=False))
    anywhere = bool(_references(decisions))
    parts = ["# Results", "", "Winner per M marked ✓. " + RULE + " " + (PLAIN_RULE if anywhere else _plain_note([]))]
    for key, ds in groupby(decisions, key=lambda d: d.key.group):
        ds = list(ds)
        refs = _references(ds)
        cols = ["M", "label", "t_base_ms", "t_ms", "speedup"] + (["t_plain_ms", "vs_plain"] if refs else []) \
            + ["eta"] + (["eta_plain"] if refs else []) + ["rel_err", "status", "best"]
        thr = select.threshold((d.key.M, d.best.strategy) for d in ds)
        md = [[_tfmt(row[c]) for c in cols] for row in table_rows(ds)]
        for row in md:
            row[1] = f"**{row[1]}**" if row[-1] else row[1]
        parts += ["", f"## {key.shape} | {key.dtype}{' +bias' if key.bias else ''} | world={key.world} | "
                  f"{key.device} | {key.backend} | {key.env.text}", "",
                  f"K={key.K}, N={key.N}; overlap wins from M = "
                  + (str(thr) if thr is not None else "never (a plain all-reduce at the largest M)"), "",
                  *([_plain_note(refs), ""] if anywhere else []), table(cols, md)]
        flagged = [f"- M={d.key.M}: {'; '.join(d.best.flags)}" for d in ds if d.best.flags]
        parts += ["", "Flags (numbers at these M are doubtful):", ""] + flagged if flagged else []
    return [csv_path, folder.write_text(TABLES_MD, "\n".join(parts) + "\n")]


def _references(decisions: list[Decision]) -> list[str]:
    """The plain references (``baseline:comm=...``) with a record in these decisions' buckets."""
    return sorted({lab for d in decisions for lab in d.best.references})


def _plain_note(refs: list[str]) -> str:
    """Which plain references ``vs best plain`` takes, or that there are none (then it equals vs baseline)."""
    if not refs:
        return ("No plain reference besides the ring baseline (`baseline:comm=...`) was measured here: vs best "
                "plain equals vs baseline, so it is not repeated.")
    return "Plain references measured: " + ", ".join(f"`{cell(r)}`" for r in refs) + "."


def verdict(d: Decision) -> str:
    """One sentence: whether overlap, a faster plain all-reduce or neither wins the bucket (what ships if
    confirmed, else the first pass's best), with its speedups vs the baseline and the best plain."""
    b, confirmed = d.best, d.confirmation is not None
    strategy, label, sp = (d.strategy, d.label, d.speedup) if confirmed else (b.strategy, b.label, b.speedup)
    how = "first pass, unconfirmed" if not confirmed else "nothing confirmed faster" if is_reference(label) \
        else "confirmed"
    if is_reference(label):
        what = "neither wins: the ring baseline"
    elif is_plain(strategy):
        what = f"a faster plain all-reduce (`{cell(label)}`) wins, {_fmt(sp, '.3f')}× vs baseline"
    else:
        what = f"overlap wins (`{cell(label)}`), {_fmt(sp, '.3f')}× vs baseline"
        if not is_reference(b.plain):  # else the ring is the best plain: vs best plain is vs baseline
            what += f", {_fmt(b.vs_plain.get(label, _NO_PLAIN)[0], '.3f')}× vs best plain (`{cell(b.plain)}`)"
    return f"At M={d.key.M}, {what} ({how})."


# ---- summary.md ----------------------------------------------------------------------------------------------

def _env_section(run_dir: Path) -> list[str]:
    out = ["## Environment", ""]
    try:
        env = json.loads((run_dir / ENV).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return out + ["No `env.json` in this run.", ""]
    except (OSError, ValueError) as e:
        return out + [f"`env.json` could not be read: {cell(e)}", ""]
    if not isinstance(env, dict):
        return out + [f"`env.json` is not an object: `{cell(env)}`", ""]
    rows: list[list[str]] = []
    for k in [k for k in _ENV_KEYS if k in env] + sorted(k for k in env if k not in _ENV_KEYS):
        v = env[k]
        if isinstance(v, dict):
            rows += ([[cell(f"{k}.{sk}"), f"`{cell(sv)}`"] for sk, sv in sorted(v.items(), key=lambda kv: str(kv[0]))]
                     or [[cell(k), "(none)"]])
        else:
            code = k in ("command", "git_commit") and v not in (None, "")
            rows.append([cell(k), f"`{cell(v)}`" if code else cell("" if v is None else v)])
    return out + ([table(["key", "value"], rows), ""] if rows else ["`env.json` is empty.", ""])


def _group_section(g: Group, pngs: dict[str, Path], anywhere: bool) -> list[str]:
    """One group's section; ``anywhere``: whether the run measured a plain reference (else the head says so)."""
    k = g.key
    n_labels = len({r.label for r in g.scored})
    extra = [f"backend `{k.backend}`"] + (["with bias"] if k.bias else [])
    extra += ["env " + ", ".join(f"`{cell(a)}={cell(b)}`" for a, b in k.env)] if k.env else []
    extra.append(f"{n_labels} setting{'s' if n_labels != 1 else ''}, "
                 f"{len(g.scored)} ok record{'s' if len(g.scored) != 1 else ''}")
    thr = select.threshold((d.key.M, d.best.strategy) for d in g.decisions)
    lines = [f"## {cell(k.shape)} · K×N = {k.K}×{k.N} · {k.dtype} · world {k.world} · {cell(k.device)}", "",
             "; ".join(extra) + ".", "",
             f"**Threshold: M = {thr}** — from here on, every measured M's best setting overlaps (is not a plain "
             "all-reduce) and beats the baseline beyond the measured spread." if thr is not None else
             "**Threshold: none** — at the largest measured M the best setting is a plain all-reduce.", ""]
    peers, refs = strategies.peers(), _references(g.decisions)
    header = ["M", "t_gemm (ms)", "t_comm (ms)", "t_base (ms)", "best setting", "t (ms)", "speedup", "eta"] \
        + (["t_plain (ms)", "best plain", "vs best plain", "eta vs plain"] if refs else []) \
        + ["rel_err"] + [f"{p} speedup" for p in peers]
    rows = [[str(b.M), _fmt(b.t_gemm_ms, ".3f"), _fmt(b.t_comm_ms, ".3f"), _fmt(b.t_base_ms, ".3f"),
             f"`{cell(b.label)}`", _fmt(b.t_ms, ".3f"), _fmt(b.speedup, ".3f"), _eta(b.eta)]
            + ([_fmt(b.t_plain_ms, ".3f"), f"`{cell(b.plain)}`", _fmt(b.speedup_plain, ".3f"), _eta(b.eta_plain)]
               if refs else [])
            + [_fmt(b.rel_err, ".2e")] + [_fmt(b.peers.get(p), ".3f") for p in peers] for b in g.bests]
    flagged = [f"- M={b.M}: {cell('; '.join(b.flags))}" for b in g.bests if b.flags]
    lines += [table(header, rows, "rrrrlrrr" + ("rlrr" if refs else "") + "r" + "r" * len(peers)), ""]
    ms = {b.M for b in g.bests}
    lines += ["Who wins at each M (overlap, a faster plain all-reduce, or neither):", ""]
    lines += [f"- {verdict(d)}" for d in g.decisions if d.key.M in ms] + [""]
    lines += (["Flags (numbers at these M are doubtful):", ""] + flagged + [""]) if flagged else []
    lines += [RULE, ""] + ([PLAIN_RULE if refs else _plain_note(refs), ""] if anywhere else [])
    for kind, caption in (("speedup", "Speedup vs tokens"), ("eta", "Hidden fraction (chunked)"),
                          ("breakdown", "Time breakdown")):
        if kind in pngs:
            lines += [f"![{caption}]({pngs[kind].name})", ""]
        elif kind == "eta":
            lines += [f"_No eta heatmap: {plots.no_eta_reason(g)}._", ""]
    return lines


def _eta(x: float) -> str:
    return _fmt(x, ".2f") if finite(x) else "n/a"


def _ci(lo: Any, hi: Any) -> str:
    return f"[{lo:.3f}, {hi:.3f}]" if finite(lo) and finite(hi) else "n/a"


def _confirmation_section(decisions: list[Decision]) -> list[str]:
    """First-pass vs confirmed speedup per bucket (the selection bias, measured) and what ships."""
    lines = ["## Confirmation", ""]
    if not any(d.confirmation for d in decisions):
        return lines + ["No confirmation in this run (`--no-confirm`, or the stage did not run): `export` ships "
                        "the baseline in every bucket unless asked for `--unconfirmed`.", ""]
    rows = []
    for d in decisions:
        c, k = d.confirmation, d.key
        if c is None:
            rows.append([cell(k.shape), str(k.M), cell(k.env.text), "—", "—", "not confirmed", f"`{cell(d.label)}`",
                         "—", "—", "—", str(d.best.candidates), "—"])
            continue
        rows.append([cell(k.shape), str(k.M), cell(k.env.text), f"`{cell(c.leader)}`",
                     _fmt(c.leader_first_pass_speedup, ".3f"), f"{_fmt(c.leader_speedup, '.3f')} {_ci(*c.leader_ci)}",
                     f"`{cell(d.label)}`", f"{_fmt(c.speedup, '.3f')} {_ci(*c.ci)}", _fmt(c.expected, ".3f"),
                     str(c.repeats), str(c.candidates), str(c.screened)])
    header = ["shape", "M", "env", "first-pass leader", "first pass", "confirmed [CI]", "ships", "shipped [CI]",
              "expect", "repeats", "candidates", "screened"]
    return lines + [
        "Each bucket's leading candidates (the best of the first pass, or of the screen where it had more than "
        "that, and the peers) measured again against the baseline, interleaved, as `compare` does: speedup = "
        f"ratio of median tokens/s, bounds by paired bootstrap, one-sided at {confirm.SHIP_ALPHA}/k for k "
        f"candidates. A setting ships only where its lower bound exceeds 1 + {confirm.MIN_EFFECT}; *expect* is "
        "that bound. *first pass* vs *confirmed* of the leader is the selection bias, measured.", "",
        table(header, rows, "lrllrrlrrrrr"), ""]


def _problems_section(records: list[Record], torn: list[int]) -> list[str]:
    bad = [r for r in records if r.status != "ok"]
    if not bad and not torn:
        return []
    lines = ["## Failed and unavailable cases", ""]
    lines += [f"- **{cell(r.status)}** `{cell(r.label)}` — {cell(r.shape)} (K={r.K}, N={r.N}), M={r.M}, {r.dtype}, "
              f"world {r.world}, {cell(r.device)}: {cell(r.reason) if r.reason else 'no reason recorded'}" for r in bad]
    if torn:
        lines.append(f"- records.jsonl lines skipped as torn (not valid JSON): {', '.join(map(str, torn))}")
    return lines + [""]


def write_report(run_dir: str | os.PathLike, loaded: Loaded | None = None,
                 decisions: list[Decision] | None = None) -> list[Path]:
    """Write the plots and ``summary.md`` (also for no ok records) of ``run_dir``; the paths, summary last.
    ``loaded``, ``decisions``: the folder's records and decisions when the caller has them."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    loaded = loaded or load_records(run_dir)
    if decisions is None:
        decisions = select.decide(loaded.records, confirm.load(run_dir))
    records = select.latest(loaded.records)
    drawn = [(g, plots.draw(run_dir, g)) for g in _groups(decisions)]
    written = [p for _, pngs in drawn for p in pngs.values()]
    anywhere = bool(_references(decisions))
    sections = [line for g, pngs in drawn for line in _group_section(g, pngs, anywhere)]
    tally = ", ".join(f"{n} {s}" for s, n in sorted(Counter(r.status for r in records).items())) or "none"
    head = [f"# overlap-bench report: {cell(run_dir.resolve().name)}", "",
            f"Records: {len(records)} ({tally}) in `records.jsonl`"
            + (f"; sweep spec: [{SPEC}]({SPEC})" if (run_dir / SPEC).exists() else "") + ".", ""]
    ok = any(r.ok for r in records)
    head += [] if ok else ["**No ok records in this run: nothing to plot or tabulate.**", ""]
    head += [] if anywhere or not ok else [_plain_note([]), ""]
    text = "\n".join(head + _env_section(run_dir) + (_confirmation_section(decisions) if ok else []) + sections
                     + _problems_section(records, loaded.torn_lines))
    written.append(RunFolder(run_dir).write_text(SUMMARY, text.rstrip("\n") + "\n"))
    return written
