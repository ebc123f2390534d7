"""The sweep driver (launcher side): run directory, resume, one job per environment variant, tables at the end."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import yaml

from overlap_bench import envinfo
from overlap_bench.bench import BenchOptions, run_cases
from overlap_bench.launch import JobConfig, in_torchrun, launch
from overlap_bench.records import case_key, load_records, write_atomic
from overlap_bench.spec import Case, SpecError, SweepSpec

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


def _key(c: Case, spec: SweepSpec) -> tuple:
    return case_key(c.shape, c.K, c.N, c.M, c.dtype, c.bias, c.label, c.env_dict, spec.world_size, spec.backend)


def prepare_out_dir(out_dir: Path, resume: bool) -> tuple[set, list[int]]:
    """Keys of the cases already recorded, and torn lines found; refuses to mix runs without ``--resume``."""
    loaded = load_records(out_dir)
    if (loaded.records or loaded.torn_lines) and not resume:
        raise SpecError(f"--out: {out_dir} already holds {len(loaded.records)} records; "
                        "pass --resume to continue that run or choose a new --out")
    return {r.key() for r in loaded.records}, loaded.torn_lines


def run_sweep(spec: SweepSpec, raw: dict, out_dir: str | os.PathLike, *, resume: bool = False,
              command: str | None = None, progress: bool = True, seed: int = 0, rank0: bool = True) -> SweepResult:
    """Run every case of ``spec`` not yet recorded in ``out_dir``; tables are written even on failure."""
    out = Path(out_dir)
    done, torn = prepare_out_dir(out, resume)
    cases = spec.cases()
    todo = [c for c in cases if _key(c, spec) not in done]
    result = SweepResult(out, len(cases), len(cases) - len(todo), torn)
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "spec.yaml", yaml.safe_dump(raw, sort_keys=False))
        write_atomic(out / "env.json", json.dumps(envinfo.collect(command), indent=2) + "\n")
    finished = result.skipped_done
    try:
        for env, group in groupby(todo, key=lambda c: c.env):
            group = list(group)
            if in_torchrun() and any(os.environ.get(k) != v for k, v in env):
                # The variables must be set before CUDA starts: torchrun has to be started with them.
                want = " ".join(f"{k}={v}" for k, v in env)
                result.not_run.append(f"{len(group)} cases need {want} set on the torchrun command")
                continue
            opts = BenchOptions(str(out), spec.warmup, spec.reps, seed, finished, len(cases), progress)
            launch(run_cases, (group, opts), JobConfig(spec.world_size, spec.backend, spec.timeout_s, dict(env)))
            finished += len(group)
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


def finish_run(out: Path) -> None:
    """Tables (CSV, markdown) and the report from whatever records exist, so a failed sweep keeps them too."""
    loaded = load_records(out)
    if not loaded.records:
        return
    from overlap_bench import analysis, report

    analysis.write_tables(analysis.frame(loaded.records), out)
    report.write_report(out)
