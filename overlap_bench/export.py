"""``overlap-bench export``: a run's best settings (:mod:`overlap_bench.analysis`) written as policy YAML
(the file layout is described in :mod:`overlap_bench.policy`, which loads it at run time)."""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import yaml

import overlap_bench
from overlap_bench import analysis, confirm, runfolder, strategies
from overlap_bench.errors import UserError
from overlap_bench.policy import policy_filename
from overlap_bench.records import load_records
from overlap_bench.runfolder import write_atomic
from overlap_bench.stats import geomean
from overlap_bench.world import refuse_world_one

log = logging.getLogger("overlap_bench.export")


class ExportError(UserError):
    """A run that cannot be exported as asked (no records, an env variant or dtype it lacks); one line."""


def _read_env_json(run_dir: Path) -> dict[str, Any]:
    path = run_dir / runfolder.ENV
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        log.warning("%s unreadable (%s): policy metadata will lack it", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _pick_env(best) -> str:
    """The env variant whose winners are fastest: geometric mean of the winners' absolute times over the
    (shape, M) cases every variant measured. Not their speedups: a variable that slows the baseline too
    (e.g. fewer NCCL channels) would look better against its own slower baseline while being slower."""
    keys = sorted(best["env_key"].unique())
    if len(keys) == 1:
        return keys[0]
    case = ["shape", "K", "N", "M"]
    sets = [set(map(tuple, best.loc[best["env_key"] == k, case].values.tolist())) for k in keys]
    common = set.intersection(*sets)
    scores = {}
    for k in keys:
        b = best[best["env_key"] == k]
        if common:
            b = b[[tuple(r) in common for r in b[case].values.tolist()]]
        times = [t for t in b["t_ms"].astype(float) if math.isfinite(t) and t > 0]
        scores[k] = geomean(times) if times else math.inf  # no usable time: never the fastest
    chosen = min(keys, key=lambda k: (scores[k], k != "default"))
    log.info("env variants scored by geometric-mean winner time (ms): %s; chose %s", scores, chosen)
    return chosen


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else round(f, 4)


def _shapes_doc(best) -> dict[str, Any]:
    shapes: dict[str, Any] = {}
    for (k, n), g in best.groupby(["K", "N"], sort=True):
        # Two shape names with the same (K, N) are the same product: per M keep the faster winner.
        g = g.sort_values("speedup", ascending=False, kind="stable").drop_duplicates("M").sort_values("M")
        buckets = {}
        for r in g.itertuples(index=False):
            try:
                settings = strategies.settings_dict(strategies.make_settings(r.strategy, r.settings))
            except ValueError as e:  # a record edited by hand, or of a strategy this version lacks
                raise ExportError(f"record {r.shape} M={r.M} {r.label}: {e}; fix or delete it in records.jsonl") \
                    from None
            buckets[int(r.M)] = {"strategy": r.strategy, "settings": settings, "speedup": _float(r.speedup),
                                 "eta": _float(r.eta)}
            conf = getattr(r, "confirmation", None)
            if isinstance(conf, dict):
                buckets[int(r.M)]["confirmation"] = {
                    k: ([_float(x) for x in v] if isinstance(v, list) else _float(v) if isinstance(v, float) else v)
                    for k, v in conf.items()}
        shapes[f"{int(k)},{int(n)}"] = {"name": "+".join(sorted(g["shape"].unique())),
                                        "threshold": analysis.threshold(g), "buckets": buckets}
    return shapes


def export_policy(run_dir: str | os.PathLike, out: str | os.PathLike, env: dict[str, str] | str | None = None,
                  dtype: str | None = None, world: int | None = None, unconfirmed: bool = False) -> list[Path]:
    """Write the run's best settings as policy YAML, one file per (dtype, world size); returns the paths.

    ``out`` ending in ``.yaml``/``.yml`` is the file itself (then the run, filtered by ``dtype``/``world``,
    must hold one of each); otherwise it is a folder and files are named by :func:`policy_filename`.
    With several env variants and ``env`` None, the variant with the best geometric-mean speedup is used
    and stored as ``meta.required_env``: it must be set on the serving process before CUDA starts.

    What ships (:func:`overlap_bench.confirm.ship`): a non-baseline setting only where the run's
    confirmation stage measured its speedup's CI lower bound above ``1 + min_effect``; a bucket without
    confirmation ships the baseline, or with ``unconfirmed`` the first pass's pick, and then
    ``meta.unconfirmed`` says so.
    """
    run_dir, out = Path(run_dir), Path(out)
    loaded = load_records(run_dir)
    if loaded.torn_lines:
        log.warning("%s: skipped torn lines %s", run_dir, loaded.torn_lines)
    df = analysis.frame(loaded.records)
    if df.empty:
        raise ExportError(f"{run_dir}: no records to export")
    if dtype is not None:
        df = df[df["dtype"] == dtype]
    if world is not None:
        df = df[df["world"] == world]
    if env is not None:
        if analysis.env_key(env) not in set(df["env_key"]):
            raise ExportError(f"env variant {analysis.env_key(env)!r} not in {run_dir} "
                             f"(has: {', '.join(sorted(set(df['env_key'])))})")
        df = df[df["env_key"] == analysis.env_key(env)]
    if df.empty:
        raise ExportError(f"{run_dir}: no records for dtype={dtype}, world={world}")
    groups = sorted(df.groupby(["dtype", "world"]).groups)
    for _, w in groups:
        refuse_world_one(int(w), "a policy")
    single = out.suffix in (".yaml", ".yml")
    if single and len(groups) > 1:
        dtypes = sorted({d for d, _ in groups})
        field_, vals = ("dtype", dtypes) if len(dtypes) > 1 else ("world", sorted({w for _, w in groups}))
        raise ExportError(f"{run_dir} holds several {field_} values ({', '.join(map(str, vals))}) but {out} is "
                         f"one file: pass {field_}= or a folder as out")
    env_info = _read_env_json(run_dir)
    rows = confirm.load(run_dir)
    paths = []
    for dt, w in groups:
        sub = df[(df["dtype"] == dt) & (df["world"] == w)]
        backends = sorted(sub["backend"].unique())
        if len(backends) > 1:
            raise ExportError(f"{run_dir}: dtype={dt}, world={w} measured on several backends {backends}")
        best = analysis.best_settings(sub)
        chosen = _pick_env(best)
        best = best[best["env_key"] == chosen]
        best = confirm.ship(best, rows, unconfirmed=unconfirmed)
        devices = sorted(set(sub["device"].dropna()) - {""})
        device = devices[0] if devices else str(env_info.get("gpu_name") or "cpu")
        meta = {"device": device, "world_size": int(w), "dtype": dt, "backend": backends[0],
                "required_env": dict(best["env"].iloc[0])}
        meta.update({k: env_info.get(k) for k in ("torch", "nccl", "cuda")})
        if "git_commit" in env_info:
            meta["git_commit"] = env_info["git_commit"]
        missing = int(best["confirmation"].isna().sum())
        meta["confirmation"] = (f"{len(best) - missing} of {len(best)} bucket(s) confirmed by interleaved "
                                f"re-measurement; a setting ships where its confirmed speedup's CI lower bound "
                                f"exceeds 1 + {confirm.MIN_EFFECT}")
        if missing:
            meta["unconfirmed"] = unconfirmed
            meta["confirmation"] += (f"; {missing} unconfirmed bucket(s) ship the first pass's pick (--unconfirmed)"
                                     if unconfirmed else f"; {missing} unconfirmed bucket(s) ship the baseline")
        meta.update(created=datetime.date.today().isoformat(), source_run=str(run_dir),
                    overlap_bench_version=overlap_bench.__version__)
        doc = {"meta": meta, "shapes": _shapes_doc(best)}
        path = out if single else out / policy_filename(device, int(w), dt)
        write_atomic(path, yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))
        paths.append(path)
    return paths
