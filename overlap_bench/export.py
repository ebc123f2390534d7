"""``overlap-bench export``: a run's decisions (:mod:`overlap_bench.select`) written as the policy YAML that
:mod:`overlap_bench.policy` loads; it decides nothing."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import yaml

import overlap_bench
from overlap_bench import confirm, runfolder, select, strategies
from overlap_bench.errors import UserError
from overlap_bench.keys import Env
from overlap_bench.policy import policy_filename
from overlap_bench.records import load_records
from overlap_bench.runfolder import write_atomic
from overlap_bench.select import Decision, threshold
from overlap_bench.stats import Comparison
from overlap_bench.world import refuse_world_one

log = logging.getLogger("overlap_bench.export")


class ExportError(UserError):
    """A run that cannot be exported as asked (no records, an env variant or dtype it lacks); one line."""


def _read_env_json(run_dir: Path) -> dict[str, Any]:
    path = run_dir / runfolder.ENV
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, json.JSONDecodeError) as e:
        log.warning("%s unreadable (%s): policy metadata will lack it", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _float(f: float) -> float | None:
    return None if math.isnan(f) else round(float(f), 4)


def _bucket(d: Decision) -> dict[str, Any]:
    try:
        settings = strategies.settings_dict(strategies.make_settings(d.strategy, d.settings))
    except ValueError as e:  # a record edited by hand, or of a strategy this version lacks
        raise ExportError(f"record {d.key.shape} M={d.key.M} {d.label}: {e}; fix or delete it in records.jsonl") \
            from None
    out = {"strategy": d.strategy, "settings": settings, "speedup": _float(d.speedup), "eta": _float(d.eta)}
    if d.confirmation is not None:  # what ships is the decision's strategy: the outcome's label is not repeated
        out["confirmation"] = {k: [_float(x) for x in v] if isinstance(v, tuple) else
                               _float(v) if isinstance(v, float) else v
                               for k, v in dataclasses.asdict(d.confirmation).items() if k != "label"}
        out["confirmation"]["expected_is"] = Comparison.expected_from
    return out


def _shapes_doc(decisions: list[Decision]) -> dict[str, Any]:
    """The policy's ``shapes``: per (K, N) the decisions its policy slots hold, by M."""
    shapes: dict[str, Any] = {}
    for k, n in sorted({(d.key.K, d.key.N) for d in decisions}):
        mine = sorted((d for d in decisions if (d.key.K, d.key.N) == (k, n)), key=lambda d: d.key.M)
        shapes[f"{k},{n}"] = {"name": "+".join(sorted({d.key.shape for d in mine})),
                              "threshold": threshold((d.key.M, d.strategy) for d in mine),
                              "buckets": {d.key.M: _bucket(d) for d in mine}}
    return shapes


def export_policy(run_dir: str | os.PathLike, out: str | os.PathLike, env: dict[str, str] | None = None,
                  dtype: str | None = None, world: int | None = None, unconfirmed: bool = False,
                  decisions: list[Decision] | None = None) -> list[Path]:
    """Write the run's decisions (:func:`select.decide`, or ``decisions`` made so) as policy YAML, one file per
    (dtype, world size) into the folder ``out``, or into ``out`` itself where it ends in .yaml/.yml (then the run,
    filtered by ``dtype``/``world``, must hold one); returns the paths."""
    run_dir, out = Path(run_dir), Path(out)
    if decisions is None:
        records = load_records(run_dir).records  # lines skipped are reported there
        if not records:
            raise ExportError(f"{run_dir}: no records to export")
        decisions = select.decide(records, confirm.load(run_dir), unconfirmed=unconfirmed, env=env)
    decisions = [d for d in decisions if dtype in (None, d.key.dtype) and world in (None, d.key.world)]
    if env is not None:
        have = sorted({d.key.env.text for d in decisions})
        if Env(env).text not in have:
            raise ExportError(f"env variant {Env(env).text!r} not in {run_dir} (has: {', '.join(have)})")
        decisions = [d for d in decisions if d.key.env == Env(env)]
    if not decisions:
        raise ExportError(f"{run_dir}: no records for dtype={dtype}, world={world}")
    groups = sorted({(d.key.dtype, d.key.world) for d in decisions})
    for _, w in groups:
        refuse_world_one(w, "a policy")
    single = out.suffix in (".yaml", ".yml")
    if single and len(groups) > 1:
        dtypes = sorted({d for d, _ in groups})
        field_, vals = ("dtype", dtypes) if len(dtypes) > 1 else ("world", sorted({w for _, w in groups}))
        raise ExportError(f"{run_dir} holds several {field_} values ({', '.join(map(str, vals))}) but {out} is "
                         f"one file: pass {field_}= or a folder as out")
    env_info = _read_env_json(run_dir)
    paths = []
    for dt, w in groups:
        sub = [d for d in decisions if (d.key.dtype, d.key.world) == (dt, w)]
        backends = sorted({d.key.backend for d in sub})
        if len(backends) > 1:
            raise ExportError(f"{run_dir}: dtype={dt}, world={w} measured on several backends {backends}")
        shipped = [d for d in sub if d.in_policy]
        chosen = [d for d in sub if d.key.env == shipped[0].key.env]
        device = min({d.key.device for d in sub} - {""}, default=None) or str(env_info.get("gpu_name") or "cpu")
        meta = {"device": device, "world_size": w, "dtype": dt, "backend": backends[0],
                "required_env": dict(shipped[0].key.env)}
        meta.update({k: env_info.get(k) for k in ("torch", "nccl", "cuda")})
        if "git_commit" in env_info:
            meta["git_commit"] = env_info["git_commit"]
        missing = sum(d.confirmation is None for d in chosen)
        meta["confirmation"] = (f"{len(chosen) - missing} of {len(chosen)} bucket(s) confirmed by interleaved "
                                f"re-measurement; a setting ships where its confirmed speedup's CI lower bound "
                                f"exceeds 1 + {confirm.MIN_EFFECT}")
        if missing < len(chosen):
            meta["confirmation"] += "; confirmation.expected, the speedup to expect, is that lower bound"
        if missing:
            meta["unconfirmed"] = unconfirmed
            meta["confirmation"] += (f"; {missing} unconfirmed bucket(s) ship the first pass's pick (--unconfirmed)"
                                     if unconfirmed else f"; {missing} unconfirmed bucket(s) ship the baseline")
        meta.update(created=datetime.date.today().isoformat(), source_run=str(run_dir),
                    overlap_bench_version=overlap_bench.__version__)
        doc = {"meta": meta, "shapes": _shapes_doc(shipped)}
        path = out if single else out / policy_filename(device, w, dt)
        write_atomic(path, yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))
        paths.append(path)
    return paths
