"""What each rank does in a sweep: build inputs, check numerics against the baseline, time, record.

Cases sharing a shape, M and dtype share their inputs and their reference times (``t_gemm``, ``t_comm``,
``t_base``), measured in the same job as the strategies they are compared with. Only rank 0 writes.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, replace
from itertools import groupby
from typing import Any, Callable

import torch
import torch.distributed as dist

from overlap_bench import metrics, strategies
from overlap_bench.envinfo import utc_now
from overlap_bench.keys import BucketKey
from overlap_bench.launch import RankContext
from overlap_bench.numerics import TOLERANCE, rel_err, within_tolerance
from overlap_bench.records import RECORDS, Record
from overlap_bench.runfolder import RunFolder
from overlap_bench.spec import Case
from overlap_bench.strategies.pipeline import comm_stream, matmul_into
from overlap_bench.timing import REPS, WARMUP, Timing, allreduce_max, time_region

# Failures that stay inside one case: recorded, and the sweep goes on. They are raised before the first
# collective of the call (settings, allocation), so every rank reaches the agreement below.
CASE_ERRORS = (ValueError, strategies.StrategyUnavailable, torch.cuda.OutOfMemoryError)


@dataclass
class BenchOptions:
    """Per-job settings a rank needs besides its cases."""

    out_dir: str
    warmup: int = WARMUP
    reps: int = REPS
    seed: int = 0
    done_before: int = 0
    """Cases finished before this job (progress bar offset across env-variant jobs)."""
    total: int = 0
    """Cases in the whole sweep."""
    progress: bool = True
    """Rank 0 draws a progress bar."""


BRACKET_EVERY = 4
"""The reference ``t_base`` is measured again after every this many timed candidates and after the last."""


class CaseFailed(RuntimeError):
    """A rank's error inside a case, re-raised with the case named (the launcher shows it)."""


class _Cursor:
    """Where a rank is: the case in flight, named when it fails."""

    def __init__(self) -> None:
        self.where = "start"

    def at(self, where: str) -> None:
        self.where = where


def inputs(case: Case, ctx: RankContext, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random inputs of the case's dtype (never zeros), different on each rank as real partials are."""
    dt = metrics.DTYPES[case.dtype]
    gen = torch.Generator(device=ctx.device).manual_seed(seed * 1_000_003 + ctx.rank * 7919 + case.M)
    x = torch.randn(case.M, case.K, generator=gen, device=ctx.device, dtype=torch.float32).to(dt)
    # Scaled so that the reduced output has unit-order values in every dtype.
    w = (torch.randn(case.N, case.K, generator=gen, device=ctx.device, dtype=torch.float32)
         / math.sqrt(case.K * ctx.world)).to(dt)
    b = torch.randn(case.N, generator=gen, device=ctx.device, dtype=torch.float32).to(dt) if case.bias else None
    return x, w, b


def agree_failure(local: str | None, ctx: RankContext) -> str | None:
    """Whether any rank failed (all ranks learn it); the reason is this rank's, or a note about another's."""
    if ctx.world == 1:
        return local
    anyf = allreduce_max([1.0 if local else 0.0], None, ctx.device)[0] > 0
    if not anyf:
        return None
    return local or "failed on another rank"


def try_case(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(fn(), None)``, or ``(None, "Type: first line")`` when ``fn`` raises one of :data:`CASE_ERRORS` or
    fails to allocate memory (on CPU torch says so with a plain RuntimeError)."""
    try:
        return fn(), None
    except (*CASE_ERRORS, MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not isinstance(exc, CASE_ERRORS) and not _allocation_failed(exc):
            raise
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip().rstrip(":")


def _allocation_failed(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(w in text for w in ("can't allocate memory", "out of memory", "not enough memory"))


def repro(case: Case, world: int, backend: str, warmup: int, reps: int) -> str:
    """The command that measures ``case`` again."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in case.env)
    cmd = (f"overlap-bench run --shape {case.K},{case.N} --tokens {case.M} --dtype {case.dtype} "
           f"--strategy {shlex.quote(case.label)} --nproc {world} --backend {backend} "
           f"--warmup {warmup} --reps {reps}" + (" --bias" if case.bias else ""))
    return f"{env} {cmd}".strip()


def _record(case: Case, ctx: RankContext, opts: BenchOptions, device_name: str, **values: Any) -> Record:
    return Record(shape=case.shape, K=case.K, N=case.N, M=case.M, dtype=case.dtype, world=ctx.world,
                  backend=ctx.backend, device=device_name, strategy=case.strategy,
                  settings=strategies.settings_dict(case.settings), label=case.label, env=case.env_dict,
                  bias=case.bias, warmup=opts.warmup, reps=opts.reps, tol=TOLERANCE[case.dtype],
                  repro=repro(case, ctx.world, ctx.backend, opts.warmup, opts.reps),
                  time=utc_now(), **values)


def run_cases(ctx: RankContext, cases: list[Case], opts: BenchOptions) -> None:
    """Entry point of every rank of a sweep job (``launch`` calls it)."""
    cases = same_cases(cases, ctx)
    device_name = ctx.device_name
    progress = _Progress(opts) if ctx.rank == 0 and opts.progress else None
    cursor = _Cursor()

    def bucket(c: Case) -> BucketKey:  # cases of one bucket share their inputs and references
        return BucketKey.of(c, world=ctx.world, device=device_name, backend=ctx.backend)

    try:
        for _, group in groupby(sorted(cases, key=bucket), key=bucket):
            group = list(group)
            try:
                measure_group(ctx, group, opts, device_name, progress, cursor)
            except Exception as exc:  # name the case: "rank 2 failed: ... qwen/o_proj M=4096 ... chunked:..."
                raise CaseFailed(f"{group[0].shape} M={group[0].M} {group[0].dtype} {cursor.where}: "
                                 f"{type(exc).__name__}: {exc}") from exc
    finally:
        if progress:
            progress.close()


def measure_group(ctx: RankContext, group: list[Case], opts: BenchOptions, device_name: str,
                  progress: "_Progress | None", cursor: _Cursor | None = None) -> list[Record]:
    """Measure every case of one bucket: references first, then each strategy."""
    head = group[0]
    writer = RunFolder(opts.out_dir) if ctx.rank == 0 else None
    out: list[Record] = []
    cursor = cursor or _Cursor()
    cursor.at("(inputs and reference times)")

    def emit(rec: Record) -> None:
        out.append(rec)
        if writer:
            writer.append(rec)
        if progress:
            progress.advance(f"{rec.shape} M={rec.M} {rec.label}")

    made, err = try_case(lambda: inputs(head, ctx, opts.seed))
    err = agree_failure(err, ctx)
    if err:
        for case in group:
            emit(_record(case, ctx, opts, device_name, status="failed", reason=f"inputs: {err}"))
        return out
    x, w, b = made
    base_settings = strategies.make_settings("baseline")
    y_base = strategies.run("baseline", x, w, b, None, base_settings)
    scratch = torch.empty_like(y_base)
    comm_buf = torch.randn_like(y_base.float()).to(y_base.dtype)
    t_gemm = _time(lambda: matmul_into(scratch, x, w, None), ctx, opts)
    t_comm = _time(lambda: dist.all_reduce(comm_buf), ctx, opts)
    t_base = _time(lambda: strategies.run("baseline", x, w, b, None, base_settings), ctx, opts)
    extra: dict[str, float] = {}
    if ctx.device.type == "cuda":
        # The floor any schedule of these two kernels can reach here: the whole all-reduce and the whole
        # product launched together, independent of each other (t_joint / ideal = mutual slowdown).
        extra["t_joint_ms"] = _time(lambda: _joint(scratch, comm_buf, x, w), ctx, opts).median_ms
    del scratch, comm_buf
    refs = {"t_base_ms": t_base.median_ms, "t_base_iqr_ms": t_base.iqr_ms, "t_gemm_ms": t_gemm.median_ms,
            "t_comm_ms": t_comm.median_ms, "extra": extra}
    extra["t_base_refs"] = [[t_base.median_ms, t_base.iqr_ms]]
    timed = 0
    for i, case in enumerate(group):
        cursor.at(case.label)
        name, settings = case.strategy, case.settings
        note = strategies.backend_note(name, settings, ctx.backend)
        strategies.take_report()
        checked = check_against_baseline(name, settings, x, w, b, y_base, case.dtype, ctx)
        # What the strategy said about how its first call ran (e.g. the NCCL kernel) joins the record.
        said = strategies.take_report()
        refs = {**refs, "extra": {**extra, **said}}
        if checked.status != "ok":
            emit(_record(case, ctx, opts, device_name, status=checked.status, reason=checked.reason,
                         rel_err=checked.rel_err, note=note, **refs))
            continue
        e = checked.rel_err
        t = _time(lambda: strategies.run(name, x, w, b, None, settings), ctx, opts)
        timed += 1
        if timed % BRACKET_EVERY == 0 or i == len(group) - 1:
            # Bracketed reference: the baseline again between and after the candidates, kept in the records
            # (the last record of the group holds them all), so drift within the group shows.
            again = _time(lambda: strategies.run("baseline", x, w, b, None, base_settings), ctx, opts)
            extra["t_base_refs"] = extra["t_base_refs"] + [[again.median_ms, again.iqr_ms]]
            refs = {**refs, "extra": {**extra, **said}}
        derived = metrics.derive(m=case.M, k=case.K, n=case.N, dtype=case.dtype, world=ctx.world,
                                 t_ms=t.median_ms, t_base_ms=t_base.median_ms, t_gemm_ms=t_gemm.median_ms,
                                 t_comm_ms=t_comm.median_ms)
        emit(_record(case, ctx, opts, device_name, rel_err=e, note=note, t_ms=t.median_ms,
                     t_iqr_ms=t.iqr_ms, **refs, **derived))
    return out


@dataclass(frozen=True)
class Checked:
    """Outcome of the numerics check that precedes every timing."""

    status: str
    """``ok``, ``failed`` or ``unavailable``."""
    reason: str | None
    rel_err: float


def check_against_baseline(name: str, settings: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                           y_base: torch.Tensor, dtype: str, ctx: RankContext) -> Checked:
    """Run strategy ``name`` once on the baseline's inputs and compare (max ``rel_err`` over ranks).

    Every rank reaches the same verdict: availability is decided from the backend alone, and a case error
    raised before the first collective is agreed on before anything else is issued.
    """
    reason = strategies.unavailable_reason(name, settings, ctx.backend)
    if reason:
        return Checked("unavailable", reason, math.nan)
    with strategies.diagnose():  # the checked call may say how it ran (e.g. the NCCL kernel)
        y, err = try_case(lambda: strategies.run(name, x, w, b, None, settings))
    err = agree_failure(err, ctx)
    if err:
        return Checked("failed", err, math.nan)
    e = allreduce_max([rel_err(y, y_base)], None, ctx.device)[0]
    if not within_tolerance(e, dtype):
        return Checked("failed", f"rel_err {e:.3g} above the {dtype} tolerance {TOLERANCE[dtype]:g}", e)
    return Checked("ok", None, e)


def same_cases(cases: list[Case], ctx: RankContext) -> list[Case]:
    """Rank 0's case list on every rank (it owns the records and knows what --resume skips, also on nodes
    that cannot see the run directory); every rank must run the same cases in the same order."""
    if ctx.world == 1:
        return cases
    box = [cases]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _joint(out: torch.Tensor, buf: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """An independent all-reduce (enqueued first, on the communication stream) beside the full product."""
    main = torch.cuda.current_stream(out.device)
    side = comm_stream(out.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        dist.all_reduce(buf)
    matmul_into(out, x, w, None)
    main.wait_stream(side)


def _time(fn: Callable[[], object], ctx: RankContext, opts: BenchOptions) -> Timing:
    return time_region(fn, warmup=opts.warmup, reps=opts.reps, group=None, device=ctx.device)


class _Progress:
    """Rank 0's rich progress bar over the whole sweep (done/total, ETA, current case)."""

    def __init__(self, opts: BenchOptions):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                           TextColumn("{task.description}"), transient=False)
        self._p.start()
        self._task = self._p.add_task("", total=opts.total or None, completed=opts.done_before)

    def advance(self, description: str) -> None:
        self._p.update(self._task, advance=1, description=description)

    def close(self) -> None:
        self._p.stop()



Side = tuple[str, Any]
"""One side of an A/B measurement: a strategy's name and its typed settings (``strategies.make_settings``)."""


def run_ab(ctx: RankContext, cases: list[Case], sides: tuple[Side, Side], repeats: int, opts: BenchOptions,
           name: str = RECORDS, kind: str = "compare", extra: dict[str, Any] | None = None) -> None:
    """``compare``'s rank function: A and B timed interleaved in pairs, ``repeats`` times per case, the
    order alternating (A B, B A, ...) so neither side always runs first.

    Each repeat is a full timed region (warm-up, ``reps`` calls, median, max over ranks), so the samples
    are independent measurements of the same two settings on the same inputs, side by side in time.
    Both outputs are checked against the baseline first; a side that fails (or cannot run here) is one
    record with that status, and nothing of that case is timed. Rank 0 appends one :class:`Record` of
    ``kind`` per timed region and side to the log ``name`` of ``opts.out_dir``; ``extra`` holds ``side``
    (``a``/``b``), ``repeat``, ``first`` (the side run first in that repeat), ``repeats`` and ``pair`` (both
    labels), plus the caller's ``extra``.
    """
    cases = same_cases(cases, ctx)
    device_name = ctx.device_name
    folder = RunFolder(opts.out_dir) if ctx.rank == 0 else None
    pair = [strategies.label(*side) for side in sides]
    for case in cases:
        x, w, b = inputs(case, ctx, opts.seed)
        y_base = strategies.run("baseline", x, w, b, None, strategies.make_settings("baseline"))
        both = [replace(case, strategy=n, settings=s) for n, s in sides]
        checks, said = [], []
        for c in both:
            strategies.take_report()
            checks.append(check_against_baseline(c.strategy, c.settings, x, w, b, y_base, case.dtype, ctx))
            said.append(strategies.take_report())  # how its first call ran (e.g. the NCCL kernel)

        def emit(i: int, repeat: int | None = None, **values: Any) -> None:
            if folder:
                c = both[i]
                tags = {**said[i], **(extra or {}), "side": "ab"[i], "pair": pair, "repeats": repeats}
                if repeat is not None:
                    tags["repeat"], tags["first"] = repeat, "ab"[repeat % 2]
                folder.append(_record(c, ctx, opts, device_name, kind=kind, rel_err=checks[i].rel_err,
                                      note=strategies.backend_note(c.strategy, c.settings, ctx.backend),
                                      extra=tags, **values), name)

        if any(ch.status != "ok" for ch in checks):
            for i, ch in enumerate(checks):
                if ch.status != "ok":
                    emit(i, status=ch.status, reason=ch.reason)
        else:
            for rep in range(repeats):
                for i in ((0, 1), (1, 0))[rep % 2]:  # A B, B A, ...: the first side is "ab"[rep % 2]
                    c = both[i]
                    t = _time(lambda: strategies.run(c.strategy, x, w, b, None, c.settings), ctx, opts)
                    emit(i, rep, t_ms=t.median_ms, t_iqr_ms=t.iqr_ms,
                         tokens_per_s=metrics.tokens_per_s(case.M, t.median_ms))
        del x, w, b, y_base
