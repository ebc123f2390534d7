"""The sweep driver (launcher side): run directory, resume, one job per environment variant, tables at the end."""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import yaml

import overlap_bench
from overlap_bench import confirm, envinfo, report, runfolder, select, strategies
from overlap_bench.bench import BenchOptions, progress, run_ab, run_cases, same_cases
from overlap_bench.confirm import TOP
from overlap_bench.keys import BucketKey, Env, case_key
from overlap_bench.launch import JobConfig, RankContext, in_torchrun, launch
from overlap_bench.records import CONFIRM, SCREEN, Record, load_records
from overlap_bench.spec import CONFIRM_REPEATS, Case, SpecError, SweepSpec, check_memory
from overlap_bench.stats import SCREEN_REPEATS

log = logging.getLogger("overlap_bench.sweep")


@dataclass
class SweepResult:
    """What a sweep did."""

    planned: int
    skipped_done: int
    """Cases already in records.jsonl (``--resume``)."""
    not_run: list[str] = field(default_factory=list)
    """Environment variants this process could not start (under torchrun), with why."""
    screened: int = 0
    """Candidates the screen measured in this call."""
    confirmed: int = 0
    """Candidates the confirmation measured in this call."""
    confirmed_before: int = 0
    """Candidates already confirmed in the folder (``--resume``): not measured again."""


def _key(c: Case, spec: SweepSpec) -> tuple:
    return case_key(c, world=spec.world_size, backend=spec.backend)


def open_run_folder(out: Path, spec: SweepSpec, raw: dict, *, resume: bool, force: bool, seed: int,
                    command: str | None) -> set:
    """Check and write the folder's run.json, spec.yaml and env.json (the caller holds its lock); the recorded
    cases' keys. Records need ``resume``: the first spec.yaml and env.json stay, each resume is appended."""
    loaded = load_records(out)
    has_records = bool(loaded.records or loaded.torn_lines)
    if has_records and not resume:
        raise SpecError(f"--out: {out} already holds {len(loaded.records)} records; "
                        "pass --resume to continue that run or choose a new --out")
    folder = runfolder.RunFolder(out)
    grid = {"dtypes": spec.dtypes, "shapes": [asdict(s) for s in spec.shapes], "tokens": spec.tokens,
            "bias": spec.bias, "strategies": spec.labels, "env": spec.env}
    options = {"warmup": spec.warmup, "reps": spec.reps, "seed": seed, "world_size": spec.world_size,
               "backend": spec.backend}
    ident = runfolder.check_identity(
        out, runfolder.identity(grid, options, overlap_bench.__version__), has_records=has_records, force=force,
        records_options=[{"warmup": r.warmup, "reps": r.reps, "world_size": r.world, "backend": r.backend}
                         for r in loaded.records], listed_sha256=runfolder.grid_sha256(grid, listed=True))
    for name in (SCREEN, CONFIRM):  # another run's second stages: refused before anything is measured or written
        folder.check_stage(name, load_records(out, name).records, ident, None)
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
    return {r.key() for r in loaded.records}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_sweep(spec: SweepSpec, raw: dict, out_dir: str | os.PathLike, *, resume: bool = False,
              command: str | None = None, progress: bool = True, seed: int = 0, rank0: bool = True,
              force: bool = False, confirm: bool = True, confirm_repeats: int = CONFIRM_REPEATS,
              confirm_top: int = TOP) -> SweepResult:
    """Every case of ``spec`` not yet in ``out_dir``, then (``confirm``) the screen and confirmation, one job per
    env variant (:func:`run_variant`), under rank 0's folder lock; tables are written even on failure.
    ``force`` lets ``resume`` continue a folder of another spec or options."""
    out = Path(out_dir)
    check_memory(spec)
    claim = runfolder.RunFolder(out).claim("sweep", command=command or envinfo.command_line())
    with claim if rank0 else nullcontext():
        # The folder is rank 0's (on another node it may not be there): the other ranks run rank 0's case list.
        done = (open_run_folder(out, spec, raw, resume=resume, force=force, seed=seed, command=command)
                if rank0 else set())
        cases = spec.cases()
        todo = [c for c in cases if _key(c, spec) not in done]
        result = SweepResult(len(cases), len(cases) - len(todo))
        finished = result.skipped_done
        run = (runfolder.read_identity(out, strict=False) or {}).get("run_id") if rank0 else None
        stages = Stages(confirm_repeats, confirm_top, run) if confirm else None
        where = dict(top=confirm_top, world=spec.world_size, backend=spec.backend, run=run)
        before = {name: _candidates(out, name) for name in (SCREEN, CONFIRM)} if confirm and rank0 else {}
        # Variants whose first pass is done but not their second stages (a resume) still get a job.
        pending = {j.case.env for name in before for j in stage_jobs(out, name, **where)}
        try:
            for env, group in _by_variant(spec, todo, lambda c: c.env, result, "cases", pending):
                opts = BenchOptions(str(out), spec.warmup, spec.reps, seed, finished, len(cases), progress)
                launch(run_variant, (group, opts, stages, Env(env)),
                       JobConfig(spec.world_size, spec.backend, spec.timeout_s, env))
                finished += len(group)
            if before:
                result.screened, result.confirmed = (len(_candidates(out, n) - before[n]) for n in (SCREEN, CONFIRM))
                result.confirmed_before = len(before[CONFIRM])
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


def _by_variant(spec: SweepSpec, items: list, env_of: Callable[[Any], tuple], result: SweepResult,
                what: str, also: set[Env] | frozenset = frozenset()) -> Iterator[tuple[dict[str, str], list]]:
    """Each env variant of ``spec`` with its ``items`` (also empty where in ``also``), one job each. Variables are
    set before CUDA starts, so under torchrun only its own variant runs (others go to ``result.not_run``), and
    every rank joins it, even with an empty list (rank 0's runs)."""
    for env in spec.env:
        mine = [x for x in items if env_of(x) == Env(env)]
        if in_torchrun() and any(os.environ.get(k) != v for k, v in env.items()):
            want = " ".join(f"{k}={v}" for k, v in Env(env))
            if mine:
                result.not_run.append(f"{len(mine)} {what} need {want} set on the torchrun command")
            elif Env(env) in also:
                result.not_run.append(f"the confirmation of its buckets needs {want} set on the torchrun command")
        elif mine or in_torchrun() or Env(env) in also:
            yield dict(env), mine


@dataclass(frozen=True)
class ABJob:
    """One candidate of one bucket to measure against the baseline, interleaved (the screen or the confirmation)."""

    case: Case
    """The candidate's case, strategy and typed settings from its first-pass record."""
    tags: dict[str, Any]
    """What its records carry in ``extra`` besides the A/B tags (first-pass speedup, settings timed, screened)."""


def plan_stage(records: Iterable[Record], done: set[tuple], screen: dict | None = None, *, top: int = TOP,
               world: int | None = None, backend: str | None = None, run: str | None = None) -> list[ABJob]:
    """A second stage's candidates per bucket of the scored first pass, less those in ``done``: the screen's
    (:func:`confirm.shortlist`) without ``screen``, else the confirmation's (:func:`confirm.finalists` of
    ``screen``: bucket -> samples). Their records carry ``run`` (run.json's ``run_id``)."""
    at: dict[BucketKey, dict[str, Record]] = {}
    stamp = {"run": run} if run else {}
    for r in select.score(records):
        if world in (None, r.world) and backend in (None, r.backend) and r.ok and math.isfinite(r.t_ms):
            at.setdefault(r.bucket, {})[r.label] = r
    jobs = []
    for bucket, first in sorted(at.items()):
        speedups = {lab: r.speedup for lab, r in first.items()}
        if screen is None:
            labels, tags = confirm.shortlist(speedups, strategies.peers(), top), dict(stamp)
        else:
            mine = {lab: s for lab, s in screen.get(bucket, {}).items() if lab in first}
            labels, tags = confirm.finalists(speedups, mine, strategies.peers(), top), {"screened": len(mine), **stamp}
        for r in (first[lab] for lab in labels if (bucket, lab) not in done):
            settings = strategies.make_settings(r.strategy, r.settings)
            jobs.append(ABJob(Case(r.shape, r.K, r.N, r.M, r.dtype, bool(r.bias), r.strategy, settings, bucket.env),
                              {"first_pass_speedup": float(r.speedup), "candidates": len(first), **tags}))
    return jobs


def measure_stage(ctx: RankContext, jobs: list[ABJob], repeats: int, opts: BenchOptions, name: str) -> None:
    """Every rank's part of a second stage: each candidate against the baseline (``bench.run_ab``), recorded in
    the log ``name`` (``kind``: its stem)."""
    base = ("baseline", strategies.make_settings("baseline"))
    jobs, kind = same_cases(jobs, ctx), name.split(".")[0]
    with progress(kind, len(jobs), show=ctx.rank == 0 and opts.progress and bool(jobs)) as step:
        for job in jobs:
            run_ab(ctx, [job.case], (base, (job.case.strategy, job.case.settings)), repeats, opts, name, kind,
                   job.tags)
            step(f"{job.case.shape} M={job.case.M} {job.case.label}")


@dataclass(frozen=True)
class Stages:
    """The second stages a sweep's jobs run after their first pass."""

    repeats: int
    """Interleaved repeats per side in the confirmation (the screen takes ``SCREEN_REPEATS``)."""
    top: int
    """Candidates confirmed per bucket besides the peers."""
    run: str | None = None
    """The run's ``run_id`` (run.json), stamped on every screen and confirmation record."""


def run_variant(ctx: RankContext, cases: list[Case], opts: BenchOptions, stages: Stages | None, env: Env) -> None:
    """Every rank's function of one env variant's job: the first pass of ``cases``, then (``stages``) the screen
    and confirmation of its buckets, each planned by rank 0 from the folder (what they hold is not measured again)."""
    run_cases(ctx, cases, opts)
    if stages is None:
        return
    out, where = Path(opts.out_dir), dict(top=stages.top, world=ctx.world, backend=ctx.backend, run=stages.run)
    for name, reps in ((SCREEN, SCREEN_REPEATS), (CONFIRM, stages.repeats)):
        jobs = [j for j in stage_jobs(out, name, **where) if j.case.env == env] if ctx.rank == 0 else []
        measure_stage(ctx, jobs, reps, opts, name)


def stage_jobs(out: Path, name: str, *, top: int, world: int, backend: str, run: str | None = None) -> list[ABJob]:
    """The candidates stage ``name`` (``SCREEN``, ``CONFIRM``: from the screen so far) of ``out`` has yet to measure."""
    screen = confirm.by_bucket(confirm.load(out, SCREEN)) if name == CONFIRM else None
    return plan_stage(load_records(out).records, _candidates(out, name), screen, top=top, world=world,
                      backend=backend, run=run)


def _candidates(out: Path, name: str) -> set[tuple]:
    """The ``confirm.candidate_key`` of every candidate the log ``name`` holds whole."""
    return {confirm.candidate_key(r) for r in confirm.load(out, name)}


def finish_run(out: Path) -> None:
    """Tables (CSV, markdown) and the report from whatever records exist, so a failed sweep keeps them too."""
    loaded = load_records(out)
    if loaded.records:
        decisions = select.decide(loaded.records, confirm.load(out))
        report.write_tables(decisions, out)
        report.write_report(out, loaded, decisions)
