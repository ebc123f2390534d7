"""The results schema: one :class:`Record` type for every kind of result (a sweep's case, a compare sample, a
model-benchmark row, an interference condition), one JSON line each in a run folder's logs."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import stat
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Annotated, Any, NamedTuple

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

from overlap_bench import check
from overlap_bench.errors import UserError
from overlap_bench.keys import BucketKey, case_key

log = logging.getLogger("overlap_bench.records")

RECORDS = "records.jsonl"  # a run folder's log of measured cases, any kind
CONFIRM = "confirm.jsonl"  # the confirmation's log (kind confirm): one record per timed region and side
SCREEN = "screen.jsonl"  # the screen's log (kind screen), laid out as confirm.jsonl
MAX_FILE_BYTES = 1 << 30  # the largest record file read: a bigger one is not a run's log


@dataclass
class Record:
    """One measured (or failed) case of any kind (:attr:`kind`). Times are ms; a case's time is the max over
    ranks of each rank's median."""

    shape: str  # e.g. qwen2.5-72b/o_proj, or a spec's own name
    K: int  # inner dimension per rank (K_total / tp); 0 in a model record (its shapes are in extra)
    N: int  # output features (the all-reduced width); a model record's hidden size
    M: int  # token rows
    dtype: str
    world: int  # ranks in the job (the tensor-parallel size)
    backend: str
    device: str  # GPU name, or cpu
    strategy: str
    settings: dict[str, Any]
    label: str  # canonical strategy:key=value,... text, usable on the command line
    env: dict[str, str]  # the process environment variant the job was started with
    kind: str = "sweep"  # sweep, model, interference, or compare/screen/confirm (an A/B side; extra: ABTag)
    bias: bool = False
    status: str = "ok"  # ok, failed (numerics or an error), unavailable (cannot run here) or skipped
    reason: str | None = None
    note: str | None = None
    rel_err: float = math.nan  # of the output against the baseline's on the same inputs
    tol: float = math.nan  # what rel_err was held to (metrics.TOLERANCE)
    t_ms: float = math.nan  # the strategy's time (NaN: not measured)
    t_iqr_ms: float = math.nan  # its spread: the interquartile range over the timed calls
    warmup: int = 0  # untimed calls before each timed region
    reps: int = 0  # timed calls per region
    t_base_ms: float = math.nan  # the baseline measured beside it
    t_base_iqr_ms: float = math.nan
    t_gemm_ms: float = math.nan  # the local GEMM alone
    t_comm_ms: float = math.nan  # the all-reduce alone
    # Derived from the times above by metrics.derive, where each is defined.
    ideal_ms: float = math.nan
    speedup: float = math.nan  # against this record's own t_base; tables restate it against the bucket's reference
    eta: float = math.nan
    tokens_per_s: float = math.nan
    tflops: float = math.nan
    busbw_gbps: float = math.nan
    repro: str = ""  # a command that measures this case again
    time: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the case measured and passed its numerics check."""
        return self.status == "ok"

    def key(self) -> tuple:
        """Identity of the case for ``--resume``."""
        return case_key(self)

    @property
    def bucket(self) -> BucketKey:
        return BucketKey.of(self)

    @property
    def ab(self) -> "ABTag":
        """This A/B record's side of its measurement."""
        return ABTag.of(self.extra)

    @property
    def base_refs(self) -> list[tuple[float, float]]:
        """A sweep record's baseline ``(t, iqr)`` measured before and around its group."""
        return [(math.nan if t is None else t, math.nan if i is None else i)
                for t, i in self.extra.get("t_base_refs", [])]

    def to_json(self) -> str:
        """One strict-JSON line (NaN becomes null, so jq and JavaScript read it)."""
        d = json_safe(asdict(self))
        d["ok"] = self.ok
        return json.dumps(d, sort_keys=False, allow_nan=False)

    @classmethod
    def from_json(cls, d: Any) -> "Record":
        """A record from a parsed line, every field checked: :class:`RecordsError` names a bad one."""
        try:
            return cls(**dict(_line_model().model_validate(d)))
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            raise RecordsError(f"field '{check.dotted(err['loc'])}' {check.problem(err)}" if err["loc"] else
                               "is not a JSON object") from None


JsonInt = Annotated[int, Field(gt=-2 ** 53, lt=2 ** 53)]  # held exactly by JSON readers and pandas
NanFloat = Annotated[float, BeforeValidator(lambda v: math.nan if v is None else v)]  # null (NaN written) reads NaN


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
    """``x`` with NaN/inf as None and numpy scalars/arrays as Python values, for strict JSON output."""
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
    """``extra`` of an A/B record (``bench.run_ab``), read typed."""

    side: str  # a (a confirmation's baseline) or b
    pair: tuple[str, str]  # both sides' labels
    repeats: int
    repeat: int | None = None  # None: the side failed its check and nothing of the case was timed
    first_pass_speedup: float | None = None  # confirmation only: the candidate's first-pass speedup
    first: str | None = None  # the side run first in this repeat (order alternates); None in older records
    run: str | None = None  # a screen's or confirmation's run (run.json's run_id); None in older records

    @classmethod
    def of(cls, extra: dict[str, Any]) -> "ABTag":
        return cls(extra["side"], tuple(extra["pair"]), int(extra["repeats"]), extra.get("repeat"),
                   extra.get("first_pass_speedup"), extra.get("first"), extra.get("run"))


class Loaded(NamedTuple):
    """What :func:`load_records` found: the records, and the 1-based numbers of lines skipped (not JSON)."""

    records: list[Record]
    torn_lines: list[int]


class RecordsError(UserError):
    """A record file that cannot be used as it is (not a regular file, too large, a line not a record)."""


def open_regular(path: Path) -> IO[str] | None:
    """``path`` opened for reading (None: it does not exist); a FIFO, a device or a file over
    :data:`MAX_FILE_BYTES` is refused before any byte is read, so none can block or feed a command without end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
        os.close(fd)
        what = "is not a regular file" if not stat.S_ISREG(st.st_mode) else \
            f"holds {st.st_size} bytes, over the {MAX_FILE_BYTES} a record file may hold"
        raise RecordsError(f"{path} {what}; put the run's own file there or choose another folder")
    return open(fd, encoding="utf-8", errors="replace")


_reported: set[tuple[str, int]] = set()


def report_skipped_afresh() -> None:
    """Forget which files' skipped lines were reported (each command reports them once)."""
    _reported.clear()


def load_records(run_dir: str | os.PathLike, name: str = RECORDS) -> Loaded:
    """Read ``run_dir/name``: lines not JSON (a write cut short) are skipped and warned of once; a line that is
    JSON but not a record raises :class:`RecordsError`."""
    path = Path(run_dir) / name
    out = Loaded([], [])
    fh = open_regular(path)
    if fh is None:
        return out
    with fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.records.append(Record.from_json(json.loads(line)))
            except (json.JSONDecodeError, RecursionError):
                out.torn_lines.append(i)
            except RecordsError as exc:
                raise RecordsError(f"{path} line {i}: {exc}; fix or delete that line") from None
    if out.torn_lines and (str(path), len(out.torn_lines)) not in _reported:
        _reported.add((str(path), len(out.torn_lines)))
        shown = ", ".join(map(str, out.torn_lines[:10])) + (", ..." if len(out.torn_lines) > 10 else "")
        log.warning("%s: %d line(s) skipped, not JSON (a write cut short or garbage): line %s", path,
                    len(out.torn_lines), shown)
    return out

