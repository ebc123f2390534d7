"""The strategy registry: one stable name per row-parallel linear + all-reduce, called as ``fn(x [M, K/tp],
weight [N, K/tp], bias [N] | None, group, settings) -> y [M, N]``; ``settings``: a frozen dataclass whose field
types bound its values (checked by :func:`make_settings`)."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from pydantic import BaseModel, ValidationError, create_model

from overlap_bench.check import Config, problem


class StrategyUnavailable(RuntimeError):
    """Raised when a strategy cannot run on this backend or machine; the record says why."""


@dataclass(frozen=True)
class NoSettings:
    """The settings of a strategy whose numbers are fixed."""


@dataclass(frozen=True)
class Strategy:
    """One registered implementation: ``fn`` under a stable ``name``, its ``settings_cls`` and a one-line ``doc``."""

    name: str
    fn: Callable[..., torch.Tensor]
    settings_cls: type
    doc: str
    check: Callable[[str, Any], str | None] | None = None  # (backend, settings) -> why it cannot run there
    note: Callable[[str, Any], str | None] | None = None  # (backend, settings) -> how the backend changes it
    split: Callable[[int, Any], Any] | None = None  # (M, settings) -> RowSplit, for schedules that wait later
    peer: bool = False  # a published scheme to beat, shown beside every best setting


REGISTRY: dict[str, Strategy] = {}


def register(name: str, settings_cls: type, doc: str, **fields: Any):
    """Decorator: register ``fn`` under ``name`` (``fields``: check, note, split, peer as in :class:`Strategy`)."""

    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in REGISTRY:
            raise ValueError(f"strategy {name!r} registered twice")
        REGISTRY[name] = Strategy(name, fn, settings_cls, doc, **fields)
        return fn

    return wrap


@functools.cache
def _schema(settings_cls: type) -> type[BaseModel]:
    """A pydantic model of a settings dataclass's fields, which checks their values (types, ranges, choices)."""
    hints = typing.get_type_hints(settings_cls, include_extras=True)
    fields = {f.name: (hints[f.name], f.default) for f in dataclasses.fields(settings_cls)}
    return create_model(settings_cls.__name__, __base__=Config, **fields)


def make_settings(name: str, values: dict[str, Any] | None = None, *, text: bool = False) -> Any:
    """``name``'s settings from a dict (``text=True``: values as text); a ``ValueError`` names a bad field."""
    strat = get(name)
    try:
        typed = _schema(strat.settings_cls).model_validate(dict(values or {}), strict=not text)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        key = err["loc"][0] if err["loc"] else "settings"
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(f.name for f in dataclasses.fields(strat.settings_cls)) or "none"
            raise ValueError(f"unknown setting '{key}' for strategy '{name}' (allowed: {allowed})") from None
        raise ValueError(f"setting '{key}' {problem(err)}") from None
    return strat.settings_cls(**dict(typed))


def names() -> list[str]:
    """The registered strategies' names, sorted."""
    _load_builtin()
    return sorted(REGISTRY)


def peers() -> list[str]:
    """Names of the registered :attr:`Strategy.peer` strategies, sorted."""
    _load_builtin()
    return sorted(n for n, s in REGISTRY.items() if s.peer)


def get(name: str) -> Strategy:
    """The registered strategy ``name``; a ``ValueError`` lists the known names otherwise."""
    _load_builtin()
    if name not in REGISTRY:
        raise ValueError(f"unknown strategy '{name}' (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


def parse(text: str) -> tuple[str, Any]:
    """Parse ``"chunked:chunks=4,comm=stream"`` into ``("chunked", ChunkedSettings(...))``."""
    name, _, rest = text.strip().partition(":")
    values: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise ValueError(f"setting '{item}' in '{text}' must be written key=value")
        values[key.strip()] = val.strip()
    return name, make_settings(name, values, text=True)


def settings_dict(settings: Any) -> dict[str, Any]:
    """Settings as a plain dict (for records and policy files)."""
    return dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else {}


def label(name: str, settings: Any) -> str:
    """Canonical text form, the inverse of :func:`parse`; defaults are left out unless marked ``show``."""
    items = settings_dict(settings)
    if items:
        shown = {f.name for f in dataclasses.fields(settings) if f.metadata.get("show")}
        defaults = {f.name: f.default for f in dataclasses.fields(settings)}
        items = {k: v for k, v in items.items() if k in shown or v != defaults[k]}
    if not items:
        return name
    return name + ":" + ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in items.items())


def unavailable_reason(name: str, settings: Any, backend: str) -> str | None:
    """Why ``name`` cannot run on ``backend`` (None when it can)."""
    strat = get(name)
    return strat.check(backend, settings) if strat.check else None


def backend_note(name: str, settings: Any, backend: str) -> str | None:
    """How ``backend`` changes the way ``name`` runs, if it does (e.g. no CUDA streams on gloo)."""
    strat = get(name)
    return strat.note(backend, settings) if strat.note else None


def run(name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        group: dist.ProcessGroup | None, settings: Any) -> torch.Tensor:
    """Call strategy ``name``."""
    return get(name).fn(x, weight, bias, group, settings)


@functools.cache
def _load_builtin() -> None:
    """Import every module of this package once: each registers its strategies (a new strategy is a new file)."""
    for mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{mod}")


_REPORT: dict[str, Any] = {}
_DIAGNOSE = [False]


@contextmanager
def diagnose() -> Iterator[None]:
    """Within it (a benchmark's checked call), strategies may find out how their call ran and :func:`report` it."""
    before, _DIAGNOSE[0] = _DIAGNOSE[0], True
    try:
        yield
    finally:
        _DIAGNOSE[0] = before


def diagnosing() -> bool:
    """Whether the current call runs inside :func:`diagnose`."""
    return _DIAGNOSE[0]


def report(**items: Any) -> None:
    """Let a strategy state how its call really ran (e.g. which NCCL kernel); kept in the case's record."""
    _REPORT.update(items)


def take_report() -> dict[str, Any]:
    """What strategies reported since the last call (then forgotten)."""
    out = dict(_REPORT)
    _REPORT.clear()
    return out
