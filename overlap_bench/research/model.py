"""``overlap-bench model``: does a row-parallel overlap strategy still pay off inside a whole decoder prefill?

Every mode of :data:`MODES` runs the :mod:`.decoder` stack on the same weights and inputs, checked against
``baseline`` before it is timed; ``nocomm`` (no all-reduce) gives the comm share and each mode's model eta.
Rank 0 appends one ``Record`` (``kind: model``) per (M, mode) to ``model.jsonl`` after each M.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import statistics
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from rich.table import Table

from overlap_bench import check, metrics, runfolder, strategies
from overlap_bench.bench import agree_failure, try_case
from overlap_bench.errors import UserError
from overlap_bench.launch import JobConfig, RankContext, launch
from overlap_bench.metrics import DTYPES, is_reference, model_eta
from overlap_bench.metrics import TOLERANCE, rel_err, within_tolerance
from overlap_bench.policy import PolicyError, load_policy
from overlap_bench.presets import PRESETS, ModelPreset
from overlap_bench.records import Record
from overlap_bench.research import progress_bar
from overlap_bench.research.decoder import (ROW_LAYERS, Dims, LayerWeights, RowFn, build_stack, hidden_states,
                                            stack_forward)
from overlap_bench.research.nanobatch import NanoSettings, mode_plans
from overlap_bench.timing import Timing, allreduce_max, time_region
from overlap_bench.world import in_torchrun, resolve

log = logging.getLogger("overlap_bench.model")

MODES = ("baseline", *strategies.peers(), "policy", "rowwise", "rowwise+policy", "nanobatch", "nanobatch+policy",
         "nocomm")
"""Modes in the order they are checked and timed (interleaved in that order, round after round)."""
POLICY_MODES = ("policy", "rowwise+policy", "nanobatch+policy")
"""Modes that need a policy file (skipped without one)."""
TORCH_TP_MODES = ("rowwise", "rowwise+policy")
"""Modes whose row-parallel layers are ``parallelize_module``'s: torch's ``RowwiseParallel`` or the policy's style."""
REFERENCE_MODES = ("baseline", "nocomm")
"""Modes every run includes: the numerics reference and the communication share (model eta needs both)."""
MAX_ROUNDS = 3
"""The timed repetitions of each mode are split into up to this many rounds, modes interleaved per round."""


def strategy_row(choices: dict[str, tuple[str, Any]], group: dist.ProcessGroup | None = None) -> RowFn:
    """A row-parallel call running ``choices[layer] = (strategy, settings)`` (all-reduce inside)."""

    def row(layer: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        name, settings = choices[layer]
        return strategies.run(name, x, weight, None, group, settings)

    return row


def nocomm_row(layer: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The row-parallel product without its all-reduce (wrong sums; timing only)."""
    return torch.mm(x, weight.t())


# ---------------------------------------------------------------------------------------------- per rank

def _free(ctx: RankContext) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def _choices_text(choices: dict[str, tuple[str, Any]]) -> dict[str, str]:
    return {layer: strategies.label(name, settings) for layer, (name, settings) in choices.items()}


def _policy_meta_notes(policy, dtype: str, device_name: str) -> list[str]:
    notes = []
    meta = policy.meta or {}
    if meta.get("dtype") and meta["dtype"] != dtype:
        notes.append(f"policy tuned for {meta['dtype']}, run in {dtype}")
    if meta.get("device") and str(meta["device"]).replace(" ", "_").lower() != device_name.replace(" ", "_").lower():
        notes.append(f"policy tuned on {meta['device']}, run on {device_name}")
    return notes


def _policy_plan(policy, d: Dims, m: int, backend: str, notes: list[str]) -> dict[str, Any]:
    """What the ``policy`` mode runs at ``M = m``: the policy's choice per row-parallel layer."""
    picked = {layer: policy.choose(K=d.row_shape(layer)[0], N=d.hidden, M=m) for layer in ROW_LAYERS}
    choice = {layer: (c.strategy, c.settings) for layer, c in picked.items()}
    notes, unavailable = list(notes), []
    for layer, (name, settings) in choice.items():
        bn = strategies.backend_note(name, settings, backend)
        if bn and bn not in notes:
            notes.append(bn)
        why = strategies.unavailable_reason(name, settings, backend)
        if why:
            unavailable.append(f"{layer} {strategies.label(name, settings)}: {why}")
    plan = {"row": strategy_row(choice), "choices": _choices_text(choice),
            "choice_reasons": {layer: c.reason for layer, c in picked.items()}, "note": "; ".join(notes) or None}
    if unavailable:
        plan["unavailable"] = "; ".join(unavailable)
    return plan


def _plans(policy, d: Dims, m: int, backend: str, nano: NanoSettings, notes: list[str],
           styled: dict[str, RowFn]) -> dict[str, dict]:
    """Per mode at ``M = m``: its ``row`` (or ``forward``), ``choices`` text, ``note``, ``skip``/``unavailable``."""
    plan: dict[str, dict[str, Any]] = {}
    for name in ("baseline", *strategies.peers()):
        choice = {layer: (name, strategies.make_settings(name)) for layer in ROW_LAYERS}
        plan[name] = {"row": strategy_row(choice), "choices": _choices_text(choice),
                      "note": strategies.backend_note(name, choice["o_proj"][1], backend)}
    choose = None
    plan["rowwise"] = {"row": styled.get("rowwise"), "choices": {layer: "RowwiseParallel" for layer in ROW_LAYERS},
                       "note": "torch's parallelize_module + RowwiseParallel"}
    if policy is None:
        for mode in ("policy", "rowwise+policy"):
            plan[mode] = {"skip": f"no policy file given (--policy): {mode} mode skipped", "choices": None,
                          "note": None}
    else:
        plan["policy"] = _policy_plan(policy, d, m, backend, notes)
        plan["rowwise+policy"] = {**plan["policy"], "row": styled.get("rowwise+policy")}

        def choose(layer: str, rows: int) -> Any:
            return policy.choose(K=d.row_shape(layer)[0], N=d.hidden, M=rows)
    plan.update(mode_plans(nano, m, backend, choose, notes))
    plan["nocomm"] = {"row": nocomm_row, "choices": {layer: "nocomm" for layer in ROW_LAYERS},
                      "note": "row-parallel all-reduce skipped: timing only, numerics not checked"}
    return plan


def _check_modes(plan: dict[str, dict], modes: tuple[str, ...], weights: list[LayerWeights], x: torch.Tensor,
                 d: Dims, y_base: torch.Tensor, dtype: str, ctx: RankContext) -> dict[str, dict[str, Any]]:
    """Every mode's final hidden states against baseline's: its status, ``rel_err`` and reason."""
    status: dict[str, dict[str, Any]] = {"baseline": {"status": "ok", "rel_err": 0.0}}
    for mode in modes[1:]:
        info = plan[mode]
        if "skip" in info or "unavailable" in info:
            status[mode] = {"status": "skipped" if "skip" in info else "unavailable",
                            "reason": info.get("skip") or info["unavailable"]}
            continue
        y, err = try_case(lambda: _forward(info, weights, x, d))
        err = agree_failure(err, ctx)
        if err:
            status[mode] = {"status": "failed", "reason": err}
            _free(ctx)
            continue
        if mode == "nocomm":  # no all-reduce: nothing to compare, timed only
            status[mode] = {"status": "ok", "rel_err": math.nan}
            del y
            continue
        e = allreduce_max([rel_err(y, y_base)], None, ctx.device)[0]
        del y
        status[mode] = {"status": "ok", "rel_err": e} if within_tolerance(e, dtype) else {
            "status": "failed", "rel_err": e,
            "reason": f"rel_err {e:.3g} above the {dtype} tolerance {TOLERANCE[dtype]:g}"}
    return status


def _time_modes(plan: dict[str, dict], status: dict[str, dict[str, Any]], modes: tuple[str, ...],
                weights: list[LayerWeights], x: torch.Tensor, d: Dims, warmup: int, reps: int,
                ctx: RankContext, step: Callable[[str], None]) -> dict[str, list[Timing]]:
    """The modes that passed, interleaved in each round: per mode one ``Timing`` per round."""
    rounds = max(1, min(MAX_ROUNDS, reps))
    per_round = math.ceil(reps / rounds)
    times: dict[str, list[Timing]] = {mode: [] for mode in modes if status[mode]["status"] == "ok"}
    for r in range(rounds):
        for mode in list(times):
            info = plan[mode]
            t, err = try_case(lambda: time_region(lambda: _forward(info, weights, x, d),
                                                  warmup=warmup if r == 0 else min(warmup, 1), reps=per_round,
                                                  group=None, device=ctx.device))
            err = agree_failure(err, ctx)
            step(f"{mode}, round {r + 1}/{rounds}")
            if err:
                status[mode] = {**status[mode], "status": "failed", "reason": f"timing: {err}"}
                times.pop(mode)
                _free(ctx)
            else:
                times[mode].append(t)
    return times


def run_model(ctx: RankContext, preset: str, tokens: list[int], layers: int, policy_path: str | None,
              warmup: int, reps: int, out_dir: str, dtype: str = "bfloat16", seed: int = 0,
              modes: tuple[str, ...] = MODES, nano: NanoSettings | None = None,
              shapes_tp: int | None = None, env: dict[str, str] | None = None,
              done: frozenset[tuple[int, str]] = frozenset(), command: str = "", progress: bool = False) -> None:
    """Every rank's part of the model benchmark (``launch`` calls it); rank 0 appends to ``out_dir/model.jsonl``.
    ``shapes_tp``: per-rank shapes of this tp on fewer ranks; ``done``: (M, mode) rows recorded already."""
    nano = nano or NanoSettings()
    p = PRESETS[preset]
    tp = shapes_tp or ctx.world
    d = Dims.of(p, tp)
    dt = DTYPES[dtype]
    policy = load_policy(policy_path, expect_world=tp) if policy_path else None
    policy_notes = _policy_meta_notes(policy, dtype, ctx.device_name) if policy is not None else []
    shapes = {layer: list(d.row_shape(layer)) for layer in ROW_LAYERS}
    job = _Job(preset, d.hidden, dtype, ctx, dict(env or {}), warmup, reps, nano,
               {"tp": tp, "layers": layers, "shapes": shapes}, command)
    folder = runfolder.RunFolder(out_dir)
    todo = {m: tuple(mode for mode in modes if (m, mode) not in done or mode in REFERENCE_MODES)
            for m in tokens if any((m, mode) not in done for mode in modes)}
    rounds = max(1, min(MAX_ROUNDS, reps))

    def write(records: list[Record]) -> None:
        for r in records:
            if ctx.rank == 0 and (r.M, r.strategy) not in done:
                folder.append(r, runfolder.MODEL)

    weights, err = try_case(lambda: build_stack(p, tp, ctx.rank, layers, dtype=dt, device=ctx.device, seed=seed))
    err = agree_failure(err, ctx)
    if err:  # nothing can be measured at any M: record why and stop
        return write([job.record(m, mode, "failed", f"weights: {err}") for m, run in todo.items() for mode in run])

    styled: dict[str, RowFn] = {}
    if set(TORCH_TP_MODES) & set(modes):
        from overlap_bench.research.rowwise import torch_tp_rows  # torch.distributed.tensor: 0.6 s, only here

        styled = torch_tp_rows(weights, ctx.device, ctx.world, policy)

    finished = 0  # progress steps: one per mode and timing round
    with progress_bar("model", sum(map(len, todo.values())) * rounds, progress and ctx.rank == 0) as step:
        for m, run in todo.items():
            step(f"M={m}", advance=0, completed=finished)  # modes that failed their check were not timed
            finished += len(run) * rounds
            plan = _plans(policy, d, m, ctx.backend, nano, policy_notes, styled)
            if ctx.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(ctx.device)
            x, err = try_case(lambda: hidden_states(m, d.hidden, dtype=dt, device=ctx.device, seed=seed))
            err = agree_failure(err, ctx)
            y_base = None
            if not err:
                if ctx.world > 1:
                    dist.broadcast(x, src=0)  # identical on every rank whatever the RNG does on each device
                y_base, err = try_case(lambda: _forward(plan["baseline"], weights, x, d))
                err = agree_failure(err, ctx)
                err = err and f"baseline forward: {err}"
            else:
                err = f"inputs: {err}"
            if err:
                write([job.record(m, mode, "failed", err, {"choices": plan[mode].get("choices")}) for mode in run])
                del x, y_base
                _free(ctx)
                continue
            status = _check_modes(plan, run, weights, x, d, y_base, dtype, ctx)
            del y_base
            times = _time_modes(plan, status, run, weights, x, d, warmup, reps, ctx, lambda what: step(f"M={m} {what}"))
            del x
            _free(ctx)
            write(_records_at(job, m, run, plan, status, times, ctx, policy_path))
        step("done", advance=0, completed=finished)


def _records_at(job: "_Job", m: int, run: tuple[str, ...], plan: dict[str, dict], status: dict[str, dict[str, Any]],
                times: dict[str, list[Timing]], ctx: RankContext, policy_path: str | None) -> list[Record]:
    """The records of the modes ``run`` at ``M = m`` from their checks and rounds' times."""
    peak_gib = None
    if ctx.device.type == "cuda":
        peak_gib = allreduce_max([torch.cuda.max_memory_allocated(ctx.device) / 2**30], None, ctx.device)[0]
    medians = {mode: [t.median_ms for t in v] for mode, v in times.items()}
    iqr = {mode: max(t.iqr_ms for t in v) for mode, v in times.items()}  # the widest round's
    t_ms = {mode: statistics.median(v) for mode, v in medians.items()}
    t_base, t_nocomm = t_ms.get("baseline", math.nan), t_ms.get("nocomm", math.nan)
    comm_share = None
    if "baseline" in t_ms and "nocomm" in t_ms:
        comm_share = (t_base - t_ms["nocomm"]) / t_base
    # The share is hideable only above the spread of the two references' times; at world 1 nothing is
    # communicated, so any difference is noise and there is no model eta.
    noise = max(iqr[k] for k in REFERENCE_MODES) if all(t_ms.get(k) for k in REFERENCE_MODES) else 0.0
    noise = math.inf if ctx.world == 1 else noise
    records = []
    for mode in run:
        st, info = status[mode], plan[mode]
        t = t_ms.get(mode, math.nan)  # NaN unless it passed and was timed
        records.append(job.record(
            m, mode, st["status"], st.get("reason"), note=info.get("note"), rel_err=st.get("rel_err", math.nan),
            t_ms=t, t_iqr_ms=iqr.get(mode, math.nan), t_base_ms=t_base, t_base_iqr_ms=iqr.get("baseline", math.nan),
            tokens_per_s=metrics.tokens_per_s(m, t), speedup=metrics.speedup(t_base, t),
            eta=model_eta(t_base, t, t_nocomm, noise),
            extra=dict(comm_share=comm_share if mode == "baseline" else None, t_nocomm_ms=t_ms.get("nocomm"),
                       t_rounds_ms=medians.get(mode), nanobatch=info.get("nanobatch"), choices=info.get("choices"),
                       choice_reasons=info.get("choice_reasons"),
                       policy_path=str(policy_path) if (mode == "policy" and policy_path) else None,
                       peak_mem_gib=peak_gib)))
    if ctx.rank == 0:
        log.info("%s tp=%s M=%d: %s", job.fields["shape"], job.extra["tp"], m,
                 ", ".join(f"{k}={v:.2f} ms" for k, v in t_ms.items()))
    return records


class _Job:
    """What every record of one model job shares, and how a record of it is made."""

    def __init__(self, preset: str, hidden: int, dtype: str, ctx: RankContext, env: dict[str, str], warmup: int,
                 reps: int, nano: NanoSettings, extra: dict[str, Any], command: str):
        self.fields = dict(kind="model", shape=preset, K=0, N=hidden, dtype=dtype, world=ctx.world,
                           backend=ctx.backend, device=ctx.device_name, env=env, tol=TOLERANCE[dtype],
                           warmup=warmup, reps=reps)
        self.nano, self.extra, self.command = nano, extra, command

    def record(self, m: int, mode: str, status: str, reason: str | None = None, extra: dict[str, Any] | None = None,
               **fields: Any) -> Record:
        """Mode ``mode`` at ``M = m`` with these Record ``fields``; ``extra``'s non-None values join the job's."""
        return Record(**self.fields, **fields, M=m, strategy=mode, label=mode, status=status, reason=reason,
                      settings=asdict(self.nano) if mode.startswith("nanobatch") else {},
                      repro=_repro(self.command, m, mode, self.nano), time=runfolder.utc_now(),
                      extra={**self.extra, **{k: v for k, v in (extra or {}).items() if v is not None}})


def _command(preset: str, world: int, backend: str, layers: int, dtype: str, warmup: int, reps: int,
             shapes_tp: int | None, policy_path: str | None, env: dict[str, str]) -> str:
    """The ``overlap-bench model`` command of a job; :func:`_repro` adds a row's M and mode."""
    cmd = [*(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())), "overlap-bench model", "--preset", preset,
           "--nproc", str(world), "--backend", backend, "--layers", str(layers), "--dtype", dtype,
           "--warmup", str(warmup), "--reps", str(reps)]
    cmd += ["--shapes-tp", str(shapes_tp)] if shapes_tp else []
    cmd += ["--policy", shlex.quote(str(policy_path))] if policy_path else []
    return " ".join(cmd)


def _repro(command: str, m: int, mode: str, nano: NanoSettings) -> str:
    """The command that measures one (M, mode) row again; also the row's identity for ``--resume``."""
    flags = (f" --nanobatches {nano.nanobatches} --nano-comm {nano.comm} --nano-attention {nano.attention}"
             + (" --nano-priority" if nano.priority else "")) if mode.startswith("nanobatch") else ""
    return f"{command} --tokens {m} --mode {shlex.quote(mode)}{flags}"


def _forward(info: dict[str, Any], weights: list[LayerWeights], x: torch.Tensor, d: Dims) -> torch.Tensor:
    """One prefill forward of a planned mode: its own schedule (``forward``) or the layer loop with its ``row``."""
    if "forward" in info:
        return info["forward"](weights, x, d)
    return stack_forward(weights, x, d, info["row"])


# ---------------------------------------------------------------------------------------------- launcher

def validate(preset: str, tp: int, tokens: list[int], layers: int, dtype: str, warmup: int, reps: int,
             modes: tuple[str, ...] = MODES, nano: NanoSettings | None = None, tp_flag: str = "--tp") -> ModelPreset:
    """Check the inputs: a one-line :class:`UserError` naming the field (``tp_flag``: the flag that set ``tp``)."""
    if preset not in PRESETS:
        raise UserError(f"--preset: unknown preset '{preset}' (known: {', '.join(PRESETS)})")
    p = PRESETS[preset]
    check.integer(tp, tp_flag, 1)
    for name in ("heads", "kv_heads", "intermediate"):
        value = getattr(p, name)
        if value % tp:
            fits = ", ".join(str(t) for t in range(1, 9) if p.heads % t == 0 and p.kv_heads % t == 0
                             and p.intermediate % t == 0)
            raise UserError(f"{tp_flag} {tp}: {preset} {name}={value} is not divisible by tp={tp}; "
                            f"use a {tp_flag} that divides heads, kv_heads and intermediate (e.g. {fits})")
    if not tokens:
        raise UserError("--tokens: give at least one token count, e.g. 8192,16384,32768")
    for t in tokens:
        check.integer(t, "--tokens", 1)
    check.integer(layers, "--layers", 1)
    if dtype not in DTYPES:
        raise UserError(f"--dtype: unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    check.integer(warmup, "--warmup", 0)
    check.integer(reps, "--reps", 1)
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise UserError(f"--mode: unknown mode '{unknown[0] if unknown else ''}'; use a comma-separated list of "
                        f"{', '.join(MODES)} (baseline and nocomm always run)")
    if nano is not None and any(mode.startswith("nanobatch") for mode in modes) and nano.nanobatches > min(tokens):
        raise UserError(f"--nanobatches {nano.nanobatches} is more than the smallest token count {min(tokens)}; "
                        "use --nanobatches <= every --tokens value")
    return p


def _check_policy(path: str | os.PathLike, tp: int) -> dict[str, str]:
    """Load the policy once in the launcher (bad files fail before any rank starts); its required env."""
    try:
        pol = load_policy(path, expect_world=tp)
    except PolicyError as e:
        raise UserError(f"--policy: {e}") from None
    env = pol.meta.get("required_env") or {}
    if not isinstance(env, dict):
        raise UserError(f"--policy: {path}: meta.required_env must be a mapping of variables, got {env!r}")
    return {str(k): str(v) for k, v in env.items()}


def scale_note(preset: str, tp: int, tokens: list[int], layers: int, dtype: str) -> str | None:
    """A one-line note when this job is far too large for CPUs (over a TFLOP of GEMMs per forward)."""
    d = Dims.of(PRESETS[preset], tp)
    params = layers * d.hidden * (2 * (d.heads + d.kv_heads) * d.head_dim + 3 * d.intermediate)
    tflop = 2 * max(tokens) * params / 1e12
    if tflop < 1:
        return None
    return (f"{preset} in {dtype} on CPU: {params * DTYPES[dtype].itemsize / 2**30:.1f} GiB of weights and "
            f"{tflop:.0f} TFLOP per forward per rank at M={max(tokens)} (hours here); for a small run use "
            "--preset tiny --dtype float32")


def model_main(preset: str | None, tp_world: int | None, tokens: list[int] | None, layers: int,
               policy: str | os.PathLike | None, dtype: str | None, warmup: int, reps: int,
               out_dir: str | os.PathLike, backend: str | None = None, nproc: int | None = None, *, seed: int = 0,
               timeout_s: float = 600.0, modes: tuple[str, ...] = MODES, nano: NanoSettings | None = None,
               shapes_tp: int | None = None, resume: bool = False, progress: bool = False) -> list[Record]:
    """Run the model benchmark on ``tp`` ranks (None: every rank); rank 0's records of this job (others: []).
    None ``preset``/``dtype``/``tokens``: the machine's default; ``resume``: record only the rows not yet there."""
    gpu = resolve(backend, 1)[0] == "nccl"  # the backend only: the ranks are resolved below
    preset, dtype = preset or ("qwen2.5-72b" if gpu else "tiny"), dtype or ("bfloat16" if gpu else "float32")
    tokens = list(tokens or ((8192, 16384, 32768) if gpu else (64, 256)))
    validate(preset, tp_world or 1, tokens, layers, dtype, warmup, reps, modes, nano)  # before resolve
    if policy is None and modes != MODES and set(POLICY_MODES) & set(modes):
        raise UserError("--policy: the policy modes need a policy file; give --policy P.yaml (from "
                        f"`overlap-bench export`) or leave {', '.join(POLICY_MODES)} out of --mode")
    if tp_world is not None and nproc is not None and tp_world != nproc:
        raise UserError(f"--tp {tp_world} and --nproc {nproc} differ: the model runs one rank per tensor-parallel "
                        "shard; give one of them")
    backend, world = resolve(backend, nproc if nproc is not None else tp_world)
    if tp_world is not None and world != tp_world:
        raise UserError(f"--tp {tp_world} but the torchrun job has WORLD_SIZE={world}; start torchrun with "
                        f"--nproc-per-node {tp_world} or pass --tp {world}")
    if shapes_tp is not None and shapes_tp < world:
        raise UserError(f"--shapes-tp {shapes_tp} is less than the {world} ranks; give --shapes-tp >= {world} "
                        "or leave it out")
    tp = shapes_tp or world
    validate(preset, tp, tokens, layers, dtype, warmup, reps, modes, nano, "--shapes-tp" if shapes_tp else "--tp")
    modes = tuple(mode for mode in MODES if mode in modes or mode in REFERENCE_MODES)
    nano = nano or NanoSettings()
    policy_path = None if policy is None else str(Path(policy))
    env = _check_policy(policy_path, tp) if policy_path else {}
    missing = {k: v for k, v in env.items() if os.environ.get(k) != v}
    if in_torchrun() and missing:
        want = " ".join(f"{k}={v}" for k, v in missing.items())
        raise UserError(f"--policy: {policy_path} needs {want} set before CUDA starts; set it on the torchrun command")
    note = scale_note(preset, tp, tokens, layers, dtype) if not gpu else None
    if note:
        log.warning("note: %s", note)
    command = _command(preset, world, backend, layers, dtype, warmup, reps, shapes_tp, policy_path, env)
    order = {_repro(command, m, mode, nano): i for i, (m, mode) in enumerate((m, x) for m in tokens for x in modes)}
    rank0 = not in_torchrun() or os.environ.get("RANK", "0") == "0"
    folder = runfolder.RunFolder(out_dir)
    with folder.claim("model") if rank0 else nullcontext():  # one writer per folder, a model run's
        loaded = folder.load(runfolder.MODEL)
        if (loaded.records or loaded.torn_lines) and not resume:
            raise UserError(f"--out: {folder.path} already holds {len(loaded.records)} model records; pass --resume "
                            "to continue that run or choose a new --out")
        done = frozenset((r.M, r.strategy) for r in loaded.records if r.repro in order)
        if rank0 and not loaded.records:
            folder.write_env()
        args = (preset, tokens, layers, policy_path, warmup, reps, str(folder.path), dtype, seed, modes, nano,
                shapes_tp, env, done, command, progress)
        if len(done) < len(order):  # else every row is recorded already
            launch(run_model, args, JobConfig(world, backend, timeout_s, env))
        if not rank0:
            return []
        mine = [r for r in folder.load(runfolder.MODEL).records if r.repro in order]
        return sorted(mine, key=lambda r: order[r.repro])


# ---------------------------------------------------------------------------------------------- table

def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _spread(r: Record) -> float:
    """A time's spread: the larger of its calls' IQR and the range of its rounds' medians (NaN if not timed)."""
    rounds = r.extra.get("t_rounds_ms") or []
    return max((v for v in (r.t_iqr_ms, max(rounds, default=0) - min(rounds, default=0)) if v >= 0),
               default=math.nan)


def model_table(records: list[Record], title: str | None = None) -> Table:
    """A rich table, one row per (M, mode): time (spread), tokens/s, speedup (``~``: within the larger spread of it
    and baseline's), comm share, model eta, rel_err."""
    if title is None and records:
        r, x = records[0], records[0].extra
        ranks = f" shapes on {r.world} rank(s)" if r.world != x.get("tp", r.world) else ""
        title = (f"{r.shape} x{x.get('layers', '?')} layers, tp={x.get('tp', r.world)}{ranks} "
                 f"({r.backend}, {r.device}), {r.dtype}")
    t = Table(title=title, caption="(spread): the larger of the IQR and the rounds' range")
    base = {r.M: _spread(r) for r in records if is_reference(r.label)}
    for c in ("M", "mode", "ms (spread)", "tokens/s", "speedup vs baseline", "comm share", "eta (model)", "rel_err",
              "notes"):
        t.add_column(c, justify="left" if c in ("mode", "notes") else "right")
    for r in records:
        notes, x = [], r.extra
        if not r.ok:
            notes.append(f"[red]{r.status}[/]: {r.reason}")
        if r.strategy in POLICY_MODES and x.get("choices"):
            notes.append(", ".join(f"{k}={v}" for k, v in x["choices"].items()))
        if r.strategy == "nocomm" and r.ok:
            notes.append("no all-reduce (timing only)")
        nb = x.get("nanobatch")
        if nb and nb.get("rows"):
            notes.append(f"{nb['nanobatches']} nano-batches ({'/'.join(map(str, nb['rows']))} rows), "
                         f"comm={nb['comm']}" + (", priority" if nb.get("priority") else ""))
        share = x.get("comm_share")
        spread = _spread(r)
        near = not is_reference(r.label) and abs(r.t_base_ms - r.t_ms) <= max(spread, base.get(r.M, r.t_base_iqr_ms))
        if near:
            t.caption = "(spread): the larger of the IQR and the rounds' range; ~: speedup within spread"
        t.add_row(str(r.M), r.label, _fmt(r.t_ms, ".2f") + (f" ({spread:.2f})" if spread >= 0 else ""),
                  _fmt(r.tokens_per_s, ",.0f"), _fmt(r.speedup, ".3f") + (" ~" if near else ""),
                  "-" if share is None else _fmt(share * 100, ".1f") + "%", _fmt(r.eta, ".2f"),
                  _fmt(r.rel_err, ".1e"), "; ".join(notes))
    return t
