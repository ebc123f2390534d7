"""Sweep specs: YAML in, a validated :class:`SweepSpec` out, expanded into :class:`Case` lists.

Every error is a :class:`SpecError` whose one-line message names the field and the fix; nothing here
starts a process, so a bad spec costs nothing.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from overlap_bench import check, strategies
from overlap_bench.check import FieldError
from overlap_bench.world import LaunchError, in_torchrun, resolve
from overlap_bench.metrics import DTYPES
from overlap_bench.timing import REPS, WARMUP
from overlap_bench.confirm import REPEATS as CONFIRM_REPEATS
from overlap_bench.presets import row_parallel_shapes


SpecError = FieldError
"""An invalid sweep spec or flag; the message is one line: ``field: problem; fix``."""

MAX_CASES = 100_000
"""More cases than this is a mistake (a range with step 1, a grid too fine): refused before it is built."""
MAX_DIM = 2 ** 31 - 1
"""Largest K, N or M: GEMM libraries index with 32-bit integers, and larger products overflow a tensor's size."""


@dataclass(frozen=True)
class Shape:
    """One row-parallel GEMM shape."""

    name: str
    K: int
    """Inner dimension per rank."""
    N: int
    """Output features."""


@dataclass(frozen=True)
class Case:
    """One measurement: a shape at M tokens, a dtype, a strategy setting, a process environment."""

    shape: str
    K: int
    N: int
    M: int
    dtype: str
    bias: bool
    strategy: str
    """A registered strategy's name."""
    settings: Any
    """Its typed settings (``strategies.make_settings``)."""
    env: tuple[tuple[str, str], ...]
    """Process environment variant, as sorted items (hashable)."""

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    @property
    def label(self) -> str:
        """Canonical strategy text, for display and keys only (``strategies.label``)."""
        return strategies.label(self.strategy, self.settings)


@dataclass
class SweepSpec:
    """A sweep, validated where it is built: ``SweepSpec(**yaml_mapping)`` checks every field (its
    ``__post_init__``) and expands the YAML forms (presets, token ranges, strategy grids) into the lists
    below. A failure is a :class:`SpecError` naming the field and the fix; the defaults are the ones here."""

    shapes: list[Shape]
    """Expanded shapes. YAML: ``{preset, tp}`` (a model's o_proj and down_proj) or ``{name, K, N}``."""
    tokens: list[int]
    """Token counts M, sorted. YAML: a list, or ``{start, stop, mul}`` / ``{start, stop, step}``."""
    strategies: list[tuple[str, Any]]
    """Expanded ``(name, settings)``, one per grid point. YAML: names, or ``{name, setting: [values]}`` grids."""
    name: str = "sweep"
    """Used in file names and titles."""
    backend: str = "auto"
    """``auto`` (nccl with GPUs, else gloo), ``nccl`` or ``gloo``."""
    world_size: int | None = None
    """Ranks; default every visible GPU, or 2 on CPU."""
    dtypes: list[str] = field(default_factory=lambda: ["bfloat16"])
    """Element types: bfloat16, float16, float32."""
    bias: bool = False
    """Give the layer a bias (counted once in the reduced output)."""
    env: list[dict[str, str]] = field(default_factory=lambda: [{}])
    """Process environment variants; each runs as its own job (some knobs act only before CUDA starts)."""
    warmup: int = WARMUP
    """Untimed calls before each timed region."""
    reps: int = REPS
    """Timed calls per region (median and IQR over them)."""
    timeout_s: float = 300.0
    """Collective timeout in seconds: a hung rank ends the job after this long."""
    confirm_repeats: int = CONFIRM_REPEATS
    """Interleaved repeats per side in the confirmation stage (``sweep --confirm-repeats`` overrides)."""

    def __post_init__(self) -> None:
        self.name = str(self.name)
        ws = None if self.world_size is None else check.integer(self.world_size, "world_size", 1)
        try:
            self.backend, self.world_size = resolve(str(self.backend), ws)
        except LaunchError as exc:
            field_name = "backend" if "backend" in str(exc) else "world_size"
            raise SpecError(f"{field_name}: {str(exc).replace('--nproc', 'world_size')}") from None
        if in_torchrun() and ws is not None and ws != self.world_size:
            raise SpecError(f"world_size: {ws} differs from torchrun's WORLD_SIZE={self.world_size}; "
                            "remove it or match it")
        self.dtypes = check.listed(self.dtypes, "dtypes")
        for i, d in enumerate(self.dtypes):
            if not isinstance(d, str) or d not in DTYPES:
                raise SpecError(f"dtypes[{i}]: unknown dtype {d!r}; use one of {', '.join(DTYPES)}")
        self.shapes = _shapes(self.shapes, self.world_size)
        self.tokens = _tokens(self.tokens)
        if not isinstance(self.bias, bool):
            raise SpecError(f"bias: must be true or false, got {self.bias!r}")
        self.strategies = _strategies(self.strategies)
        self.env = _env(self.env)
        self.warmup = check.integer(self.warmup, "warmup", 0)
        self.reps = check.integer(self.reps, "reps", 1)
        self.confirm_repeats = check.integer(self.confirm_repeats, "confirm_repeats", 2)
        self.timeout_s = _timeout(self.timeout_s, "timeout_s")
        n = math.prod(map(len, (self.env, self.dtypes, self.shapes, self.tokens, self.strategies)))
        if n > MAX_CASES:
            raise SpecError(f"spec: {n} cases, more than {MAX_CASES}; split the sweep or give fewer values")

    def cases(self) -> list[Case]:
        """Every case, grouped by environment variant first (one job per variant)."""
        out = []
        for env, dtype, shape, m, (name, settings) in itertools.product(self.env, self.dtypes, self.shapes,
                                                                        self.tokens, self.strategies):
            out.append(Case(shape.name, shape.K, shape.N, m, dtype, self.bias, name, settings,
                            tuple(sorted(env.items()))))
        return out

    @property
    def labels(self) -> list[str]:
        """The strategies as labels (display, the run folder's identity)."""
        return [strategies.label(*s) for s in self.strategies]


MISSING_FIX = {"shapes": "give presets (preset: qwen2.5-72b) or explicit K and N",
               "tokens": "give a list of token counts or {start, stop, mul}",
               "strategies": "list at least baseline and one other strategy"}
"""The fix named when a required field is missing (the fields of :class:`SweepSpec` without a default)."""


def _timeout(value: Any, where: str) -> float:
    # Bounded: the process group turns it into a timedelta and then milliseconds, which overflow (at launch).
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1e7:
        raise SpecError(f"{where}: must be a positive number of seconds (at most 1e7), got {value!r}")
    return float(value)


def check_memory(spec: "SweepSpec") -> None:
    """On gloo every rank runs on this machine: a case whose tensors cannot fit in its memory is refused
    before the job starts (on CPU an allocation that is granted but cannot be backed ends in the kernel's OOM
    killer, which no rank can report and ``--resume`` would meet again). Not part of :func:`parse_spec`, so
    that a GPU spec still validates (``--dry-run``) on a CPU machine. GPU memory is checked per case: an OOM
    there is a recorded failure."""
    if spec.backend != "gloo":
        return
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        return
    for shape in spec.shapes:
        for m in spec.tokens:
            for dtype in spec.dtypes:
                size = DTYPES[dtype].itemsize
                # float32 draws of x and w, their casts, and five [M, N] outputs (reference, scratch, comm buffer,
                # the strategy's output, a temporary), per rank.
                need = spec.world_size * ((4 + size) * (m + shape.N) * shape.K + 5 * size * m * shape.N)
                if need > ram:
                    raise SpecError(f"tokens: M={m} with {shape.name} (K={shape.K}, N={shape.N}, {dtype}) needs "
                                    f"about {need / 2**30:.1f} GiB on {spec.world_size} gloo ranks, more than this "
                                    f"machine's {ram / 2**30:.1f} GiB; use fewer tokens or a smaller shape")


def _tokens(raw: Any) -> list[int]:
    if not isinstance(raw, dict):
        return sorted({check.integer(v, f"tokens[{i}]", 1, MAX_DIM) for i, v in enumerate(check.listed(raw, "tokens"))})
    check.known_keys(raw, {"start", "stop", "mul", "step"}, "tokens.", "use start, stop and mul or step")
    start = check.integer(raw.get("start"), "tokens.start", 1, MAX_DIM)
    stop = check.integer(raw.get("stop"), "tokens.stop", start, MAX_DIM)
    if ("mul" in raw) == ("step" in raw):
        raise SpecError("tokens: give exactly one of mul (geometric) or step (linear)")
    if "step" in raw:
        step = check.integer(raw["step"], "tokens.step", 1)
        if (stop - start) // step + 1 > MAX_CASES:
            raise SpecError(f"tokens: {start}..{stop} by {step} is {(stop - start) // step + 1} values; "
                            f"use a larger step or mul")
        return list(range(start, stop + 1, step))
    vals, m, mul = [], start, check.integer(raw["mul"], "tokens.mul", 2)
    while m <= stop:
        vals.append(m)
        m *= mul
    return vals


def _shapes(raw: Any, world: int) -> list[Shape]:
    out: list[Shape] = []
    for i, item in enumerate(check.listed(raw, "shapes")):
        where = f"shapes[{i}]"
        item = check.mapping(item, where)
        if "preset" in item:
            check.known_keys(item, {"preset", "tp"}, f"{where}.", "a preset shape takes preset and tp")
            tp = check.integer(item.get("tp", world), f"{where}.tp", 1)
            try:
                pairs = row_parallel_shapes(str(item["preset"]), tp)
            except ValueError as exc:
                raise SpecError(f"{where}: {exc}") from None
            out += [Shape(n, k, nn) for n, (k, nn) in pairs.items()]
        else:
            check.known_keys(item, {"name", "K", "N"}, f"{where}.", "use preset+tp or name, K (per rank), N")
            for key in ("K", "N"):
                check.required(item, [key], f"{where}.", f"give {key} as an integer")
            k = check.integer(item["K"], f"{where}.K", 1, MAX_DIM)
            n = check.integer(item["N"], f"{where}.N", 1, MAX_DIM)
            out.append(Shape(str(item.get("name", f"K{k}xN{n}")), k, n))
    names = [s.name for s in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise SpecError(f"shapes: '{dup}' appears twice; give each shape a distinct name")
    return out


def _strategies(raw: Any) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for i, item in enumerate(check.listed(raw, "strategies")):
        where = f"strategies[{i}]"
        item = dict(check.mapping({"name": item} if isinstance(item, str) else item, where))
        if item.get("name") is None:
            raise SpecError(f"{where}.name: missing; give a strategy name ({', '.join(sorted(strategies.REGISTRY))})")
        name = str(item.pop("name"))
        try:
            strategies.get(name)
        except ValueError as exc:
            raise SpecError(f"{where}.name: {exc}") from None
        keys = list(item)
        grids = [check.listed(item[k], f"{where}.{k}") for k in keys]
        if math.prod(map(len, grids)) > MAX_CASES:
            raise SpecError(f"{where}: its grid has {math.prod(map(len, grids))} points; give fewer values")
        for point in itertools.product(*grids):
            try:
                settings = strategies.make_settings(name, dict(zip(keys, point)))
            except ValueError as exc:
                bad = next((k for k in keys if f"'{k}'" in str(exc)), None)
                raise SpecError(f"{where}.{bad or 'settings'}: {exc}") from None
            if (name, settings) not in out:  # settings compare by value: a grid point given twice runs once
                out.append((name, settings))
    return out


def _env(raw: Any) -> list[dict[str, str]]:
    out = []
    for i, item in enumerate(check.listed(raw, "env")):
        item = check.mapping(item or {}, f"env[{i}]")
        for k, v in item.items():
            if not isinstance(v, (str, int)) or isinstance(v, bool):
                raise SpecError(f"env[{i}].{k}: must be a string or integer, got {v!r}")
            if not str(k) or "=" in str(k) or "\0" in str(k) + str(v):
                raise SpecError(f"env[{i}]: {str(k)!r}={str(v)!r} cannot be set in a process environment; "
                                "give a non-empty name without '=' and no NUL characters")
        out.append({str(k): str(v) for k, v in item.items()})
    return out


def parse_spec(raw: Any, *, world_size: int | None = None, backend: str | None = None,
               timeout_s: float | None = None) -> SweepSpec:
    """Validate a spec mapping into a :class:`SweepSpec`. ``world_size``/``backend``/``timeout_s`` replace the
    spec's (command-line flags)."""
    raw = check.mapping(raw if raw is not None else {}, "spec")
    allowed = [f.name for f in fields(SweepSpec)]
    check.known_keys(raw, allowed, "", f"allowed: {', '.join(sorted(allowed))}")
    for key, fix in MISSING_FIX.items():
        check.required(raw, [key], "", fix)
    flags = {"world_size": world_size, "backend": backend or None,
             "timeout_s": None if timeout_s is None else _timeout(timeout_s, "--timeout")}
    return SweepSpec(**{**raw, **{k: v for k, v in flags.items() if v is not None}})


def with_tp(raw: Any, tp: int) -> dict:
    """A copy of a raw spec run at tensor parallel ``tp``: every preset shape's ``tp`` and the world size
    become ``tp`` (e.g. a tp=8 spec measured on the 4 GPUs at hand). Explicit K, N shapes are kept."""
    check.integer(tp, "--tp", 1)
    out = dict(check.mapping(raw if raw is not None else {}, "spec"))
    shapes = out.get("shapes")
    if isinstance(shapes, list):
        out["shapes"] = [dict(s, tp=tp) if isinstance(s, dict) and "preset" in s else s for s in shapes]
    out["world_size"] = tp
    out["name"] = f"{out.get('name', SweepSpec.name)}-at-tp{tp}"
    return out


def load_spec(path: str | os.PathLike | None, **overrides: Any) -> tuple[SweepSpec, dict]:
    """Read and validate a spec file (or the embedded default when ``path`` is None); returns it with the raw
    mapping. ``overrides``: ``world_size``, ``backend``, ``timeout_s`` (see :func:`parse_spec`), ``tp``
    (see :func:`with_tp`)."""
    if path is None:
        raw = default_spec_raw()
    else:
        p = Path(path)
        if not p.is_file():
            raise SpecError(f"SPEC: no file at {p}; give the path of a sweep YAML (see sweeps/)")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError(f"SPEC: cannot read {p} as UTF-8 text ({type(exc).__name__}); "
                            "give a sweep YAML") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise SpecError(f"SPEC: {p} is not valid YAML{where}; fix the syntax") from None
    tp = overrides.pop("tp", None)
    if tp is not None:
        raw = with_tp(raw, tp)
    return parse_spec(raw, **overrides), raw


SMOKE: dict[str, Any] = {
    "name": "smoke",
    "backend": "gloo",
    "world_size": 2,
    "dtypes": ["float32"],
    "shapes": [{"name": "tiny/o_proj", "K": 128, "N": 256}, {"name": "tiny/down_proj", "K": 256, "N": 256}],
    "tokens": [64, 256],
    "strategies": [{"name": "baseline"}, {"name": "pr"},
                   {"name": "chunked", "chunks": [2, 4], "comm": ["stream", "async"]}],
    "warmup": 2,
    "reps": 5,
    "confirm_repeats": 5,  # the smoke shows the stage works; gloo on a laptop confirms nothing anyway
    "timeout_s": 60,
}
"""The embedded CPU default: seconds on gloo; mirrors sweeps/smoke.yaml."""


def default_spec_raw() -> dict[str, Any]:
    """The spec that suits this machine: the CPU smoke spec, or Qwen2.5-72B shapes at tp = GPU count."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        return dict(SMOKE)
    return {
        "name": f"qwen2.5-72b-tp{gpus}",
        "dtypes": ["bfloat16"],
        "shapes": [{"preset": "qwen2.5-72b", "tp": gpus}],
        "tokens": [4096, 8192, 16384, 32768],
        "strategies": [{"name": "baseline"}, {"name": "pr"},
                       {"name": "chunked", "chunks": [2, 3, 4, 8], "comm": ["stream", "async"]}],
    }
