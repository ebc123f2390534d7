"""The results schema: one :class:`Record` type for every kind of result (a sweep's case, a compare sample, a
model-benchmark row, an interference condition), one JSON line each, appended by ``runfolder.RunFolder``; a torn
last line is skipped on load and reported."""

from __future__ import annotations

import functools
import json
import math
import os
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Iterable

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

from overlap_bench import check
from overlap_bench.errors import UserError
from overlap_bench.keys import BucketKey, case_key

RECORDS = "records.jsonl"
"""A run folder's log of measured cases, any kind (``RunFolder.append``)."""
CONFIRM = "confirm.jsonl"
"""The confirmation stage's log (``kind`` confirm): one record per timed region and side."""
SCREEN = "screen.jsonl"
"""The screen's log (``kind`` screen), laid out as ``confirm.jsonl``."""


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
        try:
            return cls(**dict(_line_model().model_validate(d)))
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            if not err["loc"]:
                raise MalformedRecord("is not a JSON object") from None
            raise MalformedRecord(f"field '{check.dotted(err['loc'])}' {check.problem(err)}") from None


class MalformedRecord(ValueError):
    """A records.jsonl line that is JSON but not a record (a field missing or of the wrong type)."""


JsonInt = Annotated[int, Field(gt=-2 ** 53, lt=2 ** 53)]
"""An integer that JSON readers and pandas hold exactly."""
NanFloat = Annotated[float, BeforeValidator(lambda v: math.nan if v is None else v)]
"""A time or metric: null (how :meth:`Record.to_json` writes NaN) reads back as NaN."""


@functools.cache
def _line_model() -> type[BaseModel]:
    """:class:`Record`'s fields as a strict pydantic model (ints exact in JSON, null floats NaN)."""
    hints = typing.get_type_hints(Record)
    kinds = {int: JsonInt, float: NanFloat}
    default = {f.name: ... if f.default is MISSING else f.default for f in fields(Record)}
    default.update({f.name: Field(default_factory=f.default_factory) for f in fields(Record)
                    if f.default_factory is not MISSING})
    return create_model("RecordLine", __config__=ConfigDict(strict=True, extra="ignore"),
                        **{f.name: (kinds.get(hints[f.name], hints[f.name]), default[f.name]) for f in fields(Record)})


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
    first: str | None = None
    """The side run first in this repeat (``a`` or ``b``; order alternates); None in older records."""

    @classmethod
    def of(cls, extra: dict[str, Any]) -> "ABTag":
        return cls(extra["side"], tuple(extra["pair"]), int(extra["repeats"]), extra.get("repeat"),
                   extra.get("first_pass_speedup"), extra.get("first"))


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
