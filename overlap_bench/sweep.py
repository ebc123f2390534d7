"""The sweep driver (launcher side): run directory, resume, one job per environment variant, tables at the end."""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any, Iterable

import yaml

import overlap_bench
from overlap_bench import confirm, envinfo, report, runfolder, select, strategies
from overlap_bench.bench import BenchOptions, run_ab, run_cases, same_cases
from overlap_bench.confirm import REPEATS, TOP
from overlap_bench.keys import BucketKey, Env, case_key
from overlap_bench.launch import JobConfig, RankContext, in_torchrun, launch
from overlap_bench.records import Loaded, Record, load_records
from overlap_bench.spec import Case, SpecError, SweepSpec, check_memory

log = logging.getLogger("overlap_bench.sweep")


@dataclass
class SweepResult:
    """What a sweep did."""

    out_dir: Path
    planned: int
    skipped_done: int
    """Cases already in records.jsonl (``--resume``)."""
    torn_lines: list[int] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)
    """Environment variants this process could not start (under torchrun), with why."""
    confirmed: int = 0
    """Candidates re-measured by the confirmation stage in this call (0 with ``confirm=False``)."""
    confirmed_before: int = 0
    """Candidates already confirmed in the folder (``--resume``): not measured again."""


def _key(c: Case, spec: SweepSpec) -> tuple:
    return case_key(c, world=spec.world_size, backend=spec.backend)


def prepare_out_dir(out_dir: Path, resume: bool, loaded: Loaded | None = None) -> tuple[set, list[int]]:
    """Keys of the cases already recorded (``loaded``: the folder's records, read here if not given), and torn
    lines found; refuses to mix runs without ``--resume``."""
    loaded = loaded or load_records(out_dir)
    if (loaded.records or loaded.torn_lines) and not resume:
        raise SpecError(f"--out: {out_dir} already holds {len(loaded.records)} records; "
                        "pass --resume to continue that run or choose a new --out")
    return {r.key() for r in loaded.records}, loaded.torn_lines


def run_identity(spec: SweepSpec, seed: int) -> dict:
    """The run folder identity of a sweep (``runfolder.identity``): its case grid and timing options."""
    grid = {"dtypes": spec.dtypes, "shapes": [asdict(s) for s in spec.shapes], "tokens": spec.tokens,
            "bias": spec.bias, "strategies": spec.labels, "env": spec.env}
    options = {"warmup": spec.warmup, "reps": spec.reps, "seed": seed, "world_size": spec.world_size,
               "backend": spec.backend}
    return runfolder.identity(grid, options, overlap_bench.__version__)


def open_run_folder(out: Path, spec: SweepSpec, raw: dict, *, resume: bool, force: bool, seed: int,
                    command: str | None) -> tuple[set, list[int]]:
    """Check and write a run folder's identity, spec.yaml and env.json (the caller holds its lock); returns
    :func:`prepare_out_dir`'s answer. Nothing already there is overwritten on resume: the first spec.yaml and
    env.json stay, and the resume is appended to ``run.json`` (and its environment to ``env.json``)."""
    loaded = load_records(out)
    done, torn = prepare_out_dir(out, resume, loaded)
    folder = runfolder.RunFolder(out)
    has_records = bool(loaded.records or loaded.torn_lines)
    new = run_identity(spec, seed)
    ident = runfolder.check_identity(
        out, new, has_records=has_records, force=force,
        records_options=[{"warmup": r.warmup, "reps": r.reps, "world_size": r.world, "backend": r.backend}
                         for r in loaded.records])
    env = envinfo.collect(command)
    if not has_records or not (out / runfolder.SPEC).exists():
        folder.write_text(runfolder.SPEC, yaml.safe_dump(raw, sort_keys=False))
    elif ident["resumes"][-1]["forced"]:
        ident["resumes"][-1]["spec"] = raw  # the first spec.yaml stays; the forced one is kept here
    first_env = _read_json(out / runfolder.ENV) if has_records else None
    if isinstance(first_env, dict):
        first_env.setdefault("resumes", []).append(env)
        env = first_env
    elif has_records and (out / runfolder.ENV).exists():
        log.warning("%s/env.json is unreadable: kept as it is, this resume's environment is not added", out)
        env = None
    folder.write_text(runfolder.IDENTITY, json.dumps(ident, indent=2, default=str) + "\n")
    if env is not None:
        folder.write_json(runfolder.ENV, env)
    return done, torn


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_sweep(spec: SweepSpec, raw: dict, out_dir: str | os.PathLike, *, resume: bool = False,
              command: str | None = None, progress: bool = True, seed: int = 0, rank0: bool = True,
              force: bool = False, confirm: bool = True, confirm_repeats: int = REPEATS,
              confirm_top: int = TOP) -> SweepResult:
    """Run every case of ``spec`` not yet recorded in ``out_dir``; tables are written even on failure.

    Rank 0 holds the folder's lock (``runfolder.lock``) for the whole sweep; ``force`` lets ``resume``
    continue a folder made by another spec or options (``runfolder.check_identity``). With ``confirm``
    the first pass is followed by the confirmation stage (:mod:`overlap_bench.confirm`): each bucket's
    leading candidates re-measured against the baseline, ``confirm_repeats`` interleaved repeats each."""
    out = Path(out_dir)
    check_memory(spec)
    with runfolder.RunFolder(out).claim("sweep", command=command or envinfo.command_line()) if rank0 else nullcontext():
        if rank0:
            done, torn = open_run_folder(out, spec, raw, resume=resume, force=force, seed=seed, command=command)
        else:  # the folder is rank 0's (on another node it may not be there): rank 0's case list runs
            done, torn = set(), []
        stage = (confirm_repeats, confirm_top) if confirm else None
        return _run_jobs(spec, out, done, torn, seed, progress, rank0, stage)


def _run_jobs(spec: SweepSpec, out: Path, done: set, torn: list[int], seed: int, progress: bool,
              rank0: bool, stage: tuple[int, int] | None = None) -> SweepResult:
    cases = spec.cases()
    todo = [c for c in cases if _key(c, spec) not in done]
    result = SweepResult(out, len(cases), len(cases) - len(todo), torn)
    finished = result.skipped_done
    try:
        # Under torchrun every rank joins every job, also one its own list leaves empty (run_cases runs rank 0's).
        for env, group in groupby(cases if in_torchrun() else todo, key=lambda c: c.env):
            group = [c for c in group if _key(c, spec) not in done]
            if in_torchrun() and any(os.environ.get(k) != v for k, v in env):
                # The variables must be set before CUDA starts: torchrun has to be started with them.
                want = " ".join(f"{k}={v}" for k, v in env)
                if group:
                    result.not_run.append(f"{len(group)} cases need {want} set on the torchrun command")
                continue
            opts = BenchOptions(str(out), spec.warmup, spec.reps, seed, finished, len(cases), progress)
            launch(run_cases, (group, opts), JobConfig(spec.world_size, spec.backend, spec.timeout_s, dict(env)))
            finished += len(group)
        if stage is not None:
            _confirm(spec, out, seed, *stage, result)
    except BaseException:
        if rank0:
            try:
                finish_run(out)
            except Exception as exc:  # noqa: BLE001  (never hide why the sweep stopped behind a tables error)
                log.warning("tables and report of %s not written: %s: %s", out, type(exc).__name__, exc)
        raise
    if rank0:
        finish_run(out)
    return result


@dataclass(frozen=True)
class ConfirmJob:
    """One candidate of one bucket to measure again against the baseline."""

    case: Case
    """The bucket's baseline case (shape, M, dtype, bias, env: the job's variables)."""
    candidate: tuple[str, Any]
    """The candidate's strategy and typed settings, from its first-pass record."""
    first_pass_speedup: float
    candidates: int
    """Settings the first pass timed in this bucket."""


def plan_confirmation(records: Iterable[Record], done: set[tuple], *, top: int = TOP, world: int | None = None,
                      backend: str | None = None) -> list[ConfirmJob]:
    """The candidates to confirm (:func:`confirm.leaders` of each bucket's scored first pass), leaving out the
    ``confirm.candidate_key`` values in ``done`` (a resumed sweep does not measure them again)."""
    at: dict[BucketKey, list[Record]] = {}
    for r in select.score(records):
        if (world is None or r.world == world) and (backend is None or r.backend == backend):
            at.setdefault(r.bucket, []).append(r)
    jobs = []
    base = strategies.make_settings("baseline")
    for bucket, g in sorted(at.items()):
        first = {r.label: r for r in g if r.ok and math.isfinite(r.t_ms)}
        for lab in confirm.leaders({lab: r.speedup for lab, r in first.items()}, strategies.peers(), top):
            if (bucket, lab) not in done:
                r = first[lab]
                case = Case(r.shape, r.K, r.N, r.M, r.dtype, bool(r.bias), "baseline", base, bucket.env)
                jobs.append(ConfirmJob(case, (r.strategy, strategies.make_settings(r.strategy, r.settings)),
                                       float(r.speedup), len(first)))
    return jobs


def measure_confirmation(ctx: RankContext, jobs: list[ConfirmJob], repeats: int, opts: BenchOptions) -> None:
    """Every rank's function of a confirmation job: each candidate against the baseline (``bench.run_ab``);
    rank 0 appends the records (``kind`` confirm) to ``confirm.jsonl``."""
    for job in same_cases(jobs, ctx):
        run_ab(ctx, [job.case], (("baseline", job.case.settings), job.candidate), repeats, opts,
               runfolder.CONFIRM, "confirm",
               {"first_pass_speedup": job.first_pass_speedup, "candidates": job.candidates})


def _confirm(spec: SweepSpec, out: Path, seed: int, repeats: int, top: int, result: SweepResult) -> None:
    """The confirmation stage: one job per environment variant (the variables must be set before CUDA
    starts), each re-measuring its buckets' leaders; candidates already in ``confirm.jsonl`` are not redone."""
    done = {confirm.candidate_key(r) for r in confirm.load(out)}
    jobs = plan_confirmation(load_records(out).records, done, top=top, world=spec.world_size, backend=spec.backend)
    result.confirmed_before = len(done)
    for env in spec.env:
        mine = [j for j in jobs if j.case.env == Env(env)]
        if not mine and not in_torchrun():
            continue
        if in_torchrun() and any(os.environ.get(k) != v for k, v in env.items()):
            continue  # the first pass reported it in not_run already
        opts = BenchOptions(str(out), spec.warmup, spec.reps, seed, 0, 0, False)
        launch(measure_confirmation, (mine, repeats, opts),
               JobConfig(spec.world_size, spec.backend, spec.timeout_s, dict(env)))
        result.confirmed += len(mine)


def finish_run(out: Path) -> None:
    """Tables (CSV, markdown) and the report from whatever records exist, so a failed sweep keeps them too."""
    loaded = load_records(out)
    if not loaded.records:
        return
    decisions = select.decide(loaded.records, confirm.load(out))
    report.write_tables(decisions, out)
    report.write_report(out, loaded, decisions)
