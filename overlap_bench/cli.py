"""The ``overlap-bench`` command line (typer): run, sweep, compare, export, report, strategies, and the commands
of the ``overlap_bench.commands`` entry points (the research wing's model and interference)."""

from __future__ import annotations

import errno
import functools
import math
import os
import select as io_select
import signal
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any, Callable, List, Optional

import torch
import typer
import typer.core
from pydantic import Field, TypeAdapter
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import overlap_bench
from overlap_bench import check, confirm, runfolder, select, strategies
from overlap_bench import compare as cmp
from overlap_bench.bench import BenchOptions, run_ab
from overlap_bench.confirm import TOP as CONFIRM_TOP, load as load_confirmations
from overlap_bench.errors import UserError, os_error_exit
from overlap_bench.export import export_policy
from overlap_bench.launch import JobConfig, RankFailed, launch
from overlap_bench.metrics import beyond_spread, finite, is_reference
from overlap_bench.records import load_records, report_skipped_afresh
from overlap_bench.spec import CONFIRM_REPEATS, Case, SweepSpec, check_memory, default_spec_raw, load_spec, parse_spec
from overlap_bench.stats import MIN_EFFECT, SHIP_ALPHA, fewest
from overlap_bench.sweep import finish_run, run_sweep
from overlap_bench.timing import REPS, WARMUP
from overlap_bench.world import refuse_world_one


class _NoBoolType:
    """Help without a ``<bool>`` type beside flags (they take no value)."""

    def get_params(self, ctx: Any) -> list:
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_flag", False):
                p.metavar = ""
        return params


class _Command(_NoBoolType, typer.core.TyperCommand):
    """A command of :data:`app`."""


class _Group(_NoBoolType, typer.core.TyperGroup):
    """The root of :data:`app`."""

    def list_commands(self, ctx: Any) -> list[str]:
        """In the order registered, plugins' commands included, with the ``strategies`` listing last."""
        return sorted(super().list_commands(ctx), key=lambda name: name == "strategies")


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=_Group,
                  help="Measure, tune and ship GEMM / all-reduce overlap for tensor-parallel row-parallel layers.")
command = functools.partial(app.command, cls=_Command)
# Wide when piped, so tables are not squeezed into 80 columns in logs.
out_console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

# Options several commands share.
Shapes = Annotated[List[str], typer.Option("--shape", "-s", help="K,N (K per rank) or a model preset (its o_proj "
                                           "and down_proj at tp=nproc); default: one that suits this machine.")]
Tokens = Annotated[Optional[str], typer.Option("--tokens", "-m", help="Token counts M, comma-separated (default: "
                                               "ones that suit this machine).")]
Dtype = Annotated[Optional[str], typer.Option(help="bfloat16, float16 or float32 (default: bfloat16 on GPUs, "
                                              "float32 on CPU).")]
Nproc = Annotated[Optional[int], typer.Option(help="Ranks (default: every GPU, or 2 on CPU).")]
Backend = Annotated[str, typer.Option(help="auto, nccl or gloo.")]
Warmup = Annotated[int, typer.Option(help="Untimed calls before each timed region.")]
Reps = Annotated[int, typer.Option(help="Timed calls per region (median over them).")]
EnvVars = Annotated[List[str], typer.Option(help="KEY=VALUE set in every rank before CUDA starts (repeatable).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
RunDir = Annotated[Path, typer.Argument(help="A sweep's run directory.")]


def _version(value: bool) -> None:
    if value:
        print(f"overlap-bench {overlap_bench.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """overlap-bench: is overlapping the row-parallel GEMM with its all-reduce worth it here, and how?"""


def guard(fn: Callable[[], Any], out_dir: Path | None = None, resume: bool = False) -> Any:
    """Run a command body: bad input -> one line, exit 2; failed rank -> 1; Ctrl-C -> 130; OS error -> 2 (a path)
    or 1 (the machine); stdout's reader gone -> quiet 141 (as SIGPIPE). A stop names ``out_dir`` (and --resume)."""
    def kept() -> str:  # escaped: rich would read paths like "[/__w/...]" as markup tags
        if out_dir is None or not out_dir.is_dir():
            return ""
        return escape(f" Records so far are kept in {out_dir}" + ("; add --resume to continue." if resume else "."))

    # Under torchrun every rank meets the same input and signals: one rank per machine says so, all exit alike.
    says = os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0"
    report_skipped_afresh()
    try:
        return fn()
    except RankFailed as exc:
        err_console.print(f"[red]error:[/] {escape(str(exc))}.{kept()}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    except KeyboardInterrupt as exc:
        word, code = ("terminated.", 143) if isinstance(exc, Terminated) else ("interrupted.", 130)
        if says:
            err_console.print(f"[yellow]{word}[/]{kept()}", highlight=False, soft_wrap=True)
        raise typer.Exit(code)
    except UserError as exc:  # SpecError, LaunchError, PolicyError, bad flags
        if says:
            err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    except OSError as exc:  # exists, permission, name too long, is a directory; disk full
        if exc.errno == errno.EPIPE and _reader_gone(sys.stdout):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush has nowhere to fail
            raise typer.Exit(141)
        msg, code = os_error_exit(exc)
        err_console.print(f"[red]error:[/] {escape(msg)}.{kept()}", highlight=False, soft_wrap=True)
        raise typer.Exit(code)


def _reader_gone(stream: Any) -> bool:
    """Whether the pipe ``stream`` writes to has lost its reader (then it polls as an error)."""
    try:
        (poll := io_select.poll()).register(stream, io_select.POLLOUT)
        return any(ev & io_select.POLLERR for _, ev in poll.poll(0))
    except (OSError, ValueError):  # not a file (a test's capture), or closed
        return False


def out_path(text: str | Path) -> Path:
    """``--out`` as a path; an empty one (read as the current directory) is refused in one line, exit 2."""
    def given() -> Path:
        if str(text) == "":
            raise check.FieldError("--out: is empty; give a path, e.g. --out runs/mine (. for this folder)")
        return Path(text)

    return guard(given)


def rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _shapes_raw(shapes: list[str]) -> list[dict]:
    """``--shape`` texts in the spec's form: ``K,N`` (K per rank) or a preset's name."""
    return [dict(zip("KN", ints(text, "--shape", 2))) if "," in text else {"preset": text} for text in shapes]


def _cases_raw(shapes: list[str], tokens: str | None, dtype: str | None, backend: str | None) -> dict:
    """The spec fields of ``--shape``, ``--tokens`` and ``--dtype``; each one not given is the machine's
    (``spec.default_spec_raw``: tiny float32 shapes on CPU, Qwen2.5-72B at tp = GPU count on GPUs)."""
    default = default_spec_raw(backend)
    return {"shapes": _shapes_raw(shapes) if shapes else default["shapes"],
            "tokens": default["tokens"] if tokens is None else ints(tokens, "--tokens"),
            "dtypes": default["dtypes"] if dtype is None else [dtype]}


def _spec(raw: dict, nproc: int | None, backend: str | None) -> SweepSpec:
    """``raw`` validated with the job flags and against this machine's memory (a note when far from quick)."""
    spec = parse_spec(raw, world_size=nproc, backend=backend)
    note = check_memory(spec)
    if note and rank0():
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    return spec


def _strategies_raw(labels: list[str]) -> list[dict]:
    """``--strategy`` texts, parsed (so checked) once, in the sweep YAML's form (the run folder's spec.yaml)."""
    out: list[dict] = [{"name": "baseline"}]
    for text in labels:
        try:
            name, settings = strategies.parse(text)
        except ValueError as exc:
            raise check.FieldError(f"--strategy: {exc}") from None
        if not is_reference(strategies.label(name, settings)):  # a plain reference (baseline:comm=...) runs too
            out.append({"name": name, **strategies.settings_dict(settings)})
    return out


def _need_records(run_dir: Path, field: str = "RUN_DIR") -> Path:
    """Refuse (exit 2) a run folder (the argument ``field``) without a records file; that file."""
    if not (run_dir / runfolder.RECORDS).exists():
        raise check.FieldError(f"{field}: {run_dir} has no {runfolder.RECORDS}; give a sweep's --out directory")
    return run_dir / runfolder.RECORDS


def ints(text: str, flag: str, count: int | None = None) -> list[int]:
    """Comma-separated integers (``--tokens 4096,16384``), ``count`` of them when given."""
    return check.validate(Annotated[list[int], Field(min_length=count, max_length=count)],
                          [t.strip() for t in text.split(",") if t.strip()], flag, strict=False)


def _env_raw(items: list[str]) -> dict[str, str]:
    """``--env KEY=VALUE`` texts as a mapping."""
    for item in items:
        if not item.partition("=")[0] or "=" not in item:
            raise check.FieldError(f"--env: '{item}' must be KEY=VALUE, e.g. CUDA_DEVICE_MAX_CONNECTIONS=1")
    return dict(item.split("=", 1) for item in items)


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.{digits}f}"
    return "-" if v is None else str(v)


def table(title: str, header: list[str], rows: list[list[str]], left: tuple[str, ...]) -> Table:
    """A rich table; the ``left`` columns are left-aligned, the others (numbers) right-aligned."""
    t = Table(title=title)
    for c in header:
        t.add_column(c, justify="left" if c in left else "right")
    for r in rows:
        t.add_row(*r)
    return t


def records_table(records: list, title: str) -> Table:
    """One row per record: the metrics, each time's spread (IQR), ``~`` on a speedup within the reference's spread
    (:func:`metrics.beyond_spread`), and the numerics check."""
    cols = ["shape", "M", "strategy", "t ms (IQR)", "t_base (IQR)", "t_gemm (IQR)", "t_comm (IQR)", "speedup",
            "eta", "TFLOP/s", "busbw GB/s", "rel_err", "status"]

    def near(r: Any) -> bool:
        return not is_reference(r.label) and finite(r.speedup) and not beyond_spread(
            r.t_ms, r.t_iqr_ms, r.t_base_ms, r.t_base_iqr_ms)

    rows = [[r.shape, str(r.M), r.label, _spread(r.t_ms, r.t_iqr_ms), _spread(r.t_base_ms, r.t_base_iqr_ms),
             _spread(r.t_gemm_ms, r.extra.get("t_gemm_iqr_ms")), _spread(r.t_comm_ms, r.extra.get("t_comm_iqr_ms")),
             _fmt(r.speedup) + (" ~" if near(r) else ""), _fmt(r.eta, 2), _fmt(r.tflops, 1), _fmt(r.busbw_gbps, 1),
             f"{r.rel_err:.1e}" if not math.isnan(r.rel_err) else "-",
             r.status if r.ok else f"[red]{r.status}[/]: {r.reason}"] for r in records]
    t = table(title, cols, rows, ("shape", "strategy", "status"))
    t.caption = "(IQR): the spread of each time's calls" + (
        "; ~: the difference from t_base is inside the spread (half an IQR each side)" if any(map(near, records))
        else "")
    return t


def _spread(t: Any, iqr: Any) -> str:
    """A time with its spread beside it: ``0.123 (0.004)``; the time alone where no IQR was recorded."""
    return _fmt(t) + (f" ({iqr:.3f})" if finite(t) and finite(iqr) else "")


@command()
def run(
    shape: Shapes = [],
    tokens: Tokens = None,
    strategy: List[str] = typer.Option(["pr", "chunked:chunks=4"], "--strategy", "-S",
                                       help="Strategy with settings, e.g. chunked:chunks=4,comm=async (repeatable); "
                                            "baseline always runs."),
    dtype: Dtype = None,
    nproc: Nproc = None,
    backend: Backend = "auto",
    warmup: Warmup = WARMUP,
    reps: Reps = REPS,
    bias: bool = typer.Option(False, help="Give the layer a bias."),
    env: EnvVars = [],
    out: Optional[Path] = typer.Option(None, parser=out_path,
                                       help="Keep the run directory here (default: a temp dir)."),
    as_json: AsJson = False,
) -> None:
    """Measure one or a few cases: one table row per strategy with the metrics and rel_err."""

    def body() -> None:
        raw = {"name": "run", **_cases_raw(shape, tokens, dtype, backend), "strategies": _strategies_raw(strategy),
               "env": [_env_raw(env)], "warmup": warmup, "reps": reps, "bias": bias}
        spec = _spec(raw, nproc, backend)
        raw.update(backend=spec.backend, world_size=spec.world_size)
        run_dir = out or Path(tempfile.mkdtemp(prefix="overlap-bench-run-"))
        run_sweep(spec, raw, run_dir, progress=False, rank0=rank0(), confirm=False)  # a one-off table
        if not rank0():
            return
        recs = select.score(load_records(run_dir).records)  # speedup and eta against the one reference
        if as_json:
            for r in recs:
                print(r.to_json())
        else:
            dev = recs[0].device if recs else "?"
            out_console.print(records_table(recs, f"{dev} x{spec.world_size} ({spec.backend}), "
                                                  f"{', '.join(spec.dtypes)}"))

    guard(body, out)


def _estimate(spec: SweepSpec, out: Path) -> str:
    """The first pass's duration: its cases times a per-case cost, from the time stamps of the run in ``out`` (its
    start and sweep records, scaled to this spec's warmup + reps), else measured here on one tiny case."""
    recs = [r for r in load_records(out).records if r.kind == "sweep" and r.time]
    created = (runfolder.read_identity(out) or {}).get("created")
    stamps = sorted(datetime.fromisoformat(t).timestamp() for t in [created, *(r.time for r in recs)] if t)
    gaps = [b - a for a, b in zip(stamps, stamps[1:]) if b - a < 3600]  # not the pause before a --resume
    if recs and sum(gaps) > 0:
        calls = statistics.median(r.warmup + r.reps for r in recs) or 1
        per = sum(gaps) / len(recs) * (spec.warmup + spec.reps) / calls
        source = f"per-case cost from the {len(recs)} records in {out / runfolder.RECORDS}, start-up included"
    else:
        device = "cuda" if spec.backend == "nccl" else "cpu"
        x, w = torch.randn(64, 128, device=device), torch.randn(256, 128, device=device)
        torch.mm(x, w.T)  # lazy initialisation is no part of a case
        start = time.perf_counter()
        for _ in range(3 * (spec.warmup + spec.reps)):  # the reference, the GEMM alone, the strategy
            torch.mm(x, w.T)
        if device == "cuda":
            torch.cuda.synchronize()
        per = time.perf_counter() - start
        source = ("per-case cost measured here on one tiny case's GEMMs (K=128, N=256, M=64), without "
                  "communication or start-up: a lower bound")
    total = len(spec.cases()) * per
    took = f"{total:.0f} s" if total < 120 else f"{total / 60:.0f} min" if total < 7200 else f"{total / 3600:.1f} h"
    return f"estimate: {len(spec.cases())} cases x {per:.2g} s = about {took} for the first pass ({source})"


@command()
def sweep(
    spec_path: Optional[Path] = typer.Argument(None, metavar="SPEC", help="Sweep YAML (see sweeps/); default: one "
                                                                          "that suits this machine."),
    out: Path = typer.Option(Path("runs/latest"), "--out", "-o", parser=out_path,
                             help="Run directory (records.jsonl, env, tables)."),
    resume: bool = typer.Option(False, help="Skip the cases already recorded in --out."),
    force: bool = typer.Option(False, "--force", help="With --resume: continue a folder of another spec or timing "
                                                     "options (both runs' records side by side)."),
    world_size: Optional[int] = typer.Option(None, "--world-size", "--nproc", help="Override the spec's world size."),
    backend: Optional[str] = typer.Option(None, help="Override the spec's backend (auto, nccl, gloo)."),
    seed: int = typer.Option(0, help="Seed of the random inputs."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the cases and estimate the time; run nothing."),
    timeout: Optional[float] = typer.Option(None, help="Collective timeout in s (overrides the spec's timeout_s)."),
    tp: Optional[int] = typer.Option(None, help="Run the spec's preset shapes at this tensor-parallel size, on that "
                                                "many ranks (e.g. a tp=8 spec on 4 GPUs)."),
    confirm: bool = typer.Option(True, help="After the first pass, re-measure each bucket's leading candidates "
                                            "against the baseline, interleaved (what export ships needs it)."),
    confirm_repeats: Optional[int] = typer.Option(None, help="Interleaved repeats per side in the confirmation "
                                                             f"(default: the spec's, else {CONFIRM_REPEATS})."),
    confirm_top: int = typer.Option(CONFIRM_TOP, min=1, help="Candidates confirmed per bucket besides the peers "
                                                             "(pr): the first pass's best this many."),
) -> None:
    """Sweep shapes x tokens x settings (each record appended to OUT/records.jsonl as it is measured), confirm
    each bucket's leaders by interleaved re-measurement (OUT/confirm.jsonl), and show what export would ship."""

    def body() -> None:
        spec, raw = load_spec(spec_path, world_size=world_size, backend=backend, timeout_s=timeout, tp=tp,
                              confirm_repeats=confirm_repeats)
        refuse_world_one(spec.world_size, "a sweep")
        peers = strategies.peers()  # confirmed beside the top candidates: the ship rule's family
        if confirm and spec.confirm_repeats < (need := fewest(SHIP_ALPHA / (confirm_top + len(peers)))):
            raise check.FieldError(f"--confirm-repeats: {spec.confirm_repeats} cannot resolve the ship rule for "
                                   f"{confirm_top} candidates and {', '.join(peers)}; give {need} or more, or a "
                                   "smaller --confirm-top")
        cases = spec.cases()
        if dry_run:
            out_console.print(f"{escape(spec.name)}: {len(cases)} cases on {spec.world_size} ranks ({spec.backend}); "
                              f"{len(spec.env)} job(s) by environment")
            for c in cases:
                env = " ".join(f"{k}={v}" for k, v in c.env)
                print(f"{c.shape}\tK={c.K}\tN={c.N}\tM={c.M}\t{c.dtype}\t{c.label}\t{env}")
            out_console.print(escape(_estimate(spec, out)), highlight=False)
            return
        repeats = spec.confirm_repeats
        res = run_sweep(spec, raw, out, resume=resume, seed=seed, rank0=rank0(), force=force, confirm=confirm,
                        confirm_repeats=repeats, confirm_top=confirm_top)
        if not rank0():
            return
        msg = f"{spec.name}: {res.planned - res.skipped_done} cases measured"
        if res.skipped_done:
            msg += f", {res.skipped_done} already recorded (skipped)"
        if confirm:
            msg += f"; {res.screened} screened, {res.confirmed} candidate(s) confirmed ({repeats} interleaved repeats)"
            if res.confirmed_before:
                msg += f", {res.confirmed_before} confirmed before (kept)"
        else:
            msg += "; not confirmed (--no-confirm): export ships the baseline unless --unconfirmed"
        out_console.print(escape(f"{msg}. Results in {out}/ (records.jsonl, tables.md, summary.md)"))
        for line in res.not_run:
            err_console.print(f"[yellow]not run:[/] {escape(line)}")
        decisions = select.decide(load_records(out).records, load_confirmations(out))
        out_console.print(_shipped_table(decisions, False))
        out_console.print(escape(f"next: overlap-bench export {out} -o policy.yaml"), highlight=False)

    guard(body, out, resume=True)


def _compare_cases(spec_path: Optional[Path], preset: Optional[str], tokens: Optional[str], dtype: Optional[str],
                   nproc: Optional[int], backend: str, env: dict[str, str]) -> tuple[SweepSpec, list[Case]]:
    """The baseline cases and the job of a strategy comparison (a spec, a preset, or the machine's default);
    ``env``: the variables the job runs with (part of each case)."""
    be = None if backend == "auto" else backend
    if spec_path is not None:
        raw = load_spec(spec_path, world_size=nproc, backend=be)[1]
        flags = {"tokens": ints(tokens, "--tokens") if tokens else None, "dtypes": [dtype] if dtype else None}
        raw = {**raw, **{k: v for k, v in flags.items() if v}}
    else:
        raw = {"name": "compare", "strategies": ["baseline"], **_cases_raw([preset] if preset else [], tokens,
                                                                           dtype, backend)}
    spec = _spec(raw, nproc, be)
    base = strategies.make_settings("baseline")
    cases = [Case(s.name, s.K, s.N, m, d, spec.bias, "baseline", base, tuple(sorted(env.items())))
             for d in spec.dtypes for s in spec.shapes for m in spec.tokens]
    return spec, cases


@command()
def compare(
    a: str = typer.Argument(..., help="Strategy (baseline, pr, chunked:chunks=4,comm=stream) or a run directory."),
    b: str = typer.Argument(..., help="Strategy or run directory, compared against A (speedup = B over A)."),
    spec_path: Optional[Path] = typer.Option(None, "--spec", help="Take shapes, tokens and dtypes from a sweep YAML."),
    preset: Optional[str] = typer.Option(None, help="Model preset (default: one that suits this machine)."),
    tokens: Tokens = None,
    dtype: Dtype = None,
    repeats: int = typer.Option(5, min=1, help="Interleaved repeats per side (A B A B ...)."),
    min_effect: float = typer.Option(MIN_EFFECT, help="Smallest relative change called faster/slower (noise floor)."),
    nproc: Nproc = None,
    backend: Backend = "auto",
    warmup: Warmup = WARMUP,
    reps: Reps = REPS,
    env: EnvVars = [],
    out: Optional[Path] = typer.Option(None, parser=out_path, help="Write compare.json, compare.md and env.json here."),
    markdown: Optional[Path] = typer.Option(None, help="Write the markdown table (for a pull request) here."),
    as_json: AsJson = False,
) -> None:
    """Compare two strategies side by side (interleaved repeats; ratio of medians, its bootstrap CI) or two runs."""

    def body() -> None:
        check.validate(Annotated[float, Field(ge=0, allow_inf_nan=False)], min_effect, "--min-effect")
        dirs = [Path(a).is_dir(), Path(b).is_dir()]
        live = not all(dirs)
        if any(dirs) and live:  # one side is a run folder: the other is a missing one, not a strategy
            name, side = ("B", b) if dirs[0] else ("A", a)
            raise check.FieldError(f"{name}: no run directory at {side}; give two run directories or two strategies")
        if not live:
            for name, side in zip("AB", (a, b)):
                if _need_records(Path(side), name).stat().st_size == 0:
                    raise check.FieldError(f"{name}: {side}/{runfolder.RECORDS} is empty; give a run directory "
                                           "with records")
        else:  # every input checked before a folder is made or a rank started
            sides = []
            for name, side in zip("AB", (a, b)):
                try:
                    sides.append(strategies.parse(side))
                except ValueError as exc:
                    raise check.FieldError(f"{name}: '{side}' is neither a run directory nor a strategy: {exc}") \
                        from None
            job_env = _env_raw(env)
            spec, cases = _compare_cases(spec_path, preset, tokens, dtype, nproc, backend, job_env)
            refuse_world_one(spec.world_size, "a comparison of two strategies")
        # A folder that cannot be written is refused before anything is measured.
        folder = runfolder.RunFolder(runfolder.ensure_folder(out, "--out")) if out is not None else None
        with folder.claim("compare") if folder is not None and rank0() else nullcontext():
            if not live:
                df, unmatched = cmp.compare_run_dirs(a, b, min_effect=min_effect)
                title = f"{b} vs {a}"
            else:  # measured into the folder's records.jsonl (a temp folder without --out), judged from them
                folder = folder or runfolder.RunFolder(tempfile.mkdtemp(prefix="overlap-bench-compare-"))
                if rank0() and (folder / runfolder.RECORDS).exists():
                    raise check.FieldError(f"--out: {folder.path} already holds {runfolder.RECORDS} (another "
                                           "comparison); choose a new --out")
                opts = BenchOptions(str(folder.path), warmup, reps, 0, 0, 0, False)
                launch(run_ab, (cases, tuple(sides), repeats, opts),
                       JobConfig(spec.world_size, spec.backend, spec.timeout_s, job_env))
                if not rank0():
                    return
                df, unmatched = cmp.compare_run_dirs(folder.path, min_effect=min_effect)
                labels = [strategies.label(*side) for side in sides]
                title = f"{labels[1]} vs {labels[0]}, {spec.world_size} ranks ({spec.backend}), {repeats} repeats"
                if job_env:
                    title += ", " + " ".join(f"{k}={v}" for k, v in job_env.items())
            summ = cmp.summary(df)
            md = cmp.to_markdown(df, summ, title)
            if out is not None:
                folder.write_text(runfolder.COMPARE_JSON, cmp.to_json(df, summ) + "\n")
                folder.write_text(runfolder.COMPARE_MD, md)
                folder.write_env()
        if markdown is not None:
            runfolder.write_atomic(markdown, md)
        if as_json:
            print(cmp.to_json(df, summ))
        else:
            out_console.print(cmp.rich_table(df, summ, title))
        for line in unmatched:
            err_console.print(f"[yellow]not compared:[/] {escape(line)}", highlight=False)

    guard(body)


def _shipped_table(decisions: list, running: bool) -> Table:
    """What ships per bucket and why (``Decision.why``; a bucket not confirmed names its best candidate)."""
    rows = []
    for d in decisions:
        c, why = d.confirmation, d.why
        if c is not None and is_reference(d.label) and c.leader:
            why += f" (best: {c.leader} {_fmt(c.leader_speedup)}x, CI {_fmt(c.leader_ci[0])}..{_fmt(c.leader_ci[1])})"
        elif c is None and running:
            why += " (run still being written)"
        if not d.in_policy:
            why += " (not in the policy: another env variant or shape ships this slot)"
        ci = f"{_fmt(c.ci[0])}..{_fmt(c.ci[1])}" if c is not None and not is_reference(d.label) else "-"
        rows.append([escape(d.key.shape), str(d.key.M), d.key.dtype, str(d.key.world), escape(d.key.env.text),
                     escape(d.label), _fmt(d.speedup), ci, _fmt(d.eta, 2), escape(why)])
    return table("shipped per bucket", ["shape", "M", "dtype", "world", "env", "ships", "speedup", "CI", "eta", "why"],
                 rows, ("shape", "dtype", "env", "ships", "why"))


@command()
def export(
    run_dir: RunDir,
    out: Path = typer.Option(..., "-o", "--out", parser=out_path,
                             help="Policy file (.yaml) or a folder (one file per device/world/dtype)."),
    env: List[str] = typer.Option([], help="KEY=VALUE: export this environment variant (default: the fastest)."),
    dtype: Optional[str] = typer.Option(None, help="Export only this dtype."),
    unconfirmed: bool = typer.Option(False, "--unconfirmed", help="Where a bucket has no confirmation, ship the "
                                                                 "first pass's pick (meta.unconfirmed says so) "
                                                                 "instead of the baseline."),
    force: bool = typer.Option(False, "--force", help="Export a run still being written (what it holds now)."),
) -> None:
    """Write each bucket's decision as a policy YAML, and print what ships per bucket and why."""

    def body() -> None:
        _need_records(run_dir)
        held = runfolder.writer(run_dir)
        if held and not force:
            raise check.FieldError(f"RUN_DIR: {run_dir} is still being written by {held}; export it once that run "
                                   "has ended, or add --force to export what it holds now")
        env_map = _env_raw(env) if env else None
        records = runfolder.RunFolder(run_dir).load().records
        if not records:  # before the confirmation is read: its cases are checked against these
            raise check.FieldError(f"RUN_DIR: {run_dir}: no records to export; give a sweep's --out directory")
        confirmations = confirm.load(run_dir)
        decisions = select.decide(records, confirmations, unconfirmed=unconfirmed, env=env_map)
        paths = export_policy(run_dir, out, env=env_map, dtype=dtype, unconfirmed=unconfirmed, decisions=decisions)
        out_console.print(_shipped_table([d for d in decisions if d.in_policy and dtype in (None, d.key.dtype)],
                                         bool(held)))
        if not confirmations:
            ships = "the first pass's pick (--unconfirmed)" if unconfirmed else "the baseline"
            out_console.print(escape(f"{run_dir} holds no confirmation ({runfolder.CONFIRM}): every bucket ships "
                                     f"{ships}"), highlight=False)
        for p in paths:
            out_console.print(escape(f"wrote {p}"))

    guard(body)


@command()
def report(run_dir: RunDir) -> None:
    """Write plots (PNG) and summary.md for a run directory (also done at the end of every sweep)."""

    def body() -> None:
        _need_records(run_dir)
        with runfolder.RunFolder(run_dir).claim("sweep", "RUN_DIR"):  # a sweep's renderings
            finish_run(run_dir)
        out_console.print(escape(f"wrote {run_dir}/summary.md, tables and plots"))

    guard(body)


_BOUNDS = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}


def _allowed(field: dict) -> str:
    """A setting's JSON schema as text: its choices, or its type and range (``integer >= 1``)."""
    if "enum" in field:
        return ", ".join(map(str, field["enum"]))
    kind = "true, false" if field.get("type") == "boolean" else field.get("type", "-")
    return " ".join([kind, *(f"{op} {field[k]}" for k, op in _BOUNDS.items() if k in field)])


@command("strategies")
def list_strategies() -> None:
    """List the registered strategies and each setting's allowed values (choices or range) and default."""
    rows = []
    for name in strategies.names():
        s = strategies.get(name)
        fields = TypeAdapter(s.settings_cls).json_schema().get("properties", {})
        for i, (key, field) in enumerate(fields.items() or [("-", {})]):
            default = str(field["default"]).lower() if "default" in field else "-"
            rows.append([name if i == 0 else "", key, _allowed(field), default, s.doc if i == 0 else ""])
    header = ["name", "setting", "allowed", "default", "what"]
    out_console.print(table("strategies", header, rows, tuple(header)))


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``timeout``): unwound like Ctrl-C so ranks stop and records and tables are kept."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def main() -> None:
    """Console-script entry point; first imports the command plugins of the ``overlap_bench.commands`` entry points
    (the research wing's ``model`` and ``interference``), each registering its commands on :data:`app`."""
    for plugin in entry_points(group="overlap_bench.commands"):
        plugin.load()
    signal.signal(signal.SIGTERM, _on_sigterm)
    app()


if __name__ == "__main__":
    main()
