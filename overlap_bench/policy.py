"""The policy at run time: one YAML per device, world size and dtype (written by :mod:`overlap_bench.export`),
its loader and ``Policy.choose(K, N, M) -> Choice``. The serving path imports this."""

from __future__ import annotations

import bisect
import logging
import operator
import os
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator

from overlap_bench import check, strategies
from overlap_bench.check import Config, Dtype, FieldError
from overlap_bench.errors import UserError, describe_os_error
from overlap_bench.metrics import REFERENCE

log = logging.getLogger("overlap_bench.policy")

ENV_DIR = "OVERLAP_BENCH_POLICY_DIR"  # a folder searched before the package's own ``configs/``
PACKAGE_DIR = Path(__file__).parent / "configs"


class PolicyError(UserError):
    """A policy file that cannot be used; the message names the file and the field."""


class Entry(Config):
    """One bucket of one shape."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    strategy: Annotated[str, AfterValidator(lambda name: strategies.get(name).name)]
    """A registered strategy's name."""
    settings: Any = Field(None, validate_default=True)
    """The strategy's settings object; in YAML a mapping of its fields."""
    speedup: float | None = Field(None, allow_inf_nan=True)
    """Measured speedup over the baseline (information only)."""
    eta: float | None = Field(None, allow_inf_nan=True)
    """Measured overlap efficiency (information only)."""

    @field_validator("settings", mode="before")
    @classmethod
    def _typed(cls, values: Any, info: ValidationInfo) -> Any:
        if "strategy" not in info.data:
            return values
        if values is not None and not isinstance(values, dict):
            raise ValueError(f"must be a mapping of the strategy's settings, got {values!r}")
        return strategies.make_settings(info.data["strategy"], values)


@cache
def _baseline_settings() -> Any:
    """The baseline's default settings, validated once (frozen): the layers ask for them on every forward."""
    return strategies.make_settings(REFERENCE)


@dataclass(frozen=True)
class Choice:
    """What :meth:`Policy.choose` answers."""

    strategy: str
    settings: Any
    bucket: int | None  # the bucket's M, or None when none applied (baseline)
    reason: str

    @property
    def label(self) -> str:
        """Display text (``strategies.label``)."""
        return strategies.label(self.strategy, self.settings)

    @classmethod
    def baseline(cls, reason: str, bucket: int | None = None) -> "Choice":
        """The ring baseline (the reference), run for ``reason``."""
        return cls(REFERENCE, _baseline_settings(), bucket, reason)


class ShapePolicy(Config):
    """The buckets of one ``(K, N)``: each applies from its M up to the next one."""

    model_config = ConfigDict(extra="ignore")
    name: str | None = None
    """The shapes' names (``+``-joined when several share K, N)."""
    threshold: int | None = Field(None, ge=0)
    """Token count from which every bucket overlaps (information only: the buckets say what runs)."""
    buckets: Annotated[dict[Annotated[int, Field(ge=1)], Entry], Field(min_length=1),
                       AfterValidator(lambda b: dict(sorted(b.items())))]
    """``M: entry``, sorted by M on load."""

    @cached_property
    def ms(self) -> list[int]:
        return list(self.buckets)


def _shape_key(key: Any) -> tuple[int, int]:
    parts = key.split(",") if isinstance(key, str) else []
    if len(parts) != 2 or not all(p.strip().isdecimal() and int(p) > 0 for p in parts):
        raise ValueError("must be 'K,N': K per rank and N, both integers >= 1 (e.g. '2048,8192')")
    return int(parts[0]), int(parts[1])


def _distinct_shapes(shapes: Any) -> Any:
    seen: dict[tuple[int, int], Any] = {}
    for key in shapes if isinstance(shapes, dict) else ():
        try:
            kn = _shape_key(key)
        except ValueError:
            continue
        if kn in seen:
            check.fail((key,), f"the same shape as {seen[kn]!r}; keep one")
        seen[kn] = key
    return shapes


class Meta(Config):
    """What a policy file was measured on (more provenance may follow)."""

    model_config = ConfigDict(extra="allow")
    device: str
    """GPU name (``torch.cuda.get_device_name``) or ``cpu``; compared ignoring case and spaces."""
    world_size: int = Field(ge=1)
    """Ranks (tensor-parallel size) it was tuned at."""
    dtype: Dtype
    """Element type it was tuned for."""


class PolicyFile(Config):
    """A policy file as written by ``overlap-bench export``."""

    meta: Meta
    shapes: Annotated[dict[Annotated[tuple[int, int], BeforeValidator(_shape_key)], ShapePolicy],
                      BeforeValidator(_distinct_shapes)]
    """``"K,N": shape policy``; a shape given twice (``2048,8192`` and ``2048, 8192``) is refused."""


@dataclass
class Policy:
    """A loaded policy; an empty one (``Policy()``) answers baseline for everything."""

    meta: dict[str, Any] = field(default_factory=dict)
    shapes: dict[tuple[int, int], ShapePolicy] = field(default_factory=dict)
    path: Path | None = None
    _warned: set = field(default_factory=set, repr=False)

    def choose(self, *, K: int, N: int, M: int) -> Choice:
        """The strategy for an ``[M, K] x [K, N]`` layer: the largest bucket <= M, else baseline; a K, N or M that
        is not an integer is a :class:`PolicyError`."""
        for name, v, lo in (("K", K, 1), ("N", N, 1), ("M", M, 0)):
            try:
                ok = not isinstance(v, bool) and operator.index(v) >= lo
            except TypeError:  # a float, None, text
                ok = False
            if not ok:
                raise PolicyError(f"choose: {name} must be an integer >= {lo}, got {v!r}; pass the layer's per-rank "
                                  "input width (K), output width (N) and token rows (M)")
        shape = self.shapes.get((K, N))
        if shape is None:
            if (K, N) not in self._warned:
                self._warned.add((K, N))
                log.warning("no policy entry for K=%d, N=%d in %s: using baseline", K, N, self.path or "(empty policy)")
            return Choice.baseline(f"shape K={K}, N={N} not in policy")
        i = bisect.bisect_right(shape.ms, M) - 1
        if i < 0:
            return Choice.baseline(f"M={M} below the smallest bucket {shape.ms[0]}")
        bucket = shape.ms[i]
        e = shape.buckets[bucket]
        return Choice(e.strategy, e.settings, bucket, f"bucket M={bucket} of {shape.name}")


def policy_filename(device: str, world: int, dtype: str) -> str:
    """``device=<name, spaces as _>,world=<W>,dtype=<dtype>.yaml``."""
    dev = device.strip().replace(" ", "_").replace("/", "_")
    return f"device={dev},world={world},dtype={dtype}.yaml"


def _same_device(a: str, b: str) -> bool:
    return a.strip().replace(" ", "_").lower() == b.strip().replace(" ", "_").lower()


def load_policy(path: str | os.PathLike, expect_world: int | None = None, expect_device: str | None = None,
                fallback: bool = False) -> Policy:
    """Load and validate a policy file (its ``meta`` as ``expect_world``/``expect_device``): a problem raises
    :class:`PolicyError` naming file and field, or with ``fallback`` warns and gives a baseline-only policy."""
    path = Path(path)
    try:
        doc = check.validate(PolicyFile, check.read_yaml(path), "the top level")
        if expect_world is not None and doc.meta.world_size != expect_world:
            raise FieldError(f"meta.world_size is {doc.meta.world_size}, expected {expect_world}")
        if expect_device is not None and not _same_device(doc.meta.device, expect_device):
            raise FieldError(f"meta.device is {doc.meta.device!r}, expected {expect_device!r}")
    except FieldError as e:
        if not fallback:
            raise PolicyError(f"{path}: {e}") from None
        log.warning("%s: %s: using baseline for every shape", path, e)
        return Policy(path=path)
    return Policy(meta=doc.meta.model_dump(), shapes=doc.shapes, path=path)


def find_policy(device: str, world: int, dtype: str) -> Path | None:
    """The policy file for this device, world size and dtype in ``$OVERLAP_BENCH_POLICY_DIR``, else ``configs/``."""
    name = policy_filename(device, world, dtype)
    folders = [Path(os.environ[ENV_DIR])] if os.environ.get(ENV_DIR) else []
    for folder in folders + [PACKAGE_DIR]:
        try:
            if (folder / name).is_file():
                return folder / name
        except OSError as exc:  # a name too long, a folder not readable
            raise PolicyError(f"{ENV_DIR}: cannot look in {folder}: {describe_os_error(exc)}; set it to a readable "
                              "folder of policy files, or unset it") from None
    return None


def load_policy_for(device: str, world: int, dtype: str) -> Policy:
    """The policy :func:`find_policy` finds, else a baseline-only one (with a warning)."""
    path = find_policy(device, world, dtype)
    if path is None:
        where = ", ".join(filter(None, [os.environ.get(ENV_DIR), str(PACKAGE_DIR)]))
        log.warning("no policy %s in %s: using baseline for every shape", policy_filename(device, world, dtype),
                    where)
        return Policy()
    return load_policy(path, expect_world=world, expect_device=device, fallback=True)
