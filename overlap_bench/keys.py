"""The one key of a comparison: a bucket is a shape at M tokens measured in one job configuration (dtype, bias,
world size, device, backend, process environment); its group is the same without M."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Iterable, Mapping


class Env(tuple):
    """A process-environment variant in its one canonical form: sorted ``(name, value)`` pairs (hashable)."""

    def __new__(cls, env: Mapping[str, str] | Iterable[tuple[str, str]] | None = ()) -> "Env":
        items = env.items() if isinstance(env, Mapping) else (env or ())
        return super().__new__(cls, sorted((str(k), str(v)) for k, v in items))

    @property
    def text(self) -> str:
        """``A=1,B=2``, or ``default`` for no variables."""
        return ",".join(f"{k}={v}" for k, v in self) or "default"


@functools.total_ordering
@dataclass(frozen=True)
class GroupKey:
    """One comparison: a shape measured in one job configuration on one kind of GPU."""

    shape: str
    K: int
    N: int
    dtype: str
    bias: bool
    world: int
    device: str
    backend: str
    env: Env

    @classmethod
    def of(cls, x: Any, **given: Any):
        """The key of a record, or of a spec case with ``world``, ``device`` and ``backend`` given."""
        v = {n: given[n] if n in given else getattr(x, n) for n in cls._names()}
        return cls(**{**v, "bias": bool(v["bias"]), "env": Env(v["env"])})

    def __lt__(self, other: "GroupKey") -> bool:
        """Every listing's order: the fields in turn, the env variant by its text."""
        return self._order() < other._order()

    def _order(self) -> tuple:
        return tuple(v.text if isinstance(v, Env) else v for v in map(self.__getattribute__, self._names()))

    @classmethod
    def _names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


@dataclass(frozen=True)
class BucketKey(GroupKey):
    """One bucket: a group at M tokens (what is decided, confirmed and shipped)."""

    M: int

    @property
    def group(self) -> GroupKey:
        return GroupKey(**{n: getattr(self, n) for n in GroupKey._names()})


def case_key(x: Any, **given: Any) -> tuple[BucketKey, str]:
    """Identity of a case for ``--resume``: its bucket without the device (unknown before it runs) and label."""
    return BucketKey.of(x, **{"device": "", **given}), x.label
