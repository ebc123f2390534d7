"""The policy at run time: one YAML per device, world size and dtype (vLLM tuned-config style), its loader
and the lookup ``Policy.choose(K, N, M) -> Choice``. No pandas here (the serving path imports this); the
files are written by :mod:`overlap_bench.export`.

File layout::

    meta: {device, world_size, dtype, backend, required_env, torch, nccl, cuda, git_commit, created,
           source_run, overlap_bench_version}
    shapes:
      "K,N": {name, threshold, buckets: {M: {strategy, settings, speedup, eta}}}

``K`` is the per-rank inner dimension. A bucket applies from its M up to the next bucket (floor lookup).
"""

from __future__ import annotations

import bisect
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from overlap_bench import check, strategies
from overlap_bench.check import FieldError
from overlap_bench.errors import UserError

log = logging.getLogger("overlap_bench.policy")

ENV_DIR = "OVERLAP_BENCH_POLICY_DIR"
"""Environment variable naming a folder searched before the package's own ``configs/``."""
PACKAGE_DIR = Path(__file__).parent / "configs"


class PolicyError(UserError):
    """A policy file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Entry:
    """One bucket of one shape."""

    strategy: str
    settings: Any
    """The strategy's settings object (from ``strategies.make_settings``)."""
    speedup: float | None = None
    eta: float | None = None

    @property
    def label(self) -> str:
        """Display text (``strategies.label``), derived from the typed settings."""
        return strategies.label(self.strategy, self.settings)


@dataclass(frozen=True)
class Choice:
    """What :meth:`Policy.choose` answers."""

    strategy: str
    settings: Any
    """The strategy's settings object (from ``strategies.make_settings``)."""
    bucket: int | None
    """The bucket's M, or None when no bucket applied (baseline)."""
    reason: str

    @property
    def label(self) -> str:
        """Display text (``strategies.label``), derived from the typed settings."""
        return strategies.label(self.strategy, self.settings)


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
        return Choice(e.strategy, e.settings, bucket, f"bucket M={bucket} of {shape.name}")


def _baseline(bucket: int | None, reason: str) -> Choice:
    return Choice("baseline", strategies.make_settings("baseline"), bucket, reason)


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


# ---------------------------------------------------------------------------------------------- load

def _entry(v: Any, where: str) -> Entry:
    v = check.mapping(v, where)
    check.required(v, ["strategy"], f"{where}.")
    name = v["strategy"]
    if not isinstance(name, str):
        raise FieldError(f"{where}.strategy: must be a name, got {name!r}")
    values = check.mapping(v.get("settings") or {}, f"{where}.settings")
    try:
        settings = strategies.make_settings(name, values)
    except (ValueError, TypeError) as e:  # TypeError: a value of a type no setting takes
        raise FieldError(f"{where}.{'strategy' if name not in strategies.REGISTRY else 'settings'}: {e}") from None
    return Entry(name, settings, check.number(v.get("speedup"), f"{where}.speedup"),
                 check.number(v.get("eta"), f"{where}.eta"))


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
    try:
        return _policy(check.mapping(doc, "the top level"), path, expect_world, expect_device)
    except FieldError as e:
        raise PolicyError(f"{path}: {e}") from None


def _policy(doc: dict, path: Path, expect_world: int | None, expect_device: str | None) -> Policy:
    for key in ("meta", "shapes"):
        if key not in doc:
            raise FieldError(f"'{key}' is missing; a policy file has meta and shapes, as `overlap-bench export` writes")
    meta = check.mapping(doc["meta"], "meta")
    check.required(meta, ["device", "world_size", "dtype"], "meta.")
    world = check.integer(meta["world_size"], "meta.world_size", text=True)
    if expect_world is not None and world != expect_world:
        raise FieldError(f"meta.world_size is {world}, expected {expect_world}")
    if expect_device is not None and not _same_device(str(meta["device"]), expect_device):
        raise FieldError(f"meta.device is {meta['device']!r}, expected {expect_device!r}")
    shapes: dict[tuple[int, int], ShapePolicy] = {}
    for key, sv in check.mapping(doc["shapes"] or {}, "shapes").items():
        where = f"shapes[{key!r}]"
        parts = str(key).split(",")
        if len(parts) != 2:
            raise FieldError(f"{where}: key must be 'K,N'")
        k, n = (check.integer(p.strip(), f"{where} key", text=True) for p in parts)
        sv = check.mapping(sv, where)
        check.required(sv, ["buckets"], f"{where}.")
        thr = None if sv.get("threshold") is None else check.integer(sv["threshold"], f"{where}.threshold", text=True)
        buckets: list[tuple[int, Entry]] = []
        for m, bv in check.mapping(sv["buckets"], f"{where}.buckets").items():
            m_int = check.integer(m, f"{where}.buckets key {m!r}", text=True)
            if m_int < 1 or m_int in (b[0] for b in buckets):
                raise FieldError(f"{where}.buckets key {m!r}: must be a distinct M >= 1")
            buckets.append((m_int, _entry(bv, f"{where}.buckets[{m_int}]")))
        if not buckets:
            raise FieldError(f"{where}.buckets: is empty")
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
