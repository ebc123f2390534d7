"""The exported policy: one YAML per device, world size and dtype (vLLM tuned-config style), its loader and
the runtime lookup ``Policy.choose(K, N, M) -> Choice``.

File layout::

    meta: {device, world_size, dtype, backend, required_env, torch, nccl, cuda, git_commit, created,
           source_run, overlap_bench_version}
    shapes:
      "K,N": {name, threshold, buckets: {M: {strategy, settings, speedup, eta}}}

``K`` is the per-rank inner dimension. A bucket applies from its M up to the next bucket (floor lookup).
"""

from __future__ import annotations

import bisect
import datetime
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import overlap_bench
from overlap_bench import analysis, strategies
from overlap_bench.errors import UserError
from overlap_bench.stats import geomean
from overlap_bench.records import load_records, write_atomic

log = logging.getLogger("overlap_bench.policy")

ENV_DIR = "OVERLAP_BENCH_POLICY_DIR"
"""Environment variable naming a folder searched before the package's own ``configs/``."""
PACKAGE_DIR = Path(__file__).parent / "configs"


class PolicyError(UserError):
    """A policy file that cannot be used; the message names the file and the field."""

    def __init__(self, message: str):
        # One line whatever the file holds: line breaks and other control characters in a key or name are
        # shown escaped, as repr() would.
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message)))


@dataclass(frozen=True)
class Entry:
    """One bucket of one shape."""

    strategy: str
    settings: Any
    label: str
    speedup: float | None = None
    eta: float | None = None


@dataclass(frozen=True)
class Choice:
    """What :meth:`Policy.choose` answers."""

    strategy: str
    settings: Any
    """The strategy's settings object (from ``strategies.make_settings``)."""
    label: str
    bucket: int | None
    """The bucket's M, or None when no bucket applied (baseline)."""
    reason: str


@dataclass
class ShapePolicy:
    """Buckets of one ``(K, N)``, sorted by M."""

    name: str
    threshold: int | None
    buckets: list[tuple[int, Entry]]

    def __post_init__(self) -> None:
        self.buckets = sorted(self.buckets, key=lambda b: b[0])
        self.ms = [m for m, _ in self.buckets]


@dataclass
class Policy:
    """A loaded policy; an empty one answers baseline for everything."""

    meta: dict[str, Any] = field(default_factory=dict)
    shapes: dict[tuple[int, int], ShapePolicy] = field(default_factory=dict)
    path: Path | None = None
    _warned: set = field(default_factory=set, repr=False)

    @classmethod
    def baseline_only(cls) -> "Policy":
        """A policy with no shapes: every lookup answers baseline."""
        return cls()

    def choose(self, *, K: int, N: int, M: int) -> Choice:
        """The strategy for an ``[M, K] x [K, N]`` layer: the largest bucket <= M, else baseline."""
        shape = self.shapes.get((K, N))
        if shape is None:
            if (K, N) not in self._warned:
                self._warned.add((K, N))
                log.warning("no policy entry for K=%d, N=%d in %s: using baseline", K, N, self.path or "(empty policy)")
            return _baseline(None, f"shape K={K}, N={N} not in policy")
        i = bisect.bisect_right(shape.ms, M) - 1
        if i < 0:
            return _baseline(None, f"M={M} below the smallest bucket {shape.ms[0]}")
        bucket, e = shape.buckets[i]
        return Choice(e.strategy, e.settings, e.label, bucket, f"bucket M={bucket} of {shape.name}")


def _baseline(bucket: int | None, reason: str) -> Choice:
    return Choice("baseline", strategies.make_settings("baseline"), "baseline", bucket, reason)


# ---------------------------------------------------------------------------------------------- naming

def policy_filename(device: str, world: int, dtype: str) -> str:
    """``device=<name, spaces as _>,world=<W>,dtype=<dtype>.yaml``."""
    dev = device.strip().replace(" ", "_").replace("/", "_")
    return f"device={dev},world={world},dtype={dtype}.yaml"


def _same_device(a: str, b: str) -> bool:
    return a.strip().replace(" ", "_").lower() == b.strip().replace(" ", "_").lower()


def device_name() -> str:
    """This machine's device name as policies spell it: the CUDA device's name, or ``cpu``."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------- export

def _read_env_json(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "env.json"
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
            settings = strategies.settings_dict(strategies.make_settings(r.strategy, r.settings))
            buckets[int(r.M)] = {"strategy": r.strategy, "settings": settings, "speedup": _float(r.speedup),
                                 "eta": _float(r.eta)}
        shapes[f"{int(k)},{int(n)}"] = {"name": "+".join(sorted(g["shape"].unique())),
                                        "threshold": analysis.threshold(g), "buckets": buckets}
    return shapes


def export_policy(run_dir: str | os.PathLike, out: str | os.PathLike, env: dict[str, str] | str | None = None,
                  dtype: str | None = None, world: int | None = None) -> list[Path]:
    """Write the run's best settings as policy YAML, one file per (dtype, world size); returns the paths.

    ``out`` ending in ``.yaml``/``.yml`` is the file itself (then the run, filtered by ``dtype``/``world``,
    must hold one of each); otherwise it is a folder and files are named by :func:`policy_filename`.
    With several env variants and ``env`` None, the variant with the best geometric-mean speedup is used
    and stored as ``meta.required_env``: it must be set on the serving process before CUDA starts.
    """
    run_dir, out = Path(run_dir), Path(out)
    loaded = load_records(run_dir)
    if loaded.torn_lines:
        log.warning("%s: skipped torn lines %s", run_dir, loaded.torn_lines)
    df = analysis.frame(loaded.records)
    if df.empty:
        raise ValueError(f"{run_dir}: no records to export")
    if dtype is not None:
        df = df[df["dtype"] == dtype]
    if world is not None:
        df = df[df["world"] == world]
    if env is not None:
        if analysis.env_key(env) not in set(df["env_key"]):
            raise ValueError(f"env variant {analysis.env_key(env)!r} not in {run_dir} "
                             f"(has: {', '.join(sorted(set(df['env_key'])))})")
        df = df[df["env_key"] == analysis.env_key(env)]
    if df.empty:
        raise ValueError(f"{run_dir}: no records for dtype={dtype}, world={world}")
    groups = sorted(df.groupby(["dtype", "world"]).groups)
    single = out.suffix in (".yaml", ".yml")
    if single and len(groups) > 1:
        dtypes = sorted({d for d, _ in groups})
        field_, vals = ("dtype", dtypes) if len(dtypes) > 1 else ("world", sorted({w for _, w in groups}))
        raise ValueError(f"{run_dir} holds several {field_} values ({', '.join(map(str, vals))}) but {out} is "
                         f"one file: pass {field_}= or a folder as out")
    env_info = _read_env_json(run_dir)
    paths = []
    for dt, w in groups:
        sub = df[(df["dtype"] == dt) & (df["world"] == w)]
        backends = sorted(sub["backend"].unique())
        if len(backends) > 1:
            raise ValueError(f"{run_dir}: dtype={dt}, world={w} measured on several backends {backends}")
        best = analysis.best_settings(sub)
        chosen = _pick_env(best)
        best = best[best["env_key"] == chosen]
        devices = sorted(set(sub["device"].dropna()) - {""})
        device = devices[0] if devices else str(env_info.get("gpu_name") or "cpu")
        meta = {"device": device, "world_size": int(w), "dtype": dt, "backend": backends[0],
                "required_env": dict(best["env"].iloc[0])}
        meta.update({k: env_info.get(k) for k in ("torch", "nccl", "cuda")})
        if "git_commit" in env_info:
            meta["git_commit"] = env_info["git_commit"]
        meta.update(created=datetime.date.today().isoformat(), source_run=str(run_dir),
                    overlap_bench_version=overlap_bench.__version__)
        doc = {"meta": meta, "shapes": _shapes_doc(best)}
        path = out if single else out / policy_filename(device, int(w), dt)
        write_atomic(path, yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- load

def _int(v: Any, where: str, path: Path) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise PolicyError(f"{path}: {where} must be an integer, got {v!r}")
    try:
        return int(v)
    except ValueError:
        raise PolicyError(f"{path}: {where} must be an integer, got {v!r}") from None


def _mapping(v: Any, where: str, path: Path) -> dict:
    if not isinstance(v, dict):
        raise PolicyError(f"{path}: {where} must be a mapping, got {type(v).__name__}")
    return v


def _opt_float(v: Any, where: str, path: Path) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PolicyError(f"{path}: {where} must be a number, got {v!r}")
    return float(v)


def _entry(v: Any, where: str, path: Path) -> Entry:
    v = _mapping(v, where, path)
    if "strategy" not in v:
        raise PolicyError(f"{path}: {where}.strategy is missing")
    name = v["strategy"]
    if not isinstance(name, str):
        raise PolicyError(f"{path}: {where}.strategy must be a name, got {name!r}")
    values = _mapping(v.get("settings") or {}, f"{where}.settings", path)
    try:
        settings = strategies.make_settings(name, values)
    except ValueError as e:
        field_ = "strategy" if name not in strategies.REGISTRY else "settings"
        raise PolicyError(f"{path}: {where}.{field_}: {e}") from None
    return Entry(name, settings, strategies.label(name, settings), _opt_float(v.get("speedup"), f"{where}.speedup",
                 path), _opt_float(v.get("eta"), f"{where}.eta", path))


def load_policy(path: str | os.PathLike, expect_world: int | None = None, expect_device: str | None = None,
                fallback: bool = False) -> Policy:
    """Load and validate a policy file; every problem raises :class:`PolicyError` naming file and field.

    A ``meta.world_size`` or ``meta.device`` unlike ``expect_world``/``expect_device`` is an error too.
    With ``fallback=True`` every such problem (a malformed file included) is instead a logged warning and
    a baseline-only policy: the caller asked to run, untuned, rather than stop.
    """
    try:
        return _load_policy(Path(path), expect_world, expect_device)
    except PolicyError as e:
        if not fallback:
            raise
        log.warning("%s: using baseline for every shape", e)
        return Policy(path=Path(path))


def _load_policy(path: Path, expect_world: int | None, expect_device: str | None) -> Policy:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"{path}: cannot read: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)  # one line: str(e) spans several, with a source excerpt
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PolicyError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', None) or type(e).__name__}") from None
    doc = _mapping(doc, "the top level", path)
    for key in ("meta", "shapes"):
        if key not in doc:
            raise PolicyError(f"{path}: '{key}' is missing")
    meta = _mapping(doc["meta"], "meta", path)
    for key in ("device", "world_size", "dtype"):
        if key not in meta:
            raise PolicyError(f"{path}: meta.{key} is missing")
    world = _int(meta["world_size"], "meta.world_size", path)
    mismatch = None
    if expect_world is not None and world != expect_world:
        mismatch = f"meta.world_size is {world}, expected {expect_world}"
    elif expect_device is not None and not _same_device(str(meta["device"]), expect_device):
        mismatch = f"meta.device is {meta['device']!r}, expected {expect_device!r}"
    if mismatch:
        raise PolicyError(f"{path}: {mismatch}")
    shapes: dict[tuple[int, int], ShapePolicy] = {}
    for key, sv in _mapping(doc["shapes"] or {}, "shapes", path).items():
        where = f"shapes[{key!r}]"
        parts = str(key).split(",")
        if len(parts) != 2:
            raise PolicyError(f"{path}: {where}: key must be 'K,N'")
        k, n = (_int(p.strip(), f"{where} key", path) for p in parts)
        sv = _mapping(sv, where, path)
        if "buckets" not in sv:
            raise PolicyError(f"{path}: {where}.buckets is missing")
        thr = sv.get("threshold")
        thr = None if thr is None else _int(thr, f"{where}.threshold", path)
        buckets = []
        for m, bv in _mapping(sv["buckets"], f"{where}.buckets", path).items():
            m_int = _int(m, f"{where}.buckets key {m!r}", path)
            if m_int < 1 or m_int in (b[0] for b in buckets):
                raise PolicyError(f"{path}: {where}.buckets key {m!r} must be a distinct M >= 1")
            buckets.append((m_int, _entry(bv, f"{where}.buckets[{m_int}]", path)))
        if not buckets:
            raise PolicyError(f"{path}: {where}.buckets is empty")
        shapes[(k, n)] = ShapePolicy(str(sv.get("name", key)), thr, buckets)
    return Policy(meta=dict(meta), shapes=shapes, path=path)


# ---------------------------------------------------------------------------------------------- lookup

def find_policy(device: str, world: int, dtype: str) -> Path | None:
    """The policy file for this device, world size and dtype: first in ``$OVERLAP_BENCH_POLICY_DIR``, then
    in the package's ``configs/``; None when neither has it."""
    name = policy_filename(device, world, dtype)
    folders = [Path(os.environ[ENV_DIR])] if os.environ.get(ENV_DIR) else []
    for folder in folders + [PACKAGE_DIR]:
        if (folder / name).is_file():
            return folder / name
    return None


def load_policy_for(device: str, world: int, dtype: str) -> Policy:
    """The policy found by :func:`find_policy`, or a baseline-only one (with a warning) when there is none."""
    path = find_policy(device, world, dtype)
    if path is None:
        where = ", ".join(filter(None, [os.environ.get(ENV_DIR), str(PACKAGE_DIR)]))
        log.warning("no policy %s in %s: using baseline for every shape", policy_filename(device, world, dtype),
                    where)
        return Policy.baseline_only()
    return load_policy(path, expect_world=world, expect_device=device, fallback=True)
