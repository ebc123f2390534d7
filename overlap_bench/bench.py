"""What each rank does in a sweep: build inputs, check numerics against the baseline, time, record (rank 0 writes).
Cases of one bucket share their inputs and reference times."""

from __future__ import annotations

import math
import shlex
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from itertools import groupby
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from overlap_bench import metrics, strategies
from overlap_bench.envinfo import utc_now
from overlap_bench.keys import BucketKey
from overlap_bench.launch import RankContext
from overlap_bench.metrics import TOLERANCE, rel_err, within_tolerance
from overlap_bench.records import RECORDS, Record
from overlap_bench.runfolder import RunFolder
from overlap_bench.spec import Case
from overlap_bench.strategies.pipeline import comm_stream, matmul_into
from overlap_bench.timing import REPS, WARMUP, Timing, allreduce_max, time_region

# Failures that stay inside one case (recorded, the sweep goes on): raised before the call's first collective.
CASE_ERRORS = (ValueError, strategies.StrategyUnavailable, torch.cuda.OutOfMemoryError, MemoryError)
UNAVAILABLE = f"{strategies.StrategyUnavailable.__name__}: "  # how try_case's reason for one begins
BRACKET_EVERY = 4  # t_base is measured again after every this many timed candidates and after the last


@dataclass
class BenchOptions:
    """Per-job settings a rank needs besides its cases."""

    out_dir: str
    warmup: int = WARMUP
    reps: int = REPS
    seed: int = 0
    done_before: int = 0  # cases finished before this job: the progress bar's offset across env-variant jobs
    total: int = 0  # cases in the whole sweep
    progress: bool = True  # rank 0 draws a progress bar


class CaseFailed(RuntimeError):
    """A rank's error inside a case, re-raised with the case named (the launcher shows it)."""


@dataclass(frozen=True)
class Checked:
    """Outcome of the numerics check that precedes every timing."""

    status: str  # ok, failed or unavailable
    reason: str | None
    rel_err: float
    said: dict[str, Any]  # what the strategy reported about how its checked call ran (e.g. the NCCL kernel)


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
    if ctx.world > 1 and allreduce_max([1.0 if local else 0.0], None, ctx.device)[0] > 0:
        return local or "failed on another rank"
    return local


def try_case(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(fn(), None)``, or ``(None, "Type: first line")`` on one of :data:`CASE_ERRORS` or out of memory."""
    try:
        return fn(), None
    except (*CASE_ERRORS, RuntimeError) as exc:
        text = str(exc)
        if not isinstance(exc, CASE_ERRORS) and not any(
                w in text.lower() for w in ("can't allocate memory", "out of memory", "not enough memory")):
            raise
        return None, f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".strip().rstrip(":")


def _record(case: Case, ctx: RankContext, opts: BenchOptions, device_name: str, **values: Any) -> Record:
    """``case`` as measured here (``values``: its outcome), with the command that measures it again."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in case.env)
    cmd = (f"overlap-bench run --shape {case.K},{case.N} --tokens {case.M} --dtype {case.dtype} "
           f"--strategy {shlex.quote(case.label)} --nproc {ctx.world} --backend {ctx.backend} "
           f"--warmup {opts.warmup} --reps {opts.reps}" + (" --bias" if case.bias else ""))
    return Record(shape=case.shape, K=case.K, N=case.N, M=case.M, dtype=case.dtype, world=ctx.world,
                  backend=ctx.backend, device=device_name, strategy=case.strategy,
                  settings=strategies.settings_dict(case.settings), label=case.label, env=dict(case.env),
                  bias=case.bias, warmup=opts.warmup, reps=opts.reps, tol=TOLERANCE[case.dtype],
                  repro=f"{env} {cmd}".strip(), time=utc_now(), **values)


@contextmanager
def progress(label: str, total: int, *, show: bool, done: int = 0) -> Iterator[Callable[[str], None]]:
    """A rich bar over ``total`` steps (``done`` before); yields ``step(description)``; drawn only if ``show``."""
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.description}"), disable=not show) as bar:
        task = bar.add_task("", total=total or None, completed=done)
        yield lambda what: bar.update(task, advance=1, description=what)


def run_cases(ctx: RankContext, cases: list[Case], opts: BenchOptions) -> None:
    """The first pass on every rank of a sweep job (rank 0's ``cases``); rank 0 draws the progress bar."""
    cases = same_cases(cases, ctx)
    if not cases:
        return
    device_name = ctx.device_name

    def bucket(c: Case) -> BucketKey:  # cases of one bucket share their inputs and references
        return BucketKey.of(c, world=ctx.world, device=device_name, backend=ctx.backend)

    with progress("sweep", opts.total, show=ctx.rank == 0 and opts.progress, done=opts.done_before) as step:
        for _, group in groupby(sorted(cases, key=bucket), key=bucket):
            measure_group(ctx, list(group), opts, device_name, step)


def measure_group(ctx: RankContext, group: list[Case], opts: BenchOptions, device_name: str,
                  advance: Callable[[str], None] | None) -> None:
    """Measure every case of one bucket, references first; an error is re-raised as :class:`CaseFailed` naming it."""
    head = group[0]
    writer = RunFolder(opts.out_dir) if ctx.rank == 0 else None
    where = "(inputs and reference times)"

    def emit(case: Case, **values: Any) -> None:
        rec = _record(case, ctx, opts, device_name, **values)
        if writer:
            writer.append(rec)
        if advance:
            advance(f"{rec.shape} M={rec.M} {rec.label}")

    try:
        made, err = try_case(lambda: inputs(head, ctx, opts.seed))
        err = agree_failure(err, ctx)
        if err:
            for case in group:
                emit(case, status="failed", reason=f"inputs: {err}")
            return
        x, w, b = made
        base = partial(strategies.run, "baseline", x, w, b, None, strategies.make_settings("baseline"))
        y_base = base()
        scratch = torch.empty_like(y_base)
        comm_buf = torch.randn_like(y_base.float()).to(y_base.dtype)
        t_gemm = _time(lambda: matmul_into(scratch, x, w, None), ctx, opts)
        t_comm = _time(lambda: dist.all_reduce(comm_buf), ctx, opts)
        t_base = _time(base, ctx, opts)
        extra: dict[str, Any] = {}
        if ctx.device.type == "cuda":
            # The floor of any schedule here: both kernels launched together (t_joint / ideal = mutual slowdown).
            extra["t_joint_ms"] = _time(lambda: _joint(scratch, comm_buf, x, w), ctx, opts).median_ms
        del scratch, comm_buf
        refs = {"t_base_ms": t_base.median_ms, "t_base_iqr_ms": t_base.iqr_ms, "t_gemm_ms": t_gemm.median_ms,
                "t_comm_ms": t_comm.median_ms}
        extra["t_base_refs"] = [[t_base.median_ms, t_base.iqr_ms]]
        extra["t_gemm_iqr_ms"], extra["t_comm_iqr_ms"] = t_gemm.iqr_ms, t_comm.iqr_ms
        timed = 0
        for i, case in enumerate(group):
            where, name, settings = case.label, case.strategy, case.settings
            checked = check_against_baseline(name, settings, x, w, b, y_base, case.dtype, ctx)
            timing: dict[str, float] = {}
            if checked.status == "ok":
                t = _time(lambda: strategies.run(name, x, w, b, None, settings), ctx, opts)
                timed += 1
                if timed % BRACKET_EVERY == 0 or i == len(group) - 1:
                    # The baseline again between and after the candidates, so drift within the group shows.
                    again = _time(base, ctx, opts)
                    extra["t_base_refs"] = extra["t_base_refs"] + [[again.median_ms, again.iqr_ms]]
                timing = {"t_ms": t.median_ms, "t_iqr_ms": t.iqr_ms, **metrics.derive(
                    m=case.M, k=case.K, n=case.N, dtype=case.dtype, world=ctx.world, t_ms=t.median_ms,
                    t_base_ms=t_base.median_ms, t_gemm_ms=t_gemm.median_ms, t_comm_ms=t_comm.median_ms)}
            emit(case, status=checked.status, reason=checked.reason, rel_err=checked.rel_err,
                 note=_note(case, checked, ctx),
                 extra={**extra, **checked.said}, **refs, **timing)
    except Exception as exc:
        raise CaseFailed(f"{head.shape} M={head.M} {head.dtype} {where}: {type(exc).__name__}: {exc}") from exc


def _note(case: Case, checked: Checked, ctx: RankContext) -> str | None:
    """How the backend changed the way the strategy ran; none where it could not run."""
    if checked.status == "unavailable":
        return None
    return strategies.backend_note(case.strategy, case.settings, ctx.backend)


def check_against_baseline(name: str, settings: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                           y_base: torch.Tensor, dtype: str, ctx: RankContext) -> Checked:
    """Run ``name`` once on the baseline's inputs and compare (max ``rel_err`` over ranks); all ranks agree."""
    strategies.take_report()  # keep only what the checked call says
    reason = strategies.unavailable_reason(name, settings, ctx.backend)
    if reason:
        return Checked("unavailable", reason, math.nan, strategies.take_report())
    with strategies.diagnose():
        y, err = try_case(lambda: strategies.run(name, x, w, b, None, settings))
    said = strategies.take_report()
    err = agree_failure(err, ctx)
    if err:  # a strategy that finds at call time that it cannot take this case (dtype, size) is unavailable
        gone = err.startswith(UNAVAILABLE)
        return Checked("unavailable" if gone else "failed", err[len(UNAVAILABLE):] if gone else err, math.nan, said)
    e = allreduce_max([rel_err(y, y_base)], None, ctx.device)[0]
    if not within_tolerance(e, dtype):
        return Checked("failed", f"rel_err {e:.3g} above the {dtype} tolerance {TOLERANCE[dtype]:g}", e, said)
    return Checked("ok", None, e, said)


def same_cases(cases: list[Case], ctx: RankContext) -> list[Case]:
    """Rank 0's case list on every rank (it knows what --resume skips), so all run the same cases in order."""
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


Side = tuple[str, Any]  # one side of an A/B measurement: a strategy's name and its typed settings


def run_ab(ctx: RankContext, cases: list[Case], sides: tuple[Side, Side], repeats: int, opts: BenchOptions,
           name: str = RECORDS, kind: str = "compare", extra: dict[str, Any] | None = None) -> None:
    """``compare``'s rank function: per case both sides checked, then timed in ``repeats`` pairs alternating
    A B, B A (a failed check: one record, nothing timed). Rank 0 appends a ``kind`` record per region and side to
    log ``name``, ``extra`` gaining ``side``, ``pair``, ``repeats``, ``repeat`` and ``first``."""
    cases = same_cases(cases, ctx)
    device_name = ctx.device_name
    folder = RunFolder(opts.out_dir) if ctx.rank == 0 else None
    pair = [strategies.label(*side) for side in sides]
    for case in cases:
        x, w, b = inputs(case, ctx, opts.seed)
        y_base = strategies.run("baseline", x, w, b, None, strategies.make_settings("baseline"))
        both = [replace(case, strategy=n, settings=s) for n, s in sides]
        checks = [check_against_baseline(c.strategy, c.settings, x, w, b, y_base, case.dtype, ctx) for c in both]

        def emit(i: int, repeat: int | None = None, **values: Any) -> None:
            if folder:
                c = both[i]
                tags = {**checks[i].said, **(extra or {}), "side": "ab"[i], "pair": pair, "repeats": repeats}
                if repeat is not None:
                    tags["repeat"], tags["first"] = repeat, "ab"[repeat % 2]
                folder.append(_record(c, ctx, opts, device_name, kind=kind, rel_err=checks[i].rel_err,
                                      note=_note(c, checks[i], ctx), extra=tags, **values), name)

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
