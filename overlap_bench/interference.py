"""``overlap-bench interference``: what communication costs the GEMM, measured on one GPU.

For each shape and M, the row-parallel GEMM (``x [M, K] @ w[N, K]^T``) is timed alone (the reference) and

- beside ``k`` CTAs of a communication-like kernel (:mod:`overlap_bench.comm_like`) on a high-priority
  stream, launched first and running longer than the GEMM, each CTA reading and writing ``cta_gbps`` GB/s;
- beside full-speed copies on a side stream (``d2d``: same-device ``copy_``; ``h2d``/``d2h``: to or from
  pinned host memory), also launched first and longer than the GEMM. Whether a path runs on a copy engine is
  checked, not assumed: its time alone is compared with its time while spinning CTAs hold every SM (a copy
  engine does not wait for them; a copy the driver runs as a kernel does);
- alone inside a green context of N SMs.

Every repetition of every block (references included) lasts the same wall time, the side work's length,
so the GPU's power and clock state is the same for all of them. Every condition is bracketed by references (``ref, c1, ref, c2, ..., ref``; the order reverses every round),
so a slowdown is ``t_condition / mean(ref before, ref after) - 1``; over rounds the median is reported with
its range, and a reference drift (``|after - before| / mean``) larger than that range (or than the
references' own IQR) is flagged. Each side-work launch is checked from GPU timestamps: its CTAs started
before the GEMM and ended after it, on distinct SMs, at the asked rate; the green context's SMs are counted
by launching the kernel on its stream. Each condition's GEMM output is checked against the reference's.

Records (:class:`overlap_bench.records.Record`, strategy ``interference``) go to ``records.jsonl``, one per
shape, M and condition, with the slowdown and the checks under ``extra``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from overlap_bench import eta_bound, metrics
from overlap_bench.errors import UserError
from overlap_bench.markdown import cell, table
from overlap_bench.records import Record, RecordWriter, json_safe, load_records, records_frame, write_atomic
from overlap_bench.spec import Shape

STRATEGY = "interference"
"""``Record.strategy`` of every interference record."""
COPY_PATHS = ("d2d", "h2d", "d2h")
DEFAULT_CTAS = (1, 4, 8, 16, 24, 32)
DEFAULT_SMS = ("all", "all-8", "all-16", "all-32")
DEFAULT_CTA_GBPS = 14.0
"""GB/s each CTA reads (and writes): what one NCCL ring channel sends over NVLink, busbw / channels, from the
committed 4x H100 tp=4 records (busbw about 330 GB/s for the 256 MiB all-reduce) over about 24 channels."""
DEFAULT_COMM_CTAS = 24.0
"""CTAs an NCCL ring all-reduce is assumed to hold when predicting (its channel count; ``--comm-ctas``)."""
SLICE_ELEMS = 8 * 1024 * 1024
"""float32 elements of each CTA's own slice (32 MiB): the CTAs stream through HBM, not through L2."""
COPY_BYTES = 256 * 1024 * 1024
COVERED_MIN = 0.9
"""A condition whose side work covered the GEMM in fewer of its repetitions is marked in the table."""


@dataclass(frozen=True)
class Condition:
    """One thing placed beside (or around) the GEMM."""

    kind: str
    """``ref`` (alone), ``ctas``, ``copy`` or ``green``."""
    value: Any = None
    """CTAs (``ctas``), path (``copy``: d2d, h2d) or SMs given to the GEMM (``green``)."""
    rate: float = 0.0
    """GB/s per CTA (``ctas`` only; 0 = full speed)."""

    @property
    def label(self) -> str:
        """Canonical text, e.g. ``ctas:k=8,gbps=14``, ``copy:d2d``, ``green:sms=124``."""
        if self.kind == "ctas":
            return f"ctas:k={self.value},gbps={self.rate:g}"
        if self.kind == "copy":
            return f"copy:{self.value}"
        if self.kind == "green":
            return f"green:sms={self.value}"
        return "alone"

    @property
    def settings(self) -> dict[str, Any]:
        """The record's ``settings``."""
        if self.kind == "ctas":
            return {"beside": "ctas", "ctas": self.value, "cta_gbps": self.rate}
        if self.kind == "copy":
            return {"beside": "copy", "copy": self.value}
        return {"beside": "green", "sms": self.value}


@dataclass
class InterferenceConfig:
    """What one ``overlap-bench interference`` run measures."""

    shapes: list[Shape]
    """Row-parallel GEMM shapes (K per rank, N)."""
    tokens: list[int]
    """Token counts M."""
    dtype: str = "bfloat16"
    ctas: list[int] = field(default_factory=lambda: list(DEFAULT_CTAS))
    """CTA counts of the communication-like kernel."""
    cta_gbps: list[float] = field(default_factory=lambda: [DEFAULT_CTA_GBPS])
    """Per-CTA rates (GB/s read and as much written); 0 = full speed. Every k runs at every rate."""
    copies: list[str] = field(default_factory=lambda: list(COPY_PATHS))
    """Copy-engine paths: ``d2d``, ``h2d``."""
    sms: list[str] = field(default_factory=lambda: list(DEFAULT_SMS))
    """Green-context sizes: ``all``, ``all-N`` or a count."""
    rounds: int = 2
    """Passes over the conditions (order reversed every other pass)."""
    warmup: int = 3
    """Untimed repetitions at the start of every block."""
    reps: int = 15
    """Timed repetitions per block (one condition, or one reference, in one round)."""
    seed: int = 0

    def conditions(self, total_sms: int) -> list[Condition]:
        """The conditions in measurement order (green sizes resolved against the device's SM count)."""
        out = [Condition("ctas", k, r) for r in self.cta_gbps for k in self.ctas]
        out += [Condition("copy", p) for p in self.copies]
        out += [Condition("green", resolve_sms(s, total_sms)) for s in self.sms]
        return out


# ------------------------------------------------------------------------------------------ input parsing

def _items(text: str) -> list[str]:
    return [] if text.strip().lower() in ("", "none") else [t.strip() for t in text.split(",") if t.strip()]


def parse_ctas(text: str) -> list[int]:
    """``--ctas``: comma-separated CTA counts >= 1 (``none``: skip)."""
    out = []
    for t in _items(text):
        if not t.isdigit() or int(t) < 1:
            raise UserError(f"--ctas: '{t}' must be an integer >= 1, e.g. --ctas 1,4,8,16,24,32")
        out.append(int(t))
    return sorted(set(out))


def parse_rates(text: str) -> list[float]:
    """``--cta-gbps``: comma-separated GB/s per CTA, >= 0 (0 = full speed)."""
    out = []
    for t in _items(text):
        try:
            v = float(t)
        except ValueError:
            v = -1.0
        if not math.isfinite(v) or v < 0:
            raise UserError(f"--cta-gbps: '{t}' must be a number >= 0 (GB/s per CTA; 0 = full speed)")
        out.append(v)
    if not out:
        raise UserError("--cta-gbps: give at least one rate, e.g. --cta-gbps 14")
    return out


def parse_copies(text: str) -> list[str]:
    """``--copy``: any of d2d, h2d (``none``: skip)."""
    out = _items(text)
    for t in out:
        if t not in COPY_PATHS:
            raise UserError(f"--copy: '{t}' is not one of {', '.join(COPY_PATHS)} (or none)")
    return list(dict.fromkeys(out))


def parse_sms(text: str) -> list[str]:
    """``--sms``: ``all``, ``all-N`` or a count, comma-separated (``none``: skip); checked for syntax here and
    against the device's SM count by :func:`resolve_sms`."""
    out = _items(text)
    for t in out:
        rest = t[3:] if t.startswith("all") else t
        if t != "all" and not (rest.startswith("-") and rest[1:].isdigit()) and not t.isdigit():
            raise UserError(f"--sms: '{t}' must be all, all-N or a count, e.g. --sms all,all-8,all-16,all-32")
    return list(dict.fromkeys(out))


def resolve_sms(text: str, total: int) -> int:
    """The SM count ``text`` names on a device of ``total`` SMs."""
    n = total if text == "all" else total - int(text[4:]) if text.startswith("all-") else int(text)
    if not 1 <= n <= total:
        raise UserError(f"--sms: '{text}' is {n} SMs; this GPU has {total}, give 1..{total}")
    return n


# ------------------------------------------------------------------------------------------ statistics

@dataclass(frozen=True)
class Bracketed:
    """A condition's slowdown over rounds, each against the references measured just before and after."""

    slowdown: float
    """Median over rounds of ``t / mean(ref_before, ref_after) - 1``."""
    lo: float
    hi: float
    """Range of the per-round slowdowns (equal to ``slowdown`` with one round)."""
    drift: float
    """Largest ``|ref_after - ref_before| / mean`` over rounds."""
    noise: float
    """Median relative IQR of the bracketing references (their own repetition noise)."""
    drift_flag: bool
    """The references moved more than the slowdown's range and more than their own noise."""
    t_ref_ms: float
    """Median over rounds of the bracket means."""


def bracketed(t_cond: list[float], ref_before: list[float], ref_after: list[float],
              ref_rel_iqr: Iterable[float] = ()) -> Bracketed:
    """Slowdown of a condition from per-round medians and the reference medians around each."""
    if not (len(t_cond) == len(ref_before) == len(ref_after)) or not t_cond:
        raise ValueError("bracketed: one condition median and two references per round")
    means = [(b + a) / 2 for b, a in zip(ref_before, ref_after)]
    per_round = [t / m - 1 for t, m in zip(t_cond, means)]
    drift = max(abs(a - b) / m for b, a, m in zip(ref_before, ref_after, means))
    iqrs = list(ref_rel_iqr)
    noise = statistics.median(iqrs) if iqrs else 0.0
    lo, hi = min(per_round), max(per_round)
    return Bracketed(statistics.median(per_round), lo, hi, drift, noise, drift > max(hi - lo, noise),
                     statistics.median(means))


# ------------------------------------------------------------------------------------------ measurement

@dataclass
class Block:
    """One block of repetitions: the GEMM's times and what the checks saw."""

    median_ms: float
    iqr_ms: float
    covered: int = 0
    """Repetitions where the side work started before the GEMM and ended after it."""
    n: int = 0
    checks: dict[str, float] = field(default_factory=dict)
    period_ms: float = 0.0
    """Wall period of each repetition (side work's length; the GEMM alone idles the rest)."""


def _iqr(x: list[float]) -> float:
    if len(x) < 2:
        return 0.0
    q = statistics.quantiles(x, n=4, method="inclusive")
    return q[2] - q[0]


class _Bench:
    """GPU state for one run: streams, buffers, kernels (CUDA only)."""

    def __init__(self, cfg: InterferenceConfig):
        import torch

        self.torch = torch
        self.cfg = cfg
        self.dev = torch.device("cuda", torch.cuda.current_device())
        self.total_sms = torch.cuda.get_device_properties(self.dev).multi_processor_count
        self.gemm_stream = torch.cuda.Stream(self.dev)
        # Out of range maps to the highest priority the device has (torch's documented behaviour).
        self.side = torch.cuda.Stream(self.dev, priority=-100)
        k_max = max(cfg.ctas or [1])
        self.src = torch.rand(k_max * SLICE_ELEMS, device=self.dev)
        self.dst = torch.empty_like(self.src)
        self.copy_src = self.copy_dst = self.host = None
        if cfg.copies:
            self.copy_src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=self.dev).random_(0, 255)
            self.copy_dst = torch.empty_like(self.copy_src)
        if {"h2d", "d2h"} & set(cfg.copies):
            self.host = torch.empty(COPY_BYTES, dtype=torch.uint8, pin_memory=True)
        self.copy_ms: dict[str, float] = {}
        self.copy_checks: dict[str, dict[str, float]] = {}
        self.sms_seen: dict[int, int] = {}

    # -- side work
    def _copy_once(self, path: str) -> None:
        if path == "d2d":
            self.copy_dst.copy_(self.copy_src, non_blocking=True)
        elif path == "h2d":
            self.copy_dst.copy_(self.host, non_blocking=True)
        else:
            self.host.copy_(self.copy_src, non_blocking=True)

    def _time_on(self, stream: Any, fn: Any, n: int = 3) -> float:
        torch = self.torch
        out = []
        for _ in range(n):
            torch.cuda.synchronize(self.dev)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize(self.dev)
            out.append(s.elapsed_time(e))
        return statistics.median(out)

    def calibrate(self) -> None:
        """Copy times alone and beside every SM held by spinning CTAs (a copy engine does not wait for SMs;
        a kernel-based copy would), and the SMs each green context really runs on."""
        from overlap_bench import comm_like

        torch = self.torch
        for path in self.cfg.copies:
            alone = self._time_on(self.side, lambda: self._copy_once(path))
            self.copy_ms[path] = alone
            stamps = torch.zeros(4 * self.total_sms, 4, dtype=torch.int64, device=self.dev)
            hold_ns = int(max(5 * alone, 2.0) * 1e6)
            torch.cuda.synchronize(self.dev)
            with torch.cuda.stream(self.side):  # 4 spinning CTAs per SM: every SM slot taken (barely any traffic)
                comm_like.launch_ctas(4 * self.total_sms, self.src, self.dst, stamps, slice_elems=SLICE_ELEMS,
                                      duration_ns=hold_ns, rate_gbps=1e-3)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self.gemm_stream):  # no synchronize in between: the CTAs hold the SMs now
                s.record()
                self._copy_once(path)
                e.record()
            torch.cuda.synchronize(self.dev)
            beside = s.elapsed_time(e)
            held = len(set(stamps[:, 2].tolist()))
            self.copy_checks[path] = {"copy_ms_alone": alone, "copy_ms_sms_held": beside,
                                      "copy_sms_held_ms": hold_ns / 1e6, "copy_sms_held": held,
                                      "copy_gbps": COPY_BYTES / (alone * 1e-3) / 1e9,
                                      # A copy engine does not wait for the SMs; a copy run as a kernel does.
                                      "copy_waited_for_sms": beside > alone + hold_ns / 2e6}
        for spec in self.cfg.sms:
            n = resolve_sms(spec, self.total_sms)
            try:
                stream = comm_like.green_stream(n, self.dev.index)
                self.sms_seen[n] = self._count_sms(stream)
            except Exception as exc:  # noqa: BLE001 - recorded as unavailable, with the reason
                self.sms_seen[n] = -1
                self.copy_checks[f"green:{n}"] = {"error": f"{type(exc).__name__}: {exc}"}  # type: ignore[dict-item]
        self.sms_default = self._count_sms(self.gemm_stream)

    def warm_up(self, seconds: float = 3.0) -> None:
        """Run GEMMs for a few seconds first: an idle GPU starts at low clocks and would bias the first case."""
        import time

        torch = self.torch
        x = torch.randn(8192, 8192, device=self.dev, dtype=torch.bfloat16)
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            for _ in range(20):
                torch.mm(x, x)
            torch.cuda.synchronize(self.dev)
        del x

    def _count_sms(self, stream: Any) -> int:
        from overlap_bench import comm_like

        torch = self.torch
        grid = 4 * self.total_sms
        stamps = torch.zeros(grid, 4, dtype=torch.int64, device=self.dev)
        torch.cuda.synchronize(self.dev)
        with torch.cuda.stream(stream):
            comm_like.launch_ctas(grid, self.src, self.dst, stamps, slice_elems=SLICE_ELEMS, duration_ns=200_000,
                                  rate_gbps=0)
        torch.cuda.synchronize(self.dev)
        return len(set(stamps[:, 2].tolist()))

    # -- one block
    def block(self, cond: Condition, x: Any, w: Any, out: Any, duration_ns: int) -> Block:
        """``warmup + reps`` repetitions of the GEMM under ``cond``, host-synchronised between repetitions
        (so each starts on an idle GPU, the side work first)."""
        from overlap_bench import comm_like
        from overlap_bench.strategies.pipeline import matmul_into

        torch = self.torch
        cfg = self.cfg
        n = cfg.warmup + cfg.reps
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        g_st = torch.zeros(n, 2, dtype=torch.int64, device=self.dev)
        side_st = torch.zeros(n, 2, dtype=torch.int64, device=self.dev)
        k = cond.value if cond.kind == "ctas" else 0
        c_st = torch.zeros(n, max(k, 1), 4, dtype=torch.int64, device=self.dev)
        stream = comm_like.green_stream(cond.value, self.dev.index) if cond.kind == "green" else self.gemm_stream
        n_copies = 0
        if cond.kind == "copy":
            n_copies = max(1, math.ceil(duration_ns / 1e6 / self.copy_ms[cond.value]))
        period_s, last = duration_ns / 1e9, None
        for i in range(n):
            torch.cuda.synchronize(self.dev)
            # Every repetition of every condition takes the same wall period (the side work's length): a GEMM
            # repeated back to back heats the GPU into its power limit and runs slower than one followed by
            # side work, which would make the reference, not the interference, set the slowdown.
            if last is not None and period_s - (time.perf_counter() - last) > 0:
                time.sleep(period_s - (time.perf_counter() - last))
            last = time.perf_counter()
            if cond.kind == "ctas":
                with torch.cuda.stream(self.side):
                    comm_like.launch_ctas(k, self.src, self.dst, c_st[i], slice_elems=SLICE_ELEMS,
                                          duration_ns=duration_ns, rate_gbps=cond.rate)
            elif cond.kind == "copy":
                with torch.cuda.stream(self.side):
                    comm_like.stamp(side_st, 2 * i)
                    for _ in range(n_copies):
                        self._copy_once(cond.value)
                    comm_like.stamp(side_st, 2 * i + 1)
            with torch.cuda.stream(stream):
                if cond.kind != "green":
                    comm_like.stamp(g_st, 2 * i)
                evs[i][0].record()
                matmul_into(out, x, w, None)
                evs[i][1].record()
                if cond.kind != "green":
                    comm_like.stamp(g_st, 2 * i + 1)
        torch.cuda.synchronize(self.dev)
        times = [s.elapsed_time(e) for s, e in evs[cfg.warmup:]]
        blk = Block(statistics.median(times), _iqr(times), n=cfg.reps, period_ms=duration_ns / 1e6)
        g = g_st[cfg.warmup:].tolist()
        if cond.kind == "ctas":
            c = c_st[cfg.warmup:].tolist()
            starts = [max(cta[0] for cta in rep) for rep in c]
            ends = [min(cta[1] for cta in rep) for rep in c]
            blk.covered = sum(s <= gs and e >= ge for s, e, (gs, ge) in zip(starts, ends, g))
            rates = [cta[3] * comm_like.chunk_bytes() / max(cta[1] - cta[0], 1) for rep in c for cta in rep]
            blk.checks = {
                "distinct_sms_min": min(len({cta[2] for cta in rep}) for rep in c),
                "cta_gbps_achieved": statistics.median(rates),
                "side_ms": statistics.median((max(cta[1] for cta in rep) - min(cta[0] for cta in rep)) / 1e6
                                             for rep in c),
                "start_skew_us": statistics.median((max(cta[0] for cta in rep) - min(cta[0] for cta in rep)) / 1e3
                                                   for rep in c),
            }
        elif cond.kind == "copy":
            sd = side_st[cfg.warmup:].tolist()
            blk.covered = sum(s <= gs and e >= ge for (s, e), (gs, ge) in zip(sd, g))
            blk.checks = {"copies_per_rep": n_copies, "side_ms": statistics.median((e - s) / 1e6 for s, e in sd)}
        return blk


def _repro(shape: Shape, m: int, cfg: InterferenceConfig, cond: Condition) -> str:
    base = f"overlap-bench interference --shape {shape.K},{shape.N} --tokens {m} --dtype {cfg.dtype}"
    none = {"ctas": "--ctas none", "copy": "--copy none", "green": "--sms none"}
    parts = [base] + [v for kind, v in none.items() if kind != cond.kind]
    if cond.kind == "ctas":
        parts.append(f"--ctas {cond.value} --cta-gbps {cond.rate:g}")
    elif cond.kind == "copy":
        parts.append(f"--copy {cond.value}")
    else:
        parts.append(f"--sms {cond.value}")
    return " ".join(parts) + f" --rounds {cfg.rounds} --warmup {cfg.warmup} --reps {cfg.reps}"


def measure(cfg: InterferenceConfig, out_dir: Path, *, progress: bool = True) -> list[Record]:
    """Measure every shape, M and condition on the current GPU; append each record to ``out_dir`` as soon as
    its shape and M are done. Needs CUDA (and Triton)."""
    import torch

    from overlap_bench.numerics import TOLERANCE, rel_err, within_tolerance

    bench = _Bench(cfg)
    bench.calibrate()
    conds = cfg.conditions(bench.total_sms)
    writer = RecordWriter(out_dir)
    device_name = torch.cuda.get_device_name(bench.dev)
    dt = metrics.DTYPES[cfg.dtype]
    gen = torch.Generator(device=bench.dev).manual_seed(cfg.seed)
    records: list[Record] = []
    cases = [(s, m) for s in cfg.shapes for m in cfg.tokens]
    bar = _progress(len(cases) * cfg.rounds) if progress else None
    bench.warm_up()
    try:
        for shape, m in cases:
            x = torch.randn(m, shape.K, device=bench.dev, dtype=dt, generator=gen)
            w = (torch.randn(shape.N, shape.K, device=bench.dev, dtype=dt, generator=gen) / math.sqrt(shape.K))
            out = torch.empty(m, shape.N, device=bench.dev, dtype=dt)
            y_ref = torch.mm(x, w.t())
            est = bench.block(Condition("ref"), x, w, out, 0).median_ms
            # Long enough that the side work outlasts a GEMM slowed by 3.6x, plus launch slack.
            duration_ns = int((3.6 * est + 0.5) * 1e6)
            per: dict[Condition, list[tuple[Block, Block, Block]]] = {c: [] for c in conds}
            errs: dict[Condition, float] = {}
            unavailable: dict[Condition, str] = {}
            for r in range(cfg.rounds):
                order = conds if r % 2 == 0 else conds[::-1]
                before = bench.block(Condition("ref"), x, w, out, duration_ns)
                for c in order:
                    if c.kind == "green" and bench.sms_seen.get(c.value, 0) < 0:
                        unavailable[c] = str(bench.copy_checks.get(f"green:{c.value}", {}).get("error", "failed"))
                        continue
                    blk = bench.block(c, x, w, out, duration_ns)
                    errs[c] = max(errs.get(c, 0.0), rel_err(out, y_ref))
                    after = bench.block(Condition("ref"), x, w, out, duration_ns)
                    per[c].append((before, blk, after))
                    before = after
                if bar:
                    bar[0].update(bar[1], advance=1, description=f"{shape.name} M={m}")
            for c in conds:
                rec = _record(shape, m, cfg, c, per[c], errs.get(c, math.nan), unavailable.get(c), device_name,
                              bench, TOLERANCE[cfg.dtype], within_tolerance)
                writer.append(rec)
                records.append(rec)
            del x, w, out, y_ref
    finally:
        if bar:
            bar[0].stop()
    return records


def _progress(total: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn("[bold]interference"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                 TextColumn("{task.description}"), console=Console(stderr=True))
    p.start()
    return p, p.add_task("", total=total)


def _record(shape: Shape, m: int, cfg: InterferenceConfig, c: Condition, blocks: list[tuple[Block, Block, Block]],
            err: float, unavailable: str | None, device: str, bench: _Bench, tol: float, ok_fn: Any) -> Record:
    rec = Record(shape=shape.name, K=shape.K, N=shape.N, M=m, dtype=cfg.dtype, world=1, backend="cuda", device=device,
                 strategy=STRATEGY, settings=c.settings, label=c.label, env={}, warmup=cfg.warmup, reps=cfg.reps,
                 repro=_repro(shape, m, cfg, c), tol=tol, rel_err=err,
                 time=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    if unavailable or not blocks:
        rec.status, rec.reason = "unavailable", f"green context of {c.value} SMs: {unavailable}"
        return rec
    b = bracketed([x[1].median_ms for x in blocks], [x[0].median_ms for x in blocks],
                  [x[2].median_ms for x in blocks],
                  [y.iqr_ms / y.median_ms for x in blocks for y in (x[0], x[2])])
    t = statistics.median(x[1].median_ms for x in blocks)
    rec.t_ms, rec.t_iqr_ms = t, statistics.median(x[1].iqr_ms for x in blocks)
    rec.t_base_ms = rec.t_gemm_ms = b.t_ref_ms
    rec.t_base_iqr_ms = statistics.median(y.iqr_ms for x in blocks for y in (x[0], x[2]))
    rec.speedup, rec.tflops = metrics.speedup(b.t_ref_ms, t), metrics.tflops(m, shape.K, shape.N, t)
    rec.tokens_per_s = metrics.tokens_per_s(m, t)
    extra: dict[str, Any] = {"slowdown": b.slowdown, "slowdown_lo": b.lo, "slowdown_hi": b.hi, "drift": b.drift,
                             "ref_noise": b.noise, "drift_flag": b.drift_flag, "rounds": len(blocks),
                             "rep_period_ms": blocks[0][1].period_ms,
                             "per_round": [{"ref_before_ms": x[0].median_ms, "t_ms": x[1].median_ms,
                                            "ref_after_ms": x[2].median_ms} for x in blocks]}
    if c.kind in ("ctas", "copy"):
        extra["covered"] = sum(x[1].covered for x in blocks) / sum(x[1].n for x in blocks)
        for key in blocks[0][1].checks:
            extra[key] = statistics.median(x[1].checks[key] for x in blocks)
        if c.kind == "ctas":
            extra["distinct_sms_min"] = min(x[1].checks["distinct_sms_min"] for x in blocks)
            extra["side_priority"] = bench.side.priority
        else:
            extra.update(bench.copy_checks[c.value])
    if c.kind == "green":
        extra["sms_seen"] = bench.sms_seen.get(c.value)  # the SMs the green context really runs on
        extra["sms_device"] = bench.total_sms
        extra["sms_seen_default_stream"] = bench.sms_default
    rec.extra = extra
    if not ok_fn(err, cfg.dtype):
        rec.status, rec.reason = "failed", f"rel_err {err:.3g} above the {cfg.dtype} tolerance {tol:g}"
    elif c.kind in ("ctas", "copy") and extra["covered"] < COVERED_MIN:
        rec.note = f"side work covered the GEMM in only {extra['covered']:.0%} of the repetitions"
    return rec


# ------------------------------------------------------------------------------------------ predictions

def slowdown_curves(records: Iterable[Record], rate: float | None = None) -> dict[tuple, dict[int, float]]:
    """``{(K, N, M, dtype): {ctas: slowdown}}`` from ok ``ctas`` records at ``rate`` (default: the first rate
    found)."""
    recs = [r for r in records if r.strategy == STRATEGY and r.ok and r.settings.get("beside") == "ctas"]
    if rate is None and recs:
        rate = recs[0].settings["cta_gbps"]
    out: dict[tuple, dict[int, float]] = {}
    for r in recs:
        if r.settings["cta_gbps"] == rate:
            out.setdefault((r.K, r.N, r.M, r.dtype), {})[r.settings["ctas"]] = r.extra["slowdown"]
    return out


def _ref_times(records: Iterable[Record]) -> dict[tuple, tuple[str, float]]:
    out: dict[tuple, tuple[str, float]] = {}
    for r in records:
        if r.strategy == STRATEGY and r.ok and r.settings.get("beside") == "ctas":
            out.setdefault((r.K, r.N, r.M, r.dtype), (r.shape, r.t_base_ms))
    return out


def comm_rows(run_dir: Path) -> list[Record]:
    """One record per (shape, M, dtype, env) of a multi-GPU run that measured ``t_comm`` (the first seen)."""
    loaded = load_records(run_dir)
    if not loaded.records:
        raise UserError(f"--comm-from: {run_dir} has no records.jsonl records; give a multi-GPU run directory")
    seen: dict[tuple, Record] = {}
    for r in loaded.records:
        if r.world > 1 and math.isfinite(r.t_comm_ms):
            seen.setdefault((r.K, r.N, r.M, r.dtype, tuple(sorted(r.env.items()))), r)
    return list(seen.values())


def predict_from_runs(records: list[Record], comm_dirs: list[Path], ctas: float) -> list[eta_bound.Prediction]:
    """Predictions for every multi-GPU record whose shape, M and dtype the interference run measured; its
    ``t_gemm`` and ``t_comm`` (same card, same job) and the interference run's ``s(ctas)``."""
    curves = slowdown_curves(records)
    out = []
    for d in comm_dirs:
        for r in comm_rows(d):
            key = (r.K, r.N, r.M, r.dtype)
            if key not in curves:
                continue
            env = " ".join(f"{k}={v}" for k, v in sorted(r.env.items())) or "default"
            out.append(eta_bound.predict(
                shape=r.shape, K=r.K, N=r.N, M=r.M, t_gemm=r.t_gemm_ms, t_comm=r.t_comm_ms, curve=curves[key],
                ctas=ctas, comm_from=f"{r.device} x{r.world}", env=env, t_base=r.t_base_ms,
                t_joint_measured=float(r.extra.get("t_joint_ms", math.nan) or math.nan)))
    return out


def predict_from_busbw(records: list[Record], busbw: float, world: int, ctas: float) -> list[eta_bound.Prediction]:
    """Predictions with ``t_comm`` from nccl-tests' all-reduce formula at ``busbw`` GB/s over ``world`` ranks
    and ``t_gemm`` from the interference run's references."""
    curves, refs = slowdown_curves(records), _ref_times(records)
    out = []
    for (k, n, m, dtype), curve in sorted(curves.items()):
        shape, t_gemm = refs[(k, n, m, dtype)]
        t_comm = metrics.allreduce_ms(m, n, dtype, world, busbw)
        out.append(eta_bound.predict(shape=shape, K=k, N=n, M=m, t_gemm=t_gemm, t_comm=t_comm, curve=curve,
                                     ctas=ctas, comm_from=f"busbw={busbw:g},world={world}"))
    return out


# ------------------------------------------------------------------------------------------ output

def _pct(x: Any) -> str:
    return "-" if x is None or not isinstance(x, (int, float)) or not math.isfinite(x) else f"{100 * x:+.1f}%"


def _columns(records: list[Record]) -> list[str]:
    rates = {r.settings.get("cta_gbps") for r in records if r.settings.get("beside") == "ctas"}
    seen: dict[str, None] = {}
    for r in sorted(records, key=lambda r: (["ctas", "copy", "green"].index(r.settings["beside"]),
                                           r.settings.get("cta_gbps", 0), -r.settings.get("sms", 0),
                                           r.settings.get("ctas", 0))):
        seen[_column(r, len(rates) > 1)] = None
    return list(seen)


def _column(r: Record, many_rates: bool) -> str:
    s = r.settings
    if s["beside"] == "ctas":
        rate = "full" if s["cta_gbps"] == 0 else f"{s['cta_gbps']:g}"
        return f"k={s['ctas']}" + (f"@{rate}" if many_rates or s["cta_gbps"] == 0 else "")
    if s["beside"] == "copy":
        return f"copy {s['copy']}"
    granted = r.extra.get("sms_seen")
    return f"SMs {s['sms']}" + (f" ({granted} ran)" if granted and granted > 0 and granted != s["sms"] else "")


def slowdown_table(records: list[Record]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per shape and M, the GEMM alone and each condition's slowdown with its range.

    A cell ends with ``!`` when the references drifted more than the range, ``?`` when the side work did not
    cover the GEMM in most repetitions, and reads ``n/a`` (unavailable) or ``failed``."""
    recs = [r for r in records if r.strategy == STRATEGY]
    cols = _columns(recs)
    many = len({r.settings.get("cta_gbps") for r in recs if r.settings.get("beside") == "ctas"}) > 1
    header = ["shape", "M", "GEMM alone ms"] + cols
    rows = []
    for key in sorted({(r.shape, r.M) for r in recs}):
        mine = {_column(r, many): r for r in recs if (r.shape, r.M) == key}
        alone = [r.t_base_ms for r in mine.values() if r.ok]
        row = [key[0], str(key[1]), f"{statistics.median(alone):.3f}" if alone else "-"]
        for c in cols:
            r = mine.get(c)
            if r is None:
                row.append("")
            elif r.status == "unavailable":
                row.append("n/a")
            elif not r.ok:
                row.append("failed")
            else:
                e = r.extra
                text = f"{_pct(e['slowdown'])}"
                if e.get("rounds", 1) > 1:
                    text += f" [{100 * e['slowdown_lo']:+.0f}, {100 * e['slowdown_hi']:+.0f}]"
                if e.get("drift_flag"):
                    text += " !"
                if e.get("covered", 1) < COVERED_MIN:
                    text += " ?"
                row.append(text)
        rows.append(row)
    return header, rows


PRED_HEADER = ["shape", "M", "env", "t_comm from", "t_gemm", "t_comm", "s(k)", "t_joint max", "t_joint rate",
               "t_joint measured", "err max", "err rate", "eta max", "eta rate", "eta measured"]


def prediction_rows(preds: list[eta_bound.Prediction]) -> list[list[str]]:
    """Rows of :data:`PRED_HEADER`."""
    def ms(x: float) -> str:
        return f"{x:.3f}" if math.isfinite(x) else "-"

    def eta(x: float) -> str:
        return f"{x:.2f}" if math.isfinite(x) else "-"

    return [[p.shape, str(p.M), p.env, p.comm_from, ms(p.t_gemm_ms), ms(p.t_comm_ms), _pct(p.slowdown),
             ms(p.t_joint_max_ms), ms(p.t_joint_rate_ms), ms(p.t_joint_measured_ms), _pct(p.err_max),
             _pct(p.err_rate), eta(p.eta_max), eta(p.eta_rate), eta(p.eta_measured)]
            for p in sorted(preds, key=lambda p: (p.env, p.shape, p.M))]


def write_outputs(out_dir: Path, records: list[Record], preds: list[eta_bound.Prediction], *,
                  ctas: float, plots: bool = True) -> list[Path]:
    """``interference.md``/``.csv``, the plots and, with predictions, ``prediction.md``/``.json``."""
    written = []
    header, rows = slowdown_table(records)
    md = ["# GEMM slowdown beside communication-like work (one GPU)", "",
          f"Device: {records[0].device if records else '?'}. Slowdown = t / mean(reference before, after) - 1, "
          "median over rounds [range]; `!` reference drift beyond the range; `?` side work did not cover the "
          "GEMM; `n/a` unavailable.", "", table(header, [[cell(c) for c in r] for r in rows], "llr" + "r" * (len(header) - 3)), ""]
    write_atomic(out_dir / "interference.md", "\n".join(md))
    frame = records_frame(records)
    if not frame.empty:
        frame["slowdown"] = [r.extra.get("slowdown", math.nan) for r in records]
        write_atomic(out_dir / "interference.csv", frame.drop(columns=["extra"]).to_csv(index=False))
    written += [out_dir / "interference.md", out_dir / "interference.csv"]
    if preds:
        lines = ["# Predicted joint time and eta bound", "",
                 f"s(k) at k = {ctas:g} CTAs. Models: max = max(t_gemm (1 + s), t_comm); rate = the GEMM slowed "
                 "only while the all-reduce runs. err = (predicted - measured) / measured.", "",
                 table(PRED_HEADER, [[cell(c) for c in r] for r in prediction_rows(preds)], "llll" + "r" * 11), ""]
        for env in sorted({p.env for p in preds}):
            e = eta_bound.error_summary(p for p in preds if p.env == env)
            if math.isfinite(e["max_abs_err_rate"]):
                lines.append(f"- {env}: median |err| max model {e['median_abs_err_max']:.1%}, rate model "
                             f"{e['median_abs_err_rate']:.1%}; largest {e['max_abs_err_max']:.1%} / "
                             f"{e['max_abs_err_rate']:.1%}.")
        write_atomic(out_dir / "prediction.md", "\n".join(lines) + "\n")
        summ = {env: eta_bound.error_summary(p for p in preds if p.env == env) for env in sorted({p.env for p in preds})}
        doc = json_safe({"ctas": ctas, "summary_by_env": summ, "rows": [p.to_dict() for p in preds]})
        write_atomic(out_dir / "prediction.json", json.dumps(doc, indent=1, allow_nan=False) + "\n")
        written += [out_dir / "prediction.md", out_dir / "prediction.json"]
    if plots and records:
        written += plot(out_dir, records)
    return written


def _x(r: Record, key: str) -> int:
    """Plot position: CTAs, or the SMs a green context really ran on (it rounds the count asked for)."""
    seen = r.extra.get("sms_seen") if key == "sms" else None
    return seen if isinstance(seen, int) and seen > 0 else r.settings[key]


def plot(out_dir: Path, records: list[Record]) -> list[Path]:
    """``slowdown_ctas.png`` (slowdown vs CTAs, one panel per shape, one line per M and rate) and
    ``slowdown_sms.png`` (slowdown vs SMs left to the GEMM in a green context, with the SM-share line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from overlap_bench.records import atomic_file

    ok = [r for r in records if r.strategy == STRATEGY and r.ok]
    shapes = sorted({r.shape for r in ok})
    written = []
    for kind, name, xkey in (("ctas", "slowdown_ctas.png", "ctas"), ("green", "slowdown_sms.png", "sms")):
        sel = [r for r in ok if r.settings.get("beside") == kind]
        if not sel:
            continue
        fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4), squeeze=False)
        for ax, shape in zip(axes[0], shapes):
            mine = [r for r in sel if r.shape == shape]
            series = sorted({(r.M, r.settings.get("cta_gbps")) for r in mine})
            for m, rate in series:
                pts = sorted(((_x(r, xkey), r) for r in mine if r.M == m and r.settings.get("cta_gbps") == rate),
                             key=lambda p: p[0])
                xs = [p[0] for p in pts]
                ys = [100 * p[1].extra["slowdown"] for p in pts]
                lo = [100 * (p[1].extra["slowdown"] - p[1].extra["slowdown_lo"]) for p in pts]
                hi = [100 * (p[1].extra["slowdown_hi"] - p[1].extra["slowdown"]) for p in pts]
                label = f"M={m}" + ("" if rate is None else (" full speed" if rate == 0 else f" {rate:g} GB/s/CTA"))
                color = f"C{sorted({r.M for r in mine}).index(m)}"  # one colour per M; full speed dashed
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label, color=color,
                            linestyle="--" if rate == 0 else "-")
            if kind == "green" and mine:
                total = mine[0].extra.get("sms_device") or max(r.settings["sms"] for r in mine)
                xs = sorted({_x(r, xkey) for r in mine})
                ax.plot(xs, [100 * (total / x - 1) for x in xs], "k--", label="SM share (total / SMs - 1)")
                ax.set_xlabel("SMs the GEMM's green context ran on (counted)")
            else:
                ax.set_xlabel("CTAs beside the GEMM (512 threads each)")
            ax.set_ylabel("GEMM slowdown, %")
            ax.set_title(f"{shape} (K={mine[0].K}, N={mine[0].N})" if mine else shape)
            ax.axhline(0, color="grey", lw=0.5)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{ok[0].device}, {ok[0].dtype}: slowdown vs mean of the bracketing references "
                     "(bars: range over rounds)", fontsize=9)
        path = out_dir / name
        with atomic_file(path, "wb") as fh:
            fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------ the command

def shapes_for(spec: Path | None, preset: str | None, tp: int, shapes: list[str]) -> tuple[list[Shape], list[int] | None,
                                                                                   str | None]:
    """The shapes to measure (and a spec's tokens and first dtype): SPEC, ``--shape K,N``, or a preset at tp."""
    from overlap_bench.presets import row_parallel_shapes

    if tp < 1:
        raise UserError(f"--tp: must be >= 1, got {tp}")
    if spec is not None:
        if shapes or preset:
            raise UserError("SPEC: give either a sweep spec or --preset/--shape, not both")
        from overlap_bench.spec import load_spec

        # gloo only to validate the spec's world size without GPUs: nothing is launched.
        s, _ = load_spec(spec, tp=tp, backend="gloo")
        return list(s.shapes), list(s.tokens), s.dtypes[0]
    out = []
    for text in shapes:
        parts = text.split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise UserError(f"--shape: '{text}' must be K,N (K per rank), e.g. --shape 2048,8192")
        k, n = (int(p) for p in parts)
        out.append(Shape(f"K{k}xN{n}", k, n))
    if preset or not out:
        try:
            out += [Shape(name, k, n) for name, (k, n) in row_parallel_shapes(preset or "qwen2.5-72b", tp).items()]
        except ValueError as exc:
            raise UserError(f"--preset: {exc}") from None
    return out, None, None


def needs_gpu() -> None:
    """Raise the one-line user error when no CUDA GPU is visible."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("interference needs one CUDA GPU and none is visible here "
                        "(give --from RUN_DIR to predict from a run measured elsewhere)")


def run_interference(cfg: InterferenceConfig | None, *, out: Path, from_dir: Path | None, comm_from: list[Path],
                     busbw: float | None, world: int | None, comm_ctas: float,
                     progress: bool = True) -> tuple[list[Record], list[eta_bound.Prediction]]:
    """Measure (or load ``from_dir``'s records), predict, and write the run folder ``out``."""
    from overlap_bench import envinfo

    if (busbw is None) != (world is None):
        raise UserError("--busbw/--world: give both (e.g. --busbw 330 --world 4) or neither")
    if world is not None and world < 2:
        raise UserError(f"--world: an all-reduce needs >= 2 ranks, got {world}")
    if busbw is not None and not busbw > 0:
        raise UserError(f"--busbw: must be > 0 GB/s, got {busbw}")
    if not comm_ctas > 0:
        raise UserError(f"--comm-ctas: must be > 0, got {comm_ctas}")
    for d in comm_from:
        if not (d / "records.jsonl").is_file():
            raise UserError(f"--comm-from: {d} has no records.jsonl; give a multi-GPU run directory")
    if from_dir is not None:
        loaded = load_records(from_dir)
        records = [r for r in loaded.records if r.strategy == STRATEGY]
        if not records:
            raise UserError(f"--from: {from_dir} has no interference records; give an interference run directory")
    else:
        needs_gpu()
        assert cfg is not None
        if cfg.rounds < 1 or cfg.reps < 1 or cfg.warmup < 0:
            raise UserError("--rounds/--reps: must be >= 1 (--warmup >= 0)")
        if not (cfg.ctas or cfg.copies or cfg.sms):
            raise UserError("--ctas/--copy/--sms: all are none; give at least one condition")
        out.mkdir(parents=True, exist_ok=True)
        if (out / "records.jsonl").exists():
            raise UserError(f"--out: {out} already has records.jsonl; give a new folder")
        write_atomic(out / "env.json", json.dumps(envinfo.collect(), indent=2) + "\n")
        records = measure(cfg, out, progress=progress)
    preds: list[eta_bound.Prediction] = []
    if comm_from:
        preds += predict_from_runs(records, comm_from, comm_ctas)
    if busbw is not None and world is not None:
        preds += predict_from_busbw(records, busbw, world, comm_ctas)
    write_outputs(out, records, preds, ctas=comm_ctas)
    return records, preds
