"""``overlap-bench interference``: what communication costs the GEMM, measured on one GPU.

Per shape and M the GEMM is timed alone, beside ``k`` communication-like CTAs (:mod:`.comm_like`) or full-speed
copies, and inside a green context of N SMs. Each condition is bracketed by references, so a slowdown is
``t / mean(ref before, after) - 1`` (:func:`bracketed`); one ``Record`` per shape, M and condition.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from overlap_bench import metrics, runfolder, timing
from overlap_bench.errors import UserError
from overlap_bench.metrics import TOLERANCE, rel_err, within_tolerance
from overlap_bench.presets import row_parallel_shapes
from overlap_bench.records import Record, load_records
from overlap_bench.research import comm_like, eta_bound, progress_bar
from overlap_bench.research import interference_report as report
from overlap_bench.research.interference_report import COVERED_MIN, STRATEGY
from overlap_bench.runfolder import RunFolder
from overlap_bench.spec import Shape, load_spec
from overlap_bench.strategies import greenctx
from overlap_bench.strategies.pipeline import matmul_into

COPY_PATHS = ("d2d", "h2d", "d2h")
DEFAULT_CTAS = (1, 4, 8, 16, 24, 32)
DEFAULT_SMS = ("all", "all-8", "all-16", "all-32")
DEFAULT_CTA_GBPS = 14.0
"""GB/s each CTA reads (and writes): one NCCL ring channel's share of 4x H100 tp=4 busbw (~330 GB/s, ~24 channels)."""
ROUNDS, WARMUP, REPS = 2, 3, 15
DEFAULT_COMM_CTAS = 24.0
"""CTAs an NCCL ring all-reduce is assumed to hold when predicting (its channel count; ``--comm-ctas``)."""
SLICE_ELEMS = 8 * 1024 * 1024
"""float32 elements of each CTA's own slice (32 MiB): the CTAs stream through HBM, not through L2."""
COPY_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Condition:
    """Beside (or around) the GEMM: ``ref`` (alone), ``ctas`` (``value`` CTAs at ``rate`` GB/s each, 0 = full
    speed), ``copy`` (``value``: the path) or ``green`` (``value`` SMs)."""

    kind: str
    value: Any = None
    rate: float = 0.0

    @property
    def label(self) -> str:
        """Canonical text, e.g. ``ctas:k=8,gbps=14``, ``copy:d2d``, ``green:sms=124``."""
        return {"ctas": f"ctas:k={self.value},gbps={self.rate:g}", "copy": f"copy:{self.value}",
                "green": f"green:sms={self.value}"}.get(self.kind, "alone")

    @property
    def settings(self) -> dict[str, Any]:
        """The record's ``settings``."""
        if self.kind == "ctas":
            return {"beside": "ctas", "ctas": self.value, "cta_gbps": self.rate}
        return {"beside": self.kind, "copy" if self.kind == "copy" else "sms": self.value}


@dataclass
class InterferenceConfig:
    """What one ``overlap-bench interference`` run measures: shapes (K per rank, N) at token counts M under each
    condition, in ``rounds`` passes of ``warmup`` + ``reps`` repetitions per block."""

    shapes: list[Shape]
    tokens: list[int]
    dtype: str = "bfloat16"
    ctas: list[int] = field(default_factory=lambda: list(DEFAULT_CTAS))
    cta_gbps: list[float] = field(default_factory=lambda: [DEFAULT_CTA_GBPS])
    copies: list[str] = field(default_factory=lambda: list(COPY_PATHS))
    sms: list[str] = field(default_factory=lambda: list(DEFAULT_SMS))
    rounds: int = ROUNDS
    warmup: int = WARMUP
    reps: int = REPS
    seed: int = 0
    pace: bool = True
    """Give every repetition the side work's wall period (see :func:`pace`)."""

    def conditions(self, total_sms: int) -> list[Condition]:
        """The conditions in measurement order (green sizes resolved against the device's SM count)."""
        out = [Condition("ctas", k, r) for r in self.cta_gbps for k in self.ctas]
        out += [Condition("copy", p) for p in self.copies]
        out += [Condition("green", resolve_sms(s, total_sms)) for s in self.sms]
        return out


# ------------------------------------------------------------------------------------------ input parsing

def _parse(text: str, flag: str, ok: Callable[[str], bool], hint: str) -> list[str]:
    """The comma-separated items of ``flag`` (``none``: no items), each checked by ``ok``; repeats dropped."""
    items = [] if text.strip().lower() in ("", "none") else [t.strip() for t in text.split(",") if t.strip()]
    for t in items:
        if not ok(t):
            raise UserError(f"{flag}: '{t}' {hint}")
    return list(dict.fromkeys(items))


def _is_rate(t: str) -> bool:
    try:
        return math.isfinite(float(t)) and float(t) >= 0
    except ValueError:
        return False


def parse_ctas(text: str) -> list[int]:
    """``--ctas``: CTA counts >= 1 (``none``: skip)."""
    return sorted({int(t) for t in _parse(text, "--ctas", lambda t: t.isdigit() and int(t) >= 1,
                                          "must be an integer >= 1, e.g. --ctas 1,4,8,16,24,32")})


def parse_rates(text: str) -> list[float]:
    """``--cta-gbps``: GB/s per CTA, >= 0 (0 = full speed); at least one."""
    out = [float(t) for t in _parse(text, "--cta-gbps", _is_rate,
                                    "must be a number >= 0 (GB/s per CTA; 0 = full speed)")]
    if not out:
        raise UserError("--cta-gbps: give at least one rate, e.g. --cta-gbps 14")
    return out


def parse_copies(text: str) -> list[str]:
    """``--copy``: any of d2d, h2d, d2h (``none``: skip)."""
    return _parse(text, "--copy", lambda t: t in COPY_PATHS, f"is not one of {', '.join(COPY_PATHS)} (or none)")


def parse_sms(text: str) -> list[str]:
    """``--sms``: ``all``, ``all-N`` or a count (``none``: skip); :func:`resolve_sms` checks them on the device."""
    return _parse(text, "--sms", lambda t: re.fullmatch(r"all(-\d+)?|\d+", t) is not None,
                  "must be all, all-N or a count, e.g. --sms all,all-8,all-16,all-32")


def resolve_sms(text: str, total: int) -> int:
    """The SM count ``text`` names on a device of ``total`` SMs."""
    n = total if text == "all" else total - int(text[4:]) if text.startswith("all-") else int(text)
    if not 1 <= n <= total:
        raise UserError(f"--sms: '{text}' is {n} SMs; this GPU has {total}, give 1..{total}")
    return n


# ------------------------------------------------------------------------------------------ statistics

@dataclass(frozen=True)
class Bracketed:
    """Median over rounds of ``t / mean(ref_before, ref_after) - 1``, its range ``lo..hi``, the largest reference
    drift ``|after - before| / mean``, the references' median relative IQR (``noise``), the median bracket mean."""

    slowdown: float
    lo: float
    hi: float
    drift: float
    noise: float
    drift_flag: bool
    t_ref_ms: float


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
    """One block of repetitions: the GEMM's median and IQR, how many of ``n`` the side work ``covered``, checks."""

    median_ms: float
    iqr_ms: float
    covered: int = 0
    n: int = 0
    checks: dict[str, float] = field(default_factory=dict)
    period_ms: float = 0.0


def side_duration_ns(gemm_ms: float) -> int:
    """How long the side work runs (ns): a GEMM of ``gemm_ms`` slowed 3.6x, plus 0.5 ms of launch slack."""
    return int((3.6 * gemm_ms + 0.5) * 1e6)


def rep_period_s(duration_ns: int, paced: bool) -> float:
    """The wall time (s) each repetition is given (:func:`pace`): the side work's duration when ``paced``."""
    return duration_ns / 1e9 if paced else 0.0


def pace(last: float | None, period_s: float) -> float:
    """Sleep until ``period_s`` has passed since ``last`` (None: no wait); returns the new start. Equal periods
    keep back-to-back references from running hotter (power-limited) than a GEMM beside side work."""
    if last is not None:
        rest = period_s - (time.perf_counter() - last)
        if rest > 0:
            time.sleep(rest)
    return time.perf_counter()


class _Bench:
    """GPU state for one run: streams, buffers, kernels (CUDA only)."""

    def __init__(self, cfg: InterferenceConfig):
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
        self.green_error: dict[int, str] = {}

    # -- side work
    def _copy_once(self, path: str) -> None:
        dst, src = {"d2d": (self.copy_dst, self.copy_src), "h2d": (self.copy_dst, self.host),
                    "d2h": (self.host, self.copy_src)}[path]
        dst.copy_(src, non_blocking=True)

    def _elapsed(self, stream: Any, fn: Any, sync: bool = True) -> float:
        """GPU milliseconds of ``fn`` on ``stream``, after a synchronize unless ``sync`` is false."""
        if sync:
            torch.cuda.synchronize(self.dev)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(self.dev)
        return s.elapsed_time(e)

    def calibrate(self) -> None:
        """Copy times alone and with every SM held by spinning CTAs; the SMs each green context really runs on."""
        for path in self.cfg.copies:
            alone = statistics.median(self._elapsed(self.side, lambda: self._copy_once(path)) for _ in range(3))
            self.copy_ms[path] = alone
            hold_ns = int(max(5 * alone, 2.0) * 1e6)
            stamps = self._spin(self.side, hold_ns, 1e-3)  # barely any traffic
            # No synchronize in between: the CTAs hold the SMs now.
            beside = self._elapsed(self.gemm_stream, lambda: self._copy_once(path), sync=False)
            held = len(set(stamps[:, 2].tolist()))
            self.copy_checks[path] = {"copy_ms_alone": alone, "copy_ms_sms_held": beside,
                                      "copy_sms_held_ms": hold_ns / 1e6, "copy_sms_held": held,
                                      "copy_gbps": COPY_BYTES / (alone * 1e-3) / 1e9,
                                      # A copy engine does not wait for the SMs; a copy run as a kernel does.
                                      "copy_waited_for_sms": beside > alone + hold_ns / 2e6}
        for spec in self.cfg.sms:
            n = resolve_sms(spec, self.total_sms)
            try:
                self.sms_seen[n] = self._count_sms(greenctx.green_stream(n))
            except Exception as exc:  # noqa: BLE001 - recorded as unavailable, with the reason
                self.green_error[n] = f"{type(exc).__name__}: {exc}"
        self.sms_default = self._count_sms(self.gemm_stream)

    def warm_up(self, seconds: float = 3.0) -> None:
        """Run GEMMs for a few seconds first: an idle GPU starts at low clocks and would bias the first case."""
        x = torch.randn(8192, 8192, device=self.dev, dtype=torch.bfloat16)
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            for _ in range(20):
                torch.mm(x, x)
            torch.cuda.synchronize(self.dev)
        del x

    def _spin(self, stream: Any, duration_ns: int, rate_gbps: float) -> torch.Tensor:
        """4 CTAs per SM on ``stream`` (every SM slot taken), launched after a sync; their stamps."""
        stamps = torch.zeros(4 * self.total_sms, comm_like.STAMP_FIELDS, dtype=torch.int64, device=self.dev)
        torch.cuda.synchronize(self.dev)
        with torch.cuda.stream(stream):
            comm_like.launch_ctas(4 * self.total_sms, self.src, self.dst, stamps, slice_elems=SLICE_ELEMS,
                                  duration_ns=duration_ns, rate_gbps=rate_gbps)
        return stamps

    def _count_sms(self, stream: Any) -> int:
        """The distinct SMs a kernel launched on ``stream`` runs on."""
        stamps = self._spin(stream, 200_000, 0)
        torch.cuda.synchronize(self.dev)
        return len(set(stamps[:, 2].tolist()))

    # -- one block
    def block(self, cond: Condition, x: Any, w: Any, out: Any, duration_ns: int) -> Block:
        """``warmup + reps`` repetitions of the GEMM under ``cond``, each on an idle GPU, the side work first."""
        cfg = self.cfg
        n = cfg.warmup + cfg.reps
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        g_st = torch.zeros(n, 2, dtype=torch.int64, device=self.dev)
        side_st = torch.zeros(n, 2, dtype=torch.int64, device=self.dev)
        k = cond.value if cond.kind == "ctas" else 0
        c_st = torch.zeros(n, max(k, 1), comm_like.STAMP_FIELDS, dtype=torch.int64, device=self.dev)
        stream = greenctx.green_stream(cond.value) if cond.kind == "green" else self.gemm_stream
        n_copies = max(1, math.ceil(duration_ns / 1e6 / self.copy_ms[cond.value])) if cond.kind == "copy" else 0
        period_s, last = rep_period_s(duration_ns, cfg.pace), None
        for i in range(n):
            torch.cuda.synchronize(self.dev)
            last = pace(last, period_s)
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
        blk = Block(statistics.median(times), timing.iqr(times), n=cfg.reps, period_ms=duration_ns / 1e6)
        g = g_st[cfg.warmup:].tolist()
        if cond.kind == "ctas":
            c = c_st[cfg.warmup:].tolist()
            starts = [max(cta[0] for cta in rep) for rep in c]
            ends = [min(cta[1] for cta in rep) for rep in c]
            blk.covered = sum(s <= gs and e >= ge for s, e, (gs, ge) in zip(starts, ends, g))
            rates = [comm_like.achieved_gbps(cta[3], cta[0], cta[1]) for rep in c for cta in rep]
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
    flag = {"ctas": "--ctas", "copy": "--copy", "green": "--sms"}
    parts = [base] + [f"{v} none" for kind, v in flag.items() if kind != cond.kind]
    parts += [f"{flag[cond.kind]} {cond.value}"]
    parts += [f"--cta-gbps {cond.rate:g}"] if cond.kind == "ctas" else []
    return " ".join(parts) + f" --rounds {cfg.rounds} --warmup {cfg.warmup} --reps {cfg.reps}" + (
        "" if cfg.pace else " --no-pace")


def measure(cfg: InterferenceConfig, out_dir: Path, *, progress: bool = True) -> list[Record]:
    """Measure every shape, M and condition on this GPU (CUDA, Triton); records appended per shape and M."""
    bench = _Bench(cfg)
    bench.calibrate()
    conds = cfg.conditions(bench.total_sms)
    writer = RunFolder(out_dir)
    device_name = torch.cuda.get_device_name(bench.dev)
    dt = metrics.DTYPES[cfg.dtype]
    gen = torch.Generator(device=bench.dev).manual_seed(cfg.seed)
    records: list[Record] = []
    cases = [(s, m) for s in cfg.shapes for m in cfg.tokens]
    bench.warm_up()
    with progress_bar("interference", len(cases) * cfg.rounds, progress) as step:
        for shape, m in cases:
            x = torch.randn(m, shape.K, device=bench.dev, dtype=dt, generator=gen)
            w = (torch.randn(shape.N, shape.K, device=bench.dev, dtype=dt, generator=gen) / math.sqrt(shape.K))
            out = torch.empty(m, shape.N, device=bench.dev, dtype=dt)
            y_ref = torch.mm(x, w.t())
            est = bench.block(Condition("ref"), x, w, out, 0).median_ms
            duration_ns = side_duration_ns(est)
            per: dict[Condition, list[tuple[Block, Block, Block]]] = {c: [] for c in conds}
            errs: dict[Condition, float] = {}
            unavailable: dict[Condition, str] = {}
            for r in range(cfg.rounds):
                order = conds if r % 2 == 0 else conds[::-1]
                before = bench.block(Condition("ref"), x, w, out, duration_ns)
                for c in order:
                    if c.kind == "green" and c.value in bench.green_error:
                        unavailable[c] = bench.green_error[c.value]
                        continue
                    blk = bench.block(c, x, w, out, duration_ns)
                    errs[c] = max(errs.get(c, 0.0), rel_err(out, y_ref))
                    after = bench.block(Condition("ref"), x, w, out, duration_ns)
                    per[c].append((before, blk, after))
                    before = after
                step(f"{shape.name} M={m}")
            for c in conds:
                rec = _record(shape, m, cfg, c, per[c], errs.get(c, math.nan), unavailable.get(c), device_name, bench)
                writer.append(rec)
                records.append(rec)
            del x, w, out, y_ref
    return records


def _record(shape: Shape, m: int, cfg: InterferenceConfig, c: Condition, blocks: list[tuple[Block, Block, Block]],
            err: float, unavailable: str | None, device: str, bench: _Bench) -> Record:
    """One condition's record from its bracketed blocks (``unavailable``: why it could not run)."""
    tol = TOLERANCE[cfg.dtype]
    rec = Record(shape=shape.name, K=shape.K, N=shape.N, M=m, dtype=cfg.dtype, world=1, backend="cuda", device=device,
                 strategy=STRATEGY, settings=c.settings, label=c.label, env={}, kind="interference",
                 warmup=cfg.warmup, reps=cfg.reps, repro=_repro(shape, m, cfg, c), tol=tol, rel_err=err,
                 time=runfolder.utc_now())
    if unavailable or not blocks:
        rec.status, rec.reason = "unavailable", f"green context of {c.value} SMs: {unavailable}"
        return rec
    before, mid, after = zip(*blocks)
    refs = before + after
    b = bracketed([x.median_ms for x in mid], [x.median_ms for x in before], [x.median_ms for x in after],
                  [y.iqr_ms / y.median_ms for y in refs])
    t = statistics.median(x.median_ms for x in mid)
    rec.t_ms, rec.t_iqr_ms = t, statistics.median(x.iqr_ms for x in mid)
    rec.t_base_ms = rec.t_gemm_ms = b.t_ref_ms
    rec.t_base_iqr_ms = statistics.median(y.iqr_ms for y in refs)
    rec.speedup, rec.tflops = metrics.speedup(b.t_ref_ms, t), metrics.tflops(m, shape.K, shape.N, t)
    rec.tokens_per_s = metrics.tokens_per_s(m, t)
    extra: dict[str, Any] = {"slowdown": b.slowdown, "slowdown_lo": b.lo, "slowdown_hi": b.hi, "drift": b.drift,
                             "ref_noise": b.noise, "drift_flag": b.drift_flag, "rounds": len(blocks),
                             "rep_period_ms": mid[0].period_ms, "paced": cfg.pace,
                             "per_round": [{"ref_before_ms": x.median_ms, "t_ms": y.median_ms,
                                            "ref_after_ms": z.median_ms} for x, y, z in blocks]}
    if c.kind in ("ctas", "copy"):
        extra["covered"] = sum(x.covered for x in mid) / sum(x.n for x in mid)
        for key in mid[0].checks:
            extra[key] = statistics.median(x.checks[key] for x in mid)
        if c.kind == "ctas":
            extra["distinct_sms_min"] = min(x.checks["distinct_sms_min"] for x in mid)
            extra["side_priority"] = bench.side.priority
        else:
            extra.update(bench.copy_checks[c.value])
    if c.kind == "green":
        extra["sms_seen"] = bench.sms_seen.get(c.value)  # the SMs the green context really runs on
        extra["sms_device"] = bench.total_sms
        extra["sms_seen_default_stream"] = bench.sms_default
    rec.extra = extra
    if not within_tolerance(err, cfg.dtype):
        rec.status, rec.reason = "failed", f"rel_err {err:.3g} above the {cfg.dtype} tolerance {tol:g}"
    elif c.kind in ("ctas", "copy") and extra["covered"] < COVERED_MIN:
        rec.note = f"side work covered the GEMM in only {extra['covered']:.0%} of the repetitions"
    return rec


# ------------------------------------------------------------------------------------------ the command

def shapes_for(spec: Path | None, preset: str | None, tp: int,
               shapes: list[str]) -> tuple[list[Shape], list[int] | None, str | None]:
    """The shapes to measure (and a spec's tokens and first dtype): SPEC, ``--shape K,N``, or a preset at tp."""
    if tp < 1:
        raise UserError(f"--tp: must be >= 1, got {tp}")
    if spec is not None:
        if shapes or preset:
            raise UserError("SPEC: give either a sweep spec or --preset/--shape, not both")
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


def check_inputs(cfg: InterferenceConfig | None, from_dir: Path | None, comm_from: list[Path],
                 busbw: float | None, world: int | None, comm_ctas: float) -> None:
    """Refuse bad input before any folder is made: a :class:`UserError` naming the flag."""
    if (busbw is None) != (world is None):
        raise UserError("--busbw/--world: give both (e.g. --busbw 330 --world 4) or neither")
    if world is not None and world < 2:
        raise UserError(f"--world: an all-reduce needs >= 2 ranks, got {world}")
    if busbw is not None and not busbw > 0:
        raise UserError(f"--busbw: must be > 0 GB/s, got {busbw}")
    if not comm_ctas > 0:
        raise UserError(f"--comm-ctas: must be > 0, got {comm_ctas}")
    for d in comm_from:
        if not (d / runfolder.RECORDS).is_file():
            raise UserError(f"--comm-from: {d} has no records.jsonl; give a multi-GPU run directory")
    if from_dir is not None:
        if not _records_of(from_dir):
            raise UserError(f"--from: {from_dir} has no interference records; give an interference run directory")
        return
    if not torch.cuda.is_available():
        raise UserError("interference needs one CUDA GPU and none is visible here "
                        "(give --from RUN_DIR to predict from a run measured elsewhere)")
    assert cfg is not None
    if cfg.rounds < 1 or cfg.reps < 1 or cfg.warmup < 0:
        raise UserError("--rounds/--reps: must be >= 1 (--warmup >= 0)")
    if not (cfg.ctas or cfg.copies or cfg.sms):
        raise UserError("--ctas/--copy/--sms: all are none; give at least one condition")


def _records_of(run_dir: Path) -> list[Record]:
    return [r for r in load_records(run_dir).records if r.strategy == STRATEGY]


def run_interference(cfg: InterferenceConfig | None, *, out: Path, from_dir: Path | None, comm_from: list[Path],
                     busbw: float | None, world: int | None, comm_ctas: float,
                     progress: bool = True) -> tuple[list[Record], list[eta_bound.Prediction]]:
    """Measure (or load ``from_dir``'s records), predict, and write the run folder ``out``."""
    check_inputs(cfg, from_dir, comm_from, busbw, world, comm_ctas)
    if from_dir is not None:
        records = _records_of(from_dir)
    else:
        assert cfg is not None
        out.mkdir(parents=True, exist_ok=True)
        if (out / runfolder.RECORDS).exists():
            raise UserError(f"--out: {out} already has records.jsonl; give a new folder")
        RunFolder(out).write_env()
        records = measure(cfg, out, progress=progress)
    preds = report.predict_from_runs(records, comm_from, comm_ctas)
    if busbw is not None and world is not None:
        preds += report.predict_from_busbw(records, busbw, world, comm_ctas)
    report.write_outputs(out, records, preds, ctas=comm_ctas)
    return records, preds
