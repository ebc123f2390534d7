"""Field checks shared by the config dataclasses (sweep specs, policy files): each returns the value in its
type or raises :class:`FieldError` ``<field>: <problem>``; a loader that knows the file names it in front."""

from __future__ import annotations

from typing import Any

from overlap_bench.errors import UserError


class FieldError(UserError):
    """A config field with a bad value; the one-line message is ``field: problem; fix``."""


def integer(v: Any, where: str, lo: int | None = None, hi: int | None = None, *, text: bool = False) -> int:
    """``v`` as an int within ``[lo, hi]``; ``text=True`` also takes its decimal text (a YAML mapping key)."""
    if text and isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise FieldError(f"{where}: must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise FieldError(f"{where}: must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise FieldError(f"{where}: must be <= {hi}, got {v}")
    return v


def number(v: Any, where: str) -> float | None:
    """``v`` as a float; None stays None (an optional figure)."""
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise FieldError(f"{where}: must be a number, got {v!r}")
    return None if v is None else float(v)


def mapping(v: Any, where: str) -> dict:
    """``v`` itself when it is a mapping."""
    if not isinstance(v, dict):
        raise FieldError(f"{where}: must be a mapping, got {type(v).__name__}")
    return v


def listed(v: Any, where: str) -> list:
    """``v`` as a non-empty list (a single value becomes a list of one)."""
    if v == []:
        raise FieldError(f"{where}: is empty; give at least one value")
    return v if isinstance(v, list) else [v]


def known_keys(d: dict, allowed: set[str] | list[str], where: str, fix: str) -> None:
    """Refuse the first key of ``d`` not in ``allowed`` (keys need not be strings: ``1: x`` in YAML)."""
    unknown = set(d) - set(allowed)
    if unknown:
        raise FieldError(f"{where}{sorted(map(str, unknown))[0]}: unknown key; {fix}")


def required(d: dict, keys: list[str], where: str, fix: str = "") -> None:
    """Refuse the first of ``keys`` missing from ``d``."""
    for key in keys:
        if key not in d:
            raise FieldError(f"{where}{key}: missing" + (f"; {fix}" if fix else ""))
