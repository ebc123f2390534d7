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
from overlap_bench.records import CONFIRM, SCREEN, Record, load_records
from overlap_bench.spec import Case, SpecError, SweepSpec, check_memory
from overlap_bench.stats import SCREEN_REPEATS

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
    screened: int = 0
    """Candidates re-measured by the screen in this call."""
    confirmed: int = 0
    """Candidates re-measured by the confirmation in this call (0 with ``confirm=False``)."""
    confirmed_before: int = 0
    """Candidates already confirmed in the folder (``--resume``): not measured again."""


def _key(c: Case, spec: SweepSpec) -> tuple:
    return case_key(c, world=spec.world_size, backend=spec.backend)


def open_run_folder(out: Path, spec: SweepSpec, raw: dict, *, resume: bool, force: bool, seed: int,
                    command: str | None) -> tuple[set, list[int]]:
    """Check and write a run folder's identity, spec.yaml and env.json (the caller holds its lock); returns the
    keys of the cases already recorded and the torn lines found; refuses to mix runs without ``resume``.
    Nothing already there is overwritten on resume: the first spec.yaml and env.json stay, and the resume is
    appended to ``run.json`` (and its environment to ``env.json``)."""
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
    return {r.key() for r in loaded.records}, loaded.torn_lines


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
    continue a folder made by another spec or options (``runfolder.check_identity``). With ``confirm`` the
    first pass is followed by the screen and the confirmation (:mod:`overlap_bench.confirm`), each candidate
    measured interleaved with the baseline, ``confirm_repeats`` repeats each in the confirmation."""
    out = Path(out_dir)
    check_memory(spec)
    with runfolder.lock(out, command=command or envinfo.command_line()) if rank0 else nullcontext():
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
            _second_stages(spec, out, seed, *stage, result)
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
class ABJob:
    """One candidate of one bucket to measure against the baseline, interleaved (the screen or the confirmation)."""

    case: Case
    """The bucket's baseline case (shape, M, dtype, bias, env: the job's variables)."""
    candidate: tuple[str, Any]
    """The candidate's strategy and typed settings, from its first-pass record."""
    tags: dict[str, Any]
    """What its records carry in ``extra`` besides the A/B tags (first-pass speedup, settings timed, screened)."""


def plan_stage(records: Iterable[Record], done: set[tuple], screen: dict | None = None, *, top: int = TOP,
               world: int | None = None, backend: str | None = None) -> list[ABJob]:
    """A second stage's candidates per bucket of the scored first pass: the screen's (:func:`confirm.shortlist`)
    with ``screen`` None, else the confirmation's (:func:`confirm.finalists` of ``screen``: bucket -> the screen's
    samples); the ``confirm.candidate_key`` values in ``done`` are left out (a resumed sweep has them)."""
    at: dict[BucketKey, dict[str, Record]] = {}
    for r in select.score(records):
        if (world in (None, r.world) and backend in (None, r.backend)) and r.ok and math.isfinite(r.t_ms):
            at.setdefault(r.bucket, {})[r.label] = r
    jobs = []
    base = strategies.make_settings("baseline")
    for bucket, first in sorted(at.items()):
        speedups = {lab: r.speedup for lab, r in first.items()}
        if screen is None:
            labels, tags = confirm.shortlist(speedups, strategies.peers(), top), {}
        else:
            mine = {lab: s for lab, s in screen.get(bucket, {}).items() if lab in first}
            labels, tags = confirm.finalists(speedups, mine, strategies.peers(), top), {"screened": len(mine)}
        for r in (first[lab] for lab in labels if (bucket, lab) not in done):
            case = Case(r.shape, r.K, r.N, r.M, r.dtype, bool(r.bias), "baseline", base, bucket.env)
            jobs.append(ABJob(case, (r.strategy, strategies.make_settings(r.strategy, r.settings)),
                              {"first_pass_speedup": float(r.speedup), "candidates": len(first), **tags}))
    return jobs


def measure_stage(ctx: RankContext, jobs: list[ABJob], repeats: int, opts: BenchOptions, name: str,
                  kind: str) -> None:
    """Every rank's function of a second-stage job: each candidate against the baseline (``bench.run_ab``);
    rank 0 appends the records (``kind``) to the log ``name``."""
    for job in same_cases(jobs, ctx):
        run_ab(ctx, [job.case], (("baseline", job.case.settings), job.candidate), repeats, opts, name, kind,
               job.tags)


def _second_stages(spec: SweepSpec, out: Path, seed: int, repeats: int, top: int, result: SweepResult) -> None:
    """The screen, then the confirmation; candidates already in ``screen.jsonl`` / ``confirm.jsonl`` are not
    measured again."""
    first = load_records(out).records
    where = dict(top=top, world=spec.world_size, backend=spec.backend)
    screened = {confirm.candidate_key(r) for r in confirm.load(out, SCREEN)}
    result.screened = _launch_stage(spec, out, seed, plan_stage(first, screened, **where), SCREEN_REPEATS, SCREEN)
    done = {confirm.candidate_key(r) for r in confirm.load(out)}
    result.confirmed_before = len(done)
    jobs = plan_stage(first, done, confirm.by_bucket(confirm.load(out, SCREEN)), **where)
    result.confirmed = _launch_stage(spec, out, seed, jobs, repeats, CONFIRM)


def _launch_stage(spec: SweepSpec, out: Path, seed: int, jobs: list[ABJob], repeats: int, name: str) -> int:
    """One job per environment variant (its variables must be set before CUDA starts) with its buckets' jobs;
    returns the candidates measured."""
    n = 0
    for env in spec.env:
        mine = [j for j in jobs if j.case.env == Env(env)]
        if not mine and not in_torchrun():
            continue
        if in_torchrun() and any(os.environ.get(k) != v for k, v in env.items()):
            continue  # the first pass reported it in not_run already
        opts = BenchOptions(str(out), spec.warmup, spec.reps, seed, 0, 0, False)
        launch(measure_stage, (mine, repeats, opts, name, name.split(".")[0]),
               JobConfig(spec.world_size, spec.backend, spec.timeout_s, dict(env)))
        n += len(mine)
    return n


def finish_run(out: Path) -> None:
    """Tables (CSV, markdown) and the report from whatever records exist, so a failed sweep keeps them too."""
    loaded = load_records(out)
    if not loaded.records:
        return
    decisions = select.decide(loaded.records, confirm.load(out))
    report.write_tables(decisions, out)
    report.write_report(out, loaded, decisions)
