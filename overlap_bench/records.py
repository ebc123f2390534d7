"""The results schema: one :class:`Record` type for every kind of result (a sweep's case, a compare sample, a
model-benchmark row, an interference condition), one JSON line each, appended by ``runfolder.RunFolder``; a torn
last line is skipped on load and reported."""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from overlap_bench.errors import UserError
from overlap_bench.keys import BucketKey, case_key

RECORDS = "records.jsonl"
"""A run folder's log of measured cases, any kind (``RunFolder.append``)."""
CONFIRM = "confirm.jsonl"
"""The confirmation stage's log (``kind`` confirm): one record per timed region and side."""


@dataclass
class Record:
    """One measured (or failed) case of any kind (:attr:`kind`). Times are ms; a case's time is the max over
    ranks of each rank's median."""

    shape: str
    """Shape name, e.g. ``qwen2.5-72b/o_proj`` or an explicit spec name."""
    K: int
    """Inner dimension per rank (``K_total / tp``); 0 in a ``model`` record (a whole decoder stack has no one
    product: its row-parallel layers' ``(K, N)`` are in ``extra.shapes``)."""
    N: int
    """Output features (the all-reduced width); in a ``model`` record the hidden size."""
    M: int
    """Token rows."""
    dtype: str
    world: int
    """Ranks in the job (the tensor-parallel size)."""
    backend: str
    device: str
    """GPU name, or ``cpu``."""
    strategy: str
    settings: dict[str, Any]
    label: str
    """Canonical ``strategy:key=value,...`` text, usable on the command line."""
    env: dict[str, str]
    """The process environment variant the job was started with."""
    kind: str = "sweep"
    """What produced it: ``sweep`` (a case of a sweep or ``run``; ``extra``: :attr:`base_refs`, ``t_joint_ms``
    and what the strategy reported), ``compare`` or ``confirm`` (one timed region of one side of an A/B
    measurement; ``extra``: :class:`ABTag`), ``model`` (one mode of the model benchmark at M; ``extra``: ``tp``,
    ``layers``, ``shapes``, ``t_nocomm_ms``, ``comm_share``, ``choices``) or ``interference`` (one condition
    beside the GEMM)."""
    bias: bool = False
    status: str = "ok"
    """``ok``; ``failed`` (numerics out of tolerance or an error in the case); ``unavailable`` (cannot run here);
    ``skipped`` (a model mode without its input, e.g. ``policy`` without ``--policy``)."""
    reason: str | None = None
    note: str | None = None
    rel_err: float = math.nan
    """Relative error of the output against the baseline's on the same inputs."""
    tol: float = math.nan
    """The tolerance ``rel_err`` was held to (``numerics.TOLERANCE``)."""
    t_ms: float = math.nan
    """The strategy's time (NaN when it did not measure)."""
    t_iqr_ms: float = math.nan
    """Its spread: the interquartile range over the timed calls."""
    warmup: int = 0
    """Untimed calls before each timed region."""
    reps: int = 0
    """Timed calls per region."""
    t_base_ms: float = math.nan
    """The baseline measured beside it (its spread: ``t_base_iqr_ms``)."""
    t_base_iqr_ms: float = math.nan
    t_gemm_ms: float = math.nan
    """The local GEMM alone."""
    t_comm_ms: float = math.nan
    """The all-reduce alone."""
    # Derived from the times above by metrics.derive, where each is defined.
    ideal_ms: float = math.nan
    speedup: float = math.nan
    """As measured, against this record's own ``t_base``; tables restate it against the bucket's reference
    (``select.score``)."""
    eta: float = math.nan
    tokens_per_s: float = math.nan
    tflops: float = math.nan
    busbw_gbps: float = math.nan
    repro: str = ""
    """A command that measures this case again."""
    time: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the case measured and passed its numerics check."""
        return self.status == "ok"

    def key(self) -> tuple:
        """Identity of the case for ``--resume`` (:func:`keys.case_key`)."""
        return case_key(self)

    @property
    def bucket(self) -> BucketKey:
        return BucketKey.of(self)

    @property
    def ab(self) -> "ABTag":
        """This ``compare``/``confirm`` record's side of its A/B measurement."""
        return ABTag.of(self.extra)

    @property
    def base_refs(self) -> list[tuple[float, float]]:
        """A sweep record's baseline ``(t, iqr)`` measured before its group and bracketing it (the last record
        of a group holds them all)."""
        return [(math.nan if t is None else t, math.nan if i is None else i)
                for t, i in self.extra.get("t_base_refs", [])]

    def to_json(self) -> str:
        """One strict-JSON line (NaN becomes null, so jq and JavaScript read it)."""
        d = json_safe(asdict(self))
        d["ok"] = self.ok
        return json.dumps(d, sort_keys=False, allow_nan=False)

    @classmethod
    def from_json(cls, d: Any) -> "Record":
        """A record read from a ``records.jsonl`` line, every field checked against its type: a missing field
        or a value of the wrong type raises :class:`MalformedRecord` naming the field."""
        if not isinstance(d, dict):
            raise MalformedRecord("is not a JSON object")
        out = {}
        for f in fields(cls):
            if f.name not in d:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise MalformedRecord(f"field '{f.name}' is missing")
                continue
            out[f.name] = _typed(f.name, str(f.type), d[f.name])
        return cls(**out)


class MalformedRecord(ValueError):
    """A records.jsonl line that is JSON but not a record (a field missing or of the wrong type)."""


def _typed(name: str, kind: str, v: Any) -> Any:
    """``v`` checked against a Record field's annotation (a string under ``from __future__ import annotations``)."""
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == "float":
        if v is None:
            return math.nan
        if number:
            return float(v)
    elif kind == "int":
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2 ** 53:  # what JSON and pandas hold
            return v
    elif kind == "bool":
        if isinstance(v, bool):
            return v
    elif kind == "str":
        if isinstance(v, str):
            return v
    elif kind == "str | None":
        if v is None or isinstance(v, str):
            return v
    elif kind == "dict[str, str]":
        if isinstance(v, dict) and all(isinstance(x, str) for x in v.values()):
            return v
    elif kind.startswith("dict"):
        if isinstance(v, dict):
            return v
    else:
        return v
    want = {"float": "a number or null", "int": "an integer", "bool": "true or false", "str": "text",
            "str | None": "text or null", "dict[str, str]": "an object of text values"}.get(kind, "an object")
    raise MalformedRecord(f"field '{name}' must be {want}, got {json.dumps(v)[:40]}")


def json_safe(x: Any) -> Any:
    """``x`` with NaN/inf as None and numpy scalars/arrays as Python values, for strict JSON output
    (records, compare tables, model rows: jq and JavaScript reject bare NaN)."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) or type(x).__name__ == "ndarray":
        return [json_safe(v) for v in x]
    if hasattr(x, "item") and type(x).__module__ == "numpy":
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


@dataclass(frozen=True)
class ABTag:
    """``extra`` of a ``compare`` or ``confirm`` record (``bench.run_ab``), read typed."""

    side: str
    """``a`` (a confirmation's baseline) or ``b``."""
    pair: tuple[str, str]
    """Both sides' labels."""
    repeats: int
    repeat: int | None = None
    """None: the side failed its check and nothing of the case was timed."""
    first_pass_speedup: float | None = None
    """Confirmation only: the candidate's first-pass speedup."""

    @classmethod
    def of(cls, extra: dict[str, Any]) -> "ABTag":
        return cls(extra["side"], tuple(extra["pair"]), int(extra["repeats"]), extra.get("repeat"),
                   extra.get("first_pass_speedup"))


@dataclass
class Loaded:
    """What :func:`load_records` found."""

    records: list[Record]
    torn_lines: list[int]
    """1-based numbers of lines that were not valid JSON (a write cut short), skipped."""


class RecordsError(UserError):
    """records.jsonl holds a line that is JSON but not a record: named with its line, never guessed around."""


def load_records(run_dir: str | os.PathLike, name: str = RECORDS) -> Loaded:
    """Read ``run_dir/name`` (default ``records.jsonl``); torn lines (not JSON: a write cut short) are skipped
    and listed. A line that is JSON but not a record (edited by hand, another tool) raises
    :class:`RecordsError`."""
    path = Path(run_dir) / name
    out = Loaded([], [])
    if not path.exists():
        return out
    with open(path, encoding="utf-8", errors="replace") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                out.torn_lines.append(i)
                continue
            try:
                out.records.append(Record.from_json(doc))
            except MalformedRecord as exc:
                raise RecordsError(f"{path} line {i}: {exc}; fix or delete that line") from None
    return out


def records_frame(records: Iterable[Record]):
    """Records as a pandas DataFrame (settings and env kept as dicts; ``ok`` as a column)."""
    import pandas as pd

    rows = []
    for r in records:
        d = asdict(r)
        d["ok"] = r.ok
        rows.append(d)
    return pd.DataFrame(rows)
